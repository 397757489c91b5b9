"""Sample images from Lumina-mGPT 2.0: text-to-image and every dual-panel task, from one command.

What it is: the official sampler (docs/sampling.md) as small gpt-fast-style functions: `prefill`, one decode
`step` (CFG rows, key mask, compile) and ONE sampling function (`logits_to_probs`), both shared with sjd.py.
Best-of-N and "thinking" (docs/sampling.md §4) live in best_of.py; task panels and output files in tasks.py.
What it is not: a trainer, a tokenizer or a codec; it wires model.py, sequence.py and vq.py.

  python sample.py --prompt "a red circle left of a blue square" --best_of 4  # the shipped model
  python sample.py --task edge --ref assets/refs/edges.png --prompt "a green star"  # a dual-panel task
  python sample.py --ckpt Lumina-mGPT-2.0/ --vq movqgan_270M.ckpt --prompt "..." --dtype bfloat16 --compile --sjd
"""
import json
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from best_of import add_best_of_args, make_scorer, pick_best, think
from checkpoint import check_folder, latest, read_config
from configurator import ArgumentParser, check_device, check_out_dir, check_ranges, run_main
from lora import attach as attach_lora, merge as merge_lora
from model import Transformer
from sequence import (PAIR_TASKS, TASKS, Tokenizer, TokenLayout, ids_to_codes, pair_map, split_panels, task_prompt,
                      unconditional_ids)
from sjd import add_sjd_args, draw, filter_top_n_sigma, sjd_generate, to_ids
from tasks import image_size, load_reference, make_grid, save_outputs, task_tokens
from vq import MoVQGAN, VQConfig, tensor_to_pil

ASSETS = Path(__file__).resolve().parent / "assets"
OFFICIAL_SAMPLING = {"cfg": 4.0, "top_k": 4096, "temperature": 1.0}  # docs/sampling.md §1
OFFICIAL_SIZE, OUR_SIZE = 768, 64  # pixels: default image side of a release / of our checkpoints
OFFICIAL_768_TOKENS, OFFICIAL_MAX_GEN_LEN = 9316, 10240  # a 768² image block; the official max new tokens
CACHE_MULTIPLE = 8  # tokens: gpt-fast rounds its static cache length up to a multiple of 8
SMALL_MODEL = 100e6  # parameters: below this one CPU thread decodes faster than several (README, Sampling)


@dataclass
class System:  # everything one checkpoint needs to turn a prompt into pixels
    model: Transformer
    codec: MoVQGAN
    tokenizer: Tokenizer
    layout: TokenLayout
    defaults: dict      # sampling defaults: official, or the checkpoint's sampling.json
    size: int           # default image side in pixels
    device: str


def load_system(ckpt=ASSETS, vq=None, device="cpu", dtype=torch.float32, quant=None, vq_config=None, lora=None):
    """Our checkpoint folder, or an official release (config.json) and its codec (vq, vq_config); lora: an
    adapter folder merged into the weights first, so sampling costs what the base costs (docs/lora.md §4)."""
    ckpt = latest(ckpt)  # a train.py out_dir: its newest checkpoint
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
    tokenizer, defaults = Tokenizer.from_file(ckpt), dict(OFFICIAL_SAMPLING)
    if (ckpt / "config.json").is_file():  # official release: the codec is a separate download
        if vq is None or not Path(vq).exists():
            raise FileNotFoundError(f"an official checkpoint needs --vq <path to movqgan_270M.ckpt> (got {vq})")
        model = Transformer.from_pretrained(ckpt, device=device, dtype=dtype)
        if (context := model.config.max_seq_len) < OFFICIAL_768_TOKENS:  # docs/architecture.md §2
            warnings.warn(f"config.json max_position_embeddings {context} is smaller than a 768x768 image "
                          f"({OFFICIAL_768_TOKENS} tokens); as the official sampler does, we generate past it "
                          f"(context {OFFICIAL_MAX_GEN_LEN}), where the model was never trained")
            model.config.max_seq_len = OFFICIAL_MAX_GEN_LEN
            model.reset_rope()
        if vq_config and Path(vq_config).is_file():
            vq_config = read_config(vq_config, VQConfig)  # strict: an unknown key is an error
        codec = MoVQGAN.from_pretrained(vq, config=vq_config)
        layout, size = TokenLayout.official(tokenizer), OFFICIAL_SIZE
        if layout.image_code_offset + layout.codebook_size > model.config.vocab_size:
            raise ValueError(f"config vocab_size {model.config.vocab_size} has no room for image codes "
                             f"up to {layout.vocab_size - 1}: config.json and checkpoint do not match")
        if masked := [i for i in model.config.masked_token_ids if i >= layout.image_code_offset]:
            raise ValueError(f"config.json's mask_image_logits masks image-code id {masked[0]}, which our code head "
                             "does not mask; set mask_image_logits to false to sample every code")
    else:
        model, codec = Transformer.load(ckpt, device=device, dtype=dtype), MoVQGAN.from_pretrained(vq or ckpt)
        layout, size = TokenLayout.ours(tokenizer, codec.config.n_embed), OUR_SIZE
        if (ckpt / "sampling.json").is_file():
            defaults.update(json.loads((ckpt / "sampling.json").read_text()))
            size = defaults.pop("size", size)
    if quant not in (None, "int4"):
        raise ValueError(f"unknown --quant {quant!r}; the only scheme is int4")
    if lora:
        merge_lora(attach_lora(model, lora))
    if quant:
        from quant import quantize_model
        quantize_model(model)
    return System(model.eval(), codec.to(device).eval(), tokenizer, layout, defaults, size, device)


