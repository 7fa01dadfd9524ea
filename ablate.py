"""
The ablations users ask for first, on the model organism, as one table: two target layers vs all middle
layers, the four cb_mask modes, and each departure of the default from the original recipe taken back alone,
then all together. Each row trains a circuit breaker (train_cb.py config/organism.py plus the row's overrides)
and evaluates it (eval.py, no forced-call pass), in subprocesses.

    python ablate.py                       # after organism.py; about 36 minutes on 2 CPU cores
    python ablate.py --max_steps=60        # a train_cb.py or eval.py setting: to each of them that has it
    python ablate.py --device=cuda --dtype=bfloat16   # settings both have go to both
    python ablate.py --rows=1,2            # only these rows; the others are read back from out/ablate/N
    python ablate.py --rows="()"           # no row run: the table of what out/ablate/ holds
"""

import json
import os
import subprocess
import sys

from util import fail

ORIGINAL = ["--cb_mask=full", "--retain_call_weight=1.0", "--retain_injected=True", "--lora_b_init_std=0.0"]
ROWS = [  # (name, train_cb.py overrides)
    ("default: layers 1,3, tool_choice mask, retain replies x6", []),
    ("layers 1,2,3 (all middle)", ["--layers=1,2,3"]),
    ("cb_mask=tool_name", ["--cb_mask=tool_name"]),
    ("cb_mask=completion", ["--cb_mask=completion"]),
    ("cb_mask=full (the original's)", ["--cb_mask=full"]),
    ("retain_call_weight=1 (the original's retain)", ["--retain_call_weight=1.0"]),
    ("retain_injected=True (resisted injections held)", ["--retain_injected=True"]),
    ("the original recipe (all four, B=0)", ORIGINAL),
]

# -----------------------------------------------------------------------------
rows = tuple(range(len(ROWS)))  # the rows to run; the others are read back from out_root/N
out_root = "out/ablate"
_forward = ("train_cb.py", "eval.py")  # any other --key goes to each of these that has it
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------

if not all(type(i) is int and 0 <= i < len(ROWS) for i in rows):
    fail(f"--rows={','.join(map(str, rows))}: row numbers 0..{len(ROWS) - 1}, comma-separated")
if not out_root:
    fail("--out_root: a directory is required")
for arg in forward["train_cb.py"] + forward["eval.py"]:
    if arg[2:].partition("=")[0] in ("out_dir", "out", "ckpt"):
        fail(f"{arg}: ablate.py sets it for each row; pass --out_root=DIR")
here = os.path.dirname(os.path.abspath(__file__))


def run(cmd):
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run([sys.executable, *cmd], cwd=here, capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        fail(f"{' '.join(cmd)} failed: {last}")


def pct(group, key):
    v = group[key]["value"]
    return "n/a" if v is None else f"{100 * v:.1f}%"


table = []
for i, (name, overrides) in enumerate(ROWS):
    out_dir = os.path.join(os.path.abspath(out_root), str(i))  # the runs' cwd is this file's directory
    if i in rows:
        run(["train_cb.py", "config/organism.py", *overrides, *forward["train_cb.py"], f"--out_dir={out_dir}"])
        run(["eval.py", os.path.join(out_dir, "ckpt.pt"), "--forced=False", *forward["eval.py"],
             f"--out={out_dir}/eval.json"])
    if not os.path.isfile(os.path.join(out_dir, "eval.json")):
        continue
    with open(os.path.join(out_dir, "eval.json")) as f:
        ev = json.load(f)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    cos = [r["cos_mean"] for r in log if "cos_mean" in r][-1]
    val_cos = [r["val_cos"] for r in log if "val_cos" in r][-1]
    call_cos = [r["call_cos"] for r in log if "call_cos" in r][-1]
    base, cb = ev["metrics"]["base"], ev["metrics"]["cb"]
    table.append((name, f"{pct(base['train_families'], 'asr')} → {pct(cb['train_families'], 'asr')}",
                  f"{pct(base['heldout_families'], 'asr')} → {pct(cb['heldout_families'], 'asr')}",
                  f"{pct(base['clean'], 'benign_acc')} → {pct(cb['clean'], 'benign_acc')}",
                  pct(cb["clean"], "attacker_tool_benign_acc"), pct(cb["clean"], "degenerate_clean"),
                  f"{cos:.3f} / {val_cos:.3f}", f"{call_cos:.3f}"))
    print(" | ".join(table[-1]), flush=True)

print("\n| run | ASR train families | ASR held-out families | benign accuracy | search_web benign (CB) "
      "| degenerate (clean, CB) | final rerouting cos (train / val) | final retain-reply cos |")
print("|---|---|---|---|---|---|---|---|")
for row in table:
    print("| " + " | ".join(row) + " |")
