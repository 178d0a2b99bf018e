"""The optimization-under-a-prior driver: Adam on a parameterization's tensors under a teacher.

Same objective contract as the generator engine (:class:`~scoredistill.engine.distiller.Distiller`):
the objective's ``generator_loss`` gives the loss whose gradient w.r.t. the rendered ``x`` is the
method's field, backpropagated into the parameters (particles, an image, a user renderer); an
objective that declares ``fake_score`` also gets ``auxiliary_losses`` steps on **detached** renders
(``train.fake_steps`` per parameter step, ProlificDreamer K = 1). The driver never branches on a
method's name.

Per step ``i``: (1) set every schedulable scalar to its value at ``i``; (2) fake-score updates;
(3) render a minibatch, objective loss, backward, non-finite guard, Adam step. Every
``eval.every`` steps: metrics against the GMM reference (``metrics.jsonl``) and a scatter PNG;
every ``train.checkpoint_every`` steps: an atomic checkpoint of the parameters, the fake score,
both optimizers, the RNG states, the step and the objective's own state — JSON running statistics
(``state_dict``, as in the generator engine) and tensors (``state_tensors``, e.g. CDS's fixed noise) —
from which ``resume`` continues exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import numpy as np
import torch
from safetensors.torch import save_file

from scoredistill.config import dump
from scoredistill.engine.build import build_teacher, data_std
from scoredistill.engine.io import (
    CheckpointError,
    apply_checkpoint,
    atomic_dir,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    truncate_jsonl,
)
from scoredistill.errors import ConfigError, TrainingAborted
from scoredistill.objectives.base import Batch, Roles, build_objective, canonical_param
from scoredistill.optimize.fake import ViewConditionedDenoiser
from scoredistill.optimize.params import (
    CallableRenderer,
    ImageTensor,
    Parameterization,
    Particles,
    load_callable,
)
from scoredistill.optimize.schedule import Schedule, extract_schedules, parse_schedule

OptBatch = Batch  # kept for code written against the earlier name; Batch carries view/index/num_items


# -- building ---------------------------------------------------------------------------------------
def item_classes(spec, n: int, num_classes: int | None) -> torch.Tensor | None:
    if spec is None:
        return None
    if not num_classes:
        raise ConfigError("params.classes", "the teacher is unconditional; accepted here: null")
    if spec == "uniform":
        return torch.arange(n) % num_classes
    if spec >= num_classes:
        raise ConfigError("params.classes", f"must be < {num_classes} (the teacher's classes)")
    return torch.full((n,), int(spec), dtype=torch.long)


def _init_tensor(pc: dict, shape: tuple, g: torch.Generator) -> torch.Tensor:
    if pc["init"] is not None:
        path = pc["init"]
        if not isinstance(path, str) or not path.endswith(".npy"):
            raise ConfigError("params.init",
                              f"must be a PATH.npy for params.kind: {pc['kind']}, got {path!r}")
        if not os.path.exists(path):
            raise ConfigError("params.init", f"file not found: {path}")
        arr = np.load(path, allow_pickle=False)
        return torch.from_numpy(arr.astype(np.float32))
    return pc["init_mean"] + pc["init_std"] * torch.randn(shape, generator=g)


def build_parameterization(pc: dict, teacher, seed: int) -> Parameterization:
    g = torch.Generator().manual_seed(seed + 777)
    if pc["kind"] == "latent":  # a latent through a diffusers VAE (optimize/latent.py)
        from scoredistill.optimize.latent import build_latent

        return build_latent(pc, teacher, g, item_classes)
    shape = tuple(pc["shape"]) if pc["shape"] is not None else tuple(teacher.data_shape)
    if int(np.prod(shape)) != int(np.prod(teacher.data_shape)):
        raise ConfigError("params.shape", f"{list(shape)} does not match the teacher's data shape "
                          f"{list(teacher.data_shape)}")
    views = pc["views"]
    if pc["kind"] == "particles":
        n = pc["n"]
        cls = item_classes(pc["classes"], n, teacher.num_classes)
        return Particles(n, shape, _init_tensor(pc, (n, *shape), g), cls, views)
    if pc["kind"] == "image":
        n = pc["n"]
        cls = item_classes(pc["classes"], n, teacher.num_classes)
        init = _init_tensor(pc, (n, *shape), g)
        return ImageTensor(shape, init, n, pc["repeat"], pc["activation"], cls, views)
    render = functools.partial(load_callable(pc["render"], "params.render"), **pc["hook_args"])
    init_fn = load_callable(pc["init"], "params.init") if pc["init"] else None
    if init_fn is None:
        raise ConfigError("params.init", "missing; give the init hook 'package.module:function' for "
                          "params.kind: callable")
    init = init_fn(g, **pc["hook_args"])
    nv = pc["num_views"]
    cls = item_classes(pc["classes"], nv, teacher.num_classes)
    return CallableRenderer(render, init, nv, cls, views, pc["batch_size"])


class _StateBag(torch.nn.Module):
    """Checkpoint carrier for an objective's own tensors (``state_tensors``)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v.detach().clone())


