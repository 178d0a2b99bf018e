"""``ect``: continuous-time consistency training with a shrinking gap (ECT, arXiv 2406.14548).

The pair construction (one shared noise draw, ``r < t``, ``r -> t`` as the stage grows, exact values of the
mapping for hand-computed cases and of the drawn levels), the loss (the pseudo-Huber / L2-norm distance weighted
by ``1/(rho_t - rho_r)``, the clean sample as the target below ``rho_min``), the stop-gradient on the target
(the student as its own target gets the same gradient), one-line errors, and the engine's target reset at the
end of teacher score matching (``generator.init_steps``, ECT's start from a pretrained model). The schedule is a
function of the step (no running state; the contract suite checks the empty state round trip)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers import distill_toy, run_main
from scoredistill.engine.io import list_checkpoints, read_checkpoint
from scoredistill.errors import ConfigError
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.objectives import consistency_core as cc
from scoredistill.process import EDM, VPDiscrete
from scoredistill.teachers.gmm import GMMTeacher

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mapping_exact_values_and_the_gap_shrinks_by_q_per_stage():
    """``r = max(0, t (1 - q^-(s+1) (1 + k sigmoid(-b t))))``, hand-computed with q = 2, k = 8, b = 1."""
    rho = torch.tensor([1.0, 1.0, 4.0, 80.0, 0.5], dtype=torch.float64)
    stage_of = [0, 2, 1, 0, 3]
    got = torch.stack([cc.ect_rho_r(rho[i:i + 1], s)[0] for i, s in enumerate(stage_of)])
    # 1 + 8 sigmoid(-1) = 3.1515: at stage 0 the gap is 1.58 t, so r = 0 (a denoising pair); at stage 2 it is 0.39 t
    want = torch.tensor([0.0, 0.6060585786300049, 2.8561103203032676, 40.0, 0.3743648328004636], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    t = torch.logspace(-3, 2, 60, dtype=torch.float64)
    gaps = [(t - cc.ect_rho_r(t, s)) / t for s in range(10)]
    for s in range(10):
        assert (gaps[s] > 0).all() and (gaps[s] <= 1).all()  # 0 <= r < t
    for s in range(2, 9):  # once r > 0 everywhere, each stage halves the gap exactly
        assert torch.allclose(gaps[s + 1], gaps[s] / 2, rtol=1e-12)
    assert float(gaps[9].max()) < 5 / 2**10 + 1e-15  # dt -> 0: (1 + k/2) / q^(stage+1)


def _real(n=64, seed=1):
    return GMMTeacher([[1.0, -0.5], [-1.0, 0.5]], 0.3).sample(n, generator=torch.Generator().manual_seed(seed))


def _student(process, seed=0):
    torch.manual_seed(seed)
    net = MLPDenoiser(process, 2, 32, 2, sigma_data=0.5, emb_dim=16)
    torch.nn.init.normal_(net.net.out.weight, std=0.2)
    return net


@pytest.mark.parametrize("process", [EDM(), VPDiscrete()], ids=lambda p: p.name)
def test_pairs_share_one_noise_draw_and_follow_the_stage(process):
    """Both points of a pair are ``a (x0 + rho eps)`` with the same ``eps`` (the micro-batch's first draw), the
    levels are the next draw ``exp(P_mean + P_std z)`` exactly, ``r < t``, and the mean gap shrinks with the stage
    while the share of pairs whose lower point is the clean sample falls."""
    obj = build_objective({"name": "ect", "stage_steps": 10})
    student = _student(process)
    roles = Roles(teacher=student, student=student, target=copy.deepcopy(student))
    real, seed, lo = _real(), 5, max(0.002, process.rho_min)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(real.shape, generator=g)
    rho_want = (-1.1 + 2.0 * torch.randn(len(real), generator=g, dtype=torch.float64)).exp().clamp(lo, 80.0)
    gaps, bound = [], []
    for step in (0, 10, 25, 60):
        b = Batch(x=real, real=real, rng=torch.Generator().manual_seed(seed), step=step)
        *_, pr = obj.pairs(b, roles)
        assert pr.stage == step // 10
        assert torch.allclose(pr.rho_t, rho_want, rtol=1e-12)
        assert (pr.rho_r < pr.rho_t).all() and (pr.rho_r >= 0).all()
        assert torch.equal(pr.boundary, pr.rho_r < lo)
        for x, t, rho in ((pr.x_t, pr.t, pr.rho_t), (pr.x_r, pr.r, pr.rho_r.clamp(min=lo))):
            a = process.alpha(t)[:, None]
            assert torch.allclose(process.rho(t), rho, rtol=1e-6)
            assert torch.allclose(x.double(), a * (real.double() + rho[:, None] * eps.double()), atol=2e-5)
        gaps.append(float(((pr.rho_t - pr.rho_r) / pr.rho_t).mean()))
        bound.append(float(pr.boundary.double().mean()))
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] and gaps[3] < 0.15 * gaps[1]
    assert bound[0] > 0.3 and bound[0] >= bound[1] >= bound[2] >= bound[3] and bound[3] < bound[0] / 2


class Affine(GMMTeacher):
    """An analytic denoiser with a known, clearly wrong output: ``D(x_t, t) = 0.5 x_t + 0.3``."""

    def denoise(self, x_t, t, cond=None):
        return 0.5 * x_t + 0.3


@pytest.mark.parametrize("c", [0.0, 0.05])
def test_loss_is_the_distance_weighted_by_one_over_the_gap_with_x0_at_the_boundary(c):
    p = EDM()
    student, target = GMMTeacher([[1.0, 0.0]], 0.2, process=p), Affine([[0.0, 0.0]], 1.0, process=p)
    roles = Roles(teacher=student, student=student, target=target)
    obj = build_objective({"name": "ect", "stage_steps": 10, "huber_c": c})
    real = _real()
    for step in (0, 30):  # stage 0: many boundary pairs; stage 3: none here
        def b(step=step):
            return Batch(x=real, real=real, rng=torch.Generator().manual_seed(2), step=step)

        _, _, x0, _, pr = obj.pairs(b(), roles)
        tgt = torch.where(pr.boundary[:, None], x0, target(pr.x_r, pr.r)).double()
        res = (student(pr.x_t, pr.t).double() - tgt).norm(dim=1)
        d = (res**2 + c * c).sqrt() - c
        want = (d / (pr.rho_t - pr.rho_r)).mean()
        out = obj.generator_loss(b(), roles)
        assert torch.allclose(out["loss"], want, rtol=1e-10), (step, float(out["loss"]), float(want))
        if step > 0:
            continue
        assert 0 < float(out["ect/boundary_fraction"]) < 1
        # the boundary rows really take x0: the target network's output there would change the loss
        wrong = (student(pr.x_t, pr.t).double() - target(pr.x_r, pr.r).double()).norm(dim=1)
        alt = ((((wrong**2 + c * c).sqrt() - c) / (pr.rho_t - pr.rho_r)).mean())
        assert abs(float(alt - want)) > 1e-3 * float(want)


def test_target_is_a_stop_gradient_of_the_student():
    """With the student as its own target (the same module, the exact sg(theta)) the gradient is the one with a
    frozen copy: nothing flows through the target branch. Without the stop-gradient it would differ."""
    p = EDM()
    student = _student(p)
    real = _real()
    obj = build_objective({"name": "ect", "stage_steps": 10})

    def grad(target, step=30, detach=True):
        b = Batch(x=real, real=real, rng=torch.Generator().manual_seed(3), step=step)
        student.zero_grad()
        if detach:
            loss = obj.generator_loss(b, Roles(teacher=student, student=student, target=target))["loss"]
        else:  # the same loss with the target on the graph, to show the check can fail
            _, _, x0, _, pr = obj.pairs(b, Roles(teacher=student, student=student, target=target))
            tgt = torch.where(pr.boundary[:, None], x0, target(pr.x_r, pr.r))
            d = cc.pseudo_huber(student(pr.x_t, pr.t).double(), tgt.double(), 0.0)
            loss = (d / (pr.rho_t - pr.rho_r)).mean()
        loss.backward()
        return torch.cat([q.grad.reshape(-1) for q in student.parameters()])

    g_self, g_copy = grad(student), grad(copy.deepcopy(student).requires_grad_(False))
    assert torch.equal(g_self, g_copy)
    g_through = grad(student, detach=False)
    assert float((g_through - g_copy).norm()) > 1e-3 * float(g_copy.norm())


@pytest.mark.parametrize("key,value", [("q", 1.0), ("q", math.inf), ("k", -1.0), ("b", 0.0), ("stage_steps", 0),
                                       ("huber_c", -0.1), ("p_std", 0.0), ("p_mean", math.nan),
                                       ("rho_min", 100.0)])
def test_bad_schedule_keys_are_one_line(key, value):
    with pytest.raises(ConfigError) as e:
        build_objective({"name": "ect", key: value})
    msg = str(e.value)
    assert msg.startswith(f"objective.{key}") and "\n" not in msg, msg


def test_bad_schedule_key_exits_2_with_one_line_before_writing(tmp_path, capsys):
    code, err = run_main(["distill", "recipes/toy/ect.yaml", "--out", str(tmp_path / "r"), "--set", "objective.q=0.5",
                          "--set", "train.progress=false"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "objective.q: " in lines[0] and "> 1" in lines[0], lines
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def _role(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_target_starts_from_the_initialised_student(tmp_path):
    """After 2 iterations of teacher score matching, the first ECT step reads a target equal to the initialised
    student: with ``target_ema: 0.5`` the target after that step is the mean of the student before and after it
    (it would hold half of the untrained student otherwise)."""
    extra = ["generator.init_steps=2", "objective.target_ema=0.5", "train.checkpoint_every=1"]
    distill_toy("ect", tmp_path / "a", 3, extra=extra)
    at2, at3 = (read_checkpoint(c)[0] for c in list_checkpoints(str(tmp_path / "a"))[-2:])
    before = _role(at2, "model/generator/denoiser.")
    gen, tgt = _role(at3, "model/generator/denoiser."), _role(at3, "model/target/model.")
    assert set(gen) == set(tgt) == set(before)
    assert not all(torch.equal(gen[k], before[k]) for k in gen)
    for k in gen:
        assert torch.allclose(tgt[k], 0.5 * (before[k] + gen[k]), atol=1e-6), k


def test_l2_norm_distance_is_finite_at_a_zero_residual():
    """``c = 0`` is the L2 norm; at ``a = b`` its value is 0 and its gradient finite (no 0/0)."""
    a = torch.tensor([[0.3, -0.4], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    d = cc.pseudo_huber(a, b, 0.0)
    assert torch.allclose(d, torch.tensor([0.5, 0.0], dtype=torch.float64), atol=1e-150)
    d.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.allclose(a.grad[0], torch.tensor([0.6, -0.8], dtype=torch.float64))
