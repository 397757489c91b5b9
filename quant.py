"""Int4 weight-only quantization: 4-bit weights in groups of 128 along the input dim, bf16 activations.

What it is: a readable, torchao-free version of the `int4_weight_only(group_size=128)` behind the
official `--quant` flag (paper: -48% time, -47% memory). Primitives (quantize, dequantize, pack two
4-bit values per byte), then `Int4Linear`, a drop-in for a bias-free nn.Linear, then `quantize_model`
and safetensors save/load. Formula and zero point are torchao's and gpt-fast's (specs/performance.md
§3.2, §4), so quantized weights are interchangeable with theirs. Each layer picks its path once:
  "cuda"       tinygemm, torch.ops.aten._weight_int4pack_mm (sm80+, bf16 activations, §3.2)
  "cpu"        torch.ops.aten._weight_int4pack_mm_for_cpu (specs/machine.md: ~12x an fp32 GEMV)
  "reference"  unpack -> dequantize -> F.linear in the input's dtype, on any device
The kernels take bf16 activations, so fp32 inputs are cast to bf16 and the result back: the CPU
kernel is ~70x slower on fp32, and the cast's ~2e-3 relative error is far below int4's own (~6e-2).
path="reference" gives exact fp32 math.

What it is not: activation or KV-cache quantization, GPTQ/HQQ-style rounding, or QAT. Move and cast
the model first, then quantize: a kernel's layout belongs to its device (`.to()` cannot move a layer
from the "cpu" path to "cuda") and the kernels want bf16 scales.

Run `python quant.py` to time decode-shaped matmuls (batch 2 and 34), int4 vs float, on this machine.
"""
import functools
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUP_SIZES = (32, 64, 128, 256)  # what the tinygemm kernel supports (performance.md §3.2)
INT4_FILE = "model_int4.safetensors"

# ----------------------------------------------------------------------------------------------
# primitives


def quantize(weight, group_size=128):
    """weight (N, K) float -> q (N, K) uint8 in 0..15, scales_and_zeros (K/g, N, 2) bf16.

    Asymmetric min/max per group of inputs with torchao's float zero point (§4): scale = (max-min)/15,
    zero = min + 8*scale, both stored in bf16; q = round((w - (zero - 8*scale)) / scale) against the
    stored values. (A group far from 0 relative to its spread loses accuracy to the bf16 zero.)"""
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, K/g)
    scale = (hi - lo).clamp(min=1e-6) / 15
    zero = lo + 8 * scale
    scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = ((w - (z - 8 * s)) / s).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (K/g, N, 2)


def dequantize(q, scales_and_zeros, group_size=128):
    """q (N, K) in 0..15 -> fp32 (N, K): (q - 8) * scale + zero, the tinygemm convention."""
    N, K = q.shape
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(dim=-1)  # (N, K/g) each
    w = (q.reshape(N, K // group_size, group_size).float() - 8) * scale[..., None] + zero[..., None]
    return w.reshape(N, K)


def pack(q):
    """(N, K) values 0..15 -> uint8 (N, K/2), even column in the high nibble: exactly the input
    `_convert_weight_to_int4pack` takes on torch >= 2.5 (performance.md §3.2)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack(packed):
    """uint8 (N, K/2) -> uint8 (N, K), the inverse of pack."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


# ----------------------------------------------------------------------------------------------
# the three matmul paths: (convert the portable packing to the kernel's layout, matmul)


def _reference_mm(x, weight, scales_and_zeros, group_size):
    return F.linear(x, dequantize(unpack(weight), scales_and_zeros, group_size).to(x.dtype))


def _kernel_mm(op, x, weight, scales_and_zeros, group_size):
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # (M, K): both kernels want bf16 2-D
    return op(x2, weight, group_size, scales_and_zeros).reshape(*x.shape[:-1], -1).to(x.dtype)


def _cpu_pack(packed):  # the CPU op wants int32 (N, K) and makes its own, CPU-specific layout
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(packed).int(), 1)


def _cuda_pack(packed):  # inner_k_tiles: the largest of 8, 4, 2 with K % (16 * tiles) == 0 (§3.2)
    k = packed.shape[1] * 2
    tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    return torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), tiles)


