"""Pure building blocks of the consistency family (CD, iCT, sCM/rCM, TCM, MeanFlow): no optimizers,
no engine state, no roles. Each objective file combines a few of these; docs/objectives/consistency.md
states the math and what each piece is for.

Conventions. Times are the library's canonical ``t`` (docs/processes.md); noise levels are the
VE-equivalent ``rho = s_t/a_t`` and states are the process's own ``x_t``, except in the sCM pieces,
which work in TrigFlow coordinates (:class:`~scoredistill.process.trigflow.TrigFlow`). Every teacher,
student and target network is a library :class:`~scoredistill.models.denoiser.Denoiser`
(``D(x_t, t, cond) -> x0``); parameterisations are re-expressed from its output, so no network has to
know which objective trains it. Ratios that blow up near the ends of the time range are taken in
float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import Denoiser
from scoredistill.models.tangent import dual_jvp
from scoredistill.process.processes import Process
from scoredistill.process.trigflow import TrigFlow
from scoredistill.sampling import get_rhos_karras

Tensor = torch.Tensor


def _col(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample ``(B,)`` values shaped ``(B, 1, ..., 1)`` against ``like`` (float64, ``like``'s device)."""
    v = v.to(device=like.device, dtype=torch.float64)
    return v if v.dim() == 0 else v.reshape((-1,) + (1,) * (like.dim() - 1))


def _batch_t(t, like: Tensor) -> Tensor:
    t = (t if torch.is_tensor(t) else torch.tensor(float(t))).to(device=like.device, dtype=torch.float64)
    return t.expand(like.shape[0]) if t.dim() == 0 else t


