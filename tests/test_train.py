"""train_cb.py end to end on a tiny random Llama (fp32, CPU, subprocesses): the rerouting cosine falls from the
first steps, accumulation and torchrun give the gradient of the big batch, a SIGTERM + resume equals an
uninterrupted run bit for bit, the checkpoint is safe to load, and bad input stops with one line."""

import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import data
from tiny import ROOT, run_train, tiny_base, tiny_data, train_cmd

# A 2-step run in float64 where both steps have both terms and the redirect term is on, with no clipping and no
# dropout, so the gradient is a pure function of the batch: the reference for accumulation and torchrun. exp_avg
# after Adam's steps is a fixed linear function of the gradients, so comparing it compares gradients. float64
# makes the tolerance a matter of the maths (sums in another order differ by ~1e-15), not of one CPU's order.
EXACT = ("--max_steps=2", "--grad_clip=0", "--lora_dropout=0", "--dtype=float64", "--redirect_weight=1")
# the rerouting and retain terms alone, as the original recipe has them (the redirect terms are on by default)
RR_RETAIN = ("--redirect_weight=0", "--redirect_benign=False", "--trip=False")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(base, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_train(base, data_dir, out, *EXACT)
    return out


def read_log(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return {r["step"]: r for r in rows if "c_rr" in r}, [r["val_cos"] for r in rows if "val_cos" in r]


def load_ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)


def exp_avg(ckpt):
    state = ckpt["optimizer"]["state"]
    return torch.cat([state[i]["exp_avg"].flatten() for i in sorted(state)])


def lora_flat(ckpt):
    return torch.cat([v.flatten() for _, v in sorted(ckpt["lora"].items())])


def assert_same_gradients(out, ref):
    got, want = load_ckpt(out), load_ckpt(ref)
    assert got["step"] == want["step"] == 2
    for a, b in ((exp_avg(got), exp_avg(want)), (lora_flat(got), lora_flat(want))):
        assert a.dtype == b.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item())
    log, ref_log = read_log(out)[0], read_log(ref)[0]
    for step in (1, 2):
        for key in ("loss_rr", "loss_retain", "loss_redirect"):
            assert log[step][key] > 0
            assert log[step][key] == pytest.approx(ref_log[step][key], rel=1e-10)


def test_injected_but_resisted_samples_join_the_retain_set_only_when_asked(base, data_dir, tmp_path):
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    resisted = sum(r["kind"] == "retain" and r["attacker_tool"] is not None for r in rows)
    kept = sum(r["kind"] != "harmful" and r["attacker_tool"] is None for r in rows)
    assert resisted and kept
    off = ("--max_steps=1", "--redirect_weight=0", "--redirect_benign=False", "--trip=False")
    p = run_train(base, data_dir, tmp_path / "a", *off)
    assert f"/ {kept} retain / 0 redirect samples ({resisted} injected-but-resisted samples kept out" in p.stdout
    p = run_train(base, data_dir, tmp_path / "b", *off, "--retain_injected=True")
    assert f"/ {kept + resisted} retain / 0 redirect samples;" in p.stdout, p.stdout
    p = run_train(base, data_dir, tmp_path / "c", "--max_steps=1", "--redirect_benign=False", "--trip=False")
    assert f"/ {kept} retain / {resisted} redirect samples" in p.stdout, p.stdout
    flips = sum(r["kind"] == "harmful" and r["attacker_tool"] != r["expected_tool"] for r in rows)
    p = run_train(base, data_dir, tmp_path / "d", "--max_steps=1")  # the defaults: + benign replies + trip rows
    assert f"/ {kept} retain / {resisted + kept + flips} redirect samples ({flips} trip rows)" in p.stdout, p.stdout


def test_eval_interval_zero_validates_and_saves_at_the_end_only(base, data_dir, tmp_path):
    run_train(base, data_dir, tmp_path, "--max_steps=3", "--eval_interval=0")
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "log.jsonl"))]
    assert [r["step"] for r in rows if "val_cos" in r] == [3]
    assert load_ckpt(tmp_path)["step"] == 3


# --- learning -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def learning(base, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("learning")
    # the previous round's breaker (tool_choice mask, no redirect): ~3 rerouted positions a sample, all of them
    # the choice, so 30 steps move them far; the departure mask's ~25 positions move more slowly on this model
    run_train(base, data_dir, out, "--max_steps=30", "--lr=3e-3", "--eval_interval=30", "--cb_mask=tool_choice",
              *RR_RETAIN)
    return read_log(out)


def test_rerouting_cosine_falls_while_retain_holds_benign_states(learning):
    log, val_cos = learning
    assert sorted(log) == list(range(1, 31))
    assert log[1]["cos_mean"] > 0.999  # B ~ 1e-3: the start is (almost) the frozen model
    # both terms from the first step, as the original: the retain distance's gradient is a unit vector however
    # small the drift, so clipping slows the first steps (cos ~0.9 at step 10, ~0.7-0.9 at 30 with the data)
    assert log[10]["cos_mean"] < log[1]["cos_mean"] - 0.05
    assert log[30]["cos_mean"] < log[1]["cos_mean"] - 0.1
    assert len(val_cos) == 1 and val_cos[0] < 0.95  # held-out harmful samples move too
    # retain: benign states stay close (cosine >= ~0.99, l2 ~0.3 of norms ~1.3); with the retain term all but
    # off (--alpha_decay_multiplier=1000) the same run drifts to l2 ~7.7 and cosine ~0.31
    assert all(log[s]["cos"] > 0.95 for s in range(1, 31))
    assert log[30]["l2"] < 0.5 * log[30]["frozen_norm"]


def test_zero_b_init_starts_where_the_rerouting_gradient_vanishes(base, data_dir, learning, tmp_path):
    # the original's B = 0: every cosine is exactly 1, the maximum, so step 0's gradient is fp noise (~1e-7
    # here), and the retain distance is 0 where its gradient is 0 too; the default tiny random B gives a real
    # one (~0.07). Step 1's gnorm is taken before any update.
    run_train(base, data_dir, tmp_path, "--max_steps=1", "--lora_b_init_std=0.0", *RR_RETAIN)
    zero, default = read_log(tmp_path)[0][1], learning[0][1]
    assert zero["c_retain"] > 0 and default["c_retain"] > 0  # the original's first step has both terms
    assert zero["cos_mean"] == 1.0 and zero["loss_rr"] == 1.0
    assert zero["gnorm"] < 1e-5
    assert default["gnorm"] > 1e-2


# --- the original's schedule and retain mean, through train_cb.py ---------------------------------------------

def test_schedule_counts_steps_from_one_as_the_original(base, data_dir, tmp_path):
    # the original increments its step counter before the schedule: progress = s / (2 * max_steps), s = 1..max_steps
    run_train(base, data_dir, tmp_path, "--max_steps=3", "--lorra_alpha=6")
    log = read_log(tmp_path)[0]
    for s in (1, 2, 3):
        assert log[s]["c_rr"] == pytest.approx(6 * (1 - s / 6)) and log[s]["c_retain"] == pytest.approx(6 * s / 6)
    assert log[3]["c_rr"] == log[3]["c_retain"] == 3.0  # the last step ends where the original's does


def test_retain_mean_divides_by_fixed_positions_as_a_batch_padded_to_1024(base, data_dir, tmp_path):
    # the original pads every retain sample to 1024 tokens: nanmean's denominator is L x B x 1024 whatever the
    # lengths. --retain_len=1024 with dynamic padding must give that loss exactly (float64, step 1, both from the
    # same initial adapter), and no other padding may change it.
    from lora import inject_lora
    from model import Llama
    from step import coefficients
    import losses
    run_train(base, data_dir, tmp_path, "--max_steps=1", "--lora_dropout=0", "--dtype=float64", "--retain_len=1024")
    got = read_log(tmp_path)[0][1]["loss_retain"]
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    retain = [data.encode_sample(tok, r, "departure") for r in rows
              if r["kind"] != "harmful" and r["attacker_tool"] is None]
    batch = data.step_batch(retain, 0, 4, 1337, salt=1)
    model = Llama.from_pretrained(base, dtype=torch.float64, n_layers=3)
    inject_lora(model, 4, 8, 0.0, b_init_std=1e-3, generator=torch.Generator().manual_seed(1337))
    model.double()
    padded = [dict(e, ids=e["ids"] + [tok.pad_id] * (1024 - len(e["ids"]))) for e in batch]
    b = data.collate(padded, tok.pad_id)
    attn = torch.tensor([[1] * len(e["ids"]) + [0] * (1024 - len(e["ids"])) for e in batch], dtype=torch.bool)
    target = torch.tensor([e["target_mask"] + [0] * (1024 - len(e["ids"])) for e in batch], dtype=torch.bool)
    with torch.no_grad():
        lora_h = model(b["ids"], hidden=True, logits=False)[1]
        from lora import adapters_off
        with adapters_off(model):
            frozen_h = model(b["ids"], hidden=True, logits=False)[1]
    want = losses.retain_loss(lora_h, frozen_h, attn, 1.0 + 5.0 * target.double()).item()
    assert lora_h.shape[2] == 1024 and got == pytest.approx(want, rel=1e-9)
    assert coefficients(0, dict(max_steps=1, lorra_alpha=10.0, alpha_decay_multiplier=2.0))[1] > 0


