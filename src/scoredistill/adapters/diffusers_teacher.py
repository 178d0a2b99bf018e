"""Teacher adapters for diffusers pipeline folders (``teacher: {kind: diffusers, path: DIR}``).

A folder written by ``DiffusionPipeline.save_pretrained`` is loaded once; its denoising network
(``unet`` or ``transformer``) is wrapped as a library :class:`~scoredistill.models.denoiser.Denoiser`
``D(x_t, t, cond) -> x0`` in canonical time ``t in [0, 1]``. Supported families:

==========  =====================================================  ================================
family      network / pipeline                                      conditioning ``cond``
==========  =====================================================  ================================
``unet2d``  ``UNet2DModel`` (``DDPMPipeline``), pixel space          ``None`` or class labels
``sd``      ``UNet2DConditionModel`` + CLIP (SD1.x / SD2.x)          prompt index
``sdxl``    ``UNet2DConditionModel`` with ``text_time`` conditions   prompt index
``sd3``     ``SD3Transformer2DModel`` (rectified flow)               prompt index
``flux``    ``FluxTransformer2DModel`` (rectified flow, packed)      prompt index
==========  =====================================================  ================================

**Process and prediction** come from the scheduler config, never from a guess:
``beta_schedule`` (linear / scaled_linear / squaredcos_cap_v2), ``beta_start``, ``beta_end`` and
``num_train_timesteps`` give :class:`~scoredistill.process.processes.VPDiscrete` (checked at load
time against the scheduler's own ``alphas_cumprod``); a ``FlowMatchEulerDiscreteScheduler`` gives
:class:`~scoredistill.process.processes.RectifiedFlow` with its ``shift`` (dynamic shifting, FLUX:
``shift = exp(mu)`` with ``mu`` from the latent sequence length exactly as ``FluxPipeline`` computes
it). ``prediction_type`` epsilon / v_prediction / sample map to ``eps`` / ``v`` / ``x0``; flow
transformers predict the velocity ``eps - x0`` (``flow``). Canonical time maps to the native
timestep: VP ``n = t N``; flow ``sigma = shift(t)`` fed as ``1000 sigma`` (SD3, as
``StableDiffusion3Pipeline`` does) or ``sigma`` (FLUX, whose transformer multiplies by 1000).

**Conditioning.** Text-conditioned teachers get a fixed prompt list (``teacher.prompts``: a list or
a ``.txt`` file, one prompt a line). Each prompt is encoded **once** with the pipeline's own
``encode_prompt`` and cached; ``cond`` is a LongTensor of prompt indices and ``-1`` means the
unconditional embedding, i.e. the pipeline's negative-prompt branch: ``teacher.negative_prompt``
(default: the empty prompt; SDXL's ``force_zeros_for_empty_prompt`` gives zeros, as in diffusers and
the DMD2 SDXL code). CFG is therefore the library's canonical ``D_u + w (D_c - D_u)`` with
``D_u`` = negative-prompt prediction -- the same formula diffusers pipelines use with
``guidance_scale = w``. Class-conditional ``UNet2DModel``: ``cond`` = class label, ``-1`` maps to
``teacher.null_class`` (must be the last class embedding).

**FLUX guidance embedding.** Guidance-distilled FLUX models take the guidance scale as an input;
``teacher.embedded_guidance`` (default 3.5, ``FluxPipeline``'s default) is fed to every call of the
teacher and of roles copied from it. This is not CFG: ``objective.guidance_scale`` stays the
canonical CFG on top (leave it at 1 for FLUX-dev).

**Latents.** For latent models the library works on the VAE's *normalised* latents
``(z - shift_factor) * scaling_factor`` (``data_shape = (C, H/f, W/f)``); :meth:`DiffusersAssets.decode`
and :meth:`DiffusersAssets.encode` convert to and from images in ``[-1, 1]``. ``teacher.resolution``
must be a multiple of the VAE factor times the network's downsampling factor (and of what the
pipeline checks), so that the student's export can sample at the size it was trained at.

**Families.** Each row of the table above is one class in :mod:`scoredistill.adapters.families`;
:func:`build_diffusers_teacher` picks it once from the folder (``model_index.json`` and the network's
``config.json``) and :class:`DiffusersDenoiser` delegates the network call and feature hook to it.
This module holds what all families share: the scheduler -> process mapping, the prompt table and
VAE (:class:`DiffusersAssets`), and the denoiser.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from scoredistill.adapters.families import (
    FAMILIES,
    FLUX_DEFAULT_GUIDANCE,
    Family,
    check_components,
    components_of,
    family_of,
    read_index,
    read_prompts,
)
from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import NULL_CLASS, Denoiser, expand_t
from scoredistill.process.processes import Process, RectifiedFlow, VPDiscrete

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
TEACHER_KEYS = ("kind", "path", "process", "guidance_convention", "prompts", "negative_prompt", "null_class",
                "resolution", "embedded_guidance")


# ------------------------------------------------------------------------------------------------
def is_flow_scheduler(sched_cfg: dict) -> bool:
    return "shift" in sched_cfg and "beta_schedule" not in sched_cfg


def process_from_scheduler(scheduler, seq_len: int | None = None) -> tuple[Process, str]:
    """``(process, prediction kind)`` from a diffusers scheduler (config values only, checked)."""
    cfg = dict(scheduler.config)
    if is_flow_scheduler(cfg):
        if cfg.get("invert_sigmas"):
            raise ConfigError("teacher.path", "scheduler has invert_sigmas=true (Mochi-style); not supported")
        if cfg.get("use_dynamic_shifting"):
            if seq_len is None:
                raise ConfigError("teacher.path", "dynamic shifting needs the latent sequence length")
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                 cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
            # time_shift(mu, 1, s): exponential e^mu s / (e^mu s + 1 - s); linear mu s / (mu s + 1 - s)
            shift = math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu
        else:
            shift = float(cfg.get("shift", 1.0))
        return RectifiedFlow(shift=float(shift)), "flow"
    if cfg.get("trained_betas") is not None:
        raise ConfigError("teacher.path", "scheduler has trained_betas; only linear, scaled_linear and "
                          "squaredcos_cap_v2 beta schedules are supported")
    if cfg.get("rescale_betas_zero_snr"):
        raise ConfigError("teacher.path", "scheduler has rescale_betas_zero_snr=true (alpha_bar = 0 at the last "
                          "step); not supported by the VP process yet")
    bs = cfg.get("beta_schedule")
    if bs not in BETA_SCHEDULES:
        raise ConfigError("teacher.path", f"scheduler beta_schedule {bs!r} not supported; accepted: "
                          f"{', '.join(BETA_SCHEDULES)}")
    pt = cfg.get("prediction_type", "epsilon")
    if pt not in PREDICTIONS:
        raise ConfigError("teacher.path", f"scheduler prediction_type {pt!r} not supported; accepted: "
                          f"{', '.join(PREDICTIONS)}")
    proc = VPDiscrete(BETA_SCHEDULES[bs], int(cfg["num_train_timesteps"]), float(cfg["beta_start"]),
                      float(cfg["beta_end"]))
    ref = getattr(scheduler, "alphas_cumprod", None)
    if ref is not None:  # the library's schedule must be the scheduler's, to float32 precision
        err = float((proc.log_alpha_bar.exp() - ref.double()).abs().max())
        if err > 1e-5:
            raise ConfigError("teacher.path", f"scheduler alphas_cumprod differ from the VP process by {err:.2e}")
    return proc, PREDICTIONS[pt]


def native_to_canonical(process: Process, native: float, num_train_timesteps: int) -> float:
    """A diffusers timestep (VP index ``n``; flow ``1000 sigma``) as canonical time ``t``."""
    if isinstance(process, VPDiscrete):
        return float(native) / process.num_steps
    s = float(native) / num_train_timesteps
    k = process.shift
    return s / (k - (k - 1) * s)  # inverse of sigma = k t / (1 + (k - 1) t); sigma = 1 -> t = 1


# ------------------------------------------------------------------------------------------------
class DiffusersAssets:
    """What every role built from one teacher folder shares: the cached prompt embeddings, the VAE,
    the scheduler config. Never deep-copied (copies of the teacher keep pointing at it)."""

    def __init__(self, path: str, family: Family, pipeline_class: str, scheduler_config: dict, teacher_cfg: dict):
        self.path = path
        self.family = family
        self.pipeline_class = pipeline_class
        self.scheduler_config = scheduler_config
        self.teacher_cfg = teacher_cfg
        self.vae = None
        self.vae_scale_factor = 1
        self.latent_scale = 1.0
        self.latent_shift = 0.0
        self.prompts: list[str] = []
        self.table: dict[str, torch.Tensor] = {}  # embeds (P+1, L, D) [+ pooled, time_ids, txt_ids]
        self._on: dict = {}

    def __deepcopy__(self, memo):
        return self

    # -- prompt table ------------------------------------------------------------------------------
    def cond_tensors(self, cond: torch.Tensor | None, batch: int, device, dtype) -> dict[str, torch.Tensor]:
        """Per-sample text conditioning for prompt indices ``cond`` (``-1`` / ``None``: unconditional)."""
        key = (str(device), dtype)
        if key not in self._on:
            self._on[key] = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                             for k, v in self.table.items()}
        tab = self._on[key]
        null = tab["embeds"].shape[0] - 1
        if cond is None:
            idx = torch.full((batch,), null, dtype=torch.long, device=device)
        else:
            idx = cond.to(device=device, dtype=torch.long)
            if (idx >= null).any() or (idx < NULL_CLASS).any():
                raise ValueError(f"prompt index out of range [-1, {null - 1}]")
            idx = torch.where(idx < 0, torch.full_like(idx, null), idx)
        out = {"embeds": tab["embeds"][idx]}
        if "pooled" in tab:
            out["pooled"] = tab["pooled"][idx]
        if "time_ids" in tab:
            out["time_ids"] = tab["time_ids"].expand(batch, -1)
        if "txt_ids" in tab:
            out["txt_ids"] = tab["txt_ids"]
        return out

    # -- VAE ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in ``[-1, 1]`` (identity for pixel-space teachers)."""
        if self.vae is None:
            return latents
        z = latents.to(self.vae.dtype) / self.latent_scale + self.latent_shift
        return self.vae.decode(z.to(next(self.vae.parameters()).device)).sample.to(latents.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Images in ``[-1, 1]`` -> normalised latents (``latent_dist.sample`` or its mode)."""
        if self.vae is None:
            return images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return ((z - self.latent_shift) * self.latent_scale).to(images.dtype)


# ------------------------------------------------------------------------------------------------
def _set_lora(model, enabled: bool) -> None:
    from scoredistill.adapters.lora import set_lora_enabled

    set_lora_enabled(model, enabled)


class DiffusersDenoiser(Denoiser):
    """A diffusers network as a library denoiser; see the module docstring for conventions.

    Everything family-specific is delegated to ``family`` (:mod:`scoredistill.adapters.families`).
    ``default_lora`` says whether peft LoRA adapters attached to ``model`` are active for this role
    (the teacher: off; a LoRA student: on); a LoRA critic sharing the module calls with ``lora=True``.
    """

    def __init__(self, model, assets: DiffusersAssets, process: Process, prediction: str, time_scale: float,
                 data_shape: tuple[int, ...], num_classes: int | None, null_class: int | None = None,
                 sigma_data: float = 0.5, embedded_guidance: float | None = None):
        super().__init__()
        self.model = model
        self.assets = assets
        self.family = assets.family
        self.process = process
        self.prediction = prediction
        self.time_scale = float(time_scale)
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes
        self.null_class = null_class
        self.sigma_data = float(sigma_data)
        self.embedded_guidance = embedded_guidance
        self.default_lora = False

    # -- the network call ---------------------------------------------------------------------------
    def native_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Canonical ``t`` -> the value passed as ``timestep`` to the network (float64)."""
        return self.process.native_time(t) * self.time_scale

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, cond=None, lora: bool | None = None):
        """The network's raw prediction (``self.prediction`` kind) at canonical time ``t``."""
        t = expand_t(t, x_t.shape[0], x_t.device)
        _set_lora(self.model, self.default_lora if lora is None else lora)
        dtype = self.model.dtype
        out = self.family.call(self, x_t.to(dtype), self.native_timestep(t).to(dtype), cond)
        return out.to(x_t.dtype)

    def denoise(self, x_t, t, cond=None, lora: bool | None = None):
        t = expand_t(t, x_t.shape[0], x_t.device)
        return self.process.to_x0(x_t, self.model_output(x_t, t, cond, lora), t, self.prediction)

    def forward(self, x_t, t, cond=None, lora: bool | None = None):
        return self.denoise(x_t, t, cond, lora)

    # -- features for discriminator heads -----------------------------------------------------------
    def features(self, x_t, t, cond=None, lora: bool | None = None):
        """Bottleneck features (UNet mid block, or the last joint transformer block's image tokens),
        pooled to at most 4x4 spatially / averaged over tokens; on the autograd graph of ``x_t``."""
        store = {}
        module = self.family.feature_module(self.model)
        hook = module.register_forward_hook(lambda mod, i, o: store.__setitem__("h", o))
        try:
            self.denoise(x_t, t, cond, lora)
        finally:
            hook.remove()
        h = store["h"]
        if isinstance(h, tuple):
            h = h[-1]
        if h.dim() == 4:
            h = F.adaptive_avg_pool2d(h, (min(h.shape[2], 4), min(h.shape[3], 4)))
        elif h.dim() == 3:
            h = h.mean(1)
        return h.reshape(h.shape[0], -1).to(x_t.dtype)

    def make_evaluator(self, seed: int = 0, fid_weights: str | None = None):
        from scoredistill.adapters.evaluator import DiffusersEvaluator

        if fid_weights:
            raise ConfigError("eval.fid_weights", "real FID is not wired up for diffusers teachers yet")

        return DiffusersEvaluator(self.assets, seed)