class PriorOptimizer:
    """Optimize a parameterization under a teacher with any objective of the library."""

    def __init__(self, cfg: dict, run_dir: str | None = None, log=print,
                 param: Parameterization | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.log = log
        tc = cfg["train"]
        if tc["threads"]:
            torch.set_num_threads(int(tc["threads"]))
        self.device = torch.device(tc["device"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device",
                              "cuda requested but no CUDA device is available; accepted here: cpu")
        torch.manual_seed(tc["seed"])
        convention = cfg["teacher"].get("guidance_convention", "canonical")
        obj_cfg, self.obj_schedules = extract_schedules(cfg["objective"], "objective")
        self.obj_schedules = {k: sch.map(functools.partial(canonical_param, k, convention=convention))
                              for k, sch in self.obj_schedules.items()}
        self.objective = build_objective(obj_cfg, convention)
        self.teacher, self.reference = build_teacher(cfg["teacher"])
        self.teacher.requires_grad_(False).eval().to(self.device)
        param = param or build_parameterization(cfg["params"], self.teacher, tc["seed"])
        self.param = param.to(self.device)
        self.lr_schedules: dict[str, Schedule] = {}
        for k in ("lr", "fake_lr"):
            sch = parse_schedule(tc[k], f"train.{k}")
            if sch is not None:
                self.lr_schedules[k] = sch
        lr = self.lr_schedules["lr"](0) if "lr" in self.lr_schedules else tc["lr"]
        adam = torch.optim.Adam(self.param.parameters(), lr=lr, betas=tuple(tc["betas"]), eps=tc["eps"],
                                weight_decay=tc["weight_decay"])
        self.optimizers = {"params": adam}
        self.modules: dict[str, torch.nn.Module] = {"params": self.param}
        self.fake = None
        if "fake_score" in self.objective.requirements():
            fc = cfg["fake_score"]
            sd = fc["sigma_data"] if fc["sigma_data"] is not None else data_std(self.teacher, self.reference)
            t = self.teacher
            views = self.param.view_space()
            self.fake = ViewConditionedDenoiser(t.process, t.data_shape, t.num_classes, views, fc["width"],
                                                fc["depth"], sd).to(self.device)
            flr = self.lr_schedules["fake_lr"](0) if "fake_lr" in self.lr_schedules else tc["fake_lr"]
            self.optimizers["fake_score"] = torch.optim.Adam(self.fake.parameters(), lr=flr,
                                                             betas=tuple(tc["fake_betas"]))
            self.modules["fake_score"] = self.fake
        req = self.objective.requirements()
        if "class_conditional" in req:
            if not self.teacher.num_classes:
                raise ConfigError("teacher", f"objective {self.objective.name} needs a class-conditional "
                                  "teacher; accepted: preset ring8_cond, or teacher.classes")
            if self.param.classes is None:
                raise ConfigError("params.classes", f"objective {self.objective.name} needs a class per item; "
                                  "accepted: a class label, or uniform")
        unsupported = req - {"fake_score", "class_conditional"}
        if unsupported:
            need = ", ".join(sorted(unsupported))
            raise ConfigError("objective.name", f"{self.objective.name} needs {need}, which the optimizer "
                              "does not provide; use `scoredistill distill`")
        self.rng = torch.Generator().manual_seed(tc["seed"])
        self.step = 0
        self.nonfinite = {r: 0 for r in self.optimizers}
        self.consecutive = {r: 0 for r in self.optimizers}
        self.running: dict[str, list[float]] = {}
        self.wall_offset = 0.0
        self.warmed = False
        self._t0 = time.time()
        self._preflight()

    def _preflight(self):
        """One throwaway objective call on two items (own RNG, no step), so that a config the objective
        rejects at call time (e.g. a class-conditional method without classes) fails before a run folder
        is written."""
        index = self.param.sample_index(None, torch.Generator().manual_seed(0))[:2]
        rng = torch.Generator().manual_seed(0)
        with torch.no_grad():
            r = self.param.render(index.to(self.device))
        b = OptBatch(x=r.x, cond=r.cond, view=r.view, index=index, num_items=self.param.num_items, rng=rng,
                     step=0)
        with torch.no_grad():
            if self.fake is not None:
                self.objective.auxiliary_losses(b, self.roles())
            self.objective.generator_loss(b, self.roles())

    # -- schedules ---------------------------------------------------------------------------------------
    def apply_schedules(self, step: int) -> dict[str, float]:
        values = {}
        obj = self.objective
        for key, sch in self.obj_schedules.items():
            v = sch(step)
            values[f"objective.{key}"] = v
            obj.set_param(key, v)
        for k, sch in self.lr_schedules.items():
            name = "params" if k == "lr" else "fake_score"
            if name in self.optimizers:
                for group in self.optimizers[name].param_groups:
                    group["lr"] = sch(step)
                values[f"train.{k}"] = sch(step)
        return values

    # -- one phase with guards ---------------------------------------------------------------------------
    def roles(self) -> Roles:
        return Roles(teacher=self.teacher, fake=self.fake)

    def _batch(self, rendered, index) -> OptBatch:
        return OptBatch(x=rendered.x, cond=rendered.cond, view=rendered.view, index=index,
                        num_items=self.param.num_items, rng=self.rng, step=self.step)

    def _record(self, key, value):
        if torch.is_tensor(value):
            value = float(value.detach().double().mean())
        self.running.setdefault(key, []).append(float(value))

    def _apply(self, loss: torch.Tensor, role: str) -> bool:
        opt = self.optimizers[role]
        opt.zero_grad(set_to_none=True)
        ok = bool(torch.isfinite(loss))
        if ok:
            loss.backward()
            params = [p for p in self.modules[role].parameters() if p.grad is not None]
            if params:
                clip = self.cfg["train"]["grad_clip"] if role == "params" else None
                norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
                self._record(f"grad_norm/{role}", float(norm))
                ok = math.isfinite(float(norm))
        if ok:
            self.consecutive[role] = 0
            opt.step()
            return True
        opt.zero_grad(set_to_none=True)
        self.nonfinite[role] += 1
        self.consecutive[role] += 1
        if self.consecutive[role] >= self.cfg["train"]["nan_guard_max"]:
            raise TrainingAborted(f"{role}: loss or gradients non-finite for {self.consecutive[role]} "
                                  f"consecutive steps (step {self.step}); lower train.lr, check the teacher, "
                                  "or raise train.nan_guard_max")
        return False

    def fake_step(self):
        index = self.param.sample_index(self.cfg["params"]["batch_size"], self.rng)
        with torch.no_grad():
            r = self.param.render(index)
        out = self.objective.auxiliary_losses(self._batch(r, index), self.roles())
        if out is None:
            return
        self._apply(out["loss"], "fake_score")
        for k, v in out.items():
            if k != "loss":
                self._record(k, v)

    def train_step(self):
        tc = self.cfg["train"]
        self.apply_schedules(self.step)
        if self.fake is not None:
            if not self.warmed:
                for _ in range(tc["fake_warmup"] if self.step == 0 else 0):
                    self.fake_step()
                self.warmed = True
            for _ in range(tc["fake_steps"]):
                self.fake_step()
            self.fake.requires_grad_(False)
        try:
            index = self.param.sample_index(self.cfg["params"]["batch_size"], self.rng)
            r = self.param.render(index)
            out = self.objective.generator_loss(self._batch(r, index), self.roles())
            self._apply(out["loss"], "params")
        finally:
            if self.fake is not None:
                self.fake.requires_grad_(True)
        for k, v in out.items():
            self._record("loss" if k == "loss" else k, v)
        self.step += 1

    # -- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def render_all(self):
        r = self.param.render(self.param.all_index().to(self.device))
        return r.x.detach().cpu(), (r.cond.cpu() if r.cond is not None else None)

    def evaluate(self) -> dict:
        from scoredistill.optimize.metrics import optimize_metrics

        x, cond = self.render_all()
        res = {"step": self.step}
        if self.reference is not None:
            res.update(optimize_metrics(x, self.reference, cond, seed=self.cfg["train"]["seed"]))
        else:
            res["non_finite"] = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).sum())
        if self.cfg["eval"]["plots"] and self.run_dir is not None:
            from scoredistill.viz import scatter_panels

            ref = self.reference.sample(max(len(x), 500), generator=torch.Generator().manual_seed(1)) \
                if self.reference is not None else None
            panels = ([("target (exact)", ref)] if ref is not None else []) + [
                (f"{self.objective.name} step {self.step}", x)]
            scatter_panels(panels, os.path.join(self.run_dir, "samples", f"step_{self.step:07d}.png"),
                           means=self.reference.means if self.reference is not None else None, basis_from=ref)
        return res

    # -- outputs & checkpoints -----------------------------------------------------------------------------
    def _objective_state(self) -> dict[str, torch.Tensor]:
        fn = getattr(self.objective, "state_tensors", None)
        return {k: v.detach().cpu().contiguous() for k, v in (fn() if fn else {}).items()}

    def save(self):
        meta = {"step": self.step, "nonfinite": self.nonfinite, "consecutive": self.consecutive,
                "wall": self.wall_offset + (time.time() - self._t0), "warmed": self.warmed,
                "objective": self.objective.state_dict()}
        rngs = {"train": self.rng.get_state(), "torch": torch.get_rng_state()}
        modules = dict(self.modules)
        state = self._objective_state()
        if state:
            modules["objective"] = _StateBag(state)
        folder = os.path.join(self.run_dir, "checkpoints", f"step_{self.step:07d}")
        save_checkpoint(folder, modules, self.optimizers, rngs, meta)
        prune_checkpoints(self.run_dir, self.cfg["train"]["keep_checkpoints"])
        self.export()

    def export(self):
        """``params.safetensors`` (the parameterization's tensors) and, for particles,
        ``particles.npy`` (float32, ``(N, *shape)``); other kinds write ``renders.npy``."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.param.state_dict().items()}
        with atomic_dir(os.path.join(self.run_dir, ".export")) as tmp:
            save_file(state, os.path.join(tmp, "params.safetensors"),
                      metadata={"kind": self.param.kind, "step": str(self.step)})
            x, _ = self.render_all()
            name = "particles.npy" if isinstance(self.param, Particles) else "renders.npy"
            np.save(os.path.join(tmp, name), x.float().numpy().astype(np.float32))
            if isinstance(self.param, ImageTensor):
                img = self.param.image().detach().cpu().numpy().astype(np.float32)
                np.save(os.path.join(tmp, "image.npy"), img)
        for f in os.listdir(os.path.join(self.run_dir, ".export")):
            os.replace(os.path.join(self.run_dir, ".export", f), os.path.join(self.run_dir, f))

    def load_latest(self) -> int:
        cks = list_checkpoints(self.run_dir)
        if not cks:
            raise CheckpointError(f"{self.run_dir} has no checkpoint to resume from")
        errors = []
        for folder in reversed(cks):
            try:
                tensors, meta = read_checkpoint(folder)
                rngs = apply_checkpoint(tensors, meta, self.modules, self.optimizers)
            except CheckpointError as e:
                errors.append(str(e))
                self.log(f"warning: skipping unreadable checkpoint {folder}: {e}")
                continue
            pre = "model/objective/"
            state = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
            if state and hasattr(self.objective, "load_state_tensors"):
                self.objective.load_state_tensors(state)
            self.objective.load_state_dict(meta.get("objective", {}))
            self.rng.set_state(rngs["train"])
            torch.set_rng_state(rngs["torch"])
            self.step = int(meta["step"])
            self.nonfinite.update(meta.get("nonfinite", {}))
            self.consecutive.update(meta.get("consecutive", {}))
            self.wall_offset = float(meta.get("wall", 0.0))
            self.warmed = bool(meta.get("warmed", True))
            self._truncate_metrics(self.step)
            return self.step
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))

    def _truncate_metrics(self, step):
        truncate_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), step)

    def _write_metrics(self, res: dict) -> dict:
        res = dict(res)
        res["wall_s"] = round(self.wall_offset + time.time() - self._t0, 2)
        res["train"] = {k: sum(v) / len(v) for k, v in self.running.items() if v}
        res["nonfinite_skipped"] = dict(self.nonfinite)
        if self.run_dir is not None:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(res) + "\n")
        return res

    # -- main loop -------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Optimize for ``train.steps`` steps (outputs only with a ``run_dir``); returns the last metrics."""
        tc = self.cfg["train"]
        self._t0 = time.time()
        if self.run_dir is not None:
            os.makedirs(self.run_dir, exist_ok=True)
            if resume:
                self.load_latest()
            dump(self.cfg, os.path.join(self.run_dir, "config.yaml"))
        from scoredistill.engine.progress import Progress

        last = None
        with Progress(tc["steps"], self.step, enabled=tc["progress"] and self.run_dir is not None) as bar:
            while self.step < tc["steps"]:
                self.train_step()
                if self.step % tc["log_every"] == 0 or self.step == tc["steps"]:
                    bar.update(self.step, {k: sum(v[-tc["log_every"]:]) / len(v[-tc["log_every"]:])
                                           for k, v in self.running.items() if k.startswith("loss")})
                if self.step % self.cfg["eval"]["every"] == 0 or self.step == tc["steps"]:
                    last = self._write_metrics(self.evaluate())
                    self.running = {}
                    bar.note(last)
                due = self.step % tc["checkpoint_every"] == 0 or self.step == tc["steps"]
                if self.run_dir is not None and due:
                    self.save()
        if last is None:
            last = self._write_metrics(self.evaluate())
        return last
