"""ablate.py: configurator's grammar, and each setting passed on to the scripts that have it, in a copy of the
repo's scripts where train_cb.py and eval.py are stand-ins that record their command line."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METRICS = {g: {k: {"value": 0.5} for k in ("asr", "benign_acc", "attacker_tool_benign_acc", "degenerate_clean",
                                          "resisted_correct_tool", "forced_asr", "malformed")}
           for g in ("train_families", "heldout_families", "clean", "injected")}
STAND_IN = """
import json, os, sys
# -----------------------------------------------------------------------------
%s
# -----------------------------------------------------------------------------
args = sys.argv[1:]
out = [a.split("=", 1)[1] for a in args if a.startswith(("--out_dir=", "--out="))][-1]
out = out if "--out_dir=" in " ".join(args) else os.path.dirname(out)
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, os.path.basename(__file__) + ".argv"), "w") as f:
    json.dump(args, f)
if os.path.basename(__file__) == "train_cb.py":
    open(os.path.join(out, "log.jsonl"), "w").write('{"cos_mean": 0.1, "val_cos": 0.2, "call_cos": 0.9}\\n')
else:
    json.dump({"metrics": {"base": %r, "cb": %r}}, open(os.path.join(out, "eval.json"), "w"))
"""


def ablate(tmp_path, *args):
    repo = tmp_path / "repo"
    if not repo.exists():
        repo.mkdir()
        for name in ("ablate.py", "configurator.py", "util.py"):
            shutil.copy(os.path.join(ROOT, name), repo / name)
        settings = {"train_cb.py": "out_dir = 'out'\nmax_steps = 150\ndevice = 'cpu'\ncb_mask = 'tool_choice'",
                    "eval.py": "out = ''\nn_cases = 0\ndevice = 'cpu'\nforced = True\nrepresentation = True"}
        for name, block in settings.items():
            (repo / name).write_text(STAND_IN % (block, METRICS, METRICS))
    p = subprocess.run([sys.executable, str(repo / "ablate.py"), f"--out_root={tmp_path / 'runs'}", *args],
                       capture_output=True, text=True, cwd=tmp_path)
    return p.returncode, p.stdout, p.stderr


def argv(tmp_path, row, script):
    return json.loads((tmp_path / "runs" / str(row) / f"{script}.argv").read_text())


def table(out):
    """The row names of the markdown table ablate.py prints last."""
    return [line.split(" | ")[0][2:] for line in out.splitlines() if line.startswith("| ") and "%" in line]


def test_each_setting_goes_to_the_scripts_that_have_it(tmp_path):
    rc, out, err = ablate(tmp_path, "--rows=0,2", "--max_steps=5", "--n_cases=7", "--device=cuda", "--forced")
    assert rc == 0, err
    train, ev = argv(tmp_path, 2, "train_cb.py"), argv(tmp_path, 2, "eval.py")
    assert train == ["config/organism.py", "--trip=True", "--trip_share=1.0", "--max_steps=5", "--device=cuda",
                     f"--out_dir={tmp_path / 'runs' / '2'}"]
    assert ev == [str(tmp_path / "runs" / "2" / "ckpt.pt"), "--representation=False", "--n_cases=7",
                  "--device=cuda", "--forced", f"--out={tmp_path / 'runs' / '2'}/eval.json"]
    assert sorted(os.listdir(tmp_path / "runs")) == ["0", "2"]
    assert table(out) == ["default: fine-tuning on the user's call under injection and the benign replies (no breaker "
                          "term)", "+ trip rows (every flip)"]


def test_no_rows_runs_nothing_and_tabulates_what_is_there(tmp_path):
    assert ablate(tmp_path, "--rows=1")[0] == 0
    rc, out, err = ablate(tmp_path, "--rows=()", "--max_steps=5")
    assert rc == 0 and not [line for line in out.splitlines() if line.startswith("$ ")]
    assert table(out) == ["+ trip rows (a quarter of the flips)"]


def test_bad_arguments_stop_with_one_line_before_any_run(tmp_path):
    cases = [("--rows=9", "ablate.py: --rows=9: row numbers 0..7, comma-separated"),
             ("--out_dir=x", "ablate.py: --out_dir=x: ablate.py sets it for each row; pass --out_root=DIR"),
             ("--lorra_alfa=3", "ablate.py: --lorra_alfa=3: unknown config key 'lorra_alfa'"),
             ("ckpt.pt", "ablate.py: ckpt.pt: not a config file (*.py) or --key=value, and ablate.py takes no "
                         "positional argument")]
    for arg, line in cases:
        rc, out, err = ablate(tmp_path, arg)
        assert rc == 1 and err == line + "\n" and out == ""
    assert not (tmp_path / "runs").exists()


def test_a_row_read_back_from_an_older_eval_is_one_line_naming_the_file(tmp_path):
    assert ablate(tmp_path, "--rows=1")[0] == 0
    path = tmp_path / "runs" / "1" / "eval.json"
    old = json.loads(path.read_text())
    del old["metrics"]["cb"]["clean"]["attacker_tool_benign_acc"]  # a figure an older eval.py did not write
    path.write_text(json.dumps(old))
    rc, out, err = ablate(tmp_path, "--rows=()")
    assert rc == 1 and err == (f"ablate.py: {path}: not a report of this eval.py with a checkpoint (KeyError: "
                               "'attacker_tool_benign_acc'); rerun the row (--rows=1)\n"), err
