"""The Lumina-mGPT 2.0 transformer: a Chameleon-style decoder with a static KV cache.

What it is: the decoder-only autoregressive model of Lumina-mGPT 2.0 (arXiv 2507.17801, §3.1,
Table 2), trained from scratch on text + image-code tokens. Pre-norm RMSNorm (fp32), SwiGLU MLP,
per-head q/k LayerNorm applied before 1-D rotary embeddings, optional swin-norm, GQA, no biases,
untied lm_head. Key names and shapes follow the official checkpoint
(../shared/specs/lumina_mgpt2.md §1): our module names are the official ones minus "model.".

What it is not: a tokenizer (sequence.py), a sampler (sample.py) or a trainer (train.py).

Two ways to call it:
  model(idx)              the plain training forward, causal attention, no cache.
  model(idx, input_pos)   after model.setup_caches(B, T): writes K/V at input_pos and attends to
                          every earlier position. Prefill, one-token decode and k-token verify
                          (speculative decoding) are the same call; rewinding is writing at an
                          earlier input_pos. Nothing is allocated per step, so the step compiles
                          into one CUDA graph.
"""
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        """Read an official config.json dict; values the paper does not print come from here."""
        if d.get("rope_scaling"):
            raise ValueError(f"config.json asks for rope_scaling={d['rope_scaling']}, which this model does not implement")
        if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("config.json describes a different architecture (needs silu, no attention/mlp bias)")
        return cls(vocab_size=d["vocab_size"], dim=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
                   n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"],
                   max_seq_len=d.get("max_position_embeddings", 4096), rms_norm_eps=d.get("rms_norm_eps", 1e-5),
                   rope_theta=d.get("rope_theta", 10000.0), qk_norm_groups=d.get("model_parallel_size", 1),
                   swin_norm=d.get("swin_norm", False), dropout=d.get("dropout", 0.0))

    def to_hf_config(self):
        """The official config.json fields for this config (what from_hf_config reads back)."""
        return {"architectures": ["ChameleonXLLMXForConditionalGeneration"], "model_type": "chameleon",
                "vocab_size": self.vocab_size, "hidden_size": self.dim, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
                "num_key_value_heads": self.n_kv_head, "max_position_embeddings": self.max_seq_len,
                "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": None,
                "model_parallel_size": self.qk_norm_groups, "swin_norm": self.swin_norm, "dropout": self.dropout,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}


