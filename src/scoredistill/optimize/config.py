"""Config schema of ``scoredistill optimize``: the teacher section of ``distill`` plus the
parameterization, an optional fake score, the objective and the optimizer settings.

Objective scalars, ``objective.time.t_min/t_max`` and ``train.lr`` / ``train.fake_lr`` may be schedules
(:mod:`scoredistill.optimize.schedule`). Every problem is a :class:`~scoredistill.config.ConfigError`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from scoredistill.config import DEFAULTS as DISTILL_DEFAULTS
from scoredistill.config import _parse_value, check_optimizers
from scoredistill.errors import ConfigError
from scoredistill.optimize.schedule import parse_schedule

DEFAULTS: dict[str, Any] = {
    "teacher": copy.deepcopy(DISTILL_DEFAULTS["teacher"]),
    "params": {
        "kind": "particles",      # particles | image | callable | latent
        "n": 512,                 # particles: how many; image: how many images
        "shape": None,            # default: the teacher's data shape
        "init_mean": 0.0,
        "init_std": 1.0,
        "init": None,             # PATH.npy of initial values (particles / image); callable: init hook
        "classes": None,          # null | k (every item targets class k) | uniform (round-robin over classes)
        "views": None,            # null | index (item index) | V (index mod V, or the hook's view ids < V)
        "batch_size": None,       # particles per step (null: all)
        "repeat": 1,              # image: renders (noise draws) per step
        "activation": "none",     # image: none | sigmoid | tanh
        "render": None,           # callable: 'package.module:function'
        "num_views": 8,           # callable: number of views to render from
        "hook_args": {},          # callable: keyword arguments for the init and render hooks
        "vae": None,              # latent: AutoencoderKL folder (optimize/latent.py)
        "decode": True,           # latent: teacher sees the decoded image (true) or the latent (false)
    },
    "fake_score": {
        "kind": "mlp",
        "width": 256, "depth": 4,
        "sigma_data": None,       # default: the teacher's data std
    },
    "objective": {"name": "sds"},
    "train": {
        "steps": 1000,
        "seed": 0,
        "lr": 1e-2,               # particle / parameter learning rate (schedulable)
        "betas": [0.9, 0.99],
        "eps": 1e-15,             # threestudio's Adam eps
        "weight_decay": 0.0,
        "optimizer": "adam",      # adam | adamw | radam (engine/optim.py)
        "fake_optimizer": None,   # null: as optimizer
        "fake_lr": 1e-3,          # schedulable
        "fake_betas": [0.9, 0.999],
        "fake_steps": 1,          # fake-score updates per parameter update (ProlificDreamer K = 1)
        "fake_warmup": 0,         # fake-score updates on the initial samples before the first step
        "grad_clip": None,        # clip the parameters' gradient norm (null: off)
        "nan_guard_max": 20,
        "checkpoint_every": 500,
        "keep_checkpoints": 2,
        "log_every": 50,
        "device": "cpu",
        "threads": None,
        "progress": True,
    },
    "eval": {"every": 250, "plots": True},
}

SECTIONS = tuple(DEFAULTS)
FREE = ("objective", "teacher.process", "params.hook_args")   # validated elsewhere


def _free(path: str) -> bool:
    return any(path == f or path.startswith(f + ".") for f in FREE)


def _merge(base: dict, new: dict, path: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        field = f"{path}.{k}" if path else k
        if not path and k not in DEFAULTS:
            raise ConfigError(k, f"unknown section; accepted: {', '.join(SECTIONS)}")
        if _free(field):
            out[k] = copy.deepcopy(v)
            continue
        if path and k not in base:
            raise ConfigError(field, f"unknown key; accepted: {', '.join(sorted(base))}")
        if isinstance(base.get(k), dict):
            if not isinstance(v, dict):
                raise ConfigError(field, "must be a mapping")
            out[k] = _merge(base[k], v, field)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] not in DEFAULTS:
            raise ConfigError(key, f"unknown section; accepted: {', '.join(SECTIONS)}")
        node = cfg
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is not a mapping")
        node[parts[-1]] = _parse_value(text)
    return cfg


def _int(cfg, sec, key, lo=1, allow_none=False):
    v = cfg[sec][key]
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(f"{sec}.{key}", f"must be an integer >= {lo}, got {v!r}")


def _number(cfg, sec, key, lo=None, allow_none=False, schedulable=False):
    v = cfg[sec][key]
    if v is None and allow_none:
        return
    if schedulable and parse_schedule(v, f"{sec}.{key}") is not None:
        return
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ConfigError(f"{sec}.{key}", f"must be a number, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(f"{sec}.{key}", f"must be >= {lo}, got {v!r}")


def validate(cfg: dict) -> None:
    p, t = cfg["params"], cfg["train"]
    kinds = ("particles", "image", "callable", "latent")
    if p["kind"] not in kinds:
        raise ConfigError("params.kind", f"unknown value {p['kind']!r}; accepted: {', '.join(kinds)}")
    _int(cfg, "params", "n")
    _int(cfg, "params", "batch_size", allow_none=True)
    _int(cfg, "params", "repeat")
    _int(cfg, "params", "num_views")
    _number(cfg, "params", "init_mean")
    _number(cfg, "params", "init_std", lo=0)
    sh = p["shape"]
    if sh is not None and (not isinstance(sh, (list, tuple)) or not sh
                           or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in sh)):
        raise ConfigError("params.shape", f"must be a list of positive integers, got {sh!r}")
    c = p["classes"]
    if c is not None and c != "uniform" and (not isinstance(c, int) or isinstance(c, bool) or c < 0):
        raise ConfigError("params.classes", f"must be null, uniform or a class label >= 0, got {c!r}")
    v = p["views"]
    if v is not None and v != "index" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise ConfigError("params.views", f"must be null, index or an integer >= 1, got {v!r}")
    if not isinstance(p["hook_args"], dict):
        raise ConfigError("params.hook_args", "must be a mapping")
    if p["kind"] == "callable" and not p["render"]:
        raise ConfigError("params.render",
                          "missing; give 'package.module:function' for params.kind: callable")
    for k in ("steps", "fake_steps", "checkpoint_every", "keep_checkpoints", "log_every", "nan_guard_max"):
        _int(cfg, "train", k)
    _int(cfg, "train", "seed", lo=0)
    _int(cfg, "train", "fake_warmup", lo=0)
    _number(cfg, "train", "lr", lo=0, schedulable=True)
    _number(cfg, "train", "fake_lr", lo=0, schedulable=True)
    _number(cfg, "train", "eps", lo=0)
    _number(cfg, "train", "weight_decay", lo=0)
    check_optimizers(t, ("optimizer", "fake_optimizer"))
    _number(cfg, "train", "grad_clip", lo=0, allow_none=True)
    for k in ("betas", "fake_betas"):
        b = t[k]
        if (not isinstance(b, (list, tuple)) or len(b) != 2
                or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b)):
            raise ConfigError(f"train.{k}", f"must be two numbers in [0, 1), got {b!r}")
    if t["device"] not in ("cpu", "cuda") and not str(t["device"]).startswith("cuda:"):
        raise ConfigError("train.device", f"unknown value {t['device']!r}; accepted: cpu, cuda, cuda:N")
    _int(cfg, "eval", "every")
    _int(cfg, "fake_score", "width")
    _int(cfg, "fake_score", "depth")
    if cfg["fake_score"]["kind"] != "mlp":
        raise ConfigError("fake_score.kind", f"unknown value {cfg['fake_score']['kind']!r}; accepted: mlp")
    if not isinstance(cfg["objective"], dict) or "name" not in cfg["objective"]:
        raise ConfigError("objective.name", "missing")


def resolve(user: dict, overrides: Iterable[str] = ()) -> dict:
    cfg = _merge(DEFAULTS, user, "")
    cfg = apply_overrides(cfg, overrides)
    cfg = _merge(DEFAULTS, cfg, "")
    validate(cfg)
    return cfg
