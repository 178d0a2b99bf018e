"""A fake score conditioned on the teacher's class *and* a view (the camera analogue of 3-D work).

:class:`ViewConditionedDenoiser` wraps an :class:`~scoredistill.models.mlp.MLPDenoiser` whose class
embedding indexes the joint label ``(class, view)``: ``cond`` is a ``(B, 2)`` LongTensor
``[class, view]`` with ``-1`` meaning null in either slot, so the fake can be trained with class and view
dropout independently and queried with a null view (ESD) or a null class (fake CFG).
A ``(B,)`` cond is read as the class with a null view.

With ``camera=True`` (``fake_score.camera``) the fake also reads the camera itself, as ProlificDreamer
(arXiv 2305.16213) does: the flattened 4x4 camera-to-world matrix (16-d,
:meth:`~scoredistill.splat.cameras.Cameras.features`) goes through an MLP ``16 -> emb -> emb`` whose output
is added to the network's time/class embedding; its last layer starts at zero, so at construction the fake
is the label-conditioned one. Its ``cond`` is then ``(B, 6)`` ``[class, view, elevation, azimuth, distance,
fov]`` (:func:`scoredistill.objectives.esd.fake_condition`) or a ``(B, 4)`` camera teacher's condition; a
null camera row (distance ``<= 0``: dropped with the view, ESD's view-marginal branch, arXiv 2401.00909)
adds nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from scoredistill.adapters.lora import LoRACritic
from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import NULL_CLASS, Denoiser
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.process.processes import Process
from scoredistill.splat.cameras import COND_DIM, Cameras
from scoredistill.teachers.scene import mixture_posterior


class ViewConditionedDenoiser(Denoiser):
    takes_view = True

    def __init__(self, process: Process, data_shape: tuple[int, ...], num_classes: int | None,
                 num_views: int | None, width: int = 256, depth: int = 4, sigma_data: float = 1.0,
                 camera: bool = False):
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
        self.camera_mlp = camera_mlp(self.net.arch["emb_dim"]) if camera else None  # built last: same init

    @property
    def takes_camera(self) -> bool:
        return self.camera_mlp is not None

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
        camera = cond[:, -COND_DIM:] if cond is not None and cond.is_floating_point() else None
        if camera is not None and cond.shape[-1] == 2 + COND_DIM:  # [class, view, camera]: labels + camera
            cond = cond[:, :2].long()
        emb = camera_embedding(self.camera_mlp, camera)
        out = self.net.denoise(x_t.reshape(b, -1), t, self.joint_label(cond), emb=emb)
        return out.reshape(x_t.shape)


def split_camera(cond: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A ``(B, 6)`` ``[prompt or class, view, camera]`` condition as its ``(B, 2)`` labels and ``(B, 4)``
    camera; any other condition is returned with no camera."""
    if cond is not None and cond.is_floating_point() and cond.dim() == 2 and cond.shape[1] == 2 + COND_DIM:
        return cond[:, :2].long(), cond[:, 2:]
    return cond, None


def camera_mlp(width: int) -> nn.Sequential:
    """ProlificDreamer's camera embedding ``16 -> width -> width`` (arXiv 2305.16213), last layer zero so a
    fresh one adds nothing."""
    mlp = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def camera_embedding(mlp: nn.Module | None, camera: torch.Tensor | None) -> torch.Tensor | None:
    """``mlp`` of the flattened camera-to-world matrices of the ``(B, 4)`` camera rows; a null row
    (distance ``<= 0``, a dropped camera) gets zero. ``None`` without a camera MLP or a camera."""
    if mlp is None or camera is None:
        return None
    w = mlp[0].weight
    live = camera[:, 2] > 0
    # a null row's "camera" is no camera: zero features (not its matrix) keep its gradients finite
    safe = torch.where(live[:, None], camera.detach(), torch.tensor([0.0, 0.0, 1.0, 50.0], device=camera.device))
    feats = Cameras.from_cond(safe.float()).features().to(device=w.device, dtype=w.dtype)
    feats = feats * live[:, None].to(feats)
    return torch.where(live[:, None].to(w.device), mlp(feats), torch.zeros((), device=w.device, dtype=w.dtype))


def build_lora_fake(teacher, fc: dict, plain_prompt: int | None, camera: bool = False) -> Denoiser:
    """``fake_score.kind: lora``: ProlificDreamer's fake score (arXiv 2305.16213), a LoRA on the
    teacher's own network (:class:`~scoredistill.adapters.lora.LoRACritic`: adapters off = teacher, on =
    fake), reading the view through the view-dependent prompt (:class:`ViewPromptLoRA`)."""
    from scoredistill.adapters.diffusers_teacher import is_diffusers_denoiser

    if not is_diffusers_denoiser(teacher):
        raise ConfigError("fake_score.kind", "'lora' needs a diffusers teacher (teacher.kind: diffusers); "
                          "accepted here: mlp")
    return ViewPromptLoRA(teacher, fc["lora_rank"], fc["lora_alpha"], plain_prompt, camera=camera)


