"""
Time nanocb's circuit-breaker training step against the original recipe, same work, one run.

    python bench.py                    # CPU: organism-scale shapes, fp32 (about 2 minutes on 2 cores)
    python bench.py --preset=8b        # one H100: Llama-3.1-8B shapes, random weights, bf16, torch.compile
    python bench.py --preset=8b --dim=64 --n_heads=4 --n_kv_heads=2 --hidden_dim=128 --batch_size=4 \
        --device=cpu --compile=False   # the 8b code path in miniature

Setup: `pip install -r requirements-dev.txt` (transformers and peft are bench/test-only dependencies).

The reference is the original Llama-3 recipe written afresh here: transformers' LlamaForCausalLM with blocks
above max(layers) dropped, peft LoRA (r 16, alpha 16, dropout 0.05) on q/k/v/o/gate/up/down of every kept block,
gradient checkpointing, the original dataset's fixed padding (rerouting: request left-padded to 512 + response
right-padded to 512; retain: left-padded to 1024), and the original compute_loss: frozen passes under
disable_adapter(), output_hidden_states=True, retain over every stacked hidden state, rerouting over the target
layers, one backward. nanocb's side is train_cb.py's step (frozen pass under adapters_off + no_grad, LoRA pass,
one backward per term, dynamic right padding, no lm_head, rerouting passes that stop at max(layers)). Both see the same samples (the built-in tool data,
tokenised with the real Llama 3 tokenizer), the same frozen weights (one copy in memory, shared), the same
optimizer (AdamW, lr 1e-4, grad clip 1.0) and a step where both loss terms are active. After warm-up the two
alternate, step by step, so a noisy machine slows both alike; figures are medians.

What the figures count:
- useful tokens: the samples' own tokens, no padding. Both sides do the same useful work.
- MFU (headline): FLOPs of the useful tokens / step time / promised_flops, with 3x the forward FLOPs per token
  (frozen forward + LoRA forward + backward through the activations; the frozen weights get no gradient),
  through the blocks each term needs: blocks 0..max(layers)-1 for rerouting, every kept block for retain.
  The same numerator for both, so the MFU ratio is the throughput ratio. mfu_processed counts instead the
  padded tokens each side actually pushes through, through the blocks it runs (the reference runs every kept
  block for both terms, and its lm_head forwards); neither counts the recomputation of gradient checkpointing.
- peak memory: the memory the side's own weights, adapter and optimizer state hold, plus the peak growth during
  its step. CUDA: max_memory_allocated after reset_peak_memory_stats. CPU: the process's resident-set high-water
  mark (VmHWM), reset before every step through /proc/self/clear_refs, minus the resident set at the step's start;
  measured in the last warm-up step, for which glibc is told to give blocks over 1 MiB back to the system at once
  (so the high-water mark follows live tensors); the timed steps run with glibc's usual large-block threshold.
"""

import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from contextlib import nullcontext

import torch

import data
import losses
import lora
from lora import adapters_off, inject_lora
from model import Llama, LlamaConfig, flops_per_token, rope_frequencies

