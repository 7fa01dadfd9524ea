"""
The ablations users ask for first, on the model organism, as one table: two target layers vs all middle
layers, the four cb_mask modes, and each departure of the default from the original recipe taken back alone,
then all together. Each row trains a circuit breaker (train_cb.py config/organism.py plus the row's overrides)
and evaluates it (eval.py, no forced-call pass), in subprocesses.

    python ablate.py                       # after organism.py; about 36 minutes on 2 CPU cores
    python ablate.py --max_steps=60        # any train_cb.py setting, applied to every row
    python ablate.py --rows=1,2            # only these rows; the others are read back from out/ablate/N
    python ablate.py --rows=               # no row run: the table of what out/ablate/ holds
"""

import json
import os
import subprocess
import sys

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
out_root = "out/ablate"
rows = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--rows=")]
rows = rows[0].split(",") if rows else [str(i) for i in range(len(ROWS))]
if not all(i.isdigit() and int(i) < len(ROWS) for i in rows if i):
    sys.exit(f"ablate.py: --rows: row numbers 0..{len(ROWS) - 1}, comma-separated; got {','.join(rows)}")
rows = [int(i) for i in rows if i]
extra = [a for a in sys.argv[1:] if a.startswith("--") and not a.startswith("--rows=")]
here = os.path.dirname(os.path.abspath(__file__))


def run(cmd):
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run([sys.executable, *cmd], cwd=here, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"ablate.py: {' '.join(cmd)} failed:\n{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.stdout[-500:]}")


def pct(group, key):
    v = group[key]["value"]
    return "n/a" if v is None else f"{100 * v:.1f}%"


table = []
for i, (name, overrides) in enumerate(ROWS):
    out_dir = os.path.join(out_root, str(i))
    if i in rows:
        run(["train_cb.py", "config/organism.py", f"--out_dir={out_dir}", *overrides, *extra])
        run(["eval.py", os.path.join(out_dir, "ckpt.pt"), "--forced=False", f"--out={out_dir}/eval.json"])
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
