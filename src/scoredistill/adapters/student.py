"""Student and critic roles for diffusers teachers.

Student (``generator.kind: teacher`` = trainable full copy, ``lora`` = LoRA on a frozen copy):
:class:`DiffusersGenerator`, a :class:`~scoredistill.models.generators.DenoiserGenerator` whose
input timesteps are given natively (``generator.timesteps``: DDPM indices such as ``[999]`` /
``[399]`` / ``[999, 749, 499, 249]``, or ``1000 sigma`` for flow models). Its input follows diffusers
pipelines and DMD2: ``generator.noise_input: pure`` feeds the unit-variance noise ``z`` itself as
``x_T`` (what ``LCMScheduler``/``FlowMatchEulerDiscreteScheduler`` pipelines do, so an exported
pipeline reproduces the student exactly); ``scaled`` feeds ``s(t_0) z`` (the library's
``DenoiserGenerator`` and SiD-LSG's ``sqrt(1 - alpha_bar) z``).

Few-step students (``K = len(timesteps) > 1``) are the library's one K-step rollout
(:class:`~scoredistill.models.rollout.RolloutStudent`, docs/fewstep.md) over the diffusers network, as native
students are: re-noising ``generator.rollout`` fresh | fixed | ddim, the trained step drawn per iteration from
the engine's seed (uniform or ``generator.step_weights``) with backward simulation (DMD2 ``sample_backward``,
SiD^2's uniform step mixture), ``train_output`` for objectives that read the trained step (TDM, Phased DMD).
Without the engine's seed, training draws the step and the fresh noise from the global torch RNG (saved in
checkpoints); in eval mode (EMA copy, export, ``scoredistill sample``) all ``K`` steps run and fresh re-noising
without a given generator is seeded by the input noise ``z`` itself, so a seeded ``z`` gives the same sample
in any process.

Experts (``generator.experts``, Phased DMD arXiv 2510.27684): one full copy per phase
(``PhaseExperts``), or for ``kind: lora`` one LoRA adapter per phase on one frozen copy (:class:`LoRAExperts`).

Critic (``fake_score.kind``): ``teacher``/``full`` = trainable copy, ``lora`` =
:class:`~scoredistill.adapters.lora.LoRACritic` on the frozen teacher module.
"""

from __future__ import annotations

import copy
import functools
import hashlib

import torch
from torch import nn

from scoredistill.adapters.diffusers_teacher import DiffusersDenoiser, native_to_canonical
from scoredistill.adapters.lora import (
    DEFAULT_TARGETS,
    LoRACritic,
    LoRAHolder,
    attach_lora,
    enable_checkpointing,
    set_active_adapter,
)
from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import Denoiser, expand_t
from scoredistill.models.fewstep import PhaseExperts, phase_index, route
from scoredistill.models.generators import DenoiserGenerator
from scoredistill.models.registry import register_folder_class
from scoredistill.models.rollout import Rollout, RolloutStudent
from scoredistill.process.processes import VPDiscrete

NOISE_INPUTS = ("pure", "scaled")


def default_timesteps(teacher: DiffusersDenoiser) -> list[float]:
    if isinstance(teacher.process, VPDiscrete):
        return [teacher.process.num_steps - 1]
    return [float(teacher.assets.scheduler_config.get("num_train_timesteps", 1000))]


