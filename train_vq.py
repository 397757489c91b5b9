"""Train the MoVQGAN codec of vq.py from scratch at reduced scale: one flat script, like train.py.

Our shapes-world recipe (docs/codec.md §5): MSE + L1 on image gradients + the VQ loss, AdamW with
warm-up and cosine, dead-code restarts, flips and mosaics of panels. Not the official recipe (no LPIPS,
GAN, EMA or multi-GPU). Writes out_dir/{ckpt.pt,vq.safetensors,vq.json,report.json}; ~1 step/s on 2 CPUs:
  python train_vq.py --out_dir=out/vq_shapes --threads=1 [--init_from=resume]   # resume is exact
"""
import json
import sys
import time
from pathlib import Path

import torch

import vq
from checkpoint import atomic_write
from configurator import check_out_dir, check_ranges, configure, excepthook, warn
from model import lr_schedule
from shapes import codec_training_images

# -----------------------------------------------------------------------------
# config: defaults, then a config file, then --key=value (unknown keys and wrong types are errors)
out_dir = "out/vq_shapes"
init_from = "scratch"              # "scratch" | "resume" (continue out_dir/ckpt.pt exactly)
vq_name = "shapes"                 # a vq.VQ_CONFIGS preset
image_size = 64                    # pixels
n_train, n_eval = 40000, 256       # training and held-out images, drawn once by shapes.codec_training_images
seed, eval_seed = 0, vq.EVAL_SEED  # their seeds; eval.py's codec check uses the same held-out renders
batch_size, max_steps = 16, 5000   # panels per step (before mosaics), steps
lr, min_lr_frac = 1e-3, 0.05       # peak learning rate; the cosine ends at lr * min_lr_frac
warmup_steps = 200
lr_decay_steps = 0                 # cosine length (0: max_steps); keep it fixed when extending a run
weight_decay = 1e-4                # conv kernels and matrices only, not the codebook
grad_clip = 1.0                    # by value, as the official Lightning trainer
grad_weight = 0.5                  # L1 on image gradients: our LPIPS stand-in
restart_every = 100                # steps between dead-code restarts (0 disables)
mosaic = True                      # also train on 2x1, 1x2 and 2x2 mosaics of panels
ckpt_every, eval_every, log_every = 250, 500, 50  # steps
threads = 0                        # torch CPU threads, 0: torch's default (on 2 shared cores 1 beat 2 by ~2x)
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
sys.excepthook = excepthook  # an expected error (a bad setting, a missing file) ends as one line, exit 2
globals().update(configure(sys.argv[1:], {k: globals()[k] for k in config_keys}, __doc__))
config = {k: globals()[k] for k in config_keys}

# -----------------------------------------------------------------------------
# bad settings and a missing or damaged checkpoint stop here, before any work, as one line (docs/checkpoints.md §4)
check_ranges(config, positive=("image_size", "n_train", "n_eval", "batch_size", "lr", "grad_clip", "ckpt_every",
                               "eval_every", "log_every"),
             non_negative=("max_steps", "warmup_steps", "lr_decay_steps", "weight_decay", "grad_weight",
                           "restart_every", "threads", "min_lr_frac"))
if init_from not in ("scratch", "resume"):
    raise ValueError(f"init_from={init_from!r}: expected 'scratch' or 'resume'")
check_out_dir(out_dir)
out = Path(out_dir)  # atomic_write creates it
ckpt = None
if init_from == "resume":
    if not (out / "ckpt.pt").is_file():
        raise FileNotFoundError(f"init_from=resume but {out / 'ckpt.pt'} does not exist; start with init_from=scratch")
    try:
        ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
        vq_config = vq.VQConfig(**ckpt["vq_config"])
        problem = ", ".join(f"no {key!r}" for key in ("model", "optimizer", "hits", "step") if key not in ckpt)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler or a missing key raises, the file is unusable
        problem = f"{type(e).__name__}: {str(e)[:100]}"
    if problem:
        raise ValueError(f"{out / 'ckpt.pt'} is damaged ({problem}); restore it, or start again with init_from=scratch")
else:
    vq_config = vq.VQConfig.from_name(vq_name)  # an unknown preset fails now, not after drawing the data
if image_size < 32 or image_size % vq_config.downsample:
    raise ValueError(f"image_size={image_size}: must be >= 32 and a multiple of the codec's {vq_config.downsample} px")
if warmup_steps > max_steps:
    warn(f"warmup_steps={warmup_steps} > max_steps={max_steps}: the peak learning rate is never reached")

