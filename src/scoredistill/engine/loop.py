"""The training loop shared by generator distillation and optimization under a prior.

:class:`Loop` owns everything that does not depend on what is trained: device, threads and seeding;
the non-finite guard's counters and abort; the running diagnostics; ``metrics.jsonl`` and TensorBoard;
the progress bar; the log / evaluation / checkpoint cadence; atomic checkpoints with keep-last-K and
``--resume``; and the objective's running state, through one API both subclasses honour:
``Objective.state_dict()`` (JSON, into ``meta.json``) and ``Objective.state_tensors()`` (tensors, into
``state.safetensors`` under ``model/objective/``).

A subclass (:class:`~scoredistill.engine.distiller.Distiller`, generator training;
:class:`~scoredistill.optimize.driver.PriorOptimizer`, optimization under a prior) sets ``objective``,
``modules`` and ``optimizers`` (through :meth:`Loop._set_optimizers`) and provides ``train_step``,
``evaluate``, ``export`` (what ``save`` writes beside the checkpoint), ``report``, and the extra state it
checkpoints (:meth:`Loop._extra_meta`, :meth:`Loop._extra_rngs`, :meth:`Loop._load_extra`).

A checkpoint is ``checkpoints/step_XXXXXXX/{state.safetensors, meta.json}`` (engine/io.py): every role's
weights, the optimizers, the RNG states, and in ``meta.json`` the step, the guard counters, the wall
time and the objective's JSON state. A resumed run continues the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import os
import time

import torch

from scoredistill.config import dump
from scoredistill.engine.io import (
    CheckpointError,
    apply_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    truncate_jsonl,
)
from scoredistill.engine.progress import Progress
from scoredistill.errors import ConfigError, TrainingAborted

OBJECTIVE_PREFIX = "model/objective/"  # where the objective's state_tensors() live in state.safetensors


def fault(kind: str, step: int) -> None:
    """Fault injection for crash-safety tests: ``SCOREDISTILL_FAULT=step:N`` kills the process with
    SIGKILL right after iteration N, ``checkpoint:N`` while the checkpoint of step N is being written,
    ``export:N`` after that checkpoint is committed and before ``generator/`` (the export) is updated."""
    spec = os.environ.get("SCOREDISTILL_FAULT")
    if spec and spec == f"{kind}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` (this process's shard, under FSDP) is finite; one host sync."""
    flags = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in module.parameters()]
    return bool(torch.stack([f.cpu() for f in flags]).all()) if flags else True