def add_system_args(parser, ckpt=str(ASSETS), dtype="float32"):
    """The flags sample.py, eval.py and bench.py share (bench.py: ckpt=None, dtype=None)."""
    parser.add_argument("--ckpt", default=ckpt, help="checkpoint folder: ours or an official release")
    parser.add_argument("--vq", help="codec: official movqgan_270M.ckpt (default: the one in --ckpt)")
    parser.add_argument("--vq_config", help="codec config (preset name or JSON) when --vq is not a released size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quant", choices=["int4"], help="int4 weight-only linears (quant.py)")
    parser.add_argument("--lora", help="LoRA adapter folder (train.py lora_rank > 0) to merge into --ckpt")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: 1 for a small model on CPU)")
    parser.add_argument("--seed", type=int, default=0)


def load_system_from_args(args):  # after the script's own checks (check_device first)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    system = load_system(args.ckpt, args.vq, args.device, dtype, args.quant, args.vq_config, args.lora)
    small = args.device == "cpu" and system.model.num_params() < SMALL_MODEL  # threads wait on each other (README)
    torch.set_num_threads(args.threads or (1 if small else torch.get_num_threads()))
    return system


# ---- the one sampling function (docs/sampling.md §2-3); sjd.draw draws from its probs ----
def logits_to_probs(logits, plan, layout, cfg_scale, top_k, temperature):
    """logits (2B, T, V or codebook_size): CFG's [conditional; unconditional] rows, else (B, T, ...); plan (T,):
    the forced id at a position, or -1 for "any image code" -> probs (B, T, codebook_size) over the image codes,
    one-hot on column 0 where the plan forces an id (sjd.to_ids reads it as that id). The structure constraint
    leaves no other id a chance, so this is the whole vocabulary's distribution (docs/performance.md §5)."""
    codes = layout.codebook_size
    if logits.shape[-1] != codes:  # the full head: keep the rows the constraint lets through
        logits = logits[..., layout.image_code_offset:layout.image_code_offset + codes]
    if cfg_scale != 1.0:  # a constant scale: the official decay is a no-op at 4.0 (docs/sampling.md §3)
        cond, uncond = logits.chunk(2)
        logits = uncond + cfg_scale * (cond - uncond)
    first = torch.arange(codes, device=logits.device) == 0
    forced = (plan.to(logits.device) >= 0)[:, None]  # (T, 1)
    logits = torch.where(forced, torch.zeros_like(logits[0, 0]).masked_fill(~first, float("-inf")), logits)
    if temperature <= 0 or top_k == 1:  # greedy: a one-hot distribution on the argmax
        return torch.nn.functional.one_hot(logits.argmax(-1), codes).float()
    if top_k and top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k, dim=-1).values[..., -1:], float("-inf"))
    return torch.softmax(logits / temperature, dim=-1)


# ---- generation: a batch's cached prefill, then one decode step per token (or sjd.py's windows) ----
KV_BUCKETS = 8  # attention lengths per cache: a step reads the shortest holding its positions (docs/performance.md §5)
COMPILED_GRAPHS = 64  # graphs one process may compile for the decode step (heads x windows x lengths)


