import pytest
import torch
import transformers

import original
from lora import adapters_off, inject_lora, lora_modules
from losses import (coefficients, merge_diagnostics, rerouting_diagnostics, rerouting_loss, retain_diagnostics,
                    retain_loss)
from model import Llama


def states(L=3, B=2, T=5, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, B, T, D, generator=g).to(dtype), torch.randn(L, B, T, D, generator=g).to(dtype)


def padded_mask():
    m = torch.ones(2, 5)
    m[1, 3:] = 0  # 3 padded positions of 10
    return m


# -- tensor-level transcriptions of the original's two lines, with its long attention mask --

def original_rerouting(lora_h, frozen_h, attn_long):
    lm = attn_long.repeat(lora_h.shape[0], 1, 1).unsqueeze(-1)
    a = lora_h / torch.norm(lora_h, dim=-1, keepdim=True, dtype=torch.float)
    b = frozen_h / torch.norm(frozen_h, dim=-1, keepdim=True, dtype=torch.float)
    return torch.relu((a * b * lm).sum(dim=-1)).sum() / lm.sum()


def original_retain(lora_h, frozen_h, attn_long):
    lm = attn_long.repeat(lora_h.shape[0], 1, 1).unsqueeze(-1)
    return torch.norm(lora_h * lm - frozen_h * lm, dim=-1, p=2, dtype=torch.float).nanmean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_match_original_formulas_in_fp32_and_bf16(dtype):
    lora_h, frozen_h = states(dtype=dtype)
    m = padded_mask()
    rr, ret = rerouting_loss(lora_h, frozen_h, m), retain_loss(lora_h, frozen_h, m)
    assert rr.dtype == ret.dtype == torch.float32
    assert torch.equal(rr, original_rerouting(lora_h, frozen_h, m.long()))
    assert torch.equal(ret, original_retain(lora_h, frozen_h, m.long()))


def test_masked_norm_identity():
    # ||(h1 - h2) * m|| = m * ||h1 - h2|| for binary m: masking the states masks the distance
    h1, h2 = states()
    m = padded_mask()[None, :, :, None]
    lhs = torch.linalg.vector_norm(h1 * m - h2 * m, dim=-1)
    rhs = m[..., 0] * torch.linalg.vector_norm(h1 - h2, dim=-1)
    assert torch.allclose(lhs, rhs, atol=1e-6)


def test_retain_nanmean_is_not_mean_over_real_tokens_once_padded():
    lora_h, frozen_h = states()
    m = padded_mask()
    L, B, T, _ = lora_h.shape
    dist = torch.linalg.vector_norm(lora_h - frozen_h, dim=-1) * m  # (L, B, T), 0 on padding
    per_real_token = dist.sum() / (L * m.sum())
    got = retain_loss(lora_h, frozen_h, m)
    assert torch.allclose(got, dist.sum() / (L * B * T))  # padded positions count in the denominator
    assert torch.allclose(got, per_real_token * m.sum() / (B * T))  # off by the real-token share, here 0.7
    assert not torch.allclose(got, per_real_token, rtol=0.1)
    assert retain_diagnostics(lora_h, frozen_h, m)["l2"] == pytest.approx(per_real_token.item(), rel=1e-5)
    full = torch.ones(2, 5)  # without padding the two agree
    dist = torch.linalg.vector_norm(lora_h - frozen_h, dim=-1)
    assert torch.allclose(retain_loss(lora_h, frozen_h, full), dist.sum() / (L * full.sum()))


def test_retain_weight_scales_the_chosen_positions_and_none_is_the_original():
    lora_h, frozen_h = states()
    m = padded_mask()
    L, B, T, _ = lora_h.shape
    assert torch.equal(retain_loss(lora_h, frozen_h, m, torch.ones(B, T)), retain_loss(lora_h, frozen_h, m))
    w = torch.ones(B, T)
    w[0, 1:3] = 8.0  # e.g. a reply's tokens counted 8x
    dist = torch.linalg.vector_norm(lora_h - frozen_h, dim=-1) * m
    assert torch.allclose(retain_loss(lora_h, frozen_h, m, w), (dist * w).sum() / (L * B * T))
    assert retain_loss(lora_h, frozen_h, m, w) > retain_loss(lora_h, frozen_h, m)
    with pytest.raises(ValueError, match=r"weight must be \(B, T\)"):
        retain_loss(lora_h, frozen_h, m, torch.ones(B, T + 1))


