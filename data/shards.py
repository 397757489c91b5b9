"""Token shards, the files between data/*/prepare.py and train.py (docs/tokens.md §7). Per split:
{split}.ids.bin (int32 tokens), {split}.mask.bin (uint8 loss mask), {split}.offsets.npy (int64 [N + 1],
example k is tokens offsets[k]:offsets[k + 1]); meta.json beside them holds the token layout."""
import json
from pathlib import Path

import numpy as np

from sequence import TokenLayout

FILES = {"ids.bin": np.int32, "mask.bin": np.uint8, "offsets.npy": np.int64}  # per split


class ShardWriter:
    """Writes .tmp files; close() renames them into place, offsets last, so no half shard looks whole."""
    def __init__(self, folder, split):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.files, self.offsets = [open(Path(folder) / f"{split}.{name}.tmp", "wb") for name in FILES], [0]

    def add(self, ids, mask):  # a length mismatch shows as a torn shard in load_shards
        for f, dtype, values in zip(self.files, FILES.values(), (ids, mask)):
            f.write(np.asarray(values, dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))

    def close(self):
        np.save(self.files[-1], np.asarray(self.offsets, FILES["offsets.npy"]))
        for f in self.files:
            f.close()
            Path(f.name).replace(f.name.removesuffix(".tmp"))


def load_shards(folder, split):
    """(ids int32 [T], mask uint8 [T], offsets int64 [N + 1]) of one split, memory-mapped."""
    paths = [Path(folder) / f"{split}.{name}" for name in FILES]
    if not paths[-1].exists():
        raise FileNotFoundError(f"no {split} shard in {folder}; run data/shapes/prepare.py first")
    offsets = np.load(paths[-1])
    ids, mask = (np.memmap(path, dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)  # none maps no file
                 for path, dtype in zip(paths[:2], FILES.values()))
    if not len(ids) == len(mask) == offsets[-1]:
        raise ValueError(f"{folder}/{split} is torn: offsets end at {offsets[-1]}, {len(ids)} ids, {len(mask)} mask")
    return ids, mask, offsets


def read_meta(folder):
    """(meta.json as a dict, its TokenLayout)."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    return meta, TokenLayout(**meta["layout"])
