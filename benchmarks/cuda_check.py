"""CUDA smoke and measurement run: every recipe family on a GPU, in fp32 and bf16, plus memory modes,
GPU resume determinism and sampling throughput. Writes ``cuda_check.json`` and ``cuda_check.md``.

    PYTHONPATH=src python benchmarks/cuda_check.py --out OUT_DIR [--quick]

Each case runs in-process inside ``try``; a failing case records its error and the run goes on, so
one bug does not hide the others. The project's CI has no GPU: this script is how CUDA paths get checked
(see docs/results/performance.md for the last results and the card that produced them).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from scoredistill.config import load_yaml, resolve
from scoredistill.engine.distiller import Distiller

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS: list[dict] = []
DEV = "cuda"


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def case(name):
    def deco(fn):
        def run(*a, **kw):
            if DEV == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            row = {"case": name}
            try:
                row.update(fn(*a, **kw) or {})
                row["status"] = "ok"
            except Exception as e:  # record and go on: one bug must not hide the others
                row["status"] = "FAIL"
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                row["where"] = traceback.format_exc().strip().splitlines()[-3][:200]
            row["seconds"] = round(time.time() - t0, 2)
            row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if DEV == "cuda" else None
            RESULTS.append(row)
            print(json.dumps(row), flush=True)
            return row

        return run

    return deco


def _finite_modules(d: Distiller) -> bool:
    return all(torch.isfinite(p).all() for m in d.modules.values() for p in m.state_dict().values()
               if torch.is_floating_point(p))


def distill(recipe: str, overrides: list[str], steps: int, name: str, extra_eval: bool = True):
    @case(name)
    def run():
        cfg = resolve(load_yaml(os.path.join(ROOT, recipe)),
                      [f"train.device={DEV}", f"train.steps={steps}", f"eval.every={steps}", "eval.n_samples=256",
                       "eval.plots=false", "train.progress=false", f"train.checkpoint_every={steps}",
                       "train.real_pool=512", "train.ode_pairs=256", *overrides])
        with tempfile.TemporaryDirectory() as tmp:
            d = Distiller(cfg, tmp, log=lambda *a: None)
            d._t0 = time.time()
            d.train_step()  # warm-up (cuDNN autotune, allocator)
            _sync()
            t0 = time.time()
            for _ in range(steps - 1):
                d.train_step()
            _sync()
            it_s = (time.time() - t0) / max(steps - 1, 1)
            res = d.evaluate() if extra_eval else {}
            d.save()
            teacher_dev = str(next(iter(d.teacher.state_dict().values())).device) if d.teacher.state_dict() else "-"
            return {"it_ms": round(1000 * it_s, 2), "nonfinite": dict(d.nonfinite),
                    "finite_weights": _finite_modules(d),
                    "teacher_param_device": teacher_dev,
                    "metrics": {k: v for k, v in res.items() if isinstance(v, (int, float)) and k != "step"}}

    return run()


def resume_determinism(deterministic: bool):
    @case(f"resume on cuda: 10 + 10 steps vs 20 (digits dmd2), train.deterministic={deterministic}")
    def run():
        base = [f"train.device={DEV}", "eval.every=1000", "eval.n_samples=64", "eval.plots=false",
                "train.progress=false", "train.checkpoint_every=10", "train.batch_size=64",
                f"train.deterministic={str(deterministic).lower()}"]
        cfg20 = resolve(load_yaml(os.path.join(ROOT, "recipes/digits/dmd2.yaml")), base + ["train.steps=20"])
        with tempfile.TemporaryDirectory() as tmp:
            full = Distiller(cfg20, os.path.join(tmp, "full"), log=lambda *a: None)
            full.train()
            half = Distiller(resolve(load_yaml(os.path.join(ROOT, "recipes/digits/dmd2.yaml")),
                                     base + ["train.steps=10"]), os.path.join(tmp, "half"), log=lambda *a: None)
            half.train()
            res = Distiller(cfg20, os.path.join(tmp, "half"), log=lambda *a: None)
            res.train(resume=True)
            a, b = full.generator.state_dict(), res.generator.state_dict()
            diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
            return {"max_abs_diff_generator": diff, "bit_identical": diff == 0.0}

    return run()


def throughput():
    @case("sampling throughput: digits UNet student 1-NFE vs teacher 35-NFE Heun, 1000 samples")
    def run():
        from scoredistill.engine.build import build_generator, build_teacher
        from scoredistill.sampling import teacher_sample

        teacher, _ = build_teacher({"kind": "bundled", "name": "digits", "process": {"kind": "edm"}})
        teacher = teacher.to(DEV).eval()
        gen = build_generator(resolve({"teacher": {"kind": "bundled", "name": "digits"},
                                       "generator": {"kind": "teacher"}})["generator"], teacher).to(DEV).eval()
        out = {}
        for bs in (1000, 100):
            z = torch.randn(bs, *teacher.data_shape, device=DEV)
            c = torch.randint(0, 10, (bs,), device=DEV)
            with torch.inference_mode():
                for _ in range(3):
                    gen(z, c)
                    teacher_sample(teacher, bs, steps=18, cond=c, batch_size=bs)
                _sync()
                t0 = time.time()
                for _ in range(20):
                    gen(z, c)
                _sync()
                t1 = (time.time() - t0) / 20
                t0 = time.time()
                for _ in range(3):
                    teacher_sample(teacher, bs, steps=18, cond=c, batch_size=bs)
                _sync()
                t35 = (time.time() - t0) / 3
            out[f"batch{bs}"] = {"one_nfe_ms": round(1000 * t1, 3), "heun35_ms": round(1000 * t35, 2),
                                 "ratio": round(t35 / t1, 1)}
        return out

    return run()


def optimize_recipes(quick: bool):
    for path in sorted(glob.glob(os.path.join(ROOT, "recipes/optimize/*.yaml")))[: 3 if quick else None]:
        name = os.path.basename(path)

        @case(f"optimize {name} cuda")
        def run(path=path):
            with tempfile.TemporaryDirectory() as tmp:
                p = subprocess.run([sys.executable, "-m", "scoredistill", "optimize", path, "--out", tmp + "/r",
                                    "--set", f"train.device={DEV}", "--set", "train.steps=30",
                                    "--set", "train.progress=false"],
                                   capture_output=True, text=True, timeout=300)
                if p.returncode != 0:
                    raise RuntimeError((p.stderr.strip().splitlines() or ["?"])[-1])
                return {"tail": p.stdout.strip().splitlines()[-1][:160] if p.stdout.strip() else ""}

        run()


def diffusers_cases():
    from scoredistill.adapters.tiny import save_tiny

    tmp = tempfile.mkdtemp()
    for kind, objective, fake, prec, offload in [("sd15", "dmd2", "teacher", "bf16", False),
                                                 ("sd15", "dmd2", "lora", "bf16", False),
                                                 ("sd15", "sid", "teacher", "fp32", True),
                                                 ("sdxl", "dmd2", "lora", "bf16", False),
                                                 ("sd3", "sid", "teacher", "bf16", False),
                                                 ("flux", "dmd2", "lora", "bf16", False),
                                                 ("flux", "dmd2", "lora", "fp32", False)]:
        @case(f"diffusers tiny {kind} {objective} fake={fake} {prec} offload={offload}")
        def run(kind=kind, objective=objective, fake=fake, prec=prec, offload=offload):
            path = save_tiny(kind, os.path.join(tmp, f"{kind}"))
            t = {"kind": "diffusers", "path": path, "prompts": ["a red cube", "a blue ball"]}
            if kind == "flux":
                t["resolution"] = 16
            cfg = resolve({"teacher": t, "generator": {"kind": "teacher"},
                           "fake_score": {"kind": fake, **({"lora_rank": 4} if fake == "lora" else {})},
                           "objective": {"name": objective, "guidance_scale": 2.0},
                           "train": {"steps": 3, "batch_size": 4, "lr": 1e-4, "ema": 0.0, "progress": False,
                                     "checkpoint_every": 3, "device": DEV, "precision": prec,
                                     "teacher_offload": offload},
                           "eval": {"every": 3, "n_samples": 16, "plots": False}})
            d = Distiller(cfg, os.path.join(tmp, f"run_{kind}_{objective}_{fake}_{prec}_{offload}"),
                          log=lambda *a: None)
            d.train()
            return {"nonfinite": dict(d.nonfinite), "finite_weights": _finite_modules(d)}

        run()


SWEEP = [  # (recipe, overrides): budgets sized so each fits 5 CPU-minutes (docs/results/digits.md CPU times)
    ("dmd2", ["train.steps=600"]),
    ("dmd2", ["train.steps=600", "train.lr=2e-4", "train.fake_lr=2e-4"]),
    ("dmd2", ["train.steps=1200", "train.batch_size=64"]),
    ("sid", ["train.steps=500"]),
    ("sid", ["train.steps=500", "objective.alpha=1.0"]),
    ("sid", ["train.steps=500", "train.lr=2e-4", "train.fake_lr=2e-4"]),
    ("dmd", ["train.steps=500"]),
    ("dmd", ["train.steps=500", "train.lr=2e-4", "train.fake_lr=2e-4"]),
    ("dmd", ["train.steps=500", "objective.regression_weight=0.5"]),
]


SWEEP_LONG = [  # longer budgets: what 5 wall-minutes on 2 CPU threads allow (~1000 DMD2 iterations)
    ("dmd2", ["train.steps=1000"]),
    ("sid", ["train.steps=800", "train.lr=2e-4", "train.fake_lr=2e-4", "objective.alpha=1.0"]),
    ("dmd", ["train.steps=800"]),
]


def digits_sweep(n: int = 1200, configs=None):
    """FD of one-step digits students per recipe variant, on the benchmark's evaluation (benchmarks/digits.py:
    1200 class-balanced labels, clipped samples); the GPU only shortens the wall time of the sweep."""
    from scoredistill.engine.build import build_teacher
    from scoredistill.metrics.images import ImageEvaluator
    from scoredistill.sampling import teacher_sample

    ev = ImageEvaluator("digits", seed=0)
    cond = torch.arange(10).repeat(n // 10 + 1)[:n]

    @case("digits sweep: teacher 35-NFE")
    def teacher_row():
        teacher, _ = build_teacher({"kind": "bundled", "name": "digits", "process": {"kind": "edm"}})
        teacher.to(DEV)
        x = teacher_sample(teacher, n, steps=18, cond=cond, generator=torch.Generator().manual_seed(54321))
        return {"fd": round(ev.metrics(x, cond)["fd"], 3)}

    teacher_row()
    for recipe, ov in configs or SWEEP:
        @case(f"digits sweep: {recipe} {' '.join(ov)}")
        def run(recipe=recipe, ov=ov):
            cfg = resolve(load_yaml(os.path.join(ROOT, f"recipes/digits/{recipe}.yaml")),
                          [f"train.device={DEV}", "train.progress=false", "eval.every=100000", "eval.n_samples=64",
                           "eval.plots=false", "train.checkpoint_every=100000", *ov])
            with tempfile.TemporaryDirectory() as tmp:
                d = Distiller(cfg, tmp, log=lambda *a: None)
                for _ in range(cfg["train"]["steps"]):
                    d.train_step()
                z = torch.randn(n, *d.teacher.data_shape, generator=torch.Generator().manual_seed(999))
                m = ev.metrics(d.sample(z, cond), cond)
            return {k: round(m[k], 3) for k in ("fd", "conf90", "class_min", "diversity") if k in m}

        run()


def flux_probe():
    """Where a tiny FLUX teacher's output stops being finite under bf16 autocast (first CUDA run: every
    bf16 step non-finite on the GPU, none on the CPU)."""
    from scoredistill.adapters.diffusers_teacher import build_diffusers_teacher
    from scoredistill.adapters.tiny import save_tiny

    @case("flux probe: teacher x0 finite per precision and t")
    def run():
        path = save_tiny("flux", os.path.join(tempfile.mkdtemp(), "flux"))
        t = build_diffusers_teacher({"kind": "diffusers", "path": path, "prompts": ["a red cube", "a blue ball"],
                                     "resolution": 16, "process": {"kind": "edm"}}).to(DEV)
        out = {}
        x = torch.randn(4, *t.data_shape, device=DEV)
        cond = torch.tensor([0, 1, 0, 1], device=DEV)
        for tv in (0.05, 0.5, 0.95):
            tt = torch.full((4,), tv, dtype=torch.float64, device=DEV)
            for prec in ("fp32", "bf16"):
                ctx = torch.autocast(DEV, dtype=torch.bfloat16) if prec == "bf16" else torch.autocast(DEV,
                                                                                                     enabled=False)
                with torch.no_grad(), ctx:
                    y = t(x, tt, cond)
                    yg = t.guided(x, tt, cond, 2.0)
                out[f"t{tv}_{prec}"] = [bool(torch.isfinite(y).all()), bool(torch.isfinite(yg).all()), str(y.dtype)]
        return out

    run()


def write(out: str):
    os.makedirs(out, exist_ok=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"}
    with open(os.path.join(out, "cuda_check.json"), "w") as f:
        json.dump({"env": env, "results": RESULTS}, f, indent=1)
    lines = [f"# CUDA check — {env['device']}, torch {env['torch']}", "",
             "| case | status | it ms | peak MiB | s | notes |", "|---|---|---|---|---|---|"]
    for r in RESULTS:
        notes = r.get("error") or {k: v for k, v in r.items()
                                   if k not in ("case", "status", "it_ms", "peak_mib", "seconds")}
        lines.append(f"| {r['case']} | {r['status']} | {r.get('it_ms', '')} | {r['peak_mib']} | {r['seconds']} "
                     f"| {json.dumps(notes)[:400]} |")
    with open(os.path.join(out, "cuda_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="cuda_check_out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma list of parts: toy,digits,memory,resume,throughput,"
                                                "optimize,diffusers")
    ap.add_argument("--device", default="cuda", help="cpu: dry-run the script's logic without a GPU")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    parts = set(args.only.split(",")) if args.only else {"toy", "digits", "memory", "resume", "throughput",
                                                         "optimize", "diffusers", "flux"}
    try:
        if "toy" in parts:
            for path in sorted(glob.glob(os.path.join(ROOT, "recipes/toy/*.yaml"))):
                rel = os.path.relpath(path, ROOT)
                for prec in ("fp32", "bf16"):
                    distill(rel, [f"train.precision={prec}"], 60, f"{rel} {prec}")
        if "digits" in parts:
            for m in ("dmd2", "sid", "vsd", "dmd"):
                distill(f"recipes/digits/{m}.yaml", ["train.precision=bf16"], 30, f"recipes/digits/{m}.yaml bf16")
        if "memory" in parts:  # DMD2 digits step, batch 512: peak device memory per memory mode
            modes = {"fp32": [], "bf16": ["train.precision=bf16"], "teacher_offload": ["train.teacher_offload=true"],
                     "grad_ckpt": ["generator.gradient_checkpointing=true", "fake_score.gradient_checkpointing=true"],
                     "bf16+offload+ckpt": ["train.precision=bf16", "train.teacher_offload=true",
                                           "generator.gradient_checkpointing=true",
                                           "fake_score.gradient_checkpointing=true"]}
            for mode, ov in modes.items():
                distill("recipes/digits/dmd2.yaml", ["train.batch_size=512", *ov], 12, f"memory mode {mode}",
                        extra_eval=False)
        if "resume" in parts:
            resume_determinism(False)
            resume_determinism(True)
            torch.use_deterministic_algorithms(False)  # the flag is process-wide
        if "throughput" in parts:
            throughput()
        if "optimize" in parts:
            optimize_recipes(args.quick)
        if "diffusers" in parts:
            diffusers_cases()
        if "flux" in parts:
            flux_probe()
        if "sweep" in parts:
            digits_sweep()
        if "sweep_long" in parts:
            digits_sweep(configs=SWEEP_LONG)
    finally:
        write(args.out)
    bad = [r["case"] for r in RESULTS if r["status"] != "ok"]
    print(f"{len(RESULTS) - len(bad)} ok, {len(bad)} failed: {bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
