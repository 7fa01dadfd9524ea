"""configurator.py: config files and --key=value overrides on a script's globals."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import os
layers = (10, 20)
lr = 1e-4
max_steps = 150
compile = True
init_from = 'scratch'
out_dir = 'out'
exec(open(os.path.join(%r, 'configurator.py')).read())
print(repr(config))
"""


def run(tmp_path, *args):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT % ROOT)
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path)
    return p.returncode, eval(p.stdout) if p.returncode == 0 else p.stderr.strip()


def test_overrides_parse_as_literals(tmp_path):
    rc, cfg = run(tmp_path, "--layers=10,12,14,16,18,20", "--lr=3e-4", "--max_steps=30",
                  "--compile=False", "--init_from=resume", "--out_dir=2024")
    assert rc == 0
    assert cfg == dict(layers=(10, 12, 14, 16, 18, 20), lr=3e-4, max_steps=30, compile=False,
                       init_from="resume", out_dir="2024")


def test_single_layer_becomes_a_tuple_and_int_widens_to_float(tmp_path):
    rc, cfg = run(tmp_path, "--layers=12", "--lr=1")
    assert cfg["layers"] == (12,) and cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)


def test_config_file_then_override_in_order(tmp_path):
    (tmp_path / "c.py").write_text("import math\nmax_steps = 40\nlr = math.sqrt(4) * 1e-4\n")
    rc, cfg = run(tmp_path, "c.py", "--max_steps=7")
    assert rc == 0 and cfg["max_steps"] == 7 and cfg["lr"] == 2e-4


def test_unknown_key_and_type_mismatch_are_one_line(tmp_path):
    rc, err = run(tmp_path, "--layer=10")
    assert rc != 0 and err == "config error: --layer=10: unknown config key 'layer'"
    rc, err = run(tmp_path, "--max_steps=1.5")
    assert rc != 0 and err == "config error: --max_steps: max_steps expects int (default 150), got 1.5"
    (tmp_path / "bad.py").write_text("max_step = 3\n")
    rc, err = run(tmp_path, "bad.py")
    assert rc != 0 and err == "config error: bad.py: unknown config key 'max_step'"
    rc, err = run(tmp_path, "missing.py")
    assert rc != 0 and err.startswith("config error: missing.py: cannot read config file")
