"""Time samplers: each returns canonical times ``t`` of shape ``(B,)`` for a given process.

Samplers that are defined on the noise level (log-normal) work on ``rho = sigma/alpha`` and map
back with :meth:`Process.t_from_rho`, so one sampler means the same noise distribution under every
process (docs/processes.md, "Time samplers").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.process.processes import Process, check_fields


@dataclass
class TimeSampler:
    def __call__(self, n: int, process: Process, generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Uniform(TimeSampler):
    """``t ~ U[t_min, t_max]`` (clipped to the process range); ``discrete=N`` rounds to the grid
    ``{n/N}`` as DDPM-index samplers do (``randint(20, 980+1)`` is ``t_min=0.02, t_max=0.98, N=1000``);
    ``per_batch`` draws one t for the whole batch (ProlificDreamer, LucidDreamer)."""

    t_min: float = 0.02
    t_max: float = 0.98
    discrete: int | None = None
    per_batch: bool = False

    def __call__(self, n, process, generator=None, device=None):
        lo = max(self.t_min, process.t_min)
        hi = min(self.t_max, process.t_max)
        m = 1 if self.per_batch else n
        u = torch.rand(m, generator=generator, dtype=torch.float64)
        if self.discrete:
            k_lo, k_hi = round(lo * self.discrete), round(hi * self.discrete)
            k = (k_lo + torch.floor(u * (k_hi - k_lo + 1))).clamp(k_lo, k_hi)
            t = k / self.discrete
        else:
            t = lo + (hi - lo) * u
        return t.expand(n).to(device) if self.per_batch else t.to(device)


@dataclass
class LogNormal(TimeSampler):
    """``ln rho ~ N(p_mean, p_std^2)`` (EDM training distribution, arXiv 2206.00364 §5)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, n, process, generator=None, device=None):
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return process.t_from_rho((self.p_mean + self.p_std * z).exp()).to(device)


@dataclass
class LogitNormal(TimeSampler):
    """``t = sigmoid(N(m, s^2))`` (SD3, arXiv 2403.03206 §3.1), clipped to the process range."""

    m: float = 0.0
    s: float = 1.0

    def __call__(self, n, process, generator=None, device=None):
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        t = torch.sigmoid(self.m + self.s * z)
        return t.clamp(process.t_min, process.t_max).to(device)


@dataclass
class Shifted(TimeSampler):
    """Uniform ``u`` shifted as ``k u / (1 + (k - 1) u)`` (Self-Forcing/rCM ``timestep_shift``)."""

    shift: float = 5.0
    t_min: float = 0.02
    t_max: float = 0.98

    def __call__(self, n, process, generator=None, device=None):
        u = self.t_min + (self.t_max - self.t_min) * torch.rand(n, generator=generator, dtype=torch.float64)
        k = self.shift
        t = k * u / (1 + (k - 1) * u)
        return t.clamp(process.t_min, process.t_max).to(device)


TIME_SAMPLERS = {"uniform": Uniform, "lognormal": LogNormal, "logit_normal": LogitNormal, "shifted": Shifted}


# keys of each sampler that must be > 0; every t bound lies in [0, 1]
_POSITIVE = ("discrete", "p_std", "s", "shift")


def make_time_sampler(cfg: dict | TimeSampler | None, field: str, default: TimeSampler) -> TimeSampler:
    """Build a sampler from ``{kind: uniform|lognormal|logit_normal|shifted, ...params}``; each value is
    checked (finite numbers, ``0 <= t_min <= t_max <= 1``) with one ConfigError naming ``field.key``."""
    from scoredistill.errors import ConfigError

    if cfg is None:
        return default
    if isinstance(cfg, TimeSampler):
        return cfg
    if not isinstance(cfg, dict):
        raise ConfigError(field, f"must be a mapping {{kind: {'|'.join(TIME_SAMPLERS)}, ...}}, got {cfg!r}")
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in TIME_SAMPLERS:
        raise ConfigError(f"{field}.kind", f"unknown value {kind!r}; accepted: {', '.join(TIME_SAMPLERS)}")
    cls = TIME_SAMPLERS[kind]
    check_fields(cls, cfg, field, positive=_POSITIVE)
    sampler = cls(**cfg)
    for k in ("t_min", "t_max"):
        v = getattr(sampler, k, None)
        if v is not None and not 0 <= v <= 1:
            raise ConfigError(f"{field}.{k}", f"must be in [0, 1], got {v}")
    if getattr(sampler, "t_min", 0) > getattr(sampler, "t_max", 1):
        raise ConfigError(f"{field}.t_min", f"must be <= t_max ({sampler.t_max}), got {sampler.t_min}")
    return sampler
