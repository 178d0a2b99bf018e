"""3D Gaussian splats under a diffusion prior: representation, cameras, renderer, PLY files.

A layer of its own (a sibling of ``scoredistill.models``): it imports only ``scoredistill.errors``,
``scoredistill.fileio`` and torch/numpy, so teachers, objectives and the optimizer can all build on it.
See docs/3d.md.
"""

from scoredistill.splat.cameras import CameraRanges, Cameras, sample_cameras, turntable, view_labels, view_prompts
from scoredistill.splat.gaussians import Densifier, DensifyConfig, GaussianSplats, remap_adam_state
from scoredistill.splat.ply import PlyError, SplatData, read_ply, write_ply
from scoredistill.splat.render import (
    Background,
    FixedBackground,
    LearnedBackground,
    RandomBackground,
    RenderResult,
    make_background,
    render,
)

__all__ = [
    "Background", "CameraRanges", "Cameras", "DensifyConfig", "Densifier", "FixedBackground",
    "GaussianSplats", "LearnedBackground", "PlyError", "RandomBackground", "RenderResult", "SplatData",
    "make_background", "read_ply", "remap_adam_state", "render", "sample_cameras", "turntable",
    "view_labels", "view_prompts", "write_ply",
]