def is_diffusers_denoiser(obj) -> bool:
    return isinstance(obj, DiffusersDenoiser) or isinstance(getattr(obj, "base", None), DiffusersDenoiser)


# ------------------------------------------------------------------------------------------------
def load_pipeline(path: str, index: dict | None = None, family: Family | None = None):
    """``DiffusionPipeline.from_pretrained`` on a local folder, after checking that every component
    ``model_index.json`` lists is there; components stored as ``[null, null]`` (e.g. SD3 without T5)
    are passed as ``None``."""
    index = read_index(path) if index is None else index
    check_components(path, index, family_of(path, index) if family is None else family)
    none = {k: None for k, v in components_of(index).items() if v is None}
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(path, **none), index
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError("teacher.path", f"cannot load the pipeline: {str(e).splitlines()[0]}") from None


def _resolution(spec, default: int) -> tuple[int, int]:
    if spec is None:
        return default, default
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        return spec, spec
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(v, int) and v > 0 for v in spec):
        return int(spec[0]), int(spec[1])
    raise ConfigError("teacher.resolution", f"must be a positive integer or [height, width], got {spec!r}")


def build_diffusers_teacher(tcfg: dict) -> DiffusersDenoiser:
    """The teacher role for ``teacher.kind: diffusers`` (frozen, eval mode)."""
    path = tcfg.get("path")
    if not path:
        raise ConfigError("teacher.path", "missing; give a diffusers pipeline folder (save_pretrained)")
    index = read_index(path)
    family = family_of(path, index)  # the one place the family is chosen
    pipe, _ = load_pipeline(path, index, family)
    model = getattr(pipe, family.network)
    sched_cfg = dict(pipe.scheduler.config)
    assets = DiffusersAssets(path, family, index.get("_class_name", type(pipe).__name__), sched_cfg,
                             {**{k: v for k, v in tcfg.items() if k != "process"}, "path": os.path.abspath(path)})
    if family.latent:
        vae = pipe.vae
        assets.vae = vae.requires_grad_(False).eval()
        assets.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        assets.latent_scale = float(vae.config.scaling_factor)
        assets.latent_shift = float(vae.config.get("shift_factor") or 0.0)
    f = assets.vae_scale_factor
    h, w = _resolution(tcfg.get("resolution"), family.default_resolution(model, pipe, f))
    family.check_resolution(model, h, w, f, given=tcfg.get("resolution") is not None)
    data_shape = family.data_shape(model, h, w, f)
    process, prediction = process_from_scheduler(pipe.scheduler, family.seq_len(data_shape))
    family.check_prediction(prediction)
    num_classes, null_class = family.conditioning(pipe, model, assets, tcfg, (h, w))
    eg = family.embedded_guidance(tcfg, model.config)
    teacher = DiffusersDenoiser(model, assets, process, prediction, family.time_scale(sched_cfg), data_shape,
                                num_classes, null_class, family.sigma_data, eg)
    tcfg["process"] = process.describe()  # the resolved config records the process read from the scheduler
    del pipe  # text encoders and tokenizers are no longer needed
    return teacher.requires_grad_(False).eval()


__all__ = ["BETA_SCHEDULES", "FAMILIES", "FLUX_DEFAULT_GUIDANCE", "PREDICTIONS", "TEACHER_KEYS", "DiffusersAssets",
           "DiffusersDenoiser", "build_diffusers_teacher", "is_diffusers_denoiser", "load_pipeline",
           "native_to_canonical", "process_from_scheduler", "read_prompts"]
