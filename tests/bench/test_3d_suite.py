"""The 3D bench (``scoredistill bench --suite 3d``): configs of the runs, files and columns, bad input."""

from __future__ import annotations

import csv
import os

import pytest

from scoredistill.bench.threed import COLUMNS, bench_config, run_3d_suite
from scoredistill.cli.main import main
from scoredistill.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_configs_swap_scenes_particles_and_budget():
    one = bench_config("vsd", "snowman", 60, 4, 3)
    assert one["teacher"]["scenes"] == ["snowman"] and one["params"]["n"] == 1 and one["train"]["seed"] == 3
    two = bench_config("sds", "snowman+dumbbell", 60, 4, 0, overrides=["splats.count=50"])
    assert two["teacher"]["scenes"] == ["snowman", "dumbbell"] and two["params"]["n"] == 4
    assert two["train"]["steps"] == 60 and two["splats"]["count"] == 50
    janus = bench_config("sds", "twotone-janus-labels", 60, 4, 0)
    assert janus["teacher"]["janus"] == 0.9 and janus["teacher"]["janus_labels"] is True
    vsd = bench_config("vsd", "snowman+dumbbell", 300, 4, 0)  # recipe: t_min 0.5 -> 0.02 over 400 of 600
    assert vsd["objective"]["time"]["t_min"] == [0, 0.5, 0.02, 200] and vsd["fake_score"]["kind"] == "particles"
    ism = bench_config("ism", "snowman", 60, 4, 0)            # recipe: 600 steps, warmup 300
    assert ism["objective"]["warmup_iter"] == 30
    with pytest.raises(ConfigError):
        bench_config("sds", "snowman", 60, 4, 0, overrides=["splats.nope=1"])


def test_one_run_writes_table_and_csv(tmp_path):
    out = str(tmp_path / "b")
    rows = run_3d_suite(out, ["sds"], ["snowman+dumbbell"], budget_steps=1, particles=2, resolution=16,
                        overrides=["splats.count=30", "params.repeat=1", "splats.eval_views=2",
                                   "splats.turntable=2", "eval.plots=false"], log=None)
    r = rows[0]
    assert set(COLUMNS) <= set(r) and r["particles"] == 2 and r["psnr"] > 5 and r["nonfinite"] == 0
    assert sum(int(v) for v in r["per_scene"].split(" / ")) == 2
    with open(os.path.join(out, "results.csv")) as f:
        assert list(next(csv.DictReader(f))) == list(COLUMNS)
    assert "| sds | sds | snowman+dumbbell | 1 | 2 |" in open(os.path.join(out, "results.md")).read()
    assert not os.path.exists(os.path.join(out, "grids"))   # eval.plots=false: no grid to copy


@pytest.mark.parametrize("args,field", [(["--methods", "dmd"], "--methods"), (["--teachers", "ring8"], "--teachers"),
                                        (["--budget-seconds", "5"], "--budget-seconds")])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, field):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--suite", "3d", *args, "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"scoredistill: error: {field}")
