"""Sample images from Lumina-mGPT 2.0: text-to-image and every dual-panel task, from one command.

What it is: the official sampler (docs/sampling.md) as small gpt-fast-style functions: `prefill`, one decode
`step` (CFG rows, key mask, compile) and ONE sampling function (`logits_to_probs`), both shared with sjd.py.
Best-of-N and "thinking" (docs/sampling.md §4) live in best_of.py.
What it is not: a trainer, a tokenizer or a codec; it wires model.py, sequence.py and vq.py.

  python sample.py --prompt "a red circle left of a blue square"            # the shipped model
  python sample.py --task edge --ref assets/refs/edges.png --prompt "a green star"  # a dual-panel task
  python sample.py --ckpt Lumina-mGPT-2.0/ --vq movqgan_270M.ckpt --prompt "..." --dtype bfloat16 --compile --sjd
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from best_of import add_best_of_args, make_scorer, pick_best, think
from checkpoint import read_config
from model import Transformer
from sequence import (TASKS, Tokenizer, TokenLayout, i2i_prefix_ids, ids_to_codes, image_body_plan,
                      image_header_ids, prompt_ids, split_panels, task_prompt, unconditional_ids)
from sjd import add_sjd_args, draw, sjd_generate
from vq import MoVQGAN, VQConfig, center_crop, pil_to_tensor, tensor_to_pil

ASSETS = Path(__file__).resolve().parent / "assets"
OFFICIAL_SAMPLING = {"cfg": 4.0, "top_k": 4096, "temperature": 1.0}  # docs/sampling.md §1
OFFICIAL_SIZE, OUR_SIZE = 768, 64  # pixels: default image side of a release / of our checkpoints
CACHE_MULTIPLE = 8  # tokens: gpt-fast rounds its static cache length up to a multiple of 8
SMALL_MODEL = 100e6  # parameters: below this one CPU thread decodes faster than several (README, Sampling)


@dataclass
class System:  # everything one checkpoint needs to turn a prompt into pixels
    model: Transformer
    codec: MoVQGAN
    tokenizer: Tokenizer
    layout: TokenLayout
    defaults: dict      # sampling defaults: official, or the checkpoint's sampling.json
    size: int           # default image side in pixels
    device: str


def load_system(ckpt=ASSETS, vq=None, device="cpu", dtype=torch.float32, quant=None, vq_config=None):
    """Our checkpoint folder, or an official release (config.json) and its codec (vq, vq_config)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
    tokenizer, defaults = Tokenizer.from_file(ckpt), dict(OFFICIAL_SAMPLING)
    if (ckpt / "config.json").is_file():  # official release: the codec is a separate download
        if vq is None or not Path(vq).exists():
            raise FileNotFoundError(f"an official checkpoint needs --vq <path to movqgan_270M.ckpt> (got {vq})")
        model = Transformer.from_pretrained(ckpt, device=device, dtype=dtype)
        if vq_config and Path(vq_config).is_file():
            vq_config = read_config(vq_config, VQConfig)  # strict: an unknown key is an error
        codec = MoVQGAN.from_pretrained(vq, config=vq_config)
        layout, size = TokenLayout.official(tokenizer), OFFICIAL_SIZE
        if layout.image_code_offset + layout.codebook_size > model.config.vocab_size:
            raise ValueError(f"config vocab_size {model.config.vocab_size} has no room for image codes "
                             f"up to {layout.vocab_size - 1}: config.json and checkpoint do not match")
    else:
        model, codec = Transformer.load(ckpt, device=device, dtype=dtype), MoVQGAN.from_pretrained(vq or ckpt)
        layout, size = TokenLayout.ours(tokenizer, codec.config.n_embed), OUR_SIZE
        if (ckpt / "sampling.json").is_file():
            defaults.update(json.loads((ckpt / "sampling.json").read_text()))
            size = defaults.pop("size", size)
    if quant not in (None, "int4"):
        raise ValueError(f"unknown --quant {quant!r}; the only scheme is int4")
    if quant:
        from quant import quantize_model
        quantize_model(model)
    return System(model.eval(), codec.to(device).eval(), tokenizer, layout, defaults, size, device)


