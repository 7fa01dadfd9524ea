"""model.py against transformers' LlamaForCausalLM (test-only dependency) on tiny random configs."""

import json
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import (Llama, LlamaConfig, ModelError, RMSNorm, class_argmax, class_cross_entropy, class_logits,
                   compile_blocks, flops_per_token, generate, rope_frequencies, save_pretrained)

# head_dim 8 at theta 500000 has wavelengths 6.3, 167, 4443 and 118000 tokens: with an original context of 512
# and factors 1 / 4, the first is kept, the last two slowed by 8, and 167 lies in the blended band (128, 512)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512}


def hf_checkpoint(tmp_path, rope_scaling=None, tie=False, n_layers=3, shard="30KB", seed=0):
    """A random HF Llama saved in shards; returns (hf_model, dir)."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=97, hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=8,
                   num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling=rope_scaling, max_position_embeddings=2048, tie_word_embeddings=tie)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and small weights; perturb so every weight matters
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = str(tmp_path / "ckpt")
    hf.save_pretrained(d, max_shard_size=shard)
    return hf, d


def padded_batch(side, vocab=97, lengths=(11, 7, 3)):
    g = torch.Generator().manual_seed(1)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    attn = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        ids[i, sl] = torch.randint(1, vocab, (n,), generator=g)
        attn[i, sl] = True
    return ids, attn


def assert_close(ours, ref, rel=1e-4):
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel} * scale {scale:.3g}"


@pytest.mark.parametrize("rope_scaling,tie", [(None, False), (LLAMA3_ROPE, False), (LLAMA3_ROPE, True)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_and_hidden_states_match_transformers(tmp_path, rope_scaling, tie, side):
    hf, d = hf_checkpoint(tmp_path, rope_scaling, tie)
    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))  # sharding is exercised
    ours = Llama.from_pretrained(d)
    assert ours.config.tie_word_embeddings == tie
    ids, attn = padded_batch(side)
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=attn.long(), position_ids=pos, output_hidden_states=True)
        logits, hidden = ours(ids, attn_mask=attn, hidden=True)
    assert hidden.shape == (4, 3, ids.shape[1], 64)
    m = attn  # padding positions carry no meaning on either side
    assert_close(logits[m], ref.logits[m])
    for l in range(len(ref.hidden_states)):
        assert_close(hidden[l][m], ref.hidden_states[l][m])


def test_right_padding_needs_no_mask(tmp_path):
    _, d = hf_checkpoint(tmp_path)
    model = Llama.from_pretrained(d)
    ids, attn = padded_batch("right")
    with torch.no_grad():
        a, ha = model(ids, attn_mask=attn, hidden=True)
        b, hb = model(ids, hidden=True)  # causal only: the fast path training uses
    assert_close(a[attn], b[attn], 1e-5)
    assert_close(ha[:, attn], hb[:, attn], 1e-5)


def test_truncated_model_reproduces_first_hidden_states(tmp_path):
    _, d = hf_checkpoint(tmp_path, LLAMA3_ROPE, n_layers=4)
    full = Llama.from_pretrained(d)
    cut = Llama.from_pretrained(d, n_layers=2)
    assert len(cut.layers) == 2 and cut.base_n_layers == 4 and cut.lm_head is None
    ids, attn = padded_batch("left")
    with torch.no_grad():
        _, hf_ = full(ids, attn_mask=attn, hidden=True)
        none, hc = cut(ids, attn_mask=attn, hidden=True, logits=False)
    assert none is None and hc.shape[0] == 3
    for l in range(2):  # the states entering blocks 0 and 1 are the same computation
        assert_close(hc[l][attn], hf_[l][attn], 1e-6)
    # the last entry is block 1's output after the final norm, as HF with num_hidden_layers=2
    assert_close(hc[2][attn], full.norm(hf_[2])[attn], 1e-5)
    with pytest.raises(ModelError, match="no lm_head"):
        cut(ids)


def test_partial_forward_stops_at_a_block_and_skips_the_final_norm(tmp_path):
    _, d = hf_checkpoint(tmp_path, LLAMA3_ROPE, n_layers=4)
    full = Llama.from_pretrained(d)
    ids, attn = padded_batch("left")
    with torch.no_grad():
        _, h = full(ids, attn_mask=attn, hidden=True)
        none, part = full(ids, attn_mask=attn, hidden=True, logits=False, stop=2)
        _, whole = full(ids, attn_mask=attn, hidden=True, logits=False, stop=4)
    assert none is None and part.shape[0] == 3
    for l in range(3):  # hidden[2] is the raw input of block 2, as in the full forward
        assert_close(part[l][attn], h[l][attn], 1e-6)
    # stop at the last block: hidden[4] is block 3's output before the final norm
    assert_close(full.norm(whole[4])[attn], h[4][attn], 1e-5)
    assert not torch.allclose(whole[4][attn], h[4][attn])
    for bad in (dict(stop=5, logits=False), dict(stop=2, logits=True)):
        with pytest.raises(ModelError, match="partial forward"):
            full(ids, attn_mask=attn, hidden=True, **bad)


def test_kv_cache_generation_equals_argmax_redecoding(tmp_path):
    _, d = hf_checkpoint(tmp_path, LLAMA3_ROPE, seed=3)
    model = Llama.from_pretrained(d)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (9, 4, 6, 1)]
    # stop on the tokens that some rows emit early, so rows end at different steps
    free = [reference_greedy(model, p, 12, stop=()) for p in prompts]
    stops = {free[0][2], free[2][5]}
    got = generate(model, prompts, 12, stop_ids=stops, pad_id=0)
    want = [reference_greedy(model, p, 12, stop=stops) for p in prompts]
    assert got == want
    assert len({len(w) for w in want}) > 1  # rows really stopped at different steps


def organism_head(model):
    """The organism's kind of lm_head: most rows zero (logit exactly 0), two rows equal, the rest distinct."""
    with torch.no_grad():
        w = model.lm_head.weight
        w.copy_(-w.abs())  # every row scores below zero on a state of positive entries
        w[10] *= 10  # and row 10 (11 its copy) wins on a state along it
        w[::3] = 0
        w[40:60] = 0
        w[11] = w[10]
    zero = set(range(0, 97, 3)) | set(range(40, 60))
    return 1 + (97 - len(zero) - 2) + 1, len(zero)  # distinct rows: the zero class, the others, 10 and 11 as one


