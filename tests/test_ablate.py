"""ablate.py: configurator's grammar, and each setting passed on to the scripts that have it, in a copy of the
repo's scripts where train_cb.py and eval.py are stand-ins that record their command line."""

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METRICS = {g: {k: {"value": 0.5} for k in ("asr", "benign_acc", "attacker_tool_benign_acc", "degenerate_clean",
                                          "resisted_correct_tool", "forced_asr", "forced_deep_asr", "malformed")}
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
    json.dump({"argv": args, "threads": os.environ.get("OMP_NUM_THREADS")}, f)
seed = int(os.path.basename(out))  # the run's directory is out_root/ROW/SEED
if os.path.basename(__file__) == "train_cb.py":
    if seed == 13:
        sys.exit("boom: an unlucky seed")
    if seed == 14:
        import time
        time.sleep(60)  # a long run, stopped when another fails
    open(os.path.join(out, "log.jsonl"), "w").write('{"cos_mean": 0.1, "val_cos": 0.2, "call_cos": 0.9}\\n')
else:
    cb = json.loads(json.dumps(%r))
    cb["train_families"]["asr"]["value"] = seed / 100  # a figure that differs between the seeds
    json.dump({"metrics": {"base": %r, "cb": cb}}, open(os.path.join(out, "eval.json"), "w"))
"""


def ablate(tmp_path, *args, env=None):
    repo = tmp_path / "repo"
    if not repo.exists():
        repo.mkdir()
        for name in ("ablate.py", "configurator.py", "util.py"):
            shutil.copy(os.path.join(ROOT, name), repo / name)
        settings = {"train_cb.py": "out_dir = 'out'\nseed = 1337\nmax_steps = 150\ndevice = 'cpu'\n"
                                   "cb_mask = 'tool_choice'",
                    "eval.py": "out = ''\nn_cases = 0\ndevice = 'cpu'\nforced = True\nrepresentation = True"}
        for name, block in settings.items():
            (repo / name).write_text(STAND_IN % (block, METRICS, METRICS))
    p = subprocess.run([sys.executable, str(repo / "ablate.py"), f"--out_root={tmp_path / 'runs'}", *args],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    return p.returncode, p.stdout, p.stderr


def argv(tmp_path, row, seed, script, key="argv"):
    return json.loads((tmp_path / "runs" / str(row) / str(seed) / f"{script}.argv").read_text())[key]


def table(out):
    """The row names of the markdown table ablate.py prints last."""
    return [line.split(" | ")[0][2:] for line in out.splitlines() if line.startswith("| ") and "%" in line]


def test_each_setting_goes_to_the_scripts_that_have_it(tmp_path):
    rc, out, err = ablate(tmp_path, "--rows=0,2", "--seeds=5,6", "--max_steps=5", "--n_cases=7", "--device=cuda",
                          "--forced")
    assert rc == 0, err
    for seed in (5, 6):
        run = tmp_path / "runs" / "2" / str(seed)
        assert argv(tmp_path, 2, seed, "train_cb.py") == [
            "config/organism.py", "--trip=True", "--trip_share=1.0", "--max_steps=5", "--device=cuda",
            f"--seed={seed}", f"--out_dir={run}"]
        assert argv(tmp_path, 2, seed, "eval.py") == [str(run / "ckpt.pt"), "--representation=False", "--n_cases=7",
                                                      "--device=cuda", "--forced", f"--out={run}/eval.json"]
        assert (run / "train.log").exists() and (run / "eval.log").exists()
    assert sorted(os.listdir(tmp_path / "runs")) == ["0", "2"]
    assert sorted(os.listdir(tmp_path / "runs" / "0")) == ["5", "6"]
    assert table(out) == ["default: fine-tuning on the user's call under injection and the benign replies (no breaker "
                          "term)", "+ trip rows (every flip)"]


def test_the_table_gives_the_median_and_range_over_the_seeds(tmp_path):
    rc, out, err = ablate(tmp_path, "--rows=1", "--seeds=2,1,6", "--jobs=2")
    assert rc == 0, err
    row = [line for line in out.splitlines() if line.startswith("| +")]
    assert len(row) == 1
    cells = row[0].split(" | ")
    assert cells[1] == "3" and cells[2] == "50.0% → 2.0% (1.0–6.0)" and cells[3] == "50.0% → 50.0% (50.0–50.0)"
    assert len(cells) == 14 and cells[8] == "50.0% → 50.0% (50.0–50.0)"  # forced one token deeper, train families
    rc, out, err = ablate(tmp_path, "--rows=()", "--seeds=6")  # one seed read back: no range
    assert [line.split(" | ")[2] for line in out.splitlines() if line.startswith("| +")] == ["50.0% → 6.0%"]


def test_each_run_gets_its_share_of_the_threads_unless_the_environment_sets_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert ablate(tmp_path, "--rows=0", "--seeds=1,2", "--jobs=2", env=env)[0] == 0
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert {argv(tmp_path, 0, s, script, "threads") for s in (1, 2) for script in ("train_cb.py", "eval.py")} == {share}
    assert ablate(tmp_path, "--rows=0", "--seeds=1", env={**env, "OMP_NUM_THREADS": "7"})[0] == 0
    assert argv(tmp_path, 0, 1, "train_cb.py", "threads") == "7"


def test_a_failed_run_stops_with_one_line_naming_its_log_and_starts_no_other(tmp_path):
    rc, out, err = ablate(tmp_path, "--rows=0,1", "--seeds=13,14", "--jobs=1")
    log = tmp_path / "runs" / "0" / "13" / "train.log"
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith("ablate.py: train_cb.py config/organism.py --seed=13 ") and err.endswith(
        f"failed: boom: an unlucky seed (the whole output: {log})\n"), err
    assert log.read_text() == "boom: an unlucky seed\n"
    assert sorted(os.listdir(tmp_path / "runs")) == ["0"] and os.listdir(tmp_path / "runs" / "0") == ["13"]


def test_a_failed_run_stops_the_runs_going_beside_it(tmp_path):
    start = time.time()
    rc, out, err = ablate(tmp_path, "--rows=0", "--seeds=14,13", "--jobs=2")
    assert rc == 1 and "--seed=13 " in err and "boom" in err, err
    assert time.time() - start < 30  # seed 14 trains for 60 s unless stopped
    assert not (tmp_path / "runs" / "0" / "14" / "eval.py.argv").exists()


def test_a_failed_rerun_leaves_no_earlier_report_behind(tmp_path):
    assert ablate(tmp_path, "--rows=0", "--seeds=12")[0] == 0
    os.rename(tmp_path / "runs" / "0" / "12", tmp_path / "runs" / "0" / "13")  # as if seed 13 had once gone through
    assert ablate(tmp_path, "--rows=0", "--seeds=13")[0] == 1
    assert not (tmp_path / "runs" / "0" / "13" / "eval.json").exists()
    rc, out, err = ablate(tmp_path, "--rows=()", "--seeds=13")
    assert rc == 0 and table(out) == []


def test_a_run_of_the_older_one_seed_layout_is_one_line(tmp_path):
    assert ablate(tmp_path, "--rows=2", "--seeds=1337")[0] == 0
    os.rename(tmp_path / "runs" / "2" / "1337" / "eval.json", tmp_path / "runs" / "2" / "eval.json")
    rc, out, err = ablate(tmp_path, "--rows=()")
    older = tmp_path / "runs" / "2" / "eval.json"
    assert rc == 1 and err == (f"ablate.py: {older}: a run of an older ablate.py, one seed a row; move it into "
                               f"{older.parent}/SEED/ (the seed it trained with, 1337 unless set) or rerun the row "
                               "(--rows=2)\n"), err


def test_no_rows_runs_nothing_and_tabulates_what_is_there(tmp_path):
    assert ablate(tmp_path, "--rows=1", "--seeds=1")[0] == 0
    rc, out, err = ablate(tmp_path, "--rows=()", "--seeds=1", "--max_steps=5")
    assert rc == 0 and not [line for line in out.splitlines() if line.startswith("$ ")]
    assert table(out) == ["+ trip rows (a quarter of the flips)"]


def test_bad_arguments_stop_with_one_line_before_any_run(tmp_path):
    cases = [("--rows=9", "ablate.py: --rows=9: row numbers 0..7, comma-separated"),
             ("--seeds=()", "ablate.py: --seeds=(): one or more distinct seeds >= 0, comma-separated"),
             ("--seeds=1,1", "ablate.py: --seeds=1,1: one or more distinct seeds >= 0, comma-separated"),
             ("--jobs=0", "ablate.py: --jobs=0: the number of runs at once, >= 1"),
             ("--seed=3", "ablate.py: --seed=3: ablate.py sets it for each run; pass --seeds=S1,S2,..."),
             ("--out_dir=x", "ablate.py: --out_dir=x: ablate.py sets it for each row; pass --out_root=DIR"),
             ("--lorra_alfa=3", "ablate.py: --lorra_alfa=3: unknown config key 'lorra_alfa'"),
             ("ckpt.pt", "ablate.py: ckpt.pt: not a config file (*.py) or --key=value, and ablate.py takes no "
                         "positional argument")]
    for arg, line in cases:
        rc, out, err = ablate(tmp_path, arg)
        assert rc == 1 and err == line + "\n" and out == ""
    assert not (tmp_path / "runs").exists()


def test_a_row_read_back_from_an_older_eval_is_one_line_naming_the_file(tmp_path):
    assert ablate(tmp_path, "--rows=1", "--seeds=4")[0] == 0
    path = tmp_path / "runs" / "1" / "4" / "eval.json"
    old = json.loads(path.read_text())
    del old["metrics"]["cb"]["clean"]["attacker_tool_benign_acc"]  # a figure an older eval.py did not write
    path.write_text(json.dumps(old))
    rc, out, err = ablate(tmp_path, "--rows=()", "--seeds=4")
    assert rc == 1 and err == (f"ablate.py: {path}: not a report of this eval.py with a checkpoint (KeyError: "
                               "'attacker_tool_benign_acc'); rerun the row (--rows=1 --seeds=4)\n"), err
