"""The diffusers families the adapter supports, one class each.

Everything that differs between network families lives in its class: which pipeline components the
folder must hold, the geometry (VAE factor, network downsampling, latent packing), the conditioning
and its cached embeddings, the factor from the process's native time to the network's ``timestep``,
the network call, the module whose output feeds a GAN head, and the export scheduler, call
arguments and verification. :func:`family_of` picks the class **once**, from the folder's
``model_index.json`` and the network's ``config.json``; the loader
(:func:`scoredistill.adapters.diffusers_teacher.build_diffusers_teacher`) and the export
(:mod:`scoredistill.adapters.export`) only call its methods.

==========  ===================================================  =====================================
class       network (pipeline)                                   what it adds to the base
==========  ===================================================  =====================================
UNet2D      ``UNet2DModel`` (``DDPMPipeline``), pixel space        class labels, learned-variance split
SD          ``UNet2DConditionModel`` + CLIP (SD1.x / SD2.x)        prompt embeddings
SDXL        ``UNet2DConditionModel`` with ``text_time``            pooled text + size ids
SD3         ``SD3Transformer2DModel`` (rectified flow)             pooled text, ``timestep = 1000 sigma``
Flux        ``FluxTransformer2DModel`` (rectified flow)            2x2 packing, image ids, guidance input
==========  ===================================================  =====================================

**A new family** is one subclass of :class:`VPUNetFamily` (DDPM-type scheduler, LCM export) or
:class:`FlowTransformerFamily` (flow matching, Euler export): set ``name``, ``network``,
``network_class``, ``components`` and (when several families share a network class) ``accepts``;
override :meth:`Family.call` and whatever else differs (prompt encoding, feature module, call
arguments); append it to :data:`FAMILIES` before any family of the same network class that it
specialises. docs/diffusers.md walks through it.
"""

from __future__ import annotations

import inspect
import json
import math
import os

import torch

from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import NULL_CLASS

FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__ default guidance_scale


def read_prompts(spec) -> list[str]:
    """``teacher.prompts``: a list of strings or a ``.txt`` file, one prompt a line."""
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


def _sample_size(cfg) -> int:
    s = cfg.get("sample_size")
    return int(s if isinstance(s, int) else s[0])


def _downsamplers(model) -> int:
    """How many times a UNet halves its input (down blocks that carry a downsampler)."""
    return sum(1 for b in getattr(model, "down_blocks", ()) if getattr(b, "downsamplers", None))


