"""Learning-rate schedules: the factor curve, the optimizers' lr per iteration, exact resume mid-schedule."""

import math
import time

import pytest
import torch

from helpers import tiny_config
from scoredistill.config import ConfigError, resolve
from scoredistill.engine.distiller import Distiller
from scoredistill.engine.schedule import lr_factor

SMALL = tiny_config(train={"steps": 20, "checkpoint_every": 100, "log_every": 5, "lr": 1e-3, "fake_lr": 2e-3,
                            "lr_schedule": "cosine", "warmup_steps": 4, "lr_min_ratio": 0.1},
                    eval={"every": 100})


def test_factor_curve():
    assert lr_factor(0, 100) == 1.0
    assert lr_factor(0, 100, "cosine", warmup=4) == pytest.approx(0.25 * 1.0)
    assert lr_factor(3, 100, "constant", warmup=4) == 1.0
    assert lr_factor(50, 100, "cosine", min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(25, 100, "linear", min_ratio=0.2) == pytest.approx(1 - 0.8 * 0.25)
    # monotone decay after warm-up
    f = [lr_factor(s, 50, "cosine", warmup=5) for s in range(5, 50)]
    assert all(a >= b for a, b in zip(f, f[1:]))


def test_every_role_follows_the_schedule():
    d = Distiller(resolve(SMALL), "/nonexistent-not-written")
    seen = []
    for _ in range(12):
        seen.append({n: o.param_groups[0]["lr"] for n, o in d.optimizers.items()})
        d.train_step()
    for k, lrs in enumerate(seen):
        f = lr_factor(k, 20, "cosine", 4, 0.1)
        assert lrs["generator"] == pytest.approx(1e-3 * f, rel=1e-12)
        assert lrs["fake_score"] == pytest.approx(2e-3 * f, rel=1e-12)
    assert math.isclose(seen[0]["generator"], 2.5e-4)


def test_constant_has_no_scheduler():
    d = Distiller(resolve({**SMALL, "train": {**SMALL["train"], "lr_schedule": "constant", "warmup_steps": 0}}),
                  "/nonexistent-not-written")
    assert d.schedulers == {}


def test_resume_mid_schedule_is_exact(tmp_path):
    full = Distiller(resolve(SMALL), str(tmp_path / "full"))
    full.train()
    part = Distiller(resolve(SMALL), str(tmp_path / "part"))
    part._t0 = time.time()
    for _ in range(9):  # stop mid-schedule (odd step: the next iteration is a fake-only one)
        part.train_step()
    part.save()
    resumed = Distiller(resolve(SMALL), str(tmp_path / "part"))
    resumed.train(resume=True)
    assert resumed.step == 20
    for name in ("generator", "ema", "fake_score"):
        a, b = full.modules[name].state_dict(), resumed.modules[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for n in full.optimizers:
        assert full.optimizers[n].param_groups[0]["lr"] == resumed.optimizers[n].param_groups[0]["lr"]


@pytest.mark.parametrize("override,field", [
    ("train.lr_schedule=exp", "train.lr_schedule"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.lr_min_ratio=2", "train.lr_min_ratio"),
    ("train.teacher_offload=maybe", "train.teacher_offload"),
    ("train.global_batch=0", "train.global_batch"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        resolve(SMALL, [override])
    assert e.value.field == field


def test_global_batch_is_the_batch_size():
    assert resolve(SMALL, ["train.global_batch=64"])["train"]["batch_size"] == 64
    with pytest.raises(ConfigError) as e:
        resolve({**SMALL, "train": {**SMALL["train"], "global_batch": 64}})
    assert e.value.field == "train.global_batch"


def test_offload_on_cpu_is_a_no_op():
    a = Distiller(resolve(SMALL, ["train.teacher_offload=true"]), "/nonexistent-not-written")
    b = Distiller(resolve(SMALL), "/nonexistent-not-written")
    for _ in range(3):
        a.train_step()
        b.train_step()
    sa, sb = a.generator.state_dict(), b.generator.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
