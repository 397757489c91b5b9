"""Tests for quant.py: int4 primitives against an independent float64 computation, each fast path
against the reference path, and whole-model behaviour (logits, bytes, save/load)."""
import pytest
import torch
import torch.nn as nn

import quant
from model import ModelConfig, Transformer

FAST_PATHS_HERE = [p for p in ("cpu", "cuda") if quant.path_problem(p, p, 64) is None]
requires_cpu_kernel = pytest.mark.skipif("cpu" not in FAST_PATHS_HERE, reason="this torch has no CPU int4 kernel")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_pack_unpack_is_exact():
    """Packing two nibbles per byte loses nothing, and puts the even column in the high nibble
    (the uint8 layout tinygemm's converter takes on torch >= 2.5)."""
    q = torch.randint(0, 16, (24, 96), dtype=torch.uint8)
    assert torch.equal(quant.unpack(quant.pack(q)), q)
    assert quant.pack(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x12, 0xF0]]


@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
def test_quantize_matches_float64_formula_within_half_a_step(group_size):
    """The torchao/gpt-fast convention, recomputed in float64 from the original weights: the scale is
    (max-min)/15, the zero min+8*scale, every q is the nearest grid point, and every dequantized
    weight lies within half a step (scale/2) of the original."""
    torch.manual_seed(group_size)
    w = torch.randn(48, 512) * torch.rand(48, 1) * 0.1  # rows of different magnitudes
    q, scales_and_zeros = quant.quantize(w, group_size)
    assert q.dtype == torch.uint8 and q.max() <= 15 and scales_and_zeros.shape == (512 // group_size, 48, 2)

    groups = w.double().reshape(48, -1, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale64 = (hi - lo) / 15
    scale, zero = scales_and_zeros.double().transpose(0, 1).unbind(-1)  # stored bf16 values, (N, K/g)
    torch.testing.assert_close(scale, scale64, rtol=2 ** -8, atol=0)  # bf16 rounding only
    torch.testing.assert_close(zero, lo + 8 * scale64, rtol=0, atol=2 ** -8 * zero.abs().max().item())

    q64 = ((groups - (zero - 8 * scale)[..., None]) / scale[..., None]).round().clamp(0, 15).reshape(48, 512)
    assert (q64 - q.double()).abs().max() <= 1 and (q64 != q.double()).float().mean() < 1e-3  # ties aside

    deq = quant.dequantize(q, scales_and_zeros, group_size)
    deq64 = ((q.double().reshape(48, -1, group_size) - 8) * scale[..., None] + zero[..., None]).reshape(48, 512)
    torch.testing.assert_close(deq.double(), deq64, rtol=1e-6, atol=1e-9)
    half_step = (scale / 2).repeat_interleave(group_size, dim=1)
    assert ((deq64 - w.double()).abs() <= half_step * (1 + 1e-5) + 1e-9).all()


@requires_cpu_kernel
def test_cpu_kernel_layout_and_convention_match_reference_exactly():
    """Run the CPU int4 op itself in fp32 (its slow mode): it must agree with unpack->dequantize->matmul
    to fp32 rounding, so our packing and scale/zero convention are exactly the kernel's."""
    torch.manual_seed(0)
    q, scales_and_zeros = quant.quantize(torch.randn(64, 256), 64)
    packed = quant.pack(q)
    x = torch.randn(5, 256)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, quant._cpu_pack(packed), 64, scales_and_zeros.float())
    assert rel_err(kernel, quant._reference_mm(x, packed, scales_and_zeros, 64)) < 1e-6


@pytest.mark.parametrize("path", FAST_PATHS_HERE)
def test_fast_path_matches_reference(path):
    """Each fast path on this machine agrees with the reference path on random layers, on fp32 inputs
    (cast to bf16 for the kernel, so loose) and bf16 inputs; its packing reads back exactly."""
    torch.manual_seed(1)
    for k, n, g in [(256, 64, 32), (512, 96, 128), (384, 32, 128)]:
        linear = nn.Linear(k, n, bias=False, device=path)
        fast = quant.Int4Linear.from_linear(linear, g, path=path)
        ref = quant.Int4Linear.from_linear(linear, g, path="reference")
        assert fast.path == path and torch.equal(fast.packed_weight(), ref.weight)
        x = torch.randn(2, 17, k, device=path)
        y = fast(x)
        assert y.dtype == torch.float32 and y.shape == (2, 17, n)
        assert rel_err(y, ref(x)) < 1e-2
        assert rel_err(fast(x.bfloat16()), ref(x.bfloat16())) < 2e-2


@requires_cuda
def test_cuda_auto_path_is_tinygemm():
    """On an sm80+ GPU, 'auto' picks tinygemm."""
    layer = quant.Int4Linear.from_linear(nn.Linear(256, 64, bias=False, device="cuda"), 128)
    assert layer.path == ("cuda" if torch.cuda.get_device_capability() >= (8, 0) else "reference")


def test_shape_constraints_give_clear_errors_or_reference():
    """A K that is not a multiple of the group size is refused with a hint; an N the CPU kernel
    cannot take falls back to the reference path under 'auto' and is refused when forced."""
    with pytest.raises(ValueError, match="not a multiple of group_size 128; use one of"):
        quant.Int4Linear(96, 64, group_size=128)
    with pytest.raises(ValueError, match="group_size 100 is not supported"):
        quant.Int4Linear(200, 64, group_size=100)
    linear = nn.Linear(64, 24, bias=False)
    assert quant.Int4Linear.from_linear(linear, 32).path == "reference"
    if "cpu" in FAST_PATHS_HERE:
        with pytest.raises(ValueError, match="multiple of 16"):
            quant.Int4Linear.from_linear(linear, 32, path="cpu")
    with pytest.raises(ValueError, match="lm_head: in_features 64 is not a multiple"):
        quant.quantize_model(nn.ModuleDict({"lm_head": linear}), group_size=128, skip=())


def tiny_model(device="cpu"):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny")).eval().to(device)


def linear_names(model, cls):
    return sorted(name for name, m in model.named_modules() if isinstance(m, cls))


@pytest.mark.parametrize("path", ["reference"] + FAST_PATHS_HERE)
def test_quantized_tiny_model_logits_stay_close(path):
    """Every projection in the blocks becomes int4, lm_head stays float, and the logits keep a
    cosine similarity of at least 0.99 with the float model's, in the full and the cached forward."""
    device = "cuda" if path == "cuda" else "cpu"
    model = tiny_model(device)
    idx = torch.randint(0, model.config.vocab_size, (2, 24), device=device)
    with torch.no_grad():
        expected = model(idx)
        quant.quantize_model(model, group_size=32, path=path)
        got = model(idx)
        model.setup_caches(2, 24)
        cached = model(idx, torch.arange(24, device=device))
    assert linear_names(model, nn.Linear) == ["lm_head"]
    assert len(linear_names(model, quant.Int4Linear)) == 7 * model.config.n_layer
    for logits in (got, cached):
        assert torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) >= 0.99


