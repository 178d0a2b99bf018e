"""A rich progress bar with live losses; silent when disabled or when output is not a terminal."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "distill"):
        self.total, self.start, self.label = total, start, label
        self.enabled = enabled and sys.stderr.isatty()
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RP

            self._p = RP(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, losses: dict):
        if self._p is not None:
            info = " ".join(f"{k}={v:.3g}" for k, v in list(losses.items())[:3])
            self._p.update(self._task, completed=step, info=info)

    def note(self, res: dict):
        if self._p is not None:
            vals = [f"{k} {v:.4g}" for k, v in res.items()
                    if isinstance(v, (int, float)) and k not in ("step", "wall_s")][:6]
            self._p.console.print(f"step {res['step']:>6}: " + "  ".join(vals))

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False
