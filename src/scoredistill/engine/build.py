"""Build every role of a run from a resolved config (teacher, generator, fake score, head)."""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np
import torch

from scoredistill.config import FakeScoreConfig, GeneratorConfig, TeacherConfig, teacher_config, typed
from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import Denoiser
from scoredistill.models.generators import DenoiserGenerator, DiscriminatorHead
from scoredistill.models.mlp import MLPBackbone, MLPDenoiser, MLPGenerator, ResidualDenoiser
from scoredistill.models.registry import load_model, process_from_description
from scoredistill.models.unet import UNetBackbone, UNetDenoiser
from scoredistill.process.processes import make_process
from scoredistill.teachers.gmm import GMMTeacher, build_gmm


def build_teacher(tcfg: dict | TeacherConfig) -> tuple[Denoiser, GMMTeacher | None]:
    """Return ``(teacher, reference)``; ``reference`` is the GMM the metrics compare against.

    ``tcfg`` is the typed teacher section or its dict (then validated by the schema; each kind's keys
    are :class:`~scoredistill.config.TeacherConfig`'s)."""
    t = teacher_config(tcfg)
    if t.kind == "gmm":
        g = build_gmm(t, make_process(t.process))
        return g, g
    if t.kind == "learned":
        if not os.path.isdir(t.path):
            raise ConfigError("teacher.path", f"folder not found: {t.path}")
        try:
            model, cfg = load_model(t.path)
        except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
            raise ConfigError("teacher.path", f"not a teacher folder ({e})") from None
        model.requires_grad_(False).eval()
        ref = None
        if "source" in cfg:
            src = cfg["source"]
            ref = GMMTeacher(src["means"], src["stds"], src["weights"], src.get("classes"),
                             process_from_description(src["process"]))
        elif "dataset" in cfg:  # an image teacher from `train-teacher` (teacher.kind: image)
            from scoredistill.teachers.bundled import attach_evaluator

            attach_evaluator(model, cfg["dataset"], field="teacher.path")
        return model, ref
    if t.kind == "scene":  # the exact-render 3D teacher (teachers/scene.py, docs/3d.md)
        from scoredistill.teachers.scene import build_scene_teacher

        cfg = {k: v for k, v in dataclasses.asdict(t).items()
               if k in ("scenes", "weights", "std", "resolution", "background", "janus", "janus_labels")
               and v is not None}
        return build_scene_teacher({"kind": "scene", **cfg}, make_process(t.process)), None
    if t.kind == "bundled":  # teachers shipped in the package (teachers/bundled.py): name digits | mnist
        from scoredistill.teachers.bundled import load_bundled

        return load_bundled(t.name)[0], None
    # a diffusers pipeline folder (scoredistill.adapters, docs/diffusers.md); the adapter records the
    # scheduler's process in the dict it is given (the run's config.yaml)
    from scoredistill.adapters.diffusers_teacher import build_diffusers_teacher

    return build_diffusers_teacher(tcfg if isinstance(tcfg, dict) else dataclasses.asdict(t)), None


def build_evaluator(teacher: Denoiser, reference, seed: int = 0, eval_cfg: dict | None = None):
    """The evaluator for a teacher: exact GMM metrics when the target mixture is known, else the
    teacher's own (``make_evaluator``: image teachers; ``eval.fid_weights`` adds real FID there)."""
    from scoredistill.metrics.evaluator import Evaluator, GMMEvaluator

    fid = (eval_cfg or {}).get("fid_weights")
    make = getattr(teacher, "make_evaluator", None)
    if fid and (reference is not None or make is None):
        raise ConfigError("eval.fid_weights", "real FID needs an image teacher (teacher.kind: bundled)")
    if reference is not None:
        return GMMEvaluator(reference, seed)
    if make is None:
        return Evaluator()
    return make(seed, fid_weights=fid) if fid else make(seed)


def data_std(teacher: Denoiser, reference: GMMTeacher | None) -> float:
    if reference is not None:
        return reference.data_std()
    return float(getattr(teacher, "sigma_data", 1.0))


def _is_diffusers(teacher) -> bool:
    from scoredistill.adapters.diffusers_teacher import is_diffusers_denoiser

    return is_diffusers_denoiser(teacher)


