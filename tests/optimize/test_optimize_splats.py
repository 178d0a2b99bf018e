"""Gaussian splats as an optimizer parameterization on exact-render teachers (docs/3d.md): the teacher
schema, per-kind learning rates, cameras as ``cond`` and view labels as ``view``, densify-and-prune
with remapped Adam state, exact resume after densification, outputs, one-line errors."""

from __future__ import annotations

import copy
import glob
import json
import os

import numpy as np
import pytest
import torch

from helpers import ROOT  # noqa: E402
from scoredistill.cli.main import main
from scoredistill.config import load_yaml
from scoredistill.engine.build import build_teacher
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import Batch
from scoredistill.optimize import PriorOptimizer
from scoredistill.optimize.config import resolve
from scoredistill.splat import GaussianSplats, read_ply

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["--set", "train.progress=false", "--set", "train.threads=1"]
TINY = ["--set", "teacher.resolution=16", "--set", "splats.count=40", "--set", "params.repeat=2"]
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "3d", "scene_*.yaml")))


def run_cli(*args):
    try:
        return main([*args])
    except SystemExit as e:
        return e.code


def recipe(name):
    return os.path.join(ROOT, "recipes", "3d", f"scene_{name}.yaml")


@pytest.mark.parametrize("teacher,field", [
    ({"kind": "scene"}, "teacher.scenes"),
    ({"kind": "scene", "scenes": []}, "teacher.scenes"),
    ({"kind": "scene", "scenes": ["snowman"], "weights": [1, 2]}, "teacher.weights"),
    ({"kind": "scene", "scenes": ["snowman"], "weights": [0]}, "teacher.weights"),
    ({"kind": "scene", "scenes": ["missing.ply"]}, "teacher.scenes[0]"),
    ({"kind": "scene", "scenes": ["teapot"]}, "teacher.scenes[0]"),
    ({"kind": "scene", "scenes": ["snowman"], "preset": "ring8"}, "teacher.preset"),
    ({"kind": "scene", "scenes": ["snowman"], "background": [1, 2, 3]}, "teacher.background"),
    ({"kind": "gmm", "preset": "ring8", "scenes": ["snowman"]}, "teacher.scenes"),
])
def test_scene_teacher_schema_errors(teacher, field):
    with pytest.raises(ConfigError) as e:
        build_teacher(teacher)
    assert e.value.field == field and "\n" not in str(e.value)


def test_invalid_ply_scene_is_one_line(tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n0\n")
    with pytest.raises(ConfigError) as e:
        build_teacher({"kind": "scene", "scenes": [str(bad)]})
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def _cfg(**over):
    cfg = {"teacher": {"kind": "scene", "scenes": ["snowman", "dumbbell"], "resolution": 16,
                       "process": {"kind": "vp"}},
           "params": {"kind": "splats", "n": 2, "repeat": 2},
           "splats": {"count": 30, "lr": {"means": 2e-3}},
           "objective": {"name": "esd"}, "fake_score": {"width": 32, "depth": 1},
           "train": {"steps": 2, "progress": False, "threads": 1}, "eval": {"every": 100, "plots": False}}
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v}
    return resolve(cfg)


def test_cameras_are_cond_views_are_labels_and_groups_have_their_rates():
    opt = PriorOptimizer(_cfg())
    p = opt.param
    groups = opt.optimizers["params"].param_groups
    assert {(g["particle"], g["name"]) for g in groups} == {(i, n) for i in range(2) for n in
                                                            ("means", "log_scales", "quats", "opacity_logits", "sh_dc")}
    assert {g["lr"] for g in groups if g["name"] == "means"} == {2e-3}
    assert {g["lr"] for g in groups if g["name"] == "opacity_logits"} == {5e-2}
    index = p.sample_index(None, torch.Generator().manual_seed(0))
    assert index.tolist() == [0, 1, 0, 1]
    r = p.render(index)
    assert r.x.shape == (4, 3, 16, 16) and r.cond.shape == (4, 4) and r.view.dtype == torch.long
    assert r.x.min() >= -1 and r.x.max() <= 1
    # the view label is what the camera says: overhead above 60 degrees, else by azimuth
    cams = r.cond
    assert torch.equal(p.camera_view(cams), r.view)
    # the fake reads the camera's view; a dropped camera row (all -1) is the null view
    assert opt.fake.joint_label(cams)[:, None].shape == (4, 1)
    null = torch.full_like(cams, -1.0)
    assert (p.camera_view(null) == -1).all()
    # gradients reach every particle's parameters through the objective
    b = Batch(x=r.x, cond=r.cond, view=r.view, index=index, num_items=2, rng=torch.Generator().manual_seed(1))
    opt.objective.generator_loss(b, opt.roles())["loss"].backward()
    assert all(s.means.grad is not None and s.means.grad.abs().sum() > 0 for s in p.scenes)


