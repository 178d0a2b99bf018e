"""The staged and trajectory consistency objectives ``tcm``, ``tbcm`` and ``hypersd`` on exact Gaussian teachers.

Identities: TBCM's training pairs lie on the teacher's probability-flow ODE trajectory from noise (the exact,
closed-form flow of a Gaussian); Hyper-SD's loss vanishes for the exact map to each segment's start and switches
its segment count at the scheduled steps; TCM is CD in stage 1 and, in stage 2, reads the frozen stage-1 network
exactly at the dividing time, its target above it and trains a denoiser below it. The engine's ``stage_snapshot``
role is frozen at the switch, checkpointed and resumed bit-identically (TCM's stage switch, Hyper-SD's segment
switch). Bad values are one line naming the key."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import distill_toy, last_checkpoint_tensors
from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import Denoiser, expand_t
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.hypersd import segment_count, segment_start
from scoredistill.process import EDM
from scoredistill.teachers.gmm import GMMTeacher

pytestmark = pytest.mark.usefixtures("one_thread")

MU, STD = [1.0, -0.5], 0.3


def _teacher():
    return GMMTeacher([MU], STD, process=EDM())


def _flow(y, rho_from, rho_to):
    """The exact PF-ODE flow of N(MU, STD^2 I) in VE coordinates: ``(y - mu)/sqrt(s^2 + rho^2)`` is constant."""
    mu, s2 = torch.tensor(MU, dtype=torch.float64), STD ** 2
    col = lambda v: torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1)  # noqa: E731
    return mu + (y.double() - mu) * (s2 + col(rho_to) ** 2).sqrt() / (s2 + col(rho_from) ** 2).sqrt()


class Recorder(Denoiser):
    """A denoiser that records the ``(x, t)`` of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.process, self.data_shape = net, net.process, net.data_shape
        self.sigma_data = getattr(net, "sigma_data", 0.5)
        self.calls = []

    def denoise(self, x_t, t, cond=None):
        self.calls.append((x_t.detach().clone(), expand_t(t, len(x_t)).clone()))
        return self.net(x_t, t, cond)


def _student(seed=0):
    torch.manual_seed(seed)
    net = MLPDenoiser(EDM(), 2, 32, 2, sigma_data=0.5, emb_dim=16)
    torch.nn.init.normal_(net.net.out.weight, std=0.2)
    return net


def _call(obj, roles, step=0, n=48, seed=3):
    real = roles.teacher.sample(n, generator=torch.Generator().manual_seed(1))
    b = Batch(x=torch.zeros(n, 2), real=real, rng=torch.Generator().manual_seed(seed), step=step)
    return obj.generator_loss(b, roles)


# -- tbcm -------------------------------------------------------------------------------------------------------
# Heun on a 100-level grid vs the exact flow, max |x - x_exact| over all pairs: measured 0.86e-3..1.33e-3 over 3
# seeds (second-order convergence: 18 levels 4.4e-2, 40 levels 7.6e-3); forward-noised points at the same levels
# are >= 0.4 off the trajectory
TOL_TRAJ = 4e-3
LEVELS = 100