def test_int4_weights_take_under_030x_of_bf16_bytes():
    """Counting real tensor bytes on a model with dims multiple of 128: the swapped layers' int4
    weights + scales/zeros take <= 0.30x the bytes of the same layers' bf16 weights (0.266x at g=128)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1024, dim=512, intermediate_size=1536, n_layer=2, n_head=4, n_kv_head=4, max_seq_len=64)
    model = Transformer(cfg)
    bf16_bytes = sum(m.weight.numel() * 2 for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) and name != "lm_head")
    quant.quantize_model(model)
    int4_bytes = sum(b.nbytes for m in model.modules() if isinstance(m, quant.Int4Linear) for b in m.buffers())
    assert int4_bytes <= 0.30 * bf16_bytes


@pytest.mark.parametrize("path", ["reference"] + FAST_PATHS_HERE)
def test_save_load_round_trip_is_exact(tmp_path, path):
    """save_quantized -> load_quantized into a fresh model gives identical tensors and outputs,
    whichever path wrote and reads the file."""
    device = "cuda" if path == "cuda" else "cpu"
    model = quant.quantize_model(tiny_model(device), group_size=32, path=path)
    quant.save_quantized(model, tmp_path)
    assert (tmp_path / "model.json").is_file()
    torch.manual_seed(123)  # a different random init, so nothing passes by accident
    fresh = Transformer(ModelConfig.from_name("tiny")).eval().to(device)
    loaded = quant.load_quantized(fresh, tmp_path, path=path)
    for name in linear_names(model, quant.Int4Linear):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert b.path == a.path and torch.equal(a.weight, b.weight)
        assert torch.equal(a.scales_and_zeros, b.scales_and_zeros)
    idx = torch.randint(0, 512, (2, 16), device=device)
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))


def test_load_refuses_a_mismatched_model(tmp_path):
    """A file written for one shape cannot silently fill a model of another."""
    quant.save_quantized(quant.quantize_model(tiny_model(), group_size=32), tmp_path)
    other = Transformer(ModelConfig.from_name("tiny", intermediate_size=256))
    with pytest.raises(RuntimeError, match="size mismatch"):
        quant.load_quantized(other, tmp_path)
