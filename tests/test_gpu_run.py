"""The prepared GPU run (scripts/gpu_run.sh, issue 29) on the CPU: `--dry-run` goes through every stage with
tiny settings, so the one call a lent GPU gets does not fail on a path, a flag or a file layout."""
import io
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from data.shards import load_shards
from model import Transformer

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_run.sh"
RETURNED = 8  # files a device call brings back from its output folder


def start_early(folder):
    """The dry run into folder/out, started by tests/conftest.py before the first test: ~40 s on one core,
    most of it six interpreters importing torch; niced, it takes the core this process leaves."""
    with open(folder / "stdout.txt", "w") as stdout, open(folder / "stderr.txt", "w") as stderr:
        return subprocess.Popen(["nice", "-n", "19", "bash", str(SCRIPT), str(folder / "out"), "--dry-run"],
                                stdout=stdout, stderr=stderr, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def dry_run(started_early):
    folder, process = started_early[__name__]
    assert process.wait(timeout=240) == 0, (folder / "stderr.txt").read_text()
    return folder / "out", (folder / "stdout.txt").read_text()


def test_every_stage_succeeds_and_is_logged(dry_run):
    """The summary reports all four stages ok, and each wrote its log."""
    out, stdout = dry_run
    for stage in ("data", "train", "bench", "tests"):
        assert f"{stage:<6} ok" in stdout, stdout
        assert (out / "logs" / f"{stage}.log").stat().st_size > 0
    assert re.search(r"\d+ (passed|skipped)", (out / "logs" / "tests.log").read_text())  # skipped on a CPU


def test_outputs(dry_run):
    """Fresh shards joined from the workers, a bench record with the copy bandwidth, and weights that
    come back in at most 8 files under 16 MiB, whose reassembled tar holds a folder Transformer.load reads."""
    out, _ = dry_run
    meta = json.loads((out / "work/run/data/meta.json").read_text())
    ids, mask, offsets = load_shards(out / "work/run/data", "train")
    assert len(offsets) - 1 == meta["counts"]["train"] > 0 and meta["settings"]["seed"] != [0]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["sjd"]["copy_bandwidth_gb_s"] > 0 and bench["sjd"]["variants"]["sjd"]["ms_per_step"] > 0
    timed = [r for r in bench["end_to_end"]["variants"].values() if "skipped" not in r]  # static, lean
    assert len(timed) == 2 and all(r["seconds_per_image"] > r["floor_s"] > 0 for r in timed)
    returned = [p for p in out.rglob("*") if p.is_file() and len(p.relative_to(out).parts) <= 3]
    assert len(returned) <= RETURNED and all(p.stat().st_size < 16 * 2**20 for p in returned), returned
    parts = sorted(out.glob("weights.tar.*"))
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        tar.extractall(out / "back", filter="data")
    model = Transformer.load(out / "back/weights")
    assert model.config.vocab_size >= meta["vocab_size"]
    assert (out / "back/weights/tokenizer.json").is_file()  # eval.py --ckpt <it> --vq assets loads a system
