"""Benchmark Lumina-mGPT 2.0 on this machine: decoding speed-ups side by side, training throughput
(--train) or int4 vs float matmuls (--linear), each a table under the command that made it.

What it is: sample.py's stripped twin, as nanoGPT's bench.py is train.py's. Variants: naive (the official
uncached loop, kept only as this baseline), static (KV cache, every vocabulary row, the whole cache: the reference
step), lean (sample.py's step: image-code head, attention over the filled prefix, docs/performance.md §5), then
compile, int4 and SJD (the window sjd.py picks for the device) on top of lean; columns: docs/performance.md §1,
§3. --end_to_end times the step at every attention length of a whole image and sums them up. Not a quality
measure (eval.py): random weights accept SJD drafts as no trained model does (on a trained model: --ckpt assets).

  python bench.py --model 2B --layers 4 --steps 8 --variants static,compile+int4   # a CPU slice
  python bench.py --model 2B --layers 4 --end_to_end --variants static,lean,sjd    # a whole 768 px image
  python bench.py --model 7B --device cuda --steps 512 --json out/bench.json       # the paper's model
  python bench.py --model shapes --train --seq_len 310 --batch 8                    # training, MFU
  python bench.py --model 2B --linear --threads 1                                   # int4 matmuls
"""
import argparse
import json
from functools import partial
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer

from checkpoint import atomic_write
from configurator import check_device, run_main
from model import ModelConfig, Transformer, compute_loss, cpu_has_fast_bf16, estimate_mfu, flops_per_token
from quant import Int4Linear, quantize_model
from sample import (ASSETS, CACHE_MULTIPLE, KV_BUCKETS, OFFICIAL_SAMPLING, add_system_args, cfg_batch, code_head,
                    generate, kv_lengths, load_system, load_system_from_args, logits_to_probs, make_step, prefill)
from sequence import (MAX_GRIDS, TokenLayout, image_body_plan, image_header_ids, prompt_ids, t2i_prompt,
                      unconditional_ids)
from sjd import WINDOW, draw
from vq import VQConfig

