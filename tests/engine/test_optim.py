"""``train.optimizer: adam | adamw | radam`` (engine/optim.py) in both drivers: hand-computed first
steps, per-role choice, training, exact resume of the optimizer state, one-line config errors."""

import math

import pytest
import torch

from helpers import tiny_config
from scoredistill.config import resolve
from scoredistill.engine.distiller import Distiller
from scoredistill.engine.optim import OPTIMIZERS, build_optimizer
from scoredistill.errors import ConfigError
from scoredistill.optimize.config import resolve as resolve_optimize
from scoredistill.optimize.driver import PriorOptimizer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = tiny_config(16, train={"batch_size": 16, "weight_decay": 0.01}, eval={"n_samples": 16})
PRIOR = {"teacher": {"kind": "gmm", "preset": "ring8", "process": {"kind": "vp"}},
         "params": {"kind": "particles", "n": 16}, "objective": {"name": "vsd_particles"},
         "train": {"steps": 8, "progress": False, "checkpoint_every": 4, "weight_decay": 0.01},
         "eval": {"every": 4, "plots": False}}


# -- one step by hand: theta = 1, gradient g = 0.5, lr = 0.1, decay 0.1, betas (0.9, 0.999), eps 1e-8 ----------
@pytest.mark.parametrize("kind,expected", [
    # L2: g' = g + decay * theta = 0.6; the first Adam step is lr * m_hat / (sqrt(v_hat) + eps), m_hat = g',
    # sqrt(v_hat) = |g'|
    ("adam", 1.0 - 0.1 * 0.6 / (0.6 + 1e-8)),
    # decoupled: theta (1 - lr * decay) = 0.99, then the Adam step on the plain gradient 0.5
    ("adamw", 0.99 - 0.1 * 0.5 / (0.5 + 1e-8)),
    # RAdam's rectification term is undefined for the first steps (rho_1 = 1 <= 5): an un-normalised
    # momentum step, theta - lr * m_hat with m_hat = g' = 0.6 (L2 decay, as in adam)
    ("radam", 1.0 - 0.1 * 0.6),
])
def test_first_step_by_hand(kind, expected):
    theta = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = build_optimizer(kind, [theta], lr=0.1, betas=(0.9, 0.999), weight_decay=0.1)
    theta.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    assert math.isclose(theta.item(), expected, rel_tol=0, abs_tol=1e-12), (kind, theta.item(), expected)


def test_adamw_decay_differs_from_adam_l2_by_the_decoupled_term():
    """After one step from theta = 1 the two differ by exactly lr * decay * theta = 0.01 (the first Adam
    step is sign-like, so the L2 term barely moves it while the decoupled one shrinks theta)."""
    out = {}
    for kind in ("adam", "adamw"):
        theta = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        opt = build_optimizer(kind, [theta], lr=0.1, betas=(0.9, 0.999), weight_decay=0.1)
        theta.grad = torch.tensor([0.5], dtype=torch.float64)
        opt.step()
        out[kind] = theta.item()
    assert math.isclose(out["adam"] - out["adamw"], 0.01, abs_tol=1e-7)


# -- the drivers --------------------------------------------------------------------------------------------------
def test_roles_pick_their_optimizer():
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
    gan = ["objective.gan_weight_gen=0.005", "train.real_pool=64"]
    d = Distiller(resolve(SMALL, gan + ["train.optimizer=adamw", "train.disc_optimizer=radam"]), "/nonexistent")
    assert {r: type(o) for r, o in d.optimizers.items()} == {
        "generator": classes["adamw"], "fake_score": classes["adamw"], "discriminator": classes["radam"]}
    d = Distiller(resolve(SMALL, gan + ["train.fake_optimizer=radam"]), "/nonexistent")
    assert {r: type(o) for r, o in d.optimizers.items()} == {   # the discriminator follows the fake score
        "generator": classes["adam"], "fake_score": classes["radam"], "discriminator": classes["radam"]}
    assert d.optimizers["generator"].param_groups[0]["weight_decay"] == 0.01
    o = PriorOptimizer(resolve_optimize(PRIOR, ["train.optimizer=adamw"]), None)
    assert type(o.optimizers["params"]) is classes["adamw"] and type(o.optimizers["fake_score"]) is classes["adamw"]
    o = PriorOptimizer(resolve_optimize(PRIOR, ["train.fake_optimizer=radam"]), None)
    assert type(o.optimizers["params"]) is classes["adam"] and type(o.optimizers["fake_score"]) is classes["radam"]


def _weights(mod):
    return {k: v.detach().clone() for k, v in mod.state_dict().items()}


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_each_optimizer_trains(kind):
    d = Distiller(resolve(SMALL, [f"train.optimizer={kind}"]), "/nonexistent")
    before = _weights(d.generator)
    for _ in range(4):
        d.train_step()
    after = _weights(d.generator)
    assert sum(d.nonfinite.values()) == 0
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    o = PriorOptimizer(resolve_optimize(PRIOR, [f"train.optimizer={kind}"]), None)
    x0 = o.param.x.detach().clone()
    for _ in range(4):
        o.train_step()
    assert torch.isfinite(o.param.x).all() and not torch.equal(o.param.x, x0)


@pytest.mark.parametrize("kind", ["adamw", "radam"])
def test_optimizer_state_resumes_exactly(tmp_path, kind):
    """RAdam's update depends on the step count and both on the moments: a resume that lost either
    would diverge from the uninterrupted run."""
    sets = [f"train.optimizer={kind}"]
    full = Distiller(resolve(SMALL, sets), str(tmp_path / "full"))
    full.run()
    Distiller(resolve(SMALL, sets + ["train.steps=4"]), str(tmp_path / "half")).run()
    resumed = Distiller(resolve(SMALL, sets), str(tmp_path / "half"))
    resumed.run(resume=True)
    a, b = _weights(full.generator), _weights(resumed.generator)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full.optimizers["generator"].state_dict()["state"], resumed.optimizers["generator"].state_dict()["state"]
    assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i])
    o_full = PriorOptimizer(resolve_optimize(PRIOR, sets), str(tmp_path / "o_full"))
    o_full.run()
    PriorOptimizer(resolve_optimize(PRIOR, sets + ["train.steps=4"]), str(tmp_path / "o_half")).run()
    o_res = PriorOptimizer(resolve_optimize(PRIOR, sets), str(tmp_path / "o_half"))
    o_res.run(resume=True)
    assert torch.equal(o_full.param.x, o_res.param.x)


@pytest.mark.parametrize("res,sets,field", [
    (resolve, ["train.optimizer=sgd"], "train.optimizer"),
    (resolve, ["train.optimizer=null"], "train.optimizer"),
    (resolve, ["train.fake_optimizer=lion"], "train.fake_optimizer"),
    (resolve, ["train.disc_optimizer=Adam"], "train.disc_optimizer"),
    (resolve_optimize, ["train.optimizer=sgd"], "train.optimizer"),
    (resolve_optimize, ["train.fake_optimizer=lion"], "train.fake_optimizer"),
])
def test_bad_optimizer_names_the_field(res, sets, field):
    base = SMALL if res is resolve else PRIOR
    with pytest.raises(ConfigError) as e:
        res(base, sets)
    assert e.value.field == field and "adam, adamw, radam" in str(e.value)
