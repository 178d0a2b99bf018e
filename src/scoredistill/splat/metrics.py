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


def janus_rate(images: torch.Tensor, true_views: torch.Tensor, front_views: torch.Tensor, labels: list[str]) -> float:
    """The Janus count: among the views labelled side or back, the fraction whose render is closer (mean
    squared error) to the *front template* — the true scene turned to face that camera — than to the
    true view. A view-consistent reconstruction scores 0; a scene that shows its front face from every
    side scores 1. ``images``, ``true_views``, ``front_views``: ``(B, C, H, W)``; ``labels``: one view
    label per image (:func:`scoredistill.splat.cameras.view_labels`)."""
    keep = torch.tensor([lab in ("side", "back") for lab in labels])
    if not bool(keep.any()):
        raise ValueError("janus_rate needs at least one side or back view")
    img, true, front = (v.detach().double().cpu()[keep] for v in (images, true_views, front_views))
    d_true = ((img - true) ** 2).flatten(1).mean(1)
    d_front = ((img - front) ** 2).flatten(1).mean(1)
    return float((d_front < d_true).double().mean())


def front_cameras(cameras: Cameras) -> Cameras:
    """The same cameras moved to azimuth 0 (the scene's front): the views of the front template."""
    return Cameras(cameras.elevation, torch.zeros_like(cameras.azimuth), cameras.distance, cameras.fov)


@torch.no_grad()
def scene_janus(particle: GaussianSplats, scene: GaussianSplats, cameras: Cameras, height: int, width: int,
                background) -> float:
    """:func:`janus_rate` of ``particle`` against the true ``scene`` from ``cameras``."""
    from scoredistill.splat.cameras import view_labels

    img = render(particle, cameras, height, width, background).images
    true = render(scene, cameras, height, width, background).images
    front = render(scene, front_cameras(cameras), height, width, background).images
    return janus_rate(img, true, front, view_labels(cameras))
