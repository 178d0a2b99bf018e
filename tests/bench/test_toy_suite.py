"""``scoredistill bench``: discovery, fixed-steps and budget modes, tables, plots, n/a rows, reuse."""

from __future__ import annotations

import csv
import os

import pytest

from scoredistill.bench.toy import discover
from scoredistill.cli.main import main

TINY = ["--set", "generator.width=16", "--set", "generator.depth=1", "--set", "fake_score.width=16",
        "--set", "fake_score.depth=1", "--set", "train.batch_size=32", "--set", "train.real_pool=64"]


def test_discovers_every_generator_recipe():
    from pathlib import Path

    found = discover(Path("recipes/toy"))
    assert {"dmd2", "fdistill", "swiftbrush", "sfd", "msd"} <= set(found)
    assert found["msd"][1] == "dmd2" and found["fdistill"][1] == "fdistill"


def test_bench_fixed_steps(tmp_path, capsys):
    out = str(tmp_path / "b")
    args = ["bench", "--methods", "dmd2,sfd", "--teachers", "pair", "--steps", "2", "--n-eval", "32", "--out", out]
    assert main(args + TINY) == 0
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["exact samples (floor)", "dmd2", "sfd"]
    assert rows[1]["status"] == "ok" and rows[1]["steps"] == "2" and rows[1]["non_finite"] == "0"
    assert rows[2]["status"].startswith("n/a") and "class-conditional" in rows[2]["status"]
    md = open(os.path.join(out, "results.md")).read()
    assert "### pair" in md and "exact samples (floor)" in md and "--steps 2" in md
    assert os.path.exists(os.path.join(out, "plots", "dmd2__pair.png"))
    # a second call reuses the finished runs
    mtime = os.path.getmtime(os.path.join(out, "runs", "dmd2__pair__s0.json"))
    assert main(args + TINY) == 0
    assert os.path.getmtime(os.path.join(out, "runs", "dmd2__pair__s0.json")) == mtime


def test_bench_budget_derives_steps(tmp_path):
    out = str(tmp_path / "b")
    assert main(["bench", "--methods", "dmd2", "--teachers", "ring8", "--budget-seconds", "0.3", "--n-eval", "32",
                 "--out", out] + TINY) == 0
    with open(os.path.join(out, "results.csv")) as f:
        row = list(csv.DictReader(f))[1]
    assert row["status"] == "ok" and int(row["steps"]) >= 16  # warm-up (5) + timed cycles (10) + at least one


@pytest.mark.parametrize("extra,field", [(["--methods", "nope"], "--methods"), (["--teachers", "moon"], "--teachers"),
                                         (["--steps", "0"], "--steps"), (["--seeds", "a"], "--seeds")])
def test_bench_bad_arguments_one_line(tmp_path, capsys, extra, field):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--out", str(tmp_path / "b")] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err


def test_bench_recipe_steps_uses_each_recipes_budget(tmp_path):
    """``--recipe-steps``: every recipe trains for its own ``train.steps`` (here 3 and 4), whatever the load."""
    import yaml

    rec = tmp_path / "recipes"
    rec.mkdir()
    base = yaml.safe_load(open("recipes/toy/dmd2.yaml"))
    for name, n in (("a", 3), ("b", 4)):
        base["train"]["steps"] = n
        (rec / f"{name}.yaml").write_text(yaml.safe_dump(base))
    out = str(tmp_path / "b")
    assert main(["bench", "--recipes", str(rec), "--methods", "a,b", "--teachers", "pair", "--recipe-steps",
                 "--n-eval", "32", "--out", out] + TINY) == 0
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["steps"], r["status"]) for r in rows[1:]] == [("a", "3", "ok"), ("b", "4", "ok")]
    assert "--recipe-steps" in open(os.path.join(out, "results.md")).read()


def test_bench_recipe_steps_is_toy_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--suite", "sds", "--recipe-steps", "--out", str(tmp_path / "b")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--recipe-steps" in err[0], err
