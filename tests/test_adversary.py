"""Embedding-space adversarial training (train_cb.py --adv_tokens): the slot sits where attack.py puts its tokens,
the adversary stays inside its budget, makes the attacker's call likelier and touches nothing but the slots, and
train_cb.py runs it and logs how far it got."""

import json
import re

import pytest
import torch

import data
import step
from lora import inject_lora
from model import Llama, LlamaConfig
from tiny import run_train, tiny_base, tiny_data

N = 5  # slot positions


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer()


@pytest.fixture(scope="module")
def redirect_rows():
    rows = data.generate_splits(seed=0, n_train=60, n_val=0, n_test=0)["train"]
    rows = [r for r in rows if r["kind"] == "retain" and r["attacker_tool"]]
    flip = next(r for r in rows if r["attacker_tool"] != r["expected_tool"])
    hijack = next(r for r in rows if r["attacker_tool"] == r["expected_tool"])
    return flip, hijack


def call_ids(tok, call):
    return [i for ids, _ in data.call_segments(tok, call) for i in ids]


def test_the_slot_sits_where_attack_puts_its_tokens_and_both_completions_follow_it(tok, redirect_rows):
    for row in redirect_rows:
        e = data.adversarial_sample(tok, row, N)
        lay = data.layout(tok, row, data.injection_site(row))
        slot = tok.encode(" !")[:1] * N
        assert e["adv"] == len(lay["head"]) and e["ids"][e["adv"]:e["adv"] + N] == slot
        user = call_ids(tok, row["expected_call"])
        attacker = call_ids(tok, {"name": row["attacker_tool"], "parameters": row["attacker_parameters"]})
        assert user != attacker
        for got, call in ((e, user), (e["attack"], attacker)):
            assert got["ids"] == lay["head"] + slot + lay["tail"] + call
            assert [i for i, m in zip(got["ids"], got["target_mask"]) if m] == call
    bad = {**redirect_rows[0], "attacker_parameters": None, "id": "row-7"}
    with pytest.raises(data.DataError, match="row-7.*attacker_parameters"):
        data.adversarial_sample(tok, bad, N)


