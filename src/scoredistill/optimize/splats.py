"""3D Gaussian splats as a parameterization of the optimizer (``params.kind: splats``, docs/3d.md).

``P`` particles (splat sets, ``params.n``; ProlificDreamer arXiv 2305.16213 §3 optimizes several 3D
particles under VSD) are rendered every step from random orbit cameras (DreamFusion arXiv 2209.14988
§3: elevation / azimuth / distance / FOV drawn uniformly in ``splats.cameras``), ``params.repeat``
views per particle. A render is ``x = 2 image - 1`` (the teacher's [-1, 1] scale); its ``cond`` is the
``(B, 4)`` camera tensor ``[elevation, azimuth, distance, fov]`` (what a camera-conditioned teacher
reads) and its ``view`` the view label id (0 front, 1 side, 2 back, 3 overhead, threestudio's
thresholds) that a view-conditioned fake score (VSD / ESD) reads; ``splats.view: particle`` uses the
particle index instead, ``none`` no view.

**What the teacher sees** (:func:`build_splats` reads it from the teacher): an RGB teacher gets ``x``
as is; a one-channel teacher (the bundled MNIST UNet) the channel mean; a latent diffusion teacher (SD1.x /
SD2.x, SDXL, SD3) the VAE encoding of the render, differentiably (the latent distribution's mean, scaled
as the pipeline does; threestudio encodes the 512x512 render the same way and samples). The teacher's
``cond``: the camera for an exact-render teacher; for a text teacher the index of the view-dependent
prompt ``"{prompt}, {front|side|back|overhead} view"`` (DreamFusion §3; threestudio's thresholds, see
:func:`view_prompt_section`); for a class-conditional teacher the particle's class (``params.classes``).

Cameras (and random background colours) are drawn in :meth:`sample_index` from the driver's seeded
generator, so a resumed run draws the same ones. Optimizer groups: one per parameter kind and particle,
each with its own rate (``splats.lr``, DreamGaussian arXiv 2309.16653 defaults); a ``train.lr``
schedule scales every group by ``lr(step) / lr(0)``. Densify-and-prune (3DGS arXiv 2308.04079, the
3DGS text-to-3D recipe) runs on its schedule after the optimizer step of :meth:`after_step`, with the
Adam moments remapped to the new rows; the Gaussian counts and the densifiers' statistics are part of
the module's state, so a checkpoint taken after densification resumes exactly.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from scoredistill.errors import ConfigError
from scoredistill.optimize.params import Parameterization, Rendered
from scoredistill.splat.cameras import VIEWS, CameraRanges, Cameras, sample_cameras, turntable, view_labels
from scoredistill.splat.gaussians import PARAM_NAMES, Densifier, DensifyConfig, GaussianSplats, remap_adam_state
from scoredistill.splat.render import LearnedBackground, render

# DreamGaussian's rates (2309.16653, configs/text.yaml): position 1e-3, colour 1e-2, opacity 5e-2,
# scales 5e-3, rotations 5e-3; degree-1 SH at 1/20 of the colour rate as 3DGS does
DEFAULT_LR = {"means": 1e-3, "log_scales": 5e-3, "quats": 5e-3, "opacity_logits": 5e-2, "sh_dc": 1e-2,
              "sh_rest": 5e-4}
VIEW_MODES = ("labels", "particle", "none")
BACKGROUNDS = ("teacher", "white", "black", "random", "learned")
FIXED_BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
DENSIFY_STATE = ("grad_accum", "denom", "max_radii")


def initial_scene(sc: dict, seed: int) -> GaussianSplats:
    init = sc["init"]
    kw = {"opacity": sc["opacity"], "sh_degree": sc["sh_degree"]}
    if init == "sphere":
        return GaussianSplats.sphere(sc["count"], sc["radius"], seed, **kw)
    if init == "ball":
        return GaussianSplats.ball(sc["count"], sc["radius"], seed, **kw)
    if not os.path.exists(init):
        raise ConfigError("splats.init", f"file not found: {init}")
    return GaussianSplats.from_ply(init, sc["sh_degree"])


def view_prompt_section(tcfg: dict, splats: dict | None) -> dict:
    """The teacher section a splats run builds a text teacher from: its one prompt ``p`` becomes the
    table ``[p + ", front view", ", side view", ", back view", ", overhead view", p]`` (prompt index =
    view label id; index 4, the plain prompt, is what a view-free fake score reads). Other teachers,
    and ``splats.view_prompts: false``, keep their section."""
    if tcfg.get("kind") != "diffusers" or tcfg.get("prompts") is None or not (splats or {}).get("view_prompts", True):
        return tcfg
    from scoredistill.adapters.families import read_prompts

    prompts = read_prompts(tcfg["prompts"])
    if len(prompts) != 1:
        raise ConfigError("teacher.prompts", f"params.kind: splats optimizes one object under one prompt (the view "
                          f"phrases are appended per camera); got {len(prompts)} prompts")
    return {**tcfg, "prompts": [f"{prompts[0]}, {v} view" for v in VIEWS] + prompts}


class SplatParticles(Parameterization):
    kind = "splats"

    def __init__(self, scenes: list[GaussianSplats], height: int, width: int, ranges: CameraRanges,
                 background: str, teacher_background, repeat: int = 1, view: str = "labels",
                 densify: DensifyConfig | None = None, lr: dict | None = None, seed: int = 0, *,
                 cond_mode: str = "camera", classes: torch.Tensor | None = None, channels: int = 3,
                 encoder=None, plain_prompt: int | None = None, render_size: int | None = None):
        super().__init__(classes, None)
        self.cond_mode = cond_mode          # camera | views (text prompt per view label) | class | none
        self.channels = int(channels)
        self._encoder = [encoder]           # the teacher's DiffusersAssets (VAE): not a submodule
        self.plain_prompt = plain_prompt    # a text teacher's view-free prompt index (view-free fake)
        self.teacher_size = (int(height), int(width))
        if render_size is not None:
            height = width = int(render_size)
        if view not in VIEW_MODES:
            raise ConfigError("splats.view", f"unknown value {view!r}; accepted: {', '.join(VIEW_MODES)}")
        self.scenes = nn.ModuleList(scenes)
        self.num_items = len(scenes)
        self.height, self.width = int(height), int(width)
        self.ranges = ranges
        self.repeat = int(repeat)
        self.view_mode = view
        self.background_kind = background
        self.register_buffer("bg_color", torch.as_tensor(teacher_background, dtype=torch.float32).reshape(3))
        self.learned_bg = LearnedBackground(self.bg_color.tolist()) if background == "learned" else None
        self.lr = {**DEFAULT_LR, **(lr or {})}
        self.densify_cfg = densify
        self.densifiers = [Densifier(densify, s.num, seed + 31 * i) for i, s in enumerate(scenes)] if densify else []
        self._pending: tuple[torch.Tensor, Cameras, torch.Tensor | None] | None = None
        self._tracked: list = []
        self._optimizer = None

    # -- views ------------------------------------------------------------------------------------------
    def view_space(self) -> int | None:
        return {"labels": len(VIEWS), "particle": self.num_items, "none": None}[self.view_mode]

    view_camera = False  # fake_score.camera: each view row also carries its camera (a camera-reading fake)

    def view_ids(self, index: torch.Tensor, cams: Cameras) -> torch.Tensor | None:
        if self.view_mode == "labels":
            ids = torch.tensor([VIEWS.index(v) for v in view_labels(cams)], dtype=torch.long)
        else:
            ids = index.clone() if self.view_mode == "particle" else None
        if ids is None or not self.view_camera:
            return ids
        # (B, 5) [view, elevation, azimuth, distance, fov]: dropped as one row, read by fake_condition
        return torch.cat([ids[:, None].to(torch.float32), cams.as_cond().detach().cpu().float()], 1)

    def camera_view(self, cond: torch.Tensor) -> torch.Tensor:
        """The view label id of each camera row of ``cond``; a dropped (null) row, whose distance is
        negative, gives the null view ``-1``."""
        cond = cond.detach().cpu()
        ids = torch.tensor([VIEWS.index(v) for v in view_labels(Cameras.from_cond(cond))], dtype=torch.long)
        return torch.where(cond[:, 2] > 0, ids, torch.full_like(ids, -1))

    def sample_index(self, batch_size, rng):
        index = super().sample_index(batch_size, rng).repeat(self.repeat)
        cams = sample_cameras(len(index), self.ranges, rng)
        bg = torch.rand(len(index), 3, generator=rng) if self.background_kind == "random" else None
        self._pending = (index.clone(), cams, bg)
        return index

    def eval_cameras(self, n: int) -> Cameras:
        """Held-out views: a turntable at elevation 15 (mid distance and FOV), ``n`` azimuths."""
        return turntable(n, self.ranges)

    # -- rendering ----------------------------------------------------------------------------------------
    def backgrounds(self, n: int, bg: torch.Tensor | None) -> torch.Tensor:
        if bg is not None:
            return bg
        if self.learned_bg is not None:
            return self.learned_bg(n, self.bg_color.device)
        return self.bg_color.expand(n, 3)

    def render_views(self, index: torch.Tensor, cams: Cameras, bg: torch.Tensor | None = None,
                     track: bool = False) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [0, 1] of particle ``index[i]`` from camera ``i``."""
        dev = self.bg_color.device
        index = index.cpu()
        bgs = self.backgrounds(len(index), bg).to(dev)
        out = [None] * len(index)
        self._tracked = []
        for p in index.unique().tolist():
            rows = (index == p).nonzero()[:, 0]
            res = render(self.scenes[p], cams[rows], self.height, self.width, bgs[rows.to(dev)],
                         track_means2d=track)
            if track:
                self._tracked.append((p, res))
            for j, r in enumerate(rows.tolist()):
                out[r] = res.images[j]
        return torch.stack(out)

    def _apply(self, fn, *args, **kwargs):  # the VAE of a latent teacher follows .to(device)
        enc = self._encoder[0]
        if enc is not None and enc.vae is not None:
            enc.vae = enc.vae._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def to_teacher(self, img: torch.Tensor) -> torch.Tensor:
        """Renders in [0, 1] -> what the teacher denoises: ``2 img - 1`` at the teacher's size, its
        channel mean for a one-channel teacher, the VAE's normalised latent for a latent teacher."""
        x = 2 * img - 1
        if tuple(x.shape[-2:]) != self.teacher_size:  # threestudio renders small and resizes bilinearly
            x = torch.nn.functional.interpolate(x, self.teacher_size, mode="bilinear", align_corners=False)
        if self.channels == 1:
            x = x.mean(1, keepdim=True)
        enc = self._encoder[0]
        if enc is not None:
            vae = enc.vae
            z = vae.encode(x.to(vae.dtype)).latent_dist.mean
            x = ((z - enc.latent_shift) * enc.latent_scale).to(img.dtype)
        return x

    def teacher_cond(self, index: torch.Tensor, cams: Cameras, device) -> torch.Tensor | None:
        if self.cond_mode == "camera":
            return cams.as_cond().to(device)
        if self.cond_mode == "views":
            return torch.tensor([VIEWS.index(v) for v in view_labels(cams)], dtype=torch.long, device=device)
        if self.cond_mode == "class":
            return self.classes.to(device)[index.to(device)]
        return None

    @torch.no_grad()
    def particle_renders(self, cond: torch.Tensor) -> torch.Tensor:
        """``(B, P, D)`` float64: what the teacher sees of every particle from each camera row of the
        ``(B, 4)`` camera ``cond``, on the fixed background (the exact particle-mixture fake score)."""
        cams = Cameras.from_cond(cond.detach().cpu())
        n = len(cond)
        bg = self.bg_color.expand(n, 3)
        out = [self.to_teacher(render(s, cams, self.height, self.width, bg).images) for s in self.scenes]
        return torch.stack(out, 1).flatten(2).double()

    def render(self, index):
        index = index.cpu()
        if self._pending is not None and torch.equal(self._pending[0], index):
            _, cams, bg = self._pending
            self._pending = None
        else:  # outside a training step (evaluation, preflight): the front of the turntable
            cams, bg = self.eval_cameras(1)[[0] * len(index)], None
        track = bool(self.densifiers) and torch.is_grad_enabled()
        img = self.render_views(index, cams, bg, track)
        return Rendered(self.to_teacher(img), self.teacher_cond(index, cams, img.device), self.view_ids(index, cams))

    # -- optimization ---------------------------------------------------------------------------------------
    def optimizer_groups(self, lr0: float):
        """One group per parameter kind and particle (``name`` the kind, ``particle`` its index) at
        ``splats.lr``; ``lr_scale`` lets a ``train.lr`` schedule scale them all."""
        groups = []
        for p, s in enumerate(self.scenes):
            for name, param in s.named_groups().items():
                groups.append({"params": [param], "name": name, "particle": p, "lr": self.lr[name],
                               "lr_scale": self.lr[name] / lr0 if lr0 > 0 else 0.0})
        if self.learned_bg is not None:
            rate = self.lr["sh_dc"]
            groups.append({"params": list(self.learned_bg.parameters()), "name": "background", "lr": rate,
                           "lr_scale": rate / lr0 if lr0 > 0 else 0.0})
        return groups

    def attach_optimizer(self, optimizer) -> None:
        self._optimizer = optimizer

    def _particle_view(self, p: int):
        groups = [g for g in self._optimizer.param_groups if g.get("particle") == p]
        return _GroupView(groups, self._optimizer.state)

    def after_step(self, step: int) -> dict:
        """Densification bookkeeping after the optimizer step of update ``step`` (1-based)."""
        stats = {}
        if not self.densifiers:
            return stats
        for p, res in self._tracked:
            if res.means2d.grad is not None:
                self.densifiers[p].accumulate(res.means2d, res.visible, self.width, self.height, res.radii)
        self._tracked = []
        for p, (d, s) in enumerate(zip(self.densifiers, self.scenes)):
            out = d.step(step, s)
            if out is not None and self._optimizer is not None:
                remap_adam_state(self._particle_view(p), s, out)
        stats["gaussians"] = float(sum(s.num for s in self.scenes)) / self.num_items
        return stats

    # -- state: Gaussian counts change, so loading resizes first -------------------------------------------------
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        for p, d in enumerate(self.densifiers):
            for k in DENSIFY_STATE:
                sd[f"densify.{p}.{k}"] = getattr(d, k).clone()
            sd[f"densify.{p}.generator"] = d.generator.get_state()
            sd[f"densify.{p}.resets"] = torch.tensor(d.resets)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        sd = dict(state_dict)
        for p, d in enumerate(self.densifiers):
            for k in DENSIFY_STATE:
                if f"densify.{p}.{k}" in sd:
                    setattr(d, k, sd.pop(f"densify.{p}.{k}").double().clone())
            if f"densify.{p}.generator" in sd:
                d.generator.set_state(sd.pop(f"densify.{p}.generator"))
                d.resets = int(sd.pop(f"densify.{p}.resets"))
        with torch.no_grad():
            for p, s in enumerate(self.scenes):
                n = sd.get(f"scenes.{p}.means")
                if n is not None and n.shape[0] != s.num:
                    s.select(torch.zeros(n.shape[0], dtype=torch.long, device=s.means.device))
        if self._optimizer is not None:  # point the groups at the (possibly new) parameter objects
            for g in self._optimizer.param_groups:
                if "particle" in g:
                    g["params"] = [getattr(self.scenes[g["particle"]], g["name"])]
        return super().load_state_dict(sd, strict=strict, assign=assign)

    # -- evaluation and outputs --------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_images(self, n: int) -> torch.Tensor:
        """``(P, n, 3, H, W)`` turntable renders in [0, 1] of every particle on the fixed background."""
        cams = self.eval_cameras(n)
        bg = self.bg_color.expand(n, 3)
        return torch.stack([render(s, cams, self.height, self.width, bg).images for s in self.scenes])

    @torch.no_grad()
    def evaluate(self, teacher, n_views: int = 8) -> dict:
        """Held-out-view PSNR, opacity-weighted Chamfer and the Janus rate against the teacher's scenes
        (when it has them), how many particles land nearest to each scene, and, under a class-conditional
        image teacher with a dataset classifier, the share of held-out views classified as the class."""
        from scoredistill.splat.metrics import scene_janus, scene_scores

        res = {"gaussians": float(sum(s.num for s in self.scenes)) / self.num_items}
        if self.cond_mode == "class" and getattr(teacher, "dataset", None) is not None:
            res["view_accuracy"] = self.view_accuracy(teacher.dataset, n_views)
        truth = getattr(teacher, "scenes", None)
        if truth is None:
            return res
        cams = self.eval_cameras(n_views)
        sc = scene_scores(list(self.scenes), list(truth), cams, self.height, self.width, self.bg_color)
        best = sc["best"]
        rows = torch.arange(len(best))
        res["psnr"] = float(sc["psnr"][rows, best].mean())
        res["chamfer"] = float(sc["chamfer"][rows, best].mean())
        if any(v in ("side", "back") for v in view_labels(cams)):
            res["janus"] = sum(scene_janus(s, truth[int(k)], cams, self.height, self.width, self.bg_color)
                               for s, k in zip(self.scenes, best)) / len(best)
        for k in range(len(truth)):
            res[f"particles_scene{k}"] = int((best == k).sum())
        return res

    @torch.no_grad()
    def view_accuracy(self, dataset: str, n_views: int) -> float:
        """Share of the held-out turntable views of every particle that the dataset's metric classifier
        (:func:`scoredistill.metrics.images.dataset_classifier`) assigns to the particle's class."""
        from scoredistill.metrics.images import dataset_classifier

        clf = dataset_classifier(dataset)
        imgs = self.eval_images(n_views)
        hits = []
        for p in range(self.num_items):
            x = self.to_teacher(imgs[p]).clamp(-1, 1).cpu()
            hits.append(torch.as_tensor(clf.proba(x).argmax(1)) == int(self.classes[p]))
        return float(torch.cat(hits).double().mean())

    def write_outputs(self, folder: str) -> list[str]:
        """``scene.ply`` (particle 0) and ``scene_<p>.ply`` for the others, in the 3DGS layout."""
        names = []
        for p, s in enumerate(self.scenes):
            name = "scene.ply" if p == 0 else f"scene_{p}.ply"
            s.save_ply(os.path.join(folder, name))
            names.append(name)
        return names

    def describe(self) -> dict:
        return {"kind": self.kind, "num_items": self.num_items, "gaussians": [s.num for s in self.scenes]}


