"""Differentiable splatting of :class:`~scoredistill.splat.gaussians.GaussianSplats` (3DGS, 2308.04079).

One interface, :func:`render`, two backends:

* ``"torch"``: pure PyTorch, any device, differentiable by autograd. Per view, every centre is
  moved to camera space (``x_c = R mu + T``, depth ``z``), the covariance projected with the EWA
  Jacobian ``J`` of the pinhole map at the centre, ``Sigma' = J R Sigma R^T J^T + 0.3 I`` (the 3DGS
  low-pass; as in 3DGS and gsplat, ``J`` uses ``x/z`` clamped to 1.3 x the half field of view), and
  each pixel ``p`` (centre ``(j + 0.5, i + 0.5)``) composited front to back over the Gaussians
  sorted by depth:
  ``alpha_i = min(0.99, o_i exp(-1/2 d^T Sigma'^-1 d))`` with ``d = p - mu'_i``, set to 0 when below
  1/255; ``T_i = prod_{j<i} (1 - alpha_j)`` (a cumulative sum of ``log(1 - alpha)``);
  ``C = sum_i c_i alpha_i T_i + T_N bg``, alpha ``1 - T_N``, depth ``sum_i z_i alpha_i T_i / (1 - T_N)``.
  Gaussians behind the near plane are dropped. Unlike the CUDA rasterizers there is no early stop
  at ``T < 1e-4`` (so colours may differ from them by up to about 1e-4).
  Work is bounded by tiles of pixels and chunks of Gaussians: a tile only visits the Gaussians
  whose ellipse ``d^T Sigma'^-1 d <= 2 ln(255 o)`` (where ``alpha >= 1/255`` is possible) meets it,
  which leaves the result unchanged, and the transmittance is carried from chunk to chunk; when a
  view visits many pixel-Gaussian pairs, each chunk is recomputed in the backward pass (activation
  checkpointing), so memory stays O(pixels x chunk) whatever the number of Gaussians.
* ``"gsplat"``: gsplat's CUDA rasterizer (optional dependency ``pip install scoredistill[3d]``),
  called with the same cameras, colours, ``eps2d = 0.3`` and background.

Colours are clamped to [0, 1] per Gaussian before compositing, so images lie in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from scoredistill.errors import ConfigError, check_keys
from scoredistill.splat.cameras import Cameras
from scoredistill.splat.gaussians import GaussianSplats

BACKENDS = ("torch", "gsplat")
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
EPS2D = 0.3
FOV_CLAMP = 1.3
# Above this many (pixel, Gaussian) pairs visited in one view, chunks are checkpointed by default:
# autograd keeps about 70 bytes per pair, so the budget caps saved activations near 300 MB per view.
PAIR_BUDGET = 4_000_000


# -- backgrounds --------------------------------------------------------------------------------------
class Background(nn.Module):
    """A background colour per view: ``forward(batch, device, dtype) -> (B, 3)`` in [0, 1]."""

    def forward(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError


class FixedBackground(Background):
    def __init__(self, color: Sequence[float] | float = (1.0, 1.0, 1.0)):
        super().__init__()
        self.register_buffer("color", _rgb(color, "render.background.color"), persistent=False)

    def forward(self, batch, device=None, dtype=torch.float32):
        return self.color.to(device=device, dtype=dtype).expand(batch, 3)


class RandomBackground(Background):
    """A uniform random colour per view, drawn on the CPU from its own seeded generator (so the same
    seed gives the same backgrounds on every device); random backgrounds keep a text-to-3D scene
    from explaining the background with Gaussians."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, batch, device=None, dtype=torch.float32):
        return torch.rand(batch, 3, generator=self.generator).to(device=device, dtype=dtype)


class LearnedBackground(Background):
    """One learned colour ``sigmoid(b)``, a 3-vector parameter trained with the scene."""

    def __init__(self, color: Sequence[float] | float = 0.5):
        super().__init__()
        c = _rgb(color, "render.background.color").clamp(1e-4, 1 - 1e-4)
        self.raw = nn.Parameter(torch.log(c / (1 - c)))

    def forward(self, batch, device=None, dtype=torch.float32):
        return torch.sigmoid(self.raw).to(device=device, dtype=dtype).expand(batch, 3)


def _rgb(color, field: str) -> torch.Tensor:
    if isinstance(color, (int, float)) and not isinstance(color, bool):
        color = (color,) * 3
    try:
        c = torch.as_tensor(color, dtype=torch.float32).reshape(-1)
    except (TypeError, ValueError):
        raise ConfigError(field, f"must be an RGB triple in [0, 1], got {color!r}") from None
    if c.numel() != 3 or not bool(((c >= 0) & (c <= 1)).all()):
        raise ConfigError(field, f"must be an RGB triple in [0, 1], got {color!r}")
    return c


