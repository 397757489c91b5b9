"""
SBER-MoVQGAN, the image codec of Lumina-mGPT 2.0: an f=8 VQGAN whose decoder norms are modulated
by the quantized latent (MoVQ, arXiv 2209.09002). Spec: shared/specs/movqgan.md.

What it is: the official module tree with the official state-dict names (so the released
`movqgan_{67M,102M,270M}.ckpt` files load unchanged), batched `encode` (image -> codes) and
`decode` (codes -> image) at any size that is a multiple of 8, the image <-> tensor helpers used
by data prep and sampling, and a small from-scratch training loop for the shapes world.
What it is not: the official training recipe at full scale (no LPIPS, no EMA, no multi-GPU),
and it imports nothing from the rest of the project.

    codec = MoVQGAN.from_pretrained("movqgan_270M.ckpt")   # or our folder: out/vq_shapes
    codes = codec.encode(x)                                # x [B,3,H,W] in [-1,1] -> [B,H/8,W/8]
    x_rec = codec.decode(codes)                            # -> [B,3,H,W], unclamped

Train the shapes codec (writes out/vq_shapes/{ckpt.pt,vq.safetensors,vq.json,report.json}; 5000
steps at ~1 step/s on 2 shared CPU cores; --resume continues a stopped run exactly):

    python vq.py --config=shapes --out_dir=out/vq_shapes --threads=1
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# -----------------------------------------------------------------------------
# Config (movqgan.md §1)


@dataclass
class VQConfig:
    ch: int = 256
    ch_mult: tuple = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (32,)  # nominal resolutions (from `resolution`, not the input) with attention
    resolution: int = 256            # pixels; only decides where attention sits (movqgan.md §2)
    z_channels: int = 4
    embed_dim: int = 4               # codebook vector size, also the SpatialNorm condition channels
    n_embed: int = 16384             # codebook size
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    norm_groups: int = 32            # official GroupNorm(32); small widths need fewer groups
    beta: float = 0.25               # quantizer, hard-coded officially; lands on the codebook term (legacy)

    def __post_init__(self):  # JSON round trips turn tuples into lists
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)

    @property
    def downsample(self):  # pixels per code along each side
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_name(cls, name):
        if name not in VQ_CONFIGS:
            raise ValueError(f"unknown codec config {name!r}; choose from {sorted(VQ_CONFIGS)}")
        return cls(**VQ_CONFIGS[name])


RELEASED = ("67M", "102M", "270M")
VQ_CONFIGS = {
    "67M": dict(ch=128, num_res_blocks=2),
    "102M": dict(ch=128, num_res_blocks=4),
    "270M": dict(ch=256, num_res_blocks=2),  # the one Lumina-mGPT 2.0 uses
    # Ours, trained on 2 CPU cores at 64x64: the same f=8 shape (4 levels), narrow, attention at
    # the 8x8 latent level like the official 32x32-of-256. Codebook 2048: enough for flat shapes.
    "shapes": dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(8,),
                   resolution=64, n_embed=2048, norm_groups=8),
    "tiny": dict(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                 resolution=64, n_embed=64, norm_groups=4),
}

# -----------------------------------------------------------------------------
# Building blocks (movqgan.md §2). Encoder and decoder share them; only the norm differs, so
# every norm takes the quantized latent zq and the encoder's plain GroupNorm ignores it.


class GroupNorm(nn.GroupNorm):
    def forward(self, x, zq=None):  # noqa: ARG002 - same call as SpatialNorm
        return super().forward(x)


class SpatialNorm(nn.Module):
    """MoVQ decoder norm: GroupNorm (with its own affine), then a per-pixel scale and shift from zq."""

    def __init__(self, channels, zq_channels, groups):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, f, zq):
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")  # size=, not scale_factor (official)
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)  # no "1 +" on the scale


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, norm, dropout):
        super().__init__()  # registration order = official key order: norm1 conv1 norm2 dropout conv2
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.dropout = norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, zq):
        h = self.conv1(F.silu(self.norm1(x, zq)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h, zq))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, head dim = C (movqgan.md §2)."""

    def __init__(self, c, norm):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x, zq):
        B, C, H, W = x.shape
        h = self.norm(x, zq)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v)  # default scale C**-0.5, as official
        return x + self.proj_out(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class Resample(nn.Module):
    """`downsample`: zero-pad right/bottom by 1, 3x3 stride-2 conv (exactly H/2 for even H);
    `upsample`: nearest x2, 3x3 conv. One child `conv` either way (the official key)."""

    def __init__(self, c, up):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution level: ResnetBlocks `block.j`, each followed by `attn.j` if this level's
    nominal resolution is in attn_resolutions, then `downsample`/`upsample` unless it is the last."""

    def __init__(self, chans_in_out, attn, norm, dropout, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, norm, dropout) for i, o in chans_in_out)
        self.attn = nn.ModuleList(AttnBlock(o, norm) for _, o in chans_in_out if attn)
        self.resample = resample
        if resample:
            self.add_module(resample, Resample(chans_in_out[-1][1], up=resample == "upsample"))

    def forward(self, h, zq):
        for j, block in enumerate(self.block):
            h = block(h, zq)
            h = self.attn[j](h, zq) if len(self.attn) else h
        return getattr(self, self.resample)(h) if self.resample else h


class Mid(nn.Module):
    def __init__(self, c, norm, dropout):
        super().__init__()
        self.block_1, self.attn_1 = ResnetBlock(c, c, norm, dropout), AttnBlock(c, norm)
        self.block_2 = ResnetBlock(c, c, norm, dropout)

    def forward(self, h, zq):
        return self.block_2(self.attn_1(self.block_1(h, zq), zq), zq)


class Encoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        norm = lambda ch: GroupNorm(c.norm_groups, ch, eps=1e-6)  # noqa: E731
        chans, n = [c.ch * m for m in c.ch_mult], len(c.ch_mult)
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down, block_in = nn.ModuleList(), c.ch
        for i, ch in enumerate(chans):  # nominal resolution of level i: resolution / 2**i
            self.down.append(Level([(block_in, ch)] + [(ch, ch)] * (c.num_res_blocks - 1),
                                   c.resolution >> i in c.attn_resolutions, norm, c.dropout,
                                   "downsample" if i < n - 1 else None))
            block_in = ch
        self.mid = Mid(block_in, norm, c.dropout)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.z_channels, 3, padding=1)  # double_z false

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h, None)
        return self.conv_out(F.silu(self.norm_out(self.mid(h, None))))


class Decoder(nn.Module):
    """MOVQDecoder: every norm is a SpatialNorm on zq. `up` is indexed by level (up.0 = full
    resolution, one more ResnetBlock per level than the encoder) and run deepest first."""

    def __init__(self, c: VQConfig):
        super().__init__()
        norm = lambda ch: SpatialNorm(ch, c.embed_dim, c.norm_groups)  # noqa: E731
        chans, n = [c.ch * m for m in c.ch_mult], len(c.ch_mult)
        self.conv_in = nn.Conv2d(c.z_channels, chans[-1], 3, padding=1)
        self.mid = Mid(chans[-1], norm, c.dropout)
        self.up = nn.ModuleList(
            Level([(chans[min(i + 1, n - 1)], chans[i])] + [(chans[i], chans[i])] * c.num_res_blocks,
                  c.resolution >> i in c.attn_resolutions, norm, c.dropout, "upsample" if i > 0 else None)
            for i in range(n))  # level i's input comes from level i+1 (the deepest from mid)
        self.norm_out = norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], c.out_ch, 3, padding=1)  # no tanh, no clamp

    def forward(self, z, zq):
        h = self.mid(self.conv_in(z), zq)
        for level in reversed(self.up):
            h = level(h, zq)
        return self.conv_out(F.silu(self.norm_out(h, zq)))


class VectorQuantizer(nn.Module):
    """VectorQuantizer2 with legacy=True: nearest code by squared L2, straight-through gradient."""

    def __init__(self, n_embed, embed_dim, beta):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)  # official init

    def forward(self, z):
        B, C, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B*H*W, C), row-major over (b, h, w)
        e = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()  # (BHW, n_embed)
        codes = dist.argmin(1)
        z_q = self.embedding(codes).view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        # legacy: commitment weight 1, beta on the codebook term (movqgan.md §2, kept for parity)
        loss = F.mse_loss(z_q.detach(), z) + self.beta * F.mse_loss(z_q, z.detach())
        z_q = z + (z_q - z).detach()  # straight-through: d z_q / d z = identity
        return z_q, loss, codes.view(B, H, W)


class MoVQGAN(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        c = self.config = config
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quantize = VectorQuantizer(c.n_embed, c.embed_dim, c.beta)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    def _check_size(self, h, w):
        d = self.config.downsample
        if h % d or w % d:
            fix = lambda n: f"{n // d * d or d} or {n // d * d + d}"  # noqa: E731
            raise ValueError(f"image size {w}x{h} (WxH) is not a multiple of {d}; try width "
                             f"{fix(w)} and height {fix(h)}")

    def forward(self, x):
        """Training pass: x [B,3,H,W] -> (reconstruction, VQ loss, codes [B,h,w], pre-quant latent)."""
        self._check_size(*x.shape[-2:])
        z = self.quant_conv(self.encoder(x))  # (B, embed_dim, H/8, W/8)
        z_q, vq_loss, codes = self.quantize(z)
        return self.decoder(self.post_quant_conv(z_q), z_q), vq_loss, codes, z

    @torch.no_grad()
    def encode(self, x):
        """x [B,3,H,W] in [-1,1], H and W multiples of 8 -> codes LongTensor [B,H/8,W/8]."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects [B,{self.config.in_channels},H,W], got {list(x.shape)}")
        self._check_size(*x.shape[-2:])
        z = self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype)))
        return self.quantize(z)[2]

    @torch.no_grad()
    def decode(self, codes):
        """codes LongTensor [B,h,w] -> images [B,3,8h,8w] in about [-1,1] (unclamped)."""
        n = self.config.n_embed
        if codes.dim() != 3 or codes.numel() and (codes.min() < 0 or codes.max() >= n):
            raise ValueError(f"decode expects codes [B,h,w] in [0, {n}), got shape {list(codes.shape)}")
        z_q = self.quantize.embedding(codes).permute(0, 3, 1, 2)  # (B, embed_dim, h, w)
        return self.decoder(self.post_quant_conv(z_q), z_q)

    # -- checkpoints: official state dicts (.ckpt / .safetensors) and our folder format --------

    @classmethod
    def from_pretrained(cls, path, config=None):
        """Load an official state dict (config inferred from shapes unless `config` names one of
        VQ_CONFIGS or is a VQConfig) or our folder (vq.safetensors + vq.json). Strict: any
        missing, unexpected or misshaped key is an error that names them; `loss.*` keys (the
        discriminator and LPIPS of training checkpoints) are dropped."""
        path = Path(path)
        if path.is_dir():
            config = VQConfig(**json.loads((path / "vq.json").read_text()))
            state = _read_state_dict(path / "vq.safetensors")
        else:
            state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("loss.")}
            config = VQConfig.from_name(config) if isinstance(config, str) else config
            config = config or _infer_config(state, path)
        problems = _state_dict_problems(config, state)
        if problems:
            raise ValueError(f"{path} does not fit the MoVQGAN config {config}: {problems}")
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)  # strict; the check above already explained misfits
        return model.eval()

    def save_pretrained(self, folder):
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic(folder / "vq.safetensors", lambda p: save_file(state, p))
        _atomic(folder / "vq.json", lambda p: Path(p).write_text(json.dumps(asdict(self.config), indent=1)))