def check_timesteps(teacher: DiffusersDenoiser, spec) -> list[float]:
    if spec is None:
        return default_timesteps(teacher)
    ts = [spec] if isinstance(spec, (int, float)) and not isinstance(spec, bool) else spec
    if (not isinstance(ts, (list, tuple)) or not ts
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ts)):
        raise ConfigError("generator.timesteps", f"must be a number or a list of numbers, got {spec!r}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ConfigError("generator.timesteps", f"must be strictly decreasing, got {list(ts)}")
    if isinstance(teacher.process, VPDiscrete):
        n = teacher.process.num_steps
        if not all(float(v).is_integer() and 0 < v <= n - 1 for v in ts):
            raise ConfigError("generator.timesteps", f"DDPM timesteps must be integers in [1, {n - 1}], got {list(ts)}")
        return [int(v) for v in ts]
    top = float(teacher.assets.scheduler_config.get("num_train_timesteps", 1000))
    if not all(0 < v <= top for v in ts):
        raise ConfigError("generator.timesteps", f"flow timesteps (1000 sigma) must be in (0, {top:g}], got {list(ts)}")
    return [float(v) for v in ts]


def student_times(teacher: DiffusersDenoiser, timesteps: list[float]) -> list[float]:
    """The canonical times of native student timesteps (DDPM index ``n`` -> ``n / N``; flow ``1000 sigma``)."""
    n_train = float(teacher.assets.scheduler_config.get("num_train_timesteps", 1000))
    return [native_to_canonical(teacher.process, v, n_train) for v in timesteps]


def _z_noise_generator(z: torch.Tensor) -> torch.Generator:
    """A generator seeded from the bits of ``z``: an eval-mode K-step rollout is then a function of its
    input noise alone, so ``scoredistill sample --seed S``, evaluation and export verification are
    reproducible and never consume (or depend on) the global RNG the training loop checkpoints."""
    digest = hashlib.sha256(z.detach().float().cpu().contiguous().numpy().tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def expert_names(n: int) -> list[str]:
    """The peft adapter names of a LoRA student with ``n`` experts (one per phase)."""
    return [f"phase{p}" for p in range(n)]


class LoRAExperts(Denoiser):
    """One LoRA adapter per phase on ONE frozen base network (Phased DMD's experts, arXiv 2510.27684, as
    adapters): a time in phase ``p`` (models/fewstep.py ``phase_index``) is denoised by the base with adapter
    ``phase{p}`` active. The rollout calls it with one time per batch; a batch that mixes phases is split by
    phase (``route``), one call per adapter, so an update of one phase's step reaches only its adapter.

    The base is held, not registered (its parameters belong to the student's ``LoRAHolder``); switching the
    active adapter sets peft's ``_active_adapter`` directly, since peft's ``set_adapter`` also flips
    ``requires_grad`` (which would defeat the engine's freezing of the student during fake-score updates)."""

    has_idle_experts = True  # the adapters a step does not train (engine/fsdp.py; LoRA is refused by FSDP anyway)

    def __init__(self, base: DiffusersDenoiser, split: list[float]):
        super().__init__()
        self.__dict__["base"] = base
        self.split = [float(b) for b in split]
        self.names = expert_names(len(self.split) + 1)
        self.process = base.process
        self.data_shape = base.data_shape
        self.num_classes = base.num_classes
        self.sigma_data = base.sigma_data

    @property
    def calls_children_conditionally(self) -> bool:  # which adapter runs depends on t (engine/fsdp.py)
        return True

    def _phase(self, name: str, x_t, t, cond):
        set_active_adapter(self.base.model, name)
        return self.base.denoise(x_t, t, cond, lora=True)

    def denoise(self, x_t, t, cond=None, lora: bool | None = None):
        t = expand_t(t, x_t.shape[0], x_t.device)
        calls = [functools.partial(self._phase, n) for n in self.names]
        return route(calls, phase_index(t, self.split), x_t, t, cond)


class DiffusersGenerator(RolloutStudent, LoRAHolder, DenoiserGenerator):
    """K-step student over a copy of a diffusers teacher (see the module docstring). ``experts``: phase
    boundaries (canonical times) of a student with one expert per phase: full copies (``PhaseExperts``) or,
    with ``lora``, one adapter per phase on one base (:class:`LoRAExperts`)."""

    def __init__(self, denoiser: DiffusersDenoiser, timesteps: list[float], noise_input: str = "pure",
                 lora: dict | None = None, rollout: str = "fresh", step_weights=None,
                 experts: list[float] | None = None):
        nn.Module.__init__(self)
        self.timesteps = list(timesteps)  # native values (diffusers convention)
        self.t_steps = student_times(denoiser, self.timesteps)
        self.t_init = self.t_steps[0]
        if noise_input not in NOISE_INPUTS:
            raise ConfigError("generator.noise_input", f"unknown value {noise_input!r}; accepted: "
                              f"{', '.join(NOISE_INPUTS)}")
        self.noise_input = noise_input
        # the one rollout of every K-step student (models/rollout.py); diffusers flow students start at t = 1
        self.rollout = Rollout(denoiser.process, self.t_steps, rollout, noise_input, step_weights,
                               t_range=(0.0, 1.0), field="generator")
        self.data_shape = denoiser.data_shape
        self.num_classes = denoiser.num_classes
        self.lora_config = lora
        self.experts = None if experts is None else [float(b) for b in experts]
        if lora is None:
            self.net = denoiser if experts is None else PhaseExperts(
                [denoiser] + [copy.deepcopy(denoiser) for _ in experts], experts)
            return
        denoiser.default_lora = True
        names = ["default"] if experts is None else expert_names(len(experts) + 1)
        params = attach_lora(denoiser.model, lora["rank"], lora.get("alpha"), lora.get("targets"), "generator",
                             names)
        self._hold(denoiser, params)
        if experts is not None:
            self.__dict__["_lora_experts"] = LoRAExperts(denoiser, experts)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample in eval mode (all K steps), for reports."""
        return len(self.t_steps)

    @property
    def denoiser(self) -> Denoiser:
        """The step network the rollout calls (with experts: the router over them)."""
        if "net" in self._modules:
            return self._modules["net"]
        return self.__dict__.get("_lora_experts") or self.__dict__["_lora_base"]

    @property
    def base(self) -> DiffusersDenoiser:
        """The diffusers network (the first expert's): its pipeline assets, family and model."""
        d = self._modules["net"] if "net" in self._modules else self.__dict__["_lora_base"]
        return d.nets[0] if isinstance(d, PhaseExperts) else d

    # without the engine's inputs: the global RNG in training (the one the training loop checkpoints), the
    # bits of z in eval mode -- what this student has always drawn, so earlier runs stay bit-identical
    def _unseeded_step(self) -> int:
        return int(torch.randint(0, self.num_steps, ()))

    def _default_noise(self, z: torch.Tensor, k: int | None) -> torch.Generator | None:
        if self.training:
            return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()))) if k else None
        return _z_noise_generator(z) if self.num_steps > 1 else None

    def registry_config(self) -> dict:
        d = self.base
        tcfg = dict(d.assets.teacher_cfg)
        if d.assets.prompts:
            tcfg["prompts"] = list(d.assets.prompts)
        return {"class": "DiffusersGenerator", "teacher": tcfg, "timesteps": self.timesteps,
                "noise_input": self.noise_input, "lora": self.lora_config, "rollout": self.rollout.mode,
                "step_weights": self.rollout.step_weights, "experts": self.experts,
                "gradient_checkpointing": bool(getattr(d.model, "is_gradient_checkpointing", False))}