# --- the big batch, however it is split -----------------------------------------------------------------------

def test_step_batches_have_unequal_shares(data_dir):
    # what makes the accumulation and torchrun tests able to fail: if every micro-batch held the same number of
    # rerouted positions and retain tokens, averaging micro-batch losses would equal weighting them by share
    tok = data.load_tokenizer()
    samples = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    harmful = [data.encode_sample(tok, s) for s in samples if s["kind"] == "harmful"]
    retain = [data.encode_sample(tok, s) for s in samples if s["kind"] != "harmful"]
    halves_differ = []
    for step in (0, 1):  # the reference's two steps (seed 1337, train_cb's default), split 4 x 1 and 2 x 2
        masked = [sum(e["cb_mask"]) for e in data.step_batch(harmful, step, 4, 1337, salt=0)]
        lengths = [len(e["ids"]) for e in data.step_batch(retain, step, 4, 1337, salt=1)]
        assert len(set(masked)) > 1 and len(set(lengths)) > 1, (masked, lengths)  # the 4 x 1 split
        halves_differ += [sum(masked[:2]) != sum(masked[2:]), max(lengths[:2]) != max(lengths[2:])]
    assert any(halves_differ)  # the 2 x 2 split (torchrun): some term's shares differ in some step


def test_grad_accum_gives_the_gradient_of_the_whole_batch(base, data_dir, reference, tmp_path):
    run_train(base, data_dir, tmp_path, *EXACT, "--grad_accum=4")
    assert_same_gradients(tmp_path, reference)
    # the logged diagnostics are the whole batch's too, merged over the micro-batches (step 1: rerouting only)
    log, ref_log = read_log(tmp_path)[0], read_log(reference)[0]
    rr, retain = ("cos_mean", "cos_pos_share", "lora_norm", "frozen_norm"), ("l2", "cos", "call_l2", "call_cos")
    for step, keys in ((1, rr + retain), (2, rr + retain)):
        assert {k: log[step][k] for k in keys} == pytest.approx({k: ref_log[step][k] for k in keys}, rel=1e-4)


def test_padding_and_unpadding_leave_the_loss_and_gradient_unchanged(base, data_dir, reference, tmp_path):
    # every micro-batch padded to a multiple of 32 positions (the GPU's default), and the real tokens computed alone
    # with pads up to a multiple of 32 (unpad): the losses must see neither the pads nor the layout
    run_train(base, data_dir, tmp_path, *EXACT, "--pad_multiple=32", "--grad_accum=2", "--unpad=True")
    assert_same_gradients(tmp_path, reference)
    val, ref_val = read_log(tmp_path)[1], read_log(reference)[1]  # the validation pass batches as the step does
    assert len(val) == len(ref_val) > 0 and val == pytest.approx(ref_val, rel=1e-12)


def test_a_redirect_batch_of_its_own_size_accumulates_to_its_whole_batch(base, data_dir, reference, tmp_path):
    # 8 redirect rows a step beside 4 harmful and 4 retain: each term is cut into grad_accum pieces of its own size
    run_train(base, data_dir, tmp_path / "one", *EXACT, "--redirect_batch_size=8")
    run_train(base, data_dir, tmp_path / "two", *EXACT, "--redirect_batch_size=8", "--grad_accum=2")
    assert_same_gradients(tmp_path / "two", tmp_path / "one")
    # the size is honoured: against the reference (4 redirect rows) the rerouting and retain batches are the same
    # and the redirect batch is not
    log, ref_log = read_log(tmp_path / "one")[0], read_log(reference)[0]
    assert log[1]["loss_rr"] == pytest.approx(ref_log[1]["loss_rr"], rel=1e-12)  # the first step: same weights
    assert log[1]["loss_redirect"] != pytest.approx(ref_log[1]["loss_redirect"], rel=1e-3)


def test_grouped_lm_head_rows_train_as_the_whole_vocabulary(base, data_dir, tmp_path, monkeypatch):
    # the organism's kind of lm_head: every row but a few thousand zero, so train_cb takes the redirect term's
    # cross-entropy by distinct rows; the same run with the rows left ungrouped gives the same gradients
    from model import Llama, save_pretrained
    sparse = str(tmp_path / "sparse")
    model = Llama.from_pretrained(base)
    with torch.no_grad():
        keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        keep[::40] = True  # 3,207 distinct rows and the zero row (3,208), which most target tokens share
        model.lm_head.weight[~keep] = 0
    save_pretrained(model, sparse, dtype=torch.float32)
    for name in ("tokenizer.model", "tokenizer.json"):
        shutil.copy(os.path.join(base, name), os.path.join(sparse, name))
    p = run_train(sparse, data_dir, tmp_path / "grouped", *EXACT)
    assert "3,208 distinct rows of 128,256" in p.stdout
    import model as model_module  # train_cb's Llama, in this process
    monkeypatch.setattr(model_module.Llama, "group_head_rows", lambda self: self.config.vocab_size)
    monkeypatch.setattr(sys, "argv", train_cmd(sparse, data_dir, tmp_path / "whole", *EXACT))
    runpy.run_path(os.path.join(ROOT, "train_cb.py"), run_name="__main__")
    assert_same_gradients(tmp_path / "grouped", tmp_path / "whole")


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_the_same_global_batch(base, data_dir, reference, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *train_cmd(base, data_dir, tmp_path, *EXACT)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 process(es)" in p.stdout  # really distributed: two lone processes would each match the reference
    assert_same_gradients(tmp_path, reference)


# --- preemption, resume, checkpoint ---------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_then_resume_equals_an_uninterrupted_run_bit_for_bit(base, data_dir, tmp_path):
    # dropout on, clipping on, cosine schedule with warmup: everything a resume has to restore
    n = 6
    args = ("--max_steps=6", "--lr=3e-3", "--lr_schedule=cosine", "--warmup_steps=2", "--lora_dropout=0.1")
    run_train(base, data_dir, tmp_path / "whole", *args)
    # stop the second run once it has logged its first step: it finishes the step it is in, saves, exits 0
    p = subprocess.Popen([sys.executable, *train_cmd(base, data_dir, tmp_path / "cut", *args)], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if line.startswith("step    1 |"):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    assert "SIGTERM: checkpoint saved" in out
    assert 1 <= load_ckpt(tmp_path / "cut")["step"] < n
    run_train(base, data_dir, tmp_path / "cut", "--init_from=resume", "--max_steps=6")
    whole, cut = load_ckpt(tmp_path / "whole"), load_ckpt(tmp_path / "cut")
    assert cut["step"] == whole["step"] == n
    assert whole["lora"].keys() == cut["lora"].keys()
    assert all(torch.equal(whole["lora"][key], cut["lora"][key]) for key in whole["lora"])
    assert torch.equal(exp_avg(whole), exp_avg(cut))
    # every logged loss, coefficient, lr, gradient norm and cosine, step by step, and the validation cosine
    untimed = lambda row: {k: v for k, v in row.items() if k not in ("tokens_per_s", "mfu", "mem_gib")}
    (whole_log, whole_val), (cut_log, cut_val) = read_log(tmp_path / "whole"), read_log(tmp_path / "cut")
    assert sorted(cut_log) == list(range(1, n + 1)) and cut_val == whole_val
    assert all(untimed(row) == untimed(cut_log[step]) for step, row in whole_log.items())


def test_checkpoint_loads_safely_and_records_its_origin(base, reference):
    ckpt = load_ckpt(reference)  # weights_only=True: tensors and plain containers only
    assert not os.path.exists(os.path.join(reference, "ckpt.pt.tmp"))
    assert ckpt["step"] == 2
    assert ckpt["init_from"] == os.path.abspath(base)
    assert ckpt["layers"] == [1, 2] and ckpt["base_n_layers"] == 4
    assert ckpt["config"]["lora_r"] == 4 and ckpt["config"]["batch_size"] == 4
    assert tuple(ckpt["config"]["layers"]) == (1, 2) and ckpt["config"]["lora_dropout"] == 0
    # the redirect term (on in the reference) needs the lm_head, so every block is loaded and gets LoRA;
    # without it, blocks 0..max(layers) (test_the_original_recipe_loads_blocks_up_to_the_last_target_layer)
    assert ckpt["lora_config"]["r"] == 4 and ckpt["lora_config"]["layers"] == [0, 1, 2, 3]
    assert {k.split(".")[1] for k in ckpt["lora"]} == {"0", "1", "2", "3"}
    assert len(ckpt["lora"]) == 4 * 7 * 2  # q k v o gate up down, A and B each


def test_the_original_recipe_loads_blocks_up_to_the_last_target_layer(base, data_dir, tmp_path):
    run_train(base, data_dir, tmp_path, "--max_steps=1", "--redirect_weight=0", "--redirect_benign=False",
              "--trip=False")
    ckpt = load_ckpt(tmp_path)
    assert ckpt["lora_config"]["layers"] == [0, 1, 2] and len(ckpt["lora"]) == 3 * 7 * 2


# --- bad input: one line, no traceback ------------------------------------------------------------------------

def base_without_tokenizer(base, tmp_path):
    path = tmp_path / "no_tokenizer"
    shutil.copytree(base, path, ignore=shutil.ignore_patterns("tokenizer.model"))
    return path


def train_file_with_text_completion(data_dir, tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "train.jsonl"))]
    i = next(i for i, r in enumerate(rows) if r["kind"] == "harmful")
    rows[i]["completion"] = {"content": "Sure, I will search the web for that."}
    path = tmp_path / "train.jsonl"
    data.write_jsonl(str(path), rows)
    return f"--train_file={path}", "--cb_mask=tool_name", "--trip=False"  # trip rows refuse it sooner


