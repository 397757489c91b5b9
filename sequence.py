"""Token sequences of Lumina-mGPT 2.0 (docs/tokens.md): the token layout (every special id of the project lives
in `TokenLayout`), the tokenizer, Uni-Rep image blocks, task templates, the unconditional CFG context, training
examples with loss masks, dual panels. Not a model, sampler or codec; it imports nothing from the project."""
import json
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

# ---- special token strings, carried by the official tokenizer (Qwen2.5's BPE) and ours (docs/tokens.md §2) ----
BOS = "<|endoftext|>"      # Qwen has no BOS, so the official code uses its eos string (docs/tokens.md §1)
IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"       # also the generation EOS
EOL = "<reserved08799>"    # ends every row of codes, the last one included
SEP = "<reserved08706>"    # ends every conversation turn (docs/tokens.md §4)
MAX_GRIDS, SIZE_TOKEN_BASE = 64, 8800  # our size tokens n = 1..64 (up to 2048 px) are <reserved{8800 + n}>
SPECIAL_STRINGS = {"bos_id": BOS, "image_start_id": IMAGE_START, "image_end_id": IMAGE_END, "eol_id": EOL,
                   "sep_id": SEP}  # TokenLayout field -> the string whose id it holds
OFFICIAL_IDS = {"image_start_id": 151665, "image_end_id": 151666, "eol_id": 151670}  # in the released tokenizer
OFFICIAL_CODE_OFFSET, OFFICIAL_CODEBOOK_SIZE = 155000, 16384  # the release's image codes: ids 155000 + code


def size_token(n):  # the string of the size token meaning n grids of 32 px, e.g. 24 -> '<reserved08824>'
    return f"<reserved{SIZE_TOKEN_BASE + n:05d}>"


class Tokenizer:
    """A thin wrapper over HF `tokenizers`: the official tokenizer.json or ours (train_tokenizer); `bos` is
    the string used as BOS, read from a tokenizer_config.json beside the file as the official code does."""
    def __init__(self, hf_tokenizer, bos=BOS):
        self.hf, self.bos = hf_tokenizer, bos

    @classmethod
    def from_file(cls, path):
        path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path  # a file or a checkpoint folder
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; data/shapes/prepare.py trains one, releases ship one")
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json")  # a release's; ours have none
        return cls(HFTokenizer.from_file(path), bos_from_config(config))

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids  # BOS is added by hand (docs/tokens.md §1)

    @property
    def vocab_size(self):  # size of the id space (max id + 1): official added ids need not be dense
        return max(self.hf.get_vocab(with_added_tokens=True).values()) + 1


def bos_from_config(path):
    """Official: BOS is the tokenizer's bos_token, or its eos_token when there is none (Qwen's case,
    docs/tokens.md §1). Our checkpoints carry no tokenizer_config.json: sequence.BOS."""
    if not os.path.isfile(path):
        return BOS
    with open(path) as f:
        config = json.load(f)
    token = config.get("bos_token") or config.get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token  # an AddedToken is saved as a dict
    if not token:
        raise ValueError(f"{path} names neither a bos_token nor an eos_token; the official code uses one as BOS")
    return token


def train_tokenizer(texts, path, vocab_size=1024):
    """Train a byte-level BPE on texts (the shapes world's prompts), add the special strings, save."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_STRINGS.values()) + [size_token(n) for n in range(1, MAX_GRIDS + 1)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(path)
    return Tokenizer(tok)


# ---- token layout: every special id, in one place (docs/tokens.md §2) ----
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
    size_unit: int = 32      # pixels per size token ("patch_size", docs/tokens.md §3)
    downsample: int = 8      # pixels per code (the codec's, docs/codec.md §2)

    def __post_init__(self):  # meta.json hands size_token_ids back as a list
        object.__setattr__(self, "size_token_ids", tuple(self.size_token_ids))

    @classmethod
    def ours(cls, tokenizer, codebook_size):
        """Our reduced-scale layout: ids of the special strings, image codes right after the vocabulary."""
        strings = dict(SPECIAL_STRINGS, bos_id=tokenizer.bos)  # BOS: as its config says (docs/tokens.md §1)
        if missing := [s for s in [*strings.values(), size_token(1)] if tokenizer.hf.token_to_id(s) is None]:
            raise ValueError(f"tokenizer lacks {missing}: it must carry the special strings of sequence.py")
        ids = {field: tokenizer.hf.token_to_id(s) for field, s in strings.items()}
        sizes = [tokenizer.hf.token_to_id(size_token(n)) for n in range(1, MAX_GRIDS + 1)] + [None]
        return cls(**ids, image_code_offset=tokenizer.vocab_size, codebook_size=codebook_size,
                   size_token_ids=sizes[:sizes.index(None)])

    @classmethod
    def official(cls, tokenizer):
        """The released checkpoints' layout: the same reading, checked against the release, codes at 155000."""
        layout = cls.ours(tokenizer, OFFICIAL_CODEBOOK_SIZE)
        if (found := {name: getattr(layout, name) for name in OFFICIAL_IDS}) != OFFICIAL_IDS:
            raise ValueError(f"this tokenizer has {found}, officially {OFFICIAL_IDS}: is it Lumina-mGPT 2.0's?")
        return replace(layout, image_code_offset=OFFICIAL_CODE_OFFSET)

    @property
    def vocab_size(self):
        return self.image_code_offset + self.codebook_size

    def size_id(self, pixels):  # the size token for a side of `pixels` pixels (a multiple of 32)
        n = pixels // self.size_unit
        if pixels % self.size_unit or not 1 <= n <= len(self.size_token_ids):
            raise ValueError(f"image side {pixels} px is not a multiple of {self.size_unit} between "
                             f"{self.size_unit} and {self.size_unit * len(self.size_token_ids)}")
        return self.size_token_ids[n - 1]

    def to_dict(self):
        return asdict(self)


