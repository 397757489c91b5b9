"""sjd.py: greedy SJD == greedy plain decoding token for token; SJD samples the same joint
distribution as plain decoding (a chi-square test that also rejects a broken acceptance rule);
never more forward passes than plain decoding."""
import inspect
from functools import partial

import pytest
import torch

import sjd
from model import ModelConfig, Transformer
from sample import CACHE_MULTIPLE, cfg_batch, decode_n_tokens, generate, logits_to_probs, make_step, prefill
from sequence import TokenLayout, image_body_plan, image_header_ids, prompt_ids, t2i_prompt, unconditional_ids


def t2i_context(system, width, height):
    layout = system.layout
    prefix = prompt_ids(system.tokenizer, layout, t2i_prompt("a red circle", width, height)) + \
        image_header_ids(height, width, layout)
    return prefix, unconditional_ids(prefix, layout), image_body_plan(height // 8, width // 8, layout)


@pytest.mark.parametrize("width, height, window, init", [(64, 64, 16, "random"), (96, 64, 16, "spatial"),
                                                          (32, 96, 5, "random")])
def test_greedy_sjd_equals_greedy_plain(tiny_system, width, height, window, init):
    """top_k 1 with CFG: every SJD pass must reproduce plain decoding's argmax chain exactly,
    through rejections, cache rewinds and the window pinned at the image end."""
    system = tiny_system
    prefix, uncond, plan = t2i_context(system, width, height)
    kw = dict(num_samples=2, cfg_scale=3.0, top_k=1, temperature=1.0)
    plain, plain_stats = generate(system.model, system.layout, prefix, uncond, plan, **kw)
    fast, stats = generate(system.model, system.layout, prefix, uncond, plan, sjd_window=window, sjd_init=init,
                           generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(fast, plain)
    assert stats["tokens"] == len(plan) and stats["forward_passes"] <= plain_stats["forward_passes"]
    assert stats["step_compression"] == pytest.approx(len(plan) / stats["forward_passes"])


@pytest.mark.parametrize("init, top_k, cfg", [("random", 50, 2.0), ("spatial", 0, 1.0)])
def test_never_more_passes_than_plain(tiny_system, init, top_k, cfg):
    """Every pass finalises at least one token per row, so SJD never needs more passes; forced
    positions (EOL, image end) come out as forced, with or without CFG rows."""
    system = tiny_system
    prefix, uncond, plan = t2i_context(system, 64, 64)
    tokens, stats = generate(system.model, system.layout, prefix, uncond, plan, num_samples=3, cfg_scale=cfg,
                             top_k=top_k, temperature=1.0, sjd_window=16, sjd_init=init,
                             generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (3, len(plan)) and 1 <= stats["forward_passes"] <= len(plan)
    assert stats["mean_accepted"] >= 1.0
    forced = plan >= 0
    assert torch.equal(tokens[:, forced], plan[forced].expand(3, -1))

# -----------------------------------------------------------------------------
# losslessness: a toy model whose distributions are far from uniform, and the exact joint law

TOY = TokenLayout(bos_id=0, image_start_id=1, image_end_id=2, eol_id=3, sep_id=4, image_code_offset=8,
                  codebook_size=4, size_token_ids=(5, 6, 7))
TOY_PREFIX = [0, 4, 4, TOY.image_start_id, 5, 6]
TOY_SAMPLING = dict(cfg_scale=2.0, top_k=3, temperature=1.0)  # top-k 3 of 4: p(draft) = 0 happens
# window 4 (3 drafts a pass) over the first 9 tokens of a 3x3-code image: tokens 1, 2, 4 lie in the
# first window (3 is an EOL), tokens 5, 6, 8 in later ones, the last pinned at the plan's end
POSITIONS = [(1, 2, 4), (5, 6, 8)]
PLAN_LEN = 9  # tokens: the laws of POSITIONS never look further, so the toy samples no more


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def exact_joint(model, plan, positions):
    """P(codes at `positions`) by enumeration: the chain rule over every image prefix before the last
    position (a code), with the exact probabilities of the shared sampling function (CFG, constraint,
    top-k); the last position's law comes with each prefix's final logits -> (4**k,)."""
    uncond, last, n_codes = unconditional_ids(TOY_PREFIX, TOY), positions[-1], TOY.codebook_size
    free = [i for i in range(last) if plan[i] < 0]
    grid = torch.cartesian_prod(*[torch.arange(n_codes)] * len(free)).view(-1, len(free))
    body = plan[:last].repeat(len(grid), 1)
    body[:, free] = grid + TOY.image_code_offset  # (N, last): every image prefix before `last`
    with torch.no_grad():
        cond = model(torch.cat([torch.tensor(TOY_PREFIX).expand(len(body), -1), body], 1))
        unc = model(torch.cat([torch.tensor(uncond).expand(len(body), -1), body], 1))
        k, ku = len(TOY_PREFIX) - 1, len(uncond) - 1
        logits = torch.cat([cond[:, k:k + last + 1], unc[:, ku:ku + last + 1]])
        probs = logits_to_probs(logits, plan[:last + 1], TOY, **TOY_SAMPLING)  # (N, last+1, codes)
    columns = sjd.to_columns(body, plan[:last], TOY)[..., None]
    prefix_prob = probs[:, :last].gather(-1, columns)[..., 0].prod(1)  # (N,) P(prefix)
    joint = prefix_prob[:, None] * probs[:, last, :n_codes]  # (N, 4)
    cells = cell(body, positions[:-1])[:, None] + torch.arange(n_codes) * n_codes ** (len(positions) - 1)
    return torch.zeros(n_codes ** len(positions)).index_add_(0, cells.flatten(), joint.flatten())


def cell(tokens, positions):
    """(N, n) tokens -> (N,) index of the joint cell of the codes at `positions`."""
    return sum((tokens[:, i] - TOY.image_code_offset) * TOY.codebook_size ** j for j, i in enumerate(positions))


def chi2_pvalue(counts, probs, min_expected=5.0):
    """Goodness of fit of counts to probs (cells expecting < 5 pooled); the chi-square survival
    function is the regularized upper incomplete gamma Q(dof/2, stat/2)."""
    expected = probs.double() * counts.sum()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), stat / 2))


