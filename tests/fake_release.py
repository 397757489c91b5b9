"""A miniature Lumina-mGPT 2.0 release in the official layout, for end-to-end tests.

Same file names, key names, token ids, special-token strings and codec format as the real release
(docs/architecture.md §5, docs/tokens.md §2, docs/codec.md §3); only the widths are tiny. The vocabulary
keeps the official size so image codes sit at 155000-171383 and the codec keeps 16,384 codes.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import sequence as S
from model import ModelConfig, Transformer
from vq import MoVQGAN, VQConfig

OFFICIAL_VOCAB = 171385  # paper Table 2
WORDS = ["a", "photo", "of", "red", "blue", "green", "star", "circle", "square", "Generate", "an", "image",
         "according", "to", "the", "following", "prompt:", "dual-panel", "where"]


def official_tokenizer_json():
    """Qwen2.5-style ids: specials from 151643, the added image tokens from 151665 (§2.2)."""
    specials = {S.BOS: 151643, **{f"<|qwen{i}|>": 151643 + i for i in range(1, 22)},
                S.IMAGE_START: 151665, S.IMAGE_END: 151666, "<reserved08796>": 151667,
                "<reserved08797>": 151668, "<reserved08798>": 151669, S.EOL: 151670}
    specials.update({S.size_token(n): 151671 + n for n in range(0, 65)})
    specials[S.SEP] = 151800  # the real id is not pinned by the spec; every reader looks it up by string
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}, **specials}
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in specials.items()]
    return {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "added_tokens": added,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}


def write_fake_release(folder, n_shards=2, seed=0, max_position_embeddings=10240):
    """Write <folder>/{config.json, model-0000k-of-0000n.safetensors, model.safetensors.index.json,
    tokenizer.json, tokenizer_config.json} and <folder>/movqgan/{movqgan_tiny.ckpt, vq_config.json};
    returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=OFFICIAL_VOCAB, dim=32, intermediate_size=64, n_layer=2, n_head=2,
                         n_kv_head=2, max_seq_len=max_position_embeddings)
    model = Transformer(config)
    with torch.no_grad():  # a random model's logits are nearly flat; make them decisive
        model.lm_head.weight.mul_(50)
    (folder / "config.json").write_text(json.dumps(config.to_hf_config(), indent=1))
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v.to(torch.bfloat16)
             for k, v in model.state_dict().items()}
    keys, weight_map = sorted(state), {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::n_shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "tokenizer.json").write_text(json.dumps(official_tokenizer_json()))
    # as Qwen2.5's tokenizer_config.json: no BOS, so the official code takes the eos token (docs/tokens.md §1)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": S.BOS}))
    # the codec as released: a plain pickled fp32 state dict with the official key names (docs/codec.md §3)
    vq_config = VQConfig(**{**VQConfig.from_name("tiny").__dict__, "n_embed": 16384})
    codec_dir = folder / "movqgan"
    codec_dir.mkdir(exist_ok=True)
    torch.save(MoVQGAN(vq_config).state_dict(), codec_dir / "movqgan_tiny.ckpt")
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in vq_config.__dict__.items()}
    (codec_dir / "vq_config.json").write_text(json.dumps(fields))
    return folder, codec_dir / "movqgan_tiny.ckpt", codec_dir / "vq_config.json"
