"""Save / load models as diffusers-style folders: ``config.json`` + ``model.safetensors``.

The config names the class and its constructor arguments, so a generator directory is loadable
without the run that produced it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scoredistill.errors import CheckpointError
from scoredistill.models.generators import DenoiserGenerator
from scoredistill.models.mlp import MLPDenoiser, MLPGenerator
from scoredistill.models.multi import MultiStudentGenerator
from scoredistill.models.unet import UNetDenoiser
from scoredistill.process.processes import PROCESS_KINDS, Process


def process_from_description(d: dict) -> Process:
    d = dict(d)
    kind = d.pop("kind")
    if kind == "edm" and "rho" in d:
        d["rho_karras"] = d.pop("rho")
    return PROCESS_KINDS[kind](**d)


# Folder classes defined in higher layers (diffusers students in scoredistill.adapters) register their
# builder here when their module is imported, so this module never imports them.
FOLDER_CLASSES: dict[str, Callable[[dict], torch.nn.Module]] = {}


def register_folder_class(name: str, build: Callable[[dict], torch.nn.Module]) -> None:
    """``config.json``'s ``class: name`` is rebuilt by ``build(config)`` (weights are loaded after)."""
    FOLDER_CLASSES[name] = build


def model_config(model: torch.nn.Module) -> dict:
    if hasattr(model, "registry_config"):  # diffusers students (scoredistill.adapters.student)
        return model.registry_config()
    if isinstance(model, MLPDenoiser):
        return {"class": "MLPDenoiser", "arch": model.arch, "process": model.process.describe()}
    if isinstance(model, MLPGenerator):
        return {"class": "MLPGenerator", "arch": model.arch}
    if isinstance(model, MultiStudentGenerator):
        return {"class": "MultiStudentGenerator", "arch": model.arch}
    if isinstance(model, UNetDenoiser):
        return {"class": "UNetDenoiser", "arch": model.arch, "process": model.process.describe()}
    if isinstance(model, DenoiserGenerator):
        return {"class": "DenoiserGenerator", "t_init": model.t_init, "denoiser": model_config(model.denoiser)}
    raise TypeError(f"no folder format for {type(model).__name__}")


def model_from_config(cfg: dict) -> torch.nn.Module:
    cls = cfg["class"]
    if cls in FOLDER_CLASSES:
        return FOLDER_CLASSES[cls](cfg)
    if cls == "MLPDenoiser":
        return MLPDenoiser(process_from_description(cfg["process"]), **cfg["arch"])
    if cls == "MLPGenerator":
        return MLPGenerator(**cfg["arch"])
    if cls == "MultiStudentGenerator":
        return MultiStudentGenerator(**cfg["arch"])
    if cls == "UNetDenoiser":
        return UNetDenoiser(process_from_description(cfg["process"]), **cfg["arch"])
    if cls == "DenoiserGenerator":
        return DenoiserGenerator(model_from_config(cfg["denoiser"]), cfg["t_init"])
    hint = " (a diffusers student: import scoredistill.adapters first)" if cls.startswith("Diffusers") else ""
    raise ValueError(f"unknown model class {cls!r}{hint}")


def save_model(model: torch.nn.Module, folder: str, extra: dict | None = None) -> None:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` atomically (temp + rename)."""
    from scoredistill.fileio import atomic_dir

    cfg = model_config(model)
    if extra:
        cfg.update(extra)
    with atomic_dir(folder) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)


def load_model(folder: str) -> tuple[torch.nn.Module, dict]:
    """Load a model folder; returns ``(model, config)``.

    Raises ``FileNotFoundError`` when the folder lacks ``config.json`` or ``model.safetensors``, and
    :class:`~scoredistill.errors.CheckpointError` (one line) when they cannot be read, name an unknown
    class or do not match each other."""
    cfg_path = os.path.join(folder, "config.json")
    w_path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(cfg_path) or not os.path.exists(w_path):
        raise FileNotFoundError(f"{folder} has no config.json + model.safetensors")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or "class" not in cfg:
        raise CheckpointError(f"{cfg_path} names no model class")
    try:
        model = model_from_config(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{cfg_path}: cannot build the model ({type(e).__name__}: {_first_line(e)})") from None
    try:
        state = load_file(w_path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{w_path} is not readable ({type(e).__name__}: {_first_line(e)})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{w_path} does not match {cfg_path}: {_first_line(e)}") from None
    return model, cfg


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# K-step students live in their own module, which registers its folder classes (FewStepGenerator,
# MultiStudentDenoiser) here; imported last because it imports this module's functions
from scoredistill.models import fewstep as _fewstep  # noqa: E402,F401
