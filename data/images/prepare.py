"""
Build token shards from your own images: a JSONL manifest of captioned images (T2I) and image pairs
(dual-panel tasks) -> official resolution buckets -> codec -> Uni-Rep + task template -> the same
shards and meta.json as data/shapes/prepare.py, which train.py reads. It stands in for the official
pre_tokenize.py, without its hard-coded paths and pickles. Spec: shared/specs/lumina_mgpt2.md §2.3
(buckets, crop), §6 (prompts, dual panels), §7 (what is supervised, the 10% text dropout).

Manifest, one example a line; relative paths are relative to the manifest's folder:
  {"image": "cats/001.jpg", "caption": "a cat on a sofa"}                                 T2I
  {"task": "edge", "ref": "edges/001.png", "image": "cats/001.jpg", "caption": "..."}    dual panel
As in the paper's Figure 3, upper panel = condition = "ref", lower = target = "image". The task is
one of sequence.TASKS; "subject" lines also need "subject", "dense" lines may name a "dense_map".
A line that is not JSON, has no caption, or names a missing or undecodable image is skipped and
listed in skipped.txt; it never stops the run.

Writes into --out_dir (one folder per stage resolution): tokenizer.json, {train,val}.{ids.bin,
mask.bin,offsets.npy} and meta.json as data/shapes/prepare.py does (meta.json adds per-bucket
example and token counts), and skipped.txt. Not a downloader, captioner or filter; trains nothing.

  python -m data.images.prepare --manifest=my/train.jsonl --codec=movqgan_270M.ckpt \\
      --tokenizer=Lumina-mGPT-2.0/tokenizer.json --target_size=256 --out_dir=data/images/stage1_256 \\
      --workers=8 --device=cuda

Order and resume: the manifest is cut into chunks of --chunk_size lines; workers turn chunks into
parts/part-K.npz (each written atomically) in whatever order they finish, and the shards are
assembled from the parts in chunk order, so examples keep manifest order. Rerun a killed run with
the same command: finished parts are kept. Every random choice (val split, size-free prompt, text
dropout) is drawn from (seed, line number) alone, so the worker count changes nothing. The images
themselves are not fingerprinted: change none while a run is unfinished.
"""
import argparse
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import sequence as S
from data.shapes.prepare import UNSIZED_T2I, fingerprint
from vq import MoVQGAN, center_crop, pil_to_tensor

MAX_RATIO = 4.0  # official generate_crop_size_list(max_ratio=4.0) (spec §2.3)
SPLITS = ("train", "val")
KINDS = ("t2i", "dual")

# -----------------------------------------------------------------------------
# Resolution buckets (spec §2.3)


