"""Export a distilled diffusers student (``scoredistill export RUN_DIR``).

``--format diffusers`` writes a complete pipeline folder: the teacher's pipeline with the student's
network (LoRA students are merged) and a scheduler set up for the student's K steps,

* DDPM teachers: ``LCMScheduler`` from the teacher's betas (``clip_sample`` off) -- its step is
  "x0 prediction, then re-noise to the next timestep with fresh noise", the student's rollout;
  ``original_inference_steps = K`` when the student's timesteps are LCM's grid
  (``[999]``, ``[999, 499]``, ``[999, 749, 499, 249]``, ...), so ``num_inference_steps=K`` selects them;
  other timesteps (e.g. DMD2-SDXL's ``[399]``) are passed as ``timesteps=[...]``.
* flow teachers: ``FlowMatchEulerDiscreteScheduler(shift=1, stochastic_sampling=True)`` called with
  ``sigmas=[...]`` (the student's sigmas, already shifted).

Diffusers pipelines take their step count at call time, so the folder carries
``scoredistill_export.json`` with the exact call arguments (also in its README.md). Verification
reloads the folder with ``DiffusionPipeline.from_pretrained`` and checks that the pipeline's first
step from the same noise reproduces the student's output, then samples the full K steps.

``--format lora`` (students trained with ``generator.kind: lora``) writes
``pytorch_lora_weights.safetensors`` with the pipeline class's ``save_lora_weights`` (peft config
stored as adapter metadata) plus the student scheduler in ``scheduler/``; verification loads the
teacher pipeline, ``load_lora_weights`` and the scheduler, and compares as above.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch

from scoredistill.errors import ConfigError

EXPORT_JSON = "scoredistill_export.json"


def lcm_grid(k: int, n_train: int) -> list[int]:
    step = n_train // k
    return [j * step - 1 for j in range(k, 0, -1)]


def student_scheduler(gen):
    """The scheduler and call arguments that reproduce the student's K-step rollout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    d = gen.denoiser
    cfg = d.assets.scheduler_config
    n_train = int(cfg.get("num_train_timesteps", 1000))
    k = len(gen.timesteps)
    if d.prediction == "flow":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=n_train, shift=1.0, use_dynamic_shifting=False,
                                                stochastic_sampling=True)
        call = {"sigmas": [float(v) / n_train for v in gen.timesteps]}
    else:
        on_grid = list(gen.timesteps) == lcm_grid(k, n_train)
        sched = LCMScheduler.from_config(cfg, original_inference_steps=k if on_grid else 50, clip_sample=False,
                                         thresholding=False, timestep_spacing="leading")
        call = {"num_inference_steps": k} if on_grid else {"timesteps": [int(v) for v in gen.timesteps]}
    return sched, call


def _call_kwargs(gen, call: dict) -> dict:
    d = gen.denoiser
    kw = dict(call)
    if d.family == "unet2d":
        return kw
    f = d.assets.vae_scale_factor
    kw["height"], kw["width"] = d.data_shape[1] * f, d.data_shape[2] * f
    if d.family == "flux":
        kw["guidance_scale"] = float(d.embedded_guidance) if d.embedded_guidance is not None else 1.0
    else:
        kw["guidance_scale"] = 1.0  # the student is unguided: diffusers skips CFG for guidance_scale <= 1
    return kw


def _student_network(gen):
    net = gen.denoiser.model
    if gen.lora_config is None:
        out = copy.deepcopy(net)
    else:
        from scoredistill.adapters.lora import merged_state_dict

        out = type(net).from_config(net.config)
        out.load_state_dict(merged_state_dict(net))
    if getattr(out, "is_gradient_checkpointing", False):
        out.disable_gradient_checkpointing()
    return out.requires_grad_(False).eval()


def _readme(pipeline_class: str, call: dict, lora: bool) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    if lora:
        load = ("pipe = DiffusionPipeline.from_pretrained(TEACHER_DIR)\n"
                "pipe.load_lora_weights(THIS_DIR)\n"
                "pipe.scheduler = type(pipe.scheduler).from_pretrained(THIS_DIR, subfolder='scheduler')  # see below")
    else:
        load = "pipe = DiffusionPipeline.from_pretrained(THIS_DIR)"
    prompt = "" if pipeline_class == "DDPMPipeline" else "prompt, "
    return (f"# Distilled student ({pipeline_class}) exported by scoredistill\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\n"
            f"{load}\nimage = pipe({prompt}{args}).images[0]\n```\n\n"
            "The call arguments are in `scoredistill_export.json` (`call`). The student was distilled "
            "without classifier-free guidance at sampling time: keep `guidance_scale` as given.\n"
            + ("\nThe scheduler in `scheduler/` is an `LCMScheduler` or `FlowMatchEulerDiscreteScheduler`; load it "
               "with that class.\n" if lora else ""))


