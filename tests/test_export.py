import json
import os
import runpy
import shutil
import sys

import pytest
import torch
from safetensors import safe_open

from lora import inject_lora, load_lora_state_dict
from model import Llama
from tiny import ROOT, run_train, tiny_base, tiny_data

IDS = torch.tensor([[128000, 791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13, 578]])


def export(*args):
    """`python export.py ARGS` in this process (no second torch import): None on success, else the exit message."""
    argv, sys.argv = sys.argv, ["export.py", *map(str, args)]
    try:
        runpy.run_path(os.path.join(ROOT, "export.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv


def exported(*args):
    err = export(*args)
    assert err is None, err


def tensors(path):
    """name -> tensor over every safetensors file of a dir."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-block tiny base, 3 circuit-breaker steps on blocks 0..2 (layers 1,2) with a large random B start so the
    adapter really moves the logits, and both exports of the checkpoint."""
    root = tmp_path_factory.mktemp("export")
    base = tiny_base(root / "base")
    (root / "base" / "original").mkdir()
    (root / "base" / "original" / "tokenizer.model").write_bytes((root / "base" / "tokenizer.model").read_bytes())
    (root / "base" / "original" / "params.json").write_text('{"dim": 32}')
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, root / "base" / "original" / "consolidated.00.pth")
    (root / "base" / "generation_config.json").write_text('{"bos_token_id": 128000, "temperature": 0.6}')
    # without the redirect terms, which load every block: blocks 0..max(layers) only, so block 3 stays untouched
    run_train(base, tiny_data(root / "data"), root / "out", "--max_steps=3", "--lr=1e-2", "--lora_b_init_std=0.05",
              "--redirect_weight=0", "--redirect_benign=False", "--trip=False")
    ckpt = root / "out" / "ckpt.pt"
    exported(ckpt, f"--out={root / 'merged'}", "--dtype=float32", "--shard_size=64KB")
    exported(ckpt, f"--out={root / 'merged64'}", "--dtype=float64")
    exported(ckpt, f"--out={root / 'adapter'}", "--adapter")
    return dict(root=root, base=base, ckpt=ckpt, merged=root / "merged", merged64=root / "merged64",
                adapter=root / "adapter")


@pytest.fixture(scope="module")
def logits(trained):
    """Logits of the base and of nanocb's circuit-broken model (full depth, adapters on), in float64: the
    comparisons with transformers and peft below are equivalence tests, so their tolerance comes from the maths."""
    ck = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    model = Llama.from_pretrained(trained["base"], dtype=torch.float64).eval()
    with torch.no_grad():
        base = model(IDS)[0]
        lc = ck["lora_config"]
        inject_lora(model, lc["r"], lc["lora_alpha"], layers=lc["layers"], targets=lc["targets"])
        load_lora_state_dict(model, ck["lora"])
        cb = model(IDS)[0]
    assert (cb - base).abs().max() > 1e-2  # the adapter matters, so matching cb below is not matching base
    return base, cb


def test_transformers_loads_merged_export_with_the_cb_models_logits(trained, logits, transformers_in_float64):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(trained["merged64"], dtype=torch.float64).eval()
    assert hf.config.num_hidden_layers == 4  # full depth, though training built blocks 0..2 only
    with torch.no_grad():
        out = hf(IDS).logits
    torch.testing.assert_close(out, logits[1], atol=1e-10, rtol=1e-10)


def test_peft_loads_adapter_export_with_the_cb_models_logits(trained, logits, transformers_in_float64):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(trained["base"], dtype=torch.float64)
    model = PeftModel.from_pretrained(base, str(trained["adapter"])).double().eval()  # the adapter is saved float32
    with torch.no_grad():
        out = model(IDS).logits
    torch.testing.assert_close(out, logits[1], atol=1e-10, rtol=1e-10)
    cfg = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [0, 1, 2] and cfg["peft_type"] == "LORA"


def test_untouched_tensors_are_byte_identical_and_lora_blocks_changed(trained):
    base, merged = tensors(trained["base"]), tensors(trained["merged"])
    assert set(merged) == set(base)
    same = [k for k in base if base[k].numpy().tobytes() == merged[k].numpy().tobytes()]
    assert all(k in same for k in base if k.startswith("model.layers.3.") or "layers." not in k)
    assert "model.layers.2.mlp.down_proj.weight" not in same and "model.layers.0.self_attn.q_proj.weight" not in same


def test_merged_export_is_sharded_with_index_and_base_files(trained):
    d = trained["merged"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(f for f in os.listdir(d) if f.endswith(".safetensors")) == shards
    (trained["root"] / "by_open").write_text("")  # safetensors writes 0600: the export is as readable as open()'s
    assert {os.stat(d / f).st_mode for f in shards} == {os.stat(trained["root"] / "by_open").st_mode}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(d).values())
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "original/tokenizer.model",
                 "original/params.json", "generation_config.json"):
        assert (d / name).read_bytes() == (trained["root"] / "base" / name).read_bytes()
    # Meta's copy of the base weights (no breaker in them) stays out of the circuit-broken export
    assert not (d / "original" / "consolidated.00.pth").exists()


