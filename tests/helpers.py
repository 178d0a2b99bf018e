"""Helpers shared by the test folders (on the path through ``pythonpath`` in pyproject.toml)."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(TORCHRUN),
                                    reason="torchrun not installed")


def cli(args, env=None, cwd=None, timeout=300):
    """``scoredistill ARGS`` in a subprocess with one intra-op thread."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "scoredistill", *args], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=cwd)


def run_main(args, capsys):
    """``scoredistill ARGS`` in this process: ``(exit code, stderr)``. A subprocess (:func:`cli`) costs ~2.5 s of
    CPU for the imports alone, so the error contract is checked here and through a process once per test file.
    A warning shown under Python's default filters counts as stderr, as it would in a process."""
    from scoredistill.cli.main import main

    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", quiet)
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    err = capsys.readouterr().err
    return code, err + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)


# gloo's C++ worker threads occasionally abort a rank (std::terminate, SIGABRT) although the run barriers and
# destroys its process group before exit (one rank of 1 in 21 two-rank runs here on 2026-12-01; docs/distributed.md).
# A run that dies that way is repeated once from scratch, with a warning, so that the runs are still compared
# bit for bit; any other failure is returned as it is.
GLOO_ABORT = "terminate called without an active exception"


def torchrun_cli(args, nproc=2, env=None):
    """``scoredistill ARGS`` on ``nproc`` gloo ranks (``torchrun --standalone`` picks a free port)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "scoredistill", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=300)
    if p.returncode != 0 and GLOO_ABORT in p.stderr and "--out" in args and "--resume" not in args:
        warnings.warn(f"gloo aborted a rank (std::terminate); repeating the run once: {p.stderr[-300:]}",
                      stacklevel=2)
        out = args[args.index("--out") + 1]
        if os.path.isdir(out):
            shutil.rmtree(out)
        p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=300)
    return p


def gen_weights(run):
    return load_file(os.path.join(run, "generator", "model.safetensors"))


def tiny_config(width: int = 32, **sections) -> dict:
    """A minimal valid ``distill`` config: the ring8 GMM teacher, depth-2 MLPs of ``width`` for the generator
    and the fake score, DMD2, 8 steps of batch 32 with a checkpoint and an evaluation every 4, no progress
    bar, no plots. Each keyword names a section whose keys replace the ones here
    (``tiny_config(train={"steps": 24})``)."""
    cfg = {
        "teacher": {"kind": "gmm", "preset": "ring8"},
        "generator": {"width": width, "depth": 2},
        "fake_score": {"width": width, "depth": 2},
        "objective": {"name": "dmd2"},
        "train": {"steps": 8, "batch_size": 32, "generator_every": 2, "checkpoint_every": 4, "progress": False},
        "eval": {"every": 4, "n_samples": 64, "plots": False},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def repro(cfg, figures):
    """What a failing distribution test prints: the seed and thread count that reproduce the run (seeded CPU
    training is bit-stable on one machine, not across instruction sets or thread counts) and every figure."""
    return (f"reproduce with --set train.seed={cfg['train']['seed']} on {torch.get_num_threads()} threads: "
            f"{_rounded(figures)}")


def _rounded(v):
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return round(v, 4) if isinstance(v, float) else v


#: small networks and a short evaluation for training a toy recipe through the driver in a test
SMALL_TOY = ["train.batch_size=32", "generator.width=32", "generator.depth=2", "eval.n_samples=64",
             "eval.every=1000", "eval.plots=false", "train.real_pool=256", "train.progress=false",
             "train.checkpoint_every=2"]


def distill_toy(name, run, steps, resume=False, extra=()):
    """Train ``recipes/toy/NAME.yaml`` with :data:`SMALL_TOY` through the driver (the CLI's report plot would
    cost more than the training)."""
    from scoredistill.config import load_yaml, resolve
    from scoredistill.engine.distiller import Distiller

    cfg = resolve(load_yaml(f"recipes/toy/{name}.yaml"), SMALL_TOY + [f"train.steps={steps}", *extra])
    Distiller(cfg, str(run), log=lambda *a: None).run(resume=resume)


def last_checkpoint_tensors(run):
    """The tensors of the newest checkpoint of ``run``."""
    from scoredistill.engine.io import list_checkpoints, read_checkpoint

    return read_checkpoint(list_checkpoints(str(run))[-1])[0]
