"""SBER-MoVQGAN, the image codec of Lumina-mGPT 2.0: an f=8 VQGAN whose decoder norms are modulated
by the quantized latent (MoVQ, arXiv 2209.09002; docs/codec.md).

What it is: the official module tree and state-dict names (the released movqgan_{67M,102M,270M}.ckpt load
unchanged), batched encode/decode at any multiple of 8 pixels, image <-> tensor helpers for data prep and
sampling, and the quality metrics of train_vq.py and eval.py. What it is not: a trainer (train_vq.py).

    codec = MoVQGAN.from_pretrained("movqgan_270M.ckpt")   # or our folder: assets, out/vq_shapes
    codes = codec.encode(x)                                # x [B,3,H,W] in [-1,1] -> [B,H/8,W/8]
    x_rec = codec.decode(codes)                            # -> [B,3,H,W], unclamped
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from checkpoint import check_keys, read_config, save

# -----------------------------------------------------------------------------
# Config (docs/codec.md §1)


@dataclass
class VQConfig:
    ch: int = 256
    ch_mult: tuple = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (32,)  # nominal resolutions (from `resolution`, not the input) with attention
    resolution: int = 256            # pixels; only decides where attention sits (docs/codec.md §2)
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
        sizes = ("ch", "num_res_blocks", "resolution", "z_channels", "embed_dim", "n_embed", "norm_groups")
        if bad := [name for name in sizes if getattr(self, name) < 1] + ["ch_mult"] * (not self.ch_mult):
            raise ValueError(f"codec config: {', '.join(bad)} must be >= 1 (or non-empty)")
        if any(self.ch * m % self.norm_groups for m in self.ch_mult):
            raise ValueError(f"codec config: norm_groups {self.norm_groups} must divide every width ch * ch_mult")

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
    # ours, for 64 px on CPUs: the same f=8 shape, narrow, attention at the 8x8 latent as 270M's 32x32-of-256
    "shapes": dict(ch=32, num_res_blocks=1, attn_resolutions=(8,), resolution=64, n_embed=2048, norm_groups=8),
    "tiny": dict(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=64, n_embed=64,
                 norm_groups=4),
}

# -----------------------------------------------------------------------------
# Building blocks (docs/codec.md §2). Encoder and decoder share them; only the norm differs, so
# every norm takes the quantized latent zq and the encoder's plain GroupNorm ignores it.


class GroupNorm(nn.GroupNorm):
    def forward(self, x, zq=None):  # noqa: ARG002 - same call as SpatialNorm
        return super().forward(x)


class SpatialNorm(nn.Module):
    """MoVQ decoder norm: GroupNorm (with its own affine), then a per-pixel scale and shift from zq."""
    def __init__(self, channels, zq_channels, groups):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.conv_y, self.conv_b = nn.Conv2d(zq_channels, channels, 1), nn.Conv2d(zq_channels, channels, 1)

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
    """Single-head self-attention over all H*W positions, head dim = C."""
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
    """Down: zero-pad right/bottom by 1, 3x3 stride-2 conv (exactly H/2); up: nearest x2, 3x3 conv."""
    def __init__(self, c, up):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """Level i: ResnetBlocks `block.j`, each then `attn.j` if resolution >> i is in attn_resolutions; `resample`."""
    def __init__(self, c, i, cin, n_blocks, norm, resample=None):
        super().__init__()
        cout, attn = c.ch * c.ch_mult[i], c.resolution >> i in c.attn_resolutions
        self.block = nn.ModuleList(ResnetBlock(cout if j else cin, cout, norm, c.dropout) for j in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout, norm) for _ in range(n_blocks) if attn)
        self.resample = resample
        if resample:
            self.add_module(resample, Resample(cout, up=resample == "upsample"))

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
        self.down = nn.ModuleList(Level(c, i, cin, c.num_res_blocks, norm, "downsample" if i < n - 1 else None)
                                  for i, cin in enumerate([c.ch] + chans[:-1]))
        self.mid = Mid(chans[-1], norm, c.dropout)
        self.norm_out, self.conv_out = norm(chans[-1]), nn.Conv2d(chans[-1], c.z_channels, 3, padding=1)  # no double_z

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h, None)
        return self.conv_out(F.silu(self.norm_out(self.mid(h, None))))


class Decoder(nn.Module):
    """MOVQDecoder: SpatialNorms on zq, a ResnetBlock more a level; up.0 is full resolution, so levels run reversed."""
    def __init__(self, c: VQConfig):
        super().__init__()
        norm = lambda ch: SpatialNorm(ch, c.embed_dim, c.norm_groups)  # noqa: E731
        chans = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.z_channels, chans[-1], 3, padding=1)
        self.mid = Mid(chans[-1], norm, c.dropout)
        self.up = nn.ModuleList(Level(c, i, cin, c.num_res_blocks + 1, norm, "upsample" if i else None)
                                for i, cin in enumerate(chans[1:] + chans[-1:]))  # input: level i+1 (deepest: mid)
        self.norm_out, self.conv_out = norm(chans[0]), nn.Conv2d(chans[0], c.out_ch, 3, padding=1)  # no tanh or clamp

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
        # legacy: commitment weight 1, beta on the codebook term (docs/codec.md §2, kept for parity)
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

    def latent(self, x):
        """x [B,3,H,W], H and W multiples of 8 -> the pre-quantization latent [B,embed_dim,H/8,W/8]."""
        c, d = self.config, self.config.downsample
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"encode expects [B,{c.in_channels},H,W], got {list(x.shape)}")
        H, W = x.shape[-2:]
        if H % d or W % d:
            fix = lambda n: f"{n // d * d or d} or {n // d * d + d}"  # noqa: E731
            raise ValueError(f"image size {W}x{H} (WxH) is not a multiple of {d}; try width {fix(W)} "
                             f"and height {fix(H)}")
        return self.quant_conv(self.encoder(x))

    def forward(self, x):
        """Training pass: x [B,3,H,W] -> (reconstruction, VQ loss, codes [B,h,w], pre-quant latent)."""
        z = self.latent(x)
        z_q, vq_loss, codes = self.quantize(z)
        return self.decoder(self.post_quant_conv(z_q), z_q), vq_loss, codes, z

    @torch.no_grad()
    def encode(self, x, panels=1):
        """x [B,3,H,W] in [-1,1] -> codes LongTensor [B,H/8,W/8]. panels > 1: x is that many equal bands stacked
        (a dual panel: 2), each encoded alone, so a panel's codes never depend on its neighbour (docs/codec.md §7)."""
        bands = x.unflatten(2, (panels, -1)).transpose(1, 2).flatten(0, 1)  # (B*panels, 3, H/panels, W)
        codes = self.quantize(self.latent(bands.to(self.quant_conv.weight.dtype)))[2]
        return codes.unflatten(0, (-1, panels)).flatten(1, 2)

    @torch.no_grad()
    def decode(self, codes, panels=1):
        """codes LongTensor [B,h,w] -> images [B,3,8h,8w] in about [-1,1] (unclamped); panels as for encode."""
        n = self.config.n_embed
        if codes.dim() != 3 or codes.numel() and (codes.min() < 0 or codes.max() >= n):
            raise ValueError(f"decode expects codes [B,h,w] in [0, {n}), got shape {list(codes.shape)}")
        z_q = self.quantize.embedding(codes.unflatten(1, (panels, -1)).flatten(0, 1)).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z_q), z_q).unflatten(0, (-1, panels)).transpose(1, 2).flatten(2, 3)

    # -- checkpoints: official state dicts (.ckpt / .safetensors) and our folder (docs/codec.md §3)

    @classmethod
    def from_pretrained(cls, path, config=None):
        """An official state dict (config: a VQ_CONFIGS name, a VQConfig, or inferred from shapes) or
        our folder (vq.safetensors + vq.json). Strict, but `loss.*` keys (discriminator, LPIPS) drop."""
        path = Path(path)
        if path.is_dir():
            config, path = read_config(path / "vq.json", VQConfig), path / "vq.safetensors"
        state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("loss.")}
        found = {k: tuple(v.shape) for k, v in state.items()}
        config = VQConfig.from_name(config) if isinstance(config, str) else config or _infer_config(found, path)
        check_keys(_shapes(config), found, f"{path} (MoVQGAN {config})")
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        return model.eval()

    def save_pretrained(self, folder):
        save(folder, "vq", self.state_dict(), self.config)


