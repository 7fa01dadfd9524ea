"""
Time nanocb's circuit-breaker training step against the original recipe, same work, one run.

    python bench.py                           # CPU: organism-scale shapes, fp32
    python bench.py --preset=8b               # one H100: Llama-3.1-8B shapes (random weights), bf16, torch.compile
    python bench.py --preset=8b --profile     # and where the time goes, by part of the step

nanocb's side is step.train_step, which train_cb.py runs, with train_cb.py's defaults and choice of samples; the
reference is the original recipe in tests/original.py (transformers + peft). Same samples, same frozen weights (one
copy in memory), both loss terms on; after warm-up the two alternate, so a noisy machine slows both alike
(--alternate=False: each side's steps in a row; the log says when torch.compile compiled inside a step). Figures
are medians. Useful tokens: the samples' own, no padding. MFU: 3 forward passes' FLOPs per useful token (frozen and
LoRA forward, backward through the activations) through the blocks each term needs. Peak memory: own weights,
adapter and optimizer state plus the step's peak growth. First compile: the warm-up beyond as many timed steps.
"""

import ast
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch._dynamo.utils import counters

import data
from lora import inject_lora
from model import Llama, LlamaConfig, compile_blocks as compile_each_block, flops_per_token, rope_frequencies
from step import GPU_PAD_MULTIPLE, StepError, coefficients, train_step
from util import atomic_write, fail

# -----------------------------------------------------------------------------
preset = "8b" if torch.cuda.is_available() else "cpu"
out = "bench.json"
device = "cuda" if torch.cuda.is_available() else "cpu"
reference = True  # time the original recipe too; False: nanocb alone (to compare its own settings)
profile = False  # after the timing, profile 3 nanocb steps and print where the time goes
# nanocb's side (the reference runs eagerly, as the original)
compile = None  # torch.compile; None = the preset's
compile_blocks = True  # compile each block (one graph serves all), as train_cb.py does; False: the whole model
compile_mode = ""  # torch.compile's mode, e.g. 'max-autotune-no-cudagraphs'; '' = its default
grad_checkpoint = False
grad_accum = 1  # micro-batches per step, each padded to its own longest (a step's batch is sorted by length)
lora_dropout = None  # None = train_cb.py's (the original's 0.05); 0.0 shows what the LoRA path's dropout costs
pad_multiple = None  # each micro-batch padded to a multiple of this; None = train_cb.py's (32 on CUDA, 1 on the CPU)
unpad = False  # compute the real tokens alone in the matmuls (train_cb.py's unpad)
warm_lengths = False  # warm up on the timed steps' own batches: every shape seen once before it is timed
alternate = True  # after warm-up the sides alternate step by step; False: each side's steps in a row, side by side
# shapes, random weights (None = the preset's); n_layers is the base's depth, blocks 0..max(layers) are built
dtype = None  # 'float32' | 'bfloat16' (weights, and autocast)
vocab_size = None
dim = None
n_layers = None
n_heads = None
n_kv_heads = None
hidden_dim = None
layers = None  # target layers, HF hidden-state indexing
batch_size = None  # rerouting samples per step, and as many retain samples
n_warmup = None  # steps per side before timing (the compile happens here)
n_steps = None  # timed steps per side
n_samples = 800  # tool-data rows generated, about 40% harmful; steps draw their batches as train_cb.py does
coef_step = 75  # the step timed, counted from 1 as the original: c_rr 7.5 and c_retain 2.5 at alpha 10
ref_request_len = 512  # the reference's fixed padding
ref_response_len = 512
ref_retain_len = 1024
ref_lm_head = None  # None = the preset's; False skips the logits the original computes on every pass
seed = 1337
promised_flops = 989e12  # H100 SXM dense bf16
if __name__ == "__main__":  # imported (tests), the settings keep their defaults
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------