def add_system_args(parser, ckpt=str(ASSETS), dtype="float32"):
    """The flags sample.py, eval.py and bench.py share (bench.py: ckpt=None, dtype=None)."""
    parser.add_argument("--ckpt", default=ckpt, help="checkpoint folder: ours or an official release")
    parser.add_argument("--vq", help="codec: official movqgan_270M.ckpt (default: the one in --ckpt)")
    parser.add_argument("--vq_config", help="codec config (preset name or JSON) when --vq is not a released size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quant", choices=["int4"], help="int4 weight-only linears (quant.py)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: 1 for a small model on CPU)")
    parser.add_argument("--seed", type=int, default=0)


def load_system_from_args(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available; use --device cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    system = load_system(args.ckpt, args.vq, args.device, dtype, args.quant, args.vq_config)
    small = args.device == "cpu" and system.model.num_params() < SMALL_MODEL  # threads wait on each other (README)
    torch.set_num_threads(args.threads or (1 if small else torch.get_num_threads()))
    return system


# ---- the one sampling function (docs/sampling.md §2-3); sjd.draw draws from its probs ----
def logits_to_probs(logits, plan, layout, cfg_scale, top_k, temperature):
    """logits (2B, T, V) with CFG [conditional rows; unconditional rows], else (B, T, V); plan (T,):
    the forced id at each position, or -1 for "any image code" -> probs (B, T, V)."""
    if cfg_scale != 1.0:  # a constant scale: the official decay is a no-op at 4.0 (docs/sampling.md §3)
        cond, uncond = logits.chunk(2)
        logits = uncond + cfg_scale * (cond - uncond)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    is_code = (vocab >= layout.image_code_offset) & (vocab < layout.image_code_offset + layout.codebook_size)
    plan = plan.to(logits.device)[:, None]
    logits = logits.masked_fill(~torch.where(plan < 0, is_code[None, :], vocab[None, :] == plan), float("-inf"))
    if temperature <= 0 or top_k == 1:  # greedy: a one-hot distribution on the argmax
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if top_k and top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k, dim=-1).values[..., -1:], float("-inf"))
    return torch.softmax(logits / temperature, dim=-1)


# ---- generation: a batch's cached prefill, then one decode step per token (or sjd.py's windows) ----
def cfg_batch(prefix, uncond_prefix, num_samples, cfg_scale, pad_id, max_len, device):
    """Rows [cond x N; uncond x N, left-padded] and the key mask hiding the pads (docs/sampling.md §3)."""
    pad = len(prefix) - len(uncond_prefix)
    rows = [prefix] * num_samples + ([[pad_id] * pad + uncond_prefix] * num_samples if cfg_scale != 1.0 else [])
    key_mask = torch.ones(len(rows), max_len, dtype=torch.bool, device=device)
    key_mask[num_samples:, :pad] = False
    return torch.tensor(rows, device=device), key_mask


def prefill(model, idx, key_mask):
    return model(idx, torch.arange(idx.shape[1], device=idx.device), key_mask)[:, -1:]  # (rows, 1, V)


def make_step(model, key_mask, use_cfg, compile=False):
    """-> step(tokens (B, T), input_pos (T,)) -> logits (rows, T, V), THE decode step of plain decoding and
    sjd.py: tokens to both CFG halves, pads masked; static shapes, so it compiles to one graph."""
    def step(tokens, input_pos):
        return model(torch.cat([tokens, tokens]) if use_cfg else tokens, input_pos, key_mask)
    mode = "reduce-overhead" if key_mask.device.type == "cuda" else None
    return torch.compile(step, mode=mode, fullgraph=True) if compile else step