def native_checkpointing(module: torch.nn.Module, enabled, section: str) -> torch.nn.Module:
    """``{section}.gradient_checkpointing`` for the native networks (MLP and UNet backbones): each
    residual block is recomputed in the backward pass instead of keeping its activations."""
    if enabled is None:
        return module
    if not isinstance(enabled, bool):
        raise ConfigError(f"{section}.gradient_checkpointing", f"must be true or false, got {enabled!r}")
    backbones = [m for m in module.modules() if isinstance(m, (MLPBackbone, UNetBackbone))]
    if enabled and not backbones:
        raise ConfigError(f"{section}.gradient_checkpointing", f"{type(module).__name__} does not support it")
    for m in backbones:
        m.gradient_checkpointing = enabled
    return module


def build_generator(gcfg: dict | GeneratorConfig, teacher: Denoiser, two_time: bool = False,
                    signed_time: bool = False, phases=None) -> torch.nn.Module:
    """The generator of the ``generator`` section (typed, or its dict: validated by the schema first);
    ``two_time``: its step network also takes a jump's end time (the ``two_time_student`` requirement);
    ``signed_time``: and negative times (``signed_time_student``);
    ``phases``: for an objective that trains one expert per phase (the ``experts`` requirement), its
    :meth:`~scoredistill.objectives.base.Objective.phase_split` (step times -> phase boundaries)."""
    g = typed(GeneratorConfig, gcfg, "generator")
    if g.blocks != "residual" and g.kind != "mlp":
        raise ConfigError("generator.blocks", "plain applies to generators of kind mlp (one-step or K-step); "
                          "accepted here: residual")
    if two_time and (g.kind != "mlp" or (g.steps is None and g.timesteps is None) or _is_diffusers(teacher)):
        raise ConfigError("generator.kind", "this objective trains a two-time (flow-map) student; accepted: "
                          "kind mlp with generator.steps >= 1 on a native teacher")
    gen = _build_generator(g, teacher, two_time, signed_time, phases)
    if not _is_diffusers(teacher):  # diffusers roles: enabled in scoredistill.adapters.student
        native_checkpointing(gen, g.gradient_checkpointing, "generator")
    return gen


def _few_step_key(g: GeneratorConfig) -> str:
    """The K-step key a one-step generator's config set (the message names the key the user wrote)."""
    return "generator.rollout" if g.rollout != "fresh" else "generator.step_weights"


def _build_generator(g: GeneratorConfig, teacher: Denoiser, two_time: bool = False,
                     signed_time: bool = False, phases=None) -> torch.nn.Module:
    dim = int(np.prod(teacher.data_shape))
    if _is_diffusers(teacher):
        if g.kind not in ("mlp", "multi"):
            return _diffusers_student(g, teacher, phases)
        # a one-step MLP student over a diffusers teacher's data shape
        if g.experts is not None or phases is not None or g.steps is not None:
            raise ConfigError("generator.kind", f"{g.kind!r} is a one-step generator here; K-step diffusers "
                              "students and experts are copies of the teacher: accepted: teacher, lora")
        if g.rollout != "fresh" or g.step_weights is not None:
            raise ConfigError(_few_step_key(g), "applies to K-step students; accepted with generator.kind "
                              f"{g.kind}: rollout fresh, step_weights null")
    elif g.steps is not None or g.timesteps is not None:
        return _native_few_step(g, teacher, dim, two_time, signed_time, phases)
    elif g.experts is not None or phases is not None:
        raise ConfigError("generator.experts" if g.experts is not None else "generator.steps",
                          "experts are the step networks of a K-step student; accepted: generator.steps >= 1 or "
                          "generator.timesteps")
    elif g.rollout != "fresh" or g.step_weights is not None:
        raise ConfigError(_few_step_key(g), "applies to K-step students; set generator.steps or timesteps")
    if g.kind == "mlp":
        return MLPGenerator(dim, g.width, g.depth, teacher.num_classes, blocks=g.blocks)
    if g.kind == "multi":  # MSD: one student per block of classes (models/multi.py)
        from scoredistill.models.multi import MultiStudentGenerator

        return MultiStudentGenerator(dim, g.width, g.depth, _msd_classes(g, teacher), g.students)
    if g.kind == "lora":
        raise ConfigError("generator.kind", "'lora' needs a diffusers teacher (teacher.kind: diffusers)")
    if not isinstance(teacher, (MLPDenoiser, UNetDenoiser)):
        raise ConfigError("generator.kind", "'teacher' needs a learned teacher (teacher.kind: learned); "
                          "accepted for exact-score teachers: mlp")
    t_init = float(teacher.process.t_from_rho(g.sigma_init))
    return DenoiserGenerator(copy.deepcopy(teacher).requires_grad_(True).train(), t_init)


