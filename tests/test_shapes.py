"""Tests of shapes.py: deterministic rendering, the verifier's accuracy and selectivity, its tolerance
of codec-like artefacts, held-out compositions and the prompt-set format (shared/specs/shapes.md)."""
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

import shapes as W

INVERSE = {"right of": "left of", "below": "above"}


def _meaning(spec):
    """What a spec asks for, independent of wording and of 'A right of B' vs 'B left of A'."""
    objs = [(o["shape"], o["color"], o["count"]) for o in spec.get("objects", [])]
    rel = spec["relation"]
    if rel in INVERSE:
        objs, rel = objs[::-1], INVERSE[rel]
    objs = objs if rel else sorted(objs)
    target = sorted((t["shape"], t["color"], t["x"], t["y"]) for t in spec.get("target", []))
    return repr((spec["category"], objs, rel, target, spec.get("background"), spec.get("dense_map")))


@pytest.fixture(scope="module")
def renders():
    """20 ground-truth renders of each of the six categories and five task families (220)."""
    rng, out = random.Random(0), []
    for _ in range(20):
        out += [W.make_t2i(rng, c)[::-1] for c in W.CATEGORIES]
        out += [W.make_task(rng, t)[1:][::-1] for t in W.TASK_FAMILIES]
    return out  # [(spec, image)]


def test_codec_training_images_are_deterministic_and_varied():
    """Same seed, same pixels; the mix holds white, sky, black-background (depth/segmentation) and
    edge-map panels."""
    a, b = W.codec_training_images(16, seed=3), W.codec_training_images(16, seed=3)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, W.codec_training_images(16, seed=4))
    corners = {tuple(x) for x in a[:, 0, 0]}
    assert {W.BACKGROUNDS["white"], W.BACKGROUNDS["sky"], (0, 0, 0)} <= corners
    assert W.codec_training_images(2, size=128).shape == (2, 128, 128, 3)


def test_detect_reads_back_a_known_scene():
    """detect() returns each rendered object's shape, colour, box and centre."""
    scene = W.Scene(tuple(W.Obj(s, c, x, y, 22) for s, c, x, y in
                          [("circle", "red", 2, 2), ("square", "blue", 36, 4), ("triangle", "gray", 4, 38),
                           ("star", "orange", 38, 38)]))
    found = W.detect(W.render(scene))
    assert sorted((d["shape"], d["color"]) for d in found) == sorted((o.shape, o.color) for o in scene.objects)
    for o in scene.objects:
        d = next(d for d in found if d["shape"] == o.shape)
        assert d["bbox"] == o.box or W._box_iou(d["bbox"], o.box) > 0.8
    for shape in W.SHAPES:  # every shape on every background, alone and as an outline
        for bg in W.BACKGROUNDS:
            s = W.Scene((W.Obj(shape, "black", 20, 20, 24),), background=bg)
            assert [d["shape"] for d in W.detect(W.render(s))] == [shape]
        assert [d["shape"] for d in W.detect_outlines(W.render_edges(s))] == [shape]


def test_verifier_accepts_ground_truth(renders):
    """>= 0.99 of ground-truth renders of all six categories and five task families score 1.0."""
    ok = [W.verify(img, spec) == 1.0 for spec, img in renders]
    assert len(ok) >= 200 and np.mean(ok) >= 0.99


def test_verifier_rejects_renders_for_other_prompts(renders):
    """<= 0.05 of renders made for a different prompt of the same category pass, so the verifier
    cannot pass everything."""
    passed = []
    for i, (spec, _) in enumerate(renders):
        other = [img for s, img in renders if s["category"] == spec["category"] and _meaning(s) != _meaning(spec)]
        passed.append(W.verify(other[i % len(other)], spec) == 1.0)
    assert np.mean(passed) <= 0.05


@pytest.mark.parametrize("degrade", [
    lambda im: im.filter(ImageFilter.GaussianBlur(0.8)),                                       # soft edges
    lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR).resize(im.size, Image.BICUBIC),
    lambda im: Image.fromarray((np.asarray(im, np.float32) + np.random.default_rng(0).normal(
        0, 12, (im.height, im.width, 3))).clip(0, 255).astype(np.uint8)),                      # colour noise
])
def test_verifier_tolerates_codec_artefacts(renders, degrade):
    """Blurred edges, half-resolution detail and colour noise (what a codec does) keep >= 0.97."""
    ok = [W.verify(degrade(img), spec) == 1.0 for spec, img in renders[::2]]
    assert np.mean(ok) >= 0.97


