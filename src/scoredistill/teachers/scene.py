"""Exact-render teachers: 3D scenes whose denoiser is known in closed form (the 3D test oracle).

Given scenes ``k = 1..K`` of Gaussian splats with weights ``w_k``, the data distribution at camera
``c`` is ``p_c(x0) = sum_k w_k N(x0; R_k(c), s^2 I)`` with ``R_k(c)`` the render of scene ``k`` from
``c`` on the [-1, 1] scale (``2 image - 1``, a fixed background). Under any process
``x_t = a x0 + sigma eps`` it is a Gaussian mixture with per-camera means, so the x0-denoiser is the
exact posterior mean
``E[x0 | x_t, c] = sum_k r_k (R_k + a s^2 / (a^2 s^2 + sigma^2) (x_t - a R_k))`` with
responsibilities ``r_k ∝ w_k N(x_t; a R_k, (a^2 s^2 + sigma^2) I)``, and the true 3D answer is
known (DreamFusion 2209.14988 distils exactly such per-view denoisers into one 3D scene; with two
scenes chosen independently per view the teacher is view-inconsistent, the setting of
ProlificDreamer 2305.16213's multi-particle claim).

**Janus teachers** (``janus: beta``): a view-inconsistent prior, the situation that makes text-to-3D
grow a face on every side (the Janus problem, DreamFusion 2209.14988 §3 / ProlificDreamer 2305.16213):
at camera ``c`` each scene ``k`` contributes two components, its true view ``R_k(c)`` with weight
``(1 - beta) w_k`` and its *front face* ``F_k(c)`` — the render from the same elevation, distance and
field of view at azimuth 0, i.e. the scene turned to face the camera — with weight ``beta w_k``
(2D priors draw mostly front views). ``janus_labels: true`` models a teacher that reads the view
phrase of the prompt (DreamFusion's view-dependent conditioning): for views labelled side or back it
keeps only the true view; front and overhead views keep the mixture (an overhead phrase says nothing
about the azimuth). The denoiser stays exact (a mixture of ``2K`` Gaussians per camera).

Conditioning: the camera is the condition. A batch carries one camera per item as ``cond``, the
``(B, 4)`` float tensor ``[elevation_deg, azimuth_deg, distance, fov_deg]`` of
:meth:`scoredistill.splat.cameras.Cameras.as_cond`. There is no class or text condition, so
classifier-free guidance is the identity (:meth:`SceneTeacher.guided` ignores ``w``).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from scoredistill.errors import ConfigError, check_keys
from scoredistill.models.denoiser import Denoiser, expand_t
from scoredistill.process.processes import EDM, Process
from scoredistill.splat.cameras import Cameras, view_labels
from scoredistill.splat.gaussians import GaussianSplats
from scoredistill.splat.presets import PRESETS, preset_scene
from scoredistill.splat.render import render

__all__ = ["SceneTeacher", "build_scene_teacher", "mixture_posterior", "preset_scene", "PRESETS"]


def mixture_posterior(x: torch.Tensor, t, means: torch.Tensor, logw: torch.Tensor, std: float,
                      process: Process) -> tuple[torch.Tensor, torch.Tensor]:
    """Responsibilities ``r (B, M)`` and per-component posterior means ``(B, M, D)`` of
    ``x0 ~ sum_m w_m N(means_m, std^2 I)`` given ``x = a x0 + sigma eps`` (``x (B, D)`` float64; the
    module docstring's formula; ``std = 0`` is a mixture of Diracs)."""
    b = x.shape[0]
    t = expand_t(t, b, x.device)
    a = process.alpha(t)[:, None]  # (B,1)
    s = process.sigma(t)[:, None]
    var = a * a * std**2 + s * s  # (B,1), shared by every component
    diff = x[:, None, :] - a[:, :, None] * means  # (B,M,D)
    logp = logw - 0.5 * (diff * diff).sum(-1) / var
    r = torch.softmax(logp, 1)
    post = means + (a * std**2 / var)[:, :, None] * diff
    return r, post


class SceneTeacher(Denoiser):
    """Mixture of ``K`` scenes rendered at each item's camera (see the module docstring).

    ``scenes`` GaussianSplats (frozen), ``weights`` positive (normalised), ``std`` the per-pixel
    width ``s`` on the [-1, 1] scale, images ``(3, height, width)``, ``background`` the RGB in [0, 1]
    behind every scene.
    """

    takes_camera = True  # cond is the (B, 4) camera tensor (optimize/splats.py sends it)

    def __init__(self, scenes: list[GaussianSplats], weights=None, std: float = 0.03, height: int = 64,
                 width: int = 64, process: Process | None = None, background=(0.5, 0.5, 0.5),
                 names: list[str] | None = None, janus: float = 0.0, janus_labels: bool = False):
        super().__init__()
        if not (isinstance(janus, (int, float)) and 0 <= janus < 1):
            raise ConfigError("teacher.janus", f"must be a number in [0, 1), got {janus!r}")
        self.janus = float(janus)
        self.janus_labels = bool(janus_labels)
        if not scenes:
            raise ConfigError("teacher.scenes", "missing or empty; give preset names "
                              f"({', '.join(sorted(PRESETS))}) or 3DGS .ply paths")
        k = len(scenes)
        if weights is None:
            weights = [1.0] * k
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or not bool((weights > 0).all()) or not bool(torch.isfinite(weights).all()):
            raise ConfigError("teacher.weights", f"needs one positive weight per scene ({k})")
        if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
            raise ConfigError("teacher.std", f"must be a number > 0, got {std!r}")
        self.scenes = nn.ModuleList(scenes)
        self.scenes.requires_grad_(False)
        self.register_buffer("weights", weights / weights.sum())
        self.std = float(std)
        self.height, self.width = height, width
        self.register_buffer("background", torch.as_tensor(background, dtype=torch.float32).reshape(3))
        self.process = process or EDM()
        self.data_shape = (3, height, width)
        self.num_classes = None
        self.names = list(names) if names is not None else [f"scene{i}" for i in range(k)]
        self._cache: dict[bytes, torch.Tensor] = {}

    @property
    def num_scenes(self) -> int:
        return len(self.scenes)

    @property
    def dim(self) -> int:
        return 3 * self.height * self.width

    @torch.no_grad()
    def renders(self, cond: torch.Tensor) -> torch.Tensor:
        """``(B, K, 3, H, W)`` float64 renders on the [-1, 1] scale of every scene at every camera;
        recent results are reused (a step often asks twice for the same cameras)."""
        cams = Cameras.from_cond(cond.detach())
        key = cond.detach().double().cpu().numpy().tobytes()
        if key in self._cache:
            return self._cache[key]
        out = torch.stack([render(s, cams, self.height, self.width, self.background).images
                           for s in self.scenes], 1)
        out = (2 * out.double() - 1)
        if len(self._cache) >= 4:
            self._cache.clear()
        self._cache[key] = out
        return out

    def front_renders(self, cond: torch.Tensor) -> torch.Tensor:
        """``(B, K, 3, H, W)``: every scene turned to face each camera (the camera moved to azimuth 0)."""
        front = cond.detach().clone()
        front[:, 1] = 0
        return self.renders(front)

    def components(self, cond: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(means (B, M, D), log weights (B, M))`` of the mixture at each camera: the ``K`` scenes,
        then (Janus teachers) their ``K`` front faces."""
        b = cond.shape[0]
        means = self.renders(cond).to(device).reshape(b, self.num_scenes, -1)
        logw = self.weights.log().to(device)[None].expand(b, -1)
        if self.janus == 0:
            return means, logw
        beta = torch.full((b, 1), self.janus, dtype=torch.float64, device=device)
        if self.janus_labels:
            told = [lab in ("side", "back") for lab in view_labels(Cameras.from_cond(cond.detach().cpu()))]
            beta[torch.tensor(told, device=device)] = 0.0
        front = self.front_renders(cond).to(device).reshape(b, self.num_scenes, -1)
        logw = torch.cat([logw + torch.log1p(-beta), logw + beta.log()], 1)  # log 0 = -inf: component off
        return torch.cat([means, front], 1), logw

    def _posterior(self, x_t, t, cond):
        if cond is None:
            raise ConfigError("cond", "the scene teacher needs the cameras as cond: a (B, 4) tensor "
                              "[elevation, azimuth, distance, fov] (Cameras.as_cond())")
        x = x_t.reshape(x_t.shape[0], -1).double()
        means, logw = self.components(cond, x.device)  # (B,M,D), (B,M)
        return mixture_posterior(x, t, means, logw, self.std, self.process)

    def denoise(self, x_t, t, cond=None):
        r, post = self._posterior(x_t, t, cond)
        return (r[:, :, None] * post).sum(1).to(x_t.dtype).reshape(x_t.shape)

    def responsibilities(self, x_t, t, cond) -> torch.Tensor:
        """``(B, M)`` posterior component probabilities (which scene a noisy view came from; Janus
        teachers: the ``K`` true views, then the ``K`` front faces)."""
        return self._posterior(x_t, t, cond)[0]

    def guided(self, x_t, t, cond, w):
        return self.denoise(x_t, t, cond)

    def log_prob(self, x_t, t, cond) -> torch.Tensor:
        """``log p_t(x_t | c)`` (float64), for tests and diagnostics."""
        b = x_t.shape[0]
        x = x_t.reshape(b, -1).double()
        means, logw = self.components(cond, x.device)
        t = expand_t(t, b, x.device)
        a = self.process.alpha(t)[:, None]
        s = self.process.sigma(t)[:, None]
        var = a * a * self.std**2 + s * s
        diff = x[:, None, :] - a[:, :, None] * means
        logp = logw - 0.5 * self.dim * (2 * math.pi * var).log() - 0.5 * (diff * diff).sum(-1) / var
        return torch.logsumexp(logp, 1)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None, return_components: bool = False):
        """Exact samples ``x0 ~ p_c`` for each camera of ``cond``, drawn on the CPU (seeded)."""
        n = cond.shape[0]
        means, logw = self.components(cond, torch.device("cpu"))
        k = torch.multinomial(logw.exp(), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (means[torch.arange(n), k] + self.std * z).float().reshape(n, *self.data_shape)
        return (x, k) if return_components else x

    def describe(self) -> dict:
        return {"kind": "scene", "scenes": self.names, "weights": self.weights.tolist(), "std": self.std,
                "resolution": [self.height, self.width], "background": self.background.tolist(),
                "janus": self.janus, "janus_labels": self.janus_labels, "process": self.process.describe()}


SCENE_KEYS = ("kind", "scenes", "weights", "std", "resolution", "background", "janus", "janus_labels", "process")


def load_scene(entry, field: str) -> GaussianSplats:
    """A preset name or a path to a 3DGS PLY file."""
    if not isinstance(entry, (str, os.PathLike)):
        raise ConfigError(field, f"must be a preset name ({', '.join(sorted(PRESETS))}) or a .ply path, "
                          f"got {entry!r}")
    entry = os.fspath(entry)
    if entry in PRESETS:
        return preset_scene(entry, field)
    if entry.lower().endswith(".ply"):
        if not os.path.exists(entry):
            raise ConfigError(field, f"file not found: {entry}")
        return GaussianSplats.from_ply(entry)
    return preset_scene(entry, field)


def build_scene_teacher(cfg: dict, process: Process) -> SceneTeacher:
    """Build from ``teacher: {kind: scene, scenes: [...], weights, std, resolution, background}``
    (``process`` built by the caller). ``resolution`` an integer or ``[height, width]``."""
    check_keys(cfg, SCENE_KEYS, "teacher")
    scenes = cfg.get("scenes")
    if scenes is None or (isinstance(scenes, (list, tuple)) and not scenes):
        raise ConfigError("teacher.scenes", "missing or empty; give preset names "
                          f"({', '.join(sorted(PRESETS))}) or 3DGS .ply paths")
    if isinstance(scenes, str):
        scenes = [scenes]
    if not isinstance(scenes, (list, tuple)):
        raise ConfigError("teacher.scenes", f"must be a list of preset names or .ply paths, got {scenes!r}")
    splats = [load_scene(s, f"teacher.scenes[{i}]") for i, s in enumerate(scenes)]
    weights = cfg.get("weights")
    if weights is not None and (not isinstance(weights, (list, tuple)) or len(weights) != len(scenes)
                                or any(not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0
                                       for w in weights)):
        raise ConfigError("teacher.weights", f"needs one number > 0 per scene ({len(scenes)}), got {weights!r}")
    res = cfg.get("resolution", 64)
    if isinstance(res, int) and not isinstance(res, bool):
        res = [res, res]
    if (not isinstance(res, (list, tuple)) or len(res) != 2
            or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in res)):
        raise ConfigError("teacher.resolution", f"must be an integer >= 1 or [height, width], got {res!r}")
    bg = cfg.get("background", [0.5, 0.5, 0.5])
    if isinstance(bg, (int, float)) and not isinstance(bg, bool):
        bg = [bg] * 3
    if (not isinstance(bg, (list, tuple)) or len(bg) != 3
            or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1 for v in bg)):
        raise ConfigError("teacher.background", f"must be an RGB triple in [0, 1], got {bg!r}")
    names = [os.fspath(s) for s in scenes]
    janus_labels = cfg.get("janus_labels") or False
    if not isinstance(janus_labels, bool):
        raise ConfigError("teacher.janus_labels", f"must be true or false, got {janus_labels!r}")
    janus = cfg.get("janus") or 0.0
    if isinstance(janus, bool):
        raise ConfigError("teacher.janus", f"must be a number in [0, 1), got {janus!r}")
    return SceneTeacher(splats, weights, cfg.get("std", 0.03), res[0], res[1], process, bg, names, janus, janus_labels)
