"""Dual-panel tasks around the sampler: image size, reference panel, a task's prefix and plan, the output files.
A task image is two panels, the reference above the answer (docs/tokens.md §6): with a reference only the lower
rows are drawn; edge/depth/dense without one is an image pair, both panels drawn from the official pair prompt
(docs/sampling.md §6). Not a sampler (sample.py) nor a template (sequence.py writes the token ids).
"""
from pathlib import Path

import torch
from PIL import Image

from sequence import (PAIR_TASKS, i2i_prefix_ids, image_body_plan, image_header_ids, pair_prompt, prompt_ids,
                      split_panels, task_prompt)
from vq import center_crop, pil_to_tensor


def image_size(system, task, width=None, height=None):
    """(width, height) of the whole image (two panels high for a task), checked against the size unit."""
    unit, panels = system.layout.size_unit, 1 if task == "t2i" else 2
    width, height = width or system.size, height or panels * system.size
    for name, side, multiple in (("width", width, unit), ("height", height, panels * unit)):
        if side <= 0 or side % multiple:
            lower = max(multiple, side // multiple * multiple)
            raise ValueError(f"{name} {side} is not a multiple of {multiple}; try {lower} or {lower + multiple}")
    return width, height


def load_reference(path, width, height):
    """The upper panel: a PNG/JPEG, centre-cropped to the panel size the official way."""
    if not path:
        raise ValueError("this task needs --ref IMAGE (the upper panel)")
    try:
        with Image.open(path) as im:
            return center_crop(im.copy(), width, height)
    except FileNotFoundError:
        raise FileNotFoundError(f"reference image {path} does not exist") from None
    except OSError as e:  # not an image, or a damaged one
        raise ValueError(f"cannot read reference image {path}: {e}") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"reference image {path} is too large: {e}") from None


def task_tokens(system, task, prompt, width, height, ref=None, subject=None, dense_map="segmentation map"):
    """-> (prefix ids, plan of the tokens to draw). ref: the upper panel as a path or a code grid (h, w), whose
    rows the prefix then holds; an edge/depth/dense task without one is an image pair (docs/tokens.md §5)."""
    layout, down = system.layout, system.layout.downsample
    pair = task in PAIR_TASKS and ref is None  # the official image-pair mode: both panels from text
    text = (pair_prompt(task, prompt, width, height, dense_map) if pair
            else task_prompt(task, prompt, width, height, subject, dense_map))  # checks the task and its subject
    plan = image_body_plan(height // down, width // down, layout)
    if task == "t2i" or pair:
        return prompt_ids(system.tokenizer, layout, text) + image_header_ids(height, width, layout), plan
    upper = ref if torch.is_tensor(ref) else system.codec.encode(
        pil_to_tensor(load_reference(ref, width, height // 2))[None].to(system.device))[0].cpu()
    if upper.shape != (height // down // 2, width // down):
        raise ValueError(f"reference codes {tuple(upper.shape)} do not fit a {width}x{height} dual panel")
    return i2i_prefix_ids(system.tokenizer, layout, text, upper), plan[(height // down // 2) * (width // down + 1):]


def make_grid(images, columns=None):
    """Paste equally sized images into rows of `columns` (default: one row)."""
    columns, (w, h) = columns or len(images), images[0].size
    grid = Image.new("RGB", (w * columns, h * -(-len(images) // columns)), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def save_outputs(args, rounds, strips, keep):
    """Write the kept samples (each round's with several rounds, plus its strip), their lower panels and a grid.
    rounds: [(images, stats)] a round; strips: one image a sample for several rounds, else None."""
    out, stem = Path(args.out), "".join(c if c.isalnum() else "_" for c in args.prompt[0].lower())[:40].strip("_")
    out.mkdir(parents=True, exist_ok=True)

    def save(image, name):
        image.save(path := out / f"{stem or 'sample'}_{args.task}_{name}.png")
        print(f"saved {path}")
        return path
    for j, i in enumerate(keep):
        for k, (images, _) in enumerate(rounds):
            path = save(images[i], f"s{args.seed}_{j}" + (f"_r{k + 1}" if strips else ""))
            if args.task != "t2i":
                split_panels(images[i])[1].save(path.with_name(path.stem + "_lower.png"))
        if strips:  # the reference, then each round's result
            save(strips[i], f"s{args.seed}_{j}_strip")
    if len(keep) > 1:
        save(make_grid([(strips or rounds[0][0])[i] for i in keep], columns=1 if strips else None), "grid")
