"""The SDS bench (``run_sds_suite``): one method x one teacher on a tiny budget; files and columns."""

from __future__ import annotations

import csv
import os

import pytest

from scoredistill.bench.sds import (
    COLUMNS,
    METHODS,
    bench_config,
    needs_classes,
    pairs,
    run_sds_suite,
    step_count_params,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_method_one_teacher_writes_files_and_columns(tmp_path):
    out = str(tmp_path / "bench")
    rows = run_sds_suite(out, methods=["sds"], teachers=["ring8"], budget_steps=20, n=64, log=None)
    assert len(rows) == 1 and set(COLUMNS) <= set(rows[0])
    r = rows[0]
    assert (r["method"], r["teacher"], r["steps"], r["n"]) == ("sds", "ring8", 20, 64)
    assert r["sw2"] > 0 and r["sw2_floor"] > 0 and r["nonfinite"] == 0 and r["drift_per_step"] >= 0
    for f in ("results.md", "results.csv", os.path.join("scatter", "sds__ring8.png")):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "results.csv")) as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(COLUMNS) and len(got) == 1 and got[0]["method"] == "sds"
    md = open(os.path.join(out, "results.md")).read()
    assert "| sds | ring8 |" in md and "SW2 floor" in md


def test_pairs_and_schedule_rescaling():
    ps = pairs()
    assert {m for m, _ in ps} == set(METHODS)
    assert ("csd", "ring8") not in ps and ("csd", "ring8_cond") in ps and ("sds", "ring8_cond") in ps
    cfg = bench_config("cds", "pair", 100, 32, 0)           # recipe: 1000 steps
    assert cfg["train"]["steps"] == 100 and cfg["train"]["lr"] == [0, 0.02, 0.002, 100]
    assert cfg["objective"]["t_next"]["end_step"] == 100 and cfg["teacher"]["preset"] == "pair"
    cond = bench_config("bsd", "ring8_cond", 100, 32, 0)
    assert cond["params"]["classes"] == "uniform"
    with pytest.raises(ValueError):
        run_sds_suite("unused", methods=["nope"])


def test_class_conditional_methods_come_from_declared_requirements(tmp_path):
    """Which methods skip the unconditional teachers is read from ``requirements()``, not a name list."""
    assert {m for m in METHODS if needs_classes(m)} == {"csd", "bsd"}
    # a recipe folder where sds is rewritten as csd: the same file name now needs classes
    src = open(os.path.join("recipes", "optimize", "csd.yaml")).read()
    (tmp_path / "sds.yaml").write_text(src)
    assert needs_classes("sds", tmp_path)
    assert pairs(["sds"], recipes=tmp_path) == [("sds", "ring8_cond")]


def test_step_count_parameters_follow_the_budget():
    """ISM/TSM's warm-up length is a step count (marked on its Params field) and shrinks with the budget;
    its inversion step count is not a training length and stays."""
    assert step_count_params("ism") == ["warmup_iter"] and step_count_params("tsm") == ["warmup_iter"]
    assert step_count_params("sds") == []
    for m in ("ism", "tsm"):
        cfg = bench_config(m, "ring8", 100, 32, 0)      # recipe: 1000 steps, warmup_iter 500, 5 inversion steps
        assert cfg["objective"]["warmup_iter"] == 50 and cfg["objective"]["xs_inv_steps"] == 5
        assert cfg["train"]["lr"] == [0, 0.02, 0.002, 100]


@pytest.mark.parametrize("extra,field", [(["--methods", "nope"], "--methods"), (["--teachers", "moon"], "--teachers"),
                                         (["--budget-seconds", "3"], "--budget-seconds")])
def test_sds_suite_bad_arguments_one_line(tmp_path, capsys, extra, field):
    from scoredistill.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--suite", "sds", "--out", str(tmp_path / "b")] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