def test_tbcm_pairs_lie_on_the_teacher_ode_trajectory_from_noise():
    teacher, P, n = _teacher(), 4, 48
    obj = build_objective({"name": "tbcm", "points_per_trajectory": P, "levels": LEVELS})
    student, target = Recorder(_student()), Recorder(_student())
    out = _call(obj, Roles(teacher=teacher, student=student, target=target), n=n)
    assert int(out["tbcm/trajectories"]) == n // P
    z = torch.randn(n // P, 2, generator=torch.Generator().manual_seed(3))  # the objective's first draw
    rho_max = float(obj.levels(teacher.process, LEVELS)[-1])
    y_start = (rho_max * z).repeat_interleave(P, 0)  # sample i is on trajectory i // P
    p = teacher.process
    (x_hi, t_hi), (x_lo, t_lo) = student.calls[0], target.calls[0]
    assert bool((t_lo < t_hi).all())
    for x, t in ((x_hi, t_hi), (x_lo, t_lo)):
        exact = _flow(y_start, rho_max, p.rho(t)) * p.alpha(t).reshape(-1, 1)
        assert float((x.double() - exact).abs().max()) < TOL_TRAJ
    # the lower point is the teacher's ODE step from the upper one (the same trajectory, one level down)
    step = cc.teacher_ode_step(teacher, x_hi, t_hi, t_lo, "heun")
    assert torch.allclose(step, x_lo, atol=1e-6)
    # the check can fail: forward-noised data at the same levels is far off the trajectory
    real = teacher.sample(n, generator=torch.Generator().manual_seed(0))
    noised = p.add_noise(real, z.repeat_interleave(P, 0), t_hi)
    exact_hi = _flow(y_start, rho_max, p.rho(t_hi)) * p.alpha(t_hi).reshape(-1, 1)
    assert float((noised.double() - exact_hi).abs().max()) > 0.1


# -- hypersd ----------------------------------------------------------------------------------------------------
class SegmentMap(Denoiser):
    """The exact one-time network of Hyper-SD with ``k`` segments on the grid ``times`` for N(MU, STD^2 I): at a
    grid time ``t_i`` its DDIM jump lands on the exact flow at the start of the segment below ``t_i`` (the
    largest boundary ``< i``): ``D = (y_s - r y)/(1 - r)``, ``r = rho_s/rho_t``."""

    def __init__(self, times, k):
        super().__init__()
        self.process, self.data_shape, self.times, self.k = EDM(), (2,), times, k

    def denoise(self, x_t, t, cond=None):
        t = expand_t(t, len(x_t))
        i = (self.times[None, :] - t[:, None]).abs().argmin(1)
        s = segment_start((i - 1).clamp(min=0), self.k, len(self.times))
        rho_t, rho_s = self.process.rho(t), self.process.rho(self.times[s])
        y = x_t.double()
        r = (rho_s / rho_t).reshape(-1, 1)
        return ((_flow(y, rho_t, rho_s) - r * y) / (1 - r)).to(x_t.dtype)


def test_hypersd_schedule_and_segment_starts():
    assert [segment_count(s, [8, 4, 2, 1], 3) for s in (0, 2, 3, 5, 6, 8, 9, 100)] == [8, 8, 4, 4, 2, 2, 1, 1]
    n = torch.arange(17)
    for k in (1, 2, 4, 8, 17):
        s = segment_start(n, k, 18)
        bounds = [round(j * 17 / k) for j in range(k + 1)]
        nxt = torch.tensor([min(b for b in bounds if b > int(v)) for v in s])
        assert bool((s <= n).all() and (n + 1 <= nxt).all()), k  # the pair (n+1, n) lies inside its segment
    assert bool((segment_start(n, 1, 18) == 0).all()) and torch.equal(segment_start(n, 17, 18), n)


# hypersd loss on a 40-level grid, 3 seeds: the exact segment map <= 5.9e-8 (the teacher's Heun step error; 18
# levels: ~5e-6), the exact map of another segment count >= 1.8e-5
TOL_SEG, WRONG_SEG = 5e-7, 1e-5


def test_hypersd_target_is_the_segment_start_and_switches_on_schedule():
    """With the student and the target both the exact map to the start of each pair's segment, the loss
    vanishes; the exact map of another segment count does not -- before and after the scheduled switch."""
    teacher = _teacher()
    obj = build_objective({"name": "hypersd", "segments": [4, 2], "stage_steps": 5, "levels": 40})
    times = cc.level_times(teacher.process, obj.levels(teacher.process, 40))
    maps = {k: SegmentMap(times, k) for k in (4, 2)}

    def loss(k, step):
        out = _call(obj, Roles(teacher=teacher, student=maps[k], target=maps[k]), step=step, n=64)
        return float(out["loss"]), int(out["hypersd/segments"])

    assert loss(4, 4)[1] == 4 and loss(2, 5)[1] == 2
    assert loss(4, 4)[0] < TOL_SEG and loss(2, 5)[0] < TOL_SEG
    assert loss(2, 4)[0] > WRONG_SEG and loss(4, 5)[0] > WRONG_SEG


# -- tcm --------------------------------------------------------------------------------------------------------
def test_tcm_is_cd_in_stage_one_and_truncated_in_stage_two():
    teacher = _teacher()
    cfg = {"name": "tcm", "stage1_steps": 5, "rho_prime": 1.0}
    student = _student()
    roles = Roles(teacher=teacher, student=student, target=copy.deepcopy(student))
    cd = _call(build_objective({"name": "cd"}), roles, step=4)
    one = _call(build_objective(cfg), roles, step=4)
    assert int(one["tcm/stage"]) == 1 and torch.equal(one["loss"], cd["loss"])
    assert build_objective(cfg).snapshot_step() == 5 and "stage_snapshot" in build_objective(cfg).requirements()
    t_prime = float(EDM().t_from_rho(torch.tensor(1.0, dtype=torch.float64)))

    def stage2(**kw):
        rec = {k: Recorder(_student(seed)) for k, seed in (("student", 0), ("target", 1), ("snapshot", 2))}
        out = _call(build_objective({**cfg, **kw}), Roles(teacher=teacher, **rec), step=5, n=400)
        return out, {k: torch.cat([t for _, t in r.calls]) if r.calls else None for k, r in rec.items()}

    out, ts = stage2()
    assert int(out["tcm/stage"]) == 2
    assert abs(float(out["tcm/boundary_fraction"]) - 0.25) < 0.07
    assert abs(float(out["tcm/denoise_fraction"]) - 0.2) < 0.07
    # the frozen stage-1 network is read exactly at t', the target only above it; the student is trained on
    # both ranges (denoising below t', pairs above)
    assert torch.allclose(ts["snapshot"], torch.full_like(ts["snapshot"], t_prime))
    assert float(ts["target"].min()) > t_prime
    assert float(ts["student"].min()) < t_prime < float(ts["student"].max())
    # all boundary: only the snapshot gives targets; all denoising: neither does, every time below t'
    out, ts = stage2(boundary_fraction=1.0, denoise_fraction=0.0)
    assert ts["target"] is None and len(ts["snapshot"]) == 400
    out, ts = stage2(boundary_fraction=0.0, denoise_fraction=1.0)
    assert ts["target"] is None and ts["snapshot"] is None and float(ts["student"].max()) < t_prime
    # the denoising term is the x0 regression of the student
    student = _student()
    obj = build_objective({**cfg, "boundary_fraction": 0.0, "denoise_fraction": 1.0, "denoise_weight": 2.0})
    rec = Recorder(student)
    out = _call(obj, Roles(teacher=teacher, student=rec, target=student, snapshot=student), step=5)
    real = teacher.sample(48, generator=torch.Generator().manual_seed(1))
    x_t, t = rec.calls[0]
    mse = (student(x_t, t).double() - real.double()).pow(2).mean()
    assert torch.allclose(out["loss"], 2.0 * mse)


@pytest.mark.parametrize("cfg,field", [
    ({"name": "tcm", "rho_prime": 100.0}, "objective.rho_prime"),
    ({"name": "tcm", "boundary_fraction": 0.9, "denoise_fraction": 0.2}, "objective.denoise_fraction"),
    ({"name": "tbcm", "points_per_trajectory": 0}, "objective.points_per_trajectory"),
    ({"name": "hypersd", "segments": [32, 1]}, "objective.segments"),
    ({"name": "hypersd", "segments": [4, 0]}, "objective.segments"),
])
def test_bad_input_is_one_line(cfg, field):
    with pytest.raises(ConfigError) as e:
        build_objective(cfg)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


# -- the engine: the stage snapshot, checkpoint and resume across the switch --------------------------------------


def _role(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name,extra", [("tcm", ["objective.stage1_steps=2"]),
                                        ("hypersd", ["objective.segments=[4,2]", "objective.stage_steps=3"])])
def test_resume_across_the_switch_is_bit_identical(name, extra, tmp_path):
    """4 iterations straight and 2 + resume to 4 give the same checkpoint, snapshot included. TCM switches at
    step 2: its snapshot is the student of the checkpoint at step 2 (after 2 updates), restored on resume and
    frozen from there on; Hyper-SD switches from 4 to 2 segments at step 3, after the resume."""
    distill_toy(name, tmp_path / "full", 4, extra=extra)
    distill_toy(name, tmp_path / "part", 2, extra=extra)
    at2 = last_checkpoint_tensors(tmp_path / "part")
    distill_toy(name, tmp_path / "part", 4, resume=True, extra=extra)
    a, b = last_checkpoint_tensors(tmp_path / "full"), last_checkpoint_tensors(tmp_path / "part")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    snap = _role(a, "model/snapshot/model.")
    assert bool(snap) == (name == "tcm")
    if snap:
        gen2, gen = _role(at2, "model/generator/denoiser."), _role(a, "model/generator/denoiser.")
        assert set(snap) == set(gen2) and all(torch.equal(snap[k], gen2[k]) for k in snap)
        assert not all(torch.equal(snap[k], gen[k]) for k in snap)
