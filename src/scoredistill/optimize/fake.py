"""A fake score conditioned on the teacher's class *and* a view (the camera analogue of 3-D work).

:class:`ViewConditionedDenoiser` wraps an :class:`~scoredistill.models.mlp.MLPDenoiser` whose class
embedding indexes the joint label ``(class, view)``: ``cond`` is a ``(B, 2)`` LongTensor
``[class, view]`` with ``-1`` meaning null in either slot, so the fake can be trained with class and view
dropout independently and queried with a null view (ESD) or a null class (fake CFG).
A ``(B,)`` cond is read as the class with a null view.
"""

from __future__ import annotations

import torch

from scoredistill.models.denoiser import NULL_CLASS, Denoiser
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.process.processes import Process


class ViewConditionedDenoiser(Denoiser):
    takes_view = True

    def __init__(self, process: Process, data_shape: tuple[int, ...], num_classes: int | None,
                 num_views: int | None, width: int = 256, depth: int = 4, sigma_data: float = 1.0):
        super().__init__()
        self.process = process
        self.data_shape = tuple(data_shape)
        self.n_cls = int(num_classes or 0)
        self.n_views = int(num_views or 0)
        joint = (self.n_cls + 1) * (self.n_views + 1) - 1   # the all-null pair maps to the MLP's null
        dim = 1
        for k in self.data_shape:
            dim *= int(k)
        self.net = MLPDenoiser(process, dim, width, depth, num_classes=joint or None, sigma_data=sigma_data)
        self.sigma_data = float(sigma_data)
        self.num_classes = num_classes

    camera_view = None  # set by a 3D parameterization: the view id of each row of a (B, 4) camera cond

    def joint_label(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        if cond is None or self.net.num_classes is None:
            return None
        if cond.is_floating_point():  # a camera (3D runs, docs/3d.md): no class, the view from the camera
            null = torch.full((cond.shape[0],), NULL_CLASS, dtype=torch.long, device=cond.device)
            view = self.camera_view(cond).to(cond.device) if self.camera_view is not None else null
            cond = torch.stack([null, view], 1)
        cond = cond.long()
        if cond.dim() == 1:
            cond = torch.stack([cond, torch.full_like(cond, NULL_CLASS)], 1)
        c, v = cond[:, 0], cond[:, 1]
        c = torch.where(c < 0, torch.full_like(c, self.n_cls), c.clamp(max=self.n_cls))
        v = torch.where(v < 0, torch.full_like(v, self.n_views), v.clamp(max=self.n_views))
        j = c * (self.n_views + 1) + v
        return torch.where(j == self.net.num_classes, torch.full_like(j, NULL_CLASS), j)

    def denoise(self, x_t, t, cond=None):
        b = x_t.shape[0]
        out = self.net(x_t.reshape(b, -1), t, self.joint_label(cond))
        return out.reshape(x_t.shape)
