"""Image teachers: digits data, UNet denoiser, classifier-feature metrics, bundled teacher, DMD2 on digits."""

import os

import numpy as np
import pytest
import torch

from helpers import ROOT, repro  # noqa: E402
from scoredistill.config import ConfigError, resolve
from scoredistill.data.digits import load_digits_split
from scoredistill.engine.build import build_evaluator, build_teacher
from scoredistill.metrics.images import ImageEvaluator, fd_features
from scoredistill.models.registry import load_model, save_model
from scoredistill.models.unet import UNetDenoiser
from scoredistill.process.processes import EDM, VPDiscrete
from scoredistill.sampling import teacher_sample

# Recorded on the shipped teacher (docs/results/digits.md); thresholds leave room for sampling noise.
TEACHER_CONF90_MIN = 0.85      # 35-NFE Heun, 100 class-balanced samples (recorded 0.972 on 1200)
TEACHER_LABEL_ACC_MIN = 0.93   # recorded 0.988 on 1200
DMD2_200_FD_MAX = 4.0          # recipes/digits/dmd2.yaml after 200 iterations: recorded 2.74 (initial G: see test)


@pytest.fixture(scope="module")
def evaluator():
    return ImageEvaluator("digits", seed=0)


@pytest.fixture(scope="module")
def teacher():
    t, ref = build_teacher({"kind": "bundled", "name": "digits", "process": {"kind": "edm"}})
    assert ref is None
    return t


# -- data -------------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_and_stratified():
    s = load_digits_split()
    assert s.x_train.shape == (1200, 1, 8, 8) and s.x_test.shape == (597, 1, 8, 8)
    assert float(s.x_train.min()) == -1.0 and float(s.x_train.max()) == 1.0
    counts = torch.bincount(s.y_train, minlength=10)
    assert int(counts.min()) >= 115 and int(counts.max()) <= 123
    # no image of the held-out split is in the training split (sklearn digits has no exact duplicates)
    tr = {tuple(r) for r in s.x_train.reshape(1200, -1).tolist()}
    assert not any(tuple(r) in tr for r in s.x_test.reshape(597, -1).tolist())


# -- UNet -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", [EDM(), VPDiscrete()], ids=["edm", "vp"])
def test_unet_contract(process, tmp_path):
    torch.manual_seed(0)
    m = UNetDenoiser(process, (1, 8, 8), (8, 16), num_classes=10, sigma_data=0.75, emb_dim=16)
    for p in m.net.conv_out.parameters():  # give the zero-initialised output layer some weight
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(6, 1, 8, 8)
    t = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    cond = torch.tensor([0, 3, -1, 9, -1, 2])
    d = m(x, t, cond)
    assert d.shape == x.shape and torch.isfinite(d).all()
    # the null class is the unconditional call
    null = torch.full_like(cond, -1)
    assert torch.equal(m(x, t, null), m(x, t, None))
    assert not torch.allclose(m(x, t, cond), m(x, t, null))
    # preconditioning: at the smallest noise level D is (almost) the identity on x_t / a_t
    t0 = torch.full((6,), process.t_min, dtype=torch.float64)
    a = process.alpha(t0).view(-1, 1, 1, 1).float()
    if float(process.rho(t0)[0]) < 0.01:
        assert torch.allclose(m(x, t0, cond), x / a, atol=2e-2)
    h = m.features(x, t, cond)
    assert h.shape == (6, 16 * 4 * 4)
    # folder round trip through the registry
    save_model(m, str(tmp_path / "unet"))
    m2, cfg = load_model(str(tmp_path / "unet"))
    assert cfg["class"] == "UNetDenoiser" and torch.equal(m2(x, t, cond), d)


# -- metrics ----------------------------------------------------------------------------------------------
def test_fd_real_real_near_zero_and_noise_large(evaluator):
    s = load_digits_split()
    same = evaluator.metrics(s.x_test, s.y_test)
    assert same["fd"] < 1e-3 and same["conf90"] > 0.9
    real = evaluator.metrics(s.x_train, s.y_train)
    assert real["fd"] < 1.5, real  # independent real images: about 0.73
    assert real["conf90"] > 0.95 and real["label_acc"] > 0.97 and 0.9 < real["diversity"] < 1.1
    assert real["class_min"] > 0.09 and real["class_max"] < 0.11
    noise = evaluator.metrics(torch.rand(600, 1, 8, 8) * 2 - 1)
    assert noise["fd"] > 50 and noise["conf90"] < 0.5
    # a collapsed generator (one image per class) is caught by diversity, not by label accuracy
    proto = torch.stack([s.x_train[s.y_train == k][0] for k in range(10)])
    collapsed = evaluator.metrics(proto.repeat(60, 1, 1, 1), torch.arange(10).repeat(60))
    assert collapsed["diversity"] < 0.05 and collapsed["label_acc"] == 1.0 and collapsed["fd"] > 5
    # NaN samples are counted, not averaged in
    bad = s.x_train[:100].clone()
    bad[:7] = float("nan")
    assert evaluator.metrics(bad)["non_finite"] == 7


