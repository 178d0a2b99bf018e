"""TwinFlow: an any-step flow map trained with a self-adversarial twin trajectory (arXiv 2512.05150;
docs/objectives/twinflow.md).

In the VE coordinates of any process (``y = x_t/a_t = x0 + rho eps``, PF-ODE ``dy/drho = V``) the student is a
flow map ``U_theta(y, t -> r) = (y - D_theta(x_t, t, cond, r))/rho_t``, the average velocity of the jump to
``r`` (``y_r = y - (rho_t - rho_r) U``); it is the two-time denoiser of MeanFlow with signed times
(requirements ``two_time_student`` and ``signed_time_student``): at negative times the same network is the
flow of its *own* one-step samples (the "fake" trajectory). The batch is split into four equal parts:

* ``e2e``: ``t = t_max -> r = t_min`` (the one-step jump); ``mul``: ``r = t - u t m`` (``m = mul_frac``, a short
  jump); ``any``: ``r = t - u t`` (``u ~ U[0, 1)``, any jump); their target is the recursive consistency
  target: one Euler step of the ODE with the teacher's velocity ``V`` to ``t_m = max(t - delta, r)``, then
  ``N = rcgm_steps`` jumps of the target network ``U^-`` to ``r`` (displacement ``d``), and

      res = ((rho_t - rho_r) U_theta - d - (rho_t - rho_m) V)/(rho_t - rho_m),   target = sg(U_theta - clamp(res))

  (``res = U_theta - V``, flow matching, when ``t - r <= delta``);
* ``adv``: data replaced by detached one-step samples ``x_fake`` of the student, times negated, flow-matching
  target ``eps`` (the velocity of ``y = x_fake + rho eps``) at ``r = t``.

Self-adversarial term on the ``e2e`` part: re-noise its one-step samples at a fresh ``t'`` and, with no
gradient, ``dF = clamp(U_theta(y', -t' -> -t') - U_theta(y', t' -> t'))`` (fake-branch minus real-branch velocity
of the same network); loss ``l(U_e2e, sg(U_e2e - dF))`` times ``dm_weight``. ``l`` is the Barron-reweighted L2
``mse w/c`` with the detached ``w = ((mse/c^2)/|alpha - 2| + 1)^((alpha - 2)/2)``, times the time weight
``tan((1 - (|t| - |r|)) pi/2.5) + 1`` (1 for ``adv``). ``V`` is the teacher's (guided) PF-ODE velocity
(``velocity: teacher``, distillation) or ``eps`` (``data``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scoredistill.errors import ConfigError
from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.base import register
from scoredistill.objectives.consistency import ConsistencyObjective, ConsistencyParams, check_ranges, check_velocity
from scoredistill.process.time import Uniform

PARTS = ("e2e", "mul", "any", "adv")


@dataclass
class TwinFlowParams(ConsistencyParams):
    velocity: str = "teacher"   # teacher: distillation (teacher PF-ODE velocity); data: TwinFlow from data
    dm_weight: float = 0.5      # weight of the self-adversarial term (the paper's dist_match_cof)
    rcgm_delta: float = 0.01    # canonical-time Euler step of the recursive target
    rcgm_steps: int = 2         # target-network jumps from t_m to r (the paper's estimate_order)
    mul_frac: float = 0.05      # mul pairs jump at most this fraction of t
    clamp: float = 1.0          # bound on the target correction and on dF
    barron_alpha: float = 1.0
    barron_c: float = 1e-3
    target_ema_ramp: bool = False  # the paper's adaptive target EMA: the rate ramps from 0 up to target_ema

    def validate(self):
        super().validate()
        if self.target_ema_ramp and self.target_ema == 0:
            raise ConfigError("objective.target_ema_ramp", "ramps the target's EMA rate up to objective.target_ema, "
                              "which is 0 (an exact copy); set target_ema (the paper: 0.99) or leave the ramp off")
        check_velocity(self)
        checks = {"dm_weight": (self.dm_weight >= 0, ">= 0"), "rcgm_delta": (0 < self.rcgm_delta < 1, "in (0, 1)"),
                  "rcgm_steps": (self.rcgm_steps >= 1, ">= 1"), "mul_frac": (0 < self.mul_frac <= 1, "in (0, 1]"),
                  "clamp": (self.clamp > 0, "> 0"), "barron_c": (self.barron_c > 0, "> 0")}
        check_ranges(self, checks)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def flow_velocity(net, y: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None, cond=None) -> torch.Tensor:
    """``U(y, t -> r) = (y - D(a_|t| y, t, cond, r))/rho_|t|`` in float64; negative ``t``, ``r``: the twin branch."""
    p = net.process
    ta = t.abs()
    x = (_col(p.alpha(ta), y) * y).to(cc.param_dtype(net) or torch.float64)
    return (y - net.denoise(x, t, cond, r=r).double()) / _col(p.rho(ta), y)


def barron_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, c: float = 1e-3) -> torch.Tensor:
    """Per-sample Barron-reweighted L2: ``mse w / c`` with the detached ``w = ((mse/c^2)/|alpha-2| + 1)^((alpha-2)/2)``
    (``alpha = 2``: plain ``mse / c``)."""
    mse = (pred - target).reshape(len(pred), -1).pow(2).mean(1)
    if abs(alpha - 2.0) < 1e-12:
        return mse / c
    w = ((mse.detach() / c ** 2) / abs(alpha - 2.0) + 1.0) ** ((alpha - 2.0) / 2.0)
    return mse * w / c


def part_slices(n: int) -> dict[str, slice]:
    """Four contiguous, (nearly) equal parts of a batch of ``n`` (the last takes the remainder)."""
    lens = [int(round(n / 4))] * 3
    lens.append(n - sum(lens))
    out, cur = {}, 0
    for k, m in zip(PARTS, lens):
        out[k] = slice(cur, cur + m)
        cur += m
    return out


def rcgm_target(target_net, u_theta, v, y, t, r, delta: float, steps: int, clamp: float, cond=None):
    """``(target, res)`` of the recursive consistency target (module docstring) for positive ``t > r``."""
    p = target_net.process
    t_m = torch.maximum(t - delta, r)
    rho_t, rho_m, rho_r = p.rho(t), p.rho(t_m), p.rho(r)
    y_c = y - _col(rho_t - rho_m, y) * v
    disp = torch.zeros_like(y)
    for i in range(steps):
        tc, tn = t_m + (r - t_m) * (i / steps), t_m + (r - t_m) * ((i + 1) / steps)
        jump = _col(p.rho(tc) - p.rho(tn), y) * flow_velocity(target_net, y_c, tc, tn, cond)
        disp, y_c = disp + jump, y_c - jump
    u = u_theta.detach()
    gap = rho_t - rho_m
    safe = torch.where(gap > 0, gap, torch.ones_like(gap))
    res = (_col(rho_t - rho_r, y) * u - disp - _col(gap, y) * v) / _col(safe, y)
    res = torch.where(_col(gap > 0, y), res, u - v)
    return u - res.clamp(-clamp, clamp), res


@register
class TwinFlow(ConsistencyObjective):
    """The engine's target copy supplies the recursive target's jumps; the adversarial branch is the student's."""

    name = "twinflow"
    Params = TwinFlowParams
    # the paper's t ~ Beta(1, 1) over the whole range
    default_time = Uniform(t_min=0.0, t_max=1.0)

    def requirements(self) -> set[str]:
        return super().requirements() | {"two_time_student", "signed_time_student"}

    def target_decay(self, step: int = 0) -> float:
        """``target_ema``, or with ``target_ema_ramp`` the paper's adaptive rate (arXiv 2512.05150): ``m_0 = 0``,
        ``m_{n+1} = m_n + (1 - m_n)(m* - m_n)/2`` with ``m* = target_ema`` -- an exact copy at the first update,
        then a rate that closes its gap to ``m*`` by a factor ``(1 + m_n)/2`` per iteration (half the gap at first,
        ~0.5 % of it per iteration near ``m* = 0.99``), so the target follows a fast-moving fresh student early."""
        if not self.p.target_ema_ramp:
            return float(self.p.target_ema)
        ramp = self.__dict__.setdefault("_ramp", [0.0])
        goal = float(self.p.target_ema)
        while len(ramp) <= step and ramp[-1] != goal:
            m = ramp[-1]
            # within 1e-12 of m* the float recurrence stalls a few ulps short of it: take m* from there on
            ramp.append(goal if goal - m <= 1e-12 else m + (1.0 - m) * (goal - m) * 0.5)
        return ramp[step] if step < len(ramp) else goal

    def generator_loss(self, batch, roles):
        student, target, x0, cond, eps = self.inputs(batch, roles)
        if not getattr(student, "signed_time", False):
            raise ConfigError("generator.kind", "twinflow needs a signed-time two-time student D(x_t, t, cond, r); "
                              "accepted: kind mlp with generator.steps >= 1 (built signed for this objective)")
        n = len(x0)
        if n < 4:
            raise ConfigError("train.batch_size", f"twinflow splits the batch into 4 parts; need >= 4, got {n}")
        teacher, p, P = roles.teacher, roles.teacher.process, self.p
        sl, dev, g = part_slices(n), x0.device, batch.rng
        t = self.sample_t(batch, p).double()
        u = torch.rand(n, generator=g, dtype=torch.float64).to(dev)
        r = t - u * t
        r[sl["mul"]] = t[sl["mul"]] - u[sl["mul"]] * t[sl["mul"]] * P.mul_frac
        t[sl["e2e"]], r[sl["e2e"]] = p.t_max, p.t_min
        r = r.clamp(min=p.t_min)
        r[sl["adv"]] = t[sl["adv"]]
        x0, c_adv = x0.clone(), None if cond is None else cond[sl["adv"]]
        with torch.no_grad():  # the twin trajectory's data: the student's own one-step samples, detached
            z = torch.randn(x0[sl["adv"]].shape, generator=g, dtype=x0.dtype).to(dev)
            t_top = torch.full((len(z),), p.t_max, dtype=torch.float64, device=dev)
            x_in = _col(p.sigma(t_top), z).to(z.dtype) * z
            x0[sl["adv"]] = student.denoise(x_in.to(cc.param_dtype(student) or z.dtype), t_top, c_adv).to(x0.dtype)
        x_t = p.add_noise(x0, eps, t).to(x0.dtype)
        y = x_t.double() / _col(p.alpha(t), x0)
        sign = torch.ones_like(t)
        sign[sl["adv"]] = -1.0
        u_theta = flow_velocity(student, y, sign * t, sign * r, cond)

        real = slice(0, sl["adv"].start)
        with torch.no_grad():
            if P.velocity == "teacher":
                c_r = None if cond is None else cond[real]
                d = teacher.guided(x_t[real], t[real], c_r, P.guidance_scale).double()
                v = (y[real] - d) / _col(p.rho(t[real]), y[real])
            else:
                v = eps[real].double()
            tgt, res = rcgm_target(target, u_theta[real], v, y[real], t[real], r[real], P.rcgm_delta, P.rcgm_steps,
                                   P.clamp, None if cond is None else cond[real])
        full_target = torch.cat([tgt, eps[sl["adv"]].double()])
        w = torch.tan((1 - (t - r)) * math.pi / 2.5) + 1
        w[sl["adv"]] = 1.0
        per = barron_loss(u_theta, full_target, P.barron_alpha, P.barron_c) * w
        out = {"twinflow/adv_mse": (u_theta[sl["adv"]] - full_target[sl["adv"]]).pow(2).mean().detach()}
        for k in ("e2e", "mul", "any"):
            out[f"twinflow/res_{k}"] = res[sl[k]].abs().mean()
        loss = per.mean()
        if P.dm_weight > 0:
            dm, df = self._dist_match(student, u_theta[sl["e2e"]], y[sl["e2e"]], t[sl["e2e"]], r[sl["e2e"]],
                                      None if cond is None else cond[sl["e2e"]], batch)
            loss = loss + P.dm_weight * dm
            out["twinflow/dm"], out["twinflow/dF"] = dm.detach(), df
        return {"loss": loss, **out}

    def _dist_match(self, student, u_e2e, y, t, r, cond, batch):
        """The self-adversarial term on the one-step samples ``y_r = y - (rho_t - rho_r) U_e2e`` (detached)."""
        p, P = student.process, self.p
        with torch.no_grad():
            x_fake = (y - _col(p.rho(t) - p.rho(r), y) * u_e2e).to(batch.real.dtype)
            t2 = self.sample_t(batch, p).double()[: len(y)]
            e2 = torch.randn(x_fake.shape, generator=batch.rng, dtype=x_fake.dtype).to(x_fake.device)
            y2 = p.add_noise(x_fake, e2, t2).double() / _col(p.alpha(t2), y)
            df = (flow_velocity(student, y2, -t2, -t2, cond) - flow_velocity(student, y2, t2, t2, cond))
            df = df.clamp(-P.clamp, P.clamp)
        dm = barron_loss(u_e2e, (u_e2e - df).detach(), P.barron_alpha, P.barron_c).mean()
        return dm, df.abs().mean()
