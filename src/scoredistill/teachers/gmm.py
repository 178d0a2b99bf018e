"""Gaussian-mixture teachers with exact denoisers under every process (docs/teachers.md).

For ``p = sum_k pi_k N(mu_k, s_k^2 I)`` and ``x_t = a x0 + s eps``:
``p_t = sum_k pi_k N(a mu_k, (a^2 s_k^2 + s^2) I)`` and the exact denoiser is the
responsibility-weighted posterior mean
``E[x0 | x_t] = sum_k r_k(x_t) (mu_k + a s_k^2 / (a^2 s_k^2 + s^2) (x_t - a mu_k))``.
A class label restricts the mixture to the components of that class, so classifier-free guidance
can be tested exactly.
"""

from __future__ import annotations

import math

import torch

from scoredistill.config import TeacherConfig, teacher_config
from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import NULL_CLASS, Denoiser, expand_t
from scoredistill.process.processes import EDM, Process


class GMMTeacher(Denoiser):
    """Exact-score Gaussian-mixture teacher of any dimension (isotropic components)."""

    def __init__(self, means, stds, weights=None, classes=None, process: Process | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ConfigError("teacher.means", "must be a list of equal-length vectors (K x D)")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.dim() == 0:
            stds = stds.expand(k).clone()
        if stds.shape != (k,):
            raise ConfigError("teacher.stds", f"needs one std per mean ({k}), got {tuple(stds.shape)}")
        if not torch.all(stds > 0):
            raise ConfigError("teacher.std", "must be > 0")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,):
            raise ConfigError("teacher.weights", f"needs one weight per mean ({k}), got {tuple(weights.shape)}")
        if not torch.all(weights > 0):
            raise ConfigError("teacher.weights", "must all be > 0")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        weights = weights / weights.max()  # first to [0, 1]: the sum of weights near 1e308 overflows to inf
        self.register_buffer("weights", weights / weights.sum())
        if classes is not None:
            classes = torch.as_tensor(classes, dtype=torch.long)
            if classes.shape != (k,) or classes.min() < 0:
                raise ConfigError("teacher.classes", f"needs one non-negative class label per mean ({k})")
            self.register_buffer("classes", classes)
            self.num_classes = int(classes.max()) + 1
        else:
            self.classes = None
            self.num_classes = None
        self.process = process or EDM()
        self.data_shape = (d,)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def data_std(self) -> float:
        """Overall standard deviation of the mixture (per coordinate, averaged)."""
        m = (self.weights[:, None] * self.means).sum(0)
        second = (self.weights * (self.stds**2 * self.dim + (self.means**2).sum(1))).sum()
        return float(((second - (m**2).sum()) / self.dim).sqrt())

    def _log_mix_weights(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        logw = self.weights.log().expand(batch, -1)
        if cond is None or self.classes is None:
            return logw
        cond = cond.to(self.means.device).long()
        allowed = (self.classes[None, :] == cond[:, None]) | (cond[:, None] == NULL_CLASS)
        return logw.masked_fill(~allowed, -math.inf)

    def _posterior(self, x_t, t, cond):
        """Responsibilities ``r`` (B,K) and per-component posterior means (B,K,D), float64."""
        b = x_t.shape[0]
        x = x_t.reshape(b, -1).double()
        t = expand_t(t, b, x.device)
        a = self.process.alpha(t)[:, None]
        s = self.process.sigma(t)[:, None]
        var = a * a * self.stds[None] ** 2 + s * s  # (B,K)
        diff = x[:, None, :] - a[:, :, None] * self.means[None]  # (B,K,D)
        logp = (self._log_mix_weights(cond, b) - 0.5 * self.dim * var.log()
                - 0.5 * (diff * diff).sum(-1) / var)
        r = torch.softmax(logp, dim=1)
        post = self.means[None] + (a * self.stds[None] ** 2 / var)[:, :, None] * diff
        return r, post

    def denoise(self, x_t, t, cond=None):
        r, post = self._posterior(x_t, t, cond)
        return (r[:, :, None] * post).sum(1).to(x_t.dtype).reshape(x_t.shape)

    def log_prob(self, x_t, t, cond=None):
        """``log p_t(x_t)`` (float64), for tests and density-ratio diagnostics."""
        b = x_t.shape[0]
        x = x_t.reshape(b, -1).double()
        t = expand_t(t, b, x.device)
        a = self.process.alpha(t)[:, None]
        s = self.process.sigma(t)[:, None]
        var = a * a * self.stds[None] ** 2 + s * s
        diff = x[:, None, :] - a[:, :, None] * self.means[None]
        logp = (self._log_mix_weights(cond, b) - 0.5 * self.dim * (2 * math.pi * var).log()
                - 0.5 * (diff * diff).sum(-1) / var)
        return torch.logsumexp(logp, 1)

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None,
               return_components: bool = False):
        """Exact samples from the (class-restricted) mixture, drawn and returned on the CPU so a seeded
        CPU generator gives the same samples whatever device the teacher runs on."""
        logw = self._log_mix_weights(cond.cpu() if cond is not None else None, n).cpu()
        k = torch.multinomial(logw.exp(), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means.cpu()[k] + self.stds.cpu()[k, None] * z).float()
        return (x, k) if return_components else x

    def describe(self) -> dict:
        d = {"kind": "gmm", "means": self.means.tolist(), "stds": self.stds.tolist(),
             "weights": self.weights.tolist(), "process": self.process.describe()}
        if self.classes is not None:
            d["classes"] = self.classes.tolist()
        return d


