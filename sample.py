"""Sample images from Lumina-mGPT 2.0: text-to-image and every dual-panel task, from one command.

What it is: the official sampler's behaviour (../shared/specs/lumina_mgpt2.md §4.1-4.3) as small
functions in gpt-fast's style: `prefill`, `decode_one_token`, and ONE sampling function
(`logits_to_probs`: CFG combine, structure constraint, top-k, temperature) that sjd.py and eval.py
share. Plus the paper's high-quality sampling (§3.3.1): best-of-N with a verifier, and "thinking"
(an LLM rewrites the prompt first).
What it is not: a trainer, a tokenizer or a codec; it wires model.py, sequence.py and vq.py.

  python sample.py --prompt "a red circle left of a blue square"            # the shipped model
  python sample.py --task edge --ref edges.png --prompt "a green star"       # a dual-panel task
  python sample.py --ckpt Lumina-mGPT-2.0/ --vq movqgan_270M.ckpt --prompt "..." \\
      --width 768 --height 768 --device cuda --dtype bfloat16 --compile --quant int4 --sjd
"""
import argparse
import importlib
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model import Transformer
from sequence import (TASKS, Tokenizer, TokenLayout, i2i_prefix_ids, ids_to_codes, image_body_plan,
                      image_header_ids, prompt_ids, split_panels, task_prompt, unconditional_ids)
from vq import MoVQGAN, VQConfig, center_crop, pil_to_tensor, tensor_to_pil

ASSETS = Path(__file__).resolve().parent / "assets"
# official defaults (generate.py / README): cfg 4.0, image top-k 4096, temperature 1.0
OFFICIAL_SAMPLING = {"cfg": 4.0, "top_k": 4096, "temperature": 1.0}


@dataclass
class System:
    """Everything one checkpoint needs to turn a prompt into pixels."""
    model: Transformer
    codec: MoVQGAN
    tokenizer: Tokenizer
    layout: TokenLayout
    defaults: dict      # sampling defaults: official, or the checkpoint's sampling.json
    size: int           # default image side in pixels
    device: str


