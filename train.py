"""Train the Lumina-mGPT 2.0 transformer: one flat script from a laptop CPU to many GPUs (nanoGPT order).

What it is: the training loop of arXiv 2507.17801 §3.2/§4 with the official finetune recipe: AdamW,
z-loss, residual dropout, warm-up + cosine, loss only where the loss mask says (docs/training.md).
It reads the token shards that data/<name>/prepare.py writes (data/shards.py).
What it is not: a data preparer, a codec trainer (train_vq.py) or a sampler (sample.py).

Run:
  python train.py config/train_shapes.py                      # one process, CPU or one GPU
  python train.py config/train_shapes.py --batch_size=8       # any setting as --key=value; --help lists them
  python train.py config/finetune_lora_shapes.py              # LoRA adapters on a frozen model (docs/lora.md)
  torchrun --standalone --nproc_per_node=8 train.py config/train_7b_stage1.py      # one node
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \\
      train.py config/train_7b_stage1.py                                            # multi-node
Distributed means plain DDP, or FSDP2 (`parallel="fsdp"`) for 2B/7B (docs/training.md §3).
"""
import atexit
import json
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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

import checkpoint
import lora
from configurator import check_device, check_out_dir, check_ranges, configure, excepthook, warn
from data.shards import load_kinds, load_shards
from model import Block, ModelConfig, Transformer, compute_loss, cpu_has_fast_bf16, estimate_mfu, lr_schedule

# -----------------------------------------------------------------------------
# config: defaults, then a config file, then --key=value (unknown keys and wrong types are errors)
out_dir = "out/shapes"
init_from = "scratch"        # "scratch" | "resume" (latest checkpoint in out_dir) | a checkpoint folder
data_dir = "data/shapes"
data_stream = False          # fresh shapes examples, never one twice (data/shapes/prepare.py Stream); val: the shards
data_mix = ""                # with data_stream: kind=weight,... (default: the mix the shards were built with)
stream_workers = 1           # processes drawing the streamed examples (0: the training process itself)
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
max_minutes = 0.0            # wall clock of the loop: stop with a checkpoint after this long; 0: no limit
parallel = "ddp"             # "ddp" | "fsdp"
activation_checkpointing = False
lora_rank = 0                # > 0: train LoRA adapters alone on the frozen init_from model (lora.py, docs/lora.md)
lora_alpha = 32.0            # the adapters' update is scaled by lora_alpha / lora_rank
lora_targets = lora.ALL_TARGETS  # comma-separated layer names that get adapters
lora_dropout = 0.0
lora_base_dtype = "float32"  # frozen base: "float32" | "bfloat16" | "int4" (QLoRA-style; with activation_checkpointing)
device = "auto"              # "auto" | "cpu" | "cuda"
dtype = "auto"               # autocast: "auto" (bf16 on CUDA and native-bf16 CPUs, else fp32) | "float32" | "bfloat16"
compile = False
threads = 0                  # torch CPU threads; 0: torch's default
seed = 1337
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
sys.excepthook = excepthook  # an expected error (a bad setting, a missing file) ends as one line, exit 2
globals().update(configure(sys.argv[1:], {k: globals()[k] for k in config_keys}, __doc__))
config = {k: globals()[k] for k in config_keys}
TRAIN_STREAM, VAL_STREAM = 0, 1  # seeds of the two batch streams
DROPOUT_SEED_STRIDE = 7919       # seed + stride * step + rank differs for every (step, rank) below 7919 ranks

# -----------------------------------------------------------------------------
# bad settings stop here, before any work, as one line without a traceback (docs/checkpoints.md §4)
check_ranges(config, positive=("batch_size", "length_buckets", "gradient_accumulation_steps", "eval_interval",
                                "eval_iters", "log_interval", "checkpoint_interval", "keep_checkpoints",
                                "max_bad_steps", "learning_rate", "grad_clip"),
             non_negative=("max_seq_len", "max_iters", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay",
                           "z_loss_weight", "max_minutes", "threads", "seed", "stream_workers"),
             fraction=("dropout", "beta1", "beta2"))
if parallel not in ("ddp", "fsdp"):
    raise ValueError(f"parallel={parallel!r}: expected 'ddp' or 'fsdp'")
if dtype not in ("auto", "float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: expected 'auto', 'float32' or 'bfloat16'")
if device != "auto":
    check_device(device)
check_out_dir(out_dir)
if init_from not in ("scratch", "resume") and not Path(init_from).is_dir():
    raise FileNotFoundError(f"init_from={init_from}: no such checkpoint folder; or use 'scratch' or 'resume'")
