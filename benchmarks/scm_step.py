"""Cost of one sCM (sCD) student loss + backward with the tangent by forward-mode AD and by float64 central
finite differences, each as a ratio to a DMD2-style loss + backward on the same network (issue 15: goal <= 2.0
for the JVP path).

Networks (as in benchmarks/step_overhead.py): ``mlp`` -- the toy MLPDenoiser (256 wide, 4 blocks, 2-D
data, batch 256); ``unet`` -- the digits UNetDenoiser ((1, 8, 8), channels (32, 64), batch 64). The
teacher is a frozen copy of the student's network.

* ``dmd2``: two network passes + backward -- the student as a one-step generator
  ``x = D_theta(rho_max z, t_max)`` (with grad), one frozen score pass at a re-noised ``x_t`` (no
  grad), the injected field ``x - D(x_t)`` and the backward through the generator.
* ``scm_jvp``: teacher PF-ODE velocity at ``x_tau`` (no grad), ``cos sin dF/dtau`` by the library's JVP
  (``Tangent("torch")``: dual tensors with the closed-form rules of ``models/tangent.py``, no grad),
  ``F_theta`` by a student pass with grad, the normalised tangent, the sCM loss with prior weight, backward
  -- the work of the ``scm`` objective's step (its JVP runs on the target copy, the same network).
* ``scm_fd``: the same with the tangent from two extra float64 passes.
* ``scm_native`` (``--native-jvp``): the same with ``torch.func.jvp`` and torch's own forward-mode rules
  (the path before the closed-form rules).

Timing: each candidate is warmed up, then timed in ``--rounds`` interleaved rounds of ``--iters``
calls (the order rotates each round); a time is the fastest round's mean (other jobs only ever add
time), a ratio the quotient of two such times. ``--clock cpu`` uses the process CPU time (steadier on a
shared machine with one thread).

``--breakdown`` also times each stage of the JVP step (teacher pass, JVP, student pass, loss, backward),
a plain no-grad forward of the student for scale, and the JVP by ``torch.func.jvp`` with torch's rules,
with the relative difference of the two tangents.

Usage: python benchmarks/scm_step.py [--models mlp,unet] [--iters 5] [--rounds 7] [--threads 1] [--clock wall|cpu]
       [--native-jvp] [--breakdown]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from scoredistill.models.mlp import MLPDenoiser
from scoredistill.models.unet import UNetDenoiser
from scoredistill.objectives import consistency_core as cc
from scoredistill.process import EDM
from scoredistill.process.trigflow import TrigFlow

CLOCK = time.perf_counter


def build(model: str, width: int):
    p = EDM()
    if model == "mlp":
        net, shape, batch = MLPDenoiser(p, dim=2, width=width, depth=4, sigma_data=0.5), (2,), 256
    else:
        net, shape, batch = UNetDenoiser(p, image_shape=(1, 8, 8), channels=(32, 64)), (1, 8, 8), 64
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised output layers would make every tangent trivial
        for prm in net.parameters():
            prm.add_(0.02 * torch.randn(prm.shape, generator=g))
    teacher = copy.deepcopy(net).requires_grad_(False).eval()
    return p, net, teacher, shape, batch


def batch_inputs(p, shape, batch):
    """Fixed-seed ``(trig, x0, z, t, tau, x_tau)`` of one sCM batch."""
    trig = TrigFlow(p, 0.5)
    g = torch.Generator().manual_seed(1)
    x0 = 0.5 * torch.randn(batch, *shape, generator=g)
    z = torch.randn(batch, *shape, generator=g)
    t = p.t_from_rho(torch.exp(-1.0 + 1.4 * torch.randn(batch, generator=g, dtype=torch.float64)))
    tau = trig.tau(t)
    return trig, x0, z, t, tau, trig.add_noise(x0, z, tau)


def steps(p, net, teacher, shape, batch):
    trig, x0, z, t, tau, x_tau = batch_inputs(p, shape, batch)
    t_max = torch.full((batch,), p.t_max, dtype=torch.float64)
    t_fake = torch.full((batch,), 0.5, dtype=torch.float64)

    def dmd2():
        net.zero_grad(set_to_none=True)
        x = net(float(p.rho_max) * z, t_max)
        with torch.no_grad():
            x_t = p.add_noise(x, x0, t_fake)
            field = x - teacher(x_t, t_fake)
        loss = 0.5 * ((x - (x - field).detach()) ** 2).mean()
        loss.backward()

    def scm(tangent):
        def step():
            net.zero_grad(set_to_none=True)
            dx = cc.teacher_velocity(trig, teacher, x_tau, t)
            F, dF = cc.scm_F_and_tangent(trig, net, x_tau, t, dx, tangent)
            gt = cc.normalize_tangent(cc.scm_tangent(trig, F, dF, x_tau, dx, tau))
            cc.scm_loss(F, gt, cc.scm_prior_weight(trig, tau)).mean().backward()

        return step

    return {"dmd2": dmd2, "scm_jvp": scm(cc.Tangent("torch")), "scm_fd": scm(cc.Tangent("fd")),
            "scm_native": scm(cc.Tangent("torch", native=True))}


def breakdown(p, net, teacher, shape, batch, reps: int = 20) -> dict[str, float]:
    """Seconds of each stage of one ``scm_jvp`` step (fastest of ``reps``), plus a plain no-grad forward
    of the student for scale: where the JVP path's time goes."""
    trig, _, _, t, tau, x_tau = batch_inputs(p, shape, batch)
    tangent, native = cc.Tangent("torch"), cc.Tangent("torch", native=True)
    best: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t0 = CLOCK()
        out = fn(*args, **kw)
        best[name] = min(best.get(name, float("inf")), CLOCK() - t0)
        return out

    def loss_of(out, dF, dx):
        g = cc.normalize_tangent(cc.scm_tangent(trig, out, dF, x_tau, dx, tau))
        return cc.scm_loss(out, g, cc.scm_prior_weight(trig, tau)).mean()

    for _ in range(reps + 2):
        net.zero_grad(set_to_none=True)
        dx = timed("teacher fwd", cc.teacher_velocity, trig, teacher, x_tau, t)
        F, primals, tangents, scale = cc._scm_jvp_args(trig, x_tau, t, dx, None)
        dF = timed("jvp (no grad)", tangent.derivative, F, net, primals, tangents, step_scale=scale)
        out = timed("student fwd", F, net, *primals)
        timed("backward", timed("tangent+loss", loss_of, out, dF, dx).backward)
        with torch.no_grad():
            timed("(plain fwd, no grad)", F, net, *primals)
            ref = timed("(jvp by torch.func.jvp)", native.derivative, F, net, primals, tangents, step_scale=scale)
    best["(rel. diff)"] = float((ref - dF).norm() / ref.norm())
    return best