PRESETS = {
    # paper Table 2; 7,880,273,920 and 2,849,617,920 parameters with the untied head
    "7B": dict(vocab_size=171385, dim=4096, intermediate_size=11008, n_layer=32, n_head=32, n_kv_head=32),
    "2B": dict(vocab_size=171385, dim=2048, intermediate_size=8192, n_layer=32, n_head=32, n_kv_head=32),
    # the reduced-scale model we ship; vocab_size is set from the shapes data (tokenizer + codebook)
    "shapes": dict(vocab_size=2600, dim=384, intermediate_size=1024, n_layer=8, n_head=6, n_kv_head=6,
                   max_seq_len=512),
    # tests: small but with every feature on (GQA 4 -> 2 heads)
    "tiny": dict(vocab_size=512, dim=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=256),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # official: normalise in fp32, cast back, then scale (Llama-style)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class QKNorm(nn.Module):
    """Chameleon's per-head LayerNorm: plain LayerNorm over head_dim, then an affine whose
    [groups, head_dim] rows are shared by consecutive heads (lumina_mgpt2.md §1.4)."""

    def __init__(self, groups, head_dim, n_heads):
        super().__init__()
        if n_heads % groups:
            raise ValueError(f"{n_heads} heads cannot be split into {groups} q/k-norm groups")
        self.heads_per_group = n_heads // groups
        self.weight = nn.Parameter(torch.ones(groups, head_dim))
        self.bias = nn.Parameter(torch.zeros(groups, head_dim))

    def forward(self, x):  # (B, T, n_heads, head_dim)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-5)
        weight = self.weight.repeat_interleave(self.heads_per_group, 0)  # (n_heads, head_dim)
        bias = self.bias.repeat_interleave(self.heads_per_group, 0)
        return x * weight + bias


def rope_tables(seq_len, head_dim, theta):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # (seq_len, head_dim): the non-interleaved layout
    return emb.cos(), emb.sin()


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

    def update(self, input_pos, k, v):  # k, v (B, n_kv, T, hd); returns the whole (B, n_kv, S, hd)
        B = k.shape[0]
        self.k_cache[:B, :, input_pos] = k
        self.v_cache[:B, :, input_pos] = v
        return self.k_cache[:B], self.v_cache[:B]


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
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hd)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
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
        self.swin_norm = cfg.swin_norm
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, input_pos):
        if self.swin_norm:  # norm on the sub-block output (lumina_mgpt2.md §1.3)
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
        self.causal_mask = None
        self.reset_rope()
        if self.embed_tokens.weight.device.type != "meta":
            self.apply(self._init_weights)

    def reset_rope(self):
        """(Re)compute the rotary tables; needed again after `to_empty` leaves buffers garbage."""
        device = self.embed_tokens.weight.device
        cos, sin = rope_tables(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    @staticmethod
    def _init_weights(module):
        # official starting point: HF post_init, normal(0, initializer_range=0.02), no biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def setup_caches(self, max_batch_size, max_seq_length):
        if max_seq_length > self.config.max_seq_len:
            raise ValueError(f"cache of {max_seq_length} tokens exceeds the model's max_seq_len "
                             f"{self.config.max_seq_len}; ask for a smaller image")
        dtype, device = self.lm_head.weight.dtype, self.lm_head.weight.device
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):  # e.g. int4-packed weights
            dtype = self.embed_tokens.weight.dtype
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch_size, max_seq_length, self.config.n_kv_head,
                                               self.config.head_dim, dtype).to(device)
        self.causal_mask = torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device).tril()

    def clear_caches(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.causal_mask = None

    def forward(self, idx, input_pos=None, key_mask=None):
        """idx (B, T) token ids -> fp32 logits (B, T, vocab). input_pos (T,) only with caches.

        key_mask (B, S) bool, optional with caches: cache entries each row may see at all. CFG uses
        it to run the unconditional context (which starts at the image start token) left-padded in
        the same batch as the conditional one: RoPE depends only on relative positions, so hiding
        the pads gives exactly the official separate unconditional forward.
        """
        if (input_pos is None) != (self.causal_mask is None):
            raise RuntimeError("pass input_pos exactly when caches are set up (model.setup_caches)")
        if input_pos is None:
            mask, cos, sin = None, self.rope_cos[: idx.shape[1]], self.rope_sin[: idx.shape[1]]
        else:
            mask = self.causal_mask[input_pos]  # (T, S): key s visible iff s <= pos
            if key_mask is not None:  # every token still sees itself, so hidden pads never go NaN
                own = torch.arange(mask.shape[1], device=idx.device) == input_pos[:, None]  # (T, S)
                mask = mask[None] & (key_mask[:, None, :] | own[None])  # (B, T, S)
            mask = mask.unsqueeze(-3)  # (B or 1, 1, T, S)
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.lm_head(self.norm(x)).float()

    # ---- checkpoints: ours (safetensors + JSON config) and the official HF layout ----

    def save_pretrained(self, folder):
        save_weights(folder, self.state_dict(), self.config)

    @classmethod
    def load(cls, folder, device="cpu", dtype=torch.float32):
        """Load our own checkpoint folder (model.json + model.safetensors)."""
        folder = Path(folder)
        if not (folder / "model.json").is_file():
            raise FileNotFoundError(f"{folder} has no model.json; is it a nanoLumina checkpoint folder?")
        known = {f.name for f in fields(ModelConfig)}
        config = ModelConfig(**{k: v for k, v in json.loads((folder / "model.json").read_text()).items() if k in known})
        return cls._load_streaming(config, [folder / "model.safetensors"], lambda key: key, device, dtype)

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.bfloat16):
        """Load an official HF-layout folder: config.json + model.safetensors(.index.json + shards)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json; expected an official Lumina-mGPT 2.0 folder")
        config = ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [folder / s for s in shards]
        elif (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
        else:
            raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")

        def official_to_ours(key):
            if key.startswith("model.vqmodel."):
                return None  # the unused Chameleon VQ some releases carry (lumina_mgpt2.md §1.5)
            if key == "lm_head.weight":
                return key
            return key[len("model."):] if key.startswith("model.") else "?" + key
        return cls._load_streaming(config, files, official_to_ours, device, dtype)

    @classmethod
    def _load_streaming(cls, config, files, rename, device, dtype):
        """Build on the meta device, then fill tensor by tensor from each shard: peak host memory
        stays near the model's size in `dtype` (no full fp32 copy of a 7B model)."""
        from safetensors import safe_open
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype).to_empty(device=device)
        params = dict(model.named_parameters())
        loaded, unexpected, misshaped = set(), [], []
        for file in files:
            if not Path(file).is_file():
                raise FileNotFoundError(f"checkpoint shard {file} is missing")
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        name = rename(key)
                        if name is None:
                            continue
                        if name not in params:
                            unexpected.append(key)
                            continue
                        tensor = f.get_tensor(key)
                        if tuple(tensor.shape) != tuple(params[name].shape):
                            misshaped.append(f"{key} {list(tensor.shape)} vs model {list(params[name].shape)}")
                            continue
                        with torch.no_grad():
                            params[name].copy_(tensor)
                        loaded.add(name)
            except Exception as e:  # safetensors raises its own error types for bad headers/data
                raise ValueError(f"cannot read checkpoint file {file}: {e} (corrupt or truncated?)") from None
        missing = sorted(set(params) - loaded)
        if missing or unexpected or misshaped:
            def few(xs):
                return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
            problems = [f"{label}: {few(xs)}" for label, xs in
                        (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)) if xs]
            raise ValueError("checkpoint does not match the model config; " + "; ".join(problems))
        model.reset_rope()
        return model.eval()


def compute_loss(logits, targets, loss_mask, z_loss_weight=0.0):
    """Next-token cross-entropy averaged over the positions the loss mask marks, plus the official
    z-loss (mean of logsumexp² over the same positions, lumina_mgpt2.md §7).
    logits (B, T, V), targets (B, T), loss_mask (B, T) of 0/1."""
    logits = logits.float().flatten(0, 1)
    mask = loss_mask.flatten().float()
    count = mask.sum().clamp(min=1.0)
    loss = (F.cross_entropy(logits, targets.flatten(), reduction="none") * mask).sum() / count
    if z_loss_weight:
        loss = loss + z_loss_weight * (torch.logsumexp(logits, dim=-1).pow(2) * mask).sum() / count
    return loss


def save_weights(folder, state_dict, config):
    """Our checkpoint format: model.safetensors + model.json (the ModelConfig), each written atomically."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p)))
    atomic_write(folder / "model.json", lambda p: p.write_text(json.dumps(asdict(config), indent=1)))


def atomic_write(path, write):
    """Write through `write(tmp_path)` then rename: a crash never leaves a half-written file at `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
