"""Atomic writes of files and folders (a leaf module: it imports nothing of the package).

A crash or kill at any moment leaves either the old content or the new one under the final name,
never a half-written file: content goes to a temporary sibling first, then ``os.replace`` /
``os.rename`` moves it into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """Yield a file opened with ``mode`` (``"w"`` or ``"wb"``) on a temporary sibling of ``path``; on
    success it is flushed to disk and renamed to ``path``, on any error removed."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the final file gets a plain file's mode
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder; on success it replaces ``path`` (old content removed after)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        yield tmp
        # mkdtemp creates 0700 (and some writers 0600 files): the folder and its files get the modes a plain
        # mkdir / open would give them, so a generator/ or checkpoint is as readable as the rest of the run
        mask = _umask()
        for root, _dirs, files in os.walk(tmp):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    os.chmod(p, 0o666 & ~mask)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def truncate_jsonl(path: str, step: int) -> None:
    """Drop the records of a JSONL log written after ``step`` (a resumed run rewrites them)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass
    atomic_write_text(path, "".join(keep))
