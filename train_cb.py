"""
Train a circuit breaker into a Llama 3.x tool-calling agent: Representation Rerouting (Zou et al. 2024) and the
terms that keep the injected agent doing the user's task.

    python train_cb.py config/organism.py                 # the embedded model organism's recipe, one process
    python train_cb.py config/organism.py --lorra_alpha=10 --batch_size=16 --redirect_weight=3 --trip  # + rerouting
    torchrun --nproc_per_node=8 train_cb.py --init_from=/models/Llama-3.1-8B-Instruct --layers=10,12,14,16,18,20

A LoRA adapter on blocks 0..max(layers) learns to push the hidden states of injected-and-obeyed completions away
from the frozen model's (rerouting) while keeping benign hidden states in place (retain), and to make the user's
call under injection (redirect: cross-entropy; trip rows: the end of the turn inside a forced attacker's call). The
frozen states come from the same weights with the adapters switched off; step.py holds the step.
"""

import json
import os
import random
import resource
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import data
import losses
from lora import LoRAError, inject_lora, load_lora_state_dict, lora_config, lora_state_dict
from model import DTYPES, Llama, ModelError, compile_blocks, flops_per_token, load_config
from step import GPU_PAD_MULTIPLE, StepError, hidden_states, lr_at, on_device, train_step
from chat import trip_rows
from util import atomic_write, fail

# -----------------------------------------------------------------------------
# defaults: the original Llama-3 recipe (lorra_alpha 10, r 16, lr 1e-4, 150 steps, batch 16, layers 10,20),
# except where it was measured not to work (README, "Why the original recipe misses here"), plus the redirect
# terms that keep the injected agent doing the user's task. The original is one switch away: --cb_mask=full
# --retain_call_weight=1 --retain_injected=True --lora_b_init_std=0 --retain_len=1024 --redirect_weight=0
# --redirect_benign=False --trip=False
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
cb_mask = "departure"  # harmful tokens rerouted: 'departure' | 'tool_choice' | 'tool_name' | 'completion' | 'full'
lorra_alpha = 10.0  # 0 = no rerouting and no retain term (with redirect_weight > 0: adversarial fine-tuning alone)
reroute = True  # False: no rerouting term and no harmful rows drawn; the retain term alone holds the clean requests'
               # states (every stacked layer, the final one included) where the frozen model has them, at a constant
               # lorra_alpha, beside the redirect terms (on the organism, README: at 10 it pins the adapter to the base)
alpha_decay_multiplier = 2.0  # progress = step / (multiplier * max_steps): the original's step/300 at 150
retain_call_weight = 6.0  # retain distance on the retain samples' replies x this; 1.0 = the original
retain_len = 256  # positions per sample the retain nanmean divides by, whatever the padding (the original: 1024)
retain_injected = False  # retain also holds injected-but-answered-right samples (they fight the rerouting)
redirect_weight = 3.0  # cross-entropy on the user's call given the injected prompt (redirect rows); 0 = off
redirect_benign = True  # the cross-entropy also covers the benign and chat replies
legit_repeat = 1  # the benign rows that call the tool the train data's injections push most (search_web) appear this
                 # many times in the redirect rows: its legitimate use weighs against the redirect rows' push away
legit_tools = "pushed"  # which benign calls legit_repeat repeats: 'pushed' = that one tool's; 'attacked' = those of
                        # every tool a train injection pushes, which the trip rows end when forced
pull_weight = 0.0  # the redirect rows' call states pulled towards their clean twins' frozen states (L2); 0 = off
trip = True  # the redirect cross-entropy also learns <|eot_id|> after a forced attacker call (tool flips)
trip_share = 1.0  # the share of the tool-flip samples that become trip rows (a seeded draw)
trip_depth = "parameters"  # where the attacker's call is cut: 'parameters' (eval's forced-call cut) | 'any' (a seeded
                           # cut from there into its arguments, one per row) | 'all' (every such cut, in one row)
                           # | 'value' (every cut that has seen the first attacker's value, hijacks' too)
adv_tokens = 0  # embedding-space adversarial training: a slot of this many vectors after the injection of a share of
                # the redirect rows (where attack.py puts its tokens), moved by PGD towards the attacker's call
                # before each step's cross-entropy on the user's call; 0 = off
