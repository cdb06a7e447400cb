"""iota2 user networks, unchanged: their imports and their constructors.

An iota2 user's ``dl_module`` starts with::

    from iota2.learning.pytorch.torch_nn_bank import Iota2NeuralNetwork   # or
    from torch_nn_bank import Iota2NeuralNetwork

While sitsflow executes a dl_module (and only then), :func:`iota2_imports` makes those module
names (and their parents ``iota2``, ``iota2.learning``, ``iota2.learning.pytorch``) aliases of
this module, in ``sys.modules``; they are removed afterwards (nothing is installed on disk, and
``import iota2`` elsewhere fails as before). This module holds what such a file imports from
``torch_nn_bank``: :class:`Iota2NeuralNetwork` (below) and the built-in networks.

**Constructors.** sitsflow's documented way is keyword arguments: ``nb_dates``,
``nb_components``, ``nb_classes``, ``dates``, ``stats``, ``sensor`` (``FRAMEWORK_ARGS``) passed
on to the base class. An iota2-style class instead declares the arguments iota2 passes, by these
names, and gets them (by keyword) when it declares them (:data:`IOTA2_ARGS`):

=================== ==========================================================================
``nb_features``     ``nb_dates * nb_components``: the length of a flattened series
``nb_class``        the number of classes (``nb_classes``)
``doy_sensors_dic`` ``{sensor: [day offsets of the dates since the first one]}`` for every
                    sensor key of the statistics
=================== ==========================================================================

and calls ``super().__init__(doy_sensors_dic, default_mean, default_std)`` (positionally or by
keyword, or ``super().__init__()``): this module's :class:`Iota2NeuralNetwork` takes the
framework arguments from the network being built (:func:`building`), so the statistics
(``self._stats``), ``self.default_mean``/``default_std``, ``nans_imputation``, ``standardize``
and ``_forward`` work as in iota2. The iota2 source of the deep-learning mode was not available:
these names are those of iota2's ``torch_nn_bank`` networks as its users write them; the
reference document only fixes the base-class API (docs/networks.md, "iota2 user networks").
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import types
from collections.abc import Iterator, Mapping
from typing import Any

from sitsflow.nn import base
from sitsflow.nn.attention import SimpleSelfAttentionClassifier
from sitsflow.nn.ltae import LTAEClassifier
from sitsflow.nn.mlp import ANN, MLPClassifier

#: The module names an iota2 dl_module imports the bank by.
BANK_NAMES: tuple[str, ...] = ("iota2.learning.pytorch.torch_nn_bank", "torch_nn_bank")
#: The arguments iota2 passes to a network constructor, besides its dl_parameters.
IOTA2_ARGS: tuple[str, ...] = ("nb_features", "nb_class", "doy_sensors_dic")

_FRAMEWORK: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "sitsflow_network_framework", default=None
)
_LOCK = threading.RLock()


def iota2_values(framework: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`IOTA2_ARGS` values for the framework arguments of a network."""
    offsets = [float(d) for d in base.day_offsets(framework["dates"])]
    sensors = list(framework["stats"]) if isinstance(framework.get("stats"), Mapping) else []
    return {
        "nb_features": int(framework["nb_dates"]) * int(framework["nb_components"]),
        "nb_class": int(framework["nb_classes"]),
        "doy_sensors_dic": {str(s): list(offsets) for s in dict.fromkeys([framework["sensor"], *sensors])},
    }


@contextlib.contextmanager
def building(framework: Mapping[str, Any]) -> Iterator[None]:
    """While a network is built: the framework arguments an iota2-style base call takes."""
    token = _FRAMEWORK.set(dict(framework))
    try:
        yield
    finally:
        _FRAMEWORK.reset(token)


class Iota2NeuralNetwork(base.Iota2NeuralNetwork):
    """iota2's ``torch_nn_bank.Iota2NeuralNetwork``, as an iota2 dl_module imports it.

    ``Iota2NeuralNetwork(doy_sensors_dic=None, default_mean=0.0, default_std=1.0)``: the framework
    arguments come from the network being built; given by keyword (sitsflow's way), they win.
    ``self.doy_sensors_dic`` is the given dict, or the one of :func:`iota2_values`.
    """

    def __init__(
        self,
        doy_sensors_dic: Mapping[str, Any] | None = None,
        default_mean: float = 0.0,
        default_std: float = 1.0,
        **framework: Any,
    ) -> None:
        pending = dict(_FRAMEWORK.get() or {})
        pending.update(framework)
        missing = [name for name in base.FRAMEWORK_ARGS if name not in pending]
        if missing:
            raise TypeError(
                f"{type(self).__name__}: Iota2NeuralNetwork needs {', '.join(missing)}: build the network with "
                "sitsflow.nn.build_network (or pass the framework arguments by keyword)"
            )
        framework_args = {name: pending[name] for name in base.FRAMEWORK_ARGS}
        super().__init__(**framework_args, default_mean=default_mean, default_std=default_std)
        self.doy_sensors_dic = (
            dict(doy_sensors_dic) if doy_sensors_dic is not None else iota2_values(framework_args)["doy_sensors_dic"]
        )


def _package(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "sitsflow's stand-in for iota2's package while a dl_module loads")
    module.__path__ = []  # a package: its submodules are the aliases below
    return module


@contextlib.contextmanager
def iota2_imports() -> Iterator[None]:
    """While executing a dl_module: ``iota2.learning.pytorch.torch_nn_bank`` and ``torch_nn_bank``
    are this module. Names already in ``sys.modules`` are left alone (and restored as they were)."""
    bank = sys.modules[__name__]
    aliases: dict[str, types.ModuleType] = {}
    for full in BANK_NAMES:
        parts = full.split(".")
        for depth in range(1, len(parts)):
            aliases.setdefault(".".join(parts[:depth]), _package(".".join(parts[:depth])))
        aliases[full] = bank
    for name, module in aliases.items():  # parent.child attributes, as the import system sets them
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(aliases[parent], child, module)
    with _LOCK:
        added = [name for name in aliases if name not in sys.modules]
        for name in added:
            sys.modules[name] = aliases[name]
        try:
            yield
        finally:
            for name in added:
                if sys.modules.get(name) is aliases[name]:
                    del sys.modules[name]


__all__ = [
    "ANN",
    "BANK_NAMES",
    "IOTA2_ARGS",
    "Iota2NeuralNetwork",
    "LTAEClassifier",
    "MLPClassifier",
    "SimpleSelfAttentionClassifier",
    "building",
    "iota2_imports",
    "iota2_values",
]
