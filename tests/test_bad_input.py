"""Bad input, script by script: every case a user might type ends in one line on stderr naming the
problem, a non-zero exit and no traceback, and writes nothing; or it succeeds where success is right
(docs/checkpoints.md §4). Each case runs in this process the way the script's __main__ runs it
(configurator.run_main for the main() scripts; the same one_line for the flat train.py and train_vq.py),
against small fixtures built once; three real processes show that no traceback reaches a terminal, and
a killed 2-worker prepare leaves no process and no temporary file behind."""
import json
import os
import runpy
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from contextlib import redirect_stdout
from io import BytesIO, StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as HFTokenizer, models

import configurator
import eval as evaluation
import sample
import shapes
from data.images import prepare as images_prepare
from data.shapes import prepare as shapes_prepare
from data.shards import ShardWriter
from vq import MoVQGAN, VQConfig

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread", "processes")  # processes: started first, checked last
MAINS = {"sample": sample.main, "eval": evaluation.main, "images": images_prepare.main, "shapes": shapes_prepare.main}
FLAT = {"train": REPO / "train.py", "train_vq": REPO / "train_vq.py"}
# a device this machine lacks: "cuda" without a GPU, else one index past the last GPU
NO_CUDA = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def write_shards(folder, vocab, n_train=6, n_val=2, meta=None):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        w = ShardWriter(folder, split)
        for _ in range(n):
            w.add(rng.integers(0, vocab, 12), np.ones(12, np.uint8))
        w.close()
    (Path(folder) / "meta.json").write_text(json.dumps(meta or {"vocab_size": vocab}))


def png_claiming(width, height):
    """A PNG whose header claims width x height pixels (a decompression bomb to PIL) but holds one pixel."""
    data = BytesIO()
    Image.new("RGB", (1, 1)).save(data, "PNG")
    data = bytearray(data.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24], data[29:33] = ihdr[4:12], struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def ckpt_variant(root, tiny_ckpt, name, change):
    """A copy of the tiny checkpoint folder with one file changed: change = {file name: bytes, str or None}."""
    folder = root / name
    shutil.copytree(tiny_ckpt, folder)
    for file, content in change.items():
        path = folder / file
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