def _diffusers_student(g: GeneratorConfig, teacher: Denoiser, phases=None) -> torch.nn.Module:
    """``generator.kind`` teacher (full copies) | lora (peft adapters) over a diffusers teacher
    (scoredistill.adapters.student), over the native ``generator.timesteps``; experts as for native students."""
    from scoredistill.adapters.student import build_diffusers_generator, check_timesteps, student_times

    if g.steps is not None:
        raise ConfigError("generator.steps", "diffusers students take generator.timesteps (native values, "
                          "e.g. [999, 749, 499, 249]); accepted here: null")
    split = _expert_split(g, student_times(teacher, check_timesteps(teacher, g.timesteps)), phases)
    return build_diffusers_generator(dataclasses.asdict(g), teacher, split)


def _msd_classes(g: GeneratorConfig, teacher: Denoiser) -> int:
    """The teacher's number of classes, which MSD (``generator.kind: multi``) splits among its students."""
    k = teacher.num_classes or 0
    if not k:
        raise ConfigError("generator.kind", "'multi' routes samples by class and needs a class-conditional "
                          "teacher (preset ring8_cond, or teacher.classes)")
    if g.students > k:
        raise ConfigError("generator.students", f"must be <= the teacher's {k} classes, got {g.students}")
    return k


def _native_few_step(g: GeneratorConfig, teacher: Denoiser, dim: int, two_time: bool = False,
                     signed_time: bool = False, phases=None) -> torch.nn.Module:
    """A K-step student over a native step network (models/fewstep.py; docs/fewstep.md): a fresh MLP
    (``kind: mlp``), MSD's class-routed MLPs (``multi``), or a copy of a learned teacher (``teacher``, first
    time ``t(sigma_init)``), rolled out over ``generator.steps`` / ``timesteps`` with ``generator.rollout``;
    with experts (``generator.experts``, or an objective's ``phases``) one such network per phase."""
    from scoredistill.models.fewstep import MultiStudentDenoiser, PhaseExperts, build_fewstep, fresh_mlp_denoiser
    from scoredistill.models.rollout import step_times

    sd = float(teacher.data_std()) if hasattr(teacher, "data_std") else float(getattr(teacher, "sigma_data", 1.0))
    if g.kind == "mlp":
        def make():
            return fresh_mlp_denoiser(teacher.process, dim, g.width, g.depth, teacher.num_classes, sd,
                                      two_time=two_time, signed_time=signed_time, blocks=g.blocks)
    elif g.kind == "multi":
        def make():
            return MultiStudentDenoiser(teacher.process, dim, g.width, g.depth, _msd_classes(g, teacher), g.students,
                                        sd)
    elif g.kind == "teacher":
        if not isinstance(teacher, (MLPDenoiser, UNetDenoiser)):
            raise ConfigError("generator.kind", "'teacher' needs a learned teacher (teacher.kind: learned); "
                              "accepted for exact-score teachers: mlp, multi")

        def make():
            return copy.deepcopy(teacher).requires_grad_(True).train()
    else:
        raise ConfigError("generator.kind", f"{g.kind!r} needs a diffusers teacher (teacher.kind: diffusers)")
    t_first = float(teacher.process.t_from_rho(g.sigma_init)) if g.kind == "teacher" else None
    times = step_times(teacher.process, g.steps, g.timesteps, t_first)
    split = _expert_split(g, times, phases)
    net = make() if split is None else PhaseExperts([make() for _ in range(len(split) + 1)], split)
    return build_fewstep(net, None, times, g.rollout, "scaled", g.step_weights)


