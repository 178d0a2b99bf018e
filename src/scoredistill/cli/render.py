"""``scoredistill render RUN_DIR|SCENE.ply --views N --out DIR``: a turntable of a 3D run's scene or of
any 3DGS PLY file from the default orbit cameras (docs/3d.md): ``view_000.png`` ... one PNG per view
(azimuths evenly spaced from -180 degrees at elevation 15, mid distance and FOV of the run's
``splats.cameras``) and ``grid.png`` of all of them.

``--out`` is created and marked as the library's; an existing folder is written into only when the
library made it (its earlier views are replaced), never a folder of the user's.
"""

from __future__ import annotations

import glob
import os

from scoredistill.errors import ConfigError


def _source(path: str) -> tuple[str, dict | None]:
    """The PLY to render and the run's config (None for a bare PLY)."""
    if os.path.isdir(path):
        from scoredistill.cli.runs import load_saved_config

        ply = os.path.join(path, "scene.ply")
        if not os.path.exists(ply):
            raise ConfigError("SOURCE", f"{path} has no scene.ply (not a finished 3D run; give a run folder of "
                              "params.kind: splats or a .ply file)")
        return ply, load_saved_config(path, "SOURCE")
    if not os.path.exists(path):
        raise ConfigError("SOURCE", f"not found: {path}")
    if not path.lower().endswith(".ply"):
        raise ConfigError("SOURCE", f"{path} is neither a run folder nor a .ply file")
    return path, None


def render_views(source: str, views: int, out: str, size: int = 64, elevation: float = 15.0) -> list[str]:
    """Render and write the views; returns the written file names."""
    import torch

    from scoredistill.engine.rundir import is_ours, mark_ours
    from scoredistill.splat import CameraRanges, GaussianSplats, render, turntable
    from scoredistill.viz.images import image_grid_panels, save_png

    if not isinstance(views, int) or not 1 <= views <= 3600:
        raise ConfigError("--views", f"must be an integer in [1, 3600], got {views!r}")
    if not isinstance(size, int) or not 8 <= size <= 4096:
        raise ConfigError("--size", f"must be an integer in [8, 4096], got {size!r}")
    if not -90 <= elevation <= 90:
        raise ConfigError("--elevation", f"must lie in [-90, 90] degrees, got {elevation}")
    ply, cfg = _source(source)
    ranges = CameraRanges.from_config((cfg or {}).get("splats", {}).get("cameras"), "splats.cameras")
    bg = ((cfg or {}).get("teacher", {}) or {}).get("background") or (
        [0.5, 0.5, 0.5] if (cfg or {}).get("teacher", {}).get("kind") == "scene" else [1.0, 1.0, 1.0])
    scene = GaussianSplats.from_ply(ply)
    if os.path.exists(out) and (not os.path.isdir(out) or (os.listdir(out) and not is_ours(out))):
        raise ConfigError("--out", f"{out} exists and was not created by scoredistill; nothing in it is touched: "
                          "choose a new or empty folder")
    with torch.no_grad():
        images = render(scene, turntable(views, ranges, elevation=elevation), size, size, bg).images
    mark_ours(out, "render")
    for old in glob.glob(os.path.join(out, "view_*.png")):  # ours: a previous render of this folder
        os.unlink(old)
    names = []
    for i, img in enumerate(images):
        name = f"view_{i:03d}.png"
        save_png(img, os.path.join(out, name))
        names.append(name)
    image_grid_panels([(os.path.basename(os.path.normpath(source)), 2 * images - 1)], os.path.join(out, "grid.png"),
                      nrow=min(views, 8), max_images=views)
    return names + ["grid.png"]


def cmd_render(args):
    names = render_views(args.source, args.views, args.out, args.size, args.elevation)
    print(f"wrote {len(names) - 1} views and grid.png to {args.out}")


def add_render_parser(sub):
    r = sub.add_parser("render", help="render a 3D run's scene.ply (or any 3DGS .ply) from the default orbit cameras")
    r.add_argument("source", metavar="RUN_DIR|SCENE.ply")
    r.add_argument("--views", type=int, default=8, help="azimuths evenly spaced over the orbit (default 8)")
    r.add_argument("--size", type=int, default=64, help="pixels per side (default 64)")
    r.add_argument("--elevation", type=float, default=15.0, help="degrees (default 15)")
    r.add_argument("--out", required=True, help="folder to create (one PNG per view and grid.png)")
    r.set_defaults(fn=cmd_render)
    return r