PATHS = {"reference": (lambda packed: packed, _reference_mm)}
if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
    PATHS["cpu"] = (_cpu_pack, functools.partial(_kernel_mm, torch.ops.aten._weight_int4pack_mm_for_cpu))
if hasattr(torch.ops.aten, "_weight_int4pack_mm"):
    PATHS["cuda"] = (_cuda_pack, functools.partial(_kernel_mm, torch.ops.aten._weight_int4pack_mm))


def path_problem(path, device, out_features):
    """Why `path` cannot run a layer with `out_features` outputs on `device`; None if it can."""
    if path == "reference":
        return None
    if path not in ("cpu", "cuda"):
        return f"unknown path {path!r}; choose 'auto', 'cuda', 'cpu' or 'reference'"
    multiple = {"cpu": 16, "cuda": 8}[path]  # N granularity: measured for the CPU op; §3.2 for tinygemm
    if path not in PATHS or torch.device(device).type != path or (path == "cuda" and not torch.cuda.is_available()):
        return f"this torch build cannot run its {path} int4 kernel on {device}"
    if out_features % multiple:
        return f"out_features {out_features} is not a multiple of {multiple}, as the {path} int4 kernel needs"
    if path == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm needs an sm80+ GPU (A100, H100, RTX 30xx or newer)"


def choose_path(path, device, out_features):
    """'auto' -> the fastest path that fits; a named path -> itself, or a ValueError saying why not."""
    if path == "auto":
        return next(p for p in ("cuda", "cpu", "reference") if path_problem(p, device, out_features) is None)
    if problem := path_problem(path, device, out_features):
        raise ValueError(f"cannot use the {path!r} int4 path: {problem}")
    return path


# ----------------------------------------------------------------------------------------------
# the layer


class Int4Linear(nn.Module):
    """A bias-free nn.Linear with int4 weights. Buffers: `weight` (uint8; (N, K/2) portable packing
    on the reference path, the kernel's own layout otherwise) and `scales_and_zeros` (bf16 (K/g, N, 2))."""

    def __init__(self, in_features, out_features, group_size=128, device=None):
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {group_size} is not supported; choose one of {GROUP_SIZES}")
        if in_features % group_size:
            fits = [g for g in GROUP_SIZES if in_features % g == 0]
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}; "
                             f"use one of {fits} or keep this layer in full precision")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2,
                                                             dtype=torch.bfloat16, device=device))
        self.path, self.matmul = "reference", _reference_mm

    @classmethod
    def from_linear(cls, linear, group_size=128, path="auto"):
        if linear.bias is not None:
            raise ValueError("Int4Linear has no bias; this nn.Linear has one")
        layer = cls(linear.in_features, linear.out_features, group_size, device=linear.weight.device)
        q, layer.scales_and_zeros = quantize(linear.weight, group_size)
        layer.weight = pack(q)
        return layer.set_path(path)

    def set_path(self, path="auto"):
        """Repack `weight` for `path` ('auto', 'cuda', 'cpu' or 'reference'); done once, not per call."""
        packed = self.packed_weight()
        self.path = choose_path(path, self.weight.device, self.out_features)
        to_layout, self.matmul = PATHS[self.path]
        self.weight = to_layout(packed)
        return self

    def packed_weight(self):
        """The portable uint8 (N, K/2) packing, whatever the current path. A kernel's layout is
        private to torch (and to the CPU's instruction set), so read the 4-bit values back through
        the kernel itself: with every scale 1 and every zero 8 it dequantizes to q exactly."""
        if self.path == "reference":
            return self.weight
        K, N, g = self.in_features, self.out_features, self.group_size
        device = self.weight.device
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=device).repeat(K // g, N, 1)  # (K/g, N, 2)
        identity_rows = (F.one_hot(torch.arange(i, min(i + 1024, K), device=device), K).to(torch.bfloat16)
                         for i in range(0, K, 1024))  # the (K, K) identity, 1024 rows at a time
        return pack(torch.cat([self.matmul(rows, self.weight, unit, g) for rows in identity_rows]).t())  # q (N, K)

    def forward(self, x):
        return self.matmul(x, self.weight, self.scales_and_zeros, self.group_size)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"group_size={self.group_size}, path={self.path}"


# ----------------------------------------------------------------------------------------------
# whole models


def _swap_linears(model, make):
    """Replace each nn.Linear `name` for which make(name, linear) returns a module."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and (new := make(name, module)) is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)


def quantize_model(model, group_size=128, skip=("lm_head",), path="auto"):
    """Swap every nn.Linear except those named in `skip` (a full name or a last component) for an
    Int4Linear, in place. lm_head stays in full precision by default, as in the official run (the
    Hugging Face torchao integration keeps the output embedding unquantized): it is ~10% of a 7B's
    linear weights, and quantizing it raised the per-token KL to the float logits 8x on a briefly
    trained shapes-sized model. nn.Embedding is gathered, not multiplied, so it stays (performance.md §6)."""
    def make(name, linear):
        if any(name == s or name.endswith("." + s) for s in skip):
            return None
        try:
            return Int4Linear.from_linear(linear, group_size, path)
        except ValueError as e:
            raise ValueError(f"{name}: {e} (or add it to skip=)") from None
    _swap_linears(model, make)
    return model


def save_quantized(model, folder):
    """Write folder/model_int4.safetensors (every tensor of the model, int4 layers in the portable
    packing, their group sizes in the metadata) and folder/model.json if the model has a dataclass config."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    for name, layer in layers.items():
        state[f"{name}.weight"] = layer.packed_weight()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"int4_group_sizes": json.dumps({name: m.group_size for name, m in layers.items()})}
    tmp = folder / (INT4_FILE + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, folder / INT4_FILE)  # a crash never leaves a half-written file
    if is_dataclass(getattr(model, "config", None)):
        (folder / "model.json").write_text(json.dumps(asdict(model.config), indent=1))


