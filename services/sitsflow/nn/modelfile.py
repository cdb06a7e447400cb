"""Model files: weights + statistics + a JSON description; loading one never runs code from it.

A model file is ``torch.save`` of a plain dict (strings, ints and tensors only)::

    {"format": "sitsflow-model", "format_version": 2,
     "description": "<JSON text>",                 # see below
     "state_dict": {name: Tensor},                 # network.state_dict() (statistics included)
     "stats": {sensor: {key: Tensor}}}             # the constructor's statistics

and is read back with ``torch.load(..., weights_only=True)``, which refuses anything but such plain
data: loading a model file never unpickles arbitrary objects.

The description holds ``network`` (dl_name), ``dl_parameters``, ``framework`` (nb_dates,
nb_components, nb_classes, dates, sensor), ``stats_keys``, ``module_sha256`` / ``module_uri`` (the
sha256 of the dl_module's text and where it was read, for a dl_module network; else null),
``format_version``, every extra key of the caller's description (class codes and names, feature
names, hyperparameters ...), and ``fingerprint``: the sha256 of the canonical JSON of everything
else plus every tensor of ``state_dict`` and ``stats`` (name, dtype, shape, bytes). ``load_model``
checks it (it detects damage, not forgery: anyone can recompute it).

Trust model: a model file is data, never code. A built-in network is built from sitsflow's own
classes; a dl_module network only from the dl_module the *configuration* names, and only when its
sha256 equals the one the model file records. A file that carries Python source (format 1 stored
the dl_module's text as ``module_source``) is refused unless that text is byte for byte the
configured dl_module's, so what runs is always the configured file.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from sitsflow.errors import BadInputError, ConfigError
from sitsflow.log import get_logger
from sitsflow.nn.base import Iota2NeuralNetwork
from sitsflow.nn.registry import DL_MODULE_KEY, NETWORKS, build_network

log = get_logger(__name__)

FORMAT = "sitsflow-model"
FORMAT_VERSION = 2
#: Versions read: 1 embedded the dl_module's text (accepted only when it is the configured module's).
READ_VERSIONS: tuple[int, ...] = (1, 2)
#: Keys of the description that sitsflow writes; a caller's description may repeat them only with
#: the same value (``fingerprint`` and ``format_version`` are always rewritten; ``module_source``, the
#: dl_module text format 1 embedded, is never written).
RESERVED_KEYS: tuple[str, ...] = (
    "network",
    "dl_parameters",
    "framework",
    "stats_keys",
    "module_sha256",
    "module_uri",
    "module_source",
    "format_version",
    "fingerprint",
)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def module_sha256(source: str) -> str:
    """sha256 (hex) of a dl_module's text (UTF-8): what a model file records of its network's code."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def _canonical_json(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"model description is not plain JSON (str, numbers, lists, dicts): {exc}") from None


