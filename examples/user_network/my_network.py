"""An example user network for ``arg_train.deep_learning_parameters.dl_module``.

Point the configuration at this file and name the class::

    arg_train : {
        deep_learning_parameters : {
            dl_name : "MyNetwork"
            dl_module : "examples/user_network/my_network.py"
            dl_parameters : {"hidden" : 64, "dropout" : 0.1}
        }
    }

The class derives from ``sitsflow.nn.Iota2NeuralNetwork``, takes the framework's arguments as
keyword arguments (collected here in ``**framework``) and passes them on, and implements
``_forward(x)``: x (batch, nb_dates, nb_components) -> logits (batch, nb_classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sitsflow.nn import Iota2NeuralNetwork


class MyNetwork(Iota2NeuralNetwork):
    """Two hidden layers on the flattened, imputed and standardised time series.

    Args:
        hidden: width of both hidden layers.
        dropout: dropout probability before the output layer.
        **framework: nb_dates, nb_components, nb_classes, dates, stats, sensor (given by sitsflow).
    """

    def __init__(self, *, hidden: int = 64, dropout: float = 0.1, **framework) -> None:
        super().__init__(**framework)
        features = self.nb_dates * self.nb_components
        self.hidden1 = torch.nn.Linear(features, hidden)
        self.bnhidden1 = torch.nn.BatchNorm1d(hidden)
        self.hidden2 = torch.nn.Linear(hidden, hidden)
        self.bnhidden2 = torch.nn.BatchNorm1d(hidden)
        self.dropout = torch.nn.Dropout(dropout)
        self.output = torch.nn.Linear(hidden, self.nb_classes)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, nb_dates, nb_components) -> logits (batch, nb_classes)."""
        stats = self._stats[self.sensor]  # e.g. self._stats["s2_theia"]
        mean = stats["mean"]  # (nb_dates * nb_components,), date-major
        x = self.nans_imputation(x, mean, self.default_mean)  # NaN -> the feature's mean
        std = torch.sqrt(stats["var"])
        x = self.standardize(x, mean, std, self.default_mean, self.default_std)

        x = x.flatten(1)  # (batch, nb_dates * nb_components)
        x = F.relu(self.bnhidden1(self.hidden1(x)))
        x = F.relu(self.bnhidden2(self.hidden2(x)))
        return self.output(self.dropout(x))
