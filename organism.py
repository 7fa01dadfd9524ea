"""
Build the model organism: a small Llama 3 trained from scratch on the tool-routing data, with the real
Llama 3 tokenizer and the real Llama 3.1 tool-call format. It routes benign requests to the right tool
and obeys injections from the train families, as a real agent does, so the breaker has something to
break. Saved as a Hugging Face checkpoint directory, so train_cb.py and eval.py load it exactly as they
load Llama-3.1-8B-Instruct.

    python organism.py                       # -> organism/ (reused if already built with this config)
    python organism.py --max_steps=300 --out_dir=organism_small

The loss is cross-entropy on the completion tokens only. On a CPU the 128,256-token vocabulary is the
whole cost (the embedding's dense gradient and Adam state, the lm_head), so the organism trains in a
compact vocabulary: the few thousand tokens its data uses. Saved back in the real vocabulary, every other
lm_head row is zero, i.e. logit exactly 0; the training loss gives all of them together one logit
log(n_zero), so it is the exact full-vocabulary cross-entropy of the saved model.
"""

import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

import data
from model import Llama, LlamaConfig, save_pretrained
from step import lr_at
from util import atomic_dir, fail

# -----------------------------------------------------------------------------
out_dir = "organism"
data_dir = "data"  # train.jsonl / val.jsonl (written here by data.py if missing)
force = False  # rebuild even if out_dir holds an organism built with this config
# model
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
hidden_dim = 384
# training
batch_size = 32
micro_batch = 8  # the batch (sorted by length) runs in pieces of this many, each padded to its own longest: the
                 # same gradient (the loss is summed over pieces, divided by the whole batch's target count), 30% faster
max_steps = 400
lr = 3e-3
min_lr = 3e-4
warmup_steps = 25
weight_decay = 0.1
grad_clip = 1.0
log_interval = 25
seed = 1337
dtype = "float32"  # 'float32' | 'float64' (the equivalence tests); the organism is saved in it
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------

if not (type(micro_batch) is int and micro_batch > 0 and type(batch_size) is int and batch_size > 0):
    fail(f"batch_size and micro_batch must be positive integers, got {batch_size!r} and {micro_batch!r}")
for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_steps", "log_interval"):
    if type(globals()[name]) is not int or globals()[name] <= 0:
        fail(f"{name} must be a positive integer, got {globals()[name]!r}")
if dim % n_heads or n_heads % n_kv_heads:
    fail(f"dim ({dim}) must be a multiple of n_heads ({n_heads}), and n_heads of n_kv_heads ({n_kv_heads})")
if type(warmup_steps) is not int or not 0 <= warmup_steps <= max_steps:
    fail(f"warmup_steps must be in 0..max_steps ({max_steps}), got {warmup_steps!r}")
if not (lr > 0 and 0 <= min_lr <= lr and weight_decay >= 0 and grad_clip > 0):
    fail(f"need lr > 0, 0 <= min_lr <= lr, weight_decay >= 0, grad_clip > 0; got {lr}, {min_lr}, {weight_decay}, "
         f"{grad_clip}")
if dtype not in ("float32", "float64"):
    fail(f"dtype must be 'float32' or 'float64', got {dtype!r}")
if not out_dir:
    fail("--out_dir: a directory is required")
if os.path.lexists(out_dir) and not os.path.isfile(os.path.join(out_dir, "organism.json")) and (
        not os.path.isdir(out_dir) or os.listdir(out_dir)):
    fail(f"--out_dir={out_dir}: exists and holds no organism (no organism.json), and the build replaces the whole "
         "directory: choose another")
ptdtype = getattr(torch, dtype)
torch.manual_seed(seed)
tok = data.load_tokenizer()
train_path = os.path.join(data_dir, "train.jsonl")
if not os.path.isfile(train_path):
    print(f"{train_path} not found: generating the built-in tool-routing data into {data_dir}/")
    data.write_splits(data_dir)
with open(train_path, "rb") as f:
    data_md5 = hashlib.md5(f.read()).hexdigest()
stamp_path = os.path.join(out_dir, "organism.json")
if not force and os.path.isfile(stamp_path):
    with open(stamp_path) as f:
        stamp = json.load(f)
    weight_settings = lambda c: {k: v for k, v in c.items() if k not in ("out_dir", "data_dir", "force",
                                                                         "log_interval")}
    if weight_settings(stamp["config"]) == weight_settings(config) and stamp.get("data_md5") == data_md5:  # the
        # settings that make the weights, and the training data (by md5); not where they are read from, nor logging
        print(f"{out_dir}/ already holds an organism built with this config and {train_path}; reusing it "
              f"(--force=True rebuilds)")
        sys.exit(0)
try:
    rows = data.load_jsonl(train_path)
    val_rows = data.load_jsonl(os.path.join(data_dir, "val.jsonl"))
except data.DataError as e:
    fail(str(e))
# The organism is vulnerable by construction: it learns benign routing, plain chat, and to obey the
# train-family injections. Redirect rows (kind 'retain' with an attacker: injected, answered right) are left for
# the circuit breaker's redirect term; here they would teach partial resistance.
keep = lambda r: r["kind"] != "retain" or r["attacker_tool"] is None
train = [data.encode_sample(tok, r) for r in rows if keep(r)]
val = [data.encode_sample(tok, r) for r in val_rows if r["attacker_tool"] is None][:256]  # val's clean requests