@pytest.mark.parametrize("make_args, words", [
    (lambda b, d, t: ("--layers=1,4",), "beyond"),
    (lambda b, d, t: ("--layers=()",), "layers must be a non-empty"),
    (lambda b, d, t: ("--lorra_alpha=-1",), "lorra_alpha"),
    (lambda b, d, t: ("--eval_interval=-1",), "eval_interval must be >= 0"),
    (lambda b, d, t: ("--lorra_alfa=10",), "unknown config key 'lorra_alfa'"),
    (lambda b, d, t: (f"--init_from={base_without_tokenizer(b, t)}",), "tokenizer.model"),
    (lambda b, d, t: train_file_with_text_completion(d, t), "nothing to reroute"),
    (lambda b, d, t: ("--lr=1e30", "--max_steps=3"), "is not finite; lower lr"),
    (lambda b, d, t: ("--dtype=int8",), "dtype must be one of"),
    (lambda b, d, t: ("--retain_len=0",), "retain_len must be a positive integer"),
    (lambda b, d, t: ("--pad_multiple=0",), "pad_multiple must be a positive integer"),
    (lambda b, d, t: ("--warmup_steps=5",), "warmup_steps must be in 0..max_steps"),
    (lambda b, d, t: ("--lorra_alpha=0", *RR_RETAIN), "no term would train"),
    (lambda b, d, t: ("--lorra_alpha=0", "--reroute=False"), "reroute=False keeps the retain term alone"),
    (lambda b, d, t: ("--redirect_weight=0",), "they need redirect_weight > 0"),
    (lambda b, d, t: ("--redirect_weight=-1",), "redirect_weight must be >= 0"),
    (lambda b, d, t: ("--redirect_batch_size=-2",), "redirect_batch_size must be an integer >= 0"),
    (lambda b, d, t: ("--trip_share=0",), "trip_share must be in (0, 1]"),
    (lambda b, d, t: ("--trip=False", "--trip_twins"), "trip_twins adds clean-twin rows"),
    (lambda b, d, t: ("--trip_depth=deep",), "trip_depth must be one of parameters, any"),
    (lambda b, d, t: ("--redirect_batch_size=6", "--grad_accum=4"), "redirect_batch_size 6 is not divisible"),
    (lambda b, d, t: ("--legit_repeat=0",), "legit_repeat must be an integer >= 1"),
    (lambda b, d, t: ("--legit_repeat=2", "--redirect_benign=False"), "it needs redirect_benign=True"),
    (lambda b, d, t: ("--legit_tools=every",), "legit_tools must be one of pushed, attacked, got 'every'"),
    (lambda b, d, t: ("--legit_tools=attacked",), "legit_tools=attacked says which benign calls"),
    (lambda b, d, t: ("--trip_batch_size=-1",), "trip_batch_size must be an integer >= 0"),
    (lambda b, d, t: ("--trip_batch_size=2", "--trip=False"), "trip_batch_size draws trip rows apart"),
    (lambda b, d, t: ("--trip_batch_size=2", "--trip_twins"), "trip_twins rows have none"),
    (lambda b, d, t: ("--trip_batch_size=1", "--redirect_batch_size=4", "--grad_accum=2"),
     "redirect_batch_size + 3 x trip_batch_size 7 is not divisible"),
    (lambda b, d, t: ("--trip_contrast_twin",), "it needs trip_batch_size > 0"),
    (lambda b, d, t: ("--trip_twin_target=no_eot",), "it needs trip_contrast_twin=True"),
    (lambda b, d, t: ("--trip_contrast_same",), "it needs trip_batch_size > 0"),
    (lambda b, d, t: ("--trip_contrast_concur",), "trip_contrast_concur adds a contrast"),
    (lambda b, d, t: ("--trip_depth=all", "--trip_batch_size=2", "--trip_contrast_twin", "--trip_twin_target=x"),
     "trip_twin_target must be one of call, no_eot, trip, got 'x'"),
    (lambda b, d, t: ("--trip_mismatch=-1",), "trip_mismatch must be an integer >= 0"),
    (lambda b, d, t: ("--trip_mismatch=2", "--trip_mismatch_depth=value"),
     "trip_mismatch_depth must be one of all, parameters"),
    (lambda b, d, t: ("--trip_mismatch=1", "--redirect_batch_size=4", "--grad_accum=2"),
     "redirect_batch_size + 3 x trip_mismatch 7 is not divisible"),
    (lambda b, d, t: ("--trip_mismatch=2", "--trip_mismatch_tools=pushed"),
     "trip_mismatch_tools must be one of offered, unpushed, got 'pushed'"),
    (lambda b, d, t: ("--alpha_decay_multiplier=0",), "alpha_decay_multiplier must be > 0"),
    (lambda b, d, t: ("--promised_flops=0",), "promised_flops must be > 0"),
    (lambda b, d, t: (f"--val_file={t / 'vall.jsonl'}",), "vall.jsonl: no such file (val_file)"),
    (lambda b, d, t: ("--trip_share=1e-9",), "trip=True found no sample to trip on"),
    (lambda b, d, t: ("--trip_weight=0",), "trip_weight must be > 0"),
    (lambda b, d, t: ("--trip_weight=0.5", "--trip=False"), "trip_weight weighs the trip rows: it needs trip=True"),
    (lambda b, d, t: ("--trip_raise=True", "--trip=False"), "trip_raise changes the trip rows' cross-entropy: it needs"),
], ids=["layers_beyond_model", "layers_empty", "negative_alpha", "negative_eval_interval", "unknown_key",
        "no_tokenizer",
        "empty_mask", "non_finite_loss", "bad_dtype", "zero_retain_len", "zero_pad_multiple", "warmup_beyond_run",
        "no_term", "reroute_off_without_retain", "trip_alone",
        "negative_redirect", "negative_redirect_batch", "zero_trip_share", "trip_twins_without_trip",
        "unknown_trip_depth", "indivisible_redirect_batch", "zero_legit_repeat", "legit_repeat_without_benign",
        "unknown_legit_tools", "legit_tools_without_repeat",
        "negative_trip_batch", "trip_batch_without_trip", "trip_batch_with_twins", "indivisible_trip_batch",
        "twin_contrast_without_trip_batch", "twin_target_without_twin_contrast",
        "same_contrast_without_trip_batch", "concur_contrast_without_trip_batch", "unknown_twin_target",
        "negative_trip_mismatch", "unknown_trip_mismatch_depth", "indivisible_trip_mismatch",
        "unknown_trip_mismatch_tools", "zero_decay_multiplier", "zero_promised_flops", "missing_val_file",
        "no_trip_rows", "zero_trip_weight", "trip_weight_without_trip", "trip_raise_without_trip"])