# ------------------------------------------------------------------------------------------------
class Family:
    """What one network family needs; the defaults are those of a text-conditioned latent model."""

    name = ""
    network = "unet"  # the pipeline component holding the denoising network
    network_class = ""  # its diffusers class name (model_index.json)
    components: tuple[str, ...] = ()  # further components the folder must hold
    variant = ""  # what ``accepts`` requires of the network config (listed when nothing accepts)
    latent = True
    sigma_data = 1.0  # EDM loss scale: the library normalises latents to unit scale
    pipeline_multiple = 1  # the pipeline's own check_inputs divisor on height / width (pixels)

    def __deepcopy__(self, memo):  # stateless: every copy of a role shares it
        return self

    def __repr__(self):
        return f"{type(self).__name__}()"

    @classmethod
    def accepts(cls, net_cfg: dict) -> bool:
        return True

    def check_network(self, net_cfg: dict) -> None:
        """Reject variants of the network class that the call below does not handle."""

    # -- geometry ----------------------------------------------------------------------------------
    def network_factor(self, model) -> int:
        """Divisor the network needs on its (latent) input height and width."""
        raise NotImplementedError

    def default_resolution(self, model, pipe, f: int) -> int:
        return _sample_size(model.config) * f

    def data_shape(self, model, h: int, w: int, f: int) -> tuple[int, int, int]:
        return int(model.config.in_channels), h // f, w // f

    def check_resolution(self, model, h: int, w: int, f: int, given: bool) -> None:
        """Height and width must be multiples of the VAE factor times the network's factor, and of
        what the pipeline itself checks, or the student trains at a size its export cannot sample."""
        n = self.network_factor(model)
        m = math.lcm(f * n, self.pipeline_multiple)
        if h % m or w % m:
            what = f"{h}x{w}" if given else f"the default {h}x{w}"
            parts = [f"VAE factor {f}", f"network factor {n}"]
            if self.pipeline_multiple > 1:
                parts.append(f"{self.pipeline_multiple} checked by the pipeline")
            v = h if h % m else w
            raise ConfigError("teacher.resolution", f"{what} pixels is not a multiple of {m} ({', '.join(parts)}); "
                              f"accepted: multiples of {m}, e.g. {max(m, (v // m) * m)} or {(v // m + 1) * m}")

    def seq_len(self, data_shape) -> int | None:
        """The latent sequence length a dynamically shifted scheduler needs (None: not used)."""
        return None

    # -- process and time --------------------------------------------------------------------------
    def check_prediction(self, prediction: str) -> None:
        raise NotImplementedError

    def time_scale(self, sched_cfg: dict) -> float:
        """The network's ``timestep`` is the process's native time times this factor."""
        return 1.0

    # -- conditioning ------------------------------------------------------------------------------
    def conditioning(self, pipe, model, assets, tcfg: dict, resolution) -> tuple[int | None, int | None]:
        """Fill ``assets.prompts`` / ``assets.table`` and return ``(num_classes, null_class)``."""
        prompts = read_prompts(tcfg.get("prompts"))
        if not prompts:
            raise ConfigError("teacher.prompts", "missing; a text-conditioned teacher needs a list of prompts "
                              "or a .txt file (one prompt a line)")
        if tcfg.get("null_class") is not None:
            raise ConfigError("teacher.null_class", "only for class-conditional UNet2DModel teachers")
        assets.prompts = prompts
        with torch.no_grad():
            table = self.encode_prompts(pipe, prompts, tcfg.get("negative_prompt"), resolution)
        assets.table = {k: v.detach().float() for k, v in table.items()}
        return len(prompts), None

    def encode_prompts(self, pipe, prompts: list[str], negative: str | None, resolution) -> dict:
        """``{"embeds": (P+1, L, D), ...}`` with the pipeline's own ``encode_prompt``; row ``P`` is
        the negative prompt (the unconditional branch)."""
        raise NotImplementedError

    def embedded_guidance(self, tcfg: dict, net_cfg) -> float | None:
        if tcfg.get("embedded_guidance") is not None:
            raise ConfigError("teacher.embedded_guidance", "only for FLUX-style transformers with guidance_embeds")
        return None

    # -- the network call --------------------------------------------------------------------------
    def call(self, d, x: torch.Tensor, tn: torch.Tensor, cond) -> torch.Tensor:
        """The network's raw prediction for ``x`` (in the network's dtype) at native timestep ``tn``;
        ``d`` is the :class:`~scoredistill.adapters.diffusers_teacher.DiffusersDenoiser`."""
        raise NotImplementedError

    def feature_module(self, model):
        """The module whose output a discriminator head reads."""
        raise NotImplementedError

    # -- export ------------------------------------------------------------------------------------
    def export_scheduler(self, gen, sched_cfg: dict):
        """``(scheduler, call arguments)`` reproducing the student's K-step rollout."""
        raise NotImplementedError

    def check_export(self, gen, call: dict) -> None:
        """Refuse students the exported pipeline cannot reproduce."""

    def exported_network(self, net, d):
        """The student network as the exported pipeline stores it."""
        return net

    def call_kwargs(self, d, call: dict) -> dict:
        """Pipeline call arguments: the scheduler's plus size and guidance (the student is unguided:
        diffusers skips CFG for ``guidance_scale <= 1``)."""
        f = d.assets.vae_scale_factor
        return {**call, "height": d.data_shape[1] * f, "width": d.data_shape[2] * f, "guidance_scale": 1.0}

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """The library's ``(B, C, H, W)`` latents in the layout the pipeline takes as ``latents``."""
        return z

    def unpack(self, lat: torch.Tensor, d) -> torch.Tensor:
        return lat

    def readme_call(self, args: str) -> str:
        return f"pipe(prompt, {args})"

    def run_exported(self, pipe, d, z: torch.Tensor, cond, kw_first: dict, kw_full: dict, seed: int):
        """``(first step, student reference space, full K-step images)`` from a reloaded pipeline:
        the first step from the student's own noise, comparable with the student's first x0."""
        prompts = [d.assets.prompts[int(i)] for i in cond]
        out = pipe(prompt=prompts, latents=self.pack(z), output_type="latent", **kw_first).images
        full = pipe(prompt=prompts, generator=torch.Generator().manual_seed(seed), output_type="np",
                    **kw_full).images
        return self.unpack(out, d).double(), full

    def reference(self, x0: torch.Tensor) -> torch.Tensor:
        """The student's first x0 in the space :meth:`run_exported` returns its first step in."""
        return x0.double()

    # the pipeline draws its noise in the library's latent layout (not FLUX's packed one), so a reloaded
    # pipeline and the student can be compared sample for sample from one noise stream
    same_noise = True

    def step_calls(self, gen, call: dict) -> dict[str, dict]:
        """Scheduler call arguments sampling with ``K' = 1..K`` of the student's ``K`` steps, evenly strided as
        ``scoredistill sample --steps K'`` strides them (LCM's ``num_inference_steps = K'`` with
        ``original_inference_steps = K`` picks the same ``floor(i K / K')``); keyed by ``str(K')`` (JSON)."""
        from scoredistill.models.rollout import strided_subset

        k = len(gen.timesteps)
        out = {}
        for kp in range(1, k + 1):
            if "num_inference_steps" in call:
                if _ddim(gen) and [gen.timesteps[j] for j in strided_subset(k, kp)] != lcm_grid(kp, self._n(gen)):
                    continue  # DDIM's trailing grid of K' steps is not the student's strided subset
                out[str(kp)] = {"num_inference_steps": kp}
            else:
                key = "timesteps" if "timesteps" in call else "sigmas"
                out[str(kp)] = {key: [call[key][j] for j in strided_subset(k, kp)]}
        return out

    @staticmethod
    def _n(gen) -> int:
        return int(gen.base.assets.scheduler_config.get("num_train_timesteps", 1000))

    def sample_exported(self, pipe, d, z: torch.Tensor, cond, kw: dict, noise_seed: int) -> torch.Tensor:
        """A reloaded pipeline's sample (student space) from the student's noise ``z`` (``latents``), its
        re-noising drawn from ``torch.Generator().manual_seed(noise_seed)``."""
        prompts = [d.assets.prompts[int(i)] for i in cond]
        out = pipe(prompt=prompts, latents=self.pack(z), generator=torch.Generator().manual_seed(noise_seed),
                   output_type="latent", **kw).images
        return self.unpack(out, d).double()

    def student_inputs(self, z: torch.Tensor, noise_seed: int):
        """``(z, re-noising generator)`` that give the student the noise :meth:`sample_exported` gives the pipeline."""
        return z, torch.Generator().manual_seed(noise_seed)