def toy_samples(model, plan, sjd_window, batches, per_batch, init="random"):
    """`batches` runs of `per_batch` samples, seeds 0, 1, ...: sample.generate with its prefill hoisted out
    of the loop. Every run shares the prefix and reads only cache entries that the prefill or the run
    itself wrote, so the tokens are generate()'s (test_hoisted_prefill_gives_generates_tokens)."""
    uncond = unconditional_ids(TOY_PREFIX, TOY)
    max_len = -(-(len(TOY_PREFIX) + len(plan)) // CACHE_MULTIPLE) * CACHE_MULTIPLE  # generate()'s cache length
    idx, key_mask = cfg_batch(TOY_PREFIX, uncond, per_batch, TOY_SAMPLING["cfg_scale"], TOY.bos_id, max_len, "cpu")
    probs_fn = partial(logits_to_probs, layout=TOY, **TOY_SAMPLING)
    model.setup_caches(len(idx), max_len)
    runs = []
    try:
        with torch.no_grad():
            logits, step = prefill(model, idx, key_mask), make_step(model, key_mask, use_cfg=True)
            for seed in range(batches):
                generator = torch.Generator().manual_seed(seed)
                runs.append(sjd.sjd_generate(step, logits, plan, len(TOY_PREFIX), probs_fn, TOY, generator=generator,
                                             window=sjd_window, init=init) if sjd_window else
                            decode_n_tokens(step, logits, plan, len(TOY_PREFIX), probs_fn, TOY, generator))
    finally:
        model.clear_caches()
    assert all(stats["forward_passes"] <= len(plan) for _, stats in runs)
    return torch.cat([tokens for tokens, _ in runs])


@pytest.fixture(scope="module")
def toy(one_thread):
    """A toy model (4 image codes), the plan of the first PLAN_LEN tokens of a 3x3-code image, the
    exact joint laws of POSITIONS, and 1600 plain samples: computed once for the tests below."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=TOY.vocab_size, dim=32, intermediate_size=64,
                                              max_seq_len=64))
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)  # skewed (joint entropy ~half of uniform), input-dependent laws
    model.eval()
    plan = image_body_plan(3, 3, TOY)[:PLAN_LEN]
    exact = [exact_joint(model, plan, positions) for positions in POSITIONS]
    return model, plan, exact, toy_samples(model, plan, sjd_window=0, batches=4, per_batch=400)


@pytest.mark.parametrize("sjd_window", [0, 4])
def test_hoisted_prefill_gives_generates_tokens(toy, sjd_window):
    """toy_samples' shortcut (one prefill for many runs) samples exactly what sample.generate samples."""
    model, plan, _, _ = toy
    uncond = unconditional_ids(TOY_PREFIX, TOY)
    expected = [generate(model, TOY, TOY_PREFIX, uncond, plan, num_samples=2, sjd_window=sjd_window,
                         generator=torch.Generator().manual_seed(seed), **TOY_SAMPLING)[0] for seed in range(3)]
    assert torch.equal(toy_samples(model, plan, sjd_window, batches=3, per_batch=2), torch.cat(expected))


def test_chi2_pvalue_helper():
    """Textbook values: chi-square(1) exceeds 3.841 with p 0.05, chi-square(10) exceeds 23.209 with p 0.01."""
    assert chi2_pvalue(torch.tensor([50.0, 50.0]), torch.tensor([0.5, 0.5])) == pytest.approx(1.0)
    assert chi2_pvalue(torch.tensor([60.0, 40.0]), torch.tensor([0.5, 0.5])) == pytest.approx(0.0455, abs=1e-4)
    for dof, stat, p in ((1, 3.841, 0.05), (10, 23.209, 0.01)):
        half = torch.tensor([dof / 2, stat / 2], dtype=torch.float64)
        assert float(torch.special.gammaincc(half[0], half[1])) == pytest.approx(p, abs=1e-4)


@pytest.mark.parametrize("init, batches, per_batch", [("random", 200, 4), ("spatial", 200, 4), ("random", 4, 400)])
def test_sjd_samples_the_plain_distribution(toy, init, batches, per_batch):
    """800-1600 SJD samples (window 4, so each sample takes several windows): the joint law of three
    codes inside the first window, and of three codes across later windows, fits the exact law
    (chi-square, p > 0.01). Small batches exercise fresh drafts (random or spatial); batches of 400
    exercise the batch rule (rows ahead of the slowest keep their tokens). 800 are enough: with either
    broken rule of test_chi2_rejects_a_broken_rule, 200 batches of 4 give p < 1e-10 in the first window."""
    model, plan, exact, _ = toy
    tokens = toy_samples(model, plan, sjd_window=4, batches=batches, per_batch=per_batch, init=init)
    for positions, law in zip(POSITIONS, exact):
        assert law.max() > 4 / len(law), "toy distribution too flat to test anything"
        assert chi2_pvalue(torch.bincount(cell(tokens, positions), minlength=len(law)), law) > 0.01, positions


def test_plain_samples_fit_the_exact_law(toy):
    """The yardstick itself: plain sampling passes the same test, so the exact law is right."""
    model, plan, exact, plain = toy
    for positions, law in zip(POSITIONS, exact):
        assert chi2_pvalue(torch.bincount(cell(plain, positions), minlength=len(law)), law) > 0.01, positions


@pytest.mark.parametrize("name, broken, batches", [
    ("accept", lambda p_draft, q_draft, u: torch.ones_like(p_draft, dtype=torch.bool), 1),  # Jacobi, no test
    ("residual", lambda p, q: p, 4),  # redraw from p, not the residual: leans towards the draft
])
def test_chi2_rejects_a_broken_rule(toy, monkeypatch, name, broken, batches):
    """Negative controls: the same chi-square test fails for a broken acceptance rule or residual,
    so the test above has the power to see a wrong rule."""
    monkeypatch.setattr(sjd, name, broken)
    model, plan, exact, _ = toy
    tokens = toy_samples(model, plan, sjd_window=4, batches=batches, per_batch=400)
    counts = torch.bincount(cell(tokens, POSITIONS[0]), minlength=len(exact[0]))
    assert chi2_pvalue(counts, exact[0]) < 1e-4


def test_top_n_sigma_is_opt_in(toy):
    """The official filter keeps logits >= max - n*sigma; it is off unless asked for."""
    assert inspect.signature(sjd.sjd_generate).parameters["top_n_sigma"].default is None
    logits = torch.tensor([[4.0, 3.5, 0.0, -1.0, float("-inf")]])
    probs = torch.softmax(logits / 0.7, -1)
    kept = sjd.filter_top_n_sigma(probs, 1.0)
    finite = logits[logits > float("-inf")]
    threshold = finite.max() - finite.std(unbiased=False)
    assert torch.equal(kept > 0, logits >= threshold) and kept.sum() == pytest.approx(1.0)
    one_hot = torch.nn.functional.one_hot(torch.tensor([2]), 5).float()
    assert torch.equal(sjd.filter_top_n_sigma(one_hot, 1.0), one_hot)  # greedy stays greedy
    # through sjd_generate: every code drawn lies inside the filtered support
    model, plan, _, _ = toy
    idx, key_mask = torch.tensor([TOY_PREFIX]), torch.ones(1, 24, dtype=torch.bool)
    model.setup_caches(1, 24)
    with torch.no_grad():
        logits = model(idx, torch.arange(idx.shape[1]))[:, -1:]

        def probs_fn(out, positions_plan):
            return logits_to_probs(out, positions_plan, TOY, cfg_scale=1.0, top_k=0, temperature=1.0)
        tokens, stats = sjd.sjd_generate(make_step(model, key_mask, use_cfg=False), logits, plan, len(TOY_PREFIX),
                                         probs_fn, TOY, window=4, top_n_sigma=0.5,
                                         generator=torch.Generator().manual_seed(0))
        model.clear_caches()
        full = model(torch.cat([idx, tokens], 1))[:, len(TOY_PREFIX) - 1:-1]  # (1, n, V)
    allowed = sjd.filter_top_n_sigma(probs_fn(full, plan), 0.5)
    columns = sjd.to_columns(tokens, plan, TOY)[..., None]
    assert bool((allowed.gather(-1, columns) > 0).all()) and stats["forward_passes"] <= len(plan)


def test_two_token_plan_falls_back_to_one_plain_step(tiny_system):
    """A plan of two tokens leaves no room for drafts: SJD takes one plain step and matches greedy."""
    system, layout = tiny_system, tiny_system.layout
    plan = torch.tensor([-1, layout.eol_id])
    prefix = [layout.bos_id, layout.image_start_id, layout.size_id(32), layout.size_id(32)]
    uncond = prefix[1:]
    kw = dict(num_samples=2, cfg_scale=3.0, top_k=1, generator=torch.Generator().manual_seed(0))
    plain, _ = generate(system.model, layout, prefix, uncond, plan, **kw)
    fast, stats = generate(system.model, layout, prefix, uncond, plan, sjd_window=16, **kw)
    assert torch.equal(plain, fast) and stats["forward_passes"] == 2