class _GroupView:
    """The groups of one particle of an optimizer, sharing its state (for :func:`remap_adam_state`)."""

    def __init__(self, groups, state):
        self.param_groups = groups
        self.state = state


def teacher_link(teacher, classes: torch.Tensor | None, view_prompts: bool) -> dict:
    """How renders reach ``teacher`` (see the module docstring): its pixel size, channels, the VAE of a
    latent teacher, the kind of ``cond`` and, for a text teacher, the view-free prompt index."""
    shape = tuple(teacher.data_shape)
    assets = getattr(teacher, "assets", None)
    link = {"encoder": None, "channels": 3, "plain_prompt": None, "classes": classes}
    if getattr(assets, "vae", None) is not None:
        vae = assets.vae
        if len(shape) != 3 or shape[0] != int(vae.config.latent_channels):
            raise ConfigError("params.kind", f"splats need an image latent teacher (SD1.x / SD2.x, SDXL, SD3); "
                              f"this teacher's data shape is {list(shape)}")
        f = assets.vae_scale_factor
        link.update(encoder=assets, height=shape[1] * f, width=shape[2] * f)
    elif len(shape) == 3 and shape[0] in (1, 3):
        link.update(channels=shape[0], height=shape[1], width=shape[2])
    else:
        raise ConfigError("params.kind", f"splats render RGB images; the teacher's data shape is {list(shape)}")
    if getattr(teacher, "takes_camera", False):
        if classes is not None:
            raise ConfigError("params.classes", "the scene teacher's condition is the camera; accepted: null")
        link["cond_mode"] = "camera"
    elif getattr(assets, "prompts", None):
        if classes is not None:
            raise ConfigError("params.classes", "a text teacher reads the prompt (teacher.prompts); accepted: null")
        link["cond_mode"] = "views" if view_prompts else "class"
        # the prompt of every particle: the plain prompt (last row of the view table) or the only one
        plain = len(assets.prompts) - 1
        link["plain_prompt"] = plain if view_prompts else None
        link["classes"] = "plain"
    else:
        link["cond_mode"] = "class" if classes is not None else "none"
    return link


