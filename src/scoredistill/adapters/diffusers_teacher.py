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
and :meth:`DiffusersAssets.encode` convert to and from images in ``[-1, 1]``.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import NULL_CLASS, Denoiser, expand_t
from scoredistill.process.processes import Process, RectifiedFlow, VPDiscrete

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
FAMILIES = ("unet2d", "sd", "sdxl", "sd3", "flux")
TEACHER_KEYS = ("kind", "path", "process", "guidance_convention", "prompts", "negative_prompt", "null_class",
                "resolution", "embedded_guidance")
FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__ default guidance_scale


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

    def __init__(self, path: str, family: str, pipeline_class: str, scheduler_config: dict, teacher_cfg: dict):
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
        b = x_t.shape[0]
        t = expand_t(t, b, x_t.device)
        _set_lora(self.model, self.default_lora if lora is None else lora)
        dtype = self.model.dtype
        out = self._run(x_t.to(dtype), self.native_timestep(t).to(dtype), cond)
        if out.shape[1] == 2 * x_t.shape[1] and self.family == "unet2d":  # learned variance channels
            out = out[:, : x_t.shape[1]]
        return out.to(x_t.dtype)

    def denoise(self, x_t, t, cond=None, lora: bool | None = None):
        t = expand_t(t, x_t.shape[0], x_t.device)
        return self.process.to_x0(x_t, self.model_output(x_t, t, cond, lora), t, self.prediction)

    def forward(self, x_t, t, cond=None, lora: bool | None = None):
        return self.denoise(x_t, t, cond, lora)

    def _labels(self, cond, b, device):
        if not self.num_classes:
            if cond is not None and (cond >= 0).any():
                raise ValueError("this teacher is unconditional; got class labels")
            return None
        if cond is None:
            cond = torch.full((b,), NULL_CLASS, dtype=torch.long, device=device)
        if (cond < 0).any():
            if self.null_class is None:
                raise ConfigError("teacher.null_class", "this class-conditional UNet has no null class; CFG and "
                                  "condition dropout need one (or set objective.fake_cond_dropout: 0 and "
                                  "guidance_scale: 1)")
            cond = torch.where(cond < 0, torch.full_like(cond, self.null_class), cond)
        return cond.long()

    def _run(self, x, tn, cond):
        b = x.shape[0]
        if self.family == "unet2d":
            return self.model(x, tn, class_labels=self._labels(cond, b, x.device)).sample
        c = self.assets.cond_tensors(cond, b, x.device, x.dtype)
        if self.family == "sd":
            return self.model(x, tn, encoder_hidden_states=c["embeds"]).sample
        if self.family == "sdxl":
            extra = {"text_embeds": c["pooled"], "time_ids": c["time_ids"]}
            return self.model(x, tn, encoder_hidden_states=c["embeds"], added_cond_kwargs=extra).sample
        if self.family == "sd3":
            return self.model(hidden_states=x, timestep=tn, encoder_hidden_states=c["embeds"],
                              pooled_projections=c["pooled"]).sample
        if self.family == "flux":
            from diffusers import FluxPipeline

            _, ch, h, w = x.shape
            packed = FluxPipeline._pack_latents(x, b, ch, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
            guidance = None
            if getattr(self.model.config, "guidance_embeds", False):
                guidance = torch.full((b,), float(self.embedded_guidance), device=x.device, dtype=x.dtype)
            out = self.model(hidden_states=packed, timestep=tn, guidance=guidance, pooled_projections=c["pooled"],
                             encoder_hidden_states=c["embeds"], txt_ids=c["txt_ids"], img_ids=img_ids,
                             return_dict=False)[0]
            f = self.assets.vae_scale_factor
            return FluxPipeline._unpack_latents(out, h * f, w * f, f)
        raise ValueError(f"unknown family {self.family!r}")

    # -- features for discriminator heads -----------------------------------------------------------
    def _feature_module(self):
        m = self.model
        if self.family in ("unet2d", "sd", "sdxl"):
            if getattr(m, "mid_block", None) is None:
                raise ConfigError("fake_score.kind", "this UNet has no mid block to take discriminator features from")
            return m.mid_block
        return m.transformer_blocks[-1]

    def features(self, x_t, t, cond=None, lora: bool | None = None):
        """Bottleneck features (UNet mid block, or the last joint transformer block's image tokens),
        pooled to at most 4x4 spatially / averaged over tokens; on the autograd graph of ``x_t``."""
        store = {}
        hook = self._feature_module().register_forward_hook(lambda mod, i, o: store.__setitem__("h", o))
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
def read_prompts(spec) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        if not os.path.exists(spec):
            raise ConfigError("teacher.prompts", f"file not found: {spec} (give a list of prompts or a .txt file)")
        with open(spec, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    elif isinstance(spec, (list, tuple)) and all(isinstance(p, str) for p in spec):
        prompts = list(spec)
    else:
        raise ConfigError("teacher.prompts", "must be a list of strings or the path of a .txt file")
    if not prompts:
        raise ConfigError("teacher.prompts", "is empty")
    return prompts


def load_pipeline(path: str):
    """``DiffusionPipeline.from_pretrained`` on a local folder; components stored as ``[null, null]``
    in ``model_index.json`` (e.g. SD3 without T5) are passed as ``None``."""
    idx_path = os.path.join(path, "model_index.json")
    if not os.path.isdir(path):
        raise ConfigError("teacher.path", f"folder not found: {path}")
    if not os.path.exists(idx_path):
        raise ConfigError("teacher.path", f"{path} has no model_index.json; give a pipeline folder written by "
                          "DiffusionPipeline.save_pretrained")
    with open(idx_path) as f:
        index = json.load(f)
    none = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None}
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(path, **none), index
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError("teacher.path", f"cannot load the pipeline: {str(e).splitlines()[0]}") from None


def _family(model) -> str:
    name = type(model).__name__
    if name == "UNet2DModel":
        return "unet2d"
    if name == "UNet2DConditionModel":
        cfg = model.config
        if cfg.get("time_cond_proj_dim") is not None:
            raise ConfigError("teacher.path", "UNet with time_cond_proj_dim (LCM-style guidance embedding) is not "
                              "supported")
        add = cfg.get("addition_embed_type")
        if add == "text_time":
            return "sdxl"
        if add is not None or cfg.get("class_embed_type") is not None:
            raise ConfigError("teacher.path", f"UNet2DConditionModel with addition_embed_type={add!r} / "
                              f"class_embed_type={cfg.get('class_embed_type')!r} is not supported")
        return "sd"
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    raise ConfigError("teacher.path", f"network class {name} is not supported; accepted: UNet2DModel, "
                      "UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel")


def _resolution(spec, default: int) -> tuple[int, int]:
    if spec is None:
        return default, default
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        return spec, spec
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(v, int) and v > 0 for v in spec):
        return int(spec[0]), int(spec[1])
    raise ConfigError("teacher.resolution", f"must be a positive integer or [height, width], got {spec!r}")


