"""Latent parameterization (``params.kind: latent``): ``n`` latent tensors seen through a diffusers
``AutoencoderKL``.

The optimized tensor is the VAE's **normalised** latent ``z = (z_vae - shift_factor) * scaling_factor``
(what a latent diffusion teacher denoises; :mod:`scoredistill.adapters.latents` uses the same
convention). Two documented choices, ``params.decode``:

* ``decode: true`` (default) — the teacher sees the decoded image ``vae.decode(z / scale + shift)``;
  the objective's field reaches ``z`` through the decoder's Jacobian (a pixel-space teacher — e.g. a
  ``DDPMPipeline`` or a GMM over flattened images — with a latent "renderer"). The decoded image is
  reshaped to the teacher's data shape when the sizes agree.
* ``decode: false`` — the teacher sees ``z`` itself (a latent diffusion teacher: SD, SDXL, SD3, FLUX,
  threestudio's ``rgb_as_latents: true`` path); the VAE is only used to decode the result
  (:meth:`LatentTensor.decoded`).

``params.vae`` is a folder written by ``AutoencoderKL.save_pretrained`` or a pipeline folder with a
``vae/`` subfolder. The VAE is frozen, kept in eval mode and is **not** part of the module's
``state_dict`` (so ``params.safetensors`` and checkpoints hold only ``z``), but follows ``.to()``.

Latent shape: ``params.shape`` if given, else the teacher's data shape (``decode: false``) or, for a
``(C, H, W)`` teacher with ``decode: true``, ``(latent_channels, H / f, W / f)`` with the VAE's
downsampling factor ``f = 2 ** (len(block_out_channels) - 1)``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from scoredistill.errors import ConfigError
from scoredistill.optimize.params import Parameterization, Rendered


def load_autoencoder(path) -> tuple[nn.Module, float, float]:
    """``(vae, scaling_factor, shift_factor)``; every failure is a one-line ``ConfigError`` on ``params.vae``."""
    if not isinstance(path, str) or not path:
        raise ConfigError("params.vae", f"must be the folder of a diffusers AutoencoderKL, got {path!r}")
    if not os.path.isdir(path):
        raise ConfigError("params.vae", f"folder not found: {path}")
    if os.path.exists(os.path.join(path, "config.json")):
        kw = {}
    elif os.path.exists(os.path.join(path, "vae", "config.json")):
        kw = {"subfolder": "vae"}
    else:
        raise ConfigError("params.vae", f"{path} has no config.json (nor vae/config.json); give a folder "
                          "written by AutoencoderKL.save_pretrained or a pipeline folder")
    try:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path, **kw)
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError variants
        msg = " ".join(str(e).split())[:200]
        raise ConfigError("params.vae", f"cannot load an AutoencoderKL from {path} ({type(e).__name__}: "
                          f"{msg})") from None
    vae = vae.float().requires_grad_(False).eval()
    scale = float(vae.config.scaling_factor)
    shift = float(vae.config.get("shift_factor") or 0.0)
    return vae, scale, shift


def vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


class LatentTensor(Parameterization):
    kind = "latent"

    def __init__(self, vae: nn.Module, scale: float, shift: float, shape: tuple[int, ...], init: torch.Tensor,
                 n: int = 1, decode: bool = True, out_shape: tuple[int, ...] | None = None, repeat: int = 1,
                 classes=None, views=None):
        super().__init__(classes, views)
        if tuple(init.shape) != (n, *shape):
            raise ConfigError("params.init", f"initial latents have shape {tuple(init.shape)}, need {(n, *shape)}")
        self.num_items = int(n)
        self.shape = tuple(shape)
        self.decode = bool(decode)
        self.out_shape = tuple(out_shape) if out_shape is not None else None
        self.repeat = int(repeat)
        self.scale, self.shift = float(scale), float(shift)
        self._vae = [vae]            # a list: not a submodule (kept out of state_dict / the optimizer)
        self.z = nn.Parameter(init.float().clone())

    @property
    def vae(self) -> nn.Module:
        return self._vae[0]

    def _apply(self, fn, *args, **kwargs):
        self._vae[0] = self._vae[0]._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        return self

    def sample_index(self, batch_size, rng):
        return super().sample_index(batch_size, rng).repeat(self.repeat)

    def all_index(self):
        return torch.arange(self.num_items)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images (differentiable in ``z``)."""
        return self.vae.decode(z / self.scale + self.shift).sample

    @torch.no_grad()
    def decoded(self) -> torch.Tensor:
        """The decoded images of every latent, ``(n, C, H, W)``."""
        return self.decode_latents(self.z.detach())

    def render(self, index):
        index = index.to(self.z.device)
        z = self.z[index]
        x = self.decode_latents(z) if self.decode else z
        if self.out_shape is not None and tuple(x.shape[1:]) != self.out_shape:
            x = x.reshape(len(x), *self.out_shape)
        cond, view = self._cond_view(index)
        return Rendered(x, cond, view)

    def describe(self) -> dict:
        return {"kind": self.kind, "num_items": self.num_items, "latent_shape": list(self.shape),
                "decode": self.decode}


