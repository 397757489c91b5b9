"""train.py: it learns, DDP equals gradient accumulation, FSDP2 equals DDP, a killed run resumes
bitwise-exactly, and half-written checkpoints are never picked up. Runs the real script."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from sequence import ShardWriter

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_data(folder, n=64, seed=0, vocab=300):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        with ShardWriter(folder, split) as w:
            for _ in range(n if split == "train" else 8):
                length = int(rng.integers(20, 40))
                ids = rng.integers(0, vocab, length)
                mask = np.zeros(length, np.uint8)
                mask[length // 2:] = 1  # like a prompt followed by a supervised image block
                w.add(ids, mask)
    (Path(folder) / "meta.json").write_text(json.dumps({"vocab_size": vocab}))


def common(tmp_path, data, out, **kw):
    args = dict(model_name="tiny", data_dir=str(data), out_dir=str(out), batch_size=4, max_iters=6,
                learning_rate=1e-3, min_lr=1e-4, warmup_iters=2, lr_decay_iters=6, dropout=0.0,
                eval_interval=1000, log_interval=1, checkpoint_interval=1000, device="cpu")
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def run(args, nproc=1):
    launcher = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    proc = subprocess.run(launcher + args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def final_weights(out):
    ckpts = sorted(p for p in Path(out).glob("ckpt-*") if not p.name.endswith(".tmp"))
    return load_file(str(ckpts[-1] / "model.safetensors"))


def losses(stdout):
    return [float(line.split("loss ")[1].split(",")[0]) for line in stdout.splitlines() if ": loss " in line]


def test_overfits_one_batch(tmp_path):
    """A single repeated sequence is memorised: the loss falls from ~log(V) to near zero."""
    write_data(tmp_path / "data", n=1)
    out = run(common(tmp_path, tmp_path / "data", tmp_path / "out", max_iters=150, learning_rate=3e-3,
                     warmup_iters=5, lr_decay_iters=150, batch_size=2))
    curve = losses(out)
    assert curve[0] > 4.0 and curve[-1] < 0.1, curve[::10]


def test_ddp_two_processes_equal_gradient_accumulation(tmp_path):
    """2 gloo ranks x 1 micro-batch == 1 process x 2 micro-batches over the same global batch."""
    write_data(tmp_path / "data")
    run(common(tmp_path, tmp_path / "data", tmp_path / "single", gradient_accumulation_steps=2, max_iters=4))
    run(common(tmp_path, tmp_path / "data", tmp_path / "ddp", max_iters=4), nproc=2)
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-5, rtol=0, err_msg=k)


def test_fsdp2_matches_ddp(tmp_path):
    """FSDP2 (fully_shard per block) on 2 gloo ranks trains the same weights as DDP."""
    write_data(tmp_path / "data")
    run(common(tmp_path, tmp_path / "data", tmp_path / "ddp", max_iters=4), nproc=2)
    run(common(tmp_path, tmp_path / "data", tmp_path / "fsdp", max_iters=4, parallel="fsdp"), nproc=2)
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-5, rtol=0, err_msg=k)


def test_killed_run_resumes_bitwise(tmp_path):
    """SIGTERM mid-run saves; resuming finishes with weights identical to an uninterrupted run."""
    write_data(tmp_path / "data")
    n = 60
    kw = dict(max_iters=n, lr_decay_iters=n, dropout=0.1)
    run(common(tmp_path, tmp_path / "data", tmp_path / "full", **kw))
    proc = subprocess.Popen([sys.executable, "train.py"] + common(tmp_path, tmp_path / "data", tmp_path / "cut", **kw),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # stop once training is under way
        if line.startswith("step 3:"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest
    stopped_at = int(sorted(p.name for p in (tmp_path / "cut").glob("ckpt-*"))[-1].split("-")[1])
    assert 3 <= stopped_at < n, "the run should have stopped early"
    run(common(tmp_path, tmp_path / "data", tmp_path / "cut", init_from="resume", **kw))
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    """A checkpoint folder that was being written when the run died (.tmp) is ignored; a corrupt
    finished one fails with a message saying what to do."""
    write_data(tmp_path / "data")
    run(common(tmp_path, tmp_path / "data", tmp_path / "out", max_iters=2, checkpoint_interval=1))
    half = tmp_path / "out" / "ckpt-00000099.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"garbage")
    out = run(common(tmp_path, tmp_path / "data", tmp_path / "out", max_iters=3, init_from="resume"))
    assert "resuming from" in out and "ckpt-00000002" in out
    (tmp_path / "out" / "ckpt-00000003" / "train_state.pt").write_bytes(b"truncated")
    proc = subprocess.run([sys.executable, "train.py"] + common(tmp_path, tmp_path / "data", tmp_path / "out",
                                                                max_iters=4, init_from="resume"),
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unreadable" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_settings_are_rejected(tmp_path):
    for bad, message in (("--learning_rat=1e-3", "unknown setting"), ("--max_iters=fast", "expected int")):
        proc = subprocess.run([sys.executable, "train.py", bad], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode != 0 and message in proc.stderr
