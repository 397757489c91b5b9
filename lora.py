"""LoRA: low-rank adapters on a frozen Lumina-mGPT 2.0, so one GPU can fine-tune the 7B (docs/lora.md).

What it is: `LoRALinear` adds alpha/rank * B(A(x)) to a frozen projection (arXiv 2106.09685 §4.1), A and B
in fp32, B zero at first so training starts from the base exactly; the base fp32, bf16 or int4 (quant.py,
QLoRA-style, arXiv 2305.14314). Adapters are saved alone (lora.safetensors + lora.json naming the base) and
merge into plain weights. What it is not: a trainer (train.py with lora_rank > 0) or PEFT's file format.

  python lora.py merge --lora out/lora_mirror/ckpt-00000097 --out out/merged         # our layout
  python lora.py merge --lora ADAPTERS --base Lumina-mGPT-2.0/ --out merged/ --hf    # the official layout
"""
import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import checkpoint
from configurator import run_main
from model import Transformer
from quant import Int4Linear, quantize_model

ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every projection of a block
ADAPTER_KEYS = (".lora_A", ".lora_B")
NOT_COPIED = ("model", "config.json", "train_state.pt", "README.md")  # a base's own files, by name prefix


@dataclass
class LoRAConfig:  # lora.json, next to lora.safetensors
    base: str                   # the checkpoint folder the adapters were trained on (ours or an official release)
    rank: int = 16
    alpha: float = 32.0         # the update is scaled by alpha / rank
    targets: str = ALL_TARGETS  # comma-separated last names of the linear layers that get adapters
    dropout: float = 0.0        # on the adapters' input only

    def __post_init__(self):
        if self.rank < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA rank {self.rank} must be >= 1 and its dropout {self.dropout} in [0, 1)")


class LoRALinear(nn.Module):
    """base(x) + alpha / rank * B(A(dropout(x))): `base` frozen, lora_A (rank, in) and lora_B (out, rank) trained."""
    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base, self.scale, self.dropout = base, alpha / rank, nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as the LoRA code and PEFT do

    def forward(self, x):
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # fp32 masters; bf16 compute in a bf16 model
        return self.base(x) + self.scale * F.linear(F.linear(self.dropout(x), A), B)


def add_lora(model, config, base_dtype=None):
    """Freeze `model`, turn its weights into base_dtype ("float32", "bfloat16", "int4": bf16 with int4 linears;
    None: as they are) and wrap the linears config.targets names in LoRALinear (adapters fp32). -> model"""
    if base_dtype not in (None, "int4") and not isinstance(getattr(torch, base_dtype, None), torch.dtype):
        raise ValueError(f"base dtype {base_dtype!r} is not one of float32, bfloat16, int4")
    model.requires_grad_(False)
    if base_dtype:
        model.to(torch.bfloat16 if base_dtype == "int4" else getattr(torch, base_dtype))
    if base_dtype == "int4":  # every linear but lm_head; the reference path (dequantize, F.linear) has a backward
        quantize_model(model, path="reference")  # and, under activation checkpointing, one block's floats at a time
    targets = config.targets.split(",")
    named = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, Int4Linear)) and n.rsplit(".", 1)[-1] in targets]
    if missing := set(targets) - {n.rsplit(".", 1)[-1] for n, _ in named}:
        raise ValueError(f"lora targets {sorted(missing)} name no layer; choose from {ALL_TARGETS} or lm_head")
    for name, module in named:
        model.set_submodule(name, LoRALinear(module, config.rank, config.alpha, config.dropout))
    return model


def save_adapters(folder, state_dict, config):
    """lora.safetensors (the adapter tensors of state_dict alone) + lora.json (config) into folder."""
    checkpoint.save(folder, "lora", {k: v for k, v in state_dict.items() if k.endswith(ADAPTER_KEYS)}, config)


def read_config(folder):  # folder: adapters, or a train.py out_dir (its newest checkpoint)
    return checkpoint.read_config(checkpoint.latest(folder) / "lora.json", LoRAConfig)


def attach(model, folder, base_dtype=None):
    """The adapters of folder (lora.json + lora.safetensors) on `model`, loaded strictly. -> model"""
    add_lora(model, read_config(folder), base_dtype)
    folder = checkpoint.latest(folder)
    adapters = {k: v for k, v in model.state_dict().items() if k.endswith(ADAPTER_KEYS)}
    checkpoint.load_into(adapters, [Path(folder) / "lora.safetensors"], f"adapters {folder}")
    return model


@torch.no_grad()
def merge(model):
    """Fold each adapter into its base weight, W + alpha/rank * B A, and unwrap: a plain Transformer again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            if isinstance(module.base, Int4Linear):
                raise ValueError("cannot merge into int4 weights; load the base in float (merge, then quantize)")
            weight = module.base.weight
            weight.copy_((weight.float() + module.scale * module.lora_B @ module.lora_A).to(weight.dtype))
            model.set_submodule(name, module.base)
    return model


def load_base(folder):
    """A checkpoint folder in fp32: ours (model.json) or an official release (config.json)."""
    folder = Path(folder)
    return Transformer.from_pretrained(folder, dtype=torch.float32) if (folder / "config.json").is_file() \
        else Transformer.load(folder)


def main(argv=None):
    p = argparse.ArgumentParser(description="Merge LoRA adapters into their base: a full checkpoint folder.")
    p.add_argument("command", choices=["merge"])
    p.add_argument("--lora", required=True, help="adapter folder (lora.json + lora.safetensors)")
    p.add_argument("--base", help="base checkpoint folder (default: the one lora.json names)")
    p.add_argument("--out", required=True)
    p.add_argument("--hf", action="store_true", help="official HF layout (config.json + bf16 model.safetensors)")
    args = p.parse_args(argv)
    base, out = Path(args.base or read_config(args.lora).base), Path(args.out)
    model = merge(attach(load_base(base), args.lora))
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():  # tokenizer, codec and sampling defaults travel; prompt sets (their refs would not)
        if f.is_file() and not f.name.startswith(NOT_COPIED) and f.suffix != ".jsonl":
            shutil.copy2(f, out / f.name)
    if args.hf:  # keys and dtype as released (docs/checkpoints.md §2)
        state = {k if k == "lm_head.weight" else "model." + k: v.to(torch.bfloat16).contiguous()
                 for k, v in model.state_dict().items()}
        checkpoint.atomic_write(out / "model.safetensors", lambda f: save_file(state, str(f), {"format": "pt"}))
        config = json.dumps(model.config.to_hf_config(), indent=1)
        checkpoint.atomic_write(out / "config.json", lambda f: f.write_text(config))
    else:
        model.save_pretrained(out)
    print(f"merged {args.lora} into {base} -> {out}")


if __name__ == "__main__":
    run_main(main)
