"""How well a checkpoint draws the lower panel of the shapes tasks, without sampling: teacher-forced
cross-entropy per lower-panel token, with the dual panel's codes made three ways (docs/codec.md §7):

  whole       the stacked image encoded whole (how data were made before --panelwise)
  ref alone   the upper codes as sampling makes them from a --ref (that panel encoded alone), the lower
              codes as "whole": what a whole-image-trained model meets at sampling
  panelwise   both panels encoded alone: what a --panelwise-trained model trains on and meets

  python scripts/panel_ce.py --ckpt assets            # ~1 min on one CPU thread
  python scripts/panel_ce.py --ckpt out/fresh --n 60

Not eval.py: a loss is not an accuracy; it tells in a minute whether the model reads its reference.
Examples come from their own seed ("panel_ce", family, i), never a training seed.
"""
import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sequence as S  # noqa: E402
import shapes as W  # noqa: E402
from sample import load_system  # noqa: E402
from vq import pil_to_tensor  # noqa: E402


def lower_panel_ce(system, text, codes):
    """Mean cross-entropy of the lower panel's tokens (its codes and row ends) given everything before them."""
    ids = torch.as_tensor(S.make_example(system.tokenizer, system.layout, text, codes)[0], dtype=torch.long)
    h, w = codes.shape
    lower = (h // 2) * (w + 1)  # then the image end token and SEP close the sequence
    with torch.no_grad():
        logits = system.model(ids[None, :-1])[0]
    return F.cross_entropy(logits[-lower - 2:-2], ids[-lower - 2:-2]).item()  # logits[t] predicts ids[t + 1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", default="assets", help="our checkpoint folder, or a train.py out_dir (its newest)")
    p.add_argument("--n", type=int, default=30, help="examples per task family")
    p.add_argument("--tasks", default=",".join(W.TASK_FAMILIES), help="task families, or extra tasks such as copy")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    system, rows = load_system(args.ckpt), {}
    encode = lambda image, panels=1: system.codec.encode(pil_to_tensor(image)[None], panels)[0]  # noqa: E731
    print(f"{'family':<9}{'whole':>8}{'ref alone':>11}{'panelwise':>11}")
    for task in args.tasks.split(","):
        ce = []
        for i in range(args.n):
            upper, lower, spec = W.make_task(random.Random(f"panel_ce-{task}-{i}"), task, size=system.size)
            text = S.task_prompt(task, spec["prompt"], system.size, 2 * system.size, subject=spec.get("subject"),
                                 dense_map=spec.get("dense_map"))
            whole, alone = encode(S.stack_panels(upper, lower)), encode(upper)
            ce.append([lower_panel_ce(system, text, codes) for codes in
                       (whole, torch.cat([alone, whole[len(alone):]]), torch.cat([alone, encode(lower)]))])
        rows[task] = torch.tensor(ce).mean(0).tolist()
        print(f"{task:<9}" + "".join(f"{v:>{k}.3f}" for v, k in zip(rows[task], (8, 11, 11))), flush=True)
    return rows


if __name__ == "__main__":
    main()