@pytest.fixture(scope="module")
def world(tiny_ckpt, tmp_path_factory):
    """Paths every case may name: the tiny checkpoint and damaged copies of it, shard folders good and bad,
    prompt sets, manifests, images. Built once; the cases must leave it as it is."""
    root = tmp_path_factory.mktemp("bad_input")
    model_json = json.loads((tiny_ckpt / "model.json").read_text())
    vocab = model_json["vocab_size"]
    tok = (tiny_ckpt / "tokenizer.json").read_text()
    other_tok = json.loads(tok)
    other_tok["added_tokens"].append(dict(other_tok["added_tokens"][-1], id=vocab - 64 + 5, content="<extra>"))
    weights = (tiny_ckpt / "model.safetensors").read_bytes()
    p = {"ckpt": tiny_ckpt, "tok": tiny_ckpt / "tokenizer.json", "missing": root / "missing", "file": root / "a_file",
         "folder": root / "a_folder", "text": root / "text.txt"}
    p["file"].write_text("not a folder")
    p["folder"].mkdir()
    p["text"].write_text("just text")
    variants = {
        "tok_mismatch": {"tokenizer.json": json.dumps(other_tok)}, "tok_truncated": {"tokenizer.json": tok[:200]},
        "tok_not_tokenizer": {"tokenizer.json": "{}"}, "tok_missing": {"tokenizer.json": None},
        "sampling_str": {"sampling.json": '{"cfg": "high"}'}, "sampling_key": {"sampling.json": '{"cfg_scale": 3}'},
        "sampling_list": {"sampling.json": "[1, 2]"}, "model_json_truncated": {"model.json": "{\"dim\": "},
        "model_json_str": {"model.json": json.dumps(dict(model_json, dim="8"))},
        "model_json_key": {"model.json": json.dumps(dict(model_json, flash=True))},
        "model_json_missing": {"model.json": None}, "weights_truncated": {"model.safetensors": weights[:1000]},
        "weights_missing": {"model.safetensors": None},
        "vq_groups": {"vq.json": json.dumps(dict(vars(VQConfig.from_name("tiny")), norm_groups=3))},
        "vq_truncated": {"vq.safetensors": (tiny_ckpt / "vq.safetensors").read_bytes()[:500]},
        "resume/ckpt-00000001": {"train_state.pt": b"truncated"}}
    for name, change in variants.items():
        p[name] = ckpt_variant(root, tiny_ckpt, name, change)
    p["resume"] = root / "resume"
    p["resume_weights"] = ckpt_variant(root, tiny_ckpt, "resume_weights/ckpt-00000001",
                                       {"model.safetensors": weights[:1000]}).parent
    torch.manual_seed(0)
    MoVQGAN(VQConfig(**dict(vars(VQConfig.from_name("tiny")), n_embed=128))).save_pretrained(root / "vq128")
    p["vq128"] = root / "vq128"
    # train.py data: good, and one thing wrong in each
    for name, kw in {"data": {}, "data_big_vocab": dict(meta={"vocab_size": vocab + 10}),
                     "data_no_vocab": dict(meta={"vocab": vocab}), "data_meta_list": dict(meta=[vocab]),
                     "data_empty_train": dict(n_train=0), "data_counts": dict(meta={"vocab_size": vocab,
                                                                                   "counts": {"train": 99}}),
                     "data_torn": {}, "data_bad_offsets": {}, "data_no_val": {}, "data_no_ids": {},
                     "data_bad_meta": {}}.items():
        write_shards(root / name, vocab, **{k: v for k, v in kw.items()})
        p[name] = root / name
    with open(root / "data_torn" / "train.ids.bin", "r+b") as f:
        f.truncate(20)
    (root / "data_bad_offsets" / "train.offsets.npy").write_bytes(b"garbage")
    (root / "data_no_val" / "val.offsets.npy").unlink()
    (root / "data_no_ids" / "train.ids.bin").unlink()
    (root / "data_bad_meta" / "meta.json").write_text("{'vocab_size': 3}")
    # train_vq.py checkpoints
    for name, state in {"vq_resume_junk": b"junk", "vq_resume_keys": {"vq_config": vars(VQConfig.from_name("tiny"))},
                        "vq_resume_config": {"vq_config": {"ch": -1}}}.items():
        (root / name).mkdir()
        if isinstance(state, bytes):
            (root / name / "ckpt.pt").write_bytes(state)
        else:
            torch.save(state, root / name / "ckpt.pt")
        p[name] = root / name
    # config files
    p["cfg_syntax"], p["cfg_key"] = root / "syntax.py", root / "key.py"
    p["cfg_syntax"].write_text("batch_size = = 3\n")
    p["cfg_key"].write_text("learning_rat = 1e-3\n")
    # eval.py prompt sets
    row = shapes.eval_t2i_specs()[0]
    for name, text in {"rows": json.dumps(row) + "\n", "rows_empty": "", "rows_blank": "\n\n",
                       "rows_not_json": "{prompt: x}\n", "rows_list": "[1, 2]\n",
                       "rows_no_prompt": json.dumps({"category": "colors"}) + "\n",
                       "rows_no_category": json.dumps({"prompt": "a red circle"}) + "\n",
                       "rows_prompt_number": json.dumps(dict(row, prompt=3)) + "\n",
                       "rows_category": json.dumps(dict(row, category="poetry")) + "\n",
                       "rows_ref_missing": json.dumps(dict(row, ref="nowhere.png")) + "\n",
                       "rows_ref_number": json.dumps(dict(row, ref=7)) + "\n"}.items():
        (root / f"{name}.jsonl").write_text(text)
        p[name] = root / f"{name}.jsonl"
    (root / "rows_latin1.jsonl").write_bytes(json.dumps(row).encode().replace(b"a", b"\xe9", 1) + b"\n")
    p["rows_latin1"] = root / "rows_latin1.jsonl"
    # images: a picture, a damaged one, a decompression bomb; manifests
    Image.new("RGB", (160, 120), "red").save(root / "red.png")
    (root / "corrupt.png").write_bytes((root / "red.png").read_bytes()[:40])
    (root / "bomb.png").write_bytes(png_claiming(16384, 16384))
    p.update(png=root / "red.png", corrupt=root / "corrupt.png", bomb=root / "bomb.png")
    good_line = json.dumps({"image": "red.png", "caption": "a red picture"})
    for name, text in {"manifest": good_line + "\n" + good_line + "\n", "manifest_empty": "",
                       "manifest_blank": "\n \n",
                       "manifest_bad": "not json\n" + json.dumps({"image": "red.png"})}.items():
        (root / f"{name}.jsonl").write_text(text)
        p[name] = root / f"{name}.jsonl"
    (root / "codec.ckpt").write_bytes(b"garbage")
    HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(root / "tok_no_specials.json"))
    p.update(codec_garbage=root / "codec.ckpt", tok_no_specials=root / "tok_no_specials.json")
    return p