def test_lr_schedule_scales_every_group():
    opt = PriorOptimizer(_cfg(train={"lr": [0, 1.0, 0.5, 10]}, objective={"name": "sds"}))
    opt.apply_schedules(10)
    rates = {g["name"]: g["lr"] for g in opt.optimizers["params"].param_groups if g["particle"] == 0}
    assert rates["means"] == pytest.approx(1e-3) and rates["opacity_logits"] == pytest.approx(2.5e-2)


def test_densify_changes_counts_and_remaps_adam_state():
    cfg = _cfg(splats={"densify": {"start": 1, "every": 1, "stop": 100, "grad_threshold": 1e-9,
                                   "max_gaussians": 45, "opacity_reset_every": 0}},
               objective={"name": "sds"}, train={"steps": 2})
    opt = PriorOptimizer(cfg)
    opt.run()
    p, o = opt.param, opt.optimizers["params"]
    assert all(s.num > 30 for s in p.scenes) and all(s.num <= 45 for s in p.scenes)
    for g in o.param_groups:
        (param,) = g["params"]
        assert param is getattr(p.scenes[g["particle"]], g["name"])
        st = o.state[param]
        assert st["exp_avg"].shape == param.shape and st["exp_avg_sq"].shape == param.shape


def test_resume_after_densification_equals_uninterrupted(tmp_path):
    common = [recipe("sds"), *TINY, "--set", "train.checkpoint_every=3", "--set", "eval.plots=false",
              "--set", "splats.densify={start: 1, every: 2, stop: 100, grad_threshold: 1e-7, max_gaussians: 60}",
              *QUIET]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_cli("optimize", *common, "--out", a, "--set", "train.steps=6") == 0
    assert run_cli("optimize", *common, "--out", b, "--set", "train.steps=3") == 0
    n3 = GaussianSplats.from_ply(os.path.join(b, "scene.ply")).num
    assert n3 > 40                                          # densified before the checkpoint
    assert run_cli("optimize", "--resume", b, "--set", "train.steps=6", *QUIET) == 0
    da, db = read_ply(os.path.join(a, "scene.ply")), read_ply(os.path.join(b, "scene.ply"))
    assert len(da) > n3 or len(da) == 60
    for k in ("means", "log_scales", "quats", "opacity_logits", "sh_dc"):
        assert np.array_equal(getattr(da, k), getattr(db, k)), k


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_every_scene_recipe_runs_on_any_scene(tmp_path, path):
    """Each recipe runs unchanged on a user's PLY (`--set teacher.scenes=[my.ply]`) and writes the
    3D outputs: scene.ply in the 3DGS layout, turntable.gif, a render grid linked from report.md."""
    ply = str(tmp_path / "my.ply")
    GaussianSplats.sphere(50, 0.3, seed=3).save_ply(ply)
    out = str(tmp_path / "run")
    assert run_cli("optimize", path, "--out", out, *TINY, "--set", f"teacher.scenes=[{ply}]",
                   "--set", "train.steps=2", "--set", "splats.turntable=3", "--set", "splats.eval_views=2",
                   *QUIET) == 0
    res = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    assert res["step"] == 2 and np.isfinite(res["psnr"]) and res["particles_scene0"] >= 1
    data = read_ply(os.path.join(out, "scene.ply"))
    assert len(data) > 0 and np.isfinite(data.means).all()
    report = open(os.path.join(out, "report.md")).read()
    assert "turntable.gif" in report and "samples/step_0000002.png" in report
    from PIL import Image

    with Image.open(os.path.join(out, "turntable.gif")) as im:
        assert im.n_frames == 3 and im.size == (16, 16)
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("sets,field", [
    (["splats.init=cube"], "splats.init"),
    (["splats.init=nowhere.ply"], "splats.init"),
    (["splats.cameras={elevation: [30, 10]}"], "splats.cameras.elevation"),
    (["splats.cameras={distance: [0, 1]}"], "splats.cameras.distance"),
    (["splats.lr={colour: 1}"], "splats.lr.colour"),
    (["splats.densify={every: -1}"], "splats.densify.every"),
    (["teacher.scenes=[]"], "teacher.scenes"),
    (["params.init=x.npy"], "params.init"),
    (["params.views=index"], "params.views"),
])
def test_bad_splat_config_is_one_line_exit_2(tmp_path, capsys, sets, field):
    args = [x for s in sets for x in ("--set", s)]
    code = run_cli("optimize", recipe("sds"), "--out", str(tmp_path / "run"), *TINY, *args, *QUIET)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"scoredistill: error: {field}"), err
    assert not os.path.exists(tmp_path / "run")