def _none_components(folder: str) -> dict:
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    return {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None}


# ------------------------------------------------------------------------------------------------
def export_pipeline(gen, out: str) -> dict:
    from scoredistill.adapters.diffusers_teacher import load_pipeline

    d = gen.denoiser
    pipe, _ = load_pipeline(d.assets.path)
    attr = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    sched, call = student_scheduler(gen)
    if d.assets.pipeline_class == "DDPMPipeline" and "num_inference_steps" not in call:
        raise ConfigError("export", f"DDPMPipeline cannot take custom timesteps; the student's {gen.timesteps} are "
                          f"not LCM's grid {lcm_grid(len(gen.timesteps), d.process.num_steps)}")
    if d.family == "unet2d" and d.num_classes:
        raise ConfigError("export", "class-conditional UNet2DModel students have no diffusers pipeline "
                          "(DDPMPipeline is unconditional); not supported yet")
    pipe.register_modules(**{attr: _student_network(gen), "scheduler": sched})
    pipe.save_pretrained(out)
    kw = _call_kwargs(gen, call)
    info = {"format": "diffusers", "pipeline": d.assets.pipeline_class, "family": d.family,
            "timesteps": gen.timesteps, "noise_input": gen.noise_input, "call": kw, "teacher": d.assets.path,
            "prompts_trained": d.assets.prompts[:20]}
    with open(os.path.join(out, EXPORT_JSON), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(_readme(d.assets.pipeline_class, kw, lora=False))
    return info


def export_lora(gen, out: str) -> dict:
    from peft.utils import get_peft_model_state_dict

    d = gen.denoiser
    if gen.lora_config is None:
        raise ConfigError("--format", "lora needs a student trained as LoRA (generator.kind: lora); this run's "
                          "student is a full copy: use --format diffusers")
    import diffusers

    pipe_cls = getattr(diffusers, d.assets.pipeline_class, None)
    if pipe_cls is None or not hasattr(pipe_cls, "save_lora_weights"):
        raise ConfigError("--format", f"{d.assets.pipeline_class} has no LoRA loader in diffusers; use --format "
                          "diffusers")
    net = d.model
    # peft key format throughout (diffusers' older "lora.down/up" conversion only covers attention
    # projections, and a mixed file loses them on load_lora_weights)
    layers = get_peft_model_state_dict(net)
    meta = net.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    os.makedirs(out, exist_ok=True)
    if d.family in ("sd", "sdxl"):
        pipe_cls.save_lora_weights(out, unet_lora_layers=layers, unet_lora_adapter_metadata=meta)
    else:
        pipe_cls.save_lora_weights(out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta)
    sched, call = student_scheduler(gen)
    sched.save_pretrained(os.path.join(out, "scheduler"))
    kw = _call_kwargs(gen, call)
    info = {"format": "lora", "pipeline": d.assets.pipeline_class, "family": d.family, "timesteps": gen.timesteps,
            "noise_input": gen.noise_input, "call": kw, "teacher": d.assets.path,
            "scheduler_class": type(sched).__name__, "lora": gen.lora_config, "lora_tensors": len(layers),
            "prompts_trained": d.assets.prompts[:20]}
    with open(os.path.join(out, EXPORT_JSON), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(_readme(d.assets.pipeline_class, kw, lora=True))
    return info


# ------------------------------------------------------------------------------------------------
def _load_exported(out: str, info: dict):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, LCMScheduler

    if info["format"] == "diffusers":
        return DiffusionPipeline.from_pretrained(out, **_none_components(out))
    pipe = DiffusionPipeline.from_pretrained(info["teacher"], **_none_components(info["teacher"]))
    pipe.load_lora_weights(out)
    net = getattr(pipe, "unet", None) or pipe.transformer
    n_loaded = sum(1 for k in net.state_dict() if "lora_" in k)
    if n_loaded != info["lora_tensors"]:
        raise RuntimeError(f"load_lora_weights restored {n_loaded} LoRA tensors, the student has "
                           f"{info['lora_tensors']}")
    sc = {"LCMScheduler": LCMScheduler, "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler}
    pipe.scheduler = sc[info["scheduler_class"]].from_pretrained(out, subfolder="scheduler")
    return pipe


@torch.no_grad()
def verify_export(gen, out: str, n: int = 2, seed: int = 0, tol: float = 1e-3) -> dict:
    """Reload ``out`` and check it against the student; returns ``{"max_abs_diff": .., ...}``."""
    with open(os.path.join(out, EXPORT_JSON)) as f:
        info = json.load(f)
    pipe = _load_exported(out, info)
    pipe.set_progress_bar_config(disable=True)
    d = gen.denoiser
    gen.eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *d.data_shape, generator=g)
    cond = torch.arange(n) % d.num_classes if d.num_classes else None
    t0 = torch.full((n,), gen.t_steps[0], dtype=torch.float64)
    ref = d(gen._input(z), t0, cond)  # the student's first step
    kw = dict(info["call"])
    first = dict(kw)
    for key in ("num_inference_steps", "timesteps", "sigmas"):
        first.pop(key, None)
    if "sigmas" in kw:
        first["sigmas"] = kw["sigmas"][:1]
    elif "timesteps" in kw:
        first["timesteps"] = kw["timesteps"][:1]
    else:
        first["num_inference_steps"] = 1
    if d.family == "unet2d":
        from diffusers import LCMScheduler

        full_sched = pipe.scheduler
        pipe.scheduler = LCMScheduler.from_config(full_sched.config, original_inference_steps=1)
        img = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), output_type="np", **first).images
        got = torch.from_numpy(np.asarray(img)).permute(0, 3, 1, 2).double()
        want = (ref.double() / 2 + 0.5).clamp(0, 1)
        pipe.scheduler = full_sched
        full = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    else:
        prompts = [d.assets.prompts[int(i)] for i in cond]
        lat = z
        if d.family == "flux":
            from diffusers import FluxPipeline

            lat = FluxPipeline._pack_latents(z, n, z.shape[1], z.shape[2], z.shape[3])
        out_lat = pipe(prompt=prompts, latents=lat, output_type="latent", **first).images
        if d.family == "flux":
            from diffusers import FluxPipeline

            f = d.assets.vae_scale_factor
            out_lat = FluxPipeline._unpack_latents(out_lat, z.shape[2] * f, z.shape[3] * f, f)
        got, want = out_lat.double(), ref.double()
        full = pipe(prompt=prompts, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    diff = float((got - want).abs().max())
    full = np.asarray(full)
    res = {"max_abs_diff": diff, "tolerance": tol, "first_step_matches": diff <= tol * (1 + float(want.abs().max())),
           "full_sample_shape": list(full.shape), "full_sample_finite": bool(np.isfinite(full).all()),
           "steps": len(gen.timesteps), "pipeline": info["pipeline"]}
    if not res["first_step_matches"] or not res["full_sample_finite"]:
        raise RuntimeError(f"exported pipeline does not reproduce the student: {res}")
    return res


def export_run(run_dir: str, out: str, fmt: str = "diffusers", verify: bool = True, seed: int = 0) -> dict:
    """Export ``RUN_DIR/generator`` (written by a run with ``teacher.kind: diffusers``)."""
    from scoredistill.adapters.student import DiffusersGenerator
    from scoredistill.models.registry import load_model

    folder = os.path.join(run_dir, "generator")
    if not os.path.isdir(run_dir):
        raise ConfigError("RUN_DIR", f"folder not found: {run_dir}")
    try:
        gen, _ = load_model(folder)
    except FileNotFoundError:
        raise ConfigError("RUN_DIR", f"{run_dir} has no generator/ yet (train first)") from None
    if not isinstance(gen, DiffusersGenerator):
        raise ConfigError("RUN_DIR", "export needs a run distilled from a diffusers teacher (teacher.kind: diffusers)")
    if fmt not in ("diffusers", "lora"):
        raise ConfigError("--format", f"unknown value {fmt!r}; accepted: diffusers, lora")
    if os.path.exists(out) and os.listdir(out):
        raise ConfigError("--out", f"{out} exists and is not empty")
    info = export_pipeline(gen, out) if fmt == "diffusers" else export_lora(gen, out)
    if verify:
        info["verify"] = verify_export(gen, out, seed=seed)
        with open(os.path.join(out, EXPORT_JSON), "w") as f:
            json.dump(info, f, indent=2)
    return info
