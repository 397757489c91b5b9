"""train.py: it learns, DDP equals gradient accumulation, FSDP2 equals DDP, a killed run resumes
bitwise-exactly, and half-written checkpoints are never picked up. Runs the real script: in this
process where one process will do (runpy), under one torchrun launch for the two-rank runs."""
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data.shards import ShardWriter

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs match the 1-thread torchrun ranks bit for bit

# Each rank of one torchrun launch runs train.py once per argument list. Every run gets its own store
# on its own port: re-initialising on the agent's store would reuse its keys.
TWO_RUNS = """
import json, os, runpy, sys
os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
for port, args in json.loads(sys.argv[1]):
    os.environ["MASTER_PORT"] = str(port)
    sys.argv = ["train.py", *args]
    runpy.run_path("train.py")
"""


def write_data(folder, n=64, seed=0, vocab=300):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        w = ShardWriter(folder, split)
        for _ in range(n if split == "train" else 8):
            length = int(rng.integers(20, 40))
            mask = np.zeros(length, np.uint8)
            mask[length // 2:] = 1  # like a prompt followed by a supervised image block
            w.add(rng.integers(0, vocab, length), mask)
        w.close()
    (Path(folder) / "meta.json").write_text(json.dumps({"vocab_size": vocab}))


def common(data, out, **kw):
    args = dict(model_name="tiny", data_dir=str(data), out_dir=str(out), batch_size=4, max_iters=6,
                learning_rate=1e-3, min_lr=1e-4, warmup_iters=2, lr_decay_iters=6, dropout=0.0,
                eval_interval=1000, log_interval=1, checkpoint_interval=1000, device="cpu")
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


class Log(StringIO):
    """train.py's stdout; sends this process SIGTERM when a line starts with `stop_at`."""
    def __init__(self, stop_at=None):
        super().__init__()
        self.stop_at = stop_at

    def write(self, text):
        if self.stop_at and text.startswith(self.stop_at):
            os.kill(os.getpid(), signal.SIGTERM)
        return super().write(text)


def train(args, stop_at=None):
    """train.py in this process; returns what it printed. Its SIGTERM/SIGINT handlers are undone after."""
    handlers, argv = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}, sys.argv
    sys.argv, log = [str(REPO / "train.py"), *args], Log(stop_at)
    try:
        with redirect_stdout(log):
            runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    finally:
        sys.argv = argv
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return log.getvalue()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(out):
    ckpts = sorted(p for p in Path(out).glob("ckpt-*") if not p.name.endswith(".tmp"))
    return load_file(str(ckpts[-1] / "model.safetensors"))


def losses(stdout):
    return [float(line.split("loss ")[1].split(",")[0]) for line in stdout.splitlines() if ": loss " in line]


def test_overfits_one_batch(tmp_path):
    """A single repeated sequence is memorised: the loss falls from ~log(V) to near zero."""
    write_data(tmp_path / "data", n=1)
    curve = losses(train(common(tmp_path / "data", tmp_path / "out", max_iters=50, learning_rate=1e-2,
                                warmup_iters=5, lr_decay_iters=50, batch_size=2)))
    assert curve[0] > 4.0 and curve[-1] < 0.1, curve[::10]


