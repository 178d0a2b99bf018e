"""Sample-quality metrics against a Gaussian-mixture target with known components.

* precision: fraction of samples inside the 99.9 % chi-square radius of some component,
  ``||x - mu_k||^2 <= s_k^2 chi2_D(0.999)``;
* modes covered: components holding at least ``cover_frac`` of their expected share of the
  precise samples;
* weight TV: total variation between the precise samples' component frequencies and the weights;
* sliced Wasserstein-2 against exact samples (with the exact-vs-exact floor available);
* MMD with a mixture of RBF bandwidths; spread ratio (sample std / target std);
* within-component std ratio: how wide each mode is compared with the target's component
  (``within_std`` pooled over precise samples, ``within_std_min`` the narrowest covered mode);
* per-component mass among precise samples (``component_mass``) and ``mass_ratio_min``, the smallest
  mass / weight over components of weight >= 5 % (light modes under-represented -> well below 1).

What each figure can and cannot see is in docs/results/reading-toy-results.md: precision, modes, TV
and the global spread are all blind to modes that are too sharp, which ``within_std`` measures.
"""

from __future__ import annotations

import torch
from scipy.stats import chi2


def assign(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, level: float = 0.999):
    """Nearest component in standardised distance, and whether each sample is within the radius."""
    x = x.reshape(x.shape[0], -1).double()
    means, stds = means.to(x.device).double(), stds.to(x.device).double()
    d2 = torch.cdist(x, means) ** 2 / (stds[None] ** 2)
    best, k = d2.min(1)
    radius = chi2.ppf(level, df=means.shape[1])
    return k, best <= radius


def sliced_w2(x: torch.Tensor, y: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = (x @ dirs).sort(0)
    py, _ = (y @ dirs).sort(0)
    return float(((px - py) ** 2).mean().sqrt())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, scales=(0.1, 0.3, 1.0, 3.0), max_n: int = 2000) -> float:
    x = x.reshape(x.shape[0], -1).double()[:max_n]
    y = y.reshape(y.shape[0], -1).double()[:max_n]
    dim = x.shape[1]

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * (s * s) * dim)) for s in scales)

    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


#: components with fewer precise samples than this get no per-component std ratio (too noisy)
MIN_COMPONENT_SAMPLES = 20
#: components lighter than this are left out of ``mass_ratio_min`` (a 1 % mode is noise at n = 2000)
LIGHT_WEIGHT = 0.05


def component_stats(x: torch.Tensor, k: torch.Tensor, ok: torch.Tensor, means: torch.Tensor, stds: torch.Tensor,
                    weights: torch.Tensor) -> dict:
    """Within-component std ratios and masses of the precise samples ``x[ok]`` assigned to ``k[ok]``.

    The ratio of component ``c`` is ``sqrt(mean_{i: k(i)=c} ||x_i - mu_c||^2 / (D s_c^2))``: 1 for exact
    samples up to the 99.9 % truncation of the precision radius (0.99-1.0 for D = 2..16, see
    :func:`floor_metrics`), below 1 for a mode that is too sharp, above for one that is too wide or
    off-centre. ``within_std`` pools every precise sample; ``within_std_min`` is the narrowest component
    holding at least :data:`MIN_COMPONENT_SAMPLES` precise samples (``nan`` if none does).
    """
    xs, ks = x[ok], k[ok]
    dim = x.shape[1]
    counts = torch.bincount(ks, minlength=len(means)).double()
    d2 = ((xs - means.double()[ks]) ** 2).sum(1)
    var = dim * stds.double() ** 2
    pooled = float((d2.sum() / var[ks].sum()).sqrt()) if len(xs) else float("nan")
    per = torch.zeros(len(means), dtype=torch.float64).index_add_(0, ks, d2)
    big = counts >= MIN_COMPONENT_SAMPLES
    ratios = (per[big] / (counts[big] * var[big])).sqrt()
    mass = counts / max(float(counts.sum()), 1.0)
    # a mixture whose components are all lighter than 5 % (grid25) keeps every component
    heavy = weights.double() >= min(LIGHT_WEIGHT, float(weights.max()))
    return {
        "within_std": pooled,
        "within_std_min": float(ratios.min()) if len(ratios) else float("nan"),
        "mass_ratio_min": float((mass[heavy] / weights.double()[heavy]).min()),
        "component_mass": [round(float(m), 4) for m in mass],
    }


def gmm_metrics(x: torch.Tensor, teacher, reference: torch.Tensor | None = None, cover_frac: float = 0.1,
                seed: int = 0) -> dict:
    """All metrics for samples ``x`` against a :class:`GMMTeacher`-like object (``means``,
    ``stds``, ``weights``, ``sample``). ``reference``: exact samples (drawn if not given)."""
    x = x.detach().reshape(x.shape[0], -1).double().cpu()
    finite = torch.isfinite(x).all(1)
    n_bad = int((~finite).sum())
    x = x[finite]
    # metrics run on the CPU whatever device the teacher was moved to for training
    means, stds, weights = teacher.means.cpu(), teacher.stds.cpu(), teacher.weights.cpu()
    if reference is None:
        reference = teacher.sample(max(len(x), 2), generator=torch.Generator().manual_seed(seed + 1))
    reference = reference.reshape(reference.shape[0], -1).double().cpu()
    if len(x) == 0:
        return {"precision": 0.0, "modes_covered": 0, "num_modes": len(means), "weight_tv": 1.0,
                "sw2": float("inf"), "mmd": float("inf"), "spread_ratio": 0.0, "non_finite": n_bad,
                "within_std": float("nan"), "within_std_min": float("nan"), "mass_ratio_min": 0.0,
                "component_mass": [0.0] * len(means)}
    k, ok = assign(x, means, stds)
    counts = torch.bincount(k[ok], minlength=len(means)).double()
    n_ok = max(float(counts.sum()), 1.0)
    freq = counts / n_ok
    covered = int((counts >= cover_frac * weights * n_ok).sum()) if n_ok > 0 else 0
    spread = float(x.std(0).mean() / reference.std(0).mean())
    return {
        "precision": float(ok.double().mean()),
        "modes_covered": covered,
        "num_modes": len(means),
        "weight_tv": float(0.5 * (freq - weights).abs().sum()),
        "sw2": sliced_w2(x, reference, seed=seed),
        "mmd": mmd_rbf(x, reference),
        "spread_ratio": spread,
        "non_finite": n_bad,
        **component_stats(x, k, ok, means, stds, weights),
    }


def floor_metrics(teacher, n: int, seed: int = 0) -> dict:
    """Metrics of exact samples against independent exact samples (the best achievable values)."""
    x = teacher.sample(n, generator=torch.Generator().manual_seed(seed + 7))
    return gmm_metrics(x, teacher, seed=seed)
