"""Tests of data/images/prepare.py on a tiny random codec and a small trained tokenizer: the shards
hold exactly the sequences recomputed here image by image (bucket sizes written out by hand from
the official bucket rule), bad lines are skipped and reported, and a run killed mid-way and rerun
gives the bytes of an uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sequence as S
from data.images import prepare
from data.shards import load_shards, read_meta
from vq import MoVQGAN, VQConfig, center_crop, pil_to_tensor

REPO = Path(__file__).resolve().parents[1]
SEED, VAL = 3, 0.25
# T2I at --target_size 128, a budget of 16 grids of 32 px: image size -> bucket (w, h), by hand from
# generate_crop_size_list + var_center_crop. The staircase holds only near-full buckets, so 2:1
# gets 160x96 (5x3 grids, keeps 0.83 of the image), not the exact but smaller 128x64.
T2I_BUCKET = {(256, 256): (128, 128), (300, 150): (160, 96), (150, 300): (96, 160), (400, 100): (256, 64),
              (100, 400): (64, 256), (1000, 100): (256, 64), (200, 150): (128, 96), (150, 200): (96, 128),
              (96, 64): (160, 96)}
# dual panels: 8 grids a panel, the bucket from the target (lower) image, stacked aspect <= 4
DUAL_PANEL = {(256, 256): (64, 64), (300, 150): (128, 64), (100, 400): (64, 128)}


def picture(rng, w, h, mode="RGB"):
    """A smooth random picture: a few random colours, bilinearly blown up."""
    small = rng.integers(0, 256, (3, 3, len(mode)), dtype=np.uint8)  # (h, w, channels)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("images"))


def make_world(root):
    """Codec, tokenizer, images and a manifest with T2I lines, edge-task lines and three bad lines."""
    root.mkdir(exist_ok=True)
    torch.manual_seed(0)
    MoVQGAN(VQConfig.from_name("tiny")).save_pretrained(root / "vq")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    rows, expect = [], []  # expect: per line, None (bad) or (kind, bucket)
    sizes = list(T2I_BUCKET) * 3
    for k, (w, h) in enumerate(sizes):
        im = picture(rng, w, h, "RGBA" if k == 4 else "RGB")  # one transparent, one greyscale
        (im.convert("L") if k == 5 else im).save(root / "img" / f"t{k}.png")
        rows.append({"image": f"img/t{k}.png", "caption": f"a picture number {k}, {w} by {h}"})
        expect.append(("t2i", T2I_BUCKET[(w, h)]))
    for k, (w, h) in enumerate(list(DUAL_PANEL) * 2):
        picture(rng, w, h).save(root / "img" / f"d{k}.png")
        picture(rng, 120 + 40 * k, 90 + 10 * k).save(root / "img" / f"r{k}.png")  # ref: another size
        rows.append({"task": "edge", "ref": f"img/r{k}.png", "image": str(root / "img" / f"d{k}.png"),  # absolute
                     "caption": f"edges of picture {k}"})
        expect.append(("dual", DUAL_PANEL[(w, h)]))
    good = (root / "img" / "t0.png").read_bytes()
    (root / "img" / "corrupt.png").write_bytes(good[:len(good) // 2])  # a truncated PNG
    for n, bad in ((7, {"image": "img/corrupt.png", "caption": "broken"}),
                   (12, {"image": "img/nowhere.png", "caption": "lost"}), (17, {"image": "img/t1.png"})):
        rows.insert(n, bad)
        expect.insert(n, None)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    S.train_tokenizer([r.get("caption", "") for r in rows] + [S.t2i_prompt("x", 1, 2)], str(root / "tok.json"), 400)
    return root, rows, expect


def build(root, out, *extra):
    argv = [f"--manifest={root / 'manifest.jsonl'}", f"--codec={root / 'vq'}", f"--tokenizer={root / 'tok.json'}",
            "--target_size=128", f"--out_dir={out}", f"--seed={SEED}", f"--val_fraction={VAL}", "--chunk_size=4",
            "--batch_size=3", "--device=cpu", *extra]
    log = StringIO()
    with redirect_stdout(log):
        prepare.main(argv)
    return log.getvalue()


@pytest.fixture(scope="module")
def built(world):
    root = world[0]
    return build(root, root / "out")


def expected_example(root, n, row, kind, bucket, tok, layout, codec):
    """Line n recomputed here: the official draws, the hand-written bucket, the image encoded alone."""
    rng = random.Random(f"{SEED}-{n}")
    split = "val" if rng.random() < VAL else "train"
    unsized, drop = rng.random() < 0.1, rng.random() < 0.1
    w, h = bucket

    def load(p):
        im = Image.open(root / p)
        return im.convert("RGBA" if im.mode in ("RGBA", "LA") else "RGB")

    if kind == "t2i":
        image = center_crop(load(row["image"]), w, h)
        text = S.t2i_prompt(row["caption"]) if unsized else S.t2i_prompt(row["caption"], w, h)
    else:
        image = S.stack_panels(center_crop(load(row["ref"]), w, h), center_crop(load(row["image"]), w, h))
        text = (f"Generate a dual-panel image of {w}x{2 * h} where the <upper half> displays a <canny edge map>, "
                f"while the <lower half> retains the original image for direct visual comparison:\n{row['caption']}")
        drop = False
    codes = codec.encode(pil_to_tensor(image)[None])[0]
    assert tuple(codes.shape) == (image.height // 8, image.width // 8)
    return split, drop, unsized, S.make_example(tok, layout, text, codes, drop_text=drop)


def test_shards_hold_the_expected_sequences(world, built):
    """Every good line, in manifest order, is in its split as make_example of its own crop encoded
    alone: ids and loss masks, T2I and edge pairs, non-square images in the hand-computed buckets."""
    root, rows, expect = world
    out = root / "out"
    meta, layout = read_meta(str(out))
    tok = S.Tokenizer.from_file(str(out / meta["tokenizer"]))
    codec = MoVQGAN.from_pretrained(root / "vq")
    assert layout == S.TokenLayout.ours(tok, 64) and meta["vocab_size"] == layout.vocab_size
    shards = {s: load_shards(str(out), s) for s in ("train", "val")}
    seen, flags = {"train": 0, "val": 0}, set()
    for n, (row, e) in enumerate(zip(rows, expect)):
        if e is None:
            continue
        split, drop, unsized, (want_ids, want_mask) = expected_example(root, n, row, *e, tok, layout, codec)
        ids, mask, offsets = shards[split]
        k = seen[split]
        assert ids[offsets[k]:offsets[k + 1]].tolist() == want_ids.tolist(), f"line {n + 1}"
        assert mask[offsets[k]:offsets[k + 1]].tolist() == want_mask.tolist(), f"line {n + 1}"
        seen[split] += 1
        flags |= {split, e[0]} | ({"drop"} if drop else set()) | ({"unsized"} if unsized and e[0] == "t2i" else set())
    assert flags == {"train", "val", "t2i", "dual", "drop", "unsized"}  # every path was exercised
    assert [len(shards[s][2]) - 1 for s in ("train", "val")] == [seen["train"], seen["val"]]
    assert meta["counts"]["train"] == seen["train"] and meta["counts"]["val"] == seen["val"]
    buckets = meta["buckets"]
    assert buckets["t2i 160x96"]["examples"] == 6 and buckets["dual 128x128"]["examples"] == 2  # 128x64 x2
    assert sum(b["tokens"] for b in buckets.values()) == sum(meta["counts"]["tokens"].values()) == \
        sum(len(shards[s][0]) for s in ("train", "val"))
    assert "t2i 256x64" in built and "skipped" in built


def test_bad_lines_are_skipped_and_reported(world, built):
    """A truncated PNG, a missing path and a caption-less line are skipped, counted and listed with
    their line numbers; a rerun with the same settings is a no-op."""
    root, rows, expect = world
    out = root / "out"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["skipped"] == 3 and "3 skipped" in built
    log = (out / "skipped.txt").read_text().splitlines()
    bad = [n + 1 for n, e in enumerate(expect) if e is None]
    assert [m.split(":")[0] for m in log] == [f"line {n}" for n in bad]
    assert "unreadable image" in log[0] and "missing file" in log[1] and "no caption" in log[2]
    assert not (out / "parts").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "up to date" in build(root, out)
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}


def killed_run_argv(folder):
    """The killed run's settings: 12 lines of its own copy of the world, the 10th a FIFO no one writes."""
    return [f"--manifest={folder / 'manifest.jsonl'}", f"--codec={folder / 'world/vq'}",
            f"--tokenizer={folder / 'world/tok.json'}", "--target_size=128", "--chunk_size=2", "--val_fraction=0.25",
            "--device=cpu"]


