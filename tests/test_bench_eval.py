"""bench.py and eval.py at tiny scale: every variant reports numbers or a reason, ratios are positive,
scores are accuracies, and the verifier passes ground-truth renders (the ceiling row is sound)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import eval as evaluation
import shapes
from model import ModelConfig, Transformer
from verify import verify

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def prompt_set(tmp_path_factory):
    """One held-out prompt per T2I category and one pair per task family, refs beside the JSONL."""
    folder = tmp_path_factory.mktemp("prompts")
    rows = [next(s for s in shapes.eval_t2i_specs() if s["category"] == c) for c in shapes.CATEGORIES]
    (folder / "refs").mkdir()
    for k, (upper, _, spec) in enumerate(shapes.eval_task_pairs(1)):
        upper.save(folder / f"refs/{k}.png")
        rows.append(dict(spec, ref=f"refs/{k}.png"))
    shapes.write_prompt_set(folder / "prompts.jsonl", rows)
    return folder / "prompts.jsonl"


def check_variants(record, steps):
    variants = record["variants"]
    assert list(variants) and set(variants) == set(bench.VARIANTS)
    for name, r in variants.items():
        if "skipped" in r:
            assert isinstance(r["skipped"], str) and r["skipped"], name
            continue
        for key in ("tokens_per_s", "ms_per_step", "peak_memory_mb", "bandwidth_fraction", "speedup_vs_static"):
            assert r[key] > 0 and np.isfinite(r[key]), (name, key, r[key])
        assert 1 <= r["forward_passes"] <= steps and r["bandwidth_fraction"] < 1.5, (name, r)
    assert variants["static"]["speedup_vs_static"] == pytest.approx(1.0)


def test_bench_decode_reports_every_variant(tmp_path):
    """Run, not compiled (compiling takes ~20 s here): numbers for what runs, a reason for the rest."""
    out = tmp_path / "bench.json"
    record = bench.main(["--model", "tiny", "--steps", "8", "--group_size", "32", "--sjd_window", "4",
                         "--variants", "naive,static,lean,sjd", "--json", str(out)])
    check_variants(record, 8)
    assert record["variants"]["compile"] == {"skipped": "not in --variants"}
    lean, static = record["variants"]["lean"], record["variants"]["static"]
    assert lean["bytes_per_step"] < static["bytes_per_step"]  # lm_head's code rows and the filled cache only
    assert json.loads(out.read_text())["variants"].keys() == record["variants"].keys()
    assert record["command"].startswith("python bench.py --model tiny")


def test_bench_says_why_a_variant_cannot_run(monkeypatch):
    """A variant that raises, and an int4 group size the layers cannot take: reasons, not a crash."""
    generate = bench.generate

    def no_sjd(*args, sjd_window=0, **kwargs):
        if sjd_window:
            raise RuntimeError("no SJD here\nsecond line")
        return generate(*args, sjd_window=sjd_window, **kwargs)
    monkeypatch.setattr(bench, "generate", no_sjd)
    record = bench.main(["--model", "tiny", "--steps", "4", "--sjd_window", "4",
                         "--variants", "static,sjd,compile+int4,compile+int4+sjd"])
    check_variants(record, 4)
    assert record["variants"]["sjd"]["skipped"] == "failed: RuntimeError: no SJD here"  # its first line
    assert "group_size 128" in record["variants"]["compile+int4"]["skipped"]  # width 64: no group of 128
    assert record["variants"]["compile+int4+sjd"] == record["variants"]["compile+int4"]  # quantized once, for both


def test_bench_end_to_end_sums_the_step_times(monkeypatch):
    """--end_to_end: seconds per image = prefill + each position's step at the length serving it (SJD: over
    the shipped model's step compression), recomputed here from the per-length times; lean reads less."""
    monkeypatch.setattr(bench, "E2E_REPEATS", 1)
    windows = []  # loading the shipped model takes ~10 s here: `python bench.py --end_to_end` runs the real one
    monkeypatch.setattr(bench, "shipped_compression", lambda device, window: windows.append(window) or 1.7)
    record = bench.main(["--model", "tiny", "--end_to_end", "--sjd_window", "4", "--variants", "static,lean,sjd"])
    plan_steps, start = record["tokens"] - 1, record["prompt_tokens"]
    compression = record["shipped_step_compression"]
    assert compression == 1.7 and windows == [4]
    for name, width in (("static", 1), ("lean", 1), ("sjd", 4)):
        r = record["variants"][name]
        ms = {int(n): t for n, t in r["ms_per_length"].items()}
        total = sum(ms[min(n for n in ms if n >= p + width)] for p in range(start, start + plan_steps)) / 1e3
        expected = r["prefill_s"] + total / (compression if width > 1 else 1.0)
        assert r["seconds_per_image"] == pytest.approx(expected) and r["window"] == width and r["peak_memory_mb"] > 0
    assert len(record["variants"]["static"]["ms_per_length"]) == 1 < len(record["variants"]["lean"]["ms_per_length"])
    assert record["variants"]["lean"]["floor_s"] < record["variants"]["static"]["floor_s"]
    assert record["variants"]["naive"] == {"skipped": "not in --variants"}