if not (Path(data_dir) / "meta.json").is_file():
    raise FileNotFoundError(f"data_dir={data_dir} holds no meta.json; prepare the data first (data/shapes/prepare.py)")
for problem, applies in ((f"warmup_iters={warmup_iters} > max_iters={max_iters}: the peak LR is never reached",
                          warmup_iters > max_iters),
                         (f"min_lr={min_lr} > learning_rate={learning_rate}", min_lr > learning_rate),
                         ("parallel='fsdp' without torchrun: one process, nothing sharded",
                          parallel == "fsdp" and "RANK" not in os.environ),
                         ("data_mix is set but data_stream is off: the shards' mix is fixed",
                          bool(data_mix) and not data_stream)):
    if applies:
        warn(problem)

# -----------------------------------------------------------------------------
# distributed setup: torchrun sets RANK/WORLD_SIZE; a plain `python train.py` is world size 1
ddp = "RANK" in os.environ
rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1))
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if ddp:
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
master = rank == 0
device_type = "cuda" if "cuda" in device else "cpu"
if threads:
    torch.set_num_threads(threads)
# bf16 autocast on GPU and on CPUs that multiply bf16 natively; emulated bf16 is ~10x slower than fp32 on the
# others (bench.py --train measures both; docs/performance.md §4)
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" or cpu_has_fast_bf16() else "float32"
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
torch.backends.cuda.matmul.allow_tf32 = device_type == "cuda"
out = Path(out_dir)  # checkpoint.save creates it with the first checkpoint


def log(*args):
    if master:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# data: variable-length sequences right-padded per batch (positions start at 0, as at inference; pads
# carry loss mask 0), each batch from one of `length_buckets` groups of similar length (docs/training.md §1)
def load_split(split):
    ids, mask, offsets = load_shards(data_dir, split, data_meta)
    if len(offsets) < 2:
        raise ValueError(f"the {split} split of {data_dir} holds no examples; prepare more data (raise --n)")
    order = np.argsort(np.diff(offsets), kind="stable")
    return ids, mask, offsets, np.array_split(order, min(length_buckets, len(order)))


data_meta = checkpoint.read_json(Path(data_dir) / "meta.json")
if not isinstance(data_meta, dict) or type(data_meta.get("vocab_size")) is not int or data_meta["vocab_size"] < 1:
    raise ValueError(f"{data_dir}/meta.json has no vocab_size; prepare the data again")
data_vocab = data_meta["vocab_size"]


def pad_batch(seqs):
    """[(ids, loss_mask)] -> inputs, targets, mask aligned with targets: (B, T - 1) each, right-padded."""
    limit = model.config.max_seq_len + 1  # official: truncate to the context length
    x = pad_sequence([torch.from_numpy(np.asarray(s[:limit], np.int64)) for s, _ in seqs], batch_first=True)
    m = pad_sequence([torch.from_numpy(np.asarray(ms[:limit], np.float32)) for _, ms in seqs], batch_first=True)
    x, m = x.to(device), m.to(device)  # (B, T)
    return x[:, :-1], x[:, 1:], m[:, 1:]


def rows_batch(data, rows):
    ids, mask, offsets, _ = data
    return pad_batch([(ids[offsets[r]:offsets[r + 1]], mask[offsets[r]:offsets[r + 1]]) for r in rows])


def get_batch(data, step, micro_step, stream):
    """The batch is a pure function of (seed, stream, step, global micro-batch index): resuming at a
    step reproduces the data exactly, and N ranks x 1 micro-batch see what 1 rank x N micro-batches see."""
    buckets = data[3]
    rng = np.random.default_rng([seed, stream, step, micro_step * world_size + rank])
    bucket = buckets[rng.integers(len(buckets))]
    return rows_batch(data, bucket[rng.integers(0, len(bucket), size=batch_size)])


def fresh_batches(start_iter):
    """With data_stream: the micro-batches of steps start_iter.. in order, each a pure function of its
    global index (so resuming at a step repeats the data, and no example appears twice), drawn ahead by
    stream_workers processes. The workers ignore a SIGTERM sent to the whole process group, so the trainer
    can save first; closing the generator at exit stops them (multiprocessing would wait on them forever)."""
    from data.shapes.prepare import Stream, ignore_stop_signals  # only a streaming run needs the shapes world
    order = ((step * gradient_accumulation_steps + micro) * world_size + rank
             for step in range(start_iter, max_iters) for micro in range(gradient_accumulation_steps))
    stream = Stream(data_dir, data_mix, batch_size, seed)

    def batches():
        yield from DataLoader(stream, batch_size=None, sampler=order, num_workers=stream_workers, collate_fn=list,
                              worker_init_fn=ignore_stop_signals)
    fresh = batches()
    atexit.register(fresh.close)  # runs before multiprocessing's own exit hook, which joins the workers
    return fresh


