"""The one config schema: every recipe resolves, typed sections, the one-line error contract for
malformed input through the command line (exit 2, no traceback, no run folder), ``--resume``
overrides, environment interpolation, and a key reference in docs/recipes.md that matches the code."""

import dataclasses
import glob
import importlib.util
import os

import pytest
import yaml

from helpers import RECIPES, ROOT, cli, run_main
from scoredistill.config import (
    DISTILL,
    ConfigError,
    GeneratorConfig,
    TeacherConfig,
    TrainConfig,
    check_resume_overrides,
    keys,
    load_yaml,
    parse,
    resolve,
    resumable,
    teacher_config,
)
from scoredistill.engine.image_teacher_training import IMAGE_TEACHER, resolve_image_recipe
from scoredistill.engine.teacher_training import TRAIN_TEACHER, resolve_gmm_recipe
from scoredistill.objectives.base import build_objective
from scoredistill.optimize.config import OPTIMIZE
from scoredistill.optimize.config import resolve as resolve_optimize
from scoredistill.optimize.schedule import extract_schedules

ALL_RECIPES = sorted(glob.glob(os.path.join(RECIPES, "**", "*.yaml"), recursive=True))


def _rel(p):
    return os.path.relpath(p, RECIPES)


# -- every recipe resolves with its command's resolver ----------------------------------------------------------
@pytest.mark.parametrize("path", ALL_RECIPES, ids=[_rel(p) for p in ALL_RECIPES])
def test_every_recipe_resolves(path):
    user = load_yaml(path)
    rel = _rel(path)
    if rel.startswith("teachers/"):
        if user["teacher"].get("kind") == "image":
            cfg = resolve_image_recipe(user)
            assert cfg["teacher"]["dataset"] in ("digits", "mnist")
        else:
            teacher, net, tr = resolve_gmm_recipe(user)
            assert isinstance(teacher, TeacherConfig) and net["width"] >= 1 and tr["steps"] >= 1
        return
    optimize = rel.startswith(("optimize/", "3d/"))  # the recipes of `scoredistill optimize`
    if optimize:
        cfg = resolve_optimize(user)
        objective, _ = extract_schedules(cfg["objective"], "objective")
    else:
        cfg = resolve(user)
        objective = cfg["objective"]
    assert set(cfg) == set(OPTIMIZE if optimize else DISTILL)
    # the objective section is checked by the objective's own Params when it is built
    build_objective(objective, cfg["teacher"]["guidance_convention"])
    # resolving a resolved config (what --resume reads back from config.yaml) changes nothing
    again = (resolve_optimize if optimize else resolve)(yaml.safe_load(yaml.safe_dump(cfg)))
    assert again == cfg


def test_resolve_returns_plain_dicts_and_parse_typed_sections():
    assert resolve({}) == resolve({"teacher": {"kind": "gmm"}})  # the defaults need no teacher values yet
    cfg = resolve({"teacher": {"preset": "ring8"}}, ["train.lr=3e-4", "generator.width=64"])
    assert type(cfg) is dict and all(type(v) is dict for v in cfg.values())
    assert cfg["train"]["lr"] == 3e-4 and cfg["train"]["optimizer"] == "adam"
    assert cfg["train"]["fake_optimizer"] is None and cfg["train"]["disc_optimizer"] is None
    train = parse(TrainConfig, cfg["train"], "train")
    gen = parse(GeneratorConfig, cfg["generator"], "generator")
    assert train.lr == 3e-4 and gen.width == 64 and gen.kind == "mlp"
    # config.yaml keeps the declaration order (global_batch, an alias, last as it always was)
    assert list(cfg["train"]) == [k for k in keys(TrainConfig) if k != "global_batch"] + ["global_batch"]


@pytest.mark.parametrize("teacher,field", [
    ({"kind": "bundled", "name": "digits", "path": "x"}, "teacher.path"),
    ({"kind": "learned", "preset": "ring8", "path": "x"}, "teacher.preset"),
    ({"kind": "gmm", "preset": "ring8", "prompts": ["a cat"]}, "teacher.prompts"),
    ({"kind": "diffusers", "path": "x", "means": [[0.0]]}, "teacher.means"),
    ({"kind": "diffusers"}, "teacher.path"),
    ({"kind": "learned"}, "teacher.path"),
    ({"kind": "bundled"}, "teacher.name"),
    ({"kind": "gmm", "means": [[0, 0]], "std": 0.1, "stds": [0.1]}, "teacher.std"),
])
def test_teacher_keys_are_checked_per_kind(teacher, field):
    with pytest.raises(ConfigError) as e:
        teacher_config(teacher)
    assert e.value.field == field
    assert "\n" not in str(e.value)


