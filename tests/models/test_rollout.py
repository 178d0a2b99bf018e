"""The K-step rollout (models/rollout.py) and K-step native students (models/fewstep.py), docs/fewstep.md.

Backward simulation is checked exactly: the rollout's states equal a hand-written reference given the same
noise, gradient reaches only the chosen step, the step choice depends on ``(seed, iteration)`` alone, and
``K = 1`` is bit-for-bit today's one-step ``DenoiserGenerator``."""

import copy

import pytest
import torch

from scoredistill.errors import ConfigError
from scoredistill.models.fewstep import FewStepGenerator, build_fewstep, fresh_mlp_denoiser
from scoredistill.models.generators import DenoiserGenerator
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.models.registry import load_model, save_model
from scoredistill.models.rollout import (
    Rollout,
    default_times,
    draw_step,
    rollout_seed,
    step_times,
    strided_subset,
)
from scoredistill.models.unet import UNetDenoiser
from scoredistill.process.processes import EDM, RectifiedFlow, VPDiscrete

pytestmark = pytest.mark.usefixtures("one_thread")

PROCESSES = {"vp": VPDiscrete, "edm": EDM, "flow": lambda: RectifiedFlow(shift=3.0)}
DMD2_GRID = [0.999, 0.749, 0.499, 0.249]  # DDPM indices [999, 749, 499, 249]


def net(process, classes=None):
    return fresh_mlp_denoiser(process, 3, width=32, depth=2, num_classes=classes, emb_dim=16)


def reference_rollout(f, process, times, z, mode, g=None, pure=False):
    """A K-step rollout written out from the formulas: ``x_0 = s(t_0) z``, ``x0_j = f(x_j, t_j)``,
    ``x_{j+1} = a(t_{j+1}) x0_j + s(t_{j+1}) e_j`` with ``e_j`` fresh / ``z`` / ``(x_j - a_j x0_j) / s_j``."""
    b = z.shape[0]

    def col(v):
        return torch.full((b, 1), float(v), dtype=torch.float64)

    def ts(t):
        return torch.full((b,), float(t), dtype=torch.float64)

    x = z if pure else (process.sigma(ts(times[0])).view(b, 1).float() * z)
    states = []
    for j, t in enumerate(times):
        x0 = f(x, ts(t), None)
        states.append((x, x0))
        if j + 1 == len(times):
            break
        a_j, s_j = col(process.alpha(ts(t))[0]), col(process.sigma(ts(t))[0])
        a_n, s_n = col(process.alpha(ts(times[j + 1]))[0]), col(process.sigma(ts(times[j + 1]))[0])
        if mode == "fresh":
            e = torch.randn(z.shape, generator=g)
        elif mode == "fixed":
            e = z
        else:
            e = ((x.double() - a_j * x0.double()) / s_j).float()
        x = (a_n * x0.double() + s_n * e.double()).float()
    return states


# -- the rollout equals the formulas -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fresh", "fixed", "ddim"])
@pytest.mark.parametrize("kind", list(PROCESSES))
def test_states_equal_reference_rollout(mode, kind):
    p = PROCESSES[kind]()
    f = net(p)
    times = [p.t_max, 0.7, 0.45, 0.2]
    r = Rollout(p, times, mode)
    z = torch.randn(6, 3)
    with torch.no_grad():
        got = r.run(f, z, generator=torch.Generator().manual_seed(5))
        ref = reference_rollout(f, p, times, z, mode, torch.Generator().manual_seed(5))
    assert [o.step for o in got] == [0, 1, 2, 3]
    for o, (x, x0) in zip(got, ref):
        assert o.x_t.equal(x)
        assert o.x0.equal(x0)
    # the states move: a rollout that ignored the re-noising would pass the comparison above trivially
    assert not torch.allclose(got[1].x_t, got[2].x_t)
    assert r.sample(f, z, generator=torch.Generator().manual_seed(5)).equal(got[-1].x0)


def test_pure_input_and_step_intervals():
    p = RectifiedFlow()
    f = net(p)
    r = Rollout(p, [0.9, 0.5, 0.1], "ddim", noise_input="pure")
    z = torch.randn(4, 3)
    with torch.no_grad():
        got = r.run(f, z)
        ref = reference_rollout(f, p, [0.9, 0.5, 0.1], z, "ddim", pure=True)
    assert got[0].x_t.equal(z)
    for o, (x, x0) in zip(got, ref):
        assert o.x_t.equal(x)
        assert o.x0.equal(x0)
    assert [float(o.t_next[0]) for o in got] == [0.5, 0.1, 0.0]
    assert [float(o.t[0]) for o in got] == [0.9, 0.5, 0.1]


