"""SIM: Score Implicit Matching (arXiv 2410.16794; no public training code; docs/objectives/sim.md).

Divergence ``D = int w(t) E_{x_t ~ pi_t}[ d(s_real(x_t) - s_fake(x_t)) ] dt`` with the pseudo-Huber
distance ``d(y) = sqrt(||y||^2 + c^2) - c`` (norm over all non-batch dims of one sample), whose
derivative ``u_t = d'(y_t) = y_t / sqrt(||y_t||^2 + c^2)`` is a self-normalised direction.
Implementable surrogate (derived in docs/objectives/sim.md, checked in tests/objectives/test_sid_sim.py):

    L = w(t) < u_t , s_fake(x_t) - grad log q_t(x_t | x) >,   y_t = s_real(x_t) - s_fake(x_t),

with ``x_t = a_t x + s_t eps``, ``x = G(z)`` and ``grad log q_t(x_t|x) = -(x_t - a_t x)/s_t^2``.
**Stop-gradients: none** except in the weight -- autograd runs through ``x_t`` into the teacher and
the fake network (parameters frozen by the engine), through ``u_t`` (NOT detached) and through
``x``. Its gradient is the divergence gradient with the sampling distribution held fixed
(pi_t = sg q_theta,t). ``pathwise: true`` adds ``w <sg(u_t), y_t(x_t)>``, turning it into the total
derivative (for ``d = ||.||^2`` these are SiD with alpha = 1 and alpha = 1/2).

In x0 units (``s = (a D - x_t)/s_t^2``): ``y_t = a_t (f_phi - f_psi) / s_t^2`` and
``s_fake - grad log q_t(x_t|x) = a_t (f_psi - x) / s_t^2`` (the ``x_t`` terms cancel exactly, also
under autograd), so ``c`` is measured in score units and the surrogate is computed in float64.

Weighting (the paper's choice is not verifiable; the default reuses SiD's normalisation). Per sample,
with ``numel`` the elements per sample:

* ``sid`` (default): ``w = s_t^4 / (a_t^2 omega numel)``, ``omega = sg(clip(mean|x - f_phi|, 1e-5))``.
  For ``||y|| << c`` (``u ~ y/c``) the loss is exactly SiD's alpha = 1 loss divided by ``c``;
  for ``||y|| >> c`` the direction is capped at unit norm (robust to score-gap spikes at small noise).
* ``fisher``: ``w = s_t^4 / (a_t^2 numel)`` (no omega).
* ``none``: ``w = 1`` -- the raw score-space divergence (what the finite-difference test checks).

Time sampler and fake score as SiD: ``t ~ U[0, 0.8]`` (EDM: SiD's sigma sampling with t_max = 800)
and EDM-weighted DSM of the fake score on detached samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.objectives.base import Batch, ObjectiveParams, Roles, register
from scoredistill.objectives.common import noise_like
from scoredistill.objectives.core import SiDFamily, dm_normaliser, drop_nonfinite, dropout_key, guidance_key
from scoredistill.process.time import Uniform

SIM_WEIGHTINGS = ("sid", "fisher", "none")


@dataclass
class SIMParams(ObjectiveParams):
    guidance_scale: float = guidance_key()
    huber_c: float = key(1.0, "pseudo-Huber c, in score units (paper value not verifiable)", lo=0, lo_open=True)
    weighting: str = key("sid", "sid | fisher | none (docs/objectives/sim.md)", choices=SIM_WEIGHTINGS)
    pathwise: bool = key(False, "add <sg(u), y(x_t)>: total derivative instead of the fixed-pi gradient")
    fake_cond_dropout: float = dropout_key()


def pseudo_huber_direction(y: torch.Tensor, c: float) -> torch.Tensor:
    """``d'(y) = y / sqrt(||y||^2 + c^2)`` with the norm over all non-batch dims of each sample."""
    sq = y.reshape(y.shape[0], -1).pow(2).sum(1)
    return y / (sq + c * c).sqrt().view((-1,) + (1,) * (y.dim() - 1))


def sim_surrogate(x, t, f_real, f_fake, process, c: float, pathwise: bool = False) -> torch.Tensor:
    """Per-sample ``<u_t, s_fake - grad log q_t(x_t|x)>`` (+ ``<sg u_t, y_t>``), float64, ``w = 1``."""
    a, s = process.coeffs(t, x)
    k = a / (s * s)
    y = k * (f_real.double() - f_fake.double())            # s_real(x_t) - s_fake(x_t)
    u = pseudo_huber_direction(y, c)                        # not detached
    target = k * (f_fake.double() - x.double())            # s_fake(x_t) - grad log q_t(x_t | x)
    out = (u * target).flatten(1).sum(1)
    if pathwise:
        out = out + (u.detach() * y).flatten(1).sum(1)
    return out


@register
class SIM(SiDFamily):
    name = "sim"
    Params = SIMParams
    default_time = Uniform(t_min=0.0, t_max=0.8)  # EDM: SiD's sigma(u), u ~ U[0, 800/1000]

    def weight(self, x, t, f_real, process) -> torch.Tensor:
        """Per-sample ``w(t)`` (detached), shape ``(B,)``."""
        if self.p.weighting == "none":
            return torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        a, s = process.coeffs(t, x)
        w = (s**4 / a**2).reshape(-1) / x[0].numel()
        if self.p.weighting == "sid":
            w = w / dm_normaliser(x, f_real).double().reshape(-1)
        return w.detach()

    def per_sample_loss(self, x, t, noise, cond, roles: Roles) -> tuple[torch.Tensor, dict]:
        _, f_real, f_fake = self.terms(x, t, noise, cond, roles)
        w = self.weight(x, t, f_real, roles.process)
        loss = w * sim_surrogate(x, t, f_real, f_fake, roles.process, self.p.huber_c, self.p.pathwise)
        return loss.to(x.dtype), {"weight_mean": w.mean()}

    def generator_loss(self, batch: Batch, roles: Roles) -> dict:
        x = batch.x
        t = self.sample_t(batch, roles.process)
        loss, diag = self.per_sample_loss(x, t, noise_like(x, batch.rng), batch.cond, roles)
        (kept,) = drop_nonfinite(loss)
        loss = kept.mean() if len(kept) else loss.sum() * 0.0
        return {"loss": loss, "loss_sim": loss.detach(), "dropped": float(x.shape[0] - len(kept)),
                "t_mean": t.mean(), **diag}
