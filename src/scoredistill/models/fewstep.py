"""K-step students over a native backbone denoiser (docs/fewstep.md).

:class:`FewStepGenerator` is the one-step :class:`~scoredistill.models.generators.DenoiserGenerator`
generalised to ``K`` steps through :class:`~scoredistill.models.rollout.Rollout`: in eval mode (sampling,
EMA evaluation, export) it runs all ``K`` steps; in train mode it runs DMD2's backward simulation
(arXiv 2405.14867 §4.5): the step ``k`` set by :meth:`~FewStepGenerator.set_rollout_step`, or drawn from
the per-iteration seed the training loop passes to :meth:`~FewStepGenerator.set_rollout_seed`, with
gradient only through step ``k``. With ``K = 1`` it computes exactly what ``DenoiserGenerator`` computes.

Backbones: a copy of a learned teacher (MLP or UNet denoiser; teacher initialisation), a fresh
time-conditioned MLP from :func:`fresh_mlp_denoiser` (a one-step ``MLPGenerator`` has no time input, so it
cannot be a step of a K-step student), or :class:`MultiStudentDenoiser`, MSD's class-routed students
(arXiv 2410.23274; models/multi.py is its one-step form) with a time input.

Saved folders have ``class: FewStepGenerator``; :func:`~scoredistill.models.registry.load_model` rebuilds
them once this module has been imported (it registers itself with ``register_folder_class``).
"""

from __future__ import annotations

import torch
from torch import nn

from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import NULL_CLASS, Denoiser, expand_t
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.models.multi import partition
from scoredistill.models.registry import (
    model_config,
    model_from_config,
    process_from_description,
    register_folder_class,
)
from scoredistill.models.rollout import Rollout, RolloutStudent, step_times
from scoredistill.process.processes import Process


class FewStepGenerator(RolloutStudent, nn.Module):
    """``G(z, c)``: the K-step rollout of ``denoiser`` (module docstring). State-dict keys are those of
    ``DenoiserGenerator`` (``denoiser.*``), so a one-step student's weights load into it. The step choice,
    noise source and calls are :class:`~scoredistill.models.rollout.RolloutStudent`'s."""

    def __init__(self, denoiser: Denoiser, rollout: Rollout):
        super().__init__()
        if rollout.process.describe() != denoiser.process.describe():
            raise ValueError("the rollout's process must be the denoiser's")
        self.denoiser = denoiser
        self.rollout = rollout
        self.data_shape = denoiser.data_shape
        self.num_classes = denoiser.num_classes

    @property
    def t_steps(self) -> list[float]:
        return list(self.rollout.times)

    @property
    def t_init(self) -> float:
        return self.rollout.times[0]

    def registry_config(self) -> dict:
        return {"class": "FewStepGenerator", "denoiser": model_config(self.denoiser),
                "rollout": self.rollout.describe()}


def _from_registry(cfg: dict) -> FewStepGenerator:
    den = model_from_config(cfg["denoiser"])
    return FewStepGenerator(den, Rollout.from_description(cfg["rollout"], den.process))


register_folder_class("FewStepGenerator", _from_registry)


def build_fewstep(denoiser: Denoiser, steps: int | None = None, timesteps=None, mode: str = "fresh",
                  noise_input: str = "scaled", step_weights=None, t_first: float | None = None,
                  field: str = "generator") -> FewStepGenerator:
    """A K-step student from config values (``field.steps``, ``.timesteps``, ``.rollout``, ``.noise_input``,
    ``.step_weights``); every bad value is a one-line :class:`~scoredistill.errors.ConfigError` naming its key.
    ``t_first`` is the first step's time when ``timesteps`` are not given (default the process's ``t_max``;
    the teacher-initialised student passes ``t(sigma_init)``)."""
    times = step_times(denoiser.process, steps, timesteps, t_first, field=field)
    rollout = Rollout(denoiser.process, times, mode, noise_input, step_weights, field=field)
    return FewStepGenerator(denoiser, rollout)


def fresh_mlp_denoiser(process: Process, dim: int, width: int = 256, depth: int = 4, num_classes: int | None = None,
                       sigma_data: float = 1.0, emb_dim: int = 64, two_time: bool = False,
                       signed_time: bool = False, blocks: str = "residual") -> MLPDenoiser:
    """A freshly initialised, time-conditioned MLP step network for a K-step student from scratch.

    ``MLPDenoiser`` zero-initialises its output layer (a denoiser starts at ``c_skip y``), which as a
    generator would put every sample at (nearly) the same point at the first step, a start from which
    reverse-KL objectives cannot recover lost modes; the output layer gets PyTorch's default
    initialisation instead, so at ``t_max`` (``c_skip ~ 0``, ``c_out ~ sigma_data``) the student starts
    as a random MLP of its noise input, like the one-step ``MLPGenerator``."""
    net = MLPDenoiser(process, dim, width, depth, num_classes, sigma_data, emb_dim, two_time, signed_time,
                      blocks=blocks)
    net.net.out.reset_parameters()
    return net


