"""Student and critic roles for diffusers teachers.

Student (``generator.kind: teacher`` = trainable full copy, ``lora`` = LoRA on a frozen copy):
:class:`DiffusersGenerator`, a :class:`~scoredistill.models.generators.DenoiserGenerator` whose
input timesteps are given natively (``generator.timesteps``: DDPM indices such as ``[999]`` /
``[399]`` / ``[999, 749, 499, 249]``, or ``1000 sigma`` for flow models). Its input follows diffusers
pipelines and DMD2: ``generator.noise_input: pure`` feeds the unit-variance noise ``z`` itself as
``x_T`` (what ``LCMScheduler``/``FlowMatchEulerDiscreteScheduler`` pipelines do, so an exported
pipeline reproduces the student exactly); ``scaled`` feeds ``s(t_0) z`` (the library's
``DenoiserGenerator`` and SiD-LSG's ``sqrt(1 - alpha_bar) z``).

Few-step students (``K = len(timesteps) > 1``) use backward simulation (DMD2 ``sample_backward``,
SiD^2's uniform step mixture): in training mode each call draws ``k ~ U{0..K-1}`` (global torch RNG,
saved in checkpoints), rolls the student out for ``k`` steps without gradient -- x0 prediction,
then re-noising to the next timestep with fresh noise -- and returns the x0 of step ``k`` with
gradient. In eval mode (EMA copy, export, ``scoredistill sample``) it runs all ``K`` steps, and the
re-noising draws come from a generator seeded by the input noise ``z`` itself, so a seeded ``z``
gives the same sample in any process.

Critic (``fake_score.kind``): ``teacher``/``full`` = trainable copy, ``lora`` =
:class:`~scoredistill.adapters.lora.LoRACritic` on the frozen teacher module.
"""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

from scoredistill.adapters.diffusers_teacher import DiffusersDenoiser, native_to_canonical
from scoredistill.adapters.lora import DEFAULT_TARGETS, LoRACritic, LoRAHolder, attach_lora, enable_checkpointing
from scoredistill.errors import ConfigError
from scoredistill.models.generators import DenoiserGenerator
from scoredistill.models.registry import register_folder_class
from scoredistill.models.rollout import Rollout
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


def _noise_generator(z: torch.Tensor) -> torch.Generator:
    """A generator seeded from the bits of ``z``: an eval-mode K-step rollout is then a function of its
    input noise alone, so ``scoredistill sample --seed S``, evaluation and export verification are
    reproducible and never consume (or depend on) the global RNG the training loop checkpoints."""
    digest = hashlib.sha256(z.detach().float().cpu().contiguous().numpy().tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class DiffusersGenerator(LoRAHolder, DenoiserGenerator):
    """K-step student over a copy of a diffusers teacher (see the module docstring)."""

    def __init__(self, denoiser: DiffusersDenoiser, timesteps: list[float], noise_input: str = "pure",
                 lora: dict | None = None):
        nn.Module.__init__(self)
        self.timesteps = list(timesteps)  # native values (diffusers convention)
        n_train = float(denoiser.assets.scheduler_config.get("num_train_timesteps", 1000))
        self.t_steps = [native_to_canonical(denoiser.process, v, n_train) for v in self.timesteps]
        self.t_init = self.t_steps[0]
        if noise_input not in NOISE_INPUTS:
            raise ConfigError("generator.noise_input", f"unknown value {noise_input!r}; accepted: "
                              f"{', '.join(NOISE_INPUTS)}")
        self.noise_input = noise_input
        # the one rollout of every K-step student (models/rollout.py); diffusers flow students start at t = 1
        self.rollout = Rollout(denoiser.process, self.t_steps, "fresh", noise_input, t_range=(0.0, 1.0),
                               field="generator")
        self.data_shape = denoiser.data_shape
        self.num_classes = denoiser.num_classes
        self.lora_config = lora
        if lora is None:
            self.net = denoiser
        else:
            denoiser.default_lora = True
            params = attach_lora(denoiser.model, lora["rank"], lora.get("alpha"), lora.get("targets"), "generator")
            self._hold(denoiser, params)

    _rollout_seed: int | None = None
    takes_noise_generator = True  # forward(z, cond, generator=...): the engine passes its rollout noise source

    def set_rollout_seed(self, seed: int) -> None:
        self._rollout_seed = int(seed)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample in eval mode (all K steps), for reports."""
        return len(self.t_steps)

    @property
    def denoiser(self) -> DiffusersDenoiser:
        return self._modules["net"] if "net" in self._modules else self.__dict__["_lora_base"]

    def sample(self, z, cond=None, steps: int | None = None, generator: torch.Generator | None = None):
        """All ``K`` steps, or ``K' = steps`` of them evenly strided (docs/fewstep.md); seeded re-noising."""
        g = generator if generator is not None or len(self.t_steps) == 1 else _noise_generator(z)
        return self.rollout.sample(self.denoiser, z, cond, steps, g)

    def forward(self, z, cond=None, generator: torch.Generator | None = None):
        if not self.training:
            return self.sample(z, cond, generator=generator)
        k_max = len(self.t_steps)
        # one rollout length per iteration, the same on every rank and micro-batch: drawn from the seed the
        # engine sets each iteration (set_rollout_seed), not from the global RNG
        if k_max == 1:
            k = 0
        elif self._rollout_seed is not None:
            k = self.rollout.choose_step(self._rollout_seed)
        else:
            k = int(torch.randint(0, k_max, ()))
        if generator is None and k > 0:  # a caller outside the engine: re-noise from the global RNG
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        return self.rollout.train_step(self.denoiser, z, cond, k, generator).x0

    def registry_config(self) -> dict:
        d = self.denoiser
        tcfg = dict(d.assets.teacher_cfg)
        if d.assets.prompts:
            tcfg["prompts"] = list(d.assets.prompts)
        return {"class": "DiffusersGenerator", "teacher": tcfg, "timesteps": self.timesteps,
                "noise_input": self.noise_input, "lora": self.lora_config,
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


def build_diffusers_generator(gcfg: dict, teacher: DiffusersDenoiser) -> DiffusersGenerator:
    kind = gcfg["kind"]
    ts = check_timesteps(teacher, gcfg.get("timesteps"))
    noise = gcfg.get("noise_input") or "pure"
    base = _trainable_copy(teacher)
    if kind in ("teacher", "full"):
        gen = DiffusersGenerator(base.requires_grad_(True).train(), ts, noise)
    elif kind == "lora":
        base.requires_grad_(False)
        gen = DiffusersGenerator(base, ts, noise, _lora_spec(gcfg, "generator"))
        gen.train()
    else:
        raise ConfigError("generator.kind", f"unknown value {kind!r} for a diffusers teacher; accepted: teacher, lora")
    if gcfg.get("gradient_checkpointing"):
        enable_checkpointing(gen.denoiser.model, "generator")
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
    gen = DiffusersGenerator(base, cfg["timesteps"], cfg.get("noise_input", "pure"), cfg.get("lora"))
    return gen.requires_grad_(False).eval()


register_folder_class("DiffusersGenerator", generator_from_registry)
