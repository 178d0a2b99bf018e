"""DisBack's teacher path (arXiv 2408.15991; docs/objectives/disback.md) and MSD's teacher score matching
initialisation (arXiv 2410.23274; docs/objectives/msd.md): the engine's stages before distillation.

Both stages are fixed numbers of iterations; a kill inside any stage resumes bit for bit (the fault hook
of engine/loop.py raises here instead of SIGKILL, so the test runs in-process: what survives is what the
killed run wrote to disk)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_main, tiny_config
from scoredistill.config import resolve
from scoredistill.engine import loop
from scoredistill.engine.build import build_fake
from scoredistill.engine.distiller import Distiller
from scoredistill.objectives.base import PathPlan
from scoredistill.process import EDM
from scoredistill.teachers.gmm import build_gmm

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 checkpoints recorded after iterations 2, 4, 6; then s_2, s_1 for 4 iterations each; s_0 from iteration 14
DISBACK = tiny_config(fake_score={"kind": "teacher"},
                      objective={"name": "disback", "path_checkpoints": 3, "record_steps": 6, "hold_steps": 4},
                      train={"steps": 18, "checkpoint_every": 4, "keep_checkpoints": 10, "threads": 1},
                      eval={"every": 9})
# MSD with a one-step, time-conditioned pair of students: 24 iterations of teacher score matching first
MSD_INIT = tiny_config(teacher={"preset": "ring8_cond"},
                       generator={"kind": "multi", "students": 2, "steps": 1, "init_steps": 24},
                       train={"steps": 30, "lr": 3e-3, "checkpoint_every": 6, "keep_checkpoints": 10, "threads": 1},
                       eval={"every": 15})


def test_path_plan_schedule():
    p = PathPlan(checkpoints=4, record_steps=10, hold_steps=5)
    assert [i for i in range(1, 11) if p.recorded_after(i)] == [3, 5, 8, 10]
    assert [p.recorded_after(i) for i in (3, 5, 8, 10)] == [1, 2, 3, 4]
    assert [p.index(j) for j in (0, 4, 5, 9, 10, 14, 15, 100)] == [3, 3, 2, 2, 1, 1, 0, 0]
    assert p.length() == 10 + 3 * 5
    one = PathPlan(checkpoints=1, record_steps=1, hold_steps=7)
    assert one.recorded_after(1) == 1 and one.index(0) == 0 and one.length() == 1


def test_teacher_copy_of_an_exact_teacher_starts_as_the_teacher():
    teacher = build_gmm({"preset": "ring8"}, EDM())
    fake = build_fake({"kind": "teacher", "width": 16, "depth": 1}, teacher, 1.0)
    x, t = torch.randn(64, 2), torch.rand(64, dtype=torch.float64) * 0.98 + 0.01
    assert torch.equal(fake(x, t), teacher(x, t))
    assert sum(p.numel() for p in fake.parameters()) > 0  # the correction is what stage 1 trains


def _kill_at(monkeypatch, step):
    """Arm engine/loop.py's fault hook: raise (instead of SIGKILL) right after iteration ``step``."""
    class Killed(Exception):
        pass

    def kill(pid, sig):
        raise Killed

    monkeypatch.setenv("SCOREDISTILL_FAULT", f"step:{step}")
    monkeypatch.setattr(loop.os, "kill", kill)
    return Killed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted reference runs."""
    out = {}
    for name, cfg in (("disback", DISBACK), ("msd_init", MSD_INIT)):
        d = Distiller(resolve(cfg), str(tmp_path_factory.mktemp(name) / "run"), log=lambda *a: None)
        d.run()
        out[name] = d
    return out


@pytest.mark.parametrize("name,kill,stage", [("disback", 5, "record"), ("disback", 11, "distill"),
                                             ("msd_init", 15, "init")])
def test_kill_in_each_stage_then_resume_equals_uninterrupted(runs, tmp_path, monkeypatch, name, kill, stage):
    cfg = {"disback": DISBACK, "msd_init": MSD_INIT}[name]
    run = str(tmp_path / "run")
    killed = _kill_at(monkeypatch, kill)
    d = Distiller(resolve(cfg), run, log=lambda *a: None)
    with pytest.raises(killed):
        d.run()
    assert d._stage()[0] == stage
    monkeypatch.delenv("SCOREDISTILL_FAULT")
    resumed = Distiller(resolve(cfg), run, log=lambda *a: None)
    resumed.run(resume=True)
    ref = runs[name]
    for role in ref.modules:
        a, b = ref.modules[role].state_dict(), resumed.modules[role].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), role
    if name == "disback":
        for k in (1, 2, 3):
            a = load_file(os.path.join(ref.run_dir, "teacher_path", f"s_{k:03d}.safetensors"))
            b = load_file(os.path.join(run, "teacher_path", f"s_{k:03d}.safetensors"))
            assert all(torch.equal(a[n], b[n]) for n in a), k


def test_recorded_path_leads_from_the_teacher_toward_the_initial_generator(runs):
    """s_0 = teacher, and each later checkpoint denoises the initial generator's (noised) samples better:
    the path runs from the teacher's score toward the initial student's."""
    d = runs["disback"]
    gen = Distiller(resolve(DISBACK), None, log=lambda *a: None).generator  # the same seed: the initial generator
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x0 = gen(torch.randn(512, 2, generator=g), None)
        t = torch.full((512,), 0.3, dtype=torch.float64)
        x_t = d.teacher.process.add_noise(x0, torch.randn(512, 2, generator=g), t)
        errs = [float(((d.path.network(k)(x_t, t) - x0) ** 2).mean()) for k in range(4)]
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    assert d.path.recorded == [1, 2, 3]


def test_teacher_score_matching_brings_the_students_to_the_teacher(runs):
    """The init stage's checkpoint (iteration 24) holds students whose denoiser is much closer to the teacher's
    than the initial one; distillation then trains them further. Error summed over rho = 0.3, 1, 3 on noised
    teacher samples, after 24 iterations (batch 32, lr 3e-3), 3 seeds: 0.44-0.51 of the initial one."""
    d = runs["msd_init"]
    g = torch.Generator().manual_seed(0)
    cond = torch.arange(512) % 4
    points = []
    for rho in (0.3, 1.0, 3.0):
        x_t = d.teacher.sample(512, cond=cond, generator=g) + rho * torch.randn(512, 2, generator=g)
        points.append((x_t, torch.full((512,), float(d.teacher.process.t_from_rho(rho)), dtype=torch.float64)))

    def err(weights):
        den = Distiller(resolve(MSD_INIT), None, log=lambda *a: None).generator
        if weights is not None:
            den.load_state_dict(weights)
        with torch.no_grad():
            return sum(float(((den.denoiser(x, t, cond) - d.teacher(x, t, cond)) ** 2).mean()) for x, t in points)

    folder = os.path.join(d.run_dir, "checkpoints", "step_0000024")
    after_init = {k[len("model/generator/"):]: v for k, v in load_file(os.path.join(folder, "state.safetensors"))
                  .items() if k.startswith("model/generator/")}
    e0, e1 = err(None), err(after_init)
    assert e1 < 0.65 * e0, (e0, e1)
    final = d.generator.state_dict()
    assert any(not torch.equal(final[k], after_init[k]) for k in final)  # distillation moved the students
    assert all(torch.isfinite(p).all() for p in d.generator.parameters())
    assert d.nonfinite == {"generator": 0, "fake_score": 0}


@pytest.mark.parametrize("override,field", [
    ("objective.path_checkpoints=0", "objective.path_checkpoints"),
    ("objective.record_steps=2", "objective.record_steps"),       # fewer iterations than checkpoints
    ("objective.hold_steps=8", "objective.hold_steps"),           # 6 + 2 x 8 > train.steps
    ("fake_score.kind=mlp", "fake_score.kind"),                    # the path must start at the teacher
    ("generator.init_steps=3", "generator.init_steps"),           # a time-free MLP generator has no denoiser
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, override, field):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(DISBACK))
    code, err = run_main(["distill", str(path), "--out", str(tmp_path / "r"), "--set", override], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{field}: " in err, err


def test_init_longer_than_the_run_is_refused(tmp_path, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MSD_INIT))
    code, err = run_main(["distill", str(path), "--out", str(tmp_path / "r"), "--set", "generator.init_steps=30"],
                         capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "generator.init_steps: " in err, err
