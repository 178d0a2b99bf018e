"""The SDS bench (``run_sds_suite``): one method x one teacher on a tiny budget; files and columns."""

from __future__ import annotations

import csv
import os

import pytest

from scoredistill.optimize.bench import COLUMNS, METHODS, bench_config, pairs, run_sds_suite

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
