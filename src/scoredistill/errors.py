"""Exceptions every layer may raise (a leaf module: it imports nothing of the package).

The command line maps them to exit codes (docs/cli.md): :class:`ConfigError` and
:class:`CheckpointError` are bad input (one line on stderr, exit 2), :class:`TrainingAborted` is a
run whose losses or weights stopped being finite (exit 3).
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(Exception):
    """A bad field in a config or a command line; ``str()`` is the one-line message."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class CheckpointError(Exception):
    """A checkpoint or model folder that cannot be read or does not match the run."""


class TrainingAborted(Exception):
    """A role's loss or gradients stayed non-finite for too many consecutive steps, or the final
    weights are not finite."""


def out_of_memory(e: BaseException) -> ConfigError | None:
    """A failed allocation (sizes too large for this machine: ``MemoryError``, torch's CPU allocator error or
    ``torch.OutOfMemoryError``) as the one-line error the command line prints; None for any other error."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if not (isinstance(e, MemoryError) or "can't allocate memory" in first or "out of memory" in first.lower()):
        return None
    short = first.split("DefaultCPUAllocator: ")[-1].split(". Error code")[0]
    return ConfigError("out of memory", f"{short}; lower the sizes of the config or the command (train.batch_size, "
                       "eval.n_samples, train.ode_pairs, train.real_pool, generator.width/depth, "
                       "fake_score.width/depth, teacher.dim, --n)")


def check_keys(cfg: dict, accepted: Iterable[str], section: str) -> None:
    """Raise :class:`ConfigError` for the first key of ``cfg`` not in ``accepted``."""
    accepted = list(accepted)
    for k in cfg:
        if k not in accepted:
            raise ConfigError(f"{section}.{k}" if section else k,
                              f"unknown key; accepted: {', '.join(sorted(accepted))}")
