"""Forward processes ``x_t = alpha(t) x0 + sigma(t) eps`` in one canonical time ``t in [0, 1]``.

Every process in the library is indexed by the same canonical time: ``t = 0`` is (nearly) clean data
and ``t = 1`` the noisiest level the process defines. Objectives, samplers and time samplers only
ever see ``alpha(t)``, ``sigma(t)`` and the *noise-to-signal ratio* ``rho(t) = sigma(t)/alpha(t)``
(the EDM sigma of the equivalent variance-exploding process, arXiv 2206.00364 §2). A native network
gets its own time input from :meth:`Process.native_time`.

Processes (docs/processes.md):

* :class:`VPDiscrete` -- DDPM with ``N`` steps (linear, scaled-linear, cosine betas); ``t = n/N``;
  between grid points ``log alpha_bar`` is interpolated linearly. Native time: ``n = t*N``.
* :class:`VPContinuous` -- continuous VP SDE with linear beta(t) (arXiv 2011.13456).
* :class:`EDM` -- VE/EDM ``alpha = 1, sigma = rho``, with ``t`` the Karras ramp
  ``sigma(t) = (smin^(1/r) + t (smax^(1/r) - smin^(1/r)))^r``, so uniform ``t`` is DMD2's uniform
  index on the Karras grid and ``t ~ U[0, 0.8]`` is SiD's sigma sampling. Native time: ``sigma``.
* :class:`RectifiedFlow` -- ``alpha = 1 - s, sigma = s`` with ``s = shift t / (1 + (shift-1) t)``
  (SD3 timestep shift, arXiv 2403.03206). Native time: ``s`` (x1000 for diffusers models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def _f64(t: Tensor | float) -> Tensor:
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    return t.to(torch.float64)


# each prediction kind as ``(to_x0, from_x0)``, both ``f(x_t, y, a_t, s_t)`` on float64 tensors (the
# eps of ``x_t = a x0 + s eps`` links them: ``v = a eps - s x0``, flow velocity ``eps - x0``)
PREDICTIONS = {
    "x0": (lambda xt, p, a, s: p, lambda xt, d, a, s: d),
    "eps": (lambda xt, p, a, s: (xt - s * p) / a, lambda xt, d, a, s: (xt - a * d) / s),
    "v": (lambda xt, p, a, s: (a * xt - s * p) / (a * a + s * s), lambda xt, d, a, s: a * ((xt - a * d) / s) - s * d),
    "flow": (lambda xt, p, a, s: (xt - s * p) / (a + s), lambda xt, d, a, s: (xt - a * d) / s - d),
}


class Process:
    """Base class: subclasses define ``_alpha``/``_sigma`` in float64 and ``t_min``/``t_max``."""

    name: str = "process"
    t_min: float = 0.0
    t_max: float = 1.0

    # -- schedule ---------------------------------------------------------------------------------
    def _alpha(self, t: Tensor) -> Tensor:  # float64 in, float64 out
        raise NotImplementedError

    def _sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor | float) -> Tensor:
        """Signal scale ``a_t`` (float64)."""
        return self._alpha(_f64(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise scale ``s_t`` (float64)."""
        return self._sigma(_f64(t))

    def rho(self, t: Tensor | float) -> Tensor:
        """Noise-to-signal ratio ``s_t / a_t`` (the EDM sigma of the equivalent VE process)."""
        t = _f64(t)
        return self._sigma(t) / self._alpha(t)

    @property
    def rho_min(self) -> float:
        return float(self.rho(self.t_min))

    @property
    def rho_max(self) -> float:
        return float(self.rho(self.t_max))

    def t_from_rho(self, rho: Tensor | float) -> Tensor:
        """Inverse of :meth:`rho` (float64), clamped to ``[t_min, t_max]``.

        Generic vectorised bisection on the monotone map ``t -> log rho(t)``; subclasses with a
        closed form override it.
        """
        r = _f64(rho).clamp(self.rho_min, self.rho_max)
        lo = torch.full_like(r, self.t_min)
        hi = torch.full_like(r, self.t_max)
        target = r.log()
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            go_up = self.rho(mid).log() < target
            lo = torch.where(go_up, mid, lo)
            hi = torch.where(go_up, hi, mid)
        return 0.5 * (lo + hi)

    def native_time(self, t: Tensor) -> Tensor:
        """The time value a network trained natively on this process expects."""
        return t

    # -- noising ----------------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = a_t x0 + s_t eps`` with per-sample ``t`` of shape ``(B,)`` (or a scalar)."""
        a, s = self.coeffs(t, x0)
        return (a * x0.double() + s * noise.double()).to(x0.dtype)

    def coeffs(self, t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_t, s_t)`` in float64, broadcastable against ``like`` (shape ``(B, 1, ..., 1)``)."""
        t = _f64(t).to(like.device)
        if t.dim() == 0:
            t = t.expand(like.shape[0])
        shape = (-1,) + (1,) * (like.dim() - 1)
        return self._alpha(t).view(shape), self._sigma(t).view(shape)

    # -- prediction conversions (x0 is the hub; float64 inside) --------------------------------------
    def to_x0(self, x_t: Tensor, pred: Tensor, t: Tensor, kind: str) -> Tensor:
        """Convert a network prediction of type ``kind`` into ``x0`` (docs/processes.md, "Conversions").

        ``eps``: ``x0 = (x_t - s eps)/a``; ``v`` (VP v-prediction ``v = a eps - s x0``):
        ``x0 = (a x_t - s v)/(a^2 + s^2)``; ``flow`` (velocity ``v = eps - x0``):
        ``x0 = (x_t - s v)/(a + s)``; ``x0``: identity.
        """
        return self._convert(x_t, pred, t, kind, 0)

    def from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor, kind: str) -> Tensor:
        """Inverse of :meth:`to_x0`: express ``x0`` as a prediction of type ``kind``."""
        return self._convert(x_t, x0, t, kind, 1)

    def _convert(self, x_t: Tensor, y: Tensor, t: Tensor, kind: str, way: int) -> Tensor:
        if kind not in PREDICTIONS:
            raise ValueError(f"prediction kind must be one of {', '.join(PREDICTIONS)}; got {kind!r}")
        a, s = self.coeffs(t, x_t)
        return PREDICTIONS[kind][way](x_t.double(), y.double(), a, s).to(x_t.dtype)

    def score(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """``grad log p_t(x_t) = (a_t x0_hat - x_t) / s_t^2`` from a denoiser output."""
        a, s = self.coeffs(t, x_t)
        return ((a * x0.double() - x_t.double()) / (s * s)).to(x_t.dtype)

    def describe(self) -> dict:
        return {"kind": self.name}


# ----------------------------------------------------------------------------------------------------
def _betas(schedule: str, n: int, beta_start: float, beta_end: float) -> Tensor:
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if schedule == "scaled_linear":  # Stable Diffusion
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal, arXiv 2102.09672 eq. 17
        s = 0.008
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"beta_schedule must be one of linear, scaled_linear, cosine; got {schedule!r}")


@dataclass
class VPDiscrete(Process):
    """DDPM process with ``num_steps`` discrete levels (arXiv 2006.11239); ``t = n / num_steps``."""

    beta_schedule: str = "linear"
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    name: str = "vp"

    def __post_init__(self):
        betas = _betas(self.beta_schedule, self.num_steps, self.beta_start, self.beta_end)
        self.log_alpha_bar = torch.cumsum(torch.log1p(-betas), 0)
        self.t_min = 0.0
        self.t_max = (self.num_steps - 1) / self.num_steps

    def _log_ab(self, t: Tensor) -> Tensor:
        table = self.log_alpha_bar.to(t.device)
        pos = (t * self.num_steps).clamp(0, self.num_steps - 1)
        lo = pos.floor().long().clamp(max=self.num_steps - 2)
        frac = pos - lo
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def _alpha(self, t):
        return self._log_ab(t).mul(0.5).exp()

    def _sigma(self, t):
        return (-torch.expm1(self._log_ab(t))).sqrt()

    def native_time(self, t):
        return t * self.num_steps

    def describe(self):
        return {"kind": "vp", "beta_schedule": self.beta_schedule, "num_steps": self.num_steps,
                "beta_start": self.beta_start, "beta_end": self.beta_end}


@dataclass
class VPContinuous(Process):
    """Continuous VP SDE, ``log alpha_bar(t) = -(b0 t + (b1 - b0) t^2 / 2)`` (arXiv 2011.13456)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3
    name: str = "vp_continuous"

    def __post_init__(self):
        self.t_min = self.eps
        self.t_max = 1.0

    def _log_ab(self, t):
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def _alpha(self, t):
        return self._log_ab(t).mul(0.5).exp()

    def _sigma(self, t):
        return (-torch.expm1(self._log_ab(t))).sqrt()

    def native_time(self, t):
        return t * 999.0  # the usual network time scale for continuous VP models

    def describe(self):
        return {"kind": "vp_continuous", "beta_min": self.beta_min, "beta_max": self.beta_max,
                "eps": self.eps}


