"""Objectives: one small file per method family, over the contract in :mod:`.base` and the shared math in
:mod:`.core`."""

# importing a module registers its objectives
from scoredistill.objectives import (  # noqa: F401
    asd,
    bsd,
    cd,
    cds,
    csd,
    disback,
    dmd,
    ect,
    esd,
    fdistill,
    flash_dmd,
    hypersd,
    ict,
    ism,
    meanflow,
    phased_dmd,
    rcm,
    scm,
    sds,
    sfd,
    sid,
    sim,
    swiftbrush,
    tbcm,
    tcm,
    tdm,
    twinflow,
    vsd,
)
from scoredistill.objectives.base import OBJECTIVES, Batch, Objective, Roles, build_objective, register

__all__ = ["OBJECTIVES", "Batch", "Objective", "Roles", "build_objective", "register"]
