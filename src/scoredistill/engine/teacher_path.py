"""The ``teacher_path`` requirement (DisBack, arXiv 2408.15991; docs/objectives/disback.md): the recorded
checkpoints ``s_1..s_N`` of the fake score's fine-tuning away from the teacher ``s_0``, and the frozen network
that plays the real score while the path is walked back.

Checkpoint ``s_k`` is ``RUN/teacher_path/s_<k>.safetensors`` (written atomically by the main process; every
process reads it back), or kept in memory for a run without a folder. The training checkpoints record which
``k`` exist; a resumed run re-records the later ones exactly, so a kill at any point resumes bit for bit.
"""

from __future__ import annotations

import copy
import os

import torch
from safetensors.torch import load_file, save

from scoredistill.engine.io import CheckpointError
from scoredistill.fileio import atomic_file
from scoredistill.models.denoiser import Denoiser
from scoredistill.objectives.base import PathPlan

FOLDER = "teacher_path"


class TeacherPath:
    def __init__(self, plan: PathPlan, teacher: Denoiser, fake: Denoiser, run_dir: str | None,
                 is_main: bool = True, barrier=lambda: None):
        self.plan = plan
        self.teacher = teacher
        self.folder = os.path.join(run_dir, FOLDER) if run_dir is not None else None
        self.is_main = is_main
        self.barrier = barrier
        self.net = copy.deepcopy(fake).requires_grad_(False).eval()
        self.loaded: int | None = None  # which s_k self.net holds
        self.recorded: list[int] = []
        self._memory: dict[int, dict[str, torch.Tensor]] = {}

    def file(self, k: int) -> str:
        return os.path.join(self.folder, f"s_{k:03d}.safetensors")

    def record(self, k: int, fake: Denoiser) -> None:
        """Store the fake score's current weights as ``s_k`` (a collective under several processes)."""
        state = {n: v.detach().to("cpu", copy=True).contiguous() for n, v in fake.state_dict().items()}
        if self.folder is None:
            self._memory[k] = state
        elif self.is_main:
            with atomic_file(self.file(k), "wb") as f:
                f.write(save(state, metadata={"path_index": str(k)}))
        self.barrier()
        self.recorded = sorted(set(self.recorded) | {k})
        if self.loaded == k:
            self.loaded = None

    def network(self, k: int) -> Denoiser:
        """The real score at path index ``k``: the teacher for ``k = 0``, else ``s_k``."""
        if k == 0:
            return self.teacher
        if self.loaded != k:
            if k not in self.recorded:
                raise CheckpointError(f"teacher path checkpoint s_{k} was never recorded")
            self.net.load_state_dict(self._memory[k] if self.folder is None else load_file(self.file(k)))
            self.loaded = k
        return self.net

    def state_dict(self) -> dict:
        return {"recorded": list(self.recorded),
                "files": [os.path.basename(self.file(k)) for k in self.recorded] if self.folder else []}

    def load_state_dict(self, state: dict) -> None:
        self.recorded = [int(k) for k in state.get("recorded", [])]
        self.loaded = None
        if self.folder is not None:
            missing = [k for k in self.recorded if not os.path.isfile(self.file(k))]
            if missing:
                raise CheckpointError(f"teacher path checkpoints {missing} are missing from {self.folder}")
