"""External features: user functions computing per-date indices (iota2's ``external_features``).

The ``external_features`` section names a Python module (local or ``s3://``) and functions. Each
function is called like a method, ``function(data, **kwargs)``, where ``data`` offers iota2's
accessors:

* ``data.get_interpolated_dates()`` / ``data.get_raw_dates()``: ``{sensor: ["YYYYMMDD", ...]}``
  (``sensor`` as in ``Sentinel2``, ``Landsat8`` ...),
* ``data.get_interpolated_<Sensor>_<Band>()`` (gap-filled mode) or ``data.get_raw_<Sensor>_<Band>()``
  (``features_from_raw_dates`` mode, masked values are NaN), e.g.
  ``get_interpolated_Sentinel2_B11()``: float32 arrays shaped (rows, cols, nb_dates), where the
  rows are the pixels being computed and cols is 1 (the pipeline works on pixel lists).

A function returns ``(values, labels)``: values shaped (rows, cols, nb_labels) or
(rows, nb_labels); labels ``Sensor_Index_YYYYMMDD``, one per date of the sensor for each index
(several indices may be returned, each covering every date). The indices become components of
that sensor after its bands and spectral indices (``concat_mode: True``) or replace them
(``concat_mode: False``). With ``no_data_value`` set, a returned value equal to it is missing
(NaN).
"""

from __future__ import annotations

import hashlib
import re
import threading
import types
import warnings
from collections.abc import Callable

import numpy as np

from sitsflow import storage
from sitsflow.errors import BadInputError, ConfigError

_LABEL = re.compile(r"^(?P<sensor>[A-Za-z0-9]+)_(?P<index>[A-Za-z0-9]+)_(?P<date>\d{8})$")
_ACCESSOR = re.compile(r"^get_(?P<mode>interpolated|raw)_(?P<sensor>[A-Za-z0-9]+)_(?P<band>[A-Za-z0-9]+)$")


_USER_CODE = threading.Lock()
"""Held while a user's external-feature function runs."""


class DataContainer:
    """What a user function sees as ``self``: the series of the pixels being computed.

    Args:
        series: ``{ext_name: float32 (P, nb_dates, nb_bands)}`` per sensor (every band).
        bands: ``{ext_name: [band names]}``.
        dates: the pipeline's dates (YYYYMMDD), shared by every sensor.
        raw_mode: True with ``features_from_raw_dates``.
    """

    def __init__(
        self,
        series: dict[str, np.ndarray],
        bands: dict[str, list[str]],
        dates: list[int],
        raw_mode: bool,
        function: str,
    ) -> None:
        self._series = series
        self._bands = bands
        self._dates = [str(d) for d in dates]
        self._raw = raw_mode
        self._function = function
        self._sensor_names = {s.lower(): s for s in series}

    def get_interpolated_dates(self) -> dict[str, list[str]]:
        """``{sensor: ["YYYYMMDD", ...]}`` of the gap-filled date grid."""
        self._check_mode("interpolated", "get_interpolated_dates")
        return {s: list(self._dates) for s in self._series}

    def get_raw_dates(self) -> dict[str, list[str]]:
        """``{sensor: ["YYYYMMDD", ...]}`` of the raw acquisition dates."""
        self._check_mode("raw", "get_raw_dates")
        return {s: list(self._dates) for s in self._series}

    def _check_mode(self, mode: str, name: str) -> None:
        if (mode == "raw") != self._raw:
            setting = "True" if self._raw else "False"
            other = "get_raw_" if self._raw else "get_interpolated_"
            raise BadInputError(
                f"external_features function {self._function!r} calls {name}() but "
                f"arg_train.features_from_raw_dates is {setting}: use the {other}... accessors"
            )

    def __getattr__(self, name: str) -> Callable[[], np.ndarray]:
        match = _ACCESSOR.match(name)
        if not match:
            raise AttributeError(name)
        sensor = self._sensor_names.get(match.group("sensor").lower())
        if sensor is None:
            raise BadInputError(
                f"external_features function {self._function!r} calls {name}(): no sensor "
                f"{match.group('sensor')!r}; sensors: {sorted(self._series)}"
            )
        bands = [b.lower() for b in self._bands[sensor]]
        band = match.group("band").lower()
        if band not in bands:
            raise BadInputError(
                f"external_features function {self._function!r} calls {name}(): sensor {sensor} has "
                f"no band {match.group('band')!r}; bands: {self._bands[sensor]}"
            )
        index = bands.index(band)
        mode = match.group("mode")

        def accessor() -> np.ndarray:
            self._check_mode(mode, name)
            return np.array(self._series[sensor][:, None, :, index], dtype=np.float32)

        return accessor


