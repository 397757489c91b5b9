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
"""
import json
import math
import random
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


# -----------------------------------------------------------------------------
# Codec training images (CONTRACT.md): every kind of panel the transformer will ever see

def random_scene(rng, width=PANEL, height=PANEL, n=None, background=None, held_out=()):
    n = n or rng.randint(1, 4)
    items = []
    for _ in range(n):
        while True:
            item = (rng.choice(SHAPES), rng.choice(tuple(COLORS)))
            if item not in held_out:
                break
        items.append(item)
    bg = background or ("sky" if rng.random() < 0.2 else "white")
    return place(rng, items, width, height, background=bg)


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
