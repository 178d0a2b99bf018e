"""Memory of a LoRA critic vs a full-copy critic on the same diffusers teacher (DMD2 run).

Two measurements, both printed as ratios from one invocation:

1. **Training-state bytes** (exact accounting, the default): after one DMD2 iteration through the
   engine, the bytes of every distinct parameter, gradient and optimizer-state tensor held by the
   run's roles (teacher, student, critic; shared tensors counted once). Activations are excluded.
2. **Peak RSS** (``--rss``): each variant runs in a fresh subprocess (same imports, peft loaded in
   both), builds the teacher, then the engine with that teacher, and reports its peak resident set
   (``VmHWM``, Linux) minus the RSS right after the teacher was built, i.e. the peak extra memory of
   building the student + critic and running ``--steps`` iterations, activations included. On CPU
   this is the closest to a GPU's ``max_memory_allocated``; allocator caching and page granularity
   make it meaningless for the tiny model, so use ``--size medium`` with it.

Goal (issue 6): LoRA critic <= 0.6x the full copy. Usage::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/lora_memory.py [--size tiny|medium] [--rss]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def save_teacher(size: str, folder: str) -> str:
    from scoredistill.adapters.tiny import save_tiny

    if size == "tiny":
        return save_tiny("sd15", folder)
    # "medium": the same architecture classes, SD-like widths at a small resolution (~20 M UNet params)
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from scoredistill.adapters import tiny

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(128, 256, 256), norm_num_groups=32, cross_attention_dim=64,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=tiny._vae(), text_encoder=CLIPTextModel(tiny._clip_config(hidden=64)),
                                   tokenizer=tiny._clip_tokenizer(), unet=unet,
                                   scheduler=tiny._vp_scheduler("epsilon"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def run_config(path: str, critic: str, batch: int, rank: int = 4):
    from scoredistill.config import resolve

    return resolve({
        "teacher": {"kind": "diffusers", "path": path, "prompts": ["a red cube", "a blue ball"]},
        "generator": {"kind": "teacher"},
        "fake_score": {"kind": critic, **({"lora_rank": rank} if critic == "lora" else {})},
        "objective": {"name": "dmd2", "guidance_scale": 1.75},
        "train": {"steps": 1, "batch_size": batch, "lr": 1e-5, "ema": 0.0, "progress": False},
        "eval": {"every": 1, "n_samples": 16, "plots": False},
    })


def state_bytes(d) -> dict:
    """Distinct parameter / gradient / optimizer-state bytes of the run's roles (shared counted once)."""
    seen = set()

    def add(t):
        if t is None or not torch.is_tensor(t):
            return 0
        key = (t.untyped_storage().data_ptr(), t.numel(), t.dtype)
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    out = {}
    roles = {"teacher": d.teacher, "generator": d.generator, "critic": d.fake}
    for name, m in roles.items():
        params = sum(add(p) for p in m.parameters())
        if name == "teacher":  # the teacher's own network (a LoRA critic's adapter sits inside it)
            params += sum(add(p) for p in d.teacher.model.parameters())
        out[f"{name}_params"] = params
    for name, m in roles.items():
        out[f"{name}_grads"] = sum(add(p.grad) for p in m.parameters())
    for name, opt in d.optimizers.items():
        out[f"{name}_optimizer"] = sum(add(v) for st in opt.state.values() for v in st.values())
    out["total"] = sum(out.values())
    out["critic_only"] = (out["critic_params"] + out["critic_grads"] + out.get("fake_score_optimizer", 0))
    return out


def measure_state(path: str, critic: str, batch: int, rank: int) -> dict:
    from scoredistill.engine.distiller import Distiller

    with tempfile.TemporaryDirectory() as run:
        d = Distiller(run_config(path, critic, batch, rank), run, log=lambda *a: None)
        d.train_step()  # gradients and Adam states exist now (critic and generator phases)
        return state_bytes(d)