def bucket_sizes(target_size, panels=1, unit=32):
    """Panel sizes (w, h) in pixels, as the official generate_crop_size_list enumerates them.

    The budget is (target_size / unit)^2 grids. Walking widths down from the whole budget, each
    width w takes the heights from where the wider one stopped up to the largest that fits, so only
    near-full buckets appear: a 4:3 photo at 256 becomes 288x224 (63 grids), not 256x192 (48).
    Ours for dual panels (panels=2): each panel gets half the budget and it is the stacked image,
    w x 2h, whose aspect ratio must stay <= 4, as it is one image to the model (§6)."""
    budget = (target_size // unit) ** 2 // panels  # grids per panel
    sizes, w, h = [], budget, 1
    while w > 0:
        if max(w, panels * h) <= MAX_RATIO * min(w, panels * h):
            sizes.append((w * unit, h * unit))
        if w * (h + 1) <= budget:
            h += 1
        else:
            w -= 1
    return sizes


def choose_bucket(width, height, sizes):
    """Official var_center_crop: the bucket that keeps the largest share of the image once it is
    resized to cover the bucket (smaller over larger scale factor); ties go to the wider, then taller."""
    def kept(size):
        sw, sh = size[0] / width, size[1] / height
        return min(sw, sh) / max(sw, sh), size
    return max(sizes, key=kept)

# -----------------------------------------------------------------------------
# One manifest line -> (prompt text, image to encode, drop_text, split, kind)


class Skip(Exception):
    """A manifest line that cannot become an example: logged and counted, never fatal."""


def open_image(path):
    """RGB, or RGBA when transparent: pil_to_tensor composites it on white after the crop (official order)."""
    if not path.exists():
        raise Skip(f"missing file {path}")
    try:
        with Image.open(path) as im:
            im.load()
            alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            return im.convert("RGBA" if alpha else "RGB")
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file is the data's fault
        raise Skip(f"unreadable image {path} ({type(e).__name__}: {str(e)[:120]})") from None


def read_line(n, line, folder, sizes, seed, val_fraction):
    """Line n (0-based) of the manifest -> (text, PIL image, drop_text, split, kind), or raise Skip."""
    rng = random.Random(f"{seed}-{n}")  # three draws, always, whatever the line holds
    split = SPLITS[rng.random() < val_fraction]
    unsized, drop = rng.random() < UNSIZED_T2I, rng.random() < S.CFG_DROP_PROB
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise Skip(f"not JSON ({e})") from None
    if not isinstance(row, dict):
        raise Skip("not a JSON object")
    task, caption = row.get("task", "t2i"), row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise Skip("no caption")
    if task not in S.TASKS:
        raise Skip(f"unknown task {task!r}; expected one of {S.TASKS}")
    if task == "subject" and not row.get("subject"):
        raise Skip('a subject line needs "subject" (the upper panel\'s description)')
    for key in ("image",) if task == "t2i" else ("image", "ref"):
        if not isinstance(row.get(key), str):
            raise Skip(f'no "{key}" path' + ("" if key == "image" else f" (a {task} line needs its upper panel)"))
    target = open_image(folder / row["image"])
    if task == "t2i":  # official: 10% size-free prompts, 10% text dropped for CFG (§6, §7)
        w, h = choose_bucket(*target.size, sizes[1])
        text = S.t2i_prompt(caption) if unsized else S.t2i_prompt(caption, w, h)
        return text, center_crop(target, w, h), drop, split, "t2i"
    ref = open_image(folder / row["ref"])
    w, h = choose_bucket(*target.size, sizes[2])  # both panels take the target's bucket
    upper, lower = center_crop(ref, w, h), center_crop(target, w, h)
    if upper.mode != lower.mode:
        upper, lower = upper.convert("RGBA"), lower.convert("RGBA")
    text = S.task_prompt(task, caption, w, 2 * h, subject=row.get("subject"),
                         dense_map=row.get("dense_map", "segmentation map"))
    return text, S.stack_panels(upper, lower), False, split, "dual"  # dropout is T2I-only (§7)

# -----------------------------------------------------------------------------
# Workers: each loads its own codec and tokenizer once, then turns chunks into part files

_worker = {}


def init_worker(cfg, device, threads=None):
    """device: a device string, or a queue handing each pool process its own (one GPU each)."""
    device = device if isinstance(device, str) else device.get()
    if threads:
        torch.set_num_threads(threads)
    _worker.update(cfg, device=device, tokenizer=S.Tokenizer.from_file(cfg["tokenizer"]),
                   layout=S.TokenLayout(**cfg["layout"]), codec=MoVQGAN.from_pretrained(cfg["codec"]).to(device))


def encode(images):
    """PIL images of one size -> code grids [h, w] on the CPU, --batch_size images per codec call."""
    codec, device, step, out = _worker["codec"], _worker["device"], _worker["batch_size"], []
    for k in range(0, len(images), step):
        x = torch.stack([pil_to_tensor(im) for im in images[k:k + step]]).to(device)  # (B, 3, H, W)
        out += list(codec.encode(x).cpu())
    return out


def write_atomic(path, data):
    tmp = Path(f"{path}.{os.getpid()}.tmp")  # per process: an orphan of a killed run cannot collide
    tmp.write_bytes(data)
    os.replace(tmp, path)


def process_chunk(task):
    """(k, first line number, lines) -> parts/part-k.npz; returns (lines done, skip messages)."""
    k, first, lines = task
    w = _worker
    examples, skipped = [], []
    for n, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            examples.append(read_line(n, line, Path(w["folder"]), w["sizes"], w["seed"], w["val_fraction"]))
        except Skip as e:
            skipped.append(f"line {n + 1}: {e}")
    codes = [None] * len(examples)
    for size in {ex[1].size for ex in examples}:  # one batch per image size
        idx = [j for j, ex in enumerate(examples) if ex[1].size == size]
        for j, c in zip(idx, encode([examples[j][1] for j in idx])):
            codes[j] = c
    made = [S.make_example(w["tokenizer"], w["layout"], text, c, drop_text=drop)
            for (text, _, drop, _, _), c in zip(examples, codes)]
    buf = io.BytesIO()
    np.savez(buf, ids=np.concatenate([i for i, _ in made] or [np.zeros(0, np.int32)]),
             mask=np.concatenate([m for _, m in made] or [np.zeros(0, np.uint8)]),
             lengths=np.array([len(i) for i, _ in made], np.int64),
             split=np.array([SPLITS.index(ex[3]) for ex in examples], np.uint8),
             kind=np.array([KINDS.index(ex[4]) for ex in examples], np.uint8),
             size=np.array([ex[1].size for ex in examples], np.int32).reshape(-1, 2),  # (n, 2) w, h
             skipped=np.array(json.dumps(skipped)))
    write_atomic(part_path(w["parts"], k), buf.getvalue())
    return len(lines), skipped


def part_path(parts, k):
    return Path(parts) / f"part-{k:06d}.npz"


def run_chunks(tasks, cfg, workers, device):
    """Yield (lines, skipped) per chunk as chunks finish: in this process if workers == 1, else in
    `workers` processes, one GPU each in turn when device is "cuda". A worker that dies (killed for
    memory, say) stops the run with BrokenProcessPool instead of hanging it; rerun to resume."""
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    devices = [f"cuda:{i % gpus}" for i in range(workers)] if gpus else [device] * workers
    if workers <= 1:
        init_worker(cfg, devices[0])
        yield from map(process_chunk, tasks)
        return
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    queue = ctx.Queue()
    for d in devices:
        queue.put(d)
    threads = max(1, (os.cpu_count() or 1) // workers)  # CPU workers share the cores, not oversubscribe
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(cfg, queue, threads))
    try:
        for done in as_completed([pool.submit(process_chunk, t) for t in tasks]):
            yield done.result()
    finally:
        pool.shutdown(cancel_futures=True)

# -----------------------------------------------------------------------------
# Assembly: the parts in chunk order -> shards, counts and the per-bucket summary


def assemble(out, parts, n_chunks):
    tokens, counts, buckets, skipped = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), {}, []
    with S.ShardWriter(str(out), "train") as train, S.ShardWriter(str(out), "val") as val:
        writers = dict(zip(SPLITS, (train, val)))
        for k in range(n_chunks):
            with np.load(part_path(parts, k)) as part:
                p = {name: part[name] for name in part.files}
            ends = np.cumsum(p["lengths"])
            for a, b, s, kind, (w, h) in zip(ends - p["lengths"], ends, p["split"], p["kind"], p["size"]):
                split, key = SPLITS[s], f"{KINDS[kind]} {w}x{h}"
                writers[split].add(p["ids"][a:b], p["mask"][a:b])
                counts[split] += 1
                tokens[split] += int(b - a)
                bucket = buckets.setdefault(key, {"examples": 0, "tokens": 0})
                bucket["examples"] += 1
                bucket["tokens"] += int(b - a)
            skipped += json.loads(str(p["skipped"]))
    return counts, tokens, dict(sorted(buckets.items())), skipped


