"""TempCNN (Pelletier, Webb & Petitjean 2019), pixel time-series version.

Pelletier C., Webb G. I., Petitjean F. (2019). "Temporal Convolutional Neural Network for the
Classification of Satellite Image Time Series". Remote Sensing 11(5):523,
https://doi.org/10.3390/rs11050523. The authors' code (Keras): github.com/charlotte-pel/temporalCNN.

Their best architecture: three 1D convolutions along time (64 filters, kernel 5, "same" padding),
each followed by BatchNorm, ReLU and dropout 0.2; the feature maps flattened; a fully connected
layer of 256 units with BatchNorm, ReLU and dropout; softmax. The same here, with:

* input normalisation by the training statistics (``Iota2NeuralNetwork.normalize_input``: mean
  imputation of missing values, then per-feature standardisation) where the authors standardised
  each band with its global statistics before the network;
* ``pooling="flatten"`` (the paper's, the default) sizes the dense layer from ``nb_dates``, which
  every sitsflow network receives at construction: any number of dates works, and a trained model
  is tied to its date grid like ``ANN`` / ``MLPClassifier`` (every sitsflow model checks it);
  ``pooling="mean"`` averages the feature maps over the dates instead (global average pooling),
  so the weights do not depend on the number of dates, at the cost of the position information
  the paper's flatten keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from sitsflow.nn._layers import check, check_probability
from sitsflow.nn.base import Iota2NeuralNetwork


class TempCNN(Iota2NeuralNetwork):
    """Temporal convolutions, then a dense layer.

    (batch, nb_dates, nb_components) -> normalize_input -> (batch, C, T) -> n_layers times
    [Conv1d(filters, kernel_size, "same") -> BatchNorm1d -> ReLU -> Dropout(dropout)] ->
    flatten (batch, filters * T) (or the mean over the dates, (batch, filters)) -> Linear(dense)
    -> BatchNorm1d -> ReLU -> Dropout(dropout) -> Linear(nb_classes) -> logits.

    Args:
        filters: filters of each convolution (64).
        kernel_size: temporal kernel size, in dates (5).
        n_layers: number of convolution blocks (3).
        dense: width of the fully connected layer (256).
        dropout: dropout probability after every block and the dense layer (0.2).
        pooling: "flatten" (the paper's) or "mean" (average over the dates) ("flatten").
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
        filters: int = 64,
        kernel_size: int = 5,
        n_layers: int = 3,
        dense: int = 256,
        dropout: float = 0.2,
        pooling: Literal["flatten", "mean"] = "flatten",
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
        check(filters > 0, name, "filters", f"must be > 0, got {filters}")
        check(kernel_size > 0, name, "kernel_size", f"must be > 0, got {kernel_size}")
        check(n_layers > 0, name, "n_layers", f"must be > 0, got {n_layers}")
        check(dense > 0, name, "dense", f"must be > 0, got {dense}")
        check(pooling in ("flatten", "mean"), name, "pooling", f"must be 'flatten' or 'mean', got {pooling!r}")
        dropout = check_probability(dropout, name, "dropout")
        self.pooling = pooling
        layers: list[torch.nn.Module] = []
        width = nb_components
        for _ in range(n_layers):
            layers += [
                torch.nn.Conv1d(width, filters, kernel_size, padding="same"),
                torch.nn.BatchNorm1d(filters),
                torch.nn.ReLU(),
                torch.nn.Dropout(dropout),
            ]
            width = filters
        self.conv = torch.nn.Sequential(*layers)
        flat = filters * nb_dates if pooling == "flatten" else filters
        self.head = torch.nn.Sequential(
            torch.nn.Linear(flat, dense),
            torch.nn.BatchNorm1d(dense),
            torch.nn.ReLU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(dense, nb_classes),
        )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, nb_dates, nb_components) -> logits (batch, nb_classes)."""
        h = self.conv(self.normalize_input(x).transpose(1, 2))  # (B, filters, T)
        h = h.flatten(1) if self.pooling == "flatten" else h.mean(dim=2)
        return self.head(h)
