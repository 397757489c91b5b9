"""Tests of data/shapes/prepare.py on a tiny random codec: the shards hold exactly the examples the
generator describes (checked against per-image encoding, not the batched path), reruns are
idempotent, and missing inputs fail with one clear line."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sequence as S
from data.shapes import prepare
from data.shards import load_kinds, load_shards, read_meta
from tasks import task_tokens
from vq import MoVQGAN, VQConfig, pil_to_tensor, tensor_to_pil

N = 24


def encode_alone(codec, image):
    """The codes prepare should store, one codec call per panel: a dual panel's halves each encoded alone
    (panelwise, the default; docs/codec.md §7), a T2I image whole."""
    panels = S.split_panels(image) if image.height == 2 * image.width else [image]
    return torch.cat([codec.encode(pil_to_tensor(panel)[None])[0] for panel in panels])


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
    """Every stored example equals make_example on its own render, each panel encoded alone; the last
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
        _, text, image, drop = prepare.example(i, 0, mix, 64)
        codes = encode_alone(codec, image)
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


def test_kind_labels_match_the_generator(built):
    """{split}.kinds.npy names each stored example's kind, as the generator drew it."""
    out = built[0] / "shapes"
    meta, _ = read_meta(str(out))
    mix = prepare.parse_mix(prepare.DEFAULT_MIX)
    labels = [*load_kinds(out, "train", meta), *load_kinds(out, "val", meta)]
    assert labels == [prepare.example(i, 0, mix, 64)[0] for i in range(N)]


def test_stream_is_fresh_and_reproducible(built):
    """Streamed micro-batch j holds examples j * B .. j * B + B - 1 of the stream's own seed, encoded as
    prepare encodes one image alone; a second Stream gives the same bytes; none is a stored example."""
    root, _ = built
    out = root / "shapes"
    meta, layout = read_meta(str(out))
    tok, codec = S.Tokenizer.from_file(str(out / meta["tokenizer"])), MoVQGAN.from_pretrained(root / "vq")
    mix = prepare.parse_mix("edge=1,pair=1,colors=1")
    a, b = prepare.Stream(out, "edge=1,pair=1,colors=1", 3, seed=5), prepare.Stream(out, "", 3, seed=5)
    stored = {tuple(ids[offsets[k]:offsets[k + 1]]) for ids, _, offsets in (load_shards(str(out), "train"),)
              for k in range(len(offsets) - 1)}
    kinds = set()
    for j in (0, 4):
        for k, (ids, mask) in enumerate(a[j]):
            kind, text, image, drop = prepare.example(3 * j + k, "stream5", mix, 64)
            want_ids, want_mask = S.make_example(tok, layout, text, encode_alone(codec, image), drop)
            assert ids.tolist() == want_ids.tolist() and mask.tolist() == want_mask.tolist()
            assert tuple(ids) not in stored
            kinds.add(kind)
    assert len(kinds) > 1
    assert [ids.tolist() for ids, _ in b[4]] != [ids.tolist() for ids, _ in a[4]]  # b streams the shards' mix
    assert [ids.tolist() for ids, _ in prepare.Stream(out, "edge=1,pair=1,colors=1", 3, seed=5)[4]] == \
        [ids.tolist() for ids, _ in a[4]]


def test_streaming_run_resumes_bitwise_and_logs_loss_per_kind(built, tmp_path, one_thread):
    """train.py data_stream=True: a run stopped at step 2 and resumed ends with the weights of an unbroken
    run (the stream is a function of the step); val.jsonl's per-kind losses equal masked cross-entropy
    over the first batch_size val examples of each kind, computed here from the step-2 checkpoint."""
    from test_train import common, final_weights, train
    from model import Transformer
    data = built[0] / "shapes"
    kw = dict(data_stream=True, data_mix="edge=1,pair=1,colors=1", stream_workers=1, max_iters=4, lr_decay_iters=4,
              eval_interval=2, eval_iters=1, checkpoint_interval=2, dtype="float32")  # fp32: checked against fp64
    train(common(data, tmp_path / "full", **kw))
    train(common(data, tmp_path / "cut", **kw), stop_at="step 2: loss")
    out = train(common(data, tmp_path / "cut", init_from="resume", **kw))
    assert "resuming from" in out and "step 3:" in out
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    row = [json.loads(line) for line in (tmp_path / "full" / "val.jsonl").read_text().splitlines()][0]
    assert row["step"] == 2 and row["examples"] == 2 * 4
    meta, _ = read_meta(str(data))
    kinds, (ids, mask, offsets) = load_kinds(data, "val", meta), load_shards(str(data), "val")
    assert set(row["per_kind"]) == set(kinds)
    model = Transformer.load(tmp_path / "full" / "ckpt-00000002").eval()
    for kind, loss in row["per_kind"].items():
        rows = [r for r in range(len(kinds)) if kinds[r] == kind][:4]
        total = count = 0.0
        for r in rows:  # one sequence at a time: no padding involved
            seq = torch.from_numpy(ids[offsets[r]:offsets[r + 1]].astype("int64"))[:model.config.max_seq_len + 1]
            m = torch.from_numpy(mask[offsets[r]:offsets[r + 1]].astype("float32"))[1:len(seq)]
            with torch.no_grad():
                nll = torch.nn.functional.cross_entropy(model(seq[None, :-1])[0].double(), seq[1:], reduction="none")
            total, count = total + float((nll * m).sum()), count + float(m.sum())
        assert abs(loss - total / count) < 1e-4, kind