# ------------------------------------------------------------------------------------------------
class VPUNetFamily(Family):
    """UNets with a DDPM-type scheduler; exported with an ``LCMScheduler``."""

    def network_factor(self, model) -> int:
        return 2 ** _downsamplers(model)

    def check_prediction(self, prediction: str) -> None:
        if prediction == "flow":
            raise ConfigError("teacher.path", "flow-matching scheduler on a UNet is not supported")

    def feature_module(self, model):
        if getattr(model, "mid_block", None) is None:
            raise ConfigError("fake_score.kind", "this UNet has no mid block to take discriminator features from")
        return model.mid_block

    def export_scheduler(self, gen, sched_cfg: dict):
        """``LCMScheduler`` from the teacher's betas (``clip_sample`` off): its step is "x0, then re-noise
        to the next timestep with fresh noise", the student's rollout. Only LCM's own config keys are
        passed on, so the exported ``scheduler_config.json`` loads without unexpected-key warnings."""
        from diffusers import LCMScheduler

        n_train = int(sched_cfg.get("num_train_timesteps", 1000))
        k = len(gen.timesteps)
        on_grid = list(gen.timesteps) == lcm_grid(k, n_train)
        if _ddim(gen):
            return self._ddim_scheduler(gen, sched_cfg, on_grid)
        cfg = own_keys(LCMScheduler, sched_cfg)
        # timestep_scaling 1e4 makes LCM's boundary blend c_skip (<= 2.5e-9 at timestep >= 1) vanish: the
        # student's x0 is its consistency output already
        sched = LCMScheduler.from_config(cfg, original_inference_steps=k if on_grid else 50, clip_sample=False,
                                         thresholding=False, timestep_spacing="leading", timestep_scaling=1e4)
        call = {"num_inference_steps": k} if on_grid else {"timesteps": [int(v) for v in gen.timesteps]}
        return sched, call

    @staticmethod
    def _ddim_scheduler(gen, sched_cfg: dict, on_grid: bool):
        """``DDIMScheduler`` with eta 0 (the pipelines' default): x0, then re-noise with the model's own noise
        estimate to ``timestep - N / K`` -- the student's next timestep exactly when its timesteps are the
        trailing grid (= LCM's grid) -- and the last step to x0 itself (``set_alpha_to_one``)."""
        from diffusers import DDIMScheduler

        if not on_grid:
            n_train = int(sched_cfg.get("num_train_timesteps", 1000))
            raise ConfigError("generator.timesteps", f"a ddim student exports with DDIMScheduler, which steps on its "
                              f"trailing grid only; accepted for {len(gen.timesteps)} steps: "
                              f"{lcm_grid(len(gen.timesteps), n_train)}, got {list(gen.timesteps)}")
        sched = DDIMScheduler.from_config(own_keys(DDIMScheduler, sched_cfg), clip_sample=False, thresholding=False,
                                          set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=0)
        return sched, {"num_inference_steps": len(gen.timesteps)}


