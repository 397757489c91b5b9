"""sample.py and best_of.py: reproducible, cache-exact, structurally valid sampling; CFG 1 is
conditional-only; the reference panel is kept token for token; best-of-N on an edit verifies the
edit's expected result (or refuses before sampling); --think degrades gracefully; bad input is one line."""
import http.server
import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import shapes
import verify
from bench import generate_uncached
from configurator import run_main
from best_of import edit_spec, make_scorer, think
from sample import generate, logits_to_probs, main, sample_images
from sequence import image_body_plan, image_header_ids, prompt_ids, stack_panels, t2i_prompt, unconditional_ids
from tasks import make_grid

REPO = Path(__file__).resolve().parents[1]
SCENE = REPO / "assets" / "refs" / "scene.png"  # a purple square and a blue circle on white

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def t2i_context(system, width=64, height=64, prompt="a red circle"):
    layout = system.layout
    prefix = prompt_ids(system.tokenizer, layout, t2i_prompt(prompt, width, height)) + \
        image_header_ids(height, width, layout)
    plan = image_body_plan(height // 8, width // 8, layout)
    return prefix, unconditional_ids(prefix, layout), plan


def test_same_seed_same_image(tiny_system):
    a, _ = sample_images(tiny_system, "a red circle", seed=3, num_samples=2)
    b, _ = sample_images(tiny_system, "a red circle", seed=3, num_samples=2)
    c, _ = sample_images(tiny_system, "a red circle", seed=4, num_samples=2)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


@pytest.mark.parametrize("top_k, temperature", [(1, 1.0), (50, 1.0)])
def test_cached_batched_cfg_equals_uncached_separate_passes(tiny_system, top_k, temperature):
    """Static cache + CFG as one left-padded batch of two == bench.py's naive decoder, which recomputes
    everything with the unconditional context as its own sequence (the official way), token for token."""
    prefix, uncond, plan = t2i_context(tiny_system)
    kw = dict(cfg_scale=3.0, top_k=top_k, temperature=temperature)
    cached, _ = generate(tiny_system.model, tiny_system.layout, prefix, uncond, plan,
                         generator=torch.Generator().manual_seed(7), **kw)
    naive = generate_uncached(tiny_system.model, tiny_system.layout, prefix, uncond, plan,
                              generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(cached, naive)


def test_cfg_one_is_conditional_only(tiny_system):
    """cfg 1 == sampling from the conditional logits alone (no unconditional rows at all)."""
    system = tiny_system
    prefix, uncond, plan = t2i_context(system)
    with_cfg1, _ = generate(system.model, system.layout, prefix, uncond, plan, cfg_scale=1.0, top_k=20,
                            temperature=1.0, generator=torch.Generator().manual_seed(5))
    model, tokens, gen = system.model, list(prefix), torch.Generator().manual_seed(5)
    off, n = system.layout.image_code_offset, system.layout.codebook_size
    with torch.no_grad():
        for i in range(len(plan)):
            if plan[i] >= 0:  # a forced id is written, not drawn
                tokens.append(int(plan[i]))
                continue
            logits = model(torch.tensor([tokens]))[:, -1, off:off + n]  # every other id is -inf: drawn over codes
            kth = torch.topk(logits, 20).values[:, -1:]
            probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
            tokens.append(off + int(torch.multinomial(probs, 1, generator=gen)))
    assert with_cfg1[0].tolist() == tokens[len(prefix):]


@pytest.mark.parametrize("width, height", [(64, 64), (128, 64), (64, 128), (32, 96)])
def test_every_sample_decodes(tiny_system, width, height):
    """50 samples per size (200 in all) from an untrained model: the structure constraint makes
    every one a valid Uni-Rep block of the requested size."""
    images, stats = sample_images(tiny_system, "a blue star", width=width, height=height, num_samples=50,
                                  cfg=2.0, seed=1)
    assert len(images) == 50 and all(im.size == (width, height) for im in images)
    assert stats["codes"].shape == (50, height // 8, width // 8)


def test_structure_constraint_forces_eol_and_end(tiny_system):
    layout = tiny_system.layout
    plan = image_body_plan(2, 3, layout)
    logits = torch.randn(1, len(plan), layout.vocab_size) * 10
    probs = logits_to_probs(logits, plan, layout, 1.0, 0, 1.0)  # (1, T, codes): one-hot on column 0 where forced
    assert torch.all(probs[0, 3, 0] == 1) and torch.all(probs[0, -1, 0] == 1)
    assert probs.shape[-1] == layout.codebook_size
    assert torch.allclose(probs[0, 0].sum(), torch.tensor(1.0)) and probs[0, 0].max() < 1


def test_reference_panel_is_kept_exactly(tiny_system, tmp_path):
    ref = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ref.save(tmp_path / "ref.png")
    images, stats = sample_images(tiny_system, "a green star", task="edge", ref=str(tmp_path / "ref.png"),
                                  num_samples=3, seed=2)
    expected = tiny_system.codec.encode(torch.from_numpy(np.array(ref)).permute(2, 0, 1)[None].float() / 127.5 - 1)
    assert images[0].size == (64, 128)
    assert torch.equal(stats["codes"][:, :8], expected.expand(3, -1, -1))


def test_grid_layout():
    tiles = [Image.new("RGB", (4, 6), c) for c in ("red", "green", "blue")]
    grid = make_grid(tiles, columns=2)
    assert grid.size == (8, 12) and grid.getpixel((5, 1)) == (0, 128, 0) and grid.getpixel((1, 7)) == (0, 0, 255)

# -----------------------------------------------------------------------------
# best-of-N: an edit is judged against its expected result


def test_edit_spec_matches_the_worlds_own_edits():
    """Two independent computations: shapes.make_task edits a scene and writes the instruction;
    edit_spec reads the instruction back against the detected upper panel. The world's lower panel
    must pass the spec we read (score 1.0) and its unedited upper panel must not (a move excepted: the
    verifier's halves have no margin, the world's moves start 4 px outside the half)."""
    rng, kinds = random.Random(0), set()
    for _ in range(40):
        upper, lower, truth = shapes.make_task(rng, "edit")
        spec = edit_spec(upper, truth["prompt"])
        kinds.add(truth["prompt"].split()[0])
        assert verify.verify(lower, spec) == 1.0, truth["prompt"]
        assert verify.verify(upper, spec) < 1.0 or "moved" in spec, truth["prompt"]
    assert kinds >= {"add", "move", "change"}, kinds  # several kinds of edit were exercised


@pytest.mark.parametrize("instruction, message", [
    ("paint it like Monet", "cannot verify the edit"),
    ("make the red star blue", "cannot verify the edit"),  # the reference shows no red star
])
def test_unreadable_edit_fails_before_sampling(tiny_ckpt, tmp_path, monkeypatch, instruction, message):
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    with pytest.raises(ValueError, match=message) as e:
        main(["--ckpt", str(tiny_ckpt), "--task", "edit", "--ref", str(SCENE), "--prompt", instruction,
              "--best_of", "2", "--out", str(tmp_path)])
    assert len(str(e.value).splitlines()) == 1


def test_best_of_an_edit_scores_the_lower_panel(tiny_ckpt, tmp_path, capsys):
    """The --task edit --best_of bug: it now samples, scores each lower panel and keeps the best."""
    main(["--ckpt", str(tiny_ckpt), "--task", "edit", "--ref", str(SCENE), "--prompt", "make the blue circle red",
          "--best_of", "2", "--out", str(tmp_path)])
    assert "best of 2: sample" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*_s0_0.png"))) == 1 and len(list(tmp_path.glob("*_lower.png"))) == 1
    score = make_scorer("shapes", "edit", "make the blue circle red", Image.open(SCENE))
    expected = shapes.Scene((shapes.Obj("square", "purple", 3, 4, 21), shapes.Obj("circle", "red", 30, 25, 21)))
    assert score(stack_panels(Image.open(SCENE), shapes.render(expected))) == 1.0
    assert score(stack_panels(Image.open(SCENE), Image.open(SCENE))) < 1.0


def test_best_of_a_segmentation_scores_the_map_of_the_reference():
    """--task dense --ref --best_of: the lower panel is a segmentation map, so it is judged against the map of
    the reference's objects (shapes.render_segmentation, an independent renderer), not read as a scene."""
    reference = Image.open(SCENE).convert("RGB")
    score = make_scorer("shapes", "dense", "a purple square and a blue circle", reference)
    truth = shapes.Scene((shapes.Obj("square", "purple", 3, 4, 21), shapes.Obj("circle", "blue", 30, 25, 21)))
    assert score(stack_panels(reference, shapes.render_segmentation(truth))) == 1.0
    assert score(stack_panels(reference, reference)) < 1.0  # the scene itself is no map of it
    moved = shapes.Scene((shapes.Obj("square", "purple", 35, 30, 21), shapes.Obj("circle", "blue", 3, 4, 21)))
    assert score(stack_panels(reference, shapes.render_segmentation(moved))) < 1.0  # the right classes, elsewhere


# -----------------------------------------------------------------------------
# --think and the command line


class StubChat(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply = {"choices": [{"message": {"content": "REWRITTEN: " + body["messages"][-1]["content"]}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_think_rewrites_through_a_loopback_server_and_falls_back(capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), StubChat)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    assert think("a red circle", url, timeout=10) == "REWRITTEN: a red circle"
    thread.join(5)
    server.server_close()
    assert think("a red circle", url, timeout=2) == "a red circle"  # the server is gone now
    assert "using the prompt as given" in capsys.readouterr().err


@pytest.mark.parametrize("args, error, message", [
    (["--width", "100"], ValueError, "width 100 is not a multiple of 32; try 96 or 128"),
    (["--task", "paint"], ValueError, "unknown task 'paint'"),
    (["--task", "edit"], ValueError, "needs --ref"),  # edge/depth/dense without one draw an image pair
    (["--task", "edge", "--ref", "missing.png"], FileNotFoundError, "does not exist"),
    (["--task", "edge", "--ref", "CORRUPT"], ValueError, "cannot read reference image"),
    (["--prompt", "  "], ValueError, "the prompt is empty"),
    (["--width", "1024", "--height", "1024"], ValueError, "exceed"),
    (["--best_of", "0"], ValueError, "must be >= 1"),
])
def test_bad_input_is_one_line(tiny_ckpt, tmp_path, args, error, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = [str(corrupt) if a == "CORRUPT" else a for a in ["--prompt", "x"] + args]
    with pytest.raises(error, match=message) as e:
        main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path)] + args)
    assert len(str(e.value).splitlines()) == 1
    assert [p.name for p in tmp_path.glob("*.png")] == ["corrupt.png"]  # nothing written


def test_missing_checkpoint_is_one_line_without_traceback(tmp_path, capsys):
    """The __main__ handler (configurator.run_main) turns the error into one line, no traceback; sample.py
    as a real process: tests/test_bad_input.py."""
    with pytest.raises(SystemExit) as e:
        run_main(main, ["--ckpt", str(tmp_path / "nope"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert e.value.code != 0 and "does not exist" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_cli_writes_samples_and_grid(tiny_ckpt, tmp_path, capsys):
    main(["--ckpt", str(tiny_ckpt), "--prompt", "a red circle", "--num_samples", "3", "--out", str(tmp_path)])
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 4 and any("grid" in p for p in pngs) and "219 tokens" in capsys.readouterr().out
