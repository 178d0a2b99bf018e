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