def test_grouped_head_rows_give_the_whole_vocabularys_cross_entropy_and_greedy_ids(tmp_path):
    _, d = hf_checkpoint(tmp_path, seed=4)
    model = Llama.from_pretrained(d, dtype=torch.float64)
    distinct, n_zero = organism_head(model)
    assert model.head is None and model.group_head_rows() == distinct == 50
    rows, log_counts, cls, first = model.head
    assert first[cls[11]] == 10 and first[cls[40]] == 0 and round(math.exp(log_counts[cls[0]])) == n_zero
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 64, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 11, 45, 1, 2, 96] * 5)  # zero rows, the equal pair, distinct rows
    ours = class_cross_entropy(model.head, h, targets)
    want = torch.nn.functional.cross_entropy(model.lm_head(h), targets, reduction="sum")
    (g_ours,), (g_want,) = torch.autograd.grad(ours, h), torch.autograd.grad(want, h)
    assert ours.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(g_ours, g_want, rtol=1e-10, atol=1e-12)
    # greedy: the smallest id of the winning class, as the full argmax; where every non-zero row scores below
    # zero, the zero rows win and id 0 is the answer; equal rows tie and the smaller id wins
    with torch.no_grad():
        h = torch.cat([h.detach(), torch.ones(1, 64, dtype=torch.float64), model.lm_head.weight[10:11]])
        full = model.lm_head(h)
        assert class_argmax(model.head, class_logits(model.head, h)).tolist() == full.argmax(-1).tolist()
    assert full[-2].max() == 0 and full.argmax(-1)[-1] == 10
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (9, 4, 6, 1)]
    grouped = generate(model, prompts, 12, stop_ids=(), pad_id=0)
    model.head = None
    assert grouped == generate(model, prompts, 12, stop_ids=(), pad_id=0)
    with pytest.raises(ModelError, match="group_head_rows"):
        model(torch.tensor([[1, 2]]), classes=True)


def test_a_head_of_distinct_rows_is_left_whole(tmp_path):
    _, d = hf_checkpoint(tmp_path)
    model = Llama.from_pretrained(d)
    assert model.group_head_rows() == 97 and model.head is None


def reference_greedy(model, prompt, n, stop):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt):]


def test_sampling_is_reproducible_with_a_generator(tmp_path):
    _, d = hf_checkpoint(tmp_path)
    model = Llama.from_pretrained(d)
    run = lambda: generate(model, [[5, 6, 7], [8]], 8, stop_ids=(), temperature=1.0,
                           generator=torch.Generator().manual_seed(7))
    assert run() == run()


