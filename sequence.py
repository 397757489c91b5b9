"""
Token sequences of Lumina-mGPT 2.0: the token layout, the text tokenizer, Uni-Rep image blocks,
the task prompt templates, training examples with their loss masks, and the token shards.

Implements shared/specs/lumina_mgpt2.md §2 (tokenization and sequence format), §4.2 (the
unconditional CFG context and the image-structure plan), §6 (prompt templates, dual panels) and
§7 (what is supervised, 10% text dropout). Every special token id of the project lives here, in
`TokenLayout`; nothing else in the repo writes an id literal.

What it is not: a model, a sampler or a codec. It turns strings and code grids [h, w] into id
lists and back; sample.py and train.py decide what to do with them. It imports nothing from the
project. Not a script: `python -m pytest -q tests/test_sequence.py` exercises it.
"""
import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

# -----------------------------------------------------------------------------
# Special token strings (§2.2). The official checkpoint's tokenizer is Qwen2.5's BPE plus added
# tokens with these names; our small tokenizer carries the same strings as added tokens.

BOS = "<|endoftext|>"      # Qwen has no BOS, so the official code uses its eos string (§2.1)
IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"       # also the generation EOS
EOL = "<reserved08799>"    # ends every row of codes, the last one included
SEP = "<reserved08706>"    # ends every conversation turn (§2.4)
MAX_GRIDS = 64             # size tokens our tokenizer carries: up to 64 * 32 = 2048 px


def size_token(n):
    """The string of the size token meaning n grids of 32 px, e.g. 24 -> '<reserved08824>'."""
    return f"<reserved{8800 + n:05d}>"


SPECIAL_TOKENS = [BOS, IMAGE_START, IMAGE_END, EOL, SEP] + [size_token(n) for n in range(1, MAX_GRIDS + 1)]

# -----------------------------------------------------------------------------
# Text tokenizer: a thin wrapper over HF `tokenizers`


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    @classmethod
    def from_file(cls, path):
        """Load tokenizer.json, or the tokenizer.json inside a checkpoint folder."""
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; train one with sequence.train_tokenizer "
                                    "(data/shapes/prepare.py does) or point at an official checkpoint folder")
        return cls(HFTokenizer.from_file(path))

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids  # BOS is added by hand (§2.1)

    def decode(self, ids):
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token):
        return self.hf.token_to_id(token)

    @property
    def vocab_size(self):  # size of the id space (max id + 1): official added ids need not be dense
        return max(self.hf.get_vocab(with_added_tokens=True).values()) + 1


def train_tokenizer(texts, path, vocab_size=1024):
    """Train a byte-level BPE on texts (the shapes world's prompts), add the special strings, save."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)
    return Tokenizer(tok)

# -----------------------------------------------------------------------------
# Token layout: every special id, in one place


@dataclass(frozen=True)
class TokenLayout:
    bos_id: int
    image_start_id: int
    image_end_id: int
    eol_id: int
    sep_id: int
    image_code_offset: int   # code c <-> id image_code_offset + c
    codebook_size: int
    size_token_ids: tuple    # size_token_ids[n - 1] means n grids
    size_unit: int = 32      # pixels per size token ("patch_size", §2.3)
    downsample: int = 8      # pixels per code (MoVQGAN, §3)

    def __post_init__(self):  # meta.json hands size_token_ids back as a list
        object.__setattr__(self, "size_token_ids", tuple(self.size_token_ids))

    @classmethod
    def official(cls, tokenizer):
        """The released checkpoints' layout, ids read from the tokenizer and checked against §2.2."""
        ids, sizes = _special_ids(tokenizer)
        for name, want in (("image_start_id", 151665), ("image_end_id", 151666), ("eol_id", 151670)):
            if ids[name] != want:
                raise ValueError(f"{name} is {ids[name]} in this tokenizer, officially {want}: "
                                 "is this the Lumina-mGPT 2.0 tokenizer.json?")
        return cls(**ids, image_code_offset=155000, codebook_size=16384, size_token_ids=sizes)

    @classmethod
    def ours(cls, tokenizer, codebook_size):
        """Our reduced-scale layout: same special strings, image codes right after the vocabulary."""
        ids, sizes = _special_ids(tokenizer)
        return cls(**ids, image_code_offset=tokenizer.vocab_size, codebook_size=codebook_size, size_token_ids=sizes)

    @property
    def vocab_size(self):
        return self.image_code_offset + self.codebook_size

    def size_id(self, pixels):
        """The size token for a side of `pixels` pixels (a multiple of 32)."""
        n = pixels // self.size_unit
        if pixels % self.size_unit or not 1 <= n <= len(self.size_token_ids):
            raise ValueError(f"image side {pixels} px is not a multiple of {self.size_unit} between "
                             f"{self.size_unit} and {self.size_unit * len(self.size_token_ids)}")
        return self.size_token_ids[n - 1]

    def grids(self, size_id):
        """Number of 32 px grids a size token means (inverse of size_id)."""
        if size_id not in self.size_token_ids:
            raise ValueError(f"id {size_id} is not a size token")
        return self.size_token_ids.index(size_id) + 1

    def to_dict(self):
        return dataclasses.asdict(self)


