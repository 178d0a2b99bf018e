"""Bad input to the smaller commands: one line, exit 2, nothing written or removed."""

import os

import pytest

from helpers import RECIPES, cli


def _one_line(p):
    return p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_train_teacher_never_replaces_a_folder_with_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    for out in (mine, a_file):
        p = cli(["train-teacher", os.path.join(RECIPES, "teachers", "ring8.yaml"), "--out", str(out),
                 "--set", "train.steps=2"])
        assert _one_line(p) and "--out" in p.stderr, p.stderr
    assert os.listdir(mine) == ["notes.txt"] and a_file.read_text() == "keep"


def test_train_teacher_writes_a_marked_folder_once(tmp_path):
    out = tmp_path / "teacher"
    args = ["train-teacher", os.path.join(RECIPES, "teachers", "ring8.yaml"), "--out", str(out),
            "--set", "train.steps=2"]
    p = cli(args)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out)) == [".scoredistill", "config.json", "model.safetensors"]
    p = cli(args)
    assert _one_line(p) and "teacher written earlier" in p.stderr


@pytest.mark.parametrize("extra,field", [(["--seed", "-1"], "--seed"), (["--guidance", "nan"], "--guidance"),
                                         (["--guidance", "-2"], "--guidance"), (["--n", "0"], "--n")])
def test_teacher_sample_bad_numbers(tmp_path, extra, field):
    out = tmp_path / "t.npy"
    p = cli(["teacher-sample", os.path.join(RECIPES, "toy", "dmd2.yaml"), "--out", str(out), *extra])
    assert _one_line(p) and field in p.stderr, p.stderr
    assert not out.exists()