# -----------------------------------------------------------------------------
# model init: scratch, resume, or a checkpoint folder (ours: model.json; official: config.json)
iter_num, train_state = 0, None
if init_from == "resume":
    if not checkpoint.finished_checkpoints(out):
        raise FileNotFoundError(f"init_from=resume but {out} holds no checkpoint; start with init_from=scratch")
    ckpt_dir = checkpoint.finished_checkpoints(out)[-1]
    log(f"resuming from {ckpt_dir}")
    if (ckpt_dir / "lora.json").is_file() != bool(lora_rank):
        raise ValueError(f"{ckpt_dir} was{'' if lora_rank else ' not'} trained with LoRA: resume with its lora_rank")
    model = lora.load_base(lora.read_config(ckpt_dir).base) if lora_rank else Transformer.load(ckpt_dir)
    try:
        train_state = torch.load(ckpt_dir / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{ckpt_dir}/train_state.pt is unreadable ({e}); delete that checkpoint folder to resume "
                         "from the one before") from None
    iter_num = train_state["iter_num"]
elif init_from == "scratch":
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name(model_name, vocab_size=data_vocab, dropout=dropout))
else:  # start a stage from the previous stage's weights (paper §4: 256 -> 512 -> 768 px)
    model = lora.load_base(init_from)  # ours or an official release
    model.config.dropout = dropout
# sampling defaults travel with the weights (the start's sampling.json); panelwise data are decoded panel by panel
source = ckpt_dir if init_from == "resume" else None if init_from == "scratch" else Path(init_from)
sampling = checkpoint.read_json(source / "sampling.json") if source and (source / "sampling.json").is_file() else {}
sampling.update({"panelwise": True} if data_meta.get("settings", {}).get("panelwise") else {})
if model.config.vocab_size < data_vocab:
    raise ValueError(f"model vocab {model.config.vocab_size} < data vocab {data_vocab}: wrong data_dir for this model")
if max_seq_len and max_seq_len != model.config.max_seq_len:
    model.config.max_seq_len = max_seq_len
    model.reset_rope()
for block in model.layers:
    block.dropout.p = dropout
lora_config = None
if lora_rank:  # freeze the base, train low-rank adapters alone (docs/lora.md §2)
    if init_from == "scratch":
        raise ValueError("lora_rank needs a base to adapt: set init_from to a checkpoint folder")
    torch.manual_seed(seed)
    if train_state is None:
        lora_config = lora.LoRAConfig(init_from, lora_rank, lora_alpha, lora_targets, lora_dropout)
        lora.add_lora(model, lora_config, lora_base_dtype)
    else:
        lora_config = lora.read_config(ckpt_dir)
        lora.attach(model, ckpt_dir, lora_base_dtype)
model.to(device)
n_params = model.num_params()
log(f"model: {n_params / 1e6:.2f}M parameters, {model.config}; {device}, {dtype}")
if lora_rank:
    log(f"LoRA: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable, {lora_config}")
train_data, val_data = load_split("train"), load_split("val")  # after the checkpoint: a bad one fails first
val_kinds = load_kinds(data_dir, "val", data_meta)  # per-kind val loss, where the data labels its examples
kind_rows = {} if val_kinds is None else {kind: np.flatnonzero(val_kinds == kind)[:batch_size]
                                          for kind in data_meta["kinds"] if kind in val_kinds}
fresh = fresh_batches(iter_num) if data_stream else None

if activation_checkpointing:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
train_model = model
if ddp and parallel == "fsdp":  # one fully_shard per block, bf16 params, fp32 gradient reduction
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device_type == "cuda" else None,
                                  reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
elif ddp:
    train_model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
if compile:
    train_model = torch.compile(train_model)

# -----------------------------------------------------------------------------
# optimizer: decay matrices and embeddings, not norms (nanoGPT's split)
trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # with LoRA: the adapters
decay = [p for n, p in trainable if p.dim() >= 2 and "norm" not in n]
no_decay = [p for n, p in trainable if not (p.dim() >= 2 and "norm" not in n)]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == "cuda")
if train_state is not None:  # full (unsharded) tensors, for DDP and FSDP alike
    set_optimizer_state_dict(model, optimizer, train_state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))


