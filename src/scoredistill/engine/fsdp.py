"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trained roles of the generator engine.

On with ``train.fsdp: true``, or when ``ACCELERATE_USE_FSDP`` is ``true``/``1`` (``accelerate launch`` sets it
from an accelerate FSDP config), and only with more than one process. Design and the reasons for it:

- **What is sharded.** The generator, fake score, discriminator head and the EMA copy of the generator. In each,
  the elements of every outermost ``nn.ModuleList`` (residual / transformer blocks) become their own FSDP units,
  so only one block's full weights are materialised at a time; the root unit holds the rest. The teacher is
  frozen and stays replicated: it is never trained, so sharding it would only trade memory for an all-gather on
  every call. A module that calls its children depending on the data (MSD's per-class students) sets
  ``calls_children_conditionally = True`` and is not split: a rank whose micro-batch skips a student would skip
  that student's all-gather and desynchronise the collectives (seen without the flag: gloo aborts on a size
  mismatch).
- **Gradient semantics equal the replicated path.** The engine backprops ``loss / n_micro`` on each rank and
  *sums* over ranks (:meth:`Dist.sum_grads`). FSDP2 averages by default, so the divide factor is set to 1, and
  sum-only collectives are forced (gloo has no ``PREMUL_SUM``). Parameters that get no gradient reduce-scatter
  zeros, as ``sum_grads`` zero-fills them, which also keeps the collectives identical on every rank.
  :meth:`Dist.sum_grads` skips these parameters (they are ``DTensor`` s, already reduced).
- **Other entry points than forward.** Objectives call ``Denoiser.denoise`` (through ``guided``/``score``/
  ``eps``) and ``features`` (GAN heads) directly, and the engine a K-step student's ``train_output`` and
  ``sample``; those are registered as FSDP forward methods so the root's parameters are all-gathered for them
  too.
- **Same collectives on every rank.** Forwards and backwards of sharded roles are collectives, so under FSDP a
  rank keeps running its remaining micro-batches after a non-finite loss instead of stopping early; the guard
  (an all-reduced flag plus the global gradient norm) then skips the step on every rank.
- **EMA** is sharded exactly like the generator (same plan, same mesh), so its update is a local ``lerp_``
  between shards with identical placements: no communication.
- **Evaluation, sampling, the report and ``generator/``** run on rank 0 only, on an unsharded replica of the
  student (the EMA, or the generator without EMA) built before sharding. All ranks refresh it together
  (:meth:`Sharder.full_state` gathers; rank 0 loads) at evaluation and checkpoint steps and at the end of
  training. Cost: one full copy of the generator on rank 0, no per-step communication.
- **Checkpoints keep the replicated format.** At a checkpoint step all ranks gather every role and optimizer
  state tensor by tensor (``DTensor.full_tensor``); rank 0 keeps CPU copies and writes the usual safetensors
  folder, so a checkpoint of an FSDP run resumes without FSDP and vice versa. On resume every rank reads the file
  and keeps its own shard (``distribute_tensor(..., src_data_rank=None)``: no communication).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor

from scoredistill.errors import ConfigError

try:
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
except ImportError:  # FSDP2 is public from torch 2.6
    FSDPModule = fully_shard = register_fsdp_forward_method = None

# entry points besides forward: the objectives' denoiser calls and GAN heads, and a K-step student's rollout
# (``train_output`` for objectives that read the trained step, ``sample`` for evaluation)
FORWARD_METHODS = ("denoise", "features", "train_output", "sample")
# FSDP2 settings the design above relies on (developed and tested with torch 2.13)
NEEDED = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms", "set_reduce_scatter_unused_params")


def wanted(flag) -> bool:
    """``train.fsdp``, or accelerate's FSDP launch (so an accelerate FSDP config needs no recipe change)."""
    return bool(flag) or os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("true", "1")


