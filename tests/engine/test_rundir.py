"""Run-folder lifecycle: ownership marker, exclusive lock, restart in place, stray temporaries."""

import os
import subprocess
import sys

import pytest

from helpers import cli
from scoredistill.engine.rundir import (
    LOCK,
    MARKER,
    RunLock,
    check_new,
    clear_own,
    has_checkpoint,
    is_ours,
    mark_ours,
    remove_stray_temporaries,
)
from scoredistill.errors import ConfigError


def test_new_folder_and_empty_folder_are_accepted(tmp_path):
    check_new(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    check_new(str(tmp_path / "empty"))


def test_foreign_folder_is_refused_and_untouched(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not created by scoredistill"):
        check_new(str(d), force=True)
    with pytest.raises(ConfigError):
        clear_own(str(d))
    with pytest.raises(ConfigError):
        RunLock(str(d), "distill").acquire()
    assert os.listdir(d) == ["thesis.tex"] and (d / "thesis.tex").read_text() == "precious"


def test_own_folder_restarts_in_place_unless_it_has_a_checkpoint(tmp_path):
    d = str(tmp_path / "run")
    mark_ours(d, "distill")
    open(os.path.join(d, "config.yaml"), "w").write("x: 1\n")
    open(os.path.join(d, "notes.txt"), "w").write("user file")
    check_new(d)  # nothing resumable: may start again in place
    os.makedirs(os.path.join(d, "checkpoints", "step_0000004"))
    assert has_checkpoint(d)
    with pytest.raises(ConfigError, match="--resume"):
        check_new(d)
    check_new(d, force=True)
    clear_own(d)
    assert sorted(os.listdir(d)) == [MARKER, "notes.txt"]
    assert is_ours(d)


def test_stray_temporaries_are_removed(tmp_path):
    d = str(tmp_path / "run")
    mark_ours(d, "distill")
    os.makedirs(os.path.join(d, "checkpoints", ".tmp-abc"))
    os.makedirs(os.path.join(d, "checkpoints", "step_0000002"))
    os.makedirs(os.path.join(d, ".old-xyz"))
    open(os.path.join(d, ".tmp-config.yaml"), "w").write("partial")
    removed = remove_stray_temporaries(d)
    assert len(removed) == 3
    assert os.listdir(os.path.join(d, "checkpoints")) == ["step_0000002"]


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    d = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom scoredistill.engine.rundir import RunLock\n"
        f"RunLock({d!r}, 'distill').acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by another scoredistill process \\(pid {holder.pid}\\)"):
            RunLock(d, "distill").acquire()
    finally:
        holder.kill()
        holder.wait()
    # a killed holder leaves no stale lock: the kernel drops a flock with its process
    lock = RunLock(d, "distill").acquire()
    lock.release()
    assert os.path.exists(os.path.join(d, LOCK))


def test_demo_refuses_a_folder_with_foreign_files(tmp_path):
    d = tmp_path / "demo"
    d.mkdir()
    (d / "data.csv").write_text("1,2,3")
    p = cli(["demo", "--quick", "--out", str(d)])
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert os.listdir(d) == ["data.csv"] and (d / "data.csv").read_text() == "1,2,3"


def test_atomic_folders_get_a_plain_folders_modes(tmp_path):
    # found by an outside-in sweep: generator/ and every checkpoint folder were 0700 (mkdtemp's mode) with a 0600
    # model.safetensors, unreadable to the group where the rest of the run folder was readable
    import stat

    import torch
    from safetensors.torch import save_file

    from scoredistill.fileio import atomic_dir

    mask = os.umask(0o022)
    try:
        with atomic_dir(str(tmp_path / "gen")) as tmp:
            save_file({"w": torch.zeros(2)}, os.path.join(tmp, "model.safetensors"))
            os.chmod(os.path.join(tmp, "model.safetensors"), 0o600)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "gen").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "gen" / "model.safetensors").st_mode) == 0o644


def test_a_plot_killed_before_its_rename_leaves_a_temporary_the_rules_remove(tmp_path, monkeypatch):
    # a kill between savefig and the rename used to leave "comparison.png.tmp.png", which the run-folder rules
    # counted as a user's file; the temporary now has the ".tmp-" prefix they clean on resume
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scoredistill.viz import save_figure

    d = str(tmp_path / "run")
    mark_ours(d, "distill")

    def killed(*args):  # SIGKILL before the rename: no handler runs, so nothing is cleaned up either
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(os, "unlink", lambda p: None)
    with pytest.raises(KeyboardInterrupt):
        save_figure(plt.figure(), os.path.join(d, "comparison.png"))
    monkeypatch.undo()
    left = [n for n in os.listdir(d) if n != MARKER]
    assert len(left) == 1 and left[0].startswith(".tmp-") and left[0].endswith("comparison.png"), left
    check_new(d)  # not a foreign file: the folder may still restart in place
    remove_stray_temporaries(d)
    assert os.listdir(d) == [MARKER]
