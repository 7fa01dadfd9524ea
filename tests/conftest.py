"""The `slow` marker: end-to-end runs in subprocesses (the organism mission, torchrun, the GPU check's CPU dry run,
attacks on a trained model). CI runs every test; a developer runs the fast set alone with
    python -m pytest -q tests -m "not slow"
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run in subprocesses (seconds to minutes)")
