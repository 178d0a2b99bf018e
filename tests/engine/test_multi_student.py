"""MSD as a generator architecture (arXiv:2410.23274; docs/objectives/msd.md): routing by class, per-student gradients,
model folders, config validation, a few engine steps."""

from __future__ import annotations

import pytest
import torch

from helpers import repro
from scoredistill.config import ConfigError, load_yaml, resolve
from scoredistill.engine.build import build_generator
from scoredistill.models.multi import MultiStudentGenerator, partition
from scoredistill.models.registry import load_model, save_model
from scoredistill.process import EDM
from scoredistill.teachers.gmm import build_gmm


def test_partition_is_contiguous_and_balanced():
    assert partition(4, 2).tolist() == [0, 0, 1, 1]
    assert partition(10, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert partition(4, 4).tolist() == [0, 1, 2, 3]
    g = MultiStudentGenerator(2, 16, 1, num_classes=4, students=2)
    assert g.classes_of(0) == [0, 1] and g.classes_of(1) == [2, 3]


def test_routes_each_sample_to_its_student():
    torch.manual_seed(0)
    g = MultiStudentGenerator(2, 16, 2, num_classes=4, students=2)
    z = torch.randn(40, 2)
    cond = torch.arange(40) % 4
    y = g(z, cond)
    for k, net in enumerate(g.nets):
        m = g.owner[cond] == k
        torch.testing.assert_close(y[m], net(z[m], cond[m]))
    # perturbing student 1 changes only the outputs of classes 2, 3
    with torch.no_grad():
        for p in g.nets[1].parameters():
            p.add_(0.1)
    y2 = g(z, cond)
    assert torch.equal(y2[cond < 2], y[cond < 2]) and not torch.allclose(y2[cond >= 2], y[cond >= 2])


def test_gradients_reach_only_the_owning_student():
    g = MultiStudentGenerator(2, 16, 2, num_classes=4, students=2)
    z = torch.randn(8, 2)
    loss = g(z, torch.full((8,), 3)).pow(2).sum()
    loss.backward()
    assert all(p.grad is None for p in g.nets[0].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g.nets[1].parameters())


def test_needs_labels():
    g = MultiStudentGenerator(2, 16, 1, num_classes=4, students=2)
    with pytest.raises(ValueError):
        g(torch.randn(3, 2), None)
    with pytest.raises(ValueError):
        g(torch.randn(3, 2), torch.tensor([0, -1, 2]))
    assert g(torch.randn(0, 2), torch.zeros(0, dtype=torch.long)).shape == (0, 2)


def test_folder_round_trip(tmp_path):
    g = MultiStudentGenerator(2, 16, 2, num_classes=4, students=3)
    save_model(g, str(tmp_path / "gen"), extra={"data_shape": [2]})
    g2, cfg = load_model(str(tmp_path / "gen"))
    assert isinstance(g2, MultiStudentGenerator) and cfg["class"] == "MultiStudentGenerator" and g2.students == 3
    z, c = torch.randn(12, 2), torch.arange(12) % 4
    torch.testing.assert_close(g2(z, c), g(z, c))


def test_build_and_validate():
    teacher = build_gmm({"preset": "ring8_cond"}, EDM())
    cfg = resolve({"generator": {"kind": "multi", "students": 2, "width": 16, "depth": 1}})
    g = build_generator(cfg["generator"], teacher)
    assert isinstance(g, MultiStudentGenerator) and g.num_classes == 4
    with pytest.raises(ConfigError) as e:
        build_generator(cfg["generator"], build_gmm({"preset": "ring8"}, EDM()))
    assert e.value.field == "generator.kind"
    with pytest.raises(ConfigError) as e:
        build_generator(resolve({"generator": {"kind": "multi", "students": 5}})["generator"], teacher)
    assert e.value.field == "generator.students"
    with pytest.raises(ConfigError) as e:
        resolve({"generator": {"kind": "multi", "students": 0}})
    assert e.value.field == "generator.students"
    with pytest.raises(ConfigError) as e:
        resolve({"generator": {"kind": "many"}})
    assert e.value.field == "generator.kind"


def test_unconditional_teacher_fails_before_training_one_line(tmp_path, capsys):
    from scoredistill.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["distill", "recipes/toy/msd.yaml", "--out", str(tmp_path / "r"), "--set", "teacher.preset=ring8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generator.kind" in err[0] and "class-conditional" in err[0], err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_engine_steps_and_sampling(tmp_path):
    from scoredistill.cli.main import main
    from scoredistill.engine.distiller import Distiller

    cfg = resolve(load_yaml("recipes/toy/msd.yaml"), [
        "train.steps=4", "train.batch_size=32", "generator.width=16", "generator.depth=1", "fake_score.width=16",
        "fake_score.depth=1", "train.generator_every=2", "train.progress=false", "eval.n_samples=32",
        "eval.plots=false"])
    d = Distiller(cfg, str(tmp_path / "run"))
    res = d.train()
    assert res["non_finite"] == 0
    assert main(["sample", str(tmp_path / "run"), "--n", "10", "--class", "3", "--out", str(tmp_path / "x.npy")]) == 0


# -- distribution (slow) -------------------------------------------------------------------------------------
MSD_SLOW = ["generator.width=128", "fake_score.width=128", "train.steps=1000", "eval.every=1000",
            "train.progress=false", "eval.plots=false", "train.checkpoint_every=1000000"]


def msd_figures(d, res):
    """Every figure the distribution test asserts: per class, the modes its samples reach and the share of its
    precise samples on its own two modes (class c owns modes c and c + 4 of ring8_cond)."""
    from scoredistill.metrics.gmm import assign

    own, modes = {}, {}
    for c in range(4):
        z = torch.randn(500, 2, generator=torch.Generator().manual_seed(100 + c))
        k, ok = assign(d.sample(z, torch.full((500,), c)), d.reference.means, d.reference.stds)
        own[c] = float(((k == c) | (k == c + 4))[ok].double().mean())
        modes[c] = sorted(int(m) for m in k[ok].unique())
    return {**{m: res[m] for m in ("precision", "modes_covered", "weight_tv", "sw2", "non_finite")},
            "own": own, "modes": modes}


@pytest.mark.slow
def test_msd_students_cover_their_modes(tmp_path):
    """Two DMD2 students on ring8_cond (student 0: classes 0, 1; student 1: classes 2, 3): each student
    puts its classes on their own two modes, and the total is not worse than one student of the same size.

    Measured 2026-11-26 (this config, 1000 iterations): two students precision 0.960, 8/8 modes, weight TV
    0.043, SW2 0.104, every class 100 % on its own modes; one student (generator.kind=mlp, same width)
    precision 0.953, TV 0.034, SW2 0.124. At the recipe's width 256 and 1500 iterations: 0.983 / 0.030 /
    0.158 vs one student 0.985 / 0.036 / 0.206. The single-student run is recorded, not repeated here.

    Seed sweep 2026-12-01 (``msd_figures`` on this config with train.seed=S, train.threads=1): precision
    0.9555 / 0.9545 / 0.971 / 0.969 (seeds 0-3), 8/8 modes, weight TV 0.019-0.035, SW2 0.100-0.173,
    every class 100 % on its own two modes and both of them reached. At 800 iterations seed 1 had 0.903,
    so 1000 is the smallest budget that keeps the precision bound 0.93 (margin 0.025 to the lowest seen).
    Seed 0 on 2 threads (as here): precision 0.956, TV 0.023, SW2 0.113, every class 100 % on its own modes.
    A failing assert prints the seed, thread count and figures to rerun it with."""
    from scoredistill.engine.distiller import Distiller

    cfg = resolve(load_yaml("recipes/toy/msd.yaml"), MSD_SLOW)
    d = Distiller(cfg, str(tmp_path))
    f = msd_figures(d, d.run())
    msg = repro(cfg, f)
    print("msd:", msg)
    for c in range(4):
        assert {c, c + 4} <= set(f["modes"][c]), msg  # both modes of the class, from its own student
    assert all(v > 0.95 for v in f["own"].values()), msg
    assert f["non_finite"] == 0 and f["modes_covered"] == 8, msg
    assert f["precision"] > 0.93 and f["weight_tv"] < 0.07, msg  # one student: 0.953 / 0.034
