"""The base class of every network sitsflow trains: built-in ones and users' (``dl_module``).

A network receives pixel time series shaped ``(batch, nb_dates, nb_components)`` (float32, NaN =
missing) and returns class logits shaped ``(batch, nb_classes)``. The framework calls
:meth:`Iota2NeuralNetwork.forward`, which checks the input and calls the network's own
``_forward``.

Statistics of the training samples reach the network as ``self._stats``:
``{sensor: {"mean": Tensor(nb_dates * nb_components), "var": ..., "min": ..., "max": ...,
"quantile_0.1": ..., "quantile_0.5": ..., "quantile_0.95": ...}}``, chronological and date-major
(all components of date 1, then date 2 ...). They are registered as buffers: they follow
``.to(device)`` and are saved in ``state_dict()``.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sitsflow.errors import BadInputError

#: What the framework supplies to every network constructor (never the user's dl_parameters).
FRAMEWORK_ARGS: tuple[str, ...] = ("nb_dates", "nb_components", "nb_classes", "dates", "stats", "sensor")

#: Statistic keys sitsflow computes; ``quantile_<q>`` accepts any level q in ]0, 1[.
STAT_KEYS: tuple[str, ...] = ("min", "max", "mean", "var")
_QUANTILE_KEY = re.compile(r"^quantile_(0(\.\d+)?|1(\.0+)?)$")


def parse_date(value: int) -> _dt.date:
    """Turn a YYYYMMDD integer into a date; BadInputError when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BadInputError(f"acquisition date {value!r} is not a YYYYMMDD integer")
    text = f"{int(value):08d}"
    try:
        return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise BadInputError(f"acquisition date {value!r} is not a valid YYYYMMDD date") from None


def day_offsets(dates: Sequence[int]) -> list[int]:
    """Days elapsed since the first date for each YYYYMMDD date (the first one gives 0)."""
    parsed = [parse_date(d) for d in dates]
    return [(d - parsed[0]).days for d in parsed]


def _stat_buffer_name(index: int) -> str:
    return f"_stat_{index}"


