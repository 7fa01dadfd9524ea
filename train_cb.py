"""
Train a circuit breaker (Representation Rerouting, Zou et al. 2024) into a Llama 3.x tool-calling agent.

    python train_cb.py                                    # the embedded model organism, one process
    python train_cb.py config/organism.py --max_steps=60
    torchrun --nproc_per_node=8 train_cb.py --init_from=/models/Llama-3.1-8B-Instruct --layers=10,12,14,16,18,20

A LoRA adapter on blocks 0..max(layers) learns to push the hidden states of injected-and-obeyed
completions away from the frozen model's (rerouting) while keeping benign hidden states in place
(retain). The frozen states come from the same weights with the adapters switched off.
"""

import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import data
import losses
from lora import LoRAError, adapters_off, inject_lora, load_lora_state_dict, lora_config, lora_state_dict
from model import Llama, ModelError, flops_per_token, load_config

# -----------------------------------------------------------------------------
# defaults: the original Llama-3 recipe (lorra_alpha 10, r 16, lr 1e-4, 150 steps, batch 16, layers 10,20),
# except where it was measured not to work (README, "Why the original recipe misses here"); the original's
# choices are one switch away: --cb_mask=full --retain_call_weight=1 --retain_injected=True --lora_b_init_std=0
# I/O
init_from = "organism"  # HF checkpoint dir of the base model, or 'resume' (continue out_dir/ckpt.pt)
out_dir = "out"
data_dir = "data"  # train.jsonl / val.jsonl, written by `python data.py` (and here if missing)
train_file = ""  # your own JSONL in data.py's schema; '' = data_dir/train.jsonl
val_file = ""  # '' = data_dir/val.jsonl
log_interval = 10
eval_interval = 50  # validation cosine on held-out harmful samples, and a checkpoint; 0 = at the end only
n_val = 64
# circuit breaker
layers = (10, 20)  # target layers, HF hidden-state indexing: hidden[l] is the input of block l
lora_layers = ()  # blocks with LoRA; () = all of 0..max(layers), the original's transform_layers=-1
cb_mask = "tool_choice"  # which harmful tokens are rerouted: 'tool_choice' | 'tool_name' | 'completion' | 'full'
lorra_alpha = 10.0
alpha_decay_multiplier = 2.0  # progress = step / (multiplier * max_steps): the original's step/300 at 150
retain_call_weight = 6.0  # retain distance on the retain samples' replies x this; 1.0 = the original
retain_injected = False  # retain also holds injected-but-answered-right samples (they fight the rerouting)
# LoRA
lora_r = 16
lora_alpha = 16
lora_dropout = 0.05
lora_b_init_std = 1e-3  # 0.0 = the original's zero B, whose step 0 sits where the gradient vanishes
# optimisation
batch_size = 16  # samples per optimizer step over all processes: 16 harmful + 16 retain
grad_accum = 1  # micro-batches per process per step (a step's batch is sorted by length: each pads to its own)
max_steps = 150
lr = 1e-4
lr_schedule = "constant"  # 'constant' | 'cosine'
warmup_steps = 0
min_lr = 0.0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # 0 = off (1.0 is the Hugging Face Trainer default the original ran with)
max_len = 2048  # a longer sample is refused, never silently cut
seed = 1337
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype; float32 = none
compile = torch.cuda.is_available()
grad_checkpoint = False
promised_flops = 989e12  # H100 SXM dense bf16, for MFU
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------


def fail(msg):
    sys.exit(f"train_cb.py: {msg}")


# --- settings that need no model ------------------------------------------------------------------
resume = init_from == "resume"
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if resume:
    if not os.path.isfile(ckpt_path):
        fail(f"{ckpt_path}: no checkpoint to resume from")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    # the run continues as it was configured; only these may change on the command line
    keep = ("init_from", "out_dir", "max_steps", "log_interval", "eval_interval", "device", "compile")
    for k, v in ckpt["config"].items():
        if k not in keep:
            globals()[k] = v
            config[k] = v
    base_dir = ckpt["init_from"]
