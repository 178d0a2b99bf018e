"""Atomic file and folder writes, and full training-state checkpoints in safetensors.

A checkpoint is a folder ``checkpoints/step_XXXXXXX/`` holding ``state.safetensors`` (every role's
weights, EMA, optimizer tensors, RNG states) and ``meta.json`` (step, optimizer hyper-parameters,
counters). It is written into a temporary sibling and renamed, so a crash never leaves a
half-written checkpoint under its final name; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scoredistill.errors import CheckpointError  # noqa: F401 (re-exported)
from scoredistill.fileio import atomic_dir, atomic_write_text, truncate_jsonl  # noqa: F401 (re-exported)


# -- optimizer state <-> flat tensors -------------------------------------------------------------
def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer | dict, tensors: dict, meta: dict) -> None:
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    meta[prefix] = {"param_groups": sd["param_groups"], "scalars": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}/{idx}/{k}"] = v.detach().contiguous().cpu()
            else:
                meta[prefix]["scalars"][f"{idx}/{k}"] = v


def _unflatten_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict, place=None) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "/"):
            idx, k = key[len(prefix) + 1:].split("/", 1)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta[prefix]["scalars"].items():
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    if place is not None:
        params = [p for g in opt.param_groups for p in g["params"]]
        state = {i: {k: place(v, params[i]) if torch.is_tensor(v) and i < len(params) else v for k, v in st.items()}
                 for i, st in state.items()}
    opt.load_state_dict({"state": state, "param_groups": meta[prefix]["param_groups"]})


def save_checkpoint(folder: str, modules: dict, optimizers: dict, rngs: dict[str, torch.Tensor], meta: dict,
                    before_commit=None) -> None:
    """``modules`` / ``optimizers`` map names to modules / optimizers, or to their (full) state dicts, which is
    what an FSDP run passes after gathering its shards (engine/fsdp.py)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = dict(meta)
    for name, m in modules.items():
        for k, v in (m if isinstance(m, dict) else m.state_dict()).items():
            tensors[f"model/{name}/{k}"] = v.detach().contiguous().cpu()
    opt_meta: dict = {}
    for name, opt in optimizers.items():
        _flatten_optimizer(f"optim/{name}", opt, tensors, opt_meta)
    for name, st in rngs.items():
        tensors[f"rng/{name}"] = st.contiguous().cpu()
    meta["optimizers"] = opt_meta
    with atomic_dir(folder) as tmp:
        save_file(tensors, os.path.join(tmp, "state.safetensors"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit()


def read_checkpoint(folder: str) -> tuple[dict, dict]:
    """Return ``(tensors, meta)``; raises :class:`CheckpointError` if the folder is unreadable."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(folder, "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{folder}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return tensors, meta


def apply_checkpoint(tensors: dict, meta: dict, modules: dict, optimizers: dict, place=None) -> dict[str, torch.Tensor]:
    """Load a checkpoint into ``modules`` and ``optimizers``. ``place(full, like)`` maps each full tensor to the
    layout of the live tensor it replaces (an FSDP run keeps only its shard; engine/fsdp.py)."""
    for name, m in modules.items():
        pre = f"model/{name}/"
        sd = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        if place is not None:
            own = m.state_dict()
            sd = {k: place(v, own[k]) if k in own else v for k, v in sd.items()}
        try:
            m.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"role {name!r} does not match this run's config: {str(e).splitlines()[0]}") from None
    for name, opt in optimizers.items():
        _unflatten_optimizer(f"optim/{name}", opt, tensors, meta["optimizers"], place)
    return {k[4:]: v for k, v in tensors.items() if k.startswith("rng/")}


def list_checkpoints(run_dir: str) -> list[str]:
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    names = sorted(n for n in os.listdir(d) if n.startswith("step_"))
    return [os.path.join(d, n) for n in names]


def prune_checkpoints(run_dir: str, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
