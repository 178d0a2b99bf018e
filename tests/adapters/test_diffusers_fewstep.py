"""K-step diffusers students beyond fresh re-noising (docs/diffusers.md, "Few-step students: rollout modes and
experts"): TDM and Phased DMD on tiny random UNet students with the ``ddim`` rollout, experts (one full copy or
one LoRA adapter per phase) of which only the trained step's phase receives gradient, an exact resume, the
saved folder and ``scoredistill sample``, export with DDIM / deterministic Euler schedulers, and one-line
refusals. Everything runs on tiny pipelines built in the test (no downloads)."""

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from scoredistill.adapters.student import LoRAExperts  # noqa: E402
from scoredistill.cli.main import main  # noqa: E402
from scoredistill.config import ConfigError, resolve  # noqa: E402
from scoredistill.engine.distiller import Distiller  # noqa: E402
from scoredistill.models.fewstep import PhaseExperts, phase_index  # noqa: E402
from scoredistill.models.registry import load_model, save_model  # noqa: E402

PROMPTS = ["a red cube", "a blue ball"]

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(path, objective, generator, fake=None, text=False, **train):
    teacher = {"kind": "diffusers", "path": path, **({"prompts": list(PROMPTS)} if text else {})}
    return resolve({"teacher": teacher, "generator": generator, "fake_score": fake or {"kind": "teacher"},
                    "objective": {"name": objective},
                    "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "ema": 0.5, "progress": False,
                              "checkpoint_every": 100, **train},
                    "eval": {"every": 100, "n_samples": 16, "plots": False}})


def quiet(cfg, run=None):
    return Distiller(cfg, None if run is None else str(run), log=lambda *a: None)


DDIM4 = {"kind": "teacher", "timesteps": [999, 749, 499, 249], "rollout": "ddim"}


@pytest.mark.parametrize("objective", ["tdm", "phased_dmd"])
def test_rollout_objectives_train_a_ddim_unet_student(tiny, objective):
    d = quiet(make_cfg(tiny("ddpm"), objective, DDIM4))
    gen = d.generator
    if objective == "phased_dmd":  # one full copy per phase (= per step by default), as for native students
        assert isinstance(gen.denoiser, PhaseExperts) and len(gen.denoiser.nets) == 4
        assert gen.denoiser.split == gen.t_steps[1:]
    before = copy.deepcopy(gen.state_dict())
    for _ in range(2):
        d.train_step()
        so = d._last_rollout  # the trained step's record the objective read (Batch.rollout)
        assert so is not None and float(so.t[0]) == pytest.approx(gen.t_steps[so.step])
    assert d.nonfinite == {r: 0 for r in d.nonfinite}
    assert any(not torch.equal(v, gen.state_dict()[k]) for k, v in before.items())


def _reached(params) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


@pytest.mark.parametrize("kind", ["teacher", "lora"])
def test_only_the_trained_steps_expert_gets_gradient(tiny, tmp_path, kind):
    text = kind == "lora"  # UNet2DModel has no peft adapters: LoRA experts on the text UNet
    gcfg = {"kind": kind, "timesteps": [999, 749, 499], "rollout": "ddim", "experts": "per_step",
            "step_weights": [1, 1, 2], **({"lora_rank": 2} if text else {})}
    d = quiet(make_cfg(tiny("sd15" if text else "ddpm"), "dmd2", gcfg, text=text))
    gen = d.generator
    if text:
        assert isinstance(gen.denoiser, LoRAExperts) and gen.denoiser.names == ["phase0", "phase1", "phase2"]
        assert all("lora" in n for n, _ in gen.named_parameters())  # one frozen base, only adapters registered
        experts = [[p for n, p in gen.named_parameters() if f"__phase{e}__" in n] for e in range(3)]
    else:
        experts = [list(net.parameters()) for net in gen.denoiser.nets]
    assert all(len(e) for e in experts) and sum(map(len, experts)) == len(list(gen.parameters()))
    z = torch.randn(2, *gen.data_shape, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0, 1]) if text else None
    gen.train()
    for k in range(3):
        gen.set_rollout_step(k)
        gen.zero_grad(set_to_none=True)
        so = gen.train_output(z, cond, generator=torch.Generator().manual_seed(1))
        so.x0.square().mean().backward()
        owner = int(phase_index(so.t[:1], gen.denoiser.split))
        assert owner == k and [_reached(e) for e in experts] == [e == k for e in range(3)]
    # routing never touches requires_grad (peft's set_adapter would): the engine's freezing stays in force
    assert all(p.requires_grad for p in gen.parameters())
    # the saved folder rebuilds the experts, the rollout mode and the step weights
    save_model(gen, str(tmp_path / "gen"))
    back, _ = load_model(str(tmp_path / "gen"))
    assert type(back.denoiser) is type(gen.denoiser) and back.denoiser.split == gen.denoiser.split
    assert back.rollout.describe() == gen.rollout.describe() and back.rollout.step_weights == [0.25, 0.25, 0.5]
    with torch.no_grad():
        assert torch.equal(back.eval()(z, cond), gen.eval()(z, cond))
    if text:  # a batch mixing phases is split by phase, each part through its own adapter
        t = torch.tensor([gen.t_steps[0], gen.t_steps[2]], dtype=torch.float64)
        with torch.no_grad():
            for n, p in gen.named_parameters():  # lora_B starts at 0 (every adapter = the base): make them differ
                if "lora_B" in n:
                    p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(n)))
            both = gen.denoiser(z, t, cond)
            one = [gen.denoiser(z[i:i + 1], t[i:i + 1], cond[i:i + 1]) for i in range(2)]
            wrong = gen.denoiser._phase("phase0", z[1:], t[1:], cond[1:])  # sample 1 through phase 0's adapter
        torch.testing.assert_close(both, torch.cat(one), rtol=1e-5, atol=1e-6)
        assert float((wrong - both[1:]).abs().max()) > 1e-2  # measured 0.050: the adapter in use matters


