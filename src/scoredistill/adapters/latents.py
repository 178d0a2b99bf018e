"""VAE latents for latent-space distillation.

Roles of a latent teacher (SD, SDXL, SD3, FLUX) work on the VAE's normalised latents
``(z - shift_factor) * scaling_factor``; only objectives that declare ``real_data`` (DMD2 with its GAN
term, SiDA) need real samples, and those must be latents too. Encode an image array once::

    python -m scoredistill.adapters.latents --teacher PIPELINE_DIR images.npy latents.npy

``images.npy``: ``(N, 3, H, W)`` float in ``[-1, 1]`` (or uint8 ``(N, H, W, 3)``, converted), at the
teacher's resolution. Then set ``train.real_data: latents.npy``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from scoredistill.errors import ConfigError


def load_vae(path: str):
    """``(vae, scaling_factor, shift_factor)`` from a pipeline folder's ``vae`` subfolder."""
    from diffusers import AutoencoderKL

    if not os.path.isfile(os.path.join(path, "vae", "config.json")):
        raise ConfigError("--teacher", f"{path} has no vae/ component (a latent pipeline folder written by "
                          "save_pretrained holds vae/config.json)")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").requires_grad_(False).eval()
    return vae, float(vae.config.scaling_factor), float(vae.config.get("shift_factor") or 0.0)


def as_images(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == np.uint8:
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError("uint8 images must be (N, H, W, 3)")
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError("float images must be (N, 3, H, W) in [-1, 1]")
    return torch.from_numpy(arr.astype(np.float32))


@torch.no_grad()
def encode_images(vae, scale: float, shift: float, images: torch.Tensor, batch: int = 16, sample: bool = True,
                  seed: int = 0) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> normalised latents (``latent_dist.sample`` with a seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch]).latent_dist
        z = dist.sample(generator=g) if sample else dist.mode()
        out.append((z - shift) * scale)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, scale: float, shift: float, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents / scale + shift).sample


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m scoredistill.adapters.latents",
                                description="encode images to the teacher's normalised VAE latents")
    p.add_argument("--teacher", required=True, help="diffusers pipeline folder with a vae/ subfolder")
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--mode", action="store_true", help="use the posterior mode instead of a sample")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        vae, scale, shift = load_vae(a.teacher)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    lat = encode_images(vae, scale, shift, as_images(np.load(a.images)), sample=not a.mode, seed=a.seed)
    np.save(a.out, lat.numpy().astype(np.float32))
    print(f"wrote {a.out} {tuple(lat.shape)}")


if __name__ == "__main__":
    sys.exit(main())