class ViewPromptLoRA(LoRACritic):
    """A LoRA fake score whose condition ``[prompt, view]`` (``-1`` = dropped) becomes a prompt index
    of the view table of :func:`scoredistill.optimize.splats.view_prompt_section`: a dropped prompt is
    the unconditional branch, a dropped view the plain (view-free) prompt, else the view prompt. So
    VSD's fake is view-conditioned and ESD's view-marginal branch (arXiv 2401.00909) is the view-free
    prompt. With ``camera=True`` (``fake_score.camera``) it also reads the camera as ProlificDreamer does:
    the condition is ``(B, 6)`` ``[prompt, view, camera]`` and the camera MLP's output (zero at
    construction, :func:`camera_mlp`) is added to the UNet's time embedding by a forward hook on
    ``unet.time_embedding`` that is live only during the fake's own forward, so the teacher (adapters off)
    is unchanged; a dropped view drops the camera too."""

    takes_view = True

    def __init__(self, teacher, rank: int, alpha: float | None, plain_prompt: int | None, camera: bool = False):
        super().__init__(teacher, rank, alpha)
        self.plain_prompt = plain_prompt
        self.camera_mlp = None
        self._camera_emb = None
        if camera:
            temb = getattr(teacher.model, "time_embedding", None)
            if temb is None or not hasattr(temb, "linear_2"):
                raise ConfigError("fake_score.camera", f"true needs a UNet with a time embedding; "
                                  f"{type(teacher.model).__name__} has none; accepted here: false")
            self.camera_mlp = camera_mlp(temb.linear_2.out_features)
            temb.register_forward_hook(self._add_camera)

    def _add_camera(self, module, args, out):
        emb = self._camera_emb
        return out if emb is None else out + emb.to(out.dtype)

    def _with_camera(self, fn, x_t, t, cond):
        labels, camera = split_camera(cond)
        self._camera_emb = camera_embedding(self.camera_mlp, camera)
        try:
            return fn(x_t, t, self.prompt_index(labels))
        finally:  # the teacher shares the UNet: its own calls never see the fake's camera
            self._camera_emb = None

    def prompt_index(self, cond):
        if cond is None or cond.dim() == 1:
            return cond
        c, v = cond[:, 0].long(), cond[:, 1].long()
        if self.plain_prompt is None:  # no view phrases: the view cannot reach the text condition
            return c
        return torch.where((c >= 0) & (v < 0), torch.full_like(c, self.plain_prompt), c)

    def denoise(self, x_t, t, cond=None):
        return self._with_camera(super().denoise, x_t, t, cond)

    def model_output(self, x_t, t, cond=None):
        return self._with_camera(super().model_output, x_t, t, cond)


class ParticleMixtureScore(Denoiser):
    """``fake_score.kind: particles``: the optimum of VSD's fake-score training in closed form for
    splat particles under a camera-conditioned teacher (ProlificDreamer, arXiv 2305.16213, trains a
    camera-conditioned LoRA towards it). The particles' distribution at camera ``c`` is
    ``q_c = (1/P) sum_p N(R_p(c), std^2 I)`` (``R_p(c)`` what the teacher sees of particle ``p``,
    rendered afresh at every call, detached; ``std = 0``: the particles themselves), so its denoiser is
    the exact posterior mean ``sum_p r_p (R_p + a std^2 / (a^2 std^2 + s^2) (x_t - a R_p))`` of the
    exact-render teacher's formula (:func:`~scoredistill.teachers.scene.mixture_posterior`). It has no
    parameters and no training steps: VSD's field is then exact up to the Monte-Carlo draw of ``t``,
    the noise and the cameras."""

    takes_view = False  # it reads the camera itself (cond), not the view label

    def __init__(self, param, process: Process, std: float = 0.0):
        super().__init__()
        if not hasattr(param, "particle_renders"):
            raise ConfigError("fake_score.kind", "'particles' needs params.kind: splats under a scene teacher "
                              "(teacher.kind: scene); accepted here: mlp")
        self._param = [param]  # not a submodule: the particles are the optimizer's, not the fake's
        self.process = process
        self.data_shape = (param.channels, *param.teacher_size)
        self.std = float(std)

    @torch.no_grad()
    def denoise(self, x_t, t, cond=None):
        if cond is None or not cond.is_floating_point() or cond.shape[-1] != 4:
            raise ConfigError("fake_score.kind", "'particles' needs the camera as the condition "
                              "(teacher.kind: scene); accepted here: mlp")
        means = self._param[0].particle_renders(cond).to(x_t.device)
        logw = torch.zeros(means.shape[:2], dtype=torch.float64, device=x_t.device)
        r, post = mixture_posterior(x_t.reshape(len(x_t), -1).double(), t, means, logw, self.std, self.process)
        return (r[:, :, None] * post).sum(1).to(x_t.dtype).reshape(x_t.shape)


def camera_fake(param, fc: dict) -> bool:
    """``fake_score.camera``: checked against the run and, when true, the splats' view rows set to carry
    their camera (the fake reads it with the view, and drops it with the view)."""
    if not fc["camera"]:
        return False
    if not hasattr(param, "view_camera") or param.view_space() is None:
        raise ConfigError("fake_score.camera", "true needs params.kind: splats with splats.view labels or particle; "
                          "accepted here: false")
    param.view_camera = True
    return True