def build_splats(pc: dict, sc: dict, teacher, seed: int, classes: torch.Tensor | None = None) -> SplatParticles:
    """From ``params`` (``n`` particles, ``repeat`` views each per step, ``batch_size`` particles per
    step, ``classes`` for a class-conditional teacher) and the ``splats`` section; the image size,
    channels, condition and background follow the teacher (:func:`teacher_link`)."""
    moved = {"init": "splats.init", "views": "splats.view", "shape": "the teacher's resolution"}
    for k, where in moved.items():
        if pc[k] is not None:
            raise ConfigError(f"params.{k}", f"not read by params.kind: splats (set by {where}); accepted: null")
    link = teacher_link(teacher, classes, sc["view_prompts"])
    if isinstance(link["classes"], str):  # a text teacher: every particle's "class" is its prompt
        link["classes"] = torch.full((pc["n"],), link["plain_prompt"] or 0, dtype=torch.long)
    scenes = [initial_scene(sc, seed + 1000 * p) for p in range(pc["n"])]
    ranges = CameraRanges.from_config(sc["cameras"], "splats.cameras")
    densify = DensifyConfig.from_config(sc["densify"], "splats.densify") if sc["densify"] is not None else None
    unknown = set(sc["lr"]) - set(PARAM_NAMES)
    if unknown:
        raise ConfigError(f"splats.lr.{sorted(unknown)[0]}", f"unknown key; accepted: {', '.join(PARAM_NAMES)}")
    bg = getattr(teacher, "background", None)
    bg = bg.tolist() if torch.is_tensor(bg) else (1.0, 1.0, 1.0)
    background = sc["background"]
    if background in FIXED_BACKGROUNDS:
        bg, background = FIXED_BACKGROUNDS[background], "teacher"
    return SplatParticles(scenes, link["height"], link["width"], ranges, background, bg, pc["repeat"], sc["view"],
                          densify, sc["lr"], seed, cond_mode=link["cond_mode"], classes=link["classes"],
                          channels=link["channels"], encoder=link["encoder"], plain_prompt=link["plain_prompt"],
                          render_size=sc["render_size"])