def _special_ids(tokenizer):
    """({field: id} of the five special tokens, size token ids for n = 1, 2, ... as far as present)."""
    names = (("bos_id", BOS), ("image_start_id", IMAGE_START), ("image_end_id", IMAGE_END), ("eol_id", EOL),
             ("sep_id", SEP))
    ids = {f: tokenizer.token_to_id(s) for f, s in names}
    missing = [f"{s} ({f})" for f, s in names if ids[f] is None]
    missing += [] if tokenizer.token_to_id(size_token(1)) else [f"size tokens {size_token(1)}..."]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}: it must carry the special strings of sequence.py")
    sizes = [tokenizer.token_to_id(size_token(n)) for n in range(1, MAX_GRIDS + 1)]
    return ids, tuple(sizes[:sizes.index(None)] if None in sizes else sizes)


# -----------------------------------------------------------------------------
# Uni-Rep image blocks (§2.3): [start, h-size, w-size, row_0 codes, EOL, ..., row_{h-1} codes, EOL, end]


def image_header_ids(height_px, width_px, layout):
    return [layout.image_start_id, layout.size_id(height_px), layout.size_id(width_px)]


def image_body_plan(code_h, code_w, layout):
    """Per token after the header: the forced id (EOL, image end) or -1 for "any image code" (§4.2)."""
    plan = torch.full((code_h, code_w + 1), -1, dtype=torch.long)
    plan[:, -1] = layout.eol_id
    return torch.cat([plan.flatten(), torch.tensor([layout.image_end_id])])  # (code_h*(code_w+1)+1,)


def _rows(codes, layout):
    rows = torch.as_tensor(codes, dtype=torch.long) + layout.image_code_offset  # (h, w)
    eol = torch.full((rows.shape[0], 1), layout.eol_id, dtype=torch.long)
    return torch.cat([rows, eol], dim=1).flatten().tolist()  # (h*(w+1),)


def image_to_ids(codes, layout):
    """Code grid [h, w] -> the image block, exactly as the official item processor builds it."""
    h, w = codes.shape
    header = image_header_ids(h * layout.downsample, w * layout.downsample, layout)
    return header + _rows(codes, layout) + [layout.image_end_id]


def ids_to_codes(ids, layout):
    """The image block -> LongTensor [h, w], raising a ValueError that names what is malformed."""
    ids = [int(i) for i in ids]
    if len(ids) < 4 or ids[0] != layout.image_start_id:
        raise ValueError("image block must begin with the image start token followed by two size tokens")
    per_grid = layout.size_unit // layout.downsample  # codes per 32 px grid
    h, w = layout.grids(ids[1]) * per_grid, layout.grids(ids[2]) * per_grid
    body, rows = ids[3:], []
    for r in range(h):
        row = body[r * (w + 1):(r + 1) * (w + 1)]
        if layout.eol_id not in row:
            raise ValueError(f"row {r} has no end-of-line token within {w + 1} tokens (missing EOL)")
        if row.index(layout.eol_id) != w:
            raise ValueError(f"row {r} is ragged: EOL after {row.index(layout.eol_id)} codes, expected {w}")
        bad = [i for i in row[:w] if not 0 <= i - layout.image_code_offset < layout.codebook_size]
        if bad:
            raise ValueError(f"row {r} holds id {bad[0]}, which is not an image code")
        rows.append(row[:w])
    tail = body[h * (w + 1):]
    if tail != [layout.image_end_id]:
        raise ValueError(f"expected the image end token after {h} rows, found {tail[:3]}"
                         + (" (truncated block)" if not tail else ""))
    return torch.tensor(rows, dtype=torch.long) - layout.image_code_offset  # (h, w)

