"""Image grids (matplotlib, Agg backend) for image evaluators and docs."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from scoredistill.viz import save_figure


def tile(x: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """``(N, C, H, W)`` images in ``[-1, 1]`` -> one ``(rows*(H+pad), cols*(W+pad)[, C])`` float array in [0, 1]."""
    x = x.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = x.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    # padding is white in the displayed image: 0 under the inverted grey map of 1-channel grids, 1 in RGB
    fill = 0.0 if c == 1 else 1.0
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        out[y0:y0 + h, x0:x0 + w] = ((x[i].permute(1, 2, 0).numpy() + 1) / 2)
    return out[..., 0] if c == 1 else out


def grid_inches(nrow: int, width: int) -> float:
    """Panel width (inches) that keeps ``nrow`` tiles of ``width`` pixels legible at the savefig dpi."""
    return max(3.4, 0.022 * nrow * width)


def image_grid_panels(panels: list[tuple[str, torch.Tensor]], path: str, title: str | None = None,
                      max_images: int = 100, nrow: int = 10, panel_inches: float = 3.4) -> None:
    """One row of image grids (the first ``max_images`` images of each panel), ``panel_inches`` wide each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(panel_inches * len(panels), panel_inches + 0.3), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels):
        x = torch.nan_to_num(x[:max_images].float(), nan=0.0)
        img = tile(x, nrow=min(nrow, len(x)))
        ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    save_figure(fig, path, title)



def _pil_images(x: torch.Tensor) -> list:
    """``(N, 3, H, W)`` in [0, 1] -> 8-bit RGB PIL images."""
    from PIL import Image

    arr = (x.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def _save_atomic(path: str, fmt: str, images: list, **kw) -> None:
    # a killed write leaves only a ".tmp-" sibling, which the run-folder rules clean up
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    images[0].save(tmp, format=fmt, **kw)
    os.replace(tmp, path)


def save_gif(frames: torch.Tensor, path: str, fps: int = 12) -> None:
    """``(N, 3, H, W)`` frames in [0, 1] -> an endlessly looping GIF (PIL, which matplotlib depends on)."""
    images = _pil_images(frames)
    _save_atomic(path, "GIF", images, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def save_png(image: torch.Tensor, path: str) -> None:
    """One ``(3, H, W)`` image in [0, 1] as an 8-bit RGB PNG."""
    _save_atomic(path, "PNG", _pil_images(image[None]))