BACKGROUND_KINDS = ("fixed", "random", "learned")


def make_background(cfg: dict | str | None, seed: int = 0, section: str = "render.background") -> Background:
    """From config: ``{kind: fixed, color: [r, g, b]}`` (default white), ``{kind: random}`` (seeded by
    ``seed``) or ``{kind: learned, color: init}``; a bare string is the kind."""
    if cfg is None:
        cfg = {}
    if isinstance(cfg, str):
        cfg = {"kind": cfg}
    if not isinstance(cfg, dict):
        raise ConfigError(section, f"must be a mapping with kind ({', '.join(BACKGROUND_KINDS)}), got {cfg!r}")
    check_keys(cfg, ("kind", "color"), section)
    kind = cfg.get("kind", "fixed")
    if kind == "fixed":
        return FixedBackground(cfg.get("color", (1.0, 1.0, 1.0)))
    if kind == "random":
        return RandomBackground(seed)
    if kind == "learned":
        return LearnedBackground(cfg.get("color", 0.5))
    raise ConfigError(f"{section}.kind", f"unknown value {kind!r}; accepted: {', '.join(BACKGROUND_KINDS)}")


# -- result -------------------------------------------------------------------------------------------
@dataclass
class RenderResult:
    """``images (B,3,H,W)`` in [0, 1], ``alpha (B,H,W)``, ``depth (B,H,W)`` (expected depth of the
    visible surface, 0 where nothing is drawn). Unpacks as ``images, alpha, depth``. For
    densification: ``means2d (B,N,2)`` projected centres in pixels (their ``.grad`` is filled by
    backward when rendered with ``track_means2d=True``), ``visible (B,N)``, ``radii (B,N)`` in pixels
    (3 x the largest standard deviation, as 3DGS)."""

    images: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    means2d: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    radii: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.images, self.alpha, self.depth))