def test_default_dtype_is_bfloat16(trained):
    out = trained["root"] / "bf16"
    exported(trained["ckpt"], f"--out={out}")
    assert {t.dtype for t in tensors(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bad_inputs_get_one_line_and_leave_no_output(trained, tmp_path):
    root, ckpt = trained["root"], trained["ckpt"]
    moved = torch.load(ckpt, map_location="cpu", weights_only=True)
    moved["init_from"] = str(tmp_path / "gone")
    torch.save(moved, tmp_path / "moved.pt")
    other = tiny_base(tmp_path / "other", dim=48)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    cases = [([tmp_path / "nope.pt", f"--out={tmp_path / 'o1'}"], "no such checkpoint"),
             ([tmp_path / "moved.pt", f"--out={tmp_path / 'o2'}"], "--init_from"),
             ([ckpt, f"--out={tmp_path / 'o3'}", f"--init_from={other}"], "expects"),
             ([ckpt, f"--out={busy}"], "--force")]
    for args, needle in cases:
        err = export(*args)
        assert isinstance(err, str) and err.startswith("export.py: ") and needle in err and "\n" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["busy", "moved.pt", "other"]  # no o1..o3, no temp dir
    assert os.listdir(busy) == ["keep.txt"]
    # and --force replaces it with a whole export
    exported(ckpt, f"--out={busy}", "--adapter", "--force")
    assert sorted(os.listdir(busy)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["busy", "moved.pt", "other"]


def test_an_out_that_holds_an_input_is_refused_even_with_force(trained, tmp_path):
    """--force swaps the old --out away once the export is whole: at the base or the checkpoint's directory (or a
    directory above either), or at a file or directory of the base, that would delete the export's own input."""
    base = tmp_path / "models" / "base"
    shutil.copytree(trained["base"], base)
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.parent.mkdir()
    shutil.copy(trained["ckpt"], ckpt)
    link = tmp_path / "link"
    link.symlink_to(base, target_is_directory=True)
    for out, verb, what in ((base, "is", "the base"), (link, "is", "the base"), (tmp_path / "models", "holds", "the base"),
                            (ckpt.parent, "holds", "the checkpoint"), (ckpt, "is", "the checkpoint"),
                            (tmp_path, "holds", "the checkpoint")):
        err = export(ckpt, f"--out={out}", f"--init_from={base}", "--force")
        assert err == f"export.py: {out}: {verb} {what} {base if what == 'the base' else ckpt}, which the export " \
                      "reads; write it to another directory", err
    link.unlink()
    for part in ("model.safetensors", "original"):
        err = export(ckpt, f"--out={base / part}", f"--init_from={base}", "--force")
        assert err == f"export.py: {base / part}: a part of the base {base}, which the export reads; write it to " \
                      "another directory", err
    assert sorted(os.listdir(tmp_path)) == ["models", "run"] and os.listdir(ckpt.parent) == ["ckpt.pt"]
    assert sorted(os.listdir(base)) == sorted(os.listdir(trained["base"]))
    exported(ckpt, f"--out={tmp_path / 'models' / 'cb'}", f"--init_from={base}", "--adapter")  # beside it is fine


def test_impossible_settings_stop_with_one_line_before_anything_is_written(tmp_path):
    out = f"--out={tmp_path / 'o'}"
    cases = [([], "usage: python export.py CKPT.pt"),
             (["a.pt", "b.pt", out], "one ckpt at a time, got a.pt and b.pt"),
             (["a.pt"], "--out=DIR is required"),
             (["a.pt", out, "--dtype=int8"], "--dtype=int8: choose among float64, float32, bfloat16, float16"),
             (["a.pt", out, "--shard_size=0"], "--shard_size=0: expected a size of at least one byte"),
             (["a.pt", out, "--shard_size=-5GB"], "--shard_size=-5GB: expected a size"),
             (["a.pt", out, "--shard_size=0.5B"], "--shard_size=0.5B: expected a size"),
             (["a.pt", out, "--shard_size=5 parsecs"], "--shard_size=5 parsecs: expected a size"),
             (["a.pt", out, "--adapter=maybe"], "--adapter: adapter expects bool"),
             (["a.pt", out, "--dtype"], "--dtype: expected --dtype=VALUE"),
             (["a.pt", out, "--N_RANKS=2"], "unknown config key 'N_RANKS'")]
    for args, needle in cases:
        err = export(*args)
        assert isinstance(err, str) and err.startswith("export.py: ") and needle in err and "\n" not in err, err
    assert os.listdir(tmp_path) == []


def test_importing_export_runs_nothing(tmp_path, capsys):
    argv, sys.argv = sys.argv, ["export.py", "a.pt", f"--out={tmp_path / 'o'}"]
    try:
        g = runpy.run_path(os.path.join(ROOT, "export.py"), run_name="export")
    finally:
        sys.argv = argv
    assert g["ckpt"] == "" and callable(g["write_merged"])
    assert capsys.readouterr().out == "" and os.listdir(tmp_path) == []


def test_failed_write_leaves_no_half_written_output(trained, tmp_path, monkeypatch):
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []

    def disk_fills_after_one_shard(*args, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_after_one_shard)
    err = export(trained["ckpt"], f"--out={tmp_path / 'merged'}", "--shard_size=64KB")
    assert isinstance(err, str) and "No space left" in err and "\n" not in err, err
    assert len(calls) == 2 and os.listdir(tmp_path) == []


def test_a_full_disk_while_safetensors_writes_is_one_line_and_leaves_no_output(trained, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(*args, **kw):  # what save_file raises when a write fails (seen with RLIMIT_FSIZE: os error 27)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    for mode in ([], ["--adapter"]):
        err = export(trained["ckpt"], f"--out={tmp_path / 'o'}", *mode)
        assert isinstance(err, str) and err.startswith("export.py: ") and "No space left" in err, err
        assert "\n" not in err and os.listdir(tmp_path) == []
