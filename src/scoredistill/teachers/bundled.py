"""Teachers shipped inside the package (``teacher: {kind: bundled, name: NAME}``), loaded offline.

``digits``: a class-conditional EDM-preconditioned UNet (:class:`~scoredistill.models.unet.UNetDenoiser`)
fitted to the training split of sklearn's 8x8 digits (see ``teachers/weights/digits/README.md`` for
the command that produced it). Its evaluator is :class:`~scoredistill.metrics.images.ImageEvaluator`
(classifier-feature FD against the held-out split).
"""

from __future__ import annotations

import functools
import os

from scoredistill.config import ConfigError

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
BUNDLED = ("digits",)


def bundled_path(name: str) -> str:
    if name not in BUNDLED:
        raise ConfigError("teacher.name", f"unknown bundled teacher {name!r}; accepted: {', '.join(BUNDLED)}")
    path = os.path.join(WEIGHTS_DIR, name)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise ConfigError("teacher.name", f"the weights of the bundled teacher {name!r} are missing from "
                          f"{path} (broken install?)")
    return path


def image_evaluator(dataset: str, seed: int = 0, fid_weights: str | None = None):
    from scoredistill.metrics.images import ImageEvaluator

    return ImageEvaluator(dataset, seed, fid_weights)


def attach_evaluator(model, dataset: str):
    """Give a teacher ``make_evaluator(seed, fid_weights=None)`` for its dataset (build_evaluator uses it)."""
    model.make_evaluator = functools.partial(image_evaluator, dataset)
    model.dataset = dataset
    return model


def load_bundled(name: str):
    """The frozen bundled teacher ``name`` (a :class:`~scoredistill.models.denoiser.Denoiser`) and its config."""
    from scoredistill.models.registry import load_model

    model, cfg = load_model(bundled_path(name))
    model.requires_grad_(False).eval()
    return attach_evaluator(model, cfg.get("dataset", name)), cfg
