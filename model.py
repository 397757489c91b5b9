"""The Lumina-mGPT 2.0 transformer: a Chameleon-style decoder with a static KV cache.

What it is: the decoder-only model of Lumina-mGPT 2.0 (arXiv 2507.17801, §3.1, Table 2): pre-norm RMSNorm,
SwiGLU, per-head q/k LayerNorm before 1-D RoPE, optional swin-norm, GQA, no biases, untied lm_head;
parameter names are the official checkpoint's minus "model." (docs/architecture.md).
What it is not: a tokenizer (sequence.py), a sampler (sample.py) or a trainer (train.py).

  model(idx)             the training forward: causal attention, no cache.
  model(idx, input_pos)  after setup_caches(B, T): K/V written at input_pos; prefill, decode, verify, rewind.
"""
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint

QK_NORM_EPS = 1e-5  # the official q/k LayerNorm's eps (docs/architecture.md §4)
INIT_STD = 0.02     # HF initializer_range, the official from-scratch init (docs/architecture.md §3)
# our config field -> the official config.json name; HF_FIXED: what every official config.json says
HF_NAMES = dict(vocab_size="vocab_size", dim="hidden_size", intermediate_size="intermediate_size",
                n_layer="num_hidden_layers", n_head="num_attention_heads", n_kv_head="num_key_value_heads",
                max_seq_len="max_position_embeddings", rms_norm_eps="rms_norm_eps", rope_theta="rope_theta",
                qk_norm_groups="model_parallel_size", swin_norm="swin_norm", dropout="dropout")
HF_FIXED = dict(architectures=["ChameleonXLLMXForConditionalGeneration"], model_type="chameleon", rope_scaling=None,
                hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False)


@dataclass
class ModelConfig:
    vocab_size: int = 171385          # tokens (paper Table 2)
    dim: int = 4096                   # hidden size
    intermediate_size: int = 11008    # SwiGLU inner size
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32               # GQA when < n_head; the paper's models are MHA
    max_seq_len: int = 10240          # tokens; official max_gen_len (a 768² image is 9,316)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_norm_groups: int = 1           # official `model_parallel_size`: rows of the q/k-norm affine
    swin_norm: bool = False           # Chameleon-34B-style norm after each sub-block
    dropout: float = 0.0              # residual dropout (official finetune uses 0.05)
    masked_token_ids: tuple = ()      # logits forced to -inf: official mask_image_logits (docs/architecture.md §2)

    @property
    def head_dim(self):
        return self.dim // self.n_head

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf_config(cls, d):
        """Read an official config.json dict (docs/architecture.md §2)."""
        if d.get("rope_scaling"):
            raise ValueError(f"config.json asks for rope_scaling={d['rope_scaling']}, which we do not implement")
        if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("config.json describes a different architecture (needs silu, no attention/mlp bias)")
        values = {ours: d[hf] for ours, hf in HF_NAMES.items() if d.get(hf) is not None}
        values.setdefault("max_seq_len", 4096)  # HF Chameleon's max_position_embeddings when config.json omits it
        masked = [i for name, i in (d.get("vocabulary_map") or {}).items() if name.startswith("IMGIMG")]  # image ids
        return cls(**{"n_kv_head": d["num_attention_heads"], **values},
                   masked_token_ids=tuple(sorted(masked)) if d.get("mask_image_logits", True) else ())

    def to_hf_config(self):
        return {**HF_FIXED, **{hf: getattr(self, ours) for ours, hf in HF_NAMES.items()}}


