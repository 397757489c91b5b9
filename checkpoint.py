"""Our checkpoint format, in one place: `<name>.safetensors` (weights) + `<name>.json` (a dataclass
config), written atomically and read strictly by every file that saves weights (docs/checkpoints.md).
What it is not: a key map for the official layouts (model.py and vq.py own those).
"""
import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

MAX_LISTED = 5  # keys named per kind of problem in an error message


def atomic_write(path, write):
    """Call `write(tmp_path)`, then rename onto `path`: never half a file (docs/checkpoints.md §3)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # the pid: a killed run's leftover never collides
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(folder, name, state_dict, config):
    """Write `<name>.safetensors` then `<name>.json` (the config dataclass) into `folder`."""
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(Path(folder) / f"{name}.safetensors", lambda p: save_file(state, str(p)))
    write_config(Path(folder) / f"{name}.json", config)


def write_config(path, config):
    atomic_write(path, lambda p: p.write_text(json.dumps(asdict(config), indent=1)))


def read_config(path, cls):
    """Read a JSON config into dataclass `cls`; unknown or malformed keys are an error, not dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is {path.parent} a nanoLumina checkpoint folder?")
    try:
        values = json.loads(path.read_text())
    except ValueError as e:  # bad JSON or bad UTF-8
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt, write it again") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of {cls.__name__} fields")
    if unknown := sorted(values.keys() - {f.name for f in fields(cls)}):
        raise ValueError(f"{path} has keys {cls.__name__} does not know: {', '.join(unknown)}; "
                         "was it written by another version or for another model?")
    return cls(**values)


def check_keys(expected, found, what="checkpoint"):
    """Strict loading: one ValueError naming the missing, unexpected and misshaped keys of two {key: shape tuple}."""
    problems = dict(missing=sorted(expected.keys() - found.keys()), unexpected=sorted(found.keys() - expected.keys()),
                    misshaped=[f"{k} {list(found[k])} vs model {list(expected[k])}"
                               for k in sorted(expected.keys() & found.keys()) if found[k] != expected[k]])
    listed = {kind: ", ".join(keys[:MAX_LISTED]) + (f" (+{len(keys) - MAX_LISTED} more)" if keys[MAX_LISTED:] else "")
              for kind, keys in problems.items() if keys}
    if listed:
        raise ValueError(f"{what} does not match the config; " + "; ".join(f"{k}: {v}" for k, v in listed.items()))


@torch.no_grad()
def load_into(tensors, files, what="checkpoint", ignore=()):
    """Strict streaming load into `tensors` ({key: tensor}): check every key and shape in the files'
    headers (keys starting with `ignore` skipped), then copy one tensor at a time."""
    where = {k: f for f in map(_open, files) for k in f.keys() if not k.startswith(ignore)}  # key -> its file
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k, f in where.items()}
    check_keys({k: tuple(t.shape) for k, t in tensors.items()}, shapes, what)
    for key, tensor in tensors.items():
        tensor.copy_(where[key].get_tensor(key))


def _open(file):
    """A safetensors file, of which only the header is read until a tensor is asked for."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as e:  # a missing file raises FileNotFoundError, which names it
        raise ValueError(f"cannot read checkpoint file {file}: {e} (corrupt or truncated?)") from None


def safetensors_files(folder):
    """A Hugging Face folder's weight files: the shards its index names, or model.safetensors."""
    folder = Path(folder)
    if (index := folder / "model.safetensors.index.json").is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
