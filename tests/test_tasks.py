"""Image pairs, multi-round editing and the official sampling options: an edge/depth/dense task without a
reference draws a whole dual panel from the official image-pair prompt; the pair verifier accepts a
scene over its own map and nothing else; each editing round continues from the previous round's lower
panel, code for code; --top_n_sigma and the official SJD residual change exactly what they say."""
import random

import pytest
import torch

import sample
import sequence as S
import shapes
import sjd
import verify
from best_of import verify_chain
from sample import edit_rounds, generate, main, sample_images
from sequence import PAIR_TASKS, image_header_ids, pair_prompt, prompt_ids, stack_panels
from tasks import make_grid
from test_sample import SCENE, t2i_context

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("task", PAIR_TASKS)
def test_pair_without_ref_draws_a_whole_dual_panel(tiny_system, monkeypatch, task):
    """No --ref: the prompt is the official image-pair template (map below) and the plan covers both panels."""
    seen, real = {}, sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, layout, prefix, uncond, plan, **kw:
                        seen.update(prefix=prefix, plan=plan) or real(model, layout, prefix, uncond, plan, **kw))
    images, stats = sample_images(tiny_system, "a red circle", task=task, width=32, height=64, num_samples=2, seed=1)
    layout = tiny_system.layout
    text = pair_prompt(task, "a red circle", 32, 64)
    assert "<lower half> displays a <" + {"edge": "canny edge map", "depth": "depth map",
                                          "dense": "segmentation map"}[task] + ">" in text
    assert seen["prefix"] == prompt_ids(tiny_system.tokenizer, layout, text) + image_header_ids(64, 32, layout)
    assert len(seen["plan"]) == 8 * (4 + 1) + 1  # every row of both panels, then the image end
    assert [im.size for im in images] == [(32, 64)] * 2 and stats["codes"].shape == (2, 8, 4)


def test_pair_verifier_wants_the_upper_scenes_own_map():
    """Ground truth (a scene over its map) scores 1.0 for every map; the wrong map, another scene's map, or
    a scene that misses the prompt's objects do not."""
    rng = random.Random(3)
    for task in PAIR_TASKS * 2:
        upper, lower, spec = shapes.make_pair(rng, task)
        other_upper, other_lower, _ = shapes.make_pair(rng, task)
        wrong_map = next(render for name, render in shapes.MAP_RENDER.items() if name != spec["pair_map"])
        assert verify.verify(stack_panels(upper, lower), spec) == 1.0, spec["prompt"]
        assert verify.verify(stack_panels(upper, wrong_map(shapes.target_scene(spec))), spec) < 1.0
        assert verify.verify(stack_panels(upper, other_lower), spec) < 1.0
        assert verify.verify(stack_panels(other_upper, other_lower), spec) < 1.0


def test_three_round_chain_feeds_each_result_to_the_next(tiny_system):
    """Round k+1's reference codes are round k's lower-panel codes exactly (no codec round trip); round 1
    is the one-round edit with the same seed; a strip holds the reference and every round's result."""
    prompts = ["make the blue circle red", "remove the purple square", "add a green star"]
    size = dict(width=32, height=64)
    rounds, strips = edit_rounds(tiny_system, prompts, str(SCENE), num_samples=2, seed=4, **size)
    codes = [stats["codes"] for _, stats in rounds]  # each (2, 8, 4): upper rows 0-3, lower rows 4-7
    for k in range(2):
        assert torch.equal(codes[k + 1][:, :4], codes[k][:, 4:])
    assert not torch.equal(codes[1][:, 4:], codes[0][:, 4:])  # each round draws anew
    _, stats = sample_images(tiny_system, prompts[0], task="edit", ref=str(SCENE), seed=4, **size)
    assert torch.equal(stats["codes"][0], codes[0][0])
    assert len(strips) == 2 and strips[0].size == (4 * 32, 32)
    assert strips[0].crop((32, 0, 64, 32)).tobytes() == rounds[0][0][0].crop((0, 32, 32, 64)).tobytes()


def test_chain_verifier_needs_every_edit_and_nothing_else():
    for rounds in (2, 3):
        ref, spec = shapes.make_edit_chain(random.Random(rounds), rounds)
        truth = [shapes.render(shapes.target_scene(dict(spec, **r))) for r in spec["rounds"]]
        assert verify_chain(make_grid([ref] + truth), spec["prompts"]) == 1.0, spec["prompts"]
        assert verify_chain(make_grid([ref] + truth[:1] * rounds), spec["prompts"]) < 1.0  # later edits skipped


