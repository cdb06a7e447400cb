"""``dl_name`` -> network class, ``dl_parameters`` checking, users' ``dl_module`` files."""

from __future__ import annotations

import collections.abc
import hashlib
import inspect
import sys
import traceback
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from sitsflow.errors import BadInputError, ConfigError, SitsflowError
from sitsflow.log import get_logger
from sitsflow.nn import iota2_compat
from sitsflow.nn._layers import DL_PARAMETERS_KEY
from sitsflow.nn.attention import SimpleSelfAttentionClassifier
from sitsflow.nn.base import FRAMEWORK_ARGS, Iota2NeuralNetwork
from sitsflow.nn.inception import InceptionTime
from sitsflow.nn.ltae import LTAEClassifier
from sitsflow.nn.mlp import ANN, MLPClassifier
from sitsflow.nn.tempcnn import TempCNN

log = get_logger(__name__)

#: The built-in networks, selectable by ``arg_train.deep_learning_parameters.dl_name``.
NETWORKS: dict[str, type[Iota2NeuralNetwork]] = {
    "LTAEClassifier": LTAEClassifier,
    "ANN": ANN,
    "MLPClassifier": MLPClassifier,
    "SimpleSelfAttentionClassifier": SimpleSelfAttentionClassifier,
    "TempCNN": TempCNN,
    "InceptionTime": InceptionTime,
}

DL_MODULE_KEY = "arg_train.deep_learning_parameters.dl_module"
DL_NAME_KEY = "arg_train.deep_learning_parameters.dl_name"


# ---------------------------------------------------------------------------- user modules
def read_dl_module(uri: str | None) -> str | None:
    """The text of the configured ``dl_module`` (local path or s3:// URI); None when none is set.

    This is the only place a user network's code comes from: model files never carry code
    (see ``sitsflow.nn.modelfile``).

    Raises:
        ConfigError: the file is missing or not UTF-8 text (exit 2, naming the key and the file).
    """
    if uri is None:
        return None
    from sitsflow import storage  # the network bank itself never touches storage

    try:
        return storage.read_text(uri)
    except BadInputError as exc:
        raise ConfigError(f"{DL_MODULE_KEY}: cannot read the network file {uri}: {exc}") from None