# ---- Uni-Rep image blocks: start, h-size, w-size, each row's codes + EOL, end (docs/tokens.md §3) ----
def image_header_ids(height_px, width_px, layout):
    return [layout.image_start_id, layout.size_id(height_px), layout.size_id(width_px)]


def image_body_plan(code_h, code_w, layout):
    """Per token after the header: the forced id (EOL, image end) or -1 for any image code (docs/sampling.md §2)."""
    plan = torch.full((code_h, code_w + 1), -1, dtype=torch.long)
    plan[:, -1] = layout.eol_id
    return torch.cat([plan.flatten(), torch.tensor([layout.image_end_id])])  # (code_h * (code_w + 1) + 1,)


def image_to_ids(codes, layout):
    """Code grid [h, w] -> the image block, exactly as the official item processor builds it."""
    h, w = codes.shape
    body = image_body_plan(h, w, layout)  # EOLs and image end in place, -1 where the codes go
    body[body < 0] = torch.as_tensor(codes, dtype=torch.long).flatten() + layout.image_code_offset
    return image_header_ids(h * layout.downsample, w * layout.downsample, layout) + body.tolist()


def ids_to_codes(ids, layout):
    """The image block -> LongTensor [h, w], raising a ValueError that names what is malformed."""
    ids = [int(i) for i in ids]
    if len(ids) < 4 or ids[0] != layout.image_start_id:
        raise ValueError("image block must begin with the image start token followed by two size tokens")
    if bad := [i for i in ids[1:3] if i not in layout.size_token_ids]:
        raise ValueError(f"id {bad[0]} is not a size token")
    h, w = ((layout.size_token_ids.index(i) + 1) * layout.size_unit // layout.downsample for i in ids[1:3])  # codes
    rows = [ids[3 + r * (w + 1):3 + (r + 1) * (w + 1)] for r in range(h)]
    for r, row in enumerate(rows):
        if layout.eol_id not in row:
            raise ValueError(f"row {r} has no end-of-line token within {w + 1} tokens (missing EOL)")
        if row.index(layout.eol_id) != w:
            raise ValueError(f"row {r} is ragged: EOL after {row.index(layout.eol_id)} codes, expected {w}")
        if bad := [i for i in row[:w] if not 0 <= i - layout.image_code_offset < layout.codebook_size]:
            raise ValueError(f"row {r} holds id {bad[0]}, which is not an image code")
    if (tail := ids[3 + h * (w + 1):]) != [layout.image_end_id]:
        raise ValueError(f"expected the image end token after {h} rows, found {tail[:3] or 'nothing (truncated)'}")
    return torch.tensor([row[:w] for row in rows], dtype=torch.long) - layout.image_code_offset  # (h, w)


# ---- prompts: official strings verbatim; the others say where they come from (docs/tokens.md §4, §5) ----
TASKS = ("t2i", "edge", "depth", "subject", "edit", "dense", "mirror", "copy")
# the map each dual-panel task names; dense's default is ours (the official list: depth, canny, hed, pose)
DENSE_MAPS = {"edge": "canny edge map", "depth": "depth map", "dense": "segmentation map"}
PAIR_TASKS = tuple(DENSE_MAPS)  # without a reference these draw an image pair from text (docs/tokens.md §5)
_PAIR = ("Generate a dual-panel image of {w}x{h} where the <{target} half> displays a <{x}>, while the "
         "<{kept} half> retains the original image for direct visual comparison:\n{prompt}")
CFG_DROP_PROB = 0.1  # official: a training example drops its text this often, for CFG (docs/tokens.md §7)


def t2i_prompt(prompt, width=None, height=None):
    """Official T2I template; without a size it is the 10% size-free training variant."""
    size = "" if width is None else f" of {width}x{height}"
    return f"Generate an image{size} according to the following prompt:\n{prompt}"


def pair_prompt(task, prompt, width, height, dense_map=DENSE_MAPS["dense"]):
    """Official image-pair template (no reference): the scene above, its map below, both from the text."""
    return _PAIR.format(w=width, h=height, target="lower", x=pair_map(task, dense_map), kept="upper", prompt=prompt)


def pair_map(task, dense_map=DENSE_MAPS["dense"]):
    """The map an image pair's lower panel shows: the task's own, or dense's chosen one."""
    if task not in PAIR_TASKS:
        raise ValueError(f"task {task!r} has no image-pair mode; without --ref use one of {', '.join(PAIR_TASKS)}")
    return dense_map if task == "dense" else DENSE_MAPS[task]


def task_prompt(task, prompt, width, height, subject=None, dense_map=DENSE_MAPS["dense"]):
    """The system prompt of a task; width x height is the whole dual-panel image (upper over lower)."""
    if task == "t2i":
        return t2i_prompt(prompt, width, height)
    if task in ("edge", "depth"):  # official i2i template: condition map on top, image below
        return _PAIR.format(w=width, h=height, target="upper", x=DENSE_MAPS[task], kept="lower", prompt=prompt)
    if task == "dense":  # official image-pair template: image on top, its map below
        return _PAIR.format(w=width, h=height, target="lower", x=dense_map, kept="upper", prompt=prompt)
    if task == "subject":  # the paper's Table 3 wording (the code's i2i string is a placeholder sentence)
        if not subject:
            raise ValueError("the subject task needs subject=..., a description of the upper panel's object")
        return (f"Generate a dual-panel image of {width}x{height} where the <upper half> displays: {subject}, "
                f"while the <lower half> shows the image according to the object and following prompt: {prompt}")
    if task == "edit":  # ours, in the official style: the paper's editing wording is not in the code
        return (f"Generate a dual-panel image of {width}x{height} where the <upper half> displays the original "
                f"image, while the <lower half> shows it after the following edit instruction:\n{prompt}")
    if task == "mirror":  # ours: a new task for LoRA fine-tuning, outside the default mix (docs/lora.md §5)
        return (f"Generate a dual-panel image of {width}x{height} where the <upper half> displays the original "
                f"image, while the <lower half> shows it mirrored from left to right:\n{prompt}")
    if task == "copy":  # ours: the lower panel repeats the upper one, a warm-up for the copy tasks (docs/training.md §7)
        return (f"Generate a dual-panel image of {width}x{height} where the <upper half> displays the original "
                f"image, while the <lower half> shows the same image again:\n{prompt}")
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def prompt_ids(tokenizer, layout, text):
    """A human turn: [BOS] + text + [SEP] (docs/tokens.md §4); the model answers with an image block."""
    return [layout.bos_id] + tokenizer.encode(text) + [layout.sep_id]


def unconditional_ids(ids, layout):
    """The CFG unconditional context: from the last image start on, no BOS, no text (docs/sampling.md §3)."""
    ids = list(ids)
    if layout.image_start_id not in ids:
        raise ValueError("no image start token in the sequence; the unconditional context begins there")
    return ids[len(ids) - 1 - ids[::-1].index(layout.image_start_id):]


def i2i_prefix_ids(tokenizer, layout, text, upper_codes):
    """Conditioned inference: prompt, full-height header, the upper panel's rows, no image end (docs/tokens.md §6)."""
    h, w = upper_codes.shape
    header = image_header_ids(2 * h * layout.downsample, w * layout.downsample, layout)
    return prompt_ids(tokenizer, layout, text) + header + image_to_ids(upper_codes, layout)[3:-1]  # upper rows


# ---- training examples and dual panels (docs/tokens.md §6, §7) ----
def make_example(tokenizer, layout, text, codes, drop_text=False):
    """(ids int32, loss_mask uint8): loss on the image block and trailing SEP, never the prompt (mask[i] = 1:
    ids[i] is predicted at i - 1). drop_text: the official CFG dropout sample, the image block alone."""
    image = image_to_ids(codes, layout)
    if drop_text:
        ids, mask = image, [0] + [1] * (len(image) - 1)
    else:
        prompt = prompt_ids(tokenizer, layout, text)
        ids, mask = prompt + image + [layout.sep_id], [0] * len(prompt) + [1] * (len(image) + 1)
    return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)


def stack_panels(upper, lower):
    """Two PIL panels -> one dual-panel image, upper over lower."""
    if upper.size != lower.size:
        raise ValueError(f"panels differ in size: {upper.size} vs {lower.size}")
    out = Image.new(upper.mode, (upper.width, 2 * upper.height))
    out.paste(upper, (0, 0))
    out.paste(lower, (0, upper.height))
    return out


def split_panels(image):
    """Inverse of stack_panels: (upper, lower)."""
    half = image.height // 2
    return image.crop((0, 0, image.width, half)), image.crop((0, half, image.width, image.height))