def snapshot(*folders):
    return {path: path.stat().st_mtime_ns for folder in folders for path in Path(folder).rglob("*")}


def run(script, argv, capsys):
    """(exit code, stderr lines) of one run in this process, as its __main__ would end."""
    capsys.readouterr()
    code = 0
    if script in MAINS:
        with redirect_stdout(StringIO()):
            try:
                configurator.run_main(MAINS[script], argv)
            except SystemExit as e:
                code = e.code
        return code, capsys.readouterr().err.splitlines()
    argv_before, hook = sys.argv, sys.excepthook
    sys.argv, message = [str(FLAT[script]), *argv], None
    try:
        with redirect_stdout(StringIO()):
            runpy.run_path(str(FLAT[script]), run_name="__main__")
    except SystemExit as e:  # a message: Python prints it and exits 1 (only a run that fails midway does this)
        code, message = (e.code, None) if isinstance(e.code, int) else (1, e.code)
    except Exception as e:  # noqa: BLE001 - what configurator.excepthook would do with it; a bug fails the test
        if (message := configurator.one_line(e)) is None:
            raise
        code = 2
    finally:
        sys.argv, sys.excepthook = argv_before, hook
    return code, capsys.readouterr().err.splitlines() + ([message] if message else [])


S = ["--prompt", "x", "--device", "cpu"]  # sample.py; --ckpt and --out are added unless a case names them
T = ["--model_name=tiny", "--device=cpu", "--batch_size=2", "--max_iters=0", "--warmup_iters=0"]  # train.py
V = ["--vq_name=tiny", "--n_train=4", "--n_eval=2", "--max_steps=0", "--warmup_steps=0"]  # train_vq.py
E = ["--device", "cpu", "--n", "1"]  # eval.py
I = ["--target_size=128", "--device=cpu", "--chunk_size=2"]  # data/images/prepare.py
H = ["--n=4", "--device=cpu", "--eval_per_task=1"]  # data/shapes/prepare.py
OK = None  # the case succeeds

