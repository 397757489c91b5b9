"""
The shapes-world verifier, a reduced-scale GenEval detector (docs/shapes.md §4): pixels -> nearest
palette colour -> connected components -> shape by the best-overlapping template in each box.
`verify(image, spec)` scores an image against a prompt-set row (docs/shapes.md §5) as the fraction of
checks passed, so it also ranks best-of-N draws; `parse_prompt` reads a caption back into such a row.
Not the world: shapes.py draws, this module only reads.

    verify.detect(image)                       # [{shape, color, bbox, center, area}]
    verify.verify(image, verify.parse_prompt("a photo of a red star"))   # 1.0: every check passed
"""
import re

import numpy as np

from sequence import DENSE_MAPS
from shapes import (BACKGROUNDS, COLORS, DEPTH_LEVELS, NUMBERS, RELATION_WORDS, SEG_COLORS, SHAPES, in_half,
                    render_depth, render_segmentation, satisfies_relation, shape_mask, spec_object, target_scene)

MIN_CORE = 30        # pixels left after one erosion; the smallest star keeps ~60, a 2 px fringe 0
MIN_SHAPE_IOU = 0.5  # below this a blob is "unknown", never a shape
PASS_IOU = 0.5       # box IoU for "the same object" / mIoU for a dense map
OUTLINE_GRAY = 170   # an edge map's pixel darker than this is outline: blurred 2 px lines stay below
LIT = 70             # a segmentation pixel whose brightest channel reaches this is an object
_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))
PALETTE = {**COLORS, **BACKGROUNDS}  # what a scene's pixels are classified to, object colours first

# -----------------------------------------------------------------------------
# Pixels -> objects


def _classify(image):
    """Index into PALETTE of the nearest colour for every pixel: [H, W] int."""
    x = np.asarray(image.convert("RGB"), np.float32)[:, :, None, :]  # (H, W, 1, 3)
    p = np.asarray(list(PALETTE.values()), np.float32)[None, None]   # (1, 1, K, 3)
    return ((x - p) ** 2).sum(-1).argmin(-1)


def _shift(a, dy, dx, fill):
    out = np.full_like(a, fill)
    h, w = a.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        a[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def components(classes, valid):
    """4-connected components of equal class among valid pixels: [H, W] labels, 0 = none; a label is its
    component's smallest pixel number, by propagation of the neighbours' minimum plus pointer jumping."""
    big = np.iinfo(np.int64).max
    lab = np.where(valid, np.arange(1, classes.size + 1).reshape(classes.shape), big)
    links = [((dy, dx), (_shift(classes, dy, dx, -1) == classes) & valid) for dy, dx in _NEIGHBOURS]
    while True:
        new = lab
        for (dy, dx), same in links:
            new = np.minimum(new, np.where(same, _shift(lab, dy, dx, big), big))
        new = np.where(valid, new.ravel()[np.where(valid, new, 1) - 1], big)  # a label names a pixel
        if np.array_equal(new, lab):
            return np.where(valid, lab, 0)
        lab = new


def _morph(mask, op):  # one 4-neighbour step: op np.logical_and erodes, np.logical_or dilates
    return op.reduce([mask] + [_shift(mask, dy, dx, False) for dy, dx in _NEIGHBOURS])


def _describe_component(mask, color):
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    crop = mask[y0:y1 + 1, x0:x1 + 1]
    templates = {s: shape_mask(s, *crop.shape[::-1]) for s in SHAPES}
    ious = {s: (crop & t).sum() / (crop | t).sum() for s, t in templates.items()}
    shape = max(ious, key=ious.get)
    return {"shape": shape if ious[shape] >= MIN_SHAPE_IOU else "unknown", "color": color,
            "bbox": (int(x0), int(y0), int(x1), int(y1)), "center": (float(xs.mean()), float(ys.mean())),
            "area": int(mask.sum())}


def detect(image):
    """Objects in a scene image: [{shape, color, bbox (x0, y0, x1, y1 inclusive), center, area}]."""
    classes = _classify(image)
    labels = components(classes, classes < len(COLORS))
    masks = [labels == lab for lab in np.unique(labels[labels > 0])]
    out = [_describe_component(m, list(PALETTE)[classes[m][0]]) for m in masks
           if _morph(m, np.logical_and).sum() >= MIN_CORE]
    return sorted(out, key=lambda d: d["center"])


def detect_outlines(image):
    """Objects of an edge map (colour None): each light region enclosed by a dark outline, plus that outline."""
    dark = np.asarray(image.convert("L")) < OUTLINE_GRAY
    flat = np.zeros(dark.shape, int)
    light, lines = components(flat, ~dark), components(flat, dark)
    border = np.unique(np.concatenate([light[0], light[-1], light[:, 0], light[:, -1]]))
    out = []
    for lab in np.setdiff1d(np.unique(light[light > 0]), border):
        inside = light == lab
        mask = inside | np.isin(lines, np.unique(lines[_morph(inside, np.logical_or) & dark]))
        if inside.sum() >= MIN_CORE // 2:  # a star's inside is small: its tips are all outline
            out.append(_describe_component(mask, None))
    return sorted(out, key=lambda d: d["center"])


def _segmentation_classes(image):
    """Class per pixel of a segmentation map: 0 (black) or 1 + SEG_COLORS index by colour *direction*."""
    x = np.asarray(image.convert("RGB"), np.float32)
    p = np.asarray(list(SEG_COLORS.values()), np.float32)
    cos = (x @ p.T) / (np.linalg.norm(x, axis=-1, keepdims=True) * np.linalg.norm(p, axis=-1) + 1e-6)
    return np.where(x.max(-1) >= LIT, 1 + cos.argmax(-1), 0)


def background_of(image):
    """The background name most of the image's pixels are nearest to."""
    counts = np.bincount(_classify(image).ravel(), minlength=len(PALETTE))[len(COLORS):]
    return list(BACKGROUNDS)[int(counts.argmax())]

# -----------------------------------------------------------------------------
# Objects -> checks of a spec


def _box_iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)
    return ix * iy / (area(a) + area(b) - ix * iy)


