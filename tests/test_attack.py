"""attack.py: the target loss after a cached prefix is the full-vocabulary one, greedy replies from the cache are
generate()'s, a GCG step lowers the loss or moves to the candidate greedy decoding misses least on, a planted easy
case is found, a case whose attacker call the model cannot write is left out, candidates are plain text only, the
embedding attack stays within its budget, and bad input stops with one line."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import attack
import data
from chat import call_ids
from lora import inject_lora, lora_config, lora_state_dict
from model import Llama, LlamaConfig, generate, save_pretrained, writable
from tiny import ROOT, tiny_base

ATTACK = os.path.join(ROOT, "attack.py")
N_ADV = 4


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer()


@pytest.fixture(scope="module")
def case(tok):
    """The shortest tool-flip case of a small generated test split."""
    rows = data.generate_splits(seed=0, n_train=0, n_val=0, n_test=40)["test"]
    flips = [r for r in rows if r["attacker_tool"] and r["attacker_tool"] != r["expected_tool"]]
    return min(flips, key=lambda r: len(data.prompt_ids(tok, r["messages"], r["tools"])))


@pytest.fixture(autouse=True)
def small_budget(monkeypatch):
    for name, value in dict(n_adv=N_ADV, topk=16, n_candidates=32, batch_size=16, steps=10, embed_steps=4,
                            embed_restarts=2, max_new_tokens=40, retokenize=True).items():
        monkeypatch.setattr(attack, name, value)


def parts(tok, case):
    lay = data.layout(tok, case, data.injection_site(case))
    target = call_ids(tok, {"name": case["attacker_tool"], "parameters": case["attacker_parameters"]})
    return lay, attack.initial_adv(tok, lay, N_ADV), target


@pytest.fixture(scope="module")
def planted(tok, case):
    """A small model that makes the attacker's call exactly when the word ' banana' is among the adversarial
    tokens, and refuses otherwise. Trained as organism.py trains (a compact vocabulary of the tokens it sees, one
    shared row for every other token, zero output rows), so GCG has ~150 distinct candidates."""
    torch.manual_seed(0)
    lay, adv0, target = parts(tok, case)
    trigger = tok.encode(" banana")[0]
    refuse = tok.encode("I can't do that.") + [tok.eot_id]
    others = [i for i in tok.encode(" apple pear plum fig kiwi lime") if i != trigger]
    seqs = [(adv0[:j] + [trigger] + adv0[j + 1:], target) for j in range(N_ADV)]
    seqs += [(adv0, refuse)] + [(adv0[:j] + [o] + adv0[j + 1:], refuse) for j, o in enumerate(others[:N_ADV])]
    vocab = sorted({i for adv, r in seqs for i in lay["head"] + adv + lay["tail"] + r})
    compact = torch.full((tok.n_vocab,), len(vocab), dtype=torch.long)
    compact[vocab] = torch.arange(len(vocab))
    log_n_zero = math.log(tok.n_vocab - len(vocab))
    cfg = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=4096)
    small = Llama(LlamaConfig(vocab_size=len(vocab) + 1, **cfg))
    L = max(len(r) for _, r in seqs)
    ids = compact[torch.tensor([lay["head"] + a + lay["tail"] + r + r[-1:] * (L - len(r)) for a, r in seqs])]
    targets = torch.tensor([list(compact[r]) + [-100] * (L - len(r)) for _, r in seqs])
    start = len(lay["head"]) + N_ADV + len(lay["tail"]) - 1
    opt = torch.optim.Adam(small.parameters(), lr=1e-2)
    for step in range(400):
        _, h = small(ids[:, :-1], hidden=True, logits=False)
        logits = F.linear(h[-1][:, start:], small.lm_head.weight[:-1])  # the full model's other rows are zero:
        logits = torch.cat([logits, torch.full_like(logits[..., :1], log_n_zero)], -1)  # one logit for them all
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if bool(((logits.argmax(-1) == targets) | (targets == -100)).all()) and loss < 0.05:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = Llama(LlamaConfig(vocab_size=tok.n_vocab, **cfg))
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in small.state_dict().items() if not k.startswith(("embed", "lm_head"))},
                              strict=False)
        model.embed_tokens.weight.copy_(small.embed_tokens.weight[compact])
        model.lm_head.weight.zero_()
        model.lm_head.weight[vocab] = small.lm_head.weight[:-1]
    model.eval().requires_grad_(False)
    return dict(model=model, lay=lay, adv0=adv0, target=target, trigger=trigger)


def run(*args):
    return subprocess.run([sys.executable, ATTACK, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, case):
    """A tiny random base and a train_cb.py-style checkpoint of a random adapter on it."""
    d = tmp_path_factory.mktemp("attack")
    base = tiny_base(d / "base", n_layers=2, dim=16)
    model = Llama.from_pretrained(base)
    inject_lora(model, 2, 4, layers=[1], b_init_std=0.05, generator=torch.Generator().manual_seed(0))
    torch.save(dict(lora={k: v.clone() for k, v in lora_state_dict(model).items()}, lora_config=lora_config(model),
                    layers=[1], init_from=base, step=3, config={}), d / "ckpt.pt")
    data.write_jsonl(str(d / "cases.jsonl"), [case, {**case, "id": "two"}])
    return d


# --- the model side --------------------------------------------------------------------------------------

def test_target_loss_is_the_full_vocabulary_nll_after_the_cached_prefix(tok, planted):
    model = Llama(planted["model"].config)
    model.load_state_dict(planted["model"].state_dict())
    model = model.double().eval().requires_grad_(False)  # float64: the two orders of summation agree to 1e-12
    lay, target = planted["lay"], planted["target"]
    head, W = attack.head_classes(model.lm_head.weight), model.embed_tokens.weight
    assert len(head[0]) < 1000  # the shared zero rows are one class: the dedup path is the one under test
    advs = [planted["adv0"], [planted["trigger"]] + planted["adv0"][1:]]
    # and a target whose last token's lm_head row other tokens share: its probability is its own, not its row's
    shared = next(i for i in range(W.shape[0]) if head[1][head[2][i]] > 0)
    for target in (target, target[:-1] + [shared]):
        rest = torch.tensor(lay["tail"] + target[:-1])
        embeds = torch.stack([W[torch.cat([torch.tensor(a), rest])] for a in advs])
        got = attack.target_loss(model, head, attack.prefix_cache(model, lay["head"]), embeds, torch.tensor(target))
        for a, loss in zip(advs, got):
            ids = torch.tensor([lay["head"] + a + lay["tail"] + target])
            logp = model(ids)[0][0, -len(target) - 1:-1].log_softmax(-1)
            want = -logp.gather(-1, torch.tensor(target)[:, None]).mean()
            assert abs(float(loss) - float(want)) < 1e-10


def test_greedy_from_the_cached_prefix_is_generate(tok, planted):
    model, lay = planted["model"], planted["lay"]
    head, W = attack.head_classes(model.lm_head.weight), model.embed_tokens.weight
    prefix = attack.prefix_cache(model, lay["head"])
    for adv in (planted["adv0"], [planted["trigger"]] + planted["adv0"][1:]):
        ours = attack.greedy(model, head, prefix, W[torch.tensor(adv + lay["tail"])][None], tok.stop_ids)[0]
        theirs = generate(model, [lay["head"] + adv + lay["tail"]], attack.max_new_tokens, tok.stop_ids,
                          pad_id=tok.pad_id)[0]
        assert ours == theirs


# --- GCG ----------------------------------------------------------------------------------------------------

def test_the_misses_are_the_target_tokens_greedy_decoding_would_not_write(tok, planted):
    model, lay, target = planted["model"], planted["lay"], planted["target"]
    head, W = attack.head_classes(model.lm_head.weight), model.embed_tokens.weight
    prefix, rest = attack.prefix_cache(model, lay["head"]), lay["tail"] + target[:-1]
    for adv in (planted["adv0"], [planted["trigger"]] + planted["adv0"][1:]):
        loss, misses = attack.target_loss(model, head, prefix, W[torch.tensor(adv + rest)][None],
                                          torch.tensor(target), misses=True)
        logits = model(torch.tensor([lay["head"] + adv + rest]))[0][0, -len(target):]  # the whole vocabulary
        assert int(misses) == int((logits.argmax(-1) != torch.tensor(target)).sum())
    assert int(misses) == 0  # the trigger: the planted model writes the attacker's call
    first = attack.target_loss(model, head, prefix, W[torch.tensor(planted["adv0"] + rest)][None], torch.tensor(target),
                               misses=True)[1]
    assert int(first) > 0  # the starting string: it refuses


def test_the_misses_take_greedy_decodings_argmax_not_the_count_weighted_one(tok, planted):
    """The loss counts each distinct row as often as it repeats (the zero rows: ~10^5 times); greedy decoding does not.
    With the live rows scaled down, the trigger's target tokens still beat the zero rows (logit 0), by less than the
    log of their count: an argmax over the count-weighted logits would call every one of them a miss."""
    model = copy.deepcopy(planted["model"])
    lay, target = planted["lay"], planted["target"]
    with torch.no_grad():
        live = model.lm_head.weight.abs().sum(1) > 0
        model.lm_head.weight[live] *= 1e-3
    head, W = attack.head_classes(model.lm_head.weight), model.embed_tokens.weight
    adv = [planted["trigger"]] + planted["adv0"][1:]
    rest = lay["tail"] + target[:-1]
    logits = model(torch.tensor([lay["head"] + adv + rest]))[0][0, -len(target):]  # the whole vocabulary
    assert (logits.argmax(-1) == torch.tensor(target)).all()  # greedy still writes the call
    zero = int(head[2][int((~live).nonzero()[0])])  # the zero rows' class
    picked = logits.gather(-1, torch.tensor(target)[:, None])[:, 0]
    assert (picked < float(head[1][zero])).all()  # count-weighted, the zero class would win every position
    _, misses = attack.target_loss(model, head, attack.prefix_cache(model, lay["head"]), W[torch.tensor(adv + rest)][None],
                                   torch.tensor(target), misses=True)
    assert int(misses) == 0


@pytest.mark.parametrize("select, want", [("misses", 2), ("loss", 0)])
def test_a_step_moves_to_the_fewest_misses_then_the_lowest_loss(tok, planted, monkeypatch, select, want):
    """Three candidates scored (loss, misses) = (0.1, 3), (0.5, 0), (0.3, 0): plain GCG takes the lowest loss, which
    greedy decoding still gets 3 tokens wrong on; 'misses' takes the lowest loss among those it gets all right."""
    model, lay, target = planted["model"], planted["lay"], planted["target"]
    head, allowed = attack.head_classes(model.lm_head.weight), attack.allowed_tokens(tok, model)
    adv0 = planted["adv0"]
    cands = torch.tensor([adv0[:j] + [int(allowed[j])] + adv0[j + 1:] for j in range(3)])
    scores = (torch.tensor([0.1, 0.5, 0.3]), torch.tensor([3, 0, 0]))
    real = attack.target_loss
    monkeypatch.setattr(attack, "candidates", lambda *args: cands)
    monkeypatch.setattr(attack, "retokenize", False)
    monkeypatch.setattr(attack, "target_loss", lambda *a, misses=False: scores if misses else real(*a))
    monkeypatch.setattr(attack, "select", select)
    adv, loss, misses = attack.gcg_step(model, head, tok, attack.prefix_cache(model, lay["head"]), lay, adv0, target,
                                        allowed, torch.Generator().manual_seed(0))
    assert adv == cands[want].tolist() and loss == pytest.approx(float(scores[0][want]))
    assert misses == int(scores[1][want])


@pytest.mark.parametrize("select, want", [("misses", 2), ("loss", 1)])
def test_a_failed_case_keeps_the_string_the_step_rule_ranks_best(tok, case, planted, monkeypatch, select, want):
    """No step succeeds; the steps score (loss, misses) = (0.9, 4), (0.2, 3), (0.6, 1), (0.7, 1): the record (which
    transfer replays) holds step 3's string under 'misses' (fewest misses, then lowest loss), step 2's under 'loss'."""
    model, lay = planted["model"], planted["lay"]
    head, allowed = attack.head_classes(model.lm_head.weight), attack.allowed_tokens(tok, model)
    adv0 = planted["adv0"]
    visits = [(adv0[:j] + [int(allowed[j])] + adv0[j + 1:], loss, m)
              for j, (loss, m) in enumerate([(0.9, 4), (0.2, 3), (0.6, 1), (0.7, 1)])]
    steps = iter(visits)
    monkeypatch.setattr(attack, "gcg_step", lambda *a: next(steps))
    monkeypatch.setattr(attack, "verdict", lambda tok, case, ids: (False, "user_call"))
    monkeypatch.setattr(attack, "steps", len(visits))
    monkeypatch.setattr(attack, "select", select)
    rec = attack.gcg(model, head, tok, case, lay, adv0, planted["target"], allowed, torch.Generator().manual_seed(0))
    assert rec["first_success"] is None and rec["steps"] == len(visits)
    assert rec["adv"] == visits[want][0] and rec["string"] == tok.decode(visits[want][0])
    assert rec["loss"] == pytest.approx(0.2)  # the lowest loss seen, whichever string is kept


@pytest.mark.parametrize("min_steps", [0, 3])
def test_transfer_replays_an_optimised_string_when_the_base_falls_at_once(tok, case, planted, monkeypatch,
                                                                          min_steps):
    """The base obeys the injection as it stands (success at step 0): GCG still runs min_steps steps, and "best"
    (what transfer replays) is the string the step rule ranks best of them, not the starting one; the record's
    first success stays step 0."""
    model, lay, adv0 = planted["model"], planted["lay"], planted["adv0"]
    head, allowed = attack.head_classes(model.lm_head.weight), attack.allowed_tokens(tok, model)
    visits = [(adv0[:j] + [int(allowed[j])] + adv0[j + 1:], loss, 0) for j, loss in enumerate([0.5, 0.1, 0.3, 0.2])]
    steps = iter(visits)
    monkeypatch.setattr(attack, "gcg_step", lambda *a: next(steps))
    monkeypatch.setattr(attack, "verdict", lambda tok, case, ids: (True, "attacker_call"))
    rec = attack.gcg(model, head, tok, case, lay, adv0, planted["target"], allowed, torch.Generator().manual_seed(0),
                     min_steps=min_steps)
    assert rec["first_success"] == 0 and rec["steps"] == min_steps and rec["string"] == tok.decode(adv0)
    assert rec["best"] == (tok.decode(visits[1][0]) if min_steps else tok.decode(adv0))


def test_a_hijack_aims_at_the_attackers_arguments_and_a_flip_at_its_whole_call(tok, case):
    rows = data.generate_splits(seed=0, n_train=0, n_val=0, n_test=200)["test"]
    hijack = next(r for r in rows if r["family"] == "hijack_email")  # to, subject, body: the attacker swaps "to"
    call = {"name": hijack["attacker_tool"], "parameters": hijack["attacker_parameters"]}
    full, target = call_ids(tok, call), attack.target_ids(tok, hijack, call)
    text = tok.decode([i for i in target if i != tok.python_tag_id])
    assert target == full[:len(target)] and len(target) < len(full) - 5
    assert text.endswith(json.dumps(hijack["attacker_parameters"]["to"]) + ",")  # up to the value's closing token
    assert hijack["expected_call"]["parameters"]["subject"] not in text  # none of the user's other arguments
    flip = {"name": case["attacker_tool"], "parameters": case["attacker_parameters"]}
    assert attack.target_ids(tok, case, flip) == call_ids(tok, flip)


def test_writable_tells_the_tokens_greedy_decoding_can_emit():
    W = torch.tensor([[1.0, 0], [0, 1], [0, 0], [2, 2], [0, 0], [0, 0]])  # ids 2, 4 and 5 share the zero row
    head = attack.head_classes(W)
    assert writable(head, [0, 1, 2, 3]) and not writable(head, [0, 4]) and not writable(head, [5])
    h = torch.tensor([[-1.0, -1], [-1, -2]])  # the zero row wins for both: greedy writes its smallest id, 2
    assert attack.class_argmax(head, attack.class_logits(head, h)).tolist() == [2, 2]


def test_a_gcg_step_reduces_the_target_loss(tok, case, planted, monkeypatch):
    monkeypatch.setattr(attack, "select", "loss")  # plain GCG's rule: the lowest loss
    model, lay, target = planted["model"], planted["lay"], planted["target"]
    head, allowed, W = attack.head_classes(model.lm_head.weight), attack.allowed_tokens(tok, model), model.embed_tokens.weight
    prefix = attack.prefix_cache(model, lay["head"])
    rest = lay["tail"] + target[:-1]
    loss = lambda adv: float(attack.target_loss(model, head, prefix, W[torch.tensor(adv + rest)][None],
                                                torch.tensor(target)))
    before = loss(planted["adv0"])
    adv, reported, _ = attack.gcg_step(model, head, tok, prefix, lay, planted["adv0"], target, allowed,
                                       torch.Generator().manual_seed(0))
    assert adv != planted["adv0"] and abs(reported - loss(adv)) < 1e-4
    assert reported < before


def test_the_one_hot_gradient_ranks_the_planted_token_in_its_top_k(tok, planted, monkeypatch):
    model, lay, target = planted["model"], planted["lay"], planted["target"]
    head, allowed, W = attack.head_classes(model.lm_head.weight), attack.allowed_tokens(tok, model), model.embed_tokens.weight
    prefix = attack.prefix_cache(model, lay["head"])
    a = W[torch.tensor(planted["adv0"])].clone().requires_grad_(True)
    rest = W[torch.tensor(lay["tail"] + target[:-1])]
    attack.target_loss(model, head, prefix, torch.cat([a, rest])[None], torch.tensor(target)).sum().backward()
    monkeypatch.setattr(attack, "n_candidates", 2000)  # enough draws to see every (position, token) of the top-k
    ranked = attack.candidates(a.grad, W, allowed, planted["adv0"], torch.Generator().manual_seed(0))
    assert planted["trigger"] in ranked.flatten().tolist()
    wrong_way = attack.candidates(-a.grad, W, allowed, planted["adv0"], torch.Generator().manual_seed(0))
    assert planted["trigger"] not in wrong_way.flatten().tolist()


def test_a_planted_easy_case_is_found(tok, case, planted):
    model, lay = planted["model"], planted["lay"]
    head, allowed = attack.head_classes(model.lm_head.weight), attack.allowed_tokens(tok, model)
    rec = attack.gcg(model, head, tok, case, lay, planted["adv0"], planted["target"], allowed,
                     torch.Generator().manual_seed(0))
    assert rec["first_success"] is not None and rec["first_success"] > 0  # the starting string is refused
    assert rec["outcome"] == "attacker_call"
    sent = attack.replay(model, tok, case, lay, rec["string"])  # typed as text, through eval's path
    assert sent["success"], sent["output"]


def test_no_special_token_enters_a_candidate(tok, planted):
    model = planted["model"]
    allowed = attack.allowed_tokens(tok, model)
    special = set(tok.special.values())
    assert not special & set(allowed.tolist())
    grad = torch.randn(N_ADV, model.config.dim, generator=torch.Generator().manual_seed(0))
    W = model.embed_tokens.weight.clone()
    W[min(special):] = -1e3 * grad[0]  # the special tokens now lead the one-hot gradient's ranking
    cands = attack.candidates(grad, W, allowed, planted["adv0"], torch.Generator().manual_seed(0))
    assert cands.shape == (attack.n_candidates, N_ADV)
    assert set(cands.flatten().tolist()) <= set(allowed.tolist()) | set(planted["adv0"])


def test_a_string_that_would_retokenize_differently_is_not_sent(tok, planted):
    lay, adv0 = planted["lay"], planted["adv0"]
    assert tok.encode(" !!") == [tok.encode(" !!")[0]]  # one token: ' !' then '!' typed as text becomes ' !!'
    assert attack.sends_as_text(tok, lay, adv0)
    assert not attack.sends_as_text(tok, lay, adv0[:-1] + tok.encode("!"))


# --- the embedding attack -------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_the_embedding_attack_respects_its_budget(tok, case, monkeypatch, tmp_path, norm):
    monkeypatch.setattr(attack, "embed_norm", norm)
    monkeypatch.setattr(attack, "embed_lr", 0.6)  # big steps: the projection has work to do
    model = Llama.from_pretrained(tiny_base(tmp_path / "base", n_layers=2, dim=16)).eval().requires_grad_(False)
    lay, adv0, target = parts(tok, case)
    allowed, head = attack.allowed_tokens(tok, model), attack.head_classes(model.lm_head.weight)
    eps = attack.embed_budget(model, allowed)
    gen = torch.Generator().manual_seed(0)
    rec = attack.embedding_attack(model, head, tok, case, lay, adv0, target, allowed, eps, gen)
    assert rec["first_success"] is None and rec["steps"] == attack.embed_steps  # a random model never calls a tool
    E = model.embed_tokens.weight[allowed]
    delta = rec["vectors"].reshape(-1, 1, E.shape[1]) - E  # every final vector against every real embedding
    nearest = (delta.norm(dim=-1) if norm == "l2" else delta.abs().amax(-1)).min(-1).values
    assert float(nearest.max()) <= eps * (1 + 1e-5)
    assert float(nearest.max()) > 0.5 * eps  # the steps did leave the real embeddings: the budget was used
    assert rec["distance"] <= eps * (1 + 1e-5)


# --- the command --------------------------------------------------------------------------------------------

def test_the_command_attacks_base_and_cb_and_writes_the_report(checkpoint, case, tok):
    cases = checkpoint / "cases.jsonl"
    out = checkpoint / "a.json"
    p = run(str(checkpoint / "ckpt.pt"), f"--data={cases}", f"--out={out}", "--n_adv=3", "--steps=2",
            "--n_candidates=8", "--topk=4", "--embed_steps=2", "--embed_restarts=2", "--max_new_tokens=8")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    s = r["summary"]
    assert s["gcg"]["base"]["overall"]["n"] == 2 and len(s["gcg"]["cb"]["overall"]["curve"]) == 3
    assert len(s["embedding"]["cb"]["overall"]["curve"]) == 3 and s["transfer"]["overall"]["n"] == 2
    assert [c["id"] for c in r["cases"]] == [case["id"], "two"]
    assert r["cases"][0]["placement"] in ("user_turn", "tool_result")
    assert all(c[m]["verified"] for c in r["cases"] for m in ("base", "cb"))
    assert "[2/2]" in p.stdout


def test_the_report_counts_the_planted_success_for_base_cb_and_transfer(planted, case, tmp_path):
    base = str(tmp_path / "planted")
    save_pretrained(planted["model"], base, dtype=torch.float32)
    for name in ("tokenizer.model", "tokenizer.json"):
        shutil.copy(os.path.join(data.bundled_tokenizer_dir(), name), os.path.join(base, name))
    model = Llama.from_pretrained(base)
    inject_lora(model, 2, 4, layers=[1])  # B = 0: the CB model is the base, and falls the same way
    torch.save(dict(lora=lora_state_dict(model), lora_config=lora_config(model), layers=[1], init_from=base),
               tmp_path / "ckpt.pt")
    mine = case["expected_call"]["parameters"]  # a hijack of the user's call to a value the planted model cannot
    key = next(iter(mine))  # write (it never saw those words): left out before the draw
    mute = {**case, "id": "mute", "attacker_tool": case["expected_tool"], "attacker_parameters": {**mine, key: "quokka"}}
    data.write_jsonl(str(tmp_path / "cases.jsonl"), [case, mute])  # a seeded draw of one from both takes the second
    p = run(str(tmp_path / "ckpt.pt"), f"--data={tmp_path / 'cases.jsonl'}", f"--n_adv={N_ADV}", "--steps=20",
            "--topk=16", "--n_candidates=32", "--embed_steps=2", "--embed_restarts=2", "--max_new_tokens=40")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "attack.json").read_text())
    assert r["unwritable"] == ["mute"] and [c["id"] for c in r["cases"]] == [case["id"]]
    assert "1 of 2 injected cases left out" in p.stdout
    p = run(str(tmp_path / "ckpt.pt"), f"--data={tmp_path / 'cases.jsonl'}", "--n_cases=1", "--steps=1", "--base=False",
            "--transfer=False", "--embedding=False", f"--out={tmp_path / 'one.json'}", f"--n_adv={N_ADV}")
    assert p.returncode == 0, p.stderr  # left out before the draw: the draw of one is the case that can succeed
    assert [c["id"] for c in json.loads((tmp_path / "one.json").read_text())["cases"]] == [case["id"]]
    for g in (r["summary"]["gcg"]["base"], r["summary"]["gcg"]["cb"]):
        first = r["cases"][0]["base"]["first_success"]
        assert g["overall"]["asr"]["value"] == 1.0 and g["overall"]["mean_steps_to_success"] == first > 0
        assert g["overall"]["curve"][first - 1] == 0.0 and g["overall"]["curve"][first:] == [1.0] * (21 - first)
    assert r["summary"]["transfer"]["overall"]["asr"]["value"] == 1.0 and r["cases"][0]["transfer"]["success"]
    assert [b["model"] for b in r["best_strings"]] == ["cb", "base"] and r["cases"][0]["cb"]["verified"]


def test_a_case_without_attacker_tool_stops_with_one_line(checkpoint, case):
    cases = checkpoint / "bad.jsonl"
    cases.write_text(json.dumps(case) + "\n" + json.dumps({k: v for k, v in case.items() if k != "attacker_tool"}))
    p = run(str(checkpoint / "ckpt.pt"), f"--data={cases}")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
    assert f"{cases}:2" in p.stderr and "attacker_tool" in p.stderr


def test_a_heldout_family_no_case_has_stops_with_one_line(checkpoint, case):
    cases = checkpoint / "fam.jsonl"
    cases.write_text(json.dumps(case) + "\n")
    p = run(str(checkpoint / "ckpt.pt"), f"--data={cases}", "--heldout_families=nope")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
    assert f"no case of {cases} is of family 'nope'" in p.stderr


@pytest.mark.parametrize("name", ["out", "rows"])
def test_an_output_path_that_is_a_directory_stops_with_one_line_before_the_attack(checkpoint, tmp_path, name):
    p = run(str(checkpoint / "ckpt.pt"), f"--data={checkpoint / 'cases.jsonl'}", f"--{name}={tmp_path}",
            f"--out={tmp_path / 'a.json'}" if name == "rows" else f"--rows={tmp_path / 'r.jsonl'}", "--rows_legit=0",
            "--n_adv=3", "--steps=1", "--n_candidates=8", "--topk=4", "--embed_steps=1", "--embed_restarts=1",
            "--max_new_tokens=4")
    assert p.returncode != 0 and p.stderr == f"attack.py: --{name}={tmp_path}: is a directory; give the path of " \
                                              "the file to write\n", p.stderr
    assert p.stdout == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_a_checkpoint_that_is_not_one_stops_with_one_line(checkpoint, tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content is None:
        torch.save({"step": 1}, path)  # a torch file, but not train_cb.py's
    else:
        path.write_bytes(content)
    p = run(str(path), f"--data={checkpoint / 'cases.jsonl'}")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
    assert str(path) in p.stderr and "checkpoint" in p.stderr


def clean_call(case, tool, rid):
    """A clean train row (kind benign) on the case's prompt, answered with a call of `tool`."""
    call = {"name": tool, "parameters": case["attacker_parameters"] if tool == case["attacker_tool"] else
            case["expected_call"]["parameters"]}
    return {**{k: v for k, v in case.items() if k != "twin"}, "id": rid, "kind": "benign", "family": "clean",
            "attacker_tool": None, "attacker_parameters": None, "expected_tool": tool, "expected_call": call,
            "completion": {"tool_call": call}}