def _shapes(config):
    """{key: shape} of MoVQGAN(config), built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MoVQGAN(config).state_dict().items()}


def _read_state_dict(path):
    """Tensors from .safetensors, or from a released .ckpt: a pickled fp32 state dict (docs/codec.md §3)."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:  # weights_only: unpickles tensors, never code
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, "cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse means the file is unusable
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return state


def _infer_config(found, path):
    """The released config with exactly the keys and shapes `found`, else an error naming the closest one's misfits."""
    shapes = {name: _shapes(VQConfig.from_name(name)) for name in RELEASED}
    best = min(RELEASED, key=lambda name: len(shapes[name].items() ^ found.items()))  # fewest misfit keys
    check_keys(shapes[best], found, f"{path} matches none of the released configs {RELEASED}; pass config=<name> "
                                    f"or a VQConfig. Closest, {best}: the file")
    return VQConfig.from_name(best)

# -----------------------------------------------------------------------------
# Image <-> tensor helpers, shared by data prep and sampling (docs/codec.md §4)


def pil_to_tensor(img):
    """PIL image -> FloatTensor [3,H,W] in [-1,1]; transparency is composited on white (official)."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def tensor_to_pil(x):
    """[3,H,W] in [-1,1] -> PIL RGB; the codec's output is unclamped, so clamp here (official)."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def center_crop(img, width, height):
    """Official resize-and-crop: halve with BOX while both sides are >= 2x the target, BICUBIC-resize
    to cover it, then crop. Officially the crop offset is random; the centre keeps prep deterministic."""
    while img.width >= 2 * width and img.height >= 2 * height:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = max(width / img.width, height / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def mosaic(x, rows, cols):
    """Tile consecutive panels [B,C,S,S] into [B/(rows*cols), C, rows*S, cols*S], row-major."""
    B, C, S, _ = x.shape
    x = x[:B - B % (rows * cols)].view(-1, rows, cols, C, S, S)  # (N, rows, cols, C, S, S)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, C, rows * S, cols * S)

# -----------------------------------------------------------------------------
# Codec quality, reported by train_vq.py and eval.py (docs/codec.md §6)


EVAL_SEED = 1  # held-out renders: shapes.codec_training_images(n, size, EVAL_SEED); training uses 0


def ssim(x, y, window=11, sigma=1.5):
    """SSIM (Wang et al. 2004) per image for x, y [B,C,H,W] in [0,1]: gaussian window, valid conv."""
    g = torch.exp(-(torch.arange(window, dtype=x.dtype, device=x.device) - window // 2) ** 2 / (2 * sigma**2))
    g, C = g / g.sum(), x.shape[1]
    mean = lambda t: F.conv2d(t, (g[:, None] * g[None, :]).expand(C, 1, window, window), groups=C)  # noqa: E731
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2  # the paper's K1, K2 for a dynamic range of 1
    return ((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean((1, 2, 3))


@torch.no_grad()
def evaluate(model, images, batch_size=64):
    """uint8 images [N,3,H,W] -> PSNR (dB, of the uint8 output), SSIM, codebook usage and perplexity."""
    x8 = images.float()  # (N, 3, H, W), 0..255
    codes = torch.cat([model.encode(x / 127.5 - 1) for x in x8.split(batch_size)])  # (N, h, w)
    y8 = ((torch.cat([model.decode(c) for c in codes.split(batch_size)]) + 1) * 127.5).round().clamp(0, 255)
    psnr = 10 * torch.log10(255**2 / ((x8 - y8) ** 2).mean((1, 2, 3)).clamp_min(1e-10))
    ssims = torch.cat([ssim(x / 255, y / 255) for x, y in zip(x8.split(batch_size), y8.split(batch_size))])
    counts = torch.bincount(codes.flatten(), minlength=model.config.n_embed).float()
    p = counts / counts.sum()
    return dict(psnr=psnr.mean().item(), ssim=ssims.mean().item(), usage=(counts > 0).float().mean().item(),
                perplexity=torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item())
