"""Small building blocks shared by the built-in networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sitsflow.errors import ConfigError

DL_PARAMETERS_KEY = "arg_train.deep_learning_parameters.dl_parameters"


def check(condition: bool, network: str, parameter: str, message: str) -> None:
    """Raise a ConfigError naming the network and the parameter unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{DL_PARAMETERS_KEY}.{parameter}: {network}: {message}")


def check_widths(widths: Sequence[int], network: str, parameter: str, *, allow_empty: bool = False) -> list[int]:
    """Validate a list of layer widths (positive integers) and return it as a list."""
    widths = list(widths)
    check(allow_empty or len(widths) > 0, network, parameter, "must list at least one layer width")
    check(
        all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths),
        network,
        parameter,
        f"layer widths must be positive integers, got {widths}",
    )
    return widths


def check_probability(value: float, network: str, parameter: str) -> float:
    """Validate a dropout probability in [0, 1)."""
    check(0.0 <= float(value) < 1.0, network, parameter, f"must be in [0, 1), got {value}")
    return float(value)


def linear_bn_relu(widths: Sequence[int]) -> torch.nn.Sequential:
    """``Linear -> BatchNorm1d -> ReLU`` for each consecutive pair of ``widths``.

    (batch, widths[0]) -> (batch, widths[-1]); an identity when ``widths`` has one element.
    """
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.BatchNorm1d(b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def decoder_mlp(widths: Sequence[int], nb_classes: int) -> torch.nn.Sequential:
    """The L-TAE decoder: ``linear_bn_relu(widths)`` then ``Linear(widths[-1], nb_classes)``.

    (batch, widths[0]) -> logits (batch, nb_classes).
    """
    return torch.nn.Sequential(*linear_bn_relu(widths), torch.nn.Linear(widths[-1], nb_classes))