def decode_n_tokens(step, logits, plan, start_pos, probs_fn, generator=None, progress=False):
    """Plain decoding from the prefill's logits -> (tokens (B, len(plan)), stats)."""
    tokens = []
    for i in tqdm(range(len(plan)), disable=not progress, desc="tokens", leave=False):
        tokens.append(draw(probs_fn(logits, plan[i:i + 1]), generator))  # (B, 1)
        if i + 1 < len(plan):
            logits = step(tokens[-1], torch.tensor([start_pos + i], device=logits.device))
    return torch.cat(tokens, 1), {"forward_passes": len(plan), "tokens": len(plan)}


def generate(model, layout, prefix, uncond_prefix, plan, *, num_samples=1, cfg_scale=4.0, top_k=4096,
             temperature=1.0, generator=None, sjd_window=0, sjd_init="random", compile=False, progress=False):
    """Sample `len(plan)` tokens after `prefix` -> (tokens (num_samples, len(plan)), stats dict)."""
    if len(prefix) + len(plan) > model.config.max_seq_len:
        raise ValueError(f"{len(prefix)} prompt + {len(plan)} image tokens exceed the model's context of "
                         f"{model.config.max_seq_len} tokens; ask for a smaller image or a shorter prompt")
    max_len = -(-(len(prefix) + len(plan)) // CACHE_MULTIPLE) * CACHE_MULTIPLE
    idx, key_mask = cfg_batch(prefix, uncond_prefix, num_samples, cfg_scale, layout.bos_id, max_len,
                              model.lm_head.weight.device)
    probs_fn = partial(logits_to_probs, layout=layout, cfg_scale=cfg_scale, top_k=top_k, temperature=temperature)
    model.setup_caches(idx.shape[0], max_len)
    try:
        with torch.no_grad():
            logits, step = prefill(model, idx, key_mask), make_step(model, key_mask, cfg_scale != 1.0, compile)
            if sjd_window:
                return sjd_generate(step, logits, plan, len(prefix), probs_fn, layout, generator=generator,
                                    window=sjd_window, init=sjd_init)
            return decode_n_tokens(step, logits, plan, len(prefix), probs_fn, generator, progress)
    finally:
        model.clear_caches()


# ---- from a prompt (and a reference image) to PIL images, and the command line ----
def image_size(system, task, width=None, height=None):
    """(width, height) of the whole image (two panels high for a task), checked against the size unit."""
    unit, panels = system.layout.size_unit, 1 if task == "t2i" else 2
    width, height = width or system.size, height or panels * system.size
    for name, side, multiple in (("width", width, unit), ("height", height, panels * unit)):
        if side <= 0 or side % multiple:
            lower = max(multiple, side // multiple * multiple)
            raise ValueError(f"{name} {side} is not a multiple of {multiple}; try {lower} or {lower + multiple}")
    return width, height


def load_reference(path, width, height):
    """The upper panel: a PNG/JPEG, centre-cropped to the panel size the official way."""
    if not path:
        raise ValueError("this task needs --ref IMAGE (the upper panel)")
    try:
        with Image.open(path) as im:
            return center_crop(im.copy(), width, height)
    except FileNotFoundError:
        raise FileNotFoundError(f"reference image {path} does not exist") from None
    except OSError as e:  # not an image, or a damaged one
        raise ValueError(f"cannot read reference image {path}: {e}") from None


@torch.no_grad()
def sample_images(system, prompt, *, width=None, height=None, task="t2i", ref=None, subject=None,
                  dense_map="segmentation map", num_samples=1, cfg=None, top_k=None, temperature=None,
                  seed=0, sjd_window=0, sjd_init="random", compile=False, progress=False):
    """-> (list of PIL images: the whole image, dual panels included; stats dict with the codes)."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    width, height = image_size(system, task, width, height)
    layout, down = system.layout, system.layout.downsample
    text = task_prompt(task, prompt, width, height, subject, dense_map)  # checks the task and its subject
    plan = image_body_plan(height // down, width // down, layout)
    if task == "t2i":
        prefix = prompt_ids(system.tokenizer, layout, text) + image_header_ids(height, width, layout)
    else:
        upper = pil_to_tensor(load_reference(ref, width, height // 2))[None].to(system.device)
        prefix = i2i_prefix_ids(system.tokenizer, layout, text, system.codec.encode(upper)[0].cpu())
        plan = plan[(height // down // 2) * (width // down + 1):]  # the upper rows are given
    cfg, top_k, temperature = (system.defaults[name] if value is None else value for name, value in
                               (("cfg", cfg), ("top_k", top_k), ("temperature", temperature)))
    t0, uncond = time.time(), unconditional_ids(prefix, layout)  # uncond: the image block so far
    tokens, stats = generate(system.model, layout, prefix, uncond, plan, num_samples=num_samples, cfg_scale=cfg,
                             top_k=top_k, temperature=temperature, sjd_window=sjd_window, sjd_init=sjd_init,
                             generator=torch.Generator(system.device).manual_seed(seed), compile=compile,
                             progress=progress)
    stats["seconds"] = time.time() - t0
    stats["codes"] = torch.stack([ids_to_codes(uncond + row.tolist(), layout) for row in tokens.cpu()])
    pixels = system.codec.decode(stats["codes"].to(system.device)).float().cpu()  # the whole image, upper panel too
    return [tensor_to_pil(x) for x in pixels], stats


def make_grid(images, columns=None):
    """Paste equally sized images into rows of `columns` (default: one row)."""
    columns, (w, h) = columns or len(images), images[0].size
    grid = Image.new("RGB", (w * columns, h * -(-len(images) // columns)), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", required=True)
    p.add_argument("--task", default="t2i", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--ref", help="reference image: the upper panel of a dual-panel task")
    p.add_argument("--subject", help="task subject: a description of the object in --ref")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int, help="for tasks: the whole dual panel (two panels high)")
    p.add_argument("--cfg", type=float, help="CFG scale (default: official 4.0 or the checkpoint's)")
    p.add_argument("--top_k", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--out", default="out/samples")
    p.add_argument("--compile", action="store_true")
    add_sjd_args(p)
    add_system_args(p)
    add_best_of_args(p)
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.best_of < 1:
        raise ValueError(f"--num_samples and --best_of must be >= 1 (got {args.num_samples}, {args.best_of})")
    system = load_system_from_args(args)
    width, height = image_size(system, args.task, args.width, args.height)
    if args.best_of > 1:  # before sampling: a prompt the verifier cannot read fails now, not after
        score = make_scorer(args.verifier, args.task, args.prompt,
                            load_reference(args.ref, width, height // 2) if args.task == "edit" else None)
    prompt = think(args.prompt, args.think_url) if args.think else args.prompt
    images, stats = sample_images(system, prompt, width=width, height=height, task=args.task, ref=args.ref,
                                  subject=args.subject, num_samples=max(args.num_samples, args.best_of),
                                  cfg=args.cfg, top_k=args.top_k, temperature=args.temperature, seed=args.seed,
                                  sjd_window=args.sjd_window if args.sjd else 0, sjd_init=args.sjd_init,
                                  compile=args.compile, progress=True)
    tokens = stats["tokens"] * len(images)  # every sample drawn, those best-of-N drops included
    images = [pick_best(images, score)] if args.best_of > 1 else images
    out, stem = Path(args.out), "".join(c if c.isalnum() else "_" for c in args.prompt.lower())[:40].strip("_")
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(path := out / f"{stem or 'sample'}_{args.task}_s{args.seed}_{i}.png")
        print(f"saved {path}")
        if args.task != "t2i":
            split_panels(image)[1].save(path.with_name(path.stem + "_lower.png"))
    if len(images) > 1:
        make_grid(images).save(grid := out / f"{stem or 'sample'}_{args.task}_grid.png")
        print(f"saved {grid}")
    print(f"{tokens} tokens in {stats['seconds']:.2f} s ({tokens / stats['seconds']:.1f} tokens/s)"
          + (f", {stats['forward_passes']} forward passes" if args.sjd else ""))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