@dataclass
class EDM(Process):
    """VE/EDM process (arXiv 2206.00364) with a Karras-ramp canonical time."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho_karras: float = 7.0
    name: str = "edm"

    def _s(self, t):
        r = self.rho_karras
        lo, hi = self.sigma_min ** (1 / r), self.sigma_max ** (1 / r)
        return (lo + t * (hi - lo)) ** r

    def _alpha(self, t):
        return torch.ones_like(t)

    def _sigma(self, t):
        return self._s(t)

    def t_from_rho(self, rho):
        r = self.rho_karras
        lo, hi = self.sigma_min ** (1 / r), self.sigma_max ** (1 / r)
        s = _f64(rho).clamp(self.sigma_min, self.sigma_max)
        return ((s ** (1 / r) - lo) / (hi - lo)).clamp(0.0, 1.0)

    def native_time(self, t):
        return self._s(_f64(t))

    def describe(self):
        return {"kind": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "rho": self.rho_karras}


@dataclass
class RectifiedFlow(Process):
    """Rectified flow ``x_s = (1 - s) x0 + s eps`` (arXiv 2209.03003), shifted time
    ``s = k t / (1 + (k - 1) t)`` (SD3, arXiv 2403.03206); ``t_min``/``t_max`` keep ratios finite."""

    shift: float = 1.0
    eps: float = 1e-3
    name: str = "flow"

    def __post_init__(self):
        self.t_min = self.eps
        self.t_max = 1.0 - self.eps

    def _s(self, t):
        k = self.shift
        return k * t / (1 + (k - 1) * t)

    def _alpha(self, t):
        return 1 - self._s(t)

    def _sigma(self, t):
        return self._s(t)

    def t_from_rho(self, rho):
        s = _f64(rho) / (1 + _f64(rho))
        k = self.shift
        t = s / (k - (k - 1) * s)
        return t.clamp(self.t_min, self.t_max)

    def native_time(self, t):
        return self._s(_f64(t))

    def describe(self):
        return {"kind": "flow", "shift": self.shift, "eps": self.eps}


PROCESS_KINDS = {"vp": VPDiscrete, "vp_continuous": VPContinuous, "edm": EDM, "flow": RectifiedFlow}


def check_fields(cls, cfg: dict, field: str, positive: tuple[str, ...] = ()) -> None:
    """Every key of ``cfg`` a field of the dataclass ``cls`` and of its type: booleans, integers, and
    finite numbers (NaN / inf refused), those named in ``positive`` > 0. One ConfigError naming the key.
    (The process layer sits below the config schema, so its specs check themselves.)"""
    import dataclasses

    from scoredistill.errors import ConfigError, check_keys

    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}
    check_keys(cfg, fields, field)
    for k, v in cfg.items():
        f = fields[k]
        default, kind = f.default, str(f.type)
        if v is None and "None" in kind:
            continue
        is_num = isinstance(v, (int, float)) and not isinstance(v, bool)
        if isinstance(default, bool):
            ok, what = isinstance(v, bool), "true or false"
        elif isinstance(default, str):
            ok, what = isinstance(v, str), "a string"
        elif kind.startswith("int"):
            ok, what = is_num and isinstance(v, int) and (k not in positive or v > 0), "an integer" + (
                " > 0" if k in positive else "")
        else:
            ok = is_num and math.isfinite(v) and (k not in positive or v > 0)
            what = "a finite number" + (" > 0" if k in positive else "")
        if not ok:
            raise ConfigError(f"{field}.{k}", f"must be {what}, got {v!r}")


def make_process(cfg: dict | None) -> Process:
    """Build a process from a config dict ``{kind: vp|vp_continuous|edm|flow, ...}``."""
    from scoredistill.errors import ConfigError

    cfg = dict(cfg or {"kind": "edm"})
    kind = cfg.pop("kind", "edm")
    if kind not in PROCESS_KINDS:
        raise ConfigError("teacher.process.kind", f"unknown value {kind!r}; accepted: {', '.join(PROCESS_KINDS)}")
    cls = PROCESS_KINDS[kind]
    if kind == "edm" and "rho" in cfg:
        cfg["rho_karras"] = cfg.pop("rho")
    # every number of a process is a positive scale, count or offset
    check_fields(cls, cfg, "teacher.process", positive=tuple(k for k in cfg if k != "beta_schedule"))
    if kind == "vp" and cfg.get("num_steps", 2) < 2:
        raise ConfigError("teacher.process.num_steps", f"must be an integer >= 2, got {cfg['num_steps']}")
    lo, hi = {"edm": ("sigma_min", "sigma_max"), "vp": ("beta_start", "beta_end"),
              "vp_continuous": ("beta_min", "beta_max")}.get(kind, (None, None))
    if lo is not None:
        a, b = cfg.get(lo, getattr(cls, lo)), cfg.get(hi, getattr(cls, hi))
        if a > b:
            raise ConfigError(f"teacher.process.{lo}", f"must be <= {hi} ({b}), got {a}")
    try:
        return cls(**cfg)
    except ValueError as e:
        raise ConfigError("teacher.process", str(e)) from None
