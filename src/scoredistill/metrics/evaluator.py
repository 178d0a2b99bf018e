"""Evaluators: what the engine and reports measure for a given teacher.

An evaluator turns samples into a metrics dict, draws panels of samples, and (when the target is
known) provides reference samples and their metrics as the floor. The engine only talks to this
interface, so image teachers plug in their own metrics (classifier-feature FD, class histogram)
and plots (grids) without the engine knowing.
"""

from __future__ import annotations

import torch

from scoredistill.metrics.gmm import floor_metrics, gmm_metrics


class Evaluator:
    #: (key, column label, format) for report tables
    columns: list[tuple[str, str, str]] = [("non_finite", "non-finite", "{}")]

    def metrics(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> dict:
        x = x.reshape(x.shape[0], -1)
        return {"non_finite": int((~torch.isfinite(x)).any(1).sum())}

    def reference(self, n: int, cond=None, seed: int = 0) -> torch.Tensor | None:
        """Exact target samples, if the target is known."""
        return None

    def plot(self, panels: list[tuple[str, torch.Tensor]], path: str, title: str | None = None) -> None:
        from scoredistill.viz import scatter_panels

        scatter_panels(panels, path, title=title)

    @staticmethod
    def format_row(m: dict, columns) -> list[str]:
        out = []
        for key, _, fmt in columns:
            if key not in m:
                out.append("–")
            elif key == "modes_covered" and "num_modes" in m:
                out.append(f"{m['modes_covered']}/{m['num_modes']}")
            else:
                out.append(fmt.format(m[key]))
        return out


class GMMEvaluator(Evaluator):
    """Precision / modes / weight TV / SW2 / MMD / spread against an exact Gaussian mixture."""

    columns = [("precision", "precision ↑", "{:.3f}"), ("modes_covered", "modes", "{}"),
               ("weight_tv", "weight TV ↓", "{:.3f}"), ("sw2", "SW2 ↓", "{:.3f}"), ("mmd", "MMD ↓", "{:.4f}"),
               ("spread_ratio", "spread", "{:.2f}"), ("within_std", "within-mode std", "{:.2f}"),
               ("within_std_min", "narrowest mode", "{:.2f}"), ("mass_ratio_min", "lightest mass/weight", "{:.2f}")]

    def __init__(self, gmm, seed: int = 0):
        self.gmm = gmm
        self.seed = seed

    def metrics(self, x, cond=None):
        return gmm_metrics(x, self.gmm, seed=self.seed)

    def floor(self, n):
        return floor_metrics(self.gmm, n, self.seed)

    def reference(self, n, cond=None, seed=0):
        return self.gmm.sample(n, generator=torch.Generator().manual_seed(seed + 7))

    def plot(self, panels, path, title=None):
        from scoredistill.viz import scatter_panels

        basis = self.reference(len(panels[0][1]), seed=1)
        scatter_panels(panels, path, means=self.gmm.means.cpu(), basis_from=basis, title=title)
