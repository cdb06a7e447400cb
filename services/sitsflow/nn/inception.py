"""InceptionTime-style network (Ismail Fawaz et al. 2020), pixel time-series version.

Ismail Fawaz H., Lucas B., Forestier G., Pelletier C., Schmidt D. F., Weber J., Webb G. I.,
Idoumghar L., Muller P.-A., Petitjean F. (2020). "InceptionTime: Finding AlexNet for time series
classification". Data Mining and Knowledge Discovery 34:1936-1962,
https://doi.org/10.1007/s10618-020-00710-y. The authors' code (Keras): github.com/hfawaz/InceptionTime.

One network of the authors' ensemble (InceptionTime averages five of them; sitsflow trains one
per candidate, and the several seeds / candidates of a run play that role if wanted):

* an *inception module*: a bottleneck ``Conv1d(k=1) -> bottleneck`` channels (skipped when the
  module's input has a single channel, as in the authors' code), three convolutions of kernel sizes
  ``kernel_sizes`` (the authors' 40 // 2^i minus 1: 39, 19, 9) on it, and a branch
  ``MaxPool1d(3, stride 1) -> Conv1d(k=1)`` on the module's input; ``filters`` channels each,
  concatenated (4 x 32 = 128), BatchNorm, ReLU. Convolutions have no bias (BatchNorm follows);
* ``depth`` modules (6), with a residual connection every 3 modules:
  ``ReLU(x + BatchNorm(Conv1d(k=1)(shortcut)))``;
* global average pooling over the dates, then ``Linear(nb_classes)``.

Any number of dates works (the convolutions pad "same"; the pooling averages): the weights do not
depend on ``nb_dates``. Input normalisation is ``Iota2NeuralNetwork.normalize_input`` (mean
imputation of missing values, per-feature standardisation). Odd kernel sizes pad symmetrically;
an even one pads one more date on the right (PyTorch's "same").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sitsflow.nn._layers import check, check_widths
from sitsflow.nn.base import Iota2NeuralNetwork


class InceptionModule(torch.nn.Module):
    """(batch, in_channels, T) -> (batch, 4 * filters, T).

    Args:
        in_channels: channels of the input.
        filters: output channels of each of the four branches.
        kernel_sizes: kernel sizes of the three convolution branches.
        bottleneck: channels of the bottleneck; 0, or a single input channel, skips it.
    """

    def __init__(self, in_channels: int, *, filters: int, kernel_sizes: Sequence[int], bottleneck: int) -> None:
        super().__init__()
        use_bottleneck = bottleneck > 0 and in_channels > 1
        self.bottleneck = (
            torch.nn.Conv1d(in_channels, bottleneck, 1, bias=False) if use_bottleneck else torch.nn.Identity()
        )
        width = bottleneck if use_bottleneck else in_channels
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv1d(width, filters, k, padding="same", bias=False) for k in kernel_sizes
        )
        self.pool = torch.nn.MaxPool1d(3, stride=1, padding=1)
        self.pool_conv = torch.nn.Conv1d(in_channels, filters, 1, bias=False)
        self.bn = torch.nn.BatchNorm1d(filters * (len(kernel_sizes) + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, in_channels, T) -> (batch, 4 * filters, T)."""
        z = self.bottleneck(x)
        branches = [conv(z) for conv in self.convs] + [self.pool_conv(self.pool(x))]
        return torch.relu(self.bn(torch.cat(branches, dim=1)))


class Shortcut(torch.nn.Module):
    """The residual branch: ``BatchNorm(Conv1d(k=1)(x))``, (batch, in, T) -> (batch, out, T)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.bn = torch.nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, in_channels, T) -> (batch, out_channels, T)."""
        return self.bn(self.conv(x))


class InceptionTime(Iota2NeuralNetwork):
    """A stack of inception modules with residual connections, global average pooling, a Linear.

    (batch, nb_dates, nb_components) -> normalize_input -> (batch, C, T) -> depth inception
    modules (4 * filters channels each), ``ReLU(h + shortcut(h_{i-3}))`` after every
    ``residual_every``-th -> mean over the dates (batch, 4 * filters) -> Linear(nb_classes) ->
    logits.

    Args:
        filters: output channels of each branch of a module (32; a module outputs 4 * filters).
        bottleneck: channels of each module's bottleneck (32; 0 disables it).
        kernel_sizes: kernel sizes of the three convolution branches ([39, 19, 9]).
        depth: number of inception modules (6).
        residual_every: a residual connection every that many modules (3; 0 disables them).
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
        filters: int = 32,
        bottleneck: int = 32,
        kernel_sizes: Sequence[int] = (39, 19, 9),
        depth: int = 6,
        residual_every: int = 3,
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
        check(bottleneck >= 0, name, "bottleneck", f"must be >= 0, got {bottleneck}")
        kernel_sizes = check_widths(kernel_sizes, name, "kernel_sizes")
        check(depth > 0, name, "depth", f"must be > 0, got {depth}")
        check(residual_every >= 0, name, "residual_every", f"must be >= 0, got {residual_every}")
        width = filters * (len(kernel_sizes) + 1)
        self.residual_every = residual_every
        self.blocks = torch.nn.ModuleList()
        self.shortcuts = torch.nn.ModuleList()
        channels, residual_in = nb_components, nb_components
        for d in range(depth):
            self.blocks.append(
                InceptionModule(channels, filters=filters, kernel_sizes=kernel_sizes, bottleneck=bottleneck)
            )
            channels = width
            if residual_every and (d + 1) % residual_every == 0:
                self.shortcuts.append(Shortcut(residual_in, width))
                residual_in = width
        self.head = torch.nn.Linear(width, nb_classes)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """The module stack on a normalised series: (batch, C, T) -> (batch, 4 * filters, T)."""
        return run_stack(self.blocks, self.shortcuts, self.residual_every, h)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, nb_dates, nb_components) -> logits (batch, nb_classes)."""
        h = self.features(self.normalize_input(x).transpose(1, 2))
        return self.head(h.mean(dim=2))


def run_stack(
    modules: torch.nn.ModuleList, shortcuts: torch.nn.ModuleList, residual_every: int, h: torch.Tensor
) -> torch.Tensor:
    """Inception modules with a residual connection after every ``residual_every``-th (shared by
    the network and its inference form)."""
    residual = h
    k = 0
    for d, module in enumerate(modules):
        h = module(h)
        if residual_every and (d + 1) % residual_every == 0:
            h = torch.relu(h + shortcuts[k](residual))
            residual = h
            k += 1
    return h