def interleaved(fns: dict, iters: int, rounds: int, warmup: int = 2) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    best = {n: float("inf") for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = CLOCK()
            for _ in range(iters):
                fns[n]()
            best[n] = min(best[n], (CLOCK() - t0) / iters)
    return best


def main(argv=None):
    global CLOCK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,unet")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--mlp-width", type=int, default=256)
    ap.add_argument("--native-jvp", action="store_true", help="also time the step with torch.func.jvp's own rules")
    ap.add_argument("--breakdown", action="store_true", help="also time each stage of the JVP step")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, "
          f"fastest of {args.rounds} rounds x {args.iters}")
    cols = ["dmd2", "scm_jvp", "scm_fd"] + (["scm_native"] if args.native_jvp else [])
    print(f"{'model':6} " + " ".join(f"{c + ' ms':>13}" for c in cols) + " "
          + " ".join(f"{c.removeprefix('scm_') + '/dmd2':>12}" for c in cols[1:]))
    for model in args.models.split(","):
        fns = steps(*build(model, args.mlp_width))
        best = interleaved({c: fns[c] for c in cols}, args.iters, args.rounds)
        d = best["dmd2"]
        print(f"{model:6} " + " ".join(f"{1e3 * best[c]:13.2f}" for c in cols) + " "
              + " ".join(f"{best[c] / d:12.2f}" for c in cols[1:]))
    if args.breakdown:
        for model in args.models.split(","):
            parts = breakdown(*build(model, args.mlp_width))
            rel = parts.pop("(rel. diff)")
            print(f"{model} scm_jvp stages (ms, fastest of 20): "
                  + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in parts.items())
                  + f"; tangent vs torch.func.jvp rel. diff {rel:.1e}")


if __name__ == "__main__":
    main()
