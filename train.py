"""Train the Lumina-mGPT 2.0 transformer: one flat script from a laptop CPU to 8xA100 (nanoGPT order).

What it is: the training loop of arXiv 2507.17801 §3.2/§4 (three stages 256 -> 512 -> 768 px) with
the official finetune recipe (../shared/specs/lumina_mgpt2.md §7): AdamW (0.9, 0.95), weight decay
0.1, grad clip 4.0, z-loss, residual dropout, warmup + cosine, loss only where the loss mask says.
Data are the token shards written by data/<name>/prepare.py.
What it is not: a data preparer (prepare.py), a codec trainer (vq.py) or a sampler (sample.py).

Run:
  python train.py config/train_shapes.py                      # one process, CPU or one GPU
  python train.py config/train_shapes.py --batch_size=8       # any setting as --key=value
  torchrun --standalone --nproc_per_node=8 train.py config/train_7b_stage1.py      # one node
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \\
      train.py config/train_7b_stage1.py                                            # multi-node
Distributed means plain DDP (NCCL on CUDA, gloo on CPU), or FSDP2 (`parallel="fsdp"`, one
`fully_shard` per block, bf16 params with fp32 reduction) for 2B/7B: 7B with AdamW needs 16 bytes
per parameter (126 GB) of weights, grads and optimizer state, which only fits 80 GB cards sharded.
"""
import ast
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model import ModelConfig, Transformer, compute_loss, save_weights
from sequence import load_shards

