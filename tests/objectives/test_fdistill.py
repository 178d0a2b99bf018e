"""f-distill specifics (docs/objectives/fdistill.md): weight table, ratio clamps and bins, sign for every
divergence, the gradient as h times the field plus the GAN term, requirements. The shared contract
(w = 1, stop-gradient placement, state round-trip) is in test_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from scoredistill.config import ConfigError, load_yaml, resolve
from scoredistill.models.generators import DiscriminatorHead
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.objectives.core import dm_field
from scoredistill.objectives.fdistill import WEIGHTS, f_weight, ratio_from_logits
from scoredistill.process import EDM, VPDiscrete
from scoredistill.teachers.gmm import GMMTeacher

DIVERGENCES = list(WEIGHTS)


class FeatureGMM(GMMTeacher):
    """Exact-score GMM that also exposes ``features`` (the noisy input), so a discriminator head fits."""

    def features(self, x_t, t, cond=None):
        return x_t.float()


def _head(seed=0, dim=2):
    torch.manual_seed(seed)
    head = DiscriminatorHead(dim, 16)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return head


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


# -- the weight table ------------------------------------------------------------------
F_OF_R = {  # the generator f of each divergence, D_f(p||q) = E_q f(p/q); h(r) ∝ r^2 f''(r)  [D]
    "reverse_kl": lambda r: -math.log(r),
    "forward_kl": lambda r: r * math.log(r),
    "js": lambda r: r * math.log(r) - (1 + r) * math.log((1 + r) / 2),
    "softened_rkl": lambda r: (1 + r) * math.log(1 + r) - r * math.log(r) - math.log(r),
    "neyman_chi2": lambda r: (1 - r) ** 2 / r,
    "squared_hellinger": lambda r: (math.sqrt(r) - 1) ** 2,
    "jeffreys": lambda r: (r - 1) * math.log(r),
}


def test_weight_table_matches_spec():
    r = torch.tensor([0.1, 0.5, 1.0, 2.0, 20.0], dtype=torch.float64)
    expect = {"reverse_kl": torch.ones_like(r), "forward_kl": r, "js": r / (1 + r), "softened_rkl": 1 / (1 + r),
              "neyman_chi2": 1 / r, "squared_hellinger": r.sqrt(), "jeffreys": 1 + r}
    assert set(expect) == set(DIVERGENCES)
    for name, e in expect.items():
        assert torch.allclose(f_weight(name, r), e), name
    zero = torch.zeros(1, dtype=torch.float64)
    assert torch.allclose(f_weight("neyman_chi2", zero), torch.tensor([1e8], dtype=torch.float64))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_weight_is_r2_fpp(name):
    """``h(r) ∝ r^2 f''(r)`` for the divergence's generator f (central second differences)."""
    f = F_OF_R[name]
    rs = [0.2, 0.7, 1.5, 4.0]
    ratios = []
    for r in rs:
        e = 1e-3 * r
        fpp = (f(r + e) - 2 * f(r) + f(r - e)) / (e * e)
        ratios.append(float(f_weight(name, torch.tensor(r, dtype=torch.float64))) / (r * r * fpp))
    assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=1e-3), (name, ratios)


def test_ratio_clamps():
    logits = torch.tensor([-30.0, -3.0, 0.0, 2.0, 5.0, 30.0])
    r = ratio_from_logits(logits)
    expect = torch.tensor([0.1, 0.1, 1.0, math.exp(2.0), 20.0, 20.0], dtype=torch.float64)
    assert torch.allclose(r, expect)
    # logit clamp before exp: with a wide ratio range the ±10 logit clamp is what bounds r
    r = ratio_from_logits(logits, lower=1e-9, upper=1e9)
    assert float(r.max()) == pytest.approx(math.exp(10)) and float(r.min()) == pytest.approx(math.exp(-10))


