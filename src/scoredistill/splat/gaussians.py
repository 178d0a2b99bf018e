"""3D Gaussian splats (Kerbl et al., 3D Gaussian Splatting, arXiv 2308.04079).

Each Gaussian has a centre ``mu``, a scale ``s`` (stored as ``log s``), a rotation ``q`` (stored as a
raw quaternion ``(w, x, y, z)``, normalised on use), an opacity ``o`` (stored as its logit) and a
colour in spherical harmonics: ``rgb = 0.5 + C0 f_dc`` (degree 0, ``C0 = 0.28209479``) plus, at
degree 1, ``C1 (-y f_1 + z f_2 - x f_3)`` for the unit direction ``(x, y, z)`` from the camera to
the centre (``C1 = 0.48860251``). The covariance is ``Sigma = R S S^T R^T`` with ``S = diag(s)``.

Densification follows 3DGS: the norm of the view-space positional gradient (in normalised device
coordinates) is averaged over the views that saw each Gaussian; above a threshold, Gaussians no
larger than ``percent_dense x extent`` are cloned and larger ones split into two samples of
themselves with scales divided by 1.6; Gaussians with low opacity or oversized (in the world, or
on screen) are pruned. Every change of the Gaussian count returns the map from new rows to old
rows, so an Adam state can be carried over (:func:`remap_adam_state`), as the reference
implementation does: kept rows keep their moments, new rows start from zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from scoredistill.errors import ConfigError, check_keys

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199

PARAM_NAMES = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest")

# Learning rates of the reference 3DGS implementation (2308.04079, OptimizationParams): positions
# 1.6e-4 x scene extent decayed exponentially to 1.6e-6 x extent over 30k steps, SH DC 2.5e-3 and
# higher SH 2.5e-3 / 20, opacity 0.05 (0.025 in later releases), scales 5e-3, rotations 1e-3.
# DreamGaussian (2309.16653) uses 1e-2 for colours in text-to-3D.
DEFAULT_LR = {
    "means": 1.6e-4,
    "log_scales": 5e-3,
    "quats": 1e-3,
    "opacity_logits": 5e-2,
    "sh_dc": 2.5e-3,
    "sh_rest": 2.5e-3 / 20,
}
MEANS_LR_FINAL_FACTOR = 0.01


def means_lr(step: int, max_steps: int = 30_000, extent: float = 1.0, lr_init: float = DEFAULT_LR["means"],
             final_factor: float = MEANS_LR_FINAL_FACTOR) -> float:
    """3DGS position schedule: log-linear from ``lr_init x extent`` to ``final_factor`` of it."""
    frac = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return extent * math.exp((1 - frac) * math.log(lr_init) + frac * math.log(lr_init * final_factor))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` unit quaternions ``(w, x, y, z)`` -> ``(N, 3, 3)`` rotation matrices."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(q.shape[:-1] + (3, 3))


class GaussianSplats(nn.Module):
    """A set of ``N`` Gaussians as trainable parameters (see the module docstring for the maths).

    Parameters: ``means (N,3)``, ``log_scales (N,3)``, ``quats (N,4)`` raw ``(w,x,y,z)``,
    ``opacity_logits (N,)``, ``sh_dc (N,3)`` and, at ``sh_degree == 1``, ``sh_rest (N,3,3)`` indexed
    ``[gaussian, coefficient, channel]``.
    """

    def __init__(self, means, log_scales, quats, opacity_logits, sh_dc, sh_rest=None):
        super().__init__()
        n = means.shape[0]
        shapes = {"means": (n, 3), "log_scales": (n, 3), "quats": (n, 4), "opacity_logits": (n,), "sh_dc": (n, 3)}
        given = {"means": means, "log_scales": log_scales, "quats": quats, "opacity_logits": opacity_logits,
                 "sh_dc": sh_dc}
        for name, shape in shapes.items():
            if tuple(given[name].shape) != shape:
                raise ConfigError(f"splats.{name}", f"expected shape {shape}, got {tuple(given[name].shape)}")
            setattr(self, name, nn.Parameter(given[name].detach().clone()))
        if sh_rest is not None and sh_rest.numel() > 0:
            if tuple(sh_rest.shape) != (n, 3, 3):
                raise ConfigError("splats.sh_rest", f"only SH degree <= 1 is supported: expected shape {(n, 3, 3)}, "
                                  f"got {tuple(sh_rest.shape)}")
            self.sh_rest = nn.Parameter(sh_rest.detach().clone())
        else:
            self.sh_rest = None

    # -- constructors ---------------------------------------------------------------------------------
    @classmethod
    def from_points(cls, points: torch.Tensor, scale: float | torch.Tensor, color=None, opacity: float = 0.1,
                    sh_degree: int = 0, generator: torch.Generator | None = None) -> GaussianSplats:
        """Isotropic Gaussians at ``points`` with identity rotations; ``color`` an RGB triple, an
        ``(N,3)`` tensor in [0, 1], or None for uniform random colours (``generator``)."""
        points = torch.as_tensor(points, dtype=torch.float32)
        n = points.shape[0]
        if sh_degree not in (0, 1):
            raise ConfigError("splats.sh_degree", f"must be 0 or 1, got {sh_degree}")
        if not 0 < opacity < 1:
            raise ConfigError("splats.opacity", f"must lie in (0, 1), got {opacity}")
        scale = torch.as_tensor(scale, dtype=torch.float32)
        log_scales = scale.log().expand(n, 3).clone() if scale.dim() == 0 else scale.log().reshape(n, -1).expand(n, 3)
        if color is None:
            rgb = torch.rand(n, 3, generator=generator)
        else:
            rgb = torch.as_tensor(color, dtype=torch.float32).expand(n, 3)
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1
        return cls(points, log_scales, quats, torch.full((n,), _logit(opacity)), (rgb - 0.5) / SH_C0,
                   torch.zeros(n, 3, 3) if sh_degree == 1 else None)

    @classmethod
    def sphere(cls, n: int = 1000, radius: float = 0.5, seed: int = 0, **kw) -> GaussianSplats:
        """``n`` Gaussians uniform on a sphere shell; scale half the mean spacing ``r sqrt(4 pi / n)``."""
        g = torch.Generator().manual_seed(seed)
        d = torch.randn(n, 3, generator=g)
        pts = radius * d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return cls.from_points(pts, 0.5 * radius * math.sqrt(4 * math.pi / n), generator=g, **kw)

    @classmethod
    def ball(cls, n: int = 1000, radius: float = 0.5, seed: int = 0, **kw) -> GaussianSplats:
        """``n`` Gaussians uniform in a ball; scale half the mean spacing ``r (4 pi / 3n)^(1/3)``."""
        g = torch.Generator().manual_seed(seed)
        d = torch.randn(n, 3, generator=g)
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        pts = radius * d * torch.rand(n, 1, generator=g) ** (1 / 3)
        return cls.from_points(pts, 0.5 * radius * (4 * math.pi / (3 * n)) ** (1 / 3), generator=g, **kw)

    @classmethod
    def concat(cls, parts: list[GaussianSplats]) -> GaussianSplats:
        """One scene from several (degree-1 SH if any part has it, zeros elsewhere)."""
        if not parts:
            raise ConfigError("splats", "nothing to concatenate")
        deg = max(p.sh_degree for p in parts)
        cat = lambda name: torch.cat([getattr(p, name).detach() for p in parts])  # noqa: E731
        rest = (torch.cat([p.sh_rest.detach() if p.sh_rest is not None else torch.zeros(p.num, 3, 3)
                           for p in parts]) if deg == 1 else None)
        return cls(cat("means"), cat("log_scales"), cat("quats"), cat("opacity_logits"), cat("sh_dc"), rest)

    @classmethod
    def from_data(cls, data, sh_degree: int | None = None) -> GaussianSplats:
        """From a :class:`scoredistill.splat.ply.SplatData`; higher SH degrees are cut to ``sh_degree``
        (default: 1 if the data has any, else 0)."""
        t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        rest = data.sh_rest
        deg = (1 if rest.shape[1] >= 3 else 0) if sh_degree is None else sh_degree
        if deg == 1:
            sh_rest = t(rest[:, :3]) if rest.shape[1] >= 3 else torch.zeros(len(data.means), 3, 3)
        else:
            sh_rest = None
        return cls(t(data.means), t(data.log_scales), t(data.quats), t(data.opacity_logits), t(data.sh_dc), sh_rest)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> GaussianSplats:
        """Rebuild from ``state_dict()`` whatever the Gaussian count (densification changes it, so a
        resumed run cannot load into a freshly initialised scene of the original size)."""
        missing = [n for n in PARAM_NAMES[:5] if n not in state]
        if missing:
            raise ConfigError("splats", f"state has no {', '.join(missing)}")
        return cls(*(state[n] for n in PARAM_NAMES[:5]), state.get("sh_rest"))

    @classmethod
    def from_ply(cls, path, sh_degree: int | None = None) -> GaussianSplats:
        from scoredistill.splat.ply import read_ply

        return cls.from_data(read_ply(path), sh_degree)

    def to_data(self):
        from scoredistill.splat.ply import SplatData

        a = lambda p: p.detach().cpu().float().numpy().copy()  # noqa: E731
        rest = a(self.sh_rest) if self.sh_rest is not None else a(self.sh_dc)[:, :0].reshape(self.num, 0, 3)
        return SplatData(a(self.means), a(self.log_scales), a(self.quats), a(self.opacity_logits),
                         a(self.sh_dc), rest)

    def save_ply(self, path) -> None:
        from scoredistill.splat.ply import write_ply

        write_ply(path, self.to_data())

    # -- derived quantities ---------------------------------------------------------------------------
    @property
    def num(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return 0 if self.sh_rest is None else 1

    def scales(self) -> torch.Tensor:
        return self.log_scales.exp()

    def rotations(self) -> torch.Tensor:
        """Unit quaternions (the raw parameters normalised)."""
        return self.quats / self.quats.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    def covariances(self) -> torch.Tensor:
        """``(N, 3, 3)`` world covariances ``R S S^T R^T``."""
        m = quat_to_matrix(self.rotations()) * self.scales()[:, None, :]
        return m @ m.transpose(1, 2)

    def colors(self, cam_centers: torch.Tensor | None = None) -> torch.Tensor:
        """Unclamped RGB: ``(N, 3)`` from the DC term, or ``(B, N, 3)`` per camera centre ``(B, 3)``
        when degree-1 SH is present (view direction from the camera to each centre)."""
        rgb = 0.5 + SH_C0 * self.sh_dc
        if self.sh_rest is None or cam_centers is None:
            return rgb
        d = self.means[None] - cam_centers[:, None, :].to(self.means)
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        x, y, z = d[..., 0:1], d[..., 1:2], d[..., 2:3]
        f = self.sh_rest
        return rgb + SH_C1 * (-y * f[None, :, 0] + z * f[None, :, 1] - x * f[None, :, 2])

    # -- optimisation ---------------------------------------------------------------------------------
    def named_groups(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self, n) for n in PARAM_NAMES if getattr(self, n) is not None}

    def param_groups(self, lr: dict | None = None, extent: float = 1.0, section: str = "splats.lr") -> list[dict]:
        """One optimizer group per parameter kind, ``{"name", "params", "lr"}``, with the 3DGS
        defaults (:data:`DEFAULT_LR`, the position rate scaled by ``extent``) overridden by ``lr``."""
        lr = dict(lr or {})
        check_keys(lr, PARAM_NAMES, section)
        groups = []
        for name, p in self.named_groups().items():
            rate = lr.get(name, DEFAULT_LR[name] * (extent if name == "means" else 1.0))
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate >= 0:
                raise ConfigError(f"{section}.{name}", f"must be a number >= 0, got {rate!r}")
            groups.append({"name": name, "params": [p], "lr": float(rate)})
        return groups

    @torch.no_grad()
    def select(self, index: torch.Tensor, overrides: dict[str, torch.Tensor] | None = None) -> None:
        """Replace every parameter by its rows ``index`` (with ``overrides`` for whole tensors);
        the parameters become new ``nn.Parameter`` objects (optimizers must be told)."""
        overrides = overrides or {}
        for name, p in self.named_groups().items():
            new = overrides.get(name, p.data[index])
            setattr(self, name, nn.Parameter(new.contiguous(), requires_grad=p.requires_grad))


# -- densification ------------------------------------------------------------------------------------
@dataclass
class DensifyConfig:
    """Schedule and thresholds; defaults are the reference 3DGS ones (2308.04079): densify every 100
    steps from step 500 to 15000, view-space gradient threshold 2e-4 (NDC units), clone/split at
    ``percent_dense = 0.01`` of the scene extent, prune opacity < 0.005, world scale > 0.1 extent
    and, after the first opacity reset, screen radius > 20 px; opacities reset to 0.01 every 3000."""

    start: int = 500
    stop: int = 15_000
    every: int = 100
    grad_threshold: float = 2e-4
    percent_dense: float = 0.01
    extent: float = 1.0
    min_opacity: float = 0.005
    max_world_scale: float = 0.1
    max_screen_radius: float | None = 20.0
    opacity_reset_every: int = 3000
    reset_opacity: float = 0.01
    split_scale_divisor: float = 1.6
    max_gaussians: int | None = None

    @classmethod
    def from_config(cls, cfg: dict | None, section: str = "densify") -> DensifyConfig:
        cfg = dict(cfg or {})
        names = [f.name for f in fields(cls)]
        check_keys(cfg, names, section)
        out = cls(**cfg)
        for name in ("start", "stop", "every", "opacity_reset_every"):
            v = getattr(out, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{section}.{name}", f"must be an integer >= 0, got {v!r}")
        for name in ("grad_threshold", "percent_dense", "extent", "max_world_scale", "split_scale_divisor"):
            v = getattr(out, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ConfigError(f"{section}.{name}", f"must be a number > 0, got {v!r}")
        if not 0 <= out.min_opacity < 1:
            raise ConfigError(f"{section}.min_opacity", f"must lie in [0, 1), got {out.min_opacity!r}")
        return out


@dataclass
class DensifyResult:
    """What changed: ``source[i]`` is the old row new row ``i`` came from, ``fresh[i]`` whether it is
    a new Gaussian (clone or split child: its optimizer moments start at zero), ``reset`` the
    parameter kinds whose optimizer state must be zeroed (opacity after a reset), ``groups`` the new
    parameter groups (``GaussianSplats.param_groups``)."""

    source: torch.Tensor
    fresh: torch.Tensor
    reset: tuple[str, ...]
    groups: list[dict]
    cloned: int = 0
    split: int = 0
    pruned: int = 0


class Densifier:
    """Accumulates view-space positional gradients between densification steps.

    Usage per training step: render with ``means2d`` kept (``RenderResult.means2d.retain_grad()``
    happens inside :func:`~scoredistill.splat.render.render` when ``track_means2d=True``), backward,
    :meth:`accumulate`, optimizer step, then ``res = densifier.step(step, splats)``; when ``res`` is
    not None the Gaussian count changed: call :func:`remap_adam_state` (or rebuild the optimizer from
    ``res.groups``).
    """

    def __init__(self, cfg: DensifyConfig, num: int, seed: int = 0):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self._resize(num)
        self.resets = 0

    def _resize(self, num: int):
        self.grad_accum = torch.zeros(num, dtype=torch.float64)
        self.denom = torch.zeros(num, dtype=torch.float64)
        self.max_radii = torch.zeros(num, dtype=torch.float64)

    @torch.no_grad()
    def accumulate(self, means2d: torch.Tensor, visible: torch.Tensor, width: int, height: int,
                   radii: torch.Tensor | None = None) -> None:
        """``means2d`` the ``(B, N, 2)`` projected centres in pixels, with ``.grad`` filled by the
        backward pass; ``visible (B, N)``. The pixel gradient is turned into the NDC gradient 3DGS
        thresholds (``x (W/2, H/2)``) and its norm added for each view that saw the Gaussian."""
        if means2d.grad is None:
            raise ValueError("means2d has no gradient: render with track_means2d=True and call backward first")
        g = means2d.grad.detach().double().cpu() * torch.tensor([0.5 * width, 0.5 * height], dtype=torch.float64)
        vis = visible.detach().cpu()
        self.grad_accum += (g.norm(dim=-1) * vis).sum(0)
        self.denom += vis.sum(0).double()
        if radii is not None:
            r = (radii.detach().double().cpu() * vis).amax(0)
            self.max_radii = torch.maximum(self.max_radii, r)

    def step(self, step: int, splats: GaussianSplats) -> DensifyResult | None:
        """Densify/prune and reset opacities when the schedule says so; None when nothing changed."""
        c = self.cfg
        res = None
        if c.every > 0 and c.start <= step < c.stop and step > 0 and step % c.every == 0:
            screen = c.max_screen_radius if (self.resets > 0 and c.max_screen_radius) else None
            res = densify_and_prune(splats, self.average_grads(), c, self.generator, self.max_radii, screen)
            self._resize(splats.num)
        if c.opacity_reset_every > 0 and step > 0 and step < c.stop and step % c.opacity_reset_every == 0:
            reset_opacity(splats, c.reset_opacity)
            self.resets += 1
            if res is None:
                n = splats.num
                res = DensifyResult(torch.arange(n), torch.zeros(n, dtype=torch.bool), ("opacity_logits",),
                                    splats.param_groups())
            else:
                res.reset = ("opacity_logits",)
                res.groups = splats.param_groups()
        return res

    def average_grads(self) -> torch.Tensor:
        return self.grad_accum / self.denom.clamp_min(1)


@torch.no_grad()
def reset_opacity(splats: GaussianSplats, value: float = 0.01) -> None:
    """3DGS opacity reset: clamp every opacity to at most ``value``."""
    new = torch.minimum(splats.opacity_logits.data, torch.tensor(_logit(value), dtype=splats.opacity_logits.dtype))
    splats.select(torch.arange(splats.num), {"opacity_logits": new})


@torch.no_grad()
def densify_and_prune(splats: GaussianSplats, grads: torch.Tensor, cfg: DensifyConfig,
                      generator: torch.Generator | None = None, max_radii: torch.Tensor | None = None,
                      max_screen_radius: float | None = None) -> DensifyResult:
    """Clone small / split large Gaussians whose mean view-space gradient ``grads (N,)`` reaches the
    threshold, then prune; the parameters of ``splats`` are replaced. New rows are ordered: kept
    originals, clones, split children."""
    n = splats.num
    dev = splats.means.device
    grads = grads.to(dev)
    scales = splats.scales().data
    big = scales.amax(1) > cfg.percent_dense * cfg.extent
    hot = grads >= cfg.grad_threshold
    if cfg.max_gaussians is not None:
        room = max(cfg.max_gaussians - n, 0)
        if int(hot.sum()) > room:
            # keep the hottest only, so the count never exceeds the cap (a split adds one, a clone one)
            order = torch.argsort(grads.masked_fill(~hot, -1.0), descending=True)
            hot = torch.zeros_like(hot)
            hot[order[:room]] = True
    clone = hot & ~big
    split = hot & big
    clone_idx = clone.nonzero()[:, 0]
    split_idx = split.nonzero()[:, 0]
    keep_idx = (~split).nonzero()[:, 0]

    # split: two children drawn from N(mu, Sigma), scales divided by 1.6 (3DGS)
    rot = quat_to_matrix(splats.rotations().data[split_idx]).repeat(2, 1, 1)
    std = scales[split_idx].repeat(2, 1)
    z = torch.randn(std.shape, generator=generator, dtype=torch.float32).to(dev, std.dtype) * std
    child_means = (rot @ z[:, :, None])[:, :, 0] + splats.means.data[split_idx].repeat(2, 1)
    child_src = split_idx.repeat(2)

    source = torch.cat([keep_idx, clone_idx, child_src])
    overrides = {}
    for name, p in splats.named_groups().items():
        parts = [p.data[keep_idx], p.data[clone_idx]]
        if name == "means":
            parts.append(child_means)
        elif name == "log_scales":
            parts.append(p.data[child_src] - math.log(cfg.split_scale_divisor))
        else:
            parts.append(p.data[child_src])
        overrides[name] = torch.cat(parts)
    splats.select(source, overrides)
    fresh = torch.cat([torch.zeros(len(keep_idx), dtype=torch.bool),
                       torch.ones(len(clone_idx) + len(child_src), dtype=torch.bool)])

    # prune on the new set; new rows have no screen-size history yet (as in 3DGS)
    prune = splats.opacities().data < cfg.min_opacity
    prune |= splats.scales().data.amax(1) > cfg.max_world_scale * cfg.extent
    if max_screen_radius is not None and max_radii is not None:
        radii = torch.cat([max_radii[keep_idx.cpu()], torch.zeros(len(clone_idx) + len(child_src),
                                                                   dtype=max_radii.dtype)])
        prune |= radii.to(dev) > max_screen_radius
    if bool(prune.all()):
        prune[torch.argmax(splats.opacities().data)] = False  # never leave an empty scene
    alive = (~prune).nonzero()[:, 0]
    splats.select(alive)
    source, fresh = source.cpu()[alive.cpu()], fresh[alive.cpu()]
    return DensifyResult(source, fresh, (), splats.param_groups(), cloned=len(clone_idx), split=len(split_idx),
                         pruned=int(prune.sum()))


@torch.no_grad()
def remap_adam_state(optimizer: torch.optim.Optimizer, splats: GaussianSplats, result: DensifyResult) -> None:
    """Point ``optimizer`` (Adam/AdamW-like, one group per parameter kind as built by
    :meth:`GaussianSplats.param_groups`) at the new parameters of ``splats`` and carry its state
    over: per-row moments follow ``result.source``, fresh rows and ``result.reset`` kinds start at
    zero, scalar entries (the step count) are kept. Groups keep their learning rates."""
    new = splats.named_groups()
    source = result.source
    for group in optimizer.param_groups:
        name = group.get("name")
        if name not in new:
            continue
        (old,) = group["params"]
        p = new[name]
        state = optimizer.state.pop(old, None)
        group["params"] = [p]
        if not state:
            continue
        moved = {}
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == old.shape[0]:
                v = v[source.to(v.device)].clone()
                v[result.fresh.to(v.device)] = 0
                if name in result.reset:
                    v.zero_()
            moved[k] = v
        optimizer.state[p] = moved