CASES = [
    # ---- sample.py: ranges, prompt, task, device, output, reference image ----
    ("sample", ["--num_samples", "-3"], "--num_samples=-3: must be >= 1"), ("sample", ["--num_samples", "0"], ">= 1"),
    ("sample", ["--best_of", "0"], "--best_of=0"), ("sample", ["--height", "0"], "--height=0"),
    ("sample", ["--width", "0"], "--width=0"), ("sample", ["--width", "-64"], "--width=-64"),
    ("sample", ["--width", "100"], "not a multiple of 32"),
    ("sample", ["--top_k", "-1"], "--top_k"), ("sample", ["--temperature", "-1"], "--temperature"),
    ("sample", ["--temperature", "nan"], "--temperature=nan"), ("sample", ["--cfg", "nan"], "--cfg=nan"),
    ("sample", ["--cfg", "-2"], "--cfg"), ("sample", ["--threads", "-1"], "--threads"),
    ("sample", ["--sjd", "--sjd_window", "0"], "--sjd_window"), ("sample", ["--top_n_sigma", "-1"], "--top_n_sigma"),
    ("sample", ["--num_samples", "two"], "invalid int value"), ("sample", ["--quant", "int8"], "invalid choice"),
    ("sample", ["--dtype", "float64"], "invalid choice"), ("sample", ["--colour", "red"], "unrecognized arguments"),
    ("sample", ["--prompt", ""], "the prompt is empty"), ("sample", ["--prompt", "   "], "the prompt is empty"),
    ("sample", ["--prompt", "a", "--prompt", "b"], "multi-round edit"), ("sample", ["--task", "paint"], "unknown task"),
    ("sample", ["--task", "subject", "--ref", "{png}"], "needs subject"),
    ("sample", ["--task", "edge", "--ref", "{missing}"], "does not exist"),
    ("sample", ["--task", "edge", "--ref", "{corrupt}"], "cannot read reference image"),
    ("sample", ["--task", "edge", "--ref", "{text}"], "cannot read reference image"),
    ("sample", ["--task", "edge", "--ref", "{folder}"], "reference image"),
    ("sample", ["--task", "edge", "--ref", "{bomb}"], "too large"),
    ("sample", ["--device", NO_CUDA], "CUDA"), ("sample", ["--device", "tpu"], "not one of cpu, cuda"),
    ("sample", ["--device", "cuda:x"], "not one of"), ("sample", ["--device", "gpu"], "not one of"),
    ("sample", ["--out", "{file}"], "is a file"), ("sample", ["--out", "{file}/samples"], "is a file"),
    # ---- sample.py: the checkpoint folder and its parts ----
    ("sample", ["--ckpt", "{missing}"], "does not exist"), ("sample", ["--ckpt", "{file}"], "does not exist"),
    ("sample", ["--ckpt", "{folder}"], "tokenizer.json is missing"),
    ("sample", ["--ckpt", "{tok_mismatch}"], "this tokenizer is not the model's"),
    ("sample", ["--ckpt", "{tok_truncated}"], "not valid JSON"),
    ("sample", ["--ckpt", "{tok_not_tokenizer}"], "is not a tokenizer"),
    ("sample", ["--ckpt", "{tok_missing}"], "tokenizer.json is missing"),
    ("sample", ["--ckpt", "{sampling_str}"], "sampling.json must map"),
    ("sample", ["--ckpt", "{sampling_key}"], "sampling.json must map"),
    ("sample", ["--ckpt", "{sampling_list}"], "sampling.json must map"),
    ("sample", ["--ckpt", "{model_json_truncated}"], "not valid JSON"),
    ("sample", ["--ckpt", "{model_json_str}"], "dim is '8', expected int"),
    ("sample", ["--ckpt", "{model_json_key}"], "does not know: flash"),
    ("sample", ["--ckpt", "{model_json_missing}"], "neither model.json"),
    ("sample", ["--ckpt", "{weights_truncated}"], "cannot read checkpoint file"),
    ("sample", ["--ckpt", "{weights_missing}"], "model.safetensors"),
    ("sample", ["--ckpt", "{vq_groups}"], "norm_groups 3"), ("sample", ["--ckpt", "{vq_truncated}"], "not a readable"),
    ("sample", ["--vq", "{missing}"], "does not exist"), ("sample", ["--vq", "{vq128}"], "this tokenizer is not"),
    ("sample", ["--vq", "{codec_garbage}"], "not a readable checkpoint"),
    ("sample", ["--best_of", "2", "--verifier", "nosuch:fn"], "cannot load verifier"),
    # ---- train.py: settings ----
    ("train", ["--batch_size=0"], "--batch_size=0: must be >= 1"), ("train", ["--batch_size=-1"], "--batch_size"),
    ("train", ["--gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
    ("train", ["--dropout=1.5"], "--dropout=1.5: must be in [0, 1)"), ("train", ["--dropout=-0.1"], "--dropout"),
    ("train", ["--dropout=1"], "--dropout"), ("train", ["--learning_rate=0"], "--learning_rate"),
    ("train", ["--learning_rate=-1e-3"], "--learning_rate"), ("train", ["--max_iters=-1"], "--max_iters"),
    ("train", ["--eval_iters=0"], "--eval_iters"), ("train", ["--length_buckets=0"], "--length_buckets"),
    ("train", ["--keep_checkpoints=0"], "--keep_checkpoints"), ("train", ["--warmup_iters=-5"], "--warmup_iters"),
    ("train", ["--beta2=1.0"], "--beta2"), ("train", ["--grad_clip=0"], "--grad_clip"),
    ("train", ["--checkpoint_interval=0"], "checkpoint_interval"), ("train", ["--log_interval=0"], "log_interval"),
    ("train", ["--max_minutes=-1"], "max_minutes"), ("train", ["--seed=-1"], "--seed=-1"),
    ("train", ["--parallel=tp"], "expected 'ddp' or 'fsdp'"),
    ("train", [f"--device={NO_CUDA}"], "CUDA"), ("train", ["--device=tpu"], "not one of"),
    ("train", ["--model_name=huge"], "unknown model preset"), ("train", ["--max_iters=fast"], "expected int"),
    ("train", ["--learning_rat=1"], "unknown setting --learning_rat"), ("train", ["--batch_size"], "needs a value"),
    ("train", ["--compile=yes"], "expected bool"), ("train", ["--dropout=nan"], "expected float"),
    ("train", ["{missing}"], "not found"), ("train", ["{folder}"], "not found"),
    ("train", ["{cfg_syntax}"], "does not run: SyntaxError"), ("train", ["{cfg_key}"], "unknown setting(s)"),
    # ---- train.py: paths, checkpoints, data ----
    ("train", ["--out_dir={file}"], "is a file"), ("train", ["--init_from={missing}"], "no such checkpoint folder"),
    ("train", ["--init_from={file}"], "no such checkpoint folder"),
    ("train", ["--init_from=resume"], "holds no checkpoint"),
    ("train", ["--init_from={folder}"], "model.json is missing"),
    ("train", ["--init_from={weights_truncated}"], "cannot read checkpoint file"),
    ("train", ["--init_from={model_json_str}"], "expected int"),
    ("train", ["--init_from=resume", "--out_dir={resume}"], "train_state.pt is unreadable"),
    ("train", ["--init_from=resume", "--out_dir={resume_weights}"], "cannot read checkpoint file"),
    ("train", ["--data_dir={missing}"], "holds no meta.json"), ("train", ["--data_dir={data_no_val}"], "no val shard"),
    ("train", ["--data_dir={data_bad_meta}"], "not valid JSON"),
    ("train", ["--data_dir={data_no_vocab}"], "no vocab_size"),
    ("train", ["--data_dir={data_meta_list}"], "no vocab_size"),
    ("train", ["--data_dir={data_empty_train}"], "holds no examples"), ("train", ["--data_dir={data_torn}"], "torn"),
    ("train", ["--data_dir={data_bad_offsets}"], "damaged"), ("train", ["--data_dir={data_counts}"], "does not match"),
    ("train", ["--data_dir={data_no_ids}"], "is missing"),
    ("train", ["--data_dir={data_big_vocab}", "--init_from={ckpt}"], "< data vocab"),
    ("train", [], OK), ("train", ["--max_iters=0", "--warmup_iters=5"], OK), ("train", ["--init_from={ckpt}"], OK),
    # ---- train_vq.py (vq.py presets and configs) ----
    ("train_vq", ["--vq_name=huge"], "unknown codec config"), ("train_vq", ["--batch_size=0"], "--batch_size"),
    ("train_vq", ["--image_size=60"], "image_size=60"), ("train_vq", ["--image_size=0"], "--image_size"),
    ("train_vq", ["--image_size=16"], ">= 32"), ("train_vq", ["--n_train=0"], "--n_train"),
    ("train_vq", ["--lr=0"], "--lr"), ("train_vq", ["--max_steps=-1"], "--max_steps"),
    ("train_vq", ["--warmup_steps=-1"], "--warmup_steps"), ("train_vq", ["--threads=-1"], "--threads"),
    ("train_vq", ["--log_every=0"], "--log_every"), ("train_vq", ["--batch_size=two"], "expected int"),
    ("train_vq", ["--mosaic=maybe"], "expected bool"), ("train_vq", ["--vq=tiny"], "unknown setting"),
    ("train_vq", ["--init_from=best"], "expected 'scratch' or 'resume'"),
    ("train_vq", ["--init_from=resume"], "does not exist"), ("train_vq", ["--out_dir={file}"], "is a file"),
    ("train_vq", ["--init_from=resume", "--out_dir={vq_resume_junk}"], "is damaged"),
    ("train_vq", ["--init_from=resume", "--out_dir={vq_resume_keys}"], "no 'model'"),
    ("train_vq", ["--init_from=resume", "--out_dir={vq_resume_config}"], "must be >= 1"),
    ("train_vq", [], OK), ("train_vq", ["--warmup_steps=5"], OK),
    # ---- eval.py ----
    ("eval", ["--n", "0"], "--n=0"), ("eval", ["--n", "-1"], "--n=-1"), ("eval", ["--best_of", "0"], "--best_of"),
    ("eval", ["--limit", "-1"], "--limit"), ("eval", ["--codec_images", "0"], "--codec_images"),
    ("eval", ["--size", "0"], "--size"), ("eval", ["--top_k", "-5"], "--top_k"),
    ("eval", ["--temperature", "nan"], "--temperature"), ("eval", ["--n", "abc"], "invalid int value"),
    ("eval", ["--prompts", "{missing}"], "does not exist"), ("eval", ["--prompts", "{folder}"], "does not exist"),
    ("eval", ["--prompts", "{rows_empty}"], "holds no rows"), ("eval", ["--prompts", "{rows_blank}"], "holds no rows"),
    ("eval", ["--prompts", "{rows_not_json}"], "not JSON lines"), ("eval", ["--prompts", "{rows_latin1}"], "not JSON"),
    ("eval", ["--prompts", "{rows_list}"], "row 1 is not an object"),
    ("eval", ["--prompts", "{rows_no_prompt}"], "row 1"), ("eval", ["--prompts", "{rows_no_category}"], "row 1"),
    ("eval", ["--prompts", "{rows_prompt_number}"], "row 1"), ("eval", ["--prompts", "{rows_ref_number}"], "row 1"),
    ("eval", ["--prompts", "{rows_category}"], "unknown categories"),
    ("eval", ["--only", "edges"], "--only: unknown categories"), ("eval", ["--only", "pair"], "holds no rows of pair"),
    ("eval", ["--prompts", "{rows_ref_missing}"], "nowhere.png does not exist (1 missing in all)"),
    ("eval", ["--ckpt", "{tok_mismatch}"], "this tokenizer is not the model's"),
    ("eval", ["--ckpt", "{missing}"], "does not exist"), ("eval", ["--device", "tpu"], "not one of"),
    ("eval", ["--out_dir", "{file}"], "is a file"), ("eval", ["--codec", "--vq", "{missing}"], "no checkpoint at"),
    ("eval", ["--codec", "--vq", "{vq_truncated}/vq.safetensors"], "not a readable checkpoint"),
    ("eval", ["--codec", "--vq", "{ckpt}", "--codec_images", "2"], OK),
    # ---- data/images/prepare.py ----
    ("images", ["--manifest={missing}"], "no manifest"), ("images", ["--manifest={folder}"], "is a folder"),
    ("images", ["--manifest={manifest_empty}"], "has no lines"),
    ("images", ["--manifest={manifest_blank}"], "no lines"),
    ("images", ["--codec={missing}"], "no codec"), ("images", ["--codec={vq_truncated}"], "not a readable checkpoint"),
    ("images", ["--codec={codec_garbage}"], "not a readable checkpoint"),
    ("images", ["--tokenizer={missing}"], "no tokenizer"),
    ("images", ["--tokenizer={tok_truncated}/tokenizer.json"], "not valid JSON"),
    ("images", ["--tokenizer={tok_not_tokenizer}/tokenizer.json"], "is not a tokenizer"),
    ("images", ["--tokenizer={tok_no_specials}"], "tokenizer lacks"), ("images", ["--out_dir={file}"], "is a file"),
    ("images", ["--out_dir={file}/shards"], "is a file"), ("images", ["--target_size=100"], "--target_size 100"),
    ("images", ["--target_size=0"], "--target_size"), ("images", ["--target_size=99999"], "beyond the size tokens"),
    ("images", ["--chunk_size=0"], "--chunk_size"), ("images", ["--workers=0"], "--workers"),
    ("images", ["--batch_size=0"], "--batch_size"), ("images", ["--val_fraction=1.5"], "--val_fraction"),
    ("images", ["--val_fraction=-0.1"], "--val_fraction"), ("images", [f"--device={NO_CUDA}"], "CUDA"),
    ("images", ["--device=tpu"], "not one of"), ("images", ["--threads=-2"], "--threads"),
    ("images", ["--chunk_size=x"], "expected int"), ("images", ["--bogus=1"], "unknown setting"),
    ("images", ["--force=maybe"], "expected bool"), ("images", ["--seed=1.5"], "expected int"),
    ("images", ["--manifest={manifest_bad}"], "made a training example"),
    # ---- data/shapes/prepare.py ----
    ("shapes", ["--codec="], "no codec"), ("shapes", ["--codec={missing}"], "no codec"),
    ("shapes", ["--codec={vq_truncated}"], "not a readable checkpoint"),
    ("shapes", ["--tokenizer={missing}"], "no tokenizer"),
    ("shapes", ["--tokenizer={tok_truncated}/tokenizer.json"], "not valid JSON"),
    ("shapes", ["--tokenizer={tok_not_tokenizer}/tokenizer.json"], "is not a tokenizer"),
    ("shapes", ["--n=0"], "--n=0"),
    ("shapes", ["--n=1"], "no training example"), ("shapes", ["--size=60"], "multiple of 32"),
    ("shapes", ["--size=0"], "--size"), ("shapes", ["--val_fraction=1.0"], "--val_fraction"),
    ("shapes", ["--vocab_size=0"], "--vocab_size"), ("shapes", ["--batch_size=0"], "--batch_size"),
    ("shapes", ["--mix=circle=1"], "unknown kind"), ("shapes", ["--mix=single_object=x"], "numbers as weights"),
    ("shapes", ["--mix=single_object=0"], "not all 0"), ("shapes", ["--mix=single_object=-1"], ">= 0"),
    ("shapes", ["--mix=single_object"], "kind=weight"), ("shapes", ["--device=tpu"], "not one of"),
    ("shapes", [f"--device={NO_CUDA}"], "CUDA"), ("shapes", ["--out_dir={file}"], "is a file"),
    ("shapes", ["--eval_per_task=-1"], "--eval_per_task"), ("shapes", ["--threads=-1"], "--threads"),
    ("shapes", ["--n=many"], "expected int"), ("shapes", ["--force=2"], "expected bool"),
    ("shapes", ["--epochs=1"], "unknown setting"),
]
BASE = {"sample": S, "train": T, "train_vq": V, "eval": E, "images": I, "shapes": H}


def full_argv(script, argv, out, p):
    """The case's arguments after the script's defaults: the tiny checkpoint, fixture data, a fresh out."""
    named = " ".join(argv)
    if script == "sample":
        return (S[2:] + ["--prompt", "x"] * ("--prompt" not in named) + ["--ckpt", "{ckpt}"] * ("--ckpt" not in named)
                + ["--out", str(out)] * ("--out" not in named) + argv)
    if script == "eval":
        return (E + ["--ckpt", "{ckpt}"] * ("--ckpt" not in named)
                + ["--prompts", "{rows}"] * ("--prompts" not in named)
                + ["--out_dir", str(out)] * ("--out_dir" not in named) + argv)
    config_files, argv = [a for a in argv if not a.startswith("--")], [a for a in argv if a.startswith("--")]
    own = {"train": [f"--out_dir={out}", "--data_dir={data}"], "train_vq": [f"--out_dir={out}"],
           "images": ["--manifest={manifest}", "--codec={ckpt}", "--tokenizer={tok}", f"--out_dir={out}"],
           "shapes": ["--codec={ckpt}", "--tokenizer={tok}", f"--out_dir={out}"]}[script]
    own = [a for a in own if a.partition("=")[0] not in named]
    return config_files + BASE[script] + own + argv


# ids never say "cuda": scripts/gpu_run.sh picks the CUDA-only tests with `pytest -k cuda`
@pytest.mark.parametrize("script, argv, expected", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1]) or 'defaults'}".replace("cuda", "gpu") for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, capsys, script, argv, expected):
    out = tmp_path / "out"
    argv = [a.format(**world) for a in full_argv(script, argv, out, world)]
    before = snapshot(world["ckpt"], world["file"].parent)
    code, lines = run(script, argv, capsys)
    if expected is OK:
        assert code == 0, lines
        assert all(line.startswith("warning:") or "Traceback" not in line for line in lines)
        return
    assert code != 0, f"succeeded: {lines}"
    if "made a training example" in expected:  # after reading every line (its progress bar shows): skipped.txt
        lines = lines[-1:]                     # says why, and no meta.json makes the folder look finished
        assert "line 1: not JSON" in (out / "skipped.txt").read_text() and not (out / "meta.json").exists()
    else:
        assert not out.exists(), sorted(out.rglob("*"))  # nothing written
    assert len(lines) == 1 and "Traceback" not in lines[0], lines  # one line
    assert expected in lines[0], lines
    assert snapshot(world["ckpt"], world["file"].parent) == before  # nor into the inputs


