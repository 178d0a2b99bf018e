"""``blocks: plain`` MLP networks (issue 17): built from the schema key, cheaper than the residual default,
saved and reloaded as the same network, refused with one line where they do not apply."""

import pytest
import torch

from scoredistill.config import resolve
from scoredistill.engine.build import build_fake, build_generator, build_teacher
from scoredistill.errors import ConfigError
from scoredistill.models.mlp import MLPBackbone, MLPDenoiser, MLPGenerator, PlainBackbone
from scoredistill.models.registry import load_model, save_model


def roles(blocks: str):
    cfg = resolve({"teacher": {"kind": "gmm", "preset": "ring8"}, "generator": {"kind": "mlp", "blocks": blocks},
                   "fake_score": {"kind": "mlp", "blocks": blocks}, "objective": {"name": "dmd2"}})
    teacher, ref = build_teacher(cfg["teacher"])
    return build_generator(cfg["generator"], teacher), build_fake(cfg["fake_score"], teacher, ref.data_std())


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_default_stays_residual_and_plain_is_smaller():
    g_res, f_res = roles("residual")
    g_pl, f_pl = roles("plain")
    assert type(g_res.net) is MLPBackbone and type(f_res.net) is MLPBackbone
    assert isinstance(g_pl.net, PlainBackbone) and isinstance(f_pl.net, PlainBackbone)
    assert "blocks" not in g_res.arch and "blocks" not in f_res.arch  # old config.json files unchanged
    # width 256, depth 4: 3 hidden 256x256 layers instead of 4 blocks of 2 (plus norms and time projections)
    assert n_params(g_pl) < 0.4 * n_params(g_res)
    assert n_params(f_pl) < 0.4 * n_params(f_res)


def test_plain_networks_round_trip_and_start_as_c_skip(tmp_path):
    g, f = roles("plain")
    z = torch.randn(64, 2)
    t = torch.full((64,), 0.4, dtype=torch.float64)
    # zero output layer: the fake score starts as c_skip x_t, whatever the backbone
    c_skip = f.sigma_data ** 2 / (f.process.rho(t) ** 2 + f.sigma_data ** 2)
    assert torch.allclose(f(z, t).double(), c_skip[:, None] * z.double(), atol=1e-6)
    assert f.features(z, t).shape == (64, 256)
    for m in (g, f):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        save_model(m, str(tmp_path / type(m).__name__))
        back, cfg = load_model(str(tmp_path / type(m).__name__))
        assert cfg["arch"]["blocks"] == "plain" and isinstance(back.net, PlainBackbone)
        args = (z, t) if isinstance(m, MLPDenoiser) else (z,)
        assert torch.equal(back(*args), m(*args))
    assert isinstance(g, MLPGenerator)


def test_plain_k_step_student_uses_the_plain_step_network():
    """A recipe with plain blocks keeps them when ``generator.steps`` makes its student K-step."""
    cfg = resolve({"teacher": {"kind": "gmm", "preset": "ring8"}, "objective": {"name": "dmd2"},
                   "generator": {"kind": "mlp", "blocks": "plain", "steps": 4, "width": 32}})
    teacher, _ = build_teacher(cfg["teacher"])
    gen = build_generator(cfg["generator"], teacher)
    assert gen.num_steps == 4
    assert isinstance(gen.denoiser.net, PlainBackbone)
    assert torch.isfinite(gen.sample(torch.randn(8, 2))).all()


@pytest.mark.parametrize("section,value", [("generator", {"kind": "multi", "blocks": "plain", "steps": 2}),
                                           ("fake_score", {"kind": "teacher", "blocks": "plain"})])
def test_plain_where_it_does_not_apply_is_one_line(section, value):
    cfg = resolve({"teacher": {"kind": "gmm", "preset": "ring8"}, section: value, "objective": {"name": "dmd2"}})
    teacher, _ = build_teacher(cfg["teacher"])
    with pytest.raises(ConfigError, match=f"{section}.blocks"):
        if section == "generator":
            build_generator(cfg["generator"], teacher)
        else:
            build_fake(cfg["fake_score"], teacher, 1.0)


def test_unknown_blocks_value_names_the_choices():
    with pytest.raises(ConfigError, match="generator.blocks.*residual.*plain"):
        resolve({"teacher": {"kind": "gmm", "preset": "ring8"}, "generator": {"kind": "mlp", "blocks": "dense"}})


@pytest.mark.parametrize("blocks", ["plain", "residual"])
def test_unconditional_generator_embedding_is_exactly_the_full_zero_input(blocks):
    """The unconditional generator feeds one zero embedding row, broadcast over the batch (a cheaper call): its
    output and every parameter's gradient equal those of the former (B, emb) zero input bit for bit."""
    torch.manual_seed(0)
    g = MLPGenerator(16, 64, 3, blocks=blocks)
    z = torch.randn(33, 16)
    out = g(z)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in g.named_parameters()}
    g.zero_grad(set_to_none=True)
    ref = g.net(z, torch.zeros(33, 64))
    ref.square().mean().backward()
    assert torch.equal(out, ref)
    for n, p in g.named_parameters():
        assert torch.equal(grads[n], p.grad), n


def test_fourier_time_embedding_is_lighter_round_trips_and_keeps_old_configs(tmp_path):
    cfg = resolve({"teacher": {"kind": "gmm", "preset": "ring8"}, "objective": {"name": "dmd2"},
                   "fake_score": {"kind": "mlp", "blocks": "plain", "time_embedding": "fourier"}})
    teacher, ref = build_teacher(cfg["teacher"])
    f = build_fake(cfg["fake_score"], teacher, ref.data_std())
    default = build_fake(resolve({"teacher": {"kind": "gmm", "preset": "ring8"}, "objective": {"name": "dmd2"},
                                  "fake_score": {"kind": "mlp", "blocks": "plain"}})["fake_score"], teacher, 1.0)
    assert isinstance(f.time_mlp, torch.nn.Identity) and "time_embedding" not in default.arch
    assert n_params(default) - n_params(f) == 2 * (64 * 64 + 64)  # the 2-layer time MLP
    x, t = torch.randn(16, 2), torch.rand(16, dtype=torch.float64) * 0.9 + 0.05
    # the backbone sees the Fourier features themselves
    e = f.time((f.process.rho(t).log() / 4).float())
    assert torch.equal(f._precond(x, t, None)[4], e)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(f, str(tmp_path / "fake"))
    back, saved = load_model(str(tmp_path / "fake"))
    assert saved["arch"]["time_embedding"] == "fourier"
    assert torch.equal(back(x, t), f(x, t))


@pytest.mark.parametrize("value,match", [
    ({"kind": "teacher", "time_embedding": "fourier"}, "fake_score.time_embedding"),
    ({"kind": "mlp", "time_embedding": "sinusoid"}, "fake_score.time_embedding.*mlp.*fourier")])
def test_time_embedding_bad_input_is_one_line(value, match):
    with pytest.raises(ConfigError, match=match):
        cfg = resolve({"teacher": {"kind": "gmm", "preset": "ring8"}, "fake_score": value,
                       "objective": {"name": "dmd2"}})
        teacher, _ = build_teacher(cfg["teacher"])
        build_fake(cfg["fake_score"], teacher, 1.0)