# -----------------------------------------------------------------------------
# Prompts (§6). Strings from the official code are verbatim; the others say where they come from.

TASKS = ("t2i", "edge", "depth", "subject", "edit", "dense")
_PAIR = ("Generate a dual-panel image of {w}x{h} where the <{target} half> displays a <{x}>, while the "
         "<{kept} half> retains the original image for direct visual comparison:\n{prompt}")


def t2i_prompt(prompt, width=None, height=None):
    """Official T2I template; without a size it is the 10% size-free training variant (§6)."""
    if width is None:
        return f"Generate an image according to the following prompt:\n{prompt}"
    return f"Generate an image of {width}x{height} according to the following prompt:\n{prompt}"


def task_prompt(task, prompt, width, height, subject=None, dense_map="segmentation map"):
    """The system prompt of a task; width x height is the whole dual-panel image (upper over lower)."""
    if task == "t2i":
        return t2i_prompt(prompt, width, height)
    if task in ("edge", "depth"):  # official i2i template: condition map on top, image below
        x = {"edge": "canny edge map", "depth": "depth map"}[task]
        return _PAIR.format(w=width, h=height, target="upper", x=x, kept="lower", prompt=prompt)
    if task == "dense":  # official image-pair template: image on top, its map below;
        # "segmentation map" is ours (the official list has depth/canny/hed/pose), in the same slot.
        return _PAIR.format(w=width, h=height, target="lower", x=dense_map, kept="upper", prompt=prompt)
    if task == "subject":  # the paper's Table 3 wording (the code's i2i string is a placeholder sentence)
        if not subject:
            raise ValueError("the subject task needs subject=..., a description of the upper panel's object")
        return (f"Generate a dual-panel image of {width}x{height} where the <upper half> displays: {subject}, "
                f"while the <lower half> shows the image according to the object and following prompt: {prompt}")
    if task == "edit":  # ours, in the official style: the paper's editing wording is not in the code
        return (f"Generate a dual-panel image of {width}x{height} where the <upper half> displays the original "
                f"image, while the <lower half> shows it after the following edit instruction:\n{prompt}")
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def prompt_ids(tokenizer, layout, text):
    """A human turn: [BOS] + text + [SEP] (§2.4); the model answers with an image block."""
    return [layout.bos_id] + tokenizer.encode(text) + [layout.sep_id]


def unconditional_ids(ids, layout):
    """The CFG unconditional context: the sequence from the last image start on, no BOS, no text (§4.2)."""
    ids = list(ids)
    if layout.image_start_id not in ids:
        raise ValueError("no image start token in the sequence; the unconditional context begins there")
    return ids[len(ids) - 1 - ids[::-1].index(layout.image_start_id):]


def i2i_prefix_ids(tokenizer, layout, text, upper_codes):
    """Conditioned inference: prompt, full-height header, the upper panel's rows, no image end (§6)."""
    h, w = upper_codes.shape
    header = image_header_ids(2 * h * layout.downsample, w * layout.downsample, layout)
    return prompt_ids(tokenizer, layout, text) + header + _rows(upper_codes, layout)

# -----------------------------------------------------------------------------
# Training examples (§7)

CFG_DROP_PROB = 0.1  # official text dropout for CFG (finetune_solver ItemProcessor)


