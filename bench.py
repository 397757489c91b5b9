"""Benchmark image-token decoding: one process, one model, one prompt, every speed-up side by side.

What it is: the stripped twin of sample.py (as nanoGPT's bench.py is of train.py). It times
sample.generate and sample.generate_uncached, nothing of its own, in six variants:
  naive         no cache: the whole sequence recomputed each step, CFG as a second sequence
  static        static KV cache, CFG rows in one batch
  compile       + torch.compile of the decode step (CUDA graphs on GPU)
  compile+int4  + int4 weight-only linears (quant.py, group 128; lm_head stays float)
  sjd           static cache + speculative Jacobi decoding, window 16 (sjd.py), eager
  int4+sjd      int4 + SJD, eager: the official README's fastest setting (performance.md §2)
Per variant: tokens/s (end to end, prefill included), forward passes (the prefill is one), ms per
step (one forward pass, for SJD a whole window; the prefill is timed alone and taken out), peak
memory, speed-up over `static`, and achieved bandwidth as a fraction of the device's, measured at
start-up as a large tensor copy (bytes read + written per second, with the threads in use).
Bytes per step = every matmul weight (int4 buffers for int4 layers; the embedding is only
gathered) + the whole static KV cache, which attention reads every step (performance.md §6).
Peak memory: on CUDA the allocator's peak; on CPU the process's resident-set high-water mark
(VmHWM, reset before each variant through /proc/self/clear_refs), so it counts all that is
resident: weights, cache, activations, torch itself (~0.25 GB) and what compiling left behind.
A variant that cannot run (no compiler, int4 shapes the kernel refuses, no sjd.py) says why.

What it is not: a quality measurement (eval.py). Random weights are fine for timing, not for
SJD's acceptance, which needs a trained model's logits: time SJD on a --ckpt.
int4 on CPU: the CPU kernel takes bf16 activations, so Int4Linear casts fp32 inputs to bf16 and
back (quant.py); keep --dtype float32 on CPU, whose bf16 matmuls are slow (machine.md). Every
in_features must be a multiple of --group_size (tiny, width 64: use 32 or 64); "int4_path":
"reference" in the JSON means no fast kernel took the layers. A small model on a busy CPU runs
several times faster with --threads 1 (with two, every op waits for a descheduled thread).

  python bench.py --model tiny --steps 16
  python bench.py --model 2B --layers 4 --steps 8 --variants static,compile+int4   # a CPU slice
  python bench.py --model 7B --device cuda --steps 512 --json out/bench.json       # the paper's model
  python bench.py --ckpt assets/ --steps 64                                         # a trained model
  python bench.py --model shapes --train --seq_len 310 --batch 8                    # training
"""
import argparse
import importlib.util
import json
import resource
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn

from model import ModelConfig, Transformer, compute_loss
from quant import Int4Linear, quantize_model
from sample import OFFICIAL_SAMPLING, generate, generate_uncached, load_system
from sequence import (MAX_GRIDS, TokenLayout, image_body_plan, image_header_ids, prompt_ids, t2i_prompt,
                      unconditional_ids)
from vq import VQConfig

VARIANTS = ("naive", "static", "compile", "compile+int4", "sjd", "int4+sjd")
DEFAULT_SIZE = {"tiny": 64, "shapes": 128}  # pixels; the paper's presets default to 768
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, as train.py (performance.md §6)

# -----------------------------------------------------------------------------
# the device: synchronisation, peak memory, bandwidth


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := the current RSS
    except OSError:
        pass  # elsewhere peak_memory_mb reports the lifetime peak


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if not Path("/proc/self/status").exists():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024  # kB -> MB