def main(argv=None):
    p = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),  # what + manifest format
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="JSONL, one example a line (format above)")
    p.add_argument("--codec", required=True, help="official MoVQGAN checkpoint (movqgan_270M.ckpt) or our codec folder")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json: the official checkpoint's (official layout) or ours")
    p.add_argument("--out_dir", required=True, help="one folder per stage resolution, e.g. data/images/stage1_256")
    p.add_argument("--target_size", type=int, default=768, help="bucket area target_size^2 pixels; "
                   "256/512/768 for stages 1/2/3 (official pre_tokenize default 768)")
    p.add_argument("--val_fraction", type=float, default=0.01, help="share of lines held out for val")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes; 1 runs in this one")
    p.add_argument("--chunk_size", type=int, default=256, help="manifest lines per part file (the unit of resume)")
    p.add_argument("--batch_size", type=int, default=16, help="images per codec call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help='"cuda" gives each worker a GPU in turn; "cuda:1" puts them all on one')
    p.add_argument("--force", action="store_true", help="rebuild even if meta.json says the shards are current")
    args = p.parse_args(argv)

    out, manifest = Path(args.out_dir), Path(args.manifest)
    for what, path in (("manifest", manifest), ("codec", args.codec), ("tokenizer", args.tokenizer)):
        if not Path(path).exists():
            raise SystemExit(f"no {what} at {path}: pass --{what}=PATH (see --help)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={args.device} but CUDA is not available here; use --device=cpu")
    out.mkdir(parents=True, exist_ok=True)
    tok_path, meta_path, parts = out / "tokenizer.json", out / "meta.json", out / "parts"
    if Path(args.tokenizer).resolve() != tok_path.resolve():
        shutil.copyfile(args.tokenizer, tok_path)
    settings = {k: getattr(args, k) for k in ("target_size", "val_fraction", "seed", "chunk_size")}
    settings.update(manifest_sha256=fingerprint(manifest), codec_sha256=fingerprint(args.codec),
                    tokenizer_sha256=fingerprint(tok_path))
    if meta_path.exists() and not args.force and json.loads(meta_path.read_text()).get("settings") == settings:
        shutil.rmtree(parts, ignore_errors=True)
        print(f"{out}: shards are up to date with these settings (use --force to rebuild)")
        return

    tokenizer, n_embed = S.Tokenizer.from_file(str(tok_path)), MoVQGAN.from_pretrained(args.codec).config.n_embed
    try:
        layout = S.TokenLayout.official(tokenizer)
    except ValueError:  # not the official ids: our reduced-scale layout
        layout = S.TokenLayout.ours(tokenizer, n_embed)
    if n_embed != layout.codebook_size:
        raise SystemExit(f"the codec has {n_embed} codes but this tokenizer's layout {layout.codebook_size}: "
                         "the official tokenizer goes with the official 270M codec")
    if args.target_size % layout.size_unit:
        raise SystemExit(f"--target_size {args.target_size} is not a multiple of {layout.size_unit}; try 256, 512 or 768")
    sizes = {panels: bucket_sizes(args.target_size, panels, layout.size_unit) for panels in (1, 2)}
    longest = max(max(w, panels * h) for panels, ss in sizes.items() for w, h in ss)  # pixels
    if longest > layout.size_unit * len(layout.size_token_ids):
        raise SystemExit(f"--target_size {args.target_size} makes image sides up to {longest} px, but the tokenizer "
                         f"has size tokens up to {layout.size_unit * len(layout.size_token_ids)} px")

    meta_path.unlink(missing_ok=True)  # from here on the folder is not a finished build
    if args.force:
        shutil.rmtree(parts, ignore_errors=True)
    stamp = parts / "settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) != settings:
        print(f"{parts} holds parts of a run with other settings: starting over")
        shutil.rmtree(parts)
    parts.mkdir(exist_ok=True)
    write_atomic(stamp, json.dumps(settings).encode())

    lines = manifest.read_text(encoding="utf-8").split("\n")  # not splitlines(): captions may hold U+2028
    if lines[-1] == "":
        lines.pop()
    C, n_chunks = args.chunk_size, -(-len(lines) // args.chunk_size)
    tasks = [(k, k * C, lines[k * C:(k + 1) * C]) for k in range(n_chunks) if not part_path(parts, k).exists()]
    done = len(lines) - sum(len(t[2]) for t in tasks)
    if done:
        print(f"resuming: {n_chunks - len(tasks)} of {n_chunks} parts already done")
    cfg = dict(codec=str(args.codec), tokenizer=str(tok_path), layout=layout.to_dict(), sizes=sizes,
               folder=str(manifest.parent), parts=str(parts), seed=args.seed, val_fraction=args.val_fraction,
               batch_size=args.batch_size)
    progress, t0 = tqdm(total=len(lines), initial=done, desc="examples", unit="ex", smoothing=0.1), time.time()
    for n_lines, skipped in run_chunks(tasks, cfg, args.workers, args.device):
        progress.update(n_lines)
        for message in skipped:
            progress.write(f"skipped {message}")
    progress.close()
    elapsed = time.time() - t0

    counts, tokens, buckets, skipped = assemble(out, parts, n_chunks)
    write_atomic(out / "skipped.txt", "".join(f"{m}\n" for m in skipped).encode())
    meta = {"vocab_size": layout.vocab_size, "layout": layout.to_dict(), "tokenizer": "tokenizer.json",
            "codec": str(args.codec), "counts": dict(counts, tokens=tokens, skipped=len(skipped)),
            "buckets": buckets, "target_size": args.target_size, "settings": settings}
    write_atomic(meta_path, json.dumps(meta, indent=1).encode())  # written last: the build is finished
    shutil.rmtree(parts)
    ran = len(lines) - done
    print(f"{sum(counts.values())} examples (train {counts['train']}, val {counts['val']}), {len(skipped)} skipped "
          f"(skipped.txt); {ran} lines in {elapsed:.1f}s ({ran / max(elapsed, 1e-9):.1f} ex/s) -> {out}\n"
          f"{'bucket':>16} {'examples':>9} {'tokens':>13}")
    for key, b in buckets.items():
        print(f"{key:>16} {b['examples']:>9} {b['tokens']:>13,}")
    if counts["val"] == 0:
        print("note: the val split is empty and train.py evaluates on it; raise --val_fraction")


if __name__ == "__main__":
    main()
