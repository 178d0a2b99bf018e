"""Schedulable scalars (threestudio ``C()``): a number, or ``[start_step, start, end, end_step]``
(linear in the step, held constant outside the range), or a mapping
``{kind: linear|sqrt|step, start_step, start, end, end_step}``. ``sqrt`` is Consistent3D's
``anneal_t`` (``start + (end - start) sqrt(progress)``, HiFA's sqrt anneal); ``step`` holds ``start``
until ``end_step`` and then jumps to ``end`` (ProlificDreamer's t_max 0.98 -> 0.5 at 5000 steps).

The optimizer driver pulls every schedule out of the ``objective`` section (including ``time`` /
``fake_time`` bounds) and ``train.lr`` / ``train.fake_lr`` before the objective is built, and sets the
current values before each step; objectives only ever see numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scoredistill.errors import ConfigError

KINDS = ("linear", "sqrt", "step")


@dataclass(frozen=True)
class Schedule:
    start_step: int
    start: float
    end: float
    end_step: int
    kind: str = "linear"

    def __call__(self, step: int) -> float:
        if step <= self.start_step:
            return float(self.start)
        if step >= self.end_step:
            return float(self.end)
        if self.kind == "step":
            return float(self.start)
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        if self.kind == "sqrt":
            frac = math.sqrt(frac)
        return float(self.start + (self.end - self.start) * frac)

    def map(self, fn) -> Schedule:
        return Schedule(self.start_step, fn(self.start), fn(self.end), self.end_step, self.kind)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_schedule(value, field: str) -> Schedule | None:
    """A :class:`Schedule` for a list/mapping spec, ``None`` for anything else (a plain value)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 4 or not all(_num(v) for v in value):
            raise ConfigError(field,
                              f"a schedule is [start_step, start, end, end_step] (4 finite numbers), got {value!r}")
        spec = dict(zip(("start_step", "start", "end", "end_step"), value))
        kind = "linear"
    elif isinstance(value, dict) and ("start" in value or "end_step" in value or value.get("kind") in KINDS):
        spec = dict(value)
        kind = spec.pop("kind", "linear")
        need = {"start_step", "start", "end", "end_step"}
        if set(spec) != need or not all(_num(spec[k]) for k in need):
            raise ConfigError(field, "a schedule mapping needs numbers start_step, start, end, end_step "
                              f"(and optionally kind: {'|'.join(KINDS)}); got {value!r}")
        if kind not in KINDS:
            raise ConfigError(f"{field}.kind", f"unknown value {kind!r}; accepted: {', '.join(KINDS)}")
    else:
        return None
    if not float(spec["start_step"]).is_integer() or not float(spec["end_step"]).is_integer():
        raise ConfigError(field, "start_step and end_step must be integers")
    s0, s1 = int(spec["start_step"]), int(spec["end_step"])
    if s0 < 0 or s1 < s0:
        raise ConfigError(field, f"need 0 <= start_step <= end_step, got {s0}, {s1}")
    return Schedule(s0, float(spec["start"]), float(spec["end"]), s1, kind)


def extract_schedules(section: dict, prefix: str, nested=("time", "fake_time"),
                      end: bool = False) -> tuple[dict, dict[str, Schedule]]:
    """Replace every schedule in ``section`` (and its ``nested`` mappings) by its value at step 0 (its end value
    with ``end``, so that both ends can be validated alike).

    Returns the cleaned copy and ``{dotted_key_relative_to_section: Schedule}``.
    """
    out, found = {}, {}
    for k, v in section.items():
        if k in nested and isinstance(v, dict):
            sub, subf = extract_schedules(v, f"{prefix}.{k}", nested=(), end=end)
            out[k] = sub
            found.update({f"{k}.{kk}": s for kk, s in subf.items()})
            continue
        sch = parse_schedule(v, f"{prefix}.{k}")
        if sch is None:
            out[k] = v
        else:
            out[k] = sch.end if end else sch(0)
            found[k] = sch
    return out, found