class Loop:
    """Base of the two drivers; see the module docstring for what a subclass provides."""

    step_name = "step"         # how the guard's abort message names one train_step
    progress_label = "train"   # the progress bar's title

    def __init__(self, cfg: dict, run_dir: str | None, log=print):
        self.cfg = cfg
        self.run_dir = run_dir
        self.log = log
        tc = cfg["train"]
        if tc["threads"]:
            torch.set_num_threads(int(tc["threads"]))
        self.device = torch.device(tc["device"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device", "cuda requested but no CUDA device is available; accepted here: cpu")
        self.step = 0
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.modules: dict[str, torch.nn.Module] = {}
        self.nonfinite: dict[str, int] = {}
        self.consecutive: dict[str, int] = {}
        self.running: dict[str, list] = {}  # floats, and tensors not yet converted (see _flush_running)
        self._unflushed: list[tuple[list, int]] = []
        self.wall_offset = 0.0
        self._tb = None
        self._t0 = time.time()

    def seed(self) -> None:
        torch.manual_seed(self.cfg["train"]["seed"])

    def _set_optimizers(self, optimizers: dict) -> None:
        """The trained roles' optimizers; the guard keeps one pair of counters per role."""
        self.optimizers = optimizers
        self.nonfinite = {r: 0 for r in optimizers}
        self.consecutive = {r: 0 for r in optimizers}

    # -- hooks (a subclass overrides what it needs) -------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs (rank 0 of a multi-process run)."""
        return True

    def _barrier(self) -> None:
        pass

    def _all_true(self, ok: bool) -> bool:
        """``ok`` on every process (a collective under several processes)."""
        return ok

    def _before_evaluate(self) -> None:
        """Called on every process before the main one evaluates (a collective may run here)."""

    def _on_start(self) -> None:
        """Called when :meth:`run` starts, before a resume."""

    def _checkpoint_state(self) -> tuple[dict, dict]:
        """``(modules, optimizers)`` to write: the live objects, or (FSDP) full state dicts gathered on
        every process."""
        return self.modules, self.optimizers

    def _place(self):
        """``place(full, like)`` for :func:`~scoredistill.engine.io.apply_checkpoint`, or None."""
        return None

    def _extra_meta(self) -> dict:
        return {}

    def _extra_rngs(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_extra(self, meta: dict, rngs: dict[str, torch.Tensor]) -> None:
        pass

    def train_step(self) -> None:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def export(self) -> None:
        """Write the run's product next to the checkpoints (called by :meth:`save` on the main process)."""
        raise NotImplementedError

    def report(self, res: dict, wall_s: float) -> str:
        """Write ``report.md`` for a finished run; returns the text to print."""
        raise NotImplementedError

    # -- non-finite guard ------------------------------------------------------------------------------------
    def _guard(self, roles, ok: bool) -> None:
        """Count a taken (``ok``) or skipped step of ``roles``; abort after ``train.nan_guard_max``
        consecutive skips of one role."""
        for r in roles:
            if ok:
                self.consecutive[r] = 0
            else:
                self.nonfinite[r] += 1
                self.consecutive[r] += 1
        if ok:
            return
        worst = max(roles, key=lambda r: self.consecutive[r])
        if self.consecutive[worst] >= self.cfg["train"]["nan_guard_max"]:
            raise TrainingAborted(
                f"{worst}: loss or gradients non-finite for {self.consecutive[worst]} consecutive steps "
                f"({self.step_name} {self.step}); lower train.lr, check the teacher, or raise train.nan_guard_max")

    # -- running diagnostics -----------------------------------------------------------------------------------
    def _record(self, key, value):
        """Append a diagnostic. A tensor is reduced where it lives (``value.double().mean()``, taken
        now) and becomes a float at the next :meth:`_flush_running`, so recording needs no host sync."""
        vals = self.running.setdefault(key, [])
        if torch.is_tensor(value):
            self._unflushed.append((vals, len(vals)))
            v = value.detach()  # a float64 copy taken now: the mean of a 0-dim tensor is the tensor
            vals.append(v.to(torch.float64, copy=True) if v.dim() == 0 else v.double().mean())
            if len(self._unflushed) >= 4096:  # bound what train_step() called in a loop can hold
                self._flush_running()
        else:
            vals.append(float(value))

    def _flush_running(self):
        """Turn every recorded tensor into a float, with one device-to-host transfer per device."""
        by_dev: dict = {}
        for vals, i in self._unflushed:
            if i < len(vals) and torch.is_tensor(vals[i]):
                by_dev.setdefault(vals[i].device, []).append((vals, i))
        for slots in by_dev.values():
            floats = torch.stack([vals[i] for vals, i in slots]).tolist()
            for (vals, i), f in zip(slots, floats):
                vals[i] = f
        self._unflushed = []

    def _write_metrics(self, res: dict) -> dict:
        """Add wall time, the running means and the skip counters to ``res``; append it to
        ``metrics.jsonl`` and TensorBoard (with a run folder)."""
        res = dict(res)
        res["wall_s"] = round(self.wall_offset + time.time() - self._t0, 2)
        self._flush_running()
        res["train"] = {k: sum(v) / len(v) for k, v in self.running.items() if v}
        res["nonfinite_skipped"] = dict(self.nonfinite)
        if self.run_dir is not None:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(res) + "\n")
        if self._tb is not None:
            for k, v in res.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"eval/{k}", v, self.step)
            for k, v in res["train"].items():
                self._tb.add_scalar(f"train/{k}", v, self.step)
        return res

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save(self):
        """Write a checkpoint, prune to ``train.keep_checkpoints`` and :meth:`export`, on the main process;
        every process calls it (see :meth:`_checkpoint_state`). Weights that are no longer finite are never
        written: the run aborts (exit 3) and the last good checkpoint stays the newest."""
        bad = [n for n, m in self.modules.items() if not _finite(m)]
        if not self._all_true(not bad):
            raise TrainingAborted(f"the weights of {', '.join(bad) or 'a role on another process'} are not finite at "
                                  f"{self.step_name} {self.step}; nothing was saved (the newest checkpoint is the "
                                  "last finite state): lower train.lr or check the teacher")
        modules, optimizers = self._checkpoint_state()
        if not self.is_main:
            return
        meta = {"step": self.step, "nonfinite": self.nonfinite, "consecutive": self.consecutive,
                "wall": self.wall_offset + (time.time() - self._t0), "objective": self.objective.state_dict(),
                **self._extra_meta()}
        rngs = {**self._extra_rngs(), "torch": torch.get_rng_state()}
        state = {k: v.detach().cpu().contiguous() for k, v in self.objective.state_tensors().items()}
        if state:
            modules = {**modules, "objective": state}
        folder = os.path.join(self.run_dir, "checkpoints", f"step_{self.step:07d}")
        save_checkpoint(folder, modules, optimizers, rngs, meta, before_commit=lambda: fault("checkpoint", self.step))
        prune_checkpoints(self.run_dir, self.cfg["train"]["keep_checkpoints"])
        fault("export", self.step)
        self.export()

    def load_latest(self) -> int:
        """Restore the newest readable checkpoint; an unreadable one is reported and skipped. Returns the step."""
        cks = list_checkpoints(self.run_dir)
        if not cks:
            raise CheckpointError(f"{self.run_dir} has no checkpoint to resume from")
        errors = []
        for folder in reversed(cks):
            try:
                tensors, meta = read_checkpoint(folder)
                rngs = apply_checkpoint(tensors, meta, self.modules, self.optimizers, place=self._place())
            except CheckpointError as e:
                errors.append(str(e))
                self.log(f"warning: skipping unreadable checkpoint {folder}: {e}")
                continue
            state = {k[len(OBJECTIVE_PREFIX):]: v.to(self.device) for k, v in tensors.items()
                     if k.startswith(OBJECTIVE_PREFIX)}
            if state:
                self.objective.load_state_tensors(state)
            self.objective.load_state_dict(meta.get("objective", {}))
            torch.set_rng_state(rngs["torch"])
            self.step = int(meta["step"])
            self.nonfinite.update(meta.get("nonfinite", {}))
            self.consecutive.update(meta.get("consecutive", {}))
            self.wall_offset = float(meta.get("wall", 0.0))
            self._load_extra(meta, rngs)
            truncate_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), self.step)
            return self.step
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))

    def _metrics_at(self, step: int) -> dict | None:
        """The ``metrics.jsonl`` record of ``step``, if one was written."""
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return None
        found = None
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get("step") == step:
                    found = rec
        return found

    # -- main loop -------------------------------------------------------------------------------------------
    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but keep training if it is broken
            return None
        return SummaryWriter(os.path.join(self.run_dir, "tb"))

    def _evaluate_and_write(self) -> dict | None:
        """Evaluate and write metrics on the main process (None elsewhere); resets the running means."""
        self._before_evaluate()
        if not self.is_main:
            return None
        res = self._write_metrics(self.evaluate())
        self.running = {}
        return res

    def run(self, resume: bool = False) -> dict | None:
        """Train until ``train.steps`` (from the newest checkpoint with ``resume``); returns the last
        metrics on the main process. Outputs only with a ``run_dir``."""
        tc = self.cfg["train"]
        main = self.is_main
        self._t0 = time.time()
        self._on_start()
        last = None
        evaluated = False
        if self.run_dir is not None:
            os.makedirs(self.run_dir, exist_ok=True)
            if resume and list_checkpoints(self.run_dir):
                self.load_latest()
                if self.step >= tc["steps"]:
                    # a kill between the final checkpoint and its export left generator/ (or the params)
                    # behind the checkpoint: bring them in line, and reuse the final evaluation
                    self._before_evaluate()
                    if main:
                        self.export()
                        last = self._metrics_at(self.step)
                    evaluated = self._all_true(last is not None) if main else self._all_true(True)
            elif resume:  # killed before its first checkpoint: nothing to continue, so start over
                self.log(f"{self.run_dir} has no checkpoint yet: starting from step 0")
                truncate_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), -1)
            if main:
                dump(self.cfg, os.path.join(self.run_dir, "config.yaml"))
                self._tb = self._open_tensorboard()
        n_log = tc["log_every"]
        try:
            with Progress(tc["steps"], self.step, enabled=tc["progress"] and main and self.run_dir is not None,
                          label=self.progress_label) as bar:
                while self.step < tc["steps"]:
                    self.train_step()
                    fault("step", self.step)
                    end = self.step == tc["steps"]
                    if self.step % n_log == 0 or end:
                        self._flush_running()
                        bar.update(self.step, {k: sum(v[-n_log:]) / len(v[-n_log:])
                                               for k, v in self.running.items() if k.startswith("loss")})
                    if self.step % self.cfg["eval"]["every"] == 0 or end:
                        evaluated = True
                        res = self._evaluate_and_write()
                        if res is not None:
                            last = res
                            bar.note(last)
                    if self.run_dir is not None and (self.step % tc["checkpoint_every"] == 0 or end):
                        self.save()
                        self._barrier()
            if not evaluated:
                last = self._evaluate_and_write()
        finally:
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        return last
