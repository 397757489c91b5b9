"""
Build the shapes world's token shards: T2I examples of the six categories and dual-panel examples of
the five task families, encoded by a trained codec and laid out as the official pre-tokenizer does
(docs/tokens.md §3-§7, docs/shapes.md). Into --out_dir: tokenizer.json (trained on the prompts if
absent), {train,val} shards (data/shards.py), the held-out eval set eval_prompts.jsonl + eval_refs/
(docs/shapes.md §5, §6) and meta.json, last. Example i comes from its own seed (seed, i); a rerun with
the same settings, codec and tokenizer does nothing. Not a codec or tokenizer trainer, nor train.py.

  python -m data.shapes.prepare --codec=out/vq_shapes --n=60000 --out_dir=data/shapes
"""
import hashlib
import json
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

import sequence as S
import shapes as W
from checkpoint import atomic_write, read_tokenizer
from configurator import check_device, check_out_dir, check_ranges, configure, run_main
from data.shards import ShardWriter, read_meta, remove_temp_files
from vq import MoVQGAN, pil_to_tensor

KINDS = W.CATEGORIES + W.TASK_FAMILIES + ("pair",) + W.EXTRA_TASKS  # EXTRA_TASKS only when --mix names them
# ~57% T2I, 38% tasks, 5% image pairs (edge/depth/dense map drawn from text): the paper gives no multi-task
# proportions; these keep T2I, the headline, first.
DEFAULT_MIX = ",".join([f"{c}=0.1" for c in W.CATEGORIES] + [f"{t}=0.08" for t in W.TASK_FAMILIES] + ["pair=0.05"])
UNSIZED_T2I = 0.1  # official pre_tokenize: 10% of T2I prompts omit "of {w}x{h}" (docs/tokens.md §5)
TOKENIZER_SAMPLE = 5000  # examples whose prompts train the tokenizer; the prompt language is small
SETTINGS = dict(  # --key=value; --help lists them
    codec="",  # required: our codec folder (train_vq.py) or an official MoVQGAN checkpoint
    tokenizer="",  # tokenizer.json to use; default: out_dir/tokenizer.json, trained if absent
    n=60000, val_fraction=0.02, out_dir="data/shapes", seed=0,  # n: examples in all, train + val
    size=W.PANEL, vocab_size=1024,  # panel side in pixels (a multiple of 32); a new tokenizer's text vocabulary
    mix=DEFAULT_MIX,  # kind=weight,... over the categories and task families
    eval_per_task=W.EVAL_PER_CATEGORY,  # eval pairs a task
    panelwise=True,  # encode each panel of a dual panel alone, as a --ref is at sampling (docs/codec.md §7)
    batch_size=64, threads=0,  # images per codec call; torch CPU threads (0: torch's default)
    device="cuda" if torch.cuda.is_available() else "cpu",
    force=False)  # rebuild even if meta.json says the shards are current


def parse_mix(text):
    pairs = [part.partition("=")[::2] for part in text.split(",")]
    if unknown := [kind for kind, _ in pairs if kind not in KINDS]:
        raise SystemExit(f"--mix: unknown kind {unknown[0]!r}; use {', '.join(KINDS)}")
    try:
        mix = {kind: float(weight) for kind, weight in pairs}
    except ValueError:
        raise SystemExit(f"--mix={text}: expected kind=weight,... with numbers as weights") from None
    if min(mix.values()) < 0 or not sum(mix.values()) > 0:
        raise SystemExit(f"--mix={text}: weights must be >= 0, and not all 0")
    return mix


def val_count(n, val_fraction):  # examples in the val split: the last of the n
    return max(1, round(n * val_fraction))


