"""Score a checkpoint on a shapes prompt set: GenEval-style accuracy per category, best-of-K, the
five dual-panel tasks, and the codec ceiling that bounds them all.

What it is: the reduced-scale GenEval of shared/specs/shapes.md. For every prompt-set row it draws
samples with sample.sample_images (one batch per prompt), scores each with the shapes verifier
(shapes.verify: a T2I image, or a task's lower panel) and counts score 1.0 as correct. It reports
  accuracy        over all draws, per category; overall = mean over the six T2I categories (GenEval)
  best-of-K       the paper's §3.3.1 best-of-N: each group of K draws keeps the verifier's best
  ground truth    the verifier on a render of what the row asks for (it must be >= 0.99)
  codec ceiling   the verifier on codec reconstructions of those renders (encode -> decode), the
                  most any model on this codec can score (shapes.md "The ceiling", want >= 0.97)
Task rows ("task" and "ref", the upper panel) are reported per task family, apart from T2I.
--codec scores the codec alone (no transformer): PSNR / SSIM / codebook usage on held-out renders
(vq.evaluate) and the ceiling rows. Writes out_dir/eval.json and one PNG grid per category.

What it is not: the real GenEval (a detector on real images), or a sampler of its own: sampling
is sample.py's. Best-of-K uses the same verifier that scores, so it measures how much a perfect
judge lifts accuracy, as the paper's VQAScore selection does.

  python eval.py --prompts data/shapes/eval_prompts.jsonl --n 4                 # the shipped model
  python eval.py --prompts data/shapes/eval_prompts.jsonl --n 2 --best_of 4 --ckpt out/shapes/ckpt-002000
  python eval.py --prompts data/shapes/eval_prompts.jsonl --codec --vq out/vq_shapes
"""
import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import shapes
from sample import ASSETS, load_system, make_grid, sample_images
from vq import MoVQGAN, TrainConfig, evaluate, pil_to_tensor, tensor_to_pil


def load_rows(path, limit=0):
    """Prompt-set rows; a task row's "ref" is relative to the JSONL's folder. limit: rows per category."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set {path} does not exist; build it with "
                                f"`python -m data.shapes.prepare` (it writes eval_prompts.jsonl)")
    rows, seen = [], defaultdict(int)
    for row in shapes.read_prompt_set(path):
        if row["category"] not in shapes.CATEGORIES + shapes.TASK_FAMILIES:
            raise ValueError(f"{path}: unknown category {row['category']!r} in row {row['prompt']!r}; expected one "
                             f"of {', '.join(shapes.CATEGORIES + shapes.TASK_FAMILIES)}")
        seen[row["category"]] += 1
        if not limit or seen[row["category"]] <= limit:
            rows.append(dict(row, ref=str(path.parent / row["ref"])) if "ref" in row else row)
    return rows


def panel_size(row, size):
    """(width, height) of the panel a row is scored on: a task's own, a T2I row's or `size`."""
    return row.get("width", size), row.get("height", size)


def ground_truth(row, size, seed=0):
    """What a perfect model draws for a row: the T2I scene, or a task pair's lower panel."""
    task, (width, height) = row.get("task", "t2i"), panel_size(row, size)
    if task in ("t2i", "subject"):
        return shapes.render(shapes.scene_for_spec(row, random.Random(seed), width, height))
    objects = tuple(shapes.Obj(t["shape"], t["color"], t["x"], t["y"], t["size"]) for t in row["target"])
    scene = shapes.Scene(objects, width, height, row.get("background", "white"))
    if task == "dense" and row["dense_map"] != "segmentation map":
        return shapes.render_edges(scene)
    return (shapes.render_segmentation if task == "dense" else shapes.render)(scene)


@torch.no_grad()
def reconstruct(codec, image):
    """image -> codec.decode(codec.encode(image)), as PIL."""
    x = pil_to_tensor(image)[None].to(next(codec.parameters()).device)
    return tensor_to_pil(codec.decode(codec.encode(x))[0])


def ceiling(rows, codec, size):
    """Per row: the verifier's score on the ground-truth render and on its codec reconstruction."""
    out = []
    for i, row in enumerate(tqdm(rows, desc="ceiling", leave=False)):
        truth = ground_truth(row, size, seed=i)
        out.append({"ground_truth": shapes.verify(truth, row), "codec": shapes.verify(reconstruct(codec, truth), row)})
    return out


def score_samples(system, rows, n, best_of, size, seed, sampling):
    """Per row: the verifier's score of n * best_of draws, and the best draw of the first group."""
    out, shown = [], []
    for i, row in enumerate(tqdm(rows, desc="prompts")):
        task, (width, height) = row.get("task", "t2i"), panel_size(row, size)
        images, _ = sample_images(system, row["prompt"], width=width, height=height * (1 if task == "t2i" else 2),
                                  task=task, ref=row.get("ref"), subject=row.get("subject"),
                                  dense_map=row.get("dense_map", "segmentation map"),
                                  num_samples=n * best_of, seed=seed + i, **sampling)
        scores = [shapes.verify(im, row) for im in images]
        groups = np.array(scores).reshape(n, best_of)  # (n, K): group g holds draws g*K .. g*K+K-1
        out.append({"scores": scores, "best_of": groups.max(1).tolist()})
        shown.append(images[int(groups[0].argmax())])
    return out, shown