def _lora_spec(cfg: dict, section: str) -> dict:
    rank = cfg.get("lora_rank")
    if rank is None:
        raise ConfigError(f"{section}.lora_rank", "missing; kind: lora needs a rank (e.g. 64)")
    targets = cfg.get("lora_targets")
    if targets is not None and (not isinstance(targets, (list, tuple))
                                or not all(isinstance(s, str) for s in targets)):
        raise ConfigError(f"{section}.lora_targets",
                          "must be a list of module names (e.g. [to_q, to_k, to_v, to_out.0])")
    alpha = cfg.get("lora_alpha")
    return {"rank": rank, "alpha": float(alpha) if alpha is not None else float(rank),
            "targets": list(targets) if targets else list(DEFAULT_TARGETS)}


def _trainable_copy(teacher: DiffusersDenoiser) -> DiffusersDenoiser:
    if teacher.model.__dict__.get("_sd_lora_layers"):
        raise ConfigError("fake_score.kind", "copy the teacher before attaching a LoRA critic")
    c = copy.deepcopy(teacher)
    c.default_lora = False
    return c


def build_diffusers_generator(gcfg: dict, teacher: DiffusersDenoiser, experts: list[float] | None = None
                              ) -> DiffusersGenerator:
    """The diffusers student of the ``generator`` section; ``experts``: the phase boundaries of a student with
    one expert per phase (engine/build.py computes them from ``generator.experts`` and the objective)."""
    kind = gcfg["kind"]
    ts = check_timesteps(teacher, gcfg.get("timesteps"))
    noise = gcfg.get("noise_input") or "pure"
    mode = gcfg.get("rollout") or "fresh"
    weights = gcfg.get("step_weights")
    if experts is not None and kind == "lora" and gcfg.get("gradient_checkpointing"):
        # checkpointing recomputes a step in the backward pass with whichever adapter is active by then
        raise ConfigError("generator.gradient_checkpointing", "LoRA experts switch adapters between calls, which "
                          "a recomputed forward cannot follow; accepted with generator.experts: false, null")
    base = _trainable_copy(teacher)
    if kind in ("teacher", "full"):
        gen = DiffusersGenerator(base.requires_grad_(True).train(), ts, noise, None, mode, weights, experts)
    elif kind == "lora":
        base.requires_grad_(False)
        gen = DiffusersGenerator(base, ts, noise, _lora_spec(gcfg, "generator"), mode, weights, experts)
        gen.train()
    else:
        raise ConfigError("generator.kind", f"unknown value {kind!r} for a diffusers teacher; accepted: teacher, lora")
    if gcfg.get("gradient_checkpointing"):
        for d in (gen.denoiser.nets if isinstance(gen.denoiser, PhaseExperts) else [gen.base]):
            enable_checkpointing(d.model, "generator")
    return gen


def build_diffusers_fake(fcfg: dict, teacher: DiffusersDenoiser, sigma_data: float | None = None):
    kind = fcfg["kind"]
    gc = bool(fcfg.get("gradient_checkpointing"))
    sd = fcfg.get("sigma_data")
    if kind in ("teacher", "full"):
        fake = _trainable_copy(teacher).requires_grad_(True).train()
        if gc:
            enable_checkpointing(fake.model, "fake_score")
    elif kind == "lora":
        spec = _lora_spec(fcfg, "fake_score")
        fake = LoRACritic(teacher, spec["rank"], spec["alpha"], spec["targets"], gc)
    else:
        raise ConfigError("fake_score.kind", f"unknown value {kind!r} for a diffusers teacher; accepted: "
                          "teacher (= full), full, lora, mlp")
    if sd is not None:
        fake.sigma_data = float(sd)
    return fake


def generator_from_registry(cfg: dict) -> DiffusersGenerator:
    """Rebuild a saved student's structure (weights are loaded by the registry)."""
    from scoredistill.adapters.diffusers_teacher import build_diffusers_teacher

    teacher = build_diffusers_teacher(dict(cfg["teacher"]))
    base = _trainable_copy(teacher)
    gen = DiffusersGenerator(base, cfg["timesteps"], cfg.get("noise_input", "pure"), cfg.get("lora"),
                             cfg.get("rollout", "fresh"), cfg.get("step_weights"), cfg.get("experts"))
    return gen.requires_grad_(False).eval()


register_folder_class("DiffusersGenerator", generator_from_registry)
