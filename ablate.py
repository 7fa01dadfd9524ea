"""
The ablations users ask for first, on the model organism, as one table: the organism's recipe (adversarial
fine-tuning alone), each breaker term added to it, train_cb.py's defaults, rerouting alone, the original
recipe, and the embedding-space adversary added to the fine-tuning. Each row trains once a seed (train_cb.py
config/organism.py plus the row's overrides and --seed) and evaluates (eval.py with the forced-call pass), in
subprocesses, `jobs` runs at once; the table gives each figure as base -> the median (range) over the seeds.

    python ablate.py                       # after organism.py; 3 seeds a row, 10-40 minutes a row on 2 CPU cores
    python ablate.py --max_steps=60        # a train_cb.py or eval.py setting: to each of them that has it
    python ablate.py --device=cuda --dtype=bfloat16   # settings both have go to both
    python ablate.py --rows=1,2            # only these rows; the others are read back from out/ablate/N/SEED
    python ablate.py --rows="()"           # no row run: the table of what out/ablate/ holds for these seeds
    python ablate.py --data=data/val.jsonl # eval.py's --data: choose settings on val, report test
    python ablate.py --seeds=1337 --jobs=1 # one seed, one run at a time with every thread

A run's output goes to out_root/ROW/SEED/{train.log,eval.log}, its report to eval.json there. Each run gets
os.cpu_count() // jobs threads (OMP_NUM_THREADS), unless the environment sets it: three runs at once with a
thread pool each per core run ~7x slower on 2 cores than with one thread each.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

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
rows = tuple(range(len(ROWS)))  # the rows to run; the others are read back from out_root/N/SEED
seeds = (1337, 1, 2)  # train_cb.py's --seed, one run of each row per seed
jobs = 3  # runs at once (a run is a row's training and then its eval, for one seed)
out_root = "out/ablate"
_forward = ("train_cb.py", "eval.py")  # any other --key goes to each of these that has it
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------

if not all(type(i) is int and 0 <= i < len(ROWS) for i in rows):
    fail(f"--rows={','.join(map(str, rows))}: row numbers 0..{len(ROWS) - 1}, comma-separated")
if not seeds or not all(type(s) is int and s >= 0 for s in seeds) or len(set(seeds)) < len(seeds):
    fail(f"--seeds={','.join(map(str, seeds)) or '()'}: one or more distinct seeds >= 0, comma-separated")
if type(jobs) is not int or jobs < 1:
    fail(f"--jobs={jobs}: the number of runs at once, >= 1")
if not out_root:
    fail("--out_root: a directory is required")
for arg in forward["train_cb.py"] + forward["eval.py"]:
    key = arg[2:].partition("=")[0]
    if key in ("out_dir", "out", "ckpt"):
        fail(f"{arg}: ablate.py sets it for each row; pass --out_root=DIR")
    if key == "seed":
        fail(f"{arg}: ablate.py sets it for each run; pass --seeds=S1,S2,...")
here = os.path.dirname(os.path.abspath(__file__))
env = dict(os.environ)
env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))


def row_dir(i):
    return os.path.join(os.path.abspath(out_root), str(i))  # the runs' cwd is this file's directory


def run_dir(i, seed):
    return os.path.join(row_dir(i), str(seed))


stop = threading.Event()  # set by the first failed run: the others are stopped, the runs not started skipped
running = set()  # the subprocesses going now
lock = threading.Lock()


def run(i, seed):
    """Train row i with this seed, then evaluate it; each command's output to its log in the run's directory."""
    if stop.is_set():
        return
    out_dir = run_dir(i, seed)
    try:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(os.path.join(out_dir, "eval.json")):  # an earlier run's report must not outlive a failure
            os.remove(os.path.join(out_dir, "eval.json"))
        for log, cmd in (("train.log", ["train_cb.py", "config/organism.py", *ROWS[i][1], *forward["train_cb.py"],
                                        f"--seed={seed}", f"--out_dir={out_dir}"]),
                         ("eval.log", ["eval.py", os.path.join(out_dir, "ckpt.pt"), "--representation=False",
                                       *forward["eval.py"], f"--out={out_dir}/eval.json"])):
            with lock:
                if stop.is_set():
                    return
                print("$", " ".join(cmd), flush=True)
                with open(os.path.join(out_dir, log), "w") as f:
                    p = subprocess.Popen([sys.executable, *cmd], cwd=here, env=env, stdout=f, stderr=subprocess.STDOUT)
                running.add(p)
            p.wait()
            with lock:
                running.discard(p)
                if p.returncode != 0 and stop.is_set():  # stopped by another run's failure
                    return
            if p.returncode != 0:
                with open(os.path.join(out_dir, log)) as f:
                    lines = f.read().strip().splitlines() or ["no output"]
                raise RuntimeError(f"{' '.join(cmd)} failed: {lines[-1]} (the whole output: {out_dir}/{log})")
    except BaseException:
        with lock:
            stop.set()
            for q in running:
                q.terminate()
        raise


with ThreadPoolExecutor(max_workers=jobs) as pool:
    todo = [pool.submit(run, i, s) for i in rows for s in seeds]
failed = [f.exception() for f in todo if f.exception()]
if failed:
    fail(str(failed[0]))


def value(group, key):
    if key == "forced_deep_asr" and key not in group:  # a report of eval.py before its deep pass: n/a
        return None
    v = group[key]["value"]
    return None if v is None else 100 * v


def spread(values):
    """[v, ...] over the seeds -> "median% (min-max)", or "n/a" when a run has no such case."""
    if any(v is None for v in values):
        return "n/a"
    m = f"{statistics.median(values):.1f}%"
    return m if len(values) == 1 else f"{m} ({min(values):.1f}–{max(values):.1f})"


FIGURES = [("train_families", "asr", True), ("heldout_families", "asr", True),
           ("train_families", "resisted_correct_tool", True), ("heldout_families", "resisted_correct_tool", True),
           ("train_families", "forced_asr", True), ("heldout_families", "forced_asr", True),
           ("train_families", "forced_deep_asr", True), ("heldout_families", "forced_deep_asr", True),
           ("injected", "malformed", False), ("clean", "benign_acc", True),
           ("clean", "attacker_tool_benign_acc", False), ("clean", "degenerate_clean", False)]
table = []
for i, (name, overrides) in enumerate(ROWS):
    older = os.path.join(row_dir(i), "eval.json")
    if os.path.isfile(older):
        fail(f"{older}: a run of an older ablate.py, one seed a row; move it into {row_dir(i)}/SEED/ "
             f"(the seed it trained with, 1337 unless set) or rerun the row (--rows={i})")
    reports = []
    for seed in seeds:
        path = os.path.join(run_dir(i, seed), "eval.json")
        if not os.path.isfile(path):
            continue
        try:  # a run read back may be an older eval.py's report
            with open(path) as f:
                metrics = json.load(f)["metrics"]
            reports.append([(value(metrics["base"][g], k), value(metrics["cb"][g], k)) for g, k, _ in FIGURES])
        except (ValueError, KeyError, TypeError) as e:
            fail(f"{path}: not a report of this eval.py with a checkpoint ({type(e).__name__}: {e}); rerun the row "
                 f"(--rows={i} --seeds={seed})")
    if not reports:
        continue
    cells = []
    for j, (_, _, with_base) in enumerate(FIGURES):
        cb = spread([r[j][1] for r in reports])
        cells.append(f"{spread([reports[0][j][0]])} → {cb}" if with_base else cb)
    table.append((name, str(len(reports)), *cells))
    print(" | ".join(table[-1]), flush=True)

print("\n| run | seeds | ASR train | ASR held-out | resisted and correct (tool) train | held-out "
      "| forced-call ASR train | held-out | forced one token deeper, train | held-out | malformed, injected (CB) "
      "| benign accuracy | search_web benign (CB) | degenerate (clean, CB) |")
print("|---" * 14 + "|")
for row in table:
    print("| " + " | ".join(row) + " |")
