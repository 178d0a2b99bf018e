"""Plots (matplotlib, Agg backend): scatter plots of vector samples."""

from __future__ import annotations

import os

import torch


def _project(x: torch.Tensor, basis: torch.Tensor | None):
    x = x.detach().reshape(x.shape[0], -1).double().cpu()
    if x.shape[1] <= 2 or basis is None:
        return x[:, :2]
    return x @ basis


def pca_basis(x: torch.Tensor) -> torch.Tensor | None:
    x = x.detach().reshape(x.shape[0], -1).double().cpu()
    if x.shape[1] <= 2:
        return None
    xc = x - x.mean(0)
    _, _, v = torch.linalg.svd(xc, full_matrices=False)
    return v[:2].T


def scatter_panels(panels: list[tuple[str, torch.Tensor]], path: str, means: torch.Tensor | None = None,
                   basis_from: torch.Tensor | None = None, title: str | None = None, max_points: int = 2000):
    """One row of scatter plots (first two coordinates, or a shared PCA plane for D > 2); 1-D samples: one
    histogram (density) per panel on a shared range, with the means as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    basis = pca_basis(basis_from if basis_from is not None else panels[0][1])
    ref = _project(basis_from if basis_from is not None else panels[0][1], basis)
    lo, hi = ref.min(0).values, ref.max(0).values
    pad = 0.25 * (hi - lo) + 0.1
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.3), squeeze=False)
    one_d = ref.shape[1] == 1
    for ax, (name, x) in zip(axes[0], panels):
        p = _project(x[:max_points], basis)
        p = p[torch.isfinite(p).all(1)]
        if one_d:  # a scatter plot needs two coordinates
            ax.hist(p[:, 0].numpy(), bins=60, range=(float(lo[0] - pad[0]), float(hi[0] + pad[0])), density=True,
                    color="tab:blue", alpha=0.7)
            for m in ([] if means is None else _project(means, basis)[:, 0].tolist()):
                ax.axvline(m, color="tab:red", lw=0.8)
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
            continue
        ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.5, color="tab:blue", rasterized=True)
        if means is not None:
            m = _project(means, basis)
            ax.scatter(m[:, 0], m[:, 1], s=30, marker="x", color="tab:red")
        ax.set_xlim(float(lo[0] - pad[0]), float(hi[0] + pad[0]))
        ax.set_ylim(float(lo[1] - pad[1]), float(hi[1] + pad[1]))
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal", adjustable="box")
        ax.tick_params(labelsize=7)
    save_figure(fig, path, title)


def save_figure(fig, path: str, title: str | None = None) -> None:
    """Title, lay out and write ``fig`` to ``path`` (PNG, through a temporary name and a rename), then close it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from scoredistill.fileio import atomic_file

    # a ".tmp-" sibling, which the run-folder rules remove on resume (a killed write never looks like a user's file)
    try:
        with atomic_file(os.path.abspath(path), "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