# -- presets ------------------------------------------------------------------------------------------
def _ring(n, radius):
    ang = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return torch.stack([radius * ang.cos(), radius * ang.sin()], 1)


def _random_means(k, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=torch.float64) * scale


PRESETS = {
    # 8 equal modes on a circle of radius 2 (the classic 2-D toy); modes 7.7 std apart
    "ring8": lambda: dict(means=_ring(8, 2.0), stds=0.2),
    # 5 x 5 grid with spacing 1
    "grid25": lambda: dict(
        means=torch.stack(torch.meshgrid(torch.arange(-2.0, 3.0), torch.arange(-2.0, 3.0), indexing="ij"), -1)
        .reshape(-1, 2).double(), stds=0.1),
    # two modes with weights 0.8 / 0.2 (mode dropping of the light one)
    "pair": lambda: dict(means=[[-1.5, 0.0], [1.5, 0.0]], stds=0.25, weights=[0.8, 0.2]),
    # four modes of unequal weight and width
    "asym": lambda: dict(means=[[-2.0, -1.0], [1.5, -1.5], [0.0, 2.0], [2.5, 1.5]],
                         stds=[0.3, 0.2, 0.15, 0.1], weights=[0.45, 0.3, 0.15, 0.1]),
    # six modes of unequal width whose two lightest hold 10 % and 5 % (time-to-quality benchmark, issue 17)
    "asym6": lambda: dict(means=[[-2.5, -1.0], [-0.5, -2.3], [1.8, -1.6], [2.5, 1.2], [0.2, 2.2], [-2.1, 1.8]],
                          stds=[0.3, 0.25, 0.2, 0.15, 0.2, 0.12], weights=[0.3, 0.25, 0.15, 0.15, 0.1, 0.05]),
    # 10-dimensional mixture of 5 modes (for distribution tests beyond 2-D)
    "gmm10d": lambda: dict(means=_random_means(5, 10, 1.5, 10), stds=0.3),
    # 16-dimensional mixture of 8 modes (bench suite)
    "gmm16d": lambda: dict(means=_random_means(8, 16, 1.5, 16), stds=0.3),
    # class-conditional ring: class c owns modes c and c+4 (CFG tests)
    "ring8_cond": lambda: dict(means=_ring(8, 2.0), stds=0.2, classes=[0, 1, 2, 3, 0, 1, 2, 3]),
}


def build_gmm(cfg: dict | TeacherConfig, process: Process) -> GMMTeacher:
    """Build a GMM teacher from the ``teacher`` section (``preset`` or explicit values); a dict is
    validated by the schema first (:class:`~scoredistill.config.TeacherConfig`)."""
    t = teacher_config(cfg)
    spec = {}
    if t.preset is not None:
        if t.preset not in PRESETS:
            raise ConfigError("teacher.preset", f"unknown value {t.preset!r}; accepted: {', '.join(PRESETS)}")
        spec = PRESETS[t.preset]()
    for k in ("means", "weights", "classes"):
        if getattr(t, k) is not None:
            spec[k] = getattr(t, k)
    if t.stds is not None:
        spec["stds"] = t.stds
    if t.std is not None:
        spec["stds"] = t.std
    means = torch.as_tensor(spec["means"], dtype=torch.float64)
    if t.dim is not None:
        if t.dim < means.shape[1]:
            raise ConfigError("teacher.dim", f"must be an integer >= {means.shape[1]}, got {t.dim}")
        means = torch.cat([means, torch.zeros(means.shape[0], t.dim - means.shape[1], dtype=torch.float64)], 1)
    return GMMTeacher(means, spec["stds"], spec.get("weights"), spec.get("classes"), process)
