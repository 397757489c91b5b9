"""The shipped held-out eval set and the confidence intervals eval.py prints beside every rate."""
from pathlib import Path

import numpy as np
import pytest

import eval as evaluation
import shapes

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (55, 100), (120, 120), (1, 240)])
def test_wilson_interval_inverts_the_score_test(k, n):
    """Each end p0 of the Wilson interval is where the score test is exactly at z: (k/n - p0)^2 = z^2 p0 (1-p0) / n,
    solved here as a float64 quadratic in p0, independently of eval.wilson's closed form."""
    z, p = 1.96, k / n
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p  # (1 + z^2/n) p0^2 - (2p + z^2/n) p0 + p^2 = 0
    roots = sorted(np.roots([a, b, c]).real)
    interval = evaluation.wilson([1] * k + [0] * (n - k))
    assert interval == pytest.approx(roots, abs=1e-3)
    assert 0 <= interval[0] and interval[1] <= 1 and str(interval[0]) != "-0.0"  # printed as 0.00, never -0.00


def test_shipped_eval_set_is_held_out_balanced_and_regenerates(tmp_path):
    """assets/eval_prompts.jsonl is what shapes.write_eval_set makes: >= 30 distinct rows per T2I category and per
    task family, held-out compositions only (a lone shape cannot be held out), every task reference present."""
    shipped = shapes.read_prompt_set(ASSETS / "eval_prompts.jsonl")
    assert shapes.write_eval_set(tmp_path) == shipped
    held = shapes.HeldOut()
    for category in shapes.CATEGORIES + shapes.TASK_FAMILIES:
        rows = [r for r in shipped if r["category"] == category]
        assert len(rows) >= 30 and len({r["prompt"] + r.get("ref", "") for r in rows}) == len(rows), category
    for row in shipped:
        if "ref" in row:
            assert (ASSETS / row["ref"]).read_bytes() == (tmp_path / row["ref"]).read_bytes()
            assert any((o["shape"], o["color"]) in held.color_pairs for o in row.get("target", row.get("objects")))
        else:
            assert row["category"] == "single_object" or held.holds_out(row), row["prompt"]


def test_report_pools_blocks_and_brackets_each_rate():
    """A block's rate pools its categories' draws; every interval brackets its rate and lies in [0, 1]."""
    rows = [{"category": c} for c in ("colors", "colors", "counting", "edge")]
    columns = {"accuracy": evaluation.summarize(rows, [[1.0, 0.0], [1.0, 1.0], [0.5, 0.0], [1.0, 1.0]])}
    table = evaluation.report(rows, columns)
    assert table["overall"]["accuracy"] == pytest.approx(3 / 6) and table["colors"]["accuracy"] == 0.75
    for line in table.values():
        lo, hi = line["accuracy ci"]
        assert 0.0 <= lo <= line["accuracy"] <= hi <= 1.0
