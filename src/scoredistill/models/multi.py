"""MSD: multi-student distillation as a generator architecture (arXiv 2410.23274; docs/objectives/msd.md).

The classes are partitioned into ``K`` contiguous blocks (student ``k`` owns classes
``c`` with ``c * K // C == k``); each student is its own :class:`MLPGenerator`, and every sample is
routed to the student that owns its label, in training and in sampling. Any objective trains it
unchanged (the recipe ``recipes/toy/msd.yaml`` uses DMD2): a student only receives gradients from
the samples of its own classes, which is MSD's "student k is trained only on its subset".

The fake score stays one class-conditional network: conditioning on the label already makes it a
separate score model per class, hence per student. The paper does not say whether it uses one fake
network per student (and no code is public). The teacher-score-matching initialisation for students
smaller than the teacher is not part of this module.
"""

from __future__ import annotations

import torch
from torch import nn

from scoredistill.models.denoiser import NULL_CLASS
from scoredistill.models.mlp import MLPGenerator


def partition(num_classes: int, students: int) -> torch.Tensor:
    """``owner[c]``: the student of class ``c`` (contiguous, balanced blocks)."""
    return torch.arange(num_classes) * students // num_classes


class MultiStudentGenerator(nn.Module):
    """``K`` one-step MLP students; ``G(z, c) = G_{owner(c)}(z, c)``."""

    # a student runs only for the samples of its classes, so which children run depends on the data; FSDP then
    # shards the whole generator as one unit (engine/fsdp.py), never student by student
    calls_children_conditionally = True

    def __init__(self, dim: int, width: int = 256, depth: int = 4, num_classes: int | None = None,
                 students: int = 2, emb_dim: int = 64):
        super().__init__()
        if not num_classes:
            raise ValueError("MultiStudentGenerator needs class labels (a class-conditional teacher)")
        if not 1 <= students <= num_classes:
            raise ValueError(f"students must be in [1, {num_classes}] (number of classes), got {students}")
        self.data_shape = (dim,)
        self.num_classes = num_classes
        self.students = students
        self.arch = dict(dim=dim, width=width, depth=depth, num_classes=num_classes, students=students,
                         emb_dim=emb_dim)
        self.nets = nn.ModuleList(MLPGenerator(dim, width, depth, num_classes, emb_dim) for _ in range(students))
        self.register_buffer("owner", partition(num_classes, students))

    def classes_of(self, k: int) -> list[int]:
        return [c for c in range(self.num_classes) if int(self.owner[c]) == k]

    def forward(self, z, cond=None):
        if cond is None or bool((cond == NULL_CLASS).any()):
            raise ValueError("MultiStudentGenerator routes by class: every sample needs a label")
        b = z.shape[0]
        who = self.owner.to(cond.device)[cond.long()]
        out = None
        for k, net in enumerate(self.nets):
            idx = (who == k).nonzero(as_tuple=True)[0]
            if len(idx) == 0:
                continue
            y = net(z[idx], cond[idx])
            if out is None:
                out = y.new_zeros((b,) + tuple(y.shape[1:]))
            out = out.index_copy(0, idx, y)
        return out if out is not None else z.new_zeros((b,) + self.data_shape)