class Iota2NeuralNetwork(torch.nn.Module):
    """Base class of sitsflow networks (iota2's ``Iota2NeuralNetwork``).

    Subclasses accept the framework arguments as keyword arguments, pass them to
    ``super().__init__(**framework_args)``, and implement ``_forward(x)``:
    ``x`` (batch, nb_dates, nb_components) float32 -> logits (batch, nb_classes).

    Args:
        nb_dates: number of acquisition dates T of the input series.
        nb_components: number of components C per date (bands, then spectral indices).
        nb_classes: number of output classes K.
        dates: the T acquisition dates as YYYYMMDD integers, chronological (non-decreasing).
        stats: ``{sensor: {key: values}}``; each values is a tensor, array or list of
            ``nb_dates * nb_components`` numbers, date-major. Keys: ``min``, ``max``, ``mean``,
            ``var``, ``quantile_<q>``. ``stats[sensor]`` must hold ``mean`` and ``var``.
        sensor: the sensor key of ``stats`` the inputs come from (``s2_theia``, ...).
        default_mean: replaces NaN values of a mean statistic (imputation, standardisation).
        default_std: replaces NaN, zero or negative values of a standard deviation.

    Attributes:
        dates: list of the T YYYYMMDD integers.
        day_offsets: buffer (T,) float32, days since the first date.
        default_mean, default_std: the fallbacks above.
    """

    #: how build_network made it (name, dl_parameters, module source/URI): save_model records it
    build_info: dict[str, Any]
    day_offsets: torch.Tensor  # a buffer

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
    ) -> None:
        super().__init__()
        for name, value in (("nb_dates", nb_dates), ("nb_components", nb_components), ("nb_classes", nb_classes)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise BadInputError(f"{name} must be a positive integer, got {value!r}")
        if int(nb_classes) < 2:
            raise BadInputError(f"nb_classes must be at least 2, got {nb_classes}")
        self.nb_dates = int(nb_dates)
        self.nb_components = int(nb_components)
        self.nb_classes = int(nb_classes)
        self.sensor = str(sensor)
        for name, fallback in (("default_mean", default_mean), ("default_std", default_std)):
            if isinstance(fallback, bool) or not isinstance(fallback, (int, float)) or not math.isfinite(fallback):
                raise BadInputError(f"{name} must be a finite number, got {fallback!r}")
        if default_std <= 0:
            raise BadInputError(f"default_std must be > 0, got {default_std}")
        self.default_mean = float(default_mean)
        self.default_std = float(default_std)

        dates = list(dates)
        if len(dates) != self.nb_dates:
            raise BadInputError(f"{len(dates)} acquisition dates given for nb_dates={self.nb_dates}")
        offsets = day_offsets(dates)
        if any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
            raise BadInputError(f"acquisition dates must be chronological, got {dates}")
        self.dates: list[int] = [int(d) for d in dates]
        self.register_buffer("day_offsets", torch.tensor(offsets, dtype=torch.float32), persistent=False)

        self._stat_index: dict[str, dict[str, str]] = {}
        self._register_stats(stats)
        self._sitsflow_base_initialized = True

    # ------------------------------------------------------------------ statistics
    def _register_stats(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        if not isinstance(stats, Mapping):
            raise BadInputError(f"stats must be a dict {{sensor: {{key: values}}}}, got {type(stats).__name__}")
        if self.sensor not in stats:
            raise BadInputError(f"stats hold no statistics for sensor {self.sensor!r}; sensors given: {sorted(stats)}")
        expected = self.nb_dates * self.nb_components
        index = 0
        for sensor in sorted(stats):
            per_key = stats[sensor]
            if not isinstance(per_key, Mapping):
                raise BadInputError(f"stats[{sensor!r}] must be a dict {{key: values}}")
            self._stat_index[str(sensor)] = {}
            for key in sorted(per_key):
                if key not in STAT_KEYS and not _QUANTILE_KEY.match(str(key)):
                    raise BadInputError(
                        f"unknown statistic {key!r} for sensor {sensor!r}; allowed: "
                        f"{', '.join(STAT_KEYS)}, quantile_<q> (e.g. quantile_0.5)"
                    )
                values = per_key[key]
                try:
                    if isinstance(values, torch.Tensor):
                        tensor = values.detach().to(device="cpu", dtype=torch.float32).reshape(-1).clone()
                    else:
                        tensor = torch.from_numpy(np.array(values, dtype=np.float32).reshape(-1))
                except (TypeError, ValueError) as exc:
                    raise BadInputError(f"statistic {sensor}/{key} is not a vector of numbers: {exc}") from None
                if tensor.numel() != expected:
                    raise BadInputError(
                        f"statistic {sensor}/{key} has {tensor.numel()} values; expected nb_dates * nb_components"
                        f" = {self.nb_dates} * {self.nb_components} = {expected}"
                    )
                name = _stat_buffer_name(index)
                self.register_buffer(name, tensor)
                self._stat_index[str(sensor)][str(key)] = name
                index += 1
        for key in ("mean", "var"):
            if key not in self._stat_index[self.sensor]:
                raise BadInputError(f"stats[{self.sensor!r}] lacks the {key!r} statistic")

    @property
    def _stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{sensor: {key: Tensor(nb_dates * nb_components)}}``, the registered statistic buffers."""
        return {
            sensor: {key: getattr(self, name) for key, name in keys.items()}
            for sensor, keys in self._stat_index.items()
        }

    def stats_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """A detached CPU copy of ``self._stats`` (what model files store next to the weights)."""
        return {s: {k: v.detach().cpu().clone() for k, v in keys.items()} for s, keys in self._stats.items()}

    def _as_grid(self, stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if stat.numel() != self.nb_dates * self.nb_components:
            raise BadInputError(
                f"statistic has {stat.numel()} values; expected nb_dates * nb_components = "
                f"{self.nb_dates * self.nb_components}"
            )
        return stat.to(device=x.device).reshape(self.nb_dates, self.nb_components)

    def nans_imputation(self, x: torch.Tensor, mean: torch.Tensor, default_mean: float) -> torch.Tensor:
        """Replace missing values of ``x`` by the per-feature mean.

        Args:
            x: (batch, nb_dates, nb_components); NaN (and +-inf) mark missing values.
            mean: (nb_dates * nb_components,) date-major; its NaN entries fall back to default_mean.
            default_mean: the fallback.

        Returns:
            (batch, nb_dates, nb_components), finite wherever ``mean`` or the fallback is.
        """
        m = self._mean_grid(mean, x, default_mean)
        return torch.where(torch.isfinite(x), x, m.unsqueeze(0))

    def _mean_grid(self, mean: torch.Tensor, x: torch.Tensor, default_mean: float) -> torch.Tensor:
        """``mean`` as a (nb_dates, nb_components) grid in x's dtype, NaN -> ``default_mean``."""
        m = self._as_grid(mean, x)
        return torch.where(torch.isnan(m), torch.full_like(m, default_mean), m).to(x.dtype)

    def _std_grid(self, std: torch.Tensor, x: torch.Tensor, default_std: float) -> torch.Tensor:
        """``std`` as a grid in x's dtype, NaN, zero or negative -> ``default_std``."""
        s = self._as_grid(std, x)
        return torch.where(torch.isnan(s) | (s <= 0), torch.full_like(s, default_std), s).to(x.dtype)

    def standardize(
        self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, default_mean: float, default_std: float
    ) -> torch.Tensor:
        """Return ``(x - mean) / std`` feature by feature.

        Args:
            x: (batch, nb_dates, nb_components).
            mean: (nb_dates * nb_components,) date-major; NaN entries fall back to default_mean.
            std: (nb_dates * nb_components,); NaN, zero or negative entries fall back to default_std.
            default_mean, default_std: the fallbacks.

        Returns:
            (batch, nb_dates, nb_components).
        """
        return (x - self._mean_grid(mean, x, default_mean)) / self._std_grid(std, x, default_std)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Impute missing values with the sensor's mean, then standardise with its mean and sqrt(var).

        What every built-in network does first. x: (batch, nb_dates, nb_components) -> same shape.
        """
        stats = self._stats[self.sensor]
        mean = stats["mean"]
        std = torch.sqrt(stats["var"])  # negative or NaN variances give NaN: default_std is used
        if not torch.is_inference_mode_enabled():
            x = self.nans_imputation(x, mean, self.default_mean)
            return self.standardize(x, mean, std, self.default_mean, self.default_std)
        # inference: the same result in fewer passes over the batch. A missing value imputed with
        # the mean standardises to exactly 0, so standardise first, then zero the non-finite.
        out = (x - self._mean_grid(mean, x, self.default_mean)).div_(self._std_grid(std, x, self.default_std))
        return torch.nan_to_num_(out, nan=0.0, posinf=0.0, neginf=0.0)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Check the input shape, run the network's ``_forward``, check the logits' shape.

        Args:
            x: (batch, nb_dates, nb_components), float.

        Returns:
            logits (batch, nb_classes).
        """
        if x.dim() != 3 or x.shape[1] != self.nb_dates or x.shape[2] != self.nb_components:
            raise BadInputError(
                f"{type(self).__name__} expects input shaped (batch, {self.nb_dates}, {self.nb_components}), "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            x = x.float()
        logits = self._forward(x)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] != self.nb_classes:
            raise BadInputError(
                f"{type(self).__name__}._forward returned shape {tuple(logits.shape)}; expected "
                f"(batch, nb_classes) = ({x.shape[0]}, {self.nb_classes})"
            )
        return logits

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network itself: x (batch, nb_dates, nb_components) -> logits (batch, nb_classes)."""
        raise BadInputError(
            f"{type(self).__name__} does not define _forward(x): a network derived from Iota2NeuralNetwork "
            "must implement _forward(self, x) -> logits (batch, nb_classes)"
        )

    def framework_args(self) -> dict[str, Any]:
        """The JSON-able framework arguments (everything but the statistics)."""
        return {
            "nb_dates": self.nb_dates,
            "nb_components": self.nb_components,
            "nb_classes": self.nb_classes,
            "dates": list(self.dates),
            "sensor": self.sensor,
        }


def sinusoid_table(positions: torch.Tensor, size: int, period: float) -> torch.Tensor:
    """Sinusoidal positional encoding of real-valued positions (Vaswani et al., as in L-TAE).

    Args:
        positions: (T,) positions, here day offsets since the first acquisition.
        size: encoding size d.
        period: T of the encoding (1000 in L-TAE).

    Returns:
        (T, size) float32: ``sin(p / period^(2i/d))`` on even columns, ``cos`` on odd ones.
    """
    idx = torch.arange(size, dtype=torch.float64, device=positions.device)
    denom = torch.pow(torch.tensor(float(period), dtype=torch.float64, device=positions.device), 2 * (idx // 2) / size)
    angles = positions.to(torch.float64).unsqueeze(1) / denom.unsqueeze(0)
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.to(torch.float32)
