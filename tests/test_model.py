"""model.py and checkpoint.py: cached decoding equals the full forward, official-layout checkpoints
load exactly, presets have the paper's parameter counts, bad checkpoints fail with a message that
names the key, writes are atomic, and the LR schedule and MFU follow their formulas."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
from model import ModelConfig, Transformer, compute_loss, estimate_mfu, lr_schedule


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name("tiny", **overrides)).eval()


def test_prefill_then_decode_equals_full_forward():
    """Prefill + one token at a time through the static cache gives the full forward's logits."""
    model = tiny_model()
    idx = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(idx)
        model.setup_caches(max_batch_size=2, max_seq_length=64)
        parts = [model(idx[:, :25], torch.arange(25))]
        for t in range(25, 40):
            parts.append(model(idx[:, t:t + 1], torch.tensor([t])))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_chunks_with_rewind_equal_full_forward():
    """k-token chunks, including a rewind that overwrites stale K/V (speculative decoding), match."""
    model = tiny_model(1, swin_norm=True)
    idx = torch.randint(0, model.config.vocab_size, (1, 48))
    junk = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        full = model(idx)
        model.setup_caches(1, 64)
        model(idx[:, :20], torch.arange(20))
        model(junk, torch.arange(20, 28))          # a rejected draft window...
        out = model(idx[:, 20:32], torch.arange(20, 32))  # ...rewound and overwritten
        tail = model(idx[:, 32:48], torch.arange(32, 48))
    torch.testing.assert_close(out, full[:, 20:32], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail, full[:, 32:48], atol=1e-5, rtol=1e-5)


def test_smaller_batch_than_cache_and_cache_errors():
    model = tiny_model()
    idx = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        full = model(idx)
        model.setup_caches(4, 16)
        torch.testing.assert_close(model(idx, torch.arange(10)), full, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="input_pos"):
            model(idx)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_caches(1, 10_000)


def naive_attention_forward(model, idx):
    """An independent float64 re-computation of the forward from docs/architecture.md's formulas."""
    cfg, sd = model.config, {k: v.double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    hd = cfg.head_dim

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def qknorm(x, w, b, n):  # x (B,T,n,hd)
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        rows = torch.arange(n) // (n // w.shape[0])
        return (x - mu) / torch.sqrt(var + 1e-5) * w[rows] + b[rows]

    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # pairs (i, i + hd/2) rotate together
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        c, s = cos[None, :, None], sin[None, :, None]
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    x = sd["embed_tokens.weight"][idx]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = lambda n: sd[f"layers.{i}.{n}"]
        h = rms(x, p("input_layernorm.weight"))
        q = (h @ p("self_attn.q_proj.weight").T).view(B, T, cfg.n_head, hd)
        k = (h @ p("self_attn.k_proj.weight").T).view(B, T, cfg.n_kv_head, hd)
        v = (h @ p("self_attn.v_proj.weight").T).view(B, T, cfg.n_kv_head, hd)
        q = rope(qknorm(q, p("self_attn.q_norm.weight"), p("self_attn.q_norm.bias"), cfg.n_head))
        k = rope(qknorm(k, p("self_attn.k_norm.weight"), p("self_attn.k_norm.bias"), cfg.n_kv_head))
        rep = cfg.n_head // cfg.n_kv_head
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd ** 0.5
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, -1)
        x = x + y @ p("self_attn.o_proj.weight").T
        h = rms(x, p("post_attention_layernorm.weight"))
        gate, up = h @ p("mlp.gate_proj.weight").T, h @ p("mlp.up_proj.weight").T
        x = x + (gate * torch.sigmoid(gate) * up) @ p("mlp.down_proj.weight").T
    return rms(x, sd["norm.weight"]) @ sd["lm_head.weight"].T


def test_forward_matches_float64_reference():
    """The model computes docs/architecture.md's formulas (qk-norm before RoPE, rotate-half, SwiGLU, GQA)."""
    model = tiny_model(2, qk_norm_groups=2)
    with torch.no_grad():  # give the q/k-norm affines non-trivial values so they are tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    idx = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        ours = model(idx).double()
    torch.testing.assert_close(ours, naive_attention_forward(model, idx), atol=2e-4, rtol=1e-4)


def write_official_release(model, folder, n_shards=2, extra=None):
    """Write `model` the way transformers' save_pretrained lays out an official checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_config()))
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v.clone()
             for k, v in model.state_dict().items()}
    state.update(extra or {})
    keys = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::n_shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_official_layout_loads_and_reproduces_logits(tmp_path):
    model = tiny_model(3)
    write_official_release(model, tmp_path, n_shards=3,
                           extra={"model.vqmodel.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)})
    loaded = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    idx = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
    assert loaded.config == model.config


def test_official_layout_bf16_load(tmp_path):
    model = tiny_model(4)
    write_official_release(model, tmp_path)
    loaded = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16())


@pytest.mark.parametrize("break_it, expected", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "missing: model.layers.1.mlp.up_proj.weight"),
    (lambda sd: sd.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(4, 16)),
     "misshaped: model.layers.0.self_attn.q_norm.weight [4, 16] vs model [1, 16]"),
    (lambda sd: sd.__setitem__("model.layers.9.mlp.up_proj.weight", torch.ones(2, 2)),
     "unexpected: model.layers.9.mlp.up_proj.weight"),
])
def test_bad_official_checkpoint_names_the_key(tmp_path, break_it, expected):
    """Strict loading of the official layout: every problem is reported in the file's key names."""
    model = tiny_model()
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}
    break_it(state)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_config()))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        Transformer.from_pretrained(tmp_path, dtype=torch.float32)


