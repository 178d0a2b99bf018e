"""``params.kind: latent``: a latent through a tiny random AutoencoderKL (built from a config, saved to
tmp_path; no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from scoredistill.cli.main import main
from scoredistill.config import ConfigError
from scoredistill.optimize import PriorOptimizer
from scoredistill.optimize.config import resolve
from scoredistill.optimize.driver import build_parameterization
from scoredistill.optimize.latent import LatentTensor

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=4, scaling_factor=0.5)
    folder = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(folder)
    return folder


# a GMM over flattened 3x4x4 "images" (decode: true) and over 4x2x2 latents (decode: false)
def _teacher(dim):
    return {"kind": "gmm", "means": [[0.3] * dim, [-0.3] * dim], "std": 0.3, "process": {"kind": "vp"}}


def _cfg(vae, decode=True, **train):
    dim = 48 if decode else 16
    return resolve({"teacher": _teacher(dim),
                    "params": {"kind": "latent", "vae": vae, "decode": decode, "n": 3, "shape": [4, 2, 2]},
                    "objective": {"name": "sds", "weighting": "uniform"},
                    "train": {"steps": 1, "progress": False, "lr": 0.1, "checkpoint_every": 1, **train},
                    "eval": {"every": 1, "plots": False}})


@pytest.mark.parametrize("decode", [True, False])
def test_render_is_differentiable(vae_dir, decode):
    from scoredistill.engine.build import build_teacher

    cfg = _cfg(vae_dir, decode)
    teacher, _ = build_teacher(cfg["teacher"])
    p = build_parameterization(cfg["params"], teacher, 0)
    assert isinstance(p, LatentTensor) and p.kind == "latent"
    assert set(p.state_dict()) == {"z"} and [n for n, _ in p.named_parameters()] == ["z"]
    r = p.render(torch.tensor([0, 2]))
    assert r.x.shape == (2, 48 if decode else 16)
    (r.x ** 2).sum().backward()
    g = p.z.grad
    assert g is not None and torch.isfinite(g).all() and g[[0, 2]].abs().sum() > 0 and g[1].abs().sum() == 0
    if not decode:
        assert torch.equal(r.x, p.z[[0, 2]].reshape(2, 16))
    assert p.decoded().shape == (3, 3, 4, 4)


def test_one_step_changes_the_latent_and_writes_params(vae_dir, tmp_path):
    out = str(tmp_path / "run")
    opt = PriorOptimizer(_cfg(vae_dir), out)
    z0 = opt.param.z.detach().clone()
    res = opt.run()
    assert res["step"] == 1 and res["non_finite"] == 0
    z1 = opt.param.z.detach()
    assert not torch.equal(z0, z1) and torch.isfinite(z1).all()
    saved = load_file(os.path.join(out, "params.safetensors"))
    assert set(saved) == {"z"} and torch.equal(saved["z"], z1)   # the VAE is not exported
    assert os.path.exists(os.path.join(out, "renders.npy"))


def test_shape_mismatch_is_a_config_error(vae_dir):
    from scoredistill.engine.build import build_teacher

    cfg = _cfg(vae_dir, decode=True)
    teacher, _ = build_teacher(_cfg(vae_dir, decode=False)["teacher"])   # 16-dim teacher, decoded 48
    with pytest.raises(ConfigError, match="params.decode: false"):
        build_parameterization(cfg["params"], teacher, 0)


@pytest.mark.parametrize("vae", ["missing", "empty"])
def test_bad_vae_path_is_one_line_exit_2(tmp_path, capsys, vae):
    path = str(tmp_path / "nope") if vae == "missing" else str(tmp_path)
    cfg = tmp_path / "latent.yaml"
    cfg.write_text("teacher: {kind: gmm, means: [[0.0, 0.0, 0.0, 0.0]], std: 0.3, process: {kind: vp}}\n"
                   f"params: {{kind: latent, vae: '{path}', decode: false, shape: [4, 1, 1]}}\n"
                   "objective: {name: sds}\n")
    try:
        code = main(["optimize", str(cfg), "--out", str(tmp_path / "run"), "--set", "train.progress=false"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("scoredistill: error: params.vae"), err
    assert not os.path.exists(tmp_path / "run")