def test_ddim_renoising_uses_the_students_own_eps():
    # TDM: x_{j+1} = a_{j+1} x0_j + s_{j+1} eps_j with eps_j = (x_j - a_j x0_j)/s_j, so eps is carried along
    p = VPDiscrete()
    f = net(p)
    r = Rollout(p, DMD2_GRID, "ddim")
    with torch.no_grad():
        o = r.run(f, torch.randn(5, 3))
    for cur, nxt in zip(o, o[1:]):
        eps = cur.eps(p)
        a, s = p.coeffs(nxt.t, nxt.x_t)
        torch.testing.assert_close(nxt.x_t.double(), a * cur.x0.double() + s * eps.double(), rtol=0, atol=1e-5)


# -- backward simulation --------------------------------------------------------------------------------
class PerStepOffset(torch.nn.Module):
    """``f(x, t) = D(x, t) + offset[j(t)]``: one parameter per step, so which offsets receive gradient
    shows which steps the gradient went through; also records each call's grad mode."""

    def __init__(self, base, times):
        super().__init__()
        self.base, self.times = base, times
        self.offset = torch.nn.Parameter(torch.zeros(len(times), 3))
        self.calls = []
        self.process = base.process

    def forward(self, x, t, cond=None):
        j = min(range(len(self.times)), key=lambda i: abs(self.times[i] - float(t[0])))
        self.calls.append((j, torch.is_grad_enabled(), x.requires_grad))
        return self.base(x, t, cond) + self.offset[j]


@pytest.mark.parametrize("mode", ["fresh", "fixed", "ddim"])
def test_gradient_reaches_only_the_chosen_step(mode):
    p = VPDiscrete()
    times = DMD2_GRID
    f = PerStepOffset(net(p), times)
    r = Rollout(p, times, mode)
    z = torch.randn(8, 3)
    for k in range(4):
        f.calls.clear()
        f.zero_grad(set_to_none=True)
        out = r.train_step(f, z, None, k, torch.Generator().manual_seed(1))
        assert out.step == k and out.x0.requires_grad and not out.x_t.requires_grad
        # steps 0..k-1 without gradient, step k with, nothing after k
        assert f.calls == [(j, j == k, False) for j in range(k + 1)]
        (out.x0 ** 2).sum().backward()
        got = f.offset.grad.abs().sum(1)
        assert got[k] > 0 and torch.count_nonzero(got) == 1, got
        # the gradient is that of one step at the rollout's (detached) state: backward simulation, not BPTT
        base_grads = [q.grad.clone() for q in f.base.parameters()]
        f.zero_grad(set_to_none=True)
        x_k = out.x_t.detach()
        (f(x_k, out.t) ** 2).sum().backward()
        for a, b in zip(base_grads, [q.grad for q in f.base.parameters()]):
            assert a.equal(b)


@pytest.mark.parametrize("mode", ["fresh", "fixed", "ddim"])
def test_training_states_are_the_sampling_rollout(mode):
    # the input of the trained step k is the k-th state of the full rollout with the same noise
    p = EDM()
    f = net(p)
    r = Rollout(p, default_times(p, 4), mode)
    z = torch.randn(5, 3)
    with torch.no_grad():
        full = r.run(f, z, generator=torch.Generator().manual_seed(9))
    for k in range(4):
        o = r.train_step(f, z, None, k, torch.Generator().manual_seed(9))
        assert o.x_t.equal(full[k].x_t) and o.x0.detach().equal(full[k].x0)
        assert o.t.equal(full[k].t) and o.t_next.equal(full[k].t_next)


# -- step choice --------------------------------------------------------------------------------------------
def test_step_choice_depends_on_seed_and_iteration_only():
    p = VPDiscrete()
    a = build_fewstep(net(p), steps=4)
    b = copy.deepcopy(a)  # a second "rank"
    seq_a, seq_b = [], []
    for it in range(400):
        a.set_rollout_seed(rollout_seed(17, it))
        b.set_rollout_seed(rollout_seed(17, it))
        seq_a.append(a.current_step())
        seq_b.append(b.current_step())
        assert a.current_step() == seq_a[-1]  # every micro-batch of the iteration: same k
    assert seq_a == seq_b
    counts = [seq_a.count(k) for k in range(4)]
    assert all(70 <= c <= 130 for c in counts), counts  # U{0..3} over 400 draws: 100 +- 3 sd
    # simulated resume: a student rebuilt from scratch at iteration 250 draws the same steps from there
    c = build_fewstep(net(p), steps=4)
    resumed = []
    for it in range(250, 400):
        c.set_rollout_seed(rollout_seed(17, it))
        resumed.append(c.current_step())
    assert resumed == seq_a[250:]
    other = []
    for it in range(400):
        a.set_rollout_seed(rollout_seed(18, it))
        other.append(a.current_step())
    assert other != seq_a