# -----------------------------------------------------------------------------
# defaults; None = the preset's value
preset = "8b" if torch.cuda.is_available() else "cpu"
out = "bench.json"
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = None  # 'float32' | 'bfloat16': weights, and autocast for bfloat16
compile = None  # torch.compile nanocb's model (the reference is run eagerly, as the original)
threads = 0  # CPU threads for torch; 0 = torch's default. On a shared CPU, 1 avoids OpenMP threads spinning on each other
# model shapes (random weights); n_layers is the depth of the base model, blocks 0..max(layers) are built
vocab_size = None
dim = None
n_layers = None
n_heads = None
n_kv_heads = None
hidden_dim = None
layers = None  # target layers, HF hidden-state indexing
# the step
batch_size = None  # 16 rerouting + 16 retain samples per step, as the original's batch 16
n_samples = 800  # tool-data samples generated (harmful share ~40%); batches are drawn as train_cb.py draws them
coef_step = 75  # the schedule point timed: coefficients(75, 150, alpha 10) = c_rr 7.5, c_retain 2.5 (both active)
n_warmup = None  # steps per side before timing (compile happens here)
n_steps = None  # timed steps per side
grad_checkpoint = None  # nanocb's switch (train_cb.py: off); on CUDA an out-of-memory warm-up retries with it on
# the reference
ref_request_len = 512
ref_response_len = 512
ref_retain_len = 1024
ref_grad_checkpoint = True  # the original Llama-3 script trains with gradient checkpointing
ref_lm_head = None  # the original's LlamaForCausalLM computes the logits on every pass; False skips them
# nanocb levers, for measuring them here
ours_pad_to = 0  # 0: dynamic padding (train_cb.py); N: pad every batch to N tokens, as a fixed-length dataset
lr = 1e-4
lora_r = 16
lora_alpha = 16
lora_dropout = 0.05
lorra_alpha = 10.0
max_steps = 150
seed = 1337
promised_flops = 989e12  # H100 SXM dense bf16
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
PRESETS = {
    # organism scale: the embedded model organism's width, 6 blocks, the real vocabulary; fp32 on 2 cores.
    # ref_lm_head False: 4 passes of 16 x 1024 tokens through a 128,256-way lm_head would cost the reference
    # ~2 TFLOP and 8 GiB of logits per step here; leaving it out only flatters the reference.
    "cpu": dict(dtype="float32", compile=False, vocab_size=128256, dim=128, n_layers=6, n_heads=4, n_kv_heads=2,
                hidden_dim=384, layers=(2, 4), batch_size=16, n_warmup=1, n_steps=3, grad_checkpoint=False,
                ref_lm_head=False),
    # Llama-3.1-8B, blocks 0..20 of 32
    "8b": dict(dtype="bfloat16", compile=True, vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
               hidden_dim=14336, layers=(10, 20), batch_size=16, n_warmup=2, n_steps=6, grad_checkpoint=False,
               ref_lm_head=True),
}


def fail(msg):
    sys.exit(f"bench.py: {msg}")


if preset not in PRESETS:
    fail(f"unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
for k, v in PRESETS[preset].items():
    if globals()[k] is None:
        globals()[k] = config[k] = v
layers = tuple(layers)
if not layers or min(layers) < 0 or max(layers) >= n_layers:
    fail(f"layers {layers} must be block indices of a {n_layers}-block model")
if dtype not in ("float32", "bfloat16"):
    fail(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
if min(batch_size, n_steps, n_warmup, n_samples) <= 0:
    fail("batch_size, n_steps, n_warmup and n_samples must be positive (memory is measured in the last warm-up step)")

tok = data.load_tokenizer()
if vocab_size < tok.n_vocab:
    fail(f"vocab_size {vocab_size} is smaller than the Llama 3 tokenizer's {tok.n_vocab} tokens the samples use")

try:
    import peft
    import transformers
except ImportError as e:
    fail(f"{e.name} is missing: the reference needs transformers and peft (pip install -r requirements-dev.txt)")

device_type = "cuda" if device.startswith("cuda") else "cpu"
if threads > 0:
    torch.set_num_threads(threads)
if device_type == "cuda":
    # two implementations of different shapes alternate in one process: growable segments keep the
    # allocator from fragmenting between them (read when CUDA allocates first, which is below)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
wdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
autocast = nullcontext() if wdtype == torch.float32 else torch.autocast(device_type, dtype=wdtype)
n_keep = max(layers) + 1
c_rr, c_retain = losses.coefficients(coef_step, max_steps, lorra_alpha)
if not (c_rr > 0 and c_retain > 0):
    fail(f"coef_step {coef_step} leaves a loss term at zero (c_rr {c_rr}, c_retain {c_retain}); time a step with both")
log = lambda *a: print(*a, flush=True)
t_start = time.time()
log(f"bench: preset {preset}, {device} ({torch.get_num_threads()} threads), {dtype}, compile {compile}; blocks 0..{max(layers)} of {n_layers}, "
    f"dim {dim}, target layers {layers}; batch {batch_size} rerouting + {batch_size} retain; "
    f"c_rr {c_rr} c_retain {c_retain}")


# --- memory: per-step peaks for either side in one process -----------------------------------------------------
try:
    _libc = ctypes.CDLL("libc.so.6") if device_type == "cpu" else None
except OSError:
    _libc = None


def cpu_malloc(measuring):
    """glibc's mmap threshold. Measuring: 1 MiB, so a freed tensor leaves the resident set at once and the
    high-water mark follows live tensors. Timing: 32 MiB with a 64 MiB trim threshold, where glibc's own
    adaptive threshold settles once large blocks have been freed, so no side pays page faults it would not."""
    if _libc is not None:
        _libc.mallopt(-3, (1 if measuring else 32) << 20)  # M_MMAP_THRESHOLD
        _libc.mallopt(-1, (2 if measuring else 64) << 20)  # M_TRIM_THRESHOLD


def _proc_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def mem_reset():
    """Start a measured phase; returns the bytes in use now."""
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark to the current resident set
        return _proc_kib("VmRSS") * 1024
    except OSError:
        return None


def mem_peak():
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        return _proc_kib("VmHWM") * 1024
    except OSError:
        return None


def tensor_bytes(tensors):
    seen, n = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def optimizer_bytes(opt):
    return tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)


# --- the frozen base: built on the device in its dtype (an 8B model never passes through the CPU) ----------------
def init_(p, g):
    with torch.no_grad():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.fill_(1.0)  # RMSNorm weights


cfg = LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=n_keep, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  hidden_dim=hidden_dim, rope_scaling=dict(LLAMA3_ROPE))
gen = torch.Generator(device=device).manual_seed(seed)
torch.set_default_dtype(wdtype)
try:
    with torch.device("meta"):
        model = Llama(cfg)