def test_reference_matches_labels(evaluator):
    cond = torch.arange(10).repeat_interleave(130)  # more than a class holds: cycles
    ref = evaluator.reference(len(cond), cond, seed=0)
    pred = evaluator.clf.proba(ref).argmax(1)
    assert (pred == cond.numpy()).mean() > 0.97
    assert torch.equal(ref, evaluator.reference(len(cond), cond, seed=0))


def test_fd_helper_symmetry():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 8)), rng.normal(loc=1.0, size=(500, 8))
    assert abs(fd_features(a, b) - fd_features(b, a)) < 1e-6
    assert abs(fd_features(a, b) - 8.0) < 1.0  # |mean shift|^2 = 8, covariances ~ equal


def test_fid_weights_missing_is_a_config_error(tmp_path):
    missing = str(tmp_path / "pt_inception-2015-12-05.pth")
    with pytest.raises(ConfigError) as e:
        ImageEvaluator("digits", fid_weights=missing)
    assert e.value.field == "eval.fid_weights" and "file not found" in str(e.value)
    # through a run config: the distiller fails before training
    from scoredistill.engine.distiller import Distiller

    cfg = resolve({"teacher": {"kind": "bundled", "name": "digits"}, "generator": {"kind": "teacher"},
                   "fake_score": {"kind": "teacher"}, "eval": {"fid_weights": missing}})
    with pytest.raises(ConfigError) as e:
        Distiller(cfg, str(tmp_path / "run"))
    assert e.value.field == "eval.fid_weights"
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    # a GMM teacher has no image evaluator: asking for FID there is a config error too
    t, ref = build_teacher({"kind": "gmm", "preset": "ring8"})
    with pytest.raises(ConfigError) as e:
        build_evaluator(t, ref, 0, {"fid_weights": missing})
    assert e.value.field == "eval.fid_weights" and "image teacher" in str(e.value)


def test_fid_path_with_a_local_torchscript_detector(tmp_path, evaluator):
    class Stub(torch.nn.Module):  # stands in for clean-fid's inception-2015-12-05.pt
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4)
            return f.reshape(x.shape[0], -1)

    path = str(tmp_path / "detector.pt")
    torch.jit.script(Stub()).save(path)
    ev = ImageEvaluator("digits", fid_weights=path)
    assert ("fid", "FID ↓", "{:.2f}") in ev.columns
    s = load_digits_split()
    m_real = ev.metrics(s.x_train[:300])
    m_noise = ev.metrics(torch.rand(300, 1, 8, 8) * 2 - 1)
    assert m_real["fid"] < m_noise["fid"]


# -- bundled teacher --------------------------------------------------------------------------------------
def test_bundled_teacher_loads_offline_and_samples_digits(teacher, evaluator):
    assert isinstance(teacher, UNetDenoiser) and teacher.num_classes == 10 and teacher.data_shape == (1, 8, 8)
    assert not any(p.requires_grad for p in teacher.parameters())
    g = torch.Generator().manual_seed(0)
    cond = torch.arange(10).repeat(10)
    x = teacher_sample(teacher, len(cond), steps=18, cond=cond, generator=g)  # 35 NFE
    m = evaluator.metrics(x, cond)
    assert m["conf90"] >= TEACHER_CONF90_MIN, m
    assert m["label_acc"] >= TEACHER_LABEL_ACC_MIN, m
    assert build_evaluator(teacher, None, 0).__class__ is ImageEvaluator


def test_bundled_teacher_errors():
    with pytest.raises(ConfigError) as e:
        build_teacher({"kind": "bundled", "name": "cifar10"})
    assert e.value.field == "teacher.name" and "digits" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_teacher({"kind": "bundled"})
    assert e.value.field == "teacher.name"
    with pytest.raises(ConfigError):
        build_teacher({"kind": "bundled", "name": "digits", "path": "x"})


