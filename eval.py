"""Score a checkpoint on a shapes prompt set: a reduced-scale GenEval (docs/shapes.md §4-§7).

sample.sample_images draws, verify.verify scores (1.0 is correct): accuracy and best-of-K (the paper's best-of-N,
§3.3.1) per category (T2I and the dual-panel tasks) and their means, and the codec ceiling that bounds them all:
renders of what each row asks for, as drawn and through the codec. Writes eval.json and samples_<category>.png;
--codec draws nothing (codec PSNR / SSIM / usage and the ceiling). Not the real GenEval (a detector on photos).

  python eval.py --n 2 --best_of 4                 # the shipped model; yours: --ckpt out/shapes/ckpt-00002000
  python eval.py --codec --vq out/vq_shapes
"""
import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import shapes
from best_of import verify_chain
from checkpoint import check_folder
from configurator import ArgumentParser, check_device, check_out_dir, check_ranges, run_main
from sample import ASSETS, add_system_args, edit_rounds, load_system_from_args, sample_images
from sequence import stack_panels
from tasks import make_grid
from verify import verify
from vq import EVAL_SEED, MoVQGAN, evaluate, pil_to_tensor, tensor_to_pil

BLOCKS = {"overall": shapes.CATEGORIES, "overall tasks": shapes.TASK_FAMILIES + shapes.EXTRA_TASKS,
          "pairs, rounds": shapes.PAIR_CHAIN_FAMILIES}  # the table's blocks
ROW_CATEGORIES = sum(BLOCKS.values(), ())  # every category a row may have, in table order
GRID_COLUMNS = 8  # samples_<category>.png


def load_rows(path, limit=0, only=""):
    """Prompt-set rows; a task row's "ref" is relative to the JSONL's folder. limit: rows per category;
    only: comma-separated categories to keep (empty: all)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set {path} does not exist; `python -m data.shapes.prepare` writes one beside "
                                "its shards, shapes.write_eval_set(folder) anywhere")
    try:
        rows = shapes.read_prompt_set(path)
    except ValueError as e:  # bad JSON or bad UTF-8
        raise ValueError(f"prompt set {path} is not JSON lines ({e})") from None
    if not rows:
        raise ValueError(f"prompt set {path} holds no rows; nothing to evaluate")
    for k, row in enumerate(rows, 1):  # a row: an object with a prompt, a category and (tasks) a ref path
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip()
                and isinstance(row.get("ref", ""), str) and "category" in row):
            raise ValueError(f"{path}: row {k} is not an object with a prompt and a category: {str(row)[:80]}")
    rows = [dict(row, ref=str(path.parent / row["ref"])) if "ref" in row else row for row in rows]
    if unknown := {row["category"] for row in rows} - set(ROW_CATEGORIES):
        raise ValueError(f"{path}: unknown categories {sorted(unknown)}; expected one of {ROW_CATEGORIES}")
    if unknown := set(filter(None, only.split(","))) - set(ROW_CATEGORIES):
        raise ValueError(f"--only: unknown categories {sorted(unknown)}; expected some of {', '.join(ROW_CATEGORIES)}")
    if only and not (rows := [row for row in rows if row["category"] in only.split(",")]):
        raise ValueError(f"{path} holds no rows of {only}; leave out --only or pick categories it has")
    categories = [row["category"] for row in rows]
    return [row for i, row in enumerate(rows) if not limit or categories[:i].count(row["category"]) < limit]


def ground_truth(row, size, seed=0):
    """What a perfect model draws for a row: the T2I scene, a task pair's lower panel, an image pair (both
    panels) or a multi-round edit's strip (the reference, then each round's result)."""
    if "pair_map" in row:
        scene = shapes.target_scene(row)
        return stack_panels(shapes.render(scene), shapes.MAP_RENDER[row["pair_map"]](scene))
    if "prompts" in row:
        with Image.open(row["ref"]) as ref:
            return make_grid([ref.convert("RGB")] + [shapes.render(shapes.target_scene(dict(row, **r)))
                                                     for r in row["rounds"]])
    if row.get("task", "t2i") in ("t2i", "subject"):  # a task row's panel size is its own
        width, height = row.get("width", size), row.get("height", size)
        return shapes.render(shapes.scene_for_spec(row, random.Random(seed), width, height))
    scene = shapes.target_scene(row)
    return shapes.DENSE_RENDER[row["dense_map"]](scene) if row["task"] == "dense" else shapes.render(scene)


def summarize(rows, scores):
    """{category: 0/1 hits of its draws}; scores[i]: row i's score or list of scores (1.0 is a hit)."""
    hits = {}
    for row, score in zip(rows, scores):
        hits.setdefault(row["category"], []).extend(np.atleast_1d(score) == 1.0)
    return hits