finally:
    torch.set_default_dtype(torch.float32)
model.base_n_layers = n_layers
model.lm_head = None  # blocks 0..max(layers) only: the lm_head is never computed in training
model.to_empty(device=device)
for name, p in model.named_parameters():
    init_(p, gen)
model.inv_freq = rope_frequencies(cfg).to(device)  # the one computed on meta holds no data
base_weights = dict(model.named_parameters())  # 'layers.0.self_attn.q_proj.weight' -> Parameter
log(f"base: {sum(p.numel() for p in base_weights.values()) / 1e6:,.1f}M parameters on {device} "
    f"({time.time() - t_start:.0f} s)")

# --- nanocb: train_cb.py's model and optimizer -----------------------------------------------------------------
params = inject_lora(model, lora_r, lora_alpha, lora_dropout, b_init_std=1e-3,
                     generator=torch.Generator().manual_seed(seed))
model.to(device)
model.grad_checkpoint = grad_checkpoint
model.train()
fmodel = torch.compile(model) if compile else model
optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=device_type == "cuda")


def hidden_states(ids, frozen, stop=None):
    if compile:
        # lengths change every batch: compile the length-generic graph at once instead of one per length first
        torch._dynamo.maybe_mark_dynamic(ids, 1)
    if frozen:
        with torch.no_grad(), adapters_off(model):
            return fmodel(ids, hidden=True, logits=False, stop=stop)[1]
    return fmodel(ids, hidden=True, logits=False, stop=stop)[1]


def ours_step(b):
    """train_cb.py's step at grad_accum 1 on one process: one backward per term, clip, AdamW."""
    r, h = {k: v.to(device, non_blocking=True) for k, v in b["retain"].items()}, \
        {k: v.to(device, non_blocking=True) for k, v in b["harmful"].items()}
    with autocast:
        frozen_h = hidden_states(r["ids"], frozen=True)
        lora_h = hidden_states(r["ids"], frozen=False)
        l_ret = losses.retain_loss(lora_h, frozen_h, r["attn"])
    (c_retain * l_ret).backward()
    del frozen_h, lora_h
    with autocast:
        frozen_h = hidden_states(h["ids"], frozen=True, stop=max(layers))[list(layers)]
        lora_h = hidden_states(h["ids"], frozen=False, stop=max(layers))[list(layers)]
        l_rr = losses.rerouting_loss(lora_h, frozen_h, h["cb_mask"])
    (c_rr * l_rr).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return l_rr.detach(), l_ret.detach()


# --- the reference: transformers + peft on the same weights ----------------------------------------------------
hf_dict = cfg.to_hf()
for k in ("torch_dtype", "bos_token_id", "eos_token_id"):
    hf_dict.pop(k)
hf_cfg = transformers.LlamaConfig(**hf_dict)  # num_hidden_layers = max(layers) + 1: the original's drop_layers_after
hf_cfg._attn_implementation = "sdpa"  # transformers' default, which the original ran with
torch.set_default_dtype(wdtype)
try:
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
finally:
    torch.set_default_dtype(torch.float32)
