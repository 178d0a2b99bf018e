"""f-distill: f-divergence distribution matching (arXiv 2502.15681; docs/objectives/fdistill.md).

DMD2 with a density-ratio weight on the distribution-matching field, a subclass that overrides only
DMD2's weight hook :meth:`~.dmd.DMD.field_weight` (as NVlabs/FastGen's f-distill subclasses its DMD2):

    g = h(r̂(x_t)) * (D_fake(x_t) - D^w_real(x_t)) / mean|x - D^w_real(x_t)|,

injected with DMD2's mean-reduced surrogate, **plus DMD2's non-saturating GAN generator loss
(required: ``gan_weight_gen > 0``)**. ``r = p_real,t / q_t`` and ``h(r) ∝ r^2 f''(r)``:

    reverse_kl 1 | forward_kl r | js r/(1+r) | softened_rkl 1/(1+r) | neyman_chi2 1/max(r, 1e-8)
    squared_hellinger r^(1/2) | jeffreys 1 + r

(Neyman chi^2: ``f(r) = (1-r)^2/r`` => ``f'' = 2/r^3`` => ``h ∝ 1/r``; the Pearson chi^2 would be
``h ∝ r^2`` and is not in the table.)

Ratio estimate: the discriminator head on the fake network's features
is trained with DMD2's non-saturating BCE (real vs generated, both re-noised at ``t`` from the
**same** time sampler as the field, as FastGen samples both from ``sample_t_cfg``), so its logit
estimates ``log(p_real,t / q_t)``. At the **same noisy sample** ``x_t`` used for the score difference:
``r̂ = exp(clamp(logit, -10, 10))``, detached, then ``clamp(r̂, 0.1, 20)``; optional per-time-bin
normalisation (10 equal-width bins over the process's t range, EMA of the per-bin mean ratio with
``ratio_ema_rate``; 0 = current batch only) ``r̂ <- r̂ / (bin_mean + 1e-6)``; finally
``h <- h / (mean_batch h + 1e-6)`` so the weights average to one. **Stop-gradients:** the field,
``r̂`` and ``h`` are detached; only the GAN generator term backpropagates (through the frozen fake
network and head) into ``x``. The generator GAN term uses the logits at the same ``x_t`` (FastGen).

The estimator's own settings: head capacity (``ratio_head_width/depth``, via :meth:`discriminator_arch`),
``ratio_updates`` discriminator terms per fake step (fresh re-noisings, averaged), and an optional time
range ``ratio_t_min..ratio_t_max`` for its re-noising, outside which ``r̂ = 1``; its learning rate is the
engine's ``train.disc_lr``. ``scoredistill.bench.fdistill`` checks ``log r̂`` against the exact log ratio of
a Gaussian student and a GMM teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import register
from scoredistill.objectives.dmd import DMD2, DMD2Params
from scoredistill.process.time import Uniform

# h(r) up to a constant, r = p_real / q_fake (FastGen names in comments)
WEIGHTS = {
    "reverse_kl": lambda r: torch.ones_like(r),            # rkl (= DMD / DMD2)
    "forward_kl": lambda r: r,                             # kl
    "js": lambda r: 1 - 1 / (1 + r),                       # js
    "softened_rkl": lambda r: 1 / (1 + r),                 # sf
    "neyman_chi2": lambda r: 1 / torch.clamp(r, min=1e-8),  # neyman
    "squared_hellinger": lambda r: r ** 0.5,               # sh
    "jeffreys": lambda r: 1 + r,                           # jf
}
# FastGen's config names, accepted as aliases
ALIASES = {"rkl": "reverse_kl", "kl": "forward_kl", "sf": "softened_rkl", "neyman": "neyman_chi2",
           "sh": "squared_hellinger", "jf": "jeffreys"}


@dataclass
class FDistillParams(DMD2Params):
    divergence: str = key("js", "the f-divergence h(r) (FastGen's method default; its CIFAR-10 config uses "
                          "forward_kl); FastGen's short names are aliases", choices=(*WEIGHTS, *ALIASES))
    gan_weight_gen: float = key(1e-3, "generator GAN weight (FastGen default): the ratio is read from the "
                                "discriminator this term trains, so it must be > 0", lo=0, lo_open=True)
    logit_clamp: float = key(10.0, "r = exp(clamp(logit, +-logit_clamp))", lo=0, lo_open=True)
    ratio_lower: float = key(0.1, "lower clamp of r", lo=0, lo_open=True)
    ratio_upper: float = key(20.0, "upper clamp of r", lo=0, lo_open=True)
    ratio_normalization: bool = key(True, "divide r by its per-time-bin mean")
    ratio_bins: int = key(10, "equal-width time bins of that mean", lo=1)
    ratio_ema_rate: float = key(0.0, "EMA of the per-bin mean (0: current batch only, FastGen default; 0.5 "
                                "for ImageNet-64)", lo=0, hi=1, hi_open=True)
    # the density-ratio estimator (discriminator head on the fake network's features)
    ratio_head_width: int = key(128, "hidden width of the discriminator head (DMD2's GAN head: 128)", lo=1)
    ratio_head_depth: int = key(1, "hidden layers of the discriminator head", lo=1, hi=8)
    ratio_updates: int = key(1, "discriminator loss terms per fake step, each on a fresh re-noising of the "
                             "same samples (more ratio signal per network update)", lo=1, hi=64)
    ratio_t_min: float | None = key(None, "lower canonical time of the discriminator's re-noising and of the "
                                    "ratio weights (null: the field's time sampler everywhere)", lo=0, hi=1)
    ratio_t_max: float | None = key(None, "upper canonical time of that range; field samples outside it get "
                                    "r = 1", lo=0, hi=1)

    def validate(self):
        DMD2Params.validate(self)
        self.divergence = ALIASES.get(self.divergence, self.divergence)
        if (self.ratio_t_min is None) != (self.ratio_t_max is None):
            raise ConfigError("objective.ratio_t_max", "objective.ratio_t_min and ratio_t_max are set together "
                              f"(both null: the field's times), got {self.ratio_t_min} and {self.ratio_t_max}")
        if self.ratio_t_min is not None and self.ratio_t_min >= self.ratio_t_max:
            raise ConfigError("objective.ratio_t_max", f"must be > objective.ratio_t_min ({self.ratio_t_min}), "
                              f"got {self.ratio_t_max}")
        if self.ratio_lower > self.ratio_upper:
            raise ConfigError("objective.ratio_lower", f"must be <= objective.ratio_upper ({self.ratio_upper}), "
                              f"got {self.ratio_lower}")


def ratio_from_logits(logits: torch.Tensor, clamp: float = 10.0, lower: float = 0.1,
                      upper: float = 20.0) -> torch.Tensor:
    """``clamp(exp(clamp(logit, ±clamp)), lower, upper)``, detached, float64."""
    return logits.detach().double().clamp(-clamp, clamp).exp().clamp(lower, upper)


def f_weight(divergence: str, r: torch.Tensor) -> torch.Tensor:
    """``h(r)`` of the table (not yet mean-normalised)."""
    return WEIGHTS[ALIASES.get(divergence, divergence)](r)


@register
class FDistill(DMD2):
    name = "fdistill"
    Params = FDistillParams
    logits_at_field_sample = True  # r̂ is estimated at the field's own x_t (FastGen)

    def __init__(self, params, time=None, fake_time=None):
        super().__init__(params, time, fake_time)
        self.bins = torch.ones(int(params.ratio_bins), dtype=torch.float64)

    # -- the density-ratio estimator ---------------------------------------------------------------------
    def discriminator_arch(self) -> dict:
        return {"width": self.p.ratio_head_width, "depth": self.p.ratio_head_depth}

    def ratio_updates(self) -> int:
        return self.p.ratio_updates

    def _ratio_range(self) -> tuple[float, float] | None:
        p = self.p
        return None if p.ratio_t_min is None else (p.ratio_t_min, p.ratio_t_max)

    def _disc_t(self, batch, n, device, process):
        rng = self._ratio_range()
        if rng is None:
            return super()._disc_t(batch, n, device, process)
        return Uniform(t_min=rng[0], t_max=rng[1])(n, process, generator=batch.rng, device=device)

    # -- state that must survive a resume (EMA of the per-bin mean ratio) ---------------------------------
    def state_dict(self) -> dict:
        return {"bins": self.bins.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if "bins" in state:
            self.bins = torch.tensor(state["bins"], dtype=torch.float64)

    # -- weights ----------------------------------------------------------------------------------------
    def _bin_index(self, t: torch.Tensor, process) -> torch.Tensor:
        lo, hi = float(process.t_min), float(process.t_max)
        width = (hi - lo) / len(self.bins)
        return ((t.detach().double().cpu() - lo) / width).floor().long().clamp(0, len(self.bins) - 1)

    def weights(self, logits: torch.Tensor, t: torch.Tensor, process,
                update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-normalised ``h(r̂)`` per sample (detached, float64) and the clamped ratio ``r̂``."""
        p = self.p
        r = ratio_from_logits(logits, p.logit_clamp, p.ratio_lower, p.ratio_upper)
        rng = self._ratio_range()
        if rng is not None:  # the head is not trained outside its range: reverse-KL weight (r = 1) there
            td = t.detach().to(r.device)
            r = torch.where((td >= rng[0]) & (td <= rng[1]), r, torch.ones_like(r))
        ratio = r
        if p.ratio_normalization:
            idx = self._bin_index(t, process)
            cnt = torch.bincount(idx, minlength=len(self.bins)).double()
            tot = torch.bincount(idx, weights=r.cpu(), minlength=len(self.bins))
            valid = cnt > 0
            bins = self.bins.clone()
            bins[valid] = bins[valid] * p.ratio_ema_rate + (1 - p.ratio_ema_rate) * (tot[valid] / cnt[valid])
            if update:
                self.bins = bins
            ratio = r / (bins[idx].to(r.device) + 1e-6)
        h = f_weight(p.divergence, ratio)
        h = h / (h.mean() + 1e-6)
        return h.detach(), r

    def field_weight(self, logits, t, process):
        h, r = self.weights(logits, t, process)
        return h, {"h_min": h.min(), "h_max": h.max(), "ratio_mean": r.mean()}
