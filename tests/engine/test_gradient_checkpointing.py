"""Gradient checkpointing of the native networks (MLP and UNet backbones): same gradients, less memory."""

import copy

import pytest
import torch

from scoredistill.config import ConfigError, resolve
from scoredistill.engine.build import build_fake, build_generator, build_teacher
from scoredistill.models.generators import DenoiserGenerator
from scoredistill.models.mlp import MLPBackbone, MLPDenoiser, MLPGenerator
from scoredistill.models.unet import UNetBackbone, UNetDenoiser
from scoredistill.process import EDM


def _grads(model, fn, inputs):
    model.zero_grad(set_to_none=True)
    xs = [x.clone().requires_grad_(True) for x in inputs]
    fn(model, *xs).square().mean().backward()
    return [p.grad for p in model.parameters()], [x.grad for x in xs]


def _compare(model, fn, inputs, backbone_type):
    ref = copy.deepcopy(model).train()
    ck = copy.deepcopy(model).train()
    backbones = [m for m in ck.modules() if isinstance(m, backbone_type)]
    assert backbones
    for m in backbones:
        m.gradient_checkpointing = True
    calls = []
    blk = next(m for m in backbones[0].modules() if m is not backbones[0] and "Block" in type(m).__name__)
    blk.register_forward_pre_hook(lambda *a: calls.append(1))  # pre-hook: recomputation may stop early
    gp_ref, gx_ref = _grads(ref, fn, inputs)
    gp_ck, gx_ck = _grads(ck, fn, inputs)
    assert len(calls) == 2  # the block ran again in the backward pass: checkpointing is active
    assert sum(g is not None for g in gp_ref) > len(gp_ref) // 3  # features(): the encoder half
    for a, b in zip(gp_ref + gx_ref, gp_ck + gx_ck):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    # eval mode or no autograd: plain forward, same output
    calls.clear()
    with torch.no_grad():
        out_ck = fn(ck, *inputs)
        out_ref = fn(ref, *inputs)
    assert len(calls) == 1 and torch.equal(out_ck, out_ref)
    calls.clear()
    ck.eval()
    fn(ck, *[x.clone().requires_grad_(True) for x in inputs]).sum().backward()
    assert len(calls) == 1


def _with_nonzero_output(model):
    """The output layers start at zero; randomise them so every parameter gets a gradient."""
    torch.manual_seed(1)
    for p in model.parameters():
        if p.dim() > 0 and not p.abs().sum():
            p.data.normal_(0, 0.1)
    return model


def test_unet_checkpointing_same_gradients():
    torch.manual_seed(0)
    net = _with_nonzero_output(UNetDenoiser(EDM(), (1, 8, 8), (8, 16), num_classes=3, sigma_data=0.5, emb_dim=16))
    x = torch.randn(6, 1, 8, 8)
    t = torch.rand(6, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, -1, 0, 1])
    _compare(net, lambda m, x: m(x, t, cond), [x], UNetBackbone)
    _compare(net, lambda m, x: m.features(x, t, cond), [x], UNetBackbone)
    gen = DenoiserGenerator(net, 0.9)  # a teacher-initialised one-step generator
    _compare(gen, lambda m, z: m(z, cond), [x], UNetBackbone)


def test_mlp_checkpointing_same_gradients():
    torch.manual_seed(0)
    den = _with_nonzero_output(MLPDenoiser(EDM(), 2, 32, 3, num_classes=4, sigma_data=1.0, emb_dim=16))
    x = torch.randn(16, 2)
    t = torch.rand(16, dtype=torch.float64)
    cond = torch.randint(-1, 4, (16,))
    _compare(den, lambda m, x: m(x, t, cond), [x], MLPBackbone)
    gen = MLPGenerator(2, 32, 3, num_classes=4, emb_dim=16)
    _compare(gen, lambda m, z: m(z, cond), [x], MLPBackbone)


def _backbones(module):
    return [m for m in module.modules() if isinstance(m, (MLPBackbone, UNetBackbone))]


def test_config_enables_native_checkpointing(tmp_path):
    cfg = resolve({"teacher": {"kind": "gmm", "preset": "ring8"},
                   "generator": {"kind": "mlp", "width": 16, "depth": 2, "gradient_checkpointing": True},
                   "fake_score": {"kind": "mlp", "width": 16, "depth": 2, "gradient_checkpointing": True}})
    teacher, _ = build_teacher(cfg["teacher"])
    assert all(m.gradient_checkpointing for m in _backbones(build_generator(cfg["generator"], teacher)))
    assert all(m.gradient_checkpointing for m in _backbones(build_fake(cfg["fake_score"], teacher, 1.0)))
    default = resolve({"teacher": {"kind": "gmm", "preset": "ring8"}})
    assert not any(m.gradient_checkpointing for m in _backbones(build_generator(default["generator"], teacher)))
    # teacher copies (bundled digits UNet): generator and fake, the frozen teacher itself untouched
    ucfg = resolve({"teacher": {"kind": "bundled", "name": "digits"},
                    "generator": {"kind": "teacher", "gradient_checkpointing": True},
                    "fake_score": {"kind": "teacher", "gradient_checkpointing": True}})
    ut, _ = build_teacher(ucfg["teacher"])
    g, f = build_generator(ucfg["generator"], ut), build_fake(ucfg["fake_score"], ut, 0.5)
    assert _backbones(g)[0].gradient_checkpointing and _backbones(f)[0].gradient_checkpointing
    assert not _backbones(ut)[0].gradient_checkpointing
    with pytest.raises(ConfigError, match="generator.gradient_checkpointing"):  # the schema refuses it first
        resolve({"teacher": {"kind": "gmm", "preset": "ring8"}, "generator": {"gradient_checkpointing": "yes"}})
    with pytest.raises(ConfigError, match="generator.gradient_checkpointing"):
        build_generator({**default["generator"], "gradient_checkpointing": "yes"}, teacher)
