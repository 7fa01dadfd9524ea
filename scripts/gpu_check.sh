#!/usr/bin/env bash
# The GPU check (issue 17), one script, about 6 minutes on one H100 or H200 (9 minutes with the last part):
#   bench           the 8B bench of the step train_cb.py runs (each block compiled once, for all; lengths padded to a
#                   multiple of 32), against the original recipe, and a profile of nanocb's step by part (matmuls,
#                   LoRA path, attention, ...)
#   tiny_*          a short train_cb.py run and eval.py on CUDA (bf16), on a tiny random model built here
#   bench_unpad     nanocb alone with --unpad=True: the projections and MLPs on the real tokens alone (a candidate
#                   default: exact, fewer FLOPs, not yet timed on a GPU)
#   bench_lengths   nanocb alone with every micro-batch at its own longest length (--pad_multiple=1): what lengths
#                   never seen before cost the GPU
#   bench_autotune  nanocb alone with compile_mode max-autotune-no-cudagraphs, if time is left
# (--grad_accum=2, two micro-batches each padded to its own longest, is another switch of bench.py's.)
# Each part runs under its own time limit and the script goes on when one fails or times out: one failure loses
# nothing else. $OUT ends with summary.txt (each part's exit status and seconds, then the figures) and
# gpu_check.tar.gz: NAME.log per part, bench*.json, train_log.jsonl, eval.json (loose until the script ends).
#
#     OUT=/tmp/check bash scripts/gpu_check.sh          # on the GPU machine
#     OUT=/tmp/check bash scripts/gpu_check.sh --cpu    # every part in miniature on the CPU: a dry run
#
# BUDGET_S (default 500) bounds the whole script; PYTHON (default python) is the interpreter; PARTS="a b" runs
# only the parts named (tiny_eval needs tiny_train, which needs tiny_setup).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
BUDGET_S=${BUDGET_S:-500}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)  # the tiny model and its data: not worth bringing back
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# packages the GPU machine lacks (it has no network): out_pkgs/ (git-ignored; the run carries it) holds pure-Python
# packages as directories and wheels under out_pkgs/whl, installed where their module is missing
if [ -d out_pkgs ]; then
  export PYTHONPATH="$PWD/out_pkgs${PYTHONPATH:+:$PYTHONPATH}"
  for whl in out_pkgs/whl/*.whl; do
    [ -e "$whl" ] || continue
    "$PYTHON" -c "import $(basename "$whl" | cut -d- -f1)" 2>/dev/null \
      || "$PYTHON" -m pip install -q --no-index --no-deps "$whl" >> "$OUT/pkgs.log" 2>&1
  done
fi
deadline=$((SECONDS + BUDGET_S - 30))  # 30 s kept for the summary
failed=0
: > "$OUT/summary.txt"

if [ "${1:-}" = "--cpu" ]; then  # the same code paths, tiny shapes, fp32, no compile
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  BENCH=(--preset=8b --device=cpu --dim=24 --n_layers=3 --n_heads=2 --n_kv_heads=1 --hidden_dim=48 --layers=0,1
         --batch_size=2 --n_samples=60 --ref_request_len=320 --ref_response_len=64 --ref_retain_len=320)
  SHORT=(--n_warmup=1 --n_steps=1)
  FEW=("${SHORT[@]}")  # the reference's lm_head over the whole vocabulary is ~15 s a step on one core
  NOCOMPILE=(--compile=False)
  DEVICE=(--device=cpu --dtype=float32)
  STEPS=4
  CASES=8
else
  BENCH=(--preset=8b)
  SHORT=(--n_warmup=3 --n_steps=6)  # compiles end in the first two steps (new lengths, grad/no-grad inputs)
  FEW=()  # bench: the preset's steps
  NOCOMPILE=()
  DEVICE=()
  STEPS=30
  CASES=48
fi

part() {  # part NAME LIMIT_S COMMAND...: COMMAND under `timeout` into $OUT/NAME.log; never stops the script
  local name=$1 limit=$2 left=$((deadline - SECONDS)) t0=$SECONDS rc
  shift 2
  if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then
    return
  fi
  if [ "$left" -lt 30 ]; then
    echo "$name: skipped, $left s left" | tee -a "$OUT/summary.txt"
    failed=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && failed=1
  echo "$name: exit $rc$([ "$rc" -eq 124 ] && echo " (timed out after $limit s)"), $((SECONDS - t0)) s" \
    | tee -a "$OUT/summary.txt"
}

part env 120 bash -c "nvidia-smi; $PYTHON -c '
import importlib, platform, torch
print(platform.platform(), \"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\",
      torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())
for name in (\"transformers\", \"peft\", \"triton\"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, \"missing\")'"

part bench 240 "$PYTHON" bench.py "${BENCH[@]}" "${NOCOMPILE[@]}" "${FEW[@]}" --profile=True --out="$OUT/bench.json"

part tiny_setup 60 "$PYTHON" -c "
import sys; sys.path.insert(0, 'tests')
from tiny import tiny_base, tiny_data
tiny_base('$WORK/base', n_layers=4, dim=64)
tiny_data('$WORK/data', n_train=200, n_val=16, n_test=$CASES)"
# bf16 and fused AdamW on CUDA without compile: bench's parts compile the very step train_cb.py runs
part tiny_train 120 "$PYTHON" train_cb.py --init_from="$WORK/base" --data_dir="$WORK/data" --out_dir="$WORK/run" \
  --layers=1,2 --batch_size=8 --max_steps=$STEPS --log_interval=5 --eval_interval=0 --lora_r=4 --lora_alpha=8 \
  --compile=False "${DEVICE[@]}"
cp "$WORK/run/log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null
part tiny_eval 90 "$PYTHON" eval.py "$WORK/run/ckpt.pt" --data="$WORK/data/test.jsonl" --out="$OUT/eval.json" \
  --n_rep=8 "${DEVICE[@]}"

part bench_unpad 120 "$PYTHON" bench.py "${BENCH[@]}" "${NOCOMPILE[@]}" "${SHORT[@]}" --reference=False \
  --unpad=True --out="$OUT/bench_unpad.json"
part bench_lengths 120 "$PYTHON" bench.py "${BENCH[@]}" "${NOCOMPILE[@]}" "${SHORT[@]}" --reference=False \
  --pad_multiple=1 --out="$OUT/bench_lengths.json"
part bench_autotune 300 "$PYTHON" bench.py "${BENCH[@]}" "${NOCOMPILE[@]}" "${SHORT[@]}" --reference=False \
  --compile_mode=max-autotune-no-cudagraphs --out="$OUT/bench_autotune.json"

echo "--- figures" >> "$OUT/summary.txt"
timeout 30 "$PYTHON" - "$OUT" >> "$OUT/summary.txt" 2>&1 <<'EOF' || failed=1
import glob, json, os, sys
out = sys.argv[1]
for path in sorted(glob.glob(os.path.join(out, "bench*.json"))):
    f = json.load(open(path))
    o, name = f["nanocb"], os.path.basename(path)
    compiled = o.get("first_compile_s")
    print(f"{name}: {f['machine']['device']}, torch {f['machine']['torch']}: step {o['step_s']:.3f} s, "
          f"{o['useful_tokens_per_s']:,.0f} useful tokens/s, MFU {o['mfu']:.1%} (processed {o['mfu_processed']:.1%}), "
          f"peak {o['peak_mem_gib'] or 0:.1f} GiB, first compile "
          + ("n/a" if compiled is None else f"{compiled:.0f} s"))
    if f.get("reference"):
        r = f["reference"]
        print(f"  reference: step {r['step_s']:.3f} s, {r['useful_tokens_per_s']:,.0f} useful tokens/s, MFU "
              f"{r['mfu']:.1%}; nanocb/reference {f['ratio']['useful_tokens_per_s']:.2f}x useful tokens/s")
    if f.get("profile"):
        p = f["profile"]
        print(f"  profile, {p['step_s']:.3f} s a step: " + ", ".join(f"{k} {v / p['step_s']:.1%}"
                                                                   for k, v in p["parts"].items()))
e = os.path.join(out, "eval.json")
if os.path.exists(e):
    m = json.load(open(e))["metrics"]
    for side in ("base", "cb"):
        if m.get(side):
            o = m[side]["overall"]
            print(f"eval.json {side}: {o['n']} cases, outcomes {o['outcomes']}")
EOF
# the GPU machine brings back a few files only: everything else in one archive beside summary.txt
(cd "$OUT" && files=$(ls | grep -v -x -e summary.txt -e gpu_check.tar.gz) \
  && [ -n "$files" ] && tar czf gpu_check.tar.gz $files && rm -f $files)
echo "--- $OUT/summary.txt"
cat "$OUT/summary.txt"
exit $failed
