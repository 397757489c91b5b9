"""
The shapes world: nanoLumina's synthetic, program-judgeable stand-in for web images.

It renders flat-coloured shapes on a plain background (PIL.ImageDraw, deterministic given a seed),
captions them in the six GenEval-style categories, builds the five multi-task dual-panel pairs
(edge, depth, subject, edit, dense), and judges images with a verifier that plays GenEval's
detector (and the paper's best-of-N VQAScore role). Spec: shared/specs/shapes.md.

What it is not: a tokenizer or a codec. It returns PIL images and plain dicts; turning them into
token sequences is sequence.py's job, into codes vq.py's, into shards data/shapes/prepare.py's.
It imports nothing from the project.

    import shapes
    spec = shapes.sample_spec(random.Random(0), "position")     # a prompt-set row (dict)
    img = shapes.render(shapes.scene_for_spec(spec, random.Random(1)))
    shapes.verify(img, spec)                                     # -> 1.0

Tests: python -m pytest -q tests/test_shapes.py
"""
import json
import math
import random
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# The world's vocabulary (shapes.md "Images")

SHAPES = ("circle", "square", "triangle", "star", "cross")
RELATIONS = ("left of", "right of", "above", "below")
# Eight object colours, pairwise >= ~100 apart in RGB so a codec's colour drift cannot flip them.
COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (245, 225, 20),
    "purple": (140, 50, 180), "orange": (245, 125, 15), "black": (20, 20, 20), "gray": (128, 128, 128),
}
# A second background makes "change the background" edits possible (shapes.md "Images").
BACKGROUNDS = {"white": (255, 255, 255), "sky": (175, 210, 245)}
BACKGROUND_WORDS = {"white": "white", "sky": "light blue"}
ON_BACKGROUND = {"white": "", "sky": " on a light blue background"}  # white is the default, unsaid
# Dense prediction: a fixed colour per shape on black, the usual look of a segmentation map.
SEG_COLORS = {"circle": COLORS["red"], "square": COLORS["green"], "triangle": COLORS["blue"],
              "star": COLORS["yellow"], "cross": COLORS["purple"]}
SEG_BACKGROUND = (0, 0, 0)
# Depth maps: black far background, objects painted by layer, nearest (lowest in frame) brightest.
DEPTH_LEVELS = (240, 190, 140, 90)
EDGE_WIDTH = 2  # pixels; thinner outlines do not survive an 8x-downsampling codec
PANEL = 64      # pixels, default panel side
OBJECT_PX = (20, 28)  # object side range on a 64 px canvas; ~3 codes of the 8x codec (shapes.md)


