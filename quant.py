"""Int4 weight-only quantization: 4-bit weights in groups along the input dim, bf16 activations.

What it is: a torchao-free `int4_weight_only(group_size=128)` (the official `--quant`) in the torchao/gpt-fast
format (docs/int4.md): primitives, `Int4Linear` (a drop-in bias-free nn.Linear), `quantize_model`, save/load;
each layer runs one matmul path: "cuda" (tinygemm, sm80+) or "cpu" (torch's int4 op), both on bf16 activations,
or "reference" (exact, any device). Move and cast the model first: a kernel's layout belongs to its device.
What it is not: activation/KV-cache quantization, GPTQ rounding or QAT. Run: sample.py --quant int4, bench.py --linear.
"""
import functools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import checkpoint

GROUP_SIZES = (32, 64, 128, 256)  # what the tinygemm kernel supports (docs/int4.md §2)
LEVELS, MID = 15, 8               # q in 0..15; w = (q - 8) * scale + zero
MIN_SCALE = 1e-6                  # keeps a constant group from dividing by zero
N_MULTIPLE = {"cpu": 16, "cuda": 8}  # out_features granularity: measured for the CPU op; tinygemm's tile
READBACK_ROWS = 1024              # identity rows per kernel call when reading a packing back
INT4_FILE = "model_int4.safetensors"


# ---- primitives (docs/int4.md §1) ----
def quantize(weight, group_size=128):
    """weight (N, K) -> q (N, K) uint8 0..15, scales_and_zeros (K/g, N, 2) bf16 (docs/int4.md §1)."""
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, K/g)
    scale = (hi - lo).clamp(min=MIN_SCALE) / LEVELS
    scale, zero = scale.to(torch.bfloat16), (lo + MID * scale).to(torch.bfloat16)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = ((w - (z - MID * s)) / s).round().clamp(0, LEVELS).to(torch.uint8).reshape(N, K)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (K/g, N, 2)


def dequantize(q, scales_and_zeros, group_size=128):
    """q (N, K) in 0..15 -> fp32 (N, K): (q - 8) * scale + zero, the tinygemm convention."""
    N, K = q.shape
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(dim=-1)  # (N, K/g) each
    w = (q.reshape(N, K // group_size, group_size).float() - MID) * scale[..., None] + zero[..., None]
    return w.reshape(N, K)


def pack(q):
    """(N, K) values 0..15 -> uint8 (N, K/2), even column in the high nibble (tinygemm's input)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack(packed):
    """uint8 (N, K/2) -> uint8 (N, K), the inverse of pack."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


# ---- the matmul paths: (portable packing -> the kernel's layout, matmul) (docs/int4.md §2) ----
def _reference_mm(x, weight, scales_and_zeros, group_size):
    return F.linear(x, dequantize(unpack(weight), scales_and_zeros, group_size).to(x.dtype))


def _kernel_mm(op, x, weight, scales_and_zeros, group_size):
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # (M, K): both kernels want bf16 2-D
    return op(x2, weight, group_size, scales_and_zeros).reshape(*x.shape[:-1], -1).to(x.dtype)


def _cpu_pack(packed):  # the CPU op wants int32 (N, K) and makes its own, CPU-specific layout
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(packed).int(), 1)


def _cuda_pack(packed):  # tinygemm's inner_k_tiles: the largest of 8, 4, 2 with K % (16 * tiles) == 0
    tiles = next(t for t in (8, 4, 2) if packed.shape[1] * 2 % (16 * t) == 0)
    return torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), tiles)


PATHS = {"reference": (lambda packed: packed, _reference_mm),  # torch >= 2.6 has both kernels
         "cpu": (_cpu_pack, functools.partial(_kernel_mm, torch.ops.aten._weight_int4pack_mm_for_cpu)),
         "cuda": (_cuda_pack, functools.partial(_kernel_mm, torch.ops.aten._weight_int4pack_mm))}