# -----------------------------------------------------------------------------
# config: defaults, then a config file, then --key=value (unknown keys and wrong types are errors)
out_dir = "out/shapes"
init_from = "scratch"        # "scratch" | "resume" (latest checkpoint in out_dir) | a checkpoint folder
data_dir = "data/shapes"
model_name = "shapes"        # a ModelConfig preset; vocab_size comes from the data's meta.json
max_seq_len = 0              # 0: the preset's; stage 3 (768 px) needs > 9,316 tokens
batch_size = 16              # sequences per micro-batch per process
length_buckets = 4           # draw each batch from one of this many groups of similar length
gradient_accumulation_steps = 1
max_iters = 2000
learning_rate = 2e-4         # paper stage 1
min_lr = 2e-5
warmup_iters = 100
lr_decay_iters = 0           # 0: max_iters
weight_decay = 0.1           # official train.sh
beta1, beta2 = 0.9, 0.95     # official optimizer
grad_clip = 4.0              # official train.sh
z_loss_weight = 1e-5         # official train.sh
dropout = 0.05               # official train.sh
eval_interval = 200
eval_iters = 20
log_interval = 10
checkpoint_interval = 200
keep_checkpoints = 2
max_bad_steps = 5            # consecutive non-finite steps before stopping
parallel = "ddp"             # "ddp" | "fsdp"
activation_checkpointing = False
device = "auto"              # "auto" | "cpu" | "cuda"
compile = False
seed = 1337
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def configure(argv, settings):
    """nanoGPT's configurator as a function: a config file sets globals; --key=value overrides."""
    for arg in argv:
        if not arg.startswith("--"):
            exec(Path(arg).read_text(), {}, overrides := {})
            unknown = set(overrides) - set(settings)
            if unknown:
                raise SystemExit(f"{arg}: unknown setting(s) {sorted(unknown)}")
            settings.update(overrides)
            continue
        key, _, value = arg[2:].partition("=")
        if key not in settings:
            raise SystemExit(f"unknown setting --{key}; known: {', '.join(sorted(settings))}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        default = settings[key]
        if isinstance(default, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)
        if type(parsed) is not type(default):
            raise SystemExit(f"--{key}={value}: expected {type(default).__name__}, got {type(parsed).__name__}")
        settings[key] = parsed
    return settings


globals().update(configure(sys.argv[1:], {k: globals()[k] for k in config_keys}))
config = {k: globals()[k] for k in config_keys}

# -----------------------------------------------------------------------------
# distributed setup: torchrun sets RANK/WORLD_SIZE; a plain `python train.py` is world size 1
ddp = int(os.environ.get("RANK", -1)) != -1
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if ddp:
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = "cuda" if "cuda" in device else "cpu"
# bf16 autocast on GPU; fp32 on CPU, which has no fast bf16 (../shared/specs/machine.md)
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
out = Path(out_dir)
if master:
    out.mkdir(parents=True, exist_ok=True)


def log(*args):
    if master:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# data: variable-length sequences, right-padded per batch. Padding (not packing) keeps every
# sequence's positions starting at 0 as at inference; the pad positions carry loss mask 0 and,
# being at the right, are never attended to by real tokens under the causal mask. To waste little
# on padding, each batch is drawn from one of `length_buckets` equal-count groups of similar
# length (a 64-px T2I example is ~100 tokens, a dual panel ~200); with equal counts and a
# uniformly chosen group, every example is still drawn with the same probability.
def load_split(split):
    ids, mask, offsets = load_shards(data_dir, split)
    order = np.argsort(np.diff(offsets), kind="stable")
    return ids, mask, offsets, np.array_split(order, min(length_buckets, len(order)))


train_data, val_data = load_split("train"), load_split("val")
meta_vocab = json.loads((Path(data_dir) / "meta.json").read_text())["vocab_size"]


def get_batch(data, step, micro_step, split_seed):
    """The batch is a pure function of (seed, step, global micro-batch index): resuming at a step
    reproduces the data exactly, and N ranks x 1 micro-batch see what 1 rank x N micro-batches sees."""
    ids, mask, offsets, buckets = data
    global_micro = micro_step * world_size + rank
    rng = np.random.default_rng([seed, split_seed, step, global_micro])
    bucket = buckets[rng.integers(len(buckets))]
    rows = bucket[rng.integers(0, len(bucket), size=batch_size)]
    limit = model_config.max_seq_len + 1  # official: truncate to the context length
    seqs = [(ids[offsets[r]:offsets[r + 1]][:limit], mask[offsets[r]:offsets[r + 1]][:limit]) for r in rows]
    T = max(len(s) for s, _ in seqs)
    x = torch.zeros(batch_size, T, dtype=torch.long)
    m = torch.zeros(batch_size, T, dtype=torch.float32)
    for i, (s, ms) in enumerate(seqs):
        x[i, : len(s)] = torch.from_numpy(s.astype(np.int64))
        m[i, : len(s)] = torch.from_numpy(ms.astype(np.float32))
    x, m = x.to(device), m.to(device)
    return x[:, :-1], x[:, 1:], m[:, 1:]  # inputs, targets, mask aligned with targets


# -----------------------------------------------------------------------------
# model init: scratch, resume, or a checkpoint folder (ours: model.json; official: config.json)
def find_latest_checkpoint(folder):
    """Only fully written checkpoints carry the final name (written under a temp name, then renamed)."""
    done = sorted(p for p in Path(folder).glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


iter_num, train_state = 0, None
if init_from == "resume":
    ckpt_dir = find_latest_checkpoint(out)
    if ckpt_dir is None:
        raise SystemExit(f"init_from=resume but {out} holds no checkpoint; start with init_from=scratch")
    log(f"resuming from {ckpt_dir}")
    model = Transformer.load(ckpt_dir)
    try:
        train_state = torch.load(ckpt_dir / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{ckpt_dir}/train_state.pt is unreadable ({e}); delete that checkpoint folder to resume from the one before")
    iter_num = train_state["iter_num"]
elif init_from == "scratch":
    overrides = dict(vocab_size=meta_vocab, dropout=dropout) | ({"max_seq_len": max_seq_len} if max_seq_len else {})
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name(model_name, **overrides))
else:  # start a stage from the previous stage's weights (paper §4: 256 -> 512 -> 768 px)
    folder = Path(init_from)
    model = Transformer.from_pretrained(folder, dtype=torch.float32) if (folder / "config.json").exists() \
        else Transformer.load(folder)
    model.config.dropout = dropout
if model.config.vocab_size < meta_vocab:
    raise SystemExit(f"model vocab {model.config.vocab_size} < data vocab {meta_vocab}: wrong data_dir for this model")
if max_seq_len and max_seq_len != model.config.max_seq_len:
    model.config.max_seq_len = max_seq_len
    model.reset_rope()
for block in model.layers:
    block.dropout.p = dropout
model_config = model.config
model.to(device)
n_params = model.num_params()
log(f"model: {n_params / 1e6:.2f}M parameters, {model_config}")

if activation_checkpointing:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from model import Block
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
if ddp and parallel == "fsdp":
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device_type == "cuda" else None,
                                  reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    train_model = model
elif ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    train_model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
else:
    train_model = model
if compile:
    train_model = torch.compile(train_model)

# -----------------------------------------------------------------------------
# optimizer: decay matrices and embeddings, not norms (nanoGPT's split)
decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == "cuda")


def full_state_dicts():
    """Model and optimizer state as full (unsharded) tensors on CPU, for DDP and FSDP alike."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


if train_state is not None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, train_state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))


def save_checkpoint():
    """Weights (safetensors + JSON) + optimizer + step + config into ckpt-<step>.tmp, then rename:
    a run killed mid-write leaves only a .tmp folder, which resume never picks."""
    model_state, optim_state = full_state_dicts()
    if not master:
        return
    final = out / f"ckpt-{iter_num:08d}"
    tmp = out / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(tmp, model_state, model_config)
    torch.save({"optimizer": optim_state, "iter_num": iter_num, "config": config}, tmp / "train_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in out.glob("ckpt-*") if not p.name.endswith(".tmp"))[:-keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log(f"saved {final}")


def get_lr(it):
    """Linear warmup, then half-cosine to min_lr (official lr_sched, in steps instead of epochs)."""
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_val_loss():
    model.eval()
    losses = []
    for k in range(eval_iters):
        x, y, m = get_batch(val_data, k, 0, split_seed=1)
        with autocast:
            losses.append(compute_loss(model(x), y, m).item())
    model.train()
    return float(np.mean(losses))


def peak_flops():
    """Dense bf16 peak of the GPU for MFU (../shared/specs/performance.md §6); None elsewhere."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((f for key, f in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12)) if key in name), None)


# -----------------------------------------------------------------------------
# the loop. SIGTERM/SIGINT finish the current step, save and exit (a pre-empted job resumes exactly).
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)
model.train()
bad_steps, t_last, tokens_since = 0, time.time(), 0
t_start, start_iter = time.time(), iter_num
while iter_num < max_iters and not stop_requested:
    if iter_num % eval_interval == 0 and iter_num > 0:
        log(f"step {iter_num}: val loss {estimate_val_loss():.4f}")
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # dropout masks are a function of (seed, step, rank): a resumed run repeats them exactly
    torch.manual_seed(seed + 7919 * iter_num + rank)
    loss_sum = 0.0
    for micro_step in range(gradient_accumulation_steps):
        x, y, m = get_batch(train_data, iter_num, micro_step, split_seed=0)
        sync = micro_step == gradient_accumulation_steps - 1
        if ddp and parallel == "ddp" and not sync:
            context = train_model.no_sync()
        else:
            context = nullcontext()
        if ddp and parallel == "fsdp":
            model.set_requires_gradient_sync(sync)
        with context, autocast:
            loss = compute_loss(train_model(x), y, m, z_loss_weight) / gradient_accumulation_steps
            loss.backward()
        loss_sum += loss.item()
        tokens_since += x.numel() * world_size
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if torch.isfinite(grad_norm):  # all ranks see the same reduced norm, so they agree
        optimizer.step()
        bad_steps = 0
    else:
        bad_steps += 1
        log(f"step {iter_num}: non-finite loss/gradient, step skipped ({bad_steps}/{max_bad_steps})")
        if bad_steps >= max_bad_steps:
            optimizer.zero_grad(set_to_none=True)
            raise SystemExit(f"stopping: {bad_steps} consecutive non-finite steps; lower learning_rate and resume")
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    if iter_num % log_interval == 0:
        dt = time.time() - t_last
        tok_s = tokens_since / dt
        eta = (time.time() - t_start) / (iter_num - start_iter) * (max_iters - iter_num)
        mfu = ""
        if peak_flops():
            flops_per_token = 6 * n_params + 12 * model_config.n_layer * model_config.dim * x.shape[1]
            mfu = f", mfu {flops_per_token * tok_s / (world_size * peak_flops()) * 100:.1f}%"
        log(f"step {iter_num}: loss {loss_sum:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s{mfu}, "
            f"eta {eta / 60:.1f} min")
        t_last, tokens_since = time.time(), 0
    if iter_num % checkpoint_interval == 0 or iter_num == max_iters or stop_requested:
        save_checkpoint()
if ddp:
    dist.destroy_process_group()
