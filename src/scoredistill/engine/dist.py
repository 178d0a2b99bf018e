"""Multi-process support over ``torch.distributed`` (works under ``torchrun`` and ``accelerate launch``).

The engine does not wrap models in DDP: each rank accumulates the gradients of its micro-batches and
:meth:`Dist.sum_grads` all-reduces them in one flat buffer before clipping, so frozen roles,
multi-phase updates and skipped (non-finite) steps need no special handling. Roles sharded with FSDP
(``train.fsdp``, engine/fsdp.py) hold ``DTensor`` parameters whose gradients FSDP has already summed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as td


class Dist:
    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world > 1 and not td.is_initialized():
            td.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        td.all_reduce(t, op=td.ReduceOp.MIN)
        return bool(t.item())

    def sum_grads(self, params) -> None:
        if not self.enabled:
            return
        from torch.distributed.tensor import DTensor  # here: importing it costs ~1 s, single-process runs skip it

        params = list(params)
        # FSDP-sharded parameters: FSDP's reduce-scatter already summed them (engine/fsdp.py)
        local = [p for p in params if not isinstance(p, DTensor)]
        reached = [float(p.grad is not None) for p in local]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not local:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in local] + [torch.tensor(reached).to(local[0].grad)])
        td.all_reduce(flat)
        i = 0
        for p, hits in zip(local, flat[-len(local):].tolist()):
            n = p.numel()
            if hits == 0:  # no rank reached it (an expert not run this step): no gradient, so Adam skips it as in
                p.grad = None  # one process, instead of moving it by its momentum
            else:
                p.grad.copy_(flat[i:i + n].view_as(p))
            i += n

    def barrier(self):
        if self.enabled:
            td.barrier()

    def close(self):
        # a barrier before teardown: without it gloo aborted at exit in 3 of 5 runs (measured here; docs/distributed.md)
        if self.enabled and self.owns_group:
            td.barrier()
            td.destroy_process_group()
