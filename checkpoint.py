"""Our checkpoint format, in one place: `<name>.safetensors` (weights) + `<name>.json` (a dataclass
config), each written atomically and read strictly.

What it is: the one helper that model.py, vq.py, quant.py, train.py and train_vq.py use to write
and read weights, so "atomic" and "strict" mean the same thing everywhere (docs/checkpoints.md).
What it is not: the official HF-layout reader (model.py and vq.py own those key maps).
"""
import json
import os
from dataclasses import asdict, fields
from pathlib import Path


def atomic_write(path, write):
    """Call `write(tmp_path)`, then rename onto `path`: a reader or a crash never sees half a file.
    The temp name carries the pid, so a killed run's leftover cannot collide with a live one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(folder, name, state_dict, config):
    """Write `<name>.safetensors` then `<name>.json` (the config dataclass) into `folder`."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(folder / f"{name}.safetensors", lambda p: save_file(state, str(p)))
    atomic_write(folder / f"{name}.json", lambda p: p.write_text(json.dumps(asdict(config), indent=1)))


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
    from safetensors import safe_open
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
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        problems = [f"{label}: {few(xs)}" for label, xs in
                    (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)) if xs]
        raise ValueError(f"{what} does not match the config; " + "; ".join(problems))
