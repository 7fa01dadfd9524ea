"""The `slow` marker: end-to-end runs in subprocesses (the organism mission, torchrun, the GPU check's CPU dry run,
attacks on a trained model). CI runs every test, in two workers (pytest-xdist, one test file per worker at a time,
so a module's fixtures are built once); a developer runs the fast set alone with
    python -m pytest -q tests -m "not slow"

Every test and every subprocess it starts computes on one thread: two workers share the machine's cores, and
two OpenMP pools of two threads on two busy cores run several times slower than one thread each.
"""

import os

import pytest

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: the subprocesses inherit it

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run in subprocesses (seconds to minutes)")
    # xdist queues files by their number of tests and hands each worker whole files: a long file queued last runs
    # alone while the other worker idles. Keep the collection order below instead (longest files first), so the
    # mission (~300 s on one busy core) starts at once and test_train.py (~250 s) does not run alone at the end.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# the longest files (measured with --durations on a 2-core machine, 2026-11-27), longest first; the rest keep their order
FIRST = ("test_organism.py", "test_train.py", "test_bench.py", "test_attack.py", "test_adversary.py")


def pytest_collection_modifyitems(items):
    rank = lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST)
    items.sort(key=rank)  # stable: within a rank, the collection order


@pytest.fixture
def transformers_in_float64(monkeypatch):
    """transformers' Llama with its RMSNorm and RoPE in the states' own dtype (it computes both in float32 whatever
    the model's dtype), so a comparison with nanocb in float64 has a tolerance from the maths. Plain RoPE only: the
    test models have no rope_scaling."""
    import transformers
    llama = transformers.models.llama.modeling_llama

    def rms_norm(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        cfg = self.config
        rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
        assert rope.get("rope_type", "default") == "default", "this fixture computes plain RoPE only"
        theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=x.dtype, device=x.device) / head_dim))
        freqs = position_ids[..., None].to(x.dtype) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(llama.LlamaRotaryEmbedding, "forward", rotary)
