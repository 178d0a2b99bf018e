"""Tiny random diffusers pipelines built from configs (no downloads), saved with ``save_pretrained``.

They have the architecture classes of the real teachers (UNet2DModel / DDPM, SD1.5, SDXL, SD3, FLUX)
at a few hundred thousand parameters, so tests, benchmarks and the recipe smoke tests run the same
code path as a real run on a 2-core CPU. Every builder returns the folder it wrote.

The tokenizers are built in memory: a byte-level CLIP BPE with no merges (514 tokens) and a
Unigram T5 vocabulary of single characters; models use ``bos_token_id``/``eos_token_id`` inside
that vocabulary.
"""

from __future__ import annotations

import os

import torch

CLIP_MAX_LEN = 16
T5_MAX_LEN = 32


def _clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LEN)


def _clip_config(projection_dim: int | None = None, hidden: int = 32):
    from transformers import CLIPTextConfig

    kw = dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=514, max_position_embeddings=CLIP_MAX_LEN, bos_token_id=0, eos_token_id=1,
              pad_token_id=1)
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LEN)


def _vae(latent_channels: int = 4, scaling_factor: float = 0.18215, shift_factor: float | None = None,
         sample_size: int = 16):
    from diffusers import AutoencoderKL

    kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
              up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
              layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, sample_size=sample_size,
              scaling_factor=scaling_factor)
    if shift_factor is not None:
        kw["shift_factor"] = shift_factor
    return AutoencoderKL(**kw)


def _vp_scheduler(prediction_type: str, beta_schedule: str = "scaled_linear", cls: str = "DDIMScheduler"):
    import diffusers

    kw = dict(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type)
    if cls != "EulerDiscreteScheduler":
        kw.update(clip_sample=False, steps_offset=1, set_alpha_to_one=False)  # SD's DDIM settings
    if beta_schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    return getattr(diffusers, cls)(**kw)


def save_tiny_ddpm(folder: str, prediction_type: str = "epsilon", num_class_embeds: int | None = None,
                   beta_schedule: str = "linear", seed: int = 0) -> str:
    """Pixel-space ``UNet2DModel`` (3x8x8, attention in one block) + ``DDPMScheduler`` as a
    ``DDPMPipeline`` folder; ``num_class_embeds`` makes it class-conditional."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                       num_class_embeds=num_class_embeds)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


def save_tiny_sd(folder: str, prediction_type: str = "epsilon", seed: int = 0) -> str:
    """SD1.5-style ``StableDiffusionPipeline``: UNet2DConditionModel (4x8x8 latents, cross-attention
    dim 32), CLIP text encoder, AutoencoderKL (16x16 images), DDIM scheduler with SD's betas."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_clip_config()), tokenizer=_clip_tokenizer(),
                                   unet=unet, scheduler=_vp_scheduler(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def save_tiny_sdxl(folder: str, seed: int = 0) -> str:
    """SDXL-style ``StableDiffusionXLPipeline``: two CLIP encoders (penultimate states concatenated,
    pooled projection), ``text_time`` added conditions, EulerDiscrete scheduler with SD's betas."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=64,
                                attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + 6 * 8, use_linear_projection=True)
    pipe = StableDiffusionXLPipeline(vae=_vae(scaling_factor=0.13025), text_encoder=CLIPTextModel(_clip_config()),
                                     text_encoder_2=CLIPTextModelWithProjection(_clip_config(projection_dim=32)),
                                     tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), unet=unet,
                                     scheduler=_vp_scheduler("epsilon", cls="EulerDiscreteScheduler"))
    pipe.save_pretrained(folder)
    return folder


def save_tiny_sd3(folder: str, shift: float = 3.0, seed: int = 0) -> str:
    """SD3-style ``StableDiffusion3Pipeline``: ``SD3Transformer2DModel`` (patch 2, one joint block),
    two CLIP encoders with projection, no T5 (``text_encoder_3=None``: the pipeline feeds zeros),
    16-channel-style VAE normalisation (scaling + shift), ``FlowMatchEulerDiscreteScheduler(shift)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                               attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                               joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(_clip_config(projection_dim=32)), tokenizer=_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(projection_dim=32)), tokenizer_2=_clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return folder


def save_tiny_flux(folder: str, guidance_embeds: bool = True, seed: int = 0) -> str:
    """FLUX-style ``FluxPipeline``: ``FluxTransformer2DModel`` (packed 2x2 latents, one double and one
    single block, guidance embedding when ``guidance_embeds``), CLIP + tiny T5, dynamic-shift
    flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=None, num_layers=1,
                                num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                axes_dims_rope=(2, 2, 4))
    t5 = T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=tr, scheduler=sched, vae=_vae(scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=CLIPTextModel(_clip_config()), tokenizer=_clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=_t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder


BUILDERS = {"ddpm": save_tiny_ddpm, "sd15": save_tiny_sd, "sdxl": save_tiny_sdxl, "sd3": save_tiny_sd3,
            "flux": save_tiny_flux}


def save_tiny(kind: str, folder: str, **kw) -> str:
    """Write the tiny pipeline ``kind`` (ddpm, sd15, sdxl, sd3, flux) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    return BUILDERS[kind](folder, **kw)