def test_step_choice_matches_the_engine_seed_and_the_diffusers_draw():
    # engine/distiller.py train_step: set_rollout_seed(hash((seed, step, -1)) & (2**62 - 1))
    assert rollout_seed(3, 41) == hash((3, 41, -1)) & (2**62 - 1)
    # adapters/student.py draws k = randint(0, K) from Generator().manual_seed(seed): switching it to this
    # rollout keeps its step sequence
    for s in range(50):
        seed = rollout_seed(0, s)
        assert draw_step(seed, 4) == int(torch.randint(0, 4, (), generator=torch.Generator().manual_seed(seed)))


def test_weighted_step_choice():
    w = [0.0, 1.0, 0.0, 3.0]
    ks = [draw_step(rollout_seed(1, it), 4, [v / 4 for v in w]) for it in range(400)]
    assert set(ks) == {1, 3}
    assert 250 <= ks.count(3) <= 350  # P(3) = 0.75: 300 +- 8.7 sd
    g = build_fewstep(net(VPDiscrete()), steps=4, step_weights=w)
    assert g.rollout.step_weights == [0.0, 0.25, 0.0, 0.75]


def test_set_rollout_step_and_missing_seed():
    g = build_fewstep(net(VPDiscrete()), steps=3).train()
    z = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="set_rollout_seed"):
        g(z)
    g.set_rollout_step(2)
    assert g.train_output(z).step == 2
    g.set_rollout_seed(5)  # the per-iteration seed takes over again
    assert g.current_step() == draw_step(5, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        g.set_rollout_step(3)
    one = build_fewstep(net(VPDiscrete()), steps=1).train()
    assert one(z).shape == (4, 3)  # a one-step student needs no seed


# -- K = 1 is today's one-step student ------------------------------------------------------------------------
def _trained_like(m):
    """Nonzero weights everywhere (a denoiser zero-initialises its output layer)."""
    with torch.no_grad():
        for q in m.parameters():
            q.add_(0.05 * torch.randn_like(q))
    return m


@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_one_step_is_bit_exact_denoiser_generator(arch):
    p = EDM()
    if arch == "mlp":
        den = _trained_like(MLPDenoiser(p, 3, 32, 2, num_classes=4, emb_dim=16))
        z = torch.randn(7, 3)
    else:
        den = _trained_like(UNetDenoiser(p, (1, 8, 8), (8, 16), num_classes=4, emb_dim=16))
        z = torch.randn(3, 1, 8, 8)
    t_init = float(p.t_from_rho(2.5))  # SiD's sigma_init
    old = DenoiserGenerator(copy.deepcopy(den), t_init)
    new = FewStepGenerator(copy.deepcopy(den), Rollout(p, [t_init]))
    new.load_state_dict(old.state_dict())  # same keys: a saved one-step student loads into it
    also = build_fewstep(copy.deepcopy(den), steps=1, t_first=t_init)
    cond = torch.tensor([0, 1, 3, -1, 2, 0, 1][: z.shape[0]])
    for train in (False, True):
        for m in (old, new, also):
            m.train(train)
        with torch.no_grad():
            ref = old(z, cond)
            assert new(z, cond).equal(ref) and also(z, cond).equal(ref)
    assert new.num_steps == 1 and new.t_init == t_init


# -- sampling -------------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_steps_subset():
    p = VPDiscrete()
    g = build_fewstep(net(p, classes=3), steps=4).eval()
    z, c = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        s1 = g(z, c, generator=torch.Generator().manual_seed(7))
        s2 = g(z, c, generator=torch.Generator().manual_seed(7))
        s3 = g(z, c, generator=torch.Generator().manual_seed(8))
        assert s1.equal(s2) and not torch.allclose(s1, s3)
        assert g(z, c).equal(g(z, c))  # no generator: a fixed default, still reproducible
        # --steps K': the evenly strided steps floor(i K / K') from the first
        assert strided_subset(4, 2) == [0, 2] and strided_subset(4, 3) == [0, 1, 2] and strided_subset(4, 1) == [0]
        two = g.sample(z, c, steps=2, generator=torch.Generator().manual_seed(7))
        ref = Rollout(p, [g.t_steps[0], g.t_steps[2]], "fresh").sample(
            g.denoiser, z, c, generator=torch.Generator().manual_seed(7))
        assert two.equal(ref)
        assert g.sample(z, c, steps=4, generator=torch.Generator().manual_seed(7)).equal(s1)


def test_save_load_roundtrip(tmp_path):
    p = RectifiedFlow(shift=2.0)
    g = build_fewstep(_trained_like(net(p, classes=3)), timesteps=[0.95, 0.6, 0.3], mode="ddim", step_weights=[1, 2, 1])
    save_model(g, str(tmp_path / "gen"))
    h, cfg = load_model(str(tmp_path / "gen"))
    assert isinstance(h, FewStepGenerator) and cfg["class"] == "FewStepGenerator"
    assert h.t_steps == [0.95, 0.6, 0.3] and h.rollout.mode == "ddim" and h.rollout.step_weights == [0.25, 0.5, 0.25]
    g.eval()
    h.eval()
    z, c = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        assert g(z, c).equal(h(z, c))


def test_default_times():
    # tops of the K equal sub-intervals of (0, t_0]; within one DDPM index of DMD2's [999, 749, 499, 249]
    p = VPDiscrete()
    ts = default_times(p, 4)
    assert ts == [0.999, 0.999 * 0.75, 0.999 * 0.5, 0.999 * 0.25]
    assert all(abs(a - b) * 1000 < 1 for a, b in zip(ts, DMD2_GRID))
    assert default_times(p, 3, t_first=0.6)[0] == 0.6
    assert step_times(p, 2, None) == [0.999, 0.4995]
    assert step_times(p, None, DMD2_GRID) == DMD2_GRID


# -- bad input: one line naming the key -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field, words", [
    (dict(timesteps=[0.5, 0.7]), "generator.timesteps", "strictly decreasing"),
    (dict(timesteps=[0.9, 0.9]), "generator.timesteps", "strictly decreasing"),
    (dict(timesteps=[1.5, 0.5]), "generator.timesteps", "range"),
    (dict(timesteps=[0.5, -0.1]), "generator.timesteps", "range"),
    (dict(timesteps=[]), "generator.timesteps", "non-empty"),
    (dict(timesteps=["high"]), "generator.timesteps", "canonical times"),
    (dict(timesteps=[0.9, 0.5], steps=3), "generator.steps", "lists 2 times"),
    (dict(steps=0), "generator.steps", ">= 1"),
    (dict(steps=-2), "generator.steps", ">= 1"),
    (dict(steps=2.5), "generator.steps", ">= 1"),
    (dict(steps=True), "generator.steps", ">= 1"),
    (dict(steps=5000), "generator.steps", "t_min"),
    (dict(steps=2, mode="random"), "generator.rollout", "fresh, fixed, ddim"),
    (dict(steps=2, noise_input="gaussian"), "generator.noise_input", "scaled, pure"),
    (dict(steps=2, step_weights=[1.0]), "generator.step_weights", "2 non-negative"),
    (dict(steps=2, step_weights=[1.0, -1.0]), "generator.step_weights", "2 non-negative"),
    (dict(steps=2, step_weights=[0, 0]), "generator.step_weights", "positive sum"),
])
def test_bad_config_is_one_line(kwargs, field, words):
    with pytest.raises(ConfigError) as e:
        build_fewstep(net(RectifiedFlow()), **kwargs)
    assert e.value.field == field and words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("steps", [5, 0, 2.0])
