"""The shared loop (engine/loop.py): both drivers checkpoint and restore an objective's running state,
JSON (``state_dict``) and tensors (``state_tensors``), and both write TensorBoard."""

import glob
import os

import pytest
import torch

from helpers import tiny_config
from scoredistill.config import resolve
from scoredistill.engine.distiller import Distiller
from scoredistill.engine.io import list_checkpoints, read_checkpoint
from scoredistill.objectives.base import OBJECTIVES
from scoredistill.objectives.dmd import DMD2
from scoredistill.optimize.config import resolve as resolve_optimize
from scoredistill.optimize.driver import PriorOptimizer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = tiny_config(16, objective={"name": "_test_state"}, train={"batch_size": 16}, eval={"n_samples": 16})


class StatefulDMD2(DMD2):
    """DMD2 plus running state of both kinds: a noise tensor drawn from the global RNG on the first
    generator call (like CDS's fixed noise), a tensor call counter, and a JSON call counter. A resume
    that dropped the tensors would redraw the noise from the restored RNG and restart the counter."""

    name = "_test_state"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.noise = None
        self.calls = torch.zeros((), dtype=torch.int64)
        self.json_calls = 0

    def generator_loss(self, batch, roles):
        if self.noise is None:
            self.noise = torch.randn(4)
        self.calls += 1
        self.json_calls += 1
        return super().generator_loss(batch, roles)

    def state_dict(self):
        return {"json_calls": self.json_calls}

    def load_state_dict(self, state):
        self.json_calls = state.get("json_calls", 0)

    def state_tensors(self):
        return {} if self.noise is None else {"noise": self.noise, "calls": self.calls}

    def load_state_tensors(self, tensors):
        self.noise, self.calls = tensors["noise"], tensors["calls"]


@pytest.fixture
def stateful():
    OBJECTIVES[StatefulDMD2.name] = StatefulDMD2
    yield
    del OBJECTIVES[StatefulDMD2.name]  # the contract suite iterates over the registry


def test_distill_resume_restores_objective_tensor_state(tmp_path, stateful):
    full = Distiller(resolve(SMALL), str(tmp_path / "full"))
    full.run()
    half = Distiller(resolve(SMALL, ["train.steps=4"]), str(tmp_path / "half"))
    half.run()
    tensors, meta = read_checkpoint(list_checkpoints(str(tmp_path / "half"))[-1])
    assert torch.equal(tensors["model/objective/noise"], half.objective.noise)
    assert meta["objective"] == {"json_calls": 2}
    resumed = Distiller(resolve(SMALL), str(tmp_path / "half"))
    resumed.run(resume=True)
    assert int(resumed.objective.calls) == resumed.objective.json_calls == 4  # generator every 2nd of 8
    assert torch.equal(resumed.objective.noise, full.objective.noise)
    assert int(full.objective.calls) == 4
    a, b = full.generator.state_dict(), resumed.generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _events(run):
    return glob.glob(os.path.join(run, "tb", "events.out.tfevents.*"))


def test_both_drivers_write_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    d = Distiller(resolve({**SMALL, "objective": {"name": "dmd2"}}, ["train.steps=4"]), str(tmp_path / "d"))
    d.run()
    cfg = resolve_optimize({"teacher": {"kind": "gmm", "preset": "ring8", "process": {"kind": "vp"}},
                            "params": {"kind": "particles", "n": 16}, "objective": {"name": "sds"},
                            "train": {"steps": 4, "progress": False, "checkpoint_every": 4},
                            "eval": {"every": 2, "plots": False}})
    o = PriorOptimizer(cfg, str(tmp_path / "o"))
    o.run()
    for run in (tmp_path / "d", tmp_path / "o"):
        assert _events(str(run)), run
        assert os.path.getsize(_events(str(run))[0]) > 100  # scalars, not only the file header
