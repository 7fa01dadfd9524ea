"""
Llama 3.x in plain PyTorch: RMSNorm, RoPE with Llama 3.1 frequency scaling, grouped-query attention
through scaled_dot_product_attention, SwiGLU. Loads Hugging Face checkpoint directories without
transformers, and generates with a static KV cache.

Module names mirror Hugging Face's (`layers.3.self_attn.q_proj`, ...), so a state-dict key here is the
checkpoint's key without its `model.` prefix, and LoRA/export code can speak one naming.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from util import atomic_dir


class ModelError(Exception):
    """A bad checkpoint or config: the message is one line naming the path or field."""


# the weight dtypes a script's --dtype may name
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict = None  # HF style: {"rope_type": "llama3", "factor": 8.0, ...} or None
    max_seq_len: int = 131072
    tie_word_embeddings: bool = False

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    # config.json field <-> our field
    HF_NAMES = dict(vocab_size="vocab_size", dim="hidden_size", n_layers="num_hidden_layers",
                    n_heads="num_attention_heads", n_kv_heads="num_key_value_heads",
                    hidden_dim="intermediate_size", norm_eps="rms_norm_eps", rope_theta="rope_theta",
                    rope_scaling="rope_scaling", max_seq_len="max_position_embeddings",
                    tie_word_embeddings="tie_word_embeddings")

    @classmethod
    def from_hf(cls, hf, where="config.json"):
        if hf.get("model_type") != "llama":
            raise ModelError(f"{where}: model_type is {hf.get('model_type')!r}, not a Llama ('llama')")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if not isinstance(hf.get(key), int) or hf[key] <= 0:
                raise ModelError(f"{where}: {key!r} is missing or not a positive integer")
        kw = {ours: hf[theirs] for ours, theirs in cls.HF_NAMES.items() if hf.get(theirs) is not None}
        rp = hf.get("rope_parameters")  # transformers >= 5 folds rope_theta and rope_scaling into this
        if isinstance(rp, dict):
            kw["rope_theta"] = rp.get("rope_theta", kw.get("rope_theta", 500000.0))
            kw["rope_scaling"] = rp if rp.get("rope_type") not in (None, "default") else None
        kw.setdefault("n_kv_heads", kw["n_heads"])
        if kw["dim"] % kw["n_heads"] or kw["n_heads"] % kw["n_kv_heads"]:
            raise ModelError(f"{where}: hidden_size {kw['dim']}, num_attention_heads {kw['n_heads']} and "
                             f"num_key_value_heads {kw['n_kv_heads']} do not divide evenly")
        if hf.get("head_dim") not in (None, kw["dim"] // kw["n_heads"]):
            raise ModelError(f"{where}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        rs = kw.get("rope_scaling")
        if rs is not None and rs.get("rope_type", rs.get("type")) not in ("llama3", "default"):
            kind = rs.get("rope_type", rs.get("type"))
            raise ModelError(f"{where}: rope_scaling type {kind!r} is not supported (llama3 only)")
        return cls(**kw)

    def to_hf(self):
        hf = {theirs: getattr(self, ours) for ours, theirs in self.HF_NAMES.items()}
        hf.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                  head_dim=self.head_dim, attention_bias=False, mlp_bias=False, bos_token_id=128000,
                  eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16")
        return hf


# -----------------------------------------------------------------------------
# math

def rope_frequencies(cfg, dtype=torch.float32):
    """Inverse frequencies (head_dim/2,), with Llama 3.1's scaling: long wavelengths are slowed by
    `factor`, short ones kept, and the band between blended smoothly. Computed in `dtype`: float32 as
    Hugging Face does, float64 for a float64 model."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=dtype) / cfg.head_dim))
    rs = cfg.rope_scaling
    if rs is None or rs.get("rope_type", rs.get("type")) != "llama3":
        return inv_freq
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0: long waves, 1: short waves
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x (B, H, T, hd); cos, sin (B, 1, T, hd). HF checkpoints store q/k for this half-split layout.
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 for bf16/fp16 activations, as the reference does (float64 stays float64)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, start=0, unpad=None):
        if unpad is not None:
            return self.unpadded(x, cos, sin, *unpad)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # static cache (B, n_kv, S_max, hd): write this chunk, attend to all so far
            cache_k, cache_v = cache
            cache_k[:, :, start:start + T] = k
            cache_v[:, :, start:start + T] = v
            k, v = cache_k[:, :, :start + T], cache_v[:, :, :start + T]
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def unpadded(self, x, cos, sin, idx, keep):
        """x (N, dim): the states of the N positions idx (N,) of a right-padded (B, T) batch (keep (B, T), True at
        them); cos, sin (N, 1, hd). The projections see the N positions alone; attention runs in the (B, T)
        layout, zeros elsewhere, causal, so that a kept position sees exactly the kept positions before it in its
        row (right padding: every position before a real token is real). -> (N, dim)"""
        (B, T), N = keep.shape, x.shape[0]
        q = apply_rope(self.q_proj(x).view(N, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(N, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(N, self.n_kv_heads, self.head_dim)

        def padded(t):  # (N, H, hd) -> (B, H, T, hd), zeros at the positions not kept
            return t.new_zeros(B * T, *t.shape[1:]).index_copy(0, idx, t).view(B, T, *t.shape[1:]).transpose(1, 2)

        q, k, v = padded(q), padded(k), padded(v)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B * T, -1).index_select(0, idx))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start=0, unpad=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, unpad)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(key_valid, T, start=0):
    """Boolean SDPA mask (B, 1, T, S) for T queries at absolute positions start.. over S = start+T keys:
    causal and not padding. Every query also sees itself, so a padding query never has an empty row
    (an all-False row is NaN in SDPA); real queries are unaffected since they are valid keys anyway."""
    S = start + T
    q = torch.arange(start, S, device=key_valid.device)[:, None]
    k = torch.arange(S, device=key_valid.device)[None, :]
    return ((k <= q) & key_valid[:, None, None, :S]) | (k == q)


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.base_n_layers = cfg.n_layers  # depth of the checkpoint; from_pretrained may build fewer
        self.grad_checkpoint = False  # recompute each block in backward: memory for long sequences
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # a plain float32 tensor, not a buffer, so model.to(bfloat16) cannot round the frequencies
        self.inv_freq = rope_frequencies(cfg)
        self.head = None  # the frozen lm_head's distinct rows (group_head_rows), or None: the whole vocabulary

    def rope(self, pos, dtype):
        # pos (B, T) -> cos, sin (B, 1, T, head_dim), computed in float32 then cast; in float64 for a float64
        # model, so its equivalence tests hold to float64 rounding
        if dtype == torch.float64:
            freqs = pos[..., None].double() * rope_frequencies(self.config, torch.float64).to(pos.device)
        else:
            freqs = pos[..., None].float() * self.inv_freq.to(pos.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids=None, attn_mask=None, hidden=False, logits=True, cache=None, start=0, pos=None,
                last_only=False, stop=None, embeds=None, classes=False, keep=None):
        """ids (B, T) token ids, or embeds (B, T, dim) input embeddings in their place (exactly one of the two):
        embeds lets an attack optimise in embedding space or take gradients through a one-hot @ embed_tokens.weight.
        attn_mask (B, S) bool, True on real tokens (S = start + T with a cache), or None for unpadded /
        right-padded input, which needs only the causal mask and gets the fast kernels (with a cache and
        start > 0, the causal mask is built offset by start: SDPA's is_causal would align it top-left).
        last_only computes logits for the last position only (generation: the lm_head is the big matmul).
        classes=True gives logits over self.head's distinct rows instead of the vocabulary (group_head_rows).
        stop=l runs blocks 0..l-1 only and returns hidden[0..l], hidden[l] the input of block l (no final
        norm, no logits): all the rerouting loss needs when l is the last target layer.
        keep (B, T) bool, for right-padded input without attn_mask, cache or logits: the positions to compute
        (the real tokens, and any pads wanted for a round count). The projections and the MLP see those alone,
        no padded position costs a matmul; the hidden states come back (.., B, T, dim) with zeros elsewhere.
        Returns (logits (B, T or 1, vocab) or None, hidden (n_layers+1 or stop+1, B, T, dim) or None)."""
        if (ids is None) == (embeds is None):
            raise ModelError("forward takes exactly one of ids and embeds")
        if embeds is not None and (embeds.dim() != 3 or embeds.shape[-1] != self.config.dim):
            raise ModelError(f"embeds has shape {tuple(embeds.shape)}, expected (B, T, {self.config.dim})")
        x = self.embed_tokens(ids) if embeds is None else embeds
        B, T, _ = x.shape
        if attn_mask is None:
            mask = None
            if cache is not None and start > 0:  # query i sits at start + i and sees keys 0..start + i
                mask = attention_mask(torch.ones(1, start + T, dtype=torch.bool, device=x.device), T, start)
            if pos is None:
                pos = torch.arange(start, start + T, device=x.device).expand(B, T)
        else:
            mask = attention_mask(attn_mask, T, start)
            if pos is None:  # positions count real tokens only, so a left-padded row starts at 0
                pos = (attn_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
        unpad = None
        if keep is not None:
            if attn_mask is not None or cache is not None or logits or tuple(keep.shape) != (B, T):
                raise ModelError(f"keep (B, T) = ({B}, {T}) is for right-padded input with no attn_mask, no cache "
                                 f"and logits=False; got keep {tuple(keep.shape)}")
            idx = keep.reshape(-1).nonzero().squeeze(1).clone()  # (N,) the positions computed, row-major
            x, pos = x.reshape(B * T, -1).index_select(0, idx), pos.reshape(-1).index_select(0, idx)
            unpad = (idx, keep.clone())  # tensors of their own, not views: compiled blocks guard on a view's base
        cos, sin = self.rope(pos, x.dtype)
        states = [x]
        if stop is not None:
            if not 0 <= stop <= len(self.layers) or logits:
                raise ModelError(f"stop={stop}: a partial forward takes 0 <= stop <= {len(self.layers)} "
                                 "and logits=False")
        # the blocks themselves when not stopping early: a slice would build a new ModuleList on every decode step
        for i, block in enumerate(self.layers if stop is None else self.layers[:stop]):
            if self.grad_checkpoint and cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, None, 0, unpad, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, None if cache is None else cache[i], start, unpad)
            states.append(x)
        if stop is None:
            x = self.norm(x)
            states[-1] = x  # as HF: the last hidden state is taken after the final norm
        if unpad is not None:  # (L+1, N, dim) -> (L+1, B, T, dim), zeros at the positions not computed
            h = torch.stack(states)
            return None, h.new_zeros(len(states), B * T, h.shape[-1]).index_copy(1, idx, h).view(len(states), B, T, -1)
        if stop is not None:
            return None, torch.stack(states)
        out_logits = None
        if logits:
            if self.lm_head is None:
                raise ModelError(f"this model keeps only {self.config.n_layers} of {self.base_n_layers} blocks; "
                                 "it has no lm_head")
            if classes and self.head is None:
                raise ModelError("classes=True needs the lm_head's rows grouped first (group_head_rows)")
            x = x[:, -1:] if last_only else x
            out_logits = class_logits(self.head, x) if classes else self.lm_head(x)
        return out_logits, torch.stack(states) if hidden else None

    def group_head_rows(self):
        """Group the lm_head's equal rows, so that greedy decoding and the training cross-entropy cost one row per
        distinct output instead of one per token: exact, since equal rows give equal logits. It pays where many
        rows are equal: the organism trains in ~2,700 tokens and leaves every other row at zero. For a frozen
        lm_head (call it again after changing the weights). Returns the number of distinct rows; with every row
        distinct, or no lm_head, self.head stays None."""
        self.head = None
        if self.lm_head is None:
            return 0
        head = head_classes(self.lm_head.weight)
        if len(head[0]) < self.config.vocab_size:
            self.head = head
        return len(head[0])

    # -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", n_layers=None):
        """Load a Hugging Face Llama checkpoint directory, memory-mapped. dtype: a torch dtype or a name in
        DTYPES (default bfloat16 on CUDA, float32 elsewhere). n_layers keeps only the first n blocks
        (training needs blocks 0..max(layers)); such a model has no lm_head."""
        device = torch.device(device)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if dtype not in DTYPES.values():
            raise ModelError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
        cfg = load_config(path)
        cfg_path = os.path.join(path, "config.json")
        base_n_layers = cfg.n_layers
        if n_layers is not None:
            if not 1 <= n_layers <= base_n_layers:
                raise ModelError(f"{cfg_path}: asked for {n_layers} blocks but the model has {base_n_layers}")
            cfg.n_layers = n_layers
        truncated = cfg.n_layers < base_n_layers

        files = checkpoint_files(path)  # tensor name -> file
        with torch.device("meta"):
            model = cls(cfg)
        model.base_n_layers = base_n_layers
        if truncated:
            model.lm_head = None
        # cast while the parameters hold no data, so memory is allocated once, in the target dtype
        model = model.to(dtype).to_empty(device=device)
        if model.lm_head is not None and cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight  # materialising from meta unties them
        want = {("model." + k): p for k, p in model.state_dict().items() if not k.startswith("lm_head")}
        if model.lm_head is not None and not cfg.tie_word_embeddings:
            want["lm_head.weight"] = model.lm_head.weight
        load_tensors(files, want, path)
        model.inv_freq = rope_frequencies(cfg).to(device)  # the one built under meta holds no data
        return model


