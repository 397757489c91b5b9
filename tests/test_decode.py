"""The lean decode step (docs/performance.md §5): the image-code-only head samples what the full head
samples, token for token, plain and SJD, with and without CFG; attention over the filled prefix gives the
whole cache's logits and tokens while reading less; compiled with CUDA graphs it matches eager (CUDA only)."""
import copy

import pytest
import torch

from quant import Int4Linear, quantize_model
from sample import CACHE_MULTIPLE, cfg_batch, code_head, generate, kv_lengths, make_step, prefill
from sequence import image_body_plan, image_header_ids, prompt_ids, t2i_prompt, unconditional_ids

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def context(system, side=64):
    layout = system.layout
    prefix = prompt_ids(system.tokenizer, layout, t2i_prompt("a red circle", side, side)) + \
        image_header_ids(side, side, layout)
    return prefix, unconditional_ids(prefix, layout), image_body_plan(side // 8, side // 8, layout)


@pytest.mark.parametrize("sjd_window, cfg", [(0, 3.0), (0, 1.0), (5, 3.0), (5, 1.0)])
def test_code_head_samples_what_the_full_head_samples(tiny_system, sjd_window, cfg):
    """Sampled (top-k 50, not greedy), two samples, same seed: the code head and filled-prefix attention
    against every vocabulary row over the whole cache (the reference step)."""
    prefix, uncond, plan = context(tiny_system)
    kw = dict(num_samples=2, cfg_scale=cfg, top_k=50, temperature=1.0, sjd_window=sjd_window)
    lean, _ = generate(tiny_system.model, tiny_system.layout, prefix, uncond, plan,
                       generator=torch.Generator().manual_seed(3), **kw)
    full, _ = generate(tiny_system.model, tiny_system.layout, prefix, uncond, plan, full_head=True, kv_buckets=1,
                       generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(lean, full)
    forced = plan >= 0
    assert torch.equal(lean[:, forced], plan[forced].expand(2, -1))  # EOL and image end, never drawn


def test_kv_lengths():
    for max_len, buckets in ((104, 8), (9320, 8), (16, 8), (9320, 1)):
        lengths = kv_lengths(max_len, buckets)
        assert lengths[-1] == max_len and len(lengths) <= buckets and lengths == sorted(set(lengths))
        assert all(n % CACHE_MULTIPLE == 0 for n in lengths)
        gaps = [b - a for a, b in zip([0] + lengths, lengths)]
        assert max(gaps) <= -(-max_len // buckets) + CACHE_MULTIPLE  # no bucket reads much past what is filled


def test_filled_prefix_attention_equals_the_whole_cache(tiny_system):
    """Step by step, the bucketed step and the whole-cache step (each writing the same K/V) give the
    same logits, the code head the full head's code rows; and the bucketed step read fewer entries."""
    model, layout = tiny_system.model, tiny_system.layout
    prefix, uncond, plan = context(tiny_system)
    max_len = -(-(len(prefix) + len(plan)) // CACHE_MULTIPLE) * CACHE_MULTIPLE
    idx, key_mask = cfg_batch(prefix, uncond, 2, 3.0, layout.bos_id, max_len, "cpu")
    widths, hidden = [], model.hidden

    def spy(idx, input_pos=None, key_mask=None):
        widths.append(key_mask.shape[1])
        return hidden(idx, input_pos, key_mask)
    model.setup_caches(len(idx), max_len)
    try:
        with torch.no_grad():
            prefill(model, idx, key_mask)
            whole, lean = make_step(model, key_mask, True, buckets=1), make_step(model, key_mask, True,
                                                                                 head=code_head(model, layout))
            tokens = layout.image_code_offset + torch.randint(layout.codebook_size, (2, len(plan)),
                                                              generator=torch.Generator().manual_seed(0))
            model.hidden = spy
            for i in range(len(plan)):
                reference = whole(tokens[:, i:i + 1], len(prefix) + i)
                ours = lean(tokens[:, i:i + 1], len(prefix) + i)
                codes = reference[..., layout.image_code_offset:layout.image_code_offset + layout.codebook_size]
                torch.testing.assert_close(ours, codes, rtol=1e-5, atol=1e-5)
    finally:
        del model.hidden
        model.clear_caches()
    assert widths[0::2] == [max_len] * len(plan) and widths[1] < max_len and widths[-1] == max_len


def test_int4_blocks_get_an_int4_code_head(tiny_system):
    """With int4 blocks (--quant int4) the code head is int4 too, made once, outside state_dict, and close to
    the float rows (docs/performance.md §5 gives its measured KL on the shipped model)."""
    model, layout = copy.deepcopy(tiny_system.model), tiny_system.layout
    keys = set(model.state_dict())
    quantize_model(model, group_size=32)
    head = code_head(model, layout)
    assert isinstance(head, Int4Linear) and code_head(model, layout) is head
    hidden = torch.randn(3, model.config.dim)
    rows = model.lm_head.weight[layout.image_code_offset:layout.image_code_offset + layout.codebook_size]
    reference = hidden @ rows.T
    assert (head(hidden) - reference).norm() < 0.1 * reference.norm()
    assert set(model.state_dict()) - keys == {k.replace(".weight", ".scales_and_zeros") for k in keys
                                              if k.startswith("layers.") and "proj" in k}


@requires_cuda
def test_cuda_compiled_decoding_matches_eager():
    """fp32 on CUDA, compiled with CUDA graphs (several attention lengths): greedy plain and greedy SJD
    equal eager greedy plain decoding, token for token."""
    from bench import random_model
    from types import SimpleNamespace
    args = SimpleNamespace(seed=0, model="shapes", layers=2, size=128)
    model, layout, size, _, prefix = random_model(args, torch.device("cuda"), torch.float32)
    prefix = prefix + image_header_ids(size, size, layout)
    plan = image_body_plan(size // 8, size // 8, layout)[:120]
    kw = dict(num_samples=1, cfg_scale=4.0, top_k=1, temperature=1.0)
    eager, _ = generate(model, layout, prefix, unconditional_ids(prefix, layout), plan, **kw)
    for window in (0, 16):
        compiled, _ = generate(model, layout, prefix, unconditional_ids(prefix, layout), plan, compile=True,
                               sjd_window=window, generator=torch.Generator("cuda").manual_seed(0), **kw)
        assert torch.equal(compiled, eager), window
