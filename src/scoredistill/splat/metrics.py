"""How close a reconstructed splat scene is to a known one: held-out-view PSNR and an
opacity-weighted Chamfer distance between Gaussian centres (the 3D test oracle of docs/3d.md).

* ``psnr(a, b) = 10 log10(1 / mean((a - b)^2))`` on images in [0, 1].
* Opacity-weighted Chamfer between centre sets ``A`` (opacities ``u``) and ``B`` (``v``):
  ``0.5 (sum_i u_i min_j |a_i - b_j| / sum_i u_i + sum_j v_j min_i |b_j - a_i| / sum_j v_j)``,
  so faint Gaussians (which draw nothing) barely count.
"""

from __future__ import annotations

import torch

from scoredistill.splat.cameras import Cameras
from scoredistill.splat.gaussians import GaussianSplats
from scoredistill.splat.render import render


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of ``(B, C, H, W)`` images in [0, 1]."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return -10 * mse.log10()


def _directed(a, u, b, chunk: int = 4096) -> torch.Tensor:
    mins = torch.cat([torch.cdist(a[i:i + chunk], b).amin(1) for i in range(0, len(a), chunk)])
    return (u * mins).sum() / u.sum().clamp_min(1e-12)


@torch.no_grad()
def weighted_chamfer(a: GaussianSplats, b: GaussianSplats) -> float:
    """Symmetric opacity-weighted Chamfer distance between the centres of two scenes (scene units)."""
    pa, pb = a.means.detach().double().cpu(), b.means.detach().double().cpu()
    ua, ub = a.opacities().detach().double().cpu(), b.opacities().detach().double().cpu()
    return float(0.5 * (_directed(pa, ua, pb) + _directed(pb, ub, pa)))


@torch.no_grad()
def scene_scores(particles: list[GaussianSplats], scenes: list[GaussianSplats], cameras: Cameras, height: int,
                 width: int, background) -> dict:
    """Each particle against each true scene from the held-out ``cameras``: ``psnr`` (P, K) mean PSNR
    over the views, ``chamfer`` (P, K), ``best`` (P,) the scene of highest PSNR."""
    truth = [render(s, cameras, height, width, background).images for s in scenes]
    p_psnr = torch.zeros(len(particles), len(scenes), dtype=torch.float64)
    p_ch = torch.zeros_like(p_psnr)
    for i, p in enumerate(particles):
        img = render(p, cameras, height, width, background).images
        for k, (s, t) in enumerate(zip(scenes, truth)):
            p_psnr[i, k] = psnr(img.cpu(), t.cpu()).mean()
            p_ch[i, k] = weighted_chamfer(p, s)
    return {"psnr": p_psnr, "chamfer": p_ch, "best": p_psnr.argmax(1)}
