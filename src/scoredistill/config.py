"""Run configuration: YAML recipes + ``--set a.b=c`` overrides, validated against one schema.

Every section of every command (``distill``, ``optimize``, ``train-teacher``) is a dataclass whose
fields are its accepted keys, each declared once with :func:`key`: default, type (the annotation),
accepted range or choices, whether ``--resume`` may change it, and a one-line doc string
(docs/recipes.md is generated from them by ``scripts/gen_recipes_doc.py``). :func:`parse` turns a
section into its typed object or raises :class:`ConfigError` naming the dotted field and the
accepted values; the CLI turns that into one line on stderr and exit code 2. Numbers must be finite
(NaN and inf are refused everywhere a number is expected).

:func:`resolve` returns the merged config as a nested plain dict (what the engine reads and what
``RUN_DIR/config.yaml`` records), after every section has been validated.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml
from omegaconf import OmegaConf

from scoredistill.errors import ConfigError, check_keys  # noqa: F401 (re-exported)

INT64_MAX = 2**63 - 1
# sizes past these are typos, not experiments (a 2^24 batch of 2-D points is 128 MB per tensor)
MAX_SIZE = 2**24
MAX_WIDTH = 2**16
MAX_DEPTH = 2**10
# a mixture coordinate or std past MAX_SCALE, or a learning rate past MAX_LR, is a typo: both were accepted up to
# the float limit, and 1e300 ended in non-finite float32 losses (exit 3) or an optimizer overflow traceback; an
# Adam step moves every weight by about lr, so an lr near MAX_LR already diverges on the first step
MAX_SCALE = 1e6
MAX_LR = 1e6


# -- the schema mechanism ------------------------------------------------------------------------------
def key(default, doc: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, choices=None,
        length: int | None = None, check: Callable[[Any, str], None] | None = None, accepts: str | None = None,
        resume: bool = False, kinds: tuple[str, ...] | None = None, unit: str | None = None):
    """Declare one accepted key of a section (a dataclass field).

    ``lo``/``hi`` bound numbers (and the numbers of a list), ``choices`` enumerates strings, ``length``
    fixes a list's length; ``check(value, field)`` replaces the type check for values no annotation
    describes (then ``accepts`` says in words what it accepts). ``resume``: ``--resume --set`` may
    change the key. ``kinds``: the teacher kinds that read the key (None: every kind). ``unit``:
    ``"steps"`` marks a count of iterations (a benchmark that rescales a budget rescales it too)."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices,
            "length": length, "check": check, "accepts": accepts, "resume": resume, "kinds": kinds, "unit": unit}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Key:
    """One accepted key as the validator and the documentation see it."""

    name: str
    type: Any
    default: Any
    doc: str
    lo: Any = None
    hi: Any = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    length: int | None = None
    check: Callable | None = None
    accepts: str | None = None
    resume: bool = False
    kinds: tuple[str, ...] | None = None
    unit: str | None = None

    @property
    def nullable(self) -> bool:
        return type(None) in typing.get_args(self.type)

    @property
    def base(self):
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        if self.nullable:
            return args[0] if len(args) == 1 else typing.Union[tuple(args)]
        return self.type


class Section:
    """Base of a config section. Subclasses are dataclasses; ``validate`` holds the rules that tie
    several keys together. ``OPEN``: keys beyond the declared ones are accepted here and checked by
    the section's builder (the objective's own Params)."""

    OPEN: ClassVar[bool] = False
    DOC: ClassVar[str] = ""

    def validate(self, path: str) -> None:
        pass


@functools.cache
def keys(cls: type) -> dict[str, Key]:
    """The accepted keys of a section class: its own in declaration order, then those it inherits
    (a shared block such as :class:`AdapterKeys` reads last, as it would written out). A field
    redeclared with a plain default keeps the declaration it inherits (a new default only); one
    declared nowhere with :func:`key` is checked by its annotation alone."""
    hints = typing.get_type_hints(cls)
    order = list(dict.fromkeys(n for c in cls.__mro__ for n in vars(c).get("__annotations__", {})))
    inherited = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            inherited.update({f.name: f.metadata for f in dataclasses.fields(base) if f.metadata})
    out = {}
    for f in sorted(dataclasses.fields(cls), key=lambda f: order.index(f.name)):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meta = f.metadata or inherited.get(f.name, {})
        out[f.name] = Key(f.name, hints[f.name], default, **{"doc": "", **meta})
    return out


def defaults(cls: type) -> dict:
    """The section's defaults as a plain dict (fresh copies)."""
    return {k.name: copy.deepcopy(k.default) for k in keys(cls).values()}


def _fmt(x) -> str:
    if x == INT64_MAX:
        return "2^63-1"
    if isinstance(x, int) and x >= 1024 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(k: Key) -> str:
    if k.lo is not None and k.hi is not None:
        return f" in {'(' if k.lo_open else '['}{_fmt(k.lo)}, {_fmt(k.hi)}{')' if k.hi_open else ']'}"
    if k.lo is not None:
        return f" {'>' if k.lo_open else '>='} {_fmt(k.lo)}"
    if k.hi is not None:
        return f" {'<' if k.hi_open else '<='} {_fmt(k.hi)}"
    return ""


