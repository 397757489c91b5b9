"""Our checkpoint format, in one place: `<name>.safetensors` (weights) + `<name>.json` (a dataclass
config), written atomically and read strictly by every file that saves weights (docs/checkpoints.md).
What it is not: a key map for the official layouts (model.py and vq.py own those).
"""
import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MAX_LISTED = 5  # keys named per kind of problem in an error message


def atomic_write(path, write):
    """Call `write(tmp_path)`, then rename onto `path`: a reader or a crash never sees half a file.
    The temp name carries the pid, so a killed run's leftover cannot collide with a live one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(folder, name, state_dict, config):
    """Write `<name>.safetensors` then `<name>.json` (the config dataclass) into `folder`."""
    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(folder / f"{name}.safetensors", lambda p: save_file(state, str(p)))
    write_config(folder / f"{name}.json", config)


def write_config(path, config):
    atomic_write(path, lambda p: p.write_text(json.dumps(asdict(config), indent=1)))


def read_config(path, cls):
    """Read a JSON config into dataclass `cls`; unknown or malformed keys are an error, not dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is {path.parent} a nanoLumina checkpoint folder?")
    try:
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt, write it again") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of {cls.__name__} fields")
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{path} has keys {cls.__name__} does not know: {', '.join(unknown)}; "
                         "was it written by another version or for another model?")
    return cls(**values)


def tensor_shapes(file):
    """{key: shape} from a safetensors header, without reading the tensors."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {file} is missing") from None
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"cannot read checkpoint file {file}: {e} (corrupt or truncated?)") from None


def check_keys(expected, found, what="checkpoint"):
    """Strict loading: raise one ValueError naming missing, unexpected and misshaped keys.
    `expected` and `found` map key -> shape (tuples)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{k} {list(found[k])} vs model {list(expected[k])}"
                 for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or misshaped:
        def few(xs):
            return ", ".join(xs[:MAX_LISTED]) + (f" (+{len(xs) - MAX_LISTED} more)" if len(xs) > MAX_LISTED else "")
        problems = [f"{label}: {few(xs)}" for label, xs in
                    (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)) if xs]
        raise ValueError(f"{what} does not match the config; " + "; ".join(problems))


def load_into(tensors, files, what="checkpoint", ignore=()):
    """Strict streaming load into `tensors` ({key: tensor}): check every key and shape in the files'
    headers (keys starting with `ignore` skipped), then copy one tensor at a time."""
    found = {k: shape for file in files for k, shape in tensor_shapes(file).items() if not k.startswith(ignore)}
    check_keys({k: tuple(t.shape) for k, t in tensors.items()}, found, what)
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in sorted(tensors.keys() & set(f.keys())):
                    tensors[key].copy_(f.get_tensor(key))


def safetensors_files(folder):
    """A Hugging Face folder's weight files: the shards its index names, or model.safetensors."""
    folder = Path(folder)
    if (index := folder / "model.safetensors.index.json").is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
