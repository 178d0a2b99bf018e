"""DisBack: distribution backtracking (arXiv 2408.15991; docs/objectives/disback.md).

Stage 1 ("degradation recording") fine-tunes a copy of the teacher score ``s_0`` on samples of the
*initial* generator with the denoising loss and keeps checkpoints ``s_1, ..., s_N`` along the way: a path
from the teacher's score to (an estimate of) the initial generator's score. Stage 2 ("backtracking") is
DMD2 (arXiv 2405.14867) whose real score walks that path backwards, ``s_{N-1}, ..., s_1, s_0``, so that
the generator is first pulled toward distributions close to its own and reaches the teacher's last;
the fake score starts at the degraded end ``s_N``. The generator field is DMD's
``g = (D_fake(x_t) - D_{s_k}(x_t)) / mean|x - D_{s_k}(x_t)|`` with ``s_k`` the current path checkpoint.

Everything stage-specific is the engine's ``teacher_path`` requirement (objectives/base.py
:class:`~.base.PathPlan`): the objective only declares the schedule and is DMD2 in every call.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoredistill.config import key
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import PathPlan, register
from scoredistill.objectives.dmd import DMD2, DMD2Params


@dataclass
class DisBackParams(DMD2Params):
    path_checkpoints: int = key(4, "N: checkpoints s_1..s_N recorded in stage 1 (s_0 is the teacher)", lo=1,
                                hi=1000)
    record_steps: int = key(60, "stage 1: iterations fine-tuning the teacher's copy on the initial generator's "
                            "samples (>= path_checkpoints)", lo=1, hi=10**9, unit="steps")
    hold_steps: int = key(100, "stage 2: iterations on each of s_{N-1}..s_1 before the teacher s_0 takes over",
                          lo=1, hi=10**9, unit="steps")

    def validate(self):
        super().validate()
        if self.record_steps < self.path_checkpoints:
            raise ConfigError("objective.record_steps", f"must be >= objective.path_checkpoints "
                              f"({self.path_checkpoints}): one checkpoint per recording iteration at most, got "
                              f"{self.record_steps}")


@register
class DisBack(DMD2):
    name = "disback"
    Params = DisBackParams

    def requirements(self):
        return super().requirements() | {"teacher_path"}

    def path_plan(self) -> PathPlan:
        return PathPlan(self.p.path_checkpoints, self.p.record_steps, self.p.hold_steps)
