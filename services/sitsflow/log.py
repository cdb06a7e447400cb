"""Logging to stderr only: stdout is reserved for what the orchestrator reads (JSON)."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (not the stream of
    the moment it was made: a caller, or a test harness, may replace sys.stderr)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: str | None = None) -> None:
    """Send every ``sitsflow`` log record to stderr, once per process."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    level = (level or os.environ.get("SITSFLOW_LOG_LEVEL") or "INFO").upper()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("sitsflow")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``sitsflow`` hierarchy."""
    return logging.getLogger(name if name.startswith("sitsflow") else f"sitsflow.{name}")