def _checks_t2i(found, spec):
    """Each prompt object found count times (exactly, for counting and single_object), the relation."""
    exact = spec["category"] in ("counting", "single_object")
    matched = [[d for d in found if d["shape"] == o["shape"] and o["color"] in (None, d["color"])]
               for o in spec["objects"]]
    checks = [len(m) == o["count"] if exact else len(m) >= o["count"] for m, o in zip(matched, spec["objects"])]
    if spec["category"] == "single_object":
        checks.append(len(found) == 1)
    if spec["relation"]:
        checks.append(any(satisfies_relation(a["center"], b["center"], spec["relation"], margin=4)
                          for a in matched[0] for b in matched[1] if a is not b))
    return checks


def _same_object(d, k, scene, spec):
    """Is detection d target object k? Same shape and colour (outlines have none), and where the edit
    put it: anywhere if added, in the named half if moved, else on its box."""
    t = scene.objects[k]
    if d["shape"] != t.shape or d["color"] not in (None, t.color):
        return False
    if k == spec.get("anywhere"):
        return True
    if k == spec.get("moved"):
        return in_half(d["center"], spec["half"], scene, margin=0)
    return _box_iou(d["bbox"], t.box) >= PASS_IOU


def _checks_target(found, spec):
    """Each target object found again, nothing extra."""
    scene, checks, free = target_scene(spec), [], list(found)
    for k in range(len(scene.objects)):
        hit = next((d for d in free if _same_object(d, k, scene, spec)), None)
        checks.append(hit is not None)
        if hit is not None:
            free.remove(hit)
    return checks + [not free]


def _checks_miou(want, got, min_area=1):
    """mIoU of a predicted class map (0: background) against the ground-truth one, over the classes in want and
    those covering min_area pixels in got (a depth map's blurred rims pass through the grays between layers)."""
    classes = [c for c in np.union1d(np.unique(want), np.unique(got))
               if c > 0 and ((want == c).any() or (got == c).sum() >= min_area)]
    ious = [((want == c) & (got == c)).sum() / ((want == c) | (got == c)).sum() for c in classes]
    return [float(np.mean(ious)) >= PASS_IOU] if ious else [True]