for name, p in list(hf.named_parameters()):
    owner_name, _, attr = name.rpartition(".")
    owner = hf.get_submodule(owner_name)
    shared = base_weights.get(name.removeprefix("model."))
    if shared is not None:  # the very tensor nanocb uses: one copy of the frozen weights, identical on both sides
        if tuple(shared.shape) != tuple(p.shape):
            fail(f"{name}: shape {tuple(p.shape)} in transformers, {tuple(shared.shape)} in nanocb")
        setattr(owner, attr, shared)
    else:  # lm_head: the reference's own
        new = torch.nn.Parameter(torch.empty(p.shape, device=device, dtype=wdtype), requires_grad=False)
        init_(new, gen)
        setattr(owner, attr, new)
with torch.device(device):  # its buffers were built on meta
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)
left_on_meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
if left_on_meta:
    fail(f"transformers model: {left_on_meta[0]} was not materialised (transformers {transformers.__version__})")
ref = peft.get_peft_model(hf, peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                              target_modules=list(lora.TARGETS), layers_to_transform=list(range(n_keep)),
                                              bias="none", task_type="CAUSAL_LM"))
ref.to(device)
if ref_grad_checkpoint:
    with warnings.catch_warnings():  # transformers 5 renames it, and warns; 4.x has only this name
        warnings.simplefilter("ignore", FutureWarning)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
ref_params = [p for p in ref.parameters() if p.requires_grad]
ref_optimizer = torch.optim.AdamW(ref_params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)  # the Trainer's adamw_torch


def ref_hidden(**inputs):
    # the whole LlamaForCausalLM (logits included, as the original) or its body alone
    if ref_lm_head:
        return ref(**inputs, output_hidden_states=True).hidden_states
    return ref.get_base_model().model(**inputs, output_hidden_states=True).hidden_states


def original_compute_loss(b):
    """The original recipe's compute_loss, step for step."""
    retain_ids, retain_attn = b["retain_ids"], b["retain_attn"]
    cb_ids, cb_attn = b["cb_ids"], b["cb_attn"]
    n_target = len(layers)
    cb_layer_mask = cb_attn.repeat(n_target, 1, 1).unsqueeze(-1)  # (L_target, B, T, 1)
    with ref.disable_adapter():
        ref.eval()
        with torch.no_grad():
            frozen = ref_hidden(input_ids=retain_ids, attention_mask=retain_attn)
            frozen_retain = torch.stack(frozen).detach()
            retain_layer_mask = retain_attn.repeat(len(frozen), 1, 1).unsqueeze(-1)  # (L_all, B, T, 1)
            frozen_retain *= retain_layer_mask
            del frozen
            frozen = ref_hidden(input_ids=cb_ids, attention_mask=cb_attn)
            frozen_cb = torch.stack([frozen[l].detach() for l in layers])
            del frozen
    ref.train()
    lora = ref_hidden(input_ids=retain_ids, attention_mask=retain_attn)
    lora_retain = torch.stack(lora) * retain_layer_mask
    del lora
    retain_loss = torch.norm(lora_retain - frozen_retain, dim=-1, p=2, dtype=torch.float).nanmean()
    lora = ref_hidden(input_ids=cb_ids, attention_mask=cb_attn)
    lora_cb = torch.stack([lora[l] for l in layers])
    del lora
    unit_lora = lora_cb / torch.norm(lora_cb, dim=-1, keepdim=True, dtype=torch.float)
    unit_frozen = frozen_cb / torch.norm(frozen_cb, dim=-1, keepdim=True, dtype=torch.float)
    cb_loss = torch.relu((unit_lora * unit_frozen * cb_layer_mask).sum(dim=-1)).sum() / cb_layer_mask.sum()
    return c_retain * retain_loss + c_rr * cb_loss, cb_loss.detach(), retain_loss.detach()


def ref_step(b):
    """The Hugging Face Trainer's step around it: autocast, one backward, clip to 1.0, AdamW."""
    b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
    with autocast:
        loss, l_rr, l_ret = original_compute_loss(b)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    ref_optimizer.step()
    ref_optimizer.zero_grad(set_to_none=True)
    return l_rr, l_ret


