"""``scoredistill optimize``: outputs, every recipe, one-line config errors, exact resume, user renderers."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT  # noqa: E402
from scoredistill.cli.main import main
from scoredistill.optimize import CallableRenderer, PriorOptimizer
from scoredistill.optimize.config import resolve


@pytest.fixture(autouse=True)
def _restore_threads():
    """The runs here set ``train.threads: 1``; give the rest of the session its thread count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "optimize", "*.yaml")))
QUIET = ["--set", "train.progress=false", "--set", "train.threads=1"]


def run_cli(*args):
    try:
        return main(["optimize", *args])
    except SystemExit as e:
        return e.code


def recipe(name):
    return os.path.join(ROOT, "recipes", "optimize", f"{name}.yaml")


def test_outputs_of_a_particle_run(tmp_path):
    out = str(tmp_path / "run")
    assert run_cli(recipe("sds"), "--out", out, "--set", "train.steps=20", "--set", "eval.every=10",
                   "--set", "train.checkpoint_every=10", *QUIET) == 0
    for f in ("config.yaml", "metrics.jsonl", "params.safetensors", "particles.npy", "report.md"):
        assert os.path.exists(os.path.join(out, f)), f
    x = np.load(os.path.join(out, "particles.npy"))
    assert x.dtype == np.float32 and x.shape == (512, 2) and np.isfinite(x).all()
    assert np.array_equal(x, load_file(os.path.join(out, "params.safetensors"))["x"].numpy())
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [10, 20] and "mode_spread_ratio" in lines[-1]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_0000010", "step_0000020"]
    assert len(glob.glob(os.path.join(out, "samples", "*.png"))) == 2
    # a second run into the same folder is refused
    assert run_cli(recipe("sds"), "--out", out, *QUIET) == 2


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_every_recipe_runs(tmp_path, path):
    out = str(tmp_path / "run")
    small = ["--set", "params.n=32"] if "kind: particles" in open(path).read() else []
    args = ["--set", "train.steps=4", "--set", "eval.plots=false", *small, *QUIET]
    assert run_cli(path, "--out", out, *args) == 0
    res = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    assert res["step"] == 4 and res["non_finite"] == 0 and sum(res["nonfinite_skipped"].values()) == 0
    assert len(RECIPES) >= 11


