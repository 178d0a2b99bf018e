"""Objectives: one small file per method family over the contract in :mod:`.base`."""

from scoredistill.objectives import dmd, sid, sim, vsd  # noqa: F401  (registration)
from scoredistill.objectives import asd, bsd, cds, csd, esd, ism, sds  # noqa: F401  (SDS family, optimize)
from scoredistill.objectives import fdistill, sfd, swiftbrush  # noqa: F401  (registration)
from scoredistill.objectives.base import OBJECTIVES, Batch, Objective, Roles, build_objective, register

__all__ = ["OBJECTIVES", "Batch", "Objective", "Roles", "build_objective", "register"]