def children(pid):
    """The pids whose parent is pid (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("ending", ["signal", "crash"])
def test_streaming_workers_outlive_sigterm_and_never_hang_the_exit(built, tmp_path, ending):
    """`pkill -f train.py` or a scheduler's SIGTERM to the process group reaches the streaming workers too:
    they must outlive it, or the trainer dies of a dead worker instead of finishing its step and saving.
    Here a worker is signalled alone first (training must go on), then the whole group (save, exit 0).
    Workers that ignore SIGTERM must still be stopped when the trainer ends, on a crash too, or exit hangs."""
    from test_train import REPO, common
    kw = dict(data_stream=True, data_mix="edge=1,colors=1", stream_workers=1, max_iters=500, lr_decay_iters=500)
    if ending == "crash":  # weights blow up at step 1 and the run stops itself with an error
        kw.update(learning_rate=1e30, warmup_iters=0, max_bad_steps=1)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *common(built[0] / "shapes", tmp_path, **kw)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    try:
        for line in proc.stdout if ending == "signal" else ():
            lines.append(line)
            if line.startswith("step 3:"):
                workers = children(proc.pid)
                assert workers, "no streaming worker found"
                for pid in workers:
                    os.kill(pid, signal.SIGTERM)
            if line.startswith("step 12:"):  # past the batches the loader had drawn ahead
                os.killpg(proc.pid, signal.SIGTERM)
                break
        lines += proc.communicate(timeout=60)[0]  # until the trainer and its workers are gone
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = [p.name for p in tmp_path.glob("ckpt-*")]
    if ending == "signal":
        assert proc.returncode == 0, "".join(lines)[-3000:]
        assert len(saved) == 1 and 12 <= int(saved[0].split("-")[1]) < 500, saved
    else:
        assert proc.returncode == 1 and "non-finite" in "".join(lines), "".join(lines)[-3000:]


def test_panelwise_data_match_the_reference_encoding_and_decode_panelwise(built, tmp_path, one_thread):
    """--panelwise=True: a dual panel's upper codes are what sampling makes of that panel as --ref (encoded
    alone), its lower codes the lower panel encoded alone; a run on such data writes sampling.json with
    panelwise, and sampling from it decodes each panel alone."""
    from test_train import common, train
    import sample
    root, argv = built
    out = tmp_path / "panel"
    prepare.main([a for a in argv if not a.startswith("--out_dir")] + [f"--out_dir={out}", "--panelwise=True",
                                                                      "--mix=edge=1,subject=1,colors=1"])
    meta, layout = read_meta(str(out))
    tok, codec = S.Tokenizer.from_file(str(out / meta["tokenizer"])), MoVQGAN.from_pretrained(root / "vq")
    mix = prepare.parse_mix("edge=1,subject=1,colors=1")
    system = SimpleNamespace(codec=codec, tokenizer=tok, layout=layout, device="cpu")
    for j, (ids, mask) in enumerate(prepare.Stream(out, "", 4, seed=1)[0]):
        kind, text, image, drop = prepare.example(j, "stream1", mix, 64)
        upper, lower = S.split_panels(image)
        if kind == "colors" or drop:
            continue
        upper.save(tmp_path / "ref.png")
        prefix, _ = task_tokens(system, kind, "x", 64, 128, ref=tmp_path / "ref.png",
                                subject="a red circle" if kind == "subject" else None)
        ref_codes = prefix[-8 * 9:]  # the reference panel's rows as sampling lays them out
        assert ids.tolist()[-(16 * 9 + 1) - 1:][:8 * 9] == ref_codes
        assert ids.tolist() == S.make_example(tok, layout, text, encode_alone(codec, image), drop)[0].tolist()
    train(common(out, tmp_path / "run", max_iters=1, checkpoint_interval=1, model_name="tiny"))
    ckpt = tmp_path / "run" / "ckpt-00000001"
    assert json.loads((ckpt / "sampling.json").read_text()) == {"panelwise": True}
    system = sample.load_system(ckpt)
    images, stats = sample.sample_images(system, "a red circle", task="edge", ref=tmp_path / "ref.png", top_k=8)
    codes = stats["codes"]
    halves = torch.cat([codec.decode(codes[:, :8]), codec.decode(codes[:, 8:])], dim=2)
    assert images[0].tobytes() == tensor_to_pil(halves[0]).tobytes()