# -- entry point --------------------------------------------------------------------------------------
def render(splats: GaussianSplats, cameras: Cameras, height: int, width: int,
           background: Background | torch.Tensor | Sequence[float] | float | None = None, backend: str = "torch",
           *, near: float = 0.01, tile_size: int = 16, chunk_size: int = 2048, checkpoint: bool | None = None,
           track_means2d: bool = False) -> RenderResult:
    """Render ``splats`` from every camera of ``cameras`` (see the module docstring).

    ``background``: a :class:`Background`, a colour (``(3,)`` or ``(B, 3)``) or None (black).
    ``tile_size`` / ``chunk_size`` bound the work per step of the torch backend (pixels per tile
    side, Gaussians per chunk); ``checkpoint`` trades a second forward pass in backward for memory
    independent of the number of Gaussians (default: when gradients are recorded and a view visits
    more than :data:`PAIR_BUDGET` pixel-Gaussian pairs).
    """
    if backend not in BACKENDS:
        raise ConfigError("render.backend", f"unknown value {backend!r}; accepted: {', '.join(BACKENDS)}")
    for name, v in (("height", height), ("width", width), ("tile_size", tile_size), ("chunk_size", chunk_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"render.{name}", f"must be an integer >= 1, got {v!r}")
    dtype, device = splats.means.dtype, splats.means.device
    cams = cameras.to(device=device, dtype=dtype)
    b = len(cams)
    if isinstance(background, Background):
        bg = background(b, device, dtype)
    elif background is None:
        bg = torch.zeros(b, 3, device=device, dtype=dtype)
    else:
        bg = torch.as_tensor(background, device=device, dtype=dtype)
        bg = bg.expand(3) if bg.dim() == 0 else bg
        bg = bg.expand(b, 3)
    if backend == "gsplat":
        return _render_gsplat(splats, cams, height, width, bg, near, track_means2d)
    return _render_torch(splats, cams, height, width, bg, near, tile_size, chunk_size, checkpoint, track_means2d)


def project(splats: GaussianSplats, cams: Cameras, height: int, width: int, near: float = 0.01):
    """EWA projection for every view: centres ``(B,N,2)`` in pixels, 2-D covariances ``(B,N,2,2)``
    (with the 0.3 px^2 low-pass), camera depths ``(B,N)`` and ``in_front (B,N)``."""
    r = cams.rotations()  # (B,3,3)
    t = -(r @ cams.centers()[:, :, None])[:, :, 0]
    pc = torch.einsum("bij,nj->bni", r, splats.means) + t[:, None, :]
    x, y, z = pc.unbind(-1)
    in_front = z > near
    zs = torch.where(in_front, z, torch.full_like(z, near))
    f = cams.focal(height)[:, None]
    lim_x = FOV_CLAMP * 0.5 * width / f
    lim_y = FOV_CLAMP * 0.5 * height / f
    tx = zs * torch.maximum(torch.minimum(x / zs, lim_x), -lim_x)
    ty = zs * torch.maximum(torch.minimum(y / zs, lim_y), -lim_y)
    zero = torch.zeros_like(zs)
    jac = torch.stack([f / zs, zero, -f * tx / zs**2, zero, f / zs, -f * ty / zs**2], -1).reshape(*zs.shape, 2, 3)
    m = jac @ r[:, None]  # (B,N,2,3)
    cov2 = m @ splats.covariances()[None] @ m.transpose(-1, -2)
    cov2 = cov2 + EPS2D * torch.eye(2, dtype=cov2.dtype, device=cov2.device)
    mean2 = torch.stack([f * x / zs + 0.5 * width, f * y / zs + 0.5 * height], -1)
    return mean2, cov2, z, in_front


def _composite(px, feat, log_t0):
    """Front-to-back compositing of one chunk of depth-sorted Gaussians over pixels ``px (P,2)``,
    starting from log-transmittance ``log_t0 (P,)``. ``feat (G,10)`` holds per Gaussian the projected
    centre (2), conic (3), opacity, colour (3) and depth; returns colour, depth and alpha sums and the
    log-transmittance after the chunk."""
    dx = px[:, None, 0] - feat[None, :, 0]
    dy = px[:, None, 1] - feat[None, :, 1]
    q = feat[None, :, 2] * dx * dx + 2 * feat[None, :, 3] * dx * dy + feat[None, :, 4] * dy * dy
    alpha = (feat[None, :, 5] * torch.exp(-0.5 * q)).clamp(max=ALPHA_MAX)
    alpha = torch.where(alpha >= ALPHA_MIN, alpha, torch.zeros_like(alpha))
    log1m = torch.log1p(-alpha)
    csum = torch.cumsum(log1m, 1)
    w = alpha * torch.exp(log_t0[:, None] + csum - log1m)
    out = w @ feat[:, 6:10]  # colour sums and depth sum in one product
    return out[:, :3], out[:, 3], w.sum(1), log_t0 + csum[:, -1]


def _render_torch(splats, cams, height, width, bg, near, tile_size, chunk_size, use_ckpt, track_means2d):
    b = len(cams)
    dtype, device = splats.means.dtype, splats.means.device
    mean2, cov2, z, in_front = project(splats, cams, height, width, near)
    if track_means2d and mean2.requires_grad:
        mean2.retain_grad()
    a, bb, c = cov2[..., 0, 0], cov2[..., 0, 1], cov2[..., 1, 1]
    det = a * c - bb * bb
    conic = torch.stack([c / det, -bb / det, a / det], -1)
    opac = splats.opacities()
    colors = splats.colors(cams.centers()).clamp(0, 1)
    if colors.dim() == 2:
        colors = colors.expand(b, -1, -1)
    with torch.no_grad():
        # extent of the ellipse where alpha >= 1/255 can hold: d^T conic d <= 2 ln(255 o)
        r2 = (2 * torch.log(opac.detach() / ALPHA_MIN)).clamp_min(0)
        hx = (r2 * a.detach()).sqrt() + 0.5
        hy = (r2 * c.detach()).sqrt() + 0.5
        m2 = mean2.detach()
        visible = (in_front & (opac.detach() >= ALPHA_MIN) & (m2[..., 0] + hx > 0) & (m2[..., 0] - hx < width)
                   & (m2[..., 1] + hy > 0) & (m2[..., 1] - hy < height))
        mid = 0.5 * (a + c).detach()
        radii = 3 * (mid + (mid * mid - det.detach()).clamp_min(0.1).sqrt()).sqrt() * visible
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype) + 0.5,
                            torch.arange(width, device=device, dtype=dtype) + 0.5, indexing="ij")
    images, alphas, depths = [], [], []
    for v in range(b):
        idx = visible[v].nonzero()[:, 0]
        idx = idx[torch.argsort(z[v, idx].detach(), stable=True)]
        # one (G, 10) table per view, so each chunk costs one gather (and one scatter in backward)
        feat = torch.cat([mean2[v], conic[v], opac[:, None], colors[v], z[v, :, None]], 1)[idx]
        g_x0, g_x1 = (m2[v, idx, 0] - hx[v, idx]), (m2[v, idx, 0] + hx[v, idx])
        g_y0, g_y1 = (m2[v, idx, 1] - hy[v, idx]), (m2[v, idx, 1] + hy[v, idx])
        tiles = {}
        for y0 in range(0, height, tile_size):
            for x0 in range(0, width, tile_size):
                y1, x1 = min(y0 + tile_size, height), min(x0 + tile_size, width)
                tiles[y0, x0] = ((g_x1 > x0) & (g_x0 < x1) & (g_y1 > y0) & (g_y0 < y1)).nonzero()[:, 0]
        ckpt = use_ckpt
        if ckpt is None:
            pairs = sum(len(sel) for sel in tiles.values()) * tile_size * tile_size
            ckpt = torch.is_grad_enabled() and pairs > PAIR_BUDGET
        rows_rgb, rows_dep, rows_acc = [], [], []
        for y0 in range(0, height, tile_size):
            y1 = min(y0 + tile_size, height)
            row_rgb, row_dep, row_acc = [], [], []
            for x0 in range(0, width, tile_size):
                x1 = min(x0 + tile_size, width)
                px = torch.stack([xs[y0:y1, x0:x1].reshape(-1), ys[y0:y1, x0:x1].reshape(-1)], 1)
                sel = tiles[y0, x0]
                t_rgb = torch.zeros(px.shape[0], 3, device=device, dtype=dtype)
                t_dep = torch.zeros(px.shape[0], device=device, dtype=dtype)
                t_acc = torch.zeros(px.shape[0], device=device, dtype=dtype)
                log_t = torch.zeros(px.shape[0], device=device, dtype=dtype)
                for s in range(0, len(sel), chunk_size):
                    k = sel[s:s + chunk_size]
                    args = (px, feat[k] if len(k) < len(idx) else feat, log_t)
                    if ckpt:
                        out = _checkpoint(_composite, *args, use_reentrant=False)
                    else:
                        out = _composite(*args)
                    t_rgb, t_dep, t_acc, log_t = t_rgb + out[0], t_dep + out[1], t_acc + out[2], out[3]
                h, w = y1 - y0, x1 - x0
                row_rgb.append(t_rgb.reshape(h, w, 3))
                row_dep.append(t_dep.reshape(h, w))
                row_acc.append(t_acc.reshape(h, w))
            rows_rgb.append(torch.cat(row_rgb, 1))
            rows_dep.append(torch.cat(row_dep, 1))
            rows_acc.append(torch.cat(row_acc, 1))
        rgb, dep, acc = torch.cat(rows_rgb, 0), torch.cat(rows_dep, 0), torch.cat(rows_acc, 0)
        images.append(rgb.permute(2, 0, 1) + (1 - acc)[None] * bg[v][:, None, None])
        alphas.append(acc)
        depths.append(torch.where(acc > 1e-10, dep / acc.clamp_min(1e-10), torch.zeros_like(dep)))
    return RenderResult(torch.stack(images), torch.stack(alphas), torch.stack(depths), mean2, visible, radii)


