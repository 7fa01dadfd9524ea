import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lora import (TARGETS, LoRAError, LoRALinear, adapters_off, inject_lora, load_lora, load_lora_state_dict,
                  lora_config, lora_modules, lora_state_dict, merge_lora, save_lora)
from model import Llama, LlamaConfig

CFG = dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)


def tiny(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**CFG)).to(dtype).eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 9), generator=g)
    attn = torch.ones(2, 9, dtype=torch.bool)
    attn[1, 6:] = False  # right padding
    return ids, attn


def hidden(model, ids, attn):
    with torch.no_grad():
        return model(ids, attn, hidden=True, logits=False)[1]


def test_zero_b_lora_equals_base():
    model = tiny()
    ids, attn = batch()
    base = hidden(model, ids, attn)
    inject_lora(model, r=4, lora_alpha=8, generator=torch.Generator().manual_seed(0))
    assert all(m.lora_a.abs().sum() > 0 for _, m in lora_modules(model))
    assert torch.equal(hidden(model, ids, attn), base)


def test_adapters_off_equals_base_with_nonzero_b():
    model = tiny()
    ids, attn = batch()
    base = hidden(model, ids, attn)
    inject_lora(model, r=4, lora_alpha=8, b_init_std=0.05, generator=torch.Generator().manual_seed(0))
    adapted = hidden(model, ids, attn)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with adapters_off(model):
        assert torch.equal(hidden(model, ids, attn), base)
    assert torch.equal(hidden(model, ids, attn), adapted)  # switched back on
    with pytest.raises(RuntimeError):
        with adapters_off(model):
            raise RuntimeError("boom")
    assert all(m.enabled for _, m in lora_modules(model))  # restored after an error too


def test_merge_equals_unmerged_forward_and_restores_plain_linear():
    model = tiny(dtype=torch.float64)
    keys_before = set(model.state_dict())
    ids, attn = batch()
    inject_lora(model, r=4, lora_alpha=8, layers=[0, 2], b_init_std=0.05, generator=torch.Generator().manual_seed(0))
    adapted = hidden(model, ids, attn)
    merge_lora(model)
    assert not lora_modules(model)
    for i in range(4):
        for name in TARGETS:
            parent = model.layers[i].self_attn if hasattr(model.layers[i].self_attn, name) else model.layers[i].mlp
            assert type(getattr(parent, name)) is nn.Linear
    assert set(model.state_dict()) == keys_before  # plain HF keys again, ready for export
    merged = hidden(model, ids, attn)
    assert torch.allclose(merged, adapted, rtol=0, atol=1e-12), (merged - adapted).abs().max()


def test_adapters_off_refuses_a_merged_model():
    model = tiny()
    inject_lora(model, r=4, lora_alpha=8, layers=[1], b_init_std=0.05, generator=torch.Generator().manual_seed(0))
    merge_lora(model)
    with pytest.raises(LoRAError, match="layers.1.self_attn.q_proj holds a merged LoRA update") as e:
        with adapters_off(model):
            pass
    assert "\n" not in str(e.value)
    inject_lora(model, r=4, lora_alpha=8, layers=[1])  # a new adapter over merged weights: still not the base
    with pytest.raises(LoRAError, match="merged LoRA update"):
        with adapters_off(model):
            pass
    with adapters_off(tiny()):  # a model without adapters is its own base
        pass


def test_lora_math_scale_and_dropout_on_lora_path_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=False).double()
    lora = LoRALinear(base, r=4, lora_alpha=12, dropout=0.5)
    assert lora.lora_a.dtype == lora.lora_b.dtype == torch.float64  # a float64 model's adapter stays float64
    with torch.no_grad():
        lora.lora_a.normal_()
        lora.lora_b.normal_()
    x = torch.randn(3, 16, dtype=torch.float64)
    assert lora.scale == 3.0
    lora.eval()
    want = x @ base.weight.T + 3.0 * (x @ lora.lora_a.T @ lora.lora_b.T)
    assert torch.allclose(lora(x), want, rtol=0, atol=1e-12)
    lora.train()
    torch.manual_seed(7)
    want = x @ base.weight.T + 3.0 * (F.dropout(x, 0.5, True) @ lora.lora_a.T @ lora.lora_b.T)
    torch.manual_seed(7)
    assert torch.allclose(lora(x), want, rtol=0, atol=1e-12)
    lora.enabled = False
    assert torch.equal(lora(x), base(x))  # the base path never sees dropout