def load_system(ckpt=ASSETS, vq=None, device="cpu", dtype=torch.float32, quant=None, vq_config=None):
    """Our folder (model.json, vq.json, tokenizer.json) or an official release (config.json) + codec.
    vq_config: a VQConfig preset name or a JSON file of its fields, for a bare codec state dict that
    is not one of the released sizes (the released ones are recognised from their shapes)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
    tokenizer = Tokenizer.from_file(ckpt)
    defaults = dict(OFFICIAL_SAMPLING)
    if (ckpt / "config.json").is_file():  # official release: the codec is a separate download
        if vq is None or not Path(vq).exists():
            raise FileNotFoundError(f"an official checkpoint needs --vq <path to movqgan_270M.ckpt> (got {vq})")
        model = Transformer.from_pretrained(ckpt, device=device, dtype=dtype)
        if vq_config and Path(vq_config).is_file():
            vq_config = VQConfig(**json.loads(Path(vq_config).read_text()))
        codec = MoVQGAN.from_pretrained(vq, config=vq_config)
        layout, size = TokenLayout.official(tokenizer), 768
        if layout.image_code_offset + layout.codebook_size > model.config.vocab_size:
            raise ValueError(f"config vocab_size {model.config.vocab_size} has no room for image codes "
                             f"up to {layout.vocab_size - 1}: config.json and checkpoint do not match")
    else:
        model = Transformer.load(ckpt, device=device, dtype=dtype)
        codec = MoVQGAN.from_pretrained(vq or ckpt)
        layout = TokenLayout.ours(tokenizer, codec.config.n_embed)
        size = 64
        if (ckpt / "sampling.json").is_file():
            defaults.update(json.loads((ckpt / "sampling.json").read_text()))
            size = defaults.pop("size", size)
    if quant == "int4":
        from quant import quantize_model
        quantize_model(model)
    elif quant:
        raise ValueError(f"unknown --quant {quant!r}; the only scheme is int4")
    return System(model.eval(), codec.to(device).eval(), tokenizer, layout, defaults, size, device)

# -----------------------------------------------------------------------------
# the one sampling function (CFG, structure constraint, top-k, temperature)


def logits_to_probs(logits, plan, layout, cfg_scale, top_k, temperature):
    """logits (2B, T, V) with CFG [conditional rows; unconditional rows], else (B, T, V);
    plan (T,): the forced id at each position, or -1 for "any image code" -> probs (B, T, V).

    CFG is the official `uncond + s * (cond - uncond)` (§4.2) at a constant scale: the official
    code lowers s towards a floor of 4 as the image fills, which is a no-op at the default 4.0 and
    silently overrides any other value, so we honour the scale the user asks for.
    """
    if cfg_scale != 1.0:
        cond, uncond = logits.chunk(2)
        logits = uncond + cfg_scale * (cond - uncond)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    is_code = (vocab >= layout.image_code_offset) & (vocab < layout.image_code_offset + layout.codebook_size)
    plan = plan.to(logits.device)[:, None]
    allowed = torch.where(plan < 0, is_code[None, :], vocab[None, :] == plan)  # (T, V)
    logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature <= 0 or top_k == 1:  # greedy: a one-hot distribution on the argmax
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits / temperature, dim=-1)


def sample_from(probs, generator=None):
    """probs (B, T, V) -> token ids (B, T)."""
    flat = probs.flatten(0, -2)
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])

# -----------------------------------------------------------------------------
# generation: a batch of prompts' cached prefill, then one token at a time (or sjd.py's windows)


def prefill(model, idx, key_mask):
    return model(idx, torch.arange(idx.shape[1], device=idx.device), key_mask)[:, -1:]


def decode_one_token(model, token, input_pos, key_mask):
    return model(token, input_pos, key_mask)


def cfg_batch(prefix, uncond_prefix, num_samples, cfg_scale, pad_id, max_len, device):
    """Rows [conditional x N; unconditional x N], the unconditional ones left-padded to the same
    length, and the key mask hiding the pads (so it is the official separate unconditional pass)."""
    rows = [prefix] * num_samples
    key_mask = torch.ones(num_samples, max_len, dtype=torch.bool)
    if cfg_scale != 1.0:
        pad = len(prefix) - len(uncond_prefix)
        rows += [[pad_id] * pad + uncond_prefix] * num_samples
        uncond_mask = torch.ones(num_samples, max_len, dtype=torch.bool)
        uncond_mask[:, :pad] = False
        key_mask = torch.cat([key_mask, uncond_mask])
    return torch.tensor(rows, device=device), key_mask.to(device)


def generate(model, layout, prefix, uncond_prefix, plan, *, num_samples=1, cfg_scale=4.0, top_k=4096,
             temperature=1.0, generator=None, sjd_window=0, sjd_init="random", compile=False, progress=False):
    """Sample `len(plan)` tokens after `prefix` -> (tokens (num_samples, len(plan)), stats dict)."""
    device = model.lm_head.weight.device
    max_len = (len(prefix) + len(plan) + 7) // 8 * 8  # a multiple of 8, as gpt-fast rounds its cache
    if len(prefix) + len(plan) > model.config.max_seq_len:
        raise ValueError(f"{len(prefix)} prompt + {len(plan)} image tokens exceed the model's context of "
                         f"{model.config.max_seq_len} tokens; ask for a smaller image or a shorter prompt")
    idx, key_mask = cfg_batch(prefix, uncond_prefix, num_samples, cfg_scale, layout.bos_id, max_len, device)
    model.setup_caches(idx.shape[0], max_len)
    use_cfg = cfg_scale != 1.0

    def probs_fn(logits, positions_plan):
        return logits_to_probs(logits, positions_plan, layout, cfg_scale, top_k, temperature)

    with torch.no_grad():
        logits = prefill(model, idx, key_mask)
        if sjd_window:
            from sjd import sjd_generate
            tokens, stats = sjd_generate(model, logits, plan, len(prefix), key_mask, probs_fn, generator=generator,
                                         window=sjd_window, init=sjd_init, use_cfg=use_cfg, layout=layout,
                                         compile=compile)
            model.clear_caches()
            return tokens, stats
        step = decode_one_token
        if compile:  # one graph for all steps: shapes never change with a static cache
            step = torch.compile(decode_one_token, mode="reduce-overhead" if device.type == "cuda" else None,
                                 fullgraph=True)
        tokens = []
        for i in tqdm(range(len(plan)), disable=not progress, desc="tokens", leave=False):
            token = sample_from(probs_fn(logits, plan[i:i + 1]), generator)  # (B, 1)
            tokens.append(token)
            if i + 1 < len(plan):
                feed = torch.cat([token, token]) if use_cfg else token
                logits = step(model, feed, torch.tensor([len(prefix) + i], device=device), key_mask)
    model.clear_caches()
    return torch.cat(tokens, 1), {"forward_passes": len(plan), "tokens": len(plan)}


def generate_uncached(model, layout, prefix, uncond_prefix, plan, *, cfg_scale, top_k, temperature,
                      generator=None):
    """The naive reference: recompute the whole sequence each step, conditional and unconditional
    contexts as two separate sequences exactly as the official code runs them. One sample."""
    device = model.lm_head.weight.device
    cond, uncond, tokens = list(prefix), list(uncond_prefix), []
    with torch.no_grad():
        for i in range(len(plan)):
            logits = model(torch.tensor([cond], device=device))[:, -1:]
            if cfg_scale != 1.0:
                logits = torch.cat([logits, model(torch.tensor([uncond], device=device))[:, -1:]])
            token = sample_from(logits_to_probs(logits, plan[i:i + 1], layout, cfg_scale, top_k, temperature),
                                generator)
            tokens.append(int(token))
            cond.append(int(token))
            uncond.append(int(token))
    return torch.tensor([tokens])

# -----------------------------------------------------------------------------
# from a prompt (and a reference image) to PIL images


def check_size(system, width, height, task):
    unit = system.layout.size_unit
    for name, side in (("width", width), ("height", height)):
        if side <= 0 or side % unit:
            lower = max(unit, side // unit * unit)
            raise ValueError(f"{name} {side} is not a multiple of {unit}; try {lower} or {lower + unit}")
    if task != "t2i" and height % (2 * unit):
        raise ValueError(f"a dual-panel height must be a multiple of {2 * unit} (two panels); got {height}")


def load_reference(path, width, height):
    """The upper panel: a PNG/JPEG, centre-cropped to the panel size the official way."""
    from PIL import Image, UnidentifiedImageError
    if not path:
        raise ValueError("this task needs --ref IMAGE (the upper panel)")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"reference image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read reference image {path}: {e}") from None
    return center_crop(image, width, height)


def sample_images(system, prompt, *, width=None, height=None, task="t2i", ref=None, subject=None,
                  dense_map="segmentation map", num_samples=1, cfg=None,
                  top_k=None, temperature=None, seed=0, sjd_window=0, sjd_init="random", compile=False,
                  progress=False):
    """-> (list of PIL images: the whole image, dual panels included; stats dict with the codes)."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    cfg = system.defaults["cfg"] if cfg is None else cfg
    top_k = system.defaults["top_k"] if top_k is None else top_k
    temperature = system.defaults["temperature"] if temperature is None else temperature
    width = width or system.size
    height = height or (system.size if task == "t2i" else 2 * system.size)
    check_size(system, width, height, task)
    layout, down = system.layout, system.layout.downsample
    code_h, code_w = height // down, width // down
    if task == "subject" and not subject:
        raise ValueError("task subject needs --subject, what the reference shows (e.g. 'a purple circle')")
    text = task_prompt(task, prompt, width, height, subject=subject, dense_map=dense_map)
    plan = image_body_plan(code_h, code_w, layout)
    if task == "t2i":
        prefix = prompt_ids(system.tokenizer, layout, text) + image_header_ids(height, width, layout)
    else:
        upper = load_reference(ref, width, height // 2)
        with torch.no_grad():
            upper_codes = system.codec.encode(pil_to_tensor(upper)[None].to(system.device))[0].cpu()
        prefix = i2i_prefix_ids(system.tokenizer, layout, text, upper_codes)
        plan = plan[(code_h // 2) * (code_w + 1):]  # the upper rows are given
    generator = torch.Generator(system.device).manual_seed(seed)
    t0 = time.time()
    tokens, stats = generate(system.model, layout, prefix, unconditional_ids(prefix, layout), plan,
                             num_samples=num_samples, cfg_scale=cfg, top_k=top_k, temperature=temperature,
                             generator=generator, sjd_window=sjd_window, sjd_init=sjd_init, compile=compile,
                             progress=progress)
    stats["seconds"] = time.time() - t0
    start = len(prefix) - len(unconditional_ids(prefix, layout))  # the image block starts here
    codes = torch.stack([ids_to_codes(prefix[start:] + row.tolist(), layout) for row in tokens.cpu()])
    with torch.no_grad():
        pixels = system.codec.decode(codes.to(system.device)).float().cpu()
    stats["codes"] = codes  # (N, code_h, code_w): the whole image, a given upper panel included
    return [tensor_to_pil(x) for x in pixels], stats

def make_grid(images, columns=None):
    """Paste equally sized images into rows of `columns` (default: one row)."""
    from PIL import Image
    columns = columns or len(images)
    w, h = images[0].size
    grid = Image.new("RGB", (w * columns, h * -(-len(images) // columns)), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid

# -----------------------------------------------------------------------------
# best-of-N verifiers and "thinking"


def load_verifier(spec):
    """'shapes' (the built-in shapes-world verifier) or 'module:function' taking (image, prompt)."""
    if spec == "shapes":
        import shapes
        return lambda image, prompt: shapes.verify_prompt(image, prompt)
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load verifier {spec!r} ({e}); expected 'module:function'") from None


# The paper's §3.3.1 "thinking": a strong LLM reasons about the user's prompt and rewrites it into
# a detailed description before generation. Our instruction paraphrases that role.
THINK_INSTRUCTION = ("You rewrite prompts for an image generator. Think about what the user wants, then "
                     "reply with one improved, concrete prompt describing objects, colours, counts and "
                     "positions explicitly. Reply with the prompt only.")


def think(prompt, url, model_name="gpt-4o", timeout=30.0, key_env="THINK_API_KEY"):
    """Rewrite `prompt` through an OpenAI-compatible chat endpoint; on any failure, warn and keep it."""
    body = json.dumps({"model": model_name, "messages": [{"role": "system", "content": THINK_INSTRUCTION},
                                                         {"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(key_env):
        headers["Authorization"] = f"Bearer {os.environ[key_env]}"
    try:
        request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            rewritten = json.loads(response.read())["choices"][0]["message"]["content"].strip()
        if not rewritten:
            raise ValueError("empty reply")
        return rewritten
    except Exception as e:  # the endpoint is optional: never let it stop sampling
        print(f"warning: --think failed ({type(e).__name__}: {e}); using the prompt as given", file=sys.stderr)
        return prompt

# -----------------------------------------------------------------------------
# command line


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--best_of", type=int, default=1, help="sample N in a batch, keep the verifier's best")
    p.add_argument("--verifier", default="shapes", help="'shapes' or module:function(image, prompt) -> score")
    p.add_argument("--think", action="store_true", help="rewrite the prompt with an LLM first")
    p.add_argument("--think_url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--out", default="out/samples")
    p.add_argument("--ckpt", default=str(ASSETS))
    p.add_argument("--vq", help="codec: official movqgan_270M.ckpt (default: the one in --ckpt)")
    p.add_argument("--vq_config", help="codec config (preset name or JSON) when --vq is not a released size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--quant", choices=["int4"])
    p.add_argument("--sjd", action="store_true", help="speculative Jacobi decoding (sjd.py)")
    p.add_argument("--sjd_window", type=int, default=16)
    p.add_argument("--sjd_init", default="random", choices=["random", "spatial"])
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available; use --device cpu")
    system = load_system(args.ckpt, args.vq, args.device, getattr(torch, args.dtype), args.quant, args.vq_config)
    prompt = think(args.prompt, args.think_url) if args.think else args.prompt
    if prompt != args.prompt:
        print(f"prompt rewritten: {prompt}")
    n = max(args.num_samples, args.best_of)
    images, stats = sample_images(system, prompt, width=args.width, height=args.height, task=args.task,
                                  ref=args.ref, subject=args.subject, num_samples=n, cfg=args.cfg, top_k=args.top_k,
                                  temperature=args.temperature, seed=args.seed,
                                  sjd_window=args.sjd_window if args.sjd else 0, sjd_init=args.sjd_init,
                                  compile=args.compile, progress=True)
    if args.best_of > 1:
        verifier = load_verifier(args.verifier)
        scores = [float(verifier(split_panels(im)[1] if args.task != "t2i" else im, args.prompt)) for im in images]
        best = max(range(len(images)), key=scores.__getitem__)
        print(f"best of {len(images)}: sample {best} (scores {', '.join(f'{s:.2f}' for s in scores)})")
        images = [images[best]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() else "_" for c in args.prompt.lower())[:40].strip("_") or "sample"
    for i, image in enumerate(images):
        path = out / f"{stem}_{args.task}_s{args.seed}_{i}.png"
        image.save(path)
        print(f"saved {path}")
        if args.task != "t2i":
            split_panels(image)[1].save(path.with_name(path.stem + "_lower.png"))
    if len(images) > 1:
        make_grid(images).save(out / f"{stem}_{args.task}_grid.png")
        print(f"saved {out / f'{stem}_{args.task}_grid.png'}")
    tokens = stats["tokens"] * len(images)
    print(f"{tokens} tokens in {stats['seconds']:.2f} s ({tokens / stats['seconds']:.1f} tokens/s)"
          + (f", {stats['forward_passes']} forward passes" if args.sjd else ""))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