def _render_gsplat(splats, cams, height, width, bg, near, track_means2d):
    try:
        import gsplat
    except ImportError:
        raise ConfigError("render.backend", "'gsplat' is not installed: pip install scoredistill[3d] "
                          "(CUDA only), or use render.backend=torch") from None
    if not torch.cuda.is_available() or splats.means.device.type != "cuda":
        raise ConfigError("render.backend", "'gsplat' needs a CUDA device and the scene on it "
                          "(pip install scoredistill[3d]); use render.backend=torch on the CPU")
    colors = splats.colors(cams.centers()).clamp(0, 1)
    out, alpha, meta = gsplat.rasterization(
        splats.means, splats.rotations(), splats.scales(), splats.opacities(), colors,
        cams.world_to_camera(), cams.intrinsics(height, width), width, height, near_plane=near,
        eps2d=EPS2D, render_mode="RGB+ED", backgrounds=bg, packed=False)
    means2d = meta.get("means2d")
    if track_means2d and means2d is not None and means2d.requires_grad:
        means2d.retain_grad()
    radii = meta.get("radii")
    if radii is not None and radii.dim() == 3:
        radii = radii.amax(-1)
    visible = radii > 0 if radii is not None else None
    return RenderResult(out[..., :3].permute(0, 3, 1, 2), alpha[..., 0], out[..., 3], means2d, visible, radii)
