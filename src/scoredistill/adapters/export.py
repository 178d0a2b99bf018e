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
* ``generator.rollout: ddim`` students (re-noising with their own noise estimate, TDM / Phased DMD):
  ``DDIMScheduler`` (eta 0, ``timestep_spacing="trailing"``, the final step to x0) on DDPM teachers, whose
  ``num_inference_steps=K`` gives the student's timesteps when they are LCM's grid (the only ones it can
  give); on flow teachers the deterministic Euler step (``stochastic_sampling=False``), which is exactly
  "x0, then re-noise with the model's own noise estimate". ``fixed`` students and students with experts are
  refused (one line): no pipeline re-noises with the first noise again, and a pipeline holds one network.

Diffusers pipelines take their step count at call time, so the folder carries
``scoredistill_export.json`` with the exact call arguments (also in its README.md). Verification
reloads the folder with ``DiffusionPipeline.from_pretrained`` and checks that the pipeline's first
step from the same noise reproduces the student's output, then samples the full K steps.
Everything that differs between families (scheduler, call arguments, latent packing, how the
first step is compared) is a method of the student's family class
(:mod:`scoredistill.adapters.families`).

The export is written into a temporary sibling folder and moved to ``--out`` only once it is
complete and verified, so a failed export leaves nothing behind. Every export carries the marker
file ``.scoredistill-export``; ``--force`` replaces an existing ``--out`` only when it has that
marker, never a folder the library did not write.

``--format lora`` (students trained with ``generator.kind: lora``) writes
``pytorch_lora_weights.safetensors`` with the pipeline class's ``save_lora_weights`` (peft config
stored as adapter metadata) plus the student scheduler in ``scheduler/``; verification loads the
teacher pipeline, ``load_lora_weights`` and the scheduler, and compares as above.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import torch

from scoredistill.adapters.families import components_of
from scoredistill.errors import ConfigError
from scoredistill.models.rollout import sample_noise_seed

EXPORT_JSON = "scoredistill_export.json"
MARKER = ".scoredistill-export"  # identifies folders this module wrote (the only ones --force replaces)


def student_scheduler(gen):
    """The scheduler and call arguments that reproduce the student's K-step rollout; one line for a student
    a diffusers pipeline cannot express (it holds one network, starts from the noise itself and re-noises with
    fresh noise (LCM, stochastic Euler) or the model's own noise estimate (DDIM with eta 0, Euler))."""
    d = gen.base
    if gen.experts is not None:
        raise ConfigError("generator.experts", f"a diffusers pipeline holds one network; this student has "
                          f"{len(gen.experts) + 1} experts (one per phase), which no pipeline (and no single LoRA "
                          "file) reproduces; accepted for export: null")
    if gen.noise_input != "pure":
        raise ConfigError("generator.noise_input", f"export reproduces students whose first input is the noise itself "
                          f"(pure), as diffusers pipelines feed it; this student takes s(t_0) z ({gen.noise_input}); "
                          "accepted: pure (retrain with generator.noise_input: pure)")
    if gen.rollout.mode == "fixed" and len(gen.timesteps) > 1:
        raise ConfigError("generator.rollout", "no diffusers scheduler re-noises every step with the sample's first "
                          "noise (fixed); accepted for export: fresh (LCMScheduler / stochastic Euler), ddim "
                          "(DDIMScheduler / Euler)")
    return d.family.export_scheduler(gen, d.assets.scheduler_config)


def _student_network(gen):
    net = gen.base.model
    if gen.lora_config is None:
        out = copy.deepcopy(net)
    else:
        from scoredistill.adapters.lora import merged_state_dict

        out = type(net).from_config(net.config)
        out.load_state_dict(merged_state_dict(net))
    if getattr(out, "is_gradient_checkpointing", False):
        out.disable_gradient_checkpointing()
    return out.requires_grad_(False).eval()


