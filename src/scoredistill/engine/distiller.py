"""The generator-distillation engine: a :class:`~scoredistill.engine.loop.Loop` that trains a one- or
few-step generator against a frozen teacher.

Owns the roles (generator, fake score, discriminator, EMA), their optimizers, update schedule, clipping,
micro-batching over processes, FSDP sharding and evaluation; the loop (cadence, guard counters, metrics,
checkpoints, resume) is the base class's. It never branches on a method's name: everything
method-specific comes from the objective's ``requirements()``, ``generator_loss`` and ``auxiliary_losses``.

Update schedule per iteration ``i`` (explicit ratio semantics; DMD2, arXiv:2405.14867):
the generator is updated when ``i % train.generator_every == 0``; auxiliary roles (fake score,
discriminator) are updated on every other iteration, and also on generator iterations when
``train.fake_on_generator_steps`` is true (official DMD2: ``generator_every: 5`` => 5 fake updates
per generator update; FastGen/rCM semantics: set it false => 4:1).

Stages before distillation, each a fixed number of iterations so the stage is a function of the iteration
(checkpointed with it, unchanged when a resumed run gets more steps): ``generator.init_steps`` of teacher
score matching of the student's denoiser (MSD, arXiv 2410.23274), then, for an objective that requires
``teacher_path``, the recording of the path (engine/teacher_path.py). The update schedule above counts
iterations from the start of distillation.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import torch

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
    student_denoiser,
)
from scoredistill.engine.dist import Dist
from scoredistill.engine.loop import Loop
from scoredistill.engine.optim import build_optimizer, role_optimizer
from scoredistill.engine.precision import Precision
from scoredistill.engine.report import write_report
from scoredistill.engine.schedule import build_schedulers
from scoredistill.errors import ConfigError, TrainingAborted  # noqa: F401 (re-exported)
from scoredistill.models.denoiser import Denoiser
from scoredistill.models.generators import EMA
from scoredistill.models.registry import save_model
from scoredistill.objectives.base import DEFAULT_FAKE_TIME, Batch, Roles, build_objective
from scoredistill.objectives.common import denoising_loss


class Distiller(Loop):
    step_name = "iteration"
    progress_label = "distill"

    def __init__(self, cfg: dict, run_dir: str, log=print):
        super().__init__(cfg, run_dir, log)
        tc = cfg["train"]
        self.precision = Precision(tc["precision"], self.device)
        if tc["deterministic"]:
            # CUDA's default kernels (atomics, autotuned convolutions) differ run to run, so a resumed GPU
            # run drifts ~1e-4 from an uninterrupted one; these settings make it bit-exact at some speed cost
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.dist = Dist(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        per_rank = tc["micro_batch"] or tc["batch_size"] // self.dist.world
        if tc["batch_size"] % (per_rank * self.dist.world):
            raise ConfigError("train.micro_batch", f"train.batch_size ({tc['batch_size']}) must be a multiple of "
                              f"micro_batch ({per_rank}) x processes ({self.dist.world})")
        self.micro = per_rank
        self.n_micro = tc["batch_size"] // per_rank
        self.seed()
        self.objective = build_objective(cfg["objective"], cfg["teacher"].get("guidance_convention", "canonical"))
        self.teacher, self.reference = build_teacher(cfg["teacher"])
        self.teacher.requires_grad_(False).eval()
        self.objective.check_teacher(self.teacher)
        req = self.objective.requirements()
        self.requirements = req
        if "class_conditional" in req and not self.teacher.num_classes:
            raise ConfigError("teacher", f"objective {self.objective.name} with these settings needs a "
                              "class-conditional teacher; accepted: preset ring8_cond, or teacher.classes")
        phases = self.objective.phase_split if "experts" in req else None
        self.generator = build_generator(cfg["generator"], self.teacher, "two_time_student" in req,
                                         "signed_time_student" in req, phases).to(self.device)
        split = getattr(getattr(self.generator, "denoiser", None), "split", None)  # a student with experts
        self.fake = build_fake(cfg["fake_score"], self.teacher, data_std(self.teacher, self.reference), split).to(
            self.device) if "fake_score" in req or "discriminator" in req else None
        self.disc = build_discriminator(self.fake, **self.objective.discriminator_arch()).to(
            self.device) if "discriminator" in req else None
        self._check_rollout(req)
        self._build_stages(cfg, req)
        # placed after the copies above: an offloaded teacher's weights live in its hooks, not its parameters
        self._place_teacher(tc["teacher_offload"])
        self.evaluator = build_evaluator(self.teacher, self.reference, tc["seed"], cfg["eval"])
        self.ema = EMA(self.generator, tc["ema"]) if tc["ema"] > 0 else None
        # consistency objectives: the student's denoiser and its frozen target (an exact copy or an EMA)
        self.student_denoiser = student_denoiser(self.generator, self.objective) if "consistency_target" in req \
            else None
        self.target = EMA(self.student_denoiser, self.objective.target_decay()) if self.student_denoiser is not None \
            else None
        # two-stage objectives: a frozen copy of the student as it was when the stage switched (checkpointed)
        self.snapshot = EMA(self.student_denoiser, 0.0) if "stage_snapshot" in req and self.target is not None \
            else None
        self.fsdp = self._shard(cfg) if self.dist.enabled else None
        self._gen = torch.compile(self.generator) if tc["compile"] else self.generator

        def opt(keys, params, lr, betas):
            # CPU: the multi-tensor implementation (torch's default there is the per-parameter Python loop);
            # it gives bit-identical updates (tests/engine/test_step_overhead.py) at a fraction of the overhead
            return build_optimizer(role_optimizer(tc, *keys), params, lr, betas or tc["betas"], tc["weight_decay"],
                                   foreach=True if self.device.type == "cpu" else None)

        optimizers = {"generator": opt(("optimizer",), self.generator.parameters(), tc["lr"], tc["betas"])}
        if self.fake is not None:
            optimizers["fake_score"] = opt(("fake_optimizer", "optimizer"), self.fake.parameters(),
                                           tc["fake_lr"] or tc["lr"], tc["fake_betas"])
        if self.disc is not None:
            optimizers["discriminator"] = opt(("disc_optimizer", "fake_optimizer", "optimizer"), self.disc.parameters(),
                                              tc["disc_lr"] or tc["fake_lr"] or tc["lr"],
                                              tc["disc_betas"] or tc["fake_betas"])
        self._set_optimizers(optimizers)
        self.schedulers = build_schedulers(self.optimizers, tc)
        self.aux_roles = [r for r in ("fake_score", "discriminator") if r in self.optimizers]
        self.modules = {"generator": self.generator}
        if self.ema is not None:
            self.modules["ema"] = self.ema
        if self.fake is not None:
            self.modules["fake_score"] = self.fake
        if self.disc is not None:
            self.modules["discriminator"] = self.disc
        if self.target is not None:
            self.modules["target"] = self.target
        if self.snapshot is not None:
            self.modules["snapshot"] = self.snapshot

        # data the objective declared; drawn from separately seeded generators so a resume rebuilds them
        self.real = self.real_cond = None
        if "real_data" in req:
            if tc["real_data"] in (None, "none"):
                raise ConfigError("train.real_data", f"objective {self.objective.name} with these settings needs "
                                  "real samples; accepted: teacher, PATH.npy")
            self.real, self.real_cond = load_real_data(tc["real_data"], self.teacher, self.reference,
                                                       tc["real_pool"], tc["seed"], self.log)
        elif isinstance(tc["real_data"], str) and tc["real_data"].endswith(".npy") and not os.path.isfile(
                tc["real_data"]):  # unread by this objective, but a path that names nothing is a typo
            raise ConfigError("train.real_data", f"file not found: {tc['real_data']} (objective "
                              f"{self.objective.name} reads no real samples; accepted: teacher, none or an existing "
                              "PATH.npy)")
        self.init_pool = None
        if self.init_steps:  # the teacher's samples that teacher score matching noises
            self.init_pool = load_real_data("teacher", self.teacher, self.reference, tc["real_pool"], tc["seed"],
                                            self.log)
        self.ode = None
        if "ode_pairs" in req:
            self.ode = make_ode_pairs(self.teacher, tc["ode_pairs"], tc["ode_steps"], tc["seed"],
                                      self.objective.ode_guidance())
        self._param_cache: dict[str, tuple] = {}
        eg = torch.Generator().manual_seed(tc["seed"] + 12345)
        n_eval = cfg["eval"]["n_samples"]
        self.eval_z = torch.randn(n_eval, *self.teacher.data_shape, generator=eg)
        self.eval_cond = sample_classes(self.teacher.num_classes, n_eval, eg)
        self._spread_ref = None

    # -- loop hooks ---------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def _barrier(self) -> None:
        self.dist.barrier()

    def _all_true(self, ok: bool) -> bool:
        return self.dist.all_true(ok)

    def _before_evaluate(self) -> None:
        self._sync_student()

    def _on_start(self) -> None:
        self._spread_ref = None

    def _check_rollout(self, req: set) -> None:
        """An objective that requires ``rollout`` reads the trained step of a K-step student
        (``Batch.rollout``), in one of its ``rollout_modes``."""
        self._last_rollout = None
        if "rollout" not in req:
            return
        name = self.objective.name
        if not hasattr(self.generator, "train_output"):
            raise ConfigError("generator.steps", f"objective {name} trains the steps of a K-step native student "
                              "(docs/fewstep.md); accepted: generator.steps >= 1 or generator.timesteps with "
                              "generator.kind mlp, multi or teacher")
        modes = self.objective.rollout_modes
        if modes and self.generator.rollout.mode not in modes:
            raise ConfigError("generator.rollout", f"objective {name} needs re-noising by {' or '.join(modes)}, got "
                              f"{self.generator.rollout.mode!r}; accepted: {', '.join(modes)}")

    def _build_stages(self, cfg: dict, req: set) -> None:
        """The stages before distillation (module docstring), checked against ``train.steps``."""
        steps = cfg["train"]["steps"]
        self.init_steps = cfg["generator"]["init_steps"]
        self.init_denoiser = None
        if self.init_steps:
            self.init_denoiser = getattr(self.generator, "denoiser", None)
            if not isinstance(self.init_denoiser, Denoiser):
                raise ConfigError("generator.init_steps", "teacher score matching trains the student's denoiser "
                                  "D(x_t, t); accepted: 0, or a time-conditioned student (generator.steps >= 1 or "
                                  "generator.kind: teacher)")
            if self.init_steps >= steps:
                raise ConfigError("generator.init_steps", f"must be below train.steps ({steps}), got "
                                  f"{self.init_steps}")
        self.plan = self.objective.path_plan() if "teacher_path" in req else None
        self.path = None
        if "rollout" in req or getattr(self.generator, "rollout", None) is not None:  # every K-step student
            self.objective.check_rollout(self.generator.rollout, steps - self.init_steps - (
                self.plan.record_steps if self.plan is not None else 0))
        if self.plan is None:
            return
        name = self.objective.name
        if cfg["fake_score"]["kind"] not in ("teacher", "full"):
            raise ConfigError("fake_score.kind", f"objective {name} fine-tunes the fake score away from the teacher "
                              f"to record its path, so it starts as the teacher; accepted: teacher, full")
        if self.init_steps + self.plan.length() >= steps:
            field = "objective.hold_steps" if self.plan.checkpoints > 1 else "objective.record_steps"
            raise ConfigError(field, f"the teacher path takes {self.plan.length()} iterations (record_steps + "
                              f"(path_checkpoints - 1) x hold_steps) after generator.init_steps "
                              f"({self.init_steps}) before the teacher is the real score; it must be below "
                              f"train.steps ({steps})")
        from scoredistill.engine.teacher_path import TeacherPath

        self.path = TeacherPath(self.plan, self.teacher, self.fake, self.run_dir, self.dist.is_main,
                                self.dist.barrier)

    def _stage(self) -> tuple[str, int]:
        """``(stage, iteration within it)`` of the current iteration: init, record or distill."""
        i = self.step - self.init_steps
        if i < 0:
            return "init", self.step
        if self.plan is not None:
            if i < self.plan.record_steps:
                return "record", i
            i -= self.plan.record_steps
        return "distill", i

    def _place_teacher(self, offload: bool) -> None:
        """Move the frozen teacher to the device, or with ``train.teacher_offload`` keep its weights in
        CPU memory and stream them to the device for each forward (accelerate's ``cpu_offload``): the
        teacher then costs no device memory beyond one pass's weights, at the price of host-device
        copies every call. On a CPU run offloading is the same as not offloading."""
        if not offload or self.device.type == "cpu":
            self.teacher.to(self.device)
            return
        if getattr(self.fake, "shares_teacher_module", False) or getattr(self.generator, "shares_teacher_module",
                                                                           False):
            raise ConfigError("train.teacher_offload", "cannot offload a teacher whose module is shared with a "
                              "LoRA role; accepted: false, or fake_score.kind/generator.kind full")
        try:
            from accelerate import cpu_offload
        except ImportError:
            raise ConfigError("train.teacher_offload",
                              "needs accelerate (pip install scoredistill[diffusers])") from None
        cpu_offload(self.teacher, execution_device=self.device)

    def _shard(self, cfg):
        """FSDP2-shard the trained roles in place before the optimizers see their parameters (engine/fsdp.py)."""
        from scoredistill.engine.fsdp import wanted

        if not wanted(cfg["train"].get("fsdp", False)):
            return None
        cfg["train"]["fsdp"] = True  # config.yaml records what ran, also when accelerate's config asked for it
        if self.target is not None:
            raise ConfigError("train.fsdp", f"objective {self.objective.name} keeps a target copy of the student, "
                              "which is not sharded yet; accepted: false")
        if self.path is not None or self.init_steps:
            raise ConfigError("train.fsdp", "the stages before distillation (generator.init_steps, a teacher path) "
                              "are not sharded yet; accepted: false")
        for sec in ("generator", "fake_score"):
            if cfg[sec]["kind"] == "lora":  # a LoRA critic shares the (replicated) teacher's base weights
                raise ConfigError("train.fsdp", f"{sec}.kind: lora is not supported with FSDP; accepted: "
                                  "a full copy (teacher/full) or mlp")
        from scoredistill.engine.fsdp import Sharder, check_shardable

        check_shardable({"generator": self.generator, "fake score": self.fake})
        sharder = Sharder(self.device, self.dist.world)
        # rank 0 evaluates, samples and exports an unsharded replica of the student (refreshed by _sync_student)
        student = self.ema.model if self.ema is not None else self.generator
        self._replica = copy.deepcopy(student) if self.dist.is_main else None
        self._replica_step = None
        for m in (self.generator, self.fake, self.disc, self.ema.model if self.ema is not None else None):
            if m is not None:
                sharder.shard(m)
        return sharder

    def _sync_student(self):
        """Under FSDP, refresh rank 0's unsharded student from the shards; a collective (all ranks call it)."""
        if self.fsdp is None or self._replica_step == self.step:
            return
        src = self.ema.model if self.ema is not None else self.generator
        sd = self.fsdp.full_state(src.state_dict(), keep=self.dist.is_main)
        if sd is not None:
            self._replica.load_state_dict(sd)
        self._replica_step = self.step

    # -- roles -------------------------------------------------------------------------------------
    def roles(self, teacher: Denoiser | None = None) -> Roles:
        """The networks the objective reads; ``teacher`` replaces the real score (a teacher-path checkpoint)."""
        return Roles(teacher=teacher if teacher is not None else self.teacher, fake=self.fake,
                     discriminator=self.disc, generator=self.generator, student=self.student_denoiser,
                     target=self.target.model if self.target is not None else None,
                     snapshot=self.snapshot.model if self.snapshot is not None else None)

    def _params(self, name) -> list:
        """All parameters of role ``name`` (cached: walking the module tree every phase cost ~2 % of a
        toy iteration; rebuilt if the role's module object is replaced)."""
        mod = self.modules[name]
        hit = self._param_cache.get(name)
        if hit is None or hit[0] is not mod:
            hit = self._param_cache[name] = (mod, list(mod.parameters()))
        return hit[1]

    @contextmanager
    def _frozen(self, names):
        ps = [p for n in names if n in self.modules for p in self._params(n)]
        for p in ps:  # = Module.requires_grad_(False) on each role, without the module walk
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in ps:
                p.requires_grad_(True)

    def _batch(self, x, z, cond, rng) -> Batch:
        b = Batch(x=x, cond=cond, z=z, rng=rng, step=self.step, rollout=self._last_rollout)
        bs = x.shape[0]
        if self.real is not None:
            idx = torch.randint(0, len(self.real), (bs,), generator=rng)
            b.real = self.real[idx].to(self.device)
            b.real_cond = self.real_cond[idx].to(self.device) if self.real_cond is not None else None
        if self.ode is not None:
            oz, ox, oc = self.ode
            idx = torch.randint(0, len(oz), (bs,), generator=rng)
            b.ode_z, b.ode_x = oz[idx].to(self.device), ox[idx].to(self.device)
            b.ode_cond = oc[idx].to(self.device) if oc is not None else None
        return b

    def _micro_batches(self, phase: int):
        """This rank's micro-batches ``(rng, z, cond)`` of the current iteration and phase.

        Randomness is counter-based: micro-batch ``i`` of iteration ``k`` always draws from a
        generator seeded by ``(seed, k, phase, i)``, whichever process computes it. So the global
        batch — and the summed gradient — does not depend on the number of processes or on
        ``train.micro_batch``, and a resume needs no RNG state.
        """
        tc = self.cfg["train"]
        m = self.micro
        for i in range(self.dist.rank, self.n_micro, self.dist.world):
            rng = torch.Generator().manual_seed(hash((tc["seed"], self.step, phase, i)) & (2**62 - 1))
            z = torch.randn(m, *self.teacher.data_shape, generator=rng)
            if self.cfg["generator"]["z_std"] != 1:
                z = z * self.cfg["generator"]["z_std"]
            cond = sample_classes(self.teacher.num_classes, m, rng)
            yield rng, z.to(self.device), (cond.to(self.device) if cond is not None else None)

    # -- one optimisation phase with guards ----------------------------------------------------------
    def _phase(self, roles: list[str], phase: int, compute) -> bool:
        """Accumulate ``compute(rng, z, cond) -> out`` over micro-batches and ranks, then guard,
        clip and step ``roles``. Returns whether the step was taken.

        Host syncs: a single process checks its last micro-batch's loss after its backward, together
        with the gradient norms, in one device-to-host transfer (earlier micro-batches, and every
        micro-batch under several processes, are checked before their backward). A non-finite last
        loss then leaves exactly the state the early check left: gradients discarded, the step
        skipped and counted, its diagnostics and gradient norms not recorded."""
        for r in roles:
            self.optimizers[r].zero_grad(set_to_none=True)
        ok = True
        outs = []
        deferred = None
        n_local = len(range(self.dist.rank, self.n_micro, self.dist.world))
        for i, (rng, z, cond) in enumerate(self._micro_batches(phase)):
            out = compute(rng, z, cond)
            if out is None:
                return False
            loss = out["loss"]
            if i == n_local - 1 and not self.dist.enabled and loss.requires_grad:
                (loss / self.n_micro).backward()  # finiteness checked below, with the gradient norms
                deferred = out
                continue
            finite = bool(torch.isfinite(loss))
            ok = ok and finite
            if not finite and self.fsdp is None:
                break
            # under FSDP every rank runs every forward and backward (they hold collectives); the guard below
            # discards this step on all ranks anyway
            (loss / self.n_micro).backward()
            if finite:
                outs.append(out)
        ok = self.dist.all_true(ok)
        params = {r: [p for p in self._params(r) if p.requires_grad] for r in roles}
        if ok:
            self.dist.sum_grads([p for r in roles for p in params[r]])
            clip = self.cfg["train"]["grad_clip"]
            clip_fn = self.fsdp.clip_grad_norm if self.fsdp is not None else torch.nn.utils.clip_grad_norm_
            norms = {}
            for r in roles:
                ps = [p for p in params[r] if p.grad is not None]
                if ps:
                    norms[r] = clip_fn(ps, clip if clip else float("inf"))
            checks = ([deferred["loss"].detach()] if deferred is not None else []) + list(norms.values())
            flags = torch.stack([torch.isfinite(c) for c in checks]).tolist() if checks else []  # the sync
            if deferred is not None:
                ok = flags.pop(0)
                if ok:
                    outs.append(deferred)
            if ok:
                for (r, norm), fin in zip(norms.items(), flags):
                    self._record(f"grad_norm/{r}", norm)
                    ok = ok and fin
        for out in outs:
            for k, v in out.items():
                if k != "loss":
                    self._record(k, v)
        if not ok:
            for r in roles:
                self.optimizers[r].zero_grad(set_to_none=True)
        self._guard(roles, ok)
        if not ok:
            return False
        for out in outs:
            self._record("loss_gen" if "generator" in roles else "loss_aux", out["loss"])
        for r in roles:
            self.optimizers[r].step()
        return True

    def _generate(self, z, cond, rng):
        """The generator's samples for one micro-batch. A K-step student re-noises between its steps from a
        generator derived from the micro-batch's own (counter-based) one, so its rollout noise too is the
        same whatever the number of processes, and the objective's draws from ``rng`` are unchanged."""
        if getattr(self.generator, "takes_noise_generator", False):
            g = torch.Generator().manual_seed(hash((rng.initial_seed(), 7)) & (2**62 - 1))
            if "rollout" in self.requirements:  # the objective reads the trained step itself (Batch.rollout)
                self._last_rollout = self.generator.train_output(z, cond, generator=g)
                return self._last_rollout.x0
            return self._gen(z, cond, generator=g)
        return self._gen(z, cond)

    def train_step(self):
        tc = self.cfg["train"]
        stage, i = self._stage()
        if hasattr(self.generator, "set_rollout_seed"):  # multi-step students: same rollout on every rank
            seed = hash((tc["seed"], self.step, -1)) & (2**62 - 1)
            self.generator.set_rollout_seed(seed)
            k = self.objective.rollout_step(i, self.generator.rollout, seed) if stage == "distill" else None
            if k is not None:  # the objective's schedule of steps (a function of the iteration: resume-exact)
                self.generator.set_rollout_step(k)
        if stage == "init":
            self._init_step()
        elif stage == "record":  # the frozen initial generator's samples train the fake score only
            self._aux_step(self.roles())
            k = self.plan.recorded_after(i + 1)
            if k is not None:
                self.path.record(k, self.fake)
        else:
            if i == 0 and self.init_steps:
                self._end_init()
            self._distill_step(i, self.path.network(self.plan.index(i)) if self.path is not None else None)
        self.step += 1
        for sched in self.schedulers.values():
            sched.step()

    def _aux_step(self, roles: Roles) -> None:
        obj = self.objective

        def aux(rng, z, cond):
            with torch.no_grad(), self.precision.autocast():
                x = self._generate(z, cond, rng)
            with self.precision.autocast():
                return obj.auxiliary_losses(self._batch(x.float(), z, cond, rng), roles)

        with self._frozen(["generator"]):
            self._phase(self.aux_roles, 0, aux)

    def _distill_step(self, i: int, real: Denoiser | None) -> None:
        """Iteration ``i`` of distillation; ``real`` replaces the teacher as the real score."""
        tc = self.cfg["train"]
        obj = self.objective
        gen_step = i % tc["generator_every"] == 0
        do_aux = bool(self.aux_roles) and (not gen_step or tc["fake_on_generator_steps"])
        roles = self.roles(real)
        if do_aux:
            self._aux_step(roles)
        if gen_step:
            def gen(rng, z, cond):
                with self.precision.autocast():
                    x = self._generate(z, cond, rng) if obj.uses_generator_samples else z
                    return obj.generator_loss(self._batch(x.float(), z, cond, rng), roles)

            with self._frozen(self.aux_roles):
                stepped = self._phase(["generator"], 1, gen)
            if stepped and self.ema is not None:
                self.ema.update(self.generator)
            if stepped and self.target is not None:
                self.target.decay = obj.target_decay(self.step)  # a schedule of the iteration (resume-exact)
                self.target.update(self.student_denoiser)
            if stepped and self.snapshot is not None and self.step < obj.snapshot_step():
                self.snapshot.update(self.student_denoiser)

    def _init_step(self) -> None:
        """Teacher score matching (MSD, arXiv 2410.23274): the student's denoiser regresses the teacher's
        ``D(x_t, t, c)`` at noised teacher samples ``x_t = a_t x0 + s_t eps``, ``t ~ U[0, 1]``, EDM-weighted."""
        pool, pool_cond = self.init_pool
        den = self.init_denoiser
        sd = float(getattr(den, "sigma_data", 1.0))

        def tsm(rng, z, cond):
            idx = torch.randint(0, len(pool), (z.shape[0],), generator=rng)
            x0 = pool[idx].to(self.device)
            c = pool_cond[idx].to(self.device) if pool_cond is not None else None
            t = DEFAULT_FAKE_TIME(len(idx), self.teacher.process, generator=rng, device=self.device)
            with self.precision.autocast():
                loss = denoising_loss(den, x0, c, t, rng, sd, target=self.teacher)
            return {"loss": loss, "loss_init": loss.detach()}

        with self._frozen(self.aux_roles):
            self._phase(["generator"], 2, tsm)

    def _end_init(self) -> None:
        """Distillation starts from the initialised student with fresh optimizer moments (those of the
        regression would scale the first distillation updates) and its EMA and consistency target reset to it."""
        self.optimizers["generator"].state.clear()
        if self.ema is not None:
            self.ema.model.load_state_dict(self.generator.state_dict())
        if self.target is not None:  # else the first consistency targets come from the untrained student
            self.target.model.load_state_dict(self.student_denoiser.state_dict())

    # -- evaluation ----------------------------------------------------------------------------------
    def student(self):
        if self.fsdp is not None:
            return self._replica  # rank 0 only; current as of the last _sync_student
        return self.ema.model if self.ema is not None else self.generator

    @torch.no_grad()
    def sample(self, z, cond=None, use_ema=True):
        if not use_ema and self.ema is not None and self.fsdp is not None:
            raise RuntimeError("under FSDP only the student (EMA) has an unsharded copy to sample from")
        g = self.student() if use_ema else self.generator
        was = g.training
        g.eval()  # a K-step student runs all its steps in eval mode (one backward-simulated step in training)
        try:
            return g(z.to(self.device), cond.to(self.device) if cond is not None else None).cpu()
        finally:
            g.train(was)

    def evaluate(self) -> dict:
        x = self.sample(self.eval_z, self.eval_cond)
        res = {"step": self.step, **self.evaluator.metrics(x, self.eval_cond)}
        self._collapse_check(x)
        if self.cfg["eval"]["plots"]:
            ref = self.evaluator.reference(len(x), self.eval_cond, seed=0)
            panels = ([("target", ref)] if ref is not None else []) + [(f"student step {self.step}", x)]
            self.evaluator.plot(panels, os.path.join(self.run_dir, "samples", f"step_{self.step:07d}.png"))
        return res

    # -- checkpoints ----------------------------------------------------------------------------------
    def _checkpoint_state(self):
        """Under FSDP every rank must call :meth:`save`: the full state is gathered from the shards first
        (same format as without FSDP)."""
        if self.fsdp is None:
            return self.modules, self.optimizers
        self._sync_student()
        keep = self.dist.is_main
        return ({n: self.fsdp.full_state(m.state_dict(), keep) for n, m in self.modules.items()},
                {n: self.fsdp.full_optimizer_state(o, keep) for n, o in self.optimizers.items()})

    def _place(self):
        return self.fsdp.place if self.fsdp is not None else None

    def _extra_meta(self) -> dict:
        meta = {"schedulers": {n: sc.state_dict() for n, sc in self.schedulers.items()}}
        if self.init_steps or self.path is not None:
            stage, i = self._stage()
            meta["stage"] = {"name": stage, "iteration": i}
        if self.path is not None:
            meta["teacher_path"] = {**self.path.state_dict(), "index": self.plan.index(i) if stage == "distill"
                                    else None}
        return meta

    def _load_extra(self, meta: dict, rngs: dict) -> None:
        self._replica_step = None
        if self.path is not None:
            self.path.load_state_dict(meta.get("teacher_path", {}))
        for n, sc in self.schedulers.items():
            if n in meta.get("schedulers", {}):
                sc.load_state_dict(meta["schedulers"][n])

    def export(self) -> None:
        """``generator/``: the student (EMA when on) as a model folder (models/registry.py)."""
        save_model(self.student(), os.path.join(self.run_dir, "generator"),
                   extra={"ema": self.ema is not None, "step": self.step,
                          "data_shape": list(self.teacher.data_shape)})

    def report(self, res: dict, wall_s: float) -> str:
        """``report.md``: baselines vs student (engine/report.py); returns the metrics table."""
        tab, _ = write_report(self, wall_s, self.cfg["eval"]["teacher_steps"])
        return tab

    def _collapse_check(self, x: torch.Tensor) -> None:
        """Warn when the sample spread falls toward zero (mode collapse), relative to the target's
        spread when it is known, else to the first evaluation's."""
        x = x.reshape(x.shape[0], -1).double()
        x = x[torch.isfinite(x).all(1)]
        if len(x) < 2:
            return
        spread = float(x.std(0).mean())
        if self._spread_ref is None:
            ref = self.evaluator.reference(len(x), self.eval_cond, seed=0)
            self._spread_ref = float(ref.reshape(len(ref), -1).double().std(0).mean()) if ref is not None else spread
        if self._spread_ref > 0 and spread < 0.1 * self._spread_ref:
            self.log(f"warning: possible collapse at step {self.step}: sample spread {spread:.3g} is below 10 % "
                     f"of the reference {self._spread_ref:.3g}")

    def train(self, resume: bool = False) -> dict | None:
        """The name this class had before the loop was shared: :meth:`Loop.run`."""
        return self.run(resume)

    def close(self):
        self.dist.close()