def example(i, seed, mix, size):
    """Example i: (kind, prompt text, PIL image: one panel for T2I, upper over lower otherwise, drop_text)."""
    rng = random.Random(f"{seed}-{i}")
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind in W.CATEGORIES:
        image, spec = W.make_t2i(rng, kind, size=size)
        text = S.t2i_prompt(spec["prompt"], *(() if rng.random() < UNSIZED_T2I else (size, size)))
        return kind, text, image, rng.random() < S.CFG_DROP_PROB
    if kind == "pair":  # both panels from the text alone: the official image-pair mode (docs/tokens.md §5)
        task = rng.choice(S.PAIR_TASKS)
        upper, lower, spec = W.make_pair(rng, task, size=size)
        text = S.pair_prompt(task, spec["prompt"], size, 2 * size)
    else:
        upper, lower, spec = W.make_task(rng, kind, size=size)
        text = S.task_prompt(kind, spec["prompt"], size, 2 * size, subject=spec.get("subject"),
                             dense_map=spec.get("dense_map"))
    return kind, text, S.stack_panels(upper, lower), rng.random() < S.CFG_DROP_PROB


def encode_examples(batch, codec, tokenizer, layout, device, panelwise):
    """[(kind, text, image, drop_text)] -> [(ids, loss_mask)], one codec call per image size (per panel with
    panelwise: a dual panel's upper and lower halves each encoded alone)."""
    codes = {}
    for size in {image.size for _, _, image, _ in batch}:
        idx = [k for k, (_, _, image, _) in enumerate(batch) if image.size == size]
        x = torch.stack([pil_to_tensor(batch[k][2]) for k in idx]).to(device)  # (B, 3, H, W)
        with torch.no_grad():
            codes.update(zip(idx, codec.encode(x, 2 if panelwise and size[1] == 2 * size[0] else 1).cpu()))
    return [S.make_example(tokenizer, layout, text, codes[k], drop_text=drop)
            for k, (_, text, _, drop) in enumerate(batch)]


