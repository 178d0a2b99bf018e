"""Flash-DMD's timestep split of DMD2's two losses (arXiv 2511.20549; docs/objectives/flash_dmd.md).

DMD2 (arXiv 2405.14867) adds a distribution-matching field and a diffusion-GAN term over the same noise
range. Flash-DMD separates them by noise level so their gradients do not conflict: the reverse-KL field
``(D_fake - D^w_real) / mean|x - D^w_real|`` is evaluated only at high-noise times
``t ~ U[max(t_min, b), t_max]``, where the teacher's score carries the global structure, and the GAN
(generator ``softplus(-D(x_t))``, discriminator ``softplus(D(sg x_t)) + softplus(-D(real_t))``) only at
low-noise times ``t ~ U[gan_t_min, b)``, where the discriminator sees detail. ``b`` is
``objective.boundary`` in canonical time. The paper's later reinforcement-learning stage with a reward
model is not part of this objective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from scoredistill.config import key
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import register
from scoredistill.objectives.dmd import DMD2, DMD2Params
from scoredistill.process.time import Uniform


@dataclass
class FlashDMDParams(DMD2Params):
    boundary: float = key(0.5, "canonical time: DM field above, GAN below", lo=0, hi=1, lo_open=True,
                          hi_open=True)
    gan_weight_gen: float = key(1e-3, "generator GAN weight: the low-noise GAN is half of the method (dmd2 is "
                                "the method without it)", lo=0, lo_open=True)
    gan_t_max: float | None = key(None, "upper re-noising time of the GAN (default: the boundary)", lo=0, hi=1)

    def validate(self):
        if self.gan_t_max is None:
            self.gan_t_max = float(self.boundary)
        if self.gan_t_max > self.boundary:
            raise ConfigError("objective.gan_t_max", f"must be <= objective.boundary ({self.boundary}), "
                              f"got {self.gan_t_max}: the GAN acts only below the boundary")
        DMD2Params.validate(self)


@register
class FlashDMD(DMD2):
    name = "flash_dmd"
    Params = FlashDMDParams

    def __init__(self, params, time=None, fake_time=None):
        super().__init__(params, time=time, fake_time=fake_time)
        if not isinstance(self.time, Uniform):
            raise ConfigError("objective.time", "flash_dmd splits a uniform time range at objective.boundary; "
                              "accepted: {kind: uniform, t_min, t_max}")
        if self.time.t_max <= params.boundary:
            raise ConfigError("objective.boundary", f"must be below objective.time.t_max ({self.time.t_max}): "
                              "the distribution-matching field needs times above it")
        self.time = dataclasses.replace(self.time, t_min=max(self.time.t_min, params.boundary))