# measured (32x32, snowman, 200 steps of recipes/3d/scene_sds.yaml, 1 thread): seeds 0 / 1 / 2 reached
# 34.42 / 34.44 / 34.35 dB held-out PSNR and 0.0308 / 0.0320 / 0.0313 opacity-weighted Chamfer
# (start: 14.9 dB, 0.068); this test: 48 s at a load average of 4 on the 2-core box, 598 s at 15-20
SDS_STEPS, SDS_MIN_PSNR, SDS_MAX_CHAMFER = 200, 32.0, 0.036


@pytest.mark.slow
def test_sds_reconstructs_a_hidden_scene():
    """SDS (DreamFusion, arXiv 2209.14988) on a one-scene exact-render teacher: a random ball of
    Gaussians becomes the hidden scene (held-out turntable views never trained on exactly)."""
    import time

    cfg = resolve({**load_yaml(recipe("sds")), "eval": {"every": SDS_STEPS, "plots": False}})
    cfg["train"].update({"steps": SDS_STEPS, "progress": False, "threads": 1})
    t0 = time.time()
    opt = PriorOptimizer(cfg)
    res = opt.run()
    wall = time.time() - t0
    msg = f"seed 0, 1 thread: psnr {res['psnr']:.2f} dB, chamfer {res['chamfer']:.4f}, {wall:.0f} s"
    assert res["psnr"] >= SDS_MIN_PSNR and res["chamfer"] <= SDS_MAX_CHAMFER, msg


def test_camera_conditions_drop_whole_rows_and_have_no_class_slot():
    from scoredistill.objectives.common import drop_condition
    from scoredistill.objectives.esd import fake_condition
    from scoredistill.optimize import ViewConditionedDenoiser
    from scoredistill.process.processes import VPDiscrete

    cams = torch.tensor([[10.0, 5.0, 1.2, 50.0]] * 6)
    dropped = drop_condition(cams, 0.5, torch.Generator().manual_seed(0))
    rows = (dropped == -1).all(1)
    assert rows.any() and (~rows).any() and torch.equal(dropped[~rows], cams[~rows])   # whole rows or none
    labels = torch.tensor([0, 1, 2])                                                   # class labels: unchanged
    assert torch.equal(drop_condition(labels, 0.0, None), labels)
    fake = ViewConditionedDenoiser(VPDiscrete(), (3, 2, 2), None, 4, 8, 1)
    joint = fake_condition(fake, cams[:3], torch.tensor([0, 3, -1]), 3, "cpu")
    assert joint.tolist() == [[-1, 0], [-1, 3], [-1, -1]]


