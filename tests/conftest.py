"""The `slow` marker: end-to-end runs in subprocesses (the organism mission, torchrun, the GPU check's CPU dry run,
attacks on a trained model). CI runs every test, in two workers (pytest-xdist, one test file per worker at a time,
so a module's fixtures are built once); a developer runs the fast set alone with
    python -m pytest -q tests -m "not slow"

Every test and every subprocess it starts computes on one thread: two workers share the machine's cores, and
two OpenMP pools of two threads on two busy cores run several times slower than one thread each.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: the subprocesses inherit it

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run in subprocesses (seconds to minutes)")
