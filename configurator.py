"""nanoGPT's configurator as one function, shared by train.py, train_vq.py and data/*/prepare.py: a script's
settings (its globals, or a dict of defaults) overridden by config files (Python assignments, see config/), then by
`--key=value`; unknown keys and wrong types are errors. It also holds what every script does with bad input
(docs/checkpoints.md §4): checks of settings, devices and output folders before any work, and the top-level handler
that turns an expected error into one line. What it is not: argparse, which sample.py, eval.py and bench.py use."""
import argparse
import ast
import os
import sys
from pathlib import Path

import torch

# A wrong setting, a missing or damaged file: the user's to fix, so one line and no traceback. Anything
# else (TypeError, RuntimeError, ...) is a bug in nanoLumina and keeps its traceback.
EXPECTED = (ValueError, OSError)


def configure(argv, settings, doc=""):
    """Return `settings` (a dict of defaults) updated from config files and --key=value in `argv`.
    `--help` prints `doc` and every setting with its current value, then exits."""
    settings = dict(settings)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(doc.strip(), "\nsettings (--key=value):", *(f"  --{k}={v!r}" for k, v in settings.items()), sep="\n")
            sys.exit(0)
        if not arg.startswith("--"):
            if not Path(arg).is_file():
                raise FileNotFoundError(f"config file {arg} not found; pass a file such as config/train_shapes.py")
            try:
                exec(compile(Path(arg).read_text(), arg, "exec"), {}, overrides := {})
            except Exception as e:
                raise ValueError(f"config file {arg} does not run: {type(e).__name__}: {e}") from None
            if unknown := sorted(set(overrides) - set(settings)):
                raise ValueError(f"{arg}: unknown setting(s) {unknown}; known: {', '.join(settings)}")
            settings.update(overrides)
            continue
        key, eq, value = arg[2:].partition("=")
        if key not in settings:
            raise ValueError(f"unknown setting --{key}; known: {', '.join(settings)}")
        default = settings[key]
        if not eq and isinstance(default, bool):
            value = "True"  # a bare --flag switches a boolean on
        elif not eq:
            raise ValueError(f"--{key} needs a value: --{key}=VALUE (now {default!r})")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        if isinstance(default, float) and type(parsed) is int:
            parsed = float(parsed)
        if type(parsed) is not type(default):
            raise ValueError(f"--{key}={value}: expected {type(default).__name__}, got {type(parsed).__name__}")
        settings[key] = parsed
    return settings


def check_ranges(settings, positive=(), non_negative=(), fraction=()):
    """A ValueError naming the first setting out of range (NaN is): positive (> 0, so >= 1 for counts),
    non_negative, fraction (0 <= x < 1). None means "unset" and passes."""
    rules = ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
             (fraction, lambda v: 0 <= v < 1, "in [0, 1)"))
    for names, ok, wanted in rules:
        for name in names:
            if settings[name] is not None and not ok(settings[name]):
                wanted = ">= 1" if wanted == "> 0" and isinstance(settings[name], int) else wanted
                raise ValueError(f"--{name}={settings[name]!r}: must be {wanted}")


def check_out_dir(path, flag="--out_dir"):
    """A folder this run may create and write into: not a file, under no file. Checked before any work."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise ValueError(f"{flag}={path}: {existing} is a file, not a folder; pass another {flag}")
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"{flag}={path}: {existing} is not writable; pass another {flag}")


def check_device(device):
    """'cpu', 'cuda' or 'cuda:N' present on this machine, else a ValueError saying what to pass."""
    if device == "cpu":
        return
    kind, colon, index = device.partition(":")
    if kind != "cuda" or colon and not index.isdigit():
        raise ValueError(f"device {device!r} is not one of cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but no CUDA device is available here; use cpu")
    if index and int(index) >= (count := torch.cuda.device_count()):
        raise ValueError(f"device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def one_line(error):
    """What a person sees for an expected error (SystemExit with a message, EXPECTED): one line. None for a bug."""
    if isinstance(error, SystemExit) and isinstance(error.code, str):
        return " ".join(error.code.split())
    return " ".join(f"error: {error}".split()) if isinstance(error, EXPECTED) else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse for sample.py and eval.py, whose usage errors are one line like every other bad input."""
    def error(self, message):
        raise SystemExit(f"{self.prog}: error: {message} (see --help)")


def run_main(main, argv=None):
    """The top level of sample.py, eval.py, bench.py, lora.py and data/*/prepare.py: an expected error becomes
    one line on stderr and exit code 2; a bug keeps its traceback."""
    try:
        return main(argv)
    except (SystemExit, *EXPECTED) as e:
        if (message := one_line(e)) is None:
            raise
        print(message, file=sys.stderr)
        raise SystemExit(2) from None


def excepthook(kind, error, traceback):
    """The same for the flat scripts (train.py, train_vq.py), which have no main() to wrap: they set
    `sys.excepthook = excepthook` before configure(), so a bad setting too ends as one line, exit code 2."""
    if (message := one_line(error)) is None:
        return sys.__excepthook__(kind, error, traceback)
    print(message, file=sys.stderr)
    raise SystemExit(2)
