"""Train a small class-conditional image teacher (EDM-preconditioned UNet) on a bundled dataset.

``scoredistill train-teacher recipes/teachers/digits.yaml --out DIR`` dispatches here when the
recipe's ``teacher.kind`` is ``image``. Loss: EDM denoising score matching (arXiv 2206.00364 §5)
with log-normal noise levels, condition dropout (labels replaced by the null class ``-1``) so
classifier-free guidance works, EMA of the weights. Writes ``DIR/config.json`` +
``DIR/model.safetensors`` (the EMA model) — the bundled-teacher folder format — plus EMA snapshots
``DIR.snapshots/step_N`` (a sibling folder) when ``train.snapshot_every`` is set, and image grids of
EMA samples (35-NFE Heun, one row per class) ``DIR.samples/step_N.png`` when ``train.sample_every`` is.

Datasets (``teacher.dataset``): ``digits`` (8x8) and ``mnist`` (28x28, ``pip install
scoredistill[mnist]``), see :mod:`scoredistill.data`. ``train.device`` (``cpu`` default, ``cuda``,
``cuda:1``, …) is where the networks and the batches live; batches, labels, noise levels and noise are
drawn on the CPU from the seeded generator (a CPU run is bitwise reproducible; on a GPU, dropout masks
come from the seeded CUDA generator and cuDNN autotuning makes runs close, not bitwise equal).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from scoredistill.config import (
    INT64_MAX,
    MAX_SIZE,
    MAX_WIDTH,
    Section,
    device_key,
    every_key,
    key,
    process_check,
    resolve_schema,
    seed_key,
    steps_key,
    threads_key,
)
from scoredistill.data import DATASETS, load_split
from scoredistill.errors import ConfigError
from scoredistill.models.generators import EMA
from scoredistill.models.registry import save_model
from scoredistill.models.unet import UNetDenoiser
from scoredistill.objectives.common import denoising_loss, drop_condition
from scoredistill.process.processes import make_process
from scoredistill.process.time import LogNormal


@dataclass
class ImageTeacherConfig(Section):
    DOC: ClassVar[str] = "The bundled dataset the image teacher is fitted to."
    kind: str = key("image", "image (dispatches `train-teacher` to the image trainer)", choices=("image",))
    dataset: str = key("digits", "bundled dataset (scoredistill.data)", choices=tuple(DATASETS))
    process: dict = key({"kind": "edm"}, "forward process (docs/processes.md)", check=process_check,
                        accepts="a process mapping (below)")


@dataclass
class UNetConfig(Section):
    DOC: ClassVar[str] = "The class-conditional EDM-preconditioned UNet."
    channels: list[int] = key([32, 64], "channels per resolution level", lo=1, hi=MAX_WIDTH)
    emb_dim: int = key(128, "time / class embedding width", lo=1, hi=MAX_WIDTH)
    dropout: float = key(0.0, "dropout in the residual blocks", lo=0, hi=1, hi_open=True)
    sigma_data: float | None = key(None, "EDM preconditioning scale (default: the dataset's std)", lo=0, lo_open=True)


@dataclass
class ImageTrainConfig(Section):
    DOC: ClassVar[str] = "Denoising score matching on the dataset's training split."
    steps: int = steps_key(5000, resume=False)
    batch_size: int = key(128, "images per step", lo=1, hi=MAX_SIZE)
    lr: float = key(2e-3, "Adam learning rate", lo=0)
    lr_schedule: str = key("constant", "constant | cosine (to 5 % of lr)", choices=("constant", "cosine"))
    seed: int = seed_key()
    ema: float = key(0.999, "EMA decay of the saved weights", lo=0, hi=1, hi_open=True)
    cond_drop: float = key(0.1, "share of labels replaced by the null class (for CFG)", lo=0, hi=1)
    grad_clip: float | None = key(1.0, "gradient-norm clip (null or 0: off)", lo=0)
    p_mean: float = key(-1.2, "log-normal noise levels: mean of ln sigma")
    p_std: float = key(1.2, "log-normal noise levels: std of ln sigma", lo=0, lo_open=True)
    threads: int | None = threads_key(resume=False)
    log_every: int = every_key(250, "steps between loss lines", resume=False)
    snapshot_every: int | None = key(None, "steps between EMA snapshots (DIR.snapshots/step_N)", lo=1, hi=INT64_MAX)
    sample_every: int | None = key(None, "steps between sample grids (DIR.samples/)", lo=1, hi=INT64_MAX)
    device: str = device_key(resume=False)


IMAGE_TEACHER = {"teacher": ImageTeacherConfig, "network": UNetConfig, "train": ImageTrainConfig}
GRID_PER_CLASS = 10  # sample grids: 10 samples of each class (one row per class), 35-NFE Heun


def load_dataset(name: str):
    """``(x_train, y_train, num_classes)`` for a bundled dataset name (:func:`scoredistill.data.load_split`)."""
    if name not in DATASETS:
        raise ConfigError("teacher.dataset", f"unknown value {name!r}; accepted: {', '.join(DATASETS)}")
    s = load_split(name, "teacher.dataset")
    return s.x_train, s.y_train, s.num_classes


def resolve_device(spec) -> torch.device:
    try:
        dev = torch.device(str(spec))
    except (RuntimeError, ValueError):
        raise ConfigError("train.device", f"unknown value {spec!r}; accepted: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", f"{spec!r} requested but CUDA is not available (torch "
                          f"{torch.__version__}); use train.device=cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError("train.device", f"unknown value {spec!r}; accepted: cpu, cuda, cuda:N")
    return dev


@torch.no_grad()
def write_sample_grid(model: UNetDenoiser, path: str, title: str, seed: int = 0) -> None:
    """A grid of 35-NFE Heun samples of ``model`` (row k: class k; fixed noise), on the model's device."""
    from scoredistill.sampling import teacher_sample
    from scoredistill.viz.images import grid_inches, image_grid_panels

    k = model.num_classes or 1
    cond = torch.arange(k).repeat_interleave(GRID_PER_CLASS) if model.num_classes else None
    was_training = model.training
    model.eval()
    x = teacher_sample(model, k * GRID_PER_CLASS, steps=18, cond=cond, generator=torch.Generator().manual_seed(seed))
    model.train(was_training)
    image_grid_panels([("EMA, 35-NFE Heun (row k: class k)", x)], path, title=title, max_images=len(x),
                      nrow=GRID_PER_CLASS, panel_inches=grid_inches(GRID_PER_CLASS, model.data_shape[-1]))


