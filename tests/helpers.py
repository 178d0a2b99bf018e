"""Helpers shared by the test folders (on the path through ``pythonpath`` in pyproject.toml)."""

import os
import shutil
import subprocess
import sys

import pytest
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


def torchrun_cli(args, nproc=2, env=None):
    """``scoredistill ARGS`` on ``nproc`` gloo ranks (``torchrun --standalone`` picks a free port)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "scoredistill", *args],
                          capture_output=True, text=True, env=e, timeout=300)


def gen_weights(run):
    return load_file(os.path.join(run, "generator", "model.safetensors"))
