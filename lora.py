"""
Hand-rolled LoRA for nanocb's Llama: a low-rank update on the q, k, v, o, gate, up and down projections
of chosen blocks, a switch that turns every adapter off (so the frozen model's hidden states come from the
same weights in memory), adapter save/load with safetensors, and a merge back into plain nn.Linear.

    y = x W^T + scale * dropout(x) A^T B^T        A: (r, in), B: (out, r), scale = lora_alpha / r

B starts at zero, so the adapted model starts equal to the base (b_init_std > 0 gives B a tiny random start
instead: see inject_lora). This file knows nothing about losses or data.
"""

import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from util import atomic_write

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAError(ValueError):
    """A bad adapter or a bad LoRA setting; the message is one line meant for the user."""


class LoRALinear(nn.Module):
    """
    A frozen linear layer plus a trainable low-rank path.

    The frozen weight stays a direct attribute (`.weight`, `.bias`), so the wrapped model's state-dict keys for
    the base weights are unchanged (`layers.3.self_attn.q_proj.weight`) and merge_lora only has to hand that
    same Parameter back to an nn.Linear. The adapter adds `.lora_a` (r, in) and `.lora_b` (out, r).
    """

    def __init__(self, base, r, lora_alpha, dropout=0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), the same Parameter: no copy
        self.bias = base.bias
        self.r, self.lora_alpha, self.dropout_p = r, lora_alpha, dropout
        self.scale = lora_alpha / r
        # LoRA parameters live in float32 under a bf16/fp16/fp32 base: Adam's tiny updates survive, and autocast
        # (bf16 on CUDA) still runs the matmuls in low precision. A float64 base keeps them in float64.
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        self.lora_a = nn.Parameter(torch.zeros(r, self.in_features, device=base.weight.device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, device=base.weight.device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the LoRA path only
        self.enabled = True
        self.lora_merged = getattr(base, "lora_merged", False)  # the base weight already holds a merged update

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            # without autocast the adapter runs in its own dtype; under autocast the matmuls cast their inputs to
            # the autocast dtype anyway, so a float32 copy of the activation would be made only to be cast back
            h = h.to(self.lora_a.dtype)
        delta = F.linear(F.linear(h, self.lora_a), self.lora_b) * self.scale
        return y + delta.to(y.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, lora_alpha={self.lora_alpha}"


def _unwrap(model):
    # DDP keeps the model in .module, torch.compile in ._orig_mod; adapter keys must not depend on either
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def lora_modules(model):
    """[(name, LoRALinear)] in model order, names like 'layers.3.self_attn.q_proj'."""
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)]


def inject_lora(model, r, lora_alpha, dropout=0.0, layers=None, targets=TARGETS, b_init_std=0.0, generator=None):
    """
    Replace the `targets` projections of `model.layers[i].self_attn` / `.mlp` for i in `layers` (None: every
    block the model has, the original recipe's transform_layers=-1 once blocks above max(target layers) are
    dropped) by LoRALinear, freeze every base parameter, and return the new LoRA parameters (a, b per module).

    A is kaiming-uniform(a=sqrt(5)) as in the usual LoRA (uniform in +-1/sqrt(in)); B is zero (the model starts
    equal to the base) or, with b_init_std > 0, normal(0, b_init_std). Why the option: with B = 0 every rerouting
    cosine is exactly 1 at step 0, the maximum of cosine, where its gradient vanishes; a tiny B moves the start
    off that point deterministically (given `generator`).
    """
    model = _unwrap(model)
    n_blocks = len(model.layers)
    if not isinstance(r, int) or r <= 0:
        raise LoRAError(f"lora r must be a positive integer, got {r!r}")
    if not lora_alpha > 0:
        raise LoRAError(f"lora_alpha must be positive, got {lora_alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"lora dropout must be in [0, 1), got {dropout!r}")
    if not b_init_std >= 0.0:
        raise LoRAError(f"b_init_std must be >= 0, got {b_init_std!r}")
    if lora_modules(model):
        raise LoRAError("the model already has LoRA adapters; inject_lora once per model")
    layers = list(range(n_blocks)) if layers is None else sorted(set(int(i) for i in layers))
    if not layers:
        raise LoRAError("no blocks to put LoRA on: the layer list is empty")
    bad = [i for i in layers if not 0 <= i < n_blocks]
    if bad:
        raise LoRAError(f"LoRA layer {bad[0]} is out of range: the model has blocks 0..{n_blocks - 1}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise LoRAError(f"unknown LoRA target {unknown[0] if unknown else '(none)'}: choose among {', '.join(TARGETS)}")

    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for i in layers:
        block = model.layers[i]
        for parent in (block.self_attn, block.mlp):
            for name in targets:
                base = getattr(parent, name, None)
                if base is None:
                    continue
                if not isinstance(base, nn.Linear):
                    raise LoRAError(f"layers.{i}.{name} is a {type(base).__name__}, LoRA wraps nn.Linear only")
                lora = LoRALinear(base, r, lora_alpha, dropout).train(base.training)  # an eval() model stays in eval
                # drawn on the CPU, so a seed gives the same adapter on every device and every rank
                a = torch.empty(r, base.in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                b = torch.zeros(base.out_features, r)
                if b_init_std > 0:
                    b.normal_(0.0, b_init_std, generator=generator)
                with torch.no_grad():
                    lora.lora_a.copy_(a)
                    lora.lora_b.copy_(b)
                setattr(parent, name, lora)
                params += [lora.lora_a, lora.lora_b]
    return params


def lora_config(model):
    """dict(r, lora_alpha, dropout, layers, targets) of an injected model:
    inject_lora(fresh_model, **lora_config(model)) rebuilds the same adapter layout."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("the model has no LoRA adapters")
    first = mods[0][1]
    layers = sorted({int(n.split(".")[1]) for n, _ in mods})
    targets = [t for t in TARGETS if any(n.endswith("." + t) for n, _ in mods)]
    return dict(r=first.r, lora_alpha=first.lora_alpha, dropout=first.dropout_p, layers=layers, targets=targets)


@contextmanager
def adapters_off(model):
    """Run the base model: every LoRA path is skipped inside the block, restored after (even on error).
    Refuses once merge_lora has folded an update into the weights: the base weights are gone, and running on
    would silently give the adapted model."""
    merged = [n for n, m in _unwrap(model).named_modules() if getattr(m, "lora_merged", False)]
    if merged:
        raise LoRAError(f"{merged[0]} holds a merged LoRA update (merge_lora): the base model is gone, "
                        "adapters_off cannot run it; load the base weights again")
    mods = [m for _, m in lora_modules(model)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def lora_state_dict(model):
    """{'layers.3.self_attn.q_proj.lora_a': tensor, ...}: detached views of the live LoRA parameters."""
    sd = {}
    for name, m in lora_modules(model):
        sd[f"{name}.lora_a"] = m.lora_a.detach()
        sd[f"{name}.lora_b"] = m.lora_b.detach()
    return sd


def load_lora_state_dict(model, sd, source="adapter"):
    """Copy the adapter tensors `sd` into the model's LoRA parameters; every key and shape must match."""
    own = lora_state_dict(model)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise LoRAError(f"{source}: {len(missing)} LoRA tensor(s) missing, first {missing[0]} "
                        "(adapter built for other layers or targets?)")
    if unexpected:
        raise LoRAError(f"{source}: {len(unexpected)} unexpected tensor(s), first {unexpected[0]} "
                        "(adapter built for other layers or targets?)")
    for k, p in own.items():
        if tuple(sd[k].shape) != tuple(p.shape):
            raise LoRAError(f"{source}: {k} has shape {tuple(sd[k].shape)}, the model expects {tuple(p.shape)} "
                            "(different r or base model?)")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k])


def save_lora(path, model, metadata=None):
    """
    Write the adapter as safetensors: LoRA tensors plus JSON metadata (the caller's dict and, under 'lora',
    lora_config(model)). Written to a temp file in the same directory and renamed, so a crash never leaves a
    half-written adapter at `path`.
    """
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    meta = dict(metadata or {})
    meta["lora"] = lora_config(model)
    header = {"nanocb": json.dumps(meta)}  # safetensors metadata is str -> str
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_lora(path):
    """Read an adapter written by save_lora -> (state_dict, metadata); then
    inject_lora(model, **metadata['lora']) and load_lora_state_dict(model, state_dict)."""
    if not os.path.isfile(path):
        raise LoRAError(f"{path}: no such adapter file")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
        sd = load_file(path)
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"{path}: not a readable safetensors adapter ({str(e).splitlines()[0]})") from None
    if "nanocb" not in header:
        raise LoRAError(f"{path}: no nanocb metadata: not an adapter written by save_lora")
    try:
        meta = json.loads(header["nanocb"])
    except json.JSONDecodeError:
        raise LoRAError(f"{path}: adapter metadata is not valid JSON") from None
    return sd, meta


def merge_lora(model):
    """
    Fold every adapter into its base weight, W += scale * B @ A (computed in float32, or float64 for a float64
    model, then cast to W's dtype), and swap each LoRALinear back to the nn.Linear it came from. In place;
    returns the model. Exact up to rounding, so eval can run the circuit-broken model at the base model's speed
    and export can write plain HF weights under their usual keys. The base weights are gone afterwards, so
    adapters_off refuses to run.
    """
    for name, m in lora_modules(model):
        with torch.no_grad():
            dtype = torch.promote_types(m.weight.dtype, torch.float32)
            delta = (m.lora_b.to(dtype) @ m.lora_a.to(dtype)) * m.scale  # (out, in)
            m.weight.copy_((m.weight.to(dtype) + delta).to(m.weight.dtype))  # one rounding, in W's dtype
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        lin.lora_merged = True  # adapters_off refuses from now on: these weights are no longer the base
        parent_name, _, child = name.rpartition(".")
        setattr(_unwrap(model).get_submodule(parent_name), child, lin)
    return model