def tiny_lora_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=4096)
    model = Llama(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    inject_lora(model, 4, 8, 0.0, b_init_std=0.1, generator=torch.Generator().manual_seed(1))
    return model


def test_the_adversary_stays_in_its_budget_makes_the_attackers_call_likelier_and_touches_only_the_slots(
        tok, redirect_rows):
    model = tiny_lora_model()
    flip, hijack = redirect_rows
    rows = [data.adversarial_sample(tok, flip, N), data.encode_sample(tok, hijack), data.adversarial_sample(tok, hijack, N)]
    b = data.collate(rows, tok.pad_id)
    W = model.embed_tokens.weight.detach()
    first_special = min(tok.special.values())
    anchors = W[sorted({i for e in rows for i in e["ids"] if i < first_special})]
    eps_share = 0.5
    cfg = dict(adv_tokens=N, adv_steps=8, adv_eps=eps_share, adv_lr=0.25)
    torch.manual_seed(0)
    embeds, ce0, ce1 = step.adversarial_embeds(model, model, rows, b, cfg, anchors, tok.pad_id)
    assert ce1 < ce0 - 5  # (788 -> 748 here) the attacker's call, summed over its tokens: the adversary made it likelier
    plain = W[b["ids"]]
    slots = torch.zeros_like(b["ids"], dtype=torch.bool)
    for i in (0, 2):
        slots[i, rows[i]["adv"]:rows[i]["adv"] + N] = True
    assert torch.equal(embeds[~slots], plain[~slots])  # the row without a slot and every other position unchanged
    eps = eps_share * anchors.norm(dim=-1).mean()
    vectors = embeds[slots]  # (2N, D): each within eps of the anchor it started from, so of its nearest anchor
    nearest = (vectors[:, None] - anchors).norm(dim=-1).min(-1).values
    assert (nearest <= eps * (1 + 1e-12)).all() and (nearest > 0.5 * eps).any()  # and they did move
    assert all(p.grad is None for p in model.parameters())  # the adversary's gradients go to its vectors alone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base")), tiny_data(tmp_path_factory.mktemp("data"))


def test_train_cb_trains_against_the_adversary_and_logs_how_far_it_got(tiny, tmp_path):
    base, data_dir = tiny
    p = run_train(base, data_dir, tmp_path, "--lorra_alpha=0", "--redirect_weight=1", "--trip=False",
                  "--adv_tokens=4", "--adv_share=1", "--adv_steps=3", "--max_steps=2")
    assert "with an adversary's slot of 4 vectors, 3 steps" in p.stdout
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"c_rr"' in line]
    assert len(log) == 2 and all(r["adv_end"] < r["adv_start"] for r in log)
    counts = lambda out: [int(w) for w in re.search(r"(\d+) redirect samples \((\d+) with an adversary's slot",
                                                    out).groups()]
    replaced = counts(p.stdout)
    p = run_train(base, data_dir, tmp_path / "keep", "--lorra_alpha=0", "--redirect_weight=1", "--trip=False",
                  "--adv_tokens=4", "--adv_share=1", "--adv_keep", "--max_steps=1")
    kept = counts(p.stdout)  # every injected redirect row twice: with the slot and as it was
    assert kept[1] == replaced[1] > 0 and kept[0] == replaced[0] + replaced[1]
    for args, words in ((("--adv_tokens=-1",), "adv_tokens must be an integer >= 0"),
                        (("--adv_tokens=4", "--adv_share=0"), "0 < adv_share <= 1"),
                        (("--adv_tokens=4", "--redirect_weight=0"), "it needs redirect_weight > 0")):
        p = run_train(base, data_dir, tmp_path / "bad", *args, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and words in lines[0], p.stderr


def test_a_trip_row_with_the_slot_keeps_its_trip_and_the_adversary_aims_through_it(tok):
    # adv_trip: the trip row's <|eot_id|> labels follow the slotted prompt; the adversary's target is the attacker's
    # call itself from eval's forced-call cut on, which the trip ends; and the adversary does make it likelier
    from chat import forced_prefill, trip_rows
    rows = data.generate_splits(seed=0, n_train=60, n_val=0, n_test=0)["train"]
    flips = [r for r in rows if r["kind"] == "harmful" and r["attacker_tool"] != r["expected_tool"]][:2]
    by_id = {r["id"]: r for r in flips}
    for depth in ("all", "parameters"):
        for trip in trip_rows(tok, flips, 1.0, depth=depth):
            r = by_id[trip["source"]]
            e = data.adversarial_trip(tok, r, trip, N)
            lay = data.layout(tok, r, data.injection_site(r))
            head = lay["head"] + tok.encode(" !")[:1] * N + lay["tail"]
            P = len(data.prompt_ids(tok, r["messages"], r["tools"]))
            call = call_ids(tok, r["completion"]["tool_call"])[:-1]  # without <|eom_id|>
            cut = len(forced_prefill(tok, r["attacker_tool"]))
            assert e["adv"] == len(lay["head"]) and e["source"] == r["id"]
            assert e["ids"] == head + trip["ids"][P:] and e["target_mask"] == [0] * len(head) + trip["target_mask"][P:]
            assert [i for i, m in zip(e.get("labels", e["ids"]), e["target_mask"]) if m] \
                == [tok.eot_id] * sum(trip["target_mask"])
            a = e["attack"]
            assert a["ids"] == head + call and "labels" not in a
            assert [i for i, m in zip(a["ids"], a["target_mask"]) if m] == call[cut:]
    model = tiny_lora_model()
    slotted = [data.adversarial_trip(tok, by_id[t["source"]], t, N) for t in trip_rows(tok, flips, 1.0, depth="all")]
    with pytest.raises(data.DataError, match=f"trip row of {flips[1]['id']} was given with sample {flips[0]['id']}"):
        data.adversarial_trip(tok, flips[0], trip_rows(tok, flips[1:], 1.0, depth="all")[0], N)
    b = data.collate(slotted, tok.pad_id)
    W = model.embed_tokens.weight.detach()
    first_special = min(tok.special.values())
    anchors = W[sorted({i for e in slotted for i in e["ids"] if i < first_special})]
    torch.manual_seed(0)
    _, ce0, ce1 = step.adversarial_embeds(model, model, slotted, b, dict(adv_tokens=N, adv_steps=8, adv_eps=0.5,
                                                                           adv_lr=0.25), anchors, tok.pad_id)
    assert ce1 < ce0 - 1  # the attacker's call after the cut, summed over its tokens, made likelier


def test_train_cb_puts_the_slot_in_a_share_of_the_trip_rows(tiny, tmp_path):
    base, data_dir = tiny
    p = run_train(base, data_dir, tmp_path, "--lorra_alpha=0", "--redirect_weight=1", "--trip", "--trip_depth=all",
                  "--adv_tokens=4", "--adv_share=1", "--adv_trip=1", "--adv_steps=2", "--max_steps=1")
    n_trip, n_slot = (int(w) for w in re.search(r"\((\d+) trip rows\).*; (\d+) of them trip rows\)", p.stdout).groups())
    assert n_slot == n_trip > 0
    p = run_train(base, data_dir, tmp_path / "half", "--lorra_alpha=0", "--redirect_weight=1", "--trip",
                  "--trip_depth=all", "--adv_tokens=4", "--adv_share=1", "--adv_trip=0.5", "--max_steps=1")
    half = int(re.search(r"; (\d+) of them trip rows\)", p.stdout).group(1))
    assert 0 < half < n_trip
    for args, words in ((("--adv_trip=0.5",), "it needs adv_tokens > 0 and trip=True"),
                        (("--adv_tokens=4", "--adv_trip=0.5", "--trip=False"), "it needs adv_tokens > 0 and trip=True"),
                        (("--adv_tokens=4", "--adv_trip=2"), "adv_trip must be a share between 0 and 1")):
        p = run_train(base, data_dir, tmp_path / "bad", *args, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and words in lines[0], p.stderr


def test_the_trip_config_runs_on_top_of_the_organisms(tiny, tmp_path):
    # README's command for the trip learnt under attack: config/organism.py then config/trip.py, tiny sizes after
    base, data_dir = tiny
    p = run_train(base, data_dir, tmp_path, "config/organism.py", "config/trip.py", f"--init_from={base}",
                  f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--layers=1,2", "--max_steps=1", "--batch_size=4",
                  "--redirect_batch_size=4", "--grad_accum=1", "--adv_tokens=4", "--adv_steps=1", "--eval_interval=0")
    assert "2 a step beside their 3 contrasts" in p.stdout and "of them trip rows" in p.stdout, p.stdout
    assert (tmp_path / "ckpt.pt").is_file()