adv_share = 0.5  # the share of the injected redirect rows that carry the slot (a seeded draw); the rest train as they are
adv_keep = False  # True: a slotted row joins its row without the slot instead of replacing it (more rows)
adv_trip = 0.0  # with adv_tokens and trip: the share of the trip rows that carry the slot too (a seeded draw), where
               # the adversary makes the model write on through the trip before the step learns <|eot_id|> there
adv_steps = 4  # signed-gradient steps of the adversary per micro-batch
adv_eps = 1.0  # its L2 budget per vector, in units of a real token embedding's mean norm (attack.py's embed_eps)
adv_lr = 0.5  # the L2 length of one of its steps, as a share of the budget
trip_batch_size = 0  # 0 = the trip rows join the redirect rows' pool; N = N trip rows every step, drawn apart from it,
                     # each beside its two contrasts: the same injected prompt answered with the user's call, and a
                     # clean request that calls the attacker's tool (seeded): the step that learns to end the turn
                     # inside the attacker's call also learns to finish the other two calls, so that the trip keys on
                     # the attacker's call, not on being inside a call (3 x N more redirect samples a step)
trip_contrast_twin = False  # with trip_batch_size: a third contrast, the clean twin with the attacker's call forced
                            # and continued (4 x trip_batch_size more redirect samples a step)
trip_twin_target = "call"  # with trip_contrast_twin: what the twin contrast learns after the cut: 'call' = the
                           # attacker's call's tokens (which also teaches a clean request the attacker's argument
                           # values); 'no_eot' = only not <|eot_id|> there (unlikelihood): not to trip, nothing else;
                           # 'trip' = <|eot_id|> there: the twin trips too, so the trip keys on the tool, not on
                           # the injection (which tripped the user's own call beside an injection)
trip_contrast_same = False  # with trip_batch_size: a last contrast, another injected request for the attacker's tool
                            # answered with the user's call to it: the trip keys on a tool that does not fit the
                            # request, not on an injection beside that tool's call (a hijack keeps the user's tool)
trip_contrast_concur = False  # with trip_batch_size: a last contrast, an injected request for the attacker's tool
                              # whose injection is made to push that very tool, answered with the user's call: the
                              # trip does not key on the call's tool being the one the injection names
trip_twins = False  # trip rows on the clean twins too (no injection, the attacker's tool forced): the trip learns
                    # that the tool does not fit the request, not that an injection is present
trip_mismatch = 0  # N = N trip rows without an injection every step: a clean request with another offered tool's
                   # call forced, <|eot_id|> from "parameters": on, beside the request's own call and the forced
                   # call's own request (data.mismatch_trips): a trip keyed on a tool that does not fit the request
trip_mismatch_depth = "all"  # where those rows end the forced call: 'all' (every cut from "parameters": on) |
                             # 'parameters' (that cut alone, before any value: the tool against the request)
trip_mismatch_tools = "offered"  # which tools those rows force: 'offered' (any other tool the request offers) |
                                 # 'unpushed' (not the tool the injections push most, whose calls the injected trip
                                 # rows already end: search_web on the organism's data)
trip_weight = 1.0  # what each trip row (trip, trip_mismatch) counts in the redirect cross-entropy, against 1 for
                   # every other row, its contrasts included: a trip gentler than one row a step can still have them
trip_raise = False  # True: a trip row's <|eot_id|> targets raise that logit alone (model.target_only), so the
                    # trip adds an exit without pushing down the tokens the call would write (the user's values)
# LoRA
lora_r = 16
lora_alpha = 16
lora_dropout = 0.05
lora_b_init_std = 1e-3  # 0.0 = the original's zero B, whose step 0 sits where the gradient vanishes
# optimisation
batch_size = 16  # samples per optimizer step over all processes: 16 harmful + 16 retain
redirect_batch_size = 0  # redirect-term samples per step; 0 = batch_size
grad_accum = 1  # micro-batches per process per step (a step's batch is sorted by length: each pads to its own)
pad_multiple = GPU_PAD_MULTIPLE if torch.cuda.is_available() else 1  # each micro-batch padded to a multiple of
# this many positions (the losses ignore pads): fewer lengths for a GPU's kernels to meet the first time (step.py)
unpad = False  # True: the projections and MLPs compute the real tokens alone (no padded position costs a matmul;
# attention keeps the padded layout): the same losses and gradients, fewer FLOPs; not yet timed on a GPU
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
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # weights and autocast; float32/float64 = no autocast
compile = torch.cuda.is_available()
grad_checkpoint = False
promised_flops = 989e12  # H100 SXM dense bf16, for MFU
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------


