"""Bad inputs and edge cases of diffusers teachers, students and exports: each is one line naming the
field (ConfigError -> exit 2) or a reproducible result, on tiny pipelines built in the test.

Also the family dispatch: the folder picks its class once (adapters/families.py).
"""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from scoredistill.adapters.diffusers_teacher import build_diffusers_teacher  # noqa: E402
from scoredistill.adapters.families import SD, SD3, SDXL, Flux, UNet2D, family_of, read_index  # noqa: E402
from scoredistill.cli.main import main  # noqa: E402
from scoredistill.config import ConfigError, resolve  # noqa: E402
from scoredistill.engine.distiller import Distiller  # noqa: E402

PROMPTS = ["a red cube", "a blue ball"]

pytestmark = pytest.mark.usefixtures("one_thread")


def teacher_cfg(path, kind, **kw):
    cfg = {"kind": "diffusers", "path": path, **kw}
    if kind != "ddpm":
        cfg["prompts"] = list(PROMPTS)
    return cfg


def run_cfg(path, kind, generator=None, fake=None, **teacher):
    return resolve({"teacher": teacher_cfg(path, kind, **teacher), "generator": generator or {"kind": "teacher"},
                    "fake_score": fake or {"kind": "teacher"}, "objective": {"name": "dmd2"},
                    "train": {"steps": 1, "batch_size": 2, "ema": 0.0, "progress": False},
                    "eval": {"every": 1, "n_samples": 16, "plots": False}})