def test_train_image_teacher_folder_is_a_learned_teacher(tmp_path):
    from scoredistill.engine.teacher_training import train_teacher

    recipe = tmp_path / "t.yaml"
    recipe.write_text("teacher: {kind: image, dataset: digits}\n"
                      "network: {channels: [8, 16], emb_dim: 16}\n"
                      "train: {steps: 3, batch_size: 16, log_every: 1}\n")
    logs = []
    res = train_teacher(str(recipe), str(tmp_path / "teacher"), log=logs.append)
    assert res["steps"] == 3 and len(logs) == 3
    t, ref = build_teacher({"kind": "learned", "path": str(tmp_path / "teacher")})
    assert isinstance(t, UNetDenoiser) and ref is None
    assert isinstance(build_evaluator(t, None, 0), ImageEvaluator)
    with pytest.raises(ConfigError) as e:
        train_teacher(str(recipe), str(tmp_path / "t2"), overrides=["train.nope=1"])
    assert "train.nope" in str(e.value)


def test_distill_digits_generator_folder_round_trip(tmp_path):
    from scoredistill.engine.distiller import Distiller

    cfg = resolve({"teacher": {"kind": "bundled", "name": "digits"}, "generator": {"kind": "teacher"},
                   "fake_score": {"kind": "teacher"}, "objective": {"name": "dmd2", "gan_weight_gen": 0.005},
                   "train": {"steps": 2, "batch_size": 8, "progress": False, "real_pool": 16, "real_data": "teacher"},
                   "eval": {"every": 2, "n_samples": 32, "plots": True}})
    d = Distiller(cfg, str(tmp_path / "run"))
    d.train()
    gen, gcfg = load_model(str(tmp_path / "run" / "generator"))
    assert gcfg["class"] == "DenoiserGenerator" and gcfg["denoiser"]["class"] == "UNetDenoiser"
    z = torch.randn(4, 1, 8, 8)
    cond = torch.tensor([1, 2, 3, 4])
    assert torch.allclose(gen(z, cond), d.sample(z, cond), atol=1e-6)
    assert any(f.endswith(".png") for f in os.listdir(tmp_path / "run" / "samples"))


# -- distillation (slow) ----------------------------------------------------------------------------------
def measure_digits_dmd2(run_dir=None, steps=200, **train):
    """The digits DMD2 recipe after ``steps`` iterations: FD of the teacher-initialised generator (``fd0``) and
    every evaluator figure at the end."""
    import tempfile

    from scoredistill.config import load_yaml
    from scoredistill.engine.distiller import Distiller

    cfg = resolve(load_yaml(os.path.join(ROOT, "recipes", "digits", "dmd2.yaml")),
                  [f"train.steps={steps}", f"eval.every={steps}", "eval.n_samples=1000", "eval.plots=false",
                   "train.progress=false"] + [f"train.{k}={v}" for k, v in train.items()])
    d = Distiller(cfg, run_dir or tempfile.mkdtemp())
    fd0 = d.evaluator.metrics(d.sample(d.eval_z, d.eval_cond), d.eval_cond)["fd"]
    d.run()
    return cfg, {"fd0": fd0, **d.evaluate()}


@pytest.mark.slow
def test_dmd2_200_steps_on_digits_reaches_recorded_fd(tmp_path):
    """DMD2 on the digits teacher: 200 iterations bring FD from the teacher-initialised generator's level to
    below DMD2_200_FD_MAX with confident, class-balanced, diverse digits.

    Seed sweep 2026-12-01 (``measure_digits_dmd2(seed=S, threads=1)``; seed 3 was not run: 5-8 min each on
    the shared machine): FD 2.73 / 2.88 / 2.93 (seeds 0-2; recorded 2.74 on the docs run), starting from
    6.43 / 6.48 / 6.61; confidence>0.9 share 0.996, label accuracy 0.998-1.0, smallest class share
    0.088-0.092, diversity 0.70-0.71. Bounds: FD < 4.0, start > 5.0, conf90 > 0.6, label accuracy > 0.8,
    smallest class > 0.02, diversity > 0.5."""
    cfg, m = measure_digits_dmd2(str(tmp_path / "run"))
    msg = repro(cfg, m)
    assert m["fd0"] > DMD2_200_FD_MAX + 1, msg  # the teacher-initialised generator starts well above it
    assert m["fd"] < DMD2_200_FD_MAX, msg
    assert m["conf90"] > 0.6 and m["label_acc"] > 0.8 and m["class_min"] > 0.02, msg
    assert m["diversity"] > 0.5, msg