def build_latent(pc: dict, teacher, generator: torch.Generator, classes_fn) -> LatentTensor:
    """``params.kind: latent`` from the ``params`` section (``classes_fn(spec, n, num_classes)`` builds the
    per-item classes; the driver passes its ``item_classes``)."""
    vae, scale, shift = load_autoencoder(pc.get("vae"))
    decode = pc.get("decode", True)
    if not isinstance(decode, bool):
        raise ConfigError("params.decode", f"must be true or false, got {decode!r}")
    tshape = tuple(teacher.data_shape)
    if pc["shape"] is not None:
        shape = tuple(pc["shape"])
    elif not decode:
        shape = tshape
    elif len(tshape) == 3:
        f = vae_factor(vae)
        if tshape[1] % f or tshape[2] % f:
            raise ConfigError("params.shape", f"the teacher's image shape {list(tshape)} is not divisible by the "
                              f"VAE's downsampling factor {f}; give params.shape (the latent shape)")
        shape = (int(vae.config.latent_channels), tshape[1] // f, tshape[2] // f)
    else:
        raise ConfigError("params.shape", f"the teacher's data shape {list(tshape)} is not an image (C, H, W); "
                          "give params.shape (the latent shape, e.g. [4, 8, 8])")
    if len(shape) != 3 or shape[0] != int(vae.config.latent_channels):
        raise ConfigError("params.shape", f"must be a latent shape [{int(vae.config.latent_channels)}, h, w] "
                          f"for this VAE, got {list(shape)}")
    if decode:
        f = vae_factor(vae)
        out = (int(vae.config.out_channels), shape[1] * f, shape[2] * f)
        what = "decoded image"
    else:
        out = shape
        what = "latent"
    if int(np.prod(out)) != int(np.prod(tshape)):
        raise ConfigError("params.shape", f"the {what} shape {list(out)} does not match the teacher's data shape "
                          f"{list(tshape)}" + ("; set params.decode: false for a latent teacher" if decode else
                                               "; set params.decode: true for a pixel teacher"))
    n = pc["n"]
    if pc["init"] is not None:
        path = pc["init"]
        if not isinstance(path, str) or not path.endswith(".npy"):
            raise ConfigError("params.init", f"must be a PATH.npy of normalised latents, got {path!r}")
        if not os.path.exists(path):
            raise ConfigError("params.init", f"file not found: {path}")
        init = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
    else:
        init = pc["init_mean"] + pc["init_std"] * torch.randn((n, *shape), generator=generator)
    cls = classes_fn(pc["classes"], n, teacher.num_classes)
    return LatentTensor(vae, scale, shift, shape, init, n, decode, tshape, pc["repeat"], cls, pc["views"])