def _hash_tensor(h: Any, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(
    description: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    stats: Mapping[str, Mapping[str, torch.Tensor]],
) -> str:
    """sha256 (hex) of the canonical description (without ``fingerprint``), the weights and the statistics."""
    h = hashlib.sha256()
    h.update(_canonical_json({k: v for k, v in description.items() if k != "fingerprint"}).encode("utf-8"))
    for name in sorted(state_dict):
        _hash_tensor(h, f"w:{name}", state_dict[name])
    for sensor in sorted(stats):
        for key in sorted(stats[sensor]):
            _hash_tensor(h, f"s:{sensor}:{key}", stats[sensor][key])
    return h.hexdigest()


def save_model(network: Iota2NeuralNetwork, description: Mapping[str, Any] | None = None) -> bytes:
    """Serialise a network built by ``build_network`` (or ``load_model``) to bytes.

    Args:
        network: the network; its weights are copied to the CPU, the network is left as it is.
        description: extra JSON-able keys to store (class codes, class names, feature names,
            hyperparameters ...). Keys in ``RESERVED_KEYS`` must agree with the network.

    Returns:
        The model file's bytes. Its description, with the fingerprint, is ``load_model(b)[1]``.
    """
    info = getattr(network, "build_info", None)
    if not isinstance(network, Iota2NeuralNetwork) or info is None:
        raise BadInputError("save_model needs a network built by sitsflow.nn.build_network or load_model")
    state_dict = {k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()}
    stats = network.stats_dict()
    own = {
        "network": info["network"],
        "dl_parameters": info["dl_parameters"],
        "framework": network.framework_args(),
        "stats_keys": {s: sorted(keys) for s, keys in stats.items()},
        "module_sha256": module_sha256(info["module_source"]) if info["module_source"] is not None else None,
        "module_uri": info["module_uri"],
        "format_version": FORMAT_VERSION,
    }
    extra = dict(description or {})
    if extra.get("module_source") is not None:
        raise BadInputError("model description key 'module_source': a model file never holds code")
    for key in RESERVED_KEYS:
        if (
            key in own
            and key in extra
            and key != "format_version"
            and _canonical_json(extra[key]) != _canonical_json(own[key])
        ):
            raise BadInputError(
                f"model description key {key!r} is written by sitsflow ({own[key]!r}); the caller gave {extra[key]!r}"
            )
        extra.pop(key, None)
    full = {**extra, **own}
    full["fingerprint"] = fingerprint(full, state_dict, stats)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "description": _canonical_json(full),
        "state_dict": state_dict,
        "stats": stats,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def read_model_file(data: bytes) -> dict[str, Any]:
    """Parse a model file without building the network: ``{"description", "state_dict", "stats"}``.

    Raises:
        BadInputError: not a sitsflow model file, corrupt, or fingerprint mismatch.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadInputError(f"a model file is bytes, got {type(data).__name__}")
    data = bytes(data)
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise BadInputError(
            f"the model file is corrupt or not a sitsflow model: not a torch archive ({len(data)} bytes, "
            f"starting {data[:8]!r})"
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise BadInputError(
            "refusing the model file: it holds objects other than plain tensors and strings"
            + (f" (it asks for {found.group(1)})" if found else "")
            + "; nothing in it was unpickled or run (only sitsflow model files are accepted)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, TypeError) as exc:
        raise BadInputError(f"the model file is corrupt or not a sitsflow model: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BadInputError("not a sitsflow model file (no 'format': 'sitsflow-model' entry)")
    if payload.get("format_version") not in READ_VERSIONS:
        raise BadInputError(
            f"model file format version {payload.get('format_version')!r} is not supported (this sitsflow reads "
            f"versions {', '.join(map(str, READ_VERSIONS))})"
        )
    try:
        description = json.loads(payload["description"])
        state_dict = dict(payload["state_dict"])
        stats = {s: dict(v) for s, v in payload["stats"].items()}
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise BadInputError(f"the model file is incomplete or corrupt: {type(exc).__name__}: {exc}") from None
    if not isinstance(description, dict) or "fingerprint" not in description:
        raise BadInputError("the model file's description is not a JSON object with a fingerprint")
    try:
        expected = fingerprint(description, state_dict, stats)
    except (AttributeError, TypeError, RuntimeError) as exc:
        raise BadInputError(f"the model file holds malformed tensors: {exc}") from None
    if expected != description["fingerprint"]:
        raise BadInputError(
            f"the model file is corrupt: fingerprint {description['fingerprint']} does not match its content "
            f"({expected})"
        )
    return {"description": description, "state_dict": state_dict, "stats": stats}


def network_code(
    description: Mapping[str, Any], module_source: str | None, module_uri: str | None = None
) -> str | None:
    """The dl_module text to build a model file's network from (None: a built-in network).

    The code only ever comes from ``module_source``, the configured dl_module's text, and only when
    its sha256 is the one the file records (or, for a format 1 file, when the file's embedded text
    is the same text). Nothing of the file is executed.

    Raises:
        BadInputError: a built-in network with source attached; source or a recorded dl_module but
            no configured one; a configured dl_module whose sha256 differs from the recorded one
            (both named); a network neither built-in nor from a dl_module.
    """
    name = description.get("network")
    model_uri = description.get("module_uri")
    recorded = description.get("module_sha256")
    embedded = description.get("module_source")
    configured = module_sha256(module_source) if module_source is not None else None
    yours = f"the configured dl_module {module_uri or '<dl_module>'} (sha256 {configured})"
    if recorded is not None and (not isinstance(recorded, str) or not _SHA256.fullmatch(recorded)):
        raise BadInputError(f"the model file's module_sha256 {recorded!r} is not a sha256 (64 hexadecimal digits)")
    if embedded is not None:
        if name in NETWORKS:
            raise BadInputError(
                f"refusing the model file: it names the built-in network {name!r} but carries Python source "
                f"('module_source'); a built-in network never runs code from a model file"
            )
        if not isinstance(embedded, str) or description.get("format_version") != 1:
            raise BadInputError(
                "refusing the model file: it carries Python source ('module_source'), which only format 1 "
                "model files held (as text); sitsflow never runs code from a model file"
            )
        if recorded is not None and recorded != module_sha256(embedded):
            raise BadInputError("refusing the model file: its module_sha256 is not the sha256 of its module_source")
        recorded = module_sha256(embedded)
        if module_source is None:
            raise BadInputError(
                f"refusing the model file: it carries Python source for network {name!r} (sha256 {recorded}) "
                f"and no dl_module is configured; sitsflow never runs code from a model file: set "
                f"{DL_MODULE_KEY} to the file the network was trained with"
            )
    if recorded is None:
        if name not in NETWORKS:
            raise BadInputError(
                f"model file network {name!r} is not a built-in network ({', '.join(NETWORKS)}) and the file "
                f"records no dl_module it was trained with"
            )
        return None
    if module_source is None:
        raise BadInputError(
            f"model file network {name!r} was trained with the dl_module {model_uri or '<unknown>'} (sha256 "
            f"{recorded}) and no dl_module is configured: set {DL_MODULE_KEY} to that file"
        )
    if configured != recorded:
        raise BadInputError(
            f"model file network {name!r} was trained with the dl_module {model_uri or '<unknown>'} (sha256 "
            f"{recorded}), which is not {yours}: refusing to build it from other code; configure the module "
            f"it was trained with, or train again"
        )
    return module_source


def load_model(
    data: bytes, *, module_source: str | None = None, module_uri: str | None = None
) -> tuple[Iota2NeuralNetwork, dict[str, Any]]:
    """Rebuild a network from model-file bytes and load its weights; nothing in the file runs.

    Args:
        data: what ``save_model`` returned.
        module_source: text of the configured dl_module (None when none is configured): the only
            code a dl_module network is built from (see ``network_code``).
        module_uri: where that text was read (messages only).

    Returns:
        (network in eval mode on the CPU, description dict with its fingerprint).

    Raises:
        BadInputError: not a sitsflow model file, corrupt, code that is not the configured
            dl_module (see ``network_code``), a network that cannot be built, weights that do not fit.
    """
    parsed = read_model_file(data)
    description = parsed["description"]
    name = description.get("network")
    source = network_code(description, module_source, module_uri)
    framework = description.get("framework") or {}
    framework_args: dict[str, Any] = {
        k: framework.get(k) for k in ("nb_dates", "nb_components", "nb_classes", "dates", "sensor")
    }
    try:
        network = build_network(
            name,
            description.get("dl_parameters") or {},
            module_source=source,
            module_uri=module_uri if source is not None else None,
            stats=parsed["stats"],
            **framework_args,
        )
    except ConfigError as exc:
        raise BadInputError(f"cannot rebuild the model file's network {name!r}: {exc}") from exc
    try:
        network.load_state_dict(parsed["state_dict"], strict=True)
    except RuntimeError as exc:
        raise BadInputError(f"the model file's weights do not fit network {name!r}: {exc}") from None
    if source is not None:  # describe it as trained (saving it again gives the same fingerprint)
        network.build_info["module_uri"] = description.get("module_uri")
    network.eval()
    return network, description