def measure_bandwidth(device, megabytes):
    """Bytes moved per second by a large copy (each byte read once and written once), best of 5."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst, best = torch.empty_like(src), float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best

# -----------------------------------------------------------------------------
# the model, the prompt, and what one decode step reads


def build_model(name, layers, device, dtype):
    """A random model of a preset, built directly in `dtype` on `device` (no fp32 copy of a 7B)."""
    config = ModelConfig.from_name(name, **({"n_layer": layers} if layers else {}))
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def random_layout(vocab_size):
    """Five special ids, the size tokens, text, then the official 16,384-code codebook at the top
    of the vocabulary (at most half of it, for the small presets)."""
    codebook = min(VQConfig().n_embed, vocab_size // 2)
    return TokenLayout(bos_id=0, image_start_id=1, image_end_id=2, eol_id=3, sep_id=4,
                       image_code_offset=vocab_size - codebook, codebook_size=codebook,
                       size_token_ids=tuple(range(5, 5 + MAX_GRIDS)))


def setup(args, device, dtype):
    """(model, layout, image side, sampling defaults, prompt ids): a checkpoint's, or random ones."""
    if args.ckpt:
        system = load_system(args.ckpt, args.vq, str(device), dtype, vq_config=args.vq_config)
        size = args.size or system.size
        prefix = prompt_ids(system.tokenizer, system.layout, t2i_prompt(args.prompt, size, size))
        return system.model, system.layout, size, system.defaults, prefix
    model = build_model(args.model, args.layers, device, dtype)
    layout = random_layout(model.config.vocab_size)
    text = torch.randint(5 + MAX_GRIDS, layout.image_code_offset, (24,), generator=torch.Generator().manual_seed(0))
    prefix = [layout.bos_id] + text.tolist() + [layout.sep_id]  # a 24-token stand-in prompt
    return model, layout, args.size or DEFAULT_SIZE.get(args.model, 768), OFFICIAL_SAMPLING, prefix


def weight_bytes(model):
    """Bytes of every matmul weight: what one forward pass streams from memory."""
    return sum(m.weight.nbytes if isinstance(m, nn.Linear) else m.weight.nbytes + m.scales_and_zeros.nbytes
               for m in model.modules() if isinstance(m, (nn.Linear, Int4Linear)))


def kv_cache_bytes(config, rows, tokens, dtype):
    """The static cache sample.generate allocates (its length rounded up to 8)."""
    length = (tokens + 7) // 8 * 8
    return 2 * config.n_layer * rows * config.n_kv_head * length * config.head_dim * dtype.itemsize

# -----------------------------------------------------------------------------
# decoding: one variant (warm up, time the run, time the prefill alone), then all of them


def why_not(variant, device):
    """Why a variant cannot run here, or None."""
    if "sjd" in variant and importlib.util.find_spec("sjd") is None:
        return "unavailable: sjd.py missing"
    if "compile" in variant and device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return "unavailable: torch.compile on CPU needs a C++ compiler"
    if "compile" in variant and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "unavailable: torch.compile on CUDA needs triton"


def run_variant(variant, model, layout, prefix, plan, num_samples, cfg_scale, sampling, device):
    uncond, generator = unconditional_ids(prefix, layout), torch.Generator(device)

    def once(n, how=variant):
        sync(device)
        t0 = time.perf_counter()
        if how == "naive":  # one sample at a time, as the official loop
            for s in range(num_samples):
                generate_uncached(model, layout, prefix, uncond, plan[:n], cfg_scale=cfg_scale,
                                  generator=generator.manual_seed(s), **sampling)
            stats = {"forward_passes": n}
        else:
            stats = generate(model, layout, prefix, uncond, plan[:n], num_samples=num_samples, cfg_scale=cfg_scale,
                             generator=generator.manual_seed(0), compile="compile" in how,
                             sjd_window=16 if "sjd" in how else 0, **sampling)[1]
        sync(device)
        return time.perf_counter() - t0, stats

    # warm-up: first-touch allocations; a compiled step must see the timed run's shapes (the cache
    # length is baked into the graph), or the timed run would compile again
    once(len(plan) if "compile" in variant else min(len(plan), 4))
    reset_peak_memory(device)
    seconds, stats = once(len(plan))
    peak, passes = peak_memory_mb(device), stats["forward_passes"]
    if variant == "naive":  # every step is a full forward: nothing to take out
        ms_per_step = seconds / (len(plan) * num_samples) * 1e3
    else:  # the prefill is the same eager call in every cached variant; its fastest of 3 runs, so
        # that noise in timing it cannot eat the decode time of a short run
        prefill = min(once(1, how="static")[0] for _ in range(3))
        ms_per_step = (seconds - prefill) / max(1, passes - 1) * 1e3
    return {"tokens_per_s": num_samples * len(plan) / seconds, "seconds": seconds, "forward_passes": passes,
            "ms_per_step": ms_per_step, "peak_memory_mb": peak}


