"""`scoredistill sample` on damaged or foreign generator folders: one line, exit 2, no traceback."""

import json
import os

import pytest
import yaml

from helpers import cli

CFG = {"teacher": {"kind": "gmm", "preset": "ring8"}, "generator": {"width": 16, "depth": 1},
       "fake_score": {"width": 16, "depth": 1}, "objective": {"name": "dmd2"},
       "train": {"steps": 2, "batch_size": 8, "progress": False}, "eval": {"every": 2, "n_samples": 16, "plots": False}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample_errors")
    (d / "c.yaml").write_text(yaml.safe_dump(CFG))
    p = cli(["distill", str(d / "c.yaml"), "--out", str(d / "run")])
    assert p.returncode == 0, p.stderr
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


@pytest.mark.parametrize("how", ["json", "no_class", "unknown_class", "bad_arch", "bad_shape", "truncated"])
def test_damaged_generator_folder_is_one_line(run, tmp_path, how):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _damage(copy / "generator", how)
    out = tmp_path / "s.npy"
    p = cli(["sample", str(copy), "--n", "4", "--out", str(out)])
    assert p.returncode == 2, (how, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()


def test_negative_seed_is_one_line(run, tmp_path):
    p = cli(["sample", str(run), "--n", "4", "--seed", "-1", "--out", str(tmp_path / "s.npy")])
    assert p.returncode == 2 and "--seed" in p.stderr and "Traceback" not in p.stderr


def test_intact_folder_samples(run, tmp_path):
    p = cli(["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.npy")])
    assert p.returncode == 0, p.stderr
    assert os.path.exists(tmp_path / "s.npy")