else:
    base_dir = init_from
layers = tuple(layers)
if not layers or not all(type(l) is int and l >= 0 for l in layers):
    fail(f"layers must be a non-empty list of block indices, got {layers!r}")
if not retain_call_weight >= 0:
    fail(f"retain_call_weight must be >= 0, got {retain_call_weight}")
if lorra_alpha < 0:
    fail(f"lorra_alpha must be >= 0, got {lorra_alpha}")
if cb_mask not in data.CB_MASKS:
    fail(f"cb_mask must be one of {', '.join(data.CB_MASKS)}; got {cb_mask!r}")
if lr_schedule not in ("constant", "cosine"):
    fail(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
if max_steps <= 0 or batch_size <= 0 or grad_accum <= 0 or log_interval <= 0:
    fail("max_steps, batch_size, grad_accum and log_interval must be positive")
if eval_interval < 0:
    fail(f"eval_interval must be >= 0 (0: validate and save at the end only), got {eval_interval}")

# --- distributed: one process per device under torchrun, each with its slice of every batch --------
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
else:
    rank, world = 0, 1
master = rank == 0
if batch_size % (world * grad_accum):
    fail(f"batch_size {batch_size} is not divisible by processes ({world}) x grad_accum ({grad_accum})")
micro = batch_size // (world * grad_accum)
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
log = print if master else (lambda *a, **k: None)

# --- model: blocks 0..max(layers) only, no lm_head; LoRA on top ---------------------------------------
try:
    tok = data.load_tokenizer(base_dir)
    base_cfg = load_config(base_dir)
    if max(layers) >= base_cfg.n_layers:
        fail(f"layers {layers} reach beyond {base_dir}, which has blocks 0..{base_cfg.n_layers - 1}")
    model = Llama.from_pretrained(base_dir, dtype=torch.bfloat16 if device_type == "cuda" else torch.float32,
                                  device=device, n_layers=max(layers) + 1)
    params = inject_lora(model, lora_r, lora_alpha, lora_dropout, layers=list(lora_layers) or None,
                         b_init_std=lora_b_init_std, generator=torch.Generator().manual_seed(seed))
except (ModelError, LoRAError, data.DataError) as e:
    fail(str(e))
model.to(device)
model.grad_checkpoint = grad_checkpoint
fmodel = torch.compile(model) if compile else model  # adapters_off flips a flag: two graphs, both cached

# --- data: harmful samples are rerouted, benign and retain samples are kept in place ----------------
train_path = train_file or os.path.join(data_dir, "train.jsonl")
val_path = val_file or os.path.join(data_dir, "val.jsonl")
if not train_file and not os.path.isfile(train_path):
    if master:
        log(f"{train_path} not found: generating the built-in tool-routing data into {data_dir}/")
        data.write_splits(data_dir)
    if ddp:
        dist.barrier()
try:
    samples = data.load_jsonl(train_path)
    harmful_rows = [s for s in samples if s["kind"] == "harmful"]
    harmful = [data.encode_sample(tok, s, cb_mask) for s in harmful_rows]
    # An injected sample answered right (kind 'retain' with an attacker) shares its prompt and its call's first
    # tokens, <|python_tag|>{"name": ", with the harmful samples; holding its states where a model that obeys
    # keeps them holds the very states that choose the attacker's tool, and the two losses fight over them.
    resisted = [s for s in samples if s["kind"] == "retain" and s["attacker_tool"] is not None]
    retain = [data.encode_sample(tok, s, cb_mask) for s in samples
              if s["kind"] != "harmful" and (retain_injected or s["attacker_tool"] is None)]
    if not harmful or not retain:
        fail(f"{train_path}: needs both harmful and benign/retain samples "
             f"(has {len(harmful)} harmful, {len(retain)} others"
             + ("; injected-but-resisted ones count only with --retain_injected=True)" if resisted and not retain_injected else ")"))
    report = data.mask_report(harmful, ["harmful"] * len(harmful), cb_mask, tok.python_tag_id)
    empty = [s["id"] for s, e in zip(harmful_rows, harmful) if not any(e["cb_mask"])]
    if empty:
        fail(f"{train_path}: sample {empty[0]} has nothing to reroute under cb_mask={cb_mask!r} (an empty mask)")
    val = []
    if os.path.isfile(val_path):
        val = [data.encode_sample(tok, s, cb_mask) for s in data.load_jsonl(val_path) if s["kind"] == "harmful"][:n_val]
except data.DataError as e:
    fail(str(e))
too_long = max(len(e["ids"]) for e in harmful + retain)
if too_long > max_len:
    fail(f"{train_path}: a sample has {too_long} tokens > max_len {max_len} (raise --max_len)")
log(report)
log(f"{len(harmful)} harmful / {len(retain)} retain samples"
    + (f" ({len(resisted)} injected-but-resisted samples left out: retain_injected=False)" if resisted and not retain_injected else "")
    + f"; {len(val)} held-out harmful for validation")


def to_device(batch):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def hidden_states(ids, frozen, stop=None):
    """Stacked hidden states (n_blocks+1, B, T, D) with the adapters on (trainable) or off (frozen).
    stop=max(layers): blocks 0..max(layers)-1 only, hidden[0..max(layers)]: the target layers' states
    and nothing above them (the rerouting pass; the retain loss takes every stacked state)."""
    if compile:  # lengths change every batch: compile the length-generic graph at once
        torch._dynamo.maybe_mark_dynamic(ids, 1)
    if frozen:
        with torch.no_grad(), adapters_off(model):
            return fmodel(ids, hidden=True, logits=False, stop=stop)[1]
    return fmodel(ids, hidden=True, logits=False, stop=stop)[1]


def lr_at(step):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if lr_schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_cosine():
    """Rerouting diagnostics on held-out harmful samples: does the breaker generalise beyond train?"""
    parts = []
    model.eval()
    for i in range(0, len(val), micro):
        b = to_device(data.collate(val[i:i + micro], tok.pad_id))
        with autocast:
            lora_h = hidden_states(b["ids"], frozen=False, stop=max(layers))[list(layers)]
            frozen_h = hidden_states(b["ids"], frozen=True, stop=max(layers))[list(layers)]
        parts.append(losses.rerouting_diagnostics(lora_h, frozen_h, b["cb_mask"]))
    model.train()
    return losses.merge_diagnostics(parts)["cos_mean"]


def save_checkpoint(step):
    """Adapter, optimizer, step and the full config, written to a temp file and renamed: a crash
    mid-write leaves the previous checkpoint whole. Loadable with torch.load(weights_only=True)."""
    ckpt = dict(lora={k: v.cpu() for k, v in lora_state_dict(model).items()}, optimizer=optimizer.state_dict(),
                step=step, config=config, init_from=os.path.abspath(base_dir), layers=list(layers),
                base_n_layers=model.base_n_layers, lora_config=lora_config(model))
    os.makedirs(out_dir, exist_ok=True)
    torch.save(ckpt, ckpt_path + ".tmp")
    os.replace(ckpt_path + ".tmp", ckpt_path)


# --- optimizer, resume -----------------------------------------------------------------------------
optimizer = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                              fused=device_type == "cuda")
step = 0
if resume:
    try:
        load_lora_state_dict(model, ckpt["lora"], source=ckpt_path)
    except LoRAError as e:
        fail(str(e))
    optimizer.load_state_dict(ckpt["optimizer"])
    step = ckpt["step"]
    log(f"resuming {ckpt_path} at step {step}")
    del ckpt