def test_rerouting_is_mean_relu_cosine_over_masked_positions():
    lora_h, frozen_h = states()
    m = padded_mask()
    assert rerouting_loss(frozen_h, frozen_h, m).item() == pytest.approx(1.0, abs=1e-6)  # identical states: start
    assert rerouting_loss(-frozen_h, frozen_h, m).item() == 0.0  # opposed: ReLU clips
    cos = torch.nn.functional.cosine_similarity(lora_h, frozen_h, dim=-1)  # (L, B, T)
    want = (cos.clamp(min=0) * m).sum() / (lora_h.shape[0] * m.sum())
    assert torch.allclose(rerouting_loss(lora_h, frozen_h, m), want, atol=1e-6)
    scrambled = lora_h.clone()
    scrambled[:, 1, 3:] = 1e3  # masked-out positions do not matter
    assert torch.equal(rerouting_loss(scrambled, frozen_h, m), rerouting_loss(lora_h, frozen_h, m))


def test_retain_gradient_is_finite_at_zero_distance():
    # at step 0 and on padding the distance is exactly 0, where the L2 norm has no derivative
    frozen = states()[1]
    lora_h = frozen.clone().requires_grad_(True)
    retain_loss(lora_h, frozen, padded_mask()).backward()
    assert torch.isfinite(lora_h.grad).all()