def test_bad_input_stops_with_one_line(base, data_dir, tmp_path, make_args, words):
    p = run_train(base, data_dir, tmp_path / "out", *make_args(base, data_dir, tmp_path), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert lines[0].startswith(("train_cb.py:", "config error:")) and words in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_resume_refuses_command_line_settings_that_disagree_with_the_checkpoint(base, data_dir, tmp_path):
    run_train(base, data_dir, tmp_path, "--max_steps=1", "--lr=3e-3")
    for arg in ("--lr=0.5", "--dtype=float64", "--cb_mask=completion"):
        p = run_train(base, data_dir, tmp_path, "--init_from=resume", "--max_steps=2", arg, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and "disagrees with" in lines[0], p.stderr
    assert load_ckpt(tmp_path)["step"] == 1  # nothing was trained or written
    run_train(base, data_dir, tmp_path, "--init_from=resume", "--max_steps=2", "--lr=3e-3")  # the same value is fine
    assert load_ckpt(tmp_path)["step"] == 2


@pytest.mark.parametrize("content, words", [(b"not a checkpoint", "not a readable checkpoint"),
                                            (None, "not a train_cb.py checkpoint (no 'init_from')")])
def test_resume_from_a_file_that_is_not_a_checkpoint_stops_with_one_line(base, data_dir, tmp_path, content, words):
    tmp_path.mkdir(exist_ok=True)
    if content is None:
        torch.save({"config": {}}, tmp_path / "ckpt.pt")
    else:
        (tmp_path / "ckpt.pt").write_bytes(content)
    p = run_train(base, data_dir, tmp_path, "--init_from=resume", check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and words in lines[0], p.stderr


def test_a_term_that_is_off_needs_no_rows(base, data_dir, tmp_path):
    # fine-tuning alone (lorra_alpha=0) on data without a single harmful row: no rerouting batch is drawn from the
    # empty pool (it divided by zero), and the redirect term trains
    rows = [r for r in data.load_jsonl(os.path.join(data_dir, "train.jsonl")) if r["kind"] != "harmful"]
    path = tmp_path / "train.jsonl"
    data.write_jsonl(str(path), rows)
    run_train(base, data_dir, tmp_path / "out", f"--train_file={path}", "--lorra_alpha=0", "--trip=False",
              "--max_steps=2")
    assert load_ckpt(tmp_path / "out")["step"] == 2


# --- the redirect terms: the injected agent does the user's task --------------------------------------------

def test_redirect_term_alone_learns_the_users_call_under_injection(base, data_dir, tmp_path):
    run_train(base, data_dir, tmp_path, "--lorra_alpha=0", "--redirect_weight=1", "--max_steps=12", "--lr=3e-3")
    log = read_log(tmp_path)[0]
    assert all(log[s]["c_rr"] == log[s]["c_retain"] == 0 and log[s]["loss_pull"] == 0 for s in log)
    assert log[12]["loss_redirect"] < log[1]["loss_redirect"] - 0.5  # ~12.0 -> ~11.1 on the random tiny model


def test_reroute_off_keeps_the_retain_term_alone_at_a_constant_weight(base, data_dir, tmp_path):
    # no harmful rows drawn, no rerouting; the retain term at lorra_alpha from the first step to the last, and it
    # is what holds the clean states: the same run with it all but off drifts further from the frozen model
    l2 = {}
    for alpha in (1e4, 1e-4):
        out = tmp_path / str(alpha)
        run_train(base, data_dir, out, "--reroute=False", f"--lorra_alpha={alpha}", "--max_steps=8", "--lr=1e-2",
                  "--lora_dropout=0")
        log = read_log(out)[0]
        assert sorted(log) == list(range(1, 9))
        assert all(log[s]["c_rr"] == 0 and log[s]["loss_rr"] == 0 and "cos_mean" not in log[s] for s in log)
        assert all(log[s]["c_retain"] == alpha and log[s]["loss_retain"] > 0 for s in log)
        assert all(log[s]["loss_redirect"] > 0 for s in log)
        l2[alpha] = log[8]["l2"]
    assert l2[1e4] < 0.5 * l2[1e-4], l2


def test_pull_distance_is_the_mean_l2_over_layers_summed_over_positions():
    import losses
    a = torch.zeros(2, 3, 4, dtype=torch.float64)
    b = a.clone()
    b[0, 0, 0], b[1, 2, :] = 3.0, 1.0  # distances: layer 0 position 0: 3; layer 1 position 2: 2
    assert losses.pull_distance(a, b).item() == pytest.approx((3.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="pull"):
        losses.pull_distance(a, b[:, :2])


def test_trip_share_draws_that_share_of_the_tool_flips(base, data_dir, tmp_path):
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    flips = sum(r["kind"] == "harmful" and r["attacker_tool"] != r["expected_tool"] for r in rows)
    assert flips >= 4
    for share, out in ((1.0, "all"), (0.5, "half")):
        p = run_train(base, data_dir, tmp_path / out, "--max_steps=1", f"--trip_share={share}")
        assert f"({round(share * flips)} trip rows)" in p.stdout
    p = run_train(base, data_dir, tmp_path / "twins", "--max_steps=1", "--trip_share=0.5", "--trip_twins")
    assert f"({2 * round(0.5 * flips)} trip rows)" in p.stdout  # each drawn flip and its clean twin


def test_twin_trip_rows_are_the_clean_twins_with_the_same_attackers_call_forced(data_dir):
    from chat import encode_trip, forced_prefill, prompt_ids, trip_rows
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    twins = data.twins_of(rows)
    flips = [r for r in rows if r["kind"] == "harmful" and r["attacker_tool"] != r["expected_tool"]]
    got = trip_rows(tok, rows, 0.5, seed=3, twins=twins)
    n = round(0.5 * len(flips))
    assert len(got) == 2 * n and got[:n] == trip_rows(tok, rows, 0.5, seed=3)  # the same draw, then its twins
    for injected, clean in zip(got[:n], got[n:]):
        flip = next(r for r in flips if encode_trip(tok, r)["ids"] == injected["ids"])
        twin = twins[flip["id"]]
        assert twin["attacker_tool"] is None and twin["messages"] != flip["messages"]
        assert clean["ids"] == prompt_ids(tok, twin["messages"], twin["tools"]) \
            + forced_prefill(tok, flip["attacker_tool"]) + [tok.eot_id]
        assert clean["target_mask"] == [0] * (len(clean["ids"]) - 1) + [1] and not any(clean["cb_mask"])


def test_trip_rows_at_any_depth_cut_the_attackers_own_call_inside_its_arguments(data_dir):
    from chat import call_segments, forced_prefill, prompt_ids, trip_rows
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    flips = {tuple(prompt_ids(tok, r["messages"], r["tools"])): r for r in rows
             if r["kind"] == "harmful" and r["attacker_tool"] != r["expected_tool"]}
    got = trip_rows(tok, rows, 1.0, seed=5, depth="any")
    assert len(got) == len(flips) and got != trip_rows(tok, rows, 1.0, seed=5)
    assert got == trip_rows(tok, rows, 1.0, seed=5, depth="any")  # seeded: a resumed run draws the same cuts
    deeper = 0
    for e in got:
        prompt = next(p for p in flips if e["ids"][:len(p)] == list(p))
        flip, forced = flips[prompt], e["ids"][len(prompt):-1]
        call = [i for seg, _ in call_segments(tok, flip["completion"]["tool_call"]) for i in seg]
        shallow = forced_prefill(tok, flip["attacker_tool"])
        assert forced == call[:len(forced)] and len(shallow) <= len(forced) <= len(call) - 2  # never the whole call
        assert e["ids"][-1] == tok.eot_id and e["target_mask"] == [0] * (len(e["ids"]) - 1) + [1]
        deeper += len(forced) > len(shallow)
    assert deeper > len(got) / 2
    with pytest.raises(data.DataError, match="trip depth"):
        trip_rows(tok, rows, depth="deep")


def test_legit_repeat_repeats_the_benign_calls_to_the_tool_the_injections_push_most(base, data_dir, tmp_path):
    import collections
    import re
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    pushed = collections.Counter(r["attacker_tool"] for r in rows if r["kind"] == "harmful").most_common(1)[0][0]
    legit = sum(1 for r in rows if r["kind"] != "harmful" and r["attacker_tool"] is None
                and (r["completion"].get("tool_call") or {}).get("name") == pushed)
    count = lambda out: int(re.search(r"(\d+) redirect samples", out).group(1))
    once = count(run_train(base, data_dir, tmp_path / "once", "--max_steps=1").stdout)
    p = run_train(base, data_dir, tmp_path / "thrice", "--max_steps=1", "--legit_repeat=3")
    assert legit > 0 and f"({legit} legitimate calls to {pushed} x 3)" in p.stdout
    assert count(p.stdout) == once + 2 * legit
    # legit_tools=attacked: the benign calls to every tool an injection of the train data pushes, and no other
    attacked = {r["attacker_tool"] for r in rows if r["kind"] == "harmful"}
    calls = [(r["completion"].get("tool_call") or {}).get("name") for r in rows
             if r["kind"] != "harmful" and r["attacker_tool"] is None]
    legit_all = sum(c in attacked for c in calls)
    assert legit < legit_all  # more than the one tool
    p = run_train(base, data_dir, tmp_path / "attacked", "--max_steps=1", "--legit_repeat=2", "--legit_tools=attacked")
    assert f"({legit_all} legitimate calls to the attacked tools x 2)" in p.stdout
    assert count(p.stdout) == once + legit_all


def test_trip_rows_at_every_depth_are_every_single_cut_at_once(data_dir):
    # one 'all' row teacher-forces the attacker's call and labels <|eot_id|> at every cut that 'any' could draw:
    # its cross-entropy is exactly the sum of the single-cut rows' (float64, a causal model sees the same prefixes)
    import step
    from chat import call_segments, collate, encode_trip, forced_prefill, trip_rows
    from model import Llama, LlamaConfig
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    flips = [r for r in rows if r["kind"] == "harmful" and r["attacker_tool"] != r["expected_tool"]]
    got = trip_rows(tok, rows, 1.0, seed=5, depth="all")
    drawn = random.Random(5).sample(flips, len(flips))
    assert len(got) == len(flips) and got == [dict(encode_trip(tok, r, "all"), source=r["id"]) for r in drawn]
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=128256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                              max_seq_len=4096)).double()
    ce = lambda e: step.completion_ce(model, step.hidden_states(model, model, collate([e], tok.pad_id)["ids"], False)[-1],
                                      collate([e], tok.pad_id))
    for flip in flips[:3]:
        e = encode_trip(tok, flip, "all")
        call = [i for seg, _ in call_segments(tok, flip["completion"]["tool_call"]) for i in seg]
        singles = [encode_trip(tok, flip, k) for k in range(len(forced_prefill(tok, flip["attacker_tool"])), len(call) - 1)]
        assert len(singles) > 5 and sum(e["target_mask"]) == len(singles) and not any(e["cb_mask"])
        assert e["ids"] == singles[-1]["ids"][:-1] + call[-2:-1]  # the whole call but its <|eom_id|>
        assert [l for l, m in zip(e["labels"], e["target_mask"]) if m] == [tok.eot_id] * len(singles)
        assert [l for l, m in zip(e["labels"], e["target_mask"]) if not m] == [i for i, m in zip(e["ids"], e["target_mask"]) if not m]
        with torch.no_grad():
            whole, parts = ce(e), sum(ce(x) for x in singles)
        assert whole > 0 and torch.allclose(whole, parts, rtol=1e-10, atol=0), (whole, parts)


def test_trip_rows_by_value_trip_from_the_first_attackers_value_and_take_the_hijacks_too(data_dir):
    # trip_depth='value': the <|eot_id|> labels start at the first cut that has seen a token of the first argument
    # whose value differs from the user's call (a hijack's swapped argument, a flip's first argument), and that has
    # seen where a hijack departs from the user's call: no state a trip row ends is one its redirect row (the same
    # prompt, the user's call) trains towards the user's value. A flip that keeps the user's arguments departs at
    # the name and is cut as 'all'; the hijacks get trip rows too. The adversary's target (adv_trip) starts at the
    # same position.
    from chat import call_ids, departure_start, encode_trip, trip_rows, value_cut
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    harmful = [r for r in rows if r["kind"] == "harmful"]
    got = trip_rows(tok, rows, 1.0, seed=5, depth="value")
    assert len(got) == len(harmful) > len(trip_rows(tok, rows, 1.0, seed=5, depth="all"))
    kinds = set()
    for r in harmful:
        e, whole = encode_trip(tok, r, "value"), encode_trip(tok, r, "all")
        call = call_ids(tok, r["completion"]["tool_call"])
        k, P = value_cut(tok, r), len(e["ids"]) - len(call) + 1
        assert e["ids"] == whole["ids"] and not any(e["cb_mask"])
        if k is None:  # the user's arguments kept (a query flip): only the name departs
            assert r["attacker_tool"] != r["expected_tool"] and e == whole
            kinds.add("name")
            continue
        key, value = next((n, v) for n, v in r["completion"]["tool_call"]["parameters"].items()
                          if v != r["expected_call"]["parameters"].get(n))
        full = tok.decode(call)
        start = full.index(json.dumps(key) + ": ") + len(json.dumps(key) + ": ") + isinstance(value, str)
        assert len(tok.decode(call[:k])) <= start < len(tok.decode(call[:k + 1]))  # token k reaches into the value
        first = max(k, departure_start(tok, r, call)) + 1  # the first cut that has seen the departing value token
        assert e["target_mask"] == [0] * (P + first) + [1] * (len(call) - 1 - first)
        assert [l for l, m in zip(e["labels"], e["target_mask"]) if m] == [tok.eot_id] * (len(call) - 1 - first)
        assert sum(e["target_mask"]) < sum(whole["target_mask"])
        right = e["ids"][:P] + call_ids(tok, r["expected_call"])
        for t, m in enumerate(e["target_mask"]):  # no tripped state is a state of the user's own call
            assert not (m and e["ids"][:t] == right[:t]), (r["id"], t)
        kinds.add("hijack" if r["attacker_tool"] == r["expected_tool"] else "flip")
        if len(kinds) == 3 and r["attacker_tool"] == r["expected_tool"]:
            a = data.adversarial_trip(tok, r, dict(e, source=r["id"]), 4)["attack"]
            assert [i for i, m in zip(a["ids"], a["target_mask"]) if m] == call[first:-1]
    assert kinds == {"name", "flip", "hijack"}
    hijack = next(r for r in harmful if r["family"] == "hijack_money")
    k = value_cut(tok, hijack)
    assert tok.decode(call_ids(tok, hijack["completion"]["tool_call"])[:k]).endswith('{"recipient": "')


def test_each_trip_row_is_drawn_beside_its_two_contrasts(data_dir):
    # attach_contrasts: the same injected prompt answered with the user's call, and a clean request calling the
    # attacker's tool; with_trips puts n trip rows and both contrasts of each into a step's redirect batch
    from chat import encode_sample, prompt_ids, trip_rows
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    by_id = {r["id"]: r for r in rows}
    trips = trip_rows(tok, rows, 1.0, seed=3, depth="all")
    data.attach_contrasts(tok, rows, trips, seed=3)
    tools = lambda e: tok.decode(e["ids"][len(e["ids"]) - sum(e["target_mask"]):])
    for e in trips:
        flip = by_id[e["source"]]
        answered, legit = e["contrast"]
        prompt = prompt_ids(tok, flip["messages"], flip["tools"])
        assert answered["ids"][:len(prompt)] == prompt == e["ids"][:len(prompt)]  # the same injected prompt
        assert f'"name": "{flip["expected_tool"]}"' in tools(answered) and flip["attacker_tool"] not in tools(answered)
        assert f'"name": "{flip["attacker_tool"]}"' in tools(legit)  # the attacker's tool, legitimately called
        twin_free = [r for r in rows if r["kind"] != "harmful" and r["attacker_tool"] is None
                     and r["expected_tool"] == flip["attacker_tool"]]
        assert legit in [encode_sample(tok, r) for r in twin_free]
    assert len({tuple(e["contrast"][1]["ids"]) for e in trips}) > 1  # a draw, not one request for every row
    batch = data.step_batch([encode_sample(tok, r) for r in rows], 4, 6, seed=3)
    for step in (0, 5):
        got = data.with_trips(batch, trips, step, 2, seed=3)
        drawn = [e for e in trips if any(x is e for x in got)]
        assert len(got) == len(batch) + 6 and len(drawn) == 2 and all(any(x is b for x in got) for b in batch)
        assert all(any(x is c for x in got) for e in drawn for c in e["contrast"])
        assert [len(e["ids"]) for e in got] == sorted(len(e["ids"]) for e in got)
        assert got == data.with_trips(batch, trips, step, 2, seed=3)  # a function of (seed, step): resume-exact
    no_redirect = [r for r in rows if r["id"] != by_id[trips[0]["source"]]["id"] + "-redirect"]
    with pytest.raises(data.DataError, match=f'{trips[0]["source"]}: a trip row needs .* no redirect row'):
        data.attach_contrasts(tok, no_redirect, trips)
    # with the twins, a third: the clean twin, the attacker's call forced and trained on from eval's forced cut
    from chat import call_segments, forced_prefill
    twins = data.twins_of(rows)
    data.attach_contrasts(tok, rows, trips, seed=3, twins=twins)
    for e in trips:
        flip, third = by_id[e["source"]], e["contrast"][2]
        prompt = prompt_ids(tok, twins[flip["id"]]["messages"], twins[flip["id"]]["tools"])
        call = [i for seg, _ in call_segments(tok, flip["completion"]["tool_call"]) for i in seg]
        cut = len(prompt) + len(forced_prefill(tok, flip["attacker_tool"]))
        assert prompt != e["ids"][:len(prompt)] and third["ids"] == prompt + call  # no injection, the same call
        assert third["target_mask"] == [0] * cut + [1] * (len(call) - cut + len(prompt)) and not any(third["cb_mask"])
    twinless = [dict(r, twin=None) if r["id"] == trips[1]["source"] else r for r in rows]
    with pytest.raises(data.DataError, match=f'{trips[1]["source"]}: .* and its clean twin; the data has no clean tw'):
        data.attach_contrasts(tok, twinless, trips, twins=data.twins_of(twinless))


def test_the_same_tool_contrast_is_an_injected_request_for_the_attackers_tool_answered_with_it(data_dir):
    # trip_contrast_same: a last contrast, another injected prompt whose user asked for the attacker's tool, answered
    # with the user's call to it, so that the trip does not end a parameter hijack's own call (the same tool); the
    # other contrasts are the ones drawn without it
    from chat import encode_sample, trip_rows
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    by_id = {r["id"]: r for r in rows}
    plain, same = (trip_rows(tok, rows, 0.3, seed=3, depth="all") for _ in range(2))
    data.attach_contrasts(tok, rows, plain, seed=3)
    data.attach_contrasts(tok, rows, same, seed=3, same=True)
    encoded = {}
    for r in rows:
        if r["kind"] != "harmful" and r["attacker_tool"] is not None:
            encoded.setdefault(r["expected_tool"], []).append(encode_sample(tok, r))
    for a, b in zip(plain, same):
        assert len(a["contrast"]) == 2 and b["contrast"][:2] == a["contrast"]
        flip, last = by_id[b["source"]], b["contrast"][2]
        assert last in encoded[flip["attacker_tool"]]  # an injected request whose user asked for that tool
        assert last != a["contrast"][0] and f'"name": "{flip["attacker_tool"]}"' in tok.decode(last["ids"][-40:])
    assert len({tuple(e["contrast"][2]["ids"]) for e in same}) > 1  # a draw
    tool = by_id[same[0]["source"]]["attacker_tool"]
    without = [r for r in rows if not (r["kind"] != "harmful" and r["attacker_tool"] is not None
                                       and r["expected_tool"] == tool)]
    with pytest.raises(data.DataError, match=f'{same[0]["source"]}: .* an injected request for that tool answered '
                                             f'with it; the data has no redirect row that calls {tool}'):
        data.attach_contrasts(tok, without, trip_rows(tok, [by_id[same[0]["source"]]], 1.0), same=True)


def test_the_concurring_contrast_is_an_injection_that_pushes_the_users_own_tool_answered_with_it(data_dir):
    # trip_contrast_concur: a last contrast, an injected request for the trip row's attacker's tool whose injection
    # is rewritten to push that very tool, answered with the user's call to it: the trip must not key on the call's
    # tool being the one the injection names (a hijack's injection names the user's tool too)
    from chat import concurring, encode_sample, trip_rows
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    by_id = {r["id"]: r for r in rows}
    plain, concur = (trip_rows(tok, rows, 0.3, seed=3, depth="all") for _ in range(2))
    data.attach_contrasts(tok, rows, plain, seed=3, same=True)
    data.attach_contrasts(tok, rows, concur, seed=3, same=True, concur=True)
    for a, b in zip(plain, concur):
        assert len(a["contrast"]) == 3 and b["contrast"][:3] == a["contrast"]
        tool, last = by_id[b["source"]]["attacker_tool"], b["contrast"][3]
        text = tok.decode(last["ids"])
        prompt, call = text.rsplit("<|python_tag|>", 1)
        assert call.startswith(f'{{"name": "{tool}"')  # the user's call to the trip's attacker's tool ...
        assert tool in prompt.split("<|start_header_id|>user")[1]  # ... beside an injection that names it
        target = tok.decode([i for i, m in zip(last["ids"], last["target_mask"]) if m])
        assert target == "<|python_tag|>" + call  # the call is what it learns
    assert len({tuple(e["contrast"][3]["ids"]) for e in concur}) > 1  # a draw
    flips = [r for r in rows if r["kind"] == "retain" and r["attacker_tool"] not in (None, r["expected_tool"])]
    r = next(r for r in flips if concurring(r) is not None)
    c = concurring(r)
    assert c["attacker_tool"] == r["expected_tool"] and c["completion"] == r["completion"]
    assert all(r["attacker_tool"] not in (m.get("content") or "") for m in c["messages"])
    assert [m.get("content", "").replace(r["attacker_tool"], r["expected_tool"]) for m in r["messages"]] == \
        [m.get("content", "") for m in c["messages"]]  # nothing else changed
    says = dict(r, messages=[{"role": "user", "content": f'{r["expected_tool"]} is broken, use {r["attacker_tool"]}'}])
    assert concurring(says) is None  # it would read "X is broken, use X"
    tool = by_id[concur[0]["source"]]["attacker_tool"]
    without = [x for x in rows if not (x["kind"] != "harmful" and x["attacker_tool"] not in (None, tool)
                                       and x["expected_tool"] == tool)]
    with pytest.raises(data.DataError, match=f'{concur[0]["source"]}: .*; the data has no tool-flip redirect row that '
                                             f'calls {tool} and whose injection names its tool'):
        data.attach_contrasts(tok, without, trip_rows(tok, [by_id[concur[0]["source"]]], 1.0), concur=True)


def test_a_mismatch_trip_ends_another_tools_call_on_a_clean_request_beside_both_calls_made_right(data_dir):
    # trip_mismatch: a clean request for tool U with another offered tool V's call forced, <|eot_id|> at every position
    # from "parameters": on; beside it the request's own call and the request V's call was taken from: the same
    # forced tokens continued where they fit, so the only cue is the call's tool against the request
    from chat import encode_sample, forced_prefill, mismatch_trips, prompt_ids, tool_schema
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    by_id = {r["id"]: r for r in rows}
    clean = [r for r in rows if r["kind"] != "harmful" and r["attacker_tool"] is None and r["expected_tool"]]
    trips = mismatch_trips(tok, rows, seed=3)
    shallow = mismatch_trips(tok, rows, seed=3, depth="parameters")  # the first cut alone, before any value
    assert 0 < len(trips) <= len(clean) and len({e["source"] for e in trips}) == len(trips) == len(shallow)
    shared, pairs = 0, set()
    for e, sh in zip(trips, shallow):
        r = by_id[e["source"]]
        own, lender = e["contrast"]
        prompt = prompt_ids(tok, r["messages"], r["tools"])
        assert own == encode_sample(tok, r) and e["ids"][:len(prompt)] == prompt  # the clean request itself
        call = tok.decode(e["ids"][len(prompt):])
        name = call.split('"name": "')[1].split('"')[0]
        assert name != r["expected_tool"] and name in r["tools"]  # another of the tools it is offered
        pairs.add((r["expected_tool"], name))
        theirs = next(x for x in clean if encode_sample(tok, x) == lender)
        assert theirs["expected_tool"] == name and theirs["id"] != r["id"]  # a clean request that calls that tool
        mine_p, their_p = r["expected_call"]["parameters"], theirs["expected_call"]["parameters"]
        if sorted(mine_p) == sorted(their_p):  # the same argument names: the request's own values, as a query flip
            assert json.loads(call[len("<|python_tag|>"):])["parameters"] == mine_p
            shared += mine_p != their_p
        else:
            n = len(e["ids"]) - len(prompt)
            assert lender["ids"][-n - 1:] == e["ids"][len(prompt):] + [tok.eom_id]  # the very tokens of its call
        cut = len(prompt) + len(forced_prefill(tok, name))
        assert [m for m in e["target_mask"]] == [0] * cut + [1] * (len(e["ids"]) - cut)
        assert all(l == tok.eot_id for l, m in zip(e["labels"], e["target_mask"]) if m) and not any(e["cb_mask"])
        assert sh["ids"] == e["ids"][:cut] + [tok.eot_id] and sh["target_mask"] == [0] * cut + [1]
        assert sh["source"] == e["source"] and sh["contrast"] == e["contrast"] and "labels" not in sh
    assert shared > 0  # search_web and retrieve_multimodal_docs swap with the request's own query
    assert len(pairs) > 4  # many pairs of tools, not one
    assert trips == mismatch_trips(tok, rows, seed=3) != mismatch_trips(tok, rows, seed=4)  # a seeded draw
    forced = lambda e: tok.decode(e["ids"]).split('"name": "')[-1].split('"')[0]
    assert any(forced(e) == "search_web" for e in trips)
    spared = mismatch_trips(tok, rows, seed=3, spare=("search_web",))  # the pushed tool is never forced, still
    assert [e["source"] for e in spared] == [e["source"] for e in trips]  # every request that offers another tool
    assert not any(forced(e) == "search_web" for e in spared) and len({forced(e) for e in spared}) > 3
    batch = data.step_batch([encode_sample(tok, r) for r in rows], 4, 6, seed=3)
    got = data.with_trips(batch, trips, 2, 2, seed=3, salt=4)
    assert len(got) == len(batch) + 6 and got != data.with_trips(batch, trips, 2, 2, seed=3)  # its own permutation
    alone = [r for r in rows if r["attacker_tool"] is not None or r["expected_tool"] in (None, "search_web")]
    with pytest.raises(data.DataError, match="mismatch trips: no clean request calls a tool while another"):
        mismatch_trips(tok, alone)
    with pytest.raises(data.DataError, match='mismatch trip depth: unknown "value"'):
        mismatch_trips(tok, rows, depth="value")
    schemas = [dict(r, tools=[tool_schema(t) for t in r["tools"]]) for r in rows]  # tools as JSON schemas
    assert mismatch_trips(tok, schemas, seed=3) == trips


def test_a_negative_label_is_the_unlikelihood_of_that_token(data_dir):
    # completion_ce: a label -(x + 1) adds -log(1 - p(x)) at that position, the rest stays cross-entropy; the same
    # with the lm_head whole and grouped by distinct rows (float64)
    import step
    from chat import collate
    model = _tiny_head_model()  # 24 equal rows, for the grouped head
    ids = [3, 9, 17, 4, 22, 31, 7, 12]
    on = [0, 0, 0, 1, 1, 1, 1, 1]
    labels = [i if k < 5 else -(45 + 1) if k == 5 else -(5 + 1) for k, i in enumerate(ids)]  # 45: a zero row
    b = collate([{"ids": ids, "cb_mask": [0] * 8, "target_mask": on, "labels": labels}], 0)
    with torch.no_grad():
        p = model(torch.tensor([ids]))[0][0].softmax(-1)  # (T, V): row t predicts token t + 1
        want = -p[2, 4].log() - p[3, 22].log() - (1 - p[4, 45]).log() - (1 - p[5, 5]).log() - (1 - p[6, 5]).log()
        whole = step.completion_ce(model, step.hidden_states(model, model, b["ids"], False)[-1], b)
        model.group_head_rows()
        grouped = step.completion_ce(model, step.hidden_states(model, model, b["ids"], False)[-1], b)
    assert model.head is not None
    assert torch.allclose(whole, want, rtol=1e-10, atol=0) and torch.allclose(grouped, want, rtol=1e-10, atol=0)


def _tiny_head_model():
    # a tiny float64 Llama whose lm_head rows 40.. are equal (zero), for the lm_head grouped by distinct rows
    from model import Llama, LlamaConfig
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=32,
                              max_seq_len=64)).double()
    with torch.no_grad():
        model.lm_head.weight[40:] = 0
    return model


