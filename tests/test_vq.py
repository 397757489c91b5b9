"""vq.py and train_vq.py: the module tree equals the official state-dict layout, official-layout
checkpoints load and match a functional re-computation written from docs/codec.md §2, the quantizer is
a true straight-through nearest-code lookup, bad checkpoints fail loudly, and training resumes exactly."""
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vq import MoVQGAN, VQConfig, VectorQuantizer, center_crop, mosaic, pil_to_tensor, ssim, tensor_to_pil

KEYS_270M = Path(__file__).parent / "data" / "movqgan_270M_keys.txt"  # the official 270M key list
TRAIN_VQ = Path(__file__).parent.parent / "train_vq.py"


def tiny_codec(seed=0):
    """A tiny codec with every weight random (norm affines and codebook too), so no term hides."""
    torch.manual_seed(seed)
    model = MoVQGAN(VQConfig.from_name("tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # GroupNorm affines default to 1/0, which would hide a wiring bug
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
        model.quantize.embedding.weight.normal_()
    return model


# -- an independent, functional MoVQGAN written from docs/codec.md §2, reading the state dict directly


def _conv(sd, name, x, stride=1, padding=None):
    w = sd[name + ".weight"]
    return F.conv2d(x, w, sd[name + ".bias"], stride, w.shape[-1] // 2 if padding is None else padding)


def _norm(sd, name, x, zq, groups):
    if zq is None:
        return F.group_norm(x, groups, sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)
    zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
    h = F.group_norm(x, groups, sd[name + ".norm_layer.weight"], sd[name + ".norm_layer.bias"], eps=1e-6)
    return h * _conv(sd, name + ".conv_y", zq) + _conv(sd, name + ".conv_b", zq)


def _resnet(sd, name, x, zq, g):
    h = _conv(sd, name + ".conv1", F.silu(_norm(sd, name + ".norm1", x, zq, g)))
    h = _conv(sd, name + ".conv2", F.silu(_norm(sd, name + ".norm2", h, zq, g)))
    return (_conv(sd, name + ".nin_shortcut", x) if name + ".nin_shortcut.weight" in sd else x) + h


def _attn(sd, name, x, zq, g):
    B, C, H, W = x.shape
    h = _norm(sd, name + ".norm", x, zq, g)
    q, k, v = (_conv(sd, f"{name}.{n}", h).reshape(B, C, H * W) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * C**-0.5, dim=-1)  # (B, queries, keys)
    return x + _conv(sd, name + ".proj_out", torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W))


def _level(sd, prefix, h, zq, g):
    j = 0
    while f"{prefix}.block.{j}.conv1.weight" in sd:
        h = _resnet(sd, f"{prefix}.block.{j}", h, zq, g)
        if f"{prefix}.attn.{j}.q.weight" in sd:
            h = _attn(sd, f"{prefix}.attn.{j}", h, zq, g)
        j += 1
    if f"{prefix}.downsample.conv.weight" in sd:
        h = _conv(sd, prefix + ".downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    if f"{prefix}.upsample.conv.weight" in sd:
        h = _conv(sd, prefix + ".upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return h


def _mid(sd, prefix, h, zq, g):
    h = _resnet(sd, prefix + ".block_1", h, zq, g)
    return _resnet(sd, prefix + ".block_2", _attn(sd, prefix + ".attn_1", h, zq, g), zq, g)


def reference_encode(sd, x, g, levels=4):
    h = _conv(sd, "encoder.conv_in", x)
    for i in range(levels):
        h = _level(sd, f"encoder.down.{i}", h, None, g)
    h = _mid(sd, "encoder.mid", h, None, g)
    z = _conv(sd, "quant_conv", _conv(sd, "encoder.conv_out", F.silu(_norm(sd, "encoder.norm_out", h, None, g))))
    B, C, H, W = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, C)
    return torch.cdist(flat, sd["quantize.embedding.weight"]).argmin(1).view(B, H, W)


def reference_decode(sd, codes, g, levels=4):
    zq = sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)
    h = _mid(sd, "decoder.mid", _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", zq)), zq, g)
    for i in reversed(range(levels)):
        h = _level(sd, f"decoder.up.{i}", h, zq, g)
    return _conv(sd, "decoder.conv_out", F.silu(_norm(sd, "decoder.norm_out", h, zq, g)))


# -- tests


def test_270M_state_dict_equals_official_keys_and_shapes():
    """Every official key name and shape, and nothing else (meta device: no memory)."""
    official = {}
    for line in KEYS_270M.read_text().splitlines():
        key, shape = line.split(" ", 1)
        official[key] = [int(s) for s in shape.strip("[]").split(",")]
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in MoVQGAN(VQConfig.from_name("270M")).state_dict().items()}
    assert ours == official


@pytest.mark.parametrize("name,count", [("67M", 67_832_495), ("102M", 101_614_255), ("270M", 270_669_103)])
def test_released_parameter_counts(name, count):
    with torch.device("meta"):
        model = MoVQGAN(VQConfig.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.config.downsample == 8


def test_official_layout_checkpoint_loads_and_matches_reference(tmp_path):
    """A plain torch.save of an official-named state dict (+ loss.* keys) loads; encode/decode equal
    the writer's and a functional re-computation from docs/codec.md; .safetensors and our folder too."""
    writer = tiny_codec()
    state = writer.state_dict()
    official = dict(state, **{"loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
                              "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1)})
    torch.save(official, tmp_path / "movqgan_tiny.ckpt")
    from safetensors.torch import save_file
    save_file(state, tmp_path / "movqgan_tiny.safetensors")
    writer.save_pretrained(tmp_path / "ours")
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    codes = writer.encode(x)
    out = writer.decode(codes)
    g = writer.config.norm_groups
    assert torch.equal(reference_encode(state, x, g), codes)
    torch.testing.assert_close(reference_decode(state, codes, g), out, atol=1e-5, rtol=1e-5)
    for path, config in [("movqgan_tiny.ckpt", "tiny"), ("movqgan_tiny.safetensors", "tiny"), ("ours", None)]:
        loaded = MoVQGAN.from_pretrained(tmp_path / path, config=config)
        assert torch.equal(loaded.encode(x), codes) and torch.equal(loaded.decode(codes), out)


def test_released_config_inferred_from_shapes(tmp_path):
    """A bare .ckpt with 67M shapes is recognised as 67M without a config name."""
    with torch.device("meta"):
        state = MoVQGAN(VQConfig.from_name("67M")).state_dict()
    fake = {k: torch.zeros(v.shape) for k, v in state.items() if k.startswith(("quantize", "quant_conv"))}
    torch.save(fake, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match="matches none of the released configs.*missing"):
        MoVQGAN.from_pretrained(tmp_path / "partial.ckpt")
    small = VQConfig(ch=32, num_res_blocks=2, norm_groups=8)  # 67M's layout, narrower: same keys
    torch.save(MoVQGAN(small).state_dict(), tmp_path / "small.ckpt")
    with pytest.raises(ValueError, match="Closest, 67M: .* misshaped"):
        MoVQGAN.from_pretrained(tmp_path / "small.ckpt")
    assert MoVQGAN.from_pretrained(tmp_path / "small.ckpt", config=small).config == small


@pytest.mark.parametrize("h,w", [(64, 64), (128, 64), (64, 128)])
def test_round_trip_shapes(h, w):
    codec = tiny_codec()
    codes = codec.encode(torch.rand(2, 3, h, w) * 2 - 1)
    assert codes.shape == (2, h // 8, w // 8) and codes.dtype == torch.long
    assert codec.decode(codes).shape == (2, 3, h, w)


def test_sizes_not_multiple_of_8_and_bad_codes_fail_clearly():
    codec = tiny_codec()
    with pytest.raises(ValueError, match="60x64 .* not a multiple of 8; try width 56 or 64"):
        codec.encode(torch.zeros(1, 3, 64, 60))
    with pytest.raises(ValueError, match=r"codes \[B,h,w\] in \[0, 64\)"):
        codec.decode(torch.full((1, 2, 2), 64))


def test_quantizer_nearest_code_and_straight_through_gradient():
    """Codes are the brute-force nearest codebook rows; d(z_q)/dz is the identity; the loss is
    the legacy mix: commitment weight 1 on z, beta on the codebook."""
    torch.manual_seed(0)
    q = VectorQuantizer(32, 4, beta=0.25)
    q.embedding.weight.data.normal_()
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    z_q, loss, codes = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(codes.flatten(), torch.cdist(flat, q.embedding.weight.detach()).argmin(1))
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)
    e = q.embedding.weight.detach()[codes].permute(0, 3, 1, 2)
    torch.testing.assert_close(loss, 1.25 * ((e - z.detach()) ** 2).mean())
    z.grad = None
    loss.backward()  # commitment pulls z towards its code with weight 1, the codebook gets beta
    torch.testing.assert_close(z.grad, 2 * (z.detach() - e) / z.numel())
    rows = q.embedding.weight.grad[codes.flatten()]
    assert rows.abs().sum() > 0


def test_bad_checkpoints_fail_with_clear_messages(tmp_path):
    state = tiny_codec().state_dict()
    (tmp_path / "corrupt.ckpt").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt.ckpt is not a readable checkpoint"):
        MoVQGAN.from_pretrained(tmp_path / "corrupt.ckpt", config="tiny")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    with pytest.raises(ValueError, match="corrupt.safetensors is not a readable checkpoint"):
        MoVQGAN.from_pretrained(tmp_path / "corrupt.safetensors", config="tiny")
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    torch.save(missing, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"missing: decoder.conv_out.bias$"):
        MoVQGAN.from_pretrained(tmp_path / "missing.ckpt", config="tiny")
    torch.save(dict(state, **{"quantize.embedding.weight": torch.zeros(65, 4)}), tmp_path / "shape.ckpt")
    with pytest.raises(ValueError, match=r"misshaped: quantize.embedding.weight \[65, 4\] vs model \[64, 4\]"):
        MoVQGAN.from_pretrained(tmp_path / "shape.ckpt", config="tiny")
    torch.save(dict(state, extra=torch.zeros(1)), tmp_path / "extra.ckpt")
    with pytest.raises(ValueError, match=r"unexpected: extra$"):
        MoVQGAN.from_pretrained(tmp_path / "extra.ckpt", config="tiny")
    with pytest.raises(FileNotFoundError):
        MoVQGAN.from_pretrained(tmp_path / "absent.ckpt", config="tiny")


def test_image_helpers():
    """RGBA composites on white, uint8 round trips exactly, and the official crop halves with BOX."""
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))        # fully transparent -> white
    rgba.putpixel((1, 0), (255, 0, 0, 128))    # half red over white
    x = pil_to_tensor(rgba)
    assert x.shape == (3, 1, 2)
    torch.testing.assert_close(x[:, 0, 0], torch.ones(3))
    expect = torch.tensor([255.0, 255 * (1 - 128 / 255), 255 * (1 - 128 / 255)]) / 127.5 - 1
    torch.testing.assert_close(x[:, 0, 1], expect, atol=1.5 / 127.5, rtol=0)
    arr = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(Image.fromarray(arr)))), arr)
    assert tensor_to_pil(torch.full((3, 1, 1), 3.0)).getpixel((0, 0)) == (255, 255, 255)  # clamped
    big = np.random.default_rng(1).integers(0, 256, (128, 128, 3)).astype(np.uint8)
    halved = big.reshape(64, 2, 64, 2, 3).astype(np.float64).mean((1, 3))  # 2x2 box average
    got = np.asarray(center_crop(Image.fromarray(big), 64, 64)).astype(np.float64)
    assert np.abs(got - halved).max() <= 1
    assert center_crop(Image.fromarray(big[:100]), 48, 32).size == (48, 32)
    assert center_crop(Image.fromarray(big[:, :50]), 32, 96).size == (32, 96)


