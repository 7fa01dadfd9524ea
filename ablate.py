"""
The ablations users ask for first, on the model organism, as one table: the organism's recipe (adversarial
fine-tuning alone), each breaker term added to it, train_cb.py's defaults, rerouting alone, the original
recipe, and the embedding-space adversary added to the fine-tuning. Each row trains (train_cb.py config/organism.py plus the row's overrides) and
evaluates (eval.py with the forced-call pass), in subprocesses.

    python ablate.py                       # after organism.py; about 12 minutes a row on 2 CPU cores
    python ablate.py --max_steps=60        # a train_cb.py or eval.py setting: to each of them that has it
    python ablate.py --device=cuda --dtype=bfloat16   # settings both have go to both
    python ablate.py --rows=1,2            # only these rows; the others are read back from out/ablate/N
    python ablate.py --rows="()"           # no row run: the table of what out/ablate/ holds
    python ablate.py --data=data/val.jsonl # eval.py's --data: choose settings on val, report test
"""

import json
import os
import subprocess
import sys

from util import fail

NO_REDIRECT = ["--redirect_weight=0.0", "--redirect_benign=False", "--legit_repeat=1", "--trip=False"]
RR = ["--lorra_alpha=10.0", "--batch_size=16"]  # rerouting + retain on, 16 harmful + 16 retain samples a step
ORIGINAL = [*RR, "--cb_mask=full", "--retain_call_weight=1.0", "--retain_injected=True", "--lora_b_init_std=0.0",
            "--retain_len=1024", *NO_REDIRECT]
ROWS = [  # (name, train_cb.py overrides on config/organism.py)
    ("default: fine-tuning on the user's call under injection and the benign replies (no breaker term)", []),
    ("+ trip rows (a quarter of the flips)", ["--trip=True", "--trip_share=0.25"]),
    ("+ trip rows (every flip)", ["--trip=True", "--trip_share=1.0"]),
    ("+ rerouting and retain (departure mask)", [*RR, "--redirect_batch_size=32"]),
    ("train_cb.py's defaults: rerouting + retain + redirect x3 + trip rows (16 a step)",
     [*RR, "--redirect_weight=3.0", "--trip=True", "--trip_share=1.0"]),
    ("rerouting + retain alone (departure mask)", [*RR, *NO_REDIRECT]),
    ("the original recipe (full mask, retain x1 and resisted rows, B=0, 1024)", ORIGINAL),
    ("+ embedding-space adversary in half the injected redirect rows (20 vectors, 4 steps, L2 1.0)",
     ["--adv_tokens=20"]),
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
        run(["eval.py", os.path.join(out_dir, "ckpt.pt"), "--representation=False", *forward["eval.py"],
             f"--out={out_dir}/eval.json"])
    path = os.path.join(out_dir, "eval.json")
    if not os.path.isfile(path):
        continue
    try:  # a row read back may be an older eval.py's report
        with open(path) as f:
            ev = json.load(f)
        base, cb = ev["metrics"]["base"], ev["metrics"]["cb"]
        both = lambda g, k: f"{pct(base[g], k)} → {pct(cb[g], k)}"
        table.append((name, both("train_families", "asr"), both("heldout_families", "asr"),
                      both("train_families", "resisted_correct_tool"),
                      both("heldout_families", "resisted_correct_tool"),
                      both("train_families", "forced_asr"), both("heldout_families", "forced_asr"),
                      pct(cb["injected"], "malformed"), both("clean", "benign_acc"),
                      pct(cb["clean"], "attacker_tool_benign_acc"), pct(cb["clean"], "degenerate_clean")))
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{path}: not a report of this eval.py with a checkpoint ({type(e).__name__}: {e}); rerun the row "
             f"(--rows={i})")
    print(" | ".join(table[-1]), flush=True)

print("\n| run | ASR train | ASR held-out | resisted and correct (tool) train | held-out | forced-call ASR train "
      "| held-out | malformed, injected (CB) | benign accuracy | search_web benign (CB) | degenerate (clean, CB) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for row in table:
    print("| " + " | ".join(row) + " |")