def test_bad_sample_steps_is_one_line(steps):
    g = build_fewstep(net(EDM()), steps=4).eval()
    with pytest.raises(ConfigError) as e:
        g.sample(torch.randn(2, 3), steps=steps)
    assert e.value.field == "--steps" and "[1, 4]" in str(e.value) and "\n" not in str(e.value)


# -- MSD's class-routed students as a K-step backbone ------------------------------------------------------
def test_multi_student_rollout_routes_and_trains_only_the_owner(tmp_path):
    from scoredistill.models.fewstep import MultiStudentDenoiser

    p = VPDiscrete()
    den = MultiStudentDenoiser(p, 3, width=32, depth=2, num_classes=4, students=2, emb_dim=16)
    g = build_fewstep(den, steps=3, mode="fixed")
    z = torch.randn(6, 3)
    cond = torch.tensor([0, 1, 0, 1, 1, 0])  # classes 0, 1 belong to student 0
    g.train()
    g.set_rollout_step(2)
    (g(z, cond) ** 2).sum().backward()
    grads = [sum(float(q.grad.abs().sum()) for q in n.parameters() if q.grad is not None) for n in den.nets]
    assert grads[0] > 0 and grads[1] == 0
    # every sample's rollout is its owner's own K-step rollout
    g.eval()
    mixed = torch.tensor([0, 3, 1, 2, 3, 0])
    with torch.no_grad():
        out = g(z, mixed)
        for k in range(2):
            own = FewStepGenerator(den.nets[k], g.rollout).eval()
            rows = (den.owner[mixed] == k).nonzero(as_tuple=True)[0]
            assert out[rows].equal(own(z[rows], mixed[rows]))
    save_model(g, str(tmp_path / "msd"))
    h, _ = load_model(str(tmp_path / "msd"))
    with torch.no_grad():
        assert h.eval()(z, mixed).equal(out)
    with pytest.raises(ValueError, match="every sample needs a label"):
        g(z, None)
