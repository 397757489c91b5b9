"""Tests of sequence.py (Uni-Rep blocks, official ids and templates, loss masks, dual panels) and of
the token shards of data/shards.py.

The official tokenizer is not downloaded: `official_tokenizer` writes a small tokenizer.json whose
special strings sit at the ids of the official one (Qwen2.5 vocab 0..151642, its 22 specials from
151643, the added tokens from 151665), which is all TokenLayout.official reads.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sequence as S
from data.shards import ShardWriter, load_shards


def _added(content, i):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


@pytest.fixture(scope="module")
def official_tokenizer(tmp_path_factory):
    specials = {S.BOS: 151643, **{f"<|qwen{i}|>": 151643 + i for i in range(1, 22)},
                S.IMAGE_START: 151665, S.IMAGE_END: 151666, "<reserved08796>": 151667,
                "<reserved08797>": 151668, "<reserved08798>": 151669, S.EOL: 151670}
    specials.update({S.size_token(n): 151671 + n for n in range(0, 65)})
    specials[S.SEP] = 151800  # its real id is not documented (UNSURE); the layout reads it by string
    words = ["a", "photo", "of", "star", "Generate", "an", "image"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}, **specials}
    tj = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
          "added_tokens": [_added(s, i) for s, i in specials.items()],
          "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
          "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}
    folder = tmp_path_factory.mktemp("official")
    with open(folder / "tokenizer.json", "w") as f:
        json.dump(tj, f)
    return S.Tokenizer.from_file(str(folder))  # a checkpoint folder works as well as the file


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ours") / "tokenizer.json")
    texts = ["a photo of a red star left of a blue circle", "an image of three green squares"] * 20
    tok = S.train_tokenizer(texts, path, vocab_size=300)
    return S.Tokenizer.from_file(path), S.TokenLayout.ours(tok, codebook_size=512)


def test_official_layout_ids(official_tokenizer):
    """The official layout finds the special ids (docs/tokens.md §2) by string and puts codes at 155000."""
    L = S.TokenLayout.official(official_tokenizer)
    assert (L.bos_id, L.image_start_id, L.image_end_id, L.eol_id) == (151643, 151665, 151666, 151670)
    assert L.size_id(768) == official_tokenizer.hf.token_to_id("<reserved08824>")
    assert L.image_code_offset == 155000 and L.vocab_size == 155000 + 16384


def test_official_768_is_9316_tokens(official_tokenizer):
    """A 768x768 image is 96 rows of 96 codes + EOL, + start, two sizes, end = 9,316 tokens (docs/tokens.md §3)."""
    L = S.TokenLayout.official(official_tokenizer)
    ids = S.image_to_ids(torch.zeros(96, 96, dtype=torch.long), L)
    assert len(ids) == 9316
    assert len(S.image_to_ids(torch.zeros(128, 64, dtype=torch.long), L)) == 8324  # 512 wide, 1024 tall


@pytest.mark.parametrize("h,w", [(64, 64), (128, 64), (64, 128), (8, 4)])
def test_unirep_round_trip(ours, h, w):
    """codes -> ids -> codes is the identity; the layout is start, h, w, rows+EOL, end."""
    _, L = ours
    codes = torch.randint(0, L.codebook_size, (h, w), generator=torch.Generator().manual_seed(h * w))
    ids = S.image_to_ids(codes, L)
    assert ids[:3] == S.image_header_ids(8 * h, 8 * w, L)
    assert ids[3 + w] == L.eol_id and ids[-2] == L.eol_id and ids[-1] == L.image_end_id
    assert len(ids) == h * (w + 1) + 4
    assert torch.equal(S.ids_to_codes(ids, L), codes)
    plan = S.image_body_plan(h, w, L)
    assert len(plan) == len(ids) - 3
    forced = plan >= 0
    assert torch.equal(plan[forced], torch.tensor(ids[3:])[forced])
    assert all(L.image_code_offset <= i < L.vocab_size for i in torch.tensor(ids[3:])[~forced].tolist())


def test_malformed_blocks_raise_clear_errors(ours):
    """Each kind of damage is named: missing EOL, ragged row, unknown id, truncation, bad start."""
    _, L = ours
    ids = S.image_to_ids(torch.zeros(4, 4, dtype=torch.long), L)
    cases = {
        "missing EOL": ids[:3] + [ids[3]] * 5 + ids[8:],
        "ragged": ids[:3] + ids[3:6] + [L.eol_id] + ids[8:],
        "not an image code": ids[:4] + [L.bos_id] + ids[5:],
        "truncated": ids[:-1],
        "image start": ids[1:],
        "not a size token": ids[:1] + [L.bos_id] + ids[2:],
    }
    for what, bad in cases.items():
        with pytest.raises(ValueError, match=what):
            S.ids_to_codes(bad, L)
    with pytest.raises(ValueError, match="multiple of 32"):
        S.image_header_ids(100, 64, L)


def test_templates_are_the_official_strings():
    """Templates reproduce the strings of the official generate.py / pre_tokenize.py (docs/tokens.md §5)."""
    assert S.t2i_prompt("a red star", 768, 768) == (
        "Generate an image of 768x768 according to the following prompt:\na red star")
    assert S.t2i_prompt("a red star") == "Generate an image according to the following prompt:\na red star"
    assert S.task_prompt("t2i", "a red star", 64, 64) == S.t2i_prompt("a red star", 64, 64)
    assert S.task_prompt("depth", "a cat", 512, 1024) == (
        "Generate a dual-panel image of 512x1024 where the <upper half> displays a <depth map>, while the "
        "<lower half> retains the original image for direct visual comparison:\na cat")
    assert S.task_prompt("edge", "a cat", 512, 1024) == (
        "Generate a dual-panel image of 512x1024 where the <upper half> displays a <canny edge map>, while the "
        "<lower half> retains the original image for direct visual comparison:\na cat")
    assert S.task_prompt("dense", "a cat", 512, 1024, dense_map="canny edge map") == (
        "Generate a dual-panel image of 512x1024 where the <lower half> displays a <canny edge map>, while the "
        "<upper half> retains the original image for direct visual comparison:\na cat")
    assert S.task_prompt("subject", "it on a beach", 512, 1024, subject="a dog") == (
        "Generate a dual-panel image of 512x1024 where the <upper half> displays: a dog, while the <lower half> "
        "shows the image according to the object and following prompt: it on a beach")
    assert "recolour the star blue" in S.task_prompt("edit", "recolour the star blue", 64, 128)
    with pytest.raises(ValueError, match="needs subject"):
        S.task_prompt("subject", "it on a beach", 512, 1024)
    with pytest.raises(ValueError, match="unknown task"):
        S.task_prompt("paint", "x", 64, 64)


def test_official_prompt_tokens(official_tokenizer):
    """A T2I human turn is [BOS] text [SEP]; the unconditional context starts at image start."""
    L = S.TokenLayout.official(official_tokenizer)
    p = S.prompt_ids(official_tokenizer, L, "a photo of a star")
    assert p == [151643, 1, 2, 3, 1, 4, L.sep_id]
    seq = p + S.image_header_ids(64, 64, L) + [155000 + 7]
    assert S.unconditional_ids(seq, L) == [151665, L.size_id(64), L.size_id(64), 155007]


def test_loss_mask_covers_image_and_trailing_sep(ours):
    """The mask is 1 on exactly the image block + SEP, 0 on the prompt; dropout keeps only the image."""
    tok, L = ours
    codes = torch.arange(16).view(4, 4)
    prompt = S.prompt_ids(tok, L, S.t2i_prompt("a red star", 32, 32))
    ids, mask = S.make_example(tok, L, S.t2i_prompt("a red star", 32, 32), codes)
    assert ids.dtype == np.int32 and mask.dtype == np.uint8 and len(ids) == len(mask)
    assert ids.tolist() == prompt + S.image_to_ids(codes, L) + [L.sep_id]
    assert mask.tolist() == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    ids, mask = S.make_example(tok, L, "ignored", codes, drop_text=True)
    assert ids.tolist() == S.image_to_ids(codes, L)  # no BOS, no text, no final SEP (docs/tokens.md §7)
    assert mask.tolist() == [0] + [1] * (len(ids) - 1)


def test_i2i_prefix_continues_into_the_lower_panel(ours):
    """The i2i prefix + the lower rows + image end is the full dual-panel block."""
    tok, L = ours
    full = torch.randint(0, L.codebook_size, (8, 4))
    upper, lower = full[:4], full[4:]
    prefix = S.i2i_prefix_ids(tok, L, "x", upper)
    prompt = S.prompt_ids(tok, L, "x")
    assert prefix[:len(prompt)] == prompt
    rest = S.image_to_ids(lower, L)[3:]
    assert torch.equal(S.ids_to_codes(prefix[len(prompt):] + rest, L), full)


def test_dual_panel_stack_and_split():
    """stack_panels then split_panels gives the panels back."""
    a, b = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    dual = S.stack_panels(a, b)
    assert dual.size == (64, 128) and dual.getpixel((0, 127)) == (0, 0, 255)
    up, lo = S.split_panels(dual)
    assert up.tobytes() == a.tobytes() and lo.tobytes() == b.tobytes()


def test_tokenizer_round_trip_and_layout_dict(ours):
    """Our tokenizer decodes what it encodes, keeps the special strings whole, and the layout
    survives meta.json."""
    tok, L = ours
    text = "a photo of a red star\nleft of a blue circle"
    assert tok.hf.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.encode(S.SEP) == [L.sep_id]
    assert L.image_code_offset == tok.vocab_size and len(L.size_token_ids) == S.MAX_GRIDS
    assert S.TokenLayout(**json.loads(json.dumps(L.to_dict()))) == L


def test_shards_atomic_round_trip(tmp_path):
    """Written examples load back exactly; an unclosed writer leaves no shard that looks complete."""
    rng = np.random.default_rng(0)
    examples = [(rng.integers(0, 1000, n).astype(np.int32), rng.integers(0, 2, n).astype(np.uint8))
                for n in (5, 17, 3)]
    w = ShardWriter(tmp_path, "train")
    for ids, mask in examples:
        w.add(ids, mask)
    w.close()
    ids, mask, offsets = load_shards(tmp_path, "train")
    assert offsets.tolist() == [0, 5, 22, 25]
    for k, (i, m) in enumerate(examples):
        assert ids[offsets[k]:offsets[k + 1]].tolist() == i.tolist()
        assert mask[offsets[k]:offsets[k + 1]].tolist() == m.tolist()
    w = ShardWriter(tmp_path, "val")
    w.add(*examples[0])  # killed before close()
    assert not os.path.exists(tmp_path / "val.offsets.npy")
    with pytest.raises(FileNotFoundError, match="no val shard"):
        load_shards(tmp_path, "val")