def own_keys(scheduler_cls, sched_cfg: dict) -> dict:
    """The teacher scheduler's config restricted to ``scheduler_cls``'s own arguments, so the exported
    ``scheduler_config.json`` loads without unexpected-key warnings."""
    own = set(inspect.signature(scheduler_cls.__init__).parameters) - {"self"}
    return {key: v for key, v in sched_cfg.items() if key in own}


def _ddim(gen) -> bool:
    """A student re-noising with its own noise estimate between steps (with one step, every mode is alike)."""
    return gen.rollout.mode == "ddim" and len(gen.timesteps) > 1


def lcm_grid(k: int, n_train: int) -> list[int]:
    """``LCMScheduler``'s timesteps for ``num_inference_steps = k = original_inference_steps``."""
    step = n_train // k
    return [j * step - 1 for j in range(k, 0, -1)]


class UNet2D(VPUNetFamily):
    """Pixel-space ``UNet2DModel``: unconditional, or class labels with the last embedding as null."""

    name = "unet2d"
    network_class = "UNet2DModel"
    latent = False
    sigma_data = 0.5  # EDM's value for images in [-1, 1]

    def default_resolution(self, model, pipe, f: int) -> int:
        return _sample_size(model.config)

    def conditioning(self, pipe, model, assets, tcfg: dict, resolution):
        if read_prompts(tcfg.get("prompts")):
            raise ConfigError("teacher.prompts", "this UNet2DModel is not text-conditioned")
        n_emb = model.config.get("num_class_embeds")
        null_class = tcfg.get("null_class")
        if n_emb:
            if null_class is not None and null_class != n_emb - 1:
                raise ConfigError("teacher.null_class", f"must be the last class embedding ({n_emb - 1})")
            return int(n_emb) - (1 if null_class is not None else 0), null_class
        if null_class is not None:
            raise ConfigError("teacher.null_class", "this UNet2DModel has no class embedding")
        return None, None

    @staticmethod
    def labels(d, cond, b, device):
        if not d.num_classes:
            if cond is not None and (cond >= 0).any():
                raise ValueError("this teacher is unconditional; got class labels")
            return None
        if cond is None:
            cond = torch.full((b,), NULL_CLASS, dtype=torch.long, device=device)
        if (cond < 0).any():
            if d.null_class is None:
                raise ConfigError("teacher.null_class", "this class-conditional UNet has no null class; CFG and "
                                  "condition dropout need one (or set objective.fake_cond_dropout: 0 and "
                                  "guidance_scale: 1)")
            cond = torch.where(cond < 0, torch.full_like(cond, d.null_class), cond)
        return cond.long()

    def call(self, d, x, tn, cond):
        out = d.model(x, tn, class_labels=self.labels(d, cond, x.shape[0], x.device)).sample
        if out.shape[1] == 2 * x.shape[1]:  # learned-variance channels follow the mean's
            out = out[:, : x.shape[1]]
        return out

    def check_export(self, gen, call: dict) -> None:
        d = gen.base
        if d.assets.pipeline_class == "DDPMPipeline" and "num_inference_steps" not in call:
            raise ConfigError("export", f"DDPMPipeline cannot take custom timesteps; the student's {gen.timesteps} "
                              f"are not LCM's grid {lcm_grid(len(gen.timesteps), d.process.num_steps)}")
        if d.num_classes:
            raise ConfigError("export", "class-conditional UNet2DModel students have no diffusers pipeline "
                              "(DDPMPipeline is unconditional); not supported yet")

    def exported_network(self, net, d):
        """DDPMPipeline samples at the UNet's ``sample_size`` (it takes no height / width): record the
        resolution the student was trained at."""
        h, w = d.data_shape[1:]
        net.register_to_config(sample_size=h if h == w else [h, w])
        return net

    def call_kwargs(self, d, call: dict) -> dict:
        return dict(call)

    def readme_call(self, args: str) -> str:
        return f"pipe({args})"

    def run_exported(self, pipe, d, z, cond, kw_first, kw_full, seed):
        """DDPMPipeline draws its own noise and returns images: its first step is compared in [0, 1]
        image space, with an LCM scheduler whose grid is that one step."""
        import numpy as np
        from diffusers import LCMScheduler

        n = z.shape[0]
        full_sched = pipe.scheduler
        pipe.scheduler = LCMScheduler.from_config(full_sched.config, original_inference_steps=1)
        img = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), output_type="np", **kw_first).images
        pipe.scheduler = full_sched
        full = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), output_type="np", **kw_full).images
        return torch.from_numpy(np.asarray(img)).permute(0, 3, 1, 2).double(), full

    def reference(self, x0):
        return (x0.double() / 2 + 0.5).clamp(0, 1)

    def sample_exported(self, pipe, d, z, cond, kw, noise_seed):
        """DDPMPipeline takes no latents: it draws ``z`` from the generator, then the re-noising (images in [0, 1])."""
        import numpy as np

        img = pipe(batch_size=z.shape[0], generator=torch.Generator().manual_seed(noise_seed), output_type="np",
                   **kw).images
        return torch.from_numpy(np.asarray(img)).permute(0, 3, 1, 2).double()

    def student_inputs(self, z, noise_seed):
        g = torch.Generator().manual_seed(noise_seed)
        return torch.randn(z.shape, generator=g, dtype=z.dtype), g