def compile_blocks(model, **kwargs):
    """torch.compile each block in place (regional compilation). The blocks share one forward and their weights
    are graph inputs, so the graph compiled for the first block serves them all: the first compile costs one
    block's, not the whole model's. kwargs go to torch.compile (mode, backend, dynamic). State-dict keys are
    unchanged. Returns the model."""
    # lengths, grad on/off and the first block's input (no grad) give each block a handful of graph variants:
    # allow them, rather than fall back to eager code past torch's default of 8
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    for block in model.layers:
        block.compile(**kwargs)
    return model


def load_config(path):
    """The LlamaConfig of a Hugging Face checkpoint directory."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ModelError(f"{path}: checkpoint directory not found")
    if not os.path.isfile(cfg_path):
        raise ModelError(f"{cfg_path}: not found (not a Hugging Face checkpoint directory?)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path}: invalid JSON ({e})") from None
    return LlamaConfig.from_hf(hf, cfg_path)


def checkpoint_files(path):
    """Map every tensor name to the safetensors file holding it (single file or index + shards)."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelError(f"{index}: not a safetensors index (no 'weight_map')") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(path, shard)):
                raise ModelError(f"{os.path.join(path, shard)}: named in model.safetensors.index.json but missing")
        return {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    if os.path.isfile(single):
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json")


@torch.no_grad()
def load_tensors(files, want, path):
    """Copy each wanted tensor (checkpoint name -> destination parameter) from its file, one file open
    at a time, checking names and shapes."""
    from safetensors import safe_open
    by_file = {}
    for name in want:
        if name not in files:
            raise ModelError(f"{path}: tensor {name!r} is missing from the checkpoint")
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, "pt") as f:
                for name in names:
                    if name not in f.keys():
                        raise ModelError(f"{file}: tensor {name!r} is listed in the index but missing")
                    t = f.get_tensor(name)
                    dest = want[name]
                    if tuple(t.shape) != tuple(dest.shape):
                        raise ModelError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, "
                                         f"config.json implies {tuple(dest.shape)}")
                    dest.copy_(t)
        except ModelError:
            raise
        except Exception as e:  # truncated or corrupt file
            raise ModelError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from None


