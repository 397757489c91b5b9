"""Build token shards from your own images (docs/tokens.md §3, §5-§7): a JSONL manifest of captioned images
and image pairs -> official resolution buckets -> codec -> Uni-Rep + task template -> the shards and
meta.json train.py reads, in place of the official pre_tokenize.py; not a downloader, captioner or filter.
A rerun of a killed run keeps its finished parts; every random choice comes from (seed, line number).

Manifest, one example a line, paths relative to its folder; upper panel = condition = "ref" (Figure 3):
  {"image": "cats/001.jpg", "caption": "a cat on a sofa"}                                 T2I
  {"task": "edge", "ref": "edges/001.png", "image": "cats/001.jpg", "caption": "..."}    dual panel
Tasks: sequence.TASKS; "subject" lines need "subject", "dense" lines may name a "dense_map". Bad lines
are skipped and listed in skipped.txt.

  python -m data.images.prepare --manifest=my/train.jsonl --codec=movqgan_270M.ckpt --workers=8 \\
      --tokenizer=Lumina-mGPT-2.0/tokenizer.json --target_size=256 --out_dir=data/images/stage1_256
"""
import codecs
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from tqdm import tqdm

import sequence as S
from checkpoint import atomic_write, read_tokenizer
from configurator import check_device, check_out_dir, check_ranges, configure, run_main
from data.shapes.prepare import UNSIZED_T2I, fingerprint
from data.shards import ShardWriter, remove_temp_files
from vq import MoVQGAN, center_crop, pil_to_tensor

MAX_RATIO = 4.0  # official generate_crop_size_list(max_ratio=4.0) (docs/tokens.md §3)
SPLITS = ("train", "val")
PART = "part-{:06d}.pkl"  # parts/PART.format(k): chunk k, done
SETTINGS = dict(  # --key=value; --help lists them
    manifest="", codec="", tokenizer="", out_dir="",  # required: JSONL; official movqgan_270M.ckpt or our codec
    #   folder; the official release's tokenizer.json (official layout) or ours; one folder per stage resolution
    target_size=768,      # bucket area target_size^2 px: 256/512/768 for stages 1/2/3 (official default 768)
    val_fraction=0.01, seed=0,
    workers=1, batch_size=16,  # processes (1: this one); images per codec call
    threads=0,            # torch CPU threads per process; 0: the cores shared among the workers
    chunk_size=256,       # manifest lines per part file: the unit of resume
    device="cuda" if torch.cuda.is_available() else "cpu",  # "cuda": each worker a GPU in turn; "cuda:1": all on one
    force=False)          # rebuild even if meta.json says the shards are current