class SD(VPUNetFamily):
    """SD1.x / SD2.x: ``UNet2DConditionModel`` cross-attending to CLIP prompt embeddings."""

    name = "sd"
    network_class = "UNet2DConditionModel"
    components = ("vae", "text_encoder", "tokenizer")
    variant = "addition_embed_type=None, class_embed_type=None (SD1.x/2.x)"
    pipeline_multiple = 8  # StableDiffusion(XL)Pipeline.check_inputs

    @classmethod
    def accepts(cls, net_cfg):
        return net_cfg.get("addition_embed_type") is None and net_cfg.get("class_embed_type") is None

    def check_network(self, net_cfg):
        if net_cfg.get("time_cond_proj_dim") is not None:
            raise ConfigError("teacher.path", "UNet with time_cond_proj_dim (LCM-style guidance embedding) is not "
                              "supported")

    def encode_prompts(self, pipe, prompts, negative, resolution):
        negative_list = None if negative is None else [negative] * len(prompts)  # pipelines want prompt's type
        pe, ne = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True, negative_prompt=negative_list)
        return {"embeds": torch.cat([pe, ne[:1]])}

    def call(self, d, x, tn, cond):
        c = d.assets.cond_tensors(cond, x.shape[0], x.device, x.dtype)
        return d.model(x, tn, encoder_hidden_states=c["embeds"]).sample


