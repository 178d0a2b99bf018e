"""Few-step students in the bench suites: one row per sampling-step count ``K'`` (``--steps-eval``).

A trained ``K``-step student is sampled with ``K'`` of its steps by the subset rule of
docs/fewstep.md (the evenly strided steps ``floor(i K / K')``, always from the
first, noisiest one: exactly ``scoredistill sample RUN --steps K'``). A one-step student has a single
sampler and gives its one row at ``K' = 1``; a ``K``-step student (``K >= 2``) asked for a ``K' > K`` is
refused with one line naming ``--steps-eval`` (before any training, where the suite can read the recipes).

The re-noising between steps (``fresh`` rollouts) is drawn from a generator seeded with
:data:`RENOISE_SEED`, so every row is reproducible and ``K' = K`` of two suites sample the same points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scoredistill.errors import ConfigError

RENOISE_SEED = 7  # the re-noising seed of docs/results/digits.md's few-step rows
FIELD = "--steps-eval"


def parse_steps_eval(text: str | None) -> list[int] | None:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (sorted, unique); ``None`` / empty -> ``None`` (no sampling-step rows)."""
    if text is None or not text.strip():
        return None
    try:
        ks = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ConfigError(FIELD, f"must be comma-separated integers >= 1, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ConfigError(FIELD, f"must be comma-separated integers >= 1, got {text!r}")
    return ks


def config_steps(cfg: dict) -> int:
    """A resolved distill config's student steps ``K``: ``generator.steps``, else the number of
    ``generator.timesteps``, else one."""
    gen = cfg.get("generator") or {}
    if gen.get("steps"):
        return int(gen["steps"])
    ts = gen.get("timesteps")
    return len(ts) if isinstance(ts, (list, tuple)) else 1


def steps_for(steps_eval: Sequence[int], k: int, what: str = "the student") -> list[int]:
    """The ``K'`` rows of a ``k``-step student: ``[1]`` for a one-step student, else ``steps_eval`` (each
    ``<= k``, or a :class:`ConfigError` naming ``--steps-eval``)."""
    if k == 1:
        return [1]
    too_many = [s for s in steps_eval if s > k]
    if too_many:
        raise ConfigError(FIELD, f"{too_many[0]} exceeds the {k} steps of {what}; accepted: integers in [1, {k}] "
                          "(leave the method out with --methods, or lower the list)")
    return list(steps_eval)


def check_recipes(recipes: dict[str, str], steps_eval: Sequence[int] | None, overrides: Sequence[str] = ()) -> None:
    """Refuse (one line, before any training) a ``K'`` above a selected few-step recipe's ``K``;
    ``recipes`` maps a method name to its recipe path. Recipes that do not resolve are left to the run."""
    if not steps_eval:
        return
    from scoredistill.config import load_yaml, resolve

    for method, path in recipes.items():
        try:
            k = config_steps(resolve(load_yaml(path), list(overrides)))
        except ConfigError:
            continue
        steps_for(steps_eval, k, f"{method} ({path})")


def sample_steps(gen: torch.nn.Module, z: torch.Tensor, cond: torch.Tensor | None, steps: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``steps`` of ``gen``'s steps in eval mode, without gradient, on ``device`` (CPU output). A one-step
    generator only takes ``steps = 1``."""
    was = gen.training
    gen.eval()
    dev = torch.device(device) if device is not None else z.device
    c = cond.to(dev) if cond is not None else None
    try:
        with torch.no_grad():
            if getattr(gen, "takes_noise_generator", False):
                noise = torch.Generator().manual_seed(RENOISE_SEED)
                return gen.sample(z.to(dev), c, steps=steps, generator=noise).cpu()
            if steps != 1:
                raise ConfigError(FIELD, f"a one-step generator samples with 1 step only, got {steps}")
            return gen(z.to(dev), c).cpu()
    finally:
        gen.train(was)
