"""Time to quality of a toy recipe through the engine vs a minimal hand-written loop of the same method (issue 17).

Quality = the generator's (EMA) samples have a pooled within-mode std ratio in [0.85, 1.15] (``within_std`` of
metrics/gmm.py: spread around the nearest component relative to its std; early in training modes are too wide,
late too sharp, so the bar is two-sided) and every component of weight
>= 5 % holds at least a tenth of its share of the precise samples (the ``modes_covered`` rule). Both
loops are evaluated every ``--every`` iterations on the same 2000 noise draws with the project's metrics;
the clock (process CPU time with ``--threads 1`` by default, so other jobs on a shared machine do not
count) runs during training only, never during evaluation.

(a) ``engine``: the recipe (default ``recipes/toy/dmd2.yaml``) through :class:`Distiller`, with
    ``teacher.preset`` set and any ``--set KEY=VALUE`` overrides;
(b) ``plain``: DMD2 (arXiv 2405.14867) written out here on the exact-score teacher: a plain 4-layer
    SiLU MLP generator ``z -> x`` and an EDM-preconditioned plain MLP fake score (time features
    concatenated to the input), the same batch, optimizers (Adam, lr, betas), gradient clip, EMA, the
    recipe's field time range ``objective.time`` (uniform), ``t ~ U[0.02, 0.98]`` for the fake loss, the
    recipe's fake updates per generator update (a fake update on every iteration, the generator on every fifth)
    and, when the recipe has one, its regression on teacher ODE pairs (``objective.regression_weight`` for the
    first ``regression_steps`` iterations, the same pairs as the engine's).

Printed: per evaluation the training seconds, within-mode std, modes covered, weight TV; then per
mixture the seconds to quality of both loops and their ratio (goal engine / plain <= 1.2), and, when a
loop never gets there within ``--max-steps``, its best figures instead.

Usage: python benchmarks/toy_time_to_quality.py [--teachers asym6,gmm16d] [--recipe recipes/toy/dmd2.yaml]
       [--set KEY=VALUE ...] [--loops engine,plain] [--every 50] [--max-steps 6000] [--seeds 0,1,2]
       [--threads 1] [--clock cpu|wall] [--plain-width 256] [--plain-depth 4]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from torch import nn

from scoredistill.config import load_yaml, resolve
from scoredistill.engine.build import build_teacher, make_ode_pairs
from scoredistill.engine.distiller import Distiller
from scoredistill.metrics.gmm import LIGHT_WEIGHT, gmm_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITHIN_STD = (0.85, 1.15)  # the quality band of issue 17
N_EVAL = 2000


def quality(m: dict, weights: torch.Tensor) -> tuple[bool, int, int]:
    """``(reached, heavy modes covered, heavy modes)``: covered = a tenth of the mode's share of the precise
    samples, over the components of weight >= 5 %."""
    mass = torch.tensor(m["component_mass"], dtype=torch.float64)
    w = weights.double().cpu()
    heavy = w >= LIGHT_WEIGHT
    covered = int(((mass >= 0.1 * w) & heavy).sum())
    ok = covered == int(heavy.sum()) and WITHIN_STD[0] <= m["within_std"] <= WITHIN_STD[1]
    return ok, covered, int(heavy.sum())


def off_band(w: float) -> float:
    """How far a within-mode std ratio is from 1 (log scale; no precise samples: infinitely far)."""
    return abs(math.log(w)) if w > 0 else math.inf


# -- (b) the minimal loop ----------------------------------------------------------------------------------
def mlp(d_in: int, width: int, depth: int, d_out: int) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.SiLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, d_out))


class PlainFake(nn.Module):
    """``D(x_t, sigma) = c_skip x + c_out F([c_in x, sin/cos(f ln(sigma)/4)])`` (EDM preconditioning, VE
    coordinates of the EDM process where ``x_t = x0 + sigma eps``)."""

    def __init__(self, dim: int, width: int, depth: int, sd: float, n_freq: int = 16):
        super().__init__()
        self.sd = sd
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(64.0), n_freq)))
        self.net = mlp(dim + 2 * n_freq, width, depth, dim)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, sigma):
        s, sd = sigma[:, None], self.sd
        arg = (s.log() / 4) * self.freqs[None]
        h = torch.cat([x / (s * s + sd * sd).sqrt(), arg.sin(), arg.cos()], 1)
        return sd * sd / (s * s + sd * sd) * x + s * sd / (s * s + sd * sd).sqrt() * self.net(h)


def plain_loop(teacher, tc: dict, width: int, depth: int, seed: int, field_t: tuple[float, float] = (0.02, 0.98),
               regression: tuple[float, int] = (0.0, 0)):
    """``(step(), sample(z))`` of a minimal DMD2 loop with the recipe's train settings ``tc``; the field's
    canonical times ``t ~ U[field_t]`` (the recipe's ``objective.time``), the fake score's ``U[0.02, 0.98]``;
    ``regression = (lambda_reg, steps)``: DMD's regression on teacher ODE pairs while the iteration is below
    ``steps`` (0: always; ``lambda_reg`` 0: off)."""
    reg_w, reg_steps = regression
    ode = make_ode_pairs(teacher, tc["ode_pairs"], tc["ode_steps"], tc["seed"]) if reg_w > 0 else None
    torch.manual_seed(seed)
    dim, p = teacher.dim, teacher.process
    sd = teacher.data_std()
    G, F = mlp(dim, width, depth, dim), PlainFake(dim, width, depth, sd)
    ema = mlp(dim, width, depth, dim).requires_grad_(False)
    ema.load_state_dict(G.state_dict())
    og = torch.optim.Adam(G.parameters(), lr=tc["lr"], betas=tuple(tc["betas"]))
    of = torch.optim.Adam(F.parameters(), lr=tc["fake_lr"] or tc["lr"], betas=tuple(tc["fake_betas"] or tc["betas"]))
    b, every, clip, decay = tc["batch_size"], tc["generator_every"], tc["grad_clip"], tc["ema"]
    it = [0]

    def sigmas(lo=0.02, hi=0.98):  # canonical t ~ U[lo, hi] -> the EDM process's noise level
        return p.sigma(lo + (hi - lo) * torch.rand(b, dtype=torch.float64)).float()

    def step():
        with torch.no_grad():
            x = G(torch.randn(b, dim))
        s = sigmas()
        w = (s * s + sd * sd) / (s * sd) ** 2
        of.zero_grad()
        (w[:, None] * (F(x + s[:, None] * torch.randn_like(x), s) - x) ** 2).mean().backward()
        nn.utils.clip_grad_norm_(F.parameters(), clip)
        of.step()
        if it[0] % every == 0:
            x = G(torch.randn(b, dim))
            s = sigmas(*field_t)
            with torch.no_grad():
                x_t = (x + s[:, None] * torch.randn_like(x)).double()
                d_real = teacher.denoise(x_t, p.t_from_rho(s.double())).float()
                d_fake = F(x_t.float(), s)
                g = (d_fake - d_real) / (x - d_real).abs().mean(1, keepdim=True).clamp(min=1e-5)
            og.zero_grad()
            loss = 0.5 * ((x - (x - g).detach()) ** 2).mean()
            if ode is not None and (not reg_steps or it[0] < reg_steps):
                idx = torch.randint(0, len(ode[0]), (b,))
                loss = loss + reg_w * ((G(ode[0][idx]) - ode[1][idx].float()) ** 2).mean()
            loss.backward()
            nn.utils.clip_grad_norm_(G.parameters(), clip)
            og.step()
            with torch.no_grad():
                for pe, pg in zip(ema.parameters(), G.parameters()):
                    pe.lerp_(pg, 1 - decay)
        it[0] += 1

    def sample(z):
        with torch.no_grad():
            return ema(z)

    return step, sample


def field_time(objective: dict) -> tuple[float, float]:
    """The recipe's ``objective.time`` range for the minimal loop's field (it draws uniform times only)."""
    tm = objective.get("time") or {"kind": "uniform"}
    if tm.get("kind") != "uniform":
        raise SystemExit(f"the plain loop draws uniform field times; the recipe has objective.time {tm}")
    return float(tm.get("t_min", 0.02)), float(tm.get("t_max", 0.98))


# -- driver ----------------------------------------------------------------------------------------------
def engine_loop(cfg: dict):
    d = Distiller(cfg, None, log=lambda *a: None)
    return d.train_step, lambda z: d.sample(z)


def race(name: str, step, sample, teacher, z, every: int, max_steps: int, clock) -> dict:
    """Train until quality or ``max_steps``; returns the first time at quality and the best figures seen."""
    spent, best, hit = 0.0, None, None
    for i in range(1, max_steps + 1):
        t0 = clock()
        step()
        spent += clock() - t0
        if i % every and i != max_steps:
            continue
        m = gmm_metrics(sample(z), teacher, seed=0)
        ok, cov, heavy = quality(m, teacher.weights)
        print(f"    {name:6s} it {i:6d}  {spent:7.1f} s  within-mode std {m['within_std']:.3f}  modes (>= 5 %) "
              f"{cov}/{heavy}  TV {m['weight_tv']:.3f}  precision {m['precision']:.3f}", flush=True)
        row = {"it": i, "s": spent, "within_std": m["within_std"], "covered": f"{cov}/{heavy}", "tv": m["weight_tv"]}
        if best is None or (cov, -off_band(m["within_std"])) >= (int(best["covered"].split("/")[0]),
                                                                 -off_band(best["within_std"])):
            best = row
        if ok:
            hit = row
            break
    return {"hit": hit, "best": best, "per_it_ms": 1e3 * spent / i}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", default="asym6,gmm16d")
    ap.add_argument("--recipe", default=os.path.join(REPO, "recipes", "toy", "dmd2.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine config override")
    ap.add_argument("--loops", default="engine,plain")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--seeds", default="0", help="comma-separated train seeds; the ratio is reported per seed and "
                    "as the median over seeds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--plain-width", type=int, default=256)
    ap.add_argument("--plain-depth", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    loops = [x for x in args.loops.split(",") if x]
    print(f"threads {torch.get_num_threads()}, {args.clock} clock, torch {torch.__version__}; recipe "
          f"{os.path.relpath(args.recipe, REPO)} {' '.join(args.set)}; quality: within-mode std in {list(WITHIN_STD)} "
          f"and every mode of weight >= 5 % covered; evaluated every {args.every} iterations")
    table = []
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for preset, seed in [(t, s) for t in args.teachers.split(",") if t for s in seeds]:
        cfg = resolve(load_yaml(args.recipe), [f"teacher.preset={preset}", f"train.steps={args.max_steps}",
                                               f"train.seed={seed}", "train.progress=false", "train.threads=null",
                                               "eval.plots=false", *args.set])
        teacher, _ = build_teacher(cfg["teacher"])
        if cfg["teacher"]["process"]["kind"] != "edm":
            raise SystemExit("the plain loop is written for the EDM process (x_t = x0 + sigma eps)")
        z = torch.randn(N_EVAL, teacher.dim, generator=torch.Generator().manual_seed(12345))
        print(f"{preset}, seed {seed}:", flush=True)
        res = {}
        for name in loops:
            if name == "engine":
                step, sample = engine_loop(cfg)
            else:
                oc = cfg["objective"]
                step, sample = plain_loop(teacher, cfg["train"], args.plain_width, args.plain_depth, seed,
                                          field_time(oc), (oc.get("regression_weight", 0.0),
                                                           oc.get("regression_steps", 0)))
            res[name] = race(name, step, sample, teacher, z, args.every, args.max_steps, clock)
        table.append((preset, seed, res))
    print("\n| mixture | seed | loop | ms / iteration | iterations to quality | seconds to quality | best seen "
          "(it, within-mode std, modes) |")
    print("|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {}
    for preset, seed, res in table:
        for name, r in res.items():
            h, b = r["hit"], r["best"]
            reached = f"{h['it']} | {h['s']:.1f} s" if h else "– | not reached"
            print(f"| {preset} | {seed} | {name} | {r['per_it_ms']:.1f} | {reached} | {b['it']}, "
                  f"{b['within_std']:.3f}, {b['covered']} |")
        if {"engine", "plain"} <= set(res):
            per_it = res["engine"]["per_it_ms"] / res["plain"]["per_it_ms"]
            if res["engine"]["hit"] and res["plain"]["hit"]:
                q = res["engine"]["hit"]["s"] / res["plain"]["hit"]["s"]
                ratios.setdefault(preset, []).append(q)
                print(f"| {preset} | {seed} | engine / plain | {per_it:.2f} | | **{q:.2f}×** (goal ≤ 1.2) | |")
            else:  # a loop that never reached quality has no time to quality: counted as infinitely slow
                ratios.setdefault(preset, []).append(math.inf if not res["engine"]["hit"] else 0.0)
    for preset, qs in ratios.items():
        print(f"{preset}: time-to-quality ratio engine / plain, median over seeds {seeds}: "
              f"{statistics.median(qs):.2f}× (per seed {', '.join(f'{q:.2f}' for q in qs)}; goal ≤ 1.2)")


if __name__ == "__main__":
    main()