@torch.no_grad()
def _encode_prompts(pipe, family: str, prompts: list[str], negative: str | None, resolution) -> dict:
    """Encode ``prompts`` and the negative prompt with the pipeline's own ``encode_prompt``."""
    dev = torch.device("cpu")
    negative_list = None if negative is None else [negative] * len(prompts)  # pipelines want prompt's type
    if family == "sd":
        pe, ne = pipe.encode_prompt(prompts, dev, 1, True, negative_prompt=negative_list)
        return {"embeds": torch.cat([pe, ne[:1]])}
    if family == "sdxl":
        pe, ne, pp, npool = pipe.encode_prompt(prompts, device=dev, num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=negative_list)
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pp.shape[-1]
        time_ids = pipe._get_add_time_ids(tuple(resolution), (0, 0), tuple(resolution), dtype=pe.dtype,
                                          text_encoder_projection_dim=proj)
        return {"embeds": torch.cat([pe, ne[:1]]), "pooled": torch.cat([pp, npool[:1]]), "time_ids": time_ids}
    if family == "sd3":
        pe, ne, pp, npool = pipe.encode_prompt(prompts, None, None, device=dev, num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=negative_list)
        return {"embeds": torch.cat([pe, ne[:1]]), "pooled": torch.cat([pp, npool[:1]])}
    if family == "flux":
        pe, pp, txt = pipe.encode_prompt(prompts, None, device=dev, num_images_per_prompt=1)
        ne, npool, _ = pipe.encode_prompt([negative or ""], None, device=dev, num_images_per_prompt=1)
        return {"embeds": torch.cat([pe, ne]), "pooled": torch.cat([pp, npool]), "txt_ids": txt}
    raise ValueError(family)