def _expert_split(g: GeneratorConfig, times: list[float], phases) -> list[float] | None:
    """The boundaries between the student's experts (None: one step network): ``generator.experts: per_step``
    splits at the step times, ``per_phase`` (the default of an objective with phases) at the objective's
    ``phases(times)``; the two must agree when both apply."""
    mode = g.experts or ("per_phase" if phases is not None else None)
    if mode is None:
        return None
    if mode == "per_phase" and phases is None:
        raise ConfigError("generator.experts", "per_phase needs an objective that splits the noise range into "
                          "phases (phased_dmd); accepted here: per_step, null")
    split = phases(times) if phases is not None else None
    if mode == "per_step":
        if split is not None and split != list(times[1:]):
            raise ConfigError("generator.experts", f"per_step builds {len(times)} experts (one per step) but the "
                              f"objective has {len(split) + 1} phases; accepted: per_phase (one expert per phase), "
                              "or phase boundaries equal to the step times")
        split = list(times[1:])
    return split


def student_denoiser(generator: torch.nn.Module, objective) -> Denoiser:
    """The denoiser ``f_theta(x_t, t, cond)`` inside a generator (one-step ``DenoiserGenerator`` or K-step
    ``FewStepGenerator``), which consistency objectives train directly; a one-line error for a generator
    without one (the time-free ``MLPGenerator``)."""
    den = getattr(generator, "denoiser", None)
    if not isinstance(den, Denoiser):
        raise ConfigError("generator.steps", f"objective {objective.name} trains the student as a denoiser "
                          "f(x_t, t); accepted: generator.steps >= 1 (a time-conditioned step network) or "
                          "generator.kind: teacher")
    return den


def build_fake(fcfg: dict | FakeScoreConfig, teacher: Denoiser, sigma_data: float,
               split: list[float] | None = None) -> Denoiser:
    """The fake score of the ``fake_score`` section (typed, or its dict: validated by the schema first);
    ``sigma_data`` is the EDM scale when the section leaves it null. ``split``: the phase boundaries of a
    student with experts, which ``fake_score.experts: per_phase`` gives one fake network each."""
    f = typed(FakeScoreConfig, fcfg, "fake_score")
    if f.blocks != "residual" and f.kind != "mlp":
        raise ConfigError("fake_score.blocks", "plain applies to fake scores of kind mlp; accepted here: residual")
    if f.time_embedding != "mlp" and f.kind != "mlp":
        raise ConfigError("fake_score.time_embedding", "fourier applies to fake scores of kind mlp; accepted here: mlp")
    if f.experts is not None:
        if split is None or _is_diffusers(teacher):
            raise ConfigError("fake_score.experts", "per_phase splits the fake score at the phases of a native "
                              "student with experts (generator.experts or phased_dmd); accepted here: null")
        from scoredistill.models.fewstep import PhaseExperts

        fake = PhaseExperts([_build_fake(f, teacher, sigma_data) for _ in range(len(split) + 1)], split)
        native_checkpointing(fake, f.gradient_checkpointing, "fake_score")
        return fake
    fake = _build_fake(f, teacher, sigma_data)
    if not _is_diffusers(teacher):
        native_checkpointing(fake, f.gradient_checkpointing, "fake_score")
    return fake


def _build_fake(f: FakeScoreConfig, teacher: Denoiser, sigma_data: float) -> Denoiser:
    dim = int(np.prod(teacher.data_shape))
    if f.kind == "mlp":
        sd = f.sigma_data if f.sigma_data is not None else sigma_data
        return MLPDenoiser(teacher.process, dim, f.width, f.depth, teacher.num_classes, sd, blocks=f.blocks,
                           time_embedding=f.time_embedding)
    if _is_diffusers(teacher):  # fake_score.kind teacher/full (copy) | lora (peft LoRA on the teacher)
        from scoredistill.adapters.student import build_diffusers_fake

        return build_diffusers_fake(dataclasses.asdict(f), teacher, sigma_data)
    if f.kind == "lora":
        raise ConfigError("fake_score.kind", "'lora' needs a diffusers teacher (teacher.kind: diffusers)")
    if isinstance(teacher, GMMTeacher):  # no weights to copy: the exact score plus a correction starting at 0
        sd = f.sigma_data if f.sigma_data is not None else sigma_data
        delta = MLPDenoiser(teacher.process, dim, f.width, f.depth, teacher.num_classes, sd)
        return ResidualDenoiser(copy.deepcopy(teacher), delta).train()
    if not isinstance(teacher, (MLPDenoiser, UNetDenoiser)):
        raise ConfigError("fake_score.kind", "'teacher' needs a learned or exact-score teacher (teacher.kind: "
                          "learned or gmm); accepted here: mlp")
    return copy.deepcopy(teacher).requires_grad_(True).train()