class Stream(torch.utils.data.Dataset):
    """Fresh examples for train.py's data_stream (docs/training.md §1): item j is the j-th micro-batch,
    `batch_size` examples each drawn from its own seed ("stream<seed>", index), so no example is ever
    seen twice and a resumed run sees the same data. The codec loads on first use: a DataLoader worker
    holds its own. Val stays the shards' fixed split."""
    def __init__(self, folder, mix, batch_size, seed):
        meta, self.layout = read_meta(folder)
        if not isinstance(meta.get("settings"), dict) or not Path(meta.get("codec", "")).exists():
            raise ValueError(f"data_stream needs {folder} built by data/shapes/prepare.py with its codec at hand "
                             f"(meta.json codec: {meta.get('codec')!r}); rebuild it or turn data_stream off")
        self.mix, self.size = parse_mix(mix or meta["settings"]["mix"]), meta["settings"]["size"]
        self.tokenizer, self.codec_path = read_tokenizer(Path(folder) / meta["tokenizer"]), meta["codec"]
        self.batch_size, self.seed, self.codec = batch_size, f"stream{seed}", None
        self.panelwise = meta["settings"].get("panelwise", False)

    def __getitem__(self, j):
        if self.codec is None:
            self.codec = MoVQGAN.from_pretrained(self.codec_path).eval()
        batch = [example(j * self.batch_size + k, self.seed, self.mix, self.size) for k in range(self.batch_size)]
        return encode_examples(batch, self.codec, self.tokenizer, self.layout, "cpu", self.panelwise)


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn for Stream: a SIGTERM or Ctrl-C sent to the whole process group (a
    scheduler's pre-emption, a terminal) must not kill the workers, or the trainer dies of a dead worker
    before it can finish its step and save. The trainer stops them when it closes the loader."""
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, signal.SIG_IGN)


def fingerprint(path):
    """sha256 of a file, or of a folder's files in name order: what makes two runs the same run."""
    h, path = hashlib.sha256(), Path(path)
    for f in sorted(path.iterdir()) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def write_shards(out, args, mix, tokenizer, layout, codec):
    """Examples 0..n-1 encoded a batch at a time (one codec call per panel size); the last
    val_fraction of them form the val split. -> (examples, tokens) per split."""
    n_val, writers = val_count(args.n, args.val_fraction), {s: ShardWriter(out, s) for s in ("train", "val")}
    for start in tqdm(range(0, args.n, args.batch_size), desc="batches"):
        batch = [example(i, args.seed, mix, args.size) for i in range(start, min(start + args.batch_size, args.n))]
        for k, (ids, mask) in enumerate(encode_examples(batch, codec, tokenizer, layout, args.device, args.panelwise)):
            split = "val" if start + k >= args.n - n_val else "train"
            writers[split].add(ids, mask, kind=KINDS.index(batch[k][0]))
    for w in writers.values():
        w.close()
    return {s: len(w.offsets) - 1 for s, w in writers.items()}, {s: w.offsets[-1] for s, w in writers.items()}


def main(argv=None):
    args = SimpleNamespace(**configure(sys.argv[1:] if argv is None else argv, SETTINGS, __doc__))
    out, mix = Path(args.out_dir), parse_mix(args.mix)
    if not args.codec or not Path(args.codec).exists():
        raise SystemExit(f"no codec at {args.codec!r}: train one with `python train_vq.py "
                         f"--out_dir={args.codec or 'out/vq_shapes'}` or pass --codec=PATH")
    if args.tokenizer and not Path(args.tokenizer).exists():
        raise SystemExit(f"no tokenizer at {args.tokenizer}: leave out --tokenizer to train one into {out}")
    check_ranges(vars(args), positive=("n", "size", "vocab_size", "batch_size"),
                 non_negative=("eval_per_task", "threads"), fraction=("val_fraction",))
    if args.size % 32:
        raise ValueError(f"--size={args.size}: must be a multiple of 32 px (the size tokens); try 64")
    if args.n - val_count(args.n, args.val_fraction) < 1:
        raise ValueError(f"--n={args.n} with --val_fraction={args.val_fraction} leaves no training example; raise --n")
    check_device(args.device)
    check_out_dir(args.out_dir)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    codec = MoVQGAN.from_pretrained(args.codec)  # a damaged codec or tokenizer fails now, before any writing
    if args.tokenizer:
        read_tokenizer(args.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)  # a killed run's
    tok_path = out / "tokenizer.json"  # given, or already next to the shards, or trained on this run's prompts
    if args.tokenizer and Path(args.tokenizer).resolve() != tok_path.resolve():
        shutil.copyfile(args.tokenizer, tok_path)
    if not tok_path.exists():
        texts = [example(i, args.seed, mix, args.size)[1] for i in tqdm(range(min(args.n, TOKENIZER_SAMPLE)))]
        S.train_tokenizer(texts + [s["prompt"] for s in W.eval_t2i_specs()], str(tok_path), args.vocab_size)
    settings = {k: getattr(args, k) for k in ("n", "size", "val_fraction", "mix", "seed", "eval_per_task", "panelwise")}
    settings.update(codec_sha256=fingerprint(args.codec), tokenizer_sha256=fingerprint(tok_path))
    meta_path = out / "meta.json"
    if meta_path.exists() and not args.force and json.loads(meta_path.read_text()).get("settings") == settings:
        return print(f"{out}: shards are up to date with these settings (use --force to rebuild)")

    tokenizer, codec = read_tokenizer(tok_path), codec.to(args.device)
    layout = S.TokenLayout.ours(tokenizer, codec.config.n_embed)
    meta_path.unlink(missing_ok=True)  # from here on the folder is not a finished build
    t0 = time.time()
    counts, tokens = write_shards(out, args, mix, tokenizer, layout, codec)
    elapsed = time.time() - t0
    tasks = W.TASK_FAMILIES + tuple(t for t in W.EXTRA_TASKS if t in mix)  # an extra task is judged when trained
    specs = W.write_eval_set(out, args.eval_per_task, args.size, tasks)  # the held-out eval set (docs/shapes.md §6)
    meta = {"vocab_size": layout.vocab_size, "layout": layout.to_dict(), "tokenizer": "tokenizer.json", "kinds": KINDS,
            "codec": str(args.codec), "counts": dict(counts, tokens=tokens, eval_prompts=len(specs)),
            "panel": args.size, "settings": settings}
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))  # last: the build is whole
    print(f"{args.n} examples in {elapsed:.0f}s ({args.n / elapsed:.0f}/s): train {tokens['train']:,} tokens, "
          f"val {tokens['val']:,} tokens, vocab {layout.vocab_size}, {len(specs)} eval prompts -> {out}")


if __name__ == "__main__":
    run_main(main)
