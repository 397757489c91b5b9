"""
Build the token shards of the shapes world: T2I examples of the six GenEval-style categories and
dual-panel examples of the five task families, encoded by a trained codec and laid out exactly as
the official pre-tokenizer does (shared/specs/lumina_mgpt2.md §2, §6, §7; shared/specs/shapes.md).

What it writes into --out_dir (default data/shapes):
  tokenizer.json                        our byte-level BPE, trained on the prompts if absent
  {train,val}.{ids.bin,mask.bin,offsets.npy}   token shards (sequence.ShardWriter format)
  eval_prompts.jsonl + eval_refs/*.png   the held-out eval prompt set (T2I + task sets with refs)
  meta.json                             vocab size, token layout, counts, and the settings used
What it is not: a codec or tokenizer trainer beyond calling them, nor the trainer (train.py).

Run from the repo root, as a module (so the project's modules import without sys.path edits):
  python -m data.shapes.prepare --codec=out/vq_shapes --n=60000 --out_dir=data/shapes
Every example i is generated from its own seed (seed, i), so a run is deterministic; rerunning with
the same settings, codec and tokenizer finds meta.json up to date and does nothing (--force redoes it).
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

import sequence as S
import shapes as W
from vq import MoVQGAN, pil_to_tensor

# Default mix: 60% T2I spread over the six categories, 40% tasks spread over the five families
# (the paper does not give its multi-task proportions; these keep T2I, the headline task, first).
DEFAULT_MIX = ",".join([f"{c}=0.1" for c in W.CATEGORIES] + [f"{t}=0.08" for t in W.TASK_FAMILIES])
UNSIZED_T2I = 0.1  # official pre_tokenize: 10% of T2I prompts omit "of {w}x{h}" (spec §6)
TOKENIZER_SAMPLE = 5000  # examples whose prompts train the tokenizer; the prompt language is small


def parse_mix(text):
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
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
        unsized = rng.random() < UNSIZED_T2I
        text = S.t2i_prompt(spec["prompt"]) if unsized else S.t2i_prompt(spec["prompt"], size, size)
    else:
        upper, lower, spec = W.make_task(rng, kind, held_out, size)
        image = S.stack_panels(upper, lower)
        text = S.task_prompt(kind, spec["prompt"], size, 2 * size, subject=spec.get("subject"),
                             dense_map=spec.get("dense_map", "segmentation map"))
    return text, image, rng.random() < S.CFG_DROP_PROB


def encode(codec, images, batch_size):
    """PIL images of equal size -> list of code grids [h, w], in batches."""
    out, device = [], next(codec.parameters()).device
    for k in range(0, len(images), batch_size):
        x = torch.stack([pil_to_tensor(im) for im in images[k:k + batch_size]])  # (B, 3, H, W)
        out += list(codec.encode(x.to(device)).cpu())
    return out


def fingerprint(path):
    """sha256 of a file, or of a folder's files in name order: what makes two runs the same run."""
    h, path = hashlib.sha256(), Path(path)
    for f in sorted(path.iterdir()) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def write_eval_set(out_dir, size, per_task):
    """Held-out prompts only (shapes.md): T2I specs plus task specs whose upper panels are PNGs."""
    refs = out_dir / "eval_refs"
    refs.mkdir(exist_ok=True)
    specs = W.eval_t2i_specs()
    for k, (upper, _, spec) in enumerate(W.eval_task_pairs(per_task, size=size)):
        ref = f"eval_refs/{spec['task']}_{k:03d}.png"  # relative to the JSONL's folder
        upper.save(out_dir / ref)
        specs.append(dict(spec, ref=ref))
    W.write_prompt_set(out_dir / "eval_prompts.jsonl", specs)
    return len(specs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", required=True, help="our codec folder (vq.py) or an official MoVQGAN checkpoint")
    p.add_argument("--n", type=int, default=60000, help="examples in all, train + val")
    p.add_argument("--out_dir", default="data/shapes")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json to use; default: out_dir/tokenizer.json, trained if absent")
    p.add_argument("--vocab_size", type=int, default=1024, help="text vocabulary of a newly trained tokenizer")
    p.add_argument("--size", type=int, default=W.PANEL, help="panel side in pixels (a multiple of 32)")
    p.add_argument("--val_fraction", type=float, default=0.02)
    p.add_argument("--mix", default=DEFAULT_MIX, help="kind=weight,... over the T2I categories and task families")
    p.add_argument("--eval_per_task", type=int, default=16, help="eval pairs per task family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64, help="images per codec call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force", action="store_true", help="rebuild even if meta.json says the shards are current")
    args = p.parse_args(argv)

    out = Path(args.out_dir)
    if not Path(args.codec).exists():
        raise SystemExit(f"no codec at {args.codec}: train one with `python vq.py --config=shapes "
                         f"--out_dir={args.codec}` or pass --codec=PATH")
    if args.tokenizer and not Path(args.tokenizer).exists():
        raise SystemExit(f"no tokenizer at {args.tokenizer}: leave out --tokenizer to train one into {out}")
    mix, n_val = parse_mix(args.mix), max(1, round(args.n * args.val_fraction))
    settings = {k: getattr(args, k) for k in ("n", "size", "val_fraction", "mix", "seed", "eval_per_task")}
    settings["codec_sha256"] = fingerprint(args.codec)
    out.mkdir(parents=True, exist_ok=True)

    # tokenizer: given, or already next to the shards, or trained on a sample of this run's prompts
    tok_path = out / "tokenizer.json"
    if args.tokenizer and Path(args.tokenizer).resolve() != tok_path.resolve():
        shutil.copyfile(args.tokenizer, tok_path)
    if not tok_path.exists():
        texts = [example(i, args.seed, mix, args.size)[0] for i in tqdm(range(min(args.n, TOKENIZER_SAMPLE)),
                                                                         desc="tokenizer prompts")]
        texts += [s["prompt"] for s in W.eval_t2i_specs()]
        S.train_tokenizer(texts, str(tok_path), args.vocab_size)
    settings["tokenizer_sha256"] = fingerprint(tok_path)
    meta_path = out / "meta.json"
    if meta_path.exists() and not args.force and json.loads(meta_path.read_text()).get("settings") == settings:
        print(f"{out}: shards are up to date with these settings (use --force to rebuild)")
        return

    tokenizer = S.Tokenizer.from_file(str(tok_path))
    codec = MoVQGAN.from_pretrained(args.codec).to(args.device)
    layout = S.TokenLayout.ours(tokenizer, codec.config.n_embed)
    meta_path.unlink(missing_ok=True)  # from here on the folder is not a finished build
    writers = {split: S.ShardWriter(str(out), split) for split in ("train", "val")}
    tokens, t0 = {"train": 0, "val": 0}, time.time()
    progress = tqdm(total=args.n, desc="examples", unit="ex")
    for start in range(0, args.n, args.batch_size):
        batch = [example(i, args.seed, mix, args.size) for i in range(start, min(start + args.batch_size, args.n))]
        codes = [None] * len(batch)
        for shape in {im.size for _, im, _ in batch}:  # one codec call per image size (single / dual)
            idx = [k for k, (_, im, _) in enumerate(batch) if im.size == shape]
            for k, c in zip(idx, encode(codec, [batch[k][1] for k in idx], args.batch_size)):
                codes[k] = c
        for k, (text, _, drop) in enumerate(batch):
            split = "val" if start + k >= args.n - n_val else "train"
            ids, mask = S.make_example(tokenizer, layout, text, codes[k], drop_text=drop)
            writers[split].add(ids, mask)
            tokens[split] += len(ids)
        progress.update(len(batch))
    progress.close()
    for w in writers.values():
        w.close()
    elapsed = time.time() - t0

    n_eval = write_eval_set(out, args.size, args.eval_per_task)
    meta = {"vocab_size": layout.vocab_size, "layout": layout.to_dict(), "tokenizer": "tokenizer.json",
            "codec": str(args.codec), "counts": {"train": args.n - n_val, "val": n_val, "tokens": tokens,
                                                 "eval_prompts": n_eval},
            "panel": args.size, "settings": settings}
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)  # written last: its presence means the build finished
    print(f"{args.n} examples in {elapsed:.0f}s ({args.n / elapsed:.0f}/s): train {tokens['train']:,} tokens, "
          f"val {tokens['val']:,} tokens, vocab {layout.vocab_size}, {n_eval} eval prompts -> {out}")


if __name__ == "__main__":
    main()
