"""Fingerprints and per-task manifests: how stages skip finished work and never mix outputs.

A stage task computes a fingerprint of everything its outputs depend on (the version of the code,
the configuration keys that matter, the identity of its input objects, upstream fingerprints). It writes its outputs
atomically, then, last, a manifest ``manifests/<stage>/<task>.json`` holding that fingerprint and
the list of outputs. A rerun whose fingerprint matches a manifest whose outputs all exist does
nothing; any other rerun redoes the work and overwrites the outputs under the same deterministic
names, then rewrites the manifest. Downstream fingerprints include upstream ones, so a change
anywhere cascades.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from sitsflow import __version__, layout, storage
from sitsflow.log import get_logger

log = get_logger(__name__)


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj)
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    return obj


def code_version() -> str:
    """The version of the code that makes the outputs: the package version, plus the source
    revision the image was built from (``SITSFLOW_REVISION``, set by the Dockerfile's ``REVISION``
    build argument) when there is one. Part of every fingerprint: a rerun with other code redoes
    the work instead of reusing outputs the old code made."""
    revision = os.environ.get("SITSFLOW_REVISION", "").strip()
    return f"{__version__}+{revision}" if revision else __version__


def fingerprint(*parts: Any) -> str:
    """Return the sha256 hex digest of the canonical JSON of the code version and ``parts``."""
    text = json.dumps(_canonical([code_version(), *parts]), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(out: str, stage: str, task: str) -> dict | None:
    """Return the manifest of a task, or None when there is none (or it is unreadable)."""
    uri = layout.manifest(out, stage, task)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("ignoring unreadable manifest %s", uri)
        return None


def done(out: str, stage: str, task: str, fp: str) -> dict | None:
    """Return the task's manifest if it matches ``fp`` and all its outputs exist, else None."""
    manifest = read_manifest(out, stage, task)
    if manifest is None or manifest.get("fingerprint") != fp:
        return None
    if not all(storage.exists(uri) for uri in manifest.get("outputs", [])):
        return None
    return manifest


def write_manifest(out: str, stage: str, task: str, fp: str, outputs: list[str], extra: dict | None = None) -> dict:
    """Write the task's manifest (call it last, after every output is published)."""
    manifest = {
        "stage": stage,
        "task": task,
        "fingerprint": fp,
        "outputs": list(outputs),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    storage.write_text(layout.manifest(out, stage, task), json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