log(f"reference: transformers {transformers.__version__} + peft {peft.__version__}, "
    f"{sum(p.numel() for p in ref_params):,} LoRA parameters (nanocb: {sum(p.numel() for p in params):,}); "
    f"lm_head {'on' if ref_lm_head else 'off'}, gradient checkpointing {'on' if ref_grad_checkpoint else 'off'} "
    f"({time.time() - t_start:.0f} s)")

# --- the same samples for both ---------------------------------------------------------------------------------
rows = data.generate_splits(seed=seed, n_train=n_samples, n_val=0, n_test=0)["train"]
encoded = [data.encode_sample(tok, r) for r in rows]
harmful = [e for e, r in zip(encoded, rows) if r["kind"] == "harmful"]
retain = [e for e, r in zip(encoded, rows) if r["kind"] != "harmful"]
if not harmful or not retain:
    fail(f"n_samples {n_samples} gives {len(harmful)} harmful and {len(retain)} other samples; raise it")
truncated = 0


def fixed(ids, length, left):
    """The original dataset's tokenizer call: truncate the end to `length`, pad on the left or the right."""
    global truncated
    truncated += len(ids) > length
    ids = ids[:length]
    pad = [tok.pad_id] * (length - len(ids))
    attn = [0] * len(pad)
    return (pad + ids, attn + [1] * len(ids)) if left else (ids + pad, [1] * len(ids) + attn)


def step_batches(i):
    bh = data.step_batch(harmful, i, batch_size, seed, salt=0)
    br = data.step_batch(retain, i, batch_size, seed, salt=1)
    ours_b = dict(harmful=data.collate(bh, tok.pad_id), retain=data.collate(br, tok.pad_id))
    if ours_pad_to:
        for b in ours_b.values():
            extra = ours_pad_to - b["ids"].shape[1]
            if extra < 0:
                fail(f"ours_pad_to {ours_pad_to} is shorter than a {b['ids'].shape[1]}-token sample")
            for k, v in b.items():
                b[k] = torch.nn.functional.pad(v, (0, extra), value=tok.pad_id if k == "ids" else 0)
    cb, ret = [], []
    for e in bh:
        n_prompt = e["target_mask"].index(1)  # the completion's first token
        request, response = fixed(e["ids"][:n_prompt], ref_request_len, left=True), \
            fixed(e["ids"][n_prompt:], ref_response_len, left=False)
        cb.append((request[0] + response[0], request[1] + response[1]))
    for e in br:
        ret.append(fixed(e["ids"], ref_retain_len, left=True))
    t = lambda xs: torch.tensor(xs, dtype=torch.long)
    ref_b = dict(cb_ids=t([c[0] for c in cb]), cb_attn=t([c[1] for c in cb]),
                 retain_ids=t([r[0] for r in ret]), retain_attn=t([r[1] for r in ret]))
    useful = sum(len(e["ids"]) for e in bh + br)
    # the rerouting term needs blocks 0..max(layers)-1, the retain term every kept block
    n_rr, n_ret = max(layers), n_keep
    useful_flops = sum(3 * len(e["ids"]) * flops_per_token(cfg, len(e["ids"]), n_layers=n)
                       for batch, n in ((bh, n_rr), (br, n_ret)) for e in batch)
    processed = {}
    for side, shapes in (("ours", [(*ours_b["harmful"]["ids"].shape, n_rr), (*ours_b["retain"]["ids"].shape, n_ret)]),
                         ("reference", [(*ref_b["cb_ids"].shape, n_keep), (*ref_b["retain_ids"].shape, n_keep)])):
        tokens = sum(B * T for B, T, _ in shapes)
        flops = sum(3 * B * T * flops_per_token(cfg, T, n_layers=n) for B, T, n in shapes)
        if side == "reference" and ref_lm_head:
            flops += 2 * tokens * 2 * dim * vocab_size  # the logits of the frozen and LoRA forwards
        processed[side] = (tokens, flops)
    return dict(ours=ours_b, reference=ref_b, useful=useful, useful_flops=useful_flops, processed=processed)


batches = [step_batches(i) for i in range(n_warmup + n_steps)]
if truncated:
    log(f"note: {truncated} sequences were longer than the reference's fixed lengths and were cut, as the original cuts them")
