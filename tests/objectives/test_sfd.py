"""SFD specifics (docs/objectives/sfd.md): forget term = SiD with the teacher at the override class and the fake at the
forget class; sign, stop-gradients (SiD-type: through both networks, only omega detached), CFG,
fake-loss weighting, requirements."""

from __future__ import annotations

import pytest
import torch

from helpers import repro
from scoredistill.config import ConfigError
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.process import EDM
from scoredistill.teachers.gmm import GMMTeacher, build_gmm

# teacher classes 0, 1, 2 at three separate points
MEANS = [[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


def _point_mass_grad(theta0, cond, cfg):
    """Gradient of one SFD generator loss for a point-mass generator G(z, c) = theta (all classes),
    with the generator's exact (per-class) fake score."""
    theta = torch.tensor(theta0, requires_grad=True)
    teacher = GMMTeacher(MEANS, 0.05, classes=[0, 1, 2])
    fake = GMMTeacher([theta0] * 3, 0.05, classes=[0, 1, 2])
    obj = build_objective({"name": "sfd", "alpha": 1.0, **cfg})
    n = len(cond)
    x = theta.expand(n, 2)
    out = obj.generator_loss(Batch(x=x, cond=cond, z=torch.zeros(n, 2), rng=_rng()),
                             Roles(teacher=teacher, fake=fake, generator=lambda z, c: theta.expand(len(z), 2)))
    (g,) = torch.autograd.grad(out["loss"], theta)
    return g, out


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_remain_and_forget_terms_move_point_mass_toward_target():
    # remaining class 0 targets (0,0); forget class 1 is overridden by class 0: both pull theta to 0
    cond = torch.tensor([0, 1] * 32)
    g, _ = _point_mass_grad([1.0, -0.5], cond, {"forget_class": 1, "override_class": 0, "forget_weight": 1.0})
    assert _cos(g, torch.tensor([1.0, -0.5])) > 0.99, g


def test_forget_term_targets_the_override_class_not_the_forget_class():
    """theta sits on the forget class's mode (3, 0): the forget term must push it toward the override
    class's mode (0, 3), i.e. gradient descent direction (0,3) - (3,0)."""
    cond = torch.full((64,), 1)  # every batch sample is of the forget class: only the forget term acts
    g, out = _point_mass_grad([3.0, 0.0], cond, {"forget_class": 1, "override_class": 2, "forget_weight": 1.0})
    assert float(out["loss_sid"]) == 0.0
    assert _cos(-g, torch.tensor([-3.0, 3.0])) > 0.99, g
    # with override_class = forget class the term would vanish; sanity: remain-only on the same mode is ~0
    g0, _ = _point_mass_grad([3.0, 0.0], cond, {"forget_class": 1, "override_class": 2, "forget_weight": 0.0})
    assert float(g0.norm()) == 0.0


def test_random_override_labels_avoid_the_forget_class():
    obj = build_objective({"name": "sfd", "forget_class": 2, "override_class": None})
    c = obj.override_labels(torch.full((4000,), 2), 4, _rng(1))
    assert set(c.tolist()) == {0, 1, 3}


def _mlp_roles():
    proc = EDM()
    teacher = MLPDenoiser(proc, 2, 32, 2, num_classes=3)
    fake = MLPDenoiser(proc, 2, 32, 2, num_classes=3)
    for m in (teacher, fake):
        torch.nn.init.normal_(m.net.out.weight, std=0.2)
    return teacher, fake


def test_forget_term_backpropagates_through_both_networks_and_detaches_only_omega():
    teacher, fake = _mlp_roles()
    g = _rng(2)
    x = torch.randn(32, 2, generator=g, requires_grad=True)
    t = torch.rand(32, generator=g, dtype=torch.float64) * 0.8
    noise = torch.randn(32, 2, generator=g)
    c_f, c_o = torch.full((32,), 1), torch.full((32,), 2)
    alpha = 1.2
    obj = build_objective({"name": "sfd", "alpha": alpha, "forget_class": 1, "override_class": 2})
    loss = obj.forget_loss(x, c_f, c_o, t, noise, Roles(teacher=teacher, fake=fake), step=0)[0].mean()
    params = list(teacher.parameters()) + list(fake.parameters())
    grads = torch.autograd.grad(loss, [x] + params, allow_unused=True)
    assert all(gr is not None for gr in grads), "SiD-type losses backpropagate through both networks"

    def ref(teacher_cond=c_o, detach_omega=True):
        x_t = teacher.process.add_noise(x, noise, t)
        fr, ff = teacher(x_t, t, teacher_cond), fake(x_t, t, c_f)
        om = (x - fr).abs().mean(1, keepdim=True).clamp(min=1e-5)
        om = om.detach() if detach_omega else om
        return (((fr - ff) * ((fr - x) - alpha * (fr - ff))) / om).mean()

    g_obj = grads[0]
    torch.testing.assert_close(g_obj, torch.autograd.grad(ref(), x)[0], rtol=1e-5, atol=1e-7)
    for variant in ({"detach_omega": False}, {"teacher_cond": c_f}):
        gv = torch.autograd.grad(ref(**variant), x)[0]
        assert (gv - g_obj).abs().max() > 1e-3 * g_obj.abs().max(), variant


def test_forget_class_samples_stay_out_of_the_remain_term():
    teacher = build_gmm({"preset": "ring8_cond"}, EDM())
    fake = GMMTeacher(teacher.means * 0.8, 0.5, classes=[0, 1, 2, 3, 0, 1, 2, 3])
    g = _rng(3)
    x = torch.randn(64, 2, generator=g)
    cond = torch.randint(0, 4, (64,), generator=g)
    z = torch.randn(64, 2, generator=g)
    gen = lambda z, c: z * 1.5 + c[:, None].float()  # noqa: E731  (a label-dependent "generator")
    obj = build_objective({"name": "sfd", "guidance_scale": 3.0, "alpha": 1.0, "forget_weight": 1.0})
    xx = x.clone().requires_grad_(True)
    out = obj.generator_loss(Batch(x=xx, cond=cond, z=z, rng=_rng(4)), Roles(teacher=teacher, fake=fake, generator=gen))
    grad = torch.autograd.grad(out["loss"], xx)[0]
    assert torch.isfinite(out["loss_forget"])
    assert float(grad[cond == 0].abs().max()) == 0.0 and float(grad[cond != 0].abs().max()) > 0


def test_fake_loss_is_remain_plus_weighted_forget():
    _, fake = _mlp_roles()
    teacher = build_gmm({"preset": "ring8_cond"}, EDM())
    cond = torch.tensor([0, 1, 2, 3] * 8)
    x = torch.randn(32, 2)
    for w in (0.01, 0.5):
        obj = build_objective({"name": "sfd", "fake_forget_weight": w, "forget_class": 0, "override_class": 1})
        out = obj.auxiliary_losses(Batch(x=x, cond=cond, z=torch.randn(32, 2), rng=_rng(5)),
                                   Roles(teacher=teacher, fake=fake, generator=lambda z, c: z))
        expect = float(out["loss_fake"] + w * out["loss_fake_forget"])
        assert float(out["loss"].detach()) == pytest.approx(expect, rel=1e-6)
        gx = torch.autograd.grad(out["loss"], list(fake.parameters()), allow_unused=True)
        assert any(g is not None for g in gx)


@pytest.mark.parametrize("cfg,field", [
    ({"name": "sfd", "forget_class": 1, "override_class": 1}, "objective.override_class"),
    ({"name": "sfd", "forget_class": -1}, "objective.forget_class"),
    ({"name": "sfd", "forget_weight": -0.1}, "objective.forget_weight"),
])
def test_bad_config(cfg, field):
    with pytest.raises(ConfigError) as e:
        build_objective(cfg)
    assert e.value.field == field


def test_label_out_of_range_is_a_config_error():
    teacher = build_gmm({"preset": "ring8_cond"}, EDM())
    obj = build_objective({"name": "sfd", "forget_class": 0, "override_class": 7})
    with pytest.raises(ConfigError) as e:
        obj.generator_loss(Batch(x=torch.randn(8, 2), cond=torch.zeros(8, dtype=torch.long), z=torch.randn(8, 2)),
                           Roles(teacher=teacher, fake=teacher, generator=lambda z, c: z))
    assert e.value.field == "objective.override_class"


def test_unconditional_teacher_fails_before_training_one_line(tmp_path, capsys):
    from scoredistill.cli.main import main

    assert build_objective({"name": "sfd"}).requirements() == {"fake_score", "class_conditional"}
    with pytest.raises(SystemExit) as e:
        main(["distill", "recipes/toy/sfd.yaml", "--out", str(tmp_path / "r"), "--set", "teacher.preset=ring8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class-conditional" in err[0], err
    assert not (tmp_path / "r" / "checkpoints").exists()


# -- distribution (slow) ------------------------------------------------------------------------------------
SFD_SLOW = ["generator.width=128", "fake_score.width=128", "train.batch_size=128", "train.steps=600",
            "eval.every=600", "train.progress=false", "eval.plots=false", "train.checkpoint_every=1000000"]


def sfd_figures(d, res, n=500):
    """Every figure the distribution test asserts: the share of class 0's samples on the override class's
    modes 1/5 (``forgot``) and on its own modes 0/4 (``leaked``), and each other class's share on its own."""
    from scoredistill.metrics.gmm import assign

    share = {}
    for c in range(4):
        z = torch.randn(n, 2, generator=torch.Generator().manual_seed(100 + c))
        k, ok = assign(d.sample(z, torch.full((n,), c)), d.reference.means, d.reference.stds)
        share[c] = {m: float((k[ok] == m).double().sum()) / n for m in range(8)}
    return {**{k: res[k] for k in ("precision", "modes_covered", "weight_tv", "non_finite")},
            "forgot": share[0][1] + share[0][5], "leaked": share[0][0] + share[0][4],
            "own": {c: share[c][c] + share[c][c + 4] for c in (1, 2, 3)}}


@pytest.mark.slow
def test_sfd_forgets_class_on_ring8_cond(tmp_path):
    """The recipe (forget class 0 = modes 0, 4; override class 1 = modes 1, 5; forget weights 0.01):
    class-0 samples move to modes 1 and 5, the other classes stay on their own modes.

    Measured 2026-11-26 (width 128, batch 128, 800 iterations): class 0 -> 0.972 of its samples on
    modes 1/5, 0.0 on modes 0/4; classes 1-3 0.98-1.00 on their own modes. With 400 iterations: 0.384
    arrived (0.0 leaked) at forget weights 0.01, 0.974 at 0.1.

    Seed sweep 2026-12-01 (``sfd_figures``, train.seed=S, 1 thread), at 600 iterations (the budget here,
    cut from 800): class 0 -> 0.962 / 0.974 / 0.976 / 0.980 on modes 1/5 (seeds 0-3), 0.0 / 0.0 / 0.002 /
    0.0 leaked to 0/4, the other classes' lowest share on their own modes 0.988 / 0.980 / 0.986 / 0.986.
    At 800: 0.992 / 0.978 / 0.982 arrived, leaked at most 0.006. Seed 0 on 2 threads (as here), 600
    iterations: 0.964 arrived, 0.0 leaked, lowest own share 0.986."""
    from scoredistill.config import load_yaml, resolve
    from scoredistill.engine.distiller import Distiller

    cfg = resolve(load_yaml("recipes/toy/sfd.yaml"), SFD_SLOW)
    d = Distiller(cfg, str(tmp_path))
    f = sfd_figures(d, d.run())
    msg = repro(cfg, f)
    print("sfd ring8_cond:", msg)
    assert f["non_finite"] == 0, msg
    assert f["forgot"] > 0.85 and f["leaked"] < 0.02, msg
    assert all(v > 0.9 for v in f["own"].values()), msg
