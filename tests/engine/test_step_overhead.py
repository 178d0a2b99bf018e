"""The overhead cuts of issue 7 change no number: guards, optimizer, EMA and samplers are bit-identical
to the implementations they replaced (kept here as references)."""

import copy
import math

import pytest
import torch

from scoredistill.config import resolve
from scoredistill.engine.distiller import Distiller, TrainingAborted
from scoredistill.models.generators import EMA
from scoredistill.models.mlp import MLPDenoiser, MLPGenerator
from scoredistill.process import EDM, VPDiscrete
from scoredistill.sampling import get_rhos_karras, sample_ddim, sample_euler, sample_heun
from scoredistill.teachers.gmm import build_gmm


# -- the engine's guard before issue 7: a host sync per micro-batch and per role, floats recorded at once ------
class ReferenceDistiller(Distiller):
    @staticmethod
    def _frozen_ref(self, names):
        from contextlib import contextmanager

        @contextmanager
        def cm():
            mods = [self.modules[n] for n in names if n in self.modules]
            for m in mods:
                m.requires_grad_(False)
            try:
                yield
            finally:
                for m in mods:
                    m.requires_grad_(True)

        return cm()

    def _frozen(self, names):
        return self._frozen_ref(self, names)

    def _phase(self, roles, phase, compute):
        for r in roles:
            self.optimizers[r].zero_grad(set_to_none=True)
        ok = True
        outs = []
        for rng, z, cond in self._micro_batches(phase):
            out = compute(rng, z, cond)
            if out is None:
                return False
            loss = out["loss"]
            finite = bool(torch.isfinite(loss))
            ok = ok and finite
            if not finite and self.fsdp is None:
                break
            (loss / self.n_micro).backward()
            if finite:
                outs.append(out)
        ok = self.dist.all_true(ok)
        params = {r: [p for p in self.modules[r].parameters() if p.requires_grad] for r in roles}
        if ok:
            self.dist.sum_grads([p for r in roles for p in params[r]])
            clip = self.cfg["train"]["grad_clip"]
            for r in roles:
                ps = [p for p in params[r] if p.grad is not None]
                if not ps:
                    continue
                clip_fn = self.fsdp.clip_grad_norm if self.fsdp is not None else torch.nn.utils.clip_grad_norm_
                norm = clip_fn(ps, clip if clip else float("inf"))
                self._record(f"grad_norm/{r}", float(norm))
                ok = ok and math.isfinite(float(norm))
        for r in roles:
            if ok:
                self.consecutive[r] = 0
            else:
                self.nonfinite[r] += 1
                self.consecutive[r] += 1
        for out in outs:
            for k, v in out.items():
                if k != "loss":
                    self._record(k, v)
        if not ok:
            for r in roles:
                self.optimizers[r].zero_grad(set_to_none=True)
            worst = max(roles, key=lambda r: self.consecutive[r])
            if self.consecutive[worst] >= self.cfg["train"]["nan_guard_max"]:
                raise TrainingAborted(
                    f"{worst}: loss or gradients non-finite for {self.consecutive[worst]} consecutive steps "
                    f"(iteration {self.step}); lower train.lr, check the teacher, or raise train.nan_guard_max")
            return False
        for out in outs:
            self._record("loss_gen" if "generator" in roles else "loss_aux", out["loss"])
        for r in roles:
            self.optimizers[r].step()
        return True

    def _record(self, key, value):
        if torch.is_tensor(value):
            value = float(value.detach().double().mean())
        self.running.setdefault(key, []).append(float(value))


class NaNTeacher(torch.nn.Module):
    """NaN output on the calls listed in ``bad`` (1-based)."""

    def __init__(self, inner, bad):
        super().__init__()
        self.inner, self.bad, self.calls = inner, set(bad), 0
        self.process, self.data_shape, self.num_classes = inner.process, inner.data_shape, inner.num_classes

    def guided(self, x_t, t, cond, w):
        self.calls += 1
        out = self.inner.guided(x_t, t, cond, w)
        return out * float("nan") if self.calls in self.bad else out

    def forward(self, x_t, t, cond=None):
        return self.guided(x_t, t, cond, 1.0)


BASE = {"teacher": {"kind": "gmm", "preset": "ring8_cond"},
        "generator": {"width": 16, "depth": 2}, "fake_score": {"width": 16, "depth": 2},
        "objective": {"name": "dmd2"},
        "train": {"steps": 10, "batch_size": 16, "generator_every": 1, "progress": False},
        "eval": {"n_samples": 16, "plots": False}}


def _run(cls, tmp, overrides, bad_calls=(), bad_grad_steps=(), steps=10):
    d = cls(resolve(BASE, overrides), str(tmp))
    d.teacher = NaNTeacher(d.teacher, bad_calls)

    def hook(g):  # non-finite generator gradients with finite losses at these iterations
        return g * float("inf") if d.step in bad_grad_steps else g

    d.generator.net.out.weight.register_hook(hook)
    err = None
    try:
        for _ in range(steps):
            d.train_step()
    except TrainingAborted as e:
        err = str(e)
    if hasattr(d, "_flush_running"):
        d._flush_running()
    return d, err


def _same_floats(a, b):
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


