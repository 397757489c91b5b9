"""Tests of data/shapes/prepare.py on a tiny random codec: the shards hold exactly the examples the
generator describes (checked against per-image encoding, not the batched path), reruns are
idempotent, and missing inputs fail with one clear line."""
import json

import pytest
import torch

import sequence as S
from data.shapes import prepare
from data.shards import load_shards, read_meta
from vq import MoVQGAN, VQConfig, pil_to_tensor

N = 24


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    torch.manual_seed(0)
    MoVQGAN(VQConfig.from_name("tiny")).save_pretrained(root / "vq")
    argv = [f"--codec={root / 'vq'}", f"--n={N}", f"--out_dir={root / 'shapes'}", "--batch_size=8",
            "--val_fraction=0.25", "--eval_per_task=1", "--device=cpu"]
    prepare.main(argv)
    return root, argv


def test_shards_hold_the_expected_examples(built):
    """Every stored example equals make_example on its own render, encoded alone; the last
    val_fraction of the examples form the val split; meta.json describes the layout."""
    root, _ = built
    out = root / "shapes"
    meta, layout = read_meta(str(out))
    tok = S.Tokenizer.from_file(str(out / meta["tokenizer"]))
    codec = MoVQGAN.from_pretrained(root / "vq")
    assert layout == S.TokenLayout.ours(tok, codec.config.n_embed) and meta["vocab_size"] == layout.vocab_size
    n_val = meta["counts"]["val"]
    assert n_val == N // 4 and meta["counts"]["train"] == N - n_val
    mix = prepare.parse_mix(prepare.DEFAULT_MIX)
    stored = [(s, k) for s in ("train", "val") for k in range(meta["counts"][s])]
    shards = {s: load_shards(str(out), s) for s in ("train", "val")}
    dual = 0
    for i, (split, k) in enumerate(stored):
        text, image, drop = prepare.example(i, 0, mix, 64)
        codes = codec.encode(pil_to_tensor(image)[None])[0]
        want_ids, want_mask = S.make_example(tok, layout, text, codes, drop_text=drop)
        ids, mask, offsets = shards[split]
        assert ids[offsets[k]:offsets[k + 1]].tolist() == want_ids.tolist()
        assert mask[offsets[k]:offsets[k + 1]].tolist() == want_mask.tolist()
        dual += image.height == 128
    assert 0 < dual < N  # both single-panel and dual-panel examples were made


def test_eval_set_written(built):
    """The eval prompt set is JSONL in the prompt-set format (docs/shapes.md §5); task rows point at
    PNG refs that exist."""
    out = built[0] / "shapes"
    rows = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert {"single_object", "position", "edge", "dense"} <= {r["category"] for r in rows}
    for r in rows:
        assert {"category", "prompt", "objects" if "task" not in r else "ref"} <= set(r)
        if "task" in r:
            assert (out / r["ref"]).exists()


def test_rerun_is_idempotent(built, capsys):
    """A second run with the same settings leaves every byte alone; --force rebuilds identical bytes."""
    root, argv = built
    out = root / "shapes"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    prepare.main(argv)
    assert "up to date" in capsys.readouterr().out
    prepare.main(argv + ["--force"])
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert before == after


def test_missing_inputs_fail_clearly(tmp_path):
    """A missing codec or tokenizer stops with one line that says what to do."""
    with pytest.raises(SystemExit, match="no codec at .*vq.py"):
        prepare.main([f"--codec={tmp_path / 'nope'}", f"--out_dir={tmp_path}"])
    (tmp_path / "vq").mkdir()
    with pytest.raises(SystemExit, match="no tokenizer at .*leave out --tokenizer"):
        prepare.main([f"--codec={tmp_path / 'vq'}", f"--tokenizer={tmp_path / 't.json'}", f"--out_dir={tmp_path}"])
