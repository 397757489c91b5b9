"""
The shapes world: nanoLumina's synthetic, program-judgeable stand-in for web images (docs/shapes.md).

Flat-coloured shapes on a plain background (PIL, deterministic given a seed), their captions in six
GenEval-style categories, the five dual-panel task pairs, the held-out compositions, JSONL prompt sets
and the codec's training images. A prompt's object is {shape, color, count}; a placed one is an `Obj`,
and a task row's "target" holds its scene's Obj as dicts (`target_rows`, read back by `target_scene`).
Not the judge (verify.py), a tokenizer (sequence.py) or a codec (vq.py).

    spec = shapes.sample_spec(random.Random(0), "position")    # a prompt-set row (docs/shapes.md §5)
    image = shapes.render(shapes.scene_for_spec(spec, random.Random(1)))
    verify.verify(image, spec)                                  # -> 1.0
"""
import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from sequence import DENSE_MAPS, PAIR_TASKS, pair_map  # the map names task prompts use (docs/tokens.md §5)

# -----------------------------------------------------------------------------
# The world's vocabulary (docs/shapes.md §1, §2)

SHAPES = ("circle", "square", "triangle", "star", "cross")
RELATIONS = ("left of", "right of", "above", "below")
HALVES = ("left", "right", "top", "bottom")  # of a canvas, where an edit moves an object
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TASK_FAMILIES = ("edge", "depth", "subject", "edit", "dense")
EXTRA_TASKS = ("mirror", "copy")  # never in the default mix: a new task to fine-tune on (docs/lora.md §5), a warm-up
PAIR_CHAIN_FAMILIES = ("pair", "edit_2rounds", "edit_3rounds")  # eval only: image pairs, multi-round edits
# Eight object colours, pairwise >= ~100 apart in RGB so a codec's colour drift cannot flip them.
COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (245, 225, 20),
          "purple": (140, 50, 180), "orange": (245, 125, 15), "black": (20, 20, 20), "gray": (128, 128, 128)}
# A second background makes "change the background" edits possible; white is the default, unsaid.
BACKGROUNDS = {"white": (255, 255, 255), "sky": (175, 210, 245)}
BACKGROUND_WORDS = {"white": "white", "sky": "light blue"}
ON_BACKGROUND = {"white": "", "sky": " on a light blue background"}
SEG_COLORS = {s: COLORS[c] for s, c in zip(SHAPES, ("red", "green", "blue", "yellow", "purple"))}  # on black
DEPTH_LEVELS = (240, 190, 140, 90)  # gray per layer on black (far), nearest (lowest in frame) first
EDGE_WIDTH = 2        # pixels; thinner outlines do not survive an 8x-downsampling codec
PANEL = 64            # pixels, default panel side
OBJECT_PX = (20, 28)  # object side range on a 64 px canvas; ~3 codes of the 8x codec
GAP = 4               # pixels between bounding boxes, so blurred edges of neighbours never merge
SKY_SCENES, SKY_T2I = 0.2, 0.15  # share of task scenes / T2I images on the sky background
SEGMENTATION_SHARE = 0.75        # of dense pairs; the others predict an edge map
DIGIT_SHARE = 0.2                # of varied counts written "3" rather than "three"