def make_example(tokenizer, layout, text, codes, drop_text=False):
    """(ids int32, loss_mask uint8): loss on the image block and the trailing SEP, never the prompt.

    drop_text: the official CFG dropout sample, only the image block (no BOS, text or final SEP),
    so the model learns the unconditional context that starts at the image start token.
    loss_mask[i] = 1 means ids[i] is predicted from position i - 1 (so mask[0] is always 0).
    """
    image = image_to_ids(codes, layout)
    if drop_text:
        ids, mask = image, [0] + [1] * (len(image) - 1)
    else:
        prompt = prompt_ids(tokenizer, layout, text)
        ids, mask = prompt + image + [layout.sep_id], [0] * len(prompt) + [1] * (len(image) + 1)
    return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)


def stack_panels(upper, lower):
    """Two panels -> one dual-panel image (upper over lower); PIL images or tensors [..., H, W]."""
    if isinstance(upper, torch.Tensor):
        return torch.cat([upper, lower], dim=-2)
    if upper.size != lower.size:
        raise ValueError(f"panels differ in size: {upper.size} vs {lower.size}")
    out = Image.new(upper.mode, (upper.width, 2 * upper.height))
    out.paste(upper, (0, 0))
    out.paste(lower, (0, upper.height))
    return out


def split_panels(image):
    """Inverse of stack_panels: (upper, lower)."""
    if isinstance(image, torch.Tensor):
        half = image.shape[-2] // 2
        return image[..., :half, :], image[..., half:, :]
    half = image.height // 2
    return image.crop((0, 0, image.width, half)), image.crop((0, half, image.width, image.height))

# -----------------------------------------------------------------------------
# Token shards: {split}.ids.bin (int32), {split}.mask.bin (uint8), {split}.offsets.npy (int64 [N+1])


class ShardWriter:
    """Appends examples to temp files and renames them into place on close(), so a killed writer
    never leaves a shard that looks complete."""

    def __init__(self, folder, split):
        os.makedirs(folder, exist_ok=True)
        self.paths = {k: os.path.join(folder, f"{split}.{k}") for k in ("ids.bin", "mask.bin", "offsets.npy")}
        self.ids = open(self.paths["ids.bin"] + ".tmp", "wb")
        self.mask = open(self.paths["mask.bin"] + ".tmp", "wb")
        self.offsets = [0]

    def add(self, ids, mask):
        if len(ids) != len(mask):
            raise ValueError(f"ids ({len(ids)}) and mask ({len(mask)}) differ in length")
        self.ids.write(np.asarray(ids, np.int32).tobytes())
        self.mask.write(np.asarray(mask, np.uint8).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))

    def close(self):
        self.ids.close()
        self.mask.close()
        with open(self.paths["offsets.npy"] + ".tmp", "wb") as f:
            np.save(f, np.asarray(self.offsets, np.int64))
        for path in self.paths.values():  # offsets last: their presence means the shard is whole
            os.replace(path + ".tmp", path)

    def __enter__(self):
        return self

    def __exit__(self, error, *_):
        if error is None:
            self.close()
        else:  # leave only .tmp files behind
            self.ids.close()
            self.mask.close()


def load_shards(folder, split):
    """(ids memmap int32 [T], mask memmap uint8 [T], offsets int64 [N+1]) of one split."""
    offsets_path = os.path.join(folder, f"{split}.offsets.npy")
    if not os.path.exists(offsets_path):
        raise FileNotFoundError(f"no {split} shard in {folder}; run data/shapes/prepare.py first")
    offsets = np.load(offsets_path)
    if offsets[-1] == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), offsets
    ids = np.memmap(os.path.join(folder, f"{split}.ids.bin"), dtype=np.int32, mode="r")
    mask = np.memmap(os.path.join(folder, f"{split}.mask.bin"), dtype=np.uint8, mode="r")
    if len(ids) != offsets[-1] or len(mask) != offsets[-1]:
        raise ValueError(f"{folder}/{split} shard is inconsistent: offsets end at {offsets[-1]}, "
                         f"ids hold {len(ids)} and mask {len(mask)} tokens")
    return ids, mask, offsets


def read_meta(folder):
    """(meta.json as a dict, its TokenLayout)."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    return meta, TokenLayout(**meta["layout"])
