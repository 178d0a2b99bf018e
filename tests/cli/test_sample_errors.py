"""`scoredistill sample` on damaged or foreign generator folders: one line, exit 2, no traceback (in this process,
and once through ``python -m scoredistill``)."""

import json
import os

import pytest
import yaml

from helpers import cli, run_main

pytestmark = pytest.mark.usefixtures("one_thread")  # as cli() runs it: tiny models are slower on two threads

CFG = {"teacher": {"kind": "gmm", "preset": "ring8"}, "generator": {"width": 16, "depth": 1},
       "fake_score": {"width": 16, "depth": 1}, "objective": {"name": "dmd2"},
       "train": {"steps": 2, "batch_size": 8, "progress": False}, "eval": {"every": 2, "n_samples": 16, "plots": False}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    from scoredistill.cli.main import main

    d = tmp_path_factory.mktemp("sample_errors")
    (d / "c.yaml").write_text(yaml.safe_dump(CFG))
    assert main(["distill", str(d / "c.yaml"), "--out", str(d / "run")]) == 0
    return d / "run"


def _damage(gen_dir, how):
    cfg_path, w_path = gen_dir / "config.json", gen_dir / "model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    if how == "json":
        cfg_path.write_text("{not json")
    elif how == "no_class":
        cfg.pop("class")
        cfg_path.write_text(json.dumps(cfg))
    elif how == "unknown_class":
        cfg["class"] = "TransformerOfTheFuture"
        cfg_path.write_text(json.dumps(cfg))
    elif how == "bad_arch":
        cfg["arch"]["width"] = 32  # weights are 16 wide
        cfg_path.write_text(json.dumps(cfg))
    elif how == "bad_shape":
        cfg["data_shape"] = [-3]
        cfg_path.write_text(json.dumps(cfg))
    elif how == "truncated":
        w_path.write_bytes(w_path.read_bytes()[:40])


def _damaged(run, tmp_path, how):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _damage(copy / "generator", how)
    return ["sample", str(copy), "--n", "4", "--out", str(tmp_path / "s.npy")]


@pytest.mark.parametrize("how", ["json", "no_class", "unknown_class", "bad_arch", "bad_shape", "truncated"])
def test_damaged_generator_folder_is_one_line(run, tmp_path, capsys, how):
    code, err = run_main(_damaged(run, tmp_path, how), capsys)
    assert code == 2, (how, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s.npy").exists()


def test_damaged_generator_folder_through_a_process(run, tmp_path):
    p = cli(_damaged(run, tmp_path, "unknown_class"))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "s.npy").exists()


def test_negative_seed_is_one_line(run, tmp_path, capsys):
    code, err = run_main(["sample", str(run), "--n", "4", "--seed", "-1", "--out", str(tmp_path / "s.npy")], capsys)
    assert code == 2 and "--seed" in err and "Traceback" not in err


def test_intact_folder_samples(run, tmp_path, capsys):
    code, err = run_main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.npy")], capsys)
    assert code == 0, err
    assert os.path.exists(tmp_path / "s.npy")
