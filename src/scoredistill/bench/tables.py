"""The one table writer of every bench suite: a markdown table from column specs, and the same rows as
CSV / JSON.

A suite describes its markdown table as a list of :class:`Column` (header text + a function that
renders one row's cell) and its CSV as a list of keys; files are written atomically, so an interrupted
bench never leaves a half-written table.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from scoredistill.fileio import atomic_write_text


@dataclass(frozen=True)
class Column:
    """One markdown column: ``title`` in the header, ``cell(row)`` in every body line."""

    title: str
    cell: Callable[[dict], str]


def key(name: str, fmt: Callable[[object], str] = str) -> Callable[[dict], str]:
    """A cell that shows ``row[name]`` through ``fmt`` (``–`` when absent or ``None``)."""
    return lambda row: "–" if row.get(name) is None else fmt(row[name])


def _line(cells: Iterable[str]) -> str:
    # an empty cell renders as "| |" (not "|  |"), the form the published tables use
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def markdown_table(rows: Iterable[dict], columns: Sequence[Column]) -> list[str]:
    """Header, separator and one line per row."""
    lines = [_line(c.title for c in columns), "|" + "---|" * len(columns)]
    lines += [_line(c.cell(r) for c in columns) for r in rows]
    return lines


def csv_text(rows: Iterable[dict], fields: Sequence[str]) -> str:
    """The rows as CSV with ``fields`` as header; other keys are dropped, ``None`` is an empty cell."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\r\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def write_tables(out_dir: str, rows: list[dict], fields: Sequence[str], markdown: Sequence[str],
                 json_name: str | None = None) -> None:
    """Write ``results.csv`` (``fields``), ``results.md`` (the ``markdown`` lines) and, with ``json_name``,
    the rows as JSON under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    _write_raw(os.path.join(out_dir, "results.csv"), csv_text(rows, fields))
    atomic_write_text(os.path.join(out_dir, "results.md"), "\n".join(markdown) + "\n")
    if json_name:
        write_json(os.path.join(out_dir, json_name), rows)


def write_json(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, json.dumps(rows, indent=1))


def _write_raw(path: str, text: str) -> None:
    # CSV keeps its "\r\n" line ends byte for byte: no newline translation on any platform
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