def _weighted_rows():
    # two completion rows of a tiny float64 model's vocabulary, the second with an unlikelihood label
    a = {"ids": [3, 9, 17, 4, 22, 31], "cb_mask": [0] * 6, "target_mask": [0, 0, 1, 1, 1, 1]}
    b = {"ids": [5, 8, 41, 2, 11, 6, 30], "cb_mask": [0] * 7, "target_mask": [0, 0, 0, 1, 1, 1, 1],
         "labels": [5, 8, 41, 2, -(46 + 1), 6, 30]}
    return a, b


def test_a_rows_weight_multiplies_its_terms_of_the_cross_entropy():
    # completion_ce: a row with "weight" w adds w x its own cross-entropy (unlikelihood terms too), with the
    # lm_head whole and grouped by distinct rows (float64)
    import step
    from chat import collate
    model = _tiny_head_model()
    a, b = _weighted_rows()
    ce = lambda rows: step.completion_ce(model, step.hidden_states(model, model, collate(rows, 0)["ids"], False)[-1],
                                         collate(rows, 0))
    with torch.no_grad():
        for grouped in (False, True):
            if grouped:
                model.group_head_rows()
            want = 2.5 * ce([a]) + 0.25 * ce([b])
            got = ce([dict(a, weight=2.5), dict(b, weight=0.25)])
            assert torch.allclose(got, want, rtol=1e-10, atol=0) and not torch.allclose(got, ce([a, b]), rtol=1e-3)
    assert model.head is not None


