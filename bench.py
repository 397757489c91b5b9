"""Benchmark Lumina-mGPT 2.0 on this machine: decoding speed-ups side by side, training throughput
(--train) or int4 vs float matmuls (--linear), each a table under the command that made it.

What it is: sample.py's stripped twin, as nanoGPT's bench.py is train.py's. Variants: naive (the official
uncached loop, kept only as this baseline), static (KV cache), compile, compile+int4, sjd (window 16), int4+sjd
(the official README's fastest); columns: docs/performance.md §1, §3. Not a quality measure (eval.py): random
weights accept SJD drafts as no trained model does (time SJD on a trained model: --ckpt assets).

  python bench.py --model 2B --layers 4 --steps 8 --variants static,compile+int4   # a CPU slice
  python bench.py --model 7B --device cuda --steps 512 --json out/bench.json       # the paper's model
  python bench.py --model shapes --train --seq_len 310 --batch 8                    # training, MFU
  python bench.py --model 2B --linear --threads 1                                   # int4 matmuls
"""
import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer

from checkpoint import atomic_write
from model import ModelConfig, Transformer, compute_loss, estimate_mfu, flops_per_token
from quant import Int4Linear, quantize_model
from sample import CACHE_MULTIPLE, OFFICIAL_SAMPLING, add_system_args, generate, load_system_from_args, logits_to_probs
from sequence import (MAX_GRIDS, TokenLayout, image_body_plan, image_header_ids, prompt_ids, t2i_prompt,
                      unconditional_ids)
from sjd import draw
from vq import VQConfig

VARIANTS = ("naive", "static", "compile", "compile+int4", "sjd", "int4+sjd")
DEFAULT_SIZE = {"tiny": 64, "shapes": 128}  # pixels; the paper's presets default to 768
DEFAULT_STEPS = {"decode": 32, "train": 3}  # decode steps (part of an image is fine); optimizer steps
SJD_WINDOW = 16  # tokens per SJD pass (official)
COPY_MB = {"cuda": 2048, "cpu": 256}  # the tensor copied to measure bandwidth
PROMPT, STAND_IN_TOKENS = "a photo of a red circle left of a blue square", 24  # --ckpt's; random weights' length
LINEAR_ROWS = (2, 2 * SJD_WINDOW)  # --linear: rows a matmul sees in a decode step and an SJD pass, with CFG
LINEAR_SECONDS = 1.0  # --linear: timing per layer and row count


