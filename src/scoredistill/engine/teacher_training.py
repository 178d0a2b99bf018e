"""Fit a small learned teacher (EDM-preconditioned MLP) to samples of a GMM.

Gives the library an *imperfect* real teacher whose target is known exactly, so the same metrics
apply. Loss: EDM denoising score matching (arXiv 2206.00364 §5) with log-normal noise levels.
"""

from __future__ import annotations

import os

import torch

from scoredistill.config import load_yaml
from scoredistill.errors import ConfigError, check_keys
from scoredistill.models.generators import EMA
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.models.registry import save_model
from scoredistill.objectives.common import denoising_loss
from scoredistill.process.processes import make_process
from scoredistill.process.time import LogNormal
from scoredistill.teachers.gmm import build_gmm

DEFAULTS = {"network": {"width": 256, "depth": 4},
            "train": {"steps": 3000, "batch_size": 512, "lr": 2e-3, "seed": 0, "ema": 0.995, "log_every": 500}}


def train_teacher(path: str, out: str, overrides=(), log=print) -> dict:
    from scoredistill.config import apply_overrides

    user = load_yaml(path)
    if (user.get("teacher") or {}).get("kind") == "image":
        from scoredistill.engine.image_teacher_training import train_image_teacher

        return train_image_teacher(user, out, overrides, log=log, recipe=path)
    check_keys(user, ("teacher", "network", "train"), "")
    tcfg = dict(user.get("teacher") or {})
    if tcfg.pop("kind", "gmm") != "gmm":
        raise ConfigError("teacher.kind", "train-teacher fits a GMM or an image dataset; accepted: gmm, image")
    net = {**DEFAULTS["network"], **(user.get("network") or {})}
    tr = {**DEFAULTS["train"], **(user.get("train") or {})}
    check_keys(net, DEFAULTS["network"], "network")
    check_keys(tr, DEFAULTS["train"], "train")
    cfg = {"network": net, "train": tr}
    cfg = apply_overrides(cfg, [o for o in overrides if not o.startswith("teacher.")]) if overrides else cfg
    net, tr = cfg["network"], cfg["train"]
    process = make_process(tcfg.pop("process", None))
    check_keys(tcfg, ("preset", "means", "std", "stds", "weights", "classes", "dim"), "teacher")
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
    return {"out": out, "steps": tr["steps"], "final_loss": float(loss)}
