"""Tiny fixtures shared by the tests: a random Llama with the real Llama 3 tokenizer saved as a Hugging
Face checkpoint directory, a small slice of the tool data, and a few-step circuit-breaker run."""

import os
import shutil
import subprocess
import sys

import torch

import data
from model import Llama, LlamaConfig, save_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_base(path, n_layers=4, dim=32, seed=0, tie=False):
    """A random Llama (real 128,256-token vocabulary) with the tokenizer files, as train_cb/eval load it."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128256, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=2 * dim,
                      max_seq_len=4096, tie_word_embeddings=tie)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    save_pretrained(model, str(path), dtype=torch.float32)
    src = data.bundled_tokenizer_dir()
    for name in ("tokenizer.model", "tokenizer.json"):
        shutil.copy(os.path.join(src, name), os.path.join(str(path), name))
    return str(path)


def tiny_data(path, n_train=96, n_val=16, n_test=48, seed=0):
    """train/val/test JSONL of the built-in generator, small."""
    splits = data.generate_splits(seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    for split, rows in splits.items():
        data.write_jsonl(os.path.join(str(path), f"{split}.jsonl"), rows)
    return str(path)


def train_cmd(base, data_dir, out_dir, *args):
    """train_cb.py's command line for the tiny fixtures (fp32, CPU), after the interpreter: for subprocess,
    Popen (SIGTERM) and torchrun alike."""
    return [os.path.join(ROOT, "train_cb.py"), f"--init_from={base}", f"--data_dir={data_dir}",
            f"--out_dir={out_dir}", "--layers=1,2", "--batch_size=4", "--max_steps=2", "--log_interval=1",
            "--eval_interval=1000", "--lora_r=4", "--lora_alpha=8", "--device=cpu", "--dtype=float32",
            "--compile=False", *args]


def run_train(base, data_dir, out_dir, *args, env=None, check=True):
    """train_cb.py in a subprocess; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, *train_cmd(base, data_dir, out_dir, *args)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"train_cb.py failed:\n{p.stdout}\n{p.stderr}")
    return p
