"""The image suite: floor + teacher rows on the bundled digits teacher, tables, and its command line."""

from __future__ import annotations

import csv
import json
import os

import pytest

from scoredistill.bench.digits import COLUMNS, balanced_labels, markdown, run_digits_suite
from scoredistill.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_balanced_labels():
    assert balanced_labels(23).tolist() == list(range(10)) * 2 + [0, 1, 2]


def test_floor_and_one_step_teacher_rows(tmp_path):
    lines = []
    rows = run_digits_suite("digits", n=40, nfe=[1], out_dir=str(tmp_path), log=lines.append)
    assert [r["nfe"] for r in rows] == [0, 1] and rows[0]["sampler"].startswith("real")
    assert rows[0]["fd"] < rows[1]["fd"]          # one naive Euler step is far from the data
    assert json.loads(lines[0])["nfe"] == 1
    md = markdown(rows)
    assert md.splitlines()[0].startswith("| sampler | NFE | FD ↓") and "| real: training split (floor) | – |" in md
    with open(tmp_path / "results.csv") as f:
        assert list(next(csv.reader(f))) == list(COLUMNS)
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2
    assert "| teacher, naive 1 step" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("extra,field", [(["--teachers", "cifar"], "--teachers"),
                                         (["--methods", "nope"], "--methods"),
                                         (["--budget-seconds", "5"], "--budget-seconds")])
def test_digits_suite_bad_arguments_one_line(tmp_path, capsys, extra, field):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--suite", "digits", "--out", str(tmp_path / "b")] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
    assert not os.path.exists(tmp_path / "b" / "results.md")
