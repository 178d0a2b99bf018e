"""Fit a small learned teacher (EDM-preconditioned MLP) to samples of a GMM.

Gives the library an *imperfect* real teacher whose target is known exactly, so the same metrics
apply. Loss: EDM denoising score matching (arXiv 2206.00364 §5) with log-normal noise levels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from scoredistill.config import (
    MAX_SIZE,
    Section,
    TeacherConfig,
    apply_overrides,
    depth_key,
    every_key,
    key,
    load_yaml,
    parse,
    resolve_schema,
    seed_key,
    steps_key,
    width_key,
)
from scoredistill.errors import ConfigError, check_keys
from scoredistill.models.generators import EMA
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.models.registry import save_model
from scoredistill.objectives.common import denoising_loss
from scoredistill.process.processes import make_process
from scoredistill.process.time import LogNormal
from scoredistill.teachers.gmm import build_gmm


@dataclass
class NetworkConfig(Section):
    DOC: ClassVar[str] = "The EDM-preconditioned MLP fitted to the mixture."
    width: int = width_key()
    depth: int = depth_key()


@dataclass
class FitTrainConfig(Section):
    DOC: ClassVar[str] = "Denoising score matching on exact mixture samples (cosine lr decay)."
    steps: int = steps_key(3000, resume=False)
    batch_size: int = key(512, "mixture samples per step", lo=1, hi=MAX_SIZE)
    lr: float = key(2e-3, "Adam learning rate", lo=0)
    seed: int = seed_key()
    ema: float = key(0.995, "EMA decay of the saved weights", lo=0, hi=1, hi_open=True)
    log_every: int = every_key(500, "steps between loss lines", resume=False)


# the teacher keys a fitted mixture reads (teacher.kind gmm of `distill`, without guidance_convention)
FIT_TEACHER_KEYS = ("kind", "preset", "means", "std", "stds", "weights", "classes", "dim", "process")
TRAIN_TEACHER = {"teacher": TeacherConfig, "network": NetworkConfig, "train": FitTrainConfig}


def resolve_gmm_recipe(user: dict, overrides=()) -> tuple[TeacherConfig, dict, dict]:
    """``(teacher, network, train)`` of a GMM train-teacher recipe, validated."""
    check_keys(user, TRAIN_TEACHER, "")
    overrides = list(overrides or ())
    tover = [o for o in overrides if o.split("=", 1)[0].startswith("teacher.")]
    rest = {k: v for k, v in user.items() if k != "teacher"}
    cfg, _ = resolve_schema({"network": NetworkConfig, "train": FitTrainConfig}, rest,
                            [o for o in overrides if o not in tover])
    tuser = user.get("teacher") or {}
    if not isinstance(tuser, dict):
        raise ConfigError("teacher", "must be a mapping")
    tuser = apply_overrides({"teacher": dict(tuser)}, tover, {"teacher": TeacherConfig})["teacher"]
    if tuser.get("kind", "gmm") != "gmm":
        raise ConfigError("teacher.kind", f"unknown value {tuser['kind']!r}; train-teacher fits a GMM or an image "
                          "dataset; accepted: gmm, image")
    return parse(TeacherConfig, tuser, "teacher", only=FIT_TEACHER_KEYS), cfg["network"], cfg["train"]


def train_teacher(path: str, out: str, overrides=(), log=print) -> dict:
    user = load_yaml(path)
    if (user.get("teacher") or {}).get("kind") == "image":
        from scoredistill.engine.image_teacher_training import train_image_teacher

        return train_image_teacher(user, out, overrides, log=log, recipe=path)
    tcfg, net, tr = resolve_gmm_recipe(user, overrides)
    process = make_process(tcfg.process)
    gmm = build_gmm(tcfg, process)
    torch.manual_seed(tr["seed"])
    g = torch.Generator().manual_seed(tr["seed"])
    model = MLPDenoiser(process, gmm.dim, net["width"], net["depth"], gmm.num_classes, gmm.data_std())
    ema = EMA(model, tr["ema"])
    opt = torch.optim.Adam(model.parameters(), lr=tr["lr"])
    sampler = LogNormal()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, tr["steps"])
    for step in range(1, tr["steps"] + 1):
        cond = torch.randint(0, gmm.num_classes, (tr["batch_size"],), generator=g) if gmm.num_classes else None
        x0 = gmm.sample(tr["batch_size"], cond=cond, generator=g)
        if cond is not None:  # 10 % null labels so classifier-free guidance works
            cond = torch.where(torch.rand(len(cond), generator=g) < 0.1, torch.full_like(cond, -1), cond)
        t = sampler(tr["batch_size"], process, generator=g)
        loss = denoising_loss(model, x0, cond, t, g, model.sigma_data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        if step % tr["log_every"] == 0 or step == tr["steps"]:
            log(f"train-teacher step {step}/{tr['steps']}: loss {loss.item():.4f}")
    os.makedirs(out, exist_ok=True)
    src = gmm.describe()
    save_model(ema.model, out, extra={"source": src, "train": tr, "network": net})
    return {"out": out, "steps": tr["steps"], "final_loss": float(loss.detach())}