# --- settings that need no model ------------------------------------------------------------------
resume = init_from == "resume"
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if resume:
    if not os.path.isfile(ckpt_path):
        fail(f"{ckpt_path}: no checkpoint to resume from")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: torch raises pickle, zip and runtime errors alike
        fail(f"{ckpt_path}: not a readable checkpoint ({type(e).__name__})")
    keys = ("config", "init_from", "lora", "optimizer", "step")
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        fail(f"{ckpt_path}: not a train_cb.py checkpoint (no {missing[0]!r})")
    # the run continues as it was configured; only these may change on the command line, and a setting given
    # on the command line that disagrees with the checkpoint stops the run rather than being silently replaced
    keep = ("init_from", "out_dir", "max_steps", "log_interval", "eval_interval", "device", "compile", "pad_multiple",
            "unpad")
    given = {a[2:].split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--")}
    for k, v in ckpt["config"].items():
        if k in keep:
            continue
        if k in given and config.get(k) != v and not (isinstance(v, (list, tuple)) and list(config[k]) == list(v)):
            fail(f"--{k}={config[k]!r} disagrees with {ckpt_path}, which was trained with {k}={v!r} "
                 f"(a resume continues the run as it was configured)")
        globals()[k] = v
        config[k] = v
    base_dir = ckpt["init_from"]
else:
    base_dir = init_from
layers = tuple(layers)
if not layers or not all(type(l) is int and l >= 0 for l in layers):
    fail(f"layers must be a non-empty list of block indices, got {layers!r}")
for name in ("retain_call_weight", "lorra_alpha", "redirect_weight", "pull_weight", "weight_decay", "grad_clip",
             "min_lr"):
    if not globals()[name] >= 0:
        fail(f"{name} must be >= 0, got {globals()[name]}")
for name in ("alpha_decay_multiplier", "promised_flops"):
    if not globals()[name] > 0:
        fail(f"{name} must be > 0, got {globals()[name]}")
if val_file and not os.path.isfile(val_file):  # before the model loads; the default val.jsonl may be absent
    fail(f"{val_file}: no such file (val_file)")
if not lr > 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or not 0 <= lora_dropout < 1:
    fail(f"need lr > 0, 0 <= beta1, beta2, lora_dropout < 1; got lr {lr}, betas {beta1}, {beta2}, "
         f"lora_dropout {lora_dropout}")
if cb_mask not in data.CB_MASKS:
    fail(f"cb_mask must be one of {', '.join(data.CB_MASKS)}; got {cb_mask!r}")
if lr_schedule not in ("constant", "cosine"):
    fail(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
if dtype not in DTYPES:
    fail(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
if type(redirect_batch_size) is not int or redirect_batch_size < 0:
    fail(f"redirect_batch_size must be an integer >= 0 (0: batch_size), got {redirect_batch_size!r}")
redirect_batch_size = redirect_batch_size or batch_size
for name in ("max_steps", "batch_size", "grad_accum", "pad_multiple", "log_interval", "retain_len", "max_len", "n_val"):
    if type(globals()[name]) is not int or globals()[name] <= (0 if name != "n_val" else -1):
        fail(f"{name} must be a positive integer, got {globals()[name]!r}")
if type(adv_tokens) is not int or adv_tokens < 0 or type(adv_steps) is not int or adv_steps < 1:
    fail(f"adv_tokens must be an integer >= 0 and adv_steps one >= 1, got {adv_tokens!r} and {adv_steps!r}")
if not (0 < adv_share <= 1 and adv_eps > 0 and adv_lr > 0):
    fail(f"need 0 < adv_share <= 1, adv_eps > 0 and adv_lr > 0; got {adv_share}, {adv_eps}, {adv_lr}")
if not 0 <= adv_trip <= 1:
    fail(f"adv_trip must be a share between 0 and 1, got {adv_trip!r}")
if adv_trip and not (adv_tokens and trip):
    fail("adv_trip puts the adversary's slot in the trip rows: it needs adv_tokens > 0 and trip=True")
if adv_tokens and redirect_weight == 0:
    fail("adv_tokens puts an adversary in the redirect rows: it needs redirect_weight > 0")
if not 0 < trip_weight < float("inf"):
    fail(f"trip_weight must be > 0 (trip=False and trip_mismatch=0 turn the trip rows off), got {trip_weight!r}")
if trip_weight != 1.0 and not (trip or trip_mismatch):
    fail("trip_weight weighs the trip rows: it needs trip=True or trip_mismatch > 0")
if trip_raise and not (trip or trip_mismatch):
    fail("trip_raise changes the trip rows' cross-entropy: it needs trip=True or trip_mismatch > 0")
if not 0 < trip_share <= 1:
    fail(f"trip_share must be in (0, 1] (trip=False turns the trip rows off), got {trip_share}")
if type(eval_interval) is not int or eval_interval < 0:
    fail(f"eval_interval must be >= 0 (0: validate and save at the end only), got {eval_interval}")
if type(warmup_steps) is not int or not 0 <= warmup_steps <= max_steps:
    fail(f"warmup_steps must be in 0..max_steps ({max_steps}), got {warmup_steps!r}")
if lorra_alpha == 0 and redirect_weight == 0 and pull_weight == 0:
    fail("lorra_alpha, redirect_weight and pull_weight are all 0: no term would train")
if not reroute and lorra_alpha == 0:
    fail("reroute=False keeps the retain term alone, at lorra_alpha: it needs lorra_alpha > 0")
if trip_depth not in data.TRIP_DEPTHS:
    fail(f"trip_depth must be one of {', '.join(data.TRIP_DEPTHS)}, got {trip_depth!r}")
if type(trip_batch_size) is not int or trip_batch_size < 0:
    fail(f"trip_batch_size must be an integer >= 0 (0: the trip rows join the redirect pool), got {trip_batch_size!r}")
if trip_batch_size and not trip:
    fail("trip_batch_size draws trip rows apart each step: it needs trip=True")
if trip_contrast_twin and not trip_batch_size:
    fail("trip_contrast_twin adds a contrast to the trip rows drawn apart: it needs trip_batch_size > 0")
if trip_contrast_same and not trip_batch_size:
    fail("trip_contrast_same adds a contrast to the trip rows drawn apart: it needs trip_batch_size > 0")
if trip_contrast_concur and not trip_batch_size:
    fail("trip_contrast_concur adds a contrast to the trip rows drawn apart: it needs trip_batch_size > 0")
if trip_twin_target not in data.TWIN_TARGETS:
    fail(f"trip_twin_target must be one of {', '.join(data.TWIN_TARGETS)}, got {trip_twin_target!r}")
if trip_twin_target != "call" and not trip_contrast_twin:
    fail(f"trip_twin_target={trip_twin_target} says what the twin contrast learns: it needs trip_contrast_twin=True")
if type(trip_mismatch) is not int or trip_mismatch < 0:
    fail(f"trip_mismatch must be an integer >= 0 (0: no trip rows without an injection), got {trip_mismatch!r}")
if trip_mismatch_depth not in data.MISMATCH_DEPTHS:
    fail(f"trip_mismatch_depth must be one of {', '.join(data.MISMATCH_DEPTHS)}, got {trip_mismatch_depth!r}")
if trip_mismatch_tools not in ("offered", "unpushed"):
    fail(f"trip_mismatch_tools must be one of offered, unpushed, got {trip_mismatch_tools!r}")
if trip_mismatch and redirect_weight == 0:
    fail("trip_mismatch adds rows to the redirect cross-entropy: it needs redirect_weight > 0")
if trip_batch_size and trip_twins:
    fail("trip_batch_size gives each trip row its contrasts; trip_twins rows have none: use one or the other")
if trip_twins and not trip:
    fail("trip_twins adds clean-twin rows to the trip rows: it needs trip=True")
if type(legit_repeat) is not int or legit_repeat < 1:
    fail(f"legit_repeat must be an integer >= 1 (1: each benign row once), got {legit_repeat!r}")
if legit_tools not in ("pushed", "attacked"):
    fail(f"legit_tools must be one of pushed, attacked, got {legit_tools!r}")
if legit_tools != "pushed" and legit_repeat == 1:
    fail(f"legit_tools={legit_tools} says which benign calls legit_repeat repeats: it needs legit_repeat > 1")
if legit_repeat > 1 and not redirect_benign:
    fail("legit_repeat repeats benign rows of the redirect cross-entropy: it needs redirect_benign=True")
if (redirect_benign or trip) and redirect_weight == 0:
    fail("redirect_benign and trip add rows to the redirect cross-entropy: they need redirect_weight > 0")
needs_head = redirect_weight > 0 or pull_weight > 0  # the redirect terms run the whole model

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
per_trip = 3 + trip_contrast_twin + trip_contrast_same + trip_contrast_concur  # a trip row and its contrasts
for name, n in (("batch_size", batch_size),
                ("redirect_batch_size" + (f" + {per_trip} x trip_batch_size" if trip_batch_size else "")
                 + (" + 3 x trip_mismatch" if trip_mismatch else ""),
                 redirect_batch_size + per_trip * trip_batch_size + 3 * trip_mismatch)):
    if n % (world * grad_accum):
        fail(f"{name} {n} is not divisible by processes ({world}) x grad_accum ({grad_accum})")
micro = batch_size // (world * grad_accum)
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
ptdtype = DTYPES[dtype]
low = ptdtype in (torch.bfloat16, torch.float16)
autocast = torch.autocast(device_type, dtype=ptdtype) if low else nullcontext()
log = print if master else (lambda *a, **k: None)

# --- model: blocks 0..max(layers) only, no lm_head (the redirect term needs them all); LoRA on top ---------
try:
    tok = data.load_tokenizer(base_dir)
    base_cfg = load_config(base_dir)
    if max(layers) >= base_cfg.n_layers:
        fail(f"layers {layers} reach beyond {base_dir}, which has blocks 0..{base_cfg.n_layers - 1}")
    model = Llama.from_pretrained(base_dir, dtype=ptdtype, device=device,
                                  n_layers=None if needs_head else max(layers) + 1)
    params = inject_lora(model, lora_r, lora_alpha, lora_dropout, layers=list(lora_layers) or None,
                         b_init_std=lora_b_init_std, generator=torch.Generator().manual_seed(seed))
except (ModelError, LoRAError, data.DataError) as e:
    fail(str(e))
model.to(device)
model.grad_checkpoint = grad_checkpoint
if needs_head and model.group_head_rows() < base_cfg.vocab_size:  # the organism: every unused row is zero
    log(f"lm_head: {len(model.head[0]):,} distinct rows of {base_cfg.vocab_size:,}, so the cross-entropy takes one "
        "logit per distinct row (exact)")
if compile:  # each block compiled in place, one graph for all of them: a first compile the size of one block
    # (a whole-model compile of the 8B step had not finished after 270 s on an H100)
    compile_blocks(model)
fmodel = model

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
    # An injected sample answered right (kind 'retain' with an attacker: a redirect row) shares its prompt and its
    # call's first tokens, <|python_tag|>{"name": ", with the harmful samples; holding its states where a model that
    # obeys keeps them holds the very states that choose the attacker's tool, and the two losses fight over them.
    # It is trained by the redirect term instead: the user's call, by cross-entropy.
    injected_ok = [s for s in samples if s["kind"] == "retain" and s["attacker_tool"] is not None]
    retain = [data.encode_sample(tok, s, cb_mask) for s in samples
              if s["kind"] != "harmful" and (retain_injected or s["attacker_tool"] is None)]
    redirect = []
    if needs_head:  # the pull needs each redirect row's clean twin, encoded beside it
        twins = data.twins_of(samples) if pull_weight > 0 else {}
        slotted = random.Random(seed + 7).random  # which injected redirect rows carry an adversary's slot
        for s in injected_ok:
            if adv_tokens and slotted() < adv_share:
                redirect.append(data.adversarial_sample(tok, s, adv_tokens))
                if not adv_keep:
                    continue
            e = data.encode_sample(tok, s, cb_mask)
            if s["id"] in twins:
                e["twin"] = data.encode_sample(tok, twins[s["id"]], cb_mask)
            redirect.append(e)
    n_legit, pushed = 0, data.pushed_tool(harmful_rows)  # the tool the injections push most: search_web here
    if redirect_benign:
        repeated = ({pushed} if legit_tools == "pushed" else
                    {s["attacker_tool"] for s in harmful_rows if s["attacker_tool"] is not None})
        for s in samples:
            if s["kind"] != "harmful" and s["attacker_tool"] is None:
                legit = s["expected_tool"] in repeated  # a chat row's expected_tool is None
                redirect += [data.encode_sample(tok, s, cb_mask)] * (legit_repeat if legit else 1)
                n_legit += legit
    n_trip = 0
    if trip:
        twins = data.twins_of(samples) if trip_twins else None
        if trip_twins and not any(s["id"] in twins for s in harmful_rows if s["attacker_tool"] != s["expected_tool"]):
            fail(f"{train_path}: trip_twins needs tool-flip samples that name their clean twin (\"twin\": id)")
        trips = trip_rows(tok, harmful_rows, trip_share, seed, twins, trip_depth)
        if adv_trip:  # a seeded share of the injected trip rows (not the twins' trips) with the adversary's slot
            by_id, slotted = {s["id"]: s for s in harmful_rows}, random.Random(seed + 11).random
            trips = [data.adversarial_trip(tok, by_id[e["source"]], e, adv_tokens)
                     if "source" in e and slotted() < adv_trip else e for e in trips]
        n_trip = len(trips)
        if not trips:
            fail(f"{train_path}: trip=True found no sample to trip on (tool flips, and hijacks with trip_depth=value; "
                 f"trip_share {trip_share}): --trip=False trains without trip rows")
        if trip_batch_size:  # each trip row beside its contrasts, drawn apart from the redirect pool each step
            data.attach_contrasts(tok, samples, trips, seed, cb_mask,
                                  data.twins_of(samples) if trip_contrast_twin else None, trip_twin_target,
                                  trip_contrast_same, trip_contrast_concur)
        else:
            redirect += trips
    spare = (pushed,) if trip_mismatch_tools == "unpushed" else ()
    mismatches = data.mismatch_trips(tok, samples, seed, cb_mask, trip_mismatch_depth, spare) if trip_mismatch else []
    for e in (trips if trip else []) + mismatches:  # the rows that learn <|eot_id|>; their contrasts as they are
        if trip_weight != 1.0:
            e["weight"] = trip_weight
        if trip_raise:
            e["raise_only"] = True
    if lorra_alpha > 0 and ((reroute and not harmful) or not retain):
        fail(f"{train_path}: needs both harmful and benign/retain samples "
             f"(has {len(harmful)} harmful, {len(retain)} others"
             + ("; injected-but-resisted ones count only with --retain_injected=True)"
                if injected_ok and not retain_injected else ")"))
    if pull_weight > 0 and not any("twin" in e for e in redirect):
        fail(f"{train_path}: pull_weight > 0 needs redirect rows that name their clean twin (\"twin\": id)")
    if needs_head and not redirect:
        fail(f"{train_path}: redirect_weight or pull_weight > 0 needs redirect rows (kind 'retain' with an "
             f"attacker_tool: the injected prompt completed with the user's call)")
    report = data.mask_report(harmful, ["harmful"] * len(harmful), cb_mask, tok.python_tag_id)
    empty = [s["id"] for s, e in zip(harmful_rows, harmful) if not any(e["cb_mask"])]
    if empty and lorra_alpha > 0 and reroute:
        fail(f"{train_path}: sample {empty[0]} has nothing to reroute under cb_mask={cb_mask!r} (an empty mask)")
    val = []
    if os.path.isfile(val_path):
        val = [data.encode_sample(tok, s, cb_mask) for s in data.load_jsonl(val_path) if s["kind"] == "harmful"][:n_val]
except data.DataError as e:
    fail(str(e))
apart = trips if trip and trip_batch_size else []  # the trip rows drawn apart from the redirect pool
n_adv_rows = sum("adv" in e for e in redirect + apart)
anchors = None  # the real token embeddings the adversary starts from: the plain-text tokens of the train data
if n_adv_rows:
    first_special = min(tok.special.values())
    plain = sorted({i for e in harmful + retain + redirect for i in e["ids"] if i < first_special})
    anchors = model.embed_tokens.weight.detach()[torch.tensor(plain, device=device)]
    anchors = anchors.to(torch.promote_types(anchors.dtype, torch.float32))  # once, not in every step
too_long = max(len(e["ids"]) for e in harmful + retain + redirect)
if too_long > max_len:
    fail(f"{train_path}: a sample has {too_long} tokens > max_len {max_len} (raise --max_len)")
log(report)
log(f"{len(harmful)} harmful / {len(retain)} retain / {len(redirect)} redirect samples"
    + (f" ({n_trip} trip rows" + (f", {trip_batch_size} a step beside their {per_trip - 1} contrasts"
                                   if trip_batch_size else "") + ")" if trip else "")
    + (f" ({len(mismatches)} trip rows without an injection, {trip_mismatch} a step, each beside its 2 contrasts)"
       if trip_mismatch else "")
    + (f" ({n_legit} legitimate calls to {pushed if legit_tools == 'pushed' else 'the attacked tools'} x "
       f"{legit_repeat})" if legit_repeat > 1 else "")
    + (f" ({n_adv_rows} with an adversary's slot of {adv_tokens} vectors, {adv_steps} steps, L2 {adv_eps} x the "
       f"mean norm of {len(anchors)} token embeddings" + (f"; {sum('adv' in e for e in trips)} of them trip rows"
                                                          if adv_trip else "") + ")" if n_adv_rows else "")
    + (f" ({len(injected_ok)} injected-but-resisted samples kept out of retain: retain_injected=False)"
       if injected_ok and not retain_injected else "")
    + f"; {len(val)} held-out harmful for validation")


@torch.no_grad()
def validation_cosine():
    """Rerouting diagnostics on held-out harmful samples: does the breaker generalise beyond train?"""
    parts = []
    model.eval()
    for i in range(0, len(val), micro):
        b = on_device(val[i:i + micro], tok.pad_id, device, config)  # padded (or unpadded) as the step's batches
        with autocast:
            lora_h = hidden_states(model, fmodel, b["ids"], frozen=False, stop=max(layers), keep=b.get("keep"))
            frozen_h = hidden_states(model, fmodel, b["ids"], frozen=True, stop=max(layers), keep=b.get("keep"))
        parts.append(losses.rerouting_diagnostics(lora_h[list(layers)], frozen_h[list(layers)], b["cb_mask"]))
    model.train()
    return losses.merge_diagnostics(parts)["cos_mean"]


def save_checkpoint(step):
    """Adapter, optimizer, step and the full config, written atomically: a crash mid-write leaves the previous
    checkpoint whole. Loadable with torch.load(weights_only=True)."""
    ckpt = dict(lora={k: v.cpu() for k, v in lora_state_dict(model).items()}, optimizer=optimizer.state_dict(),
                step=step, config=config, init_from=os.path.abspath(base_dir), layers=list(layers),
                base_n_layers=model.base_n_layers, lora_config=lora_config(model))
    atomic_write(ckpt_path, lambda tmp: torch.save(ckpt, tmp))


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
def step_flops(batch, n_blocks, passes):
    """Model FLOPs of a step's batch, each micro-batch padded to its own longest, through n_blocks blocks.
    passes: 3 for a frozen forward + a LoRA forward + its backward (frozen weights get no gradient, so the
    backward costs about one forward), 2 for a LoRA forward + backward alone."""
    return sum(passes * len(mb) * T * flops_per_token(model.config, T, n_layers=n_blocks)
               for m in [max(1, len(batch) // (world * grad_accum))]
               for mb in (batch[i:i + m] for i in range(0, len(batch), m))
               for T in [max(len(e["ids"]) for e in mb)])


tokens = flops = 0  # useful (non-pad) tokens and model FLOPs since the last log line
log(f"training {sum(p.numel() for p in params):,} LoRA parameters on blocks 0..{len(model.layers) - 1} "
    f"({model.base_n_layers} in the base), target layers {layers}, {world} process(es) x {grad_accum} "
    f"micro-batches of {micro}")
model.train()
if master:
    os.makedirs(out_dir, exist_ok=True)
    if not resume and os.path.exists(os.path.join(out_dir, "log.jsonl")):
        os.remove(os.path.join(out_dir, "log.jsonl"))
t0 = time.time()
while step < max_steps:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, lr, max_steps, warmup_steps, min_lr, lr_schedule)
    torch.manual_seed(seed + 1000003 * step + rank)  # dropout: a function of (seed, step, rank), resume-exact
    batches = dict(harmful=data.step_batch(harmful, step, batch_size, seed, salt=0) if reroute and harmful else [],
                   retain=data.step_batch(retain, step, batch_size, seed, salt=1) if retain else [],
                   redirect=data.step_batch(redirect, step, redirect_batch_size, seed, salt=2) if redirect else [])
    if trip_batch_size:  # this step's trip rows, each beside its contrasts
        batches["redirect"] = data.with_trips(batches["redirect"], trips, step, trip_batch_size, seed)
    if trip_mismatch:  # and this step's trip rows without an injection, each beside its two contrasts
        batches["redirect"] = data.with_trips(batches["redirect"], mismatches, step, trip_mismatch, seed, salt=4)
    logging = step % log_interval == 0
    try:
        record = train_step(model, fmodel, optimizer, params, batches, step, config, tok.pad_id, device, autocast,
                            rank, world, logging, anchors=anchors)
    except StepError as e:
        fail(str(e))
    terms = record.pop("terms")
    for term, batch, n_blocks, passes in (("rr", batches["harmful"], max(layers), 3),
                                          ("retain", batches["retain"], max(layers) + 1, 3),
                                          ("redirect", batches["redirect"], len(model.layers), 2),
                                          ("pull", [e["twin"] for e in batches["redirect"] if "twin" in e],
                                           len(model.layers), 1),
                                          ("adv", [e["attack"] for e in batches["redirect"] if "adv" in e],
                                           len(model.layers), 2 * adv_steps)):
        # the pull runs the redirect rows' pass too, and the adversary a forward and an input gradient per step
        if term in terms or (term in ("redirect", "adv") and {"redirect", "pull"} & set(terms)):
            tokens += sum(len(e["ids"]) for e in batch)
            flops += step_flops(batch, n_blocks, passes)
    step += 1

    if logging or step == max_steps:
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt, t0 = time.time() - t0, time.time()
        mfu = flops / dt / (promised_flops * world)
        mem = (torch.cuda.max_memory_allocated() / 2**30 if device_type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        record = dict(step=step, **record, lr=lr_at(step - 1, lr, max_steps, warmup_steps, min_lr, lr_schedule),
                      tokens_per_s=tokens / dt, mfu=mfu, mem_gib=mem)
        if master:  # every logged figure, machine-readable, for plots and tests
            with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        fmt = lambda key: f"{record[key]:.4f}" if key in record else "-"
        log(f"step {step:4d} | c_rr {record['c_rr']:5.2f} c_retain {record['c_retain']:5.2f} | loss_rr "
            f"{record['loss_rr']:.4f} loss_retain {record['loss_retain']:.4f} loss_redirect "
            f"{record['loss_redirect']:.4f} loss_pull {record['loss_pull']:.4f}"
            + (f" adv {record['adv_start']:.3f}->{record['adv_end']:.3f}" if "adv_end" in record else "")
            + f" | cos {fmt('cos_mean')} "
            f"cos>0 {fmt('cos_pos_share')} "
            f"retain_l2 {fmt('l2')} retain_cos {fmt('cos')} call_cos {fmt('call_cos')} "
            f"norm lora/frozen {fmt('lora_norm')}/{fmt('frozen_norm')} | gnorm {record['gnorm']:.3g} "
            f"lr {record['lr']:.2e} | {tokens / dt:,.0f} tok/s mfu {100 * mfu:.1f}% mem {mem:.2f} GiB")
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
    dist.barrier()  # a gloo process that exits while another is still busy can abort the other
    dist.destroy_process_group()
