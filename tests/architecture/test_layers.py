"""The layers of docs/architecture.md, declared as an import-linter contract in pyproject.toml.

Imports inside functions count: a lazy upward import is still a dependency on a higher layer.
"""

import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")
pytestmark = pytest.mark.skipif(not os.path.exists(LINT), reason="import-linter not installed (pip install -e .[dev])")


def lint(pythonpath: str):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([LINT, "--no-cache", os.path.join(ROOT, "pyproject.toml")], capture_output=True,
                          text=True, env=env, cwd=pythonpath, timeout=300)


def test_layer_contract_holds():
    p = lint(os.path.join(ROOT, "src"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "1 kept, 0 broken" in p.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """A copy of the package with one function-level upward import (process -> engine) must fail."""
    pkg = tmp_path / "scoredistill"
    shutil.copytree(os.path.join(ROOT, "src", "scoredistill"), pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "weights"))
    with open(pkg / "process" / "time.py", "a") as f:
        f.write("\n\ndef _upward():\n    from scoredistill.engine import distiller  # noqa: F401\n")
    p = lint(str(tmp_path))
    assert p.returncode != 0
    assert "scoredistill.process is not allowed to import scoredistill.engine" in p.stdout, p.stdout[-3000:]
