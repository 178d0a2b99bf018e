"""Train a small class-conditional image teacher (EDM-preconditioned UNet) on a bundled dataset.

``scoredistill train-teacher recipes/teachers/digits.yaml --out DIR`` dispatches here when the
recipe's ``teacher.kind`` is ``image``. Loss: EDM denoising score matching (arXiv 2206.00364 §5)
with log-normal noise levels, condition dropout (labels replaced by the null class ``-1``) so
classifier-free guidance works, EMA of the weights. Writes ``DIR/config.json`` +
``DIR/model.safetensors`` (the EMA model) — the bundled-teacher folder format — plus EMA snapshots
``DIR.snapshots/step_N`` (a sibling folder) when ``train.snapshot_every`` is set.
"""

from __future__ import annotations

import json
import os
import time

import torch

from scoredistill.config import ConfigError, check_keys
from scoredistill.models.generators import EMA
from scoredistill.models.registry import save_model
from scoredistill.models.unet import UNetDenoiser
from scoredistill.objectives.common import denoising_loss, drop_condition
from scoredistill.process.processes import make_process
from scoredistill.process.time import LogNormal

DATASETS = ("digits",)

DEFAULTS = {
    "teacher": {"kind": "image", "dataset": "digits", "process": {"kind": "edm"}},
    "network": {"channels": [32, 64], "emb_dim": 128, "dropout": 0.0, "sigma_data": None},
    "train": {"steps": 5000, "batch_size": 128, "lr": 2e-3, "lr_schedule": "constant", "seed": 0,
              "ema": 0.999, "cond_drop": 0.1, "grad_clip": 1.0, "p_mean": -1.2, "p_std": 1.2,
              "threads": None, "log_every": 250, "snapshot_every": None},
}


def load_dataset(name: str):
    """``(x_train, y_train, num_classes)`` for a bundled dataset name."""
    if name == "digits":
        from scoredistill.data.digits import load_digits_split

        s = load_digits_split()
        return s.x_train, s.y_train, s.num_classes
    raise ConfigError("teacher.dataset", f"unknown value {name!r}; accepted: {', '.join(DATASETS)}")


def resolve_image_recipe(user: dict, overrides=()) -> dict:
    check_keys(user, DEFAULTS, "")
    cfg = {}
    for sec, base in DEFAULTS.items():
        got = dict(user.get(sec) or {})
        check_keys(got, base, sec)
        cfg[sec] = {**base, **got}
    if overrides:
        for o in overrides:
            key = o.split("=", 1)[0]
            parts = key.split(".")
            if len(parts) != 2 or parts[0] not in DEFAULTS or parts[1] not in DEFAULTS[parts[0]]:
                raise ConfigError(key, "unknown key for an image teacher recipe")
        from scoredistill.config import _parse_value

        for o in overrides:
            key, text = o.split("=", 1)
            sec, k = key.split(".")
            cfg[sec][k] = _parse_value(text)
    if cfg["train"]["lr_schedule"] not in ("constant", "cosine"):
        raise ConfigError("train.lr_schedule", f"unknown value {cfg['train']['lr_schedule']!r}; "
                          "accepted: constant, cosine")
    return cfg


def train_image_teacher(user: dict, out: str, overrides=(), log=print) -> dict:
    cfg = resolve_image_recipe(user, overrides)
    tcfg, net, tr = cfg["teacher"], cfg["network"], cfg["train"]
    if tr["threads"]:
        torch.set_num_threads(int(tr["threads"]))
    x_train, y_train, num_classes = load_dataset(tcfg["dataset"])
    process = make_process(tcfg["process"])
    sd = float(net["sigma_data"]) if net["sigma_data"] is not None else round(float(x_train.std()), 4)
    torch.manual_seed(tr["seed"])
    g = torch.Generator().manual_seed(tr["seed"])
    model = UNetDenoiser(process, tuple(x_train.shape[1:]), tuple(net["channels"]), num_classes, sd,
                         net["emb_dim"], net["dropout"])
    ema = EMA(model, tr["ema"])
    opt = torch.optim.Adam(model.parameters(), lr=tr["lr"])
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, tr["steps"], eta_min=0.05 * tr["lr"])
             if tr["lr_schedule"] == "cosine" else None)
    sampler = LogNormal(tr["p_mean"], tr["p_std"])
    extra = {"dataset": tcfg["dataset"], "train": tr, "network": net}
    t0 = time.time()
    n = x_train.shape[0]
    running = 0.0
    for step in range(1, tr["steps"] + 1):
        idx = torch.randint(0, n, (tr["batch_size"],), generator=g)
        x0, cond = x_train[idx], drop_condition(y_train[idx], tr["cond_drop"], g)
        t = sampler(tr["batch_size"], process, generator=g)
        loss = denoising_loss(model, x0, cond, t, g, sd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tr["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"])
        opt.step()
        if sched is not None:
            sched.step()
        ema.update(model)
        running += float(loss.detach())
        if step % tr["log_every"] == 0 or step == tr["steps"]:
            k = tr["log_every"] if step % tr["log_every"] == 0 else step % tr["log_every"]
            log(f"train-teacher step {step}/{tr['steps']}: loss {running / k:.4f} ({time.time() - t0:.0f} s)")
            running = 0.0
        if tr["snapshot_every"] and step % tr["snapshot_every"] == 0 and step < tr["steps"]:
            save_model(ema.model, os.path.join(f"{out}.snapshots", f"step_{step}"),
                       extra={**extra, "step": step, "wall_s": round(time.time() - t0, 1)})
    wall = time.time() - t0
    os.makedirs(out, exist_ok=True)
    save_model(ema.model, out, extra={**extra, "step": tr["steps"], "wall_s": round(wall, 1)})
    with open(os.path.join(out, "recipe.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return {"out": out, "steps": tr["steps"], "final_loss": float(loss.detach()), "wall_s": wall}