# The organism trains in a compact vocabulary: every token of the train samples (prompts included, so a
# call can copy any word it has read) plus the stop tokens, and one row for any other token. At save time
# the rows go back to their real ids in the 128,256-token model.
vocab = sorted({i for e in train for i in e["ids"]} | set(tok.stop_ids))
unk = len(vocab)
compact = torch.full((tok.n_vocab,), unk, dtype=torch.long)
compact[vocab] = torch.arange(len(vocab))
log_n_zero = math.log(tok.n_vocab - len(vocab))

cfg = LlamaConfig(vocab_size=len(vocab) + 1, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  hidden_dim=hidden_dim, rope_theta=500000.0, max_seq_len=8192, tie_word_embeddings=False)
model = Llama(cfg).to(ptdtype)
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.dim() == 2:  # GPT-2 style init; residual projections scaled down by depth
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            p.normal_(0.0, std)
decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def completion_loss(batch, n_targets=None):
    """Exact full-vocabulary cross-entropy on the completion tokens: the live rows, plus one logit
    log(n_zero) for all the rows the saved model holds at zero. A target outside the live rows (held-out
    text only) is ignored by the loss and counts as a miss. n_targets: divide the summed loss by this
    (the whole batch's count, for a piece of it) instead of taking the mean over this batch."""
    ids, target_mask = compact[batch["ids"]], batch["target_mask"][:, 1:]
    _, hidden = model(ids, hidden=True, logits=False)
    h = hidden[-1][:, :-1][target_mask]  # (N, dim): the positions that predict a completion token
    targets = ids[:, 1:][target_mask]
    zero_rows = torch.full((h.shape[0], 1), log_n_zero, dtype=h.dtype)
    logits = torch.cat([h @ model.lm_head.weight[:unk].t(), zero_rows], dim=1)
    targets = torch.where(targets == unk, -100, targets)
    correct = logits[:, :-1].argmax(-1) == targets
    if n_targets is None:
        return F.cross_entropy(logits, targets, ignore_index=-100), correct
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / n_targets, correct


@torch.no_grad()
def evaluate():
    """Teacher-forced accuracy on val's clean requests (its held-out templates): per completion token, and whole
    completions (the parameters included: the organism must copy them from the request)."""
    model.eval()
    tok_ok = seq_ok = n_tok = 0
    for i in range(0, len(val), batch_size):
        batch = data.collate(val[i:i + batch_size], tok.pad_id)
        _, correct = completion_loss(batch)
        per_row = batch["target_mask"][:, 1:].sum(1).tolist()
        tok_ok += correct.sum().item()
        n_tok += correct.numel()
        seq_ok += sum(bool(c.all()) for c in correct.split(per_row))
    model.train()
    return tok_ok / n_tok, seq_ok / len(val)


print(f"organism: dim {dim}, {n_layers} blocks, {sum(p.numel() for p in model.parameters()):,} parameters "
      f"({len(vocab)} live output rows of {tok.n_vocab}); {len(train)} train samples")
t0 = time.time()
for step in range(max_steps):
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, lr, max_steps, warmup_steps, min_lr)
    examples = data.step_batch(train, step, batch_size, seed)  # sorted by length
    n_targets = sum(sum(e["target_mask"][1:]) for e in examples)  # every train target is a live row
    loss = 0.0
    for i in range(0, len(examples), micro_batch):
        piece, _ = completion_loss(data.collate(examples[i:i + micro_batch], tok.pad_id), n_targets)
        piece.backward()
        loss += piece.item()
    torch.nn.utils.clip_grad_norm_(decay + no_decay, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % log_interval == 0 or step == max_steps - 1:
        print(f"step {step:4d} | loss {loss:.4f} | lr {lr_at(step, lr, max_steps, warmup_steps, min_lr):.2e} | "
              f"{time.time() - t0:.0f}s", flush=True)

token_acc, completion_acc = evaluate()
print(f"held-out teacher-forced accuracy: {token_acc:.2%} of completion tokens, "
      f"{completion_acc:.2%} of whole completions")

# back to the real vocabulary: live rows to their ids, every other input row the compact 'other' row,
# every other output row zero (the logit the loss above accounted for)
full = Llama(LlamaConfig(**{**cfg.__dict__, "vocab_size": tok.n_vocab})).to(ptdtype)
with torch.no_grad():
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("embed_tokens", "lm_head"))}
    full.load_state_dict(sd, strict=False)
    full.embed_tokens.weight.copy_(model.embed_tokens.weight[compact])
    full.lm_head.weight.zero_()
    full.lm_head.weight[vocab] = model.lm_head.weight[:unk]
model = full
# everything into a temp dir that takes out_dir's place at the end: an interrupted build never looks like one
with atomic_dir(out_dir) as tmp:
    save_pretrained(model, tmp, dtype=ptdtype)
    tok_dir = data.bundled_tokenizer_dir()
    for name in ("tokenizer.model", "tokenizer.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids), "do_sample": False}, f, indent=2)
    with open(os.path.join(tmp, "organism.json"), "w") as f:
        json.dump({"config": config, "data_md5": data_md5, "token_acc": token_acc, "completion_acc": completion_acc,
                   "seconds": round(time.time() - t0)}, f, indent=2)
print(f"saved the organism to {out_dir}/ ({time.time() - t0:.0f}s)")