def last_line(capsys):
    """The error line on stderr (diffusers' loading progress bars may precede it), never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def train(cfg, run):
    d = Distiller(cfg, str(run), log=lambda *a: None)
    d.train()
    return d


# -- family dispatch ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,cls", [("ddpm", UNet2D), ("sd15", SD), ("sdxl", SDXL), ("sd3", SD3),
                                      ("flux", Flux)])
def test_the_folder_picks_its_family_class_once(tiny, kind, cls):
    path = tiny(kind)
    assert type(family_of(path, read_index(path))) is cls
    kw = {"resolution": 16} if kind == "flux" else {}
    t = build_diffusers_teacher(teacher_cfg(path, kind, **kw))
    assert type(t.family) is cls and t.assets.family is t.family
    assert t.sigma_data == (0.5 if kind == "ddpm" else 1.0)


def test_unsupported_unet_variant_names_the_accepted_ones(tiny, tmp_path):
    path = str(tmp_path / "pipe")
    shutil.copytree(tiny("sd15"), path)
    cfg_path = os.path.join(path, "unet", "config.json")
    cfg = json.load(open(cfg_path))
    json.dump(cfg | {"addition_embed_type": "text"}, open(cfg_path, "w"))
    with pytest.raises(ConfigError, match=r"teacher\.path: UNet2DConditionModel with this config.*text_time"):
        build_diffusers_teacher(teacher_cfg(path, "sd15"))


# -- resolution against the VAE factor and the network's downsampling --------------------------------
@pytest.mark.parametrize("kind,bad,good,multiple", [
    ("ddpm", 15, 8, 2),    # pixel UNet with one downsampler (DDPM 15 used to be a traceback)
    ("sd15", 12, 24, 8),   # VAE 2 x UNet 2 = 4, and StableDiffusionPipeline checks multiples of 8
    ("sd3", 18, 20, 4),    # VAE 2 x patch 2
    ("flux", 18, 20, 4),   # VAE 2 x 2x2 packing (used to be floored silently)
])
def test_resolution_is_checked_at_load(tiny, kind, bad, good, multiple):
    path = tiny(kind)
    with pytest.raises(ConfigError, match=rf"^teacher\.resolution: .*not a multiple of {multiple} ") as e:
        build_diffusers_teacher(teacher_cfg(path, kind, resolution=bad))
    assert "\n" not in str(e.value) and f"accepted: multiples of {multiple}" in str(e.value)
    with pytest.raises(ConfigError, match=r"^teacher\.resolution"):
        build_diffusers_teacher(teacher_cfg(path, kind, resolution=[good, bad]))
    t = build_diffusers_teacher(teacher_cfg(path, kind, resolution=good))
    f = t.assets.vae_scale_factor
    assert t.data_shape[1:] == (good // f, good // f)


def test_bad_resolution_is_exit_2_before_training(tiny, tmp_path, capsys):
    from scoredistill.cli.main import main as cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"teacher": teacher_cfg(tiny("ddpm"), "ddpm", resolution=15),
                                  "generator": {"kind": "teacher"}, "fake_score": {"kind": "teacher"},
                                  "objective": {"name": "dmd2"}, "train": {"steps": 1, "batch_size": 2}}))
    with pytest.raises(SystemExit) as e:
        cli(["distill", str(recipe), "--out", str(tmp_path / "run")])
    err = last_line(capsys)
    assert e.value.code == 2 and err.startswith("scoredistill: error: teacher.resolution")
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- LoRA on a network without peft support -----------------------------------------------------------
def test_lora_on_unet2dmodel_is_one_line(tiny):
    from scoredistill.engine.build import build_fake, build_generator

    t = build_diffusers_teacher(teacher_cfg(tiny("ddpm"), "ddpm"))
    with pytest.raises(ConfigError, match=r"^generator\.kind: lora is not supported for UNet2DModel.*accepted:"):
        build_generator(resolve({"generator": {"kind": "lora", "lora_rank": 4}})["generator"], t)
    with pytest.raises(ConfigError, match=r"^fake_score\.kind: lora is not supported for UNet2DModel.*accepted:"):
        build_fake(resolve({"fake_score": {"kind": "lora", "lora_rank": 4}})["fake_score"], t, 0.5)


def test_tiny_unet_runs_one_scm_step(tiny):
    """sCM (objectives/scm.py) on a pixel-space UNet2DModel with attention as teacher and student: one loss +
    backward with ``jvp: auto`` (torch.func.jvp, or one warning line and the finite-difference fallback where
    the attention kernel has no forward-mode rule) gives a finite, non-zero gradient."""
    import copy

    from scoredistill.objectives import Batch, Roles, build_objective

    teacher = build_diffusers_teacher(teacher_cfg(tiny("ddpm"), "ddpm")).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    real = 0.5 * torch.randn(2, *teacher.data_shape, generator=torch.Generator().manual_seed(0))
    obj = build_objective({"name": "scm", "jvp": "auto"})
    lines = []
    obj.tangent.log = lines.append
    batch = Batch(x=torch.zeros_like(real), real=real, rng=torch.Generator().manual_seed(1), step=10)
    out = obj.generator_loss(batch, Roles(teacher=teacher, student=student,
                                          target=copy.deepcopy(teacher)))
    out["loss"].backward()
    g = torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])
    assert len(lines) <= 1 and torch.isfinite(g).all() and g.abs().max() > 0


# -- load errors name the component; hub ids are refused without network -----------------------------
def test_missing_component_is_named(tiny, tmp_path):
    path = str(tmp_path / "no_vae")
    shutil.copytree(tiny("sd15"), path)
    shutil.rmtree(os.path.join(path, "vae"))
    with pytest.raises(ConfigError, match=r"teacher\.path: .*missing the vae/ component \(AutoencoderKL\)"):
        build_diffusers_teacher(teacher_cfg(path, "sd15"))
    from scoredistill.adapters.latents import main as encode_main

    assert encode_main(["--teacher", path, "in.npy", "out.npy"]) == 2  # the latent encoder says the same
    path2 = str(tmp_path / "no_unet")
    shutil.copytree(tiny("ddpm"), path2)
    shutil.rmtree(os.path.join(path2, "unet"))
    with pytest.raises(ConfigError, match=r"missing the unet/ component \(UNet2DModel\)"):
        build_diffusers_teacher(teacher_cfg(path2, "ddpm"))
    path3 = str(tmp_path / "vae_null")  # a latent pipeline whose index stores vae as [null, null]
    shutil.copytree(tiny("sd15"), path3)
    idx = json.load(open(os.path.join(path3, "model_index.json")))
    json.dump(idx | {"vae": [None, None]}, open(os.path.join(path3, "model_index.json"), "w"))
    with pytest.raises(ConfigError, match=r"no vae component, which a sd pipeline needs"):
        build_diffusers_teacher(teacher_cfg(path3, "sd15"))


def test_hub_id_says_a_local_folder_is_needed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"teacher\.path: 'stabilityai/sdxl-turbo' is not a local folder.*hub id"):
        build_diffusers_teacher({"kind": "diffusers", "path": "stabilityai/sdxl-turbo", "prompts": PROMPTS})
    with pytest.raises(ConfigError, match=r"teacher\.path: folder not found: /no/such/pipe$"):
        build_diffusers_teacher({"kind": "diffusers", "path": "/no/such/pipe"})


# -- seeded K-step sampling ---------------------------------------------------------------------------
def test_k_step_student_samples_reproducibly(tiny, tmp_path):
    run = tmp_path / "run"
    train(run_cfg(tiny("sd15"), "sd15", generator={"kind": "teacher", "timesteps": [999, 749, 499]}), run)
    outs = []
    for seed in (3, 3, 4):
        torch.randn(17)  # whatever the global RNG holds must not matter
        out = tmp_path / f"s{len(outs)}.npy"
        assert main(["sample", str(run), "--n", "4", "--seed", str(seed), "--out", str(out)]) == 0
        outs.append(np.load(out))
    assert np.array_equal(outs[0], outs[1])
    assert not np.allclose(outs[0], outs[2])
    # the rollout re-noises with fresh noise: different noise per step, not a copy of z
    from scoredistill.models.registry import load_model

    gen, _ = load_model(str(run / "generator"))
    assert gen.nfe == 3
    gen.eval()
    z = torch.randn(2, *gen.data_shape)
    c = torch.tensor([0, 1])
    with torch.no_grad():
        a, b = gen(z, c), gen(z, c)
        torch.manual_seed(123)
        assert torch.equal(a, b) and torch.equal(a, gen(z, c))


# -- clean scheduler configs, --force only for the library's own exports ------------------------------
@pytest.fixture(scope="module")
def ddpm_run(tiny, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddpm_run") / "run"
    train(run_cfg(tiny("ddpm"), "ddpm", generator={"kind": "teacher", "timesteps": [999, 499]}), run)
    return run


def test_exported_lcm_scheduler_has_no_stale_keys(tiny, tmp_path, caplog):
    """SDXL's EulerDiscreteScheduler config carries sigma/Karras keys LCMScheduler does not take;
    diffusers warned about them on every load of the exported pipeline."""
    import inspect

    from diffusers import DiffusionPipeline, LCMScheduler

    from scoredistill.adapters.export import export_run

    run = tmp_path / "run"
    train(run_cfg(tiny("sdxl"), "sdxl", generator={"kind": "teacher", "timesteps": [399]}), run)
    src = json.load(open(os.path.join(tiny("sdxl"), "scheduler", "scheduler_config.json")))
    assert "use_karras_sigmas" in src  # the teacher's scheduler does carry foreign keys
    export_run(str(run), str(tmp_path / "pipe"), verify=False)
    cfg = json.load(open(tmp_path / "pipe" / "scheduler" / "scheduler_config.json"))
    own = set(inspect.signature(LCMScheduler.__init__).parameters)
    assert cfg["_class_name"] == "LCMScheduler"
    assert {k for k in cfg if not k.startswith("_")} <= own
    assert cfg["beta_schedule"] == src["beta_schedule"] and cfg["beta_start"] == src["beta_start"]
    import diffusers

    diffusers.utils.logging.enable_propagation()
    diffusers.utils.logging.set_verbosity_warning()
    try:
        with caplog.at_level(logging.WARNING):
            DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    finally:
        diffusers.utils.logging.disable_propagation()
    assert not [r for r in caplog.records if "are not expected" in r.getMessage()]


def test_export_force_replaces_only_exports(ddpm_run, tmp_path, capsys):
    out = tmp_path / "pipe"
    assert main(["export", str(ddpm_run), "--out", str(out), "--no-verify"]) == 0
    assert (out / ".scoredistill-export").is_file()
    (out / "extra.txt").write_text("stale")
    with pytest.raises(SystemExit) as e:  # an earlier export, without --force
        main(["export", str(ddpm_run), "--out", str(out), "--no-verify"])
    err = last_line(capsys)
    assert e.value.code == 2 and err.startswith("scoredistill: error: --out") and "--force" in err
    assert main(["export", str(ddpm_run), "--out", str(out), "--force"]) == 0
    assert not (out / "extra.txt").exists() and (out / "model_index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary folder left behind
    # a foreign folder is never replaced, --force or not
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--force"]):
        with pytest.raises(SystemExit) as e:
            main(["export", str(ddpm_run), "--out", str(mine), *extra])
        err = last_line(capsys)
        assert e.value.code == 2 and err.startswith("scoredistill: error: --out")
        assert "not written by scoredistill export" in err
        assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_failed_export_leaves_nothing(ddpm_run, tmp_path, capsys):
    out = tmp_path / "lora"
    with pytest.raises(SystemExit) as e:  # a full-copy student has no LoRA
        main(["export", str(ddpm_run), "--format", "lora", "--out", str(out)])
    assert e.value.code == 2 and "generator.kind: lora" in last_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_pixel_student_exports_at_its_training_resolution(tiny, tmp_path):
    """DDPMPipeline samples at the UNet's sample_size (8 here); a student trained at 16 exports with
    sample_size 16 (this used to fail verification with a shape mismatch)."""
    from scoredistill.adapters.export import export_run

    run = tmp_path / "run"
    train(run_cfg(tiny("ddpm"), "ddpm", resolution=16), run)
    info = export_run(str(run), str(tmp_path / "pipe"))
    assert info["verify"]["first_step_matches"] and info["verify"]["full_sample_shape"] == [2, 16, 16, 3]
    assert json.load(open(tmp_path / "pipe" / "unet" / "config.json"))["sample_size"] == 16


def test_real_data_is_never_sampled_from_a_diffusers_teacher(tiny):
    """DMD2 with its GAN needs real samples; from a latent teacher they must be given, not drawn silently
    (a 20 000-sample pool at 35 NFE each took 571 s on a tiny model before this check)."""
    from scoredistill.config import resolve
    from scoredistill.engine.distiller import Distiller
    from scoredistill.errors import ConfigError

    cfg = resolve({"teacher": {"kind": "diffusers", "path": tiny("sd15"), "prompts": ["a red cube"],
                               "resolution": 16},
                   "generator": {"kind": "teacher"}, "fake_score": {"kind": "teacher"},
                   "objective": {"name": "dmd2", "gan_weight_gen": 1e-3}, "train": {"batch_size": 2}})
    with pytest.raises(ConfigError) as e:
        Distiller(cfg, None)
    assert e.value.field == "train.real_data" and "adapters.latents" in str(e.value)