def test_non_square_canvases():
    """Scenes and the verifier work on non-square canvases (Uni-Rep allows any multiple of 32)."""
    rng = random.Random(5)
    for w, h in ((128, 64), (64, 128), (96, 96)):
        spec = W.sample_spec(rng, "position")
        img = W.render(W.scene_for_spec(spec, rng, w, h))
        assert img.size == (w, h) and W.verify(img, spec) == 1.0


def test_held_out_compositions_never_in_training_data():
    """No training image shows a held-out (shape, colour) pair (checked on the pixels by detect) and
    no training spec uses a held-out (category, shape pair); the eval set uses only held-out ones."""
    held, rng = W.HeldOut(), random.Random(7)
    for _ in range(40):
        for c in W.CATEGORIES:
            img, spec = W.make_t2i(rng, c, held)
            assert not held.holds_out(spec)
            assert not any((d["shape"], d["color"]) in held.color_pairs for d in W.detect(img))
        for t in W.TASK_FAMILIES:
            upper, lower, spec = W.make_task(rng, t, held)
            scenes = {"subject": (upper, lower), "edit": (upper, lower), "dense": (upper,)}.get(t, (lower,))
            for img in scenes:  # the panels that are scenes (the others are maps of the same scene)
                assert not any((d["shape"], d["color"]) in held.color_pairs for d in W.detect(img))
    for spec in W.eval_t2i_specs(held):
        assert spec["category"] == "single_object" or held.holds_out(spec)
    for _, lower, spec in W.eval_task_pairs(2, held):
        shown = spec.get("target", spec.get("objects"))
        assert any((o["shape"], o["color"]) in held.color_pairs for o in shown)
    assert {s["category"] for s in W.eval_t2i_specs(held)} == set(W.CATEGORIES)


def test_captions():
    """Canonical wording is GenEval's; training wording varies but names the same objects."""
    spec = {"category": "color_attr", "relation": None,
            "objects": [{"shape": "triangle", "color": "red", "count": 1}, {"shape": "star", "color": "blue", "count": 1}]}
    assert W.describe(spec) == "a photo of a red triangle and a blue star"
    spec = {"category": "position", "relation": "left of",
            "objects": [{"shape": "square", "color": None, "count": 1}, {"shape": "cross", "color": None, "count": 1}]}
    assert W.describe(spec) == "a photo of a square left of a cross"
    spec = {"category": "counting", "relation": None, "objects": [{"shape": "cross", "color": "orange", "count": 3}]}
    assert W.describe(spec) == "a photo of three orange crosses"
    rng = random.Random(0)
    assert len({W.describe(spec, rng) for _ in range(50)}) > 3


def test_prompt_set_round_trip(tmp_path):
    """The JSONL prompt set keeps every field of shapes.md's format."""
    specs = W.eval_t2i_specs()
    W.write_prompt_set(tmp_path / "p.jsonl", specs)
    back = W.read_prompt_set(tmp_path / "p.jsonl")
    assert back == specs
    assert all({"category", "prompt", "objects", "relation"} <= set(s) for s in back)
    assert all({"shape", "color", "count"} == set(o) for s in back for o in s["objects"])


def test_parse_prompt_reads_back_every_caption(renders):
    """parse_prompt inverts the caption language (varied wording included), so verify_prompt on a
    free-text prompt scores a ground-truth render like verify on its spec."""
    rng = random.Random(2)
    for _ in range(300):
        spec = W.sample_spec(rng, rng.choice(W.CATEGORIES))
        got = W.parse_prompt(W.describe(spec, rng))
        assert (got["category"], got["objects"], got["relation"]) == (spec["category"], spec["objects"], spec["relation"])
    for spec, img in renders:
        if "task" not in spec:
            assert W.verify_prompt(img, spec["prompt"]) == 1.0
    with pytest.raises(ValueError, match="no shape"):
        W.parse_prompt("a photo of a dog")