def wilson(hits, z=1.96):
    """95% Wilson score interval of a hit rate: honest at 0 and 1 where the normal one collapses. It counts
    draws as independent; draws of one prompt are not quite, so read it as a lower bound on the width."""
    n, p, shrink = len(hits), float(np.mean(hits)), 1 + z * z / len(hits)
    centre, half = (p + z * z / (2 * n)) / shrink, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / shrink
    return [round(float(max(0.0, centre - half)), 3), round(float(min(1.0, centre + half)), 3)]  # never -0.0


@torch.no_grad()
def ceiling(rows, codec, size):
    """The verifier on ground-truth renders and on their codec reconstructions -> two columns."""
    device, scores = next(codec.parameters()).device, []
    for i, row in enumerate(tqdm(rows, desc="ceiling", leave=False)):
        image = ground_truth(row, size, seed=i)
        rebuilt = codec.decode(codec.encode(pil_to_tensor(image)[None].to(device)))[0]  # (3, H, W)
        scores.append((score(tensor_to_pil(rebuilt), row), score(image, row)))
    through_codec, as_rendered = zip(*scores)
    return {"codec ceiling": summarize(rows, through_codec), "ground truth": summarize(rows, as_rendered)}


def score(image, row):
    """The verifier's score of one draw: a multi-round edit is judged round by round on its strip."""
    return verify_chain(image, row["prompts"]) if "prompts" in row else verify(image, row)


def draw_row(system, row, num_samples, size, seed, sampling):
    """num_samples draws for a row: whole images (dual panels included), or a multi-round edit's strips."""
    height = row.get("height", size) * (1 if row.get("task", "t2i") == "t2i" else 2)
    options = dict(width=row.get("width", size), height=height, num_samples=num_samples, seed=seed, **sampling)
    if "prompts" in row:
        return edit_rounds(system, row["prompts"], row["ref"], **options)[1]
    return sample_images(system, row["prompt"], **{k: row[k] for k in ("task", "ref", "subject", "dense_map")
                                                   if k in row}, **options)[0]


def score_samples(system, rows, n, best_of, size, seed, sampling, out_dir):
    """Score n groups of best_of draws a row -> (columns, records); grid each prompt's kept draw per category."""
    records, shown = [], []
    for i, row in enumerate(tqdm(rows, desc="prompts")):
        images = draw_row(system, row, n * best_of, size, seed + i, sampling)
        scores = [score(image, row) for image in images]
        groups = np.array(scores).reshape(n, best_of)  # (n, K): group g holds draws g*K .. g*K+K-1
        records.append({"prompt": row["prompt"], "category": row["category"], "scores": scores,
                        "best_of": groups.max(1).tolist()})
        shown.append(images[int(groups[0].argmax())])
    for category in dict.fromkeys(row["category"] for row in rows):
        group = [image for row, image in zip(rows, shown) if row["category"] == category]
        make_grid(group, columns=min(GRID_COLUMNS, len(group))).save(out_dir / f"samples_{category}.png")
    columns = {"accuracy": summarize(rows, [r["scores"] for r in records])}
    if best_of > 1:
        columns[f"best-of-{best_of}"] = summarize(rows, [r["best_of"] for r in records])
    return columns, records


