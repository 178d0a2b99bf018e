"""The table writer every bench suite uses: markdown from column specs, CSV with a fixed header."""

from __future__ import annotations

import csv
import os

from scoredistill.bench.tables import Column, key, markdown_table, write_tables


def test_markdown_table_header_separator_and_cells():
    cols = [Column("method", key("method")), Column("SW2 ↓", key("sw2", "{:.3f}".format)),
            Column("note", lambda r: r.get("note", ""))]
    lines = markdown_table([{"method": "dmd2", "sw2": 0.12345}, {"method": "sfd", "note": "n/a: classes"}], cols)
    assert lines == ["| method | SW2 ↓ | note |", "|---|---|---|", "| dmd2 | 0.123 | |",
                     "| sfd | – | n/a: classes |"]


def test_write_tables_csv_md_json(tmp_path):
    rows = [{"method": "a", "sw2": 0.5, "extra": [1, 2]}, {"method": "b", "sw2": None}]
    write_tables(str(tmp_path), rows, ["method", "sw2"], ["# title", "", "| x |"], json_name="results.json")
    with open(tmp_path / "results.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert got == [{"method": "a", "sw2": "0.5"}, {"method": "b", "sw2": ""}]
    assert (tmp_path / "results.md").read_text() == "# title\n\n| x |\n"
    assert '"extra"' in (tmp_path / "results.json").read_text()
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.json", "results.md"]  # no temporaries left
