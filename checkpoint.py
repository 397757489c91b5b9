"""Our checkpoint format, in one place: `<name>.safetensors` (weights) + `<name>.json` (a dataclass
config), written atomically and read strictly by every file that saves weights (docs/checkpoints.md).
What it is not: a key map for the official layouts (model.py and vq.py own those).
"""
import json
import os
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sequence import Tokenizer

MAX_LISTED = 5  # keys named per kind of problem in an error message
SAMPLING_KEYS = ("cfg", "top_k", "temperature", "size", "panelwise")  # sampling.json (docs/checkpoints.md §1)


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


def read_json(path):
    """A JSON file's value; a missing or malformed file is a one-line error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON or bad UTF-8
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt, write it again") from None


def read_config(path, cls):
    """Read a JSON config into dataclass `cls`; unknown keys and values of the wrong type are an error, not dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is {path.parent} a nanoLumina checkpoint folder?")
    values = read_json(path)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of {cls.__name__} fields")
    if unknown := sorted(values.keys() - {f.name for f in fields(cls)}):
        raise ValueError(f"{path} has keys {cls.__name__} does not know: {', '.join(unknown)}; "
                         "was it written by another version or for another model?")
    for f in (f for f in fields(cls) if f.default is not MISSING):  # the default's type; JSON has no tuples
        want, value = type(f.default), values.get(f.name, f.default)
        if not (type(value) is want or want is float and type(value) is int or want is tuple and type(value) is list):
            raise ValueError(f"{path}: {f.name} is {value!r}, expected {want.__name__}; the file is damaged")
    return cls(**values)


def finished_checkpoints(folder):
    """train.py's checkpoints in a folder, oldest first: written under a .tmp name and renamed when whole."""
    return sorted(p for p in Path(folder).glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp"))


def latest(folder):
    """A train.py out_dir -> its newest finished checkpoint; any other folder as it is."""
    runs = finished_checkpoints(folder) if Path(folder).is_dir() else []
    return runs[-1] if runs else Path(folder)


def check_folder(folder, codec=None):
    """Our checkpoint folder's parts agree (docs/checkpoints.md §4): tokenizer ids + codec codes = the model's
    vocab_size, else every image code would be read at the wrong offset; sampling.json holds numbers. `codec`:
    another codec folder. An official release (config.json) only needs a readable tokenizer here."""
    folder = latest(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    text_ids = read_tokenizer(folder / "tokenizer.json").vocab_size
    if (folder / "config.json").is_file():
        return
    if not (folder / "model.json").is_file():
        raise FileNotFoundError(f"{folder} has neither model.json (ours) nor config.json (official): not a checkpoint")
    model_vocab, codec = _int_field(folder / "model.json", "vocab_size"), Path(codec or folder)
    # a codec file (an official .ckpt) has no vq.json to read; its size is checked when it loads
    if codec.is_dir() and text_ids + (codes := _int_field(codec / "vq.json", "n_embed")) != model_vocab:
        raise ValueError(f"{folder}: tokenizer.json has {text_ids} ids + the codec's {codes} codes = "
                         f"{text_ids + codes}, but the model's vocab_size is {model_vocab}: this tokenizer is not "
                         "the model's; copy the tokenizer.json of the data it was trained on")
    sampling = read_json(folder / "sampling.json") if (folder / "sampling.json").is_file() else {}
    kinds = lambda key: (bool,) if key == "panelwise" else (int, float)  # noqa: E731
    if not isinstance(sampling, dict) or any(k not in SAMPLING_KEYS or type(v) not in kinds(k)
                                             for k, v in sampling.items()):
        raise ValueError(f"{folder}/sampling.json must map cfg, top_k, temperature, size to numbers and panelwise "
                         f"to true/false, not {sampling}")


def read_tokenizer(path):
    """sequence.Tokenizer from a tokenizer.json; a missing, truncated or foreign file is one line naming it."""
    read_json(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{path} is not a tokenizer ({str(e)[:100]})") from None


def _int_field(path, key):
    values = read_json(path)
    if not isinstance(values, dict) or type(values.get(key)) is not int:
        raise ValueError(f"{path} has no integer {key}; the file is damaged")
    return values[key]


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
    where = {}  # key -> its file, of which only the header is read until a tensor is asked for
    for file in files:
        try:
            f = safe_open(str(file), framework="pt", device="cpu")
        except SafetensorError as e:  # a missing file raises FileNotFoundError, which names it
            raise ValueError(f"cannot read checkpoint file {file}: {e} (corrupt or truncated?)") from None
        where.update((k, f) for k in f.keys() if not k.startswith(ignore))
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k, f in where.items()}
    check_keys({k: tuple(t.shape) for k, t in tensors.items()}, shapes, what)
    for key, tensor in tensors.items():
        tensor.copy_(where[key].get_tensor(key))


def safetensors_files(folder):
    """A Hugging Face folder's weight files: the shards its index names, or model.safetensors."""
    folder = Path(folder)
    if (index := folder / "model.safetensors.index.json").is_file():
        if not isinstance(weight_map := read_json(index).get("weight_map"), dict):  # .get: a list fails too
            raise ValueError(f"{index} has no weight_map; download the release again")
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
