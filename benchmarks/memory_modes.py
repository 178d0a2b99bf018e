"""Peak memory of a DMD2 iteration per memory mode, as ratios to the fp32 baseline measured in one run
(issue 7).

Setting: the digits recipe (``recipes/digits/dmd2.yaml``: the bundled digits UNet teacher, generator and
fake score as trainable copies of it, batch 128), or ``--model large``: the same layout around a
randomly initialised, larger UNet (3x32x32 images, channels 64/128, ~2.2 M parameters per role).

Modes, each in a fresh subprocess:

* ``fp32``            the baseline
* ``bf16``            ``train.precision=bf16`` (autocast for the network passes)
* ``checkpointing``   ``generator.gradient_checkpointing=true`` and ``fake_score.gradient_checkpointing=true``
* ``teacher_offload`` ``train.teacher_offload=true`` (teacher weights in CPU memory, streamed per forward);
                      skipped with a note where this checkout has no such key; the same as fp32 on a CPU run
* ``combined``        all of the above that this checkout accepts

What is measured, from the moment the roles are built (teacher, generator, fake score, EMA, optimizers)
to the end of ``--steps`` iterations:

* CPU: the peak resident set growth, ``VmHWM`` (reset through ``/proc/self/clear_refs`` once the roles
  are built) minus the resident set at that moment: gradients, Adam states and activations. Not
  ``getrusage(...).ru_maxrss``: on Linux a child started by fork + exec inherits the parent's peak in
  it. Where the reset is refused, ``ru_maxrss`` / ``VmHWM`` since process start is used (and said).
* CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated()`` over the same span (the weights
  included: offloading the teacher shows there), and its growth over the allocation after building.

Usage: python benchmarks/memory_modes.py [--model digits|large] [--batch 128] [--steps 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {
    "fp32": [],
    "bf16": ["train.precision=bf16"],
    "checkpointing": ["generator.gradient_checkpointing=true", "fake_score.gradient_checkpointing=true"],
    "teacher_offload": ["train.teacher_offload=true"],
    "combined": ["train.precision=bf16", "generator.gradient_checkpointing=true",
                 "fake_score.gradient_checkpointing=true", "train.teacher_offload=true"],
}
MB = 2**20


# -- measurement helpers (child) ---------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _rss() -> int:
    rss = _status_kb("VmRSS")
    return rss if rss is not None else _peak_rss()  # no /proc: the peak so far is the best baseline there is


def config(model: str, batch: int, device: str, tmp: str, overrides: list[str]) -> dict:
    from scoredistill.config import load_yaml, resolve

    user = load_yaml(os.path.join(REPO, "recipes", "digits", "dmd2.yaml"))
    user["train"].update({"batch_size": batch, "steps": 10**9, "progress": False, "device": device,
                          "checkpoint_every": 10**9})
    user["eval"] = {"plots": False, "n_samples": 16}
    if model == "large":
        import torch

        from scoredistill.models.registry import save_model
        from scoredistill.models.unet import UNetDenoiser
        from scoredistill.process import EDM

        torch.manual_seed(0)
        net = UNetDenoiser(EDM(), (3, 32, 32), (64, 128), num_classes=10, sigma_data=0.5, emb_dim=128)
        save_model(net, os.path.join(tmp, "teacher"), extra={})
        user["teacher"] = {"kind": "learned", "path": os.path.join(tmp, "teacher")}
    return resolve(user, overrides)


def child(mode: str, model: str, batch: int, steps: int, device: str, threads: int) -> dict:
    import gc

    import torch

    from scoredistill.config import ConfigError
    from scoredistill.engine.distiller import Distiller

    torch.set_num_threads(threads)
    overrides, note = MODES[mode], None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            try:
                cfg = config(model, batch, device, tmp, overrides)
            except ConfigError as e:
                if mode != "combined" or "teacher_offload" not in str(e):
                    raise
                overrides = [o for o in overrides if "teacher_offload" not in o]
                note = "without teacher offload: unknown key in this checkout"
                cfg = config(model, batch, device, tmp, overrides)
            d = Distiller(cfg, os.path.join(tmp, "run"), log=lambda *a: None)
        except ConfigError as e:
            msg = str(e).split(";")[0] + (" in this checkout" if "unknown key" in str(e) else "")
            return {"skipped": msg, "overrides": overrides}
        gc.collect()
        out = {"params_per_role_m": sum(p.numel() for p in d.generator.parameters()) / 1e6,
               "overrides": overrides, **({"note": note} if note else {})}
        t0 = time.perf_counter()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(steps):
                d.train_step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            out.update(peak_mb=peak / MB, growth_mb=(peak - base) / MB, built_mb=base / MB)
        else:
            base = _rss()
            out["hwm_reset"] = _reset_peak_rss()
            before = _peak_rss()
            for _ in range(steps):
                d.train_step()
            peak = _peak_rss()
            # without the reset the peak may predate the steps: then only the growth past it counts
            out.update(growth_mb=(peak - (base if out["hwm_reset"] else max(base, before))) / MB,
                       built_mb=base / MB, peak_mb=peak / MB)
        out["seconds_per_step"] = (time.perf_counter() - t0) / steps
        return out


# -- driver (parent: imports no torch, so the children start small) ------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("digits", "large"), default="digits")
    p.add_argument("--batch", type=int, default=None, help="default: 128 (digits), 32 (large)")
    p.add_argument("--steps", type=int, default=2, help="iterations per mode (one fake + one generator update)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    batch = a.batch or (128 if a.model == "digits" else 32)
    if a.child:
        print(json.dumps(child(a.child, a.model, batch, a.steps, a.device, a.threads)))
        return
    modes = [m for m in a.modes.split(",") if m]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    res = {}
    for mode in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model", a.model, "--batch", str(batch),
               "--steps", str(a.steps), "--device", a.device, "--threads", str(a.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
        res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = res[mode]
        print(f"  {mode:16s} " + (f"skipped: {r['skipped']}" if "skipped" in r else
                                  f"growth {r['growth_mb']:8.1f} MB   peak {r['peak_mb']:8.1f} MB   "
                                  f"{r['seconds_per_step']:.2f} s/step"), flush=True)
    cuda = a.device.startswith("cuda")
    base = res.get("fp32", {})
    key = "peak_mb" if cuda else "growth_mb"
    params = next((r["params_per_role_m"] for r in res.values() if "params_per_role_m" in r), 0)
    print(f"\nDMD2 iteration, {a.model} UNet ({params:.2f} M parameters per role), batch {batch}, {a.steps} "
          f"iterations, device {a.device}, threads {a.threads}; "
          + ("peak = torch.cuda.max_memory_allocated (weights included)" if cuda else
             "peak RSS growth after the roles were built (VmHWM, reset then)"))
    print("\n| mode | overrides | " + ("peak allocated | growth after build" if cuda else "peak RSS growth")
          + " | ratio to fp32 | s / iteration (first included) |")
    print("|---|---|---|" + ("---|" if cuda else "") + "---|---|")
    for mode in modes:
        r = res[mode]
        ov = " ".join(f"`{o}`" for o in r.get("overrides", MODES[mode])) or "–"
        if "skipped" in r:
            print(f"| {mode} | {ov} | skipped: {r['skipped']} |" + (" |" if cuda else "") + " – | – |")
            continue
        ratio = r[key] / base[key] if base.get(key) else float("nan")
        note = f" ({r['note']})" if "note" in r else ""
        if not cuda and not r.get("hwm_reset", True):
            note += " (peak not reset: may include earlier peaks)"
        cols = (f"{r['peak_mb']:.1f} MB | {r['growth_mb']:.1f} MB" if cuda else f"{r['growth_mb']:.1f} MB")
        print(f"| {mode}{note} | {ov} | {cols} | **{ratio:.2f}** | {r['seconds_per_step']:.2f} |")
    if not cuda and "teacher_offload" in res and "skipped" not in res["teacher_offload"]:
        print("\nOn CPU, train.teacher_offload changes nothing (the teacher already lives in CPU memory).")


if __name__ == "__main__":
    main()
