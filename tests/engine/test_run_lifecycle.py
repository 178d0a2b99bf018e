"""The run folder's lifecycle through the command line (issue: a run folder nothing can corrupt).

Kills at the final iteration and around the first/final checkpoint, a second writer, restart in place,
``--force``, non-finite weights, and bad input that must leave nothing behind."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from helpers import cli, gen_weights, run_main, tiny_config
from scoredistill.engine.rundir import MARKER

# the in-process runs (helpers.run_main) set train.threads=1; the module gives the session its threads back
pytestmark = pytest.mark.usefixtures("one_thread")

CFG = tiny_config(train={"keep_checkpoints": 5, "threads": 1})


def _write_cfg(d, **train):
    cfg = {**CFG, "train": {**CFG["train"], **train}}
    p = d / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _same(a, b):
    wa, wb = gen_weights(a), gen_weights(b)
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


def _rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("lifecycle_ref")
    cfg = _write_cfg(d)
    p = cli(["distill", cfg, "--out", str(d / "run")])
    assert p.returncode == 0, p.stderr
    return cfg, str(d / "run")


@pytest.mark.parametrize("fault", ["step:8", "checkpoint:8", "step:3", "checkpoint:4"])
def test_kill_then_resume_equals_uninterrupted(reference, tmp_path, fault):
    """``step:8`` dies after the last iteration before its checkpoint; ``checkpoint:8`` while the final
    checkpoint is written; ``step:3`` before the first checkpoint exists; ``checkpoint:4`` inside the first."""
    cfg, ref = reference
    run = str(tmp_path / "run")
    p = cli(["distill", cfg, "--out", run], env={"SCOREDISTILL_FAULT": fault})
    assert p.returncode == -9, (fault, p.returncode, p.stderr[-500:])
    p = cli(["distill", "--resume", run])
    assert p.returncode == 0, p.stderr
    assert _same(run, ref)
    assert _rows(run) == _rows(ref) == [4, 8]
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith(".")]


def test_kill_after_final_checkpoint_before_export(reference, tmp_path):
    """The final checkpoint is committed but ``generator/`` still holds step 4: the resume has nothing to
    train, re-exports the generator and does not duplicate the last metrics row."""
    cfg, ref = reference
    run = tmp_path / "run"
    p = cli(["distill", cfg, "--out", str(run)], env={"SCOREDISTILL_FAULT": "export:8"})
    assert p.returncode == -9, p.stderr[-500:]
    assert json.loads((run / "generator" / "config.json").read_text())["step"] == 4
    p = cli(["distill", "--resume", str(run)])
    assert p.returncode == 0, p.stderr
    assert json.loads((run / "generator" / "config.json").read_text())["step"] == 8
    assert _same(str(run), ref) and _rows(str(run)) == [4, 8]
    assert (run / "report.md").exists()


def test_restart_in_place_and_force(tmp_path, capsys):
    cfg = _write_cfg(tmp_path)
    run = tmp_path / "run"
    p = cli(["distill", cfg, "--out", str(run)], env={"SCOREDISTILL_FAULT": "step:2"})
    assert p.returncode == -9
    (run / "notes.txt").write_text("mine")
    code, err = run_main(["distill", cfg, "--out", str(run)], capsys)  # nothing resumable: starts again in place
    assert code == 0, err
    code, err = run_main(["distill", cfg, "--out", str(run)], capsys)  # now it holds checkpoints
    assert code == 2 and "--resume" in err
    code, err = run_main(["distill", cfg, "--out", str(run), "--force"], capsys)
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine" and (run / MARKER).exists()


def test_foreign_folder_is_never_touched(tmp_path, capsys):
    cfg = _write_cfg(tmp_path)
    run = tmp_path / "data"
    run.mkdir()
    (run / "x.csv").write_text("1")
    for extra in ([], ["--force"]):
        code, err = run_main(["distill", cfg, "--out", str(run), *extra], capsys)
        assert code == 2 and "Traceback" not in err
        assert os.listdir(run) == ["x.csv"]


def test_second_writer_is_refused(tmp_path):
    cfg = _write_cfg(tmp_path, steps=1000000, checkpoint_every=1000000)  # killed long before the end
    run = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "scoredistill", "distill", cfg, "--out", run],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(run, "config.yaml")) and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second could start"
        p = cli(["distill", "--resume", run])  # a process: a lock that failed would train 10^6 steps here
        assert p.returncode == 2 and "in use by another scoredistill process" in p.stderr, p.stderr
    finally:
        first.kill()
        first.wait()


def test_bad_input_leaves_nothing(tmp_path, capsys):
    cfg = _write_cfg(tmp_path)
    run = tmp_path / "run"
    code, err = run_main(["distill", cfg, "--out", str(run), "--set", "objective.name=nope"], capsys)
    assert code == 2 and not run.exists(), err
    code, err = run_main(["distill", cfg, "--out", str(run), "--set", "teacher.preset=ring8_cond", "--set",
                          "generator.kind=teacher"], capsys)
    assert code == 2 and not run.exists(), err


def test_non_finite_weights_abort_and_keep_the_last_good_checkpoint(tmp_path):
    import torch

    from scoredistill.config import resolve
    from scoredistill.engine.distiller import Distiller
    from scoredistill.engine.io import list_checkpoints
    from scoredistill.errors import TrainingAborted

    cfg = resolve(CFG, ["train.steps=4"])
    d = Distiller(cfg, str(tmp_path / "run"), log=lambda *a: None)
    d.run()
    assert [os.path.basename(c) for c in list_checkpoints(str(tmp_path / "run"))] == ["step_0000004"]
    with torch.no_grad():
        next(d.generator.parameters())[0].fill_(float("nan"))
    d.step += 1
    with pytest.raises(TrainingAborted, match="generator.*not finite"):
        d.save()
    assert [os.path.basename(c) for c in list_checkpoints(str(tmp_path / "run"))] == ["step_0000004"]
    assert json.loads((tmp_path / "run" / "generator" / "config.json").read_text())["step"] == 4
