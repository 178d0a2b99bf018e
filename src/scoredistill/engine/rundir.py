"""The run folder's lifecycle: ownership marker, exclusive lock, restart in place, stray temporaries.

Rules (docs/cli.md, "Run folders"):

* A folder is **ours** when it holds the marker file ``.scoredistill`` (written when the library creates a
  run folder). The library never deletes or overwrites anything in a folder that is not ours, and inside
  its own folders it only ever removes the entries it writes itself (:data:`OWN_ENTRIES`).
* One writer at a time: a run holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for its whole life; a
  second process on the same folder gets one line and exit code 2. The lock dies with the process (also
  on SIGKILL), so a killed run never leaves a stale lock behind.
* A folder of ours with nothing resumable in it (killed before its first checkpoint, or a crash right
  after ``config.yaml`` was written) may be started again in place; one with a checkpoint needs
  ``--resume`` (or ``--force`` to start over).
* Temporary siblings of atomic writes (``.tmp-*``, ``.old-*``) left by a killed write are removed when a
  run takes the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

from scoredistill.errors import ConfigError

MARKER = ".scoredistill"
LOCK = ".lock"
# everything a run (distill, optimize, demo, train-teacher, export) writes at the top of its folder
OWN_ENTRIES = ("config.yaml", "metrics.jsonl", "checkpoints", "generator", "samples", "tb", "report.md",
               "comparison.png", "params.safetensors", "particles.npy", "renders.npy", "image.npy", "teacher",
               ".export", "scene.ply", "renders", "turntable.gif", "teacher_path", MARKER, LOCK)
_TEMP_PREFIXES = (".tmp-", ".old-")


def is_ours(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _foreign_entries(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n not in OWN_ENTRIES and not n.startswith(_TEMP_PREFIXES))


def has_checkpoint(path: str) -> bool:
    d = os.path.join(path, "checkpoints")
    return os.path.isdir(d) and any(n.startswith("step_") for n in os.listdir(d))


def check_new(path: str, field: str = "--out", force: bool = False) -> None:
    """Raise :class:`ConfigError` unless a new run may be started in ``path``; writes nothing.

    Accepted: a missing or empty folder; a folder of ours holding nothing resumable (restart in place);
    a folder of ours with checkpoints only with ``force``.
    """
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise ConfigError(field, f"{path} exists and is not a folder")
    if not os.listdir(path):
        return
    if not is_ours(path):
        raise ConfigError(field, f"{path} is not empty and was not created by scoredistill; nothing in it is "
                          "touched: choose a new or empty folder")
    if has_checkpoint(path) and not force:
        raise ConfigError(field, f"{path} already holds a run; use --resume {path} to continue it, --force to "
                          "start it over, or another folder")


def _remove(p: str) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def clear_own(path: str) -> None:
    """Remove what the library wrote in a folder of ours (for a restart in place or ``--force``); the
    user's own files stay. Refuses a folder that is not ours."""
    if not is_ours(path):
        raise ConfigError("--out", f"{path} was not created by scoredistill; refusing to remove anything in it")
    for name in os.listdir(path):
        if name in (MARKER, LOCK) or (name not in OWN_ENTRIES and not name.startswith(_TEMP_PREFIXES)):
            continue
        _remove(os.path.join(path, name))


def remove_stray_temporaries(path: str) -> list[str]:
    """Delete ``.tmp-*`` / ``.old-*`` leftovers of killed atomic writes in ``path`` and ``path/checkpoints``.
    Call only while holding the lock (a live writer's temporaries look the same)."""
    removed = []
    for d in (path, os.path.join(path, "checkpoints")):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.startswith(_TEMP_PREFIXES):
                p = os.path.join(d, name)
                _remove(p)
                removed.append(p)
    return removed


def mark_ours(path: str, kind: str) -> None:
    """Create ``path`` if needed and write the marker that makes it a folder of ours (refuses a
    non-empty foreign folder)."""
    if os.path.exists(path) and os.listdir(path) and not is_ours(path):
        raise ConfigError("--out", f"{path} is not empty and was not created by scoredistill")
    os.makedirs(path, exist_ok=True)
    if not os.path.exists(os.path.join(path, MARKER)):
        write_marker(path, kind)


def write_marker(path: str, kind: str) -> None:
    """Mark ``path`` (a folder this process has just written) as ours."""
    from scoredistill.fileio import atomic_write_text

    atomic_write_text(os.path.join(path, MARKER),
                      json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


class RunLock:
    """Create (or adopt) a folder of ours and hold an exclusive lock on it until :meth:`release`.

    ``kind`` is recorded in the marker (distill, optimize, demo, train-teacher, export). With ``adopt``
    (``--resume``), a run folder written by an earlier version, before folders carried the marker
    (``config.yaml`` beside ``checkpoints/``), is adopted as ours."""

    def __init__(self, path: str, kind: str, field: str = "--out", adopt: bool = False):
        self.path = path
        self.kind = kind
        self.field = field
        self.adopt = adopt
        self._fd = None

    def acquire(self) -> RunLock:
        import fcntl

        if os.path.exists(self.path) and os.listdir(self.path) and not is_ours(self.path):
            legacy = os.path.isfile(os.path.join(self.path, "config.yaml")) and has_checkpoint(self.path)
            if not (self.adopt and legacy):
                raise ConfigError(self.field, f"{self.path} is not empty and was not created by scoredistill")
            write_marker(self.path, self.kind)
        mark_ours(self.path, self.kind)
        fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise ConfigError(self.field, f"{self.path} is in use by another scoredistill process (pid {other}); "
                              "wait for it to finish or use another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        remove_stray_temporaries(self.path)
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