def report(rows, columns):
    """Print one table (T2I categories, then tasks, each block pooling its categories' draws) with a 95%
    interval beside each rate, and return it as a dict: {row: {column: rate, column + " ci": [lo, hi]}}."""
    table, counts = {}, {c: sum(r["category"] == c for r in rows) for c in ROW_CATEGORIES}
    for label, block in BLOCKS.items():
        if present := [c for c in block if counts[c]]:
            rows_hits = [(c, {name: col[c] for name, col in columns.items()}) for c in present]
            pooled = {name: sum((list(col[c]) for c in present), []) for name, col in columns.items()}
            for key, hits in rows_hits + [(label, pooled)]:
                table[key] = {"prompts": counts.get(key, sum(counts[c] for c in present))}
                for name, h in hits.items():
                    table[key] |= {name: float(np.mean(h)), f"{name} ci": wilson(h)}
    print(f"{'category':<15}{'prompts':>8}" + "".join(f"{name:>24}" for name in columns))
    for key, line in table.items():
        cells = "".join(f"{line[n]:>10.3f} [{line[n + ' ci'][0]:.2f}, {line[n + ' ci'][1]:.2f}]" for n in columns)
        print(f"{key:<15}{line['prompts']:>8}{cells}")
    return table


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_system_args(p)  # --ckpt, --vq, --device, --threads, ...; prompt i samples with --seed + i
    p.add_argument("--prompts", default=str(ASSETS / "eval_prompts.jsonl"), help="prompt set (docs/shapes.md §5, §6)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (GenEval draws 4)")
    p.add_argument("--best_of", type=int, default=1, help="K: draw n groups of K, keep each group's best")
    p.add_argument("--codec", action="store_true", help="score the codec alone: PSNR/SSIM/usage and the ceiling")
    p.add_argument("--codec_images", type=int, default=256, help="--codec: held-out renders for PSNR/SSIM")
    p.add_argument("--limit", type=int, default=0, help="prompts per category (0: all)")
    p.add_argument("--only", default="", help="comma-separated categories to score, e.g. edge,depth (default: all)")
    p.add_argument("--size", type=int, help=f"T2I side in pixels (default: the checkpoint's; --codec {shapes.PANEL})")
    for flag, kind in (("--cfg", float), ("--top_k", int), ("--temperature", float)):
        p.add_argument(flag, type=kind, help="default: the checkpoint's, as in sample.py")
    p.add_argument("--out_dir", default="out/eval")
    args = p.parse_args(argv)
    check_ranges(vars(args), positive=("n", "best_of", "codec_images", "size"),
                 non_negative=("limit", "top_k", "temperature", "cfg", "threads"))  # before any work, as sample.py
    check_device(args.device)
    check_out_dir(args.out_dir)
    if not args.codec:
        check_folder(args.ckpt, args.vq)
    rows, out_dir = load_rows(args.prompts, args.limit, args.only), Path(args.out_dir)
    if missing := [row["ref"] for row in rows if "ref" in row and not Path(row["ref"]).is_file()]:
        raise FileNotFoundError(f"{args.prompts}: reference image {missing[0]} does not exist "
                                f"({len(missing)} missing in all)")
    record = {"prompts": str(args.prompts), "ckpt": args.ckpt, "n": args.n, "best_of": args.best_of}
    if args.codec:  # PSNR / SSIM / usage on the held-out renders train_vq.py evaluates on (vq.EVAL_SEED)
        torch.set_num_threads(args.threads or torch.get_num_threads())
        size, columns = args.size or shapes.PANEL, {}
        codec = MoVQGAN.from_pretrained(args.vq or args.ckpt).to(args.device).eval()
        out_dir.mkdir(parents=True, exist_ok=True)  # once loading worked: a failure writes nothing
        images = torch.from_numpy(shapes.codec_training_images(args.codec_images, size, seed=EVAL_SEED))  # (N, H, W, 3)
        record["codec_quality"] = q = evaluate(codec, images.permute(0, 3, 1, 2).to(args.device))
        print(f"codec on {args.codec_images} held-out {size}px renders: PSNR {q['psnr']:.2f} dB, SSIM "
              f"{q['ssim']:.4f}, codebook usage {q['usage']:.3f}, perplexity {q['perplexity']:.0f}")
    else:
        system = load_system_from_args(args)
        out_dir.mkdir(parents=True, exist_ok=True)
        codec, size = system.codec, args.size or system.size
        sampling = {"cfg": args.cfg, "top_k": args.top_k, "temperature": args.temperature}
        columns, record["rows"] = score_samples(system, rows, args.n, args.best_of, size, args.seed, sampling, out_dir)
        record["sampling"] = dict(system.defaults, **{k: v for k, v in sampling.items() if v is not None})
    columns.update(ceiling(rows, codec, size))
    record.update(size=size, table=report(rows, columns))
    (out_dir / "eval.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out_dir / 'eval.json'}" + ("" if args.codec else " and samples_<category>.png"))
    return record


if __name__ == "__main__":
    run_main(main)