def _star_polygon(inner=0.45):
    pts = []
    for k in range(10):  # 5 outer + 5 inner vertices, first one pointing up
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return tuple(((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts)


# Each shape as a polygon in its own unit bounding box (y down), so an object of side s fills
# exactly an s x s box and the verifier can redraw a template into any detected box.
_A, _B = 1 / 3, 2 / 3  # cross arms are a third of the side wide
UNIT_POLYGONS = {
    "square": ((0, 0), (1, 0), (1, 1), (0, 1)),
    "triangle": ((0.5, 0), (1, 1), (0, 1)),
    "star": _star_polygon(),
    "cross": ((_A, 0), (_B, 0), (_B, _A), (1, _A), (1, _B), (_B, _B), (_B, 1), (_A, 1), (_A, _B),
              (0, _B), (0, _A), (_A, _A)),
}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    x: int      # left edge, pixels
    y: int      # top edge, pixels
    size: int   # side of the bounding box, pixels

    @property
    def center(self):
        return (self.x + self.size / 2, self.y + self.size / 2)

    @property
    def box(self):  # inclusive pixel box (x0, y0, x1, y1)
        return (self.x, self.y, self.x + self.size - 1, self.y + self.size - 1)


@dataclass(frozen=True)
class Scene:
    objects: tuple
    width: int = PANEL
    height: int = PANEL
    background: str = "white"


# -----------------------------------------------------------------------------
# Rendering (deterministic: no randomness below this line until placement)

def _draw_shape(draw, shape, box, fill=None, outline=None, width=1):
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
        return
    pts = [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in UNIT_POLYGONS[shape]]
    if fill is not None:
        draw.polygon(pts, fill=fill)
    if outline is not None:  # closed polyline; polygon(width=) leaves gaps at sharp star tips
        draw.line(pts + pts[:2], fill=outline, width=width, joint="curve")


def _canvas(scene, color):
    return Image.new("RGB", (scene.width, scene.height), color)


def render(scene):
    """The scene itself: filled objects on the scene's background."""
    img = _canvas(scene, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o.shape, o.box, fill=COLORS[o.color])
    return img


def render_edges(scene):
    """Edge map (the control condition and a dense-prediction target): black outlines on white."""
    img = _canvas(scene, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o.shape, o.box, outline=(0, 0, 0), width=EDGE_WIDTH)
    return img


def depth_order(scene):
    """Indices of objects from nearest to farthest: lower in the frame is nearer (a ground plane)."""
    return sorted(range(len(scene.objects)), key=lambda i: -scene.objects[i].center[1])


def render_depth(scene):
    """Depth map: objects painted by layer in gray levels on a black (far) background."""
    img = _canvas(scene, (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for rank, i in enumerate(depth_order(scene)):
        g = DEPTH_LEVELS[min(rank, len(DEPTH_LEVELS) - 1)]
        _draw_shape(draw, scene.objects[i].shape, scene.objects[i].box, fill=(g, g, g))
    return img


def render_segmentation(scene):
    """Segmentation map: each object filled with its shape's class colour on black."""
    img = _canvas(scene, SEG_BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o.shape, o.box, fill=SEG_COLORS[o.shape])
    return img


def subject_scene(obj, width=PANEL, height=PANEL):
    """The subject-driven condition: the object alone, centred, on white."""
    return Scene((replace(obj, x=(width - obj.size) // 2, y=(height - obj.size) // 2),), width, height)


def shape_mask(shape, width, height):
    """Boolean [height, width] mask of a shape stretched to fill the box (the verifier's template)."""
    img = Image.new("L", (width, height), 0)
    _draw_shape(ImageDraw.Draw(img), shape, (0, 0, width - 1, height - 1), fill=255)
    return np.asarray(img) > 127


# -----------------------------------------------------------------------------
# Placement: random but deterministic given an rng (random.Random)

GAP = 4  # pixels between bounding boxes, so blurred edges of neighbours never merge


def _object_px(width, height):
    k = min(width, height) / PANEL
    return round(OBJECT_PX[0] * k), round(OBJECT_PX[1] * k)


def _overlaps(a, b):
    return not (a.x + a.size + GAP <= b.x or b.x + b.size + GAP <= a.x or
                a.y + a.size + GAP <= b.y or b.y + b.size + GAP <= a.y)


def satisfies_relation(a_center, b_center, relation, margin=6):
    """Relation of object a to object b on centres; the relation's axis must dominate (GenEval-like)."""
    dx, dy = b_center[0] - a_center[0], b_center[1] - a_center[1]
    if relation in ("left of", "right of"):
        d = dx if relation == "left of" else -dx
        return d >= margin and abs(dx) > abs(dy)
    if relation in ("above", "below"):
        d = dy if relation == "above" else -dy
        return d >= margin and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def place(rng, items, width=PANEL, height=PANEL, relation=None, background="white", tries=2000):
    """Scene with objects for items [(shape, color)], non-overlapping and inside the canvas.

    With a relation, objects 0 and 1 satisfy it. Sizes shrink a little if the canvas is crowded.
    """
    lo, hi = _object_px(width, height)
    for attempt in range(tries):
        shrink = attempt // 200  # pixels; crowded 4-object scenes fall back to smaller objects
        objs = []
        for shape, color in items:
            s = max(lo - 4, rng.randint(lo, hi) - shrink)
            for _ in range(50):
                o = Obj(shape, color, rng.randint(1, width - s - 1), rng.randint(1, height - s - 1), s)
                if not any(_overlaps(o, p) for p in objs):
                    objs.append(o)
                    break
            else:
                break
        if len(objs) == len(items) and (
                relation is None or satisfies_relation(objs[0].center, objs[1].center, relation, 10)):
            return Scene(tuple(objs), width, height, background)
    raise RuntimeError(f"could not place {items} on a {width}x{height} canvas")


def random_scene(rng, width=PANEL, height=PANEL, n=None, background=None, held_out=None):
    """1-4 random objects; with held_out, only scenes that HeldOut.allows_scene."""
    held_out = held_out or NO_HELD_OUT
    while True:
        items = [(rng.choice(SHAPES), rng.choice(tuple(COLORS))) for _ in range(n or rng.randint(1, 4))]
        bg = background or ("sky" if rng.random() < 0.2 else "white")
        scene = place(rng, items, width, height, background=bg)
        if held_out.allows_scene(scene.objects):
            return scene

# -----------------------------------------------------------------------------
# Held-out compositions (shapes.md "Held-out compositions"): never generated for training, the only
# ones in the shipped eval prompt set, so the eval measures generalisation as GenEval does.

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TASK_FAMILIES = ("edge", "depth", "subject", "edit", "dense")


@dataclass(frozen=True)
class HeldOut:
    # (shape, colour) pairs no training image ever shows
    color_pairs: tuple = (("star", "red"), ("circle", "blue"), ("triangle", "yellow"),
                          ("cross", "green"), ("square", "purple"))
    # (category, a, b): a shape pair (either order) that category never pairs in training;
    # for counting, (category, shape, count)
    combos: tuple = (("two_object", "circle", "star"), ("two_object", "square", "cross"),
                     ("position", "square", "triangle"), ("position", "circle", "cross"),
                     ("color_attr", "triangle", "cross"), ("color_attr", "star", "square"),
                     ("counting", "star", 3), ("counting", "circle", 4), ("counting", "triangle", 2))

    def holds_out(self, spec):
        """True if a spec (or any object it puts in an image) uses a held-out composition."""
        objs, cat = spec["objects"], spec["category"]
        if any((o["shape"], o["color"]) in self.color_pairs for o in objs):
            return True
        if cat == "counting":
            return ("counting", objs[0]["shape"], objs[0]["count"]) in self.combos
        shapes = {o["shape"] for o in objs}
        return len(objs) == 2 and any(c[0] == cat and {c[1], c[2]} == shapes for c in self.combos)


    def allows_scene(self, objects):
        """Whether a task scene may be shown in training: no held-out (shape, colour) pair, and no
        held-out combination of any category (tasks have no category, so all of them apply)."""
        shapes = [o.shape for o in objects]
        if any((o.shape, o.color) in self.color_pairs for o in objects):
            return False
        for cat, a, b in self.combos:
            if (shapes.count(a) == b) if cat == "counting" else (a in shapes and b in shapes):
                return False
        return True


NO_HELD_OUT = HeldOut((), ())

# -----------------------------------------------------------------------------
# Specs (prompt-set rows, shapes.md "Prompt-set format") and their captions

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
_PREFIXES = ("a photo of", "an image of", "a picture of", "a drawing of", "a rendering of", "")
_RELATION_WORDS = {"left of": ("left of", "to the left of", "on the left of"),
                   "right of": ("right of", "to the right of", "on the right of"),
                   "above": ("above", "over", "on top of"), "below": ("below", "under", "beneath")}


_COUNT_WORDS = {"a": 1, "an": 1, **{w: n for n, w in NUMBERS.items()}}
_NOUN_PHRASE = re.compile(rf"\b(a|an|one|two|three|four|\d+)\s+(?:({'|'.join(COLORS)})\s+)?({'|'.join(SHAPES)})(?:es|s)?\b")


def _obj(shape, color=None, count=1):
    return {"shape": shape, "color": color, "count": count}


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(o, rng=None):
    """'a red star', 'three crosses', '3 green circles' (rng None: canonical GenEval wording)."""
    noun = o["shape"] + ("es" if o["shape"] == "cross" else "s") * (o["count"] > 1)
    words = f"{o['color']} {noun}" if o["color"] else noun
    if o["count"] == 1:
        return f"{_article(words)} {words}"
    number = str(o["count"]) if rng is not None and rng.random() < 0.2 else NUMBERS[o["count"]]
    return f"{number} {words}"


def parse_prompt(text):
    """A caption in this world's language -> a spec, so best-of-N can score free-text prompts.
    Reads every '<number> [colour] <shape>' phrase and a relation word between the first two."""
    found = list(_NOUN_PHRASE.finditer(text.lower()))
    if not found:
        raise ValueError(f"no shape in prompt {text!r}; expected e.g. 'a photo of a red star left of a circle'")
    objs = [_obj(m[3], m[2], int(m[1]) if m[1].isdigit() else _COUNT_WORDS[m[1]]) for m in found]
    between = text.lower()[found[0].end():found[1].start()] if len(found) > 1 else ""
    relation = next((r for r, words in _RELATION_WORDS.items() if any(w in between for w in words)), None)
    if relation:
        category = "position"
    elif len(objs) > 1:
        category = "color_attr" if any(o["color"] for o in objs) else "two_object"
    else:
        category = "counting" if objs[0]["count"] > 1 else "colors" if objs[0]["color"] else "single_object"
    return {"category": category, "prompt": text, "objects": objs, "relation": relation}


def describe(spec, rng=None, subject=False):
    """Caption of a spec. rng None gives the canonical eval wording ('a photo of ...'); an rng varies
    prefix, number words and relation words. subject=True calls objects[0] 'the object' (§ subject task)."""
    pick = (lambda xs: xs[0]) if rng is None else rng.choice
    phrases = [noun_phrase(o, rng) for o in spec["objects"]]
    if subject:
        phrases[0] = pick(("the object", "it", "the same object"))
    if spec["relation"]:
        body = f"{phrases[0]} {pick(_RELATION_WORDS[spec['relation']])} {phrases[1]}"
    elif len(phrases) == 2:
        body = f"{phrases[0]} {pick(('and', 'with', 'and also'))} {phrases[1]}"
    else:
        body = phrases[0]
    return f"{pick(_PREFIXES)} {body}".strip()


def _allowed_color(rng, shape, held_out, avoid=()):
    return rng.choice([c for c in COLORS if (shape, c) not in held_out.color_pairs and c not in avoid])


def sample_spec(rng, category, held_out=HeldOut()):
    """A random T2I spec of a category that uses no held-out composition (training generation)."""
    while True:
        a, b = rng.sample(SHAPES, 2)
        if category == "single_object":
            objs, rel = [_obj(a)], None
        elif category == "two_object":
            objs, rel = [_obj(a), _obj(b)], None
        elif category == "counting":
            objs, rel = [_obj(a, count=rng.randint(2, 4))], None
        elif category == "colors":
            objs, rel = [_obj(a, _allowed_color(rng, a, held_out))], None
        elif category == "position":
            objs, rel = [_obj(a), _obj(b)], rng.choice(RELATIONS)
        elif category == "color_attr":
            ca = _allowed_color(rng, a, held_out)
            objs, rel = [_obj(a, ca), _obj(b, _allowed_color(rng, b, held_out, avoid=(ca,)))], None
        else:
            raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
        spec = {"category": category, "prompt": "", "objects": objs, "relation": rel}
        if not held_out.holds_out(spec):
            spec["prompt"] = describe(spec)
            return spec


def scene_for_spec(spec, rng, width=PANEL, height=PANEL, held_out=HeldOut(), background="white"):
    """A scene that satisfies a spec; colours left open are drawn outside the held-out pairs."""
    items = [(o["shape"], o["color"] or _allowed_color(rng, o["shape"], held_out))
             for o in spec["objects"] for _ in range(o["count"])]
    return place(rng, items, width, height, spec["relation"], background)


def make_t2i(rng, category, held_out=HeldOut(), size=PANEL):
    """(image, spec) for a training T2I example with a varied caption."""
    spec = sample_spec(rng, category, held_out)
    bg = "sky" if rng.random() < 0.15 else "white"
    spec["prompt"] = describe(spec, rng) + ON_BACKGROUND[bg]
    return render(scene_for_spec(spec, rng, size, size, held_out, bg)), spec

# -----------------------------------------------------------------------------
# Multi-task pairs (shapes.md "Multi-task pairs"): upper panel = condition, lower = target


def scene_caption(scene, rng=None):
    """All objects with their colours, left to right: 'a photo of a red star and a blue circle'."""
    phrases = [noun_phrase(_obj(o.shape, o.color)) for o in sorted(scene.objects, key=lambda o: o.center[0])]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    prefix = "a photo of" if rng is None else rng.choice(_PREFIXES)
    return f"{prefix} {body}".strip() + ON_BACKGROUND[scene.background]


def _target(scene):
    return [{"shape": o.shape, "color": o.color, "x": o.x, "y": o.y, "size": o.size} for o in scene.objects]


def _edit(rng, scene, held_out):
    """One edit of a scene -> (edited scene, instruction, checks for the verifier) or None."""
    objs = list(scene.objects)
    unique = [i for i, o in enumerate(objs) if sum((p.shape, p.color) == (o.shape, o.color) for p in objs) == 1]
    kind = rng.choice(("recolor", "remove", "add", "move", "background"))
    if kind == "background":
        bg = "sky" if scene.background == "white" else "white"
        return replace(scene, background=bg), f"change the background to {BACKGROUND_WORDS[bg]}", {}
    if kind == "add":
        if len(objs) >= 4:
            return None
        shape = rng.choice(SHAPES)
        size = rng.randint(*_object_px(scene.width, scene.height))
        new = Obj(shape, _allowed_color(rng, shape, held_out), 0, 0, size)
        for _ in range(200):  # the others stay where they were
            new = replace(new, x=rng.randint(1, scene.width - size - 1), y=rng.randint(1, scene.height - size - 1))
            if not any(_overlaps(new, o) for o in objs):
                text = f"add {noun_phrase(_obj(shape, new.color))}"
                return replace(scene, objects=tuple(objs + [new])), text, {"anywhere": len(objs)}
        return None
    if not unique:
        return None
    i = rng.choice(unique)
    o, name = objs[i], f"the {objs[i].color} {objs[i].shape}"
    if kind == "recolor":
        color = _allowed_color(rng, o.shape, held_out, avoid=(o.color,))
        objs[i] = replace(o, color=color)
        text = rng.choice((f"make {name} {color}", f"change the color of {name} to {color}", f"recolor {name} {color}"))
        return replace(scene, objects=tuple(objs)), text, {}
    if kind == "remove":
        if len(objs) == 1:
            return None
        del objs[i]
        return replace(scene, objects=tuple(objs)), rng.choice((f"remove {name}", f"delete {name}")), {}
    direction = rng.choice(("left", "right", "top", "bottom"))  # move into that half of the canvas
    others = objs[:i] + objs[i + 1:]
    for _ in range(200):
        trial = replace(o, x=rng.randint(1, scene.width - o.size - 1), y=rng.randint(1, scene.height - o.size - 1))
        if _in_half(trial.center, direction, scene) and not _in_half(o.center, direction, scene) \
                and not any(_overlaps(trial, p) for p in others):
            objs[i] = trial
            return (replace(scene, objects=tuple(objs)), f"move {name} to the {direction}",
                    {"moved": i, "half": direction})
    return None


def _in_half(center, half, scene, margin=4):
    x, y = center
    return {"left": x < scene.width / 2 - margin, "right": x > scene.width / 2 + margin,
            "top": y < scene.height / 2 - margin, "bottom": y > scene.height / 2 + margin}[half]


def make_task(rng, task, held_out=HeldOut(), size=PANEL):
    """(upper, lower, spec) of one multi-task pair. spec["prompt"] is the text that goes into the
    task's system prompt (sequence.task_prompt), with spec["subject"] / spec["dense_map"] where needed."""
    spec = {"category": task, "task": task, "width": size, "height": size, "relation": None}
    if task == "subject":
        cat = rng.choice(("single_object", "two_object", "position", "color_attr"))
        inner = sample_spec(rng, cat, held_out)
        first = inner["objects"][0]
        first["color"] = first["color"] or _allowed_color(rng, first["shape"], held_out)
        scene = scene_for_spec(inner, rng, size, size, held_out)
        spec.update(objects=inner["objects"], relation=inner["relation"],
                    subject=noun_phrase(_obj(first["shape"], first["color"])), prompt=describe(inner, rng, subject=True))
        upper = render(subject_scene(scene.objects[0], size, size))
        return upper, render(scene), spec
    while True:
        scene = random_scene(rng, size, size, held_out=held_out)
        if task != "edit":
            break
        edited = _edit(rng, scene, held_out)
        if edited is not None and held_out.allows_scene(edited[0].objects):
            break
    if task in ("edge", "depth"):
        upper = (render_edges if task == "edge" else render_depth)(scene)
        spec.update(prompt=scene_caption(scene, rng), target=_target(scene))
        return upper, render(scene), spec
    if task == "dense":
        seg = rng.random() < 0.75
        spec.update(prompt=scene_caption(scene, rng), target=_target(scene),
                    dense_map="segmentation map" if seg else "canny edge map")
        return render(scene), (render_segmentation if seg else render_edges)(scene), spec
    if task == "edit":
        new, text, checks = edited
        spec.update(prompt=text, target=_target(new), background=new.background, **checks)
        return render(scene), render(new), spec
    raise ValueError(f"unknown task {task!r}; expected one of {TASK_FAMILIES}")

# -----------------------------------------------------------------------------
# The verifier (shapes.md "The verifier"): pixels -> nearest palette colour -> connected components
# -> shape by the best-overlapping template in the component's box. Tolerant of codec artefacts:
# thin fringes vanish under one erosion and components far smaller than any object are dropped.

MIN_CORE = 30     # pixels left after one erosion; the smallest star keeps ~60, a 2 px fringe 0
MIN_SHAPE_IOU = 0.5  # below this a blob is "unknown", never a shape
PASS_IOU = 0.5    # box IoU for "the same object" / mIoU for a dense map


def _classify(image, palette):
    """Index of the nearest palette colour for every pixel: [H, W] int."""
    x = np.asarray(image.convert("RGB"), np.float32)[:, :, None, :]  # (H, W, 1, 3)
    p = np.asarray(palette, np.float32)[None, None]                   # (1, 1, K, 3)
    return ((x - p) ** 2).sum(-1).argmin(-1)


def _shift(a, dy, dx, fill):
    out = np.full_like(a, fill)
    h, w = a.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = a[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def components(classes, valid):
    """4-connected components of equal class among valid pixels: [H, W] labels, 0 = none.
    Label propagation (each pixel takes its neighbours' minimum) is a few dozen numpy passes."""
    big = np.iinfo(np.int64).max
    lab = np.where(valid, np.arange(1, classes.size + 1).reshape(classes.shape), big)
    while True:
        new = lab
        for dy, dx in _NEIGHBOURS:
            same = _shift(classes, dy, dx, -1) == classes
            new = np.minimum(new, np.where(same & valid, _shift(lab, dy, dx, big), big))
        if np.array_equal(new, lab):
            return np.where(valid, lab, 0)
        lab = new


def _erode(mask):
    out = mask.copy()
    for dy, dx in _NEIGHBOURS:
        out &= _shift(mask, dy, dx, False)
    return out


def _dilate(mask):
    out = mask.copy()
    for dy, dx in _NEIGHBOURS:
        out |= _shift(mask, dy, dx, False)
    return out


def _describe_component(mask, color):
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    crop = mask[y0:y1 + 1, x0:x1 + 1]
    ious = {s: (crop & shape_mask(s, *crop.shape[::-1])).sum() / (crop | shape_mask(s, *crop.shape[::-1])).sum()
            for s in SHAPES}
    shape = max(ious, key=ious.get)
    return {"shape": shape if ious[shape] >= MIN_SHAPE_IOU else "unknown", "color": color,
            "bbox": (int(x0), int(y0), int(x1), int(y1)), "center": (float(xs.mean()), float(ys.mean())),
            "area": int(mask.sum())}


def _objects(labels, names, classes):
    out = []
    for lab in np.unique(labels[labels > 0]):
        mask = labels == lab
        if _erode(mask).sum() >= MIN_CORE:
            out.append(_describe_component(mask, names[classes[mask][0]]))
    return sorted(out, key=lambda d: d["center"])


def detect(image):
    """Objects in a scene image: [{shape, color, bbox (x0, y0, x1, y1 inclusive), center, area}]."""
    names = list(COLORS) + list(BACKGROUNDS)
    classes = _classify(image, list(COLORS.values()) + list(BACKGROUNDS.values()))
    return _objects(components(classes, classes < len(COLORS)), names, classes)


def _segmentation_classes(image):
    """Class per pixel of a segmentation map: 0 for the black background, else 1 + the SEG_COLORS
    index by colour *direction*, since a blurred edge is its class colour darkened, not another hue."""
    x = np.asarray(image.convert("RGB"), np.float32)
    p = np.asarray(list(SEG_COLORS.values()), np.float32)
    cos = (x @ p.T) / (np.linalg.norm(x, axis=-1, keepdims=True) * np.linalg.norm(p, axis=-1) + 1e-6)
    return np.where(x.max(-1) >= 70, 1 + cos.argmax(-1), 0)


def detect_outlines(image):
    """Objects of an edge map: each light region enclosed by a dark outline, plus that outline."""
    dark = np.asarray(image.convert("L")) < 170  # blurred 2 px lines stay below ~170
    flat = np.zeros(dark.shape, int)
    light, lines = components(flat, ~dark), components(flat, dark)
    border = np.unique(np.concatenate([light[0], light[-1], light[:, 0], light[:, -1]]))
    out = []
    for lab in np.setdiff1d(np.unique(light[light > 0]), border):
        inside = light == lab
        mask = inside | np.isin(lines, np.unique(lines[_dilate(inside) & dark]))
        if inside.sum() >= MIN_CORE // 2:  # a star's inside is small: its tips are all outline
            out.append(_describe_component(mask, None))
    return sorted(out, key=lambda d: d["center"])


def background_of(image):
    """The background name most of the image's pixels are nearest to."""
    classes = _classify(image, list(BACKGROUNDS.values()) + list(COLORS.values()))
    counts = np.bincount(classes.ravel(), minlength=len(BACKGROUNDS))[:len(BACKGROUNDS)]
    return list(BACKGROUNDS)[int(counts.argmax())]


def _box_iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)
    return inter / (area(a) + area(b) - inter)


def _checks_t2i(found, spec):
    checks, matched = [], []
    for o in spec["objects"]:
        m = [d for d in found if d["shape"] == o["shape"] and (o["color"] is None or d["color"] == o["color"])]
        exact = spec["category"] in ("counting", "single_object")
        checks.append(len(m) == o["count"] if exact else len(m) >= o["count"])
        matched.append(m)
    if spec["category"] == "single_object":
        checks.append(len(found) == 1)
    if spec["relation"]:
        checks.append(any(satisfies_relation(a["center"], b["center"], spec["relation"], margin=4)
                          for a in matched[0] for b in matched[1] if a is not b))
    return checks


def _same_object(d, t, k, spec):
    """Is detection d target object k of spec? Same shape and colour, and where the edit put it:
    anywhere for an added object, in the named half for a moved one, else on its box."""
    if d["shape"] != t["shape"] or (t["color"] is not None and d["color"] != t["color"]):
        return False
    if k == spec.get("anywhere"):
        return True
    if k == spec.get("moved"):
        return _in_half(d["center"], spec["half"], Scene((), spec["width"], spec["height"]), margin=0)
    box = (t["x"], t["y"], t["x"] + t["size"] - 1, t["y"] + t["size"] - 1)
    return _box_iou(d["bbox"], box) >= PASS_IOU


def _checks_target(found, spec):
    """Each target object found again (same shape and colour, box IoU >= PASS_IOU), nothing extra."""
    checks, free = [], list(found)
    for k, t in enumerate(spec["target"]):
        hit = next((d for d in free if _same_object(d, t, k, spec)), None)
        checks.append(hit is not None)
        if hit is not None:
            free.remove(hit)
    checks.append(not free)
    return checks


def _checks_segmentation(image, spec):
    """mIoU of the predicted class map against the ground-truth one, over classes in either."""
    objs = tuple(Obj(t["shape"], t["color"], t["x"], t["y"], t["size"]) for t in spec["target"])
    want = _segmentation_classes(render_segmentation(Scene(objs, spec["width"], spec["height"])))
    got = _segmentation_classes(image)
    ious = [((want == c) & (got == c)).sum() / ((want == c) | (got == c)).sum()
            for c in range(1, len(SEG_COLORS) + 1) if ((want == c) | (got == c)).any()]
    return [float(np.mean(ious)) >= PASS_IOU] if ious else [True]


def verify(image, spec):
    """Score in [0, 1] of an image against a prompt-set spec; 1.0 means the prompt is satisfied.

    T2I specs score the image; task specs (with "task") score the lower panel (a dual-panel image is
    split first) against the pair's ground truth. The score is the fraction of checks passed, so it
    also ranks best-of-N candidates; accuracy counts score == 1.0 only.
    """
    task = spec.get("task", "t2i")
    if task != "t2i" and image.height == 2 * spec["height"]:
        image = image.crop((0, spec["height"], image.width, image.height))
    if task in ("t2i", "subject"):
        checks = _checks_t2i(detect(image), spec)
    elif task == "dense" and spec["dense_map"] == "segmentation map":
        checks = _checks_segmentation(image, spec)
    elif task == "dense":
        checks = _checks_target(detect_outlines(image), dict(spec, target=[dict(t, color=None) for t in spec["target"]]))
    elif task in ("edge", "depth", "edit"):
        checks = _checks_target(detect(image), spec)
        if "background" in spec:
            checks.append(background_of(image) == spec["background"])
    else:
        raise ValueError(f"unknown task {task!r}")
    return sum(map(bool, checks)) / len(checks)


def verify_prompt(image, prompt):
    """verify() against a free-text T2I prompt (see parse_prompt): best-of-N on user prompts."""
    return verify(image, parse_prompt(prompt))

# -----------------------------------------------------------------------------
# Prompt sets (JSONL, one spec a line) and the held-out eval set


def write_prompt_set(path, specs):
    with open(path, "w") as f:
        for s in specs:
            f.write(json.dumps(s) + "\n")


def read_prompt_set(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_t2i_specs(held_out=HeldOut()):
    """The T2I eval prompts, canonical wording, built from held-out compositions only.
    single_object has no composition to hold out, so it asks for each shape once."""
    specs = [{"category": "single_object", "objects": [_obj(s)], "relation": None} for s in SHAPES]
    specs += [{"category": "colors", "objects": [_obj(s, c)], "relation": None} for s, c in held_out.color_pairs]
    for cat, a, b in held_out.combos:
        if cat == "counting":
            specs.append({"category": cat, "objects": [_obj(a, count=b)], "relation": None})
        elif cat == "two_object":
            specs += [{"category": cat, "objects": [_obj(p), _obj(q)], "relation": None} for p, q in ((a, b), (b, a))]
        elif cat == "position":
            specs += [{"category": cat, "objects": [_obj(p), _obj(q)], "relation": r}
                      for p, q in ((a, b), (b, a)) for r in RELATIONS]
    rng = random.Random(1234)  # colours for the colour-attribution pairs; any fixed choice will do
    for cat, a, b in held_out.combos:
        if cat == "color_attr":
            ca = _allowed_color(rng, a, held_out)
            specs.append({"category": cat, "objects": [_obj(a, ca), _obj(b, _allowed_color(rng, b, held_out, (ca,)))],
                          "relation": None})
    for s, c in held_out.color_pairs:
        other = rng.choice([x for x in SHAPES if x != s])
        second = _obj(other, _allowed_color(rng, other, held_out, (c,)))
        specs.append({"category": "color_attr", "objects": [_obj(s, c), second],
                      "relation": None})
    return [dict(s, prompt=describe(s)) for s in specs]


def eval_task_pairs(n_per_task, held_out=HeldOut(), size=PANEL, seed=10_000):
    """(upper, lower, spec) eval pairs; every scene shows at least one held-out (shape, colour) pair."""
    rng, out = random.Random(seed), []
    for task in TASK_FAMILIES:
        while sum(s["task"] == task for *_, s in out) < n_per_task:
            upper, lower, spec = make_task(rng, task, NO_HELD_OUT, size)
            shown = [(t["shape"], t["color"]) for t in spec.get("target", spec.get("objects"))]
            if any(p in held_out.color_pairs for p in shown):
                out.append((upper, lower, spec))
    return out

# -----------------------------------------------------------------------------
# Codec training images (CONTRACT.md): every kind of panel the transformer will ever see.
# The codec sees held-out compositions too: its ceiling must hold on the eval set (shapes.md).

def codec_training_images(n, size=PANEL, seed=0):
    """Deterministic uint8 [n, size, size, 3] mix of scenes and task panels for codec training."""
    rng = random.Random(seed)
    kinds = ("scene", "scene", "scene", "sky", "edges", "depth", "segmentation", "subject")
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        scene = random_scene(rng, size, size, background="sky" if kind == "sky" else "white")
        if kind == "subject":
            img = render(subject_scene(scene.objects[0], size, size))
        else:
            img = {"edges": render_edges, "depth": render_depth,
                   "segmentation": render_segmentation}.get(kind, render)(scene)
        out[i] = np.asarray(img)
    return out