def test_own_format_round_trip_and_strict_loading(tmp_path):
    """Our format reloads bit-exactly; an unknown model.json key, an extra tensor and a truncated
    file are each refused with a message that names the problem."""
    model = tiny_model(5)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]  # no temp left
    loaded = Transformer.load(tmp_path)
    idx = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))

    config = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(ValueError, match="ModelConfig does not know: n_embd"):
        Transformer.load(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(config))

    path = tmp_path / "model.safetensors"
    save_file({**model.state_dict(), "extra.weight": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match=r"does not match the config; unexpected: extra.weight$"):
        Transformer.load(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        Transformer.load(tmp_path)


def test_check_keys_names_missing_unexpected_and_misshaped():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    checkpoint.check_keys(expected, dict(expected))  # a match passes
    with pytest.raises(ValueError) as error:
        checkpoint.check_keys(expected, {"a": (3, 2), "b": (4,), "d": (5,)}, "ckpt")
    assert str(error.value) == ("ckpt does not match the config; missing: c; unexpected: d; "
                                "misshaped: a [3, 2] vs model [2, 3]")
    with pytest.raises(ValueError, match=r"missing: k0, k1, k2, k3, k4 \(\+2 more\)$"):
        checkpoint.check_keys({f"k{i}": (1,) for i in range(7)}, {})


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "model.json"
    target.write_text("old")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(target, half_then_crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.json"]
    checkpoint.atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model.json"]


@pytest.mark.parametrize("name, expected", [("7B", 7_880_273_920), ("2B", 2_849_617_920)])
def test_preset_parameter_counts_match_table2(name, expected):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name(name))
    assert model.num_params() == expected


def test_preset_keys_match_official_7b_key_list():
    """Every official 7B key and shape (docs/architecture.md §5, from the official modelling code) is ours."""
    from pathlib import Path
    spec = Path(__file__).parent / "data" / "lumina_7B_keys.txt"
    official = {}
    for line in spec.read_text().splitlines():
        key, shape = line.split(" ", 1)
        official[key] = json.loads(shape)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("7B"))
    ours = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): list(v.shape)
            for k, v in model.state_dict().items()}
    assert ours == official


def test_loss_mask_and_z_loss():
    """The loss averages only masked positions; z-loss adds mean logsumexp² over them."""
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]])
    sel = mask.bool()
    ce = torch.nn.functional.cross_entropy(logits[sel], targets[sel])
    z = torch.logsumexp(logits[sel], -1).pow(2).mean()
    torch.testing.assert_close(compute_loss(logits, targets, mask), ce)
    torch.testing.assert_close(compute_loss(logits, targets, mask, z_loss_weight=1e-2), ce + 1e-2 * z)


def test_key_mask_hides_a_left_pad_exactly():
    """A row left-padded with hidden tokens gives the same logits as the unpadded row on its own
    (RoPE is relative), which is how CFG batches its unconditional context."""
    model = tiny_model(6)
    short = torch.randint(0, 512, (1, 9))
    pad = 5
    padded = torch.cat([torch.randint(0, 512, (1, pad)), short], 1)
    with torch.no_grad():
        alone = model(short)
        model.setup_caches(2, 32)
        key_mask = torch.ones(2, 32, dtype=torch.bool)
        key_mask[1, :pad] = False
        batch = torch.cat([padded, padded], 0)
        out = model(batch, torch.arange(pad + 9), key_mask)
        step = model(short[:, -1:].repeat(2, 1), torch.tensor([pad + 9]), key_mask)
    torch.testing.assert_close(out[1, pad:], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0, pad:], alone[0], atol=1e-3)  # the unmasked row does see the pad
    assert torch.isfinite(out).all() and torch.isfinite(step).all()


def test_lr_schedule_matches_the_formula():
    """Warm-up (step + 1) / (warmup + 1) of max_lr, half-cosine from max_lr to min_lr, then flat."""
    max_lr, min_lr, warmup, decay = 1.0, 0.1, 10, 110
    expected = {0: 1 / 11, 4: 5 / 11, 10: 1.0, 35: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 60: 0.55,
                110: 0.1, 500: 0.1}
    for step, lr in expected.items():
        assert lr_schedule(step, max_lr, min_lr, warmup, decay) == pytest.approx(lr, abs=1e-12), step


def test_mfu_is_none_on_cpu_and_uses_the_gpu_peak(monkeypatch):
    config = ModelConfig.from_name("tiny")
    assert estimate_mfu(config, 10**9, 1000, 1e5, "cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    flops = 6 * 10**9 + 12 * 2 * 64 * 1000  # 6N + 12 L d T per token
    assert estimate_mfu(config, 10**9, 1000, 1e5, "cuda") == pytest.approx(flops * 1e5 / 989e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert estimate_mfu(config, 10**9, 1000, 1e5, "cuda") is None