def test_ssim_matches_a_direct_windowed_computation():
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 13, 14), torch.rand(1, 1, 13, 14)
    assert abs(ssim(x, x).item() - 1) < 1e-6
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    a, b, vals = x[0, 0].double().numpy(), y[0, 0].double().numpy(), []
    for i in range(13 - 10):
        for j in range(14 - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cab = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + 1e-4) * (2 * cab + 9e-4) / ((ma**2 + mb**2 + 1e-4) * (va + vb + 9e-4)))
    assert abs(ssim(x, y).item() - np.mean(vals)) < 1e-5


def test_mosaic_tiles_panels_row_major():
    """Training mosaics put panel k at row k // cols, column k % cols (dual panels: upper, lower)."""
    x = torch.randn(8, 3, 4, 4)
    assert torch.equal(mosaic(x, 2, 1)[1], torch.cat([x[2], x[3]], dim=1))
    quad = mosaic(x, 2, 2)
    assert quad.shape == (2, 3, 8, 8)
    assert torch.equal(quad[1], torch.cat([torch.cat([x[4], x[5]], 2), torch.cat([x[6], x[7]], 2)], 1))


def train_vq(monkeypatch, **settings):
    """Run the flat script train_vq.py in-process with --key=value settings; returns its globals."""
    monkeypatch.setattr(sys, "argv", [str(TRAIN_VQ)] + [f"--{k}={v}" for k, v in settings.items()])
    return runpy.run_path(str(TRAIN_VQ))


