"""TDM: trajectory distribution matching for K-step students (arXiv 2503.06674; docs/objectives/tdm.md).

The student rolls out with DDIM-like re-noising by its own noise estimate (``generator.rollout: ddim``,
docs/fewstep.md); each iteration trains one step ``k`` (backward simulation) whose output ``x0_k`` covers the
noise interval ``(t_next, t_k]`` of that step. Both networks are scored only inside that interval:

* **Two-stage perturbation.** ``x0_k`` is first re-noised deterministically with the student's own
  ``eps_k`` to the interval's lower end ``t_mid = t_next`` (``rand_mid``: ``t_mid ~ U[t_next, t_k - 2 margin]``),
  ``x_mid = a_mid x0_k + s_mid eps_k``, then forward-diffused with fresh noise ``xi`` to
  ``t ~ U[max(t_min, t_mid), min(t_max, t_k - margin)]``:
  ``x_t = (a_t / a_mid) x_mid + beta xi``, ``beta = sqrt(s_t^2 - (a_t s_mid / a_mid)^2)``. So
  ``x_t = a_t x0_k + s_t m`` with the *mixed* noise ``m = ((a_t s_mid / a_mid) eps_k + beta xi) / s_t``.
* **Generator loss** (element-wise pseudo-Huber, ``c = huber_c``): with ``y = sg(x0_k - (D_fake - D^w_real))``
  at ``x_t`` and ``omega = sg(mean|x0_k - D^w_real|)`` per sample,
  ``L = mean_elements((sqrt((x0_k - y)^2 + c^2) - c) / omega)``; its gradient is
  ``Delta / sqrt(Delta^2 + c^2) / omega`` per element (``Delta = D_fake - D^w_real``), a nearly
  sign-valued DMD field. ``huber_c: 0`` is the reference code's MSE variant ``mean((x0_k - y)^2 / omega)``.
* **Fake score** ("step-aware"): x0 regression on the same interval perturbation of ``sg(x0_k)``, weighted by
  ``min(SNR(t), snr_cap)`` and the importance weight ``exp(-mean(m^2)/2) / exp(-mean(xi^2)/2)`` that
  down-weights samples whose mixed noise is unlikely under ``N(0, I)``.

The reference code draws ``k`` per sample; here ``k`` is one per iteration, shared by every rank and
micro-batch (the library's backward simulation). Without a rollout (a direct call with only ``x``, as in
the contract tests) the step is the whole range ``(0, 1]`` and ``eps_k`` is fresh noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scoredistill.errors import ConfigError
from scoredistill.objectives.base import Batch, ObjectiveParams, Roles, register
from scoredistill.objectives.common import noise_like
from scoredistill.objectives.core import FakeScoreObjective, check_guidance, dm_normaliser, per_sample_mean
from scoredistill.process.processes import Process
from scoredistill.process.time import Uniform


@dataclass
class TDMParams(ObjectiveParams):
    huber_c: float = 1e-3      # element-wise pseudo-Huber constant (reference --use_huber); 0: MSE / omega
    snr_cap: float = 5.0       # fake-score loss weight min(SNR, snr_cap) (reference snr_gamma)
    margin: float = 0.01       # scoring times stay this far below the step's time (reference: 10 of 1000)
    rand_mid: bool = False     # reference --use_randmid: t_mid random in [t_next, t_k - 2 margin]

    def validate(self):
        check_guidance(self.guidance_scale)
        if self.huber_c < 0:
            raise ConfigError("objective.huber_c", f"must be >= 0, got {self.huber_c!r}")
        if self.snr_cap <= 0:
            raise ConfigError("objective.snr_cap", f"must be > 0, got {self.snr_cap!r}")
        if not 0 <= self.margin < 0.5:
            raise ConfigError("objective.margin", f"must be in [0, 0.5), got {self.margin!r}")


@dataclass
class Perturbed:
    """The two-stage perturbation of one batch: ``x_t = a_t x0 + s_t m`` at ``t`` (module docstring)."""

    x_t: torch.Tensor
    t: torch.Tensor
    t_mid: torch.Tensor
    mixed: torch.Tensor
    xi: torch.Tensor


def two_stage(process: Process, x0: torch.Tensor, eps: torch.Tensor, t_mid: torch.Tensor, t: torch.Tensor,
              xi: torch.Tensor) -> Perturbed:
    """Re-noise ``x0`` with ``eps`` to ``t_mid``, then diffuse with ``xi`` from ``t_mid`` to ``t >= t_mid``
    (float64 inside); also returns the mixed noise ``m`` with ``x_t = a_t x0 + s_t m``."""
    a_m, s_m = process.coeffs(t_mid, x0)
    a_t, s_t = process.coeffs(t, x0)
    x_mid = a_m * x0.double() + s_m * eps.double()
    r = a_t / a_m
    beta = (s_t * s_t - (r * s_m) ** 2).clamp(min=0).sqrt()
    x_t = r * x_mid + beta * xi.double()
    mixed = (r * s_m * eps.double() + beta * xi.double()) / s_t
    return Perturbed(x_t.to(x0.dtype), t, t_mid, mixed, xi)


def importance_weight(p: Perturbed) -> torch.Tensor:
    """``exp(-mean(m^2)/2) / exp(-mean(xi^2)/2)`` per sample, ``(B,)`` float64 (reference ``is_weight``)."""
    m2 = per_sample_mean(p.mixed.double() ** 2).reshape(-1)
    x2 = per_sample_mean(p.xi.double() ** 2).reshape(-1)
    return torch.exp(-0.5 * (m2 - x2))


@register
class TDM(FakeScoreObjective):
    name = "tdm"
    Params = TDMParams
    # scoring times are clipped to [t_min, t_max] of objective.time inside each step's interval
    default_time = Uniform(t_min=0.02, t_max=1.0)
    rollout_modes: ClassVar[tuple[str, ...]] = ("ddim",)

    def __init__(self, params, time=None, fake_time=None):
        super().__init__(params, time=time, fake_time=fake_time)
        if not isinstance(self.time, Uniform):
            raise ConfigError("objective.time", "tdm draws its scoring times uniformly inside each step's interval, "
                              "clipped to [t_min, t_max]; accepted: {kind: uniform, t_min, t_max}")

    def requirements(self):
        return {"fake_score", "rollout"}

    def _step(self, batch: Batch, process: Process):
        """``(x0, eps, t_k, t_next)`` of the trained step (detached ``eps``; a whole-range step without a rollout)."""
        x = batch.x
        so = batch.rollout
        if so is None:
            n = x.shape[0]
            ones = torch.ones(n, dtype=torch.float64, device=x.device)
            return x, noise_like(x, batch.rng), ones, 0.0 * ones
        return x, so.eps(process).detach().to(x.dtype), so.t.to(x.device), so.t_next.to(x.device)

    def perturb(self, batch: Batch, process: Process) -> Perturbed:
        """The interval's two-stage perturbation of the detached step output (module docstring)."""
        x, eps, t_k, t_next = self._step(batch, process)
        n, m = x.shape[0], self.p.margin
        lo_mid = t_next.clamp(min=process.t_min)
        t_mid = lo_mid
        if self.p.rand_mid:
            u = torch.rand(n, generator=batch.rng, dtype=torch.float64).to(x.device)
            t_mid = lo_mid + u * (t_k - 2 * m - lo_mid).clamp(min=0)
        lo = t_mid.clamp(min=max(self.time.t_min, process.t_min))
        hi = torch.maximum((t_k - m).clamp(max=min(self.time.t_max, process.t_max)), lo)
        u = torch.rand(n, generator=batch.rng, dtype=torch.float64).to(x.device)
        t = lo + u * (hi - lo)
        return two_stage(process, x.detach(), eps, t_mid, t, noise_like(x, batch.rng))

    def generator_loss(self, batch: Batch, roles: Roles) -> dict:
        x = batch.x
        with torch.no_grad():
            p = self.perturb(batch, roles.process)
            d_real = roles.teacher.guided(p.x_t, p.t, batch.cond, self.p.guidance_scale)
            d_fake = roles.fake(p.x_t, p.t, batch.cond)
            omega = dm_normaliser(x.detach(), d_real)
            delta = (d_fake.double() - d_real.double()).to(x.dtype)
        r = x - (x - delta).detach()  # = Delta in value, on x's graph
        c = self.p.huber_c
        per = (torch.sqrt(r * r + c * c) - c) if c > 0 else r * r
        loss = (per / omega).mean()
        return {"loss": loss, "loss_tdm": loss.detach(), "field_norm": delta.flatten(1).norm(dim=1).mean(),
                "normaliser": omega.mean(), "t_mean": p.t.mean(), "t_mid_mean": p.t_mid.mean()}

    def auxiliary_losses(self, batch: Batch, roles: Roles) -> dict:
        x = batch.x.detach()
        p = self.perturb(batch, roles.process)
        pred = roles.fake(p.x_t, p.t, batch.cond)
        a, s = roles.process.coeffs(p.t, x)
        snr = ((a / s) ** 2).reshape(-1).clamp(max=self.p.snr_cap)
        iw = importance_weight(p)
        err = per_sample_mean((pred - x) ** 2).reshape(-1)
        loss = (err * (snr * iw).to(err.dtype)).mean()
        return {"loss": loss, "loss_fake": loss.detach(), "importance_weight": iw.mean().float()}
