"""
Build the shapes world's token shards: T2I examples of the six categories and dual-panel examples of
the five task families, encoded by a trained codec and laid out as the official pre-tokenizer does
(docs/tokens.md §3-§7, docs/shapes.md). Into --out_dir: tokenizer.json (trained on the prompts if
absent), {train,val} shards (data/shards.py), the held-out eval set eval_prompts.jsonl + eval_refs/
(docs/shapes.md §5) and meta.json, last. Not a codec or tokenizer trainer, nor the trainer (train.py).

  python -m data.shapes.prepare --codec=out/vq_shapes --n=60000 --out_dir=data/shapes
Example i comes from its own seed (seed, i): a run is deterministic, and a rerun with the same
settings, codec and tokenizer finds meta.json up to date and does nothing (--force redoes it).
"""
import argparse
import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

import sequence as S
import shapes as W
from checkpoint import atomic_write
from data.shards import ShardWriter
from vq import MoVQGAN, pil_to_tensor

# 60% T2I, 40% tasks: the paper gives no multi-task proportions; these keep T2I, the headline, first.
DEFAULT_MIX = ",".join([f"{c}=0.1" for c in W.CATEGORIES] + [f"{t}=0.08" for t in W.TASK_FAMILIES])
UNSIZED_T2I = 0.1  # official pre_tokenize: 10% of T2I prompts omit "of {w}x{h}" (docs/tokens.md §5)
TOKENIZER_SAMPLE = 5000  # examples whose prompts train the tokenizer; the prompt language is small


def parse_mix(text):
    mix = {}
    for kind, _, weight in (part.partition("=") for part in text.split(",")):
        if kind not in W.CATEGORIES + W.TASK_FAMILIES:
            raise SystemExit(f"--mix: unknown kind {kind!r}; use {', '.join(W.CATEGORIES + W.TASK_FAMILIES)}")
        mix[kind] = float(weight)
    return mix


def example(i, seed, mix, size, held_out=W.HeldOut()):
    """Example i: (prompt text, PIL image: one panel for T2I, upper over lower for tasks, drop_text)."""
    rng = random.Random(f"{seed}-{i}")
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind in W.CATEGORIES:
        image, spec = W.make_t2i(rng, kind, held_out, size)
        text = S.t2i_prompt(spec["prompt"], *(() if rng.random() < UNSIZED_T2I else (size, size)))
    else:
        upper, lower, spec = W.make_task(rng, kind, held_out, size)
        image = S.stack_panels(upper, lower)
        text = S.task_prompt(kind, spec["prompt"], size, 2 * size, subject=spec.get("subject"),
                             dense_map=spec.get("dense_map"))
    return text, image, rng.random() < S.CFG_DROP_PROB


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
    n_val, tokens = max(1, round(args.n * args.val_fraction)), {"train": 0, "val": 0}
    writers = {split: ShardWriter(out, split) for split in tokens}
    for start in tqdm(range(0, args.n, args.batch_size), desc="batches"):
        batch = [example(i, args.seed, mix, args.size) for i in range(start, min(start + args.batch_size, args.n))]
        codes = {}
        for size in {im.size for _, im, _ in batch}:
            idx = [k for k, (_, im, _) in enumerate(batch) if im.size == size]
            x = torch.stack([pil_to_tensor(batch[k][1]) for k in idx]).to(args.device)  # (B, 3, H, W)
            codes.update(zip(idx, codec.encode(x).cpu()))
        for k, (text, _, drop) in enumerate(batch):
            split = "val" if start + k >= args.n - n_val else "train"
            ids, mask = S.make_example(tokenizer, layout, text, codes[k], drop_text=drop)
            writers[split].add(ids, mask)
            tokens[split] += len(ids)
    for w in writers.values():
        w.close()
    return {"train": args.n - n_val, "val": n_val}, tokens