class SDXL(SD):
    """SDXL: two CLIP encoders, pooled text and ``(size, crop, target size)`` ids as added conditions;
    the size ids are fixed to ``(resolution, (0, 0), resolution)``."""

    name = "sdxl"
    components = ("vae", "text_encoder_2", "tokenizer_2")
    variant = "addition_embed_type='text_time' (SDXL)"

    @classmethod
    def accepts(cls, net_cfg):
        return net_cfg.get("addition_embed_type") == "text_time"

    def encode_prompts(self, pipe, prompts, negative, resolution):
        negative_list = None if negative is None else [negative] * len(prompts)
        pe, ne, pp, npool = pipe.encode_prompt(prompts, device=torch.device("cpu"), num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=negative_list)
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pp.shape[-1]
        time_ids = pipe._get_add_time_ids(tuple(resolution), (0, 0), tuple(resolution), dtype=pe.dtype,
                                          text_encoder_projection_dim=proj)
        return {"embeds": torch.cat([pe, ne[:1]]), "pooled": torch.cat([pp, npool[:1]]), "time_ids": time_ids}

    def call(self, d, x, tn, cond):
        c = d.assets.cond_tensors(cond, x.shape[0], x.device, x.dtype)
        extra = {"text_embeds": c["pooled"], "time_ids": c["time_ids"]}
        return d.model(x, tn, encoder_hidden_states=c["embeds"], added_cond_kwargs=extra).sample


