"""Bad input to the smaller commands: one line, exit 2, nothing written or removed (through a process for
train-teacher's folders, in this process otherwise: see ``helpers.run_main``)."""

import os

import pytest

from helpers import RECIPES, cli, run_main


def _one_line(code, err):
    return code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_teacher_never_replaces_a_folder_with_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    for out in (mine, a_file):
        p = cli(["train-teacher", os.path.join(RECIPES, "teachers", "ring8.yaml"), "--out", str(out),
                 "--set", "train.steps=2"])
        assert _one_line(p.returncode, p.stderr) and "--out" in p.stderr, p.stderr
    assert os.listdir(mine) == ["notes.txt"] and a_file.read_text() == "keep"


@pytest.mark.usefixtures("one_thread")  # as cli() runs it: tiny models are slower on two threads
def test_train_teacher_writes_a_marked_folder_once(tmp_path, capsys):
    out = tmp_path / "teacher"
    args = ["train-teacher", os.path.join(RECIPES, "teachers", "ring8.yaml"), "--out", str(out),
            "--set", "train.steps=2"]
    code, err = run_main(args, capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == [".scoredistill", "config.json", "model.safetensors"]
    code, err = run_main(args, capsys)
    assert _one_line(code, err) and "teacher written earlier" in err, err


@pytest.mark.parametrize("extra,field", [(["--seed", "-1"], "--seed"), (["--guidance", "nan"], "--guidance"),
                                         (["--guidance", "-2"], "--guidance"), (["--n", "0"], "--n")])
def test_teacher_sample_bad_numbers(tmp_path, capsys, extra, field):
    out = tmp_path / "t.npy"
    args = ["teacher-sample", os.path.join(RECIPES, "toy", "dmd2.yaml"), "--out", str(out), *extra]
    code, err = run_main(args, capsys)
    assert _one_line(code, err) and field in err, err
    assert not out.exists()


def test_bench_never_writes_into_a_folder_it_did_not_create(tmp_path, capsys):
    # found by an outside-in sweep: `bench --out` wrote runs/, plots/ and tables into a folder of the user's
    # (and replaces runs/<method>__<teacher>__s<seed> there when it exists)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, err = run_main(["bench", "--suite", "toy", "--methods", "dmd2", "--teachers", "ring8", "--steps", "2",
                          "--out", str(mine)], capsys)
    assert _one_line(code, err) and "--out" in err, err
    assert os.listdir(mine) == ["notes.txt"]


@pytest.mark.parametrize("extra,field", [
    (["--budget-seconds", "nan"], "--budget-seconds"),      # was a ValueError traceback
    (["--seeds", "-1"], "--seeds"),                          # was a FileNotFoundError traceback
    (["--set", "train.lr=.nan"], "train.lr"),                # was a FileNotFoundError traceback after the run
    (["--set", "train.lr"], "--set"),
])
def test_bench_bad_arguments_stop_before_any_run(tmp_path, capsys, extra, field):
    out = tmp_path / "bench"
    code, err = run_main(["bench", "--suite", "toy", "--methods", "dmd2", "--teachers", "ring8", "--out", str(out),
                          *extra], capsys)
    assert _one_line(code, err) and field in err, err
    assert not out.exists()


def test_bench_sds_refuses_overrides_it_would_ignore(tmp_path, capsys):
    code, err = run_main(["bench", "--suite", "sds", "--set", "train.lr=0.1", "--out", str(tmp_path / "b")], capsys)
    assert _one_line(code, err) and "--set" in err, err


ALLOC_FAIL = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
              "to allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error", [RuntimeError(ALLOC_FAIL), MemoryError()])
def test_an_allocation_that_fails_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch, error):
    # found by an outside-in sweep: generator.width 65536, teacher.dim 2^24, train.ode_pairs 2^24 or
    # eval.n_samples 2^24 (all inside their accepted ranges) ended in a 30-line allocator traceback, exit 1,
    # and left a run folder with config.yaml behind
    from scoredistill.engine.distiller import Distiller

    def fail(self, resume=False):
        os.makedirs(self.run_dir, exist_ok=True)
        raise error

    monkeypatch.setattr(Distiller, "run", fail)
    out = tmp_path / "run"
    code, err = run_main(["distill", os.path.join(RECIPES, "toy", "dmd2.yaml"), "--out", str(out),
                          "--set", "train.steps=2"], capsys)
    assert _one_line(code, err) and "out of memory" in err and "train.batch_size" in err, err
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["sample", "teacher-sample"])
def test_sample_counts_past_the_size_limit_are_refused(tmp_path, capsys, cmd):
    # found by an outside-in sweep: `sample --n 100000000000` was an allocator traceback, and `teacher-sample`
    # with it ran until killed
    src = str(tmp_path) if cmd == "sample" else os.path.join(RECIPES, "toy", "dmd2.yaml")
    code, err = run_main([cmd, src, "--n", str(10**11), "--out", str(tmp_path / "s.npy")], capsys)
    assert _one_line(code, err) and "--n" in err and "2^24" in err, err


