"""The shared base of the registered consistency objectives (``cd``, ``ict``, ``scm``): what they ask of the
engine and how they draw their training points. The math is in :mod:`.consistency_core`
(docs/objectives/consistency.md).

A consistency objective trains the student's denoiser ``f_theta(x_t, t, cond)`` itself, on noisy points
it builds from real samples (``x_t = a_t x0 + s_t eps``), against a target computed from the frozen
target network ``f^-`` (``Roles.target``): an exact copy of the student after every generator update
(``target_ema: 0``, the stop-gradient ``sg(theta)`` of iCT and sCM) or an EMA of it (CD's ``theta^-``).
Both roles come from the engine through the ``consistency_target`` requirement; the objective never
reads the generator's samples (``uses_generator_samples = False``), so the engine skips the rollout.
The student's denoiser is the consistency function: its EDM preconditioning (``c_skip -> 1``,
``c_out -> 0`` as the noise level goes to 0) gives the boundary condition ``f(x, rho_min) = x`` up to
``(rho_min/sigma_data)^2`` relative, and its one-step sample ``f(x_T, T)`` and K-step samples are the
K-step student's rollout (docs/fewstep.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.errors import ConfigError
from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.base import Batch, Objective, ObjectiveParams, Roles


@dataclass
class ConsistencyParams(ObjectiveParams):
    target_ema: float = 0.0  # EMA rate of the target network per generator update (0: exact copy, sg(theta))

    def validate(self):
        if not 0.0 <= self.target_ema < 1.0:
            raise ConfigError("objective.target_ema", f"must be in [0, 1), got {self.target_ema!r}")


@dataclass
class KarrasParams(ConsistencyParams):
    """Parameters of the objectives on a Karras grid of VE levels (``cd``, ``ict``)."""

    rho_min: float = 0.002
    rho_max: float = 80.0

    def validate(self):
        super().validate()
        if not 0 < self.rho_min < self.rho_max:
            raise ConfigError("objective.rho_min", f"need 0 < rho_min < rho_max, got {self.rho_min!r}, "
                              f"{self.rho_max!r}")


class ConsistencyObjective(Objective):
    """Base of the consistency objectives: requirements, target rate and the real points they train on."""

    uses_generator_samples = False

    def requirements(self) -> set[str]:
        return {"consistency_target", "real_data"}

    def target_decay(self, step: int = 0) -> float:
        return float(self.p.target_ema)

    @staticmethod
    def inputs(batch: Batch, roles: Roles):
        """``(student, target, x0, cond, eps)``: the two networks, real samples ``x0`` (float32, no graph), their
        labels and the shared noise ``eps`` (drawn from the micro-batch's generator, so the points do not depend
        on the number of processes)."""
        if roles.student is None or roles.target is None:
            raise ValueError("a consistency objective needs Roles.student and Roles.target (the engine builds "
                             "them for the consistency_target requirement)")
        if batch.real is None:
            raise ValueError("a consistency objective needs batch.real (the real_data requirement)")
        x0 = batch.real.detach().float()
        eps = torch.randn(x0.shape, generator=batch.rng, dtype=x0.dtype).to(x0.device)
        return roles.student, roles.target, x0, batch.real_cond, eps

    def levels(self, process, n: int) -> torch.Tensor:
        """``n`` ascending Karras levels between ``objective.rho_min`` and ``rho_max`` (0.002 and 80 by default),
        clipped to the process's range."""
        lo, hi = max(self.p.rho_min, process.rho_min), min(self.p.rho_max, process.rho_max)
        return cc.karras_levels(n, lo, hi)

    @staticmethod
    def pair_times(process, levels: torch.Tensor, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Canonical times ``(t(rho_{i+1}), t(rho_i))`` of the pairs ``idx`` (float64, on ``device``)."""
        times = cc.level_times(process, levels)
        return times[idx + 1].to(device), times[idx].to(device)


VELOCITIES = ("teacher", "data")


def check_velocity(params) -> None:
    """One line for an unknown ``objective.velocity`` (teacher | data)."""
    if params.velocity not in VELOCITIES:
        raise ConfigError("objective.velocity", f"unknown value {params.velocity!r}; accepted: {', '.join(VELOCITIES)}")


def check_tangent_keys(params) -> None:
    """One line for an unknown ``objective.velocity`` (teacher | data) or ``objective.jvp`` (torch | fd | auto)."""
    check_velocity(params)
    cc.Tangent(params.jvp)


def check_ranges(params, checks: dict[str, tuple[bool, str]]) -> None:
    """One line on the first key of ``checks`` (name -> (in range, the accepted values in words)) that is out of
    range, naming what it accepts."""
    for k, (ok, accepts) in checks.items():
        if not ok:
            raise ConfigError(f"objective.{k}", f"must be {accepts}, got {getattr(params, k)!r}")


class TangentObjective(ConsistencyObjective):
    """A consistency objective whose target needs a total time derivative of a network (``sCM``, ``MeanFlow``):
    ``self.tangent`` from ``objective.jvp`` and ``objective.fd_step``."""

    def __init__(self, params, time=None, fake_time=None):
        super().__init__(params, time, fake_time)
        self.tangent = cc.Tangent(params.jvp, params.fd_step)
