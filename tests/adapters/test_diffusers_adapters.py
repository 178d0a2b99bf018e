"""Diffusers teachers through the library: conversions, CFG, LoRA critic, one training step.

Tiny random pipelines of the real architecture classes are built from configs and saved with
``save_pretrained`` (no downloads; HF_HUB_OFFLINE=1 from conftest).
"""

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from scoredistill.adapters.diffusers_teacher import build_diffusers_teacher, process_from_scheduler  # noqa: E402
from scoredistill.config import ConfigError, resolve  # noqa: E402
from scoredistill.engine.distiller import Distiller  # noqa: E402

PROMPTS = ["a red cube", "a blue ball"]

pytestmark = pytest.mark.usefixtures("one_thread")






def teacher_cfg(path, kind):
    cfg = {"kind": "diffusers", "path": path}
    if kind != "ddpm":
        cfg["prompts"] = list(PROMPTS)
    if kind == "flux":
        cfg["resolution"] = 16
    return cfg


# -- process and prediction from the scheduler ------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_process_matches_scheduler(schedule):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    proc, pred = process_from_scheduler(sched)
    n = torch.arange(0, 1000, 37)
    a2 = proc.alpha(n.double() / 1000) ** 2
    assert pred == "v"
    torch.testing.assert_close(a2, sched.alphas_cumprod[n].double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(proc.native_time(n.double() / 1000), n.double())


def test_flow_process_matches_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    proc, pred = process_from_scheduler(sched)
    assert pred == "flow"
    u = torch.linspace(1.0, 0.001, 1000, dtype=torch.float64)  # the scheduler's unshifted grid
    torch.testing.assert_close(proc.sigma(u), sched.sigmas.double(), atol=1e-6, rtol=1e-5)
    # FLUX dynamic shifting: mu from the sequence length, exactly as FluxPipeline
    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    proc, _ = process_from_scheduler(dyn, seq_len=1024)
    s = [1.0, 0.75, 0.5, 0.25]
    dyn.set_timesteps(sigmas=s, mu=calculate_shift(1024))
    torch.testing.assert_close(proc.sigma(torch.tensor(s, dtype=torch.float64)), dyn.sigmas[:4].double(),
                               atol=1e-6, rtol=1e-5)


def test_unsupported_scheduler_is_one_clear_error():
    from diffusers import DDPMScheduler

    with pytest.raises(ConfigError, match="rescale_betas_zero_snr"):
        process_from_scheduler(DDPMScheduler(rescale_betas_zero_snr=True))


# -- x0 from the adapter == the diffusers conversion of the model output ------------------------------
@pytest.mark.parametrize("pred,classes", [("epsilon", None), ("v_prediction", 5)])
def test_unet2d_x0_matches_scheduler(tiny, pred, classes):
    from diffusers import DDPMScheduler

    path = tiny("ddpm", prediction_type=pred, num_class_embeds=classes)
    cfg = {"kind": "diffusers", "path": path}
    if classes:
        cfg["null_class"] = classes - 1
    t = build_diffusers_teacher(cfg)
    assert t.num_classes == (classes - 1 if classes else None)
    sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler", clip_sample=False)  # D is unclipped
    x = torch.randn(2, *t.data_shape)
    labels = torch.tensor([0, 2]) if classes else None
    for n in (3, 500, 999):
        with torch.no_grad():
            out = t.model(x, n, class_labels=labels).sample
            want = torch.stack([sched.step(out[i:i + 1], n, x[i:i + 1]).pred_original_sample[0] for i in range(2)])
            got = t(x, torch.full((2,), n / 1000.0, dtype=torch.float64), labels)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    if classes:  # label -1 is the null class embedding (the last one)
        null = torch.full((2,), classes - 1)
        with torch.no_grad():
            out = t.model(x, 500, class_labels=null).sample
            want = torch.stack([sched.step(out[i:i + 1], 500, x[i:i + 1]).pred_original_sample[0] for i in range(2)])
            got = t(x, torch.full((2,), 0.5, dtype=torch.float64), torch.tensor([-1, -1]))
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_text_teacher_matches_pipeline_step(tiny, kind):
    """One pipeline step (LCM / stochastic flow-match) from x_t returns the x0 prediction; the adapter's
    x0 and canonical CFG must equal it for the same prompt, timestep and guidance scale."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, LCMScheduler

    path = tiny(kind)
    t = build_diffusers_teacher(teacher_cfg(path, kind))
    none = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(path, **none)
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(1, *t.data_shape)
    f = t.assets.vae_scale_factor
    hw = {"height": t.data_shape[1] * f, "width": t.data_shape[2] * f}
    for w in ((1.0,) if kind == "flux" else (1.0, 3.0)):
        if t.prediction == "flow":
            n_native = 700.0
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)
            step = {"sigmas": [n_native / 1000]}
            tc = torch.tensor([(n_native / 1000) / (t.process.shift - (t.process.shift - 1) * n_native / 1000)],
                              dtype=torch.float64)
        else:
            n_native = 600
            pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
            step = {"timesteps": [n_native]}
            tc = torch.tensor([n_native / 1000.0], dtype=torch.float64)
        lat = FluxPipeline._pack_latents(x, 1, *x.shape[1:]) if kind == "flux" else x
        out = pipe(prompt=PROMPTS[1], latents=lat.clone(), guidance_scale=w if kind != "flux" else 3.5,
                   output_type="latent", **step, **hw).images
        if kind == "flux":
            out = FluxPipeline._unpack_latents(out, hw["height"], hw["width"], f)
        with torch.no_grad():
            got = t.guided(x, tc, torch.tensor([1]), w)
        torch.testing.assert_close(got, out.to(got.dtype), atol=1e-3, rtol=1e-3)


def test_guided_w1_is_conditional_and_null_is_negative_prompt(tiny):
    t = build_diffusers_teacher(teacher_cfg(tiny("sd15"), "sd15") | {"negative_prompt": "blurry"})
    x = torch.randn(2, *t.data_shape)
    tt = torch.full((2,), 0.4, dtype=torch.float64)
    c = torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(t.guided(x, tt, c, 1.0), t(x, tt, c))
        d_u = t(x, tt, torch.tensor([-1, -1]))
        torch.testing.assert_close(t.guided(x, tt, c, 0.0), d_u, atol=1e-5, rtol=1e-5)
    t2 = build_diffusers_teacher(teacher_cfg(tiny("sd15"), "sd15"))
    with torch.no_grad():
        assert not torch.allclose(t2(x, tt, torch.tensor([-1, -1])), d_u)


# -- LoRA critic -------------------------------------------------------------------------------------
def test_lora_critic_shares_teacher_and_toggles(tiny):
    from scoredistill.adapters.lora import LoRACritic

    t = build_diffusers_teacher(teacher_cfg(tiny("sd15"), "sd15"))
    x = torch.randn(2, *t.data_shape)
    tt = torch.full((2,), 0.5, dtype=torch.float64)
    c = torch.tensor([0, 1])
    with torch.no_grad():
        before = t(x, tt, c)
    fake = LoRACritic(t, rank=4)
    names = [n for n, _ in fake.named_parameters()]
    assert names and all("lora" in n for n in names)
    base_numel = sum(p.numel() for n, p in t.model.named_parameters() if "lora_" not in n)
    assert sum(p.numel() for p in fake.parameters()) < 0.1 * base_numel
    with torch.no_grad():
        torch.testing.assert_close(fake(x, tt, c), before)  # lora_B = 0: starts at the teacher
        for p in fake.parameters():
            p.add_(0.1 * torch.randn_like(p))
        assert not torch.allclose(fake(x, tt, c), before, atol=1e-4)
        torch.testing.assert_close(t(x, tt, c), before)  # adapters off for the teacher role
    fake.requires_grad_(False)
    t(x, tt, c), fake(x, tt, c)
    assert not any(p.requires_grad for p in fake.parameters())  # calls never re-enable gradients
    fake.requires_grad_(True)
    t(x, tt, c)
    assert all(p.requires_grad for p in fake.parameters())


# -- one training step through the engine -------------------------------------------------------------
def make_cfg(path, kind, objective="dmd2", fake="teacher", generator="teacher", **sections):
    user = {
        "teacher": teacher_cfg(path, kind),
        "generator": {"kind": generator, **({"lora_rank": 4} if generator == "lora" else {})},
        "fake_score": {"kind": fake, **({"lora_rank": 4} if fake == "lora" else {})},
        "objective": {"name": objective, "guidance_scale": 2.0},
        "train": {"steps": 1, "batch_size": 2, "lr": 1e-3, "ema": 0.0, "progress": False, "checkpoint_every": 1},
        "eval": {"every": 1, "n_samples": 16, "plots": False},
    }
    for sec, vals in sections.items():
        user.setdefault(sec, {}).update(vals)
    return resolve(user)


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _changed(m, snap):
    return sum(not torch.equal(p.detach(), snap[n]) for n, p in m.named_parameters())


OBJECTIVES = ["dmd2", "sid"]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("fake", ["teacher", "lora"])
def test_one_training_step(tiny, tmp_path, objective, fake):
    cfg = make_cfg(tiny("sd15"), "sd15", objective, fake)
    d = Distiller(cfg, str(tmp_path / "run"), log=lambda *a: None)
    g0, f0 = _snapshot(d.generator), _snapshot(d.fake)
    t0 = {n: p.detach().clone() for n, p in d.teacher.model.named_parameters() if "lora_" not in n}
    d.train_step()
    assert _changed(d.generator, g0) > 0.5 * len(g0)
    assert _changed(d.fake, f0) > 0
    assert all(torch.equal(p, t0[n]) for n, p in d.teacher.model.named_parameters() if "lora_" not in n)
    if fake == "lora":  # only the adapter is a fake-score parameter
        assert all("lora" in n for n in f0)
    assert d.nonfinite == {r: 0 for r in d.nonfinite}


def test_flow_transformer_teachers_run_one_step(tiny, tmp_path):
    for kind, obj, fake in (("sd3", "dmd2", "lora"), ("flux", "sid", "teacher")):
        cfg = make_cfg(tiny(kind), kind, obj, fake)
        d = Distiller(cfg, str(tmp_path / kind), log=lambda *a: None)
        g0 = _snapshot(d.generator)
        d.train_step()
        assert _changed(d.generator, g0) > 0 and d.nonfinite["generator"] == 0
    assert d.teacher.embedded_guidance == 3.5  # FLUX guidance embedding fed to every role


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    from scoredistill.adapters.student import build_diffusers_generator

    t = build_diffusers_teacher(teacher_cfg(tiny("sd15"), "sd15"))
    base = {"kind": "teacher", "timesteps": None, "noise_input": None}
    grads = []
    for gc in (False, True):
        gen = build_diffusers_generator(base | {"gradient_checkpointing": gc}, t)
        z = torch.randn(2, *t.data_shape, generator=torch.Generator().manual_seed(0))
        gen(z, torch.tensor([0, 1])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_lora_critic_checkpoint_resume_keeps_sharing(tiny, tmp_path):
    cfg = make_cfg(tiny("sd15"), "sd15", "dmd2", "lora", train={"steps": 2, "checkpoint_every": 1})
    run = str(tmp_path / "run")
    d = Distiller(copy.deepcopy(cfg), run, log=lambda *a: None)
    d._t0 = 0.0
    d.train_step()
    d.save()
    saved = _snapshot(d.fake)
    d2 = Distiller(copy.deepcopy(cfg), run, log=lambda *a: None)
    assert d2.load_latest() == 1
    for n, p in d2.fake.named_parameters():
        torch.testing.assert_close(p.detach(), saved[n])
    shared = {id(p) for n, p in d2.teacher.model.named_parameters() if "lora_" in n}
    assert shared == {id(p) for p in d2.fake.parameters()}


def test_multistep_student_backward_simulation(tiny):
    from scoredistill.adapters.student import build_diffusers_generator

    t = build_diffusers_teacher(teacher_cfg(tiny("sd15"), "sd15"))
    gen = build_diffusers_generator({"kind": "teacher", "timesteps": [999, 749, 499, 249]}, t)
    assert gen.t_steps == [0.999, 0.749, 0.499, 0.249]
    z = torch.randn(2, *t.data_shape)
    calls = []
    hook = gen.denoiser.register_forward_pre_hook(lambda m, a: calls.append(float(a[1][0])))
    torch.manual_seed(3)
    gen.train()
    for _ in range(6):
        calls.clear()
        gen(z, torch.tensor([0, 1]))
        k = len(calls) - 1
        assert calls == pytest.approx(gen.t_steps[: k + 1])
    gen.eval()
    calls.clear()
    with torch.no_grad():
        gen(z, torch.tensor([0, 1]))
    assert calls == pytest.approx(gen.t_steps)
    hook.remove()
    # noise_input: scaled feeds s(t_0) z (SiD-LSG, the library's DenoiserGenerator); pure feeds z
    scaled = build_diffusers_generator({"kind": "teacher", "timesteps": [625], "noise_input": "scaled"}, t).eval()
    s = float(t.process.sigma(torch.tensor(0.625, dtype=torch.float64)))
    tt = torch.full((2,), 0.625, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(scaled(z, torch.tensor([0, 1])), scaled.denoiser(s * z, tt, torch.tensor([0, 1])))


def test_config_errors_are_one_line(tiny):
    from scoredistill.engine.build import build_fake, build_generator, build_teacher

    with pytest.raises(ConfigError, match="teacher.prompts"):
        build_teacher({"kind": "diffusers", "path": tiny("sd15"), "process": {"kind": "edm"}})
    with pytest.raises(ConfigError, match="teacher.path"):
        build_teacher({"kind": "diffusers", "path": "/nonexistent/pipe"})
    t = build_diffusers_teacher(teacher_cfg(tiny("sd15"), "sd15"))
    with pytest.raises(ConfigError, match="generator.timesteps"):
        build_generator(resolve({"generator": {"kind": "teacher", "timesteps": [249, 999]}})["generator"], t)
    with pytest.raises(ConfigError, match="fake_score.lora_rank"):
        build_fake(resolve({"fake_score": {"kind": "lora"}})["fake_score"], t, 1.0)
    gmm, _ = build_teacher(resolve({"teacher": {"kind": "gmm", "preset": "ring8"}})["teacher"])
    with pytest.raises(ConfigError, match="diffusers"):
        build_fake(resolve({"fake_score": {"kind": "lora", "lora_rank": 4}})["fake_score"], gmm, 1.0)
