"""Time and peak memory of the pure-PyTorch splatting renderer per 64 x 64 view (issue 16).

For each number of Gaussians (default 1k / 5k / 20k: a text-to-3D initial ball of radius 0.5, the
default init scales and opacity 0.1, seen from the default turntable; ``--scene large``: the same
centres with scale 0.3, so every Gaussian covers the whole view, the worst case) and each mode:

  * ``forward``: one view rendered under ``torch.no_grad()``;
  * ``fwd+bwd``: one view rendered and back-propagated with the default chunking (chunks are
    checkpointed once a view visits more than ``PAIR_BUDGET`` pixel-Gaussian pairs);
  * ``fwd+bwd dense``: the same without checkpointing (``checkpoint=False``), for contrast.

Each measurement runs in a fresh subprocess so peak memory is that process's own: the resident-set
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after building the scene) minus
the resident set before rendering. A time is the fastest of ``--rounds`` calls after one warm-up
(other jobs on the machine only ever add time).

``--backend gsplat --device cuda`` times gsplat's rasterizer the same way (its speedup over the torch
backend is the ratio of two runs' seconds on the same machine). ``--agreement`` (CUDA with gsplat installed)
renders the preset scenes from 8 turntable views with both backends and prints, per scene, the max and mean
absolute pixel difference and the PSNR of one against the other, with and without gradients compared
(relative L2 of the gradient of the summed image w.r.t. every splat parameter). This is the check issue 16
asks for where a GPU is lent; no tolerance is asserted before one has been measured.

Usage: python benchmarks/render_cpu.py [--sizes 1000,5000,20000] [--res 64] [--threads 1]
       [--rounds 3] [--modes forward,fwd+bwd,fwd+bwd dense] [--device cpu] [--scene init|large]
       [--backend torch|gsplat] [--agreement]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

MODES = ("forward", "fwd+bwd", "fwd+bwd dense")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def child(n: int, res: int, mode: str, rounds: int, device: str, scene: str, backend: str = "torch") -> dict:
    import torch

    from scoredistill.splat import GaussianSplats, render, turntable

    splats = GaussianSplats.ball(n, 0.5, seed=0).to(device)
    if scene == "large":
        with torch.no_grad():
            splats.log_scales.fill_(math.log(0.3))  # every Gaussian covers the whole view
    cams = turntable(8)[1:2]
    grad = mode != "forward"

    def once():
        if grad:
            splats.zero_grad(set_to_none=True)
            kw = {"checkpoint": None if mode == "fwd+bwd" else False} if backend == "torch" else {}
            out = render(splats, cams, res, res, 1.0, backend, **kw)
            out.images.sum().backward()
        else:
            with torch.no_grad():
                render(splats, cams, res, res, 1.0, backend)
        if device == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up (allocator, first-call dispatch)
    import gc

    gc.collect()
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
        hwm_ok = True
    except OSError:
        hwm_ok = False
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    peak = _status_kb("VmHWM") - base if hwm_ok else -1
    return {"n": n, "mode": mode, "seconds": min(times), "peak_mb": peak / 1024}


def agreement(res: int) -> None:
    """Both backends on every preset scene (CUDA): pixel and gradient differences (see the docstring)."""
    from scoredistill.splat import turntable
    from scoredistill.splat.presets import PRESETS, preset_scene
    from scoredistill.splat.render import render

    cams = turntable(8)
    print(f"torch vs gsplat, {res}x{res}, 8 turntable views")
    print(f"{'scene':<10} {'max |d|':>9} {'mean |d|':>9} {'PSNR dB':>8} {'grad rel L2 (worst param)':>26}")
    for name in sorted(PRESETS):
        out, grads = {}, {}
        for backend in ("torch", "gsplat"):
            s = preset_scene(name).to("cuda")
            img = render(s, cams.to("cuda"), res, res, 1.0, backend).images
            img.sum().backward()
            out[backend] = img.detach().float()
            grads[backend] = {k: p.grad.detach().float().clone() for k, p in s.named_parameters() if p.grad is not None}
        d = (out["torch"] - out["gsplat"]).abs()
        mse = float((d ** 2).mean())
        psnr = 10 * math.log10(1.0 / max(mse, 1e-20))
        rel = max(float((grads["torch"][k] - grads["gsplat"][k]).norm() / grads["torch"][k].norm().clamp(min=1e-20))
                  for k in grads["torch"] if k in grads["gsplat"])
        print(f"{name:<10} {float(d.max()):>9.2e} {float(d.mean()):>9.2e} {psnr:>8.2f} {rel:>26.2e}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,5000,20000")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scene", default="init", choices=("init", "large"))
    ap.add_argument("--backend", default="torch", choices=("torch", "gsplat"))
    ap.add_argument("--agreement", action="store_true", help="torch vs gsplat on the preset scenes (CUDA)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.agreement:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--agreement needs a CUDA device and gsplat (pip install scoredistill[3d]); none here")
        agreement(a.res)
        return
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        n, mode = a.child.split(":", 1)
        print(json.dumps(child(int(n), a.res, mode, a.rounds, a.device, a.scene, a.backend)))
        return
    # a fixed mmap threshold returns freed tensors to the OS at once (glibc otherwise raises it after
    # the first large free and keeps later frees in its heap), so the resident set measures live memory
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MALLOC_MMAP_THRESHOLD_="65536")
    print(f"{a.backend} splatting renderer, one {a.res}x{a.res} view, scene {a.scene}, {a.threads} thread(s), "
          f"device {a.device}")
    print(f"{'gaussians':>9}  {'mode':<14} {'seconds':>8}  {'peak MB':>8}")
    for n in [int(s) for s in a.sizes.split(",")]:
        for mode in a.modes.split(","):
            p = subprocess.run([sys.executable, __file__, "--child", f"{n}:{mode}", "--res", str(a.res),
                                "--threads", str(a.threads), "--rounds", str(a.rounds), "--device", a.device,
                                "--scene", a.scene, "--backend", a.backend],
                               capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(f"{n:>9}  {mode:<14} failed: {p.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"{n:>9}  {mode:<14} {r['seconds']:>8.3f}  {r['peak_mb']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
