"""scoredistill: score distillation of diffusion and flow models on one objective core."""

__version__ = "0.1.0"