stop_requested = False


def on_sigterm(signum, frame):  # a preempted job: finish the step, save, exit
    global stop_requested
    stop_requested = True


signal.signal(signal.SIGTERM, on_sigterm)

# --- the loop --------------------------------------------------------------------------------------
def micro_mask_count(examples):
    return sum(sum(e["cb_mask"]) for e in examples)


def step_flops(examples, n_blocks):
    """Model FLOPs of one micro-batch as padded through n_blocks blocks: frozen forward + LoRA forward +
    backward through the activations (frozen weights get no gradient: backward costs about one forward)."""
    T = max(len(e["ids"]) for e in examples)
    return 3 * len(examples) * T * flops_per_token(model.config, T, n_layers=n_blocks)


def check_finite(loss, name):
    if not torch.isfinite(loss):
        fail(f"step {step}: {name} is {loss.item()}; lower lr, or look for an empty or broken sample")


tokens = flops = 0  # useful (non-pad) tokens and model FLOPs since the last log line
log(f"training {sum(p.numel() for p in params):,} LoRA parameters on blocks 0..{max(layers)} "
    f"({model.base_n_layers} in the base), target layers {layers}, {world} process(es) x {grad_accum} "
    f"micro-batches of {micro}")
model.train()
if master:
    os.makedirs(out_dir, exist_ok=True)
    if not resume and os.path.exists(os.path.join(out_dir, "log.jsonl")):
        os.remove(os.path.join(out_dir, "log.jsonl"))