def measure(fn, device):
    """(seconds, peak memory in MB, fn()) of one call, the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif os.access("/proc/self/clear_refs", os.W_OK):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the RSS high-water mark := the RSS
    t0, out = time.perf_counter(), fn()
    if device.type != "cuda":  # ru_maxrss is in kB on Linux
        return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, out
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) / 2**20, out


def random_model(args, device, dtype):
    """A random preset (first --layers), image codes atop its vocabulary -> (model, layout, side, sampling, prompt)."""
    default, _ = torch.get_default_dtype(), torch.manual_seed(args.seed)
    torch.set_default_dtype(dtype)  # built in dtype: no fp32 copy of a 7B
    with torch.device(device):
        model = Transformer(ModelConfig.from_name(args.model, **({"n_layer": args.layers} if args.layers else {})))
    torch.set_default_dtype(default)
    vocab, codebook = model.config.vocab_size, min(VQConfig().n_embed, model.config.vocab_size // 2)
    layout = TokenLayout(bos_id=0, image_start_id=1, image_end_id=2, eol_id=3, sep_id=4, image_code_offset=vocab
                         - codebook, codebook_size=codebook, size_token_ids=tuple(range(5, 5 + MAX_GRIDS)))
    prefix = [layout.bos_id] + list(range(5 + MAX_GRIDS, 5 + MAX_GRIDS + STAND_IN_TOKENS)) + [layout.sep_id]
    return model.eval(), layout, args.size or DEFAULT_SIZE.get(args.model, 768), OFFICIAL_SAMPLING, prefix


@torch.no_grad()
def generate_uncached(model, layout, prefix, uncond_prefix, plan, *, cfg_scale, top_k, temperature, generator=None):
    """The official loop: the whole sequence recomputed every step, the unconditional context a second
    sequence. One sample -> tokens (1, len(plan))."""
    device, rows = model.lm_head.weight.device, [list(prefix), list(uncond_prefix)][:1 + (cfg_scale != 1.0)]
    for i in range(len(plan)):
        logits = torch.cat([model(torch.tensor([row], device=device))[:, -1:] for row in rows])  # (rows, 1, V)
        token = draw(logits_to_probs(logits, plan[i:i + 1], layout, cfg_scale, top_k, temperature), generator)
        rows = [row + [int(token)] for row in rows]
    return torch.tensor([rows[0][len(prefix):]])


def run_variant(variant, model, layout, prefix, plan, num_samples, cfg_scale, sampling, device):
    """Warm up, time the run, then its first pass alone -> one row of the table."""
    uncond, generator = unconditional_ids(prefix, layout), torch.Generator(device)

    def decode(n, how=variant):  # -> forward passes
        if how == "naive":  # one sample at a time, as the official loop
            for s in range(num_samples):
                generate_uncached(model, layout, prefix, uncond, plan[:n], cfg_scale=cfg_scale,
                                  generator=generator.manual_seed(s), **sampling)
            return n
        return generate(model, layout, prefix, uncond, plan[:n], num_samples=num_samples, cfg_scale=cfg_scale,
                        generator=generator.manual_seed(0), compile="compile" in how,
                        sjd_window=SJD_WINDOW if "sjd" in how else 0, **sampling)[1]["forward_passes"]

    # warm-up; a compiled step must see the timed run's shapes (its cache length), or it compiles again
    decode(len(plan) if "compile" in variant else min(len(plan), 4))
    seconds, peak, passes = measure(lambda: decode(len(plan)), device)
    # minus the first pass (the prefill, or naive's first step): its best of 3, lest noise eat a short run
    first = min(measure(lambda: decode(1, "naive" if variant == "naive" else "static"), device)[0] for _ in range(3))
    return {"tokens_per_s": num_samples * len(plan) / seconds, "forward_passes": passes, "peak_memory_mb": peak,
            "ms_per_step": (seconds - first) / max(1, passes - 1) * 1e3}


def bench_decode(args, model, layout, size, sampling, prefix, device):
    """Every variant of --variants on one prompt: a row of numbers, or why it did not run."""
    prefix = prefix + image_header_ids(size, size, layout)
    side = size // layout.downsample  # codes
    plan = image_body_plan(side, side, layout)[:args.steps or DEFAULT_STEPS["decode"]]
    num_samples, cfg_scale = (args.batch // 2, OFFICIAL_SAMPLING["cfg"]) if args.batch % 2 == 0 else (args.batch, 1.0)
    copy = torch.ones(2, COPY_MB[device.type] * 2**20 // 4, device=device)  # bandwidth: read one half, write the other
    bandwidth = copy.nbytes / min(measure(lambda: copy[1].copy_(copy[0]), device)[0] for _ in range(5))  # bytes/s
    del copy  # lest it count in the variants' peak memory
    c, kv_len = model.config, -(-(len(prefix) + len(plan)) // CACHE_MULTIPLE) * CACHE_MULTIPLE  # generate's cache
    kv_bytes = 2 * c.n_layer * args.batch * c.n_kv_head * kv_len * c.head_dim * model.lm_head.weight.itemsize
    print(f"{size}x{size} px, {len(prefix)} prompt tokens, {len(plan)} decode steps, batch {args.batch}"
          f"{' (CFG pairs)' if cfg_scale != 1 else ''}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")

    def row(variant):
        try:
            r = run_variant(variant, model, layout, prefix, plan, num_samples, cfg_scale, sampling, device)
        except Exception as e:  # one variant never stops the others (compiling may fail): say what broke
            model.clear_caches()
            return {"skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        # bytes of weights a step reads: all of them but the embedding, of which it gathers a few rows
        weights = sum(t.nbytes for k, t in model.state_dict().items() if not k.startswith("embed_tokens"))
        reads = weights * args.batch if variant == "naive" else weights + kv_bytes  # naive: a forward per row
        r.update(bytes_per_step=reads, bandwidth_fraction=reads / r["ms_per_step"] * 1e3 / bandwidth)
        if paths := sorted({m.path for m in model.modules() if isinstance(m, Int4Linear)}):
            r["int4_path"] = ",".join(paths)  # "reference": no fast kernel took these layers
        return r

    wanted = args.variants.split(",")
    results = {v: row(v) if v in wanted and "int4" not in v else {"skipped": "not in --variants"} for v in VARIANTS}
    if int4 := [v for v in VARIANTS if v in wanted and "int4" in v]:  # quantizing is in place: last, once
        try:
            quantize_model(model, group_size=args.group_size)
            results.update({v: row(v) for v in int4})
        except ValueError as e:  # the model may be half quantized now: no int4 variant runs on it
            results.update({v: {"skipped": f"unavailable: {e}"} for v in int4})
    base = results["static"].get("tokens_per_s")
    print(f"{'variant':<13}{'tok/s':>9}{'passes':>8}{'ms/step':>9}{'GB/s':>8}{'of BW':>7}{'peak MB':>9}{'x static':>9}")
    for variant, r in results.items():
        if "skipped" in r:
            print(f"{variant:<13}  {r['skipped']}")
            continue
        r["speedup_vs_static"] = r["tokens_per_s"] / base if base else None
        print(f"{variant:<13}{r['tokens_per_s']:>9.1f}{r['forward_passes']:>8}{r['ms_per_step']:>9.2f}"
              f"{r['bytes_per_step'] / r['ms_per_step'] * 1e-6:>8.1f}{r['bandwidth_fraction']:>7.1%}"
              f"{r['peak_memory_mb']:>9.0f}{r['speedup_vs_static'] or float('nan'):>8.2f}x")
    return {"mode": "decode", "size": size, "steps": len(plan), "batch": args.batch, "prompt_tokens": len(prefix),
            "cfg_scale": cfg_scale, "copy_bandwidth_gb_s": bandwidth / 1e9, "variants": results}


def bench_linear(model, group_size, device, dtype):
    """Median ms of each distinct nn.Linear shape that int4 quantizes (lm_head stays float)."""
    print(f"{'in x out':>11}{'rows':>6}{'float ms':>9}{'int4 ms':>9}{'path':>10}{'speed-up':>9}{'bytes':>6}")
    layers = []
    for k, n in sorted({(m.in_features, m.out_features) for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) and name != "lm_head"}):
        linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
        int4 = Int4Linear.from_linear(linear, group_size)
        ratio = sum(b.nbytes for b in int4.buffers()) / linear.weight.nbytes  # int4 bytes / float bytes
        for rows in LINEAR_ROWS:
            x = torch.randn(rows, k, device=device, dtype=dtype)
            ms = [Timer("layer(x)", globals={"layer": layer, "x": x}, num_threads=torch.get_num_threads())
                  .blocked_autorange(min_run_time=LINEAR_SECONDS).median * 1e3 for layer in (linear, int4)]
            layers.append({"shape": [k, n], "rows": rows, "float_ms": ms[0], "int4_ms": ms[1], "path": int4.path})
            print(f"{k:>5}x{n:<5}{rows:>6}{ms[0]:>9.3f}{ms[1]:>9.3f}{int4.path:>10}{ms[0] / ms[1]:>8.1f}x{ratio:>6.3f}")
    return {"mode": "linear", "group_size": group_size, "bytes_vs_float": ratio, "layers": layers}


def bench_train(model, batch, seq_len, steps, device):
    """Forward + backward + AdamW on random tokens at train.py's precision; MFU (docs/training.md §5)."""
    model, cuda = model.float().train(), device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    x = torch.randint(model.config.vocab_size, (batch, seq_len + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            compute_loss(model(x[:, :-1]), x[:, 1:], torch.ones_like(x[:, 1:])).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates the gradients and the optimizer state
    seconds, peak, _ = measure(lambda: [step() for _ in range(steps)], device)
    n_params, tokens_per_s = model.num_params(), batch * seq_len * steps / seconds
    mfu = estimate_mfu(model.config, n_params, seq_len, tokens_per_s, device)  # None on a CPU or an unknown GPU
    print(f"train: {seconds / steps * 1e3:.0f} ms/step, {tokens_per_s:,.0f} tokens/s, peak {peak:,.0f} MB"
          + (f", MFU {mfu:.1%}" if mfu else ""))
    return {"mode": "train", "dtype": "float32", "batch": batch, "seq_len": seq_len, "steps": steps, "mfu": mfu,
            "ms_per_step": seconds / steps * 1e3, "tokens_per_s": tokens_per_s, "peak_memory_mb": peak,
            "tflops": flops_per_token(model.config, n_params, seq_len) * tokens_per_s / 1e12}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_system_args(p, ckpt=None, dtype=None)  # no --ckpt: a random --model
    p.add_argument("--model", default="shapes", help="a model preset: tiny, shapes, 2B, 7B (random weights)")
    p.add_argument("--layers", type=int, help="keep only this many layers (a slice of 2B/7B for a CPU)")
    p.add_argument("--size", type=int, help="image side in pixels (default: 64 tiny, 128 shapes, else 768)")
    p.add_argument("--steps", type=int, help="decode steps, or with --train optimizer steps (default 32, 3)")
    p.add_argument("--batch", type=int, default=2, help="rows per forward: even = CFG with batch/2 samples")
    p.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset (default: all six)")
    p.add_argument("--group_size", type=int, default=128, help="int4 group size (official 128)")
    p.add_argument("--train", action="store_true", help="time training steps instead of decoding")
    p.add_argument("--seq_len", type=int, default=512, help="--train: tokens per sequence")
    p.add_argument("--linear", action="store_true", help="time the model's matmul shapes, float vs int4")
    p.add_argument("--json", help="also write the record to this file")
    args = p.parse_args(argv)
    if unknown := set(args.variants.split(",")) - set(VARIANTS):
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.quant:
        raise ValueError("bench.py times int4 as its own variants (compile+int4, int4+sjd); drop --quant")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available; use --device cpu")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.ckpt:
        system = load_system_from_args(args)
        model, layout, sampling, size = system.model, system.layout, system.defaults, args.size or system.size
        prefix = prompt_ids(system.tokenizer, layout, t2i_prompt(PROMPT, size, size))
    else:  # --linear needs only the layer shapes: the meta device holds no weights
        model, layout, size, sampling, prefix = random_model(args, "meta" if args.linear else device, dtype)
    record = {"command": " ".join(["python bench.py"] + (sys.argv[1:] if argv is None else argv)),
              "model": Path(args.ckpt).name if args.ckpt else args.model, "params": model.num_params(),
              "layers": model.config.n_layer, "dim": model.config.dim, "device": args.device,
              "dtype": str(dtype).split(".")[1], "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(record["command"] + "\n" + ", ".join(f"{k} {v}" for k, v in record.items() if k != "command"))
    if args.linear:
        record.update(bench_linear(model, args.group_size, device, dtype))
    elif args.train:
        record.update(bench_train(model, args.batch, args.seq_len, args.steps or DEFAULT_STEPS["train"], device))
    else:
        sampling = {k: sampling[k] for k in ("top_k", "temperature")}  # CFG: the official scale, or none (--batch)
        record.update(bench_decode(args, model, layout, size, sampling, prefix, device))
    if args.json:
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return record


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
