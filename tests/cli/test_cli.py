"""CLI contract: outputs, and bad input -> one line on stderr, exit 2, no traceback, nothing lost."""

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from helpers import ROOT, tiny_config  # noqa: E402
from scoredistill.cli.main import main

BASE = tiny_config(train={"steps": 6, "checkpoint_every": 3}, eval={"every": 3, "plots": True})


def write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def run_main(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr()


def with_(section, **kv):
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    cfg[section] = {**cfg[section], **kv}
    return cfg


BAD = [
    (with_("teacher", bogus=1), "teacher.bogus"),
    (with_("objective", name="dmd9"), "objective.name"),
    (with_("objective", guidanc_scale=2), "objective.guidanc_scale"),
    (with_("teacher", preset=None, means=[[0, 0], [1]], std=0.1), "teacher.means"),
    (with_("teacher", preset=None, means=[[0, 0], [1, 1]], std=0.1, weights=[1, 2, 3]), "teacher.weights"),
    (with_("teacher", preset=None, means=[[0, 0], [1, 1]], std=-1.0), "teacher.std"),
    (with_("teacher", kind="hub"), "teacher.kind"),
    (with_("teacher", kind="learned", preset=None, path="/nonexistent/teacher"), "teacher.path"),
    (with_("train", steps=0), "train.steps"),
    (with_("train", betas=[0.9]), "train.betas"),
    (with_("train", ema=1.5), "train.ema"),
    (with_("generator", kind="unet"), "generator.kind"),
    (with_("generator", kind="teacher"), "generator.kind"),
    (with_("teacher", process={"kind": "ddpm"}), "teacher.process.kind"),
    ({**BASE, "trainer": {}}, "trainer"),
]


@pytest.mark.parametrize("cfg,field", BAD, ids=[b[1] for b in BAD])
def test_bad_config_one_line_exit_2(tmp_path, capsys, cfg, field):
    code, out = run_main(["distill", write(tmp_path, cfg), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"scoredistill: error: {field}"), lines[0]
    assert "Traceback" not in out.err


def test_bad_override_and_missing_file(tmp_path, capsys):
    code, out = run_main(["distill", write(tmp_path, BASE), "--out", str(tmp_path / "r"), "--set", "train.stepz=3"],
                         capsys)
    assert code == 2 and "train.stepz" in out.err
    code, out = run_main(["distill", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "file not found" in out.err
    code, out = run_main(["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "x.npy")], capsys)
    assert code == 2 and "RUN_DIR" in out.err
    code, out = run_main(["distill", "--bogus-flag"], capsys)
    assert code == 2 and len(out.err.strip().splitlines()) == 1


def test_distill_sample_resume_and_nothing_lost(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["distill", write(tmp_path, BASE), "--out", run]) == 0
    for f in ("config.yaml", "metrics.jsonl", "report.md", "comparison.png", "generator/model.safetensors",
              "generator/config.json"):
        assert os.path.exists(os.path.join(run, f)), f
    assert any(n.endswith(".png") for n in os.listdir(os.path.join(run, "samples")))
    assert os.listdir(os.path.join(run, "tb"))
    capsys.readouterr()
    # sample: float32 (N, *data_shape)
    assert main(["sample", run, "--n", "17", "--seed", "3", "--out", str(tmp_path / "s.npy")]) == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (17, 2) and x.dtype == np.float32
    assert np.array_equal(x, (main(["sample", run, "--n", "17", "--seed", "3", "--out", str(tmp_path / "t.npy")]),
                              np.load(tmp_path / "t.npy"))[1])
    # other file types, and a PNG of non-image samples, are one-line --out errors that write nothing
    for bad, why in (("s.txt", "accepted: .npy (array), .png (image grid)"), ("s.png", "use .npy")):
        code, out = run_main(["sample", run, "--out", str(tmp_path / bad)], capsys)
        assert code == 2 and out.err.startswith("scoredistill: error: --out") and why in out.err, out.err
        assert len(out.err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / bad)
    # a second distill into the same folder is refused and loses nothing
    before = sorted(os.listdir(run))
    code, out = run_main(["distill", write(tmp_path, BASE), "--out", run], capsys)
    assert code == 2 and "--resume" in out.err
    assert sorted(os.listdir(run)) == before
    # resume with more steps
    assert main(["distill", "--resume", run, "--set", "train.steps=9"]) == 0
    assert os.path.basename(sorted(os.listdir(os.path.join(run, "checkpoints")))[-1]) == "step_0000009"
    # corrupt every checkpoint: resume fails with one line, exit 2, files kept
    for c in os.listdir(os.path.join(run, "checkpoints")):
        open(os.path.join(run, "checkpoints", c, "meta.json"), "w").write("{broken")
    capsys.readouterr()
    code, out = run_main(["distill", "--resume", run, "--set", "train.steps=12"], capsys)
    assert code == 2
    assert out.err.strip().splitlines()[-1].startswith("scoredistill: error: checkpoint: no readable checkpoint")
    assert os.path.exists(os.path.join(run, "generator", "model.safetensors"))


def test_teacher_sample(tmp_path):
    out = str(tmp_path / "t.npy")
    assert main(["teacher-sample", write(tmp_path, BASE), "--n", "50", "--steps", "18", "--sampler", "heun",
                 "--out", out]) == 0
    x = np.load(out)
    assert x.shape == (50, 2) and x.dtype == np.float32
    r = np.sqrt((x**2).sum(1))
    assert np.abs(r - 2.0).mean() < 0.35  # ring of radius 2


def test_teacher_sample_class_and_png(tmp_path, capsys):
    code, out = run_main(["teacher-sample", write(tmp_path, BASE), "--class", "1", "--out", str(tmp_path / "t.npy")],
                         capsys)
    assert code == 2 and "--class: this teacher is unconditional" in out.err
    digits = os.path.join(ROOT, "recipes", "digits", "dmd2.yaml")
    code, out = run_main(["teacher-sample", digits, "--class", "10", "--out", str(tmp_path / "t.png")], capsys)
    assert code == 2 and "--class: must be in [0, 9]" in out.err and not os.path.exists(tmp_path / "t.png")
    assert main(["teacher-sample", digits, "--class", "7", "--n", "8", "--steps", "4",
                 "--out", str(tmp_path / "t.png")]) == 0
    assert os.path.getsize(tmp_path / "t.png") > 1000


def test_subprocess_no_traceback(tmp_path):
    cfg = write(tmp_path, with_("objective", name="nope"))
    p = subprocess.run([sys.executable, "-m", "scoredistill", "distill", cfg, "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "scoredistill: error: objective.name: unknown value 'nope'; accepted: dmd, dmd2, vsd"] or \
        p.stderr.startswith("scoredistill: error: objective.name: unknown value 'nope'; accepted:")
    assert "Traceback" not in p.stderr


def test_demo_image_quick(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--image", "--quick", "--out", out]) == 0
    for f in ("report.md", "comparison.png", "metrics.jsonl", "generator/model.safetensors"):
        assert os.path.exists(os.path.join(out, f)), f
    assert "FD" in capsys.readouterr().out
