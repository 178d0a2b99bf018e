"""Forward processes, prediction conversions, time samplers and guidance (the bottom layer)."""

from scoredistill.process.guidance import canonical_scale, cfg_combine, from_cond_plus, to_cond_plus
from scoredistill.process.processes import (
    EDM,
    PROCESS_KINDS,
    Process,
    RectifiedFlow,
    VPContinuous,
    VPDiscrete,
    make_process,
)
from scoredistill.process.time import LogitNormal, LogNormal, Shifted, TimeSampler, Uniform, make_time_sampler

__all__ = [
    "EDM", "PROCESS_KINDS", "Process", "RectifiedFlow", "VPContinuous", "VPDiscrete", "make_process",
    "LogNormal", "LogitNormal", "Shifted", "TimeSampler", "Uniform", "make_time_sampler",
    "canonical_scale", "cfg_combine", "from_cond_plus", "to_cond_plus",
]
