"""Run every command README.md shows, in its fast form, in a fresh copy of the repository: the check that a
newcomer's first hour works. CI runs it after the test suite (.ci/run); locally:

  python scripts/readme_commands.py            # all of them, ~10 min on 2 CPU cores
  python scripts/readme_commands.py --list     # what would run, and why the rest cannot run here

What it is: the README's ```bash blocks and inline `python ...` commands, each matched to a rule that makes
it fast (fewer steps, fewer examples: flags appended, which override the command's own) or says why it
cannot run on a CPU-only machine (official weights, a GPU, 8 GPUs, an LLM server). A README command that no
rule matches fails the check, so a new command cannot go unchecked. Optional parts written `[...]` are
left out. Not a benchmark: the fast forms prove the commands work, not how fast they are.
"""
import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_GPU, NO_WEIGHTS = "needs a CUDA GPU", "needs the official weights (tests/test_official_release.py covers the layout)"
FAST_TRAIN = "--eval_interval=2 --eval_iters=1 --batch_size=2 --checkpoint_interval=2 --warmup_iters=1"
# (command prefix, flags appended for the fast form, or None and the reason it cannot run here); first match wins
RULES = [
    ("pip install", None, "the install: CI has just run it"),
    ("python -m pytest", None, "the test suite: CI has just run it"),
    ("python -c", None, "a load generator for the busy-machine measurement"),
    ("python train_vq.py", "--n_train=64 --max_steps=2 --eval_every=2 --ckpt_every=2 --batch_size=4 "
     "--mosaic=False", ""),
    ("python -m data.shapes.prepare", "--n=120 --eval_per_task=1", ""),  # also --codec=assets
    ("python -m data.images.prepare", None, NO_WEIGHTS),
    ("python train.py config/finetune_lora_shapes.py", f"--max_iters=2 {FAST_TRAIN}", ""),
    ("python train.py config/train_shapes.py", f"--max_iters=4 {FAST_TRAIN}", ""),
    ("python train.py", None, NO_WEIGHTS),
    ("torchrun", None, "needs CUDA GPUs (tests/test_train.py launches torchrun on the CPU)"),
    ("python sample.py --ckpt Lumina-mGPT-2.0", None, NO_WEIGHTS),
    ("python sample.py --prompt \"a cat\" --think", None, "needs an OpenAI-compatible LLM server"),
    ("python sample.py", "", ""),
    ("python eval.py --ckpt out/weights", None, "needs the weights the prepared GPU run returns"),
    ("python eval.py", "--limit 1 --n 1 --best_of 1 --out_dir out/readme_eval", ""),
    ("python lora.py", "", ""),
    ("python bench.py --model 7B", None, NO_GPU),
    ("python bench.py", "--steps 2", ""),
    ("bash scripts/gpu_run.sh OUT_DIR --dry-run", None, "tests/test_gpu_run.py runs the dry run"),
    ("bash scripts/gpu_run.sh", None, NO_GPU),
]


def readme_commands(text):
    """Commands in ```bash / ```sh blocks (continuations joined, comments and `a && b` split) and inline ones."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip() and not line.startswith("#")]
    commands += re.findall(r"`((?:python|torchrun|bash) [^`]*)`", text)
    return list(dict.fromkeys(re.sub(r"\s+", " ", re.sub(r"\[.*?\]+", "", c)).strip() for c in commands))


def fast_form(command):
    """(command to run or None, note)."""
    for prefix, extra, why in RULES:
        if command.startswith(prefix):
            return (f"{command} {extra}".strip() if extra is not None else None), why
    return None, "no rule: add one to scripts/readme_commands.py"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print each command's fast form and exit")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy of the repository")
    args = p.parse_args(argv)
    plan = [(c, *fast_form(c)) for c in readme_commands((ROOT / "README.md").read_text())]
    unmatched = [c for c, run, why in plan if run is None and why.startswith("no rule")]
    if args.list or unmatched:
        for command, run, why in plan:
            print(f"{'RUN ' if run else 'SKIP'} {command}\n     {run or why}")
        return 1 if unmatched else 0
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    scratch = Path(tempfile.mkdtemp(prefix="readme_"))
    for name in files:  # what a clone has, plus files not yet committed
        if (ROOT / name).is_file():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, scratch / name)
    failed = []
    for command, run, why in plan:
        if run is None:
            print(f"skip  {command}  ({why})", flush=True)
            continue
        t0 = time.time()
        done = subprocess.run(shlex.split(run.replace("python ", f"{sys.executable} ", 1)), cwd=scratch,
                              capture_output=True, text=True)
        print(f"{'ok' if done.returncode == 0 else 'FAIL':<5} {run}  ({time.time() - t0:.0f} s)", flush=True)
        if done.returncode:
            failed.append(run)
            print((done.stdout + done.stderr)[-3000:])
    if not args.keep:
        shutil.rmtree(scratch)
    print(f"{len(failed)} of {sum(r is not None for _, r, _ in plan)} README commands failed" if failed else
          "every README command that can run here ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