def test_bench_linear_times_each_layer_shape(monkeypatch):
    """--linear: one row per distinct nn.Linear shape of the model (lm_head aside) and decode batch."""
    monkeypatch.setattr(bench, "LINEAR_SECONDS", 0.01)
    record = bench.main(["--model", "tiny", "--linear", "--group_size", "32"])
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("tiny"))
    shapes_ = {(m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    assert {tuple(r["shape"]) for r in record["layers"]} == shapes_
    assert len(record["layers"]) == len(shapes_) * len(bench.LINEAR_ROWS)
    assert all(r["float_ms"] > 0 and r["int4_ms"] > 0 and r["path"] for r in record["layers"])
    assert 0 < record["bytes_vs_float"] < 0.5  # 4 bits + scales and zeros vs 32 bits


def test_bench_train_throughput():
    """fp32 runs --steps timed steps after its warm-up; bf16 autocast runs for fp32's time from the same weights and
    batch, so its first (warm-up) loss equals fp32's up to bf16 rounding."""
    record = bench.main(["--model", "tiny", "--train", "float32,bfloat16", "--steps", "2", "--seq_len", "32",
                         "--batch", "2"])
    assert record["tokens_per_s"] > 0 and record["ms_per_step"] > 0 and record["mfu"] is None  # MFU: GPU only
    assert record["tflops"] > 0 and record["variants"]["float32"]["steps"] == 3
    assert record["variants"]["bfloat16"]["steps"] >= 2
    first = [record["variants"][v]["first_loss"] for v in ("float32", "bfloat16")]
    assert first[0] == pytest.approx(first[1], rel=2e-2) and record["variants"]["float32"]["loss"] < first[0]


def test_ground_truth_renders_pass_the_verifier():
    """The ceiling's premise: >= 0.99 of renders of what each held-out row asks for score 1.0."""
    rows = shapes.eval_t2i_specs() + [spec for *_, spec in shapes.eval_task_pairs(3)]
    ok = [verify(evaluation.ground_truth(row, 64, seed=i), row) == 1.0 for i, row in enumerate(rows)]
    assert len(ok) > 50 and np.mean(ok) >= 0.99


def check_table(table, columns):
    for category in shapes.CATEGORIES + shapes.TASK_FAMILIES + ("overall", "overall tasks"):
        for column in columns:
            assert 0.0 <= table[category][column] <= 1.0, (category, column)
    assert table["overall"]["ground truth"] >= 0.99 and table["overall tasks"]["ground truth"] >= 0.99


def test_eval_scores_samples_per_category(tiny_ckpt, prompt_set, tmp_path):
    """--n 1 --best_of 2 on a random model: every category and task scored, grids and JSON written."""
    record = evaluation.main(["--prompts", str(prompt_set), "--ckpt", str(tiny_ckpt), "--n", "1", "--best_of", "2",
                              "--out_dir", str(tmp_path)])
    check_table(record["table"], ("accuracy", "best-of-2", "codec ceiling", "ground truth"))
    assert all(r["best_of"][0] == max(r["scores"]) and len(r["scores"]) == 2 for r in record["rows"])
    assert all((tmp_path / f"samples_{c}.png").exists() for c in shapes.CATEGORIES + shapes.TASK_FAMILIES)
    assert json.loads((tmp_path / "eval.json").read_text())["table"] == record["table"]


def test_best_of_keeps_the_verifiers_best(tiny_ckpt, prompt_set, tmp_path, monkeypatch):
    """Draws [right, wrong, wrong, wrong] per prompt with --n 2 --best_of 2: plain accuracy 1/4,
    best-of-2 1/2 (group 0 holds the right one), whatever the model."""
    rows = {r["prompt"]: r for r in shapes.read_prompt_set(prompt_set)}

    def fake_sample_images(system, prompt, *, width, height, num_samples, **_):
        wrong = Image.new("RGB", (width, rows[prompt].get("height", height)), "white")
        return [evaluation.ground_truth(rows[prompt], width)] + [wrong] * (num_samples - 1), {}
    monkeypatch.setattr(evaluation, "sample_images", fake_sample_images)
    table = evaluation.main(["--prompts", str(prompt_set), "--ckpt", str(tiny_ckpt), "--n", "2", "--best_of", "2",
                             "--out_dir", str(tmp_path)])["table"]
    for category in shapes.CATEGORIES + shapes.TASK_FAMILIES:
        assert (table[category]["accuracy"], table[category]["best-of-2"]) == (0.25, 0.5), category


def test_load_rows_limit_and_refs(prompt_set, tmp_path):
    """--limit keeps the first rows of each category in file order; refs resolve beside the JSONL."""
    rows = shapes.read_prompt_set(prompt_set)
    shapes.write_prompt_set(tmp_path / "twice.jsonl", [dict(r, prompt=r["prompt"] + f" #{k}") for k in (1, 2)
                                                       for r in rows])
    kept = evaluation.load_rows(tmp_path / "twice.jsonl", limit=1)
    assert [r["prompt"] for r in kept] == [r["prompt"] + " #1" for r in rows]
    assert len(evaluation.load_rows(prompt_set)) == len(rows)
    assert all(Path(r["ref"]).is_file() for r in evaluation.load_rows(prompt_set) if "ref" in r)
    only = evaluation.load_rows(tmp_path / "twice.jsonl", limit=1, only="edge,colors")  # --only, then --limit
    assert [r["prompt"] for r in only] == [r["prompt"] + " #1" for r in rows if r["category"] in ("edge", "colors")]


def test_eval_codec_mode(tiny_ckpt, prompt_set, tmp_path):
    record = evaluation.main(["--prompts", str(prompt_set), "--vq", str(tiny_ckpt), "--codec", "--codec_images", "8",
                              "--out_dir", str(tmp_path)])
    quality = record["codec_quality"]
    assert np.isfinite(quality["psnr"]) and -1 <= quality["ssim"] <= 1 and 0 < quality["usage"] <= 1
    check_table(record["table"], ("codec ceiling", "ground truth"))
    assert "rows" not in record and not list(tmp_path.glob("*.png"))  # --codec samples nothing