def test_bin_normalisation_and_mean_one():
    proc = EDM()
    obj = build_objective({"name": "fdistill", "divergence": "forward_kl"})
    t = torch.tensor([0.05, 0.06, 0.55, 0.56], dtype=torch.float64)     # two bins, two samples each
    logits = torch.log(torch.tensor([1.0, 3.0, 4.0, 12.0]))
    h, r = obj.weights(logits, t, proc)
    # ema 0: each ratio divided by its bin mean -> [0.5, 1.5, 0.5, 1.5]; forward KL h = that; mean 1
    assert torch.allclose(h, torch.tensor([0.5, 1.5, 0.5, 1.5], dtype=torch.float64), atol=1e-5)
    assert float(h.mean()) == pytest.approx(1.0, abs=1e-5)
    assert obj.bins[0] == pytest.approx(2.0) and obj.bins[5] == pytest.approx(8.0) and obj.bins[9] == 1.0
    # EMA: bins <- rate * bins + (1 - rate) * batch mean, only where the batch has samples; state round-trips
    obj = build_objective({"name": "fdistill", "divergence": "forward_kl", "ratio_ema_rate": 0.5})
    obj.weights(logits, t, proc)
    assert obj.bins[0] == pytest.approx(1.5) and obj.bins[5] == pytest.approx(4.5) and obj.bins[3] == 1.0
    other = build_objective({"name": "fdistill", "ratio_ema_rate": 0.5})
    other.load_state_dict(obj.state_dict())
    assert torch.equal(other.bins, obj.bins)
    # no normalisation: plain h(r) / mean
    obj = build_objective({"name": "fdistill", "divergence": "forward_kl", "ratio_normalization": False})
    h, _ = obj.weights(logits, t, proc)
    assert torch.allclose(h, torch.tensor([1.0, 3.0, 4.0, 12.0], dtype=torch.float64) / 5.0, atol=1e-5)


# -- sign on a point mass, every divergence ----------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("process", [EDM(), VPDiscrete()], ids=lambda p: p.name)
def test_sign_moves_point_mass_toward_target(divergence, process):
    obj = build_objective({"name": "fdistill", "divergence": divergence})
    theta = torch.tensor([1.0, -0.5], requires_grad=True)
    teacher = GMMTeacher([[0.0, 0.0]], 0.05, process=process)
    fake = FeatureGMM([[1.0, -0.5]], 0.05, process=process)
    x = theta.expand(64, 2)
    out = obj.generator_loss(Batch(x=x, rng=_rng()), Roles(teacher=teacher, fake=fake, discriminator=_head()))
    (grad,) = torch.autograd.grad(out["loss"], theta)
    cos = float(grad @ theta.detach() / (grad.norm() * theta.detach().norm()))
    assert cos > 0.99, (divergence, grad, cos)
    assert float(out["h_max"]) > float(out["h_min"]) or divergence == "reverse_kl"  # weights do vary


# -- stop-gradients: field, r̂ and h detached; only the GAN term reaches x through the networks ---------
def _mlp_roles():
    proc = EDM()
    teacher, fake = MLPDenoiser(proc, 2, 32, 2), MLPDenoiser(proc, 2, 32, 2)
    for m in (teacher, fake):
        torch.nn.init.normal_(m.net.out.weight, std=0.1)
    return Roles(teacher=teacher, fake=fake, discriminator=_head(dim=32))


def test_gradient_is_h_times_field_plus_gan_term():
    """d loss / dx == h * g / numel + gan_weight * d GAN / dx, with h and g recomputed outside autograd:
    any gradient through h, r̂ or the field would break the equality."""
    roles = _mlp_roles()
    obj = build_objective({"name": "fdistill", "divergence": "forward_kl", "gan_weight_gen": 0.5})
    x0 = torch.randn(32, 2)
    x = x0.clone().requires_grad_(True)
    out = obj.generator_loss(Batch(x=x, rng=_rng(3)), roles)
    (gx,) = torch.autograd.grad(out["loss"], x)
    # replay the random stream
    rng = _rng(3)
    proc = roles.process
    t = obj.time(32, proc, generator=rng)
    noise = torch.randn(x0.shape, generator=rng)
    xr = x0.clone().requires_grad_(True)
    x_t = proc.add_noise(xr, noise, t)
    g, _ = dm_field(x0, x_t.detach(), t, None, roles, 1.0)
    logits = roles.discriminator(roles.fake.features(x_t, t, None)).reshape(-1)
    fresh = build_objective({"name": "fdistill", "divergence": "forward_kl"})
    h, _ = fresh.weights(logits, t, proc)
    (g_gan,) = torch.autograd.grad(torch.nn.functional.softplus(-logits).mean(), xr)
    expect = h[:, None].float() * g / x0.numel() + 0.5 * g_gan
    assert torch.allclose(gx, expect, atol=1e-6, rtol=1e-4)


