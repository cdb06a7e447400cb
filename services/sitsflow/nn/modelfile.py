"""Model files: weights + statistics + a JSON description, readable without running pickled code.

A model file is ``torch.save`` of a plain dict (strings, ints and tensors only)::

    {"format": "sitsflow-model", "format_version": 1,
     "description": "<JSON text>",                 # see below
     "state_dict": {name: Tensor},                 # network.state_dict() (statistics included)
     "stats": {sensor: {key: Tensor}}}             # the constructor's statistics

and is read back with ``torch.load(..., weights_only=True)``, which refuses anything but such plain
data: loading a model file never unpickles arbitrary objects.

The description holds ``network`` (dl_name), ``dl_parameters``, ``framework`` (nb_dates,
nb_components, nb_classes, dates, sensor), ``stats_keys``, ``module_source`` / ``module_uri`` (a
dl_module network, else null), ``format_version``, every extra key of the caller's description
(class codes and names, feature names, hyperparameters ...), and ``fingerprint``: the sha256 of the
canonical JSON of everything else plus every tensor of ``state_dict`` and ``stats`` (name, dtype,
shape, bytes). ``load_model`` checks it.

A network from a dl_module is rebuilt from the module source embedded in the file: that Python
runs when the file is loaded, as the dl_module itself ran at training time. Load such files only
from an output tree you trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from sitsflow.errors import BadInputError, ConfigError
from sitsflow.log import get_logger
from sitsflow.nn.base import Iota2NeuralNetwork
from sitsflow.nn.registry import NETWORKS, build_network

log = get_logger(__name__)

FORMAT = "sitsflow-model"
FORMAT_VERSION = 1
#: Keys of the description that sitsflow writes; a caller's description may repeat them only with
#: the same value (``fingerprint`` is always recomputed).
RESERVED_KEYS: tuple[str, ...] = (
    "network",
    "dl_parameters",
    "framework",
    "stats_keys",
    "module_source",
    "module_uri",
    "format_version",
    "fingerprint",
)


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
        "module_source": info["module_source"],
        "module_uri": info["module_uri"],
        "format_version": FORMAT_VERSION,
    }
    extra = dict(description or {})
    for key in RESERVED_KEYS:
        if key in extra and key != "fingerprint" and _canonical_json(extra[key]) != _canonical_json(own[key]):
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
        raise BadInputError(
            f"refusing the model file: it holds objects other than plain tensors and strings "
            f"(only sitsflow model files are accepted): {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, TypeError) as exc:
        raise BadInputError(f"the model file is corrupt or not a sitsflow model: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BadInputError("not a sitsflow model file (no 'format': 'sitsflow-model' entry)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise BadInputError(
            f"model file format version {payload.get('format_version')!r} is not supported (this sitsflow reads "
            f"version {FORMAT_VERSION})"
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


def load_model(data: bytes, *, module_source: str | None = None) -> tuple[Iota2NeuralNetwork, dict[str, Any]]:
    """Rebuild a network from model-file bytes and load its weights.

    Args:
        data: what ``save_model`` returned.
        module_source: text of the dl_module to build the network from, instead of the one
            embedded in the file (a warning is logged when they differ).

    Returns:
        (network in eval mode on the CPU, description dict with its fingerprint).

    Raises:
        BadInputError: not a sitsflow model file, corrupt, or a network that cannot be built
            (unknown dl_name without module source, weights that do not fit).
    """
    parsed = read_model_file(data)
    description = parsed["description"]
    name = description.get("network")
    embedded = description.get("module_source")
    source = embedded
    if module_source is not None:
        if embedded is not None and module_source != embedded:
            log.warning(
                "model %s: building %s from the given dl_module, which differs from the one it was trained with",
                description["fingerprint"][:12],
                name,
            )
        source = module_source
    if source is None and name not in NETWORKS:
        raise BadInputError(
            f"model file network {name!r} is not a built-in network ({', '.join(NETWORKS)}) and the file embeds no "
            f"dl_module source to build it from"
        )
    framework = description.get("framework") or {}
    try:
        network = build_network(
            name,
            description.get("dl_parameters") or {},
            module_source=source,
            module_uri=description.get("module_uri"),
            stats=parsed["stats"],
            **{k: framework.get(k) for k in ("nb_dates", "nb_components", "nb_classes", "dates", "sensor")},
        )
    except ConfigError as exc:
        raise BadInputError(f"cannot rebuild the model file's network {name!r}: {exc}") from exc
    try:
        network.load_state_dict(parsed["state_dict"], strict=True)
    except RuntimeError as exc:
        raise BadInputError(f"the model file's weights do not fit network {name!r}: {exc}") from None
    network.eval()
    return network, description