# ------------------------------------------------------------------------------------------------
class FlowTransformerFamily(Family):
    """Rectified-flow transformers (velocity prediction); exported with a stochastic Euler scheduler."""

    network = "transformer"

    def network_factor(self, model) -> int:
        return int(model.config.get("patch_size") or 1)

    def check_prediction(self, prediction: str) -> None:
        if prediction != "flow":
            raise ConfigError("teacher.path", f"{self.name} transformer with a non-flow scheduler is not supported")

    def feature_module(self, model):
        return model.transformer_blocks[-1]

    def export_scheduler(self, gen, sched_cfg: dict):
        """``FlowMatchEulerDiscreteScheduler(shift=1)`` called with the student's sigmas (already shifted):
        with ``stochastic_sampling`` each step is "x0, then re-noise with fresh noise"; without it (``ddim``
        students) the Euler step ``x + (s' - s) v`` is "x0, then re-noise with the model's own noise estimate"."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        n_train = int(sched_cfg.get("num_train_timesteps", 1000))
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=n_train, shift=1.0, use_dynamic_shifting=False,
                                                stochastic_sampling=not _ddim(gen))
        return sched, {"sigmas": [float(v) / n_train for v in gen.timesteps]}


class SD3(FlowTransformerFamily):
    """SD3: joint transformer on patches; receives ``1000 sigma`` as ``StableDiffusion3Pipeline`` passes it;
    T5 is optional (``text_encoder_3: [null, null]``: the pipeline feeds zeros)."""

    name = "sd3"
    network_class = "SD3Transformer2DModel"
    components = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    def time_scale(self, sched_cfg):
        return float(sched_cfg.get("num_train_timesteps", 1000))

    def encode_prompts(self, pipe, prompts, negative, resolution):
        negative_list = None if negative is None else [negative] * len(prompts)
        pe, ne, pp, npool = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"),
                                               num_images_per_prompt=1, do_classifier_free_guidance=True,
                                               negative_prompt=negative_list)
        return {"embeds": torch.cat([pe, ne[:1]]), "pooled": torch.cat([pp, npool[:1]])}

    def call(self, d, x, tn, cond):
        c = d.assets.cond_tensors(cond, x.shape[0], x.device, x.dtype)
        return d.model(hidden_states=x, timestep=tn, encoder_hidden_states=c["embeds"],
                       pooled_projections=c["pooled"]).sample


class Flux(FlowTransformerFamily):
    """FLUX: latents packed into 2x2 patches with positional image ids, dynamic shift from the sequence
    length, ``sigma`` itself as timestep (the transformer multiplies by 1000), and for guidance-distilled
    models the guidance scale as an input (``teacher.embedded_guidance``, not CFG)."""

    name = "flux"
    network_class = "FluxTransformer2DModel"
    same_noise = False  # its pipeline draws noise in the packed (B, HW/4, 4C) layout
    components = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    def network_factor(self, model) -> int:
        return 2 * int(model.config.get("patch_size") or 1)  # 2x2 packing, then the patch embedding

    def default_resolution(self, model, pipe, f):
        return int(pipe.default_sample_size) * f

    def data_shape(self, model, h, w, f):
        return int(model.config.in_channels) // 4, 2 * (h // (f * 2)), 2 * (w // (f * 2))

    def seq_len(self, data_shape):
        return (data_shape[1] // 2) * (data_shape[2] // 2)

    def encode_prompts(self, pipe, prompts, negative, resolution):
        dev = torch.device("cpu")
        pe, pp, txt = pipe.encode_prompt(prompts, None, device=dev, num_images_per_prompt=1)
        ne, npool, _ = pipe.encode_prompt([negative or ""], None, device=dev, num_images_per_prompt=1)
        return {"embeds": torch.cat([pe, ne]), "pooled": torch.cat([pp, npool]), "txt_ids": txt}

    def embedded_guidance(self, tcfg, net_cfg):
        eg = tcfg.get("embedded_guidance")
        if getattr(net_cfg, "guidance_embeds", False):
            return FLUX_DEFAULT_GUIDANCE if eg is None else float(eg)
        return super().embedded_guidance(tcfg, net_cfg)

    def pack(self, z):
        from diffusers import FluxPipeline

        return FluxPipeline._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])

    def unpack(self, lat, d):
        from diffusers import FluxPipeline

        f = d.assets.vae_scale_factor
        return FluxPipeline._unpack_latents(lat, d.data_shape[1] * f, d.data_shape[2] * f, f)

    def call(self, d, x, tn, cond):
        from diffusers import FluxPipeline

        b, _, h, w = x.shape
        c = d.assets.cond_tensors(cond, b, x.device, x.dtype)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        guidance = None
        if getattr(d.model.config, "guidance_embeds", False):
            guidance = torch.full((b,), float(d.embedded_guidance), device=x.device, dtype=x.dtype)
        out = d.model(hidden_states=self.pack(x), timestep=tn, guidance=guidance, pooled_projections=c["pooled"],
                      encoder_hidden_states=c["embeds"], txt_ids=c["txt_ids"], img_ids=img_ids,
                      return_dict=False)[0]
        f = d.assets.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * f, w * f, f)

    def call_kwargs(self, d, call):
        kw = super().call_kwargs(d, call)
        kw["guidance_scale"] = float(d.embedded_guidance) if d.embedded_guidance is not None else 1.0
        return kw


# the first family whose network class matches and that accepts the network's config is used
FAMILIES: tuple[type[Family], ...] = (UNet2D, SDXL, SD, SD3, Flux)


# ------------------------------------------------------------------------------------------------
def read_index(path: str) -> dict:
    """``model_index.json`` of a local pipeline folder (one-line errors for anything else)."""
    if not os.path.isdir(path):
        if _looks_like_hub_id(path):
            raise ConfigError("teacher.path", f"{path!r} is not a local folder, and nothing is downloaded; if it is "
                              "a Hugging Face hub id, download the pipeline first (e.g. `huggingface-cli download "
                              f"{path} --local-dir DIR`) and give DIR")
        raise ConfigError("teacher.path", f"folder not found: {path}")
    idx_path = os.path.join(path, "model_index.json")
    if not os.path.exists(idx_path):
        raise ConfigError("teacher.path", f"{path} has no model_index.json; give a pipeline folder written by "
                          "DiffusionPipeline.save_pretrained")
    try:
        with open(idx_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError("teacher.path", f"{idx_path} is not readable JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(index, dict):
        raise ConfigError("teacher.path", f"{idx_path} is not a JSON object")
    return index


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return (len(parts) == 2 and all(parts) and not path.startswith((".", "~"))
            and all(c.isalnum() or c in "-_." for c in path.replace("/", "")))


def components_of(index: dict) -> dict[str, str | None]:
    """``{component: class name or None}`` for the pipeline components ``model_index.json`` lists."""
    out = {}
    for k, v in index.items():
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2:
            out[k] = v[1]
    return out


def check_components(path: str, index: dict, family: Family) -> None:
    """Every component the index names (and every one the family needs) is a subfolder of ``path``."""
    comps = components_of(index)
    for name in (family.network, "scheduler", *family.components):
        if comps.get(name) is None:
            raise ConfigError("teacher.path", f"{path}: model_index.json has no {name} component, which a "
                              f"{family.name} pipeline needs")
    for name, cls in comps.items():
        sub = os.path.join(path, name)
        if cls is not None and (not os.path.isdir(sub) or not os.listdir(sub)):
            raise ConfigError("teacher.path", f"{path} is missing the {name}/ component ({cls}) that "
                              "model_index.json lists")


def family_of(path: str, index: dict) -> Family:
    """The family of the pipeline folder ``path`` (picked once, from its index and network config)."""
    comps = components_of(index)
    network = next((k for k in ("unet", "transformer") if comps.get(k)), None)
    if network is None:
        raise ConfigError("teacher.path", f"{index.get('_class_name', 'the pipeline')} in {path} has no unet or "
                          "transformer component")
    cls_name = comps[network]
    known = [f for f in FAMILIES if f.network_class == cls_name and f.network == network]
    if not known:
        accepted = ", ".join(dict.fromkeys(f.network_class for f in FAMILIES))
        raise ConfigError("teacher.path", f"network class {cls_name} is not supported; accepted: {accepted}")
    cfg_path = os.path.join(path, network, "config.json")
    try:
        with open(cfg_path) as f:
            net_cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError("teacher.path", f"{path} is missing the {network}/ component ({cls_name}) that "
                          "model_index.json lists") from None
    except (OSError, ValueError) as e:
        raise ConfigError("teacher.path", f"{cfg_path} is not readable JSON: {str(e).splitlines()[0]}") from None
    for fam in known:
        if fam.accepts(net_cfg):
            family = fam()
            family.check_network(net_cfg)
            return family
    raise ConfigError("teacher.path", f"{cls_name} with this config is not supported; accepted: "
                      f"{'; '.join(f.variant for f in known)}")
