"""Token shards, the files between data/*/prepare.py and train.py (docs/tokens.md §7). Per split:
{split}.ids.bin (int32 tokens), {split}.mask.bin (uint8 loss mask), {split}.offsets.npy (int64 [N + 1],
example k is tokens offsets[k]:offsets[k + 1]), optionally {split}.kinds.npy (uint8 [N], each example's kind
as an index into meta.json's "kinds"); meta.json beside them holds the token layout."""
from pathlib import Path

import numpy as np

from checkpoint import read_json
from sequence import TokenLayout

FILES = {"ids.bin": np.int32, "mask.bin": np.uint8, "offsets.npy": np.int64}  # per split


class ShardWriter:
    """Writes .tmp files; close() renames them into place, offsets last, so no half shard looks whole."""
    def __init__(self, folder, split):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.files, self.offsets = [open(Path(folder) / f"{split}.{name}.tmp", "wb") for name in FILES], [0]
        self.kinds, self.kinds_path = [], Path(folder) / f"{split}.kinds.npy"

    def add(self, ids, mask, kind=None):  # a length mismatch shows as a torn shard in load_shards
        for f, dtype, values in zip(self.files, FILES.values(), (ids, mask)):
            f.write(np.asarray(values, dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.kinds.append(kind)

    def close(self):
        self.kinds_path.unlink(missing_ok=True)  # a previous build's labels never describe this one
        if self.kinds and None not in self.kinds:
            with open(f"{self.kinds_path}.tmp", "wb") as f:
                np.save(f, np.asarray(self.kinds, np.uint8))
            Path(f.name).replace(self.kinds_path)
        np.save(self.files[-1], np.asarray(self.offsets, FILES["offsets.npy"]))
        for f in self.files:
            f.close()
            Path(f.name).replace(f.name.removesuffix(".tmp"))


def remove_temp_files(folder, pid="*"):
    """The .tmp files of process `pid` (default: any) in folder and folder/parts: a killed run's leftovers
    (ShardWriter's, checkpoint.atomic_write's <name>.<pid>.tmp) go when the next run starts."""
    pattern = "*.tmp" if pid == "*" else f"*.{pid}.tmp"
    for tmp in [*Path(folder).glob(pattern), *(Path(folder) / "parts").glob(pattern)]:
        tmp.unlink(missing_ok=True)


def load_shards(folder, split, meta=None):
    """(ids int32 [T], mask uint8 [T], offsets int64 [N + 1]) of one split, memory-mapped; checked against
    the counts of `meta` (meta.json as a dict) when it has them."""
    paths = [Path(folder) / f"{split}.{name}" for name in FILES]
    if not paths[-1].exists():
        raise FileNotFoundError(f"no {split} shard in {folder}; run data/shapes/prepare.py first")
    try:
        offsets = np.load(paths[-1])
    except (ValueError, OSError, EOFError) as e:  # not an .npy file, or a truncated one
        raise ValueError(f"{paths[-1]} is damaged ({e}); prepare the data again") from None
    if offsets.dtype != np.int64 or offsets.ndim != 1 or not len(offsets) or offsets[0] or (np.diff(offsets) < 0).any():
        raise ValueError(f"{paths[-1]} does not hold rising int64 offsets from 0; prepare the data again")
    if not all(path.exists() for path in paths[:2]):
        raise FileNotFoundError(f"{folder}/{split} is torn: {paths[0].name} or {paths[1].name} is missing")
    ids, mask = (np.memmap(path, dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)  # none maps no file
                 for path, dtype in zip(paths[:2], FILES.values()))
    if not len(ids) == len(mask) == offsets[-1]:
        raise ValueError(f"{folder}/{split} is torn: offsets end at {offsets[-1]}, {len(ids)} ids, {len(mask)} mask")
    counts = (meta or {}).get("counts", {})  # examples per split, and tokens per split
    examples, tokens = len(offsets) - 1, len(ids)
    if counts.get(split, examples) != examples or counts.get("tokens", {}).get(split, tokens) != tokens:
        raise ValueError(f"{folder}/meta.json does not match the {split} shard ({len(offsets) - 1} examples, "
                         f"{len(ids)} tokens): they come from two builds; prepare the data again")
    return ids, mask, offsets


def load_kinds(folder, split, meta):
    """Each example's kind name in one split, or None where the data carries no labels (ShardWriter.add kind)."""
    path = Path(folder) / f"{split}.kinds.npy"
    if not path.exists() or "kinds" not in meta:
        return None
    kinds = np.load(path)
    if len(kinds) != meta.get("counts", {}).get(split, len(kinds)) or kinds.max(initial=0) >= len(meta["kinds"]):
        raise ValueError(f"{path} does not match {folder}/meta.json; prepare the data again")
    return np.asarray(meta["kinds"])[kinds]


def read_meta(folder):
    """(meta.json as a dict, its TokenLayout), checked: vocab_size is the layout's."""
    meta = read_json(Path(folder) / "meta.json")
    try:
        layout = TokenLayout(**meta["layout"])
    except (KeyError, TypeError) as e:  # a missing key, a missing or unknown layout field
        raise ValueError(f"{folder}/meta.json lacks a token layout ({type(e).__name__}: {e}); "
                         "prepare the data again") from None
    if meta.get("vocab_size") != layout.vocab_size:
        raise ValueError(f"{folder}/meta.json: vocab_size {meta.get('vocab_size')} is not its layout's "
                         f"{layout.vocab_size}; prepare the data again")
    return meta, layout