def check_shardable(modules: dict) -> None:
    """One line (``train.fsdp``) for a role FSDP cannot train exactly: experts that a step leaves idle on every rank
    (``has_idle_experts``: a student's or fake score's per-phase experts, docs/fewstep.md). Without FSDP such an
    expert has no gradient and Adam skips it; FSDP reduce-scatters zeros for unused parameters (so that ranks
    whose micro-batches use different children, as MSD's, run the same collectives), and Adam would then move the
    idle expert by its momentum."""
    for name, m in modules.items():
        if m is not None and any(getattr(c, "has_idle_experts", False) for c in m.modules()):
            raise ConfigError("train.fsdp", f"the {name} has experts that a step leaves untouched (generator.experts, "
                              "fake_score.experts, phased_dmd), which FSDP cannot keep exactly unchanged; accepted: "
                              "false (multi-process training without FSDP is exact for them)")


def blocks(module: nn.Module) -> list[nn.Module]:
    """The elements (with parameters) of every outermost ``nn.ModuleList`` below ``module``."""
    out: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        if getattr(m, "calls_children_conditionally", False):
            return
        for c in m.children():
            if isinstance(c, nn.ModuleList):
                out.extend(b for b in c if next(b.parameters(), None) is not None)
            else:
                walk(c)

    walk(module)
    return out


class Sharder:
    """Shards roles over a 1-D mesh of all processes and moves state between sharded and full form."""

    def __init__(self, device: torch.device, world: int):
        missing = [a for a in NEEDED if not hasattr(FSDPModule, a)] if FSDPModule is not None else ["fully_shard"]
        if missing:
            raise ConfigError("train.fsdp", f"this torch ({torch.__version__}) lacks FSDP2's {', '.join(missing)}; "
                              "accepted: a torch that has them (tested: 2.13), or train.fsdp: false")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the mesh and NCCL pick the current device
        self.mesh = init_device_mesh(device.type, (world,))
        # roles return reshaped views; FSDP2 warns that an in-place op on them would skip its backward hook.
        # Objectives are pure functions of role outputs and never modify them in place (objectives/base.py).
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    def shard(self, module: nn.Module) -> nn.Module:
        """``fully_shard`` the blocks, then the root (in place; parameter names are unchanged)."""
        for b in blocks(module):
            fully_shard(b, mesh=self.mesh)
        # explicit True: by default FSDP2 keeps the *root's* parameters unsharded after forward (they are needed
        # again in backward), but the engine runs forwards without backward (no_grad generator passes) and
        # reads module.parameters() between phases (freezing, clipping), which must then be the sharded ones
        fully_shard(module, mesh=self.mesh, reshard_after_forward=True)
        for name in FORWARD_METHODS:
            if callable(getattr(module, name, None)):
                register_fsdp_forward_method(module, name)
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
        module.set_reduce_scatter_unused_params(True)
        return module

    @staticmethod
    def full_state(sd: dict, keep: bool) -> dict | None:
        """Full tensors of a (possibly sharded) state dict; a collective: every rank calls it with the same
        dict. Rank ``keep`` gets CPU copies, the others ``None`` (each full tensor is dropped right away)."""
        out = {}
        for k, v in sd.items():
            if isinstance(v, DTensor):
                v = v.full_tensor()
            if keep:
                out[k] = v.detach().cpu() if torch.is_tensor(v) else v
        return out if keep else None

    def full_optimizer_state(self, opt: torch.optim.Optimizer, keep: bool) -> dict | None:
        """``opt.state_dict()`` with full tensors, in the index-keyed layout of an unsharded optimizer."""
        sd = opt.state_dict()
        state = {idx: self.full_state(sd["state"][idx], keep) for idx in sorted(sd["state"])}
        return {"state": state, "param_groups": sd["param_groups"]} if keep else None

    @staticmethod
    def place(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``full`` laid out like ``like``: this rank's shard when ``like`` is a same-shaped ``DTensor``."""
        if not isinstance(like, DTensor) or tuple(full.shape) != tuple(like.shape):
            return full
        return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)

    @staticmethod
    def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` that also takes sharded gradients and returns the global norm.

        For plain tensors this is exactly ``torch.nn.utils.clip_grad_norm_``. For ``DTensor`` gradients the total
        norm comes back as a partial DTensor; it is reduced to the full norm first so that every rank scales by the
        same coefficient and the non-finite guard sees the same value everywhere.
        """
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm
