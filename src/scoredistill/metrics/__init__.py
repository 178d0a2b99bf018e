from scoredistill.metrics.gmm import assign, floor_metrics, gmm_metrics, mmd_rbf, sliced_w2

__all__ = ["assign", "floor_metrics", "gmm_metrics", "mmd_rbf", "sliced_w2"]