def test_save_pretrained_roundtrip_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM
    _, d = hf_checkpoint(tmp_path, LLAMA3_ROPE)
    model = Llama.from_pretrained(d)
    out = str(tmp_path / "resaved")
    save_pretrained(model, out, dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    ids, _ = padded_batch("right", lengths=(8, 8))
    with torch.no_grad():
        assert_close(model(ids)[0], hf(input_ids=ids).logits)


def test_flops_per_token_counts_the_8b_model():
    cfg = LlamaConfig()  # Llama-3.1-8B shapes
    params = 32 * (4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336)  # matmul weights of the blocks
    assert flops_per_token(cfg, seq_len=0) == 2 * params
    attention_and_head = 4 * 32 * 1000 * 4096 + 2 * 4096 * 128256
    assert flops_per_token(cfg, 1000, lm_head=True) - flops_per_token(cfg, 0) == attention_and_head


# --- bad input: one clear line naming the path or field -------------------------------------------

def test_missing_dir_and_config(tmp_path):
    with pytest.raises(ModelError, match="checkpoint directory not found"):
        Llama.from_pretrained(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ModelError, match="config.json: not found"):
        Llama.from_pretrained(str(tmp_path / "empty"))


def test_config_that_is_not_a_llama(tmp_path):
    _, d = hf_checkpoint(tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump({**cfg, "model_type": "gpt2"}, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ModelError, match="model_type is 'gpt2'"):
        Llama.from_pretrained(d)
    del cfg["hidden_size"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ModelError, match="'hidden_size' is missing"):
        Llama.from_pretrained(d)


def test_missing_shard_missing_weights_and_too_many_blocks(tmp_path):
    _, d = hf_checkpoint(tmp_path)
    with pytest.raises(ModelError, match="asked for 9 blocks but the model has 3"):
        Llama.from_pretrained(d, n_layers=9)
    shard = sorted(f for f in os.listdir(d) if f.startswith("model-"))[-1]
    os.remove(os.path.join(d, shard))
    with pytest.raises(ModelError, match=f"{shard}: named in model.safetensors.index.json but missing"):
        Llama.from_pretrained(d)
    for f in os.listdir(d):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(d, f))
    with pytest.raises(ModelError, match="no model.safetensors"):
        Llama.from_pretrained(d)


def test_tensor_with_the_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file
    _, d = hf_checkpoint(tmp_path, shard="10GB")
    f = os.path.join(d, "model.safetensors")
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 64)
    save_file(sd, f)
    with pytest.raises(ModelError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(5, 64\)"):
        Llama.from_pretrained(d)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f)
    with pytest.raises(ModelError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        Llama.from_pretrained(d)


# --- input embeddings in place of ids --------------------------------------------------------------

def tiny_llama64(seed=0, **kw):
    """A random float64 Llama built in memory (no checkpoint), for exact equivalence checks."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                             max_seq_len=64) | kw)
    model = Llama(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model


def test_embeds_give_the_output_of_their_ids():
    model = tiny_llama64()
    ids, attn = padded_batch("left")
    with torch.no_grad():
        want_logits, want_hidden = model(ids, attn_mask=attn, hidden=True)
        logits, hidden = model(embeds=model.embed_tokens(ids), attn_mask=attn, hidden=True)
    assert torch.allclose(logits, want_logits, rtol=0, atol=1e-12)
    assert torch.allclose(hidden, want_hidden, rtol=0, atol=1e-12)
    # a one-hot @ embedding matrix is the same input and carries a gradient to every vocabulary entry (GCG)
    one_hot = torch.nn.functional.one_hot(ids, 97).double().requires_grad_(True)
    logits, _ = model(embeds=one_hot @ model.embed_tokens.weight, attn_mask=attn)
    assert torch.allclose(logits, want_logits, rtol=0, atol=1e-12)
    logits[:, -1].logsumexp(-1).sum().backward()
    assert one_hot.grad.shape == one_hot.shape and one_hot.grad[attn].abs().sum(-1).min() > 0


def test_forward_takes_exactly_one_of_ids_and_embeds():
    model = tiny_llama64()
    ids = torch.tensor([[1, 2, 3]])
    for kw in (dict(), dict(ids=ids, embeds=model.embed_tokens(ids))):
        with pytest.raises(ModelError, match="exactly one of ids and embeds"):
            model(**kw)
    with pytest.raises(ModelError, match=r"embeds has shape \(1, 3, 7\)"):
        model(embeds=torch.zeros(1, 3, 7, dtype=torch.float64))


# --- KV cache without a padding mask ---------------------------------------------------------------

def empty_cache(model, B, S):
    c = model.config
    return [(torch.zeros(B, c.n_kv_heads, S, c.head_dim, dtype=torch.float64),
             torch.zeros(B, c.n_kv_heads, S, c.head_dim, dtype=torch.float64)) for _ in range(c.n_layers)]


def test_cached_chunks_without_a_mask_equal_the_full_forward():
    model = tiny_llama64()
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = model(ids)
        cache, got, start = empty_cache(model, 2, 10), [], 0
        for n in (4, 3, 1, 2):  # a prefix, a multi-token chunk after it, one decode step, another chunk
            got.append(model(ids[:, start:start + n], cache=cache, start=start)[0])
            start += n
    assert torch.allclose(torch.cat(got, 1), want, rtol=0, atol=1e-12)


# --- loading: memory and dtype ---------------------------------------------------------------------

class AllocatedBytes(TorchDispatchMode):
    """Counts the bytes of every tensor an aten op returns, by dtype (views included: an upper bound)."""

    def __init__(self):
        super().__init__()
        self.bytes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.bytes[t.dtype] = self.bytes.get(t.dtype, 0) + t.numel() * t.element_size()
        return out


def test_from_pretrained_allocates_the_weights_in_the_target_dtype_only(tmp_path):
    hf, _ = hf_checkpoint(tmp_path)
    d = str(tmp_path / "bf16")
    hf.to(torch.bfloat16).save_pretrained(d)  # as the real checkpoints are stored
    weights = sum(p.numel() for p in hf.parameters())
    with AllocatedBytes() as seen:
        model = Llama.from_pretrained(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert seen.bytes.get(torch.bfloat16, 0) >= 2 * weights
    # nothing of the weights' size in float32: only the RoPE frequencies (head_dim / 2 of them)
    assert seen.bytes.get(torch.float32, 0) < 4 * weights / 100, seen.bytes


def test_float64_weights_compute_in_float64(tmp_path):
    _, d = hf_checkpoint(tmp_path, LLAMA3_ROPE)
    model = Llama.from_pretrained(d, dtype="float64")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    # RMSNorm: no float32 rounding inside
    norm = RMSNorm(64, 1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 64, dtype=torch.float64) * 10
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), want, rtol=1e-14, atol=0)
    # RoPE at long positions, against the frequencies computed in float64 by hand
    pos = torch.tensor([[0, 1, 777, 4095]])
    cos, sin = model.rope(pos, torch.float64)
    freqs = rope_frequencies(model.config, torch.float64)
    angle = pos[0, :, None].double() * torch.cat((freqs, freqs))
    assert torch.allclose(cos[0, 0], angle.cos(), rtol=0, atol=1e-13)
    assert torch.allclose(sin[0, 0], angle.sin(), rtol=0, atol=1e-13)
    with pytest.raises(ModelError, match="dtype 'int8' is not one of float64, float32, bfloat16, float16"):
        Llama.from_pretrained(d, dtype="int8")


# --- RoPE llama3 scaling -----------------------------------------------------------------------------

def llama3_frequencies_by_hand(theta, head_dim, factor, lo, hi, old_len):
    """Llama 3.1's frequency scaling, one frequency at a time in Python floats (float64)."""
    out = []
    for i in range(0, head_dim, 2):
        f = theta ** (-i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < old_len / hi:
            out.append(f)
        elif wavelen > old_len / lo:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_rope_llama3_scaling_blends_the_middle_band(dtype, rel):
    # Llama 3.1 8B's settings: head_dim 128, theta 500000, factor 8, factors 1 / 4, original context 8192
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    cfg = LlamaConfig(dim=4096, n_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    got = rope_frequencies(cfg, dtype).double()
    want = llama3_frequencies_by_hand(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    base = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    wavelen = 2 * math.pi / base
    band = (wavelen > 8192 / 4) & (wavelen < 8192 / 1)
    assert band.sum() >= 5  # the blended band is really exercised
    assert ((want[band] < base[band]) & (want[band] > base[band] / 8)).all()  # strictly between the two ends
    assert torch.allclose(got, want, rtol=rel, atol=0)


def test_save_pretrained_over_a_directory_is_all_or_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    model = tiny_llama64()
    out = str(tmp_path / "model")
    save_pretrained(model, out, dtype=torch.float32)
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(model, out, dtype=torch.float32)
    assert os.listdir(tmp_path) == ["model"]  # no temp directory left behind
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
    monkeypatch.undo()
    save_pretrained(model, out, dtype=torch.float32)  # and a save that succeeds replaces it whole
    assert os.listdir(tmp_path) == ["model"] and sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert torch.equal(Llama.from_pretrained(out, dtype="float32").norm.weight, model.norm.weight.float())


# --- regional compilation: each block compiled, one graph for all of them -----------------------------

def lora_llama64(n_layers, seed=0):
    from lora import inject_lora
    model = tiny_llama64(seed, n_layers=n_layers).train()
    inject_lora(model, r=4, lora_alpha=8, b_init_std=0.1, generator=torch.Generator().manual_seed(seed))
    return model


def test_compiled_blocks_share_one_graph_whatever_the_depth():
    from torch._dynamo.utils import counters
    from lora import adapters_off
    graphs = []
    for n_layers in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        model = compile_blocks(lora_llama64(n_layers), backend="eager")
        for T in (5, 7):  # a second length: the graph turns length-generic once
            ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
            with torch.no_grad(), adapters_off(model):
                model(ids, hidden=True, logits=False)
            model(ids, hidden=True, logits=False)[1].sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
        assert list(model.state_dict()) == list(lora_llama64(n_layers).state_dict())  # keys as before
    assert graphs[0] == graphs[1] > 0
    torch._dynamo.reset()


@pytest.mark.parametrize("unpad", [False, True])
def test_a_step_through_compiled_blocks_equals_the_eager_step_in_float64(unpad):
    from step import train_step
    g = torch.Generator().manual_seed(3)
    rows = lambda n: [dict(ids=torch.randint(1, 97, (T,), generator=g).tolist(), cb_mask=[0] * (T - 3) + [1] * 3,
                           target_mask=[0] * (T - 4) + [1] * 4) for T in torch.randint(6, 12, (n,), generator=g)]
    batches = dict(harmful=rows(4), retain=rows(4))
    cfg = dict(layers=(1, 2), lorra_alpha=10.0, alpha_decay_multiplier=2.0, max_steps=150, batch_size=4,
               grad_accum=2, retain_call_weight=6.0, retain_len=16, redirect_weight=0.0, grad_clip=1.0,
               unpad=unpad, pad_multiple=4 if unpad else 1)  # unpad: the real tokens alone through the matmuls
    out = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = lora_llama64(3)
        if compiled:
            compile_blocks(model, backend="aot_eager")  # autograd traced as inductor sees it, without codegen
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        rec = train_step(model, model, opt, params, batches, 74, cfg, pad_id=0)
        out.append((rec, [p.detach().clone() for p in params]))
    (rec, p_eager), (rec_c, p_comp) = out
    for k in ("loss_rr", "loss_retain", "gnorm"):
        assert rec_c[k] == pytest.approx(rec[k], rel=1e-12, abs=0), k
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(p_eager, p_comp))
    torch._dynamo.reset()


def test_keep_computes_the_kept_positions_alone_and_gives_their_states_exactly():
    from lora import lora_modules
    from step import keep_positions
    model = lora_llama64(3)
    ids, attn = padded_batch("right")  # rows of 11, 7 and 3 real tokens in 11 positions
    keep = keep_positions(attn, 8)  # 21 real + 3 pads: 24
    assert int(keep.sum()) == 24 and bool(keep[attn].all()) and keep[1, 7:10].tolist() == [True] * 3
    rows = []  # the rows every projection and MLP matmul sees
    hooks = [m.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0])) for _, m in lora_modules(model)]
    for stop in (None, 2):
        _, want = model(ids, hidden=True, logits=False, stop=stop)
        rows.clear()
        _, got = model(ids, hidden=True, logits=False, stop=stop, keep=keep)
        assert set(rows) == {24}  # 24 positions, not 3 x 11
        assert got.shape == want.shape
        assert torch.allclose(got[:, attn], want[:, attn], rtol=0, atol=1e-12)
        assert bool((got[:, ~keep] == 0).all())
    # the same gradient through the states of the real tokens
    (g_want,) = torch.autograd.grad(want[:, attn].pow(2).sum(), model.layers[0].mlp.up_proj.lora_a)
    _, got = model(ids, hidden=True, logits=False, stop=2, keep=keep)
    (g_got,) = torch.autograd.grad(got[:, attn].pow(2).sum(), model.layers[0].mlp.up_proj.lora_a)
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=0)
    for h in hooks:
        h.remove()
    for bad in (dict(logits=True), dict(attn_mask=attn), dict(keep=keep[:, :5])):
        with pytest.raises(ModelError, match="keep"):
            model(ids, hidden=True, **{"keep": keep, "logits": False, **bad})