@pytest.mark.parametrize("overrides,bad,bad_grad", [
    ([], (2, 5, 6), ()),                                    # one micro-batch: the deferred check
    (["train.micro_batch=8"], (2, 5, 9, 10), ()),           # two micro-batches: NaN in the last or the first
    (["train.micro_batch=4"], (4, 6), (3, 7)),              # four; plus infinite gradients with finite losses
    (["train.micro_batch=8", "train.nan_guard_max=3"], range(5, 100), ()),  # abort after 3 in a row
])
def test_guard_matches_reference(tmp_path, overrides, bad, bad_grad):
    new, err_new = _run(Distiller, tmp_path / "new", overrides, bad, bad_grad)
    ref, err_ref = _run(ReferenceDistiller, tmp_path / "ref", overrides, bad, bad_grad)
    assert err_new == err_ref
    assert new.nonfinite == ref.nonfinite and new.consecutive == ref.consecutive
    assert sum(new.nonfinite.values()) > 0
    assert new.teacher.calls == ref.teacher.calls
    assert set(new.running) == set(ref.running)
    for k in ref.running:
        assert all(isinstance(v, float) for v in new.running[k])
        assert _same_floats(new.running[k], ref.running[k]), k
    for name in ("generator", "ema", "fake_score"):
        a, b = new.modules[name].state_dict(), ref.modules[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for name in ref.optimizers:
        sa, sb = new.optimizers[name].state_dict()["state"], ref.optimizers[name].state_dict()["state"]
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sb for k in sb[i]), name


def test_recorded_tensors_flush_to_the_same_floats(tmp_path):
    d = Distiller(resolve(BASE), str(tmp_path))
    vals = [torch.tensor(0.1, dtype=torch.float32), torch.tensor([1.0, 2.5]), torch.tensor(3, dtype=torch.int64)]
    for v in vals:
        d._record("x", v)
    d._record("x", 0.25)
    assert any(torch.is_tensor(v) for v in d.running["x"])
    d._flush_running()
    assert d.running["x"] == [float(v.double().mean()) for v in vals] + [0.25]


# -- optimizer and EMA ------------------------------------------------------------------------------------------
def test_foreach_adam_and_ema_are_bit_identical():
    torch.manual_seed(0)
    m0 = MLPDenoiser(EDM(), 2, 32, 2, num_classes=3)
    grads = [[torch.randn_like(p) for p in m0.parameters()] for _ in range(5)]
    out = {}
    for foreach in (False, True):
        m = copy.deepcopy(m0)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.0, 0.99), weight_decay=1e-3, foreach=foreach)
        for g in grads:
            for p, gg in zip(m.parameters(), g):
                p.grad = gg.clone()
            opt.step()
        out[foreach] = [p.detach().clone() for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True]))

    g = MLPGenerator(2, 16, 2)
    ema = EMA(g, 0.9)
    ref = copy.deepcopy(ema.model)
    for _ in range(3):
        with torch.no_grad():
            for p in g.parameters():
                p.add_(torch.randn_like(p))
        ema.update(g)
        with torch.no_grad():
            for pe, p in zip(ref.parameters(), g.parameters()):
                pe.lerp_(p.detach(), 1.0 - 0.9)
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), ref.parameters()))


# -- samplers: per-level (t, a_t) computed once instead of per evaluation -----------------------------------------
def _ref_denoise_y(denoiser, y, rho, cond, w):
    p = denoiser.process
    t = p.t_from_rho(torch.tensor(rho, dtype=torch.float64)).expand(y.shape[0]).to(y.device)
    a = p.alpha(t).view((-1,) + (1,) * (y.dim() - 1)).to(y.dtype)
    return denoiser.guided(a * y, t, cond, w)


@torch.no_grad()
def _ref_euler(denoiser, z, rhos, cond=None, w=1.0):
    y = z * float(rhos[0])
    for i in range(len(rhos) - 1):
        r, r_next = float(rhos[i]), float(rhos[i + 1])
        d = (y - _ref_denoise_y(denoiser, y, r, cond, w)) / r
        y = y + (r_next - r) * d
    return y


@torch.no_grad()
def _ref_heun(denoiser, z, rhos, cond=None, w=1.0):
    y = z * float(rhos[0])
    for i in range(len(rhos) - 1):
        r, r_next = float(rhos[i]), float(rhos[i + 1])
        d = (y - _ref_denoise_y(denoiser, y, r, cond, w)) / r
        y_next = y + (r_next - r) * d
        if r_next > 0:
            d2 = (y_next - _ref_denoise_y(denoiser, y_next, r_next, cond, w)) / r_next
            y_next = y + (r_next - r) * 0.5 * (d + d2)
        y = y_next
    return y


def test_samplers_bit_identical_to_reference():
    from scoredistill.sampling import get_rhos_uniform_t

    torch.manual_seed(0)
    mlp = MLPDenoiser(EDM(), 2, 32, 2, num_classes=3).eval()
    for p in mlp.parameters():  # the output layer starts at zero: make the network matter
        p.data.normal_(0, 0.3)
    gmm = build_gmm({"preset": "ring8_cond"}, VPDiscrete())  # alpha_t != 1, a time grid, CFG
    for den, cond, w in ((mlp, torch.tensor([0, 1, 2, -1] * 4), 1.0), (mlp, None, 1.0),
                         (gmm, torch.arange(16) % 5 - 1, 2.5)):  # ring8_cond: 4 classes, -1 = null
        z = torch.randn(16, *den.data_shape)
        p = den.process
        rhos = get_rhos_karras(7, max(p.rho_min, 0.002), min(p.rho_max, 80.0))
        assert torch.equal(sample_heun(den, z, rhos, cond, w), _ref_heun(den, z, rhos, cond, w))
        assert torch.equal(sample_euler(den, z, rhos, cond, w), _ref_euler(den, z, rhos, cond, w))
        assert torch.equal(sample_ddim(den, z, 5, cond, w), _ref_euler(den, z, get_rhos_uniform_t(5, den), cond, w))
        open_end = rhos[:-1]  # a level list that does not end at rho = 0
        assert torch.equal(sample_heun(den, z, open_end, cond, w), _ref_heun(den, z, open_end, cond, w))
