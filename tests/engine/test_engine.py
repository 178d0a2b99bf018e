"""Engine: exact resume, atomic checkpoints, corrupt-checkpoint fallback, non-finite guards."""

import os

import pytest
import torch

from helpers import tiny_config
from scoredistill.config import resolve
from scoredistill.engine.distiller import Distiller, TrainingAborted
from scoredistill.engine.io import list_checkpoints

SMALL = tiny_config(train={"steps": 24, "generator_every": 3, "checkpoint_every": 12, "log_every": 4},
                    eval={"every": 12})


def weights(mod):
    return {k: v.clone() for k, v in mod.state_dict().items()}


def test_resume_equals_uninterrupted(tmp_path):
    full = Distiller(resolve(SMALL), str(tmp_path / "full"))
    full.train()
    half = Distiller(resolve(SMALL, ["train.steps=12"]), str(tmp_path / "half"))
    half.train()
    resumed = Distiller(resolve(SMALL), str(tmp_path / "half"))
    resumed.train(resume=True)
    assert resumed.step == 24
    for name in ("generator", "ema", "fake_score"):
        a, b = weights(full.modules[name]), weights(resumed.modules[name])
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = [int(os.path.basename(c)[5:]) for c in list_checkpoints(str(tmp_path / "half"))]
    assert steps == [12, 24]
    assert os.path.exists(tmp_path / "half" / "generator" / "model.safetensors")


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    run = str(tmp_path / "run")
    Distiller(resolve(SMALL), run).train()
    newest = list_checkpoints(run)[-1]
    with open(os.path.join(newest, "state.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    msgs = []
    d = Distiller(resolve(SMALL, ["train.steps=30"]), run, log=msgs.append)
    assert d.load_latest() == 12
    assert any("skipping unreadable checkpoint" in m for m in msgs)


def test_gan_and_regression_runs(tmp_path):
    for extra in (["objective.gan_weight_gen=0.005"], ["objective.name=dmd", "train.ode_pairs=64",
                                                        "train.ode_steps=4"]):
        cfg = resolve(SMALL, extra + ["train.steps=6", "train.real_pool=64"])
        d = Distiller(cfg, str(tmp_path / extra[0].split("=")[0]))
        res = d.train()
        assert res["non_finite"] == 0
        assert set(d.optimizers) >= {"generator", "fake_score"}


class FlakyTeacher(torch.nn.Module):
    """Wraps a teacher and returns NaN on every ``period``-th call (``period=1``: always)."""

    def __init__(self, inner, period):
        super().__init__()
        self.inner, self.period, self.calls = inner, period, 0
        self.process, self.data_shape, self.num_classes = inner.process, inner.data_shape, inner.num_classes

    def guided(self, x_t, t, cond, w):
        self.calls += 1
        out = self.inner.guided(x_t, t, cond, w)
        return out * float("nan") if self.calls % self.period == 0 else out

    def forward(self, x_t, t, cond=None):
        return self.guided(x_t, t, cond, 1.0)


def test_nan_teacher_is_survived_and_reported(tmp_path):
    d = Distiller(resolve(SMALL, ["train.generator_every=1"]), str(tmp_path / "r"))
    d.teacher = FlakyTeacher(d.teacher, period=3)
    res = d.train()
    assert d.nonfinite["generator"] >= 5
    assert res["nonfinite_skipped"]["generator"] == d.nonfinite["generator"]
    assert all(torch.isfinite(p).all() for p in d.generator.parameters())


def test_always_nan_teacher_aborts_with_message(tmp_path):
    d = Distiller(resolve(SMALL, ["train.generator_every=1", "train.nan_guard_max=4"]), str(tmp_path / "r"))
    d.teacher = FlakyTeacher(d.teacher, period=1)
    with pytest.raises(TrainingAborted, match="generator: loss or gradients non-finite for 4 consecutive"):
        d.train()