@pytest.mark.parametrize("sets,field", [
    (["params.foo=1"], "params.foo"),
    (["objective.name=nope"], "objective.name"),
    (["objective.grad_clamp=[1,2,3]"], "objective.grad_clamp"),
    (["params.classes=2"], "params.classes"),          # unconditional teacher
    (["objective.name=csd"], "teacher"),               # csd needs a class-conditional teacher
    (["objective.name=csd", "objective.weighting=uniform", "teacher.preset=ring8_cond"],
     "params.classes"),                                # ... and a class per item
    (["params.kind=callable"], "params.render"),
    (["params.kind=callable", "params.render=os:nope", "params.init=os:getcwd"], "params.render"),
    (["train.lr=[0,1,2]"], "train.lr"),
    (["params.shape=[3]"], "params.shape"),
    (["objective.time.t_max=[0,0.9,0.5,10]", "objective.time.kind=lognormal"], "objective.time.t_min"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, sets, field):
    args = [x for s in sets for x in ("--set", s)]
    code = run_cli(recipe("sds"), "--out", str(tmp_path / "run"), "--set", "train.steps=2", *args, *QUIET)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"scoredistill: error: {field}"), err
    assert not os.path.exists(tmp_path / "run")          # rejected before the run folder is written


def test_objective_needing_more_than_a_fake_score_is_refused(tmp_path, capsys):
    cfg = tmp_path / "dmd2.yaml"
    cfg.write_text("teacher: {kind: gmm, preset: ring8}\nobjective: {name: dmd2, gan_weight_gen: 0.1}\n")
    code = run_cli(str(cfg), "--out", str(tmp_path / "run"), *QUIET)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["scoredistill: error: objective.name: dmd2 needs discriminator, real_data, "
                                 "which the optimizer does not provide; use `scoredistill distill`"]


@pytest.mark.parametrize("name", ["cds", "esd"])
def test_resume_equals_uninterrupted(tmp_path, name):
    common = [recipe(name), "--set", "params.n=32", "--set", "train.checkpoint_every=10", "--set",
              "eval.plots=false", *QUIET]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_cli(*common, "--out", a, "--set", "train.steps=30") == 0
    assert run_cli(*common, "--out", b, "--set", "train.steps=20") == 0
    assert run_cli("--resume", b, "--set", "train.steps=30", *QUIET) == 0
    xa, xb = np.load(os.path.join(a, "particles.npy")), np.load(os.path.join(b, "particles.npy"))
    assert np.array_equal(xa, xb)
    ck = load_file(os.path.join(b, "checkpoints", "step_0000030", "state.safetensors"))
    if name == "cds":
        assert ck["model/objective/fixed_noise"].shape == (32, 2)
    else:
        assert any(k.startswith("model/fake_score/") for k in ck)
        assert any(k.startswith("optim/fake_score/") for k in ck)


def test_callable_renderer_recipe(tmp_path):
    out = str(tmp_path / "run")
    assert run_cli(recipe("renderer"), "--out", out, "--set", "train.steps=5", "--set", "eval.plots=false",
                   *QUIET) == 0
    x = np.load(os.path.join(out, "renders.npy"))
    assert x.shape == (256, 2)
    objects = load_file(os.path.join(out, "params.safetensors"))["params.objects"].numpy()
    # view 8k + j is object k rotated: the radii match
    assert np.allclose(np.linalg.norm(x[8:16], axis=1), np.linalg.norm(objects[1]), atol=1e-5)


def test_python_callable_renderer_gets_the_gradient():
    seen = {}

    def render(params, index):
        seen["index"] = index
        return params["a"][index] * 2.0

    param = CallableRenderer(render, {"a": torch.full((16, 2), 3.0)}, num_views=16, views=None)
    cfg = resolve({"teacher": {"kind": "gmm", "preset": "ring8", "process": {"kind": "vp"}},
                   "params": {"kind": "callable", "render": "x:y", "init": "x:y"},
                   "objective": {"name": "sds", "weighting": "uniform"},
                   "train": {"steps": 30, "lr": 0.05, "progress": False},
                   "eval": {"every": 30, "plots": False}})
    opt = PriorOptimizer(cfg, None, param=param)
    res = opt.run()
    a = param.params["a"].detach()
    assert (a.norm(dim=1) < 3.0 * 2 ** 0.5 - 0.5).all()      # pulled toward the ring from (3, 3)
    assert len(seen["index"]) == 16 and res["step"] == 30


def test_nan_guard_skips_then_aborts():
    from scoredistill.engine.distiller import TrainingAborted

    calls = {"n": 0}

    def render(params, index):
        calls["n"] += 1
        bad = calls["n"] % 2 == 0 or calls["n"] > 40       # every other call, then always
        return params["a"][index] * (float("nan") if bad else 1.0)

    cfg = resolve({"teacher": {"kind": "gmm", "preset": "ring8", "process": {"kind": "vp"}},
                   "params": {"kind": "callable", "render": "x:y", "init": "x:y"},
                   "objective": {"name": "sds"}, "train": {"steps": 100, "progress": False, "nan_guard_max": 5},
                   "eval": {"every": 1000, "plots": False}})
    param = CallableRenderer(render, {"a": torch.ones(8, 2)}, num_views=8, views=None)
    opt = PriorOptimizer(cfg, None, param=param)
    with pytest.raises(TrainingAborted, match="5 consecutive"):
        opt.run()
    assert opt.nonfinite["params"] >= 15 and torch.isfinite(param.params["a"]).all()
