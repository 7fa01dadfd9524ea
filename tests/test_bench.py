"""bench.py in miniature (the 8b preset's code path with tiny shapes on the CPU): it times step.train_step itself,
the step train_cb.py runs, against the original recipe of tests/original.py, and profiles it; and
scripts/gpu_check.sh, the one GPU check, run through on the CPU."""

import json
import os
import runpy
import subprocess
import sys
import tarfile

import pytest

import bench
import step
from tiny import ROOT, tiny_base, tiny_data, train_cmd

TINY = ["--preset=8b", "--device=cpu", "--compile=False", "--dim=24", "--n_layers=3", "--n_heads=2", "--n_kv_heads=1",
        "--hidden_dim=48", "--layers=0,1", "--batch_size=2", "--n_warmup=1", "--n_steps=1", "--n_samples=60",
        "--ref_request_len=320", "--ref_response_len=64", "--ref_retain_len=320",
        "--ref_lm_head=False"]  # the reference's lm_head on: ~15 s a step here; gpu_check's dry run times it
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def spy_on_train_step(monkeypatch):
    """Replace step.train_step by a wrapper that records the settings of each call: a script that ran a copy of
    the step would leave the record empty."""
    calls, real = [], step.train_step

    def spy(*args, **kwargs):
        calls.append(args[6])  # cfg
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "train_step", spy)
    return calls


def run_script(monkeypatch, script, argv):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


@pytest.mark.slow
def test_bench_times_both_implementations_and_writes_their_figures(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "bench.py", *TINY, f"--out={out}"], capture_output=True, text=True,
                       cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "useful tokens/s" in p.stdout and "nanocb/ref" in p.stdout
    fig = json.loads(out.read_text())
    ours, ref = fig["nanocb"], fig["reference"]
    assert fig["blocks"] == 2 and fig["coefficients"]["c_rr"] > 0 and fig["coefficients"]["c_retain"] > 0
    # the same samples on both sides; the reference pads them to its fixed lengths, nanocb to the batch's longest
    assert ours["useful_tokens_per_step"] == ref["useful_tokens_per_step"] > 0
    assert ref["processed_tokens_per_step"] == 2 * (320 + 64) + 2 * 320
    assert ours["useful_tokens_per_step"] <= ours["processed_tokens_per_step"] < ref["processed_tokens_per_step"]
    for side in (ours, ref):
        assert side["step_s"] > 0 and side["useful_tokens_per_s"] > 0 and side["mfu"] > 0
        assert side["peak_mem_gib"] >= side["own_mem_gib"] > 0 and len(side["steps_s"]) == 2
    assert fig["ratio"]["useful_tokens_per_s"] == ours["useful_tokens_per_s"] / ref["useful_tokens_per_s"]
    assert fig["recipe"]["retain_call_weight"] == bench.train_cb_recipe()["retain_call_weight"]
    assert "profile" not in fig


