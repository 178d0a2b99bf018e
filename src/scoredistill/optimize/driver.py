"""The optimization-under-a-prior driver: a :class:`~scoredistill.engine.loop.Loop` that optimizes a
parameterization's tensors (``train.optimizer``, Adam by default) under a teacher.

Same objective contract as the generator engine (:class:`~scoredistill.engine.distiller.Distiller`):
the objective's ``generator_loss`` gives the loss whose gradient w.r.t. the rendered ``x`` is the
method's field, backpropagated into the parameters (particles, an image, a user renderer); an
objective that declares ``fake_score`` also gets ``auxiliary_losses`` steps on **detached** renders
(``train.fake_steps`` per parameter step, ProlificDreamer K = 1). The driver never branches on a
method's name.

Per step ``i``: (1) set every schedulable scalar to its value at ``i``; (2) fake-score updates;
(3) render a minibatch, objective loss, backward, non-finite guard, optimizer step. Every
``eval.every`` steps: metrics against the GMM reference (``metrics.jsonl``, TensorBoard) and a scatter
PNG; every ``train.checkpoint_every`` steps: the loop's atomic checkpoint (parameters, fake score,
both optimizers, RNG states, the objective's JSON and tensor state such as CDS's fixed noise) plus
this driver's own sampling RNG and fake warm-up flag, from which ``resume`` continues exactly.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
from safetensors.torch import save_file

from scoredistill.engine.build import build_teacher, data_std
from scoredistill.engine.io import atomic_dir, atomic_write_text
from scoredistill.engine.loop import Loop
from scoredistill.engine.optim import build_optimizer, role_optimizer
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import Batch, Roles, build_objective, canonical_param
from scoredistill.optimize.fake import ParticleMixtureScore, ViewConditionedDenoiser, build_lora_fake, camera_fake
from scoredistill.optimize.params import (
    CallableRenderer,
    ImageTensor,
    Parameterization,
    Particles,
    load_callable,
)
from scoredistill.optimize.schedule import Schedule, extract_schedules, parse_schedule


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


def build_parameterization(pc: dict, teacher, seed: int, splats: dict | None = None) -> Parameterization:
    g = torch.Generator().manual_seed(seed + 777)
    if pc["kind"] == "splats":  # 3D Gaussian splats from orbit cameras (optimize/splats.py, docs/3d.md)
        from scoredistill.config import defaults
        from scoredistill.optimize.config import SplatsConfig
        from scoredistill.optimize.splats import build_splats

        cls = item_classes(pc["classes"], pc["n"], teacher.num_classes) if pc["classes"] is not None else None
        return build_splats(pc, {**defaults(SplatsConfig), **(splats or {})}, teacher, seed, cls)
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


class PriorOptimizer(Loop):
    """Optimize a parameterization under a teacher with any objective of the library."""

    progress_label = "optimize"

    def __init__(self, cfg: dict, run_dir: str | None = None, log=print,
                 param: Parameterization | None = None):
        super().__init__(cfg, run_dir, log)
        tc = cfg["train"]
        self.seed()
        convention = cfg["teacher"].get("guidance_convention", "canonical")
        obj_cfg, self.obj_schedules = extract_schedules(cfg["objective"], "objective")
        if self.obj_schedules:  # a schedule's end is checked like its start (a t_min ending at 1.5 ran silently)
            build_objective(extract_schedules(cfg["objective"], "objective", end=True)[0], convention)
        self.obj_schedules = {k: sch.map(functools.partial(canonical_param, k, convention=convention))
                              for k, sch in self.obj_schedules.items()}
        self.objective = build_objective(obj_cfg, convention)
        tcfg = cfg["teacher"]
        if cfg["params"]["kind"] == "splats":  # a text teacher gets the view-dependent prompts (optimize/splats.py)
            from scoredistill.optimize.splats import view_prompt_section

            tcfg = view_prompt_section(tcfg, cfg.get("splats"))
        self.teacher, self.reference = build_teacher(tcfg)
        if tcfg is not cfg["teacher"] and "process" in tcfg:  # the process read from the scheduler
            cfg["teacher"]["process"] = tcfg["process"]
        self.teacher.requires_grad_(False).eval().to(self.device)
        param = param or build_parameterization(cfg["params"], self.teacher, tc["seed"], cfg.get("splats"))
        self.param = param.to(self.device)
        self.lr_schedules: dict[str, Schedule] = {}
        for k in ("lr", "fake_lr"):
            sch = parse_schedule(tc[k], f"train.{k}")
            if sch is not None:
                self.lr_schedules[k] = sch
        lr = self.lr_schedules["lr"](0) if "lr" in self.lr_schedules else tc["lr"]
        # a parameterization may ask for its own groups (per-kind rates of Gaussian splats)
        groups = self.param.optimizer_groups(lr) if hasattr(self.param, "optimizer_groups") else self.param.parameters()
        optimizers = {"params": build_optimizer(role_optimizer(tc, "optimizer"), groups, lr,
                                                tc["betas"], tc["weight_decay"], eps=tc["eps"])}
        if hasattr(self.param, "attach_optimizer"):  # it replaces parameters (densification) and tells it
            self.param.attach_optimizer(optimizers["params"])
        self.modules = {"params": self.param}
        self.fake = None
        if "fake_score" in self.objective.requirements():
            fc = cfg["fake_score"]
            if fc["kind"] == "lora":  # ProlificDreamer: a LoRA on the teacher's own network
                self.fake = build_lora_fake(self.teacher, fc, getattr(self.param, "plain_prompt", None),
                                            camera_fake(self.param, fc))
                self.fake.to(self.device)
            elif fc["kind"] == "particles":  # the exact particle-mixture score of splat particles
                self.fake = ParticleMixtureScore(self.param, self.teacher.process)
            else:
                sd = fc["sigma_data"] if fc["sigma_data"] is not None else data_std(self.teacher, self.reference)
                t = self.teacher
                views = self.param.view_space()
                camera = camera_fake(self.param, fc)
                self.fake = ViewConditionedDenoiser(t.process, t.data_shape, t.num_classes, views, fc["width"],
                                                    fc["depth"], sd, camera=camera).to(self.device)
                self.fake.camera_view = getattr(self.param, "camera_view", None) if views else None
        if self.fake is not None and any(True for _ in self.fake.parameters()):  # a learned fake trains
            flr = self.lr_schedules["fake_lr"](0) if "fake_lr" in self.lr_schedules else tc["fake_lr"]
            # the critic keeps torch's eps and no decay: train.eps / train.weight_decay are the parameters'
            optimizers["fake_score"] = build_optimizer(role_optimizer(tc, "fake_optimizer", "optimizer"),
                                                       self.fake.parameters(), flr, tc["fake_betas"])
            self.modules["fake_score"] = self.fake
        self._set_optimizers(optimizers)
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
        self.warmed = False
        self._preflight()

    def _preflight(self):
        """One throwaway objective call on two items (own RNG, no step), so that a config the objective
        rejects at call time (e.g. a class-conditional method without classes) fails before a run folder
        is written."""
        index = self.param.sample_index(None, torch.Generator().manual_seed(0))[:2]
        rng = torch.Generator().manual_seed(0)
        with torch.no_grad():
            r = self.param.render(index.to(self.device))
        b = Batch(x=r.x, cond=r.cond, view=r.view, index=index, num_items=self.param.num_items, rng=rng,
                     step=0)
        with torch.no_grad():
            if "fake_score" in self.optimizers:
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
                    group["lr"] = sch(step) * group.get("lr_scale", 1.0)
                values[f"train.{k}"] = sch(step)
        return values

    # -- one phase with guards ---------------------------------------------------------------------------
    def roles(self) -> Roles:
        return Roles(teacher=self.teacher, fake=self.fake)

    def _batch(self, rendered, index) -> Batch:
        return Batch(x=rendered.x, cond=rendered.cond, view=rendered.view, index=index,
                        num_items=self.param.num_items, rng=self.rng, step=self.step)

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
        if not ok:
            opt.zero_grad(set_to_none=True)
        self._guard([role], ok)
        if ok:
            opt.step()
        return ok

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
        if "fake_score" in self.optimizers:
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
            if hasattr(self.param, "after_step"):  # e.g. densify-and-prune of Gaussian splats
                for k, v in self.param.after_step(self.step + 1).items():
                    self._record(k, v)
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
        if hasattr(self.param, "eval_images"):  # a 3D parameterization evaluates itself (optimize/splats.py)
            return self._evaluate_views()
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

    def _evaluate_views(self) -> dict:
        n = self.cfg["splats"]["eval_views"]
        res = {"step": self.step, **self.param.evaluate(self.teacher, n)}
        if self.cfg["eval"]["plots"] and self.run_dir is not None:
            from scoredistill.viz.images import image_grid_panels

            imgs = self.param.eval_images(n)
            panels = []
            if hasattr(self.teacher, "renders"):
                cond = self.param.eval_cameras(n).as_cond()
                truth = self.teacher.renders(cond).permute(1, 0, 2, 3, 4).float()
                panels += [(f"teacher scene {k}", truth[k]) for k in range(len(truth))]
            panels += [(f"particle {p}, step {self.step}", 2 * imgs[p] - 1) for p in range(len(imgs))]
            image_grid_panels(panels, os.path.join(self.run_dir, "samples", f"step_{self.step:07d}.png"),
                              nrow=min(n, 4), panel_inches=2.6)
        return res

    # -- outputs & checkpoints -----------------------------------------------------------------------------
    def _extra_meta(self) -> dict:
        return {"warmed": self.warmed}

    def _extra_rngs(self) -> dict[str, torch.Tensor]:
        return {"train": self.rng.get_state()}

    def _load_extra(self, meta: dict, rngs: dict) -> None:
        self.rng.set_state(rngs["train"])
        self.warmed = bool(meta.get("warmed", True))

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
            if hasattr(self.param, "write_outputs"):  # scene.ply of Gaussian splats
                self.param.write_outputs(tmp)
        for f in os.listdir(os.path.join(self.run_dir, ".export")):
            os.replace(os.path.join(self.run_dir, ".export", f), os.path.join(self.run_dir, f))

    def report(self, res: dict, wall_s: float) -> str:
        """``report.md``: the final metrics and scatter; returns a one-line summary."""
        title = f"# scoredistill optimize: {self.objective.name} on {self.param.kind} ({self.param.num_items} items)"
        lines = [title,
                 "", f"steps: {self.step}, wall: {res.get('wall_s', wall_s):.1f} s", "",
                 "| metric | value |", "|---|---|"]
        for k, v in res.items():
            if isinstance(v, (int, float)) and k not in ("step", "wall_s"):
                lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        samples = os.path.join(self.run_dir, "samples")
        pngs = sorted(os.listdir(samples)) if os.path.isdir(samples) else []
        if pngs:
            lines += ["", f"![final](samples/{pngs[-1]})"]
        if hasattr(self.param, "eval_images"):  # 3D: a turntable of particle 0 and its scene files
            from scoredistill.viz.images import save_gif

            frames = self.param.eval_images(self.cfg["splats"]["turntable"])[0]
            save_gif(frames, os.path.join(self.run_dir, "turntable.gif"))
            lines += ["", "![turntable](turntable.gif)", "",
                      "scene: `scene.ply` (3DGS layout; `scoredistill render RUN_DIR --views N --out DIR`)"]
        atomic_write_text(os.path.join(self.run_dir, "report.md"), "\n".join(lines) + "\n")
        shown = ("precision", "sw2", "spread_ratio", "mode_spread_ratio", "class_accuracy", "psnr", "chamfer", "janus",
                 "view_accuracy")
        summary = ", ".join(f"{k} {res[k]:.3f}" for k in shown if isinstance(res.get(k), float))
        return f"step {self.step}: {summary}" if summary else f"step {self.step}"