# -- config validation and requirements ----------------------------------------------------------------------
@pytest.mark.parametrize("cfg,field", [
    ({"name": "fdistill", "gan_weight_gen": 0.0}, "objective.gan_weight_gen"),
    ({"name": "fdistill", "divergence": "pearson"}, "objective.divergence"),
    ({"name": "fdistill", "ratio_lower": 5.0, "ratio_upper": 1.0}, "objective.ratio_lower"),
    ({"name": "fdistill", "ratio_ema_rate": 1.0}, "objective.ratio_ema_rate"),
])
def test_bad_config(cfg, field):
    with pytest.raises(ConfigError) as e:
        build_objective(cfg)
    assert e.value.field == field


def test_fastgen_aliases():
    assert build_objective({"name": "fdistill", "divergence": "kl"}).p.divergence == "forward_kl"
    assert build_objective({"name": "fdistill", "divergence": "sf"}).p.divergence == "softened_rkl"


def test_requires_real_data_one_line(tmp_path, capsys):
    from scoredistill.cli.main import main

    assert build_objective({"name": "fdistill"}).requirements() == {"fake_score", "discriminator", "real_data"}
    with pytest.raises(SystemExit) as e:
        main(["distill", "recipes/toy/fdistill.yaml", "--out", str(tmp_path / "r"), "--set", "train.real_data=none"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.real_data" in err[0], err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_checkpoint_keeps_ratio_bins(tmp_path):
    """The per-time-bin ratio EMA is objective state: it is written with the checkpoint and restored."""
    from scoredistill.engine.distiller import Distiller

    cfg = resolve(load_yaml("recipes/toy/fdistill.yaml"), [
        "train.steps=6", "train.batch_size=32", "train.real_pool=64", "generator.width=16", "generator.depth=1",
        "fake_score.width=16", "fake_score.depth=1", "objective.ratio_ema_rate=0.5", "train.progress=false",
        "eval.n_samples=32", "eval.plots=false", "train.generator_every=2"])
    run = Distiller(cfg, str(tmp_path / "run"))
    run.train()
    assert not torch.equal(run.objective.bins, torch.ones(10, dtype=torch.float64))
    again = Distiller(resolve(cfg, ["train.steps=8"]), str(tmp_path / "run"))
    assert again.load_latest() == 6
    assert torch.equal(again.objective.bins, run.objective.bins)


# -- distribution (slow) ---------------------------------------------------------------------------------------
SLOW = ["generator.width=128", "fake_score.width=128", "train.progress=false", "eval.plots=false",
        "train.checkpoint_every=1000000", "train.real_pool=5000"]


@pytest.mark.slow
def test_fdistill_js_distills_pair(tmp_path):
    """JS f-distill on the 0.8/0.2 pair keeps both modes and roughly the right weights.

    Seeded CPU training is bit-stable on one machine but not across CPU instruction sets or thread
    counts, and after 1000 iterations the light mode's share still wanders with such tiny differences,
    so the band comes from runs on more than one CPU setting (seed 0 unless said; config as below):

    - 2 threads, seed 0 (two runs): precision 0.951-0.956, light share 0.194-0.203, TV 0.003-0.006,
      h in [0.71, 1.24];
    - 1 thread, seeds 1 / 2 / 3: precision 0.945 / 0.956 / 0.954, light share 0.206 / 0.180 / 0.203,
      TV 0.006 / 0.020 / 0.003, h_min 0.71-0.82, h_max 1.15-1.22;
    - another (AVX-512) CPU, seed 0: light share 0.265.

    So: both modes, precision > 0.90 (lowest seen 0.945), and a light share within 0.10 of 0.2 (largest
    deviation seen 0.065). The discriminator stays near chance (accuracy 0.51-0.52), so h(r) is close to
    1 and this run does not show the divergence's effect on the light mode (issue: toy fidelity)."""
    from scoredistill.engine.distiller import Distiller
    from scoredistill.metrics.gmm import assign

    cfg = resolve(load_yaml("recipes/toy/fdistill.yaml"),
                  SLOW + ["teacher.preset=pair", "objective.divergence=js", "train.steps=1000", "eval.every=1000"])
    d = Distiller(cfg, str(tmp_path))
    res = d.run()
    k, ok = assign(d.sample(d.eval_z), d.reference.means, d.reference.stds)
    light = float((k[ok] == 1).double().mean())
    seen = {key: res[key] for key in ("precision", "modes_covered", "weight_tv", "sw2")}
    seen.update(light_share=light, threads=torch.get_num_threads(), seed=cfg["train"]["seed"],
                **{key: res["train"].get(key) for key in ("h_min", "h_max", "disc_acc")})
    msg = f"reproduce with train.seed={cfg['train']['seed']} on {torch.get_num_threads()} threads: {seen}"
    print("fdistill js pair:", seen)
    assert res["non_finite"] == 0 and res["modes_covered"] == 2, msg
    assert res["precision"] > 0.90, msg
    assert abs(light - 0.2) < 0.10, msg
    assert res["train"]["h_max"] > res["train"]["h_min"], msg  # the ratio weights are not constant


# -- the density-ratio estimator ------------------------------------------------------------------------------
def test_estimator_keys_reach_head_and_times():
    """Head capacity goes to the engine's head; ratio_t_min/max bound the discriminator's times, and field
    samples outside that range get r = 1; ratio_updates averages that many discriminator terms."""
    from scoredistill.engine.build import build_discriminator

    obj = build_objective({"name": "fdistill", "ratio_head_width": 24, "ratio_head_depth": 3,
                           "ratio_t_min": 0.1, "ratio_t_max": 0.4, "ratio_updates": 3,
                           "ratio_normalization": False, "divergence": "forward_kl"})
    fake = MLPDenoiser(EDM(), 2, 16, 1)
    head = build_discriminator(fake, **obj.discriminator_arch())
    linears = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [24, 24, 24, 1]
    t = obj._disc_t(Batch(x=torch.zeros(500, 2), rng=_rng()), 500, None, EDM())
    assert 0.1 <= float(t.min()) and float(t.max()) <= 0.4
    h, r = obj.weights(torch.full((3,), math.log(4.0)), torch.tensor([0.05, 0.2, 0.9], dtype=torch.float64), EDM())
    assert torch.allclose(r, torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64))
    real = torch.randn(8, 2)
    out = obj.auxiliary_losses(Batch(x=torch.randn(8, 2), real=real, rng=_rng()),
                               Roles(teacher=GMMTeacher([[0.0, 0.0]], 1.0, process=EDM()), fake=fake,
                                     discriminator=head))
    assert torch.isfinite(out["loss"]) and 0 <= float(out["disc_acc"]) <= 1
    # the default head is DMD2's (one hidden layer of 128): existing recipes build the same weights
    assert build_objective({"name": "fdistill"}).discriminator_arch() == {"width": 128, "depth": 1}
    torch.manual_seed(0)
    a = build_discriminator(fake)
    torch.manual_seed(0)
    b = DiscriminatorHead(16, 128)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("cfg", [{"ratio_t_min": 0.1}, {"ratio_t_min": 0.5, "ratio_t_max": 0.2}])
def test_bad_ratio_range(cfg):
    with pytest.raises(ConfigError) as e:
        build_objective({"name": "fdistill", **cfg})
    assert e.value.field == "objective.ratio_t_max"


@pytest.mark.usefixtures("one_thread")
def test_ratio_estimate_tracks_exact_log_ratio():
    """The discriminator, trained by the objective's own ``auxiliary_losses`` on a fixed Gaussian student
    N((-1.2, 0), 0.5^2 I) vs the ``pair`` teacher (both noisy densities closed form), estimates
    ``log p_t/q_t`` at noisy student samples (where the field reads it): rank correlation on the lower
    half of the field's noise levels, mean absolute error of the clamped log ratio, and training accuracy
    against the exact ratio's own accuracy as a classifier (the Bayes limit, 0.595-0.604 here).

    Measured with this configuration (300 fake steps, batch 128, fake MLP width 32 depth 1, head lr
    3e-3), seeds 0-4: low-t Spearman 0.766-0.851, MAE 0.394-0.561, accuracy 0.007-0.022 below the limit.
    (The recipe's head lr = fake lr 1e-3, seeds 0-2: 0.607-0.771, 0.559-0.713, 0.014-0.040.) ``python -m
    scoredistill.bench.fdistill --steps 300 --batch 128 --width 32 --depth 1 --disc-lr 3e-3
    --seeds 0,1,2,3,4`` prints them."""
    from scoredistill.bench.fdistill import fit_ratio, pair_case

    teacher, student = pair_case()
    check, _, _ = fit_ratio(teacher, student, steps=300, batch=128, width=32, depth=1, disc_lr=3e-3, seed=0)
    assert check.spearman_low > 0.70, check
    assert check.mae < 0.65, check
    assert check.disc_acc > check.bayes_acc - 0.04, check