def test_lora_experts_resume_save_sample_and_refuse_export(tiny, tmp_path, capsys):
    gcfg = {"kind": "lora", "lora_rank": 2, "timesteps": [999, 499], "rollout": "ddim"}
    cfg = make_cfg(tiny("sd15"), "phased_dmd", gcfg, fake={"kind": "lora", "lora_rank": 2}, text=True,
                   steps=4, checkpoint_every=2, lr=1e-2)
    full = quiet(copy.deepcopy(cfg), tmp_path / "full")
    assert isinstance(full.generator.denoiser, LoRAExperts)
    full.run()
    half_cfg = copy.deepcopy(cfg)
    half_cfg["train"]["steps"] = 2
    half = quiet(half_cfg, tmp_path / "half")
    half.run()
    resumed = quiet(copy.deepcopy(cfg), tmp_path / "half")
    resumed.run(resume=True)
    a, b = full.generator.state_dict(), resumed.generator.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in half.generator.state_dict().items())
    # the saved folder rebuilds the experts; it samples as the run's student does
    model, _ = load_model(str(tmp_path / "full" / "generator"))
    assert isinstance(model.denoiser, LoRAExperts) and model.rollout.mode == "ddim"
    z = torch.randn(2, *model.data_shape, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(model.eval()(z, c), full.student().eval()(z, c))
    for steps in ([], ["--steps", "1"]):
        out = tmp_path / f"s{len(steps)}.npy"
        assert main(["sample", str(tmp_path / "full"), "--n", "2", "--out", str(out), *steps]) == 0
        assert np.load(out).shape == (2, 4, 8, 8) and np.isfinite(np.load(out)).all()
    # a diffusers pipeline holds one network (and one LoRA file is one adapter): export refuses experts with one
    # line, exit 2, in either format
    for fmt in ("diffusers", "lora"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["export", str(tmp_path / "full"), "--format", fmt, "--out", str(tmp_path / "pipe")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert line.startswith("scoredistill: error: generator.experts") and "accepted for export: null" in line
        assert not (tmp_path / "pipe").exists()


@pytest.mark.parametrize("kind, timesteps", [("ddpm", [999, 499]), ("sd3", [1000, 750, 500])])
def test_ddim_student_exports_a_pipeline_that_reproduces_it(tiny, tmp_path, kind, timesteps):
    """DDIM (eta 0, trailing grid) for DDPM teachers, deterministic Euler for flow teachers: the reloaded
    pipeline's samples equal the student's from the same noise (the export's own verification)."""
    from scoredistill.adapters.export import export_run

    text = kind != "ddpm"
    run = tmp_path / "run"
    quiet(make_cfg(tiny(kind), "dmd2", {"kind": "teacher", "timesteps": timesteps, "rollout": "ddim"},
                   text=text, steps=1), run).run()
    info = export_run(str(run), str(tmp_path / "pipe"))
    v = info["verify"]
    assert v["first_step_matches"] and v["samples_match"], v
    assert str(len(timesteps)) in v["samples_max_abs_diff"]  # the full K-step sample is compared
    # measured <= 1e-6 (float32 rounding); a fresh-noise scheduler on the same student differs by ~4
    assert max(v["samples_max_abs_diff"].values()) < 1e-5

    sched = json.load(open(tmp_path / "pipe" / "scheduler" / "scheduler_config.json"))
    if kind == "ddpm":
        assert sched["_class_name"] == "DDIMScheduler" and sched["timestep_spacing"] == "trailing"
    else:
        assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and not sched["stochastic_sampling"]


def test_bad_settings_are_one_line(tiny):
    from scoredistill.adapters.diffusers_teacher import build_diffusers_teacher
    from scoredistill.adapters.export import student_scheduler
    from scoredistill.adapters.student import build_diffusers_generator

    ddpm, sd = tiny("ddpm"), tiny("sd15")
    cases = [
        (ddpm, "tdm", {"kind": "teacher", "timesteps": [999, 499]}, "generator.rollout"),  # fresh re-noising
        (ddpm, "dmd2", {"kind": "teacher", "timesteps": [999, 499], "step_weights": [1, 2, 3]},
         "generator.step_weights"),
        (ddpm, "dmd2", {"kind": "teacher", "timesteps": [999, 499], "rollout": "ddim", "experts": "per_phase"},
         "generator.experts"),  # no phases without phased_dmd
        (ddpm, "phased_dmd", {"kind": "lora", "lora_rank": 2, "timesteps": [999, 499], "rollout": "ddim"},
         "generator.kind"),  # UNet2DModel: no peft adapters
        (sd, "phased_dmd", {"kind": "lora", "lora_rank": 2, "timesteps": [999, 499], "rollout": "ddim",
                            "gradient_checkpointing": True}, "generator.gradient_checkpointing"),
        (ddpm, "dmd2", {"kind": "mlp", "rollout": "ddim"}, "generator.rollout"),
    ]
    for path, objective, gcfg, field in cases:
        with pytest.raises(ConfigError) as e:
            quiet(make_cfg(path, objective, gcfg, text=path == sd))
        assert e.value.field == field, (gcfg, str(e.value))
    teacher = build_diffusers_teacher({"kind": "diffusers", "path": ddpm})
    gen = build_diffusers_generator({"kind": "teacher", "timesteps": [999, 600], "rollout": "ddim"}, teacher)
    with pytest.raises(ConfigError, match=r"^generator\.timesteps: .*trailing grid only; accepted .*\[999, 499\]"):
        student_scheduler(gen)
