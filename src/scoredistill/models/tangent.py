"""Fast forward-mode derivatives (JVPs) of the library's networks: dual tensors plus hand-written tangent rules.

``dual_jvp(f, primals, tangents)`` returns ``(f(primals), d/ds f(primals + s tangents) at s = 0)`` like
``torch.func.jvp``, with two differences that make it 2-3x cheaper on the native MLP and UNet (measured in
docs/results/performance.md, "sCM step cost"):

* It runs on ``torch.autograd.forward_ad`` dual tensors, so the primal pass is the ordinary forward: with
  grad enabled it records the usual autograd graph (bit-identical primal and parameter gradients), and one
  pass gives both the training forward and the tangent.
* While it runs, a :class:`~torch.overrides.TorchFunctionMode` computes the primal of the ops that dominate
  the tangent pass with the same functional call as without it and their tangent by a closed form, without
  recording it for backward (the tangent is only ever used under stop-gradient):

  - ``linear`` / ``conv{1,2,3}d`` with constant weights: ``dy = W dx`` (the layer without its bias);
  - ``silu``: ``dy = dx s (1 + x (1 - s))``, ``s = sigmoid(x)`` (one fused kernel, ``silu_backward``);
  - ``layer_norm`` / ``group_norm``: with ``x^ = (x - mu) r``, ``r = 1/sqrt(var + eps)`` over the normalised
    dims (per group), ``dy = w r (dx - mean(dx) - x^ mean(dx x^))``, which is the norm's own backward kernel
    applied to ``dx`` (the Jacobian of ``x -> x^`` is symmetric), with ``mu`` and ``r`` from the primal's
    ``native_*_norm`` call. torch's own forward-mode rules for the two norms cost ~30x their forward;
  - ``+ - * /`` with one constant operand (a number or a tensor without tangent): the linear map itself.
    torch's rule materialises a zero tangent for the constant, and arithmetic on zero tensors runs a
    Python decomposition (~0.2 ms an op): dozens of them in the noise-schedule and preconditioning code.

  Every other op (and a rule op whose weights carry a tangent, or that is called in place) keeps torch's
  own forward-mode rule. Tangents agree with ``torch.func.jvp`` to float rounding (relative L2 below 1e-6 in
  float32 and 1e-14 in float64 on the MLP and the UNet, tests/objectives/test_fast_tangent.py).

A module without any forward-mode rule (a custom ``autograd.Function`` without ``jvp``) raises as it does
under ``torch.func.jvp``; callers fall back (objectives/consistency_core.py, ``Tangent``).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor


# torch's own ``_unpack_dual`` / ``_make_dual`` (what ``forward_ad.unpack_dual`` / ``make_dual`` call after
# their checks): called several times per op here, the public wrappers' checks cost more than the ops.
def _unpack(x, level: int):
    return torch._unpack_dual(x, level)


def _tangent(x, level: int) -> Tensor | None:
    return torch._unpack_dual(x, level)[1] if isinstance(x, Tensor) else None


def _arg(args, kwargs, i: int, name: str, default=None):
    return kwargs[name] if name in kwargs else (args[i] if len(args) > i else default)


def _as_shape(dy: Tensor, y: Tensor) -> Tensor:
    """A tangent of ``y``'s shape and dtype (a broadcast or higher-precision constant can make ``y`` larger or
    wider than the dual operand)."""
    dy = dy.to(y.dtype)
    return dy if dy.shape == y.shape else dy.expand(y.shape).contiguous()


# -- rules: (primal args with the dual input replaced by its primal, its tangent) -> (y, dy) ----------------
def _linear(args, kwargs, p, dp):
    w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    y = F.linear(p, w, b)
    with torch.no_grad():
        return y, F.linear(dp, w)


def _conv(op):
    names = ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))

    def rule(args, kwargs, p, dp):
        w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        rest = [_arg(args, kwargs, i, n, d) for i, n, d in names]
        y = op(p, w, b, *rest)
        with torch.no_grad():
            return y, op(dp, w, None, *rest)

    return rule


def _silu(args, kwargs, p, dp):
    y = F.silu(p)
    with torch.no_grad():
        return y, torch.ops.aten.silu_backward(dp, p)


# The normalisation x -> x^ = (x - mu) r has a symmetric Jacobian, r (I - 11^T/n - x^ x^T/n) over the normalised
# elements, so its JVP is its VJP: torch's fused backward kernel with no weight, given the primal's mu and r.
def _layer_norm(args, kwargs, p, dp):
    shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
    w, b, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
    if torch.is_autocast_enabled(p.device.type):  # autocast picks the norm's dtype at ``layer_norm``
        y = F.layer_norm(p, shape, w, b, eps)
        p, dp = p.detach().to(y.dtype), dp.to(y.dtype)
        mu, rstd = torch.native_layer_norm(p, shape, None, None, eps)[1:]
    else:
        y, mu, rstd = torch.native_layer_norm(p, shape, w, b, eps)
    with torch.no_grad():
        dy = torch.ops.aten.native_layer_norm_backward(dp, p, shape, mu, rstd, None, None, [True, False, False])[0]
        return y, dy if w is None else dy * w


def _group_norm(args, kwargs, p, dp):
    g = _arg(args, kwargs, 1, "num_groups")
    w, b, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
    n, c = p.shape[:2]
    hw = p[0, 0].numel()
    if torch.is_autocast_enabled(p.device.type):
        y = F.group_norm(p, g, w, b, eps)
        p, dp = p.detach().to(y.dtype), dp.to(y.dtype)
        mu, rstd = torch.native_group_norm(p, None, None, n, c, hw, g, eps)[1:]
    else:
        y, mu, rstd = torch.native_group_norm(p, w, b, n, c, hw, g, eps)
    with torch.no_grad():
        dy = torch.ops.aten.native_group_norm_backward(dp, p, mu, rstd, None, n, c, hw, g, [True, False, False])[0]
        return y, dy if w is None else dy * w.reshape(1, c, *[1] * (p.dim() - 2))


_UNARY = {F.linear: _linear, F.conv1d: _conv(F.conv1d), F.conv2d: _conv(F.conv2d), F.conv3d: _conv(F.conv3d),
          F.silu: _silu, F.layer_norm: _layer_norm, F.group_norm: _group_norm}


def _binary(args, kind: str, dual_first: bool, level: int):
    """``y, dy`` of ``a (op) b`` where exactly one operand is dual (``dual_first``: ``a``)."""
    a, b = args
    if dual_first:
        p, dp = _unpack(a, level)
        y = _BINARY_OPS[kind](p, b)
    else:
        p, dp = _unpack(b, level)
        y = _BINARY_OPS[kind](a, p)
    with torch.no_grad():
        if kind == "add" or (kind == "sub" and dual_first):
            dy = dp
        elif kind == "sub":
            dy = -dp
        elif kind == "mul":
            dy = dp * (b if dual_first else a)
        elif dual_first:  # x / c
            dy = dp / b
        else:  # c / x: -y dx / x
            dy = -(y * dp) / p
        return y, _as_shape(dy, y)


_BINARY_OPS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
# func -> (kind, operands swapped): ``x.__rsub__(c)`` is ``c - x``
_BINARY = {torch.Tensor.__add__: ("add", False), torch.Tensor.__radd__: ("add", True), torch.add: ("add", False),
           torch.Tensor.add: ("add", False),
           torch.Tensor.__sub__: ("sub", False), torch.Tensor.__rsub__: ("sub", True), torch.sub: ("sub", False),
           torch.Tensor.sub: ("sub", False),
           torch.Tensor.__mul__: ("mul", False), torch.Tensor.__rmul__: ("mul", True), torch.mul: ("mul", False),
           torch.Tensor.mul: ("mul", False),
           torch.Tensor.__truediv__: ("div", False), torch.Tensor.__rtruediv__: ("div", True),
           torch.div: ("div", False), torch.Tensor.div: ("div", False)}


def _atan2(a, b, da, db):
    """``atan2(a, b)``, tangent ``(b da - a db) / (a^2 + b^2)`` (either operand may be constant)."""
    y = torch.atan2(a, b)
    with torch.no_grad():
        num = (b * da if da is not None else 0) - (a * db if db is not None else 0)
        return y, _as_shape(num / (a * a + b * b), y)


class FastTangentRules(TorchFunctionMode):
    """Inside the forward-AD dual level ``level``: the closed-form tangent rules of the module docstring."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        lv = self.level
        rule = _UNARY.get(func)
        if rule is not None and isinstance(args[0], Tensor) and not kwargs.get("inplace", False):
            p, dp = _unpack(args[0], lv)
            if dp is not None and all(_tangent(v, lv) is None for v in (*args[1:], *kwargs.values())):
                y, dy = rule(args, kwargs, p, dp)
                return torch._make_dual(y, dy, lv)
        binary = _BINARY.get(func)
        if binary is not None and not kwargs and len(args) == 2:
            kind, swapped = binary
            a, b = (args[1], args[0]) if swapped else args
            da, db = _tangent(a, lv), _tangent(b, lv)
            if (da is None) != (db is None) and all(isinstance(v, (Tensor, int, float)) for v in (a, b)):
                y, dy = _binary((a, b), kind, da is not None, lv)
                return torch._make_dual(y, dy, lv)
        if func is torch.atan2 and not kwargs and len(args) == 2:
            (pa, da), (pb, db) = _unpack(args[0], lv), _unpack(args[1], lv)
            if da is not None or db is not None:
                return torch._make_dual(*_atan2(pa, pb, da, db), lv)
        return func(*args, **kwargs)


def dual_jvp(f, primals: tuple, tangents: tuple) -> tuple:
    """``(f(*primals), JVP of f along tangents)`` by dual tensors and :class:`FastTangentRules`. Non-tensor
    and non-floating primals are passed through (their tangents are ignored). The primal output carries
    autograd history when grad is enabled; the tangent is detached. ``f`` returns one tensor."""
    with fwAD.dual_level() as level, FastTangentRules(level):
        duals = [fwAD.make_dual(p, d) if torch.is_tensor(p) and p.is_floating_point() else p
                 for p, d in zip(primals, tangents)]
        y, dy = fwAD.unpack_dual(f(*duals))
    if dy is None:  # the output does not depend on the primals
        dy = torch.zeros_like(y)
    return y, dy.detach()