def _readme(gen, call: dict, lora: bool) -> str:
    d = gen.base
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    fewer = ("" if len(gen.timesteps) == 1 else
             "\nFewer steps (K' of the student's K, evenly strided as `scoredistill sample RUN --steps K'`): the "
             "scheduler arguments of `calls[K']` in `scoredistill_export.json`.\n")
    if lora:
        load = ("pipe = DiffusionPipeline.from_pretrained(TEACHER_DIR)\n"
                "pipe.load_lora_weights(THIS_DIR)\n"
                "pipe.scheduler = type(pipe.scheduler).from_pretrained(THIS_DIR, subfolder='scheduler')  # see below")
    else:
        load = "pipe = DiffusionPipeline.from_pretrained(THIS_DIR)"
    return (f"# Distilled student ({d.assets.pipeline_class}) exported by scoredistill\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\n"
            f"{load}\nimage = {d.family.readme_call(args)}.images[0]\n```\n\n"
            "The call arguments are in `scoredistill_export.json` (`call`). The student was distilled "
            "without classifier-free guidance at sampling time: keep `guidance_scale` as given.\n" + fewer
            + ("" if not d.family.same_noise or d.assets.pipeline_class == "DDPMPipeline" else
               "\nThe same sample as `scoredistill sample RUN --seed S --steps K'` (n samples): "
               "`latents = torch.randn(n, *shape, generator=torch.Generator().manual_seed(S))` and "
               "`generator = torch.Generator().manual_seed(sample_noise_seed(S))` "
               "(`scoredistill.models.rollout.sample_noise_seed`), `output_type='latent'`.\n")
            + ("\nThe scheduler in `scheduler/` is an `LCMScheduler` or `FlowMatchEulerDiscreteScheduler`; load it "
               "with that class.\n" if lora else ""))


def _none_components(folder: str) -> dict:
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    return {k: None for k, v in components_of(index).items() if v is None}