def test_cli_multi_round_edit_writes_rounds_and_strip(tiny_ckpt, tmp_path, capsys):
    main(["--ckpt", str(tiny_ckpt), "--task", "edit", "--ref", str(SCENE), "--prompt", "make the blue circle red",
          "--prompt", "remove the purple square", "--best_of", "2", "--width", "32", "--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["make_the_blue_circle_red_edit_s0_0_r1.png", "make_the_blue_circle_red_edit_s0_0_r1_lower.png",
                     "make_the_blue_circle_red_edit_s0_0_r2.png", "make_the_blue_circle_red_edit_s0_0_r2_lower.png",
                     "make_the_blue_circle_red_edit_s0_0_strip.png"], names
    assert "best of 2: sample" in capsys.readouterr().out
    with pytest.raises(ValueError, match="rounds of a multi-round edit"):
        main(["--ckpt", str(tiny_ckpt), "--prompt", "a", "--prompt", "b", "--out", str(tmp_path)])


def test_cli_pair_best_of_scores_both_panels(tiny_ckpt, tmp_path, capsys):
    main(["--ckpt", str(tiny_ckpt), "--task", "dense", "--prompt", "a red circle above a blue star",
          "--best_of", "2", "--width", "32", "--out", str(tmp_path)])
    assert "best of 2: sample" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*_dense_s0_0_lower.png"))) == 1

# -----------------------------------------------------------------------------
# the official options, opt-in


def test_top_n_sigma_keeps_ids_within_n_sigma_of_the_best(tiny_system):
    """The filter keeps exactly the allowed ids whose logit is >= max - n * std (numpy, over the allowed ids),
    renormalised; and it reaches plain decoding and SJD: with n -> 0 only the argmax is left, so both equal
    greedy decoding token for token."""
    layout = tiny_system.layout
    logits = torch.linspace(-4, 4, layout.codebook_size)[torch.randperm(layout.codebook_size)].view(1, 1, -1)
    plan = torch.tensor([-1])
    plain = sample.logits_to_probs(logits, plan, layout, 1.0, 0, 1.0)[0, 0, :layout.codebook_size]  # the codes
    filtered = sjd.filter_top_n_sigma(plain, 1.0)
    x = logits[0, 0].double().numpy()
    kept = torch.from_numpy(x >= x.max() - x.std())
    assert torch.equal(filtered > 0, kept) and 1 < kept.sum() < len(kept) // 2
    assert torch.allclose(filtered[kept], plain[kept] / plain[kept].sum())
    assert plain[~kept].sum() > 0.05  # what the filter takes away
    prefix, uncond, plan = t2i_context(tiny_system, 32, 32)
    run = lambda **kw: generate(tiny_system.model, layout, prefix, uncond, plan, cfg_scale=3.0,  # noqa: E731
                                generator=torch.Generator().manual_seed(2), **kw)[0]
    greedy = run(top_k=1)
    assert torch.equal(run(top_k=0, top_n_sigma=1e-4), greedy)
    assert torch.equal(run(top_k=0, top_n_sigma=1e-4, sjd_window=8), greedy)


def test_official_residual_is_lossy_only_where_a_draft_probability_exceeds_099():
    """The law of the token a draft position makes final: min(p, q) + P(reject) * residual. The exact residual
    gives p for any draft; the official one (q capped at 0.99) moves mass to a one-hot draft whose p > 0.99
    (here 0.995 -> 0.9975) and agrees with the exact one when no draft probability exceeds 0.99."""
    def law(p, q, residual):
        return torch.minimum(p, q) + (1 - torch.minimum(p, q).sum()) * residual(p, q)
    p = torch.tensor([0.995, 0.004, 0.001], dtype=torch.float64)
    one_hot, soft = torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert torch.allclose(law(p, one_hot, sjd.residual), p) and torch.allclose(law(p, soft, sjd.residual), p)
    assert torch.allclose(law(p, one_hot, sjd.official_residual), torch.tensor([0.9975, 0.002, 0.0005],
                                                                                 dtype=torch.float64))
    assert torch.allclose(law(p, soft, sjd.official_residual), p)


def test_sjd_residual_flag_reaches_the_sampler(tiny_ckpt, tmp_path, monkeypatch):
    calls = []
    official = sjd.official_residual
    monkeypatch.setattr(sjd, "official_residual", lambda p, q: calls.append(1) or official(p, q))
    main(["--ckpt", str(tiny_ckpt), "--prompt", "a red circle", "--sjd", "--sjd_window", "4",  # a CPU's default: 1
          "--sjd_residual", "official",
          "--width", "32", "--height", "32", "--out", str(tmp_path)])
    assert calls


def test_panel_ce_averages_the_lower_panel_tokens(tiny_system, tiny_ckpt, one_thread):
    """scripts/panel_ce.py: its loss is the float64 mean of -log p over the lower panel's tokens, found here by
    walking back from the image end token; main() reports three finite losses per task."""
    import math
    import runpy
    from pathlib import Path
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "panel_ce.py"))
    system, layout = tiny_system, tiny_system.layout
    codes = torch.randint(system.codec.config.n_embed, (16, 8), generator=torch.Generator().manual_seed(0))
    text = S.task_prompt("edge", "a red circle", 64, 128)
    ids = S.make_example(system.tokenizer, layout, text, codes)[0].tolist()
    with torch.no_grad():
        logp = torch.log_softmax(system.model(torch.tensor([ids]))[0].double(), -1)
    end = ids.index(layout.image_end_id)
    want = sum(-logp[k - 1, ids[k]].item() for k in range(end - 8 * 9, end)) / (8 * 9)
    assert script["lower_panel_ce"](system, text, codes) == pytest.approx(want, rel=1e-5)
    rows = script["main"](["--ckpt", str(tiny_ckpt), "--n", "1", "--tasks", "edge,copy"])
    assert set(rows) == {"edge", "copy"} and all(math.isfinite(v) and v > 0 for r in rows.values() for v in r)
