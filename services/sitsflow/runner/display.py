"""How a local run reports progress: a rich display on a terminal, plain log lines otherwise.

Every method is called from the thread that schedules the workflow, never from task threads.
"""

from __future__ import annotations

import sys
from typing import Any

from sitsflow.log import get_logger

log = get_logger(__name__)


class LogDisplay:
    """One log line (stderr) per process start and end, and per skipped task."""

    def task_started(self, task: str, total: int) -> None:
        """A task starts ``total`` processes (fan-out items, or 1)."""
        if total > 1:
            log.info("%s: %d items", task, total)

    def node_started(self, label: str) -> None:
        """One process starts (``label``: the task, or Argo's item name ``train(0:...)``)."""
        log.info("started %s", label)

    def node_done(self, label: str, seconds: float) -> None:
        log.info("succeeded %s (%.1f s)", label, seconds)

    def node_failed(self, label: str, returncode: int | None, tail: str) -> None:
        log.warning("failed %s (exit code %s)", label, returncode)

    def task_done(self, task: str, status: str) -> None:
        """A task ended: Succeeded, or Skipped (an empty fan-out)."""
        if status == "Skipped":
            log.info("skipped %s (no items to run)", task)

    def close(self) -> None:
        """Stop displaying (idempotent)."""

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RichDisplay(LogDisplay):
    """A rich progress bar per task on stderr (items done / items)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
        )
        self.rows: dict[str, Any] = {}
        self.progress.start()
        self.stopped = False

    def _row(self, task: str) -> Any:
        if task not in self.rows:
            self.rows[task] = self.progress.add_task(task, total=1)
        return self.rows[task]

    def task_started(self, task: str, total: int) -> None:
        self.progress.update(self._row(task), total=total)

    def node_started(self, label: str) -> None:
        """Rows count finished items; a start changes nothing shown."""

    def node_done(self, label: str, seconds: float) -> None:
        self.progress.advance(self._row(label.split("(", 1)[0]))

    def node_failed(self, label: str, returncode: int | None, tail: str) -> None:
        row = self._row(label.split("(", 1)[0])
        self.progress.update(row, description=f"[red]{label} failed (exit code {returncode})")

    def task_done(self, task: str, status: str) -> None:
        if status == "Succeeded":
            self.progress.update(self._row(task), description=f"[green]{task}")
        else:
            self.progress.update(self._row(task), total=0, description=f"[dim]{task} (skipped)")

    def close(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.progress.stop()


#: What the runner reports to.
Display = LogDisplay


def make_display(progress: bool) -> Display:
    """A :class:`RichDisplay` when ``progress``, else a :class:`LogDisplay`."""
    return RichDisplay() if progress else LogDisplay()
