"""Recipes for real diffusers teachers run one step on tiny models of the same architecture classes,
and distilled students export to diffusers folders / LoRA weights that reload and sample.

Everything is built from configs (no downloads; HF_HUB_OFFLINE=1 from conftest).
"""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from helpers import ROOT  # noqa: E402
from scoredistill.cli.main import main  # noqa: E402
from scoredistill.config import load_yaml, resolve  # noqa: E402
from scoredistill.engine.distiller import Distiller  # noqa: E402

PROMPTS = ["a red cube", "a blue ball"]

pytestmark = pytest.mark.usefixtures("one_thread")






def real_latents(path, folder, n=8):
    """Real data for GAN terms: random 'images' through the tiny VAE (scoredistill.adapters.latents)."""
    from scoredistill.adapters.latents import encode_images, load_vae

    vae, scale, shift = load_vae(path)
    images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = encode_images(vae, scale, shift, images)
    assert lat.shape == (n, vae.config.latent_channels, 8, 8)
    out = os.path.join(folder, "latents.npy")
    np.save(out, lat.numpy())
    return out


def train(cfg, run):
    d = Distiller(cfg, str(run), log=lambda *a: None)
    res = d.train()
    assert res["non_finite"] == 0 and d.nonfinite == {r: 0 for r in d.nonfinite}
    return d


def tiny_overrides(path, tmp_path, real=None):
    return [f"teacher.path={path}", f"teacher.prompts={json.dumps(PROMPTS)}", "teacher.resolution=16",
            "train.batch_size=2", "train.steps=1", "train.device=cpu", "train.progress=false",
            "train.checkpoint_every=1", "eval.every=1", "eval.n_samples=16", "eval.plots=false"] + \
        ([f"train.real_data={real}", "train.real_pool=8"] if real else [])


@pytest.mark.parametrize("recipe,kind,export_fmt", [
    ("sd15/dmd2.yaml", "sd15", None),
    ("sdxl/dmd2.yaml", "sdxl", "diffusers"),        # 1 step at t = 399: custom LCM timesteps
    ("sdxl/dmd2_4step_lora.yaml", "sdxl", "lora"),  # backward simulation, LoRA student -> LoRA export
    ("sd3/sid.yaml", "sd3", "diffusers"),           # 4-step flow student -> sigmas + stochastic sampling
])
def test_recipe_one_step_and_export(tiny, tmp_path, recipe, kind, export_fmt):
    path = tiny(kind)
    user = load_yaml(os.path.join(ROOT, "recipes", recipe))
    needs_real = user["objective"].get("gan_weight_gen", 0) > 0
    real = real_latents(path, str(tmp_path)) if needs_real else None
    cfg = resolve(user, tiny_overrides(path, tmp_path, real))
    d = train(cfg, tmp_path / "run")
    if needs_real:
        assert d.disc is not None and d.real.shape[1:] == (4, 8, 8)
    if export_fmt:
        out = str(tmp_path / "export")
        info = __import__("scoredistill.adapters.export", fromlist=["export_run"]).export_run(
            str(tmp_path / "run"), out, export_fmt)
        assert info["verify"]["first_step_matches"] and info["verify"]["full_sample_finite"]
        assert info["verify"]["steps"] == len(user["generator"]["timesteps"])