def load_user_module(module_source: str, module_uri: str | None = None) -> types.ModuleType:
    """Execute the text of a user's ``dl_module`` file as a module (cached by location and content).

    Raises:
        ConfigError: syntax error (with its line) or an exception while executing the module.
    """
    where = module_uri or "<dl_module>"
    if not isinstance(module_source, str):
        raise ConfigError(
            f"{DL_MODULE_KEY}: {where}: the module source must be text, got {type(module_source).__name__}"
        )
    digest = hashlib.sha256(f"{where}\n{module_source}".encode()).hexdigest()[:16]
    name = f"sitsflow_user_network_{digest}"
    cached = sys.modules.get(name)
    if cached is not None:
        return cached
    try:
        code = compile(module_source, where, "exec")
    except SyntaxError as exc:
        raise ConfigError(
            f"{DL_MODULE_KEY}: {where}: syntax error at line {exc.lineno}: {exc.msg}"
            + (f": {exc.text.strip()}" if exc.text else "")
        ) from None
    module = types.ModuleType(name)
    module.__file__ = where
    sys.modules[name] = module  # dataclasses, typing and pickling look modules up there
    try:
        with iota2_compat.iota2_imports():  # `from iota2.learning.pytorch.torch_nn_bank import ...` works
            exec(code, module.__dict__)  # noqa: S102 - the user's own network file, by design
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure of user code is bad input
        del sys.modules[name]
        line = user_line(exc, where)
        raise ConfigError(
            f"{DL_MODULE_KEY}: {where}: importing the module failed{line}: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def user_line(exc: BaseException, where: str) -> str:
    """`` at line N``: the last line of the user's file ``where`` in the traceback of ``exc`` ("" if none)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == where]
    return f" at line {frames[-1].lineno}" if frames else ""


_BASES = (Iota2NeuralNetwork, iota2_compat.Iota2NeuralNetwork)
#: Constructor arguments the framework supplies: sitsflow's, and the ones iota2 passes.
SUPPLIED: tuple[str, ...] = FRAMEWORK_ARGS + iota2_compat.IOTA2_ARGS


def _networks_in(module: types.ModuleType) -> list[str]:
    return sorted(
        n
        for n, v in vars(module).items()
        if isinstance(v, type) and issubclass(v, Iota2NeuralNetwork) and v not in _BASES
    )


def resolve_network(
    dl_name: str, module_source: str | None = None, module_uri: str | None = None
) -> type[Iota2NeuralNetwork]:
    """Find the class named ``dl_name``: in the user's module when given, else among the built-ins."""
    if not isinstance(dl_name, str) or not dl_name:
        raise ConfigError(f"{DL_NAME_KEY}: a network class name is required, got {dl_name!r}")
    if module_source is None:
        if dl_name not in NETWORKS:
            raise ConfigError(
                f"{DL_NAME_KEY}: unknown network {dl_name!r}; built-in networks: {', '.join(NETWORKS)} "
                f"(or set {DL_MODULE_KEY} to a file defining it)"
            )
        return NETWORKS[dl_name]
    where = module_uri or "<dl_module>"
    module = load_user_module(module_source, module_uri)
    candidate = getattr(module, dl_name, None)
    if candidate is None:
        found = _networks_in(module)
        other = sorted(
            n
            for n, v in vars(module).items()
            if isinstance(v, type) and n not in found and v not in _BASES and not n.startswith("_")
        )
        raise ConfigError(
            f"{DL_NAME_KEY}: class {dl_name!r} not found in {where}; networks found there: "
            f"{', '.join(found) if found else 'none'}" + (f"; other classes: {', '.join(other)}" if other else "")
        )
    if not isinstance(candidate, type) or not issubclass(candidate, Iota2NeuralNetwork):
        bases = [b.__name__ for b in candidate.__mro__[1:] if b is not object] if isinstance(candidate, type) else []
        raise ConfigError(
            f"{DL_NAME_KEY}: {dl_name!r} in {where} must be a class derived from sitsflow.nn.Iota2NeuralNetwork"
            + (f"; its bases are {', '.join(bases)}" if bases else f"; it is a {type(candidate).__name__}")
        )
    return candidate


# ---------------------------------------------------------------------------- dl_parameters
def _describe(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "any"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("collections.abc.", "")


def _default(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits ``annotation`` (int, float, bool, str, lists/sequences, Literal, Optional).

    Annotations outside that set are not checked (True).
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (list, tuple, collections.abc.Sequence):
        return isinstance(value, list | tuple)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence):
        if not isinstance(value, list | tuple):
            return False
        item_types = [a for a in args if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in args:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return not item_types or all(_matches(v, item_types[0]) for v in value)
    if annotation is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def network_parameters(cls: type[Iota2NeuralNetwork]) -> dict[str, inspect.Parameter]:
    """The constructor parameters a user may set in ``dl_parameters`` (annotations resolved)."""
    signature = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations are simply not type-checked
        hints = {}
    out: dict[str, inspect.Parameter] = {}
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    if var_keyword and cls not in _BASES:
        # ``**kwargs`` is taken as forwarding to Iota2NeuralNetwork.__init__ (its defaults become settable)
        out.update(
            network_parameters(
                iota2_compat.Iota2NeuralNetwork
                if issubclass(cls, iota2_compat.Iota2NeuralNetwork)
                else Iota2NeuralNetwork
            )
        )
    for name, param in signature.parameters.items():
        if name == "self" or name in SUPPLIED:
            continue
        if param.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
            inspect.Parameter.POSITIONAL_ONLY,
        ):
            continue
        out[name] = param.replace(annotation=hints.get(name, param.annotation))
    return out


def check_dl_parameters(
    cls: type[Iota2NeuralNetwork], dl_parameters: Mapping[str, Any], dl_name: str
) -> dict[str, Any]:
    """Validate ``dl_parameters`` against the constructor of ``cls``; return them as a dict.

    A constructor's ``**kwargs`` is taken as forwarding to ``Iota2NeuralNetwork.__init__``: it
    accepts ``default_mean`` and ``default_std``, nothing else.

    Raises:
        ConfigError: not a dict, a framework argument, an unknown parameter, a value of the wrong
            type, a missing required one.
    """
    if dl_parameters is None:
        dl_parameters = {}
    if not isinstance(dl_parameters, Mapping):
        raise ConfigError(
            f"{DL_PARAMETERS_KEY}: must be a dict of constructor parameters, got {type(dl_parameters).__name__}"
        )
    accepted = network_parameters(cls)
    listing = ", ".join(
        f"{n} ({_describe(p.annotation)}"
        + (f", default {_default(p.default)})" if p.default is not inspect.Parameter.empty else ", required)")
        for n, p in accepted.items()
    )
    for key, value in dl_parameters.items():
        if key in SUPPLIED:
            raise ConfigError(
                f"{DL_PARAMETERS_KEY}.{key}: network {dl_name}: {key!r} is supplied by sitsflow from the sample "
                f"database ({', '.join(SUPPLIED)}) and cannot be set; accepted parameters: {listing or 'none'}"
            )
        if key not in accepted:
            raise ConfigError(
                f"{DL_PARAMETERS_KEY}.{key}: network {dl_name} has no parameter {key!r}; accepted parameters: "
                f"{listing or 'none'}"
            )
        annotation = accepted[key].annotation
        if not _matches(value, annotation):
            raise ConfigError(
                f"{DL_PARAMETERS_KEY}.{key}: network {dl_name}: expected {_describe(annotation)}, got "
                f"{value!r} ({type(value).__name__}); accepted parameters: {listing}"
            )
    missing = [n for n, p in accepted.items() if p.default is inspect.Parameter.empty and n not in dl_parameters]
    if missing:
        raise ConfigError(
            f"{DL_PARAMETERS_KEY}: network {dl_name} requires {', '.join(missing)}; accepted parameters: {listing}"
        )
    return dict(dl_parameters)


# ---------------------------------------------------------------------------- build
def _supplied(cls: type[Iota2NeuralNetwork], framework: Mapping[str, Any]) -> dict[str, Any]:
    """The framework arguments to pass to ``cls``: those its constructor names (sitsflow's and
    iota2's, ``iota2_compat.IOTA2_ARGS``); with ``**kwargs``, sitsflow's ones it does not name
    (forwarded to the base class)."""
    parameters = inspect.signature(cls.__init__).parameters
    named = {n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)}
    values = (
        {**framework, **iota2_compat.iota2_values(framework)} if named & set(iota2_compat.IOTA2_ARGS) else framework
    )
    out = {name: values[name] for name in SUPPLIED if name in named}
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        out.update({name: framework[name] for name in FRAMEWORK_ARGS if name not in out})
    return out


def build_network(
    dl_name: str,
    dl_parameters: Mapping[str, Any] | None,
    *,
    module_source: str | None = None,
    module_uri: str | None = None,
    nb_dates: int,
    nb_components: int,
    nb_classes: int,
    dates: Sequence[int],
    stats: Mapping[str, Mapping[str, Any]],
    sensor: str,
) -> Iota2NeuralNetwork:
    """Instantiate the network ``dl_name`` with the user's ``dl_parameters`` and the framework's arguments.

    Args:
        dl_name: a built-in name (``NETWORKS``) or a class of ``module_source``.
        dl_parameters: constructor parameters from the configuration.
        module_source: text of the user's dl_module file (read by the caller), or None.
        module_uri: where that text came from (messages only).
        nb_dates, nb_components, nb_classes, dates, stats, sensor: see ``Iota2NeuralNetwork``.

    Returns:
        The network, in training mode, on the CPU. It remembers how it was built
        (``network.build_info``) so ``save_model`` can describe it.

    Raises:
        ConfigError: unknown network, bad dl_parameters, bad dl_module, constructor failure.
        BadInputError: framework arguments (dates, stats shapes ...) that do not fit.
    """
    cls = resolve_network(dl_name, module_source, module_uri)
    params = check_dl_parameters(cls, dl_parameters or {}, dl_name)
    framework: dict[str, Any] = {
        "nb_dates": nb_dates,
        "nb_components": nb_components,
        "nb_classes": nb_classes,
        "dates": list(dates),
        "stats": stats,
        "sensor": sensor,
    }
    try:
        with iota2_compat.building(framework):
            network = cls(**_supplied(cls, framework), **params)
    except SitsflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user constructor may fail in any way
        where = f" ({module_uri or '<dl_module>'})" if module_source is not None else ""
        line = user_line(exc, module_uri or "<dl_module>") if module_source is not None else ""
        raise ConfigError(
            f"{DL_NAME_KEY}: building network {dl_name}{where} failed{line}: {type(exc).__name__}: {exc}"
        ) from exc
    if not getattr(network, "_sitsflow_base_initialized", False):
        raise ConfigError(
            f"{DL_NAME_KEY}: network {dl_name} did not call Iota2NeuralNetwork.__init__: its constructor must call "
            f"super().__init__(nb_dates=..., nb_components=..., nb_classes=..., dates=..., stats=..., sensor=...)"
        )
    network.build_info = {
        "network": dl_name,
        "dl_parameters": params,
        "module_source": module_source,
        "module_uri": module_uri,
    }
    log.debug("built %s (%d parameters)", dl_name, sum(p.numel() for p in network.parameters()))
    return network


__all__ = [
    "NETWORKS",
    "build_network",
    "check_dl_parameters",
    "load_user_module",
    "network_parameters",
    "read_dl_module",
    "resolve_network",
]