def _atomic(path, write):
    """Write via a temp file + os.replace, so a reader (or a crash) never sees half a file."""
    tmp = Path(f"{path}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _read_state_dict(path):
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:  # the released .ckpt files are plain pickled fp32 state dicts (movqgan.md §3)
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # noqa: BLE001 - any failure to parse means the file is unusable
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {detail})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return state


def _state_dict_problems(config, state):
    """'' if `state` has exactly the keys and shapes of MoVQGAN(config), else a one-line summary."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MoVQGAN(config).state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = [f"{k} {list(state[k].shape)} (expected {list(expected[k])})"
                 for k in sorted(expected.keys() & state.keys()) if tuple(state[k].shape) != expected[k]]
    show = lambda xs: ", ".join(xs[:8]) + (f", ... ({len(xs) - 8} more)" if len(xs) > 8 else "")  # noqa: E731
    return "; ".join(f"{len(xs)} {what} key(s): {show(xs)}" for what, xs in
                     (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)) if xs)


def _infer_config(state, path):
    problems = {}
    for name in RELEASED:
        problems[name] = _state_dict_problems(VQConfig.from_name(name), state)
        if not problems[name]:
            return VQConfig.from_name(name)
    best = min(RELEASED, key=lambda n: len(problems[n]))
    raise ValueError(f"{path} matches none of the released configs {RELEASED}; pass config=<name> "
                     f"or a VQConfig. Closest, {best}: {problems[best]}")

# -----------------------------------------------------------------------------
# Image <-> tensor helpers, shared by data prep and sampling (movqgan.md §4)


def pil_to_tensor(img):
    """PIL image -> FloatTensor [3,H,W] in [-1,1]; transparency is composited on white (official)."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def tensor_to_pil(x):
    """[3,H,W] in [-1,1] -> PIL RGB; the codec's output is unclamped, so clamp here (official)."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def center_crop(img, width, height):
    """Official resize-and-crop: halve with BOX while both sides are >= 2x the target (cheap
    anti-aliasing), BICUBIC-resize to cover the target, then crop. The official data code picks
    the crop offset at random; we take the centre so pre-tokenisation is deterministic."""
    while img.width >= 2 * width and img.height >= 2 * height:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = max(width / img.width, height / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))

# -----------------------------------------------------------------------------
# Training from scratch at reduced scale. Deliberate differences from the official recipe
# (movqgan.md §5): no LPIPS (its VGG weights cannot be downloaded here) and no PatchGAN; an L1 loss
# on image gradients stands in for both, because flat-colour shapes need crisp, well-placed edges
# rather than texture, and a GAN trades PSNR for texture (it also collapses from-scratch runs,
# MoVQGAN issue #5). Dead codes are re-seeded from encoder outputs (the official run has none; a
# short run would otherwise leave most of the codebook unused). AdamW, warm-up + cosine.


@dataclass
class TrainConfig:
    config: str = "shapes"      # VQ_CONFIGS preset
    out_dir: str = "out/vq_shapes"
    image_size: int = 64        # pixels
    n_train: int = 40000        # images drawn once from shapes.codec_training_images(n, size, seed)
    n_eval: int = 256           # held-out images, drawn with eval_seed
    seed: int = 0
    eval_seed: int = 1
    batch_size: int = 16
    max_steps: int = 5000
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_decay_steps: int = 0     # cosine length (0 = max_steps); keep it fixed when extending a run
    min_lr_frac: float = 0.05   # cosine ends at lr * this
    weight_decay: float = 1e-4  # matrices and conv kernels only, not the codebook
    grad_clip: float = 1.0      # by value, as the official Lightning trainer
    grad_weight: float = 0.5    # L1 on image gradients: the LPIPS stand-in
    restart_every: int = 100    # steps between dead-code restarts (0 disables)
    mosaic: bool = True         # also train on 2x1, 1x2 and 2x2 mosaics of panels (see below)
    ckpt_every: int = 250
    eval_every: int = 500
    log_every: int = 50
    threads: int = 0            # torch CPU threads, 0 = torch's default
    resume: bool = False


def image_gradient_l1(x, y):
    """Mean |dx(x) - dx(y)| + |dy(x) - dy(y)|: penalises blurred or misplaced edges."""
    return ((x.diff(dim=-1) - y.diff(dim=-1)).abs().mean() + (x.diff(dim=-2) - y.diff(dim=-2)).abs().mean())


def ssim(x, y, window=11, sigma=1.5):
    """SSIM (Wang et al. 2004) per image for x, y [B,C,H,W] in [0,1]: gaussian window, valid conv."""
    g = torch.exp(-(torch.arange(window, dtype=x.dtype) - window // 2) ** 2 / (2 * sigma**2))
    g, C = g / g.sum(), x.shape[1]
    mean = lambda t: F.conv2d(t, (g[:, None] * g[None, :]).expand(C, 1, window, window), groups=C)  # noqa: E731
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean((1, 2, 3))


@torch.no_grad()
def evaluate(model, images, batch_size=64):
    """Held-out PSNR (dB, on the uint8 output tensor_to_pil would write), SSIM, codebook usage."""
    psnr, ssims, counts = [], [], torch.zeros(model.config.n_embed)
    for i in range(0, len(images), batch_size):
        x8 = images[i:i + batch_size].float()  # (B, 3, H, W), 0..255
        codes = model.encode(x8 / 127.5 - 1)
        y8 = ((model.decode(codes) + 1) * 127.5).round().clamp(0, 255)
        counts += torch.bincount(codes.flatten(), minlength=model.config.n_embed)
        psnr.append(10 * torch.log10(255**2 / ((x8 - y8) ** 2).mean((1, 2, 3)).clamp_min(1e-10)))
        ssims.append(ssim(x8 / 255, y8 / 255))
    p = counts / counts.sum()
    return dict(psnr=torch.cat(psnr).mean().item(), ssim=torch.cat(ssims).mean().item(),
                usage=(counts > 0).float().mean().item(),  # fraction of codes used at least once
                perplexity=torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item())


MOSAICS = ((1, 1), (2, 1), (1, 2), (2, 2))  # (rows, cols) of panels per training image


def mosaic(x, rows, cols):
    """Tile consecutive panels [B,C,S,S] into [B/(rows*cols), C, rows*S, cols*S], row-major."""
    B, C, S, _ = x.shape
    x = x[:B - B % (rows * cols)].view(-1, rows, cols, C, S, S)  # (N, rows, cols, C, S, S)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, C, rows * S, cols * S)


def lr_at(step, tc):
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    t = min(1.0, (step - tc.warmup_steps) / max(1, (tc.lr_decay_steps or tc.max_steps) - tc.warmup_steps))
    return tc.lr * (tc.min_lr_frac + (1 - tc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(tc: TrainConfig, make_images):
    """Train a codec on make_images(n, size, seed) -> uint8 [n,size,size,3]; returns the final eval.

    Every random choice at step s comes from a generator seeded with (seed, s), so a run resumed
    from its checkpoint continues exactly as if it had never stopped."""
    from tqdm import tqdm
    if tc.threads:
        torch.set_num_threads(tc.threads)  # on a shared 2-core machine 1 thread beat 2 by ~2x
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True) if tc.resume else None
    torch.manual_seed(tc.seed)
    model = MoVQGAN(VQConfig(**ckpt["vq_config"]) if ckpt else VQConfig.from_name(tc.config))
    as_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)  # noqa: E731 (N,3,H,W)
    train_x = as_nchw(make_images(tc.n_train, tc.image_size, tc.seed))
    eval_x = as_nchw(make_images(tc.n_eval, tc.image_size, tc.eval_seed))
    decay = lambda n, p: p.dim() > 1 and "embedding" not in n  # noqa: E731
    opt = torch.optim.AdamW([
        dict(params=[p for n, p in model.named_parameters() if decay(n, p)], weight_decay=tc.weight_decay),
        dict(params=[p for n, p in model.named_parameters() if not decay(n, p)], weight_decay=0.0)],
        lr=tc.lr, betas=(0.9, 0.99))  # the official (0.5, 0.9) suits a GAN from step 0; we have none
    hits, step = torch.zeros(model.config.n_embed), 0  # hits: uses of each code since the last restart
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        hits, step = ckpt["hits"], ckpt["step"]
    print(f"{model.config}: {sum(p.numel() for p in model.parameters()):,} params, {len(train_x)} "
          f"training / {len(eval_x)} held-out images, from step {step}", flush=True)
    model.train().to(memory_format=torch.channels_last)  # ~20% faster CPU convolutions
    losses, t0, step0 = [], time.time(), step
    bar = tqdm(total=tc.max_steps, initial=step, mininterval=10)
    while step < tc.max_steps:
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
        idx = torch.randint(len(train_x), (tc.batch_size,), generator=g)
        flip = torch.rand(tc.batch_size, 1, 1, 1, generator=g) < 0.5  # horizontal flips: free variety
        x = train_x[idx].float() / 127.5 - 1
        x = torch.where(flip, x.flip(-1), x)
        if tc.mosaic:  # GroupNorm statistics span the whole image: a codec trained on single panels
            # loses ~8 dB on dual panels such as a black depth map over a white scene (measured)
            rows, cols = MOSAICS[torch.randint(len(MOSAICS), (), generator=g)]
            x = mosaic(x, rows, cols)
        x = x.contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        x_rec, vq_loss, codes, z = model(x)
        rec = F.mse_loss(x_rec, x)
        loss = rec + tc.grad_weight * image_gradient_l1(x_rec, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_value_(model.parameters(), tc.grad_clip)
        opt.step()
        hits += torch.bincount(codes.flatten(), minlength=model.config.n_embed)
        step += 1
        if tc.restart_every and (step % tc.restart_every == 0 or step == 1):  # step 1: data-driven init
            dead = (hits == 0).nonzero().flatten()
            pool = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, embed_dim)
            pick = torch.randint(len(pool), (len(dead),), generator=g)
            noise = 0.01 * pool.std() * torch.randn(len(dead), pool.shape[1], generator=g)
            model.quantize.embedding.weight.data[dead] = pool[pick] + noise
            hits.zero_()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % tc.log_every == 0:
            tqdm.write(f"step {step} | loss {loss.item():.4f} | rec {rec.item():.5f} | vq {vq_loss.item():.5f} | "
                       f"lr {lr_at(step - 1, tc):.2e} | {(step - step0) / (time.time() - t0):.2f} it/s")
        if step % tc.eval_every == 0 or step == tc.max_steps:
            m, dual = evaluate(model.eval(), eval_x), evaluate(model, mosaic(eval_x, 2, 1))
            model.train()
            tqdm.write(f"step {step} | held-out PSNR {m['psnr']:.2f} dB | SSIM {m['ssim']:.4f} | codebook "
                       f"usage {m['usage']:.3f} | perplexity {m['perplexity']:.0f} | dual-panel PSNR {dual['psnr']:.2f} dB")
        if step % tc.ckpt_every == 0 or step == tc.max_steps:
            state = dict(model=model.state_dict(), opt=opt.state_dict(), hits=hits, step=step,
                         vq_config=asdict(model.config), train_config=asdict(tc))
            _atomic(out / "ckpt.pt", lambda p: torch.save(state, p))
            model.save_pretrained(out)
    bar.close()
    report = dict(step=step, **evaluate(model.eval(), eval_x))
    report["dual_panel_psnr"] = evaluate(model, mosaic(eval_x, 2, 1))["psnr"]
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"final, step {step}, {len(eval_x)} held-out images: PSNR {report['psnr']:.2f} dB | SSIM "
          f"{report['ssim']:.4f} | codebook usage {report['usage']:.3f} | dual-panel PSNR "
          f"{report['dual_panel_psnr']:.2f} dB", flush=True)
    return dict(report, losses=losses)


def parse_args(argv):
    """nanoGPT-style --key=value over TrainConfig; unknown keys and bad values are errors."""
    tc, names = TrainConfig(), [f.name for f in fields(TrainConfig)]
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in names:
            raise SystemExit(f"unknown argument {arg!r}; known: {' '.join('--' + k for k in names)}")
        typ = type(getattr(tc, key))
        setattr(tc, key, value.lower() in ("", "1", "true", "yes") if typ is bool else typ(value))
    return tc


if __name__ == "__main__":
    from shapes import codec_training_images  # the synthetic world; only the training entry needs it
    train(parse_args(sys.argv[1:]), codec_training_images)