def load_quantized(model, folder, path="auto"):
    """Fill `model` (a freshly built float model of the saved shape, on its target device) from
    folder/model_int4.safetensors: swap in the saved int4 layers, load every tensor strictly, then
    pick each layer's path."""
    from safetensors import safe_open
    file = Path(folder) / INT4_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; write it with quant.save_quantized(model, folder)")
    with safe_open(str(file), framework="pt") as f:
        group_sizes = json.loads(f.metadata()["int4_group_sizes"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    _swap_linears(model, lambda name, linear: Int4Linear(linear.in_features, linear.out_features, group_sizes[name],
                                                         device=linear.weight.device) if name in group_sizes else None)
    model.load_state_dict(state)  # strict: the file and the model must name the same tensors
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.set_path(path)
    return model


# ----------------------------------------------------------------------------------------------
# measurement: decode-shaped matmuls (CFG batch 2; an SJD verify pass is 2 x 17 = 34 rows, §4)


def benchmark(shapes=((2048, 8192), (8192, 2048), (4096, 4096)), batches=(2, 34), group_size=128):
    from torch.utils.benchmark import Timer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # no fast bf16 GEMM on CPU (machine.md)
    print(f"{device}, {torch.get_num_threads()} threads; nn.Linear in {dtype} vs int4 group {group_size}; median ms")
    print(f"{'in x out':>11} {'batch':>5} {'float':>7} {'int4':>7} {'path':>5} {'speedup':>7} {'bytes/fp32':>10} {'bytes/bf16':>10}")
    for k, n in shapes:
        linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
        int4 = Int4Linear.from_linear(linear, group_size)
        nbytes = sum(b.nbytes for b in int4.buffers()) / linear.weight.numel()  # bytes per weight
        for m in batches:
            x = torch.randn(m, k, device=device, dtype=dtype)
            t_float, t_int4 = (Timer("layer(x)", globals={"layer": layer, "x": x}, num_threads=torch.get_num_threads())
                               .blocked_autorange(min_run_time=1.0).median * 1e3 for layer in (linear, int4))
            print(f"{k:>5}x{n:<5} {m:>5} {t_float:>7.2f} {t_int4:>7.2f} {int4.path:>5} {t_float / t_int4:>6.1f}x {nbytes / 4:>10.3f} {nbytes / 2:>10.3f}")


if __name__ == "__main__":
    benchmark()
