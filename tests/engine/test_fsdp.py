"""FSDP (``train.fsdp``): 2 gloo ranks with sharded roles equal one process; resume; checkpoint compatibility."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import TORCHRUN, cli, gen_weights, needs_torchrun, tiny_config, torchrun_cli
from scoredistill.config import ConfigError, resolve
from scoredistill.engine.fsdp import blocks, wanted
from scoredistill.engine.io import list_checkpoints
from scoredistill.models.mlp import MLPDenoiser, MLPGenerator
from scoredistill.models.multi import MultiStudentGenerator
from scoredistill.process.processes import make_process

CFG = tiny_config(
    # the GAN term adds the discriminator head (a third sharded role) and the fake network's features() path
    objective={"gan_weight_gen": 0.005},
    # micro_batch 16: one micro-batch per rank on 2 ranks, two in sequence on one process (same global batch);
    # grad_clip 0.1 is below every measured gradient norm here, so clipping is active and must agree
    train={"steps": 12, "micro_batch": 16, "keep_checkpoints": 5, "threads": 1, "grad_clip": 0.1, "real_pool": 256},
    eval={"every": 6})


def state(run, step=None):
    cks = list_checkpoints(run)
    folder = cks[-1] if step is None else [c for c in cks if c.endswith(f"step_{step:07d}")][0]
    return load_file(os.path.join(folder, "state.safetensors"))


def max_diff(a, b):
    """Largest |a - b| over the tensors of two checkpoints (RNG state excluded: it never enters the math)."""
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if not k.startswith("rng/")
               and a[k].numel())


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def rewind(src, dst, step):
    """Copy a run folder and drop everything after checkpoint ``step`` (as if it had stopped there)."""
    shutil.copytree(src, dst)
    for c in list_checkpoints(dst):
        if int(os.path.basename(c)[5:]) > step:
            shutil.rmtree(c)


def fsdp_vs_one_process(tmp_path, config: dict) -> float:
    """``config`` run in one process and on 2 gloo ranks with ``train.fsdp``; the largest checkpoint difference."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    ref, run = str(tmp_path / "ref"), str(tmp_path / "fsdp")
    p = cli(["distill", str(cfg), "--out", ref])
    assert p.returncode == 0, p.stderr
    p = torchrun_cli(["distill", str(cfg), "--out", run, "--set", "train.fsdp=true"])
    assert p.returncode == 0, p.stderr[-3000:]
    return max_diff(state(ref), state(run))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    cfg = d / "c.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    p = cli(["distill", str(cfg), "--out", str(d / "ref")])
    assert p.returncode == 0, p.stderr
    p = torchrun_cli(["distill", str(cfg), "--out", str(d / "fsdp"), "--set", "train.fsdp=true"])
    assert p.returncode == 0, p.stderr[-3000:]
    return str(cfg), str(d / "ref"), str(d / "fsdp")


# -- no processes -----------------------------------------------------------------------------------
def test_fsdp_switch_and_plan(monkeypatch):
    assert resolve({})["train"]["fsdp"] is False
    with pytest.raises(ConfigError, match="train.fsdp"):
        resolve({}, ["train.fsdp=maybe"])
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not wanted(False) and wanted(True)
    for v, on in (("true", True), ("1", True), ("True", True), ("false", False), ("0", False), ("", False)):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", v)
        assert wanted(False) is on
    # units: the residual blocks; the rest stays in the root unit
    gen = MLPGenerator(2, 32, 3)
    assert [id(b) for b in blocks(gen)] == [id(b) for b in gen.net.blocks]
    fake = MLPDenoiser(make_process({"kind": "edm"}), 2, 32, 2)
    assert [id(b) for b in blocks(fake)] == [id(b) for b in fake.net.blocks]
    # MSD routes samples to students by label: never split (a rank could skip a student's all-gather)
    assert blocks(MultiStudentGenerator(2, 32, 2, num_classes=8, students=2)) == []


# -- 2 gloo ranks ----------------------------------------------------------------------------------
@needs_torchrun
def test_fsdp_two_ranks_equal_one_process(runs):
    _, ref, run = runs
    with open(os.path.join(run, "config.yaml")) as f:
        assert yaml.safe_load(f)["train"]["fsdp"] is True
    # every role, the EMA and both optimizers' moments, gathered from the shards into the usual format
    d = max_diff(state(ref), state(run))
    a, b = gen_weights(ref), gen_weights(run)
    dg = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |fsdp - 1 process|: checkpoint {d:.3g}, generator/ {dg:.3g}")
    # measured (torch 2.13 CPU): checkpoint 1.2e-7, generator/ 7.5e-9. A parameter used several times in one
    # micro-batch (the fake network in the GAN and denoising terms) accumulates its gradient in another order
    # when the two micro-batches are summed across ranks instead of in one autograd pass
    assert d <= 1e-6 and dg <= 1e-6
    assert {k for k in a} == set(load_file(os.path.join(ref, "generator", "model.safetensors")))
    # the recorded global gradient norms (the clipping input) agree, and clipping was active
    for ma, mb in zip(metrics(ref), metrics(run), strict=True):
        for k in ("grad_norm/generator", "grad_norm/fake_score", "grad_norm/discriminator"):
            assert mb["train"][k] == pytest.approx(ma["train"][k], rel=1e-5), k
        assert ma["train"]["grad_norm/generator"] > CFG["train"]["grad_clip"]