def bench_decode(args, model, layout, size, sampling, prefix, device):
    prefix = prefix + image_header_ids(size, size, layout)
    plan = image_body_plan(size // layout.downsample, size // layout.downsample, layout)
    plan = plan[:min(args.steps or 32, len(plan))]
    num_samples, cfg_scale = (args.batch // 2, OFFICIAL_SAMPLING["cfg"]) if args.batch % 2 == 0 else (args.batch, 1.0)
    sampling = {k: sampling[k] for k in ("top_k", "temperature")}
    bandwidth = measure_bandwidth(device, 2048 if device.type == "cuda" else 256)
    kv = kv_cache_bytes(model.config, args.batch, len(prefix) + len(plan), model.lm_head.weight.dtype)
    print(f"{size}x{size} px, {len(prefix)} prompt tokens, {len(plan)} decode steps, batch {args.batch} "
          f"({num_samples} sample{'s' * (num_samples > 1)}{', CFG' if cfg_scale != 1 else ''}); "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    results, wanted, int4_problem = {}, args.variants.split(","), None
    for variant in sorted(VARIANTS, key=lambda v: "int4" in v):  # int4 last: it quantizes in place, once
        if "int4" in variant and variant in wanted and not any(isinstance(m, Int4Linear) for m in model.modules()):
            try:
                quantize_model(model, group_size=args.group_size)
            except ValueError as e:  # the model may be half quantized now: no int4 variant runs on it
                int4_problem = f"unavailable: {e}"
        reason = "not in --variants" if variant not in wanted else why_not(variant, device)
        if reason or ("int4" in variant and int4_problem):
            results[variant] = {"skipped": reason or int4_problem}
            continue
        try:
            r = run_variant(variant, model, layout, prefix, plan, num_samples, cfg_scale, sampling, device)
        except Exception as e:  # one variant never stops the others; say what broke
            results[variant] = {"skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            model.clear_caches()
            continue
        # naive: one full forward per sequence per step (two with CFG) and no cache
        reads = weight_bytes(model) * (2 if cfg_scale != 1 else 1) if variant == "naive" else weight_bytes(model) + kv
        r.update(bytes_per_step=reads, achieved_gb_s=reads / r["ms_per_step"] * 1e-6,
                 bandwidth_fraction=reads / r["ms_per_step"] * 1e3 / bandwidth)
        if paths := sorted({m.path for m in model.modules() if isinstance(m, Int4Linear)}):
            r["int4_path"] = ",".join(paths)  # "reference" means no fast kernel took these layers
        results[variant] = r
    results = {v: results[v] for v in VARIANTS}  # the table's order
    base = results["static"].get("tokens_per_s")
    print(f"{'variant':<13}{'tok/s':>9}{'passes':>8}{'ms/step':>9}{'GB/s':>8}{'of BW':>7}{'peak MB':>9}{'x static':>9}")
    for variant in VARIANTS:
        r = results[variant]
        if "skipped" in r:
            print(f"{variant:<13}  {r['skipped']}")
            continue
        r["speedup_vs_static"] = r["tokens_per_s"] / base if base else None
        print(f"{variant:<13}{r['tokens_per_s']:>9.1f}{r['forward_passes']:>8}{r['ms_per_step']:>9.2f}"
              f"{r['achieved_gb_s']:>8.1f}{r['bandwidth_fraction'] * 100:>6.1f}%{r['peak_memory_mb']:>9.0f}"
              + (f"{r['speedup_vs_static']:>8.2f}x" if base else f"{'-':>9}"))
    return {"mode": "decode", "size": size, "steps": len(plan), "batch": args.batch, "prompt_tokens": len(prefix),
            "cfg_scale": cfg_scale, **sampling, "copy_bandwidth_gb_s": bandwidth / 1e9, "kv_cache_bytes": kv,
            "variants": results}

# -----------------------------------------------------------------------------
# training: forward + backward + AdamW on random tokens, train.py's precision


def bench_train(model, batch, seq_len, steps, device):
    """fp32 weights with bf16 autocast on CUDA, plain fp32 on CPU (train.py)."""
    model = model.float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    x = torch.randint(model.config.vocab_size, (batch, seq_len + 1), device=device)
    mask = torch.ones(batch, seq_len, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = compute_loss(model(x[:, :-1]), x[:, 1:], mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates the gradients and the optimizer state
    reset_peak_memory(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds, cfg, n_params = time.perf_counter() - t0, model.config, model.num_params()
    tokens_per_s = batch * seq_len * steps / seconds
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.dim * seq_len  # train.py's MFU convention
    peak = next((f for k, f in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    record = {"mode": "train", "batch": batch, "seq_len": seq_len, "steps": steps, "ms_per_step": seconds / steps * 1e3,
              "tokens_per_s": tokens_per_s, "tflops": flops_per_token * tokens_per_s / 1e12,
              "mfu": flops_per_token * tokens_per_s / peak if peak else None, "peak_memory_mb": peak_memory_mb(device)}
    mfu = f"MFU {record['mfu'] * 100:.1f}%" if peak else "MFU: GPU only"
    print(f"train: batch {batch} x {seq_len} tokens, {record['ms_per_step']:.0f} ms/step, {tokens_per_s:,.0f} "
          f"tokens/s, {record['tflops'] * 1e3:,.1f} GFLOP/s ({mfu}), peak {record['peak_memory_mb']:,.0f} MB")
    return record

# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="a model preset: tiny, shapes, 2B, 7B (random weights)")
    p.add_argument("--layers", type=int, help="keep only this many layers (a slice of 2B/7B for a CPU)")
    p.add_argument("--ckpt", help="a checkpoint folder (ours or official) instead of random weights")
    p.add_argument("--vq", help="the codec an official --ckpt needs (sample.load_system loads it)")
    p.add_argument("--vq_config", help="codec config (preset name or JSON) when --vq is not a released size")
    p.add_argument("--prompt", default="a photo of a red circle left of a blue square", help="with --ckpt")
    p.add_argument("--size", type=int, help="image side in pixels (default: 64 tiny, 128 shapes, else 768)")
    p.add_argument("--steps", type=int, help="decode steps to time, a partial image is fine (default 32); "
                                             "with --train: optimizer steps (default 3)")
    p.add_argument("--batch", type=int, default=2, help="rows per forward: even = CFG with batch/2 samples")
    p.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset of the above")
    p.add_argument("--group_size", type=int, default=128, help="int4 group size (official 128)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, else fp32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--train", action="store_true", help="time training steps instead of decoding")
    p.add_argument("--seq_len", type=int, default=512, help="--train: tokens per sequence")
    p.add_argument("--json", help="also write the record to this file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available; use --device cpu")
    if unknown := set(args.variants.split(",")) - set(VARIANTS):
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, layout, size, sampling, prefix = setup(args, device, torch.float32 if args.train else dtype)
    config, name = model.config, Path(args.ckpt).name if args.ckpt else args.model
    record = {"model": name, "params": model.num_params(), "device": str(device),
              "dtype": "float32" if args.train else str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"{name}: {record['params'] / 1e6:.1f}M params, {config.n_layer} layers, dim {config.dim}, {device.type} "
          f"{record['dtype']}, {record['threads']} threads")
    if args.train:
        record.update(bench_train(model, args.batch, args.seq_len, args.steps or 3, device))
    else:
        record.update(bench_decode(args, model, layout, size, sampling, prefix, device))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    return record


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