@pytest.mark.parametrize("fn", [rerouting_loss, retain_loss, rerouting_diagnostics, retain_diagnostics])
def test_empty_mask_raises_instead_of_nan(fn):
    lora_h, frozen_h = states()
    with pytest.raises(ValueError, match="mask is empty") as e:
        fn(lora_h, frozen_h, torch.zeros(2, 5))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"mask must be \(B, T\)"):
        fn(lora_h, frozen_h, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\(L, B, T, D\)"):
        fn(lora_h, frozen_h[:2], torch.ones(2, 5))


def test_coefficients_schedule():
    assert coefficients(0, 150, 10.0) == (10.0, 0.0)
    assert coefficients(75, 150, 10.0) == pytest.approx((7.5, 2.5))  # original: alpha*(1-75/300), alpha*75/300
    assert coefficients(150, 150, 10.0) == pytest.approx((5.0, 5.0))  # the original run ends half way
    assert coefficients(600, 150, 10.0) == (0.0, 10.0)  # clamped past the end, never negative
    assert coefficients(50, 100, 4.0, decay_multiplier=1.0) == pytest.approx((2.0, 2.0))


@pytest.mark.parametrize("args, words", [
    ((0, 150, -1.0), "alpha must be >= 0"),
    ((0, 0, 10.0), "max_steps must be positive"),
    ((0, 150, 10.0, 0.0), "decay multiplier must be positive"),
    ((-1, 150, 10.0), "step must be >= 0"),
])
def test_coefficients_bad_input(args, words):
    with pytest.raises(ValueError, match=words):
        coefficients(*args)


def test_diagnostics_values():
    frozen = torch.zeros(2, 1, 3, 4)
    frozen[..., 0] = 2.0  # every frozen state is 2 * e0
    lora = torch.zeros(2, 1, 3, 4)
    lora[:, 0, 0, 0] = 3.0  # cos 1, norm 3
    lora[:, 0, 1, 1] = 1.0  # cos 0, norm 1
    lora[:, 0, 2, 0] = -5.0  # cos -1, norm 5, masked out below
    m = torch.tensor([[1.0, 1.0, 0.0]])
    d = rerouting_diagnostics(lora, frozen, m)
    assert d == pytest.approx(dict(cos_mean=0.5, cos_pos_share=0.5, lora_norm=2.0, frozen_norm=2.0, n=4.0))
    r = retain_diagnostics(lora, frozen, m)
    assert r == pytest.approx(dict(l2=(1.0 + 5 ** 0.5) / 2, cos=0.5, n=4.0))
    assert all(type(v) is float for v in list(d.values()) + list(r.values()))


def test_merged_diagnostics_equal_those_of_the_whole_batch():
    torch.manual_seed(0)
    lora, frozen = torch.randn(2, 5, 7, 8), torch.randn(2, 5, 7, 8)
    m = (torch.rand(5, 7) > 0.5).float()
    m[3] = 0.0  # a sample with nothing masked
    for fn in (rerouting_diagnostics, retain_diagnostics):
        whole = fn(lora, frozen, m)
        # unequal micro-batches (1, 2 and 2 samples); the last one holds a sample with nothing masked
        parts = [fn(lora[:, i:j], frozen[:, i:j], m[i:j]) for i, j in ((0, 1), (1, 3), (3, 5))]
        assert merge_diagnostics(parts) == pytest.approx({k: v for k, v in whole.items() if k != "n"}, rel=1e-5)
    assert merge_diagnostics([]) == {}


# -- parity: the losses and their gradients on the LoRA weights == the original recipe's compute_loss, transcribed
#    on transformers' LlamaForCausalLM + peft in tests/original.py (which bench.py times too): same tiny model,
#    weights, adapter, batch. Both sides run in float64, so the tolerance is the maths' (sums in another order
#    differ by ~1e-16 relative), not one CPU's float32 summation order. transformers computes two things in
#    float32 whatever the model's dtype: the RMSNorm and the RoPE angles. In this test they run in the states'
#    dtype, the same formulas (the float32 casts are a precision choice, not a part of the recipe); so do the
#    original's norms (norm_dtype).

TARGET_LAYERS = (1, 3)  # drop_layers_after = 3: both sides keep blocks 0..3 of the 5-block checkpoint
R, LORA_ALPHA, ALPHA, MAX_STEPS = 4, 8, 10.0, 150


def right_padded(g, lengths, T):
    ids = torch.randint(1, 256, (len(lengths), T), generator=g)
    attn = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
        ids[i, n:] = 0
    return ids, attn


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = str(tmp_path_factory.mktemp("hf_llama"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("step", [1, 120])
def test_losses_and_lora_gradients_match_original_recipe(checkpoint, transformers_in_float64, step):
    n_keep = max(TARGET_LAYERS) + 1
    # --- the original: config.num_hidden_layers = drop_layers_after + 1, peft LoRA on every kept block
    cfg = transformers.AutoConfig.from_pretrained(checkpoint)
    cfg.num_hidden_layers = n_keep
    assert cfg.to_dict().get("rope_scaling") is None  # the plain RoPE the patch above computes
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint, config=cfg, dtype=torch.float64,
                                                       attn_implementation="sdpa")
    ref = original.with_lora(hf, R, LORA_ALPHA, 0.0)
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3, generator=g)  # nonzero B: non-trivial gradients, cosines of both signs

    # --- ours: truncated load, hand-rolled LoRA with the same A and B
    model = Llama.from_pretrained(checkpoint, dtype=torch.float64, n_layers=n_keep)
    inject_lora(model, r=R, lora_alpha=LORA_ALPHA, dropout=0.0)
    ref_params = dict(ref.named_parameters())
    pairs = []  # (ours, peft's)
    for name, m in lora_modules(model):
        a = ref_params[f"base_model.model.model.{name}.lora_A.default.weight"]
        b = ref_params[f"base_model.model.model.{name}.lora_B.default.weight"]
        with torch.no_grad():
            m.lora_a.copy_(a)
            m.lora_b.copy_(b)
        pairs += [(m.lora_a, a), (m.lora_b, b)]
    assert len(pairs) == 2 * len(original.TARGET_MODULES) * n_keep == sum("lora_" in n for n in ref_params)

    retain_ids, retain_attn = right_padded(g, [12, 9, 5], 12)
    cb_ids, cb_attn = right_padded(g, [7, 12, 10], 12)
    inputs = dict(input_ids=retain_ids, attention_mask=retain_attn,
                  input_ids_circuit_breaker=cb_ids, attention_mask_circuit_breaker=cb_attn)
    ref_loss, ref_retain, ref_cb = original.compute_loss(ref, inputs, TARGET_LAYERS, ALPHA, step,
                                                         norm_dtype=torch.float64)
    ref_loss.backward()

    c_rr, c_retain = coefficients(step, MAX_STEPS, ALPHA)
    with adapters_off(model), torch.no_grad():
        frozen_retain = model(retain_ids, retain_attn.bool(), hidden=True, logits=False)[1]
        frozen_cb = model(cb_ids, cb_attn.bool(), hidden=True, logits=False)[1][list(TARGET_LAYERS)]
    lora_retain = model(retain_ids, retain_attn.bool(), hidden=True, logits=False)[1]
    lora_cb = model(cb_ids, cb_attn.bool(), hidden=True, logits=False)[1][list(TARGET_LAYERS)]
    ret = retain_loss(lora_retain, frozen_retain, retain_attn.float())
    rr = rerouting_loss(lora_cb, frozen_cb, cb_attn.float())
    loss = c_rr * rr + c_retain * ret
    loss.backward()

    cos = torch.nn.functional.cosine_similarity(lora_cb, frozen_cb, dim=-1)[:, cb_attn.bool()]
    assert (cos < 0).any() and (cos > 0).any() and ref_retain.item() > 0.01  # every part of the math is exercised
    assert ret.dtype == rr.dtype == ref_retain.dtype == ref_cb.dtype == torch.float64
    torch.testing.assert_close(ret, ref_retain, rtol=1e-10, atol=0)
    torch.testing.assert_close(rr, ref_cb, rtol=1e-10, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    for ours, theirs in pairs:
        scale = theirs.grad.abs().max()
        assert scale > 0 and ours.grad.dtype == torch.float64
        # sums over every position in other orders: float64 rounding, ~1e-16
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-10 * scale)