def _star_polygon(inner=0.45):  # 5 outer + 5 inner vertices, the first pointing up
    pts = [(r * math.cos(a), r * math.sin(a)) for k in range(10)
           for r, a in [(1.0 if k % 2 == 0 else inner, -math.pi / 2 + k * math.pi / 5)]]
    (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*pts)]
    return tuple(((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in pts)


# Each shape as a polygon in its own unit box (y down): an object of side s fills an s x s box, and
# the verifier can redraw a template into any detected box. Cross arms are a third of the side wide.
_A, _B = 1 / 3, 2 / 3
UNIT_POLYGONS = {"square": ((0, 0), (1, 0), (1, 1), (0, 1)), "triangle": ((0.5, 0), (1, 1), (0, 1)),
                 "star": _star_polygon(), "cross": ((_A, 0), (_B, 0), (_B, _A), (1, _A), (1, _B), (_B, _B),
                                                    (_B, 1), (_A, 1), (_A, _B), (0, _B), (0, _A), (_A, _A))}


@dataclass(frozen=True)
class HeldOut:
    """Compositions no training example shows, the only ones the eval asks for (docs/shapes.md §6)."""
    color_pairs: tuple = (("star", "red"), ("circle", "blue"), ("triangle", "yellow"), ("cross", "green"),
                          ("square", "purple"))  # (shape, colour)
    # (category, a, b): a shape pair (either order) that category never pairs; counting: (category, shape, n)
    combos: tuple = (("two_object", "circle", "star"), ("two_object", "square", "cross"),
                     ("position", "square", "triangle"), ("position", "circle", "cross"),
                     ("color_attr", "triangle", "cross"), ("color_attr", "star", "square"),
                     ("counting", "star", 3), ("counting", "circle", 4), ("counting", "triangle", 2))

    def holds_out(self, spec):
        """True if a spec (or any object it puts in an image) uses a held-out composition."""
        objs, cat = spec["objects"], spec["category"]
        what = {objs[0]["shape"], objs[0]["count"]} if cat == "counting" else {o["shape"] for o in objs}
        return (any((o["shape"], o["color"]) in self.color_pairs for o in objs)
                or any(c == cat and {a, b} == what for c, a, b in self.combos))

    def allows_scene(self, objects):
        """Whether a task scene's Obj may be in training: with no category, every combination applies."""
        shapes = [o.shape for o in objects]
        return not any((o.shape, o.color) in self.color_pairs for o in objects) and not any(
            (shapes.count(a) == b) if cat == "counting" else (a in shapes and b in shapes) for cat, a, b in self.combos)


NO_HELD_OUT = HeldOut((), ())

# -----------------------------------------------------------------------------
# Placed objects, scenes and their images (docs/shapes.md §1)


@dataclass(frozen=True)
class Obj:
    """A placed object; asdict(obj) is its row in a task spec's "target" (docs/shapes.md §5)."""
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
    objects: tuple  # of Obj
    width: int = PANEL
    height: int = PANEL
    background: str = "white"


def target_rows(objects):
    """Obj as a task spec's "target" rows (JSON-ready dicts)."""
    return [asdict(o) for o in objects]


def target_scene(spec):
    """The scene a task spec's "target" rows describe: target_rows read back."""
    objects = tuple(Obj(**t) for t in spec["target"])
    return Scene(objects, spec["width"], spec["height"], spec.get("background", "white"))


def _draw_shape(draw, shape, box, fill=None, outline=None):
    x0, y0, x1, y1 = box
    if shape == "circle":
        return draw.ellipse(box, fill=fill, outline=outline, width=EDGE_WIDTH)
    pts = [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in UNIT_POLYGONS[shape]]
    if fill is not None:
        draw.polygon(pts, fill=fill)
    if outline is not None:  # closed polyline; polygon(width=) leaves gaps at sharp star tips
        draw.line(pts + pts[:2], fill=outline, width=EDGE_WIDTH, joint="curve")


def _paint(scene, background, fill=None, outline=None, order=None):
    """Objects (in `order`) filled with fill(rank, obj), or outlined in `outline`, on a background."""
    img = Image.new("RGB", (scene.width, scene.height), background)
    draw = ImageDraw.Draw(img)
    for rank, i in enumerate(order or range(len(scene.objects))):
        o = scene.objects[i]
        _draw_shape(draw, o.shape, o.box, fill=fill and fill(rank, o), outline=outline)
    return img


def render(scene):  # the scene itself: filled objects on its background
    return _paint(scene, BACKGROUNDS[scene.background], fill=lambda _, o: COLORS[o.color])


def render_edges(scene):  # a control condition and a dense target: black outlines on white
    return _paint(scene, (255, 255, 255), outline=(0, 0, 0))


def render_segmentation(scene):  # each object in its shape's class colour on black
    return _paint(scene, (0, 0, 0), fill=lambda _, o: SEG_COLORS[o.shape])


def render_depth(scene):
    """Objects by layer in gray on black (far); lower in the frame is nearer (a ground plane)."""
    nearest_first = sorted(range(len(scene.objects)), key=lambda i: -scene.objects[i].center[1])
    gray = lambda rank, _: (DEPTH_LEVELS[min(rank, len(DEPTH_LEVELS) - 1)],) * 3
    return _paint(scene, (0, 0, 0), fill=gray, order=nearest_first)


def render_subject(scene):  # the subject-driven condition: the first object alone, centred, on white
    o, w, h = scene.objects[0], scene.width, scene.height
    return render(Scene((replace(o, x=(w - o.size) // 2, y=(h - o.size) // 2),), w, h))


DENSE_RENDER = {DENSE_MAPS["dense"]: render_segmentation, DENSE_MAPS["edge"]: render_edges}  # by dense_map
MAP_RENDER = {**DENSE_RENDER, DENSE_MAPS["depth"]: render_depth}  # an image pair's lower panel, by its pair_map


def shape_mask(shape, width, height):
    """Boolean [height, width] mask of a shape stretched to fill the box (the verifier's template)."""
    img = Image.new("L", (width, height), 0)
    _draw_shape(ImageDraw.Draw(img), shape, (0, 0, width - 1, height - 1), fill=255)
    return np.asarray(img) > 127

# -----------------------------------------------------------------------------
# Placement: random but deterministic given an rng (random.Random)


def _object_px(width, height):
    k = min(width, height) / PANEL
    return round(OBJECT_PX[0] * k), round(OBJECT_PX[1] * k)


def _put(rng, obj, others, width, height, tries, where=lambda o: True):
    """obj at a random spot `where` holds, GAP clear of others; None after `tries` draws."""
    apart = lambda a, b: (a.x + a.size + GAP <= b.x or b.x + b.size + GAP <= a.x or
                          a.y + a.size + GAP <= b.y or b.y + b.size + GAP <= a.y)
    for _ in range(tries):
        obj = replace(obj, x=rng.randint(1, width - obj.size - 1), y=rng.randint(1, height - obj.size - 1))
        if where(obj) and all(apart(obj, p) for p in others):
            return obj
    return None


def satisfies_relation(a_center, b_center, relation, margin=6):
    """Relation of object a to object b on centres; the relation's axis must dominate (GenEval-like)."""
    dx, dy = b_center[0] - a_center[0], b_center[1] - a_center[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= margin and abs(along) > abs(across)


def in_half(center, half, scene, margin=4):
    """Whether a point lies in the left/right/top/bottom half of the scene, margin pixels clear."""
    x, y = center
    return {"left": x < scene.width / 2 - margin, "right": x > scene.width / 2 + margin,
            "top": y < scene.height / 2 - margin, "bottom": y > scene.height / 2 + margin}[half]


def place(rng, items, width=PANEL, height=PANEL, relation=None, background="white"):
    """Scene of items [(shape, color)], apart, inside the canvas, objects 0 and 1 in `relation`."""
    lo, hi = _object_px(width, height)
    for attempt in range(2000):
        objs = []
        for shape, color in items:
            size = max(lo - 4, rng.randint(lo, hi) - attempt // 200)  # pixels
            objs.append(_put(rng, Obj(shape, color, 0, 0, size), objs, width, height, 50))
            if objs[-1] is None:  # no room left: start over
                break
        else:  # every item placed
            if relation is None or satisfies_relation(objs[0].center, objs[1].center, relation, margin=10):
                return Scene(tuple(objs), width, height, background)
    raise RuntimeError(f"could not place {items} on a {width}x{height} canvas")


def random_scene(rng, width=PANEL, height=PANEL, background=None, held_out=NO_HELD_OUT):
    """1-4 random objects, only as held_out allows."""
    while True:
        items = [(rng.choice(SHAPES), rng.choice(tuple(COLORS))) for _ in range(rng.randint(1, 4))]
        bg = background or ("sky" if rng.random() < SKY_SCENES else "white")
        scene = place(rng, items, width, height, background=bg)
        if held_out.allows_scene(scene.objects):
            return scene

# -----------------------------------------------------------------------------
# Specs (prompt-set rows, docs/shapes.md §5) and their captions (§2)

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
PREFIXES = ("a photo of", "an image of", "a picture of", "a drawing of", "a rendering of", "")
RELATION_WORDS = {"left of": ("left of", "to the left of", "on the left of"),
                  "right of": ("right of", "to the right of", "on the right of"),
                  "above": ("above", "over", "on top of"), "below": ("below", "under", "beneath")}


def spec_object(shape, color=None, count=1):
    """An object of a prompt: what and how many, never where. color None: any colour."""
    return {"shape": shape, "color": color, "count": count}


def noun_phrase(shape, color=None, count=1, rng=None):
    """'a red star', 'three crosses', '3 green circles' (rng None: canonical GenEval wording)."""
    words = f"{color} {shape}" if color else shape
    if count == 1:
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"
    plural = words + ("es" if shape == "cross" else "s")
    return f"{count if rng is not None and rng.random() < DIGIT_SHARE else NUMBERS[count]} {plural}"


def describe(spec, rng=None, subject=False):
    """Caption of a spec: canonical without an rng, else varied; subject=True: objects[0] is 'it'."""
    pick = (lambda xs: xs[0]) if rng is None else rng.choice
    phrases = [noun_phrase(**o, rng=rng) for o in spec["objects"]]
    if subject:
        phrases[0] = pick(("the object", "it", "the same object"))
    if spec["relation"]:
        phrases[1:1] = [pick(RELATION_WORDS[spec["relation"]])]
    elif len(phrases) == 2:
        phrases[1:1] = [pick(("and", "with", "and also"))]
    return f"{pick(PREFIXES)} {' '.join(phrases)}".strip()


def t2i_spec(category, objects, relation=None):
    """A T2I prompt-set row with its canonical caption."""
    spec = {"category": category, "objects": objects, "relation": relation}
    return dict(spec, prompt=describe(spec))


def _allowed_color(rng, shape, held_out, avoid=()):
    return rng.choice([c for c in COLORS if (shape, c) not in held_out.color_pairs and c not in avoid])


def _color_pair(rng, a, b, held_out, color_a=None):  # shapes a and b in two colours no held-out pair uses
    color_a = color_a or _allowed_color(rng, a, held_out)
    return [spec_object(a, color_a), spec_object(b, _allowed_color(rng, b, held_out, avoid=(color_a,)))]


def sample_spec(rng, category, held_out=HeldOut()):
    """A random T2I spec of a category that uses no held-out composition (training generation)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    while True:
        a, b = rng.sample(SHAPES, 2)
        objs, rel = [spec_object(a)] + [spec_object(b)] * (category in ("two_object", "position")), None
        if category == "counting":
            objs = [spec_object(a, count=rng.randint(2, 4))]
        elif category == "colors":
            objs = [spec_object(a, _allowed_color(rng, a, held_out))]
        elif category == "position":
            rel = rng.choice(RELATIONS)
        elif category == "color_attr":
            objs = _color_pair(rng, a, b, held_out)
        if not held_out.holds_out(spec := t2i_spec(category, objs, rel)):
            return spec


def scene_for_spec(spec, rng, width=PANEL, height=PANEL, held_out=HeldOut(), background="white"):
    """A scene that satisfies a spec; colours left open are drawn outside the held-out pairs."""
    items = [(o["shape"], o["color"] or _allowed_color(rng, o["shape"], held_out))
             for o in spec["objects"] for _ in range(o["count"])]
    return place(rng, items, width, height, spec["relation"], background)


def make_t2i(rng, category, held_out=HeldOut(), size=PANEL):
    """(image, spec) for a training T2I example with a varied caption."""
    spec = sample_spec(rng, category, held_out)
    bg = "sky" if rng.random() < SKY_T2I else "white"
    spec["prompt"] = describe(spec, rng) + ON_BACKGROUND[bg]
    return render(scene_for_spec(spec, rng, size, size, held_out, bg)), spec

# -----------------------------------------------------------------------------
# Task pairs (docs/shapes.md §3): upper panel = condition, lower = target


def scene_caption(scene, rng):
    """All objects with their colours, left to right: 'a photo of a red star and a blue circle'."""
    phrases = [noun_phrase(o.shape, o.color) for o in sorted(scene.objects, key=lambda o: o.center[0])]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{rng.choice(PREFIXES)} {body}".strip() + ON_BACKGROUND[scene.background]


def _edit(rng, scene, held_out):
    """One edit of a scene -> (edited scene, instruction, extra spec fields for the verifier) or None."""
    objs, w, h = list(scene.objects), scene.width, scene.height
    # the edited scene, or None if an object found no room
    done = lambda text, **extra: None if None in objs else (replace(scene, objects=tuple(objs)), text, extra)
    kind = rng.choice(("recolor", "remove", "add", "move", "background"))
    if kind == "background":
        bg = "sky" if scene.background == "white" else "white"
        return replace(scene, background=bg), f"change the background to {BACKGROUND_WORDS[bg]}", {}
    if kind == "add":
        if len(objs) >= 4:
            return None
        shape, size = rng.choice(SHAPES), rng.randint(*_object_px(w, h))
        color = _allowed_color(rng, shape, held_out)
        objs.append(_put(rng, Obj(shape, color, 0, 0, size), objs, w, h, 200))  # the others stay put
        return done(f"add {noun_phrase(shape, color)}", anywhere=len(objs) - 1)
    unique = [i for i, o in enumerate(objs) if sum((p.shape, p.color) == (o.shape, o.color) for p in objs) == 1]
    if not unique:
        return None
    i = rng.choice(unique)
    o, name = objs[i], f"the {objs[i].color} {objs[i].shape}"
    if kind == "recolor":
        color = _allowed_color(rng, o.shape, held_out, avoid=(o.color,))
        objs[i] = replace(o, color=color)
        return done(rng.choice((f"make {name} {color}", f"change the color of {name} to {color}",
                                f"recolor {name} {color}")))
    if kind == "remove":
        if len(objs) == 1:
            return None
        del objs[i]
        return done(rng.choice((f"remove {name}", f"delete {name}")))
    half = rng.choice(HALVES)  # move into that half of the canvas
    objs[i] = _put(rng, o, objs[:i] + objs[i + 1:], w, h, 200,
                   lambda t: in_half(t.center, half, scene) and not in_half(o.center, half, scene))
    return done(f"move {name} to the {half}", moved=i, half=half)


def make_task(rng, task, held_out=HeldOut(), size=PANEL):
    """(upper, lower, spec) of one task pair; spec's prompt, subject, dense_map feed sequence.task_prompt."""
    if task not in TASK_FAMILIES + EXTRA_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASK_FAMILIES + EXTRA_TASKS}")
    spec = {"category": task, "task": task, "width": size, "height": size, "relation": None}
    if task == "subject":
        inner = sample_spec(rng, rng.choice(("single_object", "two_object", "position", "color_attr")), held_out)
        first = inner["objects"][0]
        first["color"] = first["color"] or _allowed_color(rng, first["shape"], held_out)
        scene = scene_for_spec(inner, rng, size, size, held_out)
        spec.update(objects=inner["objects"], relation=inner["relation"],
                    subject=noun_phrase(first["shape"], first["color"]), prompt=describe(inner, rng, subject=True))
        return render_subject(scene), render(scene), spec
    if task == "edit":
        scene, [(new, text, extra)] = _edit_chain(rng, 1, held_out, size)
        spec.update(prompt=text, target=target_rows(new.objects), background=new.background, **extra)
        return render(scene), render(new), spec
    scene = random_scene(rng, size, size, held_out=held_out)
    if task == "dense":
        dense_map = DENSE_MAPS["dense"] if rng.random() < SEGMENTATION_SHARE else DENSE_MAPS["edge"]
        spec.update(prompt=scene_caption(scene, rng), target=target_rows(scene.objects), dense_map=dense_map)
        return render(scene), DENSE_RENDER[dense_map](scene), spec
    if task == "copy":  # the same scene twice: with panel-wise codes, a token-for-token copy
        spec.update(prompt=scene_caption(scene, rng), target=target_rows(scene.objects), background=scene.background)
        return render(scene), render(scene), spec
    if task == "mirror":  # the scene flipped left to right; every shape is its own mirror image
        new = replace(scene, objects=tuple(replace(o, x=size - o.x - o.size) for o in scene.objects))
        spec.update(prompt=scene_caption(scene, rng), target=target_rows(new.objects), background=scene.background)
        return render(scene), render(new), spec
    spec.update(prompt=scene_caption(scene, rng), target=target_rows(scene.objects))
    return (render_edges if task == "edge" else render_depth)(scene), render(scene), spec


def make_pair(rng, task, held_out=HeldOut(), size=PANEL):
    """(upper, lower, spec) of an image pair drawn from text alone: the scene above, its map (spec's pair_map)
    below, the official image-pair layout (docs/shapes.md §3); prepare's "pair" kind trains on them."""
    scene = random_scene(rng, size, size, held_out=held_out)
    counts = Counter((o.shape, o.color) for o in scene.objects)
    spec = {"category": "pair", "task": task, "width": size, "height": size, "relation": None,
            "prompt": scene_caption(scene, rng), "pair_map": pair_map(task), "target": target_rows(scene.objects),
            "background": scene.background, "objects": [spec_object(*o, n) for o, n in counts.items()]}
    return render(scene), MAP_RENDER[spec["pair_map"]](scene), spec


def _edit_chain(rng, rounds, held_out, size):
    """A random scene and `rounds` edits in a row, each of the previous one's result: (scene, [_edit's triple])."""
    while True:
        scene, steps = random_scene(rng, size, size, held_out=held_out), []
        while len(steps) < rounds and (edited := _edit(rng, steps[-1][0] if steps else scene, held_out)) is not None \
                and held_out.allows_scene(edited[0].objects):
            steps.append(edited)
        if len(steps) == rounds:
            return scene, steps


def make_edit_chain(rng, rounds, held_out=HeldOut(), size=PANEL):
    """(reference, spec) of a multi-round edit: spec["prompts"] the instructions, spec["rounds"] each result."""
    scene, steps = _edit_chain(rng, rounds, held_out, size)
    prompts = [text for _, text, _ in steps]
    results = [{"target": target_rows(new.objects), "background": new.background} for new, _, _ in steps]
    return render(scene), {"category": f"edit_{rounds}rounds", "task": "edit", "width": size, "height": size,
                           "relation": None, "prompt": "; ".join(prompts), "prompts": prompts, "rounds": results}

# -----------------------------------------------------------------------------
# Prompt sets (JSONL, one spec a line, docs/shapes.md §5) and the held-out eval set (§6)


def write_prompt_set(path, specs):
    with open(path, "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in specs)


def read_prompt_set(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


EVAL_PER_CATEGORY = 30  # prompts per T2I category and per task family: a 95% interval of about +-0.05 at 4 draws


def _held_out_compositions(held_out):
    """Per T2I category, the canonical specs of its held-out compositions (single_object: each shape alone,
    since a lone shape cannot be held out)."""
    rng, out = random.Random(1234), {c: [] for c in CATEGORIES}  # rng: colours of colour-attribution pairs
    out["single_object"] = [t2i_spec("single_object", [spec_object(s)]) for s in SHAPES]
    out["colors"] = [t2i_spec("colors", [spec_object(s, c)]) for s, c in held_out.color_pairs]
    for cat, a, b in held_out.combos:
        if cat == "counting":
            out[cat].append(t2i_spec(cat, [spec_object(a, count=b)]))
        elif cat in ("two_object", "position"):
            out[cat] += [t2i_spec(cat, [spec_object(p), spec_object(q)], r) for p, q in ((a, b), (b, a))
                         for r in (RELATIONS if cat == "position" else (None,))]
        else:  # color_attr: the pair in a few colourings, then each held-out (shape, colour) beside another shape
            out[cat] += [t2i_spec(cat, _color_pair(rng, p, q, held_out)) for p, q in ((a, b), (b, a)) * 3]
    for s, c in held_out.color_pairs:
        out["color_attr"] += [t2i_spec("color_attr", _color_pair(rng, s, o, held_out, c)) for o in SHAPES if o != s]
    return out


def eval_t2i_specs(held_out=HeldOut(), per_category=EVAL_PER_CATEGORY, seed=1234):
    """The T2I eval prompts: held-out compositions only, per_category rows a category. A category with fewer
    compositions than rows asks for each again in other training wordings (prefix, connector, digits), taken
    round-robin, so every composition weighs the same (docs/shapes.md §6)."""
    rng, specs = random.Random(seed), []
    for category, compositions in _held_out_compositions(held_out).items():
        wordings = [sorted({describe(s, random.Random(k)) for k in range(200)} - {s["prompt"]}) for s in compositions]
        for words in wordings:
            rng.shuffle(words)
        rows = [dict(s, prompt=(words.pop() if k >= len(compositions) and words else s["prompt"]))
                for k, (s, words) in enumerate(zip(compositions * per_category, wordings * per_category))]
        specs += list({s["prompt"]: s for s in rows}.values())[:per_category]  # a repeated wording once
    return specs


def eval_task_pairs(n_per_task, held_out=HeldOut(), size=PANEL, seed=10_000, tasks=TASK_FAMILIES):
    """(upper, lower, spec) eval pairs; every scene shows at least one held-out (shape, colour) pair."""
    rng, out = random.Random(seed), []
    for task in tasks:
        while sum(s["task"] == task for *_, s in out) < n_per_task:
            upper, lower, spec = make_task(rng, task, NO_HELD_OUT, size)
            if any((t["shape"], t["color"]) in held_out.color_pairs for t in spec.get("target", spec.get("objects"))):
                out.append((upper, lower, spec))
    return out

def write_eval_set(folder, per_task=EVAL_PER_CATEGORY, size=PANEL, tasks=TASK_FAMILIES):
    """folder/eval_prompts.jsonl (T2I rows, then task rows) + eval_refs/<task>_<k>.png, the task rows' upper
    panels, named relative to the JSONL; returns the rows. The set eval.py reads (assets/ ships one)."""
    folder = Path(folder)
    (folder / "eval_refs").mkdir(parents=True, exist_ok=True)
    specs = eval_t2i_specs()
    for k, (upper, _, spec) in enumerate(eval_task_pairs(per_task, size=size, tasks=tasks)):
        specs.append(dict(spec, ref=f"eval_refs/{spec['task']}_{k:03d}.png"))
        upper.save(folder / specs[-1]["ref"])
    write_prompt_set(folder / "eval_prompts.jsonl", specs)
    return specs

def eval_pairs_and_chains(n, held_out=HeldOut(), size=PANEL, seed=20_000):
    """(reference or None, spec) rows: n image pairs (edge, depth, dense in turn), then n 2-round and n 3-round
    edit chains; as in eval_task_pairs, every one shows a held-out (shape, colour) pair somewhere."""
    rng, out = random.Random(seed), []
    held = lambda rows: any((t["shape"], t["color"]) in held_out.color_pairs for t in rows)  # noqa: E731
    while len(out) < n:
        _, _, spec = make_pair(rng, PAIR_TASKS[len(out) % len(PAIR_TASKS)], NO_HELD_OUT, size)
        out += [(None, spec)] if held(spec["target"]) else []
    for rounds in (2, 3):
        while sum(s["category"] == f"edit_{rounds}rounds" for _, s in out) < n:
            ref, spec = make_edit_chain(rng, rounds, NO_HELD_OUT, size)
            out += [(ref, spec)] if any(held(r["target"]) for r in spec["rounds"]) else []
    return out


def write_pair_chain_set(folder, n=EVAL_PER_CATEGORY, size=PANEL):
    """folder/pair_chain_prompts.jsonl + eval_refs/edit_<r>rounds_<k>.png (the chains' references): the image-pair
    and multi-round rows eval.py scores with --prompts (assets/ ships one); returns the rows."""
    folder, specs = Path(folder), []
    (folder / "eval_refs").mkdir(parents=True, exist_ok=True)
    for k, (ref, spec) in enumerate(eval_pairs_and_chains(n, size=size)):
        if ref is not None:
            spec = dict(spec, ref=f"eval_refs/{spec['category']}_{k:03d}.png")
            ref.save(folder / spec["ref"])
        specs.append(spec)
    write_prompt_set(folder / "pair_chain_prompts.jsonl", specs)
    return specs

# -----------------------------------------------------------------------------
# Codec training images (docs/codec.md §5): every kind of panel the transformer will ever see.
# The codec sees held-out compositions too: its ceiling must hold on the eval set (docs/shapes.md §7).

CODEC_KINDS = ("scene", "scene", "scene", "sky", "edges", "depth", "segmentation", "subject")


def codec_training_images(n, size=PANEL, seed=0, progress=False):
    """Deterministic uint8 [n, size, size, 3] mix of scenes and task panels for codec training."""
    rng, out = random.Random(seed), np.empty((n, size, size, 3), np.uint8)
    draw = {"edges": render_edges, "depth": render_depth, "segmentation": render_segmentation,
            "subject": render_subject}
    for i in tqdm(range(n), desc=f"rendering {n} codec images", disable=not progress, leave=False):
        kind = CODEC_KINDS[i % len(CODEC_KINDS)]
        scene = random_scene(rng, size, size, background="sky" if kind == "sky" else "white")
        out[i] = np.asarray(draw.get(kind, render)(scene))
    return out
