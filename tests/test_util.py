"""util.py: fail() and the atomic writers."""

import os
import signal
import subprocess
import sys

import pytest

from util import atomic_dir, atomic_write, fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fsynced(monkeypatch):
    """The inodes os.fsync was called on."""
    inodes, real = set(), os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (inodes.add(os.fstat(fd).st_ino), real(fd))[1])
    return inodes


def test_atomic_write_puts_the_fsynced_bytes_in_place(tmp_path, fsynced):
    p = tmp_path / "a.json"
    p.write_text("old")
    atomic_write(p, "new ✓")
    assert p.read_text() == "new ✓" and os.stat(p).st_ino in fsynced
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01" and os.stat(p).st_ino in fsynced
    atomic_write(p, lambda tmp: open(tmp, "w").write("by a writer"))
    assert p.read_text() == "by a writer" and os.stat(p).st_ino in fsynced
    assert os.listdir(tmp_path) == ["a.json"]


@pytest.mark.parametrize("crash", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_crash_mid_write_leaves_the_old_file_whole_and_no_temp(tmp_path, crash):
    p = tmp_path / "ckpt.pt"
    p.write_bytes(b"old checkpoint")

    def writer(tmp):
        open(tmp, "wb").write(b"half of a new")
        raise crash

    with pytest.raises(type(crash)):
        atomic_write(p, writer)
    assert p.read_bytes() == b"old checkpoint" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_killed_process_leaves_the_old_file_whole(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("old\n")
    code = (f"import os, signal, sys; sys.path.insert(0, {ROOT!r}); from util import atomic_write\n"
            f"def w(tmp):\n    open(tmp, 'w').write('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            f"atomic_write({str(p)!r}, w)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert p.read_text() == "old\n"


def test_atomic_write_creates_a_file_as_readable_as_open_would(tmp_path):
    atomic_write(tmp_path / "sub" / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "sub" / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode


def test_atomic_dir_replaces_an_existing_dir(tmp_path, fsynced):
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.safetensors").write_text("old")
    with atomic_dir(out) as d:
        assert os.path.dirname(d) == str(tmp_path)
        os.mkdir(os.path.join(d, "original"))
        open(os.path.join(d, "original", "tokenizer.model"), "w").write("tok")
        open(os.path.join(d, "config.json"), "w").write("{}")
    assert sorted(os.listdir(out)) == ["config.json", "original"]
    assert (out / "original" / "tokenizer.model").read_text() == "tok"
    assert {os.stat(out / "config.json").st_ino, os.stat(out / "original" / "tokenizer.model").st_ino} <= fsynced
    assert {os.stat(out).st_ino, os.stat(out / "original").st_ino, os.stat(tmp_path).st_ino} <= fsynced  # entries
    assert os.listdir(tmp_path) == ["export"]


@pytest.mark.parametrize("crash", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_crash_while_filling_a_dir_leaves_the_old_dir_whole_and_no_temp(tmp_path, crash):
    out = tmp_path / "organism"
    out.mkdir()
    (out / "model.safetensors").write_text("old weights")
    with pytest.raises(type(crash)):
        with atomic_dir(out) as d:
            open(os.path.join(d, "model.safetensors"), "w").write("half")
            raise crash
    assert os.listdir(out) == ["model.safetensors"] and (out / "model.safetensors").read_text() == "old weights"
    assert os.listdir(tmp_path) == ["organism"]


def test_atomic_dir_creates_a_new_dir_readable_as_mkdir_would(tmp_path):
    with atomic_dir(tmp_path / "new") as d:
        open(os.path.join(d, "f"), "w").write("x")
    (tmp_path / "ref").mkdir()
    assert os.stat(tmp_path / "new").st_mode == os.stat(tmp_path / "ref").st_mode
    assert sorted(os.listdir(tmp_path)) == ["new", "ref"]


def test_fail_is_one_line_naming_the_script(tmp_path):
    (tmp_path / "prep.py").write_text(f"import sys; sys.path.insert(0, {ROOT!r})\nfrom util import fail\n"
                                      "fail('data/train.jsonl:17: \"completion\" is missing')\n")
    p = subprocess.run([sys.executable, str(tmp_path / "prep.py")], capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == 'prep.py: data/train.jsonl:17: "completion" is missing\n'


def test_fail_under_a_test_runner_names_the_calling_module():
    with pytest.raises(SystemExit) as e:
        fail("bad value")
    assert e.value.code == "test_util.py: bad value"


def test_a_writer_that_raises_keeps_the_files_it_opened(tmp_path):
    kept = []

    def writer(tmp):
        kept.append(open(tmp_path / "log.txt", "w"))  # takes the lowest free descriptor: the temp file's, just closed
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "ckpt.pt", writer)
    kept[0].write("still open")
    kept[0].close()  # flushes: EBADF if atomic_write closed the writer's descriptor as its own
    assert (tmp_path / "log.txt").read_text() == "still open"