def test_training_reduces_loss_and_resumes_exactly(tmp_path, monkeypatch):
    """A few steps lower the loss; stopping at a checkpoint and resuming gives bit-identical
    weights to an uninterrupted run (data order, flips and dead-code restarts are per-step seeded)."""
    base = dict(vq_name="tiny", image_size=32, n_train=16, n_eval=4, batch_size=8, lr=3e-3, warmup_steps=1,
                lr_decay_steps=8, restart_every=3, ckpt_every=4, eval_every=100, log_every=100)
    full = train_vq(monkeypatch, out_dir=tmp_path / "a", max_steps=8, **base)
    assert np.mean(full["losses"][-3:]) < np.mean(full["losses"][:3])
    train_vq(monkeypatch, out_dir=tmp_path / "b", max_steps=4, **base)
    resumed = train_vq(monkeypatch, out_dir=tmp_path / "b", max_steps=8, init_from="resume", **base)
    assert resumed["losses"] == full["losses"][4:]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 8 and torch.equal(a["hits"], b["hits"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    codec_a, codec_b = MoVQGAN.from_pretrained(tmp_path / "a"), MoVQGAN.from_pretrained(tmp_path / "b")
    assert torch.equal(codec_b.decode(codec_a.encode(x)), codec_a.decode(codec_b.encode(x)))
    assert (tmp_path / "b" / "report.json").is_file() and resumed["report"]["step"] == 8


def test_panels_are_encoded_and_decoded_alone():
    """encode/decode with panels=2 equal separate calls on the upper and lower halves (docs/codec.md §7)."""
    codec, x = tiny_codec(), torch.rand(3, 3, 128, 64) * 2 - 1
    codes = codec.encode(x, panels=2)
    assert torch.equal(codes, torch.cat([codec.encode(x[:, :, :64]), codec.encode(x[:, :, 64:])], dim=1))
    halves = torch.cat([codec.decode(codes[:, :8]), codec.decode(codes[:, 8:])], dim=2)
    torch.testing.assert_close(codec.decode(codes, panels=2), halves, atol=1e-5, rtol=1e-5)
    assert not torch.equal(codec.decode(codes, panels=2), codec.decode(codes))  # the joint decode mixes panels
