"""Small preset scenes built in code (a few hundred Gaussians each), for exact-render teachers.

Every scene fits in a ball of radius 0.4 around the origin, so the default orbit cameras (distance
1.0-1.5, vertical FOV 40-70 degrees) see all of it; the "front" (azimuth 0, the +x side) differs
from the back, so a view-inconsistent reconstruction is visible:

* ``snowman``: three stacked white spheres, black eyes and buttons and an orange nose facing +x;
* ``table``: a brown round top on four legs, a green cup off-centre on it;
* ``dumbbell``: a red sphere (-y) and a blue sphere (+y) joined by a grey bar along y;
* ``twotone``: one sphere, red on its front half (+x) and blue on its back half: seen from the front it
  is a red disc, from the back a blue one, so a reconstruction that shows its front from every side
  (the Janus failure, ``teacher.janus``) is unmistakable.
"""

from __future__ import annotations

import math

import torch

from scoredistill.errors import ConfigError
from scoredistill.splat.gaussians import GaussianSplats

OPACITY = 0.9


def fibonacci_sphere(n: int) -> torch.Tensor:
    """``n`` nearly evenly spread unit vectors (golden-angle spiral), deterministic."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    r = (1 - z * z).clamp_min(0).sqrt()
    phi = math.pi * (3 - math.sqrt(5)) * i
    return torch.stack([r * phi.cos(), r * phi.sin(), z], 1).float()


def _sphere(center, radius, n, color) -> GaussianSplats:
    pts = torch.tensor(center, dtype=torch.float32) + radius * fibonacci_sphere(n)
    return GaussianSplats.from_points(pts, 0.6 * radius * math.sqrt(4 * math.pi / n), color, OPACITY)


def _blob(center, scale, color) -> GaussianSplats:
    return GaussianSplats.from_points(torch.tensor([center], dtype=torch.float32), scale, color, OPACITY)


def _segment(a, b, n, scale, color) -> GaussianSplats:
    a, b = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    u = torch.linspace(0, 1, n)[:, None]
    return GaussianSplats.from_points(a + u * (b - a), scale, color, OPACITY)


def snowman() -> GaussianSplats:
    white = (0.93, 0.95, 1.0)
    black = (0.05, 0.05, 0.05)
    parts = [_sphere((0, 0, -0.19), 0.17, 150, white), _sphere((0, 0, 0.07), 0.12, 90, white),
             _sphere((0, 0, 0.26), 0.085, 60, white)]
    parts += [_blob((0.075, s * 0.03, 0.29), 0.012, black) for s in (-1, 1)]
    parts.append(_segment((0.085, 0, 0.26), (0.16, 0, 0.25), 6, 0.012, (1.0, 0.45, 0.05)))
    parts += [_blob((0.12 * math.cos(a), 0, 0.07 + 0.12 * math.sin(a)), 0.014, black) for a in (-0.5, 0.0, 0.5)]
    return GaussianSplats.concat(parts)


def table() -> GaussianSplats:
    brown, dark = (0.55, 0.33, 0.15), (0.35, 0.2, 0.1)
    # top: a disc of flat Gaussians (sunflower spiral)
    n = 160
    i = torch.arange(n, dtype=torch.float32) + 0.5
    r = 0.33 * (i / n).sqrt()
    phi = math.pi * (3 - math.sqrt(5)) * i
    top_pts = torch.stack([r * phi.cos(), r * phi.sin(), torch.full_like(r, 0.08)], 1)
    flat = torch.tensor([0.035, 0.035, 0.012]).expand(n, 3)
    parts = [GaussianSplats.from_points(top_pts, flat, brown, OPACITY)]
    parts += [_segment((sx * 0.18, sy * 0.18, -0.3), (sx * 0.18, sy * 0.18, 0.06), 14, 0.022, dark)
              for sx in (-1, 1) for sy in (-1, 1)]
    parts.append(_sphere((0.12, 0.08, 0.15), 0.05, 30, (0.1, 0.7, 0.2)))
    return GaussianSplats.concat(parts)


def dumbbell() -> GaussianSplats:
    return GaussianSplats.concat([
        _sphere((0, -0.24, 0), 0.12, 120, (0.9, 0.1, 0.1)),
        _sphere((0, 0.24, 0), 0.12, 120, (0.1, 0.2, 0.9)),
        _segment((0, -0.13, 0), (0, 0.13, 0), 14, 0.03, (0.6, 0.6, 0.6)),
    ])


def twotone() -> GaussianSplats:
    pts = 0.25 * fibonacci_sphere(300)
    red, blue = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.9])
    colors = torch.where(pts[:, :1] >= 0, red, blue)
    return GaussianSplats.from_points(pts, 0.6 * 0.25 * math.sqrt(4 * math.pi / 300), colors, OPACITY)


PRESETS = {"snowman": snowman, "table": table, "dumbbell": dumbbell, "twotone": twotone}


def preset_scene(name: str, field: str = "teacher.scenes") -> GaussianSplats:
    """A fresh copy of the preset scene ``name`` (see the module docstring)."""
    if name not in PRESETS:
        raise ConfigError(field, f"unknown preset scene {name!r}; accepted: {', '.join(sorted(PRESETS))} "
                          "or a path to a 3DGS .ply file")
    return PRESETS[name]()