class MultiStudentDenoiser(Denoiser):
    """MSD (arXiv 2410.23274) as a K-step backbone: ``students`` fresh step networks
    (:func:`fresh_mlp_denoiser`), class ``c`` routed to student ``c * students // num_classes`` as in
    :class:`~scoredistill.models.multi.MultiStudentGenerator`, so a student receives gradient only from the
    samples of its own classes at every step of the rollout."""

    calls_children_conditionally = True  # which student runs depends on the labels (engine/fsdp.py)

    def __init__(self, process: Process, dim: int, width: int = 256, depth: int = 4, num_classes: int | None = None,
                 students: int = 2, sigma_data: float = 1.0, emb_dim: int = 64):
        super().__init__()
        if not num_classes:
            raise ValueError("MultiStudentDenoiser needs class labels (a class-conditional teacher)")
        if not 1 <= students <= num_classes:
            raise ValueError(f"students must be in [1, {num_classes}] (number of classes), got {students}")
        self.process = process
        self.data_shape = (dim,)
        self.num_classes = num_classes
        self.students = students
        self.arch = dict(dim=dim, width=width, depth=depth, num_classes=num_classes, students=students,
                         sigma_data=float(sigma_data), emb_dim=emb_dim)
        self.nets = nn.ModuleList(fresh_mlp_denoiser(process, dim, width, depth, num_classes, sigma_data, emb_dim)
                                  for _ in range(students))
        self.register_buffer("owner", partition(num_classes, students))

    def denoise(self, x_t, t, cond=None):
        if cond is None or bool((cond == NULL_CLASS).any()):
            raise ValueError("MultiStudentDenoiser routes by class: every sample needs a label")
        t = expand_t(t, x_t.shape[0], x_t.device)
        return route(self.nets, self.owner.to(cond.device)[cond.long()], x_t, t, cond)

    def registry_config(self) -> dict:
        return {"class": "MultiStudentDenoiser", "arch": self.arch, "process": self.process.describe()}


register_folder_class("MultiStudentDenoiser",
                      lambda cfg: MultiStudentDenoiser(process_from_description(cfg["process"]), **cfg["arch"]))


def route(nets, who: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """``nets[who[i]](x_t[i], t[i], cond[i])`` for every sample ``i``; a network whose samples are absent is not
    called, so it receives no gradient (one call when every sample goes to the same network)."""
    first = int(who[0]) if len(who) else 0
    if bool((who == first).all()):
        return nets[first](x_t, t, cond)
    out = torch.zeros_like(x_t)
    for k, net in enumerate(nets):
        idx = (who == k).nonzero(as_tuple=True)[0]
        if len(idx):
            out = out.index_copy(0, idx, net(x_t[idx], t[idx], None if cond is None else cond[idx]))
    return out


def check_split(split, t_first: float, field: str) -> list[float]:
    """Phase boundaries inside a student's time range: strictly decreasing canonical times in ``(0, t_first)``,
    ``t_first`` the student's first step time. ``P - 1`` of them make ``P`` phases, phase ``p`` covering
    ``(split[p], split[p-1]]`` (``split[-1] = t_first``, ``split[P-1] = 0``)."""
    if not isinstance(split, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in split):
        raise ConfigError(field, f"must be a list of canonical times, got {split!r}")
    split = [float(v) for v in split]
    if any(b >= a for a, b in zip(split, split[1:])):
        raise ConfigError(field, f"must be strictly decreasing, got {split}")
    bad = [v for v in split if not 0.0 < v < t_first]
    if bad:
        raise ConfigError(field, f"phase boundaries must lie strictly inside (0, {t_first:g}) (the student's "
                          f"first step time), got {bad}")
    return split


def phase_index(t: torch.Tensor, split: list[float]) -> torch.Tensor:
    """The phase of each time: the number of boundaries at or above it (``t`` in ``(split[p], split[p-1]]``
    is phase ``p``); a time exactly on a boundary belongs to the phase below the boundary's top."""
    who = torch.zeros(t.shape, dtype=torch.long, device=t.device)
    for b in split:
        who += (t <= b).long()
    return who


class PhaseExperts(Denoiser):
    """One step network per noise phase (Phased DMD's experts, arXiv 2510.27684): a time ``t`` in phase ``p``
    (``(split[p], split[p-1]]``, :func:`phase_index`) is denoised by ``nets[p]`` alone, so an update of one
    phase's step reaches only its expert. With ``split`` the student's step times after the first, every step
    has its own expert (``generator.experts: per_step``)."""

    def __init__(self, nets, split: list[float]):
        super().__init__()
        nets = list(nets)
        if len(nets) != len(split) + 1:
            raise ValueError(f"{len(split)} boundaries make {len(split) + 1} phases, got {len(nets)} experts")
        self.nets = nn.ModuleList(nets)
        self.split = [float(b) for b in split]
        self.process = nets[0].process
        self.data_shape = nets[0].data_shape
        self.num_classes = nets[0].num_classes
        if hasattr(nets[0], "sigma_data"):
            self.sigma_data = nets[0].sigma_data

    @property
    def calls_children_conditionally(self) -> bool:  # which expert runs depends on t (engine/fsdp.py)
        return len(self.nets) > 1

    @property
    def has_idle_experts(self) -> bool:
        """Experts a training step leaves untouched on every rank (all but the trained step's): engine/fsdp.py
        cannot keep them without a gradient, so FSDP refuses them."""
        return len(self.nets) > 1

    def denoise(self, x_t, t, cond=None):
        t = expand_t(t, x_t.shape[0], x_t.device)
        return route(self.nets, phase_index(t, self.split), x_t, t, cond)

    def registry_config(self) -> dict:
        return {"class": "PhaseExperts", "nets": [model_config(n) for n in self.nets], "split": list(self.split)}


register_folder_class("PhaseExperts",
                      lambda cfg: PhaseExperts([model_from_config(c) for c in cfg["nets"]], cfg["split"]))