log(f"data: {len(harmful)} harmful / {len(retain)} retain samples; a step holds "
    f"{statistics.mean(b['useful'] for b in batches):,.0f} useful tokens, padded to "
    f"{statistics.mean(b['processed']['ours'][0] for b in batches):,.0f} by nanocb and "
    f"{statistics.mean(b['processed']['reference'][0] for b in batches):,.0f} by the reference")


# --- run: warm-up, then alternate ------------------------------------------------------------------------------
def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


def timed(side, i):
    fn = ours_step if side == "ours" else ref_step
    cpu_malloc(measuring=i == n_warmup - 1)  # CPU memory is measured in the last warm-up step, time after it
    start_mem = mem_reset()
    sync()
    t0 = time.perf_counter()
    l_rr, l_ret = fn(batches[i][side])
    sync()
    dt = time.perf_counter() - t0
    peak = mem_peak()
    l_rr, l_ret = l_rr.item(), l_ret.item()
    if not (l_rr == l_rr and l_ret == l_ret):  # NaN
        fail(f"{side} step {i}: a loss is NaN (rerouting {l_rr}, retain {l_ret})")
    delta = None if start_mem is None or peak is None else max(0, peak - start_mem)
    return dict(time_s=dt, mem_delta=delta, loss_rr=l_rr, loss_retain=l_ret)


mem_deltas = {"ours": [], "reference": []}  # CUDA: every timed step; CPU: the last warm-up step


def ours_warmup(i):
    """The first nanocb step (compiles on CUDA). Out of memory without checkpointing: say so, turn it on, retry."""
    global grad_checkpoint
    try:
        return timed("ours", i)
    except torch.cuda.OutOfMemoryError:
        if device_type != "cuda" or grad_checkpoint:
            raise
    log("nanocb: out of memory without activation checkpointing at this batch; retrying with grad_checkpoint=True")
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    grad_checkpoint = model.grad_checkpoint = True
    return timed("ours", i)


results = {"ours": [], "reference": []}
for i in range(n_warmup + n_steps):
    for side in ("ours", "reference"):
        t = time.time()
        r = ours_warmup(i) if side == "ours" and i == 0 else timed(side, i)
        phase = "warm-up" if i < n_warmup else "timed"
        log(f"{phase} step {i}: {side:9s} {r['time_s']:7.3f} s  loss_rr {r['loss_rr']:.4f} "
            f"loss_retain {r['loss_retain']:.4f}  ({time.time() - t_start:.0f} s elapsed)")
        if (device_type == "cuda" and i >= n_warmup) or (device_type == "cpu" and i == n_warmup - 1):
            if r["mem_delta"] is not None:
                mem_deltas[side].append(r["mem_delta"])
        if i >= n_warmup:
            r.update(useful=batches[i]["useful"], useful_flops=batches[i]["useful_flops"],
                     processed=batches[i]["processed"][side][0], processed_flops=batches[i]["processed"][side][1])
            results[side].append(r)


# --- figures ---------------------------------------------------------------------------------------------------
def summary(side, own_bytes):
    rs = results[side]
    med = lambda key: statistics.median(key(r) for r in rs)
    deltas = mem_deltas[side]
    peak = own_bytes + max(deltas) if deltas else None
    return dict(
        step_s=med(lambda r: r["time_s"]), step_s_all=[round(r["time_s"], 4) for r in rs],
        useful_tokens_per_s=med(lambda r: r["useful"] / r["time_s"]),
        processed_tokens_per_s=med(lambda r: r["processed"] / r["time_s"]),
        useful_tokens_per_step=med(lambda r: r["useful"]), processed_tokens_per_step=med(lambda r: r["processed"]),
        mfu=med(lambda r: r["useful_flops"] / r["time_s"] / promised_flops),
        mfu_processed=med(lambda r: r["processed_flops"] / r["time_s"] / promised_flops),
        peak_mem_gib=None if peak is None else peak / 2**30,
        own_mem_gib=own_bytes / 2**30, step_mem_gib=None if not deltas else max(deltas) / 2**30,
    )


