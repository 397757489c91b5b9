"""The shipped reduced-scale codec in assets/ reconstructs held-out shapes images at >= 32 dB."""
from pathlib import Path

import torch

import shapes
from vq import MoVQGAN

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_shipped_codec_reaches_32_db_on_held_out_images():
    codec = MoVQGAN.from_pretrained(ASSETS)
    images = shapes.codec_training_images(48, size=64, seed=424242)  # a seed no training run used
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = codec.decode(codec.encode(x)).clamp(-1, 1)
    ref = (x + 1) * 127.5
    out = ((y + 1) * 127.5).round()
    mse = ((ref - out) ** 2).mean(dim=(1, 2, 3))  # per image, 0-255 scale
    psnr = (10 * torch.log10(255.0 ** 2 / mse.clamp(min=1e-10))).mean()
    assert psnr >= 32.0, f"held-out PSNR {psnr:.2f} dB"