PRESETS = {
    # the organism's width, 6 blocks, fp32; without the logits (4 passes of 16 x 1024 tokens through a 128,256-way
    # lm_head would cost the reference 8 GiB a step here: leaving them out only flatters the reference)
    "cpu": dict(dtype="float32", compile=False, vocab_size=128256, dim=128, n_layers=6, n_heads=4, n_kv_heads=2,
                hidden_dim=384, layers=(2, 4), batch_size=16, n_warmup=1, n_steps=3, ref_lm_head=False),
    # Llama-3.1-8B, blocks 0..20 of 32
    "8b": dict(dtype="bfloat16", compile=True, vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
               hidden_dim=14336, layers=(10, 20), batch_size=16, n_warmup=4, n_steps=8, ref_lm_head=True),
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("matmuls", "LoRA path", "attention", "norms", "RoPE", "casts", "optimizer", "other", "idle")


def train_cb_recipe():
    """The settings train_cb.py's settings block assigns literal values to (its defaults), read from its source."""
    src = open(os.path.join(HERE, "train_cb.py")).read()
    marks = [i + 1 for i, line in enumerate(src.splitlines()) if re.fullmatch(r"# -{3,}\s*", line)][:2]
    recipe = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and marks[0] < node.lineno < marks[1] and isinstance(node.targets[0], ast.Name):
            try:
                recipe[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # computed at run time (device, dtype, compile): not the recipe
                pass
    return recipe


def category(op, kernel, shapes, lora_r):
    """The part of the step a kernel (launched by operator `op`) or, on the CPU, an operator belongs to. A compiled
    kernel is named after the operators it fuses (triton_poi_fused_<ops>_<n>); an eager one is told by its operator,
    a library kernel also by its own name. A matmul with the LoRA rank among its inputs' dimensions is the LoRA
    path's, and so is dropout, which only the LoRA path has."""
    k = kernel.lower()
    words = set(re.split(r"[^a-z0-9]+", (k if k.startswith("triton") else op.lower())))
    if words & {"adam", "adamw", "foreach", "optimizer"} or "multi_tensor" in k:
        return "optimizer"
    if words & {"flash", "attention", "fmha", "sdpa"} or "flash" in k or "fmha" in k:
        return "attention"
    if words & {"mm", "addmm", "bmm", "matmul", "linear"} or any(s in k for s in ("gemm", "nvjet", "cutlass")):
        return "LoRA path" if any(lora_r in s for s in shapes if len(s) == 2) else "matmuls"
    if words & {"dropout", "bernoulli"}:
        return "LoRA path"
    if words & {"rsqrt", "rms"}:
        return "norms"
    if words & {"cos", "sin"} or {"neg", "cat"} <= words:
        return "RoPE"
    plain = {"", "aten", "triton", "poi", "fused", "to", "copy", "clone"} | set(map(str, range(100)))
    return "casts" if "memcpy" not in k and words & {"to", "copy"} and words <= plain else "other"


def breakdown(events, wall_s, steps, lora_r):
    """Seconds per step by part of the step, and the 12 costliest kernels (CPU: operators), from the profiler's
    events of `steps` steps that took wall_s. 'idle': wall time with nothing running on the device (Python,
    launches, synchronisation, the profiler's own overhead)."""
    parts, top = dict.fromkeys(PARTS, 0.0), {}
    timed = [(e.name, k.name, e.input_shapes or [], k.duration) for e in events for k in e.kernels]  # CUDA
    if not timed:  # CPU: each operator's own time, its children's excluded
        timed = [(e.name, "", e.input_shapes or [], e.self_cpu_time_total) for e in events if e.self_cpu_time_total]
    for op, kernel, shapes, us in timed:
        part = category(op, kernel, shapes, lora_r)
        parts[part] += us / 1e6 / steps
        top[(kernel or op)[:90], part] = top.get(((kernel or op)[:90], part), 0.0) + us / 1e6 / steps
    parts["idle"] = max(0.0, wall_s / steps - sum(parts.values()))
    return parts, sorted(top.items(), key=lambda kv: -kv[1])[:12]


def mem_start(cuda, measuring):
    """Start a step -> the bytes in use now (None where unreadable). On the CPU the resident set's high-water mark
    is reset (/proc/self/clear_refs), and glibc hands blocks over 1 MiB straight back while measuring, so that the
    mark follows live tensors; it keeps its usual threshold while timing, so no side pays page faults it would not."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    gc.collect()
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: glibc's, on a glibc system
        libc.mallopt(-3, (1 if measuring else 32) << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (2 if measuring else 64) << 20)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return proc_bytes("VmRSS")
    except (AttributeError, OSError, StopIteration):  # no glibc, no /proc
        return None


def proc_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


def main():
    g = globals()
    if preset not in PRESETS:
        fail(f"unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    for k, v in PRESETS[preset].items():
        if g[k] is None:
            g[k] = config[k] = v
    n_keep = max(layers) + 1
    if min(layers) < 0 or n_keep > n_layers or dtype not in ("float32", "bfloat16"):
        fail(f"need layers in 0..n_layers-1 ({n_layers}) and dtype float32 or bfloat16; got {layers}, {dtype!r}")
    if min(batch_size, n_steps, n_warmup, n_samples, 1 if pad_multiple is None else pad_multiple) <= 0 \
            or batch_size % grad_accum:
        fail("batch_size, n_steps, n_warmup, n_samples and pad_multiple must be positive (memory is measured in the "
             "last warm-up step), and batch_size divisible by grad_accum")
    recipe = dict(train_cb_recipe(), layers=tuple(layers), batch_size=batch_size, grad_accum=grad_accum)
    cuda = device.startswith("cuda")
    recipe["pad_multiple"] = GPU_PAD_MULTIPLE if cuda else 1  # train_cb.py's rule
    for k in ("lora_dropout", "pad_multiple", "unpad"):
        if g[k] is not None:
            recipe[k] = g[k]
    c_rr, c_retain = coefficients(coef_step - 1, recipe)
    if not (c_rr > 0 and c_retain > 0):
        fail(f"coef_step {coef_step} leaves a loss term at zero (c_rr {c_rr}, c_retain {c_retain})")
    tok = data.load_tokenizer()
    if vocab_size < tok.n_vocab:
        fail(f"vocab_size {vocab_size} is smaller than the Llama 3 tokenizer's {tok.n_vocab} tokens the samples use")
    if reference:
        try:
            sys.path.insert(0, os.path.join(HERE, "tests"))
            import original  # the original recipe on transformers + peft
        except ImportError as e:
            fail(f"{e.name} is missing: the reference needs transformers and peft (pip install -r "
                 "requirements-dev.txt); --reference=False times nanocb alone")
    if cuda:  # two implementations alternate in one process: growable segments keep the allocator from fragmenting
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    wdtype = getattr(torch, dtype)
    autocast = nullcontext() if wdtype == torch.float32 else torch.autocast("cuda" if cuda else "cpu", dtype=wdtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    log = lambda *a: print(*a, flush=True)
    t_start = time.time()
    how = (" per block" if compile_blocks else "") + (f" ({compile_mode})" if compile_mode else "") if compile else ""
    log(f"bench: preset {preset}, {device} ({torch.get_num_threads()} threads), {dtype}, compile {compile}{how}; "
        f"blocks 0..{max(layers)} of {n_layers}, dim {dim}, target layers {tuple(layers)}; batch {batch_size} "
        f"rerouting + {batch_size} retain in {grad_accum} micro-batch(es); c_rr {c_rr} c_retain {c_retain}")

    # --- the frozen base, built on the device in its dtype (an 8B model never passes through the CPU) ----------
    gen = torch.Generator(device=device).manual_seed(seed)
    init = lambda p: p.normal_(0.0, 0.02, generator=gen) if p.dim() >= 2 else p.fill_(1.0)  # norms: 1
    cfg = LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=n_keep, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      hidden_dim=hidden_dim, rope_scaling=dict(LLAMA3_ROPE))
    with torch.device("meta"):
        model = Llama(cfg)
    model.lm_head = None  # training never computes the logits
    model = model.to(wdtype).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            init(p)
    model.inv_freq, model.base_n_layers = rope_frequencies(cfg).to(device), n_layers  # meta's holds no data
    params = inject_lora(model, recipe["lora_r"], recipe["lora_alpha"], recipe["lora_dropout"],
                         b_init_std=recipe["lora_b_init_std"], generator=torch.Generator().manual_seed(seed))
    model.to(device).train()
    model.grad_checkpoint = grad_checkpoint
    mode = dict(mode=compile_mode) if compile_mode else {}
    fmodel = (compile_each_block(model, **mode) if compile_blocks else torch.compile(model, **mode)) if compile \
        else model
    optimizer = torch.optim.AdamW(params, lr=recipe["lr"], betas=(recipe["beta1"], recipe["beta2"]),
                                  weight_decay=recipe["weight_decay"], fused=cuda)

    # --- the same samples for both, drawn as train_cb.py draws them ---------------------------------------------
    rows = data.generate_splits(seed=seed, n_train=n_samples, n_val=0, n_test=0)["train"]
    harmful = [data.encode_sample(tok, r, recipe["cb_mask"]) for r in rows if r["kind"] == "harmful"]
    retain = [data.encode_sample(tok, r, recipe["cb_mask"]) for r in rows if r["kind"] != "harmful"
              and (recipe["retain_injected"] or r["attacker_tool"] is None)]
    if not harmful or not retain:
        fail(f"n_samples {n_samples} gives {len(harmful)} harmful and {len(retain)} retain samples; raise it")
    batches = [dict(harmful=data.step_batch(harmful, i, batch_size, seed, salt=0),
                    retain=data.step_batch(retain, i, batch_size, seed, salt=1)) for i in range(n_warmup + n_steps)]
    if warm_lengths:  # the timed steps twice: the first time round is the warm-up
        batches = batches[n_warmup:] * 2
        g["n_warmup"] = n_steps
    mult = recipe.get("pad_multiple", 1)
    # (tokens through the matmuls, the length attention sees, blocks): 3 passes' FLOPs
    flops = lambda tokens, T, blocks: 3 * tokens * flops_per_token(cfg, T, n_layers=blocks)
    up = lambda n: -(-n // mult) * mult  # rounded up to the pad multiple
    micro, work = batch_size // grad_accum, []  # work: per step, useful and each side's processed tokens and FLOPs
    for b in batches:
        terms = ((b["harmful"], max(layers)), (b["retain"], n_keep))  # rerouting stops below block max(layers)
        mbs = [(mb, n) for batch, n in terms for mb in (batch[i:i + micro] for i in range(0, batch_size, micro))]
        # padded: every row at the micro-batch's longest; unpadded: its real tokens (and pads to the multiple)
        longest = [up(max(len(e["ids"]) for e in mb)) for mb, _ in mbs]
        ours = [(up(sum(len(e["ids"]) for e in mb)) if recipe["unpad"] else len(mb) * T, T, n)
                for (mb, n), T in zip(mbs, longest)]
        ref = [(batch_size * T, T, n_keep) for T in (ref_request_len + ref_response_len, ref_retain_len)]
        head = 2 * 2 * sum(t for t, _, _ in ref) * dim * vocab_size if ref_lm_head else 0  # 2 forwards' logits
        work.append(dict(useful=sum(len(e["ids"]) for batch, _ in terms for e in batch),
                         useful_flops=sum(flops(len(e["ids"]), len(e["ids"]), n) for batch, n in terms for e in batch),
                         nanocb=(sum(t for t, _, _ in ours), sum(flops(*s) for s in ours)),
                         reference=(sum(t for t, _, _ in ref), sum(flops(*s) for s in ref) + head)))

    def nanocb(i):
        try:  # dynamic as train_cb.py: one length-generic graph for the whole model
            rec = train_step(model, fmodel, optimizer, params, batches[i], coef_step - 1, recipe, tok.pad_id,
                             device, autocast, dynamic=compile and not compile_blocks)
        except StepError as e:
            fail(str(e))
        return rec["loss_rr"], rec["loss_retain"]

    sides = dict(nanocb=nanocb)
    if reference:
        ref_model, ref_params, ref_opt = original.setup(model, recipe["lora_r"], recipe["lora_alpha"],
                                                        recipe["lora_dropout"], recipe["lr"],
                                                        (recipe["beta1"], recipe["beta2"]), init)
        ref_inputs = [original.inputs(b["harmful"], b["retain"], tok.pad_id, ref_request_len, ref_response_len,
                                      ref_retain_len) for b in batches]
        sides["reference"] = lambda i: [l.item() for l in original.trainer_step(
            ref_model, ref_opt, ref_params, {k: v.to(device) for k, v in ref_inputs[i][0].items()}, layers,
            recipe["lorra_alpha"], coef_step, autocast, ref_lm_head)]
        log(f"reference: {sum(p.numel() for p in ref_params):,} LoRA parameters (nanocb: "
            f"{sum(p.numel() for p in params):,}); lm_head {'on' if ref_lm_head else 'off'}, gradient "
            f"checkpointing; {sum(c for _, c in ref_inputs)} sequences cut to its fixed lengths, as the original")
    log(f"data: {len(harmful)} harmful / {len(retain)} retain samples; a step holds "
        f"{statistics.mean(w['useful'] for w in work):,.0f} useful tokens, padded to "
        + " and ".join(f"{statistics.mean(w[s][0] for w in work):,.0f} by {s}" for s in sides))

    # --- warm-up, then alternate (or not) ----------------------------------------------------------------------
    runs = {s: [] for s in sides}
    order = [(i, side) for i in range(n_warmup + n_steps) for side in sides] if alternate else \
        [(i, side) for side in sides for i in range(n_warmup + n_steps)]
    for i, side in order:
        run = sides[side]
        measuring = i >= n_warmup if cuda else i == n_warmup - 1
        start = mem_start(cuda, measuring)
        allocs = torch.cuda.memory_stats() if cuda else {}  # the caching allocator's cudaMallocs, its retries
        frames = counters["frames"]["ok"]  # graphs torch.compile has made: a compile inside a timed step shows
        sync()
        t0 = time.perf_counter()
        l_rr, l_ret = run(i)
        sync()
        dt = time.perf_counter() - t0
        allocs = {k: torch.cuda.memory_stats().get(k, 0) - allocs.get(k, 0) for k in allocs
                  if k in ("num_device_alloc", "num_alloc_retries")}
        peak = (torch.cuda.max_memory_allocated() if cuda else proc_bytes("VmHWM")) \
            if measuring and start is not None else None
        if not (math.isfinite(l_rr) and math.isfinite(l_ret)):
            fail(f"{side} step {i}: a loss is not finite (rerouting {l_rr}, retain {l_ret})")
        allocs["compiles"] = counters["frames"]["ok"] - frames
        runs[side].append(dict(s=dt, growth=None if peak is None else max(0, peak - start), **allocs))
        log(f"{'warm-up' if i < n_warmup else 'timed'} step {i}: {side:9s} {dt:8.3f} s  loss_rr {l_rr:.4f} "
            f"loss_retain {l_ret:.4f}  ({time.time() - t_start:.0f} s)"
            + "".join(f" {k} {v}" for k, v in allocs.items()))

    # --- figures: own memory is weights, adapter and optimizer state (without its logits the reference is not
    # charged for the lm_head's weights either) -------------------------------------------------------------------
    state = lambda opt: [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    own = dict(nanocb=nbytes(list(model.parameters()) + state(optimizer)))
    if reference:
        own["reference"] = nbytes([p for n, p in ref_model.named_parameters() if ref_lm_head or "lm_head" not in n]
                                  + state(ref_opt))
    fig = {}
    for side, rs in runs.items():
        med = lambda f: statistics.median(f(r, w) for r, w in zip(rs[n_warmup:], work[n_warmup:]))
        growth = [r["growth"] for r in rs if r["growth"] is not None]
        fig[side] = f = dict(step_s=med(lambda r, w: r["s"]), steps_s=[round(r["s"], 4) for r in rs],
                             steps_device_allocs=[r.get("num_device_alloc") for r in rs],
                             steps_compiles=[r["compiles"] for r in rs],
                             useful_tokens_per_s=med(lambda r, w: w["useful"] / r["s"]),
                             useful_tokens_per_step=med(lambda r, w: w["useful"]),
                             processed_tokens_per_step=med(lambda r, w: w[side][0]),
                             mfu=med(lambda r, w: w["useful_flops"] / r["s"] / promised_flops),
                             mfu_processed=med(lambda r, w: w[side][1] / r["s"] / promised_flops),
                             peak_mem_gib=(own[side] + max(growth)) / 2**30 if growth else None,
                             own_mem_gib=own[side] / 2**30)
        if compile and side == "nanocb":  # the reference runs eagerly
            f["first_compile_s"] = sum(r["s"] for r in rs[:n_warmup]) - n_warmup * f["step_s"]
    ratio = {k: fig["nanocb"][k] / fig["reference"][k] if reference and fig["nanocb"][k] and fig["reference"][k]
             else None for k in ("step_s", "useful_tokens_per_s", "peak_mem_gib")}
    table = [("step time (median)", "step_s", "{:.3f} s"), ("useful tokens/s", "useful_tokens_per_s", "{:,.0f}"),
             ("processed (padded) tokens/step", "processed_tokens_per_step", "{:,.0f}")] + [
        ("MFU, useful tokens", "mfu", "{:.1%}"), ("MFU, processed tokens", "mfu_processed", "{:.1%}")] * cuda + [
        ("peak memory", "peak_mem_gib", "{:.3f} GiB"), ("  own weights+adapter+optimizer", "own_mem_gib", "{:.3f} GiB"),
        ("first compile (warm-up - steps)", "first_compile_s", "{:.1f} s")]  # MFU against an H100: not on a CPU
    log(f"\n{'':32s}" + "".join(f"{s:>14s}" for s in fig) + ("    nanocb/ref" if reference else ""))
    for name, key, form in table:
        cells = "".join(f"{'n/a' if fig[s].get(key) is None else form.format(fig[s][key]):>14s}" for s in fig)
        log(f"{name:32s}{cells}" + (f"{ratio[key]:13.2f}x" if ratio.get(key) is not None else ""))
    log(f"(medians of {n_steps} {'alternating ' if reference and alternate else ''}steps after {n_warmup} warm-up)")
    report = dict(preset=preset, date=time.strftime("%Y-%m-%d"), command="python " + " ".join(sys.argv),
                  machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                               torch_threads=torch.get_num_threads(),
                               device=torch.cuda.get_device_name() if cuda else "cpu"),
                  config=config, recipe=recipe, coefficients=dict(step=coef_step, c_rr=c_rr, c_retain=c_retain),
                  blocks=n_keep, base_blocks=n_layers, **fig, ratio=ratio, total_s=time.time() - t_start)
    atomic_write(out, json.dumps(report, indent=1))
    log(f"wrote {out} ({time.time() - t_start:.0f} s in all)")

    if profile:  # after the figures are safe on disk; lengths already compiled for
        from torch.profiler import ProfilerActivity, profile as torch_profile
        pick = [n_warmup + k % n_steps for k in range(3)]
        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                           record_shapes=True) as prof:
            sync()
            t0 = time.perf_counter()
            for i in pick:
                nanocb(i)
            sync()
            wall = time.perf_counter() - t0
        parts, top = breakdown(prof.events(), wall, len(pick), recipe["lora_r"])
        again = []  # the same steps once more without the profiler, in a row, after everything else
        for i in pick:
            sync()
            t0 = time.perf_counter()
            nanocb(i)
            sync()
            again.append(time.perf_counter() - t0)
        log(f"\nprofile: {len(pick)} nanocb steps (timed steps {pick}), {wall / len(pick):.3f} s a step under the "
            f"profiler, {statistics.mean(again):.3f} s without it just after ({', '.join(f'{t:.3f}' for t in again)});"
            f" {'device kernel' if cuda else 'operator'} time by part of the step:")
        for part, s in parts.items():
            log(f"  {part:12s} {s:9.4f} s {s / (wall / len(pick)):7.1%}")
        log("costliest " + ("kernels:" if cuda else "operators:"))
        for (name, part), s in top:
            log(f"  {s:9.4f} s  {part:10s} {name}")
        report["profile"] = dict(steps=pick, step_s=wall / len(pick), again_s=again, parts=parts,
                                 top=[dict(name=n, part=p, s=s) for (n, p), s in top])
        atomic_write(out, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
