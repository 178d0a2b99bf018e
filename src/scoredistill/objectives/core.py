"""The objective core: the math the method files are written with, once.

Notation: ``x_t = a_t x + s_t eps`` (``process.coeffs``), ``D(x_t, t, c)`` the x0 denoiser,
``eps_hat = (x_t - a_t D) / s_t``, ``D^w = D_u + w (D_c - D_u)`` the canonical classifier-free
guided prediction (arXiv 2207.12598, :meth:`~scoredistill.models.denoiser.Denoiser.guided`).

**The score-difference field.** The gradient of ``KL(q_t || p_t)`` with respect to a sample ``x`` of
``q`` (reverse-KL distribution matching) is the weighted difference of the two scores at ``x_t``,
written in either unit system:

    eps units:  g = w(t) (eps^w_teacher(x_t) - eps_fake(x_t))
    x0 units:   g = w(t) a_t / s_t (D_fake(x_t) - D^w_teacher(x_t))

(the same vector: ``eps_r - eps_f = a_t (D_f - D_r) / s_t``). VSD (arXiv 2305.16213) learns the fake
score, DMD (arXiv 2311.18828 eq. 7) replaces ``w(t)`` by a per-sample normaliser, SDS (arXiv
2209.14988) takes the injected noise as ``eps_fake``, ASD (arXiv 2407.02040) and ISM (arXiv
2311.11284) take the teacher at another time. Each method keeps its own unit system, so its
floating-point operations are those of its reference code; :data:`WEIGHTINGS` writes every weight in
both.

**Gradient injection** (:func:`inject`) turns a detached field into a loss whose gradient is the
field; the drivers' optimizers then step on it. The base classes here are what the method files
extend: :class:`FieldObjective` (the whole generator loss is an injected field),
:class:`FakeScoreObjective` (a learned fake score trained by denoising score matching) and
:class:`SiDFamily` (losses that differentiate through the teacher and the fake score).

Method pages: docs/objectives/<name>.md (generator objectives) and docs/optimize/<name>.md
(objectives of the parameter optimizer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from scoredistill.config import INT64_MAX, check_value, key, keys
from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import NULL_CLASS, Denoiser
from scoredistill.objectives.base import Batch, Objective, Roles
from scoredistill.objectives.common import denoising_loss, drop_condition, noise_like
from scoredistill.process.processes import Process
from scoredistill.process.time import LogNormal, TimeSampler, Uniform


# -- reductions and normalisers -----------------------------------------------------------------------
def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions, shaped ``(B, 1, ..., 1)`` for broadcasting."""
    return x.reshape(x.shape[0], -1).mean(1).view((-1,) + (1,) * (x.dim() - 1))


def dm_normaliser(x: torch.Tensor, d_real: torch.Tensor, clip: float = 1e-5) -> torch.Tensor:
    """DMD's per-sample ``mean|x - D_real|`` (arXiv 2311.18828 eq. 8), detached, clipped below."""
    return per_sample_mean((x - d_real).abs()).detach().clamp(min=clip)


