"""Engine overhead of a DMD2 iteration, measured as ratios within one run.

Prints, for the toy MLP roles (learned-teacher setting: teacher, fake and generator are networks):
  * engine iteration time / sum of the bare network passes the iteration needs  (goal <= 1.05)
  * engine iteration time / a minimal plain-PyTorch DMD2 loop over the same networks (goal <= 1.0)
  * one-step generator vs teacher 35-NFE Heun sampling throughput                  (goal >= 33x)
Usage: python benchmarks/step_overhead.py [--iters 200] [--batch 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from scoredistill.config import resolve
from scoredistill.engine.distiller import Distiller
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.objectives.common import edm_weight
from scoredistill.process import EDM
from scoredistill.sampling import teacher_sample


def timeit(fn, iters):
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    tmp = tempfile.mkdtemp()
    # a learned teacher so that every role is a network
    proc = EDM()
    teacher = MLPDenoiser(proc, 2, args.width, 4, None, 1.4).requires_grad_(False)
    from scoredistill.models.registry import save_model

    save_model(teacher, f"{tmp}/teacher", extra={})
    cfg = resolve({"teacher": {"kind": "learned", "path": f"{tmp}/teacher"},
                   "generator": {"kind": "mlp", "width": args.width, "depth": 4},
                   "fake_score": {"kind": "mlp", "width": args.width, "depth": 4},
                   "objective": {"name": "dmd2"},
                   "train": {"steps": 10**9, "batch_size": args.batch, "generator_every": 1, "progress": False,
                             "ema": 0.99},
                   "eval": {"plots": False}})
    d = Distiller(cfg, f"{tmp}/run")
    engine = timeit(d.train_step, args.iters)  # one iteration = one fake update + one generator update

    # bare passes of the same iteration: fake phase (G fwd no-grad, fake fwd+bwd, Adam),
    # generator phase (G fwd+bwd, teacher fwd, fake fwd, Adam, EMA)
    G, F, T = d.generator, d.fake, d.teacher
    opt_g, opt_f = d.optimizers["generator"], d.optimizers["fake_score"]
    z = torch.randn(args.batch, 2)
    t = torch.rand(args.batch, dtype=torch.float64) * 0.96 + 0.02

    def bare():
        with torch.no_grad():
            x = G(z)
        opt_f.zero_grad()
        F(x, t).square().mean().backward()
        opt_f.step()
        x = G(z)
        with torch.no_grad():
            T(x, t)
            F(x, t)
        opt_g.zero_grad()
        x.square().mean().backward()
        opt_g.step()
        d.ema.update(G)

    bare_t = timeit(bare, args.iters)

    # a minimal plain-PyTorch DMD2 loop, same networks and optimizers
    G2, F2 = copy.deepcopy(G), copy.deepcopy(F)
    og = torch.optim.Adam(G2.parameters(), lr=1e-4, betas=(0.0, 0.99))
    of = torch.optim.Adam(F2.parameters(), lr=1e-4, betas=(0.0, 0.99))
    ema = copy.deepcopy(G2).requires_grad_(False)

    def plain():
        zz = torch.randn(args.batch, 2)
        with torch.no_grad():
            x = G2(zz)
        tt = torch.rand(args.batch, dtype=torch.float64)
        n = torch.randn_like(x)
        xt = x + proc.sigma(tt)[:, None].float() * n
        w = edm_weight(proc, tt, 1.4, x)
        of.zero_grad()
        (w * (F2(xt, tt) - x) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(F2.parameters(), 10.0)
        of.step()
        x = G2(torch.randn(args.batch, 2))
        tt = torch.rand(args.batch, dtype=torch.float64) * 0.96 + 0.02
        xt = x.detach() + proc.sigma(tt)[:, None].float() * torch.randn_like(x)
        with torch.no_grad():
            dr, df = T(xt, tt), F2(xt, tt)
            g = (df - dr) / (x - dr).abs().mean(1, keepdim=True).clamp(min=1e-5)
        og.zero_grad()
        (0.5 * ((x - (x - g).detach()) ** 2).mean()).backward()
        torch.nn.utils.clip_grad_norm_(G2.parameters(), 10.0)
        og.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), G2.parameters()):
                pe.lerp_(p, 0.01)

    plain_t = timeit(plain, args.iters)

    n = 4096
    zz = torch.randn(n, 2)
    t0 = time.perf_counter()
    with torch.no_grad():
        G(zz)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher_sample(T, n, steps=18, sampler="heun")
    many = time.perf_counter() - t0

    print(f"device cpu, threads {args.threads}, batch {args.batch}, MLP width {args.width} x 4 blocks, "
          f"{args.iters} iterations each")
    print(f"engine DMD2 iteration          {engine * 1e3:8.2f} ms")
    print(f"bare network passes            {bare_t * 1e3:8.2f} ms   ratio engine/bare  = {engine / bare_t:.3f}"
          "  (goal <= 1.05)")
    print(f"plain PyTorch DMD2 loop        {plain_t * 1e3:8.2f} ms   ratio engine/plain = {engine / plain_t:.3f}"
          "  (goal <= 1.0)")
    print(f"sampling {n}: 1-NFE {one * 1e3:.1f} ms, teacher 35-NFE {many * 1e3:.1f} ms, "
          f"throughput ratio = {many / one:.1f}x  (goal >= 33x)")


if __name__ == "__main__":
    main()