PRESETS = {  # 7B, 2B: paper Table 2; shapes: the model we ship (vocab from its data); tiny: tests, GQA on
    "7B": dict(vocab_size=171385, dim=4096, intermediate_size=11008, n_layer=32, n_head=32, n_kv_head=32),
    "2B": dict(vocab_size=171385, dim=2048, intermediate_size=8192, n_layer=32, n_head=32, n_kv_head=32),
    "shapes": dict(vocab_size=2600, dim=384, intermediate_size=1024, n_layer=8, n_head=6, n_kv_head=6, max_seq_len=512),
    "tiny": dict(vocab_size=512, dim=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=256),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # as official: normalise in fp32, cast back, then scale
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class QKNorm(nn.Module):  # Chameleon's per-head LayerNorm, heads sharing affine rows (docs/architecture.md §4)
    def __init__(self, groups, head_dim, n_heads):
        super().__init__()
        if n_heads % groups:
            raise ValueError(f"{n_heads} heads cannot be split into {groups} q/k-norm groups")
        self.heads_per_group = n_heads // groups
        self.weight = nn.Parameter(torch.ones(groups, head_dim))
        self.bias = nn.Parameter(torch.zeros(groups, head_dim))

    def forward(self, x):  # (B, T, n_heads, head_dim)
        weight, bias = (p.repeat_interleave(self.heads_per_group, 0) for p in (self.weight, self.bias))  # (nh, hd)
        return F.layer_norm(x, x.shape[-1:], eps=QK_NORM_EPS) * weight + bias


def apply_rope(x, cos, sin):  # x (B, T, n_heads, head_dim); cos, sin (T, head_dim)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # "rotate_half"
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    def __init__(self, max_batch_size, max_seq_length, n_kv_head, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_kv_head, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos, k, v, kv_len):  # k, v (B, n_kv, T, hd) -> entries 0..kv_len-1 (B, n_kv, kv_len, hd)
        self.k_cache[:len(k), :, input_pos] = k
        self.v_cache[:len(v), :, input_pos] = v
        return self.k_cache[:len(k), :, :kv_len], self.v_cache[:len(v), :, :kv_len]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = QKNorm(cfg.qk_norm_groups, cfg.head_dim, cfg.n_head)
        self.k_norm = QKNorm(cfg.qk_norm_groups, cfg.head_dim, cfg.n_kv_head)
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim))
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # q/k-norm before RoPE, as official
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, mask.shape[-1])  # (B, n_kv, S', hd): what the mask covers
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)  # GQA: K/V heads shared
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swin_norm, self.self_attn, self.mlp = cfg.swin_norm, Attention(cfg), MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, input_pos):
        if self.swin_norm:  # norm on the sub-block output (docs/architecture.md §3)
            h = x + self.dropout(self.input_layernorm(self.self_attn(x, cos, sin, mask, input_pos)))
            return h + self.dropout(self.post_attention_layernorm(self.mlp(h)))
        h = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos))
        return h + self.dropout(self.mlp(self.post_attention_layernorm(h)))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_rope()
        for module in self.modules():  # no biases anywhere, so the weights are all there is (a no-op on meta)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def reset_rope(self):
        """(Re)compute the rotary tables; needed again after `to_empty` leaves buffers garbage."""
        c, device = self.config, self.embed_tokens.weight.device
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
        angles = torch.outer(torch.arange(c.max_seq_len, dtype=torch.float32), inv_freq).repeat(1, 2)  # (S, hd)
        self.register_buffer("rope_cos", angles.cos().to(device), persistent=False)  # the non-interleaved layout
        self.register_buffer("rope_sin", angles.sin().to(device), persistent=False)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def setup_caches(self, max_batch_size, max_seq_length):
        if max_seq_length > self.config.max_seq_len:
            raise ValueError(f"cache of {max_seq_length} tokens exceeds max_seq_len {self.config.max_seq_len}; "
                             "ask for a smaller image")
        weight = self.embed_tokens.weight  # the activations' dtype: never int4 (docs/int4.md §3)
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch_size, max_seq_length, self.config.n_kv_head,
                                               self.config.head_dim, weight.dtype).to(weight.device)

    def clear_caches(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def head_rows(self, start, stop):
        """lm_head's rows start..stop-1 alone, as a function of `hidden`'s output: a view of the weight or, when the
        blocks are int4 (quant.py), an int4 copy made once, kept as a plain attribute outside state_dict."""
        rows = self.lm_head.weight[start:stop]
        int4 = next((m for m in self.layers.modules() if hasattr(m, "scales_and_zeros")), None)  # quant.Int4Linear
        if int4 is None:
            return partial(F.linear, weight=rows)
        if getattr(self, "int4_head_rows", (None,))[0] != (start, stop):
            linear = nn.Linear(rows.shape[1], rows.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(rows.detach(), requires_grad=False)  # the rows themselves, not a copy
            self.int4_head_rows = (start, stop), type(int4).from_linear(linear, int4.group_size)
        return self.int4_head_rows[1]

    def forward(self, idx, input_pos=None, key_mask=None):
        """idx (B, T) -> fp32 logits (B, T, vocab); the arguments as for `hidden`."""
        return self.lm_head(self.hidden(idx, input_pos, key_mask)).float()

    def hidden(self, idx, input_pos=None, key_mask=None):
        """idx (B, T) -> the final norm's output (B, T, dim): forward without lm_head, so a sampler can apply a
        narrower head or none (docs/performance.md §5). With caches: input_pos (T,), and optionally key_mask
        (B, S') bool, the cache entries each row may see at all (CFG's left pad, docs/sampling.md §3):
        attention reads entries 0..S'-1 only, so a key_mask as wide as the filled prefix reads no empty cache."""
        cache = self.layers[0].self_attn.kv_cache
        if (input_pos is None) != (cache is None):
            raise RuntimeError("pass input_pos exactly when caches are set up (model.setup_caches)")
        pos = torch.arange(idx.shape[1], device=idx.device) if input_pos is None else input_pos  # (T,)
        cos, sin, mask = self.rope_cos[pos], self.rope_sin[pos], None  # mask None: causal, no cache
        if input_pos is not None:
            keys = torch.arange(cache.k_cache.shape[2] if key_mask is None else key_mask.shape[1], device=idx.device)
            mask = keys <= input_pos[:, None]  # (T, S'): key s visible iff s <= pos
            if key_mask is not None:  # every token still sees itself, so hidden pads never go NaN
                mask = mask[None] & (key_mask[:, None, :] | (keys == input_pos[:, None])[None])  # (B, T, S')
            mask = mask.unsqueeze(-3)  # (B or 1, 1, T, S')
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.norm(x)

    # ---- checkpoints: ours and the official HF layout (docs/checkpoints.md) ----
    def save_pretrained(self, folder):
        checkpoint.save(folder, "model", self.state_dict(), self.config)

    @classmethod
    def load(cls, folder, device="cpu", dtype=torch.float32):
        """Load our own checkpoint folder (model.json + model.safetensors)."""
        config = checkpoint.read_config(Path(folder) / "model.json", ModelConfig)
        return cls._from_files(config, [Path(folder) / "model.safetensors"], lambda name: name, device, dtype)

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.bfloat16):
        """Load an official HF-layout folder: config.json + model.safetensors (or an index + shards)."""
        folder = Path(folder)
        config = ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
        official = lambda name: name if name == "lm_head.weight" else "model." + name  # noqa: E731
        files = checkpoint.safetensors_files(folder)  # ignored: an unused VQ some carry (docs/checkpoints.md §2)
        return cls._from_files(config, files, official, device, dtype, ignore="model.vqmodel.")

    @classmethod
    def _from_files(cls, config, files, file_key, device, dtype, ignore=()):
        """Build on the meta device, fill strictly one tensor at a time: host memory peaks near the model's size."""
        with torch.device("meta"):
            model = cls(config).to(dtype).to_empty(device=device)
        params = {file_key(name): p for name, p in model.named_parameters()}
        checkpoint.load_into(params, files, f"checkpoint {files[0].parent}", ignore)
        model.reset_rope()
        if config.masked_token_ids:  # official forward: these logits to -inf (docs/architecture.md §2)
            masked = torch.tensor(config.masked_token_ids, device=device)
            model.lm_head.register_forward_hook(lambda _, __, logits: logits.index_fill(-1, masked, float("-inf")))
        return model.eval()


def compute_loss(logits, targets, loss_mask, z_loss_weight=0.0):
    """Cross-entropy + the official z-loss (logsumexp²), each a mean over loss_mask's tokens (docs/training.md §1)."""
    logits, mask = logits.float().flatten(0, 1), loss_mask.flatten().float()  # (B*T, V), (B*T,) from (B, T, V), (B, T)
    count = mask.sum().clamp(min=1.0)
    loss = (F.cross_entropy(logits, targets.flatten(), reduction="none") * mask).sum() / count
    z_loss = (torch.logsumexp(logits, dim=-1).pow(2) * mask).sum() if z_loss_weight else 0.0
    return loss + z_loss_weight * z_loss / count


# ---- training arithmetic shared by train.py, train_vq.py and bench.py (docs/training.md) ----
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, per GPU (docs/performance.md)


def lr_schedule(step, max_lr, min_lr, warmup_steps, decay_steps):
    """Linear warm-up, half-cosine to min_lr at decay_steps, flat after (docs/training.md §4)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    ratio = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def flops_per_token(config, n_params, seq_len):
    """Training FLOPs per token: 6N (matmuls, forward + backward) + 12*L*d*T (attention), as nanoGPT."""
    return 6 * n_params + 12 * config.n_layer * config.dim * seq_len


def estimate_mfu(config, n_params, seq_len, tokens_per_s, device):
    """Model FLOPs utilisation against the GPU's dense bf16 peak; None on a CPU or an unknown GPU."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "a CPU"
    peak = next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)
    return flops_per_token(config, n_params, seq_len) * tokens_per_s / peak if peak else None


def cpu_has_fast_bf16():
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX, read from Linux's /proc/cpuinfo): there bf16
    autocast trains faster than fp32; elsewhere it is emulated, ~10x slower (measured: docs/performance.md §4)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""  # not Linux: assume no, fp32 is never the slow choice
    return "avx512_bf16" in flags or "amx_bf16" in flags