def resolve_image_recipe(user: dict, overrides=()) -> dict:
    return resolve_schema(IMAGE_TEACHER, user, overrides)[0]


def train_image_teacher(user: dict, out: str, overrides=(), log=print, recipe: str | None = None) -> dict:
    """Train and write the teacher folder ``out``; ``recipe`` (the YAML path, if any) is recorded with
    the overrides in ``config.json`` so the exact command can be rebuilt (``scripts/ship_teacher.py``)."""
    cfg = resolve_image_recipe(user, overrides)
    tcfg, net, tr = cfg["teacher"], cfg["network"], cfg["train"]
    device = resolve_device(tr["device"])
    if tr["threads"]:
        torch.set_num_threads(int(tr["threads"]))
    x_train, y_train, num_classes = load_dataset(tcfg["dataset"])
    process = make_process(tcfg["process"])
    sd = float(net["sigma_data"]) if net["sigma_data"] is not None else round(float(x_train.std()), 4)
    torch.manual_seed(tr["seed"])
    g = torch.Generator().manual_seed(tr["seed"])
    model = UNetDenoiser(process, tuple(x_train.shape[1:]), tuple(net["channels"]), num_classes, sd,
                         net["emb_dim"], net["dropout"])
    if device.type != "cpu":
        torch.backends.cudnn.benchmark = device.type == "cuda"
        model.to(device)
        x_train, y_train = x_train.to(device), y_train.to(device)
    ema = EMA(model, tr["ema"])
    opt = torch.optim.Adam(model.parameters(), lr=tr["lr"])
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, tr["steps"], eta_min=0.05 * tr["lr"])
             if tr["lr_schedule"] == "cosine" else None)
    sampler = LogNormal(tr["p_mean"], tr["p_std"])
    extra = {"dataset": tcfg["dataset"], "train": tr, "network": net,
             "recipe": recipe, "overrides": list(overrides or ()), "out": out,
             "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "torch": torch.__version__}
    t0 = time.time()
    n = x_train.shape[0]
    running = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
    for step in range(1, tr["steps"] + 1):
        idx = torch.randint(0, n, (tr["batch_size"],), generator=g).to(device)
        x0, cond = x_train[idx], drop_condition(y_train[idx], tr["cond_drop"], g)
        t = sampler(tr["batch_size"], process, generator=g, device=device)
        loss = denoising_loss(model, x0, cond, t, g, sd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tr["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"])
        opt.step()
        if sched is not None:
            sched.step()
        ema.update(model)
        running += loss.detach()
        if step % tr["log_every"] == 0 or step == tr["steps"]:
            k = tr["log_every"] if step % tr["log_every"] == 0 else step % tr["log_every"]
            log(f"train-teacher step {step}/{tr['steps']}: loss {float(running) / k:.4f} ({time.time() - t0:.0f} s)")
            running.zero_()
        if tr["snapshot_every"] and step % tr["snapshot_every"] == 0 and step < tr["steps"]:
            save_model(ema.model, os.path.join(f"{out}.snapshots", f"step_{step}"),
                       extra={**extra, "step": step, "wall_s": round(time.time() - t0, 1)})
        if tr["sample_every"] and (step % tr["sample_every"] == 0 or step == tr["steps"]):
            write_sample_grid(ema.model, os.path.join(f"{out}.samples", f"step_{step:06d}.png"),
                              f"{tcfg['dataset']} teacher, step {step}/{tr['steps']}", seed=tr["seed"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.time() - t0
    os.makedirs(out, exist_ok=True)
    save_model(ema.model, out, extra={**extra, "step": tr["steps"], "wall_s": round(wall, 1)})
    with open(os.path.join(out, "recipe.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return {"out": out, "steps": tr["steps"], "final_loss": float(loss.detach()), "wall_s": wall}
