"""Parameterizations: what produces the samples ``x`` that an objective sees, behind one interface.

``param.render(index) -> Rendered(x, cond, view)``: differentiable in the parameters; ``index`` picks
which items (particles, images, views of a renderer) to render this step; ``cond`` is the teacher
condition of each item (class label, or ``None``); ``view`` is the view conditioning for a fake score
(the camera analogue; ``None`` when the run has none). ``num_items`` is how many distinct items exist,
``sample_index`` picks a minibatch of them.

* :class:`Particles` — ``N`` free samples of shape ``shape`` (a particle-based variational
  distribution, ProlificDreamer §3). View = particle index (``views: index``) or a group id
  ``i mod V`` (``views: V``).
* :class:`ImageTensor` — one (or a few) directly optimized tensors with an optional output activation
  (``sigmoid``/``tanh`` keep an image in range), rendered ``repeat`` times per step (several noise
  draws per step on the same image, as multi-view batches do).
* :class:`CallableRenderer` — a user hook: ``init(generator, **hook_args) -> dict[str, Tensor]`` makes
  the parameters, ``render(params, index, **hook_args) -> x`` or ``(x, view)`` renders views ``index``
  differentiably (a NeRF / 3DGS / mesh renderer plugs in here). :func:`rotation_views` is a built-in
  example.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from scoredistill.errors import ConfigError


@dataclass
class Rendered:
    x: torch.Tensor
    cond: torch.Tensor | None = None
    view: torch.Tensor | None = None


def _activation(name: str):
    acts = {"none": lambda z: z, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
    if name not in acts:
        raise ConfigError("params.activation", f"unknown value {name!r}; accepted: {', '.join(acts)}")
    return acts[name]


class Parameterization(nn.Module):
    """Base class. Subclasses hold their parameters and implement :meth:`render`."""

    num_items: int = 1
    num_views: int | None = None      # size of the view label space of the fake score (None: no views)
    kind: str = "parameterization"

    def __init__(self, classes: torch.Tensor | None = None, views: str | int | None = None):
        super().__init__()
        self.register_buffer("classes", classes.long() if classes is not None else None)
        self.views = views

    def _cond_view(self, index: torch.Tensor, view: torch.Tensor | None = None):
        cond = self.classes.to(index.device)[index] if self.classes is not None else None
        if view is None:
            if self.views == "index":
                view = index
            elif isinstance(self.views, int):
                view = index % self.views
        return cond, view

    def view_space(self) -> int | None:
        if self.views == "index":
            return self.num_items
        if isinstance(self.views, int):
            return self.views
        return None

    def sample_index(self, batch_size: int | None, rng: torch.Generator) -> torch.Tensor:
        n = self.num_items
        if batch_size is None or batch_size >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=rng)[:batch_size]

    def all_index(self) -> torch.Tensor:
        return torch.arange(self.num_items)

    def render(self, index: torch.Tensor) -> Rendered:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "num_items": self.num_items}


class Particles(Parameterization):
    kind = "particles"

    def __init__(self, n: int, shape: tuple[int, ...], init: torch.Tensor, classes=None, views=None):
        super().__init__(classes, views)
        if tuple(init.shape) != (n, *shape):
            raise ConfigError("params.init",
                              f"initial particles have shape {tuple(init.shape)}, need {(n, *shape)}")
        self.num_items = int(n)
        self.shape = tuple(shape)
        self.x = nn.Parameter(init.float().clone())

    def render(self, index):
        x = self.x[index.to(self.x.device)]
        cond, view = self._cond_view(index.to(self.x.device))
        return Rendered(x, cond, view)


class ImageTensor(Parameterization):
    kind = "image"

    def __init__(self, shape: tuple[int, ...], init: torch.Tensor, n_images: int = 1, repeat: int = 1,
                 activation: str = "none", classes=None, views=None):
        super().__init__(classes, views)
        if tuple(init.shape) != (n_images, *shape):
            raise ConfigError("params.init",
                              f"initial image has shape {tuple(init.shape)}, need {(n_images, *shape)}")
        self.num_items = int(n_images)
        self.shape = tuple(shape)
        self.repeat = int(repeat)
        self.activation = activation
        self._act = _activation(activation)
        self.raw = nn.Parameter(init.float().clone())

    def sample_index(self, batch_size, rng):
        return torch.arange(self.num_items).repeat(self.repeat)

    def image(self) -> torch.Tensor:
        return self._act(self.raw)

    def render(self, index):
        index = index.to(self.raw.device)
        cond, view = self._cond_view(index)
        return Rendered(self._act(self.raw[index]), cond, view)


class CallableRenderer(Parameterization):
    kind = "callable"

    def __init__(self, render_fn: Callable, init_params: dict[str, torch.Tensor], num_views: int,
                 classes=None, views="index", batch_views: int | None = None):
        super().__init__(classes, views)
        if not isinstance(init_params, dict) or not init_params:
            raise ConfigError("params.init", "the init hook must return a non-empty dict of tensors")
        self.params = nn.ParameterDict({k: nn.Parameter(torch.as_tensor(v).float().clone())
                                        for k, v in init_params.items()})
        self.render_fn = render_fn
        self.num_items = int(num_views)
        self.batch_views = batch_views

    def render(self, index):
        out = self.render_fn(dict(self.params.items()), index)
        view = None
        if isinstance(out, tuple):
            out, view = out
        if not torch.is_tensor(out) or out.shape[0] != len(index):
            raise ConfigError("params.render", f"the render hook must return a tensor with {len(index)} rows")
        cond, view = self._cond_view(index.to(out.device), view)
        return Rendered(out, cond, view)


def load_callable(path: str, field: str) -> Callable:
    """Import ``"package.module:function"``."""
    if not isinstance(path, str) or ":" not in path:
        raise ConfigError(field, f"must be 'package.module:function', got {path!r}")
    mod, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(field, f"cannot import {path!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(field, f"{path!r} is not callable")
    return fn


# -- built-in example renderer for the callable hook -------------------------------------------------
def rotation_views_init(generator: torch.Generator, num_objects: int = 64, num_angles: int = 8, dim: int = 2,
                        std: float = 1.0) -> dict[str, torch.Tensor]:
    """Parameters of :func:`rotation_views`: ``num_objects`` points of dimension ``dim`` (the "objects")."""
    return {"objects": torch.randn(num_objects, dim, generator=generator) * std}


def rotation_views(params: dict[str, torch.Tensor], index: torch.Tensor, num_objects: int = 64,
                   num_angles: int = 8, **_):
    """A toy "renderer": view ``i`` shows object ``i // num_angles`` rotated in its first two coordinates
    by ``2 pi (i mod num_angles) / num_angles`` (a camera orbiting the object). Returns ``(x, view)``
    with the camera id as view conditioning (the analogue of ProlificDreamer's camera pose). Render
    ``num_views = num_objects * num_angles`` views."""
    obj = params["objects"]
    o = (index // num_angles).to(obj.device)
    if int(o.max()) >= obj.shape[0]:
        raise ConfigError("params.num_views", f"rotation_views has {obj.shape[0]} x {num_angles} views; "
                          f"got view index {int(index.max())}")
    k = (index % num_angles).to(obj.device)
    ang = 2 * math.pi * k.double() / num_angles
    c, s = ang.cos().float(), ang.sin().float()
    p = obj[o]
    x = torch.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]], 1)
    if obj.shape[1] > 2:
        x = torch.cat([x, p[:, 2:]], 1)
    return x, k
