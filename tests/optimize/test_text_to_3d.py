"""Text-to-3D recipes (recipes/3d/<method>.yaml) end to end on a tiny random SD-architecture pipeline on
the CPU (no downloads): splats rendered from orbit cameras, encoded by the pipeline's VAE, under the
view-dependent prompts; VSD's fake score is a LoRA on the teacher's own UNet."""

from __future__ import annotations

import os

import pytest
import torch

from scoredistill.cli.main import main
from scoredistill.splat import GaussianSplats

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recipe(name):
    return os.path.join(ROOT, "recipes", "3d", f"{name}.yaml")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from scoredistill.adapters.tiny import save_tiny

    return save_tiny("sd15", str(tmp_path_factory.mktemp("tiny_sd")))


def tiny_overrides(path, steps=2):
    # the tiny CLIP tokenizer holds 16 byte-level tokens: a one-letter prompt keeps the view phrases
    return ["--set", f"teacher.path={path}", "--set", "teacher.resolution=16", "--set", "teacher.prompts=[x]",
            "--set", "train.device=cpu", "--set", f"train.steps={steps}", "--set", "splats.count=40",
            "--set", "splats.densify=null", "--set", f"eval.every={steps}", "--set", "splats.turntable=3",
            "--set", "splats.eval_views=4", "--set", "train.progress=false", "--set", "train.threads=1"]


def test_sds_recipe_runs_end_to_end_on_a_tiny_sd_pipeline(tiny_sd, tmp_path):
    out = str(tmp_path / "run")
    try:
        code = main(["optimize", recipe("sds"), "--out", out, *tiny_overrides(tiny_sd)])
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    scene = GaussianSplats.from_ply(os.path.join(out, "scene.ply"))
    assert scene.num == 40 and torch.isfinite(scene.means).all()
    assert os.path.getsize(os.path.join(out, "turntable.gif")) > 0
    import yaml

    with open(os.path.join(out, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["teacher"]["prompts"] == ["x"]           # the view table is rebuilt on load, not stored
    assert cfg["teacher"]["process"]["kind"] == "vp"    # read from the scheduler


@pytest.mark.parametrize("name", ["vsd", "esd"])
def test_vsd_recipe_trains_a_lora_fake_on_view_prompts_and_cameras(tiny_sd, tmp_path, name):
    from scoredistill.config import load_yaml
    from scoredistill.optimize import PriorOptimizer
    from scoredistill.optimize.config import resolve
    from scoredistill.optimize.fake import ViewPromptLoRA
    from scoredistill.optimize.splats import SplatParticles

    sets = [a for a in tiny_overrides(tiny_sd, steps=1) if a != "--set"]
    opt = PriorOptimizer(resolve(load_yaml(recipe(name)), sets), None)
    t, fake, param = opt.teacher, opt.fake, opt.param
    assert isinstance(param, SplatParticles) and isinstance(fake, ViewPromptLoRA)
    assert t.assets.prompts == ["x, front view", "x, side view", "x, back view", "x, overhead view", "x"]
    # the LoRA's condition [prompt, view]: dropped view -> the plain prompt (ESD's view-free branch)
    cond = torch.tensor([[2, 2], [2, -1], [-1, 2], [-1, -1]])
    assert fake.prompt_index(cond).tolist() == [2, 4, -1, -1]
    r = param.render(param.sample_index(None, opt.rng))
    assert r.x.shape == (4, *t.data_shape) and r.x.requires_grad
    assert r.cond.dtype == torch.long and set(r.cond.tolist()) <= {0, 1, 2, 3}
    # fake_score.camera: each view row carries its camera, which the LoRA fake reads
    assert r.view.shape == (4, 5) and torch.equal(r.view[:, 0].long(), r.cond)
    mlp = fake.camera_mlp
    assert mlp[2].weight.shape[0] == t.model.time_embedding.linear_2.out_features
    assert {id(p) for p in mlp.parameters()} <= {id(p) for g in opt.optimizers["fake_score"].param_groups
                                                   for p in g["params"]}
    lora0 = {k: v.detach().clone() for k, v in fake.state_dict().items()}
    assert any(k.startswith("camera_mlp.") for k in lora0)                             # checkpointed with the LoRA
    x_t, tt = torch.randn(2, *t.data_shape), torch.full((2,), 0.5)
    cams = torch.tensor([[0, 0, 10.0, 5.0, 1.2, 50.0], [0, 0, 30.0, -30.0, 1.5, 40.0]])   # both front views
    before = t.denoise(x_t, tt, torch.tensor([0, 1]))
    f0 = fake.denoise(x_t, tt, cams)
    assert torch.equal(f0, fake.denoise(x_t, tt, cams[:, :2].long()))                 # zero-init: no camera term
    opt.train_step()
    assert any(not torch.equal(lora0[k], v) for k, v in fake.state_dict().items())   # the fake trained
    assert mlp[2].weight.abs().sum() > 0                                               # its camera MLP too
    assert torch.equal(t.denoise(x_t, tt, torch.tensor([0, 1])), before)              # the teacher did not
    f1 = fake.denoise(x_t, tt, cams)
    assert not torch.equal(f1, fake.denoise(x_t, tt, cams[:, :2].long()))             # the camera reaches it


def test_mnist_digit_recipe_renders_grey_views_conditioned_on_the_digit():
    from scoredistill.config import load_yaml
    from scoredistill.optimize import PriorOptimizer
    from scoredistill.optimize.config import resolve

    cfg = resolve(load_yaml(recipe("mnist_digit")), ["splats.count=30", "train.progress=false", "train.threads=1"])
    opt = PriorOptimizer(cfg, None)
    p = opt.param
    r = p.render(p.sample_index(None, opt.rng))
    assert r.x.shape == (4, 1, 28, 28) and r.x.requires_grad
    assert r.cond.tolist() == [3, 3, 3, 3] and r.view is not None          # the class on every view
    empty = p.to_teacher(p.backgrounds(1, None)[:, :, None, None].expand(1, 3, 28, 28))
    assert torch.equal(empty, torch.full((1, 1, 28, 28), -1.0))          # black background = MNIST's -1
