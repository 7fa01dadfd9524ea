"""bench.py end to end in miniature: the 8b preset's code path (bf16, lm_head in the reference, weights built on
the device) with tiny shapes on the CPU, both implementations timed in one run and written to the JSON."""

import json
import subprocess
import sys

from tiny import ROOT


def test_bench_times_both_implementations_and_writes_their_figures(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--preset=8b", "--device=cpu", "--compile=False", "--threads=1",
           "--dim=16", "--n_layers=3", "--n_heads=2", "--n_kv_heads=1", "--hidden_dim=32", "--layers=0,1",
           "--batch_size=2", "--n_warmup=1", "--n_steps=1", "--n_samples=60",
           "--ref_request_len=320", "--ref_response_len=64", "--ref_retain_len=320", f"--out={out}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "useful tokens/s" in p.stdout and "ours/ref" in p.stdout
    fig = json.loads(out.read_text())
    ours, ref = fig["ours"], fig["reference"]
    assert fig["blocks"] == 2 and fig["coefficients"]["c_rr"] > 0 and fig["coefficients"]["c_retain"] > 0
    # the same samples on both sides; the reference pads them to its fixed lengths, nanocb to the batch's longest
    assert ours["useful_tokens_per_step"] == ref["useful_tokens_per_step"] > 0
    assert ref["processed_tokens_per_step"] == 2 * (320 + 64) + 2 * 320
    assert ours["useful_tokens_per_step"] <= ours["processed_tokens_per_step"] < ref["processed_tokens_per_step"]
    for side in (ours, ref):
        assert side["step_s"] > 0 and side["useful_tokens_per_s"] > 0 and side["mfu"] > 0
        assert side["peak_mem_gib"] >= side["own_mem_gib"] > 0
    assert ref["lm_head"] is True and ref["grad_checkpoint"] is True and ours["padding"] == "dynamic"
    assert fig["ratio"]["useful_tokens_per_s"] == ours["useful_tokens_per_s"] / ref["useful_tokens_per_s"]


def test_bench_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path):
    p = subprocess.run([sys.executable, "bench.py", "--vocab_size=1000", f"--out={tmp_path / 'b.json'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode != 0
    assert p.stderr.strip() == "bench.py: vocab_size 1000 is smaller than the Llama 3 tokenizer's 128256 tokens the samples use"
    assert not (tmp_path / "b.json").exists()