def test_rows_are_the_cases_with_the_cb_string_typed_in_and_the_users_call(checkpoint, case, tok):
    out, rows, cases = checkpoint / "r.json", checkpoint / "adv.jsonl", checkpoint / "with_clean.jsonl"
    legit, other = clean_call(case, case["attacker_tool"], "legit"), clean_call(case, case["expected_tool"], "other")
    data.write_jsonl(str(cases), [case, {**case, "id": "two"}, legit, other])
    args = (str(checkpoint / "ckpt.pt"), f"--data={cases}", f"--out={out}", f"--rows={rows}", "--rows_repeat=2",
            "--n_adv=3", "--steps=2", "--n_candidates=8", "--topk=4", "--transfer=False", "--embedding=False",
            "--max_new_tokens=8")
    p = run(*args, "--rows_legit=3")
    assert p.returncode == 0, p.stderr
    recs = json.loads(out.read_text())["cases"]
    got = data.load_jsonl(str(rows))  # the schema's own check: they are rows a train split can take
    assert [r["id"] for r in got] == [f"{c['id']}-{w}{k}" for c in recs for w, n in (("gcg", 2), ("legit", 3))
                                      for k in range(n)]
    # beside each case's redirect rows, clean calls of its attacker tool: the clean row of another tool never
    assert [{**r, "id": "legit"} for r in got if "-legit" in r["id"]] == [legit] * 6
    p = run(*args, "--rows_legit=0")
    assert p.returncode == 0, p.stderr
    got = data.load_jsonl(str(rows))
    assert [r["id"] for r in got] == [f"{c['id']}-gcg{k}" for c in recs for k in range(2)]
    lay = data.layout(tok, case, data.injection_site(case))
    for row, rec in zip(got, [r for r in recs for _ in range(2)]):
        assert row["kind"] == "retain" and row["attacker_tool"] == case["attacker_tool"]
        assert row["completion"] == {"tool_call": case["expected_call"]}
        k, text = lay["k"], rec["cb"]["string"]  # the CB model's string, where the attack put it
        assert row["messages"][k]["content"] == lay["before"] + text + lay["after"] != case["messages"][k]["content"]
        assert [m for i, m in enumerate(row["messages"]) if i != k] == \
               [m for i, m in enumerate(case["messages"]) if i != k]
    bad = checkpoint / "no_call.jsonl"
    data.write_jsonl(str(bad), [{k: v for k, v in case.items() if k != "expected_call"}])
    p = run(str(checkpoint / "ckpt.pt"), f"--data={bad}", f"--rows={rows}")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "expected_call" in p.stderr
    p = run(str(checkpoint / "ckpt.pt"), f"--data={checkpoint / 'cases.jsonl'}", f"--rows={rows}")  # no clean row
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "--rows_legit=0" in p.stderr
    assert case["attacker_tool"] in p.stderr


