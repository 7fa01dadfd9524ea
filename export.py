"""
Export a circuit breaker for the tools people already use (transformers, vLLM, PEFT, lm-eval):

    python export.py out/ckpt.pt --out=cb-merged                     # merged full-depth HF checkpoint, bf16
    python export.py out/ckpt.pt --out=cb-merged --dtype=float32 --shard_size=2GB
    python export.py out/ckpt.pt --out=cb-adapter --adapter          # PEFT LoRA adapter
    python export.py out/ckpt.pt --out=cb-merged --init_from=/models/Llama-3.1-8B-Instruct  # base moved

Merged: training drops the blocks above max(layers), the export does not. Every tensor of the base is read
file by file, the LoRA update W' = W + (lora_alpha / r) * B @ A folded into the wrapped projections in
float32 (float64 for --dtype=float64), cast to --dtype and written to safetensors shards as they fill, so memory
stays near one shard (an 8B base exports on a machine with less RAM than its fp32 size). Blocks without LoRA, the
embeddings, norms and lm_head are copied unchanged (byte-identical when --dtype is the base's dtype). config.json,
generation_config.json and the tokenizer files come from the base.

Adapter: adapter_config.json + adapter_model.safetensors under PEFT's names, float32 as trained, for
`peft.PeftModel.from_pretrained(base, DIR)`.

Either way the output is built in a temp dir next to --out and renamed at the end (util.atomic_dir).
"""

import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import DTYPES, ModelError, checkpoint_files, load_config
from util import atomic_dir, fail

# -----------------------------------------------------------------------------
ckpt = ""  # train_cb.py's ckpt.pt (required): the positional argument
out = ""  # output directory (required)
adapter = False  # write a PEFT LoRA adapter instead of merged weights
dtype = "bfloat16"  # merged weights: a name of model.DTYPES ('bfloat16', 'float32', ...)
shard_size = "5GB"  # merged weights: most bytes per safetensors file ('500MB', '2GiB', 1000000, ...)
force = False  # replace an existing non-empty --out
init_from = ""  # base HF dir; '' = the one the checkpoint was trained on
_positional = "ckpt"
if __name__ == "__main__":  # imported (by a test), only the functions below
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# -----------------------------------------------------------------------------