def build_discriminator(fake: Denoiser, width: int = 128, depth: int = 1) -> DiscriminatorHead:
    """The discriminator head on ``fake.features``; ``width``/``depth`` from the objective's
    :meth:`~scoredistill.objectives.base.Objective.discriminator_arch`."""
    if not hasattr(fake, "features"):
        raise ConfigError("fake_score.kind", "the discriminator head needs a fake network with features()")
    from scoredistill.models.denoiser import module_device

    dev = module_device(fake)  # probe where the fake lives (it may already be on the GPU)
    with torch.no_grad():
        x = torch.zeros(2, *fake.data_shape, device=dev)
        t = torch.full((2,), 0.5, dtype=torch.float64, device=dev)
        h = fake.features(x, t, None)
    return DiscriminatorHead(int(np.prod(h.shape[1:])), width, depth)


def load_real_data(spec, teacher: Denoiser, reference, n: int, seed: int, log=None):
    """Real samples ``(x, cond)``: exact GMM samples, the teacher's ODE samples, or a ``.npy`` file.

    A diffusers teacher is never sampled for them: ``train.real_data`` must then name real latents (a
    pool of teacher samples would cost ``real_pool`` x 35 network evaluations of a large model before the
    first step). Sampling a learned teacher is announced with its size and cost."""
    from scoredistill.sampling import teacher_sample

    g = torch.Generator().manual_seed(seed + 1000003)
    if spec == "teacher":
        if _is_diffusers(teacher):
            raise ConfigError("train.real_data", "a diffusers teacher is not sampled for real data (hours on a "
                              "large model); accepted: PATH.npy of real latents (python -m "
                              "scoredistill.adapters.latents, docs/diffusers.md), or none")
        cond = sample_classes(teacher.num_classes, n, g)
        if isinstance(teacher, GMMTeacher):
            return teacher.sample(n, cond=cond, generator=g), cond
        if log is not None:
            log(f"train.real_data: teacher -> drawing {n} samples with the teacher's 18-step Heun sampler "
                f"({35 * n} network evaluations) before the first step; train.real_pool sets how many, "
                "train.real_data: PATH.npy uses real data instead")
        return teacher_sample(teacher, n, steps=18, cond=cond, generator=g), cond
    if isinstance(spec, str) and spec.endswith(".npy"):
        if not os.path.exists(spec):
            raise ConfigError("train.real_data", f"file not found: {spec}")
        arr = np.load(spec, allow_pickle=False)
        if tuple(arr.shape[1:]) != tuple(teacher.data_shape):
            raise ConfigError("train.real_data", f"samples have shape {tuple(arr.shape[1:])}, the teacher's data "
                              f"shape is {tuple(teacher.data_shape)}")
        return torch.from_numpy(arr.astype(np.float32)), None
    raise ConfigError("train.real_data", f"unknown value {spec!r}; accepted: teacher, none, PATH.npy")


def sample_classes(num_classes: int | None, n: int, g: torch.Generator | None):
    if not num_classes:
        return None
    return torch.randint(0, num_classes, (n,), generator=g)


def make_ode_pairs(teacher: Denoiser, n: int, steps: int, seed: int, w: float = 1.0):
    """(noise, teacher Heun ODE output) pairs for regression losses (DMD, arXiv 2311.18828 §3.3)."""
    from scoredistill.models.denoiser import module_device
    from scoredistill.sampling import get_rhos_karras, sample_heun

    g = torch.Generator().manual_seed(seed + 2000003)
    z = torch.randn(n, *teacher.data_shape, generator=g)
    cond = sample_classes(teacher.num_classes, n, g)
    p = teacher.process
    rhos = get_rhos_karras(steps, max(p.rho_min, 0.002), min(p.rho_max, 80.0))
    dev = module_device(teacher)
    x = sample_heun(teacher, z.to(dev), rhos, cond.to(dev) if cond is not None else None, w).cpu()
    return z, x, cond
