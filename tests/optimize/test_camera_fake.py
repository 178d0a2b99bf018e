"""`fake_score.camera` (docs/3d.md, "Conditioning"): the native view-conditioned fake also reads the camera
through a zero-initialised MLP on the flattened camera-to-world matrix (ProlificDreamer, arXiv 2305.16213):
equal to the label-only fake at construction, no camera term for a dropped camera, trained by the fake's
denoising loss, exact resume, one-line errors."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import ROOT  # noqa: E402
from scoredistill.cli.main import main
from scoredistill.objectives.esd import fake_condition
from scoredistill.optimize import PriorOptimizer
from scoredistill.optimize.config import resolve
from scoredistill.optimize.fake import ViewConditionedDenoiser
from scoredistill.process.processes import VPDiscrete

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["--set", "train.progress=false", "--set", "train.threads=1", "--set", "eval.plots=false"]
TINY = ["--set", "teacher.resolution=16", "--set", "splats.count=40", "--set", "params.repeat=2",
        "--set", "fake_score.kind=mlp", "--set", "fake_score.width=32", "--set", "fake_score.depth=1"]
# two front-view cameras (azimuth within +-45 degrees), a back one, and the front one dropped (null row)
CAMS = torch.tensor([[10.0, 5.0, 1.2, 50.0], [30.0, -30.0, 1.5, 40.0], [10.0, 180.0, 1.2, 50.0], [-1.0] * 4])
VIEWS = torch.tensor([0, 0, 2, -1])
ROWS = torch.cat([VIEWS[:, None].float(), CAMS], 1)   # the view rows of splats under fake_score.camera


def run_cli(*args):
    try:
        return main([*args])
    except SystemExit as e:
        return e.code


def _fakes():
    torch.manual_seed(0)
    plain = ViewConditionedDenoiser(VPDiscrete(), (3, 2, 2), None, 4, 16, 1)
    torch.manual_seed(0)
    cam = ViewConditionedDenoiser(VPDiscrete(), (3, 2, 2), None, 4, 16, 1, camera=True)
    torch.nn.init.normal_(cam.net.net.out.weight)  # a trained-looking network: outputs depend on the embedding
    plain.net.load_state_dict(cam.net.state_dict())
    return plain, cam


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 2, 2, generator=g), torch.full((4,), 0.5, dtype=torch.float64)


def test_camera_fake_starts_as_the_label_fake_and_a_null_camera_adds_nothing():
    plain, cam = _fakes()
    x, t = _inputs()
    joint = fake_condition(cam, CAMS, ROWS, 4, "cpu")
    assert joint.shape == (4, 6) and (joint[:, 0] == -1).all() and torch.equal(joint[:3, 1:], ROWS[:3])
    dropped = ROWS.clone()
    dropped[0, 0] = -1                                                # a dropped view drops its camera
    assert (fake_condition(cam, None, dropped, 4, "cpu")[[0, 3], 2:] == -1).all()
    assert torch.equal(fake_condition(plain, CAMS, VIEWS, 4, "cpu"), joint[:, :2].long())
    labels = joint[:, :2].long()
    assert torch.equal(cam(x, t, joint), plain(x, t, labels))        # zero last layer: the label fake
    torch.nn.init.normal_(cam.camera_mlp[2].weight)
    out, ref = cam(x, t, joint), plain(x, t, labels)
    assert torch.equal(out[3], ref[3])                                # null camera row: no camera term
    assert not torch.allclose(out[:3], ref[:3])
    # the ESD view-marginal branch (no view) drops every camera: the label fake's null-view output
    assert torch.equal(cam(x, t, fake_condition(cam, CAMS, None, 4, "cpu")), plain(x, t, torch.full((4, 2), -1)))


def _cfg(camera: bool):
    return resolve({"teacher": {"kind": "scene", "scenes": ["snowman", "dumbbell"], "resolution": 16,
                                "process": {"kind": "vp"}},
                    "params": {"kind": "splats", "n": 2, "repeat": 2}, "splats": {"count": 30},
                    "objective": {"name": "vsd_particles", "guidance_scale": 1.0},
                    "fake_score": {"kind": "mlp", "width": 32, "depth": 1, "camera": camera},
                    "train": {"steps": 2, "progress": False, "threads": 1, "fake_lr": 1e-2},
                    "eval": {"every": 100, "plots": False}})


def test_the_fake_loss_trains_the_camera_mlp_and_tells_same_label_cameras_apart():
    opt = PriorOptimizer(_cfg(True))
    mlp = opt.fake.camera_mlp
    assert opt.fake.takes_camera and any(p is mlp[2].weight for p in opt.fake.parameters())
    r = opt.param.render(opt.param.sample_index(None, opt.rng))
    assert r.view.shape == (4, 5) and torch.equal(r.view[:, 1:], r.cond)   # each view row carries its camera
    x, t = _inputs()
    x = x.new_zeros(2, 3, 16, 16)
    joint = fake_condition(opt.fake, CAMS[:2], ROWS[:2], 2, "cpu")
    before = opt.fake(x, t[:2], joint)
    assert torch.equal(before[0], before[1])                          # same view label, camera unseen yet
    for _ in range(3):
        opt.fake_step()
    assert mlp[2].weight.abs().sum() > 0 and mlp[0].weight.grad is not None
    after = opt.fake(x, t[:2], joint)
    assert not torch.allclose(after[0], after[1])                     # the camera now reaches the output
    assert not PriorOptimizer(_cfg(False)).fake.takes_camera


def test_camera_fake_resume_equals_uninterrupted(tmp_path):
    common = [os.path.join(ROOT, "recipes", "3d", "scene_vsd.yaml"), *TINY, "--set", "fake_score.camera=true",
              "--set", "train.checkpoint_every=2", *QUIET]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_cli("optimize", *common, "--out", a, "--set", "train.steps=4") == 0
    assert run_cli("optimize", *common, "--out", b, "--set", "train.steps=2") == 0
    assert run_cli("optimize", "--resume", b, "--set", "train.steps=4", *QUIET) == 0
    with open(os.path.join(a, "scene.ply"), "rb") as fa, open(os.path.join(b, "scene.ply"), "rb") as fb:
        assert fa.read() == fb.read()


@pytest.mark.parametrize("recipe,sets", [
    ("optimize/esd.yaml", ["fake_score.camera=true"]),                       # particles: no camera
    ("3d/scene_vsd.yaml", [*TINY[1::2], "fake_score.camera=true", "splats.view=none"]),
    ("3d/scene_vsd.yaml", [*TINY[1::2], "fake_score.camera=yes please"]),
])
def test_bad_camera_fake_is_one_line_exit_2(tmp_path, capsys, recipe, sets):
    args = [x for s in sets for x in ("--set", s)]
    code = run_cli("optimize", os.path.join(ROOT, "recipes", recipe), "--out", str(tmp_path / "run"), *args, *QUIET)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("scoredistill: error: fake_score.camera"), err
