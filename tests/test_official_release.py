"""The full-scale path end to end on a miniature release in the official layout: sample.py runs on
it with the official token layout, prompts and CFG context, and produces decodable images of the
requested size; real-checkpoint mistakes give one-line errors. The CLIs run in-process through
main(argv) (tests/test_sample.py runs sample.py once as a process: an error reaches the user as one line)."""
import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from fake_release import write_fake_release
from sample import generate, load_system
from sequence import (image_body_plan, image_header_ids, prompt_ids, t2i_prompt, unconditional_ids)

pytestmark = pytest.mark.usefixtures("one_thread")  # the CLIs' --threads 1 is undone after this module


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_fake_release(tmp_path_factory.mktemp("release"))


def system_flags(release):
    folder, vq, vq_config = release
    return ["--ckpt", str(folder), "--vq", str(vq), "--vq_config", str(vq_config), "--threads", "1"]


def run_sample(release, out, *extra):
    sample.main(system_flags(release) + ["--out", str(out), "--prompt", "a photo of a red star", *extra])


@pytest.mark.parametrize("width, height", [(64, 64), (96, 32)])
def test_t2i_cli_square_and_non_square(release, tmp_path, width, height):
    run_sample(release, tmp_path, "--width", str(width), "--height", str(height))
    (png,) = tmp_path.glob("*.png")
    assert Image.open(png).size == (width, height)


def test_i2i_task_with_reference(release, tmp_path):
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(ref)
    run_sample(release, tmp_path, "--task", "depth", "--ref", str(ref), "--width", "64", "--height", "128")
    whole = [p for p in tmp_path.glob("*depth*.png") if "lower" not in p.name]
    assert Image.open(whole[0]).size == (64, 128)
    assert Image.open(next(tmp_path.glob("*_lower.png"))).size == (64, 64)


def test_sequence_is_exactly_the_official_layout(release):
    """start 151665, size tokens, EOL 151670 after every row, end 151666, codes in 155000-171383."""
    folder, vq, vq_config = release
    system = load_system(folder, vq, vq_config=vq_config)
    layout = system.layout
    assert system.defaults == {"cfg": 4.0, "top_k": 4096, "temperature": 1.0}
    width, height = 96, 64
    prefix = prompt_ids(system.tokenizer, layout, t2i_prompt("a red star", width, height)) + \
        image_header_ids(height, width, layout)
    plan = image_body_plan(height // 8, width // 8, layout)
    tokens, _ = generate(system.model, layout, prefix, unconditional_ids(prefix, layout), plan,
                         num_samples=3, cfg_scale=4.0, top_k=4096, generator=torch.Generator().manual_seed(0))
    for row in tokens.tolist():
        block = prefix[prefix.index(151665):] + row
        assert block[0] == 151665 and block[-1] == 151666
        assert system.tokenizer.hf.id_to_token(block[1]) == "<reserved08802>"  # 64 px = 2 grids, height first
        assert system.tokenizer.hf.id_to_token(block[2]) == "<reserved08803>"  # 96 px = 3 grids
        body = np.array(block[3:-1]).reshape(8, 13)
        assert (body[:, -1] == 151670).all()
        assert ((body[:, :-1] >= 155000) & (body[:, :-1] <= 171383)).all()
    assert prefix[0] == 151643 and unconditional_ids(prefix, layout)[0] == 151665


def test_missing_codec_is_one_line(release, tmp_path):
    """An official checkpoint without its codec: one line that names --vq."""
    folder, _, _ = release
    with pytest.raises(FileNotFoundError, match="--vq") as e:
        sample.main(["--ckpt", str(folder), "--prompt", "a star", "--vq", str(tmp_path / "nope.ckpt")])
    assert len(str(e.value).splitlines()) == 1


def test_tokenizer_without_image_tokens(release, tmp_path):
    folder, vq, vq_config = release
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (broken / f.name).symlink_to(f)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<racm3:break>"]
    tj["model"]["vocab"].pop("<racm3:break>")
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="racm3:break"):
        load_system(broken, vq, vq_config=vq_config)


def test_config_checkpoint_mismatch(release, tmp_path):
    folder, vq, vq_config = release
    other = tmp_path / "other"
    other.mkdir()
    for f in folder.iterdir():
        if f.is_file() and f.name != "config.json":
            (other / f.name).symlink_to(f)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing: model.layers.2"):
        load_system(other, vq, vq_config=vq_config)


def variant(release, tmp_path, **replaced):
    """A copy of the release (symlinks) with some files replaced: {file name with '_' for '.': JSON dict}."""
    folder, vq, vq_config = release
    other = tmp_path / "variant"
    other.mkdir()
    for f in folder.iterdir():
        if f.is_file() and f.name.replace(".", "_") not in replaced:
            (other / f.name).symlink_to(f)
    for name, content in replaced.items():
        (other / name.replace("_json", ".json")).write_text(json.dumps(content))
    return other, vq, vq_config