@pytest.mark.parametrize("sets,field", [
    # found by an outside-in sweep: all accepted, then a traceback (lr: the optimizer's float32 overflow) or
    # non-finite losses and exit 3 after training (means, std)
    (["teacher.preset=null", "teacher.means=[[1e300,0],[0,0]]", "teacher.std=0.1"], "teacher.means"),
    (["teacher.std=1e300"], "teacher.std"),
    (["teacher.preset=null", "teacher.means=[[0,0],[1,1]]", "teacher.stds=[0.1,1e300]"], "teacher.stds"),
    (["train.lr=1e300"], "train.lr"),
    (["train.fake_lr=1e300"], "train.fake_lr"),
])
def test_numbers_past_the_accepted_scale_are_bad_input(tmp_path, capsys, sets, field):
    out = tmp_path / "run"
    code, err = run_main(["distill", os.path.join(RECIPES, "toy", "dmd2.yaml"), "--out", str(out),
                          *[a for s in sets for a in ("--set", s)]], capsys)
    assert _one_line(code, err) and field in err and "1e+06" in err, err
    assert not out.exists()


def test_optimize_lr_past_the_accepted_scale_is_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(["optimize", os.path.join(RECIPES, "optimize", "sds.yaml"), "--out", str(out),
                          "--set", "train.lr=[0,1e300,0.1,10]"], capsys)
    assert _one_line(code, err) and "train.lr" in err, err
    assert not out.exists()


@pytest.mark.parametrize("override,field", [("objective.time.t_min=[0,0.02,1.5,10]", "objective.time.t_min"),
                                            ("objective.guidance_scale=[0,100,-5,10]", "objective.guidance_scale")])
def test_optimize_schedule_ends_are_checked_like_their_starts(tmp_path, capsys, override, field):
    # found by an outside-in sweep: only a schedule's value at step 0 was checked; t_min ending at 1.5 ran to exit 0
    out = tmp_path / "run"
    code, err = run_main(["optimize", os.path.join(RECIPES, "optimize", "sds.yaml"), "--out", str(out),
                          "--set", override], capsys)
    assert _one_line(code, err) and field in err, err
    assert not out.exists()


def test_a_real_data_path_that_names_nothing_is_refused_also_when_unread(tmp_path, capsys):
    # found by an outside-in sweep: dmd2 reads no real samples, so a mistyped train.real_data path ran to exit 0
    out = tmp_path / "run"
    code, err = run_main(["distill", os.path.join(RECIPES, "toy", "dmd2.yaml"), "--out", str(out),
                          "--set", f"train.real_data={tmp_path / 'nothing.npy'}"], capsys)
    assert _one_line(code, err) and "train.real_data" in err and "file not found" in err, err
    assert not out.exists()


def test_vague_messages_found_by_the_sweep_name_the_field_and_what_is_accepted(tmp_path, capsys):
    # an outside-in sweep found three one-line errors that named no field or no accepted values
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    code, err = run_main(["distill", str(scalar), "--out", str(tmp_path / "a")], capsys)
    assert _one_line(code, err) and "must hold a mapping of sections" in err, err  # was "Invalid loaded object type"
    code, err = run_main(["distill", os.path.join(RECIPES, "toy", "dmd2.yaml"), "--out", str(tmp_path / "b"),
                          "--set", "=5"], capsys)
    assert _one_line(code, err) and "error: --set: expected SECTION.KEY=VALUE" in err, err  # was ": unknown section"
    from scoredistill.errors import ConfigError
    from scoredistill.objectives.base import build_objective

    with pytest.raises(ConfigError) as e:  # was "out of range: -5"
        build_objective({"name": "scm", "warmup_steps": -5})
    assert e.value.field == "objective.warmup_steps" and ">= 0" in str(e.value), str(e.value)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_ctrl_c_names_the_command_and_the_folder_to_resume(tmp_path, capsys, monkeypatch, checkpoint):
    # found by an outside-in sweep: Ctrl-C always said `scoredistill distill --resume RUN_DIR`, also for optimize
    # and for a run interrupted before it wrote anything
    from scoredistill.optimize.driver import PriorOptimizer

    def interrupted(self, resume=False):
        if checkpoint:
            os.makedirs(os.path.join(self.run_dir, "checkpoints", "step_0000001"))
        raise KeyboardInterrupt

    monkeypatch.setattr(PriorOptimizer, "run", interrupted)
    out = tmp_path / "run"
    code, err = run_main(["optimize", os.path.join(RECIPES, "optimize", "sds.yaml"), "--out", str(out)], capsys)
    assert code == 130 and len(err.strip().splitlines()) == 1, err
    if checkpoint:
        assert f"scoredistill optimize --resume {out}" in err, err
    else:
        assert "before the first checkpoint" in err, err


def test_resume_of_a_folder_stopped_before_its_config_says_how_to_restart(tmp_path, capsys):
    # found reviewing kills at random moments (docs: killed before its first checkpoint, --resume starts over): a
    # folder of ours killed between its marker and its config.yaml was called "not a scoredistill run folder"
    from scoredistill.engine.rundir import write_marker

    run = tmp_path / "run"
    run.mkdir()
    write_marker(str(run), "distill")
    code, err = run_main(["distill", "--resume", str(run)], capsys)
    assert _one_line(code, err) and "--out command again" in err, err
    code, err = run_main(["distill", os.path.join(RECIPES, "toy", "dmd2.yaml"), "--out", str(run),
                          "--set", "train.steps=1", "--set", "train.progress=false", "--set", "eval.plots=false",
                          "--set", "train.ode_pairs=16", "--set", "eval.n_samples=16", "--set", "train.batch_size=8",
                          "--set", "generator.width=8", "--set", "fake_score.width=8"], capsys)
    assert code == 0, err
