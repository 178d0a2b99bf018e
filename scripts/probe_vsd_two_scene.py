"""Probe VSD's field on the two-scene exact-render teacher (issue 16; docs/results/3d.md).

Runs ``recipes/3d/scene_vsd.yaml`` (with ``--set`` overrides) and, every ``--every`` steps, measures
per noise level ``t`` on fixed probe cameras, for every particle ``p`` with render ``R_p(c)``:

* ``toward``: the component of the VSD update direction ``D_real - D_fake`` (x0 units; the field
  ``a s (D_fake - D_real)`` descends along it) on the unit vector from the particle's nearer scene
  render to the other scene's render, for the learned fake and for the exact particle-mixture fake
  ``D_mix(x_t) = sum_q r_q R_q(c)``, ``r_q ∝ exp(-|x_t - a R_q|^2 / 2 s^2)`` (the posterior mean of the
  particles' renders at this camera: the score the fake is trained to match, in closed form);
* ``repel``: the same two directions projected on ``R_p - mean_q R_q`` (positive: away from the others);
* ``excess``: the learned fake's excess denoising loss over the exact one,
  ``E |D_fake - D_mix|^2 / E |D_mix - R_p|^2`` (0: it fits the particles; 1: as bad as predicting the
  posterior mean of a distribution twice as wide), at the same noisy samples.

    OMP_NUM_THREADS=1 python scripts/probe_vsd_two_scene.py --steps 200 --every 100 \
        --set teacher.resolution=16 --set splats.count=150
"""

from __future__ import annotations

import argparse
import json

import torch

from scoredistill.config import load_yaml
from scoredistill.objectives.esd import fake_condition
from scoredistill.optimize.config import resolve
from scoredistill.optimize.driver import PriorOptimizer
from scoredistill.splat.cameras import CameraRanges, sample_cameras

T_GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.98)


@torch.no_grad()
def probe(opt: PriorOptimizer, n_cams: int = 6, draws: int = 4, seed: int = 123) -> list[dict]:
    param, teacher, fake, proc = opt.param, opt.teacher, opt.fake, opt.teacher.process
    g = torch.Generator().manual_seed(seed)
    cams = sample_cameras(n_cams, CameraRanges.from_config(opt.cfg["splats"]["cameras"], "c"), g)
    cond = cams.as_cond()
    views = param.view_ids(torch.zeros(n_cams, dtype=torch.long), cams)   # with the camera under fake_score.camera
    P = param.num_items
    R = torch.stack([param.to_teacher(param.render_views(torch.full((n_cams,), p), cams)) for p in range(P)], 1)
    R = R.double().flatten(2)                               # (C, P, D)
    S = teacher.renders(cond).flatten(2)                    # (C, K, D)
    rows = []
    for t0 in T_GRID:
        acc = {k: 0.0 for k in ("toward_fake", "toward_mix", "repel_fake", "repel_mix", "err_fake", "err_mix")}
        for p in range(P):
            x0 = R[:, p]
            dist = ((x0[:, None] - S) ** 2).sum(-1)         # (C, K)
            near, far = dist.argmin(1), dist.argmax(1)
            u = S[torch.arange(n_cams), far] - S[torch.arange(n_cams), near]
            u = u / u.norm(dim=1, keepdim=True)
            rep = x0 - R.mean(1)
            rep = rep / rep.norm(dim=1, keepdim=True).clamp_min(1e-12)
            for _ in range(draws):
                t = torch.full((n_cams,), t0)
                a, s = proc.alpha(t).double()[:, None], proc.sigma(t).double()[:, None]
                x_t = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
                shape = (n_cams, *teacher.data_shape)
                d_real = teacher.denoise(x_t.reshape(shape), t, cond).double().flatten(1)
                fc = fake_condition(fake, cond, views, n_cams, x_t.device)
                d_fake = fake(x_t.reshape(shape).float(), t, fc).double().flatten(1)
                logr = -((x_t[:, None] - a[:, :, None] * R) ** 2).sum(-1) / (2 * s * s)
                d_mix = (torch.softmax(logr, 1)[:, :, None] * R).sum(1)
                for name, d in (("fake", d_fake), ("mix", d_mix)):
                    acc[f"toward_{name}"] += float(((d_real - d) * u).sum(1).mean()) / (P * draws)
                    acc[f"repel_{name}"] += float(((d_real - d) * rep).sum(1).mean()) / (P * draws)
                acc["err_fake"] += float(((d_fake - d_mix) ** 2).sum(1).mean()) / (P * draws)
                acc["err_mix"] += float(((d_mix - x0) ** 2).sum(1).mean()) / (P * draws)
        a0 = float(proc.alpha(torch.tensor(t0)))
        rows.append({"t": t0, "snr": a0 ** 2 / (1 - a0 ** 2), **{k: round(v, 4) for k, v in acc.items()}})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/3d/scene_vsd.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    raw = load_yaml(args.recipe)
    raw["train"] = {**raw.get("train", {}), "progress": False, "steps": max(args.steps, 1)}
    cfg = resolve(raw, args.set)
    opt = PriorOptimizer(cfg, None, log=lambda *a: None)
    while True:
        if opt.step % args.every == 0:
            res = opt.param.evaluate(opt.teacher, 8)
            print(json.dumps({"step": opt.step, **{k: v for k, v in res.items() if k != "gaussians"}}), flush=True)
            for r in probe(opt):
                print(json.dumps(r), flush=True)
        if opt.step >= args.steps:
            break
        opt.train_step()


if __name__ == "__main__":
    main()