def _write_info(gen, out: str, fmt: str, call: dict, **extra) -> dict:
    """``scoredistill_export.json`` and README.md of an export folder."""
    d = gen.base
    kw = d.family.call_kwargs(d, call)
    calls = {kp: d.family.call_kwargs(d, c) for kp, c in d.family.step_calls(gen, call).items()}
    info = {"format": fmt, "pipeline": d.assets.pipeline_class, "family": d.family.name, "timesteps": gen.timesteps,
            "noise_input": gen.noise_input, "call": kw, "calls": calls, "teacher": d.assets.path, **extra,
            "prompts_trained": d.assets.prompts[:20]}
    with open(os.path.join(out, EXPORT_JSON), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(_readme(gen, kw, lora=fmt == "lora"))
    return info


# ------------------------------------------------------------------------------------------------
def export_pipeline(gen, out: str) -> dict:
    from scoredistill.adapters.diffusers_teacher import load_pipeline

    d = gen.base
    sched, call = student_scheduler(gen)
    d.family.check_export(gen, call)
    pipe, _ = load_pipeline(d.assets.path, family=d.family)
    pipe.register_modules(**{d.family.network: d.family.exported_network(_student_network(gen), d),
                             "scheduler": sched})
    pipe.save_pretrained(out)
    return _write_info(gen, out, "diffusers", call)


def export_lora(gen, out: str) -> dict:
    from peft.utils import get_peft_model_state_dict

    d = gen.base
    if gen.lora_config is None:
        raise ConfigError("--format", "lora needs a student trained as LoRA (generator.kind: lora); this run's "
                          "student is a full copy: use --format diffusers")
    sched, call = student_scheduler(gen)  # refuses what no pipeline reproduces before anything is written
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
    name = d.family.network  # save_lora_weights names its arguments after the component
    pipe_cls.save_lora_weights(out, **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": meta})
    sched.save_pretrained(os.path.join(out, "scheduler"))
    return _write_info(gen, out, "lora", call, scheduler_class=type(sched).__name__, lora=gen.lora_config,
                       lora_tensors=len(layers))


# ------------------------------------------------------------------------------------------------
def _load_exported(out: str, info: dict, family):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, LCMScheduler

    if info["format"] == "diffusers":
        return DiffusionPipeline.from_pretrained(out, **_none_components(out))
    pipe = DiffusionPipeline.from_pretrained(info["teacher"], **_none_components(info["teacher"]))
    pipe.load_lora_weights(out)
    net = getattr(pipe, family.network)
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
    d = gen.base
    pipe = _load_exported(out, info, d.family)
    pipe.set_progress_bar_config(disable=True)
    gen.eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *d.data_shape, generator=g)  # z and labels as `scoredistill sample --seed` draws them
    cond = torch.randint(0, d.num_classes, (n,), generator=g) if d.num_classes else None
    t0 = torch.full((n,), gen.t_steps[0], dtype=torch.float64)
    want = d.family.reference(d(gen.rollout.first_input(z), t0, cond))  # the student's first step
    kw = dict(info["call"])
    first = {k: v for k, v in kw.items() if k not in ("num_inference_steps", "timesteps", "sigmas")}
    if "sigmas" in kw:
        first["sigmas"] = kw["sigmas"][:1]
    elif "timesteps" in kw:
        first["timesteps"] = kw["timesteps"][:1]
    else:
        first["num_inference_steps"] = 1
    got, full = d.family.run_exported(pipe, d, z, cond, first, kw, seed)
    diff = float((got - want).abs().max())
    full = np.asarray(full)
    res = {"max_abs_diff": diff, "tolerance": tol, "first_step_matches": diff <= tol * (1 + float(want.abs().max())),
           "full_sample_shape": list(full.shape), "full_sample_finite": bool(np.isfinite(full).all()),
           "steps": len(gen.timesteps), "pipeline": info["pipeline"]}
    if d.family.same_noise:
        res["samples_max_abs_diff"], res["samples_match"] = _compare_samples(gen, pipe, info, z, cond, seed, tol)
    if not res["first_step_matches"] or not res["full_sample_finite"] or not res.get("samples_match", True):
        raise RuntimeError(f"exported pipeline does not reproduce the student: {res}")
    return res


def _compare_samples(gen, pipe, info: dict, z, cond, seed: int, tol: float) -> tuple[dict, bool]:
    """``({K': max |pipeline - student|}, all within tol)``: the reloaded pipeline's K'-step samples (``calls``)
    against the student's ``gen.sample(z, steps=K')`` from the same noise: the input noise and the re-noising
    stream of ``scoredistill sample --seed`` (DDPMPipeline, which draws its own input noise: that stream's)."""
    d = gen.base
    noise_seed = sample_noise_seed(seed)
    first = {k: v for k, v in info["call"].items() if k not in ("num_inference_steps", "timesteps", "sigmas")}
    diffs, ok = {}, True
    for kp, call in info["calls"].items():
        kw = {**first, **{k: v for k, v in call.items() if k in ("num_inference_steps", "timesteps", "sigmas")}}
        with torch.random.fork_rng(devices=[]):  # pipelines that do not pass the generator to the step draw here
            torch.manual_seed(noise_seed)
            got = d.family.sample_exported(pipe, d, z, cond, kw, noise_seed)
        zz, g = d.family.student_inputs(z, noise_seed)
        want = d.family.reference(gen.sample(zz, cond, steps=int(kp), generator=g))
        diffs[str(kp)] = float((got - want).abs().max())
        ok = ok and diffs[str(kp)] <= tol * (1 + float(want.abs().max()))
    return diffs, ok


def _check_out(out: str, force: bool) -> None:
    """``--out`` may be new or empty; with ``force``, a folder this module wrote (its marker file)."""
    if os.path.islink(out):
        raise ConfigError("--out", f"{out} is a symbolic link; give a folder path")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ConfigError("--out", f"{out} exists and is not a folder")
    if not os.listdir(out):
        return
    if not os.path.isfile(os.path.join(out, MARKER)):
        raise ConfigError("--out", f"{out} exists, is not empty and was not written by scoredistill export (no "
                          f"{MARKER} marker); give a new folder (--force only replaces earlier exports)")
    if not force:
        raise ConfigError("--out", f"{out} holds an earlier export; pass --force to replace it")


def export_run(run_dir: str, out: str, fmt: str = "diffusers", verify: bool = True, seed: int = 0,
               force: bool = False) -> dict:
    """Export ``RUN_DIR/generator`` (written by a run with ``teacher.kind: diffusers``) into ``out``."""
    from scoredistill.adapters.student import DiffusersGenerator
    from scoredistill.models.registry import load_model

    folder = os.path.join(run_dir, "generator")
    if not os.path.isdir(run_dir):
        raise ConfigError("RUN_DIR", f"folder not found: {run_dir}")
    if fmt not in ("diffusers", "lora"):
        raise ConfigError("--format", f"unknown value {fmt!r}; accepted: diffusers, lora")
    _check_out(out, force)
    try:
        gen, _ = load_model(folder)
    except FileNotFoundError:
        raise ConfigError("RUN_DIR", f"{run_dir} has no generator/ yet (train first)") from None
    if not isinstance(gen, DiffusersGenerator):
        raise ConfigError("RUN_DIR", "export needs a run distilled from a diffusers teacher (teacher.kind: diffusers)")
    parent, base = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("written by scoredistill export; `scoredistill export --force` may replace this folder\n")
        info = export_pipeline(gen, tmp) if fmt == "diffusers" else export_lora(gen, tmp)
        if verify:
            info["verify"] = verify_export(gen, tmp, seed=seed)
            with open(os.path.join(tmp, EXPORT_JSON), "w") as f:
                json.dump(info, f, indent=2)
        old = None
        if os.path.exists(out):  # empty, or an earlier export (checked above): moved aside, then removed
            old = tmp + ".old"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:  # put the earlier export back
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