# copied from the base when present; Llama's license asks that a derivative ship with its agreement
HF_FILES = ("generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "original", "LICENSE", "LICENSE.txt", "USE_POLICY.md")
WEIGHT_FILES = ("*.pth", "*.pt", "*.bin", "*.safetensors")  # never copied from original/: the base's weights


def parse_size(s):
    """'5GB' -> 5_000_000_000 (decimal as Hugging Face's max_shard_size; KiB/MiB/GiB are binary)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(s))
    if not m or m.group(2).upper() not in units or float(m.group(1)) * units[m.group(2).upper()] < 1:
        fail(f"--shard_size={s}: expected a size of at least one byte, like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def read_checkpoint(path):
    """The training checkpoint's adapter and provenance, checked."""
    if not os.path.isfile(path):
        fail(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    need = ("lora", "lora_config", "init_from")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
        fail(f"{path}: not a train_cb.py checkpoint (needs {', '.join(need)})")
    lora = ckpt["lora"]
    mods = sorted({k.rsplit(".", 1)[0] for k in lora})
    for m in mods:
        a, b = lora.get(f"{m}.lora_a"), lora.get(f"{m}.lora_b")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            fail(f"{path}: LoRA tensors of {m} are missing or not (r, in) and (out, r)")
    if not mods:
        fail(f"{path}: the checkpoint holds no LoRA tensors")
    return ckpt, mods


def tensor_shapes(files):
    """Checkpoint name -> shape, from the safetensors headers only (no tensor is read)."""
    shapes = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as e:  # truncated or corrupt: safetensors checks the header against the file size
            fail(f"{file}: cannot read safetensors ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return shapes


def check_base(base, ckpt, ckpt_path, mods):
    """The base the adapter will be applied to: present, as deep as the training base, and every wrapped
    projection of the shape the LoRA tensors were trained for."""
    if not os.path.isdir(base):
        fail(f"{base}: base model directory not found (the checkpoint was trained on it); "
             f"point --init_from= at a copy of that base")
    try:
        cfg = load_config(base)
        files = checkpoint_files(base)
    except ModelError as e:
        fail(str(e))
    if ckpt.get("base_n_layers", cfg.n_layers) != cfg.n_layers:
        fail(f"{base}: the base has {cfg.n_layers} blocks but {ckpt_path} was trained on one with "
             f"{ckpt['base_n_layers']} (a different base model? pass --init_from=)")
    shapes = tensor_shapes(files)
    for m in mods:
        a, b = ckpt["lora"][f"{m}.lora_a"], ckpt["lora"][f"{m}.lora_b"]
        want = (b.shape[0], a.shape[1])
        have = shapes.get(f"model.{m}.weight")
        if have is None:
            fail(f"{base}: no tensor model.{m}.weight for the adapter in {ckpt_path} (a different base model?)")
        if have != want:
            fail(f"{base}: model.{m}.weight is {have} but the adapter in {ckpt_path} expects {want} "
                 f"(a different base model? pass --init_from=)")
    return files


def natural(name):
    """Sort key putting embeddings first, blocks in numeric order (2 before 10), lm_head last."""
    rank = 0 if "embed_tokens" in name else 1 if ".layers." in name else 3 if name.startswith("lm_head") else 2
    return [rank] + [(0, int(s)) if s.isdigit() else (1, s) for s in re.split(r"(\d+)", name)]


def write_merged(tmp, base, files, ckpt, mods, dt, max_shard):
    """Stream the base into shards, LoRA folded in: at most one shard plus one tensor in memory."""
    lc = ckpt["lora_config"]
    scale = lc["lora_alpha"] / lc["r"]
    acc = torch.promote_types(dt, torch.float32)  # the merge's precision, as lora.merge_lora
    lora, wrapped = ckpt["lora"], {f"model.{m}.weight": m for m in mods}
    weight_map, shards, buf, buf_bytes, total = {}, [], {}, 0, 0

    def flush():
        nonlocal buf, buf_bytes
        name = f"shard-{len(shards):05d}.safetensors"  # renamed model-0000i-of-0000n once n is known
        save_file(buf, os.path.join(tmp, name), metadata={"format": "pt"})
        shards.append((name, list(buf)))
        buf, buf_bytes = {}, 0

    for file in sorted(set(files.values())):
        names = sorted((n for n, f in files.items() if f == file), key=natural)
        for name in names:
            # one open per tensor: a handle held across the whole file keeps every page read so far resident
            # (measured: RSS grew to the file's size), one per tensor keeps only the shard being filled
            with safe_open(file, "pt") as f:
                t = f.get_tensor(name)
            if name in wrapped:
                m = wrapped.pop(name)
                delta = (lora[f"{m}.lora_b"].to(acc) @ lora[f"{m}.lora_a"].to(acc)) * scale  # (out, in)
                t = t.to(acc) + delta
            if t.is_floating_point() and t.dtype != dt:
                t = t.to(dt)
            t = t.contiguous()
            nbytes = t.numel() * t.element_size()
            if buf and buf_bytes + nbytes > max_shard:
                flush()
            buf[name], buf_bytes, total = t, buf_bytes + nbytes, total + nbytes
    if buf:
        flush()
    n = len(shards)
    for i, (name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
        weight_map.update({k: final for k in keys})
    weight_map = dict(sorted(weight_map.items(), key=lambda kv: natural(kv[0])))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2)

    with open(os.path.join(base, "config.json")) as fh:
        hf = json.load(fh)
    dt_name = str(dt).removeprefix("torch.")
    keys = [k for k in ("torch_dtype", "dtype") if k in hf] or ["torch_dtype"]  # 'dtype' since transformers 5
    hf.update({k: dt_name for k in keys})
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)
    for name in HF_FILES:
        src = os.path.join(base, name)
        if os.path.isdir(src):  # original/: Meta's layout, whose consolidated.*.pth are the base's own weights,
            # without the breaker: a user loading them with Meta's code would run the unprotected model
            shutil.copytree(src, os.path.join(tmp, name), ignore=shutil.ignore_patterns(*WEIGHT_FILES))
        elif os.path.isfile(src):
            shutil.copy2(src, os.path.join(tmp, name))
    return n, total


def write_adapter(tmp, base, ckpt, mods):
    """PEFT's layout: a LoraConfig as JSON and the tensors under the names PeftModel saves (the adapter
    name left out), lora_A (r, in) and lora_B (out, r) as ours."""
    lc = ckpt["lora_config"]
    tensors = {}
    for m in mods:
        tensors[f"base_model.model.model.{m}.lora_A.weight"] = ckpt["lora"][f"{m}.lora_a"].float().contiguous()
        tensors[f"base_model.model.model.{m}.lora_B.weight"] = ckpt["lora"][f"{m}.lora_b"].float().contiguous()
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    layers = sorted({int(m.split(".")[1]) for m in mods})
    targets = [t for t in lc["targets"] if any(m.endswith("." + t) for m in mods)]
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=os.path.abspath(base),
                  r=lc["r"], lora_alpha=lc["lora_alpha"], lora_dropout=ckpt.get("config", {}).get("lora_dropout", 0.0),
                  target_modules=targets, layers_to_transform=layers, layers_pattern="layers", bias="none",
                  fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
                  inference_mode=True, modules_to_save=None, rank_pattern={}, alpha_pattern={})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    if not ckpt:
        fail(f"usage: python export.py CKPT.pt --out=DIR [--adapter] [--dtype={'|'.join(DTYPES)}] "
             "[--shard_size=5GB] [--force] [--init_from=BASE_DIR]")
    if not out:
        fail("--out=DIR is required")
    if dtype not in DTYPES:
        fail(f"--dtype={dtype}: choose among {', '.join(DTYPES)}")
    max_shard = parse_size(shard_size)
    out_dir = os.path.abspath(out)
    if os.path.exists(out_dir) and not force and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        fail(f"{out}: already exists and is not empty (pass --force to replace it)")

    lora_ckpt, mods = read_checkpoint(ckpt)
    base = init_from or lora_ckpt["init_from"]
    inside = lambda a, b: os.path.commonpath([a, b]) == b  # real path a is b or lies under it
    there = os.path.realpath(out_dir)
    for what, path in (("the checkpoint", ckpt), ("the base", base)):  # --force would swap out an input at the end
        if inside(os.path.realpath(path), there):
            verb = "is" if os.path.realpath(path) == there else "holds"  # a link to the base is the base
            fail(f"{out}: {verb} {what} {path}, which the export reads; write it to another directory")
    if os.path.lexists(out_dir) and inside(there, os.path.realpath(base)):
        fail(f"{out}: a part of the base {base}, which the export reads; write it to another directory")
    files = check_base(base, lora_ckpt, ckpt, mods)
    try:
        with atomic_dir(out_dir) as tmp:  # an old --out (with --force) is swapped out only once the new one is whole
            if adapter:
                write_adapter(tmp, base, lora_ckpt, mods)
                blocks = sorted({int(m.split(".")[1]) for m in mods})
                what = f"PEFT adapter ({len(mods)} LoRA modules on blocks {blocks})"
            else:
                n, total = write_merged(tmp, base, files, lora_ckpt, mods, DTYPES[dtype], max_shard)
                what = f"merged {dtype} checkpoint, {total / 1e9:.2f} GB in {n} shard(s)"
    except (OSError, SafetensorError) as e:  # a full disk (safetensors' own error while it writes): the temp dir
        # is gone, the old --out untouched
        fail(f"{out}: writing the export failed ({e}); nothing was written")
    print(f"export.py: wrote {what} to {out}")