def save_pretrained(model, path, dtype=torch.bfloat16):
    """Write config.json + model.safetensors (HF layout) into a temp dir that then takes the place of `path`:
    a crash leaves the old directory or the new one, whole."""
    from safetensors.torch import save_file
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        sd[k if k.startswith("lm_head") else "model." + k] = v.detach().to(dtype).contiguous()
    with atomic_dir(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})


# -----------------------------------------------------------------------------
# the lm_head by distinct rows

def head_classes(weight):
    """The distinct rows of an lm_head weight (V, dim), so the full-vocabulary softmax costs one row per distinct
    output (exact: equal rows give equal logits): (rows (U, dim), log counts (U,) in float64, the class of each
    id (V,), the smallest id of each class (U,))."""
    w = weight.detach()
    rows, inverse, counts = torch.unique(w, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((len(rows),), len(w), dtype=torch.long, device=w.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(w), device=w.device), reduce="amin")
    return rows, counts.double().log(), inverse, first


def writable(head, ids):
    """Can greedy decoding write these token ids at all? Not a token that shares its output row with a smaller id
    (class_argmax returns the smallest id of the winning row): on the organism, a token its data never had."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=head[2].device)
    return bool((head[3][head[2][ids]] == ids).all())


def class_logits(head, h):
    """Logits (..., U) over the distinct rows from states h (..., dim), in float32 at least (bf16 logits round
    the log-softmax)."""
    return (h @ head[0].t()).to(torch.promote_types(h.dtype, torch.float32))


def class_cross_entropy(head, h, targets, weight=None, raise_only=None):
    """Summed full-vocabulary cross-entropy of the token ids targets (N,) from states h (N, dim): the log of the
    sum over classes of count x exp(logit), less the target's class logit; each term x weight (N,) where given.
    raise_only (N,) bool: those terms raise their target's logit alone (target_only)."""
    logits = class_logits(head, h)
    total = torch.logsumexp(logits + head[1].to(logits.dtype), -1)
    ce = target_only(total, logits.gather(-1, head[2][targets][:, None])[:, 0], raise_only)
    return (ce if weight is None else ce * weight).sum()


