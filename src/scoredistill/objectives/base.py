"""The objective contract shared by the generator trainer and the parameter optimizer.

An objective is a small, pure rule. It receives samples ``x`` (from a generator, a parameter
tensor or a renderer) in a :class:`Batch`, the frozen/learned networks in :class:`Roles`, and returns
a dict whose ``"loss"`` entry is the scalar to backpropagate and whose other entries are detached
diagnostics. It never steps an optimizer, moves a device or toggles ``requires_grad``: the engine
owns all of that (the boundary of NVlabs FastGen's methods). The shared field math and base classes
are in :mod:`.core`.

Requirements an objective can declare (the engine checks them before training):
``fake_score`` (a learned score of the sample distribution), ``discriminator`` (a head on the
fake network's features), ``real_data`` (samples of the target), ``ode_pairs`` (noise / teacher-ODE
output pairs), ``class_conditional`` (a teacher with class labels), ``rollout`` (a K-step student whose
trained step, :class:`~scoredistill.models.rollout.StepOutput`, arrives as ``Batch.rollout``; an objective
may restrict the student's re-noising with ``rollout_modes``), ``consistency_target`` (the student
as a denoiser ``f(x_t, t, cond)`` plus a frozen target copy of it that the engine keeps: an exact copy
after every generator update, or an EMA at :meth:`Objective.target_decay`), ``two_time_student`` (its
step network also takes a jump's end time ``r``: ``D(x_t, t, cond, r)``, MeanFlow's flow map),
``signed_time_student`` (with ``two_time_student``: the step network also accepts negative times, a second
branch of the same network, TwinFlow's fake trajectory), ``experts`` (a K-step student with one step network
per phase of the noise range, the phases given by :meth:`Objective.phase_split`; Phased DMD),
``teacher_path`` (the engine records the fake score's fine-tuning from the teacher toward the initial
generator's samples as checkpoints ``s_0 = teacher, ..., s_N`` and then hands the objective ``s_k`` as
``Roles.teacher`` on the schedule of :meth:`Objective.path_plan`, a :class:`PathPlan`; DisBack), ``stage_snapshot``
(with ``consistency_target``: a frozen copy of the student's denoiser, ``Roles.snapshot``, that the engine
refreshes after every generator update before :meth:`Objective.snapshot_step` and then keeps, checkpointed:
the stage-1 network of a two-stage method such as TCM).

An objective that keeps running statistics (f-distill's per-time-bin ratio EMA) exposes them with
``state_dict()`` / ``load_state_dict()`` (JSON-serialisable) and ``state_tensors()`` /
``load_state_tensors()``; the drivers store both in checkpoints. Every registered objective is checked
against this contract by tests/objectives/test_contract.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from scoredistill.config import check_value, key, keys
from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import Denoiser
from scoredistill.process.processes import Process
from scoredistill.process.time import TimeSampler, Uniform, make_time_sampler

REQUIREMENTS = ("fake_score", "discriminator", "real_data", "ode_pairs", "class_conditional", "rollout",
                "consistency_target", "two_time_student", "signed_time_student", "experts",
                "teacher_path", "stage_snapshot")


@dataclass(frozen=True)
class PathPlan:
    """Schedule of the ``teacher_path`` requirement, in iterations counted from the start of its stages.

    Stage 1 ("recording") takes ``record_steps`` iterations: only the fake score is trained (from the
    teacher, on the frozen initial generator's samples) and checkpoint ``s_k`` is taken after iteration
    ``ceil(k R / N)``, ``k = 1..N``. Stage 2 ("backtracking") trains as usual with ``s_{N-1}``,
    ``s_{N-2}``, ..., ``s_1`` as the real score for ``hold_steps`` iterations each, then the teacher
    ``s_0`` for the rest of the run. Fixed iteration counts (not shares of ``train.steps``) keep the
    schedule unchanged when a resumed run is given more steps."""

    checkpoints: int
    record_steps: int
    hold_steps: int

    def recorded_after(self, i: int) -> int | None:
        """The checkpoint index ``k`` taken after stage-1 iteration ``i`` (1-based), or ``None``."""
        n, r = self.checkpoints, self.record_steps
        k = (i - 1) * n // r + 1  # the smallest k with ceil(k r / n) >= i
        return k if 1 <= k <= n and -(-k * r // n) == i else None

    def index(self, j: int) -> int:
        """The path index whose network is the real score at stage-2 iteration ``j`` (0-based)."""
        return max(self.checkpoints - 1 - j // self.hold_steps, 0)

    def length(self) -> int:
        """Iterations before the teacher itself is the real score."""
        return self.record_steps + (self.checkpoints - 1) * self.hold_steps


@dataclass
class Batch:
    """What an objective sees in one call. ``x`` carries the generator graph in generator phases
    and is detached in auxiliary phases."""

    x: torch.Tensor
    cond: torch.Tensor | None = None
    z: torch.Tensor | None = None
    real: torch.Tensor | None = None
    real_cond: torch.Tensor | None = None
    ode_z: torch.Tensor | None = None
    ode_x: torch.Tensor | None = None
    ode_cond: torch.Tensor | None = None
    rng: torch.Generator | None = None
    step: int = 0
    # the items' identity, set by the parameter optimizer: which particles / views are in the batch,
    # how many items exist, and the view conditioning a view-aware fake score reads
    view: torch.Tensor | None = None
    index: torch.Tensor | None = None
    num_items: int | None = None
    # the trained step of a K-step student (models/rollout.py StepOutput: x0, its input x_t, t, t_next), set
    # by the engine for objectives that require "rollout"; ``x`` is its ``x0``
    rollout: Any = None


@dataclass
class Roles:
    """The networks an objective may read. Only the engine steps them."""

    teacher: Denoiser
    fake: Denoiser | None = None
    discriminator: nn.Module | None = None
    generator: Any = None  # callable G(z, cond) for objectives with regression terms
    # ``consistency_target``: the student's denoiser f_theta (trained) and its frozen target copy
    student: Denoiser | None = None
    target: Denoiser | None = None
    # ``stage_snapshot``: the student's denoiser as it was at the objective's snapshot step (frozen)
    snapshot: Denoiser | None = None

    @property
    def process(self) -> Process:
        return self.teacher.process


@dataclass
class ObjectiveParams:
    """Base for each objective's parameters: the fields are the accepted ``objective.*`` keys, declared
    like every config key with :func:`scoredistill.config.key` (range, choices, one-line doc; a plain
    default is checked by its annotation alone). :func:`build_objective` checks each given value against
    its declaration, so a bad value is one line naming ``objective.<key>`` and the accepted values;
    ``validate`` holds only the rules that tie several keys together (and normalises values)."""

    guidance_scale: float = key(1.0, "canonical CFG scale on the teacher (w = 1: unguided)")

    def validate(self) -> None:
        pass


class Objective:
    """Base class. Subclasses set ``name``, ``Params`` and implement the loss methods."""

    name: ClassVar[str] = "objective"
    Params: ClassVar[type] = ObjectiveParams
    # with requirement "rollout": the K-step student's re-noising modes (generator.rollout) it can train; None: any
    rollout_modes: ClassVar[tuple[str, ...] | None] = None
    # the generator-side time sampler when ``objective.time`` is not given: U[0.02, 0.98], the range of
    # DreamFusion's SDS (arXiv 2209.14988) and DMD2's code (arXiv 2405.14867); methods override it
    default_time: ClassVar[TimeSampler] = Uniform(t_min=0.02, t_max=0.98)
    # whether generator_loss reads ``batch.x`` (the generator's samples); consistency losses train the
    # student's denoiser on their own noisy points, so the engine skips the rollout and passes ``z``
    uses_generator_samples: ClassVar[bool] = True

    def __init__(self, params: ObjectiveParams, time: TimeSampler | None = None,
                 fake_time: TimeSampler | None = None):
        self.p = params
        self.time = time
        self.fake_time = fake_time

    # -- declaration -------------------------------------------------------------------------------
    def requirements(self) -> set[str]:
        return set()

    def differentiates_through(self) -> set[str]:
        """The roles (``teacher``, ``fake``, ``discriminator``) whose outputs the generator loss keeps on
        the autograd graph of ``x``; the engine freezes their parameters for the generator phase. Empty
        for a fully detached field (DMD, VSD, SDS); SiD-type losses read the teacher and the fake,
        GAN terms the fake and the discriminator."""
        return set()

    def path_plan(self) -> PathPlan | None:
        """``teacher_path``: the recording and backtracking schedule (see :class:`PathPlan`)."""
        return None

    def discriminator_arch(self) -> dict:
        """Keyword arguments of the ``discriminator`` head the engine builds (``width``, ``depth``)."""
        return {}

    def target_decay(self, step: int = 0) -> float:
        """``consistency_target``: the target's EMA rate for the update made at engine iteration ``step`` (0: an
        exact copy). A function of the iteration alone, so a resumed run continues the same schedule."""
        return 0.0

    def rollout_step(self, iteration: int, rollout: Any, seed: int) -> int | None:
        """``rollout``: the step ``k`` the K-step student trains at distillation iteration ``iteration`` (counted
        after the stages before distillation), or ``None`` for the student's seeded draw. ``rollout`` is the
        student's :class:`~scoredistill.models.rollout.Rollout`, ``seed`` the iteration's rollout seed. A function
        of its arguments alone, so every rank and micro-batch trains the same step and a resume continues the
        same schedule (Phased DMD's progressive schedule)."""
        return None

    def check_rollout(self, rollout: Any, iterations: int) -> None:
        """Raise a one-line :class:`ConfigError` if this objective cannot train the student's ``rollout`` in a run
        of ``iterations`` distillation iterations (called once, before training, for every K-step student and
        for objectives with the ``rollout`` requirement)."""

    def phase_split(self, times: list[float]) -> list[float]:
        """``experts``: the boundaries (canonical times, decreasing) that split a K-step student with step times
        ``times`` into phases, one expert each; raise a one-line :class:`ConfigError` for a split that does not
        fit those times."""
        raise NotImplementedError(f"objective {self.name} has no phases")

    def snapshot_step(self) -> int:
        """``stage_snapshot``: the generator step from which ``Roles.snapshot`` stays frozen (the engine copies
        the student into it after each generator update of an earlier step)."""
        return 0

    def check_teacher(self, teacher: Denoiser) -> None:
        """Raise a one-line :class:`ConfigError` if this objective cannot work with ``teacher`` (called once,
        before anything is written)."""

    def ode_guidance(self) -> float:
        """Canonical CFG scale of the teacher ODE that makes this objective's ``ode_pairs``."""
        return float(getattr(self.p, "guidance_scale", 1.0))

    # -- running state (checkpointed by both drivers) ----------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable running statistics (f-distill's ratio EMA); stored in ``meta.json``."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensor state (CDS's fixed per-item noise); stored in the checkpoint's safetensors."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    # -- schedulable hyper-parameters (the optimizer driver sets them each step) -------------------------
    def set_param(self, key: str, value: float) -> None:
        """Set ``objective.<key>`` to ``value`` (already canonical: see :func:`canonical_param`).
        ``time.t_min`` / ``fake_time.t_max`` address a field of a time sampler; an integer parameter
        is rounded."""
        if "." in key:
            attr, field = key.split(".", 1)
            setattr(self, attr, dataclasses.replace(getattr(self, attr), **{field: value}))
            return
        cur = getattr(self.p, key)
        if isinstance(cur, int) and not isinstance(cur, bool):
            value = int(round(value))
        setattr(self.p, key, value)

    # -- losses ------------------------------------------------------------------------------------
    def generator_loss(self, batch: Batch, roles: Roles) -> dict:
        raise NotImplementedError

    def auxiliary_losses(self, batch: Batch, roles: Roles) -> dict | None:
        """Loss for the auxiliary roles (fake score, discriminator); ``None`` if there are none."""
        return None

    # -- helpers -----------------------------------------------------------------------------------
    def sample_t(self, batch: Batch, process: Process, sampler: TimeSampler | None = None) -> torch.Tensor:
        sampler = sampler or self.time
        return sampler(batch.x.shape[0], process, generator=batch.rng, device=batch.x.device)


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    return cls


_TIME_KEYS = ("time", "fake_time")


def canonical_param(key: str, value, convention: str):
    """A guidance scale written in ``convention`` as the canonical ``w`` (``uncond + w (cond - uncond)``);
    every other parameter unchanged. Numbers and lists of numbers (a sampling range) are converted."""
    from scoredistill.process.guidance import canonical_scale

    if "guidance_scale" not in key:  # guidance_scale, fake_guidance_scale, guidance_scale_range, ...
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return canonical_scale(value, convention)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return [canonical_scale(v, convention) for v in value]
    return value


def build_objective(cfg: dict, guidance_convention: str = "canonical") -> Objective:
    """Build an objective from the ``objective`` section: ``name`` + the method's parameters.

    ``time`` / ``fake_time`` take a time-sampler spec (``{kind: uniform, t_min: .., t_max: ..}``).
    Guidance scales written in the ``cond_plus`` convention are converted here, once.
    """
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    import scoredistill.objectives  # noqa: F401  (registers built-in objectives)

    if name not in OBJECTIVES:
        raise ConfigError("objective.name", f"unknown value {name!r}; accepted: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    declared = keys(cls.Params)
    times = {k: cfg.pop(k) for k in _TIME_KEYS if k in cfg}
    for k in cfg:
        if k not in declared:
            accepted = ", ".join(sorted(list(declared) + list(_TIME_KEYS)))
            raise ConfigError(f"objective.{k}", f"unknown key for {name}; accepted: {accepted}")
    # ranges hold for canonical guidance scales, so the values are checked after the conversion
    cfg = {k: canonical_param(k, v, guidance_convention) for k, v in cfg.items()}
    for k, v in cfg.items():
        check_value(v, declared[k], f"objective.{k}")
    params = cls.Params(**cfg)
    params.validate()
    time = make_time_sampler(times.get("time"), "objective.time", cls.default_time)
    fake_time = make_time_sampler(times.get("fake_time"), "objective.fake_time",
                                  getattr(cls, "default_fake_time", None) or DEFAULT_FAKE_TIME)
    return cls(params, time=time, fake_time=fake_time)



# DMD2 trains the fake score on the whole noise range the generator field visits (uniform index on
# the Karras grid for EDM, arXiv 2405.14867 code); EDM weighting keeps small noise levels balanced.
DEFAULT_FAKE_TIME = Uniform(t_min=0.0, t_max=1.0)
