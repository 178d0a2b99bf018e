"""Offline image metrics: a classifier trained on the fly, and its feature-space Fréchet distance.

No Inception weights ship with any pip package (they are a separate download), so the default quality metric for a
bundled dataset is computed in the 128-d hidden layer of a small classifier fitted (in seconds,
seeded) to the dataset's *training* split. The classifier is chosen by the dataset's name
(:data:`CLASSIFIERS`): an sklearn MLP on the 64 pixels of the 8x8 digits, a small CNN on 28x28 MNIST
(an MLP on 4500 MNIST images stays below 95 % held-out accuracy):

* ``fd``: Fréchet distance between the features of the samples and of the **held-out** real images;
* ``conf90``: fraction of samples whose max class probability exceeds 0.9 (recognisable digits);
* ``class_hist`` / ``class_min`` / ``class_max``: predicted-class fractions (mode balance);
* ``label_acc``: fraction whose predicted class equals the requested label (class-conditional);
* ``out_of_range``: fraction of pixels outside ``[-1.05, 1.05]``; all other metrics see samples
  clipped to ``[-1, 1]``, as an image written to disk would be;
* ``diversity``: intra-class diversity across seeds — mean pairwise pixel distance between samples
  of the same class, divided by the same quantity for held-out real images (1 ≈ real, 0 = collapse).

A real FID path is available when ``eval.fid_weights: PATH`` points to a local Inception file: a
TorchScript detector (clean-fid / NVIDIA ``inception-2015-12-05.pt``) is loaded with
``torch.jit.load``; a state-dict file (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``)
needs the ``torch-fidelity`` package. Nothing is downloaded.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache

import numpy as np
import torch

from scoredistill.errors import ConfigError
from scoredistill.metrics.evaluator import Evaluator

CONF_LEVEL = 0.9
# FD of real training-split images against the held-out split (measured, seed 0): the metric's floor
REAL_FLOOR = {"digits": 0.7, "mnist": None}


# -- Fréchet distance -----------------------------------------------------------------------------
def gaussian_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(f, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017), float64.

    ``tr (S1 S2)^(1/2)`` is computed as ``sum sqrt(eig(R S2 R))`` with ``R = S1^(1/2)`` (symmetric
    PSD eigendecompositions), which stays well defined when the covariances are singular (dead ReLU
    units)."""
    w, v = np.linalg.eigh(np.asarray(s1, dtype=np.float64))
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ np.asarray(s2, dtype=np.float64) @ r
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def fd_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


