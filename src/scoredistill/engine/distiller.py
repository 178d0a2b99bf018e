"""The generator-distillation engine.

Owns optimizers, update schedule, clipping, EMA, non-finite guards, checkpoints, logging, progress
and evaluation. It never branches on a method's name: everything method-specific comes from the
objective's ``requirements()``, ``generator_loss`` and ``auxiliary_losses``.

Update schedule per iteration ``i`` (explicit ratio semantics, methods.md §6.2 / pitfall 8):
the generator is updated when ``i % train.generator_every == 0``; auxiliary roles (fake score,
discriminator) are updated on every other iteration, and also on generator iterations when
``train.fake_on_generator_steps`` is true (official DMD2: ``generator_every: 5`` => 5 fake updates
per generator update; FastGen/rCM semantics: set it false => 4:1).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager

import torch

from scoredistill.config import ConfigError, dump
from scoredistill.engine.build import (
    build_discriminator,
    build_evaluator,
    build_fake,
    build_generator,
    build_teacher,
    data_std,
    load_real_data,
    make_ode_pairs,
    sample_classes,
)
from scoredistill.engine.io import (
    CheckpointError,
    apply_checkpoint,
    atomic_write_text,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from scoredistill.models.generators import EMA
from scoredistill.models.registry import save_model
from scoredistill.objectives.base import Batch, Roles, build_objective


class TrainingAborted(Exception):
    """Raised when a role's loss or gradients stay non-finite for too many consecutive steps."""


