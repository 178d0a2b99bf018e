"""Cost of K-step students (docs/fewstep.md), as ratios measured within one run (issue 14).

For each model (``mlp``: the toy 2-D setting with a learned 256-wide 4-block MLP teacher, the student a
time-conditioned MLP of the same size; ``unet``: the bundled digits UNet teacher, student and fake score
copies of it, ``recipes/digits/*.yaml``) and objective (``dmd2``, ``sid``), one engine iteration = one
fake-score update + one generator update (``generator_every: 1``), with the *same* step network as

  * a 1-step student (``generator.steps: 1``), and
  * a 4-step student with backward simulation (``generator.steps: 4``), timed with the trained step ``k``
    held at each of 0..3 in turn. An iteration at step ``k`` rolls the student out ``k`` steps without
    gradient twice (the fake update's samples and the generator update's), so it costs
    ``2 k`` gradient-free step-network passes more than a 1-step iteration. The uniform step choice makes the
    expected iteration the mean over ``k``:                             4-step / 1-step  goal <= 1.3

and sampling throughput (``torch.inference_mode``, same batch): the 4-step student's 4 step-network
evaluations (with its re-noising) vs the teacher's 35-NFE Heun (18 levels)           goal >= 8x

Timing as benchmarks/step_overhead.py (warm-up, interleaved rounds, fastest round).

Usage: python benchmarks/fewstep.py [--models mlp,unet] [--objectives dmd2,sid] [--iters 5] [--rounds 5]
       [--threads 1] [--clock cpu|wall] [--device cpu|cuda] [--no-sampling]
"""

from __future__ import annotations

import tempfile

import step_overhead as so  # benchmarks/ is the script's directory, hence on sys.path
import torch

from scoredistill.engine.distiller import Distiller

K = 4


def distiller(model, objective, batch, args, tmp, steps):
    cfg = so.engine_config(model, objective, batch, args.device, tmp, 256, generator={"steps": steps})
    return Distiller(cfg, f"{tmp}/run{steps}", log=lambda *a: None)


def fixed_step(d: Distiller, k: int):
    """``d.train_step`` with the trained step held at ``k``: the engine reseeds the step choice every
    iteration, so the reseeding is switched off on this (benchmark-only) instance."""
    g = d.generator
    g.set_rollout_seed = lambda seed: None

    def run():
        g.set_rollout_step(k)
        d.train_step()

    return run


def step_rows(args, models, objectives, sync):
    rows, keep = [], {}
    for model in models:
        batch = args.batch_mlp if model == "mlp" else args.batch_unet
        for objective in objectives:
            with tempfile.TemporaryDirectory() as tmp:
                d1 = distiller(model, objective, batch, args, tmp, 1)
                d4 = distiller(model, objective, batch, args, tmp, K)
                assert type(d1.generator.denoiser) is type(d4.generator.denoiser)  # the same step network
                fns = {"1-step": d1.train_step, **{f"k={k}": fixed_step(d4, k) for k in range(K)}}
                iters = args.iters if model == "mlp" else max(1, args.iters // 4)
                times = so.interleaved(fns, iters, args.rounds, args.warmup, sync)
                one = so.best_ms(times, "1-step")
                per_k = [so.best_ms(times, f"k={k}") for k in range(K)]
                mean4 = sum(per_k) / K
                rows.append((model, objective, batch, one, per_k, mean4, mean4 / one))
                keep[model] = (d4.generator, d4.teacher, d1.generator)
                print(f"  {model:5s} {objective:5s} batch {batch:4d}   1-step {one:8.2f} ms   4-step k=0..3 "
                      + " ".join(f"{v:8.2f}" for v in per_k) + f" ms   mean {mean4:8.2f} ms   ratio {mean4 / one:.3f}",
                      flush=True)
    return rows, keep


def sampling_rows(args, models, sync, nets):
    rows = []
    for model in models:
        if model in nets:
            G4, T, G1 = nets[model]
        else:
            with tempfile.TemporaryDirectory() as tmp:
                G4, T = (lambda d: (d.generator, d.teacher))(distiller(model, "dmd2", 16, args, tmp, K))
                G1 = distiller(model, "dmd2", 16, args, tmp, 1).generator
        n = args.sample_mlp if model == "mlp" else args.sample_unet
        G4.eval()
        G1.eval()
        fns = so.sampling_fns(G4, T, n)
        fns["one"] = so.sampling_fns(G1, T, n)["one"]
        fns["four"] = so.sampling_fns(G4, T, n)["one"]
        with torch.inference_mode():
            times = so.interleaved(fns, {"one": 5, "four": 5, "heun": 1, "nfe": 5}, args.rounds, 1, sync)
        G4.train()
        G1.train()
        one, four, heun, nfe = (so.best_ms(times, k) for k in ("one", "four", "heun", "nfe"))
        rows.append((model, n, one, four, heun, heun / four, four / (K * nfe)))
        print(f"  {model:5s} n {n:5d}   1-step {one:8.1f} ms   4-step {four:8.1f} ms   teacher 35-NFE Heun "
              f"{heun:8.1f} ms   ratio {heun / four:.1f}x", flush=True)
    return rows


def main():
    args = so.parser(__doc__, rounds=5, warmup=2, threads=1, clock="cpu").parse_args()
    sync, models, objectives = so.setup(args)
    rows, nets = [], {}
    if not args.no_steps:
        print("iteration cost (one fake + one generator update), 1-step vs 4-step backward simulation:")
        rows, nets = step_rows(args, models, objectives, sync)
    srows = []
    if not args.no_sampling:
        print("sampling throughput (inference_mode, same batch):")
        srows = sampling_rows(args, models, sync, nets)
    if rows:
        print("\n| model | objective | batch | 1-step iteration | 4-step, k = 0 / 1 / 2 / 3 | 4-step mean "
              "| 4-step / 1-step (≤ 1.3) |")
        print("|---|---|---|---|---|---|---|")
        for m, o, b, one, per_k, mean4, r in rows:
            ks = " / ".join(f"{v:.1f}" for v in per_k)
            print(f"| {m} | {o} | {b} | {one:.2f} ms | {ks} ms | {mean4:.2f} ms | **{r:.3f}** |")
    if srows:
        print("\n| model | samples | 1-step student | 4-step student | teacher 35-NFE Heun | Heun / 4-step (≥ 8×) "
              "| 4-step / 4 bare teacher calls |")
        print("|---|---|---|---|---|---|---|")
        for m, n, one, four, heun, r, ov in srows:
            print(f"| {m} | {n} | {one:.1f} ms | {four:.1f} ms | {heun:.1f} ms | **{r:.1f}×** | {ov:.3f} |")


if __name__ == "__main__":
    main()
