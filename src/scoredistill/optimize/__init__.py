"""Optimization under a diffusion prior: particles, an image tensor or a user renderer optimized with
the SDS family (and VSD/ESD with a learned fake score) on the same objective contract as the
generator engine. See ``docs/optimize/README.md``."""

from scoredistill.optimize.driver import PriorOptimizer, build_parameterization
from scoredistill.optimize.fake import ViewConditionedDenoiser
from scoredistill.optimize.params import CallableRenderer, ImageTensor, Parameterization, Particles, Rendered
from scoredistill.optimize.schedule import Schedule, parse_schedule

__all__ = ["CallableRenderer", "ImageTensor", "Parameterization", "Particles", "PriorOptimizer",
           "Rendered", "Schedule", "ViewConditionedDenoiser", "build_parameterization", "parse_schedule"]