def test_bench_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path):
    p = subprocess.run([sys.executable, "bench.py", "--vocab_size=1000", f"--out={tmp_path / 'b.json'}"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=60)
    assert p.returncode != 0
    assert p.stderr.strip() == ("bench.py: vocab_size 1000 is smaller than the Llama 3 tokenizer's 128256 tokens "
                                "the samples use")
    assert not (tmp_path / "b.json").exists()


def test_bench_refuses_a_pad_multiple_of_zero(tmp_path):
    p = subprocess.run([sys.executable, "bench.py", "--device=cpu", "--pad_multiple=0", f"--out={tmp_path / 'b.json'}"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=60)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
    assert "pad_multiple must be positive" in p.stderr and not (tmp_path / "b.json").exists()


def test_bench_times_and_profiles_step_train_step_itself_with_train_cb_defaults(monkeypatch, tmp_path, capsys):
    calls = spy_on_train_step(monkeypatch)
    out = tmp_path / "b.json"
    run_script(monkeypatch, "bench.py", [*TINY, "--reference=False", "--profile=True", "--grad_accum=2",
                                         f"--out={out}"])
    assert len(calls) == 1 + 1 + 3 + 3  # warm-up, timed, profiled, the profiled ones again without the profiler
    recipe = bench.train_cb_recipe()
    assert {k: calls[0][k] for k in ("retain_call_weight", "retain_len", "lorra_alpha", "redirect_weight")} == \
        {k: recipe[k] for k in ("retain_call_weight", "retain_len", "lorra_alpha", "redirect_weight")}
    assert calls[0]["layers"] == (0, 1) and calls[0]["grad_accum"] == 2
    fig = json.loads(out.read_text())
    assert "reference" not in fig and fig["ratio"]["useful_tokens_per_s"] is None
    prof = fig["profile"]
    assert prof["steps"] == [1, 1, 1] and len(prof["again_s"]) == 3
    assert list(prof["parts"]) == list(bench.PARTS)
    assert sum(prof["parts"].values()) == pytest.approx(prof["step_s"], rel=1e-6)  # idle closes the sum
    assert prof["parts"]["matmuls"] > 0 and prof["parts"]["LoRA path"] > 0 and prof["parts"]["optimizer"] > 0
    text = capsys.readouterr().out
    assert "costliest operators:" in text and "LoRA path" in text


def test_bench_can_warm_up_on_the_timed_batches_and_pad_to_a_multiple(monkeypatch, tmp_path):
    seen, real = [], step.train_step
    monkeypatch.setattr(step, "train_step", lambda *a, **k: seen.append((a[4], a[6]["pad_multiple"])) or real(*a, **k))
    out = tmp_path / "b.json"
    run_script(monkeypatch, "bench.py", [*TINY, "--reference=False", "--n_steps=2", "--warm_lengths=True",
                                         "--pad_multiple=16", "--alternate=False", f"--out={out}"])
    batches = [b for b, _ in seen]
    assert len(seen) == 4 and batches[:2] == batches[2:] and batches[0] != batches[1]  # each timed batch seen once
    assert {m for _, m in seen} == {16}
    fig = json.loads(out.read_text())["nanocb"]
    assert fig["processed_tokens_per_step"] % 16 == 0  # (a median of) 2 batches of 2 rows, each 16 x k long
    assert fig["processed_tokens_per_step"] >= fig["useful_tokens_per_step"] and fig["steps_compiles"] == [0] * 4
    # unpadded, the matmuls see the real tokens of each batch rounded up to the multiple: fewer than padded rows
    run_script(monkeypatch, "bench.py", [*TINY, "--reference=False", "--n_steps=2", "--warm_lengths=True",
                                         "--pad_multiple=16", "--unpad=True", f"--out={out}"])
    unpadded = json.loads(out.read_text())["nanocb"]
    assert unpadded["useful_tokens_per_step"] == fig["useful_tokens_per_step"]
    assert unpadded["useful_tokens_per_step"] <= unpadded["processed_tokens_per_step"] < fig["processed_tokens_per_step"]


def test_train_cb_runs_step_train_step_itself(monkeypatch, tmp_path):
    calls = spy_on_train_step(monkeypatch)
    base, data_dir = tiny_base(tmp_path / "base"), tiny_data(tmp_path / "data", n_train=48, n_val=4, n_test=4)
    run_script(monkeypatch, "train_cb.py", train_cmd(base, data_dir, tmp_path / "out")[1:])
    assert len(calls) == 2 and calls[0]["batch_size"] == 4  # --max_steps=2 of tiny's command line


@pytest.mark.parametrize("op, kernel, shapes, part", [
    ("aten::mm", "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", [[4800, 4096], [4096, 14336]], "matmuls"),
    ("aten::mm", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", [[4800, 4096], [4096, 16]], "LoRA path"),
    ("aten::mm", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_nn_n", [[16, 4800], [4800, 4096]], "LoRA path"),
    ("Torch-Compiled Region: 0/1", "triton_tem_fused_mm_0", [], "matmuls"),
    ("aten::_flash_attention_backward", "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", [],
     "attention"),
    ("aten::_efficient_attention_forward", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80", [], "attention"),
    ("## Call CompiledFxGraph ##", "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_3", [], "norms"),
    ("## Call CompiledFxGraph ##", "triton_poi_fused__to_copy_add_cat_cos_mul_neg_sin_5", [], "RoPE"),
    ("## Call CompiledFxGraph ##", "triton_poi_fused__to_copy_mul_native_dropout_7", [], "LoRA path"),
    ("## Call CompiledFxGraph ##", "triton_poi_fused__to_copy_12", [], "casts"),
    ("## Call CompiledFxGraph ##", "triton_poi_fused__to_copy_mul_silu_4", [], "other"),
    ("aten::_fused_adamw_", "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", [], "optimizer"),
    ("aten::_foreach_norm", "void at::native::multi_tensor_apply_kernel<LpNormFunctor>", [], "optimizer"),
    ("aten::copy_", "void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda, LoadWithCast>", [],
     "casts"),
    ("aten::copy_", "Memcpy HtoD (Pageable -> Device)", [], "other"),
    ("aten::mul", "void at::native::vectorized_elementwise_kernel<4, BinaryFunctor<c10::BFloat16>>", [], "other"),
    ("aten::bernoulli_", "", [[2, 9, 24]], "LoRA path"),
    ("aten::rsqrt", "", [[2, 9, 1]], "norms"),
])
def test_profile_parts_are_told_from_kernel_and_operator_names(op, kernel, shapes, part):
    assert bench.category(op, kernel, shapes, lora_r=16) == part


def test_profile_breakdown_sums_kernel_time_by_part_and_counts_the_rest_as_idle():
    from types import SimpleNamespace as Event
    from torch.autograd.profiler_util import Kernel
    events = [Event(name="aten::mm", input_shapes=[[64, 32], [32, 16]], self_cpu_time_total=50.0,
                    kernels=[Kernel("nvjet_hsh_64x8", 0, 3e5)]),
              Event(name="aten::mm", input_shapes=[[64, 32], [32, 96]], self_cpu_time_total=50.0,
                    kernels=[Kernel("nvjet_hsh_256x128", 0, 1.2e6), Kernel("nvjet_hsh_256x128", 0, 1.2e6)]),
              Event(name="aten::add", input_shapes=[], self_cpu_time_total=900.0, kernels=[])]  # CPU time alone
    parts, top = bench.breakdown(events, wall_s=6.0, steps=2, lora_r=16)
    assert parts == pytest.approx({**dict.fromkeys(bench.PARTS, 0.0), "LoRA path": 0.15, "matmuls": 1.2,
                                   "idle": 3.0 - 1.35})
    assert top[0] == (("nvjet_hsh_256x128", "matmuls"), 1.2) and len(top) == 2


def gpu_check(tmp_path, *args, **env):
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**ENV, "OUT": str(tmp_path / "out"), **env}, timeout=600)


PARTS = ("env", "bench", "tiny_setup", "tiny_train", "tiny_eval", "bench_unpad", "bench_lengths", "bench_autotune")


@pytest.mark.slow
def test_gpu_check_runs_every_part_through_on_the_cpu(tmp_path):
    p = gpu_check(tmp_path, "--cpu")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert p.returncode == 0, summary + p.stdout + p.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.tar.gz", "summary.txt"]  # two files come back
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    out = tmp_path / "unpacked"
    for name in PARTS:
        assert f"{name}: exit 0, " in summary and (out / f"{name}.log").exists()
    bench_ = json.loads((out / "bench.json").read_text())
    assert bench_["config"]["compile_blocks"] is True and "profile" in bench_ and "reference" in bench_
    assert json.loads((out / "bench_lengths.json").read_text())["recipe"]["pad_multiple"] == 1
    assert json.loads((out / "bench_unpad.json").read_text())["recipe"]["unpad"] is True
    autotune = json.loads((out / "bench_autotune.json").read_text())
    assert autotune["config"]["compile_mode"] == "max-autotune-no-cudagraphs" and "reference" not in autotune
    assert json.loads((out / "eval.json").read_text())["metrics"]["cb"] is not None
    assert (out / "train_log.jsonl").read_text().count("\n") >= 2
    assert "bench.json: cpu" in summary and "nanocb/reference" in summary and "profile, " in summary


@pytest.mark.slow
def test_gpu_check_goes_on_after_a_failing_part_and_says_which_failed(tmp_path):
    p = gpu_check(tmp_path, "--cpu", PYTHON="false")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert p.returncode == 1
    assert all(f"{name}: exit 1, " in summary for name in PARTS), summary
    p = gpu_check(tmp_path, "--cpu", BUDGET_S="10")  # no time for any part: each is skipped, and said so
    assert p.returncode == 1 and all(f"{name}: skipped" in p.stdout for name in PARTS), p.stdout
    p = gpu_check(tmp_path, "--cpu", PYTHON="false", PARTS="env tiny_eval")  # only the parts named
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary[:3]] == ["env", "tiny_eval", "--- figures"], summary
