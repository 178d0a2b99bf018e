"""Config schema of ``scoredistill optimize``: the teacher section of ``distill`` plus the
parameterization, an optional fake score, the objective and the optimizer settings, declared with the
one schema mechanism of :mod:`scoredistill.config`.

Objective scalars, ``objective.time.t_min/t_max`` and ``train.lr`` / ``train.fake_lr`` may be schedules
(:mod:`scoredistill.optimize.schedule`). Every problem is a :class:`~scoredistill.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from scoredistill.config import (
    INT64_MAX,
    MAX_LR,
    MAX_SIZE,
    MAX_WIDTH,
    ObjectiveConfig,
    Schema,
    Section,
    TeacherConfig,
    betas_key,
    defaults,
    depth_key,
    device_key,
    every_key,
    is_int,
    is_number,
    key,
    optimizer_key,
    resolve_schema,
    seed_key,
    steps_key,
    threads_key,
    width_key,
)
from scoredistill.errors import ConfigError
from scoredistill.optimize.schedule import parse_schedule


def schedulable(lo: float, hi: float | None = None):
    """A number in ``[lo, hi]`` or a schedule (:func:`~scoredistill.optimize.schedule.parse_schedule`) of such."""
    def check(v, f):
        s = parse_schedule(v, f)
        vals = (s.start, s.end) if s is not None else (v,)
        if not all(is_number(x) and x >= lo and (hi is None or x <= hi) for x in vals):
            what = f">= {lo:g}" if hi is None else f"in [{lo:g}, {hi:g}]"
            raise ConfigError(f, f"must be a number {what} or a schedule [start_step, start, end, end_step], "
                              f"got {v!r}")
    return check


def _classes_check(v, f):
    if v != "uniform" and not (is_int(v) and v >= 0):
        raise ConfigError(f, f"must be null, uniform or a class label >= 0, got {v!r}")


def _views_check(v, f):
    if v != "index" and not (is_int(v) and v >= 1):
        raise ConfigError(f, f"must be null, index or an integer >= 1, got {v!r}")


@dataclass
class ParamsConfig(Section):
    DOC: ClassVar[str] = "What is optimized: particles, an image tensor, a user renderer's parameters or latents."
    kind: str = key("particles", "particles | image | callable (user renderer) | latent (VAE latents) | "
                    "splats (3D Gaussian splats, section splats)",
                    choices=("particles", "image", "callable", "latent", "splats"))
    n: int = key(512, "particles: how many; image: how many images; splats: how many splat sets (particles)",
                 lo=1, hi=MAX_SIZE)
    shape: list[int] | None = key(None, "shape of one item (default: the teacher's data shape)", lo=1, hi=MAX_SIZE)
    init_mean: float = key(0.0, "mean of the initial values")
    init_std: float = key(1.0, "standard deviation of the initial values", lo=0)
    init: str | None = key(None, "PATH.npy of initial values (particles / image); callable: init hook")
    classes: int | str | None = key(None, "null | k (every item targets class k) | uniform (round-robin over classes)",
                       check=_classes_check, accepts="null, uniform or an integer >= 0")
    views: int | str | None = key(None, "null | index (item index) | V (index mod V, or the hook's view ids < V)",
                     check=_views_check, accepts="null, index or an integer >= 1")
    batch_size: int | None = key(None, "items per step (null: all)", lo=1, hi=MAX_SIZE)
    repeat: int = key(1, "image: renders (noise draws) per step; splats: random views per particle per step",
                      lo=1, hi=MAX_SIZE)
    activation: str = key("none", "image: output activation", choices=("none", "sigmoid", "tanh"))
    render: str | None = key(None, "callable: 'package.module:function'")
    num_views: int = key(8, "callable: number of views to render from", lo=1, hi=MAX_SIZE)
    hook_args: dict = key({}, "callable: keyword arguments for the init and render hooks")
    vae: str | None = key(None, "latent: AutoencoderKL folder")
    decode: bool = key(True, "latent: the teacher sees the decoded image (true) or the latent (false)")

    def validate(self, path):
        if self.kind == "callable" and not self.render:
            raise ConfigError(f"{path}.render", "missing; give 'package.module:function' for params.kind: callable")


def _splat_init_check(v, f):
    if not isinstance(v, str) or not (v in ("sphere", "ball") or v.lower().endswith(".ply")):
        raise ConfigError(f, f"unknown value {v!r}; accepted: sphere, ball, PATH.ply")


def _mapping_check(build):
    def check(v, f):
        if not isinstance(v, dict):
            raise ConfigError(f, f"must be a mapping, got {v!r}")
        build(v, f)
    return check


def _lr_map(v, f):
    from scoredistill.splat.gaussians import PARAM_NAMES

    for k, x in v.items():
        if k not in PARAM_NAMES:
            raise ConfigError(f"{f}.{k}", f"unknown key; accepted: {', '.join(PARAM_NAMES)}")
        if not (is_number(x) and x >= 0):
            raise ConfigError(f"{f}.{k}", f"must be a number >= 0, got {x!r}")


def _densify_map(v, f):
    from scoredistill.splat.gaussians import DensifyConfig

    DensifyConfig.from_config(v, f)


def _cameras_map(v, f):
    from scoredistill.splat.cameras import CameraRanges

    CameraRanges.from_config(v, f)


@dataclass
class SplatsConfig(Section):
    DOC: ClassVar[str] = ("params.kind: splats — 3D Gaussian splats rendered from random orbit cameras "
                          "(docs/3d.md).")
    init: str = key("ball", "initial shape: sphere | ball | PATH.ply (a 3DGS file)", check=_splat_init_check,
                    accepts="sphere, ball or PATH.ply")
    count: int = key(1000, "Gaussians per particle of the sphere / ball", lo=1, hi=MAX_SIZE)
    radius: float = key(0.4, "radius of the initial sphere / ball (scene units)", lo=0, lo_open=True)
    opacity: float = key(0.1, "initial opacity of the sphere / ball", lo=0, hi=1, lo_open=True, hi_open=True)
    sh_degree: int = key(0, "colour: 0 (RGB) or 1 (view-dependent, degree-1 SH)", lo=0, hi=1)
    lr: dict = key({}, "learning rate per kind {means, log_scales, quats, opacity_logits, sh_dc, sh_rest} "
                   "(default DreamGaussian's: 1e-3, 5e-3, 5e-3, 5e-2, 1e-2, 5e-4)", check=_mapping_check(_lr_map),
                   accepts="a mapping of parameter kinds to numbers >= 0")
    densify: dict | None = key(None, "densify-and-prune schedule {start, stop, every, grad_threshold, "
                               "min_opacity, max_gaussians, ...} (3DGS defaults; null: off)",
                               check=_mapping_check(_densify_map), accepts="a mapping of densify keys or null")
    cameras: dict = key({}, "orbit camera ranges {elevation, azimuth, distance, fov}: [min, max] or a number "
                        "(default [-10, 90], [-180, 180], [1.0, 1.5], [40, 70])", check=_mapping_check(_cameras_map),
                        accepts="a mapping of camera ranges")
    background: str = key("teacher", "teacher (the teacher's fixed colour, else white) | white | black | random "
                          "(a colour per view) | learned", choices=("teacher", "white", "black", "random", "learned"))
    render_size: int | None = key(None, "render at this many pixels square and resize bilinearly to the teacher's "
                                  "image size (threestudio renders 64 px for a 512 px teacher; null: the teacher's)",
                                  lo=1, hi=4096)
    view_prompts: bool = key(True, "text teachers: the prompt gets ', front / side / back / overhead view' by "
                             "camera (DreamFusion's view-dependent conditioning)")
    view: str = key("labels", "fake-score view of a render: labels (front/side/back/overhead) | particle | none",
                    choices=("labels", "particle", "none"))
    eval_views: int = key(8, "held-out turntable views of the metrics and the render grid", lo=1, hi=360)
    turntable: int = key(24, "frames of turntable.gif", lo=1, hi=360)


@dataclass
class OptimizeFakeConfig(Section):
    DOC: ClassVar[str] = "The learned score of the current samples (VSD-type objectives)."
    kind: str = key("mlp", "mlp (a fresh MLP) | lora (LoRA on a diffusers teacher, ProlificDreamer) | particles "
                    "(splats under a scene teacher: the exact particle-mixture score, no training)",
                    choices=("mlp", "lora", "particles"))
    lora_rank: int = key(4, "kind lora: rank (ProlificDreamer's LoRA attention processors: 4)", lo=1, hi=MAX_WIDTH)
    lora_alpha: float | None = key(None, "kind lora: alpha (default: the rank)", lo=0, lo_open=True)
    width: int = width_key()
    depth: int = depth_key()
    sigma_data: float | None = key(None, "EDM preconditioning scale (default: the teacher's data std)",
                                   lo=0, lo_open=True)
    camera: bool = key(False, "kinds mlp / lora under splats: the fake also reads the camera (flattened camera-to-"
                       "world, an MLP added to its time embedding, ProlificDreamer), dropped with the view")


@dataclass
class OptimizeObjectiveConfig(ObjectiveConfig):
    name: str = key("sds", "registered objective name")


@dataclass
class OptimizeTrainConfig(Section):
    DOC: ClassVar[str] = "Optimization, cadences and resources of `optimize`."
    steps: int = steps_key(1000, "parameter updates (resume: may grow, never below the steps done)")
    seed: int = seed_key()
    lr: Any = key(1e-2, "particle / parameter learning rate (schedulable)", check=schedulable(0, MAX_LR),
                  accepts="a number in [0, 1e+06] or a schedule")
    betas: list[float] = betas_key([0.9, 0.99], "Adam betas of the parameters")
    eps: float = key(1e-15, "Adam eps (threestudio's)", lo=0)
    weight_decay: float = key(0.0, "weight decay of the parameters", lo=0)
    optimizer: str = optimizer_key("adam", "parameter optimizer")
    fake_optimizer: str | None = optimizer_key(None, "fake-score optimizer (default: optimizer)")
    disc_optimizer: str | None = optimizer_key(None, "discriminator optimizer (default: fake_optimizer)")
    fake_lr: Any = key(1e-3, "fake-score learning rate (schedulable)", check=schedulable(0, MAX_LR),
                       accepts="a number in [0, 1e+06] or a schedule")
    fake_betas: list[float] = betas_key([0.9, 0.999], "Adam betas of the fake score")
    fake_steps: int = key(1, "fake-score updates per parameter update (ProlificDreamer K = 1)", lo=1, hi=10000)
    fake_warmup: int = key(0, "fake-score updates on the initial samples before the first step", lo=0,
                           hi=INT64_MAX)
    grad_clip: float | None = key(None, "clip the parameters' gradient norm (null: off)", lo=0)
    nan_guard_max: int = key(20, "abort after this many consecutive non-finite steps", lo=1, hi=INT64_MAX)
    checkpoint_every: int = every_key(500, "updates between checkpoints")
    keep_checkpoints: int = every_key(2, "newest checkpoints kept")
    log_every: int = every_key(50, "updates between progress lines")
    device: str = device_key()
    threads: int | None = threads_key()
    progress: bool = key(True, "progress bar on stderr", resume=True)


@dataclass
class OptimizeEvalConfig(Section):
    DOC: ClassVar[str] = "Evaluation cadence (resumable)."
    every: int = every_key(250, "updates between evaluations")
    plots: bool = key(True, "write sample plots", resume=True)


OPTIMIZE: Schema = {"teacher": TeacherConfig, "params": ParamsConfig, "splats": SplatsConfig,
                    "fake_score": OptimizeFakeConfig,
                    "objective": OptimizeObjectiveConfig, "train": OptimizeTrainConfig, "eval": OptimizeEvalConfig}
DEFAULTS: dict[str, Any] = {name: defaults(cls) for name, cls in OPTIMIZE.items()}
SECTIONS = tuple(DEFAULTS)


def resolve(user: dict, overrides: Iterable[str] = ()) -> dict:
    """The ``optimize`` config: defaults, ``user``, ``overrides``, validated (:data:`OPTIMIZE`)."""
    return resolve_schema(OPTIMIZE, user, overrides)[0]