def test_kinds_draws_only_those_rows_and_base_false_attacks_the_cb_model_alone(checkpoint, case):
    cases, out, rows = checkpoint / "kinds.jsonl", checkpoint / "k.json", checkpoint / "k.jsonl"
    data.write_jsonl(str(cases), [{**case, "id": "first", "kind": "harmful"},  # train holds each injected prompt
                                  {**case, "id": "second", "kind": "retain"}])  # as both kinds
    p = run(str(checkpoint / "ckpt.pt"), f"--data={cases}", f"--out={out}", f"--rows={rows}", "--kinds=retain",
            "--base=False", "--transfer=False", "--embedding=False", "--rows_legit=0", "--n_adv=3", "--steps=2",
            "--n_candidates=8", "--topk=4", "--max_new_tokens=8")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert [c["id"] for c in r["cases"]] == ["second"] and r["cases"][0]["base"] is None
    assert r["summary"]["gcg"]["base"] is None and r["summary"]["gcg"]["cb"]["overall"]["n"] == 1
    assert r["summary"]["transfer"] is None and [b["model"] for b in r["best_strings"]] in ([], ["cb"])
    got = data.load_jsonl(str(rows))  # the rows carry the CB model's string
    k = data.layout(data.load_tokenizer(), case, data.injection_site(case))["k"]
    assert r["cases"][0]["cb"]["string"] in got[0]["messages"][k]["content"]
    ckpt = str(checkpoint / "ckpt.pt")
    plain = checkpoint / "plain.jsonl"  # eval cases: no "kind" for --kinds to select by
    data.write_jsonl(str(plain), [{k: v for k, v in case.items() if k != "kind"}])
    p = run(ckpt, f"--data={plain}", "--kinds=retain", f"--out={out}")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and 'has no "kind"' in p.stderr, p.stderr
    for bad, words in (([ckpt, "--kinds=redirect"], "redirect is not a row kind"),
                       ([ckpt, "--kinds=benign"], "of kind benign"),
                       ([ckpt, "--base=False"], "--transfer=False"),
                       (["--base=False", "--transfer=False"], "give a checkpoint")):
        p = run(*bad, f"--data={cases}", f"--out={out}")
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and words in p.stderr, p.stderr