def param_dtype(module: nn.Module) -> torch.dtype | None:
    """The floating dtype the module computes in: its first floating parameter's (or buffer's); ``None``
    for a module without floating tensors (an analytic denoiser), which then gets float64 inputs."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    for b in module.buffers():
        if b.is_floating_point():
            return b.dtype
    return None


# ====================================================================================================
# Consistency parameterisation (arXiv 2303.01469; the boundary at rho_min)
# ====================================================================================================
def cm_coefficients(rho: Tensor, sigma_data: float, rho_min: float) -> tuple[Tensor, Tensor]:
    """``c_skip = sd^2 / ((rho - rho_min)^2 + sd^2)``, ``c_out = sd (rho - rho_min) / sqrt(sd^2 + rho^2)``.

    ``f = c_skip y + c_out F`` then satisfies ``f(y, rho_min) = y`` exactly (``c_skip = 1``,
    ``c_out = 0``) for any finite ``F`` (arXiv 2303.01469, written in the VE level ``rho``).
    """
    rho = rho.to(torch.float64)
    sd = float(sigma_data)
    c_skip = sd * sd / ((rho - rho_min) ** 2 + sd * sd)
    c_out = sd * (rho - rho_min) / (sd * sd + rho * rho).sqrt()
    return c_skip, c_out


def consistency_function(net: Denoiser, x_t: Tensor, t, cond=None, *, rho_min: float,
                         sigma_data: float | None = None) -> Tensor:
    """The consistency function ``f(x_t, t)`` of a denoiser network, in x0 space (``x_t``'s dtype).

    With ``y = x_t / a_t`` (the VE state), the network's denoiser output ``D`` is read as an
    EDM-preconditioned raw output ``F = (D - c_skip^EDM y) / c_out^EDM`` (arXiv 2206.00364 Table 1) and
    re-assembled with the consistency coefficients of :func:`cm_coefficients`:

        f = c_skip^CM y + c_out^CM F = c_skip^CM y + (1 - rho_min/rho) (D - sd^2/(rho^2 + sd^2) y),

    because ``c_out^CM / c_out^EDM = (rho - rho_min)/rho``. So ``f(x, t) = y`` exactly where
    ``rho(t) = rho_min`` (for EDM, ``f = x``), and ``f ~ D`` for ``rho >> rho_min``: a pretrained
    denoiser is already a near-consistency initialisation, as in CD from a teacher. Defined for
    ``rho >= rho_min``. ``sigma_data`` defaults to the network's own (0.5 if it has none).
    """
    sd = float(sigma_data if sigma_data is not None else getattr(net, "sigma_data", 0.5))
    t = _batch_t(t, x_t)
    p = net.process
    a = _col(p.alpha(t), x_t)
    rho = _col(p.rho(t), x_t)
    y = x_t.double() / a
    d = net(x_t, t, cond).double()
    c_skip, _ = cm_coefficients(rho, sd, rho_min)
    ratio = torch.where(rho > rho_min, 1 - rho_min / rho.clamp(min=1e-300), torch.zeros_like(rho))
    f = c_skip * y + ratio * (d - sd * sd / (rho * rho + sd * sd) * y)
    return f.to(x_t.dtype)


# ====================================================================================================
# Distances and iCT discretisation (arXiv 2310.14189)
# ====================================================================================================
def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant ``c = 0.00054 sqrt(d)`` for data of ``d`` elements per sample."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Per-sample ``sqrt(||x - y||^2 + c^2) - c`` (arXiv 2310.14189), shape ``(B,)``.

    Written as ``r^2 / (sqrt(r^2 + c^2) + c)`` (the same number) so small residuals do not cancel:
    ``~ r^2 / (2c)`` for ``r << c`` (L2 scaled by ``1/2c``), ``~ r - c`` for ``r >> c`` (L1-like);
    ``c = 0`` is the L2 norm ``||x - y||`` (ECT, arXiv 2406.14548), finite with a finite gradient at ``x = y``.
    """
    r2 = (x - y).reshape(x.shape[0], -1).pow(2).sum(1)
    # c = 0 (ECT's plain L2 norm) would be 0/0 at a zero residual; below the dtype's tiny the value is 0 anyway
    r2 = r2.clamp(min=torch.finfo(r2.dtype).tiny)
    return r2 / ((r2 + c * c).sqrt() + c)


def karras_levels(n: int, rho_min: float = 0.002, rho_max: float = 80.0, power: float = 7.0) -> Tensor:
    """``n`` Karras noise levels in **ascending** order, ``rho_0 = rho_min < ... < rho_{n-1} = rho_max``
    (arXiv 2206.00364 eq. 5; the iCT/CD discretisation, float64)."""
    if n < 2:
        raise ValueError(f"a discretisation needs at least 2 levels, got {n}")
    return get_rhos_karras(n, rho_min, rho_max, power)[:-1].flip(0)


def ict_num_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's doubling curriculum ``N(k) = min(s0 2^floor(k/K'), s1) + 1`` with
    ``K' = floor(K / (log2 floor(s1/s0) + 1))`` (arXiv 2310.14189)."""
    stages = int(math.log2(s1 // s0)) + 1
    k_prime = max(total_steps // stages, 1)
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def lognormal_index_probs(levels: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Probabilities of the pair index ``i`` (pairs ``(rho_i, rho_{i+1})``, ``i < n - 1``):
    ``p(i) ∝ erf((ln rho_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln rho_i - P_mean)/(sqrt2 P_std))``,
    the lognormal mass between the two levels (arXiv 2310.14189)."""
    z = (levels.to(torch.float64).log() - p_mean) / (math.sqrt(2.0) * p_std)
    mass = torch.erf(z[1:]) - torch.erf(z[:-1])
    return mass / mass.sum()


def sample_pair_indices(n: int, levels: Tensor, p_mean: float = -1.1, p_std: float = 2.0,
                        generator: torch.Generator | None = None) -> Tensor:
    """``n`` pair indices drawn from :func:`lognormal_index_probs` (LongTensor on the CPU)."""
    probs = lognormal_index_probs(levels, p_mean, p_std)
    return torch.multinomial(probs, n, replacement=True, generator=generator)


def pair_weight(levels: Tensor, idx: Tensor) -> Tensor:
    """iCT's ``lambda(rho_i) = 1 / (rho_{i+1} - rho_i)`` (float64, ``(B,)``)."""
    levels = levels.to(torch.float64)
    return 1.0 / (levels[idx + 1] - levels[idx])


def level_times(process: Process, levels: Tensor) -> Tensor:
    """Canonical times of noise levels (``process.t_from_rho``; exactly the uniform grid for EDM)."""
    return process.t_from_rho(levels)


# ====================================================================================================
# ECT: continuous-time consistency training with a shrinking gap (arXiv 2406.14548)
# ====================================================================================================
def ect_stage(step: int, stage_steps: int) -> int:
    """ECT's stage ``floor(step / stage_steps)``: the gap ``t - r`` shrinks by ``q`` at every stage."""
    return int(step) // int(stage_steps)


def ect_rho_r(rho_t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping ``r(t) = max(0, t (1 - q^-(stage+1) (1 + k sigmoid(-b t))))`` on VE levels (float64).

    ``r < t`` always, and ``(t - r)/t = q^-(stage+1) (1 + k sigmoid(-b t))`` falls by ``q`` per stage
    (``dt -> 0``: the continuous-time limit); the sigmoid widens the gap at small ``t``, where at early stages
    ``r`` reaches 0 and the pair's target is the clean sample (arXiv 2406.14548, the "sigmoid" mapping).
    """
    rho_t = rho_t.to(torch.float64)
    gap = (1.0 + k * torch.sigmoid(-b * rho_t)) / float(q) ** (stage + 1)
    return (rho_t * (1.0 - gap)).clamp(min=0.0)


def sample_lognormal_levels(n: int, p_mean: float, p_std: float, lo: float, hi: float,
                            generator: torch.Generator | None = None) -> Tensor:
    """``n`` VE levels with ``ln rho ~ N(p_mean, p_std^2)``, clamped to ``[lo, hi]`` (float64, CPU)."""
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    return (p_mean + p_std * z).exp().clamp(lo, hi)


# ====================================================================================================
# Teacher PF-ODE step between adjacent levels (CD, arXiv 2303.01469)
# ====================================================================================================
ODE_SOLVERS = ("heun", "euler", "ddim")


@torch.no_grad()
def teacher_ode_step(teacher: Denoiser, x_t: Tensor, t, t_next, solver: str = "heun", cond=None,
                     w: float = 1.0) -> Tensor:
    """One PF-ODE step of the (guided) teacher from ``t`` to ``t_next`` per sample; returns ``x_{t_next}``.

    Integrated in the VE coordinates of :mod:`scoredistill.sampling` (``y = x/a``,
    ``dy/drho = (y - D)/rho``, arXiv 2206.00364 eq. 3), with per-sample levels: ``euler`` (= ``ddim``,
    which is exactly Euler in these coordinates) or EDM's ``heun`` (second evaluation at ``t_next``,
    skipped where ``rho(t_next) = 0``).
    """
    if solver not in ODE_SOLVERS:
        raise ConfigError("objective.solver", f"unknown value {solver!r}; accepted: {', '.join(ODE_SOLVERS)}")
    p = teacher.process
    t, t_next = _batch_t(t, x_t), _batch_t(t_next, x_t)
    a, a_n = _col(p.alpha(t), x_t), _col(p.alpha(t_next), x_t)
    r, r_n = _col(p.rho(t), x_t), _col(p.rho(t_next), x_t)
    y = x_t.double() / a
    d = (y - teacher.guided(x_t, t, cond, w).double()) / r
    y_n = y + (r_n - r) * d
    if solver == "heun":
        x_n = (a_n * y_n).to(x_t.dtype)
        d2 = (y_n - teacher.guided(x_n, t_next, cond, w).double()) / r_n.clamp(min=1e-300)
        y_n = torch.where(r_n > 0, y + (r_n - r) * 0.5 * (d + d2), y_n)
    return (a_n * y_n).to(x_t.dtype)


# ====================================================================================================
# Directional derivatives: torch.func.jvp, or float64 central differences
# ====================================================================================================
JVP_MODES = ("torch", "fd", "auto")


class _Bound(nn.Module):
    """``fn(module, *args)`` as a module, so ``torch.func.functional_call`` can swap ``module``'s tensors
    (float64 copies) for every method ``fn`` calls on it."""

    def __init__(self, fn, module):
        super().__init__()
        self.fn = fn
        self.m = module

    def forward(self, *args):
        return self.fn(self.m, *args)


def _innermost_failing(fn, module: nn.Module, primals, tangents) -> str:
    """Re-run the failing ``jvp`` with hooks; return ``name (Class)`` of the innermost module active
    when it raised (the one without a forward-mode rule)."""
    stack: list[nn.Module] = []

    def enter(mod, inp):
        stack.append(mod)

    def leave(mod, inp, out):  # must return None: a forward hook's return value replaces the output
        stack.pop()

    handles = []
    for m in module.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        torch.func.jvp(lambda *p: fn(module, *p), primals, tangents)
    except Exception:  # noqa: BLE001 -- we only locate the failure here
        pass
    finally:
        for h in handles:
            h.remove()
    culprit = stack[-1] if stack else module
    names = {id(m): n for n, m in module.named_modules()}
    name = names.get(id(culprit)) or "<root>"
    return f"{name} ({type(culprit).__name__})"


@dataclass
class Tangent:
    """Directional derivative ``d/ds fn(module, p + s dp)`` at ``s = 0`` (a JVP), by mode:

    * ``torch`` -- forward-mode AD in the network's own dtype (exact up to its rounding): dual tensors with
      the closed-form tangent rules of :mod:`scoredistill.models.tangent` for linear, convolution, SiLU,
      LayerNorm, GroupNorm and constant arithmetic (~2x cheaper than ``torch.func.jvp`` with torch's own
      rules, the same tangent to float rounding); ``native=True``, or a network the dual pass fails on,
      takes ``torch.func.jvp``. A module without a forward-mode rule (a custom autograd Function or fused
      attention kernel without ``jvp``) raises a one-line :class:`ConfigError` on ``objective.jvp``
      naming it.
    * ``fd`` -- central finite difference ``(fn(p + h dp) - fn(p - h dp)) / 2h`` with the module's
      parameters and floating inputs cast to float64 (``torch.func.functional_call``, the weights are
      not touched) and the RNG state replayed so dropout masks agree (sCM's fallback, arXiv 2410.11081).
      ``h`` is per sample (``fd_step`` times ``step_scale``, see :meth:`__call__`).
    * ``auto`` -- ``torch``; on the first failure one warning line (``log`` if given, else
      :mod:`warnings`) and ``fd`` from then on.

    Returns ``(primal, derivative)``: the primal in the caller's grad mode (so it carries the graph to
    the parameters when grad is enabled) and the derivative detached, in float64.
    """

    mode: str = "auto"
    fd_step: float = 1e-4
    log: Callable[[str], None] | None = None
    native: bool = False
    fell_back: bool = field(default=False, init=False)
    _dual_failed: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if self.mode not in JVP_MODES:
            raise ConfigError("objective.jvp", f"unknown value {self.mode!r}; accepted: {', '.join(JVP_MODES)}")

    @property
    def active(self) -> str:
        """The path the next call takes (``auto`` resolves to ``torch`` or, after a failure, ``fd``)."""
        if self.mode == "auto":
            return "fd" if self.fell_back else "torch"
        return self.mode

    def __call__(self, fn, module: nn.Module, primals: tuple, tangents: tuple,
                 step_scale: Tensor | None = None):
        """``fn(module, *primals)`` and its derivative along ``tangents``. ``step_scale`` (``(B,)``):
        per-sample multiplier of the finite-difference step (the ``fd`` path only).

        The ``torch`` path takes both from one ``jvp`` in the caller's grad mode; the ``fd`` path
        evaluates the primal separately (same RNG state as the differences)."""
        if self.active == "torch":
            try:
                out, dout = self._jvp(fn, module, primals, tangents)
                return out, dout.detach().double()
            except (RuntimeError, NotImplementedError, TypeError) as e:
                self._failed(e, fn, module, primals, tangents)
        device = _device(primals)
        with _same_rng(device):
            out = fn(module, *primals)
        return out, self._fd(fn, module, primals, tangents, step_scale)

    def derivative(self, fn, module: nn.Module, primals: tuple, tangents: tuple,
                   step_scale: Tensor | None = None) -> Tensor:
        """Only the derivative (no graph, float64), with the RNG state left as it was on entry, so a
        following primal pass (of this network or of a copy, such as the sCM student beside its target)
        sees the same dropout masks."""
        device = _device(primals)
        if self.active == "torch":
            try:
                with torch.no_grad(), _same_rng(device):
                    return self._jvp(fn, module, primals, tangents)[1].double()
            except (RuntimeError, NotImplementedError, TypeError) as e:
                self._failed(e, fn, module, primals, tangents)
        return self._fd(fn, module, primals, tangents, step_scale)

    def _jvp(self, fn, module, primals, tangents):
        """The ``torch`` path: the dual-tensor pass unless ``native``; after a failure of the dual pass (once,
        with the RNG state rewound, so dropout masks are drawn as by one pass) ``torch.func.jvp``."""
        f = lambda *p: fn(module, *p)  # noqa: E731
        if not (self.native or self._dual_failed):
            device = _device(primals)
            rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
            try:
                return dual_jvp(f, primals, tangents)
            except (RuntimeError, NotImplementedError, TypeError):
                self._dual_failed = True
                torch.set_rng_state(rng[0])
                if rng[1] is not None:
                    torch.cuda.set_rng_state(rng[1], device)
        return torch.func.jvp(f, primals, tangents)

    def _failed(self, e: Exception, fn, module, primals, tangents) -> None:
        """Raise the one-line error (``torch``) or log the one fallback line (``auto``)."""
        where = _innermost_failing(fn, module, primals, tangents)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if self.mode == "torch":
            raise ConfigError("objective.jvp", f"torch.func.jvp failed in module {where}: {first[:160]}; "
                              "use jvp: fd (float64 finite differences) or jvp: auto") from None
        self.fell_back = True
        msg = (f"objective.jvp: torch.func.jvp failed in module {where} ({first[:120]}); "
               "falling back to float64 finite differences")
        if self.log is not None:
            self.log(msg)
        else:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _fd(self, fn, module, primals, tangents, step_scale) -> Tensor:
        device = _device(primals)
        params = {f"m.{k}": (v.detach().double() if v.is_floating_point() else v)
                  for k, v in list(module.named_parameters()) + list(module.named_buffers())}
        bound = _Bound(fn, module)
        h = self.fd_step * (step_scale.to(torch.float64) if step_scale is not None else torch.ones(()))

        def shifted(sign):
            args = []
            for p, d in zip(primals, tangents):
                if torch.is_tensor(p) and p.is_floating_point():
                    p64 = p.detach().double()
                    args.append(p64 + sign * _col(h, p64).to(p64.device) * d.detach().double())
                else:
                    args.append(p)
            with _same_rng(device):
                return torch.func.functional_call(bound, params, tuple(args)).double()

        with torch.no_grad():
            plus, minus = shifted(1.0), shifted(-1.0)
            return (plus - minus) / (2 * _col(h, plus).to(plus.device))


def _device(primals) -> torch.device:
    return next((p.device for p in primals if torch.is_tensor(p)), torch.device("cpu"))


def _same_rng(device: torch.device):
    """Run a block and restore the RNG state after it: every pass of one derivative draws the same
    dropout masks (sCM's forked RNG, arXiv 2410.11081)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ====================================================================================================
# sCM / rCM (arXiv 2410.11081, 2510.08431) in TrigFlow coordinates
# ====================================================================================================
@torch.no_grad()
def teacher_velocity(trig: TrigFlow, teacher: Denoiser, x_tau: Tensor, t, cond=None, w: float = 1.0) -> Tensor:
    """sCD's ``dx_tau/dtau``: the (guided) teacher's PF-ODE drift ``(cos tau x_tau - D^w)/sin tau`` at the
    TrigFlow state ``x_tau`` of canonical time ``t`` (float64). Guidance is canonical CFG on ``D``,
    which is CFG on the velocity since the map ``D -> v`` is affine."""
    t = _batch_t(t, x_tau)
    d = trig.denoise(teacher, x_tau, t, cond, w, dtype=param_dtype(teacher))
    return trig.velocity_from_x0(x_tau, trig.tau(t), d)


def scm_F_and_tangent(trig: TrigFlow, student: Denoiser, x_tau: Tensor, t, dx_dtau: Tensor, tangent: Tangent,
                      cond=None) -> tuple[Tensor, Tensor]:
    """The student's ``F_theta(x_tau, tau)`` (float64, on the autograd graph when grad is enabled) and
    ``cos(tau) sin(tau) dF/dtau`` along the PF-ODE (float64, detached).

    The total derivative is one JVP of ``F`` at ``(x_tau, t)`` with tangent
    ``cos(tau) sin(tau) (dx_tau/dtau, dt/dtau)`` -- sCM's scaled tangent (arXiv 2410.11081, which
    keeps it finite as ``tau -> pi/2``); ``dt/dtau = 1/tau'(t)`` comes from forward-mode AD through the
    process schedule, so the network is differentiated in its own canonical time. The finite-difference
    step is ``fd_step * tau`` in ``tau`` (relative, as the network varies on the scale of ``tau``).
    """
    F, primals, tangents, scale = _scm_jvp_args(trig, x_tau, t, dx_dtau, cond)
    dF = tangent.derivative(F, student, primals, tangents, step_scale=scale)
    return F(student, *primals), dF


@torch.no_grad()
def scm_target_tangent(trig: TrigFlow, target: Denoiser, x_tau: Tensor, t, dx_dtau: Tensor, tangent: Tangent,
                       cond=None) -> tuple[Tensor, Tensor]:
    """:func:`scm_F_and_tangent` of a frozen target network ``F^-``: both outputs detached, float64, from
    one ``jvp`` (the ``torch`` path) -- what the sCM loss reads of its target."""
    F, primals, tangents, scale = _scm_jvp_args(trig, x_tau, t, dx_dtau, cond)
    out, dF = tangent(F, target, primals, tangents, step_scale=scale)
    return out.double(), dF


def _scm_jvp_args(trig: TrigFlow, x_tau: Tensor, t, dx_dtau: Tensor, cond):
    """``(F, primals, tangents, fd step scale)`` of sCM's scaled tangent (see :func:`scm_F_and_tangent`)."""
    t = _batch_t(t, x_tau)
    tau = trig.tau(t)
    cs = torch.cos(tau) * torch.sin(tau)
    dt = cs / trig.dtau_dt(t)
    dx = _col(cs, x_tau) * dx_dtau.double()

    def F(net, x, tt):
        return trig.F(net, x, tt, cond, dtype=param_dtype(net))

    return F, (x_tau.double(), t), (dx, dt), tau / cs.clamp(min=1e-12)


def scm_tangent(trig: TrigFlow, F_minus: Tensor, dF_scaled: Tensor, x_tau: Tensor, dx_dtau: Tensor, tau,
                r: float = 1.0) -> Tensor:
    """sCM's tangent ``g = -cos^2(tau) (sd F^- - dx/dtau) - r cos(tau) sin(tau) (x_tau + sd dF^-/dtau)``
    (arXiv 2410.11081, with warm-up factor ``r``), float64, detached. ``dF_scaled`` is
    ``cos(tau) sin(tau) dF^-/dtau`` as returned by :func:`scm_F_and_tangent`.

    The loss ``||F_theta - sg(F_theta) - g||^2`` then has the gradient ``-2 dF_theta/dtheta^T g``, the
    continuous-time consistency gradient ``∝ df/dtheta^T df^-/dtau`` of ``f = cos x - sd sin F``.
    """
    tau = _col(_batch_t(tau, x_tau), x_tau)
    c, s = torch.cos(tau), torch.sin(tau)
    sd = trig.sigma_data
    g1 = -c * c * (sd * F_minus.detach().double() - dx_dtau.double())
    g2 = -(c * s * x_tau.double() + sd * dF_scaled.double())
    return (g1 + r * g2).detach()


def normalize_tangent(g: Tensor, c: float = 0.1, size_invariant: bool = False) -> Tensor:
    """``g / (||g|| + c)`` per sample (sCM's tangent normalisation, arXiv 2410.11081, c = 0.1);
    ``size_invariant`` divides the norm by ``sqrt(numel per sample)`` first (FastGen's option), so the
    same ``c`` means the same thing at every resolution."""
    n = g.reshape(g.shape[0], -1).norm(dim=1)
    if size_invariant:
        n = n / math.sqrt(g[0].numel())
    return g / (_col(n, g).to(g.dtype) + c)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """sCM's warm-up factor ``r = min(1, step / warmup_steps)`` (10k steps in the paper; 0 disables)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def scm_prior_weight(trig: TrigFlow, tau) -> Tensor:
    """sCM's prior weight ``1/(sd tan tau)``: one over the VE noise level (arXiv 2410.11081)."""
    return 1.0 / trig.rho_of_tau(tau)


def scm_loss(F_theta: Tensor, g: Tensor, weight: Tensor | float = 1.0, logvar: Tensor | None = None) -> Tensor:
    """Per-sample sCM loss ``w/e^{logvar} mean((F_theta - sg F_theta - g)^2) + logvar`` (``(B,)``, float64).

    ``mean`` is ``||.||^2 / D`` with ``D`` the elements per sample; ``logvar`` the output of
    :class:`AdaptiveWeight` (omit it for the unweighted loss). The value of the squared term is
    ``||g||^2`` (``F_theta - sg F_theta = 0``); only its gradient matters.
    """
    F64 = F_theta.double()
    diff = F64 - F64.detach() - g.double()
    per = diff.reshape(diff.shape[0], -1).pow(2).mean(1)
    w = weight if not torch.is_tensor(weight) else weight.to(device=per.device, dtype=torch.float64)
    if logvar is None:
        return w * per
    lv = logvar.reshape(-1).double()
    return w * per / lv.exp() + lv


class AdaptiveWeight(nn.Module):
    """sCM's learned loss weight: ``tau -> logvar(tau)`` (arXiv 2410.11081, the adaptive weighting
    of EDM2, arXiv 2312.02696). Fourier features of ``c_noise = ln(sd tan tau)/4`` and one linear map,
    zero-initialised (``logvar = 0``: weight 1). Minimising ``L/e^{lv} + lv`` over ``lv`` gives
    ``lv = ln L``, so the weighted loss is the loss relative to its running level at that time."""

    def __init__(self, sigma_data: float = 0.5, channels: int = 128):
        super().__init__()
        self.sigma_data = float(sigma_data)
        g = torch.Generator().manual_seed(0)  # fixed features: the head is a function of tau only
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels // 2, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels // 2, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tau: Tensor) -> Tensor:
        c = (self.sigma_data * torch.tan(tau.double())).log().float().to(self.freqs.device) / 4
        arg = c[:, None] * self.freqs[None] + self.phases[None]
        feats = torch.cat([arg.cos(), arg.sin()], 1) * math.sqrt(2)
        return self.linear(feats).squeeze(1)


# ====================================================================================================
# MeanFlow (arXiv 2505.13447)
# ====================================================================================================
def meanflow_target(u_fn, module: nn.Module, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                    tangent: Tangent) -> tuple[Tensor, Tensor]:
    """The average velocity ``u = u_fn(module, z, r, t)`` and MeanFlow's target
    ``sg(v - (t - r) du/dt)`` with the total derivative ``du/dt = v . d_z u + d_t u`` -- one JVP with
    tangent ``(v, 0, 1)`` (arXiv 2505.13447). At ``r = t`` the target is ``v``: plain flow
    matching. ``r``, ``t`` are ``(B,)``; ``v`` the instantaneous velocity at ``(z, t)``. Float64 target.
    """
    zeros, ones = torch.zeros_like(r), torch.ones_like(t)
    u, du = tangent(u_fn, module, (z, r, t), (v, zeros, ones), step_scale=None)
    gap = _col((t - r).double(), z)
    return u, (v.double() - gap * du).detach()


# ====================================================================================================
# Truncated consistency (TCM, arXiv 2410.14895)
# ====================================================================================================
def tcm_split(t: Tensor, t_prime: float) -> tuple[Tensor, Tensor]:
    """Masks ``(denoise, consistency)`` of TCM's second stage: below the dividing time ``t'`` the network
    is trained as a denoiser, from ``t'`` up as a consistency function."""
    cons = t >= t_prime
    return ~cons, cons


def tcm_sample_times(n: int, process: Process, t_prime: float, denoise_fraction: float,
                     generator: torch.Generator | None = None) -> Tensor:
    """Canonical times for TCM stage 2: a fraction ``denoise_fraction`` uniform on ``[t_min, t')``,
    the rest uniform on ``[t', t_max]`` (a two-range mixture; the split is the method's knob)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    pick = torch.rand(n, generator=generator, dtype=torch.float64) < denoise_fraction
    lo, hi = process.t_min, process.t_max
    tp = min(max(t_prime, lo), hi)
    return torch.where(pick, lo + u * (tp - lo), tp + u * (hi - tp))


def tcm_pair_target(x_s: Tensor, s: Tensor, t_prime: float, target_fn, boundary_fn) -> Tensor:
    """Consistency target of a pair whose earlier point is ``(x_s, s)``: the target network's
    ``f^-(x_s, s)`` while ``s > t'``, and the frozen stage-1 network used as a denoiser,
    ``D_1(x_s, s)``, where the pair reaches the truncation boundary ``s <= t'`` -- TCM's boundary
    condition at ``t'`` in place of the identity at ``t_min``. Each function is called only on its
    samples."""
    out = torch.empty_like(x_s)
    at = s <= t_prime
    if at.any():
        out[at] = boundary_fn(x_s[at], s[at]).to(x_s.dtype)
    if (~at).any():
        out[~at] = target_fn(x_s[~at], s[~at]).to(x_s.dtype)
    return out