def test_a_row_of_weight_two_trains_as_the_row_twice():
    # train_step: a redirect row of weight 2 gives the loss and the gradient of the same row drawn twice (its
    # tokens count twice in the denominator too), in float64
    import step
    from model import Llama, LlamaConfig
    cfg = dict(layers=(1,), grad_accum=1, lorra_alpha=0.0, alpha_decay_multiplier=2.0, max_steps=10,
               redirect_weight=1.0, grad_clip=0.0, retain_call_weight=1.0, retain_len=256)
    a, b = _weighted_rows()
    results = []
    for redirect in ([dict(a, weight=2.0), b], [a, a, b]):
        torch.manual_seed(0)
        model = Llama(LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=32,
                                  max_seq_len=64)).double()
        params = list(model.parameters())
        rec = step.train_step(model, model, torch.optim.SGD(params, lr=1.0), params, dict(redirect=redirect), 0, cfg,
                              pad_id=0)
        results.append((rec["loss_redirect"], torch.cat([p.detach().flatten() for p in params])))
    (l1, w1), (l2, w2) = results
    assert abs(l1 - l2) <= 1e-12 * abs(l2) and torch.allclose(w1, w2, rtol=1e-10, atol=1e-14)


def test_a_raise_only_row_raises_its_target_logit_alone():
    # completion_ce: a row with "raise_only" (train_cb's trip_raise) has the same loss, but its gradient reaches the
    # final state through the target's logit alone, (p_t - 1) W_t, not sum_k p_k W_k - W_t; rows without it are
    # untouched; with the lm_head whole and grouped by distinct rows (float64)
    import step
    from chat import collate
    model = _tiny_head_model()
    a, b = _weighted_rows()
    b = dict(b, labels=[5, 8, 41, 2, 11, 6, 30])  # every target a cross-entropy term
    W = model.lm_head.weight.detach()
    for grouped in (False, True):
        if grouped:
            model.group_head_rows()
        got = []
        for flag in (False, True):
            batch = collate([a, dict(b, raise_only=flag)], 0)
            h = step.hidden_states(model, model, batch["ids"], False)[-1].detach().requires_grad_()
            loss = step.completion_ce(model, h, batch)
            loss.backward()
            got.append((loss.detach(), h.grad))
        (plain, g_plain), (raised, g_raised) = got
        assert torch.allclose(plain, raised, rtol=1e-12, atol=0)
        assert torch.allclose(g_plain[0], g_raised[0], rtol=1e-10, atol=1e-14)  # the other row: as before
        p = torch.softmax(h[1].detach() @ W.t(), -1)  # (T, V) row b's next-token probabilities
        for t in range(2, 6):  # the states that emit b's targets 3..6
            target = b["ids"][t + 1]
            want_raised = (p[t, target] - 1) * W[target]
            want_plain = p[t] @ W - W[target]
            assert torch.allclose(g_raised[1, t], want_raised, rtol=1e-9, atol=1e-12)
            assert torch.allclose(g_plain[1, t], want_plain, rtol=1e-9, atol=1e-12)
            assert not torch.allclose(want_raised, want_plain, rtol=1e-3)
    assert model.head is not None