@needs_torchrun
def test_fsdp_resume_equals_uninterrupted(runs, tmp_path):
    _, _, run = runs
    half = str(tmp_path / "half")
    rewind(run, half, 4)
    p = torchrun_cli(["distill", "--resume", half])  # config.yaml says fsdp: true
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = state(run), state(half)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng/"))
    assert [m["step"] for m in metrics(half)] == [m["step"] for m in metrics(run)]


@needs_torchrun
def test_checkpoints_move_between_fsdp_and_replicated(runs, tmp_path):
    _, ref, run = runs
    # an FSDP checkpoint resumed by one process without FSDP ...
    a = str(tmp_path / "a")
    rewind(run, a, 4)
    p = cli(["distill", "--resume", a, "--set", "train.fsdp=false"])
    assert p.returncode == 0, p.stderr[-3000:]
    # ... and a single-process checkpoint resumed on 2 ranks with FSDP
    b = str(tmp_path / "b")
    rewind(ref, b, 8)
    p = torchrun_cli(["distill", "--resume", b, "--set", "train.fsdp=true"])
    assert p.returncode == 0, p.stderr[-3000:]
    da, db = max_diff(state(ref), state(a)), max_diff(state(ref), state(b))
    print(f"max |resumed - 1 process|: fsdp ckpt -> 1 process {da:.3g}, 1-process ckpt -> fsdp {db:.3g}")
    assert da <= 1e-6 and db <= 1e-6


ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
ACCELERATE_FSDP = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1,
                   "num_processes": 2, "machine_rank": 0, "mixed_precision": "no", "use_cpu": False,
                   "fsdp_config": {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"}}


@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate not installed")
def test_accelerate_fsdp_config_turns_fsdp_on(runs, tmp_path):
    """``accelerate launch`` with an FSDP config sets ACCELERATE_USE_FSDP; the recipe needs no change."""
    cfg, _, fsdp = runs
    acc = tmp_path / "fsdp.yaml"
    acc.write_text(yaml.safe_dump(ACCELERATE_FSDP))
    run = str(tmp_path / "acc")
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.pop("ACCELERATE_USE_FSDP", None)
    p = subprocess.run([ACCELERATE, "launch", "--config_file", str(acc), "-m", "scoredistill", "distill", cfg,
                        "--out", run], capture_output=True, text=True, env=e, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(run, "config.yaml")) as f:
        assert yaml.safe_load(f)["train"]["fsdp"] is True
    a, b = state(fsdp), state(run)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng/"))


MSD = {
    "teacher": {"kind": "gmm", "preset": "ring8_cond"},
    "generator": {"kind": "multi", "students": 2, "width": 32, "depth": 2},
    "fake_score": {"width": 32, "depth": 2},
    "objective": {"name": "dmd2"},
    # micro-batches of 4 labels: many leave one student without samples on a rank
    "train": {"steps": 8, "batch_size": 16, "micro_batch": 4, "generator_every": 2, "checkpoint_every": 8,
              "progress": False, "threads": 1, "grad_clip": 0.1},
    "eval": {"every": 8, "n_samples": 64, "plots": False},
}


@pytest.mark.slow  # 20-29 s on the 2-core box (two fresh runs)
@needs_torchrun
def test_fsdp_msd_students_routed_by_label(tmp_path):
    d = fsdp_vs_one_process(tmp_path, MSD)
    print(f"max |fsdp - 1 process| (MSD): {d:.3g}")
    # measured 1.2e-7: two micro-batches per rank are summed per rank first, then across ranks
    assert d <= 1e-5


WORKER = '''
import json, sys, torch, torch.distributed as td
from scoredistill.config import resolve
from scoredistill.engine.distiller import Distiller


class NaNOnRank0(torch.nn.Module):
    """Teacher whose output is NaN on rank 0 only, on every 3rd call: ranks disagree about finiteness."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0
        self.process, self.data_shape, self.num_classes = inner.process, inner.data_shape, inner.num_classes

    def guided(self, x_t, t, cond, w):
        self.calls += 1
        out = self.inner.guided(x_t, t, cond, w)
        return out * float("nan") if td.get_rank() == 0 and self.calls % 3 == 0 else out

    def forward(self, x_t, t, cond=None):
        return self.guided(x_t, t, cond, 1.0)


def local_grads(m):
    return [None if p.grad is None else p.grad.to_local().clone() for p in m.parameters()]


cfg = resolve(json.loads(sys.argv[1]))
d = Distiller(cfg, sys.argv[2])
d.teacher = NaNOnRank0(d.teacher)
seen = {"frozen_during_generator_phase": True, "aux_grads_untouched": True}
gen_loss = d.objective.generator_loss


def watched(batch, roles):
    # inside the generator phase: the auxiliary roles' (sharded) parameters are frozen
    aux = [p for m in (d.fake, d.disc) if m is not None for p in m.parameters()]
    seen["frozen_during_generator_phase"] &= not any(p.requires_grad for p in aux)
    return gen_loss(batch, roles)


d.objective.generator_loss = watched
d._t0 = 0.0
for _ in range(cfg["train"]["steps"]):
    before = local_grads(d.fake) + local_grads(d.disc)  # as the auxiliary phase left them (here: never ran)
    d.train_step()
    after = local_grads(d.fake) + local_grads(d.disc)
    seen["aux_grads_untouched"] &= all((a is None) == (b is None) and (a is None or torch.equal(a, b))
                                       for a, b in zip(before, after))
full = {k: v.full_tensor() for k, v in d.generator.state_dict().items()}
res = {"nonfinite": d.nonfinite, **seen, "trainable_after": all(p.requires_grad for p in d.fake.parameters()),
       "finite": all(bool(torch.isfinite(v).all()) for v in full.values())}
with open(f"{sys.argv[2]}.rank{d.dist.rank}.json", "w") as f:
    json.dump(res, f)
d.close()
'''


@needs_torchrun
def test_fsdp_frozen_roles_and_nonfinite_on_one_rank(tmp_path):
    """Sharded auxiliary roles stay frozen in the generator phase; only rank 0 sees NaN, yet no collective
    hangs and both ranks skip the same steps."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # generator_every 1, fake_on_generator_steps false: every iteration is a pure generator phase, whose GAN term
    # backpropagates *through* the frozen fake network and head: they must not receive gradients
    train = dict(CFG["train"], fsdp=True, generator_every=1, fake_on_generator_steps=False, steps=6)
    cfg = dict(CFG, train=train)
    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script), json.dumps(cfg),
                        str(tmp_path / "run")], capture_output=True, text=True, env=e, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = []
    for r in range(2):
        with open(tmp_path / f"run.rank{r}.json") as f:
            res.append(json.load(f))
    assert res[0]["nonfinite"] == res[1]["nonfinite"]
    assert res[0]["nonfinite"]["generator"] >= 1
    for r in res:
        assert r["frozen_during_generator_phase"] and r["aux_grads_untouched"] and r["trainable_after"]
        assert r["finite"]


def test_fsdp_refuses_experts_a_step_leaves_idle():
    """A K-step student with one expert per phase trains one expert per step; FSDP would hand the others zero
    gradients (its reduce-scatter of unused parameters) and Adam would move them by their momentum, so it is
    refused with one line naming train.fsdp (multi-process training without FSDP keeps them exact:
    tests/objectives/test_phased_dmd_schedule.py)."""
    from scoredistill.engine.build import build_generator, build_teacher
    from scoredistill.engine.fsdp import check_shardable

    cfg = resolve(tiny_config(generator={"steps": 4, "rollout": "ddim", "experts": "per_step"}))
    teacher, _ = build_teacher(cfg["teacher"])
    gen = build_generator(cfg["generator"], teacher)
    with pytest.raises(ConfigError, match="train.fsdp.*experts.*accepted: false"):
        check_shardable({"generator": gen, "fake score": None})
    one = build_generator(resolve(tiny_config(generator={"steps": 4, "rollout": "ddim"}))["generator"], teacher)
    check_shardable({"generator": one, "fake score": None})  # one shared step network: every step trains it


@needs_torchrun
@pytest.mark.long
def test_fsdp_tdm_reads_the_trained_step_like_one_process(tmp_path):
    """TDM reads the trained step's record (``train_output``, an FSDP forward method of the student): 2 gloo ranks
    with sharded roles equal one process (before, the rollout ran on the sharded parameters and stopped)."""
    d = fsdp_vs_one_process(tmp_path, tiny_config(generator={"steps": 4, "rollout": "ddim"}, objective={"name": "tdm"},
                                                  train={"steps": 6, "micro_batch": 16, "threads": 1},
                                                  eval={"every": 6}))
    print(f"max |fsdp - 1 process| (tdm): {d:.3g}")
    assert d <= 1e-5
