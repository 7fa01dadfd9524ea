"""configurator.py: one command-line grammar for every script, one test per rule."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import os, sys
sys.path.insert(0, %(root)r)
from os import sep  # an imported constant: not a setting
HIDDEN = 1  # above the block: not a setting

# -----------------------------------------------------------------------------
layers = (10, 20)
lr = 1e-4
max_steps = 150
compile = True
init_from = 'scratch'
ckpt = ''
%(before_exec)s
exec(open(os.path.join(%(root)r, 'configurator.py')).read())
# -----------------------------------------------------------------------------
N_RANKS = 8  # below the block: not a setting
print(repr(dict(config, forward=forward) if "forward" in globals() else config))
"""


def run(tmp_path, *args, before_exec=""):
    """(0, config) or (exit code, the one line on stderr) of a tiny script run with args."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT % dict(root=ROOT, before_exec=before_exec))
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path)
    if p.returncode == 0:
        return 0, eval(p.stdout)
    assert p.stderr.count("\n") == 1, p.stderr  # one line, never a traceback
    return p.returncode, p.stderr.strip()


def test_config_holds_the_settings_between_the_markers(tmp_path):
    assert run(tmp_path) == (0, dict(layers=(10, 20), lr=1e-4, max_steps=150, compile=True, init_from="scratch",
                                     ckpt=""))


def test_names_outside_the_markers_are_not_settings(tmp_path):
    for arg in ("--N_RANKS=2", "--HIDDEN=2", "--sep=x", "--os=x"):
        key = arg[2:].split("=")[0]
        assert run(tmp_path, arg) == (1, f"script.py: {arg}: unknown config key {key!r}")


def test_key_value_parses_as_a_literal(tmp_path):
    rc, cfg = run(tmp_path, "--layers=10,12,14", "--lr=3e-4", "--max_steps=30", "--compile=False", "--init_from=2024")
    assert rc == 0
    assert cfg == dict(layers=(10, 12, 14), lr=3e-4, max_steps=30, compile=False, init_from="2024", ckpt="")


def test_a_single_value_becomes_a_tuple_and_an_int_widens_to_float(tmp_path):
    rc, cfg = run(tmp_path, "--layers=12", "--lr=1")
    assert cfg["layers"] == (12,) and cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)


def test_a_value_of_the_wrong_type_is_one_line(tmp_path):
    assert run(tmp_path, "--max_steps=1.5") == (1, "script.py: --max_steps: max_steps expects int (default 150), "
                                                   "got 1.5")


def test_a_bare_flag_of_a_bool_setting_means_true(tmp_path):
    rc, cfg = run(tmp_path, "--compile=False", "--compile")
    assert rc == 0 and cfg["compile"] is True


def test_a_bare_flag_of_another_setting_is_one_line(tmp_path):
    assert run(tmp_path, "--max_steps") == (1, "script.py: --max_steps: expected --max_steps=VALUE (max_steps is "
                                               "not a bool)")


def test_config_file_then_override_in_order(tmp_path):
    (tmp_path / "c.py").write_text("import math\nmax_steps = 40\nlr = math.sqrt(4) * 1e-4\n")
    rc, cfg = run(tmp_path, "--max_steps=3", "c.py", "--lr=5e-4")
    assert rc == 0 and cfg["max_steps"] == 40 and cfg["lr"] == 5e-4


def test_a_config_file_with_an_unknown_key_or_missing_is_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("max_step = 3\n")
    assert run(tmp_path, "bad.py") == (1, "script.py: bad.py: unknown config key 'max_step'")
    rc, err = run(tmp_path, "missing.py")
    assert rc == 1 and err.startswith("script.py: missing.py: cannot read config file")


def test_a_config_file_value_of_the_wrong_type_is_one_line_not_ignored(tmp_path):
    (tmp_path / "c.py").write_text("layers = {10, 12}\n")  # a set: neither a tuple nor a helper
    assert run(tmp_path, "c.py") == (1, "script.py: c.py: layers expects tuple (default (10, 20)), got {10, 12}")
    (tmp_path / "h.py").write_text("import os as ckpt\ndef lr(): pass\nmax_steps = 7\n")  # helpers: still skipped
    assert run(tmp_path, "h.py")[1]["max_steps"] == 7


def test_a_declared_positional_takes_one_bare_argument(tmp_path):
    rc, cfg = run(tmp_path, "out/ckpt.pt", "--max_steps=3", before_exec="_positional = 'ckpt'")
    assert rc == 0 and cfg["ckpt"] == "out/ckpt.pt" and cfg["max_steps"] == 3


def test_a_second_positional_is_one_line_naming_both(tmp_path):
    assert run(tmp_path, "a.pt", "b.pt", before_exec="_positional = 'ckpt'") == (
        1, "script.py: one ckpt at a time, got a.pt and b.pt")


def test_a_bare_argument_without_a_declared_positional_is_one_line(tmp_path):
    assert run(tmp_path, "out/ckpt.pt") == (1, "script.py: out/ckpt.pt: not a config file (*.py) or --key=value, "
                                               "and script.py takes no positional argument")


def test_a_setting_of_a_script_run_after_goes_to_each_that_has_it(tmp_path):
    (tmp_path / "train.py").write_text("# ---\nmax_steps = 1\ngrad_accum = 1\ndevice = 'cpu'\n# ---\n")
    (tmp_path / "evaluate.py").write_text("# ---\nn_cases = 1\ndevice = 'cpu'\nforced = True\n# ---\n")
    rc, cfg = run(tmp_path, "--grad_accum=2", "--max_steps=5", "--device=cuda", "--forced", "--n_cases=2",
                  before_exec="_forward = ('train.py', 'evaluate.py')")
    assert rc == 0 and cfg["max_steps"] == 5  # its own setting stays its own
    assert cfg["forward"] == {"train.py": ["--grad_accum=2", "--device=cuda"],
                              "evaluate.py": ["--device=cuda", "--forced", "--n_cases=2"]}
    assert run(tmp_path, "--n_case=2", before_exec="_forward = ('train.py', 'evaluate.py')") == (
        1, "script.py: --n_case=2: unknown config key 'n_case'")


def test_every_script_of_the_repo_declares_its_settings_between_markers():
    for name in sorted(os.listdir(ROOT)):
        if not name.endswith(".py") or name == "configurator.py":
            continue
        src = open(os.path.join(ROOT, name)).read()
        if '"configurator.py"' not in src and "'configurator.py'" not in src:
            continue
        marks = [i + 1 for i, line in enumerate(src.splitlines()) if re.fullmatch(r"# -{3,}\s*", line)]
        assigned = [s for s in ast.parse(src).body if isinstance(s, ast.Assign) and marks[0] < s.lineno < marks[1]]
        assert len(assigned) >= 3, f"{name}: its settings are not between its first two '# ---' lines"