class FloatCopies(TorchDispatchMode):
    """Records the shapes of the float32 tensors that dtype conversions produce."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to) and out.dtype == torch.float32:
            self.shapes.append(tuple(out.shape))
        return out


def test_under_autocast_the_lora_path_skips_the_float32_copy_and_gives_the_same_bits():
    # autocast casts a matmul's inputs to bfloat16 anyway: the old float32 round trip of the activation changed no
    # bit of the output or of the gradients, it only cost two casts of (tokens x in) per adapter
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=False).to(torch.bfloat16)
    lora = LoRALinear(base, r=4, lora_alpha=8, dropout=0.5)
    with torch.no_grad():
        lora.lora_a.normal_()
        lora.lora_b.normal_()
    x = torch.randn(5, 16).to(torch.bfloat16).requires_grad_(True)
    x_old = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(7)
        with FloatCopies() as seen:
            y = lora(x)
        torch.manual_seed(7)
        y_old = F.linear(x_old, base.weight)
        h = F.dropout(x_old, 0.5, True).to(torch.float32)  # the float32 round trip this path used to take
        y_old = y_old + (F.linear(F.linear(h, lora.lora_a), lora.lora_b) * lora.scale).to(y_old.dtype)
    assert (5, 16) not in seen.shapes  # no float32 copy of the activation
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_old)
    grads = torch.autograd.grad(y.float().square().sum(), (x, lora.lora_a, lora.lora_b))
    grads_old = torch.autograd.grad(y_old.float().square().sum(), (x_old, lora.lora_a, lora.lora_b))
    assert all(torch.equal(g, g_old) for g, g_old in zip(grads, grads_old))
    assert grads[1].dtype == torch.float32  # the adapter itself stays float32 for AdamW


def test_only_lora_params_require_grad():
    model = tiny()
    params = inject_lora(model, r=4, lora_alpha=8, layers=[1, 3], b_init_std=0.01,
                         generator=torch.Generator().manual_seed(0))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(params) == len(trainable) == 2 * len(TARGETS) * 2
    assert {id(p) for p in params} == {id(p) for _, p in trainable}
    assert all(n.endswith((".lora_a", ".lora_b")) and n.split(".")[1] in ("1", "3") for n, _ in trainable)
    ids, attn = batch()
    model(ids, attn, hidden=True, logits=False)[1].square().sum().backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_init_is_kaiming_uniform_zero_b_and_deterministic():
    a, b = tiny(), tiny()
    inject_lora(a, r=4, lora_alpha=8, generator=torch.Generator().manual_seed(3))
    inject_lora(b, r=4, lora_alpha=8, generator=torch.Generator().manual_seed(3))
    for (_, ma), (_, mb) in zip(lora_modules(a), lora_modules(b)):
        assert torch.equal(ma.lora_a, mb.lora_a)
        bound = 1 / math.sqrt(ma.in_features)
        assert ma.lora_a.abs().max() <= bound and ma.lora_a.abs().max() > 0.8 * bound
        assert not ma.lora_b.any()
    c = tiny()
    inject_lora(c, r=4, lora_alpha=8, b_init_std=1e-3, generator=torch.Generator().manual_seed(3))
    stds = torch.cat([m.lora_b.flatten() for _, m in lora_modules(c)]).std()
    assert 0.8e-3 < stds < 1.2e-3


def test_inject_layers_and_targets():
    model = tiny()
    inject_lora(model, r=2, lora_alpha=2, layers=[2], targets=("q_proj", "down_proj"))
    names = [n for n, _ in lora_modules(model)]
    assert names == ["layers.2.self_attn.q_proj", "layers.2.mlp.down_proj"]
    assert lora_config(model) == dict(r=2, lora_alpha=2, dropout=0.0, layers=[2], targets=["q_proj", "down_proj"])
    full = tiny()
    inject_lora(full, r=2, lora_alpha=2)  # None: every block the model has
    assert lora_config(full)["layers"] == [0, 1, 2, 3] and len(lora_modules(full)) == 4 * 7


@pytest.mark.parametrize("kw, words", [
    (dict(layers=[4]), "layer 4 is out of range"),
    (dict(layers=[]), "layer list is empty"),
    (dict(targets=("qkv",)), "unknown LoRA target qkv"),
    (dict(r=0), "positive integer"),
    (dict(b_init_std=-1.0), "b_init_std"),
])
def test_inject_bad_settings_one_line(kw, words):
    args = dict(r=2, lora_alpha=2) | kw
    with pytest.raises(LoRAError, match=words) as e:
        inject_lora(tiny(), **args)
    assert "\n" not in str(e.value)


def test_save_load_roundtrip(tmp_path):
    model = tiny()
    inject_lora(model, r=4, lora_alpha=8, dropout=0.05, layers=[0, 1], b_init_std=0.05,
                generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / "adapter.safetensors")
    save_lora(path, model, dict(init_from="some/dir", layers=[1], step=7))
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # no temp file left behind
    sd, meta = load_lora(path)
    assert meta == dict(init_from="some/dir", layers=[1], step=7, lora=lora_config(model))
    other = tiny()
    inject_lora(other, **meta["lora"])
    load_lora_state_dict(other, sd)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(other)[k], v)
    ids, attn = batch()
    assert torch.equal(hidden(other, ids, attn), hidden(model, ids, attn))


def test_load_errors_are_one_clear_line(tmp_path):
    model = tiny()
    inject_lora(model, r=4, lora_alpha=8, layers=[0, 1])
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    cases = [
        ({k: v for k, v in sd.items() if k != "layers.1.mlp.up_proj.lora_b"},
         "missing, first layers.1.mlp.up_proj.lora_b"),
        (sd | {"layers.3.self_attn.q_proj.lora_a": torch.zeros(4, 64)},
         "unexpected tensor.*layers.3.self_attn.q_proj.lora_a"),
        (sd | {"layers.0.self_attn.k_proj.lora_a": torch.zeros(8, 64)},
         r"layers.0.self_attn.k_proj.lora_a has shape \(8, 64\), the model expects \(4, 64\)"),
    ]
    for bad, words in cases:
        with pytest.raises(LoRAError, match=words) as e:
            load_lora_state_dict(model, bad)
        assert "\n" not in str(e.value)
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    for path, words in [(str(tmp_path / "nope.safetensors"), "no such adapter file"),
                        (str(garbage), "not a readable safetensors adapter")]:
        with pytest.raises(LoRAError, match=words) as e:
            load_lora(path)
        assert "\n" not in str(e.value)
