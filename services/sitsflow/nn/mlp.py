"""Perceptrons on the flattened time series: ``ANN`` and ``MLPClassifier``.

Both see one vector of nb_dates * nb_components features per pixel (date-major), so they rely on
every pixel sharing the same date grid (the gap-filled grid, or one tile's raw dates); they do not
use the acquisition dates themselves. They are the fastest networks at inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from sitsflow.nn._layers import check, check_probability, check_widths
from sitsflow.nn.base import Iota2NeuralNetwork

_ACTIVATIONS: dict[str, type[torch.nn.Module]] = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh}


class ANN(Iota2NeuralNetwork):
    """A small perceptron modelled on the reference's statistics example (not exactly it: no ReLU on
    the standardised input, widths of its own; docs/networks.md, "ANN").

    (batch, nb_dates, nb_components) -> normalize_input -> flatten (batch, nb_dates * nb_components)
    -> Linear(hidden_1) -> BatchNorm -> ReLU -> Linear(hidden_2) -> BatchNorm -> ReLU ->
    Linear(nb_classes) -> logits (batch, nb_classes).

    Args:
        hidden_1: width of the first hidden layer (256).
        hidden_2: width of the second hidden layer (128).
        default_mean, default_std: statistics fallbacks (see Iota2NeuralNetwork).
    """

    def __init__(
        self,
        *,
        nb_dates: int,
        nb_components: int,
        nb_classes: int,
        dates: Sequence[int],
        stats: Mapping[str, Mapping[str, Any]],
        sensor: str,
        default_mean: float = 0.0,
        default_std: float = 1.0,
        hidden_1: int = 256,
        hidden_2: int = 128,
    ) -> None:
        super().__init__(
            nb_dates=nb_dates,
            nb_components=nb_components,
            nb_classes=nb_classes,
            dates=dates,
            stats=stats,
            sensor=sensor,
            default_mean=default_mean,
            default_std=default_std,
        )
        name = type(self).__name__
        check(hidden_1 > 0, name, "hidden_1", f"must be > 0, got {hidden_1}")
        check(hidden_2 > 0, name, "hidden_2", f"must be > 0, got {hidden_2}")
        self.hidden1 = torch.nn.Linear(nb_dates * nb_components, hidden_1)
        self.bnhidden1 = torch.nn.BatchNorm1d(hidden_1)
        self.hidden2 = torch.nn.Linear(hidden_1, hidden_2)
        self.bnhidden2 = torch.nn.BatchNorm1d(hidden_2)
        self.output = torch.nn.Linear(hidden_2, nb_classes)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, nb_dates, nb_components) -> logits (batch, nb_classes)."""
        x = self.normalize_input(x).flatten(1)
        x = torch.relu(self.bnhidden1(self.hidden1(x)))
        x = torch.relu(self.bnhidden2(self.hidden2(x)))
        return self.output(x)


class MLPClassifier(Iota2NeuralNetwork):
    """A configurable multi-layer perceptron.

    (batch, nb_dates, nb_components) -> normalize_input -> flatten -> for each width w of
    hidden_layers: Linear(w) -> [BatchNorm] -> activation -> Dropout(dropout) -> finally
    Linear(nb_classes) -> logits (batch, nb_classes).

    Args:
        hidden_layers: widths of the hidden layers ([512, 256, 128]).
        dropout: dropout probability after each hidden layer (0.3).
        batch_norm: BatchNorm1d after each hidden Linear (True).
        activation: "relu", "gelu" or "tanh" ("relu").
        default_mean, default_std: statistics fallbacks (see Iota2NeuralNetwork).
    """

    def __init__(
        self,
        *,
        nb_dates: int,
        nb_components: int,
        nb_classes: int,
        dates: Sequence[int],
        stats: Mapping[str, Mapping[str, Any]],
        sensor: str,
        default_mean: float = 0.0,
        default_std: float = 1.0,
        hidden_layers: Sequence[int] = (512, 256, 128),
        dropout: float = 0.3,
        batch_norm: bool = True,
        activation: Literal["relu", "gelu", "tanh"] = "relu",
    ) -> None:
        super().__init__(
            nb_dates=nb_dates,
            nb_components=nb_components,
            nb_classes=nb_classes,
            dates=dates,
            stats=stats,
            sensor=sensor,
            default_mean=default_mean,
            default_std=default_std,
        )
        name = type(self).__name__
        widths = check_widths(hidden_layers, name, "hidden_layers")
        dropout = check_probability(dropout, name, "dropout")
        allowed = sorted(_ACTIVATIONS)
        check(activation in _ACTIVATIONS, name, "activation", f"must be one of {allowed}, got {activation!r}")
        layers: list[torch.nn.Module] = []
        width_in = nb_dates * nb_components
        for width in widths:
            layers.append(torch.nn.Linear(width_in, width))
            if batch_norm:
                layers.append(torch.nn.BatchNorm1d(width))
            layers += [_ACTIVATIONS[activation](), torch.nn.Dropout(dropout)]
            width_in = width
        layers.append(torch.nn.Linear(width_in, nb_classes))
        self.layers = torch.nn.Sequential(*layers)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, nb_dates, nb_components) -> logits (batch, nb_classes)."""
        return self.layers(self.normalize_input(x).flatten(1))