# -----------------------------------------------------------------------------
# data: uint8 renders drawn once; step s draws from a generator seeded with (seed, s), so resume is exact
torch.set_num_threads(threads or torch.get_num_threads())
train_x, eval_x = (torch.from_numpy(codec_training_images(n, image_size, s, progress=True)).permute(0, 3, 1, 2)
                   for n, s in ((n_train, seed), (n_eval, eval_seed)))
MOSAICS = ((1, 1), (2, 1), (1, 2), (2, 2))  # (rows, cols) of panels: GroupNorm statistics span the whole image


def get_batch(step):
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # a generator per (seed, step)
    x = train_x[torch.randint(len(train_x), (batch_size,), generator=g)].float() / 127.5 - 1
    x = torch.where(torch.rand(batch_size, 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)  # horizontal flips
    if mosaic:  # a codec trained on single panels loses ~8 dB on dual panels (docs/codec.md §5)
        x = vq.mosaic(x, *MOSAICS[torch.randint(len(MOSAICS), (), generator=g)])
    return x.contiguous(memory_format=torch.channels_last), g  # (B', 3, H', W') in [-1, 1]; restarts reuse g

# -----------------------------------------------------------------------------
# model and optimizer: from scratch, or everything resume needs from out_dir/ckpt.pt
torch.manual_seed(seed)
model = vq.MoVQGAN(vq_config)
decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embedding" not in n]
no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "embedding" not in n)]
optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
                              lr=lr, betas=(0.9, 0.99))  # official (0.5, 0.9) suits its GAN; we have none
hits, step = (ckpt["hits"], ckpt["step"]) if ckpt else (torch.zeros(model.config.n_embed), 0)  # per-code uses
if ckpt:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
model.train().to(memory_format=torch.channels_last)  # ~20% faster CPU convolutions
print(f"{model.config}: {sum(p.numel() for p in model.parameters()):,} params, from step {step}", flush=True)


def held_out_report():
    """Held-out PSNR / SSIM / codebook usage (vq.evaluate) and dual-panel PSNR, printed and returned."""
    report = vq.evaluate(model.eval(), eval_x)
    report["dual_panel_psnr"] = vq.evaluate(model, vq.mosaic(eval_x, 2, 1))["psnr"]
    model.train()
    print(f"step {step} | held-out: " + " | ".join(f"{k} {v:.4g}" for k, v in report.items()), flush=True)
    return dict(step=step, **report)

# -----------------------------------------------------------------------------
# the loop
losses, t0, step0 = [], time.time(), step
while step < max_steps:
    x, g = get_batch(step)
    for group in optimizer.param_groups:
        group["lr"] = lr_schedule(step, lr, lr * min_lr_frac, warmup_steps, lr_decay_steps or max_steps)
    x_rec, vq_loss, codes, z = model(x)
    rec = ((x_rec - x) ** 2).mean()
    edges = (x_rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (x_rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    loss = rec + grad_weight * edges + vq_loss  # edges: L1 on image gradients, against blurred or misplaced edges
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip)
    optimizer.step()
    hits += torch.bincount(codes.flatten(), minlength=model.config.n_embed)
    step += 1
    if restart_every and (step % restart_every == 0 or step == 1):  # step 1: a data-driven codebook init
        dead = (hits == 0).nonzero().flatten()  # codes unused since the last restart move onto encoder outputs
        pool = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, embed_dim)
        pick = torch.randint(len(pool), (len(dead),), generator=g)
        noise = 0.01 * pool.std() * torch.randn(len(dead), pool.shape[1], generator=g)  # 1% of their spread
        model.quantize.embedding.weight.data[dead] = pool[pick] + noise
        hits.zero_()
    losses.append(loss.item())
    if step % log_every == 0:
        print(f"step {step} | loss {loss.item():.4f} | rec {rec.item():.5f} | vq {vq_loss.item():.5f} | "
              f"lr {group['lr']:.2e} | {(step - step0) / (time.time() - t0):.2f} it/s", flush=True)
    if step % eval_every == 0 and step < max_steps:
        held_out_report()
    if step % ckpt_every == 0 or step == max_steps:
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), hits=hits, step=step,
                     vq_config=vars(model.config), config=config)
        atomic_write(out / "ckpt.pt", lambda p: torch.save(state, p))
        model.save_pretrained(out)

# -----------------------------------------------------------------------------
# final report: held-out quality, also written to out_dir/report.json
report = held_out_report()
atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=1)))