def test_particle_mixture_fake_is_the_scene_teacher_of_the_particles():
    """`fake_score.kind: particles` (the exact optimum of VSD's fake-score training) is the exact-render
    teacher whose scenes are the current particles (uniform weights), and it has nothing to train."""
    from scoredistill.optimize.fake import ParticleMixtureScore
    from scoredistill.teachers.scene import SceneTeacher

    opt = PriorOptimizer(_cfg(objective={"name": "vsd_particles"}, fake_score={"kind": "particles"}))
    assert isinstance(opt.fake, ParticleMixtureScore) and "fake_score" not in opt.optimizers
    assert "fake_score" not in opt.modules and not list(opt.fake.parameters())
    param, proc = opt.param, opt.teacher.process
    g = torch.Generator().manual_seed(0)
    cams = torch.tensor([[10.0, 30.0, 1.2, 50.0], [60.0, -120.0, 1.4, 45.0], [0.0, 170.0, 1.0, 60.0]])
    x_t = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0.05, 0.4, 0.9])
    for std in (0.0, 0.1):
        fake = ParticleMixtureScore(param, proc, std)
        scenes = [copy.deepcopy(s) for s in param.scenes]   # the teacher freezes its scenes
        ref = SceneTeacher(scenes, std=max(std, 1e-12), height=16, width=16, process=proc,
                           background=param.bg_color.tolist())
        assert torch.allclose(fake(x_t, t, cams), ref(x_t, t, cams), atol=1e-6)
    one = ParticleMixtureScore(_OneParticle(param), proc)       # one particle: its own render whatever x_t
    r0 = param.particle_renders(cams)[:, :1].reshape(3, 3, 16, 16).float()
    assert torch.allclose(one(x_t, t, cams), r0, atol=1e-6)
    opt.run()                                                   # trains: no fake steps, the splats move
    assert opt.step == 2 and torch.isfinite(param.scenes[0].means).all()


class _OneParticle:
    """The first particle of a splat parameterization, seen by the particle-mixture fake."""

    def __init__(self, param):
        self.param, self.channels, self.teacher_size = param, param.channels, param.teacher_size

    def particle_renders(self, cond):
        return self.param.particle_renders(cond)[:, :1]


def test_particle_mixture_fake_needs_splats_under_a_scene_teacher(tmp_path, capsys):
    toy = os.path.join(ROOT, "recipes", "optimize", "vsd_particles.yaml")
    args = ["optimize", toy, "--out", str(tmp_path / "run"), "--set", "fake_score.kind=particles", *QUIET]
    code = run_cli(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("scoredistill: error: fake_score.kind"), err


# measured (16x16, 150 Gaussians, 300 steps, 4 particles x 2 views, snowman + dumbbell, 1 thread): with
# the scene_vsd recipe's fake (exact particle mixture) and times (t_min 0.5 -> 0.02 over 200 steps) VSD
# ends 1 / 3 (snowman / dumbbell) on seeds 0, 1 and 2; SDS from the same inits and times 0 / 4 on all
# three; VSD with U(0.02, 0.98) times 0 / 4 (seed 0). VSD test: 49 s at a load average of 1.6 (221 s at
# 8-13); the opt-in SDS control: 34 s at 1.9.
TWO_SCENE_STEPS = 300


def _two_scene_run(method: str) -> dict:
    raw = load_yaml(recipe(method))
    raw["teacher"] = {**raw["teacher"], "scenes": ["snowman", "dumbbell"], "resolution": 16}
    raw["params"] = {**raw["params"], "n": 4, "repeat": 2}
    raw["splats"] = {**raw["splats"], "count": 150}
    raw["objective"] = {**raw["objective"], "time": {"kind": "uniform", "t_min": [0, 0.5, 0.02, 200], "t_max": 0.98}}
    raw["train"] = {**raw["train"], "steps": TWO_SCENE_STEPS, "progress": False, "threads": 1, "seed": 0}
    cfg = resolve({**raw, "eval": {"every": TWO_SCENE_STEPS, "plots": False}})
    res = PriorOptimizer(cfg).run()
    return {k: res[f"particles_scene{k}"] for k in (0, 1)}


@pytest.mark.slow
@pytest.mark.long  # the two-scene claim (~50 s; the suite is near its 15-minute budget)
def test_vsd_particles_land_on_both_scenes():
    """ProlificDreamer's claim (arXiv 2305.16213) on an exact-render teacher: VSD's particles cover both
    scenes of a two-scene teacher (docs/results/3d.md)."""
    per_scene = _two_scene_run("vsd")
    assert per_scene[0] >= 1 and per_scene[1] >= 1, per_scene


@pytest.mark.slow
@pytest.mark.long  # the SDS control of the two-scene claim (~35 s)
def test_sds_particles_land_on_one_scene():
    """The control: SDS from the same inits and times puts every particle on one scene."""
    per_scene = _two_scene_run("sds")
    assert max(per_scene.values()) == 4, per_scene