# -- malformed input through the command line: one line, exit 2, nothing created ----------------------------------
BASE = {"teacher": {"kind": "gmm", "preset": "ring8"}, "generator": {"width": 16, "depth": 1},
        "fake_score": {"width": 16, "depth": 1}, "objective": {"name": "dmd2"},
        "train": {"steps": 4, "batch_size": 32, "progress": False, "checkpoint_every": 2},
        "eval": {"every": 2, "n_samples": 64, "plots": False}}
OPT = {"teacher": {"kind": "gmm", "preset": "ring8"}, "params": {"kind": "particles", "n": 16},
       "objective": {"name": "sds"}, "train": {"steps": 4, "progress": False}, "eval": {"every": 2, "plots": False}}
FIT = {"teacher": {"preset": "ring8"}, "network": {"width": 16, "depth": 1},
       "train": {"steps": 2, "batch_size": 16, "log_every": 1}}
IMAGE = {"teacher": {"kind": "image", "dataset": "digits"}, "network": {"channels": [8, 16], "emb_dim": 16},
         "train": {"steps": 2, "batch_size": 16, "log_every": 1}}


def _with(base, section, **kv):
    cfg = {k: dict(v) for k, v in base.items()}
    cfg[section] = {**cfg[section], **kv}
    return cfg


BAD = [  # (command, recipe, --set overrides, field named by the one line)
    ("distill", BASE, ["train.lr=.inf"], "train.lr"),
    ("distill", BASE, ["teacher.kind=scene", "teacher.scenes=[snowman]"], "teacher.kind"),  # optimize only
    ("distill", BASE, ["train.ema=.nan"], "train.ema"),
    ("distill", BASE, ["train.grad_clip=.nan"], "train.grad_clip"),
    ("distill", BASE, ["train.batch_size=-4"], "train.batch_size"),
    ("distill", BASE, ["train.batch_size=100000000000"], "train.batch_size"),
    ("distill", BASE, ["generator.width=10000000000"], "generator.width"),
    ("distill", BASE, ["train.seed=99999999999999999999"], "train.seed"),
    ("distill", BASE, ["train.threads=abc"], "train.threads"),
    ("distill", BASE, ["train.threads=0"], "train.threads"),
    ("distill", BASE, ["train.micro_batch=-1"], "train.micro_batch"),
    ("distill", BASE, ["train.micro_batch=7"], "train.micro_batch"),
    ("distill", BASE, ["train.weight_decay=abc"], "train.weight_decay"),
    ("distill", BASE, ["train.optimizer=sgd"], "train.optimizer"),
    ("distill", BASE, ["train.fake_optimizer=lion"], "train.fake_optimizer"),
    ("distill", BASE, ["train.device=tpu"], "train.device"),
    ("distill", BASE, ["eval.n_samples=3"], "eval.n_samples"),
    ("distill", BASE, ["objective.guidance_scale=.nan"], "objective.guidance_scale"),
    ("distill", _with(BASE, "objective", time={"kind": "uniform", "t_min": 0.9, "t_max": 0.1}), [],
     "objective.time.t_min"),
    ("distill", _with(BASE, "objective", fake_time={"kind": "uniform", "t_max": 1.5}), [], "objective.fake_time.t_max"),
    ("distill", BASE, ["teacher.process.sigma_max=.inf"], "teacher.process.sigma_max"),
    ("distill", _with(BASE, "teacher", preset=None, means=[[0.0, 0.0], [1.0, 1.0]], std=0), [], "teacher.std"),
    ("distill", _with(BASE, "teacher", kind="bundled", name="digits"), [], "teacher.preset"),
    ("distill", _with(BASE, "teacher", path="${oc.env:HOME}"), [], "teacher.path"),
    ("distill", BASE, ["teacher.path=${oc.env:HOME}"], "teacher.path"),
    ("distill", BASE, ["train.steps=1.5"], "train.steps"),
    ("distill", BASE, ["train.betas=[0.9, .nan]"], "train.betas"),
    ("optimize", OPT, ["train.lr=.nan"], "train.lr"),
    ("optimize", OPT, ["train.fake_lr=[0, .nan, 1e-3, 10]"], "train.fake_lr"),
    ("optimize", OPT, ["params.n=0"], "params.n"),
    ("optimize", OPT, ["train.eps=.inf"], "train.eps"),
    ("optimize", OPT, ["params.classes=-1"], "params.classes"),
    ("optimize", OPT, ["train.optimizer=sgd"], "train.optimizer"),
    ("train-teacher", FIT, ["train.batch_size=-1"], "train.batch_size"),
    ("train-teacher", FIT, ["network.width=0"], "network.width"),
    ("train-teacher", FIT, ["train.lr=.inf"], "train.lr"),
    ("train-teacher", _with(FIT, "teacher", kind="learned"), [], "teacher.kind"),
    ("train-teacher", FIT, ["teacher.guidance_convention=cond_plus"], "teacher.guidance_convention"),
    ("train-teacher", IMAGE, ["train.cond_drop=2"], "train.cond_drop"),
    ("train-teacher", IMAGE, ["network.dropout=.nan"], "network.dropout"),
    ("train-teacher", IMAGE, ["train.p_std=0"], "train.p_std"),
]