def summarize(rows, records, key):
    """{category: mean of (score == 1.0) over every value of record[key]} in first-seen order."""
    hits = defaultdict(list)
    for row, record in zip(rows, records):
        values = record[key] if isinstance(record[key], list) else [record[key]]
        hits[row["category"]] += [v == 1.0 for v in values]
    return {c: float(np.mean(v)) for c, v in hits.items()}


def report(rows, columns):
    """Print one table (T2I categories, then tasks, each with its mean) and return it as a dict."""
    names = list(columns)
    kinds = {"t2i": [c for c in shapes.CATEGORIES if any(r["category"] == c for r in rows)],
             "tasks": [t for t in shapes.TASK_FAMILIES if any(r["category"] == t for r in rows)]}
    table = {}
    print(f"{'category':<15}{'prompts':>8}" + "".join(f"{n:>15}" for n in names))
    for kind, cats in kinds.items():
        for c in cats:
            table[c] = {n: columns[n][c] for n in names} | {"prompts": sum(r["category"] == c for r in rows)}
            print(f"{c:<15}{table[c]['prompts']:>8}" + "".join(f"{table[c][n]:>15.3f}" for n in names))
        if cats:
            label = "overall" if kind == "t2i" else "overall tasks"
            table[label] = {n: float(np.mean([columns[n][c] for c in cats])) for n in names}
            print(f"{label:<23}" + "".join(f"{table[label][n]:>15.3f}" for n in names))
    return table


def codec_quality(codec, n_images, size):
    """PSNR / SSIM / codebook usage on the held-out renders vq.py evaluates on (its eval_seed)."""
    images = shapes.codec_training_images(n_images, size, seed=TrainConfig.eval_seed)  # (N, H, W, 3) uint8
    device = next(codec.parameters()).device
    quality = evaluate(codec, torch.from_numpy(images).permute(0, 3, 1, 2).to(device))
    codec.eval()  # evaluate() leaves it in training mode
    print(f"codec on {n_images} held-out {size}px renders: PSNR {quality['psnr']:.2f} dB, SSIM {quality['ssim']:.4f}, "
          f"codebook usage {quality['usage']:.3f}, perplexity {quality['perplexity']:.0f}")
    return quality


def save_grids(rows, images, out_dir, columns=8):
    """out_dir/samples_<category>.png: one sample per prompt (the kept one under best-of-K)."""
    by_category = defaultdict(list)
    for row, image in zip(rows, images):
        by_category[row["category"]].append(image)
    for category, group in by_category.items():
        make_grid(group, columns=min(columns, len(group))).save(out_dir / f"samples_{category}.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="data/shapes/eval_prompts.jsonl", help="a prompt-set JSONL (shapes.md)")
    p.add_argument("--ckpt", default=str(ASSETS), help="checkpoint folder (sample.load_system)")
    p.add_argument("--vq", help="codec: its folder or official file (default: the one in --ckpt)")
    p.add_argument("--vq_config", help="codec config (preset name or JSON) when --vq is not a released size")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (GenEval draws 4)")
    p.add_argument("--best_of", type=int, default=1, help="K: draw n groups of K, keep each group's best")
    p.add_argument("--codec", action="store_true", help="score the codec alone: PSNR/SSIM/usage and the ceiling")
    p.add_argument("--codec_images", type=int, default=256, help="--codec: held-out renders for PSNR/SSIM")
    p.add_argument("--limit", type=int, default=0, help="prompts per category (0: all)")
    p.add_argument("--size", type=int, help="T2I image side in pixels (default: the checkpoint's)")
    p.add_argument("--cfg", type=float)
    p.add_argument("--top_k", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default; on a busy CPU, 1 is "
                                                          "often several times faster for small models)")
    p.add_argument("--out_dir", default="out/eval")
    args = p.parse_args(argv)
    if args.n < 1 or args.best_of < 1:
        raise ValueError(f"--n and --best_of must be >= 1 (got {args.n}, {args.best_of})")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = load_rows(args.prompts, args.limit)
    record = {"prompts": str(args.prompts), "ckpt": args.ckpt, "n": args.n, "best_of": args.best_of}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.codec:
        codec = MoVQGAN.from_pretrained(args.vq or args.ckpt).to(args.device).eval()
        size, columns = args.size or shapes.PANEL, {}
        record["codec_quality"] = codec_quality(codec, args.codec_images, size)
    else:
        system = load_system(args.ckpt, args.vq, args.device, getattr(torch, args.dtype), vq_config=args.vq_config)
        codec, size = system.codec, args.size or system.size
        sampling = {"cfg": args.cfg, "top_k": args.top_k, "temperature": args.temperature}
        samples, shown = score_samples(system, rows, args.n, args.best_of, size, args.seed, sampling)
        columns = {"accuracy": summarize(rows, samples, "scores")}
        if args.best_of > 1:
            columns[f"best-of-{args.best_of}"] = summarize(rows, samples, "best_of")
        record.update(sampling=dict(system.defaults, **{k: v for k, v in sampling.items() if v is not None}),
                      rows=[{"prompt": r["prompt"], "category": r["category"], **s} for r, s in zip(rows, samples)])
        save_grids(rows, shown, out_dir)
    truth = ceiling(rows, codec, size)
    columns["codec ceiling"] = summarize(rows, truth, "codec")
    columns["ground truth"] = summarize(rows, truth, "ground_truth")
    record.update(size=size, table=report(rows, columns))
    (out_dir / "eval.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out_dir / 'eval.json'}" + ("" if args.codec else " and samples_<category>.png"))
    return record


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