def _checks_segmentation(image, spec):
    return _checks_miou(_segmentation_classes(render_segmentation(target_scene(spec))), _segmentation_classes(image))


def _depth_classes(image):
    """Layer per pixel of a depth map: 0 (black, far) or 1 + the index of the nearest DEPTH_LEVELS gray."""
    levels = np.asarray((0,) + DEPTH_LEVELS, np.float32)
    return np.abs(np.asarray(image.convert("L"), np.float32)[..., None] - levels).argmin(-1)


def _checks_pair(image, spec):
    """An image pair drawn from text: the upper panel shows the prompt's objects, and the lower one is the
    spec's map ("pair_map") of the objects detected in the upper one (docs/shapes.md §4)."""
    half = image.height // 2
    upper, lower = image.crop((0, 0, image.width, half)), image.crop((0, half, image.width, image.height))
    found = detect(upper)
    seen = {"width": image.width, "height": half, "target": [dict(shape=d["shape"], color=d["color"], x=x0, y=y0,
            size=x1 - x0 + 1) for d in found if d["shape"] != "unknown" for x0, y0, x1, _ in [d["bbox"]]]}
    checks = _checks_t2i(found, spec) + [len(seen["target"]) == len(found)]  # no shapeless blob above
    if spec["pair_map"] == DENSE_MAPS["dense"]:
        return checks + _checks_segmentation(lower, seen)
    if spec["pair_map"] == DENSE_MAPS["depth"]:
        return checks + _checks_miou(_depth_classes(render_depth(target_scene(seen))), _depth_classes(lower), MIN_CORE)
    return checks + _checks_target(detect_outlines(lower), seen)


def verify(image, spec):
    """Score in [0, 1] of an image (a task's lower panel, or both panels) against a prompt-set spec."""
    task = spec.get("task", "t2i")
    if task != "t2i" and "pair_map" not in spec and image.height == 2 * spec["height"]:
        image = image.crop((0, spec["height"], image.width, image.height))
    if "pair_map" in spec:  # an image pair drawn from text: both panels are judged
        checks = _checks_pair(image, spec)
    elif task in ("t2i", "subject"):
        checks = _checks_t2i(detect(image), spec)
    elif task == "dense" and spec["dense_map"] == DENSE_MAPS["dense"]:
        checks = _checks_segmentation(image, spec)
    elif task == "dense":
        checks = _checks_target(detect_outlines(image), spec)
    elif task in ("edge", "depth", "edit", "mirror", "copy"):
        checks = _checks_target(detect(image), spec)
        if "background" in spec:
            checks.append(background_of(image) == spec["background"])
    else:
        raise ValueError(f"unknown task {task!r}")
    return sum(map(bool, checks)) / len(checks)

# -----------------------------------------------------------------------------
# Free-text prompts (best-of-N on a user's prompt)

_COUNT_WORDS = {"a": 1, "an": 1, **{w: n for n, w in NUMBERS.items()}}
_NOUN_PHRASE = re.compile(rf"\b({'|'.join(_COUNT_WORDS)}|\d+)\s+"  # a number, an optional colour, a shape
                          rf"(?:({'|'.join(COLORS)})\s+)?({'|'.join(SHAPES)})(?:es|s)?\b")


def parse_prompt(text):
    """A caption -> a spec: every '<number> [colour] <shape>' phrase, a relation word between the first two."""
    found = list(_NOUN_PHRASE.finditer(text.lower()))
    if not found:
        raise ValueError(f"no shape in prompt {text!r}; expected e.g. 'a photo of a red star left of a circle'")
    objs = [spec_object(m[3], m[2], int(m[1]) if m[1].isdigit() else _COUNT_WORDS[m[1]]) for m in found]
    between = text.lower()[found[0].end():found[1].start()] if len(found) > 1 else ""
    relation = next((r for r, words in RELATION_WORDS.items() if any(w in between for w in words)), None)
    if relation:
        category = "position"
    elif len(objs) > 1:
        category = "color_attr" if any(o["color"] for o in objs) else "two_object"
    else:
        category = "counting" if objs[0]["count"] > 1 else "colors" if objs[0]["color"] else "single_object"
    return {"category": category, "prompt": text, "objects": objs, "relation": relation}