# -- the metric classifiers -----------------------------------------------------------------------
class FeatureClassifier:
    """sklearn ``MLPClassifier((hidden,))`` on flattened images; ``features`` = its ReLU hidden layer."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, hidden: int = 128, seed: int = 0):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        self.clf = MLPClassifier((hidden,), max_iter=400, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf.fit(self._flat(x), y.numpy())
        self.num_classes = len(self.clf.classes_)
        self.description = f"the {hidden}-d hidden layer of an MLP classifier"

    @staticmethod
    def _flat(x: torch.Tensor) -> np.ndarray:
        return x.detach().reshape(x.shape[0], -1).double().cpu().numpy()

    def features(self, x: torch.Tensor) -> np.ndarray:
        h = self._flat(x) @ self.clf.coefs_[0] + self.clf.intercepts_[0]
        return np.maximum(h, 0.0)

    def proba(self, x: torch.Tensor) -> np.ndarray:
        return self.clf.predict_proba(self._flat(x))

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.proba(x).argmax(1) == y.numpy()).mean())


class ConvFeatureClassifier:
    """A small CNN (two 5x5 conv + max-pool stages, ``hidden``-unit ReLU layer) trained with Adam on the
    flattened-label cross entropy, seeded; ``features`` = its ReLU hidden layer. Runs on the CPU in a
    few seconds for 4500 28x28 images; the global torch RNG state is left untouched."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, hidden: int = 128, seed: int = 0,
                 widths: tuple[int, int] = (8, 16), epochs: int = 8, batch_size: int = 64, lr: float = 1e-3):
        from torch import nn
        from torch.nn import functional as F

        c, h, w = x.shape[1:]
        c1, c2 = widths
        self.num_classes = int(y.max()) + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Conv2d(c, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                      nn.Linear(c2 * (h // 4) * (w // 4), hidden), nn.ReLU())
            self.head = nn.Linear(hidden, self.num_classes)
        g = torch.Generator().manual_seed(seed)
        params = list(self.body.parameters()) + list(self.head.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        x, y = x.detach().float().cpu(), y.cpu()
        with torch.enable_grad():
            for _ in range(epochs):
                perm = torch.randperm(len(x), generator=g)
                for i in range(0, len(x), batch_size):
                    idx = perm[i:i + batch_size]
                    loss = F.cross_entropy(self.head(self.body(x[idx])), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        self.body.requires_grad_(False).eval()
        self.head.requires_grad_(False).eval()
        self.description = f"the {hidden}-d hidden layer of a small CNN classifier"

    @torch.no_grad()
    def _hidden(self, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        x = x.detach().float().cpu()
        return torch.cat([self.body(x[i:i + batch]) for i in range(0, len(x), batch)])

    def features(self, x: torch.Tensor) -> np.ndarray:
        return self._hidden(x).double().numpy()

    @torch.no_grad()
    def proba(self, x: torch.Tensor) -> np.ndarray:
        return torch.softmax(self.head(self._hidden(x)).double(), 1).numpy()

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.proba(x).argmax(1) == y.numpy()).mean())


# The metric classifier of each bundled dataset (name -> (class, keyword arguments)). Measured held-out
# accuracy (seed 0): digits MLP 0.977 (597 images); mnist CNN 0.966 (500 images, 6.6 s on one core).
CLASSIFIERS = {
    "digits": (FeatureClassifier, {"hidden": 128}),
    "mnist": (ConvFeatureClassifier, {"hidden": 128, "widths": (8, 16), "epochs": 8}),
}


@lru_cache(maxsize=4)
def dataset_classifier(name: str = "digits", seed: int = 0):
    """The seeded metric classifier for a bundled dataset, fitted on its training split (cached)."""
    split = load_split(name)
    cls, kwargs = CLASSIFIERS.get(name, (FeatureClassifier, {"hidden": 128}))
    return cls(split.x_train, split.y_train, seed=seed, **kwargs)


def load_split(name: str, field: str = "teacher.name"):
    """A bundled dataset's train / held-out split by name (:func:`scoredistill.data.load_split`)."""
    from scoredistill.data import load_split as _load

    return _load(name, field)


# -- diversity ------------------------------------------------------------------------------------
def _mean_pairwise(x: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def intra_class_spread(x: np.ndarray, labels: np.ndarray, num_classes: int, max_per_class: int = 200) -> np.ndarray:
    """Per class: mean pairwise pixel L2 distance between the samples labelled with that class."""
    out = np.full(num_classes, np.nan)
    for k in range(num_classes):
        xs = x[labels == k][:max_per_class]
        out[k] = _mean_pairwise(xs)
    return out


# -- optional real FID ----------------------------------------------------------------------------
class InceptionFID:
    """FID with a *local* Inception file (never downloaded). ``weights`` must exist.

    ``.pt`` TorchScript detectors (clean-fid / NVIDIA) are called as ``model(uint8 NCHW 299x299,
    return_features=True)``; other files are treated as torch-fidelity state dicts."""

    def __init__(self, weights: str):
        if not weights or not os.path.isfile(weights):
            raise ConfigError("eval.fid_weights", f"file not found: {weights} (real FID needs a local Inception "
                              "weights file; none ships with pip packages — omit eval.fid_weights to use the "
                              "classifier-feature FD only)")
        self.path = weights
        self.kind = None
        try:
            self.model = torch.jit.load(weights, map_location="cpu").eval()
            self.kind = "torchscript"
        except Exception:
            try:
                from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
            except ImportError:
                raise ConfigError("eval.fid_weights", f"{weights} is not a TorchScript detector, and a state-dict "
                                  "file needs torch-fidelity (pip install torch-fidelity)") from None
            self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=weights).eval()
            self.kind = "torch-fidelity"

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].float()
            if xb.shape[1] == 1:
                xb = xb.expand(-1, 3, -1, -1)
            xb = torch.nn.functional.interpolate(xb, size=(299, 299), mode="bilinear", align_corners=False)
            u8 = ((xb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            if self.kind == "torchscript":
                f = self.model(u8, return_features=True)
            else:
                f = self.model(u8)[0]
            out.append(f.reshape(len(u8), -1).double().cpu().numpy())
        return np.concatenate(out)

    def fid(self, x: torch.Tensor, ref: torch.Tensor) -> float:
        return fd_features(self.features(x), self.features(ref))


# -- evaluator ------------------------------------------------------------------------------------
class ImageEvaluator(Evaluator):
    """Classifier-feature metrics against a bundled dataset's held-out split; image-grid plots."""

    columns = [("fd", "FD ↓", "{:.2f}"), ("conf90", "conf>0.9 ↑", "{:.3f}"),
               ("label_acc", "label acc ↑", "{:.3f}"), ("class_min", "min class", "{:.3f}"),
               ("class_max", "max class", "{:.3f}"), ("diversity", "diversity", "{:.2f}")]

    def __init__(self, dataset: str = "digits", seed: int = 0, fid_weights: str | None = None,
                 field: str = "teacher.name"):
        self.dataset = dataset
        self.seed = seed
        self.split = load_split(dataset, field)
        self.clf = dataset_classifier(dataset, 0)
        self.num_classes = self.clf.num_classes
        self._ref_stats = gaussian_stats(self.clf.features(self.split.x_test))
        x_te = self.split.x_test.reshape(len(self.split.x_test), -1).double().numpy()
        self._real_spread = intra_class_spread(x_te, self.split.y_test.numpy(), self.num_classes)
        self.fid = InceptionFID(fid_weights) if fid_weights else None
        if self.fid is not None:
            self.columns = self.columns + [("fid", "FID ↓", "{:.2f}")]
        floor = REAL_FLOOR.get(dataset)
        floor = f"real floor: the training split, about {floor}; " if floor is not None else ""
        self.legend = (f"FD: Fréchet distance in {self.clf.description} fitted to the "
                       f"{dataset} training split, against the {len(self.split.x_test)} held-out images "
                       f"({floor}±1 sampling noise at these sizes). "
                       f"conf>0.9: fraction of samples the classifier assigns a class with p > 0.9; label acc: "
                       f"predicted class = requested label; min/max class: extreme predicted-class fractions "
                       f"(balanced = 0.100); diversity: same-class pairwise pixel distance relative to real "
                       f"images (1 = real, 0 = collapse). The floor row shows real training-split images.")

    def metrics(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> dict:
        x = x.detach().float().cpu().reshape(x.shape[0], *self.split.x_test.shape[1:])
        finite = torch.isfinite(x.reshape(len(x), -1)).all(1)
        res: dict = {"non_finite": int((~finite).sum())}
        x = x[finite]
        if len(x) < 2:
            return res
        # like an image written to disk, samples are clipped to the valid range [-1, 1] (few-step Heun
        # overshoots it); how much was outside is reported separately
        res["out_of_range"] = float((x.abs() > 1.05).float().mean())
        x = x.clamp(-1, 1)
        cond = cond[finite.to(cond.device)].cpu() if cond is not None else None
        feats = self.clf.features(x)
        res["fd"] = frechet_distance(*gaussian_stats(feats), *self._ref_stats)
        p = self.clf.proba(x)
        pred = p.argmax(1)
        res["conf90"] = float((p.max(1) > CONF_LEVEL).mean())
        hist = np.bincount(pred, minlength=self.num_classes) / len(pred)
        res["class_hist"] = [round(float(v), 4) for v in hist]
        res["class_min"], res["class_max"] = float(hist.min()), float(hist.max())
        labels = pred
        if cond is not None and (cond >= 0).any():
            c = cond.numpy()
            known = c >= 0
            res["label_acc"] = float((pred[known] == c[known]).mean())
            labels = np.where(known, c, pred)
        spread = intra_class_spread(x.reshape(len(x), -1).double().numpy(), labels, self.num_classes)
        ok = np.isfinite(spread) & np.isfinite(self._real_spread)
        if ok.any():
            res["diversity"] = float(np.mean(spread[ok] / self._real_spread[ok]))
        if self.fid is not None:
            res["fid"] = self.fid.fid(x, self.split.x_test)
        return res

    def reference(self, n: int, cond: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
        """``n`` real images from the **training** split (with matching labels when ``cond`` is given).

        The held-out split is the FD reference, so the report's floor row uses independent real
        images (training split vs held-out: FD about 0.7) rather than the reference against itself."""
        g = torch.Generator().manual_seed(seed + 7)
        x, y = self.split.x_train, self.split.y_train
        if cond is None:
            idx = torch.randint(0, len(x), (n,), generator=g) if n > len(x) else torch.randperm(len(x), generator=g)[:n]
            return x[idx].clone()
        cond = cond.cpu()[:n]
        out = torch.empty(len(cond), *x.shape[1:])
        for k in cond.unique().tolist():
            pos = (cond == k).nonzero().squeeze(1)
            pool = (y == k).nonzero().squeeze(1) if k >= 0 else torch.arange(len(x))
            perm = pool[torch.randperm(len(pool), generator=g)]
            reps = -(-len(pos) // len(perm))
            out[pos] = x[perm.repeat(reps)[:len(pos)]]
        return out

    def plot(self, panels: list[tuple[str, torch.Tensor]], path: str, title: str | None = None) -> None:
        from scoredistill.viz.images import image_grid_panels

        image_grid_panels(panels, path, title=title)


def digits_evaluator(seed: int = 0, fid_weights: str | None = None) -> ImageEvaluator:
    return ImageEvaluator("digits", seed, fid_weights)