class ExternalFeatures:
    """The user functions of the ``external_features`` section, loaded once.

    Args:
        section: the validated ``external_features`` section.
        raw_mode: ``arg_train.features_from_raw_dates``.
    """

    def __init__(self, section, raw_mode: bool) -> None:
        self.section = section
        self.raw_mode = raw_mode
        self.concat_mode = bool(section.concat_mode)
        self.no_data = section.no_data_value
        source = storage.read_text(section.module)
        self.source_hash = hashlib.sha256(source.encode()).hexdigest()
        module = types.ModuleType("sitsflow_external_features")
        module.__file__ = section.module
        try:
            exec(compile(source, section.module, "exec"), module.__dict__)  # noqa: S102 - the user's module
        except Exception as exc:  # any error of user code
            raise ConfigError(
                f"external_features.module: cannot load {section.module}: {type(exc).__name__}: {exc}"
            ) from None
        self.functions: list[tuple[str, Callable, dict]] = []
        for name, kwargs in section.functions:
            function = getattr(module, name, None)
            if not callable(function):
                available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
                raise ConfigError(
                    f"external_features.functions: {section.module} has no function {name!r}; "
                    f"its functions: {available}"
                )
            self.functions.append((name, function, dict(kwargs)))
        self.layout: list[list[tuple[str, str]]] | None = None  # per function: (sensor, index) order

    def description(self) -> dict:
        return {
            "module": self.section.module,
            "sha256": self.source_hash,
            "functions": [[n, k] for n, _, k in self.functions],
            "concat_mode": self.concat_mode,
            # only when set: the fingerprints of configurations without it are unchanged
            **({"no_data_value": self.no_data} if self.no_data is not None else {}),
        }

    def probe(self, bands: dict[str, list[str]], dates: list[int]) -> dict[str, list[str]]:
        """Call every function on two dummy pixels to learn (and check) its labels.

        Returns:
            ``{ext_name: [index, ...]}``: the external components of each sensor, in order.
        """
        rng = np.random.default_rng(0)
        series = {s: (0.05 + 0.4 * rng.random((2, len(dates), len(b)))).astype(np.float32) for s, b in bands.items()}
        self.layout = None
        _, layout = self._run(series, bands, dates)
        self.layout = layout
        out: dict[str, list[str]] = {}
        for per_function in layout:
            for sensor, index in per_function:
                out.setdefault(sensor, [])
                if index in out[sensor]:
                    raise BadInputError(f"external_features: index {index!r} of sensor {sensor} is returned twice")
                out[sensor].append(index)
        return out

    def compute(
        self, series: dict[str, np.ndarray], bands: dict[str, list[str]], dates: list[int]
    ) -> dict[str, dict[str, np.ndarray]]:
        """Run the functions on real pixels.

        Args:
            series: ``{ext_name: float32 (P, nb_dates, nb_bands)}``.

        Returns:
            ``{ext_name: {index: float32 (P, nb_dates)}}``.
        """
        values, _ = self._run(series, bands, dates)
        return values

    def _run(
        self, series: dict[str, np.ndarray], bands: dict[str, list[str]], dates: list[int]
    ) -> tuple[dict[str, dict[str, np.ndarray]], list[list[tuple[str, str]]]]:
        nb_pix = next(iter(series.values())).shape[0]
        values: dict[str, dict[str, np.ndarray]] = {}
        layout: list[list[tuple[str, str]]] = []
        for k, (name, function, kwargs) in enumerate(self.functions):
            data = DataContainer(series, bands, dates, self.raw_mode, name)
            # one call at a time: inference reads with several threads, while users' functions
            # need not be thread-safe (nor is warnings.catch_warnings)
            with _USER_CODE, warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                try:
                    result = function(data, **kwargs)
                except BadInputError:
                    raise
                except Exception as exc:
                    raise BadInputError(
                        f"external_features function {name!r} failed: {type(exc).__name__}: {exc}"
                    ) from None
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise BadInputError(
                    f"external_features function {name!r} must return (values, labels); got {type(result).__name__}"
                )
            coef, labels = result
            labels = list(labels) if isinstance(labels, (list, tuple)) else labels
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise BadInputError(f"external_features function {name!r} must return labels as a list of strings")
            arr = np.asarray(coef, dtype=np.float32)
            if arr.ndim == 3 and arr.shape[:2] == (nb_pix, 1):
                arr = arr[:, 0, :]
            if arr.ndim != 2 or arr.shape != (nb_pix, len(labels)):
                raise BadInputError(
                    f"external_features function {name!r} returned values shaped {tuple(np.shape(coef))} "
                    f"with {len(labels)} labels; expected ({nb_pix}, 1, {len(labels)}) or ({nb_pix}, {len(labels)}): "
                    "one value per pixel and label"
                )
            if self.no_data is not None:
                arr = np.where(arr == np.float32(self.no_data), np.float32(np.nan), arr)
            entries = self._parse_labels(name, labels, series, dates)
            if self.layout is not None and entries != self.layout[k]:
                raise BadInputError(f"external_features function {name!r} returned other labels than on its first call")
            layout.append(entries)
            label_keys = []  # (sensor, index) of each label, in the values' order
            for lab in labels:
                match = _LABEL.match(lab)
                assert match is not None  # _parse_labels checked every label
                label_keys.append((_sensor_key(match.group("sensor"), series), match.group("index").lower()))
            for sensor, index in entries:
                positions = [i for i, key in enumerate(label_keys) if key == (sensor, index)]
                values.setdefault(sensor, {})[index] = arr[:, positions]
        return values, layout

    def _parse_labels(self, name, labels, series, dates) -> list[tuple[str, str]]:
        expected_dates = [str(d) for d in dates]
        order: list[tuple[str, str]] = []
        per_index: dict[tuple[str, str], list[str]] = {}
        for label in labels:
            match = _LABEL.match(label)
            if not match:
                raise BadInputError(
                    f"external_features function {name!r}: label {label!r} does not follow "
                    "Sensor_Index_YYYYMMDD (e.g. 'Sentinel2_soi_20180105')"
                )
            sensor = _sensor_key(match.group("sensor"), series)
            if sensor is None:
                raise BadInputError(
                    f"external_features function {name!r}: label {label!r} names sensor "
                    f"{match.group('sensor')!r}; sensors: {sorted(series)}"
                )
            key = (sensor, match.group("index").lower())
            if key not in per_index:
                per_index[key] = []
                order.append(key)
            per_index[key].append(match.group("date"))
        for (sensor, index), got in per_index.items():
            if got != expected_dates:
                raise BadInputError(
                    f"external_features function {name!r}: index {index!r} of {sensor} has labels for dates "
                    f"{got[:4]}{'...' if len(got) > 4 else ''} ({len(got)}); expected one label per date "
                    f"of the series, in order: {expected_dates[:4]}{'...' if len(expected_dates) > 4 else ''} "
                    f"({len(expected_dates)})"
                )
        return order


def _sensor_key(name: str, series: dict) -> str | None:
    for s in series:
        if s.lower() == name.lower():
            return s
    return None
