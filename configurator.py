"""nanoGPT's configurator as one function, shared by train.py, train_vq.py and data/*/prepare.py.

Settings are a script's plain globals or a dict of defaults; a config file (Python assignments, see
config/) overrides them, then `--key=value` overrides that. Unknown keys and wrong types are errors.
What it is not: argparse. sample.py, eval.py and bench.py take ordinary flags.
"""
import ast
import sys
from pathlib import Path


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
                raise SystemExit(f"config file {arg} not found; pass a file such as config/train_shapes.py")
            try:
                exec(compile(Path(arg).read_text(), arg, "exec"), {}, overrides := {})
            except Exception as e:
                raise SystemExit(f"config file {arg} does not run: {type(e).__name__}: {e}") from None
            if unknown := sorted(set(overrides) - set(settings)):
                raise SystemExit(f"{arg}: unknown setting(s) {unknown}; known: {', '.join(settings)}")
            settings.update(overrides)
            continue
        key, eq, value = arg[2:].partition("=")
        if key not in settings:
            raise SystemExit(f"unknown setting --{key}; known: {', '.join(settings)}")
        default = settings[key]
        if not eq and isinstance(default, bool):
            value = "True"  # a bare --flag switches a boolean on
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        if isinstance(default, float) and type(parsed) is int:
            parsed = float(parsed)
        if type(parsed) is not type(default):
            raise SystemExit(f"--{key}={value}: expected {type(default).__name__}, got {type(parsed).__name__}")
        settings[key] = parsed
    return settings