def test_context_shorter_than_a_768_image_keeps_going_with_a_warning(release, tmp_path):
    """A config.json whose max_position_embeddings (64) is below a 768² image's 9,316 tokens: loading warns and,
    as the official sampler does (HF max_new_tokens wins over max_length), a 64² image (~100 tokens with its
    prompt) is still drawn past it; only the official max_gen_len (10240) stops a request."""
    config = dict(json.loads((release[0] / "config.json").read_text()), max_position_embeddings=64)
    short = variant(release, tmp_path, config_json=config)
    with pytest.warns(UserWarning, match="max_position_embeddings 64 is smaller than a 768x768 image"):
        assert load_system(short[0], short[1], vq_config=short[2]).model.config.max_seq_len == 10240
    with pytest.warns(UserWarning, match="max_position_embeddings 64"):  # sample.py's own load says it too
        run_sample(short, tmp_path, "--width", "64", "--height", "64")
    assert Image.open(next(tmp_path.glob("*.png"))).size == (64, 64)
    with pytest.warns(UserWarning, match="max_position_embeddings 64"), \
            pytest.raises(ValueError, match="exceed the model's context of 10240 tokens"):
        run_sample(short, tmp_path, "--width", "1024", "--height", "1024")


@pytest.mark.parametrize("tokenizer_config, bos", [
    ({"bos_token": None, "eos_token": "<|endoftext|>"}, 151643),                  # Qwen2.5 base: eos as BOS
    ({"bos_token": None, "eos_token": {"content": "<|qwen2|>"}}, 151645),           # another eos, saved as AddedToken
    ({"bos_token": "<|qwen3|>", "eos_token": "<|endoftext|>"}, 151646),             # a bos_token wins
    (None, 151643),                                                                # no tokenizer_config.json
])
def test_bos_is_read_from_the_tokenizer_config(release, tmp_path, tokenizer_config, bos):
    """BOS is the tokenizer's bos_token, else its eos_token, as the official code reads it: the layout and the
    first token of every prompt follow tokenizer_config.json."""
    folder, vq, vq_config = variant(release, tmp_path, tokenizer_config_json=tokenizer_config or {})
    if tokenizer_config is None:
        (folder / "tokenizer_config.json").unlink()
    system = load_system(folder, vq, vq_config=vq_config)
    assert system.layout.bos_id == bos
    assert prompt_ids(system.tokenizer, system.layout, "a red star")[0] == bos


def test_tokenizer_config_without_bos_or_eos_is_one_line(release, tmp_path):
    folder, vq, vq_config = variant(release, tmp_path, tokenizer_config_json={"bos_token": None})
    with pytest.raises(ValueError, match="neither a bos_token nor an eos_token") as e:
        load_system(folder, vq, vq_config=vq_config)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("mask, masked", [(False, []), (None, [5, 7])])  # None: absent, HF's default True
def test_mask_image_logits_read_from_config(release, tmp_path, mask, masked):
    """mask_image_logits (HF default True) sets the logits of vocabulary_map's IMGIMG* ids to -inf, as the
    official forward does; image codes (<MOVQGAN...>) stay; false masks nothing."""
    folder, vq, vq_config = release
    config = json.loads((folder / "config.json").read_text())
    config["vocabulary_map"] = {"IMGIMGAA": 5, "IMGIMGAB": 7, "<MOVQGAN0>": 155000, "red": 4}
    config.pop("mask_image_logits", None) if mask is None else config.update(mask_image_logits=mask)
    other, vq, vq_config = variant(release, tmp_path, config_json=config)
    system = load_system(other, vq, vq_config=vq_config)
    with torch.no_grad():
        logits = system.model(torch.tensor([[151643, 3, 4]]))[0, -1]
    assert torch.isinf(logits).nonzero().flatten().tolist() == masked
    if masked:  # sampling is untouched: no image code was masked
        run_sample((other, vq, vq_config), tmp_path / "out", "--width", "32", "--height", "32")


def test_mask_on_image_codes_is_refused(release, tmp_path):
    """A mask that would hit image codes, which the code head cannot honour, stops with one line."""
    folder, vq, vq_config = release
    config = dict(json.loads((folder / "config.json").read_text()), vocabulary_map={"IMGIMGAA": 155003})
    other, vq, vq_config = variant(release, tmp_path, config_json=config)
    with pytest.raises(ValueError, match="masks image-code id 155003"):
        load_system(other, vq, vq_config=vq_config)


def test_eval_and_bench_run_on_the_release(release, tmp_path):
    """eval.py and bench.py take the same official folder + codec as sample.py."""
    import shapes
    prompts = tmp_path / "prompts.jsonl"
    shapes.write_prompt_set(prompts, shapes.eval_t2i_specs()[:2])
    importlib.import_module("eval").main(["--prompts", str(prompts), "--n", "1", "--size", "64",
                                          "--out_dir", str(tmp_path / "eval")] + system_flags(release))
    assert (tmp_path / "eval" / "eval.json").exists()
    importlib.import_module("bench").main(["--size", "64", "--steps", "4", "--variants", "static,sjd",
                                           "--json", str(tmp_path / "bench.json")] + system_flags(release))
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record
