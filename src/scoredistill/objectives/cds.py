"""CDS — Consistency Distillation Sampling (Consistent3D, arXiv 2401.09050; docs/optimize/cds.md).

A fixed noise ``eps*`` is drawn **once** (official ``share_noise``) and reused every step; it is
objective state (:meth:`CDS.state_tensors`) that the optimizer driver checkpoints. One noise tensor
per rendered item (particle / view index ``batch.index`` of ``batch.num_items``), so independent
particles do not share a trajectory; without an index the noise has the batch's shape.

VE view of the process: ``z_t = x + rho_t eps*`` (``x_t = a_t z_t``). One Euler PF-ODE step with the
CFG teacher from ``t`` to ``t' < t``: ``z_t' = z_t + (rho_t' - rho_t) eps'_t``, and the update
(descent) direction
``dx = w(t) [(rho_t / rho_t') (eps'_t - eps^w_t) + (eps^w_t'(z_t') - eps'_t)]``,
implemented as ``L = 1/2 ||x - sg(x + dx)||^2`` (sum / B) so ``dL/dx = -dx``; the optional clamp
acts on ``dx``. ``eps'_t`` is the CFG
epsilon after the optional x0 std-rescale (``recon_std_rescale``, official ``get_rescaled_sample``);
with the default 0, ``eps' = eps^w_t`` and ``dx = w(t)(eps^w_t' - eps^w_t)``.

Times (official ``forward``): ``t' = t_next`` (a schedulable scalar; official coarse stage anneals it
0.7 -> 0.1 over 3000 steps with a **sqrt** schedule: ``t_next: {kind: sqrt, ...}``), clamped to
``[t_clamp_min, t_clamp_max - end_gap]``; ``t = t' + U[end_gap, end_gap + perturb)`` per sample,
clamped to ``[t_clamp_min, t_clamp_max]``. Canonical times (official integers / 1000).
Defaults (coarse stage): gap ``[0.1, 0.3)``, clamp ``[0.1, 0.98]``, weighting ``uniform``, guidance
100 -> 50 in the ``cond + s (cond - uncond)`` convention (canonical 101 -> 51: give it with
``teacher.guidance_convention: cond_plus``), element-wise clamp 2 -> 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import ObjectiveParams, register
from scoredistill.objectives.core import (
    FieldObjective,
    clamp_key,
    eps_weight,
    field_diag,
    finish_field,
    null_like,
    to_eps,
    weighting_key,
)
from scoredistill.process.guidance import cfg_combine


@dataclass
class CDSParams(ObjectiveParams):
    guidance_scale: float = 101.0   # official coarse start: 100 in the cond_plus convention
    weighting: str = weighting_key("uniform")
    t_next: float = key(0.7, "t' (schedulable; official: sqrt anneal 0.7 -> 0.1)")
    end_gap: float = key(0.1, "t = t' + U[end_gap, end_gap + perturb)", lo=0, lo_open=True)
    perturb: float = key(0.2, "width of that range", lo=0)
    t_clamp_min: float = key(0.1, "lower clamp of t and t'", lo=0, hi=1)
    t_clamp_max: float = key(0.98, "upper clamp of t (t' <= t_clamp_max - end_gap)", lo=0, hi=1)
    recon_std_rescale: float = key(0.0, "share of the std-rescaled x0 in eps'_t (0: plain CFG)", lo=0, hi=1)
    noise_seed: int = key(0, "seed of the fixed per-item noise", lo=0)
    grad_clamp: float | None = clamp_key()

    def validate(self):
        if self.t_clamp_min >= self.t_clamp_max:
            raise ConfigError("objective.t_clamp_max", f"must be > objective.t_clamp_min ({self.t_clamp_min}), "
                              f"got {self.t_clamp_max}")


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).std(1).view((-1,) + (1,) * (x.dim() - 1))


@register
class CDS(FieldObjective):
    name = "cds"
    Params = CDSParams

    def __init__(self, params, time=None, fake_time=None):
        super().__init__(params, time, fake_time)
        self.fixed_noise: torch.Tensor | None = None

    # -- objective state (checkpointed by the optimizer driver) --------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.fixed_noise is None else {"fixed_noise": self.fixed_noise}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.fixed_noise = state.get("fixed_noise")

    def noise_for(self, batch) -> torch.Tensor:
        x = batch.x
        index, n = batch.index, batch.num_items
        rows = n if index is not None and n else x.shape[0]
        if self.fixed_noise is None or tuple(self.fixed_noise.shape) != (rows,) + tuple(x.shape[1:]):
            g = torch.Generator().manual_seed(int(self.p.noise_seed))
            self.fixed_noise = torch.randn((rows,) + tuple(x.shape[1:]), generator=g, dtype=x.dtype)
        noise = self.fixed_noise.to(x.device)
        return noise[index.to(x.device)] if index is not None and n else noise

    # -- field -----------------------------------------------------------------------------------------
    def times(self, batch, process):
        q = self.p
        n = batch.x.shape[0]
        t_next = torch.full((n,), float(q.t_next), dtype=torch.float64)
        t_next = t_next.clamp(q.t_clamp_min, q.t_clamp_max - q.end_gap)
        gap = q.end_gap + q.perturb * torch.rand(n, generator=batch.rng, dtype=torch.float64)
        t = (t_next + gap).clamp(q.t_clamp_min, q.t_clamp_max)
        lo, hi = process.t_min, process.t_max
        return t.clamp(lo, hi).to(batch.x.device), t_next.clamp(lo, hi).to(batch.x.device)

    def _eps(self, roles, x_t, t, cond, rescale: bool):
        """(CFG epsilon, possibly rescaled epsilon) at ``(x_t, t)``."""
        teacher, p, w = roles.teacher, roles.process, self.p.guidance_scale
        if not rescale or cond is None:
            e = to_eps(p, x_t, teacher.guided(x_t, t, cond, w), t)
            return e, e
        d_c = teacher(x_t, t, cond).double()
        d_u = teacher(x_t, t, null_like(cond)).double()
        d_w = cfg_combine(d_u, d_c, w)
        r = self.p.recon_std_rescale
        adj = d_w * (_std(d_c) + 1e-8) / (_std(d_w) + 1e-8)
        d_r = r * adj + (1 - r) * d_w
        return to_eps(p, x_t, d_w, t), to_eps(p, x_t, d_r, t)

    def field(self, batch, roles):
        x = batch.x.detach()
        p = roles.process
        t, t_next = self.times(batch, p)
        noise = self.noise_for(batch).double()
        shape = (-1,) + (1,) * (x.dim() - 1)
        rho, rho_n = p.rho(t).view(shape), p.rho(t_next).view(shape)
        a, s = p.coeffs(t, x)
        a_n, _ = p.coeffs(t_next, x)
        z = x.double() + rho.to(x.device) * noise
        rescale = self.p.recon_std_rescale > 0
        e_w, e_r = self._eps(roles, (a * z).to(x.dtype), t, batch.cond, rescale)
        z_next = z + (rho_n - rho).to(x.device) * e_r
        e_w_next, _ = self._eps(roles, (a_n * z_next).to(x.dtype), t_next, batch.cond, False)
        dx = (rho / rho_n).to(x.device) * (e_r - e_w) + (e_w_next - e_r)
        dx = finish_field(eps_weight(self.p.weighting, a, s) * dx, self.p.grad_clamp)
        return -dx, field_diag(dx, t, t_next=t_next)