class Distiller:
    def __init__(self, cfg: dict, run_dir: str, log=print):
        self.cfg = cfg
        self.run_dir = run_dir
        self.log = log
        tc = cfg["train"]
        if tc["threads"]:
            torch.set_num_threads(int(tc["threads"]))
        self.device = torch.device(tc["device"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device", "cuda requested but no CUDA device is available; accepted here: cpu")
        torch.manual_seed(tc["seed"])
        self.objective = build_objective(cfg["objective"], cfg["teacher"].get("guidance_convention", "canonical"))
        self.teacher, self.reference = build_teacher(cfg["teacher"])
        self.teacher.requires_grad_(False).eval().to(self.device)
        self.evaluator = build_evaluator(self.teacher, self.reference, tc["seed"])
        req = self.objective.requirements()
        self.requirements = req
        self.generator = build_generator(cfg["generator"], self.teacher).to(self.device)
        self.fake = build_fake(cfg["fake_score"], self.teacher, data_std(self.teacher, self.reference)).to(
            self.device) if "fake_score" in req or "discriminator" in req else None
        self.disc = build_discriminator(self.fake).to(self.device) if "discriminator" in req else None
        self.ema = EMA(self.generator, tc["ema"]) if tc["ema"] > 0 else None

        def adam(params, lr, betas):
            return torch.optim.Adam(params, lr=lr, betas=tuple(betas or tc["betas"]), weight_decay=tc["weight_decay"])

        self.optimizers = {"generator": adam(self.generator.parameters(), tc["lr"], tc["betas"])}
        if self.fake is not None:
            self.optimizers["fake_score"] = adam(self.fake.parameters(), tc["fake_lr"] or tc["lr"], tc["fake_betas"])
        if self.disc is not None:
            self.optimizers["discriminator"] = adam(self.disc.parameters(), tc["disc_lr"] or tc["fake_lr"] or tc["lr"],
                                                    tc["disc_betas"] or tc["fake_betas"])
        self.aux_roles = [r for r in ("fake_score", "discriminator") if r in self.optimizers]
        self.modules = {"generator": self.generator}
        if self.ema is not None:
            self.modules["ema"] = self.ema
        if self.fake is not None:
            self.modules["fake_score"] = self.fake
        if self.disc is not None:
            self.modules["discriminator"] = self.disc

        # data the objective declared; drawn from separately seeded generators so a resume rebuilds them
        self.real = self.real_cond = None
        if "real_data" in req:
            if tc["real_data"] in (None, "none"):
                raise ConfigError("train.real_data", f"objective {self.objective.name} with these settings needs "
                                  "real samples; accepted: teacher, PATH.npy")
            self.real, self.real_cond = load_real_data(tc["real_data"], self.teacher, self.reference,
                                                       tc["real_pool"], tc["seed"])
        self.ode = None
        if "ode_pairs" in req:
            w = getattr(self.objective.p, "guidance_scale", 1.0)
            self.ode = make_ode_pairs(self.teacher, tc["ode_pairs"], tc["ode_steps"], tc["seed"], w)
        self.rng = torch.Generator().manual_seed(tc["seed"])
        self.step = 0
        self.nonfinite = {r: 0 for r in self.optimizers}
        self.consecutive = {r: 0 for r in self.optimizers}
        self.running: dict[str, list[float]] = {}
        self.wall_offset = 0.0
        eg = torch.Generator().manual_seed(tc["seed"] + 12345)
        n_eval = cfg["eval"]["n_samples"]
        self.eval_z = torch.randn(n_eval, *self.teacher.data_shape, generator=eg)
        self.eval_cond = sample_classes(self.teacher.num_classes, n_eval, eg)
        self._tb = None

    # -- roles -------------------------------------------------------------------------------------
    def roles(self) -> Roles:
        return Roles(teacher=self.teacher, fake=self.fake, discriminator=self.disc, generator=self.generator)

    @contextmanager
    def _frozen(self, names):
        mods = [self.modules[n] for n in names if n in self.modules]
        for m in mods:
            m.requires_grad_(False)
        try:
            yield
        finally:
            for m in mods:
                m.requires_grad_(True)

    def _batch(self, x, z, cond) -> Batch:
        b = Batch(x=x, cond=cond, z=z, rng=self.rng, step=self.step)
        bs = x.shape[0]
        if self.real is not None:
            idx = torch.randint(0, len(self.real), (bs,), generator=self.rng)
            b.real = self.real[idx].to(self.device)
            b.real_cond = self.real_cond[idx].to(self.device) if self.real_cond is not None else None
        if self.ode is not None:
            oz, ox, oc = self.ode
            idx = torch.randint(0, len(oz), (bs,), generator=self.rng)
            b.ode_z, b.ode_x = oz[idx].to(self.device), ox[idx].to(self.device)
            b.ode_cond = oc[idx].to(self.device) if oc is not None else None
        return b

    def _draw(self):
        bs = self.cfg["train"]["batch_size"]
        z = torch.randn(bs, *self.teacher.data_shape, generator=self.rng) * self.cfg["generator"]["z_std"]
        cond = sample_classes(self.teacher.num_classes, bs, self.rng)
        return z.to(self.device), (cond.to(self.device) if cond is not None else None)

    # -- one optimisation phase with guards ----------------------------------------------------------
    def _apply(self, out: dict, roles: list[str]) -> bool:
        loss = out["loss"]
        for r in roles:
            self.optimizers[r].zero_grad(set_to_none=True)
        ok = bool(torch.isfinite(loss))
        if ok:
            loss.backward()
            clip = self.cfg["train"]["grad_clip"]
            for r in roles:
                params = [p for p in self.modules[r].parameters() if p.grad is not None]
                if not params:
                    continue
                norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
                self._record(f"grad_norm/{r}", float(norm))
                ok = ok and math.isfinite(float(norm))
        for r in roles:
            if ok:
                self.consecutive[r] = 0
            else:
                self.nonfinite[r] += 1
                self.consecutive[r] += 1
        if not ok:
            for r in roles:
                self.optimizers[r].zero_grad(set_to_none=True)
            worst = max(roles, key=lambda r: self.consecutive[r])
            if self.consecutive[worst] >= self.cfg["train"]["nan_guard_max"]:
                raise TrainingAborted(
                    f"{worst}: loss or gradients non-finite for {self.consecutive[worst]} consecutive steps "
                    f"(iteration {self.step}); lower train.lr, check the teacher, or raise train.nan_guard_max")
            return False
        for r in roles:
            self.optimizers[r].step()
        return True

    def _record(self, key, value):
        if torch.is_tensor(value):
            value = float(value.detach().double().mean())
        self.running.setdefault(key, []).append(float(value))

    def train_step(self):
        tc = self.cfg["train"]
        obj = self.objective
        gen_step = self.step % tc["generator_every"] == 0
        do_aux = bool(self.aux_roles) and (not gen_step or tc["fake_on_generator_steps"])
        if do_aux:
            z, cond = self._draw()
            with torch.no_grad():
                x = self.generator(z, cond)
            out = obj.auxiliary_losses(self._batch(x, z, cond), self.roles())
            if out is not None:
                with self._frozen(["generator"]):
                    self._apply(out, self.aux_roles)
                for k, v in out.items():
                    if k != "loss":
                        self._record(k, v)
        if gen_step:
            z, cond = self._draw()
            with self._frozen(self.aux_roles):
                x = self.generator(z, cond)
                out = obj.generator_loss(self._batch(x, z, cond), self.roles())
                stepped = self._apply(out, ["generator"])
            if stepped and self.ema is not None:
                self.ema.update(self.generator)
            for k, v in out.items():
                self._record("loss_gen" if k == "loss" else k, v)
        self.step += 1

    # -- evaluation ----------------------------------------------------------------------------------
    def student(self):
        return self.ema.model if self.ema is not None else self.generator

    @torch.no_grad()
    def sample(self, z, cond=None, use_ema=True):
        g = self.student() if use_ema else self.generator
        return g(z.to(self.device), cond.to(self.device) if cond is not None else None).cpu()

    def evaluate(self) -> dict:
        x = self.sample(self.eval_z, self.eval_cond)
        res = {"step": self.step, **self.evaluator.metrics(x, self.eval_cond)}
        if self.cfg["eval"]["plots"]:
            ref = self.evaluator.reference(len(x), self.eval_cond, seed=0)
            panels = ([("target", ref)] if ref is not None else []) + [(f"student step {self.step}", x)]
            self.evaluator.plot(panels, os.path.join(self.run_dir, "samples", f"step_{self.step:07d}.png"))
        return res

    # -- checkpoints ----------------------------------------------------------------------------------
    def save(self):
        meta = {"step": self.step, "nonfinite": self.nonfinite, "consecutive": self.consecutive,
                "wall": self.wall_offset + (time.time() - self._t0)}
        rngs = {"train": self.rng.get_state(), "torch": torch.get_rng_state()}
        folder = os.path.join(self.run_dir, "checkpoints", f"step_{self.step:07d}")
        save_checkpoint(folder, self.modules, self.optimizers, rngs, meta)
        prune_checkpoints(self.run_dir, self.cfg["train"]["keep_checkpoints"])
        save_model(self.student(), os.path.join(self.run_dir, "generator"),
                   extra={"ema": self.ema is not None, "step": self.step,
                          "data_shape": list(self.teacher.data_shape)})

    def load_latest(self) -> int:
        """Restore the newest readable checkpoint; an unreadable one is reported and skipped."""
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
            self.rng.set_state(rngs["train"])
            torch.set_rng_state(rngs["torch"])
            self.step = int(meta["step"])
            self.nonfinite.update(meta.get("nonfinite", {}))
            self.consecutive.update(meta.get("consecutive", {}))
            self.wall_offset = float(meta.get("wall", 0.0))
            self._truncate_metrics(self.step)
            return self.step
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))

    def _truncate_metrics(self, step):
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    pass
        atomic_write_text(path, "".join(keep))

    # -- main loop --------------------------------------------------------------------------------------
    def _write_metrics(self, res: dict):
        res = dict(res)
        res["wall_s"] = round(self.wall_offset + time.time() - self._t0, 2)
        res["train"] = {k: sum(v) / len(v) for k, v in self.running.items() if v}
        res["nonfinite_skipped"] = dict(self.nonfinite)
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
        if self._tb is not None:
            for k, v in res.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"eval/{k}", v, self.step)
            for k, v in res["train"].items():
                self._tb.add_scalar(f"train/{k}", v, self.step)
        return res

    def train(self, resume: bool = False) -> dict:
        tc = self.cfg["train"]
        os.makedirs(self.run_dir, exist_ok=True)
        self._t0 = time.time()
        if resume:
            self.load_latest()
        dump(self.cfg, os.path.join(self.run_dir, "config.yaml"))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.run_dir, "tb"))
        except ImportError:  # tensorboard is a dependency, but keep training if it is broken
            self._tb = None
        from scoredistill.engine.progress import Progress

        last = None
        with Progress(tc["steps"], self.step, enabled=tc["progress"]) as bar:
            while self.step < tc["steps"]:
                self.train_step()
                if self.step % tc["log_every"] == 0 or self.step == tc["steps"]:
                    bar.update(self.step, {k: sum(v[-tc["log_every"]:]) / len(v[-tc["log_every"]:])
                                           for k, v in self.running.items() if k.startswith("loss")})
                if self.step % self.cfg["eval"]["every"] == 0 or self.step == tc["steps"]:
                    last = self._write_metrics(self.evaluate())
                    self.running = {}
                    bar.note(last)
                if self.step % tc["checkpoint_every"] == 0 or self.step == tc["steps"]:
                    self.save()
        if last is None:
            last = self._write_metrics(self.evaluate())
        if self._tb is not None:
            self._tb.close()
        return last