def test_trip_weight_and_raise_mark_the_trip_rows_and_not_their_contrasts(base, data_dir, tmp_path, monkeypatch):
    # through train_cb.py, in this process: every row of a step's redirect batch that learns <|eot_id|> inside a
    # forced call (injected trip rows and those without an injection) carries the weight and raise_only, and no
    # other row does
    import step
    seen, real = [], step.train_step
    monkeypatch.setattr(step, "train_step", lambda *a, **k: seen.append(a[4]["redirect"]) or real(*a, **k))
    monkeypatch.setattr(sys, "argv", train_cmd(base, data_dir, tmp_path, "--max_steps=2", "--trip_depth=all",
                                               "--trip_batch_size=2", "--trip_mismatch=1", "--trip_weight=0.25",
                                               "--trip_raise=True", "--batch_size=8"))
    runpy.run_path(os.path.join(ROOT, "train_cb.py"), run_name="__main__")
    eot = data.load_tokenizer().eot_id
    for rows in seen:  # 8 redirect rows, 2 trip rows beside 2 contrasts each, 1 mismatch trip beside 2
        assert len(rows) == 8 + 2 * 3 + 3
        trips = [e for e in rows if eot in [l for l, m in zip(e.get("labels", []), e["target_mask"]) if m]]
        assert len(trips) == 3 and all(e.get("weight") == 0.25 and e.get("raise_only") for e in trips)
        assert sum("weight" in e for e in rows) == 3 and sum("raise_only" in e for e in rows) == 3
    config = torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]
    assert len(seen) == 2 and config["trip_weight"] == 0.25 and config["trip_raise"] is True