def build_diffusers_teacher(tcfg: dict) -> DiffusersDenoiser:
    """The teacher role for ``teacher.kind: diffusers`` (frozen, eval mode)."""
    path = tcfg.get("path")
    if not path:
        raise ConfigError("teacher.path", "missing; give a diffusers pipeline folder (save_pretrained)")
    pipe, index = load_pipeline(path)
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        raise ConfigError("teacher.path", f"{type(pipe).__name__} has no unet or transformer component")
    family = _family(model)
    sched_cfg = dict(pipe.scheduler.config)
    assets = DiffusersAssets(path, family, index.get("_class_name", type(pipe).__name__), sched_cfg,
                             {**{k: v for k, v in tcfg.items() if k != "process"}, "path": os.path.abspath(path)})
    vae = getattr(pipe, "vae", None)
    if family != "unet2d":
        if vae is None:
            raise ConfigError("teacher.path", "latent teacher without a vae component")
        assets.vae = vae.requires_grad_(False).eval()
        assets.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        assets.latent_scale = float(vae.config.scaling_factor)
        assets.latent_shift = float(vae.config.get("shift_factor") or 0.0)
    f = assets.vae_scale_factor
    mcfg = model.config
    if family == "unet2d":
        h, w = _resolution(tcfg.get("resolution"), int(mcfg.sample_size if isinstance(mcfg.sample_size, int)
                                                       else mcfg.sample_size[0]))
        data_shape = (int(mcfg.in_channels), h, w)
    elif family == "flux":
        h, w = _resolution(tcfg.get("resolution"), int(pipe.default_sample_size) * f)
        data_shape = (int(mcfg.in_channels) // 4, 2 * (h // (f * 2)), 2 * (w // (f * 2)))
    else:
        sz = mcfg.sample_size if isinstance(mcfg.sample_size, int) else mcfg.sample_size[0]
        h, w = _resolution(tcfg.get("resolution"), int(sz) * f)
        data_shape = (int(mcfg.in_channels), h // f, w // f)
    seq_len = (data_shape[1] // 2) * (data_shape[2] // 2) if family == "flux" else None
    process, prediction = process_from_scheduler(pipe.scheduler, seq_len)
    if family in ("sd3", "flux") and prediction != "flow":
        raise ConfigError("teacher.path", f"{family} transformer with a non-flow scheduler is not supported")
    if family not in ("sd3", "flux") and prediction == "flow":
        raise ConfigError("teacher.path", "flow-matching scheduler on a UNet is not supported")
    time_scale = 1.0
    if prediction == "flow" and family == "sd3":
        time_scale = float(sched_cfg.get("num_train_timesteps", 1000))
    num_classes = null_class = None
    prompts = read_prompts(tcfg.get("prompts"))
    if family == "unet2d":
        if prompts:
            raise ConfigError("teacher.prompts", "this UNet2DModel is not text-conditioned")
        n_emb = mcfg.get("num_class_embeds")
        null_class = tcfg.get("null_class")
        if n_emb:
            if null_class is not None and null_class != n_emb - 1:
                raise ConfigError("teacher.null_class", f"must be the last class embedding ({n_emb - 1})")
            num_classes = int(n_emb) - (1 if null_class is not None else 0)
        elif null_class is not None:
            raise ConfigError("teacher.null_class", "this UNet2DModel has no class embedding")
    else:
        if not prompts:
            raise ConfigError("teacher.prompts", "missing; a text-conditioned teacher needs a list of prompts "
                              "or a .txt file (one prompt a line)")
        if tcfg.get("null_class") is not None:
            raise ConfigError("teacher.null_class", "only for class-conditional UNet2DModel teachers")
        assets.prompts = prompts
        assets.table = {k: v.detach().float() for k, v in
                        _encode_prompts(pipe, family, prompts, tcfg.get("negative_prompt"), (h, w)).items()}
        num_classes = len(prompts)
    eg = tcfg.get("embedded_guidance")
    if family == "flux" and getattr(mcfg, "guidance_embeds", False):
        eg = FLUX_DEFAULT_GUIDANCE if eg is None else float(eg)
    elif eg is not None:
        raise ConfigError("teacher.embedded_guidance", "only for FLUX-style transformers with guidance_embeds")
    sigma_data = 0.5 if family == "unet2d" else 1.0  # EDM's image value; latents are normalised to unit scale
    teacher = DiffusersDenoiser(model, assets, process, prediction, time_scale, data_shape, num_classes, null_class,
                                sigma_data, eg)
    tcfg["process"] = process.describe()  # the resolved config records the process read from the scheduler
    del pipe  # text encoders and tokenizers are no longer needed
    return teacher.requires_grad_(False).eval()