def rss_child(path: str, critic: str, batch: int, steps: int, rank: int) -> dict:
    """Runs in a subprocess: peak RSS growth from 'teacher built' to the end of the steps."""
    import peft  # noqa: F401  (imported in both variants so the import is not measured)

    import scoredistill.engine.distiller as engine
    from scoredistill.adapters.diffusers_teacher import build_diffusers_teacher

    cfg = run_config(path, critic, batch, rank)
    teacher = build_diffusers_teacher(dict(cfg["teacher"]))
    engine.build_teacher = lambda tcfg: (teacher, None)  # the engine reuses the teacher built above
    with tempfile.TemporaryDirectory() as run:
        base = _rss_now()
        peak0 = _hwm()
        t0 = time.time()
        d = engine.Distiller(cfg, run, log=lambda *a: None)
        for _ in range(steps):
            d.train_step()
        peak = _hwm()
    return {"peak_extra_mb": (peak - base) / 2**20, "peak_before_mb": peak0 / 2**20, "seconds": time.time() - t0}


def _hwm() -> int:
    """Peak resident set of this address space (VmHWM). Unlike ``ru_maxrss`` it is not inherited from
    the parent across fork + exec, which would hide the child's own peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "medium"), default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rss", action="store_true", help="also measure peak RSS per variant in subprocesses")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rank", type=int, default=4,
                   help="critic LoRA rank (4 on the tiny UNet ~ the parameter share of rank 64 on SD1.5)")
    p.add_argument("--child", nargs=2, metavar=("PATH", "CRITIC"), help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.child:
        print(json.dumps(rss_child(a.child[0], a.child[1], a.batch, a.steps, a.rank)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = save_teacher(a.size, os.path.join(tmp, "teacher"))
        from scoredistill.adapters.diffusers_teacher import build_diffusers_teacher

        n_params = sum(p.numel() for p in build_diffusers_teacher(run_config(path, "teacher", 2)["teacher"])
                       .model.parameters())
        res = {c: measure_state(path, c, a.batch, a.rank) for c in ("teacher", "lora")}
        mb = 2**20
        print(f"teacher: tiny random {'SD1.5' if a.size == 'tiny' else 'SD-like'} UNet2DConditionModel, "
              f"{n_params / 1e6:.2f} M params; DMD2, full-copy student, critic full copy vs LoRA rank {a.rank}; "
              f"batch {a.batch}")
        print("1) training-state bytes after one iteration (parameters + gradients + Adam states, "
              "distinct tensors, no activations):")
        for c, r in res.items():
            print(f"   critic={'full' if c == 'teacher' else 'lora':4s}  all roles {r['total'] / mb:8.2f} MB   "
                  f"critic role {r['critic_only'] / mb:8.3f} MB")
        ratio = res["lora"]["total"] / res["teacher"]["total"]
        print(f"   ratio LoRA/full, all roles: {ratio:.3f}   (critic role alone: "
              f"{res['lora']['critic_only'] / res['teacher']['critic_only']:.4f})   goal <= 0.6: "
              f"{'met' if ratio <= 0.6 else 'NOT met'}")
        if a.rss:
            out = {}
            for c in ("teacher", "lora"):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", path, c, "--batch", str(a.batch),
                       "--steps", str(a.steps), "--rank", str(a.rank)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-2000:])
                out[c] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"2) peak RSS growth over building student + critic and {a.steps} iterations "
                  "(fresh subprocess each, VmHWM minus RSS after the teacher was built):")
            for c, r in out.items():
                print(f"   critic={'full' if c == 'teacher' else 'lora':4s}  {r['peak_extra_mb']:8.1f} MB "
                      f"({r['seconds']:.1f} s)")
            print(f"   ratio LoRA/full: {out['lora']['peak_extra_mb'] / out['teacher']['peak_extra_mb']:.3f}")


if __name__ == "__main__":
    main()
