"""Engine overhead of a distillation iteration and one-step vs teacher sampling throughput, as ratios
measured within one run (issue 7).

For each model (``mlp``: the toy 2-D setting with a learned MLP teacher, every role a 256-wide 4-block
MLP; ``unet``: the bundled digits UNet teacher with generator and fake score as copies of it, as in
``recipes/digits/*.yaml``) and each objective (``dmd2``, ``sid``), one iteration = one fake-score
update + one generator update (``generator_every: 1``). Printed:

  * engine iteration / the bare network passes it needs (same networks, optimizers, EMA)   goal <= 1.05
  * engine iteration / a minimal plain-PyTorch loop of the same method over the same networks  goal <= 1.0
  * one-step generator vs teacher 35-NFE Heun sampling throughput (``torch.inference_mode``,
    warm-up, same batch), with the teacher's per-NFE cost relative to the generator's and the
    sampler's own overhead over 35 bare teacher calls                                       goal >= 33x

Timing: every candidate is warmed up, then timed in ``--rounds`` interleaved rounds of ``--iters``
calls each (the order rotates each round); a time is the fastest round's mean (other jobs on the
machine only ever add time), a ratio the quotient of two such times.

Usage: python benchmarks/step_overhead.py [--models mlp,unet] [--objectives dmd2,sid] [--iters 5]
       [--rounds 7] [--threads 2] [--device cpu|cuda] [--clock wall|cpu] [--mlp-width 256] [--batch-mlp 256]
       [--batch-unet 64] [--no-sampling] [--no-steps]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

from scoredistill.config import load_yaml, resolve
from scoredistill.engine.distiller import Distiller
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.models.registry import save_model
from scoredistill.objectives.common import edm_weight
from scoredistill.process import EDM
from scoredistill.sampling import get_rhos_karras, sample_heun

SID_ALPHA = 1.2  # the default of objective sid (and recipes/digits/sid.yaml)
CLOCK = time.perf_counter


def interleaved(fns: dict, iters, rounds: int, warmup: int, sync) -> dict[str, list[float]]:
    """Per-round mean seconds per call of each function (``iters`` calls per round: a number, or one per
    function); functions alternate within every round."""
    if isinstance(iters, int):
        iters = dict.fromkeys(fns, iters)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    names = list(fns)
    out = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = CLOCK()
            for _ in range(iters[n]):
                fns[n]()
            sync()
            out[n].append((CLOCK() - t0) / iters[n])
    return out


def ratio(times, a, b) -> float:
    """Ratio of the fastest rounds: on a machine shared with other jobs, noise only ever adds time."""
    return min(times[a]) / min(times[b])


def best_ms(times, a) -> float:
    return min(times[a]) * 1e3


# -- configurations -----------------------------------------------------------------------------------
def engine_config(model: str, objective: str, batch: int, device: str, tmp: str, width: int = 256,
                  generator: dict | None = None) -> dict:
    """The resolved config of one benchmark setting; ``generator`` adds keys to its generator section
    (benchmarks/fewstep.py: ``steps``)."""
    train = {"steps": 10**9, "batch_size": batch, "generator_every": 1, "fake_on_generator_steps": True,
             "progress": False, "device": device, "checkpoint_every": 10**9}
    if model == "mlp":
        # a learned teacher so that every role is a network
        teacher = MLPDenoiser(EDM(), 2, width, 4, None, 1.4).requires_grad_(False)
        save_model(teacher, f"{tmp}/teacher", extra={})
        return resolve({"teacher": {"kind": "learned", "path": f"{tmp}/teacher"},
                        "generator": {"kind": "mlp", "width": width, "depth": 4, **(generator or {})},
                        "fake_score": {"kind": "mlp", "width": width, "depth": 4},
                        "objective": {"name": objective},
                        "train": {**train, "ema": 0.99}, "eval": {"plots": False, "n_samples": 16}})
    user = load_yaml(f"{REPO}/recipes/digits/{objective}.yaml")
    user["train"].update(train)
    user["generator"].update(generator or {})
    user["eval"] = {"plots": False, "n_samples": 16}
    return resolve(user)


def sample_t(objective: str, n: int, device) -> torch.Tensor:
    """Canonical times: DMD2's U[0.02, 0.98], SiD's U[0, 0.8] (the network cost does not depend on them)."""
    u = torch.rand(n, dtype=torch.float64, device=device)
    return 0.02 + 0.96 * u if objective == "dmd2" else 0.8 * u


# -- the loops ----------------------------------------------------------------------------------------
def make_loops(d: Distiller, objective: str, batch: int):
    """``bare()``: only the network passes, optimizer steps and EMA the engine iteration needs;
    ``plain()``: a minimal hand-written loop of the method (own copies of G and F, same settings)."""
    dev = d.device
    G, F, T = d.generator, d.fake, d.teacher
    opt_g, opt_f = d.optimizers["generator"], d.optimizers["fake_score"]
    shape, ncls = T.data_shape, T.num_classes
    proc = T.process
    sd = getattr(F, "sigma_data", 0.5)
    clip = d.cfg["train"]["grad_clip"]
    z = torch.randn(batch, *shape, device=dev)
    c = torch.randint(0, ncls, (batch,), device=dev) if ncls else None
    t = sample_t(objective, batch, dev)
    g_params = list(G.parameters())

    def bare():
        # fake phase: G forward without graph, F forward + backward, Adam
        with torch.no_grad():
            x = G(z, c)
        opt_f.zero_grad()
        F(x, t, c).square().mean().backward()
        opt_f.step()
        # generator phase: G forward + backward, teacher and fake forward (through them for SiD), Adam, EMA
        x = G(z, c)
        opt_g.zero_grad()
        if objective == "sid":
            torch.autograd.backward((T(x, t, c) + F(x, t, c)).square().mean(), inputs=g_params)
        else:
            with torch.no_grad():
                T(x, t, c)
                F(x, t, c)
            x.square().mean().backward()
        opt_g.step()
        d.ema.update(G)

    G2, F2 = copy.deepcopy(G), copy.deepcopy(F)
    tc = d.cfg["train"]
    og = torch.optim.Adam(G2.parameters(), lr=tc["lr"], betas=tuple(tc["betas"]))
    of = torch.optim.Adam(F2.parameters(), lr=tc["fake_lr"] or tc["lr"], betas=tuple(tc["fake_betas"] or tc["betas"]))
    ema = copy.deepcopy(G2).requires_grad_(False)
    g2_params, f2_params = list(G2.parameters()), list(F2.parameters())
    bshape = (-1,) + (1,) * len(shape)

    def noised(x, tt):
        return x + proc.sigma(tt).view(bshape).to(x.dtype) * torch.randn_like(x)

    def labels():
        return torch.randint(0, ncls, (batch,), device=dev) if ncls else None

    def plain():
        # fake score: EDM-weighted denoising on detached samples, 10 % label dropout
        zz, cc = torch.randn(batch, *shape, device=dev), labels()
        with torch.no_grad():
            x = G2(zz, cc)
        tt = torch.rand(batch, dtype=torch.float64, device=dev)
        if cc is not None:
            cc = torch.where(torch.rand(batch, device=dev) < 0.1, torch.full_like(cc, -1), cc)
        of.zero_grad()
        (edm_weight(proc, tt, sd, x) * (F2(noised(x, tt), tt, cc) - x) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(f2_params, clip)
        of.step()
        # generator
        zz, cc = torch.randn(batch, *shape, device=dev), labels()
        x = G2(zz, cc)
        tt = sample_t(objective, batch, dev)
        dims = tuple(range(1, x.dim()))
        og.zero_grad()
        if objective == "sid":
            xt = noised(x, tt)
            fr, ff = T(xt, tt, cc), F2(xt, tt, cc)
            omega = (x - fr).abs().mean(dims, keepdim=True).detach().clamp(min=1e-5)
            diff = fr - ff
            torch.autograd.backward((diff * ((fr - x) - SID_ALPHA * diff) / omega).mean(), inputs=g2_params)
        else:
            with torch.no_grad():
                xt = noised(x, tt)
                dr, df = T(xt, tt, cc), F2(xt, tt, cc)
                g = (df - dr) / (x - dr).abs().mean(dims, keepdim=True).clamp(min=1e-5)
            (0.5 * ((x - (x - g).detach()) ** 2).mean()).backward()
        torch.nn.utils.clip_grad_norm_(g2_params, clip)
        og.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), g2_params):
                pe.lerp_(p, 1 - tc["ema"])

    return bare, plain


# -- main ------------------------------------------------------------------------------------------------
def step_rows(args, models, objectives, sync):
    rows, keep = [], {}
    for model in models:
        batch = args.batch_mlp if model == "mlp" else args.batch_unet
        for objective in objectives:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = engine_config(model, objective, batch, args.device, tmp, args.mlp_width)
                d = Distiller(cfg, f"{tmp}/run", log=lambda *a: None)
                bare, plain = make_loops(d, objective, batch)
                iters = args.iters if model == "mlp" else max(1, args.iters // 4)
                times = interleaved({"engine": d.train_step, "bare": bare, "plain": plain}, iters, args.rounds,
                                    args.warmup, sync)
                rows.append((model, objective, batch, best_ms(times, "engine"), best_ms(times, "bare"),
                             best_ms(times, "plain"), ratio(times, "engine", "bare"),
                             ratio(times, "engine", "plain")))
                keep[model] = (d.generator, d.teacher)
                print(f"  {model:5s} {objective:5s} batch {batch:4d}   engine {rows[-1][3]:8.2f} ms   bare "
                      f"{rows[-1][4]:8.2f} ms   plain {rows[-1][5]:8.2f} ms   engine/bare {rows[-1][6]:.3f}   "
                      f"engine/plain {rows[-1][7]:.3f}", flush=True)
    return rows, keep


def sampling_fns(G, T, n):
    """Same batch on both sides: ``n`` one-step samples vs ``n`` teacher samples with 18 Heun levels
    (35 NFE), plus one bare teacher evaluation (to split the ratio into network cost and sampler overhead)."""
    dev = next(T.parameters()).device
    z = torch.randn(n, *T.data_shape, device=dev)
    c = torch.randint(0, T.num_classes, (n,), device=dev) if T.num_classes else None
    t = torch.full((n,), 0.5, dtype=torch.float64, device=dev)
    p = T.process
    rhos = get_rhos_karras(18, max(p.rho_min, 0.002), min(p.rho_max, 80.0))  # what teacher_sample uses
    return {"one": lambda: G(torch.randn(n, *T.data_shape, device=dev), c),
            "heun": lambda: sample_heun(T, torch.randn(n, *T.data_shape, device=dev), rhos, c),
            "nfe": lambda: T(z, t, c)}


def sampling_rows(args, models, sync, nets):
    rows = []
    for model in models:
        if model in nets:
            G, T = nets[model]
        else:  # --no-steps: build the roles without timing steps
            with tempfile.TemporaryDirectory() as tmp:
                d = Distiller(engine_config(model, "dmd2", 16, args.device, tmp, args.mlp_width), f"{tmp}/run",
                              log=lambda *a: None)
                G, T = d.generator, d.teacher
        n = args.sample_mlp if model == "mlp" else args.sample_unet
        G.eval()
        with torch.inference_mode():
            times = interleaved(sampling_fns(G, T, n), {"one": 5, "heun": 1, "nfe": 5}, args.rounds, 1, sync)
        G.train()
        one, heun, nfe = (best_ms(times, k) for k in ("one", "heun", "nfe"))
        rows.append((model, n, one, heun, ratio(times, "heun", "one"), ratio(times, "nfe", "one"),
                     heun / (35 * nfe)))
        print(f"  {model:5s} n {n:5d}   1-NFE {one:8.1f} ms   teacher 35-NFE Heun {heun:8.1f} ms   ratio "
              f"{rows[-1][4]:.1f}x", flush=True)
    return rows


def parser(doc: str, rounds: int, warmup: int, threads: int, clock: str) -> argparse.ArgumentParser:
    """The options every step/sampling benchmark shares (this one and benchmarks/fewstep.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--models", default="mlp,unet")
    ap.add_argument("--objectives", default="dmd2,sid")
    ap.add_argument("--iters", type=int, default=5, help="iterations per round (the UNet uses a quarter, at least 1)")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--batch-mlp", type=int, default=256)
    ap.add_argument("--batch-unet", type=int, default=64)
    ap.add_argument("--sample-mlp", type=int, default=4096)
    ap.add_argument("--sample-unet", type=int, default=256)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=("wall", "cpu"), default=clock,
                    help="cpu: this process's CPU time (time.process_time), robust to other jobs on a shared "
                         "machine when --threads 1; wall: perf_counter (use it on a quiet machine, and on CUDA)")
    ap.add_argument("--no-steps", action="store_true")
    ap.add_argument("--no-sampling", action="store_true")
    return ap


