"""Run configuration: YAML recipes + ``--set a.b=c`` overrides, validated against a schema.

Every problem is a :class:`ConfigError` naming the dotted field and what is accepted; the CLI turns
it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

import yaml
from omegaconf import OmegaConf

from scoredistill.errors import ConfigError, check_keys  # noqa: F401 (re-exported)

# The schema: every accepted key with its default. ``None`` means "not set / derived".
DEFAULTS: dict[str, Any] = {
    "teacher": {
        "kind": "gmm",            # gmm | learned | bundled
        "preset": None,           # ring8 | grid25 | pair | asym | gmm10d (kind: gmm)
        "means": None, "std": None, "stds": None, "weights": None, "classes": None,
        "dim": None,              # embed a 2-D preset in more dimensions (zero padding)
        "path": None,             # kind: learned -> folder written by `scoredistill train-teacher`
        "name": None,             # kind: bundled -> a teacher shipped in the package (digits, mnist)
        "process": {"kind": "edm"},
        "guidance_convention": "canonical",  # how guidance scales in this file are written
        # kind: diffusers (path = pipeline folder; docs/diffusers.md): prompts (list | .txt), negative_prompt,
        # null_class (class-conditional UNet2DModel), resolution (pixels), embedded_guidance (FLUX)
        "prompts": None, "negative_prompt": None, "null_class": None, "resolution": None,
        "embedded_guidance": None,
    },
    "generator": {
        "kind": "mlp",            # mlp (fresh) | teacher (copy of a learned teacher) | multi (MSD)
        "width": 256, "depth": 4,
        "sigma_init": 2.5,        # kind: teacher -> G(z) = D(sigma_init z, sigma_init)
        "students": 2,            # kind: multi -> number of students (MSD), classes split in blocks
        "z_std": 1.0,
        # diffusers teachers: native input timesteps ([999], [999, 749, 499, 249]), noise_input pure|scaled,
        # kind: lora -> LoRA student on a frozen copy; gradient checkpointing of the student network
        "timesteps": None, "noise_input": None,
        "lora_rank": None, "lora_alpha": None, "lora_targets": None, "gradient_checkpointing": None,
    },
    "fake_score": {
        "kind": "mlp",            # mlp (fresh) | teacher (copy of a learned teacher)
        "width": 256, "depth": 4,
        "sigma_data": None,       # EDM preconditioning scale; default: the teacher's data std
        # diffusers teachers: kind full (= teacher) copy | lora (peft LoRA on the frozen teacher module)
        "lora_rank": None, "lora_alpha": None, "lora_targets": None, "gradient_checkpointing": None,
    },
    "objective": {"name": "dmd2"},
    "train": {
        "steps": 1000,
        "batch_size": 256,                # the global batch the objective sees (any number of processes)
        "global_batch": None,             # alias of batch_size (the name used in docs/distributed.md)
        "micro_batch": None,              # samples per forward pass and process; default batch_size / processes
        "seed": 0,
        "lr": 1e-4, "fake_lr": None, "disc_lr": None,
        "lr_schedule": "constant",        # constant | cosine | linear: decay of every role's lr over train.steps
        "warmup_steps": 0,                # linear warm-up from lr / warmup_steps (iterations)
        "lr_min_ratio": 0.0,              # cosine / linear end at lr * lr_min_ratio
        "betas": [0.0, 0.99], "fake_betas": None, "disc_betas": None,
        "weight_decay": 0.0,
        "optimizer": "adam",              # adam (L2 decay) | adamw (decoupled decay) | radam; engine/optim.py
        "fake_optimizer": None, "disc_optimizer": None,  # null: as optimizer (disc: as fake_optimizer)
        "generator_every": 1,             # generator updated when iteration % generator_every == 0
        "fake_on_generator_steps": True,  # DMD2: fake also updated on generator iterations (5:1)
        "grad_clip": 10.0,
        "ema": 0.99,
        "nan_guard_max": 20,              # abort after this many consecutive non-finite steps
        "checkpoint_every": 500,
        "keep_checkpoints": 2,
        "log_every": 25,
        "device": "cpu",
        "precision": "fp32",              # fp32 | bf16 (autocast for network passes; loss math in fp32/fp64)
        "teacher_offload": False,         # keep teacher weights in CPU memory, stream them per forward (accelerate)
        "deterministic": False,           # deterministic GPU kernels (bit-exact resume on CUDA; slower)
        "compile": False,                 # torch.compile the generator (opt-in; ~10 % on CPU after a long compile)
        # FSDP2-shard generator, fake score, discriminator and EMA over the processes (no-op on one process;
        # also on when ACCELERATE_USE_FSDP=true, set by `accelerate launch` with an FSDP config); docs/distributed.md
        "fsdp": False,
        "threads": None,
        "progress": True,
        "real_data": "teacher",           # teacher (draw from the teacher's sampler) | none | PATH.npy
        "real_pool": 20000,               # how many real samples to draw from the teacher
        "ode_pairs": 2000,                # (noise, teacher ODE output) pairs for regression losses
        "ode_steps": 18,
    },
    "eval": {
        "every": 250,
        "n_samples": 2000,
        "plots": True,
        "teacher_steps": 18,              # Heun steps for the teacher baseline (2*18-1 = 35 NFE)
        "fid_weights": None,              # local Inception file -> also report real FID (image teachers)
    },
}

SECTIONS = tuple(DEFAULTS)
LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw", "radam")


def _merge(base: dict, new: dict, path: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        field = f"{path}.{k}" if path else k
        if path == "" and k not in DEFAULTS:
            raise ConfigError(k, f"unknown section; accepted: {', '.join(SECTIONS)}")
        if path == "objective" or path.startswith("objective."):
            out[k] = copy.deepcopy(v)  # objective params are validated by the objective itself
            continue
        if path and k not in base:
            raise ConfigError(field, f"unknown key; accepted: {', '.join(sorted(base))}")
        if isinstance(base.get(k), dict) and k != "process":
            if not isinstance(v, dict):
                raise ConfigError(field, "must be a mapping")
            out[k] = _merge(base[k], v, field)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _parse_value(text: str) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception:
        return text


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML scalars/lists)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] not in DEFAULTS:
            raise ConfigError(key, f"unknown section; accepted: {', '.join(SECTIONS)}")
        node, schema = cfg, DEFAULTS
        for i, p in enumerate(parts[:-1]):
            if parts[0] != "objective" and isinstance(schema, dict) and p not in schema:
                raise ConfigError(".".join(parts[: i + 1]), "unknown key")
            node = node.setdefault(p, {})
            schema = schema.get(p, {}) if isinstance(schema, dict) else {}
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is not a mapping")
        last = parts[-1]
        if parts[0] != "objective" and isinstance(schema, dict) and schema and last not in schema \
                and parts[-2:-1] != ["process"]:
            raise ConfigError(key, f"unknown key; accepted: {', '.join(sorted(schema))}")
        node[last] = _parse_value(text)
    return cfg


def load_yaml(path: str | os.PathLike) -> dict:
    if not os.path.exists(path):
        raise ConfigError("config", f"file not found: {path}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError("config", f"{path} is not valid YAML{where}") from None
    except Exception as e:  # omegaconf interpolation / structure errors
        raise ConfigError("config", f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of sections")
    return data


def resolve(user: dict, overrides: Iterable[str] = ()) -> dict:
    """Merge a user config over :data:`DEFAULTS`, apply overrides and validate generic fields."""
    cfg = _merge(DEFAULTS, user, "")
    cfg = apply_overrides(cfg, overrides)
    cfg = _merge(DEFAULTS, cfg, "")  # re-validate keys that came from overrides
    gb = cfg["train"].pop("global_batch", None)
    if gb is not None:
        if not isinstance(gb, int) or isinstance(gb, bool) or gb < 1:
            raise ConfigError("train.global_batch", f"must be an integer >= 1, got {gb!r}")
        ut = user.get("train") or {}
        if "global_batch" in ut and "batch_size" in ut and ut["batch_size"] != gb:  # both in one file
            raise ConfigError("train.global_batch", f"conflicts with train.batch_size ({ut['batch_size']}); "
                              "set one of them (they name the same global batch)")
        cfg["train"]["batch_size"] = gb
    cfg["train"]["global_batch"] = None
    validate_common(cfg)
    return cfg


def _positive_int(cfg, section, key, minimum=1):
    v = cfg[section][key]
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{section}.{key}", f"must be an integer >= {minimum}, got {v!r}")


def _number(cfg, section, key, lo=None, allow_none=False):
    v = cfg[section][key]
    if v is None and allow_none:
        return
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ConfigError(f"{section}.{key}", f"must be a number, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(f"{section}.{key}", f"must be >= {lo}, got {v!r}")


def check_optimizers(train: dict, keys) -> None:
    """``train.optimizer`` is one of OPTIMIZERS; the per-role keys after it may also be null."""
    for i, k in enumerate(keys):
        if not (train[k] in OPTIMIZERS or (i and train[k] is None)):
            raise ConfigError(f"train.{k}", f"unknown value {train[k]!r}; accepted: {', '.join(OPTIMIZERS)}"
                              + (", null" if i else ""))


def validate_common(cfg: dict) -> None:
    t = cfg["train"]
    for k in ("steps", "batch_size", "generator_every", "checkpoint_every", "keep_checkpoints",
              "log_every", "nan_guard_max", "real_pool", "ode_pairs", "ode_steps"):
        _positive_int(cfg, "train", k)
    _positive_int(cfg, "train", "seed", minimum=0)
    _positive_int(cfg, "train", "warmup_steps", minimum=0)
    if t["lr_schedule"] not in LR_SCHEDULES:
        raise ConfigError("train.lr_schedule",
                          f"unknown value {t['lr_schedule']!r}; accepted: {', '.join(LR_SCHEDULES)}")
    check_optimizers(t, ("optimizer", "fake_optimizer", "disc_optimizer"))
    _number(cfg, "train", "lr_min_ratio", lo=0)
    if t["lr_min_ratio"] > 1:
        raise ConfigError("train.lr_min_ratio", f"must be in [0, 1], got {t['lr_min_ratio']!r}")
    if not isinstance(t["deterministic"], bool):
        raise ConfigError("train.deterministic", f"must be true or false, got {t['deterministic']!r}")
    if not isinstance(t["teacher_offload"], bool):
        raise ConfigError("train.teacher_offload", f"must be true or false, got {t['teacher_offload']!r}")
    for k in ("lr",):
        _number(cfg, "train", k, lo=0)
    for k in ("fake_lr", "disc_lr"):
        _number(cfg, "train", k, lo=0, allow_none=True)
    _number(cfg, "train", "grad_clip", lo=0, allow_none=True)
    _number(cfg, "train", "ema", lo=0)
    if t["ema"] >= 1:
        raise ConfigError("train.ema", f"must be in [0, 1), got {t['ema']!r}")
    for k in ("betas", "fake_betas", "disc_betas"):
        b = t[k]
        if b is None and k != "betas":
            continue
        if (not isinstance(b, (list, tuple)) or len(b) != 2
                or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b)):
            raise ConfigError(f"train.{k}", f"must be two numbers in [0, 1), got {b!r}")
    if not isinstance(t["fsdp"], bool):
        raise ConfigError("train.fsdp", f"must be true or false, got {t['fsdp']!r}")
    _positive_int(cfg, "eval", "every")
    _positive_int(cfg, "eval", "n_samples", minimum=16)
    _positive_int(cfg, "eval", "teacher_steps")
    for sec in ("generator", "fake_score"):
        _positive_int(cfg, sec, "width")
        _positive_int(cfg, sec, "depth")
    if cfg["generator"]["kind"] not in ("mlp", "teacher", "multi", "lora"):
        raise ConfigError("generator.kind",
                          f"unknown value {cfg['generator']['kind']!r}; accepted: mlp, teacher, multi, lora")
    _positive_int(cfg, "generator", "students")
    if cfg["fake_score"]["kind"] not in ("mlp", "teacher", "full", "lora"):
        raise ConfigError("fake_score.kind",
                          f"unknown value {cfg['fake_score']['kind']!r}; accepted: mlp, teacher (= full), lora")
    _number(cfg, "generator", "sigma_init", lo=0)
    if not isinstance(cfg["objective"], dict) or "name" not in cfg["objective"]:
        raise ConfigError("objective.name", "missing")
    if t["device"] not in ("cpu", "cuda") and not str(t["device"]).startswith("cuda:"):
        raise ConfigError("train.device", f"unknown value {t['device']!r}; accepted: cpu, cuda, cuda:N")


def dump(cfg: dict, path: str | os.PathLike) -> None:
    from scoredistill.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