def test_unconditional_unet_export_cli_reload_sample(tiny, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    path = tiny("ddpm")
    cfg = resolve({"teacher": {"kind": "diffusers", "path": path}, "generator": {"kind": "teacher"},
                   "fake_score": {"kind": "teacher"}, "objective": {"name": "dmd2"},
                   "train": {"steps": 1, "batch_size": 2, "ema": 0.9, "progress": False},
                   "eval": {"every": 1, "n_samples": 16, "plots": False}})
    run, out = tmp_path / "run", tmp_path / "pipe"
    train(cfg, run)
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DDPMPipeline" in printed and '"first_step_matches": true' in printed
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    call = json.load(open(out / "scoredistill_export.json"))["call"]
    img = pipe(batch_size=2, output_type="np", generator=torch.Generator().manual_seed(1), **call).images
    assert img.shape == (2, 8, 8, 3) and np.isfinite(img).all()
    # the student itself samples without the run (RUN_DIR/generator) ...
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (4, 3, 8, 8)
    # ... and a full-copy student has no LoRA to export: one line, exit 2
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--format", "lora", "--out", str(tmp_path / "lora")])
    assert e.value.code == 2 and "generator.kind: lora" in capsys.readouterr().err


def test_text_unet_lora_student_exports_both_formats(tiny, tmp_path):
    from scoredistill.adapters.export import export_run

    path = tiny("sd15")
    cfg = resolve({"teacher": {"kind": "diffusers", "path": path, "prompts": PROMPTS},
                   "generator": {"kind": "lora", "lora_rank": 4, "lora_alpha": 2, "timesteps": [999, 499]},
                   "fake_score": {"kind": "lora", "lora_rank": 4},
                   "objective": {"name": "dmd2", "guidance_scale": 1.75},
                   "train": {"steps": 1, "batch_size": 2, "lr": 1e-2, "ema": 0.0, "progress": False},
                   "eval": {"every": 1, "n_samples": 16, "plots": False}})
    d = train(cfg, tmp_path / "run")
    assert all("lora" in n for n, _ in d.generator.named_parameters())
    from scoredistill.models.registry import load_model

    gen, _ = load_model(str(tmp_path / "run" / "generator"))  # RUN_DIR/generator: LoRA weights + config
    z, c = torch.randn(2, *gen.data_shape), torch.tensor([0, 1])
    t0 = torch.full((2,), gen.t_steps[0], dtype=torch.float64)
    with torch.no_grad():
        delta = (gen.denoiser(z, t0, c, lora=True) - gen.denoiser(z, t0, c, lora=False)).abs().max()
    assert delta > 2e-2  # the adapter matters: a lost or mis-scaled LoRA fails the 1e-3 export check
    full = export_run(str(tmp_path / "run"), str(tmp_path / "pipe"), "diffusers")
    lora = export_run(str(tmp_path / "run"), str(tmp_path / "lora"), "lora")
    assert full["call"]["num_inference_steps"] == 2  # [999, 499] is LCM's 2-step grid
    assert os.path.exists(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    for info in (full, lora):
        assert info["verify"]["first_step_matches"] and info["verify"]["max_abs_diff"] < 1e-3


def test_consistency_student_exports_an_lcm_pipeline_that_reproduces_sample_steps(tiny, tmp_path):
    """A 4-step consistency student (``cd``) on a tiny text UNet exports with an ``LCMScheduler`` whose 1-, 2- and
    4-step samples from the reloaded folder equal ``scoredistill sample RUN --steps K'`` from the same noise (the
    export's verification compares every K'; here also the CLI's own output at K' = 2)."""
    from diffusers import DiffusionPipeline

    from scoredistill.adapters.export import export_run
    from scoredistill.models.rollout import sample_noise_seed

    path = tiny("sd15")
    cfg = resolve({"teacher": {"kind": "diffusers", "path": path, "prompts": PROMPTS},
                   "generator": {"kind": "teacher", "timesteps": [999, 749, 499, 249]},
                   "objective": {"name": "cd"}, "train": {"steps": 1, "batch_size": 2, "lr": 1e-3, "ema": 0.0,
                                                          "progress": False, "real_pool": 8,
                                                          "real_data": real_latents(path, str(tmp_path))},
                   "eval": {"every": 1, "n_samples": 16, "plots": False}})
    train(cfg, tmp_path / "run")
    info = export_run(str(tmp_path / "run"), str(tmp_path / "pipe"), "diffusers")
    v = info["verify"]
    assert info["call"] == {**info["calls"]["4"], **{k: info["call"][k] for k in ("height", "width", "guidance_scale")}}
    assert [info["calls"][k]["num_inference_steps"] for k in ("1", "2", "4")] == [1, 2, 4]
    assert v["samples_match"] and set(v["samples_max_abs_diff"]) == {"1", "2", "3", "4"}
    # measured 3.1e-5 (K' = 1, 2) and 4.6e-5 (K' = 3, 4): float32 rounding of LCM's eps -> x0 at t = 999, where
    # 1/sqrt(alpha_bar) ~ 150 amplifies it
    assert max(v["samples_max_abs_diff"].values()) < 2e-4
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert main(["sample", str(tmp_path / "run"), "--n", "2", "--seed", "5", "--steps", "2", "--class", "1",
                 "--out", str(tmp_path / "s.npy")]) == 0
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(info["calls"]["2"])
    got = pipe(prompt=[PROMPTS[1]] * 2, latents=z, generator=torch.Generator().manual_seed(sample_noise_seed(5)),
               output_type="latent", **kw).images
    diff = float((got - torch.from_numpy(np.load(tmp_path / "s.npy"))).abs().max())
    assert diff < 2e-4, diff  # measured 1.9e-5


def test_export_refuses_a_student_the_schedulers_cannot_express(tiny):
    from scoredistill.adapters.export import student_scheduler
    from scoredistill.adapters.student import build_diffusers_generator
    from scoredistill.config import ConfigError

    t = __import__("scoredistill.adapters.diffusers_teacher", fromlist=["x"]).build_diffusers_teacher(
        {"kind": "diffusers", "path": tiny("ddpm")})
    gen = build_diffusers_generator({"kind": "teacher", "timesteps": [999, 499], "noise_input": "scaled"}, t)
    with pytest.raises(ConfigError, match=r"^generator\.noise_input: .*accepted: pure"):
        student_scheduler(gen)
    gen.noise_input, gen.rollout.mode = "pure", "fixed"
    with pytest.raises(ConfigError, match=r"^generator\.rollout: .*accepted for export: fresh .*ddim"):
        student_scheduler(gen)
