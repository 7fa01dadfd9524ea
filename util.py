"""
What every script shares: fail() for the one-line error, and the atomic writers, so that a crash, a full
disk or ^C leaves either the old file (or directory) or the new one, whole, and no temp file behind.
"""

import contextlib
import os
import shutil
import stat
import sys
import tempfile


def fail(msg):
    """Stop with one line, `script.py: msg`, naming the script that was run (or, under a test runner, the
    module that called fail)."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not script.endswith(".py") or script == "__main__.py":
        script = os.path.basename(sys._getframe(1).f_globals.get("__file__") or "python")
    sys.exit(f"{script}: {msg}")


def _readable(path, mode):
    """mkstemp, mkdtemp and safetensors create files only their owner may read: add the bits of `mode` that
    open() or mkdir() would have given under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) | (mode & ~umask))


def _fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data):
    """Write `data` (bytes or str) to `path`, or call `data(tmp_path)` to write it, through a temp file in
    the same directory that is fsync'd and then renamed over `path`."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        if callable(data):
            os.close(fd)
            fd = None  # its number is free for the writer's own files: never close it again
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                fd = None  # the file object closes it
                f.write(data.encode() if isinstance(data, str) else data)
        _fsync(tmp)
        _readable(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # fdopen raised before it took the descriptor
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync(os.path.dirname(path), directory=True)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temp directory next to `path` to fill; on success every file and directory in it is fsync'd and it
    takes the place of `path` (an old `path` is moved aside, then removed). On an error it is removed."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    old = tmp + ".old"
    try:
        yield tmp
        for d, dirs, files in os.walk(tmp):
            _fsync(d, directory=True)  # its entries: a file whose own data is on disk can still lose its name
            for name in files:
                if not os.path.islink(os.path.join(d, name)):
                    _readable(os.path.join(d, name), 0o666)
                    _fsync(os.path.join(d, name))
            for name in dirs:
                if not os.path.islink(os.path.join(d, name)):
                    _readable(os.path.join(d, name), 0o777)
        _readable(tmp, 0o777)
        if os.path.lexists(path):
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(old):
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(parent, directory=True)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    elif os.path.lexists(old):
        os.remove(old)
