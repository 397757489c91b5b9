"""Tests of shapes.py: deterministic codec images, held-out compositions kept out of training (checked
on the pixels by the verifier), captions, the target rows of a scene and the prompt-set format."""
import random

import numpy as np

import shapes as W
from verify import detect


def test_codec_training_images_are_deterministic_and_varied():
    """Same seed, same pixels; the mix holds white, sky, black-background (depth/segmentation) and
    edge-map panels."""
    a, b = W.codec_training_images(16, seed=3), W.codec_training_images(16, seed=3)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, W.codec_training_images(16, seed=4))
    corners = {tuple(x) for x in a[:, 0, 0]}
    assert {W.BACKGROUNDS["white"], W.BACKGROUNDS["sky"], (0, 0, 0)} <= corners
    assert W.codec_training_images(2, size=128).shape == (2, 128, 128, 3)


def test_held_out_compositions_never_in_training_data():
    """No training image shows a held-out (shape, colour) pair (checked on the pixels by detect) and
    no training spec uses a held-out (category, shape pair); the eval set uses only held-out ones."""
    held, rng = W.HeldOut(), random.Random(7)
    for _ in range(40):
        for c in W.CATEGORIES:
            img, spec = W.make_t2i(rng, c, held)
            assert not held.holds_out(spec)
            assert not any((d["shape"], d["color"]) in held.color_pairs for d in detect(img))
        for t in W.TASK_FAMILIES:
            upper, lower, spec = W.make_task(rng, t, held)
            scenes = {"subject": (upper, lower), "edit": (upper, lower), "dense": (upper,)}.get(t, (lower,))
            for img in scenes:  # the panels that are scenes (the others are maps of the same scene)
                assert not any((d["shape"], d["color"]) in held.color_pairs for d in detect(img))
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


def test_task_targets_read_back_as_their_scene():
    """A task row's "target" (JSON, docs/shapes.md §5) reads back as the scene the pair shows: its
    map redrawn from the rows equals the pair's panel pixel for pixel."""
    rng = random.Random(3)
    for _ in range(5):
        for task in ("edge", "depth", "edit", "dense"):
            upper, lower, spec = W.make_task(rng, task)
            scene = W.target_scene(spec)
            assert W.target_rows(scene.objects) == spec["target"] and all(isinstance(o, W.Obj) for o in scene.objects)
            redraw = W.DENSE_RENDER[spec["dense_map"]] if task == "dense" else \
                {"edge": W.render_edges, "depth": W.render_depth, "edit": W.render}[task]
            assert redraw(scene).tobytes() == (upper if task in ("edge", "depth") else lower).tobytes()


def test_prompt_set_round_trip(tmp_path):
    """The JSONL prompt set keeps every field of the format (docs/shapes.md §5)."""
    specs = W.eval_t2i_specs()
    W.write_prompt_set(tmp_path / "p.jsonl", specs)
    back = W.read_prompt_set(tmp_path / "p.jsonl")
    assert back == specs
    assert all({"category", "prompt", "objects", "relation"} <= set(s) for s in back)
    assert all({"shape", "color", "count"} == set(o) for s in back for o in s["objects"])


def test_copy_task_repeats_the_upper_panel():
    """The copy warm-up's lower panel is its upper panel, pixel for pixel, for every scene drawn."""
    rng = random.Random(3)
    for _ in range(20):
        upper, lower, spec = W.make_task(rng, "copy")
        assert upper.tobytes() == lower.tobytes() and spec["target"]