def bucket_sizes(target_size, panels=1, unit=32):
    """Panel sizes (w, h) in pixels in the order the official generate_crop_size_list walks them: for each
    width w, heights budget // (w + 1) to budget // w, so only near-full buckets of budget grids, aspect
    ratio <= 4. Dual panels (ours): half the grids each, stacked ratio <= 4."""
    budget = (target_size // unit) ** 2 // panels  # grids per panel
    grids = [(w, h) for w in range(budget, 0, -1) for h in range(max(1, budget // (w + 1)), budget // w + 1)]
    return [(w * unit, h * unit) for w, h in grids if max(w, panels * h) <= MAX_RATIO * min(w, panels * h)]


def choose_bucket(width, height, sizes):
    """Official var_center_crop: the bucket keeping the largest share of the image resized to cover it
    (smaller over larger scale factor); ties go to the wider, then the taller."""
    return max(sizes, key=lambda s: (min(s[0] / width, s[1] / height) / max(s[0] / width, s[1] / height), s))


class Skip(Exception):
    """A manifest line that cannot become an example: logged and counted, never fatal."""


def open_image(path):
    """RGB, or RGBA when transparent: pil_to_tensor composites it on white after the crop (official order)."""
    if not path.exists():
        raise Skip(f"missing file {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGBA" if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info else "RGB")
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file is the data's fault
        raise Skip(f"unreadable image {path} ({type(e).__name__}: {str(e)[:120]})") from None


def read_line(n, line, folder, sizes, seed, val_fraction):
    """Line n (0-based, bytes) -> (split, bucket name, text, PIL image, drop_text), or raise Skip."""
    rng = random.Random(f"{seed}-{n}")  # three draws, always, whatever the line holds
    val, unsized, drop = (rng.random() < p for p in (val_fraction, UNSIZED_T2I, S.CFG_DROP_PROB))
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise Skip(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise Skip(f"not JSON ({e})") from None
    if not isinstance(row, dict):
        raise Skip("not a JSON object")
    task, caption = row.get("task", "t2i"), row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise Skip("no caption")
    if task not in S.TASKS:
        raise Skip(f"unknown task {task!r}; expected one of {S.TASKS}")
    needs = {"t2i": ("image",), "subject": ("image", "ref", "subject")}.get(task, ("image", "ref"))
    if missing := [f'"{key}"' for key in needs if not isinstance(row.get(key), str) or not row[key]]:
        raise Skip(f"a {task} line needs {' and '.join(missing)}")
    target = open_image(folder / row["image"])
    if task == "t2i":  # official: 10% size-free prompts, 10% text dropped for CFG (docs/tokens.md §5, §7)
        w, h = choose_bucket(*target.size, sizes[1])
        text = S.t2i_prompt(caption) if unsized else S.t2i_prompt(caption, w, h)
        return SPLITS[val], f"t2i {w}x{h}", text, center_crop(target, w, h), drop
    ref = open_image(folder / row["ref"])
    w, h = choose_bucket(*target.size, sizes[2])  # both panels take the target's bucket
    upper, lower = center_crop(ref, w, h), center_crop(target, w, h)
    if upper.mode != lower.mode:
        upper, lower = upper.convert("RGBA"), lower.convert("RGBA")
    text = S.task_prompt(task, caption, w, 2 * h, subject=row.get("subject"),
                         dense_map=row.get("dense_map", S.DENSE_MAPS["dense"]))
    return SPLITS[val], f"dual {w}x{2 * h}", text, S.stack_panels(upper, lower), False  # dropout: T2I only


_worker = {}  # per process: the settings, codec and tokenizer, loaded once by init_worker


def watch_parent(parent, parts):
    """In each pool process: when the parent dies (killed, even by SIGKILL), remove this process's temp
    files and exit, rather than encode on for no one (a thread, so it works wherever Python runs)."""
    while os.getppid() == parent:
        time.sleep(0.5)  # seconds
    remove_temp_files(parts, os.getpid())
    os._exit(1)


def init_worker(cfg, device, threads=None, parent=None):
    """device: a device string, or a queue handing each pool process its own (one GPU each); parent: the
    pid a pool process watches (watch_parent)."""
    if parent:
        threading.Thread(target=watch_parent, args=(parent, cfg["parts"]), daemon=True).start()
    device = device if isinstance(device, str) else device.get()
    if threads:
        torch.set_num_threads(threads)
    _worker.update(cfg, device=device, tokenizer=S.Tokenizer.from_file(cfg["tokenizer"]),
                   layout=S.TokenLayout(**cfg["layout"]), codec=MoVQGAN.from_pretrained(cfg["codec"]).to(device))


def process_chunk(task):
    """(k, first line number, lines) -> parts/PART: [(split, bucket, ids, mask)] and the skip messages."""
    (k, first, lines), w, examples, skipped, codes = task, _worker, [], [], {}
    for n, line in enumerate(lines, first):
        try:
            if line.strip():
                examples.append(read_line(n, line, Path(w["folder"]), w["sizes"], w["seed"], w["val_fraction"]))
        except Skip as e:
            skipped.append(f"line {n + 1}: {e}")
    for size in {ex[3].size for ex in examples}:  # codec calls of up to --batch_size images of one size
        idx = [j for j, ex in enumerate(examples) if ex[3].size == size]
        for batch in (idx[a:a + w["batch_size"]] for a in range(0, len(idx), w["batch_size"])):
            x = torch.stack([pil_to_tensor(examples[j][3]) for j in batch]).to(w["device"])  # (B, 3, H, W)
            codes.update(zip(batch, w["codec"].encode(x).cpu()))
    made = [(split, bucket, *S.make_example(w["tokenizer"], w["layout"], text, codes[j], drop_text=drop))
            for j, (split, bucket, text, _, drop) in enumerate(examples)]
    part = pickle.dumps((made, skipped))  # our own file, read back by assemble
    atomic_write(Path(w["parts"]) / PART.format(k), lambda path: path.write_bytes(part))
    return len(lines), skipped


def run_chunks(tasks, cfg, workers, device, threads):
    """Yield (lines, skipped) per chunk as chunks finish: here if workers == 1, else in `workers` processes,
    a GPU each in turn for "cuda"; a dying worker stops the run (BrokenProcessPool): rerun to resume."""
    if workers <= 1:
        init_worker(cfg, device, threads)
        yield from map(process_chunk, tasks)
        return
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    queue = ctx.Queue()
    for i in range(workers):
        queue.put(f"cuda:{i % gpus}" if gpus else device)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)  # CPU workers share the cores, not oversubscribe
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                               initargs=(cfg, queue, threads, os.getpid()))
    try:
        for done in as_completed([pool.submit(process_chunk, t) for t in tasks]):
            yield done.result()
    finally:
        pool.shutdown(cancel_futures=True)


def assemble(out, parts, n_chunks):
    """The parts in chunk order -> shards; returns the meta.json counts, per-bucket summary and skips."""
    writers, examples, tokens, skipped = {split: ShardWriter(out, split) for split in SPLITS}, Counter(), Counter(), []
    for k in range(n_chunks):
        made, skips = pickle.loads((parts / PART.format(k)).read_bytes())
        for split, bucket, ids, mask in made:
            writers[split].add(ids, mask)
            examples[bucket], tokens[bucket] = examples[bucket] + 1, tokens[bucket] + len(ids)
        skipped += skips
    for writer in writers.values():
        writer.close()
    counts = {split: len(w.offsets) - 1 for split, w in writers.items()}  # examples
    counts.update(tokens={split: w.offsets[-1] for split, w in writers.items()}, skipped=len(skipped))
    return counts, {key: {"examples": examples[key], "tokens": tokens[key]} for key in sorted(examples)}, skipped


def layout_and_buckets(tok_path, codec, target_size):
    """The official layout for the official tokenizer, else ours, checked against the codec; the buckets."""
    tokenizer, n_embed = read_tokenizer(tok_path), MoVQGAN.from_pretrained(codec).config.n_embed
    try:
        layout = S.TokenLayout.official(tokenizer)
    except ValueError:  # not the official ids: our reduced-scale layout
        layout = S.TokenLayout.ours(tokenizer, n_embed)
    if n_embed != layout.codebook_size:
        raise SystemExit(f"the codec has {n_embed} codes, this tokenizer's layout {layout.codebook_size}: "
                         "the official tokenizer goes with the official 270M codec")
    most = layout.size_unit * len(layout.size_token_ids)  # pixels
    sizes = {panels: bucket_sizes(target_size, panels, layout.size_unit)  # none past the size tokens: a huge
             for panels in (1, 2) if target_size <= most}                  # target would take minutes to walk
    longest = max((max(w, p * h) for p in sizes for w, h in sizes[p]), default=target_size)  # pixels
    if target_size % layout.size_unit or longest > most:
        raise SystemExit(f"--target_size {target_size}: not a multiple of {layout.size_unit}, or bucket sides "
                         f"({longest} px) beyond the size tokens ({most} px); try 256, 512 or 768")
    return layout, sizes


def check_args(args):
    """Every setting and input file, before anything is written (docs/checkpoints.md §4)."""
    for what in ("manifest", "codec", "tokenizer", "out_dir"):
        if not getattr(args, what) or (what != "out_dir" and not Path(getattr(args, what)).exists()):
            raise SystemExit(f"no {what} at {getattr(args, what)!r}: pass --{what}=PATH (see --help)")
    if not Path(args.manifest).is_file():
        raise ValueError(f"--manifest={args.manifest} is a folder; pass the JSONL file")
    check_ranges(vars(args), positive=("target_size", "workers", "batch_size", "chunk_size"),
                 non_negative=("threads",), fraction=("val_fraction",))
    check_device(args.device)
    check_out_dir(args.out_dir)


def read_manifest(path):
    """Its lines as bytes: one that is not UTF-8 is skipped later like any bad line; a UTF-8 BOM is dropped."""
    data = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8).removesuffix(b"\n")
    lines = data.split(b"\n")  # on "\n" alone, not splitlines(): a caption may hold U+2028
    if not any(line.strip() for line in lines):
        raise ValueError(f"manifest {path} has no lines; one JSON object a line, see --help")
    return lines


def main(argv=None):
    args = SimpleNamespace(**configure(sys.argv[1:] if argv is None else argv, SETTINGS, __doc__))
    check_args(args)
    out, manifest, C = Path(args.out_dir), Path(args.manifest), args.chunk_size
    tok_path, meta_path, parts = out / "tokenizer.json", out / "meta.json", out / "parts"
    stamp = parts / "settings.json"  # the settings the parts were made with
    lines = read_manifest(manifest)
    layout, sizes = layout_and_buckets(args.tokenizer, args.codec, args.target_size)  # before writing anything
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)  # a killed run's
    if Path(args.tokenizer).resolve() != tok_path.resolve():
        shutil.copyfile(args.tokenizer, tok_path)
    settings = {k: getattr(args, k) for k in ("target_size", "val_fraction", "seed", "chunk_size")}
    settings.update(manifest_sha256=fingerprint(manifest), codec_sha256=fingerprint(args.codec),
                    tokenizer_sha256=fingerprint(tok_path))
    if meta_path.exists() and not args.force and json.loads(meta_path.read_text()).get("settings") == settings:
        shutil.rmtree(parts, ignore_errors=True)
        return print(f"{out}: shards are up to date with these settings (use --force to rebuild)")
    meta_path.unlink(missing_ok=True)  # from here on the folder is not a finished build
    if args.force or stamp.exists() and json.loads(stamp.read_text()) != settings:
        shutil.rmtree(parts, ignore_errors=True)  # parts of a run with other settings: start over
    parts.mkdir(exist_ok=True)
    atomic_write(stamp, lambda path: path.write_bytes(json.dumps(settings).encode()))
    n_chunks = -(-len(lines) // C)
    tasks = [(k, k * C, lines[k * C:(k + 1) * C]) for k in range(n_chunks) if not (parts / PART.format(k)).exists()]
    if done := len(lines) - sum(len(t[2]) for t in tasks):
        print(f"resuming: {n_chunks - len(tasks)} of {n_chunks} parts already done")
    cfg = dict(vars(args), layout=layout.to_dict(), sizes=sizes, parts=str(parts), folder=str(manifest.parent))
    with tqdm(total=len(lines), initial=done, desc="examples", unit="ex", smoothing=0.1) as progress:
        for n_lines, skipped in run_chunks(tasks, cfg, args.workers, args.device, args.threads):
            progress.update(n_lines)
            for message in skipped:
                progress.write(f"skipped {message}")
    counts, buckets, skipped = assemble(out, parts, n_chunks)
    atomic_write(out / "skipped.txt", lambda path: path.write_bytes("".join(f"{m}\n" for m in skipped).encode()))
    if counts["train"] == 0:  # no meta.json: train.py would find no example to draw
        raise ValueError(f"no line of {manifest} made a training example ({len(skipped)} skipped: {out}/skipped.txt)")
    meta = {"vocab_size": layout.vocab_size, "layout": layout.to_dict(), "tokenizer": "tokenizer.json",
            "codec": str(args.codec), "counts": counts, "buckets": buckets, "target_size": args.target_size,
            "settings": settings}
    atomic_write(meta_path, lambda path: path.write_bytes(json.dumps(meta, indent=1).encode()))  # last: finished
    shutil.rmtree(parts)
    print(f"train {counts['train']}, val {counts['val']}, {len(skipped)} skipped (skipped.txt) -> {out}"
          + "".join(f"\n{key:>16} {b['examples']:>9} {b['tokens']:>13,}" for key, b in buckets.items()))
    if counts["val"] == 0:
        print("note: the val split is empty and train.py evaluates on it; raise --val_fraction")


if __name__ == "__main__":
    run_main(main)