def write_eval_set(out_dir, size, per_task):
    """Held-out prompts only (docs/shapes.md §6): T2I specs plus task specs whose upper panels are PNGs."""
    (out_dir / "eval_refs").mkdir(exist_ok=True)
    specs = W.eval_t2i_specs()
    for k, (upper, _, spec) in enumerate(W.eval_task_pairs(per_task, size=size)):
        specs.append(dict(spec, ref=f"eval_refs/{spec['task']}_{k:03d}.png"))  # relative to the JSONL
        upper.save(out_dir / specs[-1]["ref"])
    W.write_prompt_set(out_dir / "eval_prompts.jsonl", specs)
    return len(specs)


def arguments(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", required=True, help="our codec folder (train_vq.py) or an official MoVQGAN checkpoint")
    p.add_argument("--n", type=int, default=60000, help="examples in all, train + val")
    p.add_argument("--out_dir", default="data/shapes")
    p.add_argument("--tokenizer", help="tokenizer.json to use; default: out_dir/tokenizer.json, trained if absent")
    p.add_argument("--vocab_size", type=int, default=1024, help="text vocabulary of a newly trained tokenizer")
    p.add_argument("--size", type=int, default=W.PANEL, help="panel side in pixels (a multiple of 32)")
    p.add_argument("--val_fraction", type=float, default=0.02)
    p.add_argument("--mix", default=DEFAULT_MIX, help="kind=weight,... over the T2I categories and task families")
    p.add_argument("--eval_per_task", type=int, default=16, help="eval pairs per task family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64, help="images per codec call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force", action="store_true", help="rebuild even if meta.json says the shards are current")
    return p.parse_args(argv)


def main(argv=None):
    args = arguments(argv)
    out, mix = Path(args.out_dir), parse_mix(args.mix)
    if not Path(args.codec).exists():
        raise SystemExit(f"no codec at {args.codec}: train one with `python train_vq.py "
                         f"--out_dir={args.codec}` or pass --codec=PATH")
    if args.tokenizer and not Path(args.tokenizer).exists():
        raise SystemExit(f"no tokenizer at {args.tokenizer}: leave out --tokenizer to train one into {out}")
    settings = {k: getattr(args, k) for k in ("n", "size", "val_fraction", "mix", "seed", "eval_per_task")}
    settings["codec_sha256"] = fingerprint(args.codec)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json"  # given, or already next to the shards, or trained on this run's prompts
    if args.tokenizer and Path(args.tokenizer).resolve() != tok_path.resolve():
        shutil.copyfile(args.tokenizer, tok_path)
    if not tok_path.exists():
        texts = [example(i, args.seed, mix, args.size)[0] for i in tqdm(range(min(args.n, TOKENIZER_SAMPLE)))]
        S.train_tokenizer(texts + [s["prompt"] for s in W.eval_t2i_specs()], str(tok_path), args.vocab_size)
    settings["tokenizer_sha256"] = fingerprint(tok_path)
    meta_path = out / "meta.json"
    if meta_path.exists() and not args.force and json.loads(meta_path.read_text()).get("settings") == settings:
        print(f"{out}: shards are up to date with these settings (use --force to rebuild)")
        return

    tokenizer, codec = S.Tokenizer.from_file(str(tok_path)), MoVQGAN.from_pretrained(args.codec).to(args.device)
    layout = S.TokenLayout.ours(tokenizer, codec.config.n_embed)
    meta_path.unlink(missing_ok=True)  # from here on the folder is not a finished build
    t0 = time.time()
    counts, tokens = write_shards(out, args, mix, tokenizer, layout, codec)
    elapsed, n_eval = time.time() - t0, write_eval_set(out, args.size, args.eval_per_task)
    meta = {"vocab_size": layout.vocab_size, "layout": layout.to_dict(), "tokenizer": "tokenizer.json",
            "codec": str(args.codec), "counts": dict(counts, tokens=tokens, eval_prompts=n_eval),
            "panel": args.size, "settings": settings}
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))  # last: the build is whole
    print(f"{args.n} examples in {elapsed:.0f}s ({args.n / elapsed:.0f}/s): train {tokens['train']:,} tokens, "
          f"val {tokens['val']:,} tokens, vocab {layout.vocab_size}, {n_eval} eval prompts -> {out}")


if __name__ == "__main__":
    main()