def cfg_batch(prefix, uncond_prefix, num_samples, cfg_scale, pad_id, max_len, device):
    """Rows [cond x N; uncond x N, left-padded] and the key mask hiding the pads (docs/sampling.md §3)."""
    pad = len(prefix) - len(uncond_prefix)
    rows = [prefix] * num_samples + ([[pad_id] * pad + uncond_prefix] * num_samples if cfg_scale != 1.0 else [])
    key_mask = torch.ones(len(rows), max_len, dtype=torch.bool, device=device)
    key_mask[num_samples:, :pad] = False
    return torch.tensor(rows, device=device), key_mask


def code_head(model, layout):
    """lm_head's image-code rows alone: 16,384 of the 7B's 171,385 (docs/performance.md §5)."""
    return model.head_rows(layout.image_code_offset, layout.image_code_offset + layout.codebook_size)


def prefill(model, idx, key_mask, head=None):
    """The prompt's K/V into the cache -> the last position's logits (rows, 1, V), or through `head` (code_head)."""
    hidden = model.hidden(idx, torch.arange(idx.shape[1], device=idx.device), key_mask[:, :idx.shape[1]])
    return (head or model.lm_head)(hidden[:, -1:]).float()


def kv_lengths(max_len, buckets=KV_BUCKETS):
    """The attention lengths of a cache of max_len: `buckets` equal steps, multiples of CACHE_MULTIPLE; 1: max_len."""
    step = -(-max_len // buckets // CACHE_MULTIPLE) * CACHE_MULTIPLE
    return sorted({min(max_len, k * step) for k in range(1, buckets + 1)} | {max_len})


def make_step(model, key_mask, use_cfg, compile=False, head=None, buckets=KV_BUCKETS):
    """-> step(tokens (B, T), start, logits=True) -> logits (rows, T, V or codes) at positions start.., or None
    (logits=False: K/V only, before a forced token). THE decode step of plain decoding and sjd.py: tokens to both
    CFG halves, pads masked, `head` (default lm_head); attention over the shortest of kv_lengths(.., buckets)
    holding the positions. Static shapes per length, so it compiles to a graph per length at most."""
    head, lengths = head or model.lm_head, kv_lengths(key_mask.shape[1], buckets)

    def forward(tokens, input_pos, key_mask, logits):
        hidden = model.hidden(torch.cat([tokens, tokens]) if use_cfg else tokens, input_pos, key_mask)
        return head(hidden).float() if logits else None
    if compile:  # a graph per head, window and (after the first two) all lengths: more than dynamo's default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS)
        forward = torch.compile(forward, mode="reduce-overhead" if key_mask.device.type == "cuda" else None,
                                fullgraph=True)

    def step(tokens, start, logits=True):
        end = start + tokens.shape[1]
        kv_len = next(n for n in lengths if n >= end)
        return forward(tokens, torch.arange(start, end, device=key_mask.device), key_mask[:, :kv_len].contiguous(),
                       logits)
    return step


def decode_n_tokens(step, logits, plan, start_pos, probs_fn, layout, generator=None, progress=False):
    """Plain decoding from the prefill's logits -> (tokens (B, len(plan)), stats). A forced token (EOL, image
    end) is written without a draw, and the step that feeds the token before it computes no logits."""
    forced, tokens = plan.tolist(), []
    for i in tqdm(range(len(plan)), disable=not progress, desc="tokens", leave=False):
        if logits is None:  # forced: its logits were never computed
            tokens.append(torch.full_like(tokens[-1], forced[i]))
        else:
            tokens.append(to_ids(draw(probs_fn(logits, plan[i:i + 1]), generator), plan[i:i + 1].to(logits.device),
                                 layout))  # (B, 1)
        if i + 1 < len(plan):
            logits = step(tokens[-1], start_pos + i, logits=forced[i + 1] < 0)
    return torch.cat(tokens, 1), {"forward_passes": len(plan), "tokens": len(plan)}


def generate(model, layout, prefix, uncond_prefix, plan, *, num_samples=1, cfg_scale=4.0, top_k=4096,
             temperature=1.0, generator=None, sjd_window=0, sjd_init="random", compile=False, progress=False,
             full_head=False, kv_buckets=KV_BUCKETS, top_n_sigma=None, sjd_residual="exact"):
    """Sample `len(plan)` tokens after `prefix` -> (tokens (num_samples, len(plan)), stats dict). full_head and
    kv_buckets=1 give the reference step (every vocabulary row, the whole cache): the same samples, slower."""
    if len(prefix) + len(plan) > model.config.max_seq_len:
        raise ValueError(f"{len(prefix)} prompt + {len(plan)} image tokens exceed the model's context of "
                         f"{model.config.max_seq_len} tokens; ask for a smaller image or a shorter prompt")
    max_len = -(-(len(prefix) + len(plan)) // CACHE_MULTIPLE) * CACHE_MULTIPLE
    idx, key_mask = cfg_batch(prefix, uncond_prefix, num_samples, cfg_scale, layout.bos_id, max_len,
                              model.lm_head.weight.device)
    probs_fn = partial(logits_to_probs, layout=layout, cfg_scale=cfg_scale, top_k=top_k, temperature=temperature)
    if top_n_sigma:  # the official SJD filter, opt-in for either sampler (docs/sampling.md §5)
        unfiltered = probs_fn
        probs_fn = lambda logits, plan: filter_top_n_sigma(unfiltered(logits, plan), top_n_sigma)  # noqa: E731
    head = None if full_head else code_head(model, layout)
    model.setup_caches(idx.shape[0], max_len)
    try:
        with torch.no_grad():
            logits = prefill(model, idx, key_mask, head)
            step = make_step(model, key_mask, cfg_scale != 1.0, compile, head, kv_buckets)
            if sjd_window > 1:  # a window of 1 has no drafts: plain decoding (sjd.WINDOW)
                return sjd_generate(step, logits, plan, len(prefix), probs_fn, layout, generator=generator,
                                    window=sjd_window, init=sjd_init, residual=sjd_residual)
            return decode_n_tokens(step, logits, plan, len(prefix), probs_fn, layout, generator, progress)
    finally:
        model.clear_caches()


# ---- from a prompt (and a reference image) to PIL images, and the command line ----
@torch.no_grad()
def sample_images(system, prompt, *, width=None, height=None, task="t2i", ref=None, subject=None,
                  dense_map="segmentation map", num_samples=1, cfg=None, top_k=None, temperature=None,
                  seed=0, sjd_window=0, sjd_init="random", sjd_residual="exact", top_n_sigma=None, compile=False,
                  progress=False):
    """-> (list of PIL images: the whole image, dual panels included; stats dict with the codes). ref: the upper
    panel as a path or a code grid (h, w); an edge/depth/dense task without one is an image pair."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    layout, (width, height) = system.layout, image_size(system, task, width, height)
    prefix, plan = task_tokens(system, task, prompt, width, height, ref, subject, dense_map)
    cfg, top_k, temperature = (system.defaults[name] if value is None else value for name, value in
                               (("cfg", cfg), ("top_k", top_k), ("temperature", temperature)))
    t0, uncond = time.time(), unconditional_ids(prefix, layout)  # uncond: the image block so far
    tokens, stats = generate(system.model, layout, prefix, uncond, plan, num_samples=num_samples, cfg_scale=cfg,
                             top_k=top_k, temperature=temperature, sjd_window=sjd_window, sjd_init=sjd_init,
                             sjd_residual=sjd_residual, top_n_sigma=top_n_sigma, compile=compile, progress=progress,
                             generator=torch.Generator(system.device).manual_seed(seed))
    stats["seconds"] = time.time() - t0
    stats["codes"] = torch.stack([ids_to_codes(uncond + row.tolist(), layout) for row in tokens.cpu()])
    panels = 2 if task != "t2i" and system.defaults.get("panelwise") else 1  # as the model's data were encoded
    pixels = system.codec.decode(stats["codes"].to(system.device), panels).float().cpu()  # upper panel too
    return [tensor_to_pil(x) for x in pixels], stats


def edit_rounds(system, prompts, ref, *, num_samples=1, seed=0, **kwargs):
    """Multi-round editing: each round's lower panel is the next round's reference, handed over as codes (no codec
    round trip). Sample i of round k draws with seed + i + k * num_samples -> ([(images, stats)] a round, one strip
    a sample: the reference panel, then every round's lower panel) (docs/sampling.md §6)."""
    refs, rounds = [ref] * num_samples, []
    for k, prompt in enumerate(prompts):
        runs = [sample_images(system, prompt, task="edit", ref=r, seed=seed + i + k * num_samples, **kwargs)
                for i, r in enumerate(refs)]
        codes = torch.cat([stats["codes"] for _, stats in runs])  # (N, 2h, w)
        totals = {key: sum(stats[key] for _, stats in runs) for key in ("seconds", "forward_passes")}
        rounds.append(([images[0] for images, _ in runs], dict(runs[0][1], codes=codes, **totals)))
        refs = list(codes[:, codes.shape[1] // 2:])  # each sample's lower panel: its next reference
    strips = [make_grid([split_panels(rounds[0][0][i])[0]] + [split_panels(images[i])[1] for images, _ in rounds])
              for i in range(num_samples)]
    return rounds, strips


def check_args(args):
    """Every flag, before anything loads or samples (docs/checkpoints.md §4): a ValueError or FileNotFoundError."""
    check_ranges(vars(args), positive=("num_samples", "best_of", "width", "height", "sjd_window"),
                 non_negative=("top_k", "temperature", "cfg", "top_n_sigma", "threads"))
    if not all(prompt.strip() for prompt in args.prompt):
        raise ValueError("the prompt is empty")
    task_prompt(args.task, args.prompt[0], OUR_SIZE, OUR_SIZE, args.subject)  # a known task, with its --subject
    check_device(args.device)
    check_out_dir(args.out, "--out")
    check_folder(args.ckpt, args.vq)
    for flag, path in (("--vq", args.vq), ("--lora", args.lora)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if args.ref:  # exists and is an image: now, not after loading the model
        load_reference(args.ref, OUR_SIZE, OUR_SIZE)
    if len(args.prompt) > 1 and args.task != "edit":
        raise ValueError(f"{len(args.prompt)} --prompt values are the rounds of a multi-round edit: add --task edit")


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", required=True,
                   help="repeat it with --task edit for multi-round editing: one edit a round, in order")
    p.add_argument("--task", default="t2i", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--ref", help="reference image: the upper panel (edge/depth/dense without it: an image pair)")
    p.add_argument("--subject", help="task subject: a description of the object in --ref")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int, help="for tasks: the whole dual panel (two panels high)")
    p.add_argument("--cfg", type=float, help="CFG scale (default: official 4.0 or the checkpoint's)")
    p.add_argument("--top_k", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_n_sigma", type=float, help="the official SJD filter for any sampler (off: exact)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--out", default="out/samples")
    p.add_argument("--compile", action="store_true")
    add_sjd_args(p)
    add_system_args(p)
    add_best_of_args(p)
    args = p.parse_args(argv)
    check_args(args)
    system = load_system_from_args(args)
    width, height = image_size(system, args.task, args.width, args.height)
    if args.best_of > 1:  # before sampling: a prompt the verifier cannot read fails now, not after
        score = make_scorer(args.verifier, args.task, args.prompt if len(args.prompt) > 1 else args.prompt[0],
                            load_reference(args.ref, width, height // 2) if args.ref or args.task == "edit" else None,
                            pair_map(args.task) if args.task in PAIR_TASKS and not args.ref else None)
    prompts = [think(prompt, args.think_url) if args.think else prompt for prompt in args.prompt]
    options = dict(width=width, height=height, num_samples=max(args.num_samples, args.best_of), cfg=args.cfg,
                   top_k=args.top_k, temperature=args.temperature, seed=args.seed, top_n_sigma=args.top_n_sigma,
                   sjd_window=args.sjd_window if args.sjd else 0, sjd_init=args.sjd_init,
                   sjd_residual=args.sjd_residual, compile=args.compile, progress=True)
    if args.compile:  # torch.compile is silent while it works; say why the first steps take long
        print("compiling the decode step, a graph per cache length (tens of seconds on a CPU)", flush=True)
    if len(prompts) > 1:
        rounds, strips = edit_rounds(system, prompts, args.ref, **options)
    else:
        rounds, strips = [sample_images(system, prompts[0], task=args.task, ref=args.ref, subject=args.subject,
                                        **options)], None
    scored = strips or rounds[0][0]  # a multi-round sample is judged by its strip
    save_outputs(args, rounds, strips, [pick_best(scored, score)] if args.best_of > 1 else range(len(scored)))
    tokens = sum(stats["tokens"] * len(images) for images, stats in rounds)  # best-of-N's dropped samples too
    seconds = sum(stats["seconds"] for _, stats in rounds)
    print(f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)"
          + (f", {sum(stats['forward_passes'] for _, stats in rounds)} forward passes" if args.sjd else "")
          + (", compilation included" if args.compile else ""))


if __name__ == "__main__":
    run_main(main)
