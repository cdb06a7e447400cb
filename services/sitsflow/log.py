"""Logging to stderr only: stdout is reserved for what the orchestrator reads (JSON)."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def setup_logging(level: str | None = None) -> None:
    """Send every ``sitsflow`` log record to stderr, once per process."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    level = (level or os.environ.get("SITSFLOW_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("sitsflow")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``sitsflow`` hierarchy."""
    return logging.getLogger(name if name.startswith("sitsflow") else f"sitsflow.{name}")