def save_checkpoint():
    """Weights + optimizer + step + config into ckpt-<step>.tmp, renamed when whole (docs/checkpoints.md §3)."""
    model_state, optim_state = get_state_dict(model, optimizer,  # full tensors on CPU, DDP and FSDP alike
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                       ignore_frozen_params=bool(lora_rank)))
    if not master:
        return
    final, tmp = out / f"ckpt-{iter_num:08d}", out / f"ckpt-{iter_num:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora_rank:  # the adapters alone, lora.json naming the base (docs/lora.md §3)
        lora.save_adapters(tmp, model_state, lora_config)
    else:
        checkpoint.save(tmp, "model", model_state, model.config)
    torch.save({"optimizer": optim_state, "iter_num": iter_num, "config": config}, tmp / "train_state.pt")
    codec = Path(data_meta.get("codec") or "-")  # our codec folder, if the data names one
    for f in (Path(data_dir) / "tokenizer.json", codec / "vq.json", codec / "vq.safetensors"):
        if f.is_file() and not lora_rank:  # the data's tokenizer and codec (adapters use the base's):
            shutil.copy2(f, tmp)           # `python sample.py --ckpt <folder>` needs no copying
    if sampling and not lora_rank:
        (tmp / "sampling.json").write_text(json.dumps(sampling))  # inside tmp: atomic with the rest
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint.finished_checkpoints(out)[:-keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log(f"saved {final}")


@torch.no_grad()
def estimate_val_loss():
    """(mean loss of eval_iters fixed val batches, {kind: loss of the first batch_size val examples of that
    kind}): the same examples at every evaluation, so the curves compare (docs/training.md §1)."""
    model.eval()
    with autocast:
        losses = [compute_loss(model(x), y, m).item()
                  for x, y, m in (get_batch(val_data, k, 0, VAL_STREAM) for k in range(eval_iters))]
        per_kind = {kind: compute_loss(model(x), y, m).item()
                    for kind, (x, y, m) in ((kind, rows_batch(val_data, rows)) for kind, rows in kind_rows.items())}
    model.train()
    return float(np.mean(losses)), per_kind


def log_val_loss():
    """Prints the val losses and appends them to out_dir/val.jsonl, the curve against examples seen."""
    loss, per_kind = estimate_val_loss()
    log(f"step {iter_num}: val loss {loss:.4f}" + "".join(f", {k} {v:.3f}" for k, v in per_kind.items()))
    if master:
        out.mkdir(parents=True, exist_ok=True)
        seen = iter_num * batch_size * gradient_accumulation_steps * world_size
        with open(out / "val.jsonl", "a") as f:
            f.write(json.dumps({"step": iter_num, "examples": seen, "val_loss": loss, "per_kind": per_kind}) + "\n")


# -----------------------------------------------------------------------------
# the loop. SIGTERM/SIGINT finish the current step, save and exit (a pre-empted job resumes exactly).
stop_requested = []  # the signals received, or "max_minutes"
for stop_signal in (signal.SIGTERM, signal.SIGINT):
    signal.signal(stop_signal, lambda signum, frame: stop_requested.append(signum))
model.train()
bad_steps, t_last, tokens_since = 0, time.time(), 0
t_start, start_iter = time.time(), iter_num
while iter_num < max_iters and not stop_requested:
    if iter_num % eval_interval == 0 and (iter_num > 0 or init_from != "scratch"):  # from weights: the start too
        log_val_loss()
    lr = lr_schedule(iter_num, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(seed + DROPOUT_SEED_STRIDE * iter_num + rank)  # a resumed run repeats the dropout masks
    loss_sum = 0.0
    for micro_step in range(gradient_accumulation_steps):
        x, y, m = pad_batch(next(fresh)) if data_stream else get_batch(train_data, iter_num, micro_step, TRAIN_STREAM)
        sync = micro_step == gradient_accumulation_steps - 1
        context = train_model.no_sync() if ddp and parallel == "ddp" and not sync else nullcontext()
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
            raise SystemExit(f"stopping: {bad_steps} consecutive non-finite steps; lower learning_rate and resume")
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    if max_minutes and time.time() - t_start > 60 * max_minutes:  # per process: single-process runs only
        stop_requested.append("max_minutes")  # ends the loop with a checkpoint, as SIGTERM does
    if iter_num % log_interval == 0:
        tok_s = tokens_since / (time.time() - t_last)
        eta = (time.time() - t_start) / (iter_num - start_iter) * (max_iters - iter_num)
        mfu = estimate_mfu(model.config, n_params, x.shape[1], tok_s / world_size, device)  # per GPU
        log(f"step {iter_num}: loss {loss_sum:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s"
            + (f", mfu {mfu * 100:.1f}%" if mfu else "") + f", eta {eta / 60:.1f} min")
        t_last, tokens_since = time.time(), 0
    if iter_num % checkpoint_interval == 0 or iter_num == max_iters or stop_requested:
        save_checkpoint()
if data_stream:
    fresh.close()  # stops the stream's workers (on a crash, the atexit hook does)
if ddp:
    dist.destroy_process_group()