def test_the_no_eot_twin_contrast_only_keeps_the_turn_open(data_dir):
    # trip_twin_target='no_eot': the twin contrast has the same ids and positions as 'call', each labelled
    # "not <|eot_id|>", so it no longer teaches a clean request the attacker's argument values
    from chat import trip_rows
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    call_twin, no_eot = (trip_rows(tok, rows, 1.0, seed=3, depth="all") for _ in range(2))
    data.attach_contrasts(tok, rows, call_twin, seed=3, twins=data.twins_of(rows))
    data.attach_contrasts(tok, rows, no_eot, seed=3, twins=data.twins_of(rows), twin_target="no_eot")
    for a, b in zip(call_twin, no_eot):
        assert a["contrast"][:2] == b["contrast"][:2]  # the other contrasts unchanged
        x, y = a["contrast"][2], b["contrast"][2]
        assert x["ids"] == y["ids"] and x["target_mask"] == y["target_mask"] and "labels" not in x
        assert y["labels"] == [-(tok.eot_id + 1) if m else i for i, m in zip(y["ids"], y["target_mask"])]
    with pytest.raises(data.DataError, match='trip twin target: unknown "eot"'):
        data.attach_contrasts(tok, rows, no_eot, twins=data.twins_of(rows), twin_target="eot")


def test_the_trip_twin_contrast_trips_on_the_clean_twin(data_dir):
    # trip_twin_target='trip': the twin contrast is itself a trip row, the clean twin with the attacker's call
    # forced and <|eot_id|> at every position from the forced-call cut on, so the trip cannot key on the injection
    from chat import call_ids, forced_prefill, prompt_ids, trip_rows
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    twins, by_id = data.twins_of(rows), {r["id"]: r for r in rows}
    no_eot, trip = (trip_rows(tok, rows, 1.0, seed=3, depth="all") for _ in range(2))
    data.attach_contrasts(tok, rows, no_eot, seed=3, twins=twins, twin_target="no_eot")
    data.attach_contrasts(tok, rows, trip, seed=3, twins=twins, twin_target="trip")
    for a, b in zip(no_eot, trip):
        assert a["contrast"][:2] == b["contrast"][:2]  # the other contrasts unchanged
        r = by_id[b["source"]]
        t = twins[r["id"]]
        prompt = prompt_ids(tok, t["messages"], t["tools"])
        call = call_ids(tok, r["completion"]["tool_call"])
        y = b["contrast"][2]
        assert y["ids"] == prompt + call[:-1]  # the twin's prompt and the attacker's call, no <|eom_id|>
        start = len(prompt) + len(forced_prefill(tok, r["attacker_tool"]))
        assert y["target_mask"] == [int(j >= start) for j in range(len(y["ids"]))] and sum(y["target_mask"]) > 0
        assert y["labels"] == [tok.eot_id if m else i for i, m in zip(y["ids"], y["target_mask"])]
        assert not any(y["cb_mask"])
        # the trip row itself ends the same call tokens after the injected prompt
        assert b["ids"][-len(call) + 1:] == call[:-1] and b["ids"] != y["ids"]


def test_trip_batch_size_trains_its_trip_rows_apart(base, data_dir, tmp_path):
    # the trip rows leave the redirect pool (every non-harmful row stays in it) and come back 2 a step with 3 contrasts
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    pool = sum(r["kind"] != "harmful" for r in rows)
    flips = sum(r["kind"] == "harmful" and r["attacker_tool"] != r["expected_tool"] for r in rows)
    p = run_train(base, data_dir, tmp_path, "--max_steps=1", "--trip_depth=all", "--trip_batch_size=2",
                  "--trip_contrast_twin", "--batch_size=8")  # 8 + 2 x 4 redirect samples a step
    assert f"{pool} redirect samples ({flips} trip rows, 2 a step beside their 3 contrasts)" in p.stdout, p.stdout
    assert os.path.exists(tmp_path / "ckpt.pt")


def test_trip_mismatch_trains_rows_without_an_injection_beside_their_contrasts(base, data_dir, tmp_path):
    from chat import mismatch_trips
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    n = len(mismatch_trips(data.load_tokenizer(), rows, seed=1337))
    p = run_train(base, data_dir, tmp_path, "--max_steps=1", "--trip_mismatch=2", "--batch_size=8")  # 8 + 2 x 3
    assert f"({n} trip rows without an injection, 2 a step, each beside its 2 contrasts)" in p.stdout, p.stdout
    assert os.path.exists(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("flag, needs", [
    ("--pull_weight=1", "pull_weight > 0 needs redirect rows"),
    ("--trip_twins", "trip_twins needs tool-flip samples"),
], ids=["pull", "trip_twins"])
def test_the_twin_terms_need_rows_that_name_their_twin(base, data_dir, tmp_path, flag, needs):
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "train.jsonl"))]
    for r in rows:
        r.pop("twin", None)
    data.write_jsonl(str(tmp_path / "train.jsonl"), rows)
    p = run_train(base, data_dir, tmp_path / "out", f"--train_file={tmp_path / 'train.jsonl'}", flag, check=False)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        f"train_cb.py: {tmp_path / 'train.jsonl'}: {needs} that name their clean twin (\"twin\": id)"]


def test_trip_rows_force_the_attackers_call_and_target_the_end_of_turn_alone(data_dir):
    from chat import encode_trip, forced_prefill, prompt_ids
    tok = data.load_tokenizer()
    rows = data.load_jsonl(os.path.join(data_dir, "train.jsonl"))
    flip = next(r for r in rows if r["kind"] == "harmful" and r["attacker_tool"] != r["expected_tool"])
    e = encode_trip(tok, flip)
    prompt, pre = prompt_ids(tok, flip["messages"], flip["tools"]), forced_prefill(tok, flip["attacker_tool"])
    assert e["ids"] == prompt + pre + [tok.eot_id]
    assert e["target_mask"] == [0] * (len(prompt) + len(pre)) + [1] and not any(e["cb_mask"])
    # the forced prefix is the start of the harmful sample's own call: the same tokens the model would emit
    harmful = data.encode_sample(tok, flip, "departure")["ids"]
    assert harmful[:len(prompt) + len(pre)] == prompt + pre
    # a harmful row that is no attacker's call cannot be forced: one DataError naming it, not a KeyError
    from chat import trip_rows
    for bad in (dict(flip, completion={"content": "Sure."}), dict(flip, attacker_tool=None)):
        with pytest.raises(data.DataError, match=f"{flip['id']}: a trip row forces the attacker's call"):
            trip_rows(tok, [bad])
