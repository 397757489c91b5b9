"""lora.py and train.py's lora_rank: zero adapters leave the base's logits bit for bit, merged weights give
the adapted logits, only adapters learn (on a float or an int4 base, the latter against its dequantized
float twin), a LoRA run killed and resumed ends with the same adapters, sample.py --lora merges them, and
the worked example's mirror task is judged right and stays out of the default mix."""
import copy
import random

import pytest
import torch
from safetensors.torch import load_file

import lora
import shapes
from data.shapes.prepare import DEFAULT_MIX, parse_mix
from model import ModelConfig, Transformer, compute_loss
from quant import Int4Linear, dequantize, quantize_model, unpack
from sample import load_system
from test_train import common, train, write_data
from verify import verify

pytestmark = pytest.mark.usefixtures("one_thread")
# tiny, but every linear's input a multiple of int4's group size (128)
CONFIG = ModelConfig.from_name("tiny", dim=128, intermediate_size=256)


def base_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(CONFIG).eval()


def randomize_adapters(model, seed=1):
    """Non-zero A and B: the start (B = 0) would hide a wrong merge."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(lora.ADAPTER_KEYS):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_zero_adapters_leave_the_logits_of_the_base_exactly():
    """B = 0 at the start: the adapted model's logits equal the base's bit for bit, fp32 and int4 bases."""
    base, idx = base_model(), torch.randint(0, CONFIG.vocab_size, (2, 24))
    adapted = lora.add_lora(copy.deepcopy(base), lora.LoRAConfig("base", rank=4))
    assert torch.equal(adapted(idx), base(idx))
    int4 = quantize_model(copy.deepcopy(base).bfloat16(), path="reference")  # int4 linears, the rest bf16
    adapted = lora.add_lora(copy.deepcopy(base), lora.LoRAConfig("base", rank=4), base_dtype="int4")
    assert torch.equal(adapted(idx), int4(idx))


def test_only_adapters_learn_and_an_int4_base_passes_the_right_gradient():
    """After backward only lora_A/lora_B hold gradients, on the layers the targets name; through an int4 base
    they equal those through a float model holding the dequantized weights."""
    idx = torch.randint(0, CONFIG.vocab_size, (2, 24))
    config = lora.LoRAConfig("base", rank=4, targets="q_proj,v_proj,down_proj")
    int4, twin = randomize_adapters(lora.add_lora(base_model(), config, "int4")), base_model().bfloat16()
    with torch.no_grad():  # the float twin: the int4 model's weights, dequantized
        for name, m in int4.named_modules():
            if isinstance(m, Int4Linear):
                weight = dequantize(unpack(m.weight), m.scales_and_zeros, m.group_size)
                twin.get_submodule(name.removesuffix(".base")).weight.copy_(weight)  # bf16, as int4's matmul
    twin, grads = randomize_adapters(lora.add_lora(twin, config)), []
    for model in (int4, twin):
        compute_loss(model(idx[:, :-1]), idx[:, 1:], torch.ones(2, 23)).backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
        assert with_grad == {f"layers.{i}.{m}.{k}" for i in range(CONFIG.n_layer) for k in ("lora_A", "lora_B")
                             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
        grads.append({n: model.get_parameter(n).grad for n in sorted(with_grad)})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="name no layer"):
        lora.add_lora(base_model(), lora.LoRAConfig("base", targets="q_proj,qproj"))


@pytest.mark.filterwarnings("ignore:config.json max_position_embeddings")  # the tiny context, read back
def test_merged_weights_give_the_adapted_logits(tmp_path, tiny_ckpt):
    """W + alpha/rank * B A, merged by `lora.py merge` (our layout), by sample.py --lora, and written in the
    official layout (bf16), gives the logits of base + adapters to 1e-5."""
    config = lora.LoRAConfig(str(tiny_ckpt), rank=8, alpha=16.0)
    adapted = randomize_adapters(lora.add_lora(Transformer.load(tiny_ckpt), config)).eval()
    lora.save_adapters(tmp_path / "adapters", adapted.state_dict(), config)
    idx = torch.randint(0, adapted.config.vocab_size, (2, 30))
    expected = adapted(idx)
    lora.main(["merge", "--lora", str(tmp_path / "adapters"), "--out", str(tmp_path / "ours")])
    lora.main(["merge", "--lora", str(tmp_path / "adapters"), "--out", str(tmp_path / "hf"), "--hf"])
    ours, sampled = Transformer.load(tmp_path / "ours"), load_system(tiny_ckpt, lora=tmp_path / "adapters").model
    assert {"tokenizer.json", "vq.json", "vq.safetensors"} <= {f.name for f in (tmp_path / "ours").iterdir()}
    for model in (ours, sampled):
        assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=0)
    hf = Transformer.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(hf[key], value.bfloat16().float()), key


def test_killed_lora_run_resumes_exactly(tmp_path):
    """A LoRA run (dropout, activation checkpointing) stopped at step 3 and resumed ends with the adapters
    of an uninterrupted run, bit for bit; its checkpoints hold the adapters alone and name the base."""
    write_data(tmp_path / "data")
    base_model().save_pretrained(tmp_path / "base")
    kw = dict(init_from=tmp_path / "base", lora_rank=4, lora_dropout=0.1, dropout=0.1, max_iters=6,
              activation_checkpointing=True)
    train(common(tmp_path / "data", tmp_path / "full", **kw))
    train(common(tmp_path / "data", tmp_path / "cut", **kw), stop_at="step 3:")
    out = train(common(tmp_path / "data", tmp_path / "cut", **dict(kw, init_from="resume")))
    assert "resuming from" in out and "step 3:" not in out
    full, cut = (tmp_path / run / "ckpt-00000006" for run in ("full", "cut"))
    assert sorted(p.name for p in cut.iterdir()) == ["lora.json", "lora.safetensors", "train_state.pt"]
    assert lora.read_config(cut).base == str(tmp_path / "base")
    a, b = load_file(full / "lora.safetensors"), load_file(cut / "lora.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * CONFIG.n_layer
    assert all(torch.equal(a[k], b[k]) for k in a) and any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_mirror_pairs_are_judged_and_stay_out_of_the_default_mix():
    """The worked example's task: the verifier accepts a pair's mirrored lower panel and rejects its
    upper panel given as the answer; only a --mix that names it trains on it."""
    rng = random.Random(0)
    pairs = [shapes.make_task(rng, "mirror") for _ in range(10)]
    assert all(verify(lower, spec) == 1.0 for _, lower, spec in pairs)
    # a lone object near the centre overlaps its own mirror image (box IoU >= 0.5): one pair of these ten
    assert sum(verify(upper, spec) < 1.0 for upper, _, spec in pairs) == 9
    assert "mirror" not in parse_mix(DEFAULT_MIX) and parse_mix("mirror=1") == {"mirror": 1.0}
