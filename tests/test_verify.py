"""Tests of verify.py: the verifier's accuracy and selectivity on ground-truth renders, its tolerance
of codec-like artefacts, its components against a plain flood fill, and free-text prompts."""
import random
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageFilter

import shapes as W
import verify as V

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
    """20 ground-truth renders of each of the six categories, five task families and the extra tasks (260)."""
    rng, out = random.Random(0), []
    for _ in range(20):
        out += [W.make_t2i(rng, c)[::-1] for c in W.CATEGORIES]
        out += [W.make_task(rng, t)[1:][::-1] for t in W.TASK_FAMILIES + W.EXTRA_TASKS]
    return out  # [(spec, image)]


def _flood_fill(classes, valid):
    """Reference labelling: breadth-first flood fill, each component labelled 1 + its first pixel."""
    h, w = classes.shape
    labels = np.zeros((h, w), np.int64)
    for start in zip(*np.nonzero(valid)):
        if labels[start]:
            continue
        labels[start] = start[0] * w + start[1] + 1
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and valid[ny, nx] and not labels[ny, nx] \
                        and classes[ny, nx] == classes[y, x]:
                    labels[ny, nx] = labels[start]
                    queue.append((ny, nx))
    return labels


def test_components_equal_a_flood_fill():
    """Label propagation with pointer jumping labels exactly as a flood fill does (snakes included)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        classes, valid = rng.integers(0, 3, (24, 31)), rng.random((24, 31)) < 0.8
        assert np.array_equal(V.components(classes, valid), _flood_fill(classes, valid))
    snake = np.ones((15, 15), bool)
    snake[1::4, :-1] = snake[3::4, 1:] = False  # one long winding corridor
    assert np.array_equal(V.components(np.zeros((15, 15), int), snake), _flood_fill(np.zeros((15, 15), int), snake))


def test_detect_reads_back_a_known_scene():
    """detect() returns each rendered object's shape, colour, box and centre."""
    scene = W.Scene(tuple(W.Obj(s, c, x, y, 22) for s, c, x, y in
                          [("circle", "red", 2, 2), ("square", "blue", 36, 4), ("triangle", "gray", 4, 38),
                           ("star", "orange", 38, 38)]))
    found = V.detect(W.render(scene))
    assert sorted((d["shape"], d["color"]) for d in found) == sorted((o.shape, o.color) for o in scene.objects)
    for o in scene.objects:
        d = next(d for d in found if d["shape"] == o.shape)
        assert d["bbox"] == o.box or V._box_iou(d["bbox"], o.box) > 0.8
    for shape in W.SHAPES:  # every shape on every background, alone and as an outline
        for bg in W.BACKGROUNDS:
            s = W.Scene((W.Obj(shape, "black", 20, 20, 24),), background=bg)
            assert [d["shape"] for d in V.detect(W.render(s))] == [shape]
        assert [d["shape"] for d in V.detect_outlines(W.render_edges(s))] == [shape]


def test_verifier_accepts_ground_truth(renders):
    """>= 0.99 of ground-truth renders of all six categories and five task families score 1.0."""
    ok = [V.verify(img, spec) == 1.0 for spec, img in renders]
    assert len(ok) >= 200 and np.mean(ok) >= 0.99


def test_verifier_rejects_renders_for_other_prompts(renders):
    """<= 0.05 of renders made for a different prompt of the same category pass, so the verifier
    cannot pass everything."""
    passed = []
    for i, (spec, _) in enumerate(renders):
        other = [img for s, img in renders if s["category"] == spec["category"] and _meaning(s) != _meaning(spec)]
        passed.append(V.verify(other[i % len(other)], spec) == 1.0)
    assert np.mean(passed) <= 0.05


@pytest.mark.parametrize("degrade", [
    lambda im: im.filter(ImageFilter.GaussianBlur(0.8)),                                       # soft edges
    lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR).resize(im.size, Image.BICUBIC),
    lambda im: Image.fromarray((np.asarray(im, np.float32) + np.random.default_rng(0).normal(
        0, 12, (im.height, im.width, 3))).clip(0, 255).astype(np.uint8)),                      # colour noise
])
def test_verifier_tolerates_codec_artefacts(renders, degrade):
    """Blurred edges, half-resolution detail and colour noise (what a codec does) keep >= 0.97."""
    ok = [V.verify(degrade(img), spec) == 1.0 for spec, img in renders[::2]]
    assert np.mean(ok) >= 0.97


def test_non_square_canvases():
    """Scenes and the verifier work on non-square canvases (Uni-Rep allows any multiple of 32)."""
    rng = random.Random(5)
    for w, h in ((128, 64), (64, 128), (96, 96)):
        spec = W.sample_spec(rng, "position")
        img = W.render(W.scene_for_spec(spec, rng, w, h))
        assert img.size == (w, h) and V.verify(img, spec) == 1.0


def test_parse_prompt_reads_back_every_caption(renders):
    """parse_prompt inverts the caption language (varied wording included), so a free-text prompt
    read back scores a ground-truth render like its spec."""
    rng = random.Random(2)
    for _ in range(300):
        spec = W.sample_spec(rng, rng.choice(W.CATEGORIES))
        got = V.parse_prompt(W.describe(spec, rng))
        assert (got["category"], got["objects"], got["relation"]) == (spec["category"], spec["objects"], spec["relation"])
    for spec, img in renders:
        if "task" not in spec:
            assert V.verify(img, V.parse_prompt(spec["prompt"])) == 1.0
    with pytest.raises(ValueError, match="no shape"):
        V.parse_prompt("a photo of a dog")
