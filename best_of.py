"""Best-of-N and thinking, sample.py's inference-time extras: the paper's high-quality sampling (§3.3.1,
docs/sampling.md §4). Best-of-N keeps the best of N samples by a verifier's score; `make_scorer` builds
score(image) before sampling, so a prompt the verifier cannot read fails before any work (shapes: a prompt via
`verify.parse_prompt`, an edit via `edit_spec`). Thinking: an LLM rewrites the prompt first (`think`).
Not a sampler (sample.py) or a detector (verify.py).

  python sample.py --task edit --ref assets/refs/scene.png --prompt "make the blue circle red" --best_of 4
"""
import importlib
import json
import os
import re
import sys
import urllib.request
from dataclasses import replace

import verify
from sequence import DENSE_MAPS, split_panels
from shapes import BACKGROUND_WORDS, COLORS, HALVES, SHAPES, Obj, target_rows

# the edit instructions shapes.make_task writes: "make the red circle blue", "move the red circle to the left", ...
EDIT = re.compile(r"(make|recolor|change the colou?r of|remove|delete|move|add) (?:the|an?) (\w+) (\w+)"
                  r"(?: (?:to )?(?:the )?(\w+))?|change the background to (.+)")
RECOLOR = ("make", "recolor", "change the color of", "change the colour of")
BACKGROUND_NAMES = {words: name for name, words in BACKGROUND_WORDS.items()}  # "light blue" -> "sky"
THINK_INSTRUCTION = ("You rewrite prompts for an image generator. Think about what the user wants, then "
                     "reply with one improved, concrete prompt describing objects, colours, counts and "
                     "positions explicitly. Reply with the prompt only.")


def add_best_of_args(parser):
    parser.add_argument("--best_of", type=int, default=1, help="sample N in a batch, keep the verifier's best")
    parser.add_argument("--verifier", default="shapes", help="'shapes' or module:function(image, prompt) -> score")
    parser.add_argument("--think", action="store_true", help="rewrite the prompt with an LLM first")
    parser.add_argument("--think_url", default="http://127.0.0.1:8000/v1", help="an OpenAI-compatible endpoint")


def reference_spec(reference, task):
    """The objects detected in a reference panel as a verifier spec of `task` -> (spec, objects)."""
    objs = [Obj(d["shape"], d["color"], x0, y0, x1 - x0 + 1) for d in verify.detect(reference)
            for x0, y0, x1, _ in [d["bbox"]]]
    return {"task": task, "width": reference.width, "height": reference.height, "target": target_rows(objs),
            "relation": None}, objs


def edit_spec(reference, instruction):
    """The verifier's spec of the expected lower panel: the edit applied to the objects detected in
    the reference; a one-line ValueError if it is not a shapes-world edit of an object shown once."""
    spec, objs = reference_spec(reference, "edit")
    spec["background"] = verify.background_of(reference)
    m = EDIT.fullmatch(instruction.lower().strip().rstrip("."))
    verb, color, shape, arg, background = m.groups() if m else (None,) * 5
    hits = [i for i, o in enumerate(objs) if (o.shape, o.color) == (shape, color)]
    if background in BACKGROUND_NAMES:
        return dict(spec, background=BACKGROUND_NAMES[background])
    if verb == "add" and shape in SHAPES and color in COLORS and arg is None:
        return dict(spec, target=target_rows(objs + [Obj(shape, color, 0, 0, 0)]), anywhere=len(objs))
    if len(hits) == 1 and verb in ("remove", "delete") and arg is None:
        return dict(spec, target=target_rows(objs[:hits[0]] + objs[hits[0] + 1:]))
    if len(hits) == 1 and verb == "move" and arg in HALVES:
        return dict(spec, moved=hits[0], half=arg)
    if len(hits) == 1 and verb in RECOLOR and arg in COLORS:
        objs[hits[0]] = replace(objs[hits[0]], color=arg)
        return dict(spec, target=target_rows(objs))
    raise ValueError(f"--best_of cannot verify the edit {instruction!r}: expected e.g. 'make the red circle "
                     f"blue' of an object the reference shows once ({len(objs)} objects detected)")


def verify_chain(strip, prompts):
    """Score of a multi-round edit's strip (reference, then each round's lower panel): the mean over rounds of
    panel k verified against edit k applied to the panel before it; a round whose edit cannot be read scores 0."""
    width = strip.width // (len(prompts) + 1)
    panels = [strip.crop((k * width, 0, (k + 1) * width, strip.height)) for k in range(len(prompts) + 1)]
    scores = []
    for before, after, prompt in zip(panels, panels[1:], prompts):
        try:
            scores.append(verify.verify(after, edit_spec(before, prompt)))
        except ValueError:  # the previous round lost the object this edit names
            scores.append(0.0)
    return sum(scores) / len(scores)


def make_scorer(verifier, task, prompt, reference=None, pair_map=None):
    """-> score(image), taken on the image or on a task's lower panel. verifier: 'shapes' or 'module:function'
    taking (image, prompt); reference: the upper panel, for an edit or a segmentation map of it (dense); prompt
    a list: a multi-round edit, scored on its strip (verify_chain); pair_map: an image pair's lower map, scored
    on both panels (docs/sampling.md §4)."""
    whole = task == "t2i" or pair_map or isinstance(prompt, list)
    lower = (lambda im: im) if whole else (lambda im: split_panels(im)[1])
    if verifier == "shapes" and isinstance(prompt, list):
        edit_spec(reference, prompt[0])  # the first round is checkable now; later ones on the model's own output
        return lambda strip: verify_chain(strip, prompt)
    if verifier == "shapes":
        if task == "edit":
            spec = edit_spec(reference, prompt)
        elif task == "dense" and reference is not None:  # a segmentation: the reference's objects, not the prompt
            spec = dict(reference_spec(reference, "dense")[0], dense_map=DENSE_MAPS["dense"])
        else:
            spec = verify.parse_prompt(prompt)
        spec = dict(spec, pair_map=pair_map) if pair_map else spec
        return lambda image: verify.verify(lower(image), spec)
    module, _, name = verifier.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load verifier {verifier!r} ({e}); expected 'module:function'") from None
    return lambda image: float(function(lower(image), "; ".join(prompt) if isinstance(prompt, list) else prompt))


def pick_best(images, score):
    """The index of the image with the best score (the first on a tie), saying which it was."""
    scores = [score(image) for image in images]
    best = max(range(len(images)), key=scores.__getitem__)
    print(f"best of {len(images)}: sample {best} (scores {', '.join(f'{s:.2f}' for s in scores)})")
    return best


def think(prompt, url, timeout=30.0):
    """Rewrite `prompt` through an OpenAI-compatible chat endpoint; on any failure, warn and keep it."""
    body = {"model": "gpt-4o", "messages": [{"role": "system", "content": THINK_INSTRUCTION},
                                            {"role": "user", "content": prompt}]}
    key = {"Authorization": f"Bearer {os.environ['THINK_API_KEY']}"} if os.environ.get("THINK_API_KEY") else {}
    try:
        request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", **key})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            rewritten = json.loads(response.read())["choices"][0]["message"]["content"].strip()
        if not rewritten:
            raise ValueError("empty reply")
        print(f"prompt rewritten: {rewritten}")
        return rewritten
    except Exception as e:  # the endpoint is optional: never let it stop sampling
        print(f"warning: --think failed ({type(e).__name__}: {e}); using the prompt as given", file=sys.stderr)
        return prompt