VARIANTS = ("naive", "static", "lean", "compile", "compile+int4", "sjd", "compile+sjd", "compile+int4+sjd")
TRAIN_VARIANTS = ("float32", "bfloat16", "compile", "compile+bf16")  # fp32; bf16 autocast; either under torch.compile
REFERENCE = ("naive", "static")  # every vocabulary row, the whole cache; the others are sample.py's lean step
DEFAULT_SIZE = {"tiny": 64, "shapes": 128}  # pixels; the paper's presets default to 768
DEFAULT_STEPS = {"decode": 32, "train": 3}  # decode steps (part of an image is fine); optimizer steps
E2E_REPEATS = 3  # --end_to_end: timings per attention length (the best counts)
SHIPPED_SAMPLES = 4  # --end_to_end: samples (with CFG) of the shipped model whose SJD step compression is used
COPY_MB = {"cuda": 2048, "cpu": 256}  # the tensor copied to measure bandwidth
PROMPT, STAND_IN_TOKENS = "a photo of a red circle left of a blue square", 24  # --ckpt's; random weights' length
LINEAR_ROWS = (2, 2 * WINDOW["cuda"])  # --linear: rows a matmul sees in a decode step and an SJD pass, with CFG
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
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: no fp32 copy of a 7B
    with torch.device(device):
        model = Transformer(ModelConfig.from_name(args.model, **({"n_layer": args.layers} if args.layers else {})))
    torch.set_default_dtype(default)
    vocab, codebook = model.config.vocab_size, min(VQConfig().n_embed, model.config.vocab_size // 2)
    layout = TokenLayout(bos_id=0, image_start_id=1, image_end_id=2, eol_id=3, sep_id=4, codebook_size=codebook,
                         image_code_offset=vocab - codebook, size_token_ids=tuple(range(5, 5 + MAX_GRIDS)))
    prefix = [layout.bos_id] + list(range(5 + MAX_GRIDS, 5 + MAX_GRIDS + STAND_IN_TOKENS)) + [layout.sep_id]
    return model.eval(), layout, args.size or DEFAULT_SIZE.get(args.model, 768), OFFICIAL_SAMPLING, prefix


@torch.no_grad()
def generate_uncached(model, layout, prefix, uncond_prefix, plan, *, cfg_scale, top_k, temperature, generator=None):
    """The official loop: the whole sequence recomputed every step, the unconditional context a second
    sequence. One sample -> tokens (1, len(plan))."""
    device, rows = model.lm_head.weight.device, [list(prefix), list(uncond_prefix)][:1 + (cfg_scale != 1.0)]
    for i in range(len(plan)):  # a forced id is written, not drawn (as sample.decode_n_tokens)
        if plan[i] < 0:
            logits = torch.cat([model(torch.tensor([row], device=device))[:, -1:] for row in rows])  # (rows, 1, V)
            probs = logits_to_probs(logits, plan[i:i + 1], layout, cfg_scale, top_k, temperature)
        token = int(plan[i]) if plan[i] >= 0 else layout.image_code_offset + int(draw(probs, generator))
        rows = [row + [token] for row in rows]
    return torch.tensor([rows[0][len(prefix):]])


def run_variant(variant, model, layout, prefix, plan, num_samples, cfg_scale, sampling, device, window):
    """Warm up, time the run, then its first pass alone -> one row of the table."""
    uncond, generator = unconditional_ids(prefix, layout), torch.Generator(device)

    def decode(n, how=variant):  # -> forward passes
        if how == "naive":  # one sample at a time, as the official loop
            for s in range(num_samples):
                generate_uncached(model, layout, prefix, uncond, plan[:n], cfg_scale=cfg_scale,
                                  generator=generator.manual_seed(s), **sampling)
            return n
        return generate(model, layout, prefix, uncond, plan[:n], num_samples=num_samples, cfg_scale=cfg_scale,
                        generator=generator.manual_seed(0), compile="compile" in how, full_head=how in REFERENCE,
                        kv_buckets=1 if how in REFERENCE else KV_BUCKETS,
                        sjd_window=window if "sjd" in how else 0, **sampling)[1]["forward_passes"]

    # warm-up; a compiled step must see the timed run's shapes (its cache length), or it compiles again
    decode(len(plan) if "compile" in variant else min(len(plan), 4))
    seconds, peak, passes = measure(lambda: decode(len(plan)), device)
    # minus the first pass (the prefill, or naive's first step): its best of 3, lest noise eat a short run
    first = min(measure(lambda: decode(1, variant if variant in REFERENCE else "lean"), device)[0] for _ in range(3))
    return {"tokens_per_s": num_samples * len(plan) / seconds, "forward_passes": passes, "peak_memory_mb": peak,
            "ms_per_step": (seconds - first) / max(1, passes - 1) * 1e3}


def step_bytes(model, layout, variant, rows):
    """-> (weight bytes, bytes per cache entry) a decode step of `rows` rows reads: the weights but the embedding,
    of which it gathers a few rows (lean: only lm_head's code rows; naive: a forward per row, no cache)."""
    weights = sum(t.nbytes for k, t in model.state_dict().items() if not k.startswith("embed_tokens"))
    if variant not in REFERENCE:  # the code head: lm_head's code rows (F.linear's weight), or their int4 copy
        head = code_head(model, layout)
        tensors = list(head.buffers()) if isinstance(head, nn.Module) else [head.keywords["weight"]]
        weights += sum(t.nbytes for t in tensors) - model.lm_head.weight.nbytes
    c = model.config
    per_entry = 2 * c.n_layer * rows * c.n_kv_head * c.head_dim * model.lm_head.weight.itemsize  # K and V
    return (weights * rows, 0) if variant == "naive" else (weights, per_entry)


def each_variant(wanted, model, group_size, row):
    """{variant: row(variant), or why it did not run}; the int4 ones last, as quantizing is in place and once."""
    def safe_row(variant):
        try:
            return row(variant)
        except Exception as e:  # one variant never stops the others (compiling may fail): say what broke
            model.clear_caches()
            return {"skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    results = {v: safe_row(v) if v in wanted and "int4" not in v else {"skipped": "not in --variants"}
               for v in VARIANTS}
    if int4 := [v for v in VARIANTS if v in wanted and "int4" in v]:
        try:
            quantize_model(model, group_size=group_size)
            results.update({v: safe_row(v) for v in int4})
        except ValueError as e:  # the model may be half quantized now: no int4 variant runs on it
            results.update({v: {"skipped": f"unavailable: {e}"} for v in int4})
    return results


def image_run(layout, size, prefix, batch):
    """-> prompt + image header, a size x size body's plan, samples and CFG scale (an even batch: CFG pairs)."""
    side = size // layout.downsample
    cfg = (batch // 2, OFFICIAL_SAMPLING["cfg"]) if batch % 2 == 0 else (batch, 1.0)
    return prefix + image_header_ids(size, size, layout), image_body_plan(side, side, layout), *cfg


def copy_bandwidth(device):
    """Bytes/s of a device copy: read one half of a tensor, write the other (the roofline's yardstick)."""
    copy = torch.ones(2, COPY_MB[device.type] * 2**20 // 4, device=device)
    return copy.nbytes / min(measure(lambda: copy[1].copy_(copy[0]), device)[0] for _ in range(5))


def bench_decode(args, model, layout, size, sampling, prefix, device):
    """Every variant of --variants on one prompt: a row of numbers, or why it did not run."""
    prefix, plan, num_samples, cfg_scale = image_run(layout, size, prefix, args.batch)
    plan = plan[:args.steps or DEFAULT_STEPS["decode"]]
    bandwidth, positions = copy_bandwidth(device), range(len(prefix), len(prefix) + len(plan))
    kv_len = -(-positions.stop // CACHE_MULTIPLE) * CACHE_MULTIPLE  # generate's cache
    lean_read = sum(next(n for n in kv_lengths(kv_len) if n > p) for p in positions) / len(plan)  # mean entries read
    print(f"{size}x{size} px, {len(prefix)} prompt tokens, {len(plan)} decode steps, batch {args.batch}"
          f"{' (CFG pairs)' if cfg_scale != 1 else ''}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")

    def row(variant):
        r = run_variant(variant, model, layout, prefix, plan, num_samples, cfg_scale, sampling, device,
                        args.sjd_window)
        weights, per_entry = step_bytes(model, layout, variant, args.batch)
        reads = weights + per_entry * (kv_len if variant in REFERENCE else lean_read)
        r.update(bytes_per_step=reads, bandwidth_fraction=reads / r["ms_per_step"] * 1e3 / bandwidth)
        if paths := sorted({m.path for m in model.modules() if isinstance(m, Int4Linear)}):
            r["int4_path"] = ",".join(paths)  # "reference": no fast kernel took these layers
        return r

    results = each_variant(args.variants.split(","), model, args.group_size, row)
    base = results["static"].get("tokens_per_s")
    print(f"{'variant':<17}{'tok/s':>9}{'passes':>8}{'ms/step':>9}{'GB/s':>8}{'of BW':>7}{'peak MB':>9}{'x static':>9}")
    for variant, r in results.items():
        if "skipped" in r:
            print(f"{variant:<17}  {r['skipped']}")
            continue
        r["speedup_vs_static"] = r["tokens_per_s"] / base if base else None
        print(f"{variant:<17}{r['tokens_per_s']:>9.1f}{r['forward_passes']:>8}{r['ms_per_step']:>9.2f}"
              f"{r['bytes_per_step'] / r['ms_per_step'] * 1e-6:>8.1f}{r['bandwidth_fraction']:>7.1%}"
              f"{r['peak_memory_mb']:>9.0f}{r['speedup_vs_static'] or float('nan'):>8.2f}x")
    return {"mode": "decode", "size": size, "steps": len(plan), "batch": args.batch, "prompt_tokens": len(prefix),
            "cfg_scale": cfg_scale, "copy_bandwidth_gb_s": bandwidth / 1e9, "variants": results}


def time_lengths(model, layout, prefix, plan, variant, num_samples, cfg_scale, sampling, width):
    """The variant's step (an SJD pass: `width` tokens) + its sampling at every attention length of a whole image's
    cache, best of E2E_REPEATS -> (prefill s, {length: s}, peak MB). Timing needs no real tokens: any will do."""
    device = model.lm_head.weight.device
    max_len = -(-(len(prefix) + len(plan)) // CACHE_MULTIPLE) * CACHE_MULTIPLE
    idx, key_mask = cfg_batch(prefix, unconditional_ids(prefix, layout), num_samples, cfg_scale, layout.bos_id,
                              max_len, device)
    head, buckets = (code_head(model, layout), KV_BUCKETS) if variant not in REFERENCE else (None, 1)
    probs_fn = partial(logits_to_probs, layout=layout, cfg_scale=cfg_scale, **sampling)
    model.setup_caches(len(idx), max_len)
    try:
        with torch.no_grad():
            prefill_s = min(measure(lambda: prefill(model, idx, key_mask, head), device)[0] for _ in range(2))
            step, seconds = make_step(model, key_mask, cfg_scale != 1.0, "compile" in variant, head, buckets), {}
            for n in kv_lengths(max_len, buckets):  # the last positions each length serves
                one = partial(lambda n: draw(probs_fn(step(idx[:num_samples, -width:], n - width), plan[:width])), n)
                one()  # warm-up: a compiled step compiles each new length
                seconds[n] = min(measure(one, device)[0] for _ in range(E2E_REPEATS))
            peak = measure(one, device)[1]  # with the whole cache allocated
    finally:
        model.clear_caches()
    return prefill_s, seconds, peak


def shipped_compression(device, window):
    """SJD's step compression (tokens per forward pass) on the shipped model (assets/): the README's prompt,
    SHIPPED_SAMPLES samples with CFG, its sampling defaults, this window."""
    system = load_system(ASSETS, device=str(device))
    layout, size, sampling = system.layout, system.size, system.defaults
    prefix, plan, *_ = image_run(layout, size, prompt_ids(system.tokenizer, layout, t2i_prompt(PROMPT, size, size)), 1)
    stats = generate(system.model, layout, prefix, unconditional_ids(prefix, layout), plan, sjd_window=window,
                     num_samples=SHIPPED_SAMPLES, cfg_scale=sampling["cfg"], top_k=sampling["top_k"],
                     temperature=sampling["temperature"], generator=torch.Generator(device).manual_seed(1))[1]
    return stats["tokens"] / stats["forward_passes"]


def bench_end_to_end(args, model, layout, size, sampling, prefix, device):
    """Seconds per whole image for each variant: the prefill plus, for every position, the step time of the
    attention length serving it (SJD: divided by the shipped model's step compression); peak memory; and the
    floor: the bytes each variant's steps read, at the copy bandwidth (docs/performance.md §1, §5)."""
    prefix, plan, num_samples, cfg_scale = image_run(layout, size, prefix, args.batch)
    bandwidth, positions = copy_bandwidth(device), range(len(prefix), len(prefix) + len(plan) - 1)  # steps
    wanted = args.variants.split(",")
    sjd = args.sjd_window > 1 and any("sjd" in v for v in wanted)
    compression = shipped_compression(device, args.sjd_window) if sjd else 1.0
    shown = [positions[0], positions[len(positions) // 3], positions[2 * len(positions) // 3], positions[-1]]
    print(f"end to end: {size}x{size} px, {len(plan)} tokens after {len(prefix)}, batch {args.batch}; copy "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s" + (f"; SJD window {args.sjd_window}: step compression "
          f"{compression:.2f}x, measured on the shipped model (assets/), not on these weights" if sjd else ""))

    def row(variant):
        width = args.sjd_window if "sjd" in variant and sjd else 1
        prefill_s, seconds, peak = time_lengths(model, layout, prefix, plan, variant, num_samples, cfg_scale,
                                                sampling, width)
        length = {p: next(n for n in seconds if n >= p + width) for p in positions}  # what the step at p reads
        passes = 1 / compression if width > 1 else 1.0  # per token
        weights, per_entry = step_bytes(model, layout, variant, args.batch)
        return {"prefill_s": prefill_s, "ms_at_position": {p - positions[0]: seconds[length[p]] * 1e3 for p in shown},
                "ms_per_length": {n: t * 1e3 for n, t in seconds.items()},
                "seconds_per_image": prefill_s + passes * sum(seconds[length[p]] for p in positions),
                "floor_s": passes * sum(weights + per_entry * length[p] for p in positions) / bandwidth,
                "peak_memory_mb": peak, "window": width}

    results = each_variant([v for v in wanted if v != "naive"], model, args.group_size, row)
    print(f"{'variant':<17}{'prefill s':>10}" + "".join(f"{'ms@' + str(p - positions[0]):>10}" for p in shown)
          + f"{'s/image':>10}{'floor s':>9}{'peak MB':>9}")
    for variant, r in results.items():
        print(f"{variant:<17}  {r['skipped']}" if "skipped" in r else f"{variant:<17}{r['prefill_s']:>10.3g}"
              + "".join(f"{ms:>10.4g}" for ms in r["ms_at_position"].values())
              + f"{r['seconds_per_image']:>10.4g}{r['floor_s']:>9.3g}{r['peak_memory_mb']:>9.0f}")
    return {"mode": "end_to_end", "size": size, "tokens": len(plan), "batch": args.batch, "prompt_tokens": len(prefix),
            "sjd_window": args.sjd_window, "shipped_step_compression": compression,
            "copy_bandwidth_gb_s": bandwidth / 1e9, "variants": results}


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


def bench_train(model, batch, seq_len, steps, device, variants=TRAIN_VARIANTS):
    """Forward + backward + AdamW per variant, each from the same weights on one fixed batch: ms/step, tokens/s,
    MFU, and the loss each reaches in the time the first variant takes for `steps` steps (equal time), so a faster
    precision that learns worse shows (docs/training.md §5, docs/performance.md §4)."""
    model, cuda, rows, budget = model.float(), device.type == "cuda", {}, None
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(model.config.vocab_size, (batch, seq_len + 1), device=device,
                      generator=torch.Generator(device).manual_seed(0))
    print(f"native bf16 on this CPU: {'yes' if cpu_has_fast_bf16() else 'no'} (train.py dtype=auto uses bf16 on "
          f"CUDA and on such CPUs)\n{'variant':<13}{'ms/step':>10}{'tokens/s':>11}{'x first':>9}{'steps':>7}"
          f"{'loss':>8}{'peak MB':>9}")
    for variant in variants:
        model.load_state_dict(initial)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
        forward = torch.compile(model) if variant.startswith("compile") else model

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant in ("bfloat16", "compile+bf16")):
                loss = compute_loss(forward(x[:, :-1]), x[:, 1:], torch.ones_like(x[:, 1:]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        first_loss = step()  # warm-up (a step, not timed): gradients, optimizer state, compilation
        losses, t0 = [], time.perf_counter()

        def run():  # the first variant: `steps` steps; the others: as many as fit in its time
            while len(losses) < steps if budget is None else time.perf_counter() - t0 < budget or not losses:
                losses.append(step())
        seconds, peak, _ = measure(run, device)
        budget = budget or seconds
        tokens_per_s = batch * seq_len * len(losses) / seconds
        rows[variant] = {"ms_per_step": seconds / len(losses) * 1e3, "tokens_per_s": tokens_per_s,
                         "steps": len(losses) + 1, "first_loss": first_loss, "loss": losses[-1], "peak_memory_mb": peak}
        speedup = tokens_per_s / rows[variants[0]]["tokens_per_s"]
        print(f"{variant:<13}{seconds / len(losses) * 1e3:>10.0f}{tokens_per_s:>11,.0f}{speedup:>9.2f}"
              f"{len(losses) + 1:>7}{losses[-1]:>8.3f}{peak:>9,.0f}")
    first, n_params = rows[variants[0]], model.num_params()
    mfu = estimate_mfu(model.config, n_params, seq_len, first["tokens_per_s"], device)  # None on a CPU
    return {"mode": "train", "batch": batch, "seq_len": seq_len, "steps": steps, "mfu": mfu, "variants": rows,
            "ms_per_step": first["ms_per_step"], "tokens_per_s": first["tokens_per_s"],
            "peak_memory_mb": first["peak_memory_mb"],
            "tflops": flops_per_token(model.config, n_params, seq_len) * first["tokens_per_s"] / 1e12}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_system_args(p, ckpt=None, dtype=None)  # no --ckpt: a random --model
    p.add_argument("--model", default="shapes", help="a model preset: tiny, shapes, 2B, 7B (random weights)")
    p.add_argument("--layers", type=int, help="keep only this many layers (a slice of 2B/7B for a CPU)")
    p.add_argument("--size", type=int, help="image side in pixels (default: 64 tiny, 128 shapes, else 768)")
    p.add_argument("--steps", type=int, help="decode steps, or with --train optimizer steps (default 32, 3)")
    p.add_argument("--batch", type=int, default=2, help="rows per forward: even = CFG with batch/2 samples")
    p.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset (default: all)")
    p.add_argument("--group_size", type=int, default=128, help="int4 group size (official 128)")
    p.add_argument("--train", nargs="?", const=",".join(TRAIN_VARIANTS), metavar="VARIANTS",
                   help=f"time training steps instead of decoding (default variants: {','.join(TRAIN_VARIANTS)})")
    p.add_argument("--seq_len", type=int, default=512, help="--train: tokens per sequence")
    p.add_argument("--linear", action="store_true", help="time the model's matmul shapes, float vs int4")
    p.add_argument("--end_to_end", action="store_true", help="seconds per whole image from step times (--size)")
    p.add_argument("--sjd_window", type=int, default=WINDOW["cuda" if torch.cuda.is_available() else "cpu"],
                   help="SJD variants: tokens per pass (default: sjd.py's for this machine; 1 runs them plain)")
    p.add_argument("--json", help="also write the record to this file")
    args = p.parse_args(argv)
    if unknown := set(args.variants.split(",")) - set(VARIANTS):
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.quant:
        raise ValueError("bench.py times int4 as its own variants (compile+int4, compile+int4+sjd); drop --quant")
    check_device(args.device)
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
    sampling = {k: sampling[k] for k in ("top_k", "temperature")}  # CFG: the official scale, or none (--batch)
    if args.linear:
        record.update(bench_linear(model, args.group_size, device, dtype))
    elif args.end_to_end:
        record.update(bench_end_to_end(args, model, layout, size, sampling, prefix, device))
    elif args.train:
        if unknown := set(args.train.split(",")) - set(TRAIN_VARIANTS):
            raise ValueError(f"unknown --train variant(s) {sorted(unknown)}; choose from {', '.join(TRAIN_VARIANTS)}")
        record.update(bench_train(model, args.batch, args.seq_len, args.steps or DEFAULT_STEPS["train"], device,
                                  tuple(args.train.split(","))))
    else:
        record.update(bench_decode(args, model, layout, size, sampling, prefix, device))
    if args.json:
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return record


if __name__ == "__main__":
    run_main(main)