def setup(args):
    """Threads, seed and clock from ``args``; returns ``(sync, models, objectives)`` and prints the header."""
    global CLOCK
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    models = [m for m in args.models.split(",") if m]
    objectives = [o for o in args.objectives.split(",") if o]
    print(f"device {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}, {args.clock} clock; "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up calls")
    return sync, models, objectives


def main():
    ap = parser(__doc__, rounds=7, warmup=3, threads=2, clock="wall")
    ap.add_argument("--mlp-width", type=int, default=256,
                    help="e.g. 8 with --batch-mlp 8: the network passes cost ~nothing, the loops' fixed costs show")
    args = ap.parse_args()
    sync, models, objectives = setup(args)
    rows, nets = [], {}
    if not args.no_steps:
        print(f"step overhead (one fake + one generator update per iteration; {args.iters} iterations per round "
              "for the MLP, a quarter for the UNet):")
        rows, nets = step_rows(args, models, objectives, sync)
    srows = []
    if not args.no_sampling:
        print("sampling throughput (inference_mode, same batch; per round 1 Heun sampling, 5 generator calls, "
              "5 bare teacher calls):")
        srows = sampling_rows(args, models, sync, nets)

    print("\n| model | objective | batch | engine iteration | bare passes | plain loop | engine / bare (≤ 1.05) "
          "| engine / plain (≤ 1.0) |")
    print("|---|---|---|---|---|---|---|---|")
    for m, o, b, e, ba, p, rb, rp in rows:
        print(f"| {m} | {o} | {b} | {e:.2f} ms | {ba:.2f} ms | {p:.2f} ms | **{rb:.3f}** | **{rp:.3f}** |")
    if srows:
        print("\n| model | samples | 1-NFE generator | teacher 35-NFE Heun | throughput ratio (≥ 33×) "
              "| teacher NFE / generator call | Heun / 35 bare teacher calls |")
        print("|---|---|---|---|---|---|---|")
        for m, n, one, heun, r, nfe_ratio, overhead in srows:
            print(f"| {m} | {n} | {one:.1f} ms | {heun:.1f} ms | **{r:.1f}×** | {nfe_ratio:.3f} | {overhead:.3f} |")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    main()
