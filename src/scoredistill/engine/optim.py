"""The optimizer of a trained role: ``train.optimizer: adam | adamw | radam`` (per-role overrides
``train.fake_optimizer`` / ``train.disc_optimizer``, null = the same as ``train.optimizer``).

The three differ in how ``train.weight_decay`` (``λ``) enters. With gradient ``g``, moments ``m, v``
and learning rate ``η``:

- ``adam`` (Kingma & Ba, arXiv:1412.6980): L2 regularisation folded into the gradient,
  ``g ← g + λθ``, so the decay is rescaled by ``1/√v`` like the gradient is;
- ``adamw`` (Loshchilov & Hutter, arXiv:1711.05101): decoupled decay ``θ ← θ(1 − ηλ)`` before the
  Adam step on the plain gradient (what DMD2, rCM and TDM train with);
- ``radam`` (Liu et al., arXiv:1908.03265): Adam with the variance of the adaptive learning rate
  rectified (SGD with momentum for the first steps), torch's ``RAdam`` with L2 decay as in ``adam``
  (what sCM trains with).
"""

from __future__ import annotations

import torch

from scoredistill.config import OPTIMIZERS  # noqa: F401 (re-exported: the accepted values)

_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}


def role_optimizer(tc: dict, *keys: str) -> str:
    """The first non-null of ``train.<key>`` for ``keys`` (most specific first), e.g.
    ``role_optimizer(tc, "disc_optimizer", "fake_optimizer", "optimizer")``."""
    for k in keys:
        if tc.get(k) is not None:
            return tc[k]
    return "adam"


def build_optimizer(kind: str, params, lr: float, betas, weight_decay: float = 0.0, eps: float | None = None,
                    foreach: bool | None = None) -> torch.optim.Optimizer:
    """``kind`` (one of ``OPTIMIZERS``) over ``params``; ``eps`` / ``foreach`` null keep torch's defaults."""
    kw = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
    if eps is not None:
        kw["eps"] = eps
    if foreach is not None:
        kw["foreach"] = foreach
    return _CLASSES[kind](params, **kw)