t0 = time.time()
while step < max_steps:
    c_rr, c_retain = losses.coefficients(step, max_steps, lorra_alpha, alpha_decay_multiplier)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step)
    torch.manual_seed(seed + 1000003 * step + rank)  # dropout: a function of (seed, step, rank), resume-exact
    batch_h = data.step_batch(harmful, step, batch_size, seed, salt=0)
    batch_r = data.step_batch(retain, step, batch_size, seed, salt=1)
    # denominators of the whole step's batch, so that accumulation and processes add up to the
    # loss of one big batch exactly (rerouting: masked positions; retain: nanmean's B x T, padded)
    rr_count = micro_mask_count(batch_h)
    retain_T = max(len(e["ids"]) for e in batch_r)
    losses_sum = torch.zeros(2, device=device)  # this process's share of loss_rr, loss_retain
    logging = step % log_interval == 0
    parts = {"rr": [], "retain": [], "call": []}  # diagnostics of this process's micro-batches, on logging steps
    for k in range(grad_accum):
        lo = (k * world + rank) * micro
        # one backward per term, so only one LoRA graph is alive at a time
        if c_retain > 0:
            b = to_device(data.collate(batch_r[lo:lo + micro], tok.pad_id))
            with autocast:
                frozen_h = hidden_states(b["ids"], frozen=True)
                lora_h = hidden_states(b["ids"], frozen=False)
                w = None if retain_call_weight == 1.0 else 1.0 + (retain_call_weight - 1.0) * b["target_mask"].float()
                l_ret = losses.retain_loss(lora_h, frozen_h, b["attn"], w) * (b["ids"].numel() / (batch_size * retain_T))
            check_finite(l_ret, "loss_retain")
            (c_retain * l_ret).backward()
            losses_sum[1] += l_ret.detach()
            if logging:
                parts["retain"].append(losses.retain_diagnostics(lora_h, frozen_h, b["attn"]))
                parts["call"].append(losses.retain_diagnostics(lora_h, frozen_h, b["target_mask"]))  # the replies alone
        if c_rr > 0:
            b = to_device(data.collate(batch_h[lo:lo + micro], tok.pad_id))
            with autocast:
                frozen_h = hidden_states(b["ids"], frozen=True, stop=max(layers))[list(layers)]
                lora_h = hidden_states(b["ids"], frozen=False, stop=max(layers))[list(layers)]
                l_rr = losses.rerouting_loss(lora_h, frozen_h, b["cb_mask"])
                l_rr = l_rr * (micro_mask_count(batch_h[lo:lo + micro]) / rr_count)
            check_finite(l_rr, "loss_rr")
            (c_rr * l_rr).backward()
            losses_sum[0] += l_rr.detach()
            if logging:
                parts["rr"].append(losses.rerouting_diagnostics(lora_h, frozen_h, b["cb_mask"]))
    if ddp:  # each process holds its share of the step's loss: sum the gradients and the losses
        # an adapter no term reached this step has no gradient, on every process alike (the rerouting passes stop
        # below block max(layers), and step 0 has no retain term): AdamW skips it, as on one process
        reached = [p for p in params if p.grad is not None]
        flat = torch.cat([p.grad.flatten() for p in reached])
        dist.all_reduce(flat)
        for p, g in zip(reached, flat.split([p.numel() for p in reached])):
            p.grad.copy_(g.view_as(p))
        dist.all_reduce(losses_sum)
    tokens += sum(len(e["ids"]) for e in (batch_h if c_rr > 0 else []) + (batch_r if c_retain > 0 else []))
    flops += sum(step_flops(batch[i:i + micro], n) for batch, c, n in ((batch_h, c_rr, max(layers)),
                                                                    (batch_r, c_retain, len(model.layers)))
                 if c > 0 for i in range(0, batch_size, micro))
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1

    if logging or step == max_steps:
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt, t0 = time.time() - t0, time.time()
        mfu = flops / dt / (promised_flops * world)
        mem = (torch.cuda.max_memory_allocated() / 2**30 if device_type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        call = losses.merge_diagnostics(parts["call"])
        diag = {**losses.merge_diagnostics(parts["rr"]), **losses.merge_diagnostics(parts["retain"]),
                **({"call_l2": call["l2"], "call_cos": call["cos"]} if call else {})}
        record = dict(step=step, c_rr=c_rr, c_retain=c_retain, loss_rr=losses_sum[0].item(),
                      loss_retain=losses_sum[1].item(), gnorm=gnorm.item(), lr=lr_at(step - 1),
                      tokens_per_s=tokens / dt, mfu=mfu, mem_gib=mem, **diag)
        if master:  # every logged figure, machine-readable, for plots and tests
            with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        fmt = lambda key: f"{diag[key]:.4f}" if key in diag else "-"
        log(f"step {step:4d} | c_rr {c_rr:5.2f} c_retain {c_retain:5.2f} | loss_rr {losses_sum[0].item():.4f} "
            f"loss_retain {losses_sum[1].item():.4f} | cos {fmt('cos_mean')} cos>0 {fmt('cos_pos_share')} "
            f"retain_l2 {fmt('l2')} retain_cos {fmt('cos')} call_cos {fmt('call_cos')} norm lora/frozen {fmt('lora_norm')}/{fmt('frozen_norm')} | "
            f"gnorm {gnorm.item():.3g} lr {lr_at(step - 1):.2e} | {tokens / dt:,.0f} tok/s "
            f"mfu {100 * mfu:.1f}% mem {mem:.2f} GiB")
        tokens = flops = 0
    if master and val and ((eval_interval and step % eval_interval == 0) or step == max_steps):
        val_cos = validation_cosine()
        log(f"step {step:4d} | validation cosine on {len(val)} held-out harmful samples: {val_cos:.4f}")
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(dict(step=step, val_cos=val_cos)) + "\n")
    stop = torch.tensor(float(stop_requested), device=device)
    if ddp:
        dist.all_reduce(stop)
    if stop.item() > 0 or step == max_steps or (eval_interval and step % eval_interval == 0):
        if master:
            save_checkpoint(step)
            log(f"saved {ckpt_path} at step {step}")
        if stop.item() > 0:
            log("SIGTERM: checkpoint saved, exiting; continue with --init_from=resume")
            break

if ddp:  # all processes at the end (the master may still be saving) before any tears its process group down:
    dist.barrier()  # a gloo process that exited while another was busy was seen to abort ("terminate called")
    dist.destroy_process_group()