def start_early(folder):
    """The two-rank runs (DDP, then FSDP2) on folder/data, one torchrun launch started by tests/conftest.py
    before the first test: three interpreters importing torch, ~12 s, niced to take the core this process leaves."""
    write_data(folder / "data")
    runs = [(free_port(), common(folder / "data", folder / "ddp", max_iters=4)),
            (free_port(), common(folder / "data", folder / "fsdp", max_iters=4, parallel="fsdp"))]
    (folder / "two_runs.py").write_text(TWO_RUNS)
    with open(folder / "log.txt", "w") as log:
        return subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", str(folder / "two_runs.py"), json.dumps(runs)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def test_two_ranks_ddp_equals_accumulation_and_fsdp2_equals_ddp(tmp_path, started_early):
    """2 gloo ranks x 1 micro-batch (DDP) == 1 process x 2 micro-batches over the same global batch,
    and FSDP2 (fully_shard per block) on 2 ranks trains the same weights as DDP."""
    folder, proc = started_early[__name__]
    train(common(folder / "data", tmp_path / "single", gradient_accumulation_steps=2, max_iters=4))
    assert proc.wait(timeout=300) == 0, (folder / "log.txt").read_text()[-5000:]
    single, ddp, fsdp = (final_weights(out) for out in (tmp_path / "single", folder / "ddp", folder / "fsdp"))
    assert single.keys() == ddp.keys() == fsdp.keys()
    for k in single:
        np.testing.assert_allclose(single[k].numpy(), ddp[k].numpy(), atol=1e-5, rtol=0, err_msg=k)
        np.testing.assert_allclose(ddp[k].numpy(), fsdp[k].numpy(), atol=1e-5, rtol=0, err_msg=k)


def test_killed_run_resumes_bitwise(tmp_path):
    """SIGTERM mid-run finishes the step and saves; resuming finishes with weights identical to an
    uninterrupted run (dropout on, so the resumed run must also repeat the dropout masks)."""
    write_data(tmp_path / "data")
    kw = dict(max_iters=8, lr_decay_iters=8, dropout=0.1)
    train(common(tmp_path / "data", tmp_path / "full", **kw))
    train(common(tmp_path / "data", tmp_path / "cut", **kw), stop_at="step 3:")
    assert [p.name for p in (tmp_path / "cut").glob("ckpt-*")] == ["ckpt-00000003"]  # stopped, not finished
    torch.seed()  # a new process's RNG state, not where step 3 left it: the resumed run must reseed
    out = train(common(tmp_path / "data", tmp_path / "cut", init_from="resume", **kw))
    assert "resuming from" in out and "step 4:" in out and "step 3:" not in out
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    """A checkpoint folder that was being written when the run died (.tmp) is ignored; a corrupt
    finished one stops the run with a message (no traceback) saying what to do."""
    write_data(tmp_path / "data")
    train(common(tmp_path / "data", tmp_path / "out", max_iters=2, checkpoint_interval=1))
    half = tmp_path / "out" / "ckpt-00000099.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"garbage")
    out = train(common(tmp_path / "data", tmp_path / "out", max_iters=3, init_from="resume"))
    assert "resuming from" in out and "ckpt-00000002" in out
    (tmp_path / "out" / "ckpt-00000003" / "train_state.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="unreadable"):  # expected: one line, exit 2 (configurator.excepthook)
        train(common(tmp_path / "data", tmp_path / "out", max_iters=4, init_from="resume"))


def test_bad_settings_are_rejected():
    for bad, message in (("--learning_rat=1e-3", "unknown setting"), ("--max_iters=fast", "expected int")):
        with pytest.raises(ValueError, match=message):
            train([bad])


def test_checkpoint_samples_with_no_copying(tmp_path, tiny_ckpt):
    """A train.py checkpoint carries the data's tokenizer and codec: sample.py --ckpt on it writes an image."""
    from sample import main as sample
    from sequence import Tokenizer
    data = tmp_path / "data"
    vocab = Tokenizer.from_file(tiny_ckpt).vocab_size + 64  # + the tiny codec's 64 codes
    write_data(data, vocab=vocab)
    (data / "tokenizer.json").write_bytes((tiny_ckpt / "tokenizer.json").read_bytes())
    (data / "meta.json").write_text(json.dumps({"vocab_size": vocab, "codec": str(tiny_ckpt)}))
    train([str(REPO / "config/train_shapes.py")] + common(data, tmp_path / "out", max_iters=2))
    sample(["--ckpt", str(tmp_path / "out" / "ckpt-00000002"), "--prompt", "a red circle", "--out", str(tmp_path)])
    assert (tmp_path / "a_red_circle_t2i_s0_0.png").is_file()
