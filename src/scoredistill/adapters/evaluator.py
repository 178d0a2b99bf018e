"""Evaluator for diffusers teachers: sample statistics and decoded image grids.

There is no offline image-quality metric for arbitrary diffusers teachers (FID needs Inception
weights, CLIP score a CLIP model), so runs report the non-finite count and the per-channel
mean/std of the (latent) samples next to the teacher's, and save decoded grids for inspection.
"""

from __future__ import annotations

import os

import torch

from scoredistill.metrics.evaluator import Evaluator


def image_grid(x: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """``(N, C, H, W)`` in ``[-1, 1]`` -> one ``(H', W', C)`` image in ``[0, 1]``."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(n**0.5))
    ncol = (n + nrow - 1) // nrow
    grid = torch.ones(c, ncol * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = x[i]
    grid = grid.permute(1, 2, 0)
    return grid[..., :3] if c >= 3 else grid[..., :1].expand(-1, -1, 3)


class DiffusersEvaluator(Evaluator):
    columns = [("non_finite", "non-finite", "{}"), ("mean", "mean", "{:.3f}"), ("std", "std", "{:.3f}")]
    legend = ("Sample statistics in the teacher's (latent) space; no offline image metric exists for a "
              "generic diffusers teacher, compare the decoded grids.")

    def __init__(self, assets, seed: int = 0, max_images: int = 16):
        self.assets = assets
        self.seed = seed
        self.max_images = max_images

    def metrics(self, x, cond=None):
        flat = x.reshape(x.shape[0], -1).double()
        ok = torch.isfinite(flat).all(1)
        m = {"non_finite": int((~ok).sum())}
        if ok.any():
            m["mean"] = float(flat[ok].mean())
            m["std"] = float(flat[ok].std())
        return m

    def plot(self, panels, path, title=None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), squeeze=False)
        for ax, (name, x) in zip(axes[0], panels):
            imgs = self.assets.decode(torch.nan_to_num(x[: self.max_images].float()))
            ax.imshow(image_grid(imgs).numpy())
            ax.set_title(name, fontsize=8)
            ax.axis("off")
        if title:
            fig.suptitle(title)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