def inject(x: torch.Tensor, g: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Surrogate ``L = 1/2 ||x - sg(x - g)||^2`` whose gradient w.r.t. ``x`` is ``g``.

    ``reduction="mean"`` (DMD2, SwiftBrush): ``dL/dx = g / numel``; ``"sum_per_sample"``
    (threestudio's ``0.5 * mse(reduction="sum") / B``): ``dL/dx_i = g_i / B``, i.e. the mean over the
    batch of the per-sample gradients ``g_i``.

    A non-finite field is *not* zeroed here (the reference codes' ``nan_to_num`` hides teacher
    failures): it makes the loss non-finite, and the engine's guard skips the step and counts it.
    """
    g = g.detach()
    target = (x - g).detach()
    sq = (x - target) ** 2
    if reduction == "mean":
        return 0.5 * sq.mean()
    if reduction == "sum_per_sample":
        return 0.5 * sq.sum() / x.shape[0]
    raise ValueError(f"reduction must be 'mean' or 'sum_per_sample', got {reduction!r}")


# -- guided evaluation in epsilon units ---------------------------------------------------------------
def to_eps(process: Process, x_t: torch.Tensor, d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``eps_hat = (x_t - a_t D) / s_t`` in float64."""
    a, s = process.coeffs(t, x_t)
    return (x_t.double() - a * d.double()) / s


def eps_of(net: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond, w: float = 1.0) -> torch.Tensor:
    """Canonical-CFG epsilon of a denoiser, float64 (``w = 1``: the plain conditional call)."""
    return to_eps(net.process, x_t, net.guided(x_t, t, cond, w), t)


def null_like(cond: torch.Tensor | None) -> torch.Tensor | None:
    """The unconditional label for every sample (``None`` stays ``None``)."""
    return None if cond is None else torch.full_like(cond, NULL_CLASS)


# -- the weighting table w(t) -------------------------------------------------------------------------
@dataclass(frozen=True)
class Weighting:
    """A weight ``w(t)`` on epsilon differences and the same weight on x0 differences,
    ``w_x0 = w_eps a_t / s_t``, each written in the form its reference code computes."""

    eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# threestudio's ``weighting_strategy`` names; ``x0`` is the plain x0 difference (LucidDreamer's
# ``sqrt((1 - alpha_bar) / alpha_bar)`` in epsilon units)
WEIGHTINGS: dict[str, Weighting] = {
    "sds": Weighting(eps=lambda a, s: s * s, x0=lambda a, s: a * s),                 # 1 - alpha_bar
    "uniform": Weighting(eps=lambda a, s: torch.ones_like(a), x0=lambda a, s: a / s),
    "fantasia3d": Weighting(eps=lambda a, s: a * s * s, x0=lambda a, s: a * a * s),  # sqrt(ab) (1 - ab)
    "x0": Weighting(eps=lambda a, s: s / a, x0=lambda a, s: torch.ones_like(a)),
}


def eps_weight(kind: str, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``w(t)`` on epsilon differences: sds ``s^2``, uniform ``1``, fantasia3d ``a s^2``, x0 ``s / a``."""
    return WEIGHTINGS[kind].eps(a, s)


def x0_weight(kind: str, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The same ``w(t)`` on x0 differences: sds ``a s``, uniform ``a / s``, fantasia3d ``a^2 s``, x0 ``1``."""
    return WEIGHTINGS[kind].x0(a, s)


# -- the score-difference field -----------------------------------------------------------------------
def score_difference(real: torch.Tensor, fake: torch.Tensor, units: str = "x0") -> torch.Tensor:
    """The unweighted field in float64: ``D_fake - D_real`` in x0 units, ``eps_real - eps_fake`` in
    epsilon units (both point from the teacher's density toward the sample distribution's)."""
    if units == "x0":
        return fake.double() - real.double()
    return real.double() - fake.double()


def score_field(weighting: str, a: torch.Tensor, s: torch.Tensor, real: torch.Tensor, fake: torch.Tensor,
                units: str) -> torch.Tensor:
    """``w(t) (eps_real - eps_fake)`` or ``w(t) a_t / s_t (D_fake - D_real)``: see the module docstring."""
    if units == "eps":
        return eps_weight(weighting, a, s) * score_difference(real, fake, "eps")
    return x0_weight(weighting, a, s) * score_difference(real, fake, "x0")


def dm_field(x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, cond, roles: Roles, w: float,
             alpha_factor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD's detached field ``(D_fake - D^w_real) / mean|x - D^w_real|`` (times ``a_t`` with
    ``alpha_factor``, arXiv 2311.18828 eq. 7-8) in ``x``'s dtype, and the normaliser."""
    with torch.no_grad():
        d_real = roles.teacher.guided(x_t, t, cond, w)
        d_fake = roles.fake(x_t, t, cond)
        norm = dm_normaliser(x, d_real)
        g = score_difference(d_real, d_fake) / norm.double()
        if alpha_factor:
            a, _ = roles.process.coeffs(t, x)
            g = g * a
    return g.to(x.dtype), norm


def finish_field(g: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """The optional element-wise clamp ``|g| <= clamp`` (threestudio ``grad_clip``, arXiv 2303.15413).
    The reference codes also apply ``nan_to_num``; the library does not (see :func:`inject`)."""
    if clamp is not None and clamp > 0:
        g = g.clamp(-float(clamp), float(clamp))
    return g


def field_diag(g: torch.Tensor, t: torch.Tensor, **extra) -> dict:
    out = {"field_norm": g.flatten(1).norm(dim=1).mean().float(), "t_mean": t.double().mean().float()}
    out.update({k: torch.as_tensor(v).double().mean().float() for k, v in extra.items()})
    return out


def uniform_time(obj: Objective, why: str) -> Uniform:
    """``objective.time`` of an objective that draws its own times inside a uniform range (``why`` says how);
    a one-line :class:`ConfigError` for any other sampler."""
    if not isinstance(obj.time, Uniform):
        raise ConfigError("objective.time", f"{obj.name} {why}; accepted: {{kind: uniform, t_min, t_max}}")
    return obj.time


# -- parameter declarations shared by the Params classes ----------------------------------------------
def weighting_key(default: str = "sds"):
    return key(default, "w(t) of the weighting table: " + " | ".join(WEIGHTINGS), choices=tuple(WEIGHTINGS))


def clamp_key():
    return key(None, "element-wise bound |g| <= grad_clamp on the field (null: off)", lo=0)


def guidance_key(default: float = 1.0, doc: str = "canonical CFG scale on the teacher (w = 1: unguided)"):
    return key(default, doc, lo=0)


def dropout_key(default: float = 0.1, doc: str = "share of labels the fake score's training drops (its "
                "unconditional branch)"):
    return key(default, doc, lo=0, hi=1, hi_open=True)


def regression_weight_key(default: float = 0.0, doc: str = "lambda_reg of a regression on teacher ODE pairs "
                          "(DMD, arXiv 2311.18828; 0: off)"):
    return key(default, doc, lo=0)


def regression_steps_key():
    return key(0, "iterations that use the regression loss (a warm-up that fixes the noise -> mode assignment "
               "before distribution matching alone); 0: every iteration", lo=0)


def ode_regression(loss: torch.Tensor, diag: dict, batch: Batch, roles: Roles, weight: float,
                   steps: int) -> torch.Tensor:
    """``loss + lambda_reg mean ||G(z_ref) - y_ref||^2`` on the teacher's ODE pairs ``(z_ref, y_ref)`` (the
    ``ode_pairs`` requirement) while ``batch.step < steps`` (always when ``steps`` is 0); ``loss`` itself after
    that or with ``weight`` 0. As a warm-up it plays the part of a generator initialised from the teacher
    (DMD2, arXiv 2405.14867): the noise -> mode assignment is fixed before the reverse-KL-type field alone,
    which cannot move mass between far-apart modes (docs/results/toy.md, third study)."""
    if weight <= 0 or (steps and batch.step >= steps):
        return loss
    reg = ((roles.generator(batch.ode_z, batch.ode_cond) - batch.ode_x) ** 2).mean()
    diag["loss_reg"] = reg.detach()
    return loss + weight * reg


def check_regression_rollout(rollout, weight: float, steps: int) -> None:
    """Refuse :func:`ode_regression` on every iteration (``regression_steps`` 0) for a K-step student re-noised by
    fresh noise (``generator.rollout: fresh``, K > 1). Its step ``k > 0`` sees ``x_k = a x0_{k-1} + s e`` with a
    fresh ``e`` that the target ``y_ref`` (the teacher's ODE output for ``z_ref``) does not depend on, so the
    regression's minimiser is the posterior mean ``E[y_ref | x_k]``, a point between the modes once ``s`` is
    large; held every iteration it keeps those steps there (recipes/toy/dmd2_4step.yaml at 128 x 3 on gmm10d,
    seed 0, 2300 iterations: steps 1-3 precision 0.000, 0/5 modes, against 0.870 and 5/5 at 4 steps with the
    recipe's warm-up to iteration 800; docs/results/toy.md). As a warm-up it first gives step 0 the teacher's
    noise -> mode map, as DMD2's (arXiv 2405.14867) one-step SDXL student starts from an ODE-regression
    pre-training. A ``fixed`` or ``ddim`` rollout is a deterministic map of ``z``: ``y_ref`` is a target it can fit."""
    if weight <= 0 or steps or rollout is None or rollout.num_steps < 2 or rollout.mode != "fresh":
        return
    raise ConfigError("objective.regression_steps", f"a {rollout.num_steps}-step student re-noised by fresh noise can "
                      "only use the regression on teacher ODE pairs as a warm-up (its later steps would regress to "
                      "a posterior mean between the modes); accepted: an iteration count >= 1, or "
                      "objective.regression_weight 0, or generator.rollout fixed or ddim")


def class_key(default: int | None, doc: str):
    return key(default, doc, lo=0, hi=INT64_MAX)


@dataclass
class _Shared:
    weighting: str = weighting_key()
    grad_clamp: float | None = clamp_key()
    guidance_scale: float = guidance_key()
    fake_cond_dropout: float = dropout_key()


# Checks of a value that is not declared with the keys above (a Params class written before the
# declarations); new Params classes declare their keys instead.
def check_weighting(value: str) -> None:
    check_value(value, keys(_Shared)["weighting"], "objective.weighting")


def check_clamp(value) -> None:
    check_value(value, keys(_Shared)["grad_clamp"], "objective.grad_clamp")


def check_guidance(value: float) -> None:
    check_value(value, keys(_Shared)["guidance_scale"], "objective.guidance_scale")


def check_dropout(name: str, value: float) -> None:
    check_value(value, keys(_Shared)["fake_cond_dropout"], f"objective.{name}")


# -- base classes ---------------------------------------------------------------------------------------
class FieldObjective(Objective):
    """An objective whose whole generator loss is an injected, fully detached field ``g``."""

    reduction = "sum_per_sample"  # threestudio / Consistent3D / ASD: sum over elements / B

    def field(self, batch: Batch, roles: Roles) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def noised(self, batch: Batch, process: Process):
        """``(x, t, eps, x_t)``: the detached samples, this call's times and fresh noise, and
        ``x_t = a_t x + s_t eps``."""
        x = batch.x.detach()
        t = self.sample_t(batch, process)
        eps = noise_like(x, batch.rng)
        return x, t, eps, process.add_noise(x, eps, t)

    def generator_loss(self, batch, roles):
        with torch.no_grad():
            g, diag = self.field(batch, roles)
        x = batch.x
        loss = inject(x, g.to(x.dtype), self.reduction)
        return {"loss": loss, **diag}


class ClassFieldObjective(FieldObjective):
    """A field that contrasts the teacher's predictions under different labels (CSD, BSD): it needs a
    class-conditional teacher and a class per sample."""

    def requirements(self):
        return {"class_conditional"}

    def noised(self, batch: Batch, process: Process):
        if batch.cond is None:
            raise ConfigError("params.classes", f"{self.name} needs a conditional teacher and a class per sample")
        return super().noised(batch, process)


class FakeScoreObjective(Objective):
    """A learned fake score of the sample distribution: EDM-weighted denoising score matching on
    detached samples (arXiv 2206.00364 eq. 2), labels dropped with ``fake_cond_dropout`` so that its
    unconditional branch exists."""

    def fake_loss(self, batch: Batch, roles: Roles) -> torch.Tensor:
        x = batch.x.detach()
        t = self.sample_t(batch, roles.process, self.fake_time)
        cond = drop_condition(batch.cond, getattr(self.p, "fake_cond_dropout", 0.0), batch.rng)
        cond = self.fake_condition(batch, roles, cond)
        sd = getattr(roles.fake, "sigma_data", 0.5)
        return denoising_loss(roles.fake, x, cond, t, batch.rng, sd)

    def fake_condition(self, batch: Batch, roles: Roles, cond):
        """The fake role's condition from the (dropped-out) labels; a view-aware fake adds the view."""
        return cond

    def requirements(self):
        return {"fake_score"}

    def auxiliary_losses(self, batch, roles):
        loss = self.fake_loss(batch, roles)
        return {"loss": loss, "loss_fake": loss.detach()}


def drop_nonfinite(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep the samples that are finite in every tensor (SiD drops NaN samples before reducing)."""
    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for v in tensors:
        keep &= torch.isfinite(v.reshape(v.shape[0], -1)).all(1)
    return tuple(v[keep] for v in tensors)


class SiDFamily(FakeScoreObjective):
    """Base of the score-identity losses (SiD arXiv 2404.04057, SIM arXiv 2410.16794, SFD arXiv
    2409.11219), which keep both networks on the autograd graph of ``x`` (their parameters frozen by
    the engine). Fake-score times default to the SiD code base's ``ln rho ~ N(-1.2, 1.2^2)`` (the EDM
    training distribution); an explicit ``objective.fake_time`` wins."""

    default_fake_time: TimeSampler = LogNormal(p_mean=-1.2, p_std=1.2)

    def differentiates_through(self):
        return {"teacher", "fake"}

    def terms(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond, roles: Roles,
              teacher_cond=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x_t`` and both denoisers at ``x_t`` (the teacher guided, at ``teacher_cond`` if given), all
        on the autograd graph of ``x``: SiD-type losses differentiate through both networks."""
        x_t = roles.process.add_noise(x, noise, t)
        f_real = roles.teacher.guided(x_t, t, cond if teacher_cond is None else teacher_cond, self.p.guidance_scale)
        f_fake = self.fake_prediction(roles.fake, x_t, t, cond)
        return x_t, f_real, f_fake

    def fake_prediction(self, fake: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The fake score's prediction inside the generator loss (SiD's Zero-/Anti-CFG override it)."""
        return fake(x_t, t, cond)