def start_early(folder):
    """The run to be killed, started by tests/conftest.py before the first test so that its three
    interpreters' start-up (~12 s) goes on beside the other tests; niced, it takes the core this process
    leaves. With 2 workers, in a session of its own; it cannot finish, as its 10th line blocks."""
    root, rows, _ = make_world(folder / "world")
    (folder / "kill").mkdir()
    rows = [dict(r, image=str(root / r["image"]), **({"ref": str(root / r["ref"])} if "ref" in r else {}))
            for r in rows[:10] + rows[-2:]]
    rows.insert(9, {"image": "kill/late.png", "caption": "the image that arrives late"})
    os.mkfifo(folder / "kill" / "late.png")
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(folder / "log.txt", "w") as log:
        return subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "data.images.prepare",
                                 *killed_run_argv(folder), f"--out_dir={folder / 'killed'}", "--workers=2"],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_killed_run_resumes_to_the_same_shards(started_early, tmp_path):
    """A run with 2 workers is SIGKILLed (workers too) after its first part file appears, while it
    is certainly unfinished: one line's image is a FIFO no one writes, so its chunk blocks. After the
    FIFO becomes a real PNG, a rerun keeps the finished parts and its shards equal, byte for byte,
    those of an uninterrupted run (1 worker, so also independent of the worker count)."""
    folder, proc = started_early[__name__]
    argv, killed = killed_run_argv(folder), folder / "killed"
    try:
        deadline = time.monotonic() + 120
        while not (killed / "parts" / "part-000000.pkl").exists():
            assert proc.poll() is None, (folder / "log.txt").read_text()
            assert time.monotonic() < deadline, "no part file within 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: the script and its pool
        proc.wait()
    assert not (killed / "meta.json").exists() and not (killed / "parts" / "part-000004.pkl").exists()
    os.remove(folder / "kill" / "late.png")
    picture(np.random.default_rng(1), 200, 150).save(folder / "kill" / "late.png")
    log = StringIO()
    with redirect_stdout(log):
        prepare.main(argv + [f"--out_dir={killed}"])
    assert "resuming" in log.getvalue()
    with redirect_stdout(StringIO()):
        prepare.main(argv + [f"--out_dir={tmp_path / 'whole'}"])
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in killed.iterdir()) and "train.ids.bin" in files
    for name in files:
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