def _malformed(tmp_path, command, recipe, sets):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    args = [command, str(path), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return args, out


def _one_line(code, err, field):
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"scoredistill: error: {field}:"), lines[0]


@pytest.mark.parametrize("command,recipe,sets,field", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_malformed_input_is_one_line_exit_2(tmp_path, capsys, command, recipe, sets, field):
    args, out = _malformed(tmp_path, command, recipe, sets)
    _one_line(*run_main(args, capsys), field)
    assert not out.exists()


@pytest.mark.parametrize("command", ["distill", "optimize", "train-teacher"])
def test_malformed_input_through_a_process(tmp_path, command):
    """The same contract through ``python -m scoredistill`` (a real exit status and stderr), once per command."""
    _, recipe, sets, field = next(b for b in BAD if b[0] == command)
    args, out = _malformed(tmp_path, command, recipe, sets)
    p = cli(args)
    _one_line(p.returncode, p.stderr, field)
    assert not out.exists()


def test_environment_interpolation_is_refused_in_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOREDISTILL_TEST_SECRET", "hunter2")
    path = tmp_path / "c.yaml"
    path.write_text("teacher: {kind: learned, path: '${oc.env:SCOREDISTILL_TEST_SECRET}'}\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    assert e.value.field == "teacher.path" and "hunter2" not in str(e.value)
    # interpolation between keys reads nothing from outside the file and stays allowed
    path.write_text("train: {steps: 8, checkpoint_every: '${train.steps}'}\n")
    assert resolve(load_yaml(path))["train"]["checkpoint_every"] == 8


# -- --resume overrides ---------------------------------------------------------------------------------------
def test_resumable_keys_are_the_documented_ones():
    ok = set(resumable(DISTILL))
    assert {"train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.progress",
            "train.threads", "train.device", "eval.every", "eval.n_samples", "eval.plots"} <= ok
    for name in ("train.lr", "train.seed", "train.batch_size", "objective.name", "teacher.preset", "generator.width",
                 "train.betas", "train.ema", "train.optimizer"):
        assert name not in ok
    assert "train.steps" in resumable(OPTIMIZE) and "train.lr" not in resumable(OPTIMIZE)


@pytest.mark.parametrize("sets,field,words", [
    (["train.lr=0.5"], "train.lr", "cannot be changed on --resume"),
    (["objective.name=sid"], "objective.name", "cannot be changed on --resume"),
    (["train.seed=3"], "train.seed", "cannot be changed on --resume"),
    (["objective.guidance_scale=2"], "objective.guidance_scale", "cannot be changed on --resume"),
    (["train.steps=4"], "train.steps", "5 steps already done"),
])
def test_resume_refuses_meaningless_overrides(sets, field, words):
    saved = resolve({"teacher": {"preset": "ring8"}})
    with pytest.raises(ConfigError) as e:
        check_resume_overrides(sets, saved, steps_done=5)
    assert e.value.field == field and words in str(e.value)


def test_resume_accepts_cadence_and_more_steps():
    saved = resolve({"teacher": {"preset": "ring8"}})
    check_resume_overrides(["train.steps=2000", "eval.every=10", "train.log_every=5", "train.threads=1",
                            "train.device=cpu", "train.checkpoint_every=7", "eval.plots=false"], saved, steps_done=5)
    cosine = resolve({"teacher": {"preset": "ring8"}, "train": {"lr_schedule": "cosine"}})
    with pytest.raises(ConfigError) as e:  # the decay curve spans train.steps
        check_resume_overrides(["train.steps=2000"], cosine, steps_done=5)
    assert e.value.field == "train.steps" and "cosine" in str(e.value)


@pytest.mark.usefixtures("one_thread")  # as cli() runs it: tiny models are slower on two threads
def test_resume_overrides_through_the_cli(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    run = str(tmp_path / "run")
    code, err = run_main(["distill", str(path), "--out", run], capsys)
    assert code == 0, err[-2000:]
    before = open(os.path.join(run, "config.yaml")).read()
    for sets, field in ((["train.lr=0.5"], "train.lr"), (["train.steps=2"], "train.steps"),
                        (["objective.name=sid"], "objective.name")):
        code, err = run_main(["distill", "--resume", run, *sum((["--set", s] for s in sets), [])], capsys)
        assert code == 2 and err.startswith(f"scoredistill: error: {field}:"), err[-2000:]
        assert len(err.strip().splitlines()) == 1
    assert open(os.path.join(run, "config.yaml")).read() == before
    code, err = run_main(["distill", "--resume", run, "--set", "train.steps=6", "--set", "eval.every=3"], capsys)
    assert code == 0, err[-2000:]
    saved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert saved["train"]["steps"] == 6 and saved["eval"]["every"] == 3


@pytest.mark.usefixtures("one_thread")
def test_optimize_resume_refuses_lr(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(OPT))
    run = str(tmp_path / "run")
    assert run_main(["optimize", str(path), "--out", run], capsys)[0] == 0
    code, err = run_main(["optimize", "--resume", run, "--set", "train.lr=0.5"], capsys)
    assert code == 2 and err.startswith("scoredistill: error: train.lr:"), err[-2000:]
    code, err = run_main(["optimize", "--resume", run, "--set", "train.steps=3"], capsys)
    assert code == 2 and "4 steps already done" in err, err[-2000:]


# -- docs/recipes.md is the schema's reference -------------------------------------------------------------------
def _generator():
    path = os.path.join(ROOT, "scripts", "gen_recipes_doc.py")
    spec = importlib.util.spec_from_file_location("gen_recipes_doc", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_accepted_key_is_documented():
    from scoredistill.objectives.base import OBJECTIVES
    from scoredistill.process.processes import PROCESS_KINDS
    from scoredistill.process.time import TIME_SAMPLERS

    doc = open(os.path.join(ROOT, "docs", "recipes.md")).read()
    schemas = {"distill": DISTILL, "optimize": OPTIMIZE, "train-teacher": TRAIN_TEACHER,
               "train-teacher (image)": IMAGE_TEACHER}
    missing = [f"{cmd}: {s}.{k}" for cmd, schema in schemas.items() for s, cls in schema.items() for k in keys(cls)
               if f"`{s}.{k}`" not in doc]
    for name, cls in OBJECTIVES.items():
        head = f"##### `objective.name: {name}`"
        chunk = doc.split(head, 1)[1].split("#####", 1)[0] if head in doc else ""
        missing += [f"objective {name}: {f.name}" for f in dataclasses.fields(cls.Params) if f"`{f.name}`" not in chunk]
    for table in (PROCESS_KINDS, TIME_SAMPLERS):
        for kind, cls in table.items():
            missing += [f"{kind}: {f.name}" for f in dataclasses.fields(cls) if f.name != "name"
                        and f"`{f.name}`" not in doc]
    assert not missing, missing


def test_recipes_md_reference_is_generated_from_the_schema():
    gen = _generator()
    doc = open(os.path.join(ROOT, "docs", "recipes.md")).read()
    assert gen.splice(doc, gen.reference()) == doc, "run: python scripts/gen_recipes_doc.py"