def test_warnings_for_settings_that_make_no_sense_together(world, tmp_path, capsys):
    """warmup longer than the run: train.py and train_vq.py say so and run anyway."""
    for script, argv in (("train", T + ["--max_iters=0", "--warmup_iters=5", f"--out_dir={tmp_path}/t",
                                        f"--data_dir={world['data']}", "--min_lr=1", "--learning_rate=0.1"]),
                         ("train_vq", V + ["--warmup_steps=5", f"--out_dir={tmp_path}/v"])):
        code, lines = run(script, argv, capsys)
        warnings = [line for line in lines if line.startswith("warning:")]  # the rest: progress bars
        assert code == 0 and "Traceback" not in "\n".join(lines), lines
        assert "never reached" in warnings[0] and (script != "train" or "min_lr=1" in warnings[1]), lines


def test_mismatched_tokenizer_names_both_sizes(world, capsys):
    """The once silently wrong case: a folder whose tokenizer.json has another vocabulary is refused,
    and the message names the tokenizer's ids + codes and the model's vocab_size."""
    vocab = json.loads((world["ckpt"] / "model.json").read_text())["vocab_size"]
    ids = HFTokenizer.from_file(str(world["tok_mismatch"] / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert ids + 64 != vocab  # 64: the tiny codec's codebook
    code, lines = run("sample", S + ["--ckpt", str(world["tok_mismatch"]), "--out", str(world["missing"])], capsys)
    assert code == 2 and len(lines) == 1
    assert f"has {ids} ids + the codec's 64 codes = {ids + 64}, but the model's vocab_size is {vocab}" in lines[0]


def test_prepare_skips_non_utf8_lines_and_reads_a_bom(world, tmp_path, capsys):
    """A manifest starting with a UTF-8 BOM keeps its first line; a line that is not UTF-8 is skipped and
    listed, like any bad line, instead of ending the run."""
    line = json.dumps({"image": str(world["png"]), "caption": "a red picture"}).encode()
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + line + b"\n" + line.replace(b"red", b"r\xe9d") + b"\n" + line)
    argv = I + [f"--manifest={tmp_path / 'm.jsonl'}", f"--codec={world['ckpt']}", f"--tokenizer={world['tok']}",
                f"--out_dir={tmp_path / 'out'}", "--val_fraction=0"]
    code, lines = run("images", argv, capsys)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert code == 0 and meta["counts"]["train"] == 2 and meta["counts"]["skipped"] == 1, lines
    assert (tmp_path / "out" / "skipped.txt").read_text().startswith("line 2: not UTF-8")


def children(pid):
    """Live (not zombie) processes whose parent is pid, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def processes(world, tmp_path_factory):
    """The real processes, started before the in-process cases so that their start-up (importing torch,
    a few seconds each) overlaps them: two bad runs, one per kind of top-level handler, and a 2-worker
    prepare whose image 4 is a FIFO no one writes, so it cannot finish before the kill test kills it."""
    root, env = tmp_path_factory.mktemp("processes"), {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = {"sample.py": ([sys.executable, "sample.py", "--ckpt", str(world["tok_mismatch"]), "--prompt", "x",
                          "--device", "cpu", "--out", str(root / "s")], "this tokenizer is not the model's"),
           "train.py": ([sys.executable, "train.py", f"--data_dir={world['data_torn']}", "--device=cpu",
                         "--model_name=tiny", f"--out_dir={root / 't'}"], "torn")}
    nice = ["nice", "-n", "10"]  # so this process keeps its core: the in-process cases are the longer path
    runs = {name: (subprocess.Popen(nice + cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE), message) for name, (cmd, message) in bad.items()}
    fifo = root / "late.png"
    os.mkfifo(fifo)
    line = json.dumps({"image": str(world["png"]), "caption": "a red picture"})
    lines = [line] * 3 + [json.dumps({"image": str(fifo), "caption": "late"})] + [line] * 4
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    argv = I + [f"--manifest={root / 'm.jsonl'}", f"--codec={world['ckpt']}", f"--tokenizer={world['tok']}",
                f"--out_dir={root / 'prepare'}", "--workers=2", "--threads=1"]
    prepare = subprocess.Popen(nice + [sys.executable, "-m", "data.images.prepare", *argv], cwd=REPO, env=env,
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield root, runs, prepare
    for proc, _ in runs.values():
        proc.kill()
    try:
        os.killpg(prepare.pid, signal.SIGKILL)  # whatever is left, so a failing test leaks nothing either
    except ProcessLookupError:
        pass


def test_real_processes_print_one_line_and_no_traceback(processes):
    """Real processes: the top-level handlers (run_main in sample.py, the excepthook of the flat train.py)
    keep every traceback from the terminal: one line on stderr, exit code 2, nothing written."""
    root, runs, _ = processes
    for name, (proc, message) in runs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (name, err)
    assert not any((root / d).exists() for d in "st")


def test_killed_two_worker_prepare_leaves_no_process_and_no_temp_file(processes):
    """SIGKILL the parent of a --workers=2 prepare while a worker is blocked on an image no one writes:
    within 5 s no process of the run is left (each pool process watches its parent), and no *.tmp file
    is left in the output."""
    root, _, proc = processes
    out, deadline = root / "prepare", time.monotonic() + 120
    while not (out / "parts" / "part-000000.pkl").exists() or len(workers := children(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers)), [w for w in workers if alive(w)]
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