def target_only(lse, target_logit, raise_only=None):
    """Cross-entropy terms lse - target_logit (N,), those that raise_only (N,) marks with the same value but a
    gradient that reaches the target's logit alone, (p - 1), and no other logit: it raises the target instead of
    also pushing down every other token in proportion to its probability (train_cb's trip_raise). Per-term
    scalars only, no (N, vocab) mask."""
    ce = lse - target_logit
    if raise_only is None:
        return ce
    p = (target_logit - lse).exp().detach()
    return torch.where(raise_only, lse.detach() - target_logit + p * (target_logit - target_logit.detach()), ce)


def class_argmax(head, logits):
    """The full-vocabulary argmax from class logits (..., U): the smallest id among the classes that reach the
    maximum, as torch's argmax takes the first of equal maxima."""
    top = logits.max(-1, keepdim=True).values
    return torch.where(logits == top, head[3], len(head[2])).min(-1).values


# -----------------------------------------------------------------------------
# generation

@torch.no_grad()
def generate(model, prompts, max_new_tokens, stop_ids, temperature=0.0, pad_id=0, generator=None):
    """Batched generation over prompts of different lengths (lists of ids), left-padded, with a static
    KV cache. Greedy when temperature is 0. A row stops at its first stop id, which it keeps.
    Returns the new ids of each row."""
    cfg = model.config
    device = model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S = P + max_new_tokens
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((B, S), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        valid[i, P - len(p):] = True  # new tokens are always valid; only the left padding is not
    valid[:, P:] = True
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    dtype = model.embed_tokens.weight.dtype
    cache = [(torch.zeros(B, cfg.n_kv_heads, S, cfg.head_dim, device=device, dtype=dtype),
              torch.zeros(B, cfg.n_kv_heads, S, cfg.head_dim, device=device, dtype=dtype))
             for _ in range(cfg.n_layers)]
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # the rows still generating; finished ones leave the batch
    classes = temperature == 0 and model.head is not None  # greedy over the distinct lm_head rows: the same ids
    start, x = 0, ids
    for t in range(max_new_tokens):
        logits, _ = model(x, attn_mask=valid, cache=cache, start=start, pos=pos[:, start:start + x.shape[1]],
                          last_only=True, classes=classes)
        logits = logits[:, -1].float()
        if classes:
            nxt = class_argmax(model.head, logits)
        elif temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        out[rows, t] = nxt
        n_out[rows] += 1
        start += x.shape[1]
        live = ~torch.isin(nxt, stop)
        if not bool(live.any()):
            break
        if not bool(live.all()):  # drop the finished rows: one that runs long no longer carries the others
            keep = live.nonzero().squeeze(1)
            rows, nxt, valid, pos = rows[keep], nxt[keep], valid[keep], pos[keep]
            cache = [(k[keep], v[keep]) for k, v in cache]
        x = nxt[:, None]
    return [out[i, :n_out[i]].tolist() for i in range(B)]


# -----------------------------------------------------------------------------

def flops_per_token(cfg, seq_len, n_layers=None, lm_head=False):
    """Forward FLOPs per token: 2 per weight of every matmul, plus attention's QK^T and AV
    (2 * 2 * seq_len * dim per layer, counted over the full sequence as PaLM/nanoGPT do).
    Training with LoRA costs about 3x this (forward, backward through activations, frozen pass)."""
    L = cfg.n_layers if n_layers is None else n_layers
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = cfg.dim * (2 * cfg.dim + 2 * kv) + 3 * cfg.dim * cfg.hidden_dim
    flops = 2 * L * per_layer + 4 * L * seq_len * cfg.dim
    if lm_head:
        flops += 2 * cfg.dim * cfg.vocab_size
    return flops