def accepted(k: Key) -> str:
    """What ``k`` accepts, in words (error messages and docs/recipes.md)."""
    base = k.base
    if k.accepts:
        text = k.accepts
    elif k.choices is not None:
        text = "one of " + ", ".join(map(str, k.choices))
    elif base is bool:
        text = "true or false"
    elif base is int:
        text = "an integer" + _range_text(k)
    elif base is float:
        text = "a finite number" + _range_text(k)
    elif base is str:
        text = "a string"
    elif typing.get_origin(base) is list:
        (elem,) = typing.get_args(base)
        what = {int: "integers", float: "numbers", str: "strings"}.get(elem, "values")
        n = f"{k.length} " if k.length else ""
        text = f"a list of {n}{what}" + (_range_text(k) if elem in (int, float) else "")
    elif base is dict:
        text = "a mapping"
    else:
        text = "any value"
    return text + (" or null" if k.nullable and "null" not in text else "")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float (never a bool, NaN or inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _in_range(v, k: Key) -> bool:
    if k.lo is not None and (v <= k.lo if k.lo_open else v < k.lo):
        return False
    return not (k.hi is not None and (v >= k.hi if k.hi_open else v > k.hi))


def _typed_ok(v, tp, k: Key) -> bool:
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return is_int(v) and _in_range(v, k)
    if tp is float:
        return is_number(v) and _in_range(v, k)
    if tp is str:
        return isinstance(v, str)
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        return (isinstance(v, (list, tuple)) and len(v) > 0 and (k.length is None or len(v) == k.length)
                and all(_typed_ok(x, elem, k) for x in v))
    if tp is dict:
        return isinstance(v, dict)
    return True


def check_value(v, k: Key, field_name: str) -> None:
    """Raise :class:`ConfigError` unless ``v`` is an accepted value of ``k``."""
    if v is None:
        if k.nullable:
            return
        raise ConfigError(field_name, f"must be {accepted(k)}, got null")
    if k.check is not None:
        k.check(v, field_name)
        return
    if k.choices is not None:
        if isinstance(v, bool) or not isinstance(v, typing.Hashable) or v not in k.choices:
            raise ConfigError(field_name, f"unknown value {v!r}; accepted: {', '.join(map(str, k.choices))}")
        return
    if not _typed_ok(v, k.base, k):
        raise ConfigError(field_name, f"must be {accepted(k)}, got {v!r}")


def parse(cls: type, data: dict | None, path: str, only: Iterable[str] | None = None):
    """Validate the mapping ``data`` against the section ``cls`` and return the typed section.

    Missing keys take their defaults. ``only`` narrows the accepted keys (a command that reads a
    subset of a shared section)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(path, f"must be a mapping, got {data!r}")
    ks = keys(cls)
    names = list(ks) if only is None else [n for n in ks if n in set(only)]
    if not cls.OPEN:
        for name in data:
            if name not in names:
                raise ConfigError(f"{path}.{name}", f"unknown key; accepted: {', '.join(sorted(names))}")
    values = {}
    for name, k in ks.items():
        v = data[name] if name in data else copy.deepcopy(k.default)
        if name in names:
            check_value(v, k, f"{path}.{name}")
        values[name] = v
    obj = cls(**values)
    obj.validate(path)
    return obj


# -- reusable key declarations (same meaning in several sections) -----------------------------------------
def device_check(v, f):
    if not isinstance(v, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", v):
        raise ConfigError(f, f"unknown value {v!r}; accepted: cpu, cuda, cuda:N")


DEVICE_TEXT = "cpu, cuda or cuda:N"
OPTIMIZERS = ("adam", "adamw", "radam")


def steps_key(default, doc="iterations to train", resume=True):
    return key(default, doc, lo=1, hi=INT64_MAX, resume=resume)


def seed_key():
    return key(0, "seed of every random draw", lo=0, hi=INT64_MAX)


def device_key(resume=True):
    return key("cpu", "where networks and batches live", check=device_check, accepts=DEVICE_TEXT, resume=resume)


def threads_key(resume=True):
    return key(None, "torch intra-op threads (null: torch's default)", lo=1, hi=4096, resume=resume)


def every_key(default, doc, resume=True):
    return key(default, doc, lo=1, hi=INT64_MAX, resume=resume)


def width_key(default=256):
    return key(default, "hidden width of the MLP", lo=1, hi=MAX_WIDTH)


def depth_key(default=4):
    return key(default, "residual blocks (blocks: plain, hidden layers) of the MLP", lo=1, hi=MAX_DEPTH)


def blocks_key():
    return key("residual", "kind mlp: residual (LayerNorm blocks with a time projection each) | plain (SiLU layers, "
               "the embedding added at the input; about 40 % of the compute)", choices=("residual", "plain"))


def betas_key(default, doc):
    return key(default, doc, lo=0, hi=1, hi_open=True, length=2)


def optimizer_key(default, doc):
    return key(default, doc, choices=OPTIMIZERS)


def process_check(v, f):
    from scoredistill.process.processes import make_process

    if not isinstance(v, dict):
        raise ConfigError(f, f"must be a mapping {{kind: vp|vp_continuous|edm|flow, ...}}, got {v!r}")
    make_process(v)


def number_list_check(positive: bool, ints: bool = False, hi: float | None = None):
    def check(v, f):
        ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(
            (is_int(x) if ints else is_number(x)) and (x > 0 if positive else x >= 0) and (hi is None or x <= hi)
            for x in v)
        if not ok:
            what = "integers" if ints else "numbers"
            rng = f" in {'(0' if positive else '[0'}, {hi:g}]" if hi is not None else (" > 0" if positive else " >= 0")
            raise ConfigError(f, f"must be a non-empty list of {what}{rng}, got {v!r}")
    return check


def means_check(v, f):
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(m, (list, tuple)) and m for m in v):
        raise ConfigError(f, "must be a non-empty list of vectors")
    lens = {len(m) for m in v}
    if len(lens) != 1:
        raise ConfigError(f, f"vectors must have equal length, got lengths {sorted(lens)}")
    if not all(is_number(x) for m in v for x in m):
        raise ConfigError(f, "must contain finite numbers only")
    big = [x for m in v for x in m if abs(x) > MAX_SCALE]
    if big:
        raise ConfigError(f, f"coordinates must lie in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got {big[0]!r}")


def real_data_check(v, f):
    if not isinstance(v, str) or not (v in ("teacher", "none") or v.endswith(".npy")):
        raise ConfigError(f, f"unknown value {v!r}; accepted: teacher, none, PATH.npy")


def timesteps_check(v, f):
    vals = v if isinstance(v, (list, tuple)) else [v]
    if not vals or not all(is_number(x) for x in vals):
        raise ConfigError(f, f"must be a number or a list of numbers, got {v!r}")


def weights_check(v, f):
    if not isinstance(v, (list, tuple)) or not v or not all(is_number(x) and x >= 0 for x in v):
        raise ConfigError(f, f"must be a list of non-negative numbers, got {v!r}")


def strings_check(v, f):
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise ConfigError(f, f"must be a list of strings, got {v!r}")


def prompts_check(v, f):
    if not (isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v))):
        raise ConfigError(f, "must be a list of strings or the path of a .txt file")


def resolution_check(v, f):
    ok = (is_int(v) and 0 < v <= MAX_WIDTH) or (
        isinstance(v, (list, tuple)) and len(v) == 2 and all(is_int(x) and 0 < x <= MAX_WIDTH for x in v))
    if not ok:
        raise ConfigError(f, f"must be a positive integer or [height, width], got {v!r}")


# -- distill ---------------------------------------------------------------------------------------------
TEACHER_KINDS = ("gmm", "learned", "bundled", "diffusers", "scene")
GMM, LEARNED, BUNDLED, DIFFUSERS, SCENE = ("gmm",), ("learned",), ("bundled",), ("diffusers",), ("scene",)


def scenes_check(v, f):
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
        raise ConfigError(f, "must be a non-empty list of preset scene names (snowman, table, dumbbell, twotone) or "
                          f"3DGS .ply paths, got {v!r}")


def rgb_check(v, f):
    if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(is_number(x) and 0 <= x <= 1 for x in v):
        raise ConfigError(f, f"must be an RGB triple of numbers in [0, 1], got {v!r}")


@dataclass
class TeacherConfig(Section):
    DOC: ClassVar[str] = ("The frozen teacher. Each `kind` reads its own keys; a key another kind reads is an "
                          "error (column *kinds*).")
    kind: str = key("gmm", "gmm (exact mixture) | learned (train-teacher folder) | bundled (shipped) | "
                    "diffusers (pipeline folder, docs/diffusers.md) | scene (exact-render 3D teacher, docs/3d.md)",
                    choices=TEACHER_KINDS)
    preset: str | None = key(None, "named mixture: ring8, ring8_cond, grid25, pair, asym, asym6, gmm10d, gmm16d",
                             kinds=GMM)
    means: list | None = key(None, "component means (K vectors of one length)", check=means_check,
                             accepts="a list of equal-length vectors of numbers in [-1e+06, 1e+06]", kinds=GMM)
    std: float | None = key(None, "one standard deviation for every component (scene: per pixel on the [-1, 1] "
                            "scale, default 0.03)", lo=0, lo_open=True, hi=MAX_SCALE, kinds=GMM + SCENE)
    stds: list[float] | None = key(None, "one standard deviation per component",
                                   check=number_list_check(True, hi=MAX_SCALE),
                                   accepts="a list of numbers in (0, 1e+06]", kinds=GMM)
    weights: list[float] | None = key(None, "mixture weights (normalised; default: equal); scene: one per scene",
                                      check=number_list_check(True), accepts="a list of numbers > 0",
                                      kinds=GMM + SCENE)
    classes: list[int] | None = key(None, "class label of each component (class-conditional teacher)",
                                    check=number_list_check(False, ints=True), accepts="a list of integers >= 0",
                                    kinds=GMM)
    dim: int | None = key(None, "embed the mixture in more dimensions (zero padding)", lo=1, hi=MAX_SIZE, kinds=GMM)
    path: str | None = key(None, "learned: folder of `scoredistill train-teacher`; diffusers: pipeline folder",
                           kinds=("learned", "diffusers"))
    name: str | None = key(None, "bundled teacher: digits | mnist", kinds=BUNDLED)
    process: dict = key({"kind": "edm"}, "forward process {kind: vp | vp_continuous | edm | flow, ...} "
                        "(docs/processes.md; diffusers: read from the scheduler)", check=process_check,
                        accepts="a process mapping (below)")
    guidance_convention: str = key("canonical", "how guidance scales in this file are written: canonical "
                                   "(uncond + w (cond - uncond)) | cond_plus (cond + s (cond - uncond), w = 1 + s)",
                                   choices=("canonical", "cond_plus"))
    prompts: list[str] | str | None = key(None, "text prompts (list, or a .txt file with one a line)",
                                          check=prompts_check, accepts="a list of strings or PATH.txt",
                                          kinds=DIFFUSERS)
    negative_prompt: str | None = key(None, "negative prompt of the unconditional branch", kinds=DIFFUSERS)
    null_class: int | None = key(None, "class-conditional UNet2DModel: the class id used as unconditional",
                                 lo=0, hi=INT64_MAX, kinds=DIFFUSERS)
    resolution: int | list[int] | None = key(None, "pixels (int or [height, width]; default: the pipeline's; "
                                             "scene: 64)", check=resolution_check,
                                             accepts="an integer or [height, width]", kinds=DIFFUSERS + SCENE)
    embedded_guidance: float | None = key(None, "FLUX guidance-embedding value (default 3.5)", lo=0, kinds=DIFFUSERS)
    scenes: list[str] | str | None = key(None, "scene: preset names (snowman, table, dumbbell, twotone) or 3DGS "
                                         ".ply paths; the views of the teacher are their renders", check=scenes_check,
                                         accepts="a list of preset names or .ply paths", kinds=SCENE)
    background: list[float] | None = key(None, "scene: RGB in [0, 1] behind every scene (default grey 0.5)",
                                         check=rgb_check, accepts="an RGB triple in [0, 1]", kinds=SCENE)
    janus: float | None = key(None, "scene: share of each view that shows the scene's front face instead (a "
                              "view-inconsistent Janus prior; default 0)", lo=0, hi=1, hi_open=True, kinds=SCENE)
    janus_labels: bool | None = key(None, "scene, janus > 0: the teacher reads the view label (side / back views "
                                    "keep only the true view; default false)", kinds=SCENE)

    def validate(self, path):
        for k in keys(type(self)).values():
            if k.kinds is not None and getattr(self, k.name) is not None and self.kind not in k.kinds:
                ok = sorted(n for n, j in keys(type(self)).items() if j.kinds is None or self.kind in j.kinds)
                raise ConfigError(f"{path}.{k.name}", f"unknown key for {path}.kind {self.kind}; accepted: "
                                  f"{', '.join(ok)}")
        if self.kind == "gmm" and self.std is not None and self.stds is not None:
            raise ConfigError(f"{path}.std", "give either std (one value) or stds (one per mean), not both")

    def require(self, path: str = "teacher") -> None:
        """The values a builder needs for this kind (a config may leave them out until it builds a
        teacher: ``resolve({})`` is the default config)."""
        if self.kind == "gmm" and self.preset is None:
            if self.means is None:
                raise ConfigError(f"{path}.means", "missing; give teacher.preset or teacher.means")
            if self.std is None and self.stds is None:
                raise ConfigError(f"{path}.std", "missing; give teacher.std or teacher.stds")
        need = {"learned": ("path", "the folder written by `scoredistill train-teacher`"),
                "scene": ("scenes", "preset scene names (snowman, table, dumbbell, twotone) or 3DGS .ply paths"),
                "bundled": ("name", "a bundled teacher name (digits, mnist)"),
                "diffusers": ("path", "a diffusers pipeline folder (save_pretrained)")}.get(self.kind)
        if need is not None and not getattr(self, need[0]):
            raise ConfigError(f"{path}.{need[0]}", f"missing; give {need[1]}")


@dataclass
class AdapterKeys(Section):
    """The keys of a trained network role beyond its kind: a LoRA adapter and activation checkpointing."""

    lora_rank: int | None = key(None, "LoRA rank (kind: lora)", lo=1, hi=MAX_WIDTH)
    lora_alpha: float | None = key(None, "LoRA alpha (default: the rank)", lo=0, lo_open=True)
    lora_targets: list[str] | None = key(None, "module names LoRA attaches to (default: attention and "
                                         "feed-forward projections)", check=strings_check,
                                         accepts="a list of module names")
    gradient_checkpointing: bool | None = key(None, "recompute residual blocks in the backward pass (less "
                                              "memory, same gradients)")


@dataclass
class GeneratorConfig(AdapterKeys):
    DOC: ClassVar[str] = "The one-step (or few-step) student."
    kind: str = key("mlp", "mlp (fresh) | teacher (copy of a learned or diffusers teacher) | multi (MSD) | "
                    "lora (LoRA on a frozen diffusers copy)", choices=("mlp", "teacher", "multi", "lora"))
    width: int = width_key()
    depth: int = depth_key()
    blocks: str = blocks_key()
    sigma_init: float = key(2.5, "kind teacher: G(z) = D(sigma_init z, sigma_init)", lo=0)
    students: int = key(2, "kind multi: number of students (classes split in blocks)", lo=1, hi=MAX_WIDTH)
    z_std: float = key(1.0, "standard deviation of the generator's input noise", lo=0, lo_open=True)
    steps: int | None = key(None, "native generators: a K-step student with K evenly spaced canonical times "
                            "(docs/fewstep.md); null: one step, or as many as timesteps", lo=1, hi=1000)
    timesteps: list[float] | float | None = key(None, "K-step student's input times: canonical t in (0, 1] for "
                                                "native generators, native timesteps for diffusers ([999]; "
                                                "[999, 749, 499, 249])", check=timesteps_check,
                                                accepts="a number or a list of numbers")
    rollout: str = key("fresh", "re-noising between the steps of a K-step student: fresh (new noise, DMD2) | "
                       "fixed (the input noise, SiD2) | ddim (the student's own eps, TDM)",
                       choices=("fresh", "fixed", "ddim"))
    step_weights: list[float] | None = key(None, "K-step student: probabilities of training each step "
                                           "(null: uniform)", check=weights_check,
                                           accepts="a list of K non-negative numbers")
    noise_input: str | None = key(None, "diffusers: pure (z itself) | scaled (sigma_max z)",
                                  choices=("pure", "scaled"))
    experts: str | None = key(None, "K-step student: per_step (one step network per step) | per_phase "
                              "(one per phase of the objective, e.g. phased_dmd); null: one shared network, or "
                              "per_phase when the objective trains experts; diffusers: a full copy per expert "
                              "(kind teacher) or one LoRA adapter per expert on one base (kind lora)",
                              choices=("per_step", "per_phase"))
    init_steps: int = key(0, "iterations of teacher score matching that first train a time-conditioned student's "
                          "denoiser (generator.steps set) toward the teacher's, before distillation (MSD's small-"
                          "student initialisation; docs/objectives/msd.md); 0: none", lo=0, hi=INT64_MAX)


@dataclass
class FakeScoreConfig(AdapterKeys):
    DOC: ClassVar[str] = "The learned score of the generator's samples (objectives that need one)."
    kind: str = key("mlp", "mlp (fresh) | teacher = full (copy of the teacher) | lora (diffusers: LoRA on the "
                    "frozen teacher)", choices=("mlp", "teacher", "full", "lora"))
    width: int = width_key()
    depth: int = depth_key()
    blocks: str = blocks_key()
    time_embedding: str = key("mlp", "kind mlp: mlp (Fourier time features through a 2-layer SiLU MLP) | fourier "
                              "(the features alone; ~5 % less compute per call on the toys)",
                              choices=("mlp", "fourier"))
    sigma_data: float | None = key(None, "EDM preconditioning scale (default: the teacher's data std)",
                                   lo=0, lo_open=True)
    experts: str | None = key(None, "per_phase: one fake network per phase of a student with experts "
                              "(generator.experts), split at the same times; null: one network",
                              choices=("per_phase",))


@dataclass
class ObjectiveConfig(Section):
    OPEN: ClassVar[bool] = True
    DOC: ClassVar[str] = ("The method and its parameters; every other key is a field of the objective's Params "
                          "(listed per objective below), checked when the objective is built.")
    name: str = key("dmd2", "registered objective name")


LR_SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig(Section):
    DOC: ClassVar[str] = "Optimization, cadences and the run's resources."
    steps: int = steps_key(1000, "iterations (resume: may grow, never below the steps done)")
    batch_size: int = key(256, "the global batch the objective sees (any number of processes)", lo=1, hi=MAX_SIZE)
    global_batch: int | None = key(None, "alias of batch_size (the name in docs/distributed.md)", lo=1, hi=MAX_SIZE)
    micro_batch: int | None = key(None, "samples per forward pass and process (default batch_size / processes); "
                                  "batch_size must be a multiple", lo=1, hi=MAX_SIZE)
    seed: int = seed_key()
    lr: float = key(1e-4, "generator learning rate", lo=0, hi=MAX_LR)
    fake_lr: float | None = key(None, "fake-score learning rate (default: lr)", lo=0, hi=MAX_LR)
    disc_lr: float | None = key(None, "discriminator learning rate (default: fake_lr)", lo=0, hi=MAX_LR)
    lr_schedule: str = key("constant", "decay of every role's lr over train.steps", choices=LR_SCHEDULES)
    warmup_steps: int = key(0, "linear warm-up from lr / warmup_steps (iterations)", lo=0, hi=INT64_MAX)
    lr_min_ratio: float = key(0.0, "cosine / linear end at lr * lr_min_ratio", lo=0, hi=1)
    betas: list[float] = betas_key([0.0, 0.99], "Adam betas of the generator")
    fake_betas: list[float] | None = betas_key(None, "Adam betas of the fake score (default: betas)")
    disc_betas: list[float] | None = betas_key(None, "Adam betas of the discriminator (default: fake_betas)")
    weight_decay: float = key(0.0, "weight decay (L2 for adam, decoupled for adamw)", lo=0)
    optimizer: str = optimizer_key("adam", "generator optimizer")
    fake_optimizer: str | None = optimizer_key(None, "fake-score optimizer (default: optimizer)")
    disc_optimizer: str | None = optimizer_key(None, "discriminator optimizer (default: fake_optimizer)")
    generator_every: int = key(1, "generator updated when iteration % generator_every == 0", lo=1, hi=INT64_MAX)
    fake_on_generator_steps: bool = key(True, "DMD2: fake score also updated on generator iterations")
    grad_clip: float | None = key(10.0, "gradient-norm clip of every role (null: off)", lo=0)
    ema: float = key(0.99, "EMA decay of the generator (0: off)", lo=0, hi=1, hi_open=True)
    nan_guard_max: int = key(20, "abort after this many consecutive non-finite steps", lo=1, hi=INT64_MAX)
    checkpoint_every: int = every_key(500, "iterations between checkpoints")
    keep_checkpoints: int = every_key(2, "newest checkpoints kept")
    log_every: int = every_key(25, "iterations between progress lines")
    device: str = device_key()
    precision: str = key("fp32", "fp32 | bf16 (autocast for network passes; loss math in fp32/fp64)",
                         choices=PRECISIONS)
    teacher_offload: bool = key(False, "keep teacher weights in CPU memory, stream them per forward", resume=True)
    deterministic: bool = key(False, "deterministic GPU kernels (bit-exact resume on CUDA; slower)", resume=True)
    compile: bool = key(False, "torch.compile the generator", resume=True)
    fsdp: bool = key(False, "FSDP2-shard the trained roles over the processes (docs/distributed.md)",
                     resume=True)
    threads: int | None = threads_key()
    progress: bool = key(True, "progress bar on stderr", resume=True)
    real_data: str | None = key("teacher", "teacher (teacher's sampler) | none | PATH.npy", check=real_data_check,
                                accepts="teacher, none or PATH.npy")
    real_pool: int = key(20000, "real samples drawn from the teacher", lo=1, hi=MAX_SIZE)
    ode_pairs: int = key(2000, "(noise, teacher ODE output) pairs for regression losses", lo=1, hi=MAX_SIZE)
    ode_steps: int = key(18, "Heun levels of those teacher ODE solves", lo=1, hi=10000)

    def validate(self, path):
        if self.micro_batch is not None and self.batch_size % self.micro_batch:
            raise ConfigError(f"{path}.micro_batch", f"{path}.batch_size ({self.batch_size}) must be a multiple "
                              f"of micro_batch ({self.micro_batch})")


@dataclass
class EvalConfig(Section):
    DOC: ClassVar[str] = "Evaluation cadence and size (all resumable)."
    every: int = every_key(250, "iterations between evaluations")
    n_samples: int = key(2000, "samples per evaluation", lo=16, hi=MAX_SIZE, resume=True)
    plots: bool = key(True, "write sample plots", resume=True)
    teacher_steps: int = key(18, "Heun steps of the teacher baseline (2*18-1 = 35 NFE)", lo=1, hi=10000,
                             resume=True)
    fid_weights: str | None = key(None, "local Inception file: also report real FID (image teachers)", resume=True)


Schema = dict[str, type]

DISTILL: Schema = {"teacher": TeacherConfig, "generator": GeneratorConfig, "fake_score": FakeScoreConfig,
                   "objective": ObjectiveConfig, "train": TrainConfig, "eval": EvalConfig}
DEFAULTS: dict[str, Any] = {name: defaults(cls) for name, cls in DISTILL.items()}
SECTIONS = tuple(DEFAULTS)


# -- loading, merging, overrides ---------------------------------------------------------------------------
_RESOLVER = re.compile(r"\$\{\s*[\w.\-]+\s*:")  # ${oc.env:VAR}, ${oc.decode:...}: a resolver call


def _refuse_resolvers(node, where: str, path: str = "") -> None:
    """Resolver interpolations are refused: a resolved ``${oc.env:TOKEN}`` would be written in plain text
    into ``RUN_DIR/config.yaml`` (docs/recipes.md)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_resolvers(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_resolvers(v, where, f"{path}[{i}]")
    elif isinstance(node, str) and _RESOLVER.search(node):
        raise ConfigError(path or where, f"{node!r}: resolver interpolations (${{oc.env:...}}) are not supported "
                          f"in {where}, the resolved value would be stored in the run's config.yaml; write the "
                          "value itself")


def _parse_value(text: str) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception:
        return text


parse_value = _parse_value  # the public name (``--set`` values are YAML scalars / lists)


def _merge(schema: Schema, user: dict) -> dict:
    """The defaults of ``schema`` updated with ``user``'s values, section by section (values inside a
    section, mappings included, are replaced as a whole)."""
    if not isinstance(user, dict):
        raise ConfigError("config", "must hold a mapping of sections")
    out = {name: defaults(cls) for name, cls in schema.items()}
    for name, v in user.items():
        if name not in schema:
            raise ConfigError(str(name), f"unknown section; accepted: {', '.join(schema)}")
        if not isinstance(v, dict):
            raise ConfigError(str(name), "must be a mapping")
        cls = schema[name]
        for k, val in v.items():
            if not cls.OPEN and k not in keys(cls):
                raise ConfigError(f"{name}.{k}", f"unknown key; accepted: {', '.join(sorted(keys(cls)))}")
            out[name][k] = copy.deepcopy(val)
    return out


def apply_overrides(cfg: dict, overrides: Iterable[str], schema: Schema | None = None) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML scalars/lists) to a merged config."""
    schema = DISTILL if schema is None else schema
    cfg = copy.deepcopy(cfg)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
        name, text = item.split("=", 1)
        if not name.strip():
            raise ConfigError("--set", f"expected SECTION.KEY=VALUE, got {item!r}")
        parts = name.strip().split(".")
        if parts[0] not in schema:
            raise ConfigError(name, f"unknown section; accepted: {', '.join(schema)}")
        if len(parts) < 2:
            raise ConfigError(name, "give SECTION.KEY=VALUE")
        cls = schema[parts[0]]
        ks = keys(cls)
        if not cls.OPEN:
            if parts[1] not in ks:
                raise ConfigError(".".join(parts[:2]), f"unknown key; accepted: {', '.join(sorted(ks))}")
            if len(parts) > 2 and ks[parts[1]].base is not dict:
                raise ConfigError(".".join(parts[:2]), "is not a mapping")
        node = cfg.setdefault(parts[0], {})
        for i, p in enumerate(parts[1:-1], start=2):
            node = node.setdefault(p, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts[:i]), "is not a mapping")
        value = _parse_value(text)
        _refuse_resolvers(value, "--set", name)
        node[parts[-1]] = value
    return cfg


def check_override_values(overrides: Iterable[str], schema: Schema | None = None) -> None:
    """Check ``a.b=c`` overrides on their own: the syntax, the section and key, and the value of every key a
    closed section declares (range, type, choices), without a config to apply them to (a bench applies the
    same overrides to many recipes; what depends on a recipe is left to its run)."""
    schema = DISTILL if schema is None else schema
    cfg = apply_overrides({}, overrides, schema)
    for name, section in cfg.items():
        cls = schema[name]
        if cls.OPEN:
            continue
        ks = keys(cls)
        for k, v in section.items():
            check_value(v, ks[k], f"{name}.{k}")


def load_yaml(path: str | os.PathLike) -> dict:
    if not os.path.exists(path):
        raise ConfigError("config", f"file not found: {path}")
    try:
        conf = OmegaConf.load(path)
        _refuse_resolvers(OmegaConf.to_container(conf, resolve=False), str(path))
        data = OmegaConf.to_container(conf, resolve=True) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError("config", f"{path} is not valid YAML{where}") from None
    except ConfigError:
        raise
    except Exception as e:  # omegaconf interpolation / structure errors
        if "Invalid loaded object type" in str(e):  # a file holding one scalar
            raise ConfigError("config", f"{path} must hold a mapping of sections") from None
        raise ConfigError("config", f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of sections")
    return data


def resolve_schema(schema: Schema, user: dict, overrides: Iterable[str] = ()) -> tuple[dict, dict]:
    """Merge ``user`` over the defaults of ``schema``, apply ``overrides``, validate every section.

    Returns ``(cfg, typed)``: the plain nested dict and the typed section objects."""
    cfg = _merge(schema, user)
    cfg = _merge(schema, apply_overrides(cfg, overrides, schema))
    return cfg, {name: parse(cls, cfg[name], name) for name, cls in schema.items()}


def resolve(user: dict, overrides: Iterable[str] = ()) -> dict:
    """The ``distill`` config: defaults, ``user``, ``overrides``, validated (:data:`DISTILL`)."""
    cfg = _merge(DISTILL, user)
    cfg = _merge(DISTILL, apply_overrides(cfg, overrides, DISTILL))
    gb = cfg["train"].pop("global_batch", None)
    if gb is not None:
        check_value(gb, keys(TrainConfig)["global_batch"], "train.global_batch")
        ut = user.get("train") or {}
        if "global_batch" in ut and "batch_size" in ut and ut["batch_size"] != gb:  # both in one file
            raise ConfigError("train.global_batch", f"conflicts with train.batch_size ({ut['batch_size']}); "
                              "set one of them (they name the same global batch)")
        cfg["train"]["batch_size"] = gb
    cfg["train"]["global_batch"] = None
    if cfg["teacher"].get("kind") == "scene":  # its condition is a camera, not a label a generator can take
        raise ConfigError("teacher.kind", "'scene' (the exact-render 3D teacher) is for `scoredistill optimize` with "
                          "params.kind: splats (docs/3d.md); accepted for distill: "
                          + ", ".join(k for k in TEACHER_KINDS if k != "scene"))
    for name, cls in DISTILL.items():
        parse(cls, cfg[name], name)
    return cfg


def typed(cls: type, data, path: str, only: Iterable[str] | None = None):
    """The typed section a builder reads: ``data`` itself when it already is one, else its mapping
    (a run's resolved config, a library caller's dict) validated by :func:`parse`."""
    return data if isinstance(data, cls) else parse(cls, data, path, only)


def teacher_config(tcfg: dict | TeacherConfig, only: Iterable[str] | None = None) -> TeacherConfig:
    """The typed teacher section a builder reads, with the values its kind needs."""
    t = typed(TeacherConfig, tcfg, "teacher", only)
    t.require()
    return t


# -- --resume ------------------------------------------------------------------------------------------------
def resumable(schema: Schema) -> list[str]:
    """The dotted keys ``--resume --set`` may change."""
    return [f"{s}.{k.name}" for s, cls in schema.items() for k in keys(cls).values() if k.resume]


def check_resume_overrides(overrides: Iterable[str], saved: dict, steps_done: int, schema: Schema | None = None,
                           steps_span_keys: tuple[str, ...] = ("lr_schedule",)) -> None:
    """Refuse ``--resume --set`` overrides that would not mean what they say.

    A checkpoint carries the weights, optimizer state and RNG of the run as configured, so only the
    keys flagged ``resume`` (more ``train.steps``, evaluation, logging and checkpoint cadence, threads,
    device, and where the same computation runs: fsdp, offload, deterministic kernels, compile) may
    change; ``train.steps`` may not fall below the ``steps_done`` already trained, nor move while an
    lr schedule spans ``train.steps``."""
    schema = DISTILL if schema is None else schema
    ok = resumable(schema)
    for item in overrides or ():
        name = item.split("=", 1)[0].strip()
        if name not in ok:
            raise ConfigError(name, f"cannot be changed on --resume (the checkpoint was trained with the saved "
                              f"value); resumable: {', '.join(ok)}")
        if name == "train.steps" and "=" in item:
            v = _parse_value(item.split("=", 1)[1])
            if is_int(v) and v < steps_done:
                raise ConfigError(name, f"must be >= the {steps_done} steps already done, got {v}")
            tr = saved.get("train") or {}
            sched = next((tr.get(k) for k in steps_span_keys if tr.get(k) not in (None, "constant")), None)
            if sched is not None and v != tr.get("steps"):
                raise ConfigError(name, f"cannot change on --resume while train.lr_schedule is {sched!r} (the "
                                  "decay spans train.steps); start a new run")


def dump(cfg: dict, path: str | os.PathLike) -> None:
    from scoredistill.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))


# -- docs/recipes.md -----------------------------------------------------------------------------------------
def _default_text(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (dict, list)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


def markdown_table(schema: Schema, command: str, only: dict[str, Iterable[str]] | None = None) -> str:
    """The key reference of one command's schema as Markdown (``scripts/gen_recipes_doc.py``)."""
    lines = []
    for name, cls in schema.items():
        names = set(only[name]) if only and name in only else None
        lines += [f"#### `{command}`: `{name}`", ""]
        if cls.DOC:
            lines += [cls.DOC, ""]
        kinds_col = any(k.kinds for k in keys(cls).values())
        head = "| key | default | accepted | resume |" + (" kinds |" if kinds_col else "") + " meaning |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for k in keys(cls).values():
            if names is not None and k.name not in names:
                continue
            row = (f"| `{name}.{k.name}` | `{_default_text(k.default)}` | {accepted(k)} | "
                   f"{'yes' if k.resume else ''} |")
            if kinds_col:
                row += f" {', '.join(k.kinds) if k.kinds else 'all'} |"
            lines.append(row + f" {k.doc.replace('|', '&#124;')} |")
        lines.append("")
    return "\n".join(lines)