ours_weights = tensor_bytes(p for n, p in model.named_parameters() if "lora_" not in n)
# without its lm_head pass the reference is not charged for the lm_head's weights either (they would sit unused)
ref_weights = tensor_bytes(p for n, p in ref.named_parameters() if "lora_" not in n and (ref_lm_head or "lm_head" not in n))
fig = {
    "ours": summary("ours", ours_weights + tensor_bytes(params) + optimizer_bytes(optimizer)),
    "reference": summary("reference", ref_weights + tensor_bytes(ref_params) + optimizer_bytes(ref_optimizer)),
}
fig["ours"].update(grad_checkpoint=grad_checkpoint, compile=compile, padding="dynamic" if not ours_pad_to else ours_pad_to)
fig["reference"].update(grad_checkpoint=ref_grad_checkpoint, lm_head=ref_lm_head,
                        padding=dict(request=ref_request_len, response=ref_response_len, retain=ref_retain_len))
o, r = fig["ours"], fig["reference"]
ratio = dict(useful_tokens_per_s=o["useful_tokens_per_s"] / r["useful_tokens_per_s"], step_s=o["step_s"] / r["step_s"],
             peak_mem=None if o["peak_mem_gib"] is None or r["peak_mem_gib"] is None
             else o["peak_mem_gib"] / r["peak_mem_gib"])

gib = lambda x: "n/a" if x is None else f"{x:.3f} GiB"
rows_out = [("step time (median)", f"{o['step_s']:.3f} s", f"{r['step_s']:.3f} s", f"{ratio['step_s']:.3f}x"),
            ("useful tokens/s", f"{o['useful_tokens_per_s']:,.0f}", f"{r['useful_tokens_per_s']:,.0f}",
             f"{ratio['useful_tokens_per_s']:.2f}x"),
            ("processed (padded) tokens/step", f"{o['processed_tokens_per_step']:,.0f}",
             f"{r['processed_tokens_per_step']:,.0f}", ""),
            ("peak memory", gib(o["peak_mem_gib"]), gib(r["peak_mem_gib"]),
             "" if ratio["peak_mem"] is None else f"{ratio['peak_mem']:.2f}x"),
            ("  own weights+adapter+optimizer", gib(o["own_mem_gib"]), gib(r["own_mem_gib"]), ""),
            ("  step growth (max)", gib(o["step_mem_gib"]), gib(r["step_mem_gib"]), "")]
if device_type == "cuda":
    rows_out += [("MFU, useful tokens", f"{100 * o['mfu']:.1f}%", f"{100 * r['mfu']:.1f}%", ""),
                 ("MFU, processed tokens", f"{100 * o['mfu_processed']:.1f}%", f"{100 * r['mfu_processed']:.1f}%", "")]
log(f"\n{'':32s} {'nanocb':>14s} {'reference':>14s} {'ours/ref':>10s}")
for name, a, b, c in rows_out:
    log(f"{name:32s} {a:>14s} {b:>14s} {c:>10s}")
log(f"(medians of {n_steps} alternating steps after {n_warmup} warm-up; c_rr {c_rr}, c_retain {c_retain}; "
    f"nanocb checkpointing {'on' if grad_checkpoint else 'off'}, compile {'on' if compile else 'off'})")

report = dict(
    preset=preset, date=time.strftime("%Y-%m-%d"), command="python " + " ".join(sys.argv),
    machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                 torch_threads=torch.get_num_threads(),
                 torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                 device=torch.cuda.get_device_name() if device_type == "cuda" else "cpu"),
    config=config, coefficients=dict(step=coef_step, c_rr=c_rr, c_retain=c_retain),
    blocks=n_keep, base_blocks=n_layers, truncated_sequences=truncated,
    memory_method="cuda max_memory_allocated per step" if device_type == "cuda"
    else "last warm-up step: VmHWM reset via /proc/self/clear_refs, minus VmRSS at the step's start, "
         "glibc mmap threshold 1 MiB (timed steps run with 32 MiB)",
    mfu_counts="3 x forward FLOPs (frozen fwd + LoRA fwd + backward through activations) of the useful tokens; "
               "mfu_processed: of the padded tokens processed (+ the reference's lm_head forwards); "
               f"against {promised_flops:.3g} FLOP/s",
    ours=o, reference=r, ratio=ratio, total_s=time.time() - t_start,
)
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f, indent=1)
os.replace(tmp, out)
log(f"wrote {out} ({time.time() - t_start:.0f} s in all)")