def path_problem(path, device, out_features):
    """Why `path` cannot run a layer with `out_features` outputs on `device`; None if it can."""
    if path == "reference":
        return None
    if path not in PATHS:
        return f"unknown path {path!r}; choose 'auto', 'cuda', 'cpu' or 'reference'"
    if torch.device(device).type != path or (path == "cuda" and not torch.cuda.is_available()):
        return f"this torch build cannot run its {path} int4 kernel on {device}"
    if out_features % N_MULTIPLE[path]:
        return f"out_features {out_features} is not a multiple of {N_MULTIPLE[path]}, as the {path} int4 kernel needs"
    if path == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm needs an sm80+ GPU (A100, H100, RTX 30xx or newer)"


class Int4Linear(nn.Module):
    """A bias-free nn.Linear with int4 weights: `weight` uint8 in its path's layout, `scales_and_zeros`."""

    def __init__(self, in_features, out_features, group_size=128, device=None):
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {group_size} is not supported; choose one of {GROUP_SIZES}")
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}; use one of "
                             f"{[g for g in GROUP_SIZES if in_features % g == 0]} or keep this layer in full precision")
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
        """Repack `weight` once for `path`: 'auto' (the fastest that fits), 'cuda', 'cpu' or 'reference'."""
        device, packed = self.weight.device, self.packed_weight()
        if path == "auto":
            path = next(p for p in ("cuda", "cpu", "reference") if path_problem(p, device, self.out_features) is None)
        elif problem := path_problem(path, device, self.out_features):
            raise ValueError(f"cannot use the {path!r} int4 path: {problem}")
        to_layout, self.matmul = PATHS[path]
        self.path, self.weight = path, to_layout(packed)
        return self

    def packed_weight(self):
        """The portable (N, K/2) packing: q read back through the kernel (scale 1, zero 8, identity input)."""
        if self.path == "reference":
            return self.weight
        K, N, g, device = self.in_features, self.out_features, self.group_size, self.weight.device
        unit = torch.tensor([1.0, MID], dtype=torch.bfloat16, device=device).repeat(K // g, N, 1)  # (K/g, N, 2)
        eye = torch.arange(K, device=device).split(READBACK_ROWS)  # the (K, K) identity, a block of rows at a time
        return pack(torch.cat([self.matmul(F.one_hot(r, K).bfloat16(), self.weight, unit, g) for r in eye]).t())

    def forward(self, x):
        return self.matmul(x, self.weight, self.scales_and_zeros, self.group_size)


# ---- whole models (docs/int4.md §3) ----
def quantize_model(model, group_size=128, skip=("lm_head",), path="auto"):
    """Swap every nn.Linear not named in `skip` (full or last name) for an Int4Linear, in place."""
    for name, linear in list(model.named_modules()):
        if not isinstance(linear, nn.Linear) or any(name == s or name.endswith("." + s) for s in skip):
            continue
        try:
            model.set_submodule(name, Int4Linear.from_linear(linear, group_size, path))
        except ValueError as e:
            raise ValueError(f"{name}: {e} (or add it to skip=)") from None
    return model


def save_quantized(model, folder):
    """Write folder/model_int4.safetensors (int4 layers in the portable packing) + model.json."""
    packed = {f"{name}.weight": m.packed_weight() for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    state = {k: v.detach().contiguous().cpu() for k, v in {**model.state_dict(), **packed}.items()}
    checkpoint.atomic_write(Path(folder) / INT4_FILE, lambda p: save_file(state, str(p)))
    checkpoint.write_config(Path(folder) / "model.json", model.config)


def load_quantized(model, folder, path="auto"):
    """Fill `model` (a fresh float model of the saved shape, on its device) from save_quantized's file. The int4
    layers are those with scales_and_zeros, shaped (in_features / group_size, out_features, 2)."""
    file = Path(folder) / INT4_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; write it with quant.save_quantized(model, folder)")
    state = load_file(file)
    for name, linear in list(model.named_modules()):
        if isinstance(linear, nn.Linear) and (groups := state.get(f"{name}.scales_and_zeros")) is not None:
            model.set_submodule(name, Int4Linear(linear.in_features, linear.out_features,
                                                 linear.in_features // len(groups), device=linear.weight.device))
    model.load_state_dict(state)  # strict: the file and the model must name the same tensors
    return model.apply(lambda m: m.set_path(path) if isinstance(m, Int4Linear) else None)
