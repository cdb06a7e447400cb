"""The sample database: its schema, writer, lazy reader, statistics and :class:`SampleSet`.

One NetCDF4 file per (region, seed, set), written by the sampling stage
(``learningSamples/Samples_region_R_seedS_learn.nc`` and ``_test.nc``) and read by training (L+V)
and merging (T). The layout, described once for users in ``docs/architecture.md``:

* ``features`` (sample, date, component) float32, NaN = missing, chunked along ``sample``
  (:data:`SAMPLE_CHUNK`) so that batch-sized reads touch few chunks;
* per sample (:data:`PER_SAMPLE`): ``label``, ``polygon_id``, ``region``, ``tile`` (index into
  the ``tiles`` attribute), ``row``, ``col``;
* ``date`` (date), ``component_name`` (component), ``feature_name`` (feature, date-major
  ``sensor_band_YYYYMMDD``), ``stats_min/max/mean/var`` (feature);
* global attributes ``sensor``, ``sensors``, ``tiles``, ``classes`` (JSON list), ``class_names``
  (JSON object), ``fingerprint`` and the writer's extra ones (``region``, ``seed``, ...).

Training also accepts a table (Parquet or CSV, told apart by the extension) with a label column, an
optional polygon id column and feature columns named ``sensor_band_YYYYMMDD``.

A :class:`SampleSet` holds the metadata, the per-sample 1-D arrays and a :class:`FeatureReader`
that reads feature rows on demand, so training's ``stream`` mode never holds the whole feature
array in memory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from sitsflow import storage
from sitsflow.errors import BadInputError, InputNotFoundError

SAMPLE_CHUNK = 1024  # samples per NetCDF chunk: batch-sized reads in stream mode touch few chunks
PER_SAMPLE = (("label", "i4"), ("polygon_id", "i8"), ("region", "i4"), ("tile", "i2"), ("row", "i4"), ("col", "i4"))
"""The per-sample variables after ``features``: (name, NetCDF type)."""
STAT_KEYS = ("min", "max", "mean", "var")
QUANTILES = (0.1, 0.5, 0.95)
_FEATURE_RE = re.compile(r"^(?P<sensor>.+)_(?P<band>[^_]+)_(?P<date>\d{8})$")


class FeatureReader(Protocol):
    """Reads rows of the feature array, shape (sample, date, component)."""

    n: int

    def read(self, start: int, stop: int) -> np.ndarray:
        """Return rows ``start:stop`` as float32 of shape (stop - start, nb_dates, nb_components)."""
        ...

    def close(self) -> None:
        """Release any open file handle."""
        ...


class ArrayReader:
    """A :class:`FeatureReader` over an in-memory array of shape (sample, date, component)."""

    def __init__(self, features: np.ndarray) -> None:
        self.features = np.ascontiguousarray(features, dtype=np.float32)
        self.n = int(self.features.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.features[start:stop]

    def close(self) -> None:
        return None


class NetCDFReader:
    """A :class:`FeatureReader` over the ``features`` variable of a local NetCDF file.

    The file is opened lazily, once per process (data-loader workers forked after the parent
    opened it reopen their own handle: HDF5 handles must not cross a fork).
    """

    def __init__(self, path: str, n: int) -> None:
        self.path = path
        self.n = n
        self._ds: Any = None
        self._pid: int | None = None

    def _dataset(self) -> Any:
        import netCDF4

        if self._ds is None or self._pid != os.getpid():
            self._ds = netCDF4.Dataset(self.path, "r")
            self._ds.set_auto_mask(False)
            self._pid = os.getpid()
        return self._ds

    def read(self, start: int, stop: int) -> np.ndarray:
        data = self._dataset().variables["features"][start:stop]
        return np.asarray(data, dtype=np.float32)

    def close(self) -> None:
        if self._ds is not None and self._pid == os.getpid():
            self._ds.close()
        self._ds = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "n": self.n, "_ds": None, "_pid": None}


@dataclass
class SampleSet:
    """The samples of one (region, seed, set).

    Attributes:
        reader: feature rows, shape (n, nb_dates, nb_components), float32, NaN = missing.
        labels: class codes, shape (n,), int64.
        polygon_ids: reference polygon of each sample, shape (n,), int64, or None (a table
            without polygon ids: each sample is then its own group for the polygon-wise split).
        dates: YYYYMMDD integers, length nb_dates.
        component_names: band / index names, length nb_components.
        feature_names: ``sensor_band_YYYYMMDD``, date-major, length nb_dates * nb_components.
        sensor: sensor key of the statistics.
        classes: every class code of the reference, sorted; index i of the network's output is
            ``classes[i]``.
        class_names: code (as a string) -> name.
        stats: ``min``/``max``/``mean``/``var`` (+ quantiles once added), each of shape
            (nb_dates * nb_components,), date-major.
        fingerprint: the database's own fingerprint attribute, when it has one.
        sensors: every sensor key the features come from (the ``sensors`` attribute of a
            multi-sensor database); the statistics are registered under each of them.
        region, tile, row, col: where each sample lies, shape (n,) (None for a table).
        tiles: the tile names ``tile`` indexes.
    """

    reader: FeatureReader
    labels: np.ndarray
    polygon_ids: np.ndarray | None
    dates: list[int]
    component_names: list[str]
    feature_names: list[str]
    sensor: str
    classes: list[int]
    class_names: dict[str, str]
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    fingerprint: str | None = None
    sensors: tuple[str, ...] = ()
    region: np.ndarray | None = None
    tile: np.ndarray | None = None
    row: np.ndarray | None = None
    col: np.ndarray | None = None
    tiles: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        return self.n

    @property
    def nb_dates(self) -> int:
        return len(self.dates)

    @property
    def nb_components(self) -> int:
        return len(self.component_names)

    def label_indices(self) -> np.ndarray:
        """Class indices 0..nb_classes-1 of every sample, shape (n,), int64."""
        codes = np.asarray(self.classes, dtype=np.int64)
        idx = np.searchsorted(codes, self.labels)
        idx = np.clip(idx, 0, len(codes) - 1)
        bad = codes[idx] != self.labels
        if bad.any():
            unknown = sorted(set(int(v) for v in self.labels[bad]))[:10]
            raise BadInputError(
                f"sample labels {unknown} are not in the database's class list {self.classes} "
                "(attribute 'classes'); resample the region or fix the reference data"
            )
        return idx.astype(np.int64)

    def load_all(self) -> np.ndarray:
        """All feature rows in memory, shape (n, nb_dates, nb_components), float32."""
        return self.reader.read(0, self.n)


# --- writing ---------------------------------------------------------------------------------
def write_samples(uri: str, samples: SampleSet, *, attrs: dict) -> None:
    """Write ``samples`` as one sample database, atomically (local or object storage).

    Every per-sample array of :data:`PER_SAMPLE` must be set; the statistics are computed here
    (:func:`compute_stats`); ``attrs`` become extra global attributes (non-scalars as JSON).
    """
    n = len(samples)
    nb_dates, nb_comp = samples.nb_dates, samples.nb_components
    features = samples.load_all()
    if n:
        stats = compute_stats(ArrayReader(features), chunk=n)
    else:
        stats = {key: np.full(nb_dates * nb_comp, np.nan, np.float32) for key in STAT_KEYS}
    per_sample: dict[str, Any] = {  # a column is None when the set has no such attribute
        "label": samples.labels,
        "polygon_id": samples.polygon_ids,
        "region": samples.region,
        "tile": samples.tile,
        "row": samples.row,
        "col": samples.col,
    }
    import netCDF4

    with storage.output_path(uri, suffix=".nc") as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as ds:
            ds.createDimension("sample", None)
            ds.createDimension("date", nb_dates)
            ds.createDimension("component", nb_comp)
            ds.createDimension("feature", nb_dates * nb_comp)
            chunk = max(1, min(SAMPLE_CHUNK, n or 1))
            var = ds.createVariable(
                "features", "f4", ("sample", "date", "component"), chunksizes=(chunk, nb_dates, nb_comp)
            )
            var.long_name = "feature values (NaN = missing)"
            if n:
                var[:] = features
            for name, dtype in PER_SAMPLE:
                v = ds.createVariable(name, dtype, ("sample",), chunksizes=(chunk,))
                if n:
                    v[:] = per_sample[name]
            ds.createVariable("date", "i4", ("date",))[:] = np.asarray(samples.dates, np.int32)
            comp = ds.createVariable("component_name", str, ("component",))
            for i, c in enumerate(samples.component_names):
                comp[i] = c
            fname = ds.createVariable("feature_name", str, ("feature",))
            for i, f in enumerate(samples.feature_names):
                fname[i] = f
            for key, values in stats.items():
                ds.createVariable(f"stats_{key}", "f4", ("feature",))[:] = values
            ds.sensor = samples.sensor
            ds.sensors = " ".join(samples.sensors or (samples.sensor,))
            ds.tiles = " ".join(samples.tiles)
            ds.classes = json.dumps([int(c) for c in samples.classes])
            ds.class_names = json.dumps({str(k): v for k, v in samples.class_names.items()})
            if samples.fingerprint is not None:
                ds.fingerprint = samples.fingerprint
            for key, value in attrs.items():
                setattr(ds, key, value if isinstance(value, (int, float, str)) else json.dumps(value))


# --- reading NetCDF --------------------------------------------------------------------------
def _strings(var: Any) -> list[str]:
    """Decode a NetCDF string variable (vlen str or char array) to a list of str."""
    import netCDF4

    data = var[:]
    if getattr(data, "dtype", None) is not None and data.dtype.kind == "S" and data.ndim == 2:
        data = netCDF4.chartostring(data)
    out = []
    for item in np.asarray(data).ravel().tolist():
        out.append(item.decode() if isinstance(item, bytes) else str(item))
    return out


def _json_attr(ds: Any, name: str, path: str) -> Any:
    if name not in ds.ncattrs():
        raise BadInputError(f"sample database {path} has no global attribute '{name}'")
    value = ds.getncattr(name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"attribute '{name}' of {path} is not valid JSON: {exc}") from exc
    return value


def open_netcdf(path: str, *, lazy: bool, empty_ok: bool = False) -> SampleSet:
    """Open a local NetCDF sample database.

    With ``lazy`` the features stay on disk behind a :class:`NetCDFReader` (close it with
    ``samples.reader.close()``); otherwise they are read into memory at once. Statistics missing
    from the file are computed (in chunks when lazy). ``empty_ok`` accepts a database without
    samples (a test set can be empty); training refuses one.
    """
    import netCDF4

    try:
        ds = netCDF4.Dataset(path, "r")
    except OSError as exc:
        raise BadInputError(f"cannot open sample database {path} as NetCDF: {exc}") from exc
    with ds:
        ds.set_auto_mask(False)
        for name in ("features", "label"):
            if name not in ds.variables:
                raise BadInputError(f"sample database {path} has no variable '{name}'")
        feats = ds.variables["features"]
        if feats.ndim != 3:
            raise BadInputError(
                f"variable 'features' of {path} must be (sample, date, component), got dimensions {feats.dimensions}"
            )
        n, nb_dates, nb_comp = (int(s) for s in feats.shape)

        def per_sample(name: str) -> np.ndarray | None:
            return np.asarray(ds.variables[name][:], dtype=np.int64) if name in ds.variables else None

        labels = per_sample("label")
        assert labels is not None
        dates = (
            [int(d) for d in np.asarray(ds.variables["date"][:]).tolist()]
            if "date" in ds.variables
            else list(range(1, nb_dates + 1))
        )
        components = (
            _strings(ds.variables["component_name"])
            if "component_name" in ds.variables
            else [f"c{i}" for i in range(nb_comp)]
        )
        attrs = ds.ncattrs()
        sensor = str(ds.getncattr("sensor")) if "sensor" in attrs else "sensor"
        feature_names = (
            _strings(ds.variables["feature_name"])
            if "feature_name" in ds.variables
            else [f"{sensor}_{c}_{d}" for d in dates for c in components]
        )
        classes = sorted(int(c) for c in _json_attr(ds, "classes", path))
        names_raw = _json_attr(ds, "class_names", path) if "class_names" in attrs else {}
        stats = {
            key: np.asarray(ds.variables[f"stats_{key}"][:], dtype=np.float32)
            for key in STAT_KEYS
            if f"stats_{key}" in ds.variables
        }
        features = None if lazy else np.asarray(feats[:], dtype=np.float32).reshape(n, nb_dates, nb_comp)
        samples = SampleSet(
            reader=NetCDFReader(path, n) if lazy else ArrayReader(features),  # type: ignore[arg-type]
            labels=labels,
            polygon_ids=per_sample("polygon_id"),
            dates=dates,
            component_names=components,
            feature_names=feature_names,
            sensor=sensor,
            classes=classes,
            class_names={str(k): str(v) for k, v in dict(names_raw).items()},
            stats=stats,
            fingerprint=str(ds.getncattr("fingerprint")) if "fingerprint" in attrs else None,
            sensors=tuple(str(ds.getncattr("sensors")).split()) if "sensors" in attrs else (sensor,),
            region=per_sample("region"),
            tile=per_sample("tile"),
            row=per_sample("row"),
            col=per_sample("col"),
            tiles=str(ds.getncattr("tiles")).split() if "tiles" in attrs else [],
        )
    _check(samples, path, empty_ok=empty_ok)
    missing = [k for k in STAT_KEYS if k not in stats]
    if missing and samples.n:
        computed = compute_stats(samples.reader, chunk=4096)
        for key in missing:
            samples.stats[key] = computed[key]
    return samples


def _check(samples: SampleSet, path: str, *, empty_ok: bool = False) -> None:
    n_feat = samples.nb_dates * samples.nb_components
    if samples.n == 0 and not empty_ok:
        raise BadInputError(f"sample database {path} holds no sample")
    if samples.reader.n != samples.n:
        raise BadInputError(f"{path}: 'features' has {samples.reader.n} rows, 'label' {samples.n}")
    if samples.polygon_ids is not None and samples.polygon_ids.shape[0] != samples.n:
        raise BadInputError(f"{path}: 'polygon_id' length differs from 'label'")
    if len(samples.feature_names) != n_feat:
        raise BadInputError(
            f"{path}: {len(samples.feature_names)} feature names for "
            f"{samples.nb_dates} dates x {samples.nb_components} components"
        )
    for key, value in samples.stats.items():
        if value.shape != (n_feat,):
            raise BadInputError(f"{path}: stats_{key} has shape {value.shape}, expected ({n_feat},)")
    if not samples.classes and not empty_ok:
        raise BadInputError(f"{path}: attribute 'classes' is empty")


# --- reading tables --------------------------------------------------------------------------
def _read_table(path: str, ext: str) -> dict[str, np.ndarray]:
    if ext == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration as exc:
            raise BadInputError(f"sample table {path} is empty") from exc
        rows = list(reader)
    cols: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        values = [r[j] if j < len(r) else "" for r in rows]
        try:
            cols[name.strip()] = np.array([float(v) if v.strip() else np.nan for v in values])
        except ValueError:
            cols[name.strip()] = np.array(values, dtype=object)
    return cols


def table_to_samples(
    cols: dict[str, np.ndarray],
    *,
    source: str,
    label_column: str = "label",
    polygon_column: str | None = "polygon_id",
) -> SampleSet:
    """Build an in-memory :class:`SampleSet` from table columns.

    Feature columns are those named ``sensor_band_YYYYMMDD``; dates are sorted, components keep
    their order of first appearance; every (date, component) pair must be present.
    """
    if label_column not in cols:
        raise BadInputError(
            f"sample table {source} has no label column '{label_column}' (columns: {sorted(cols)[:20]})"
        )
    parsed: dict[tuple[int, str], str] = {}
    sensors: set[str] = set()
    components: list[str] = []
    for name in cols:
        m = _FEATURE_RE.match(name)
        if not m or name in (label_column, polygon_column):
            continue
        sensors.add(m["sensor"].lower())
        band = m["band"].lower()
        if band not in components:
            components.append(band)
        parsed[(int(m["date"]), band)] = name
    if not parsed:
        raise BadInputError(
            f"sample table {source} has no feature column named sensor_band_YYYYMMDD (e.g. sentinel2_b2_20180511)"
        )
    if len(sensors) != 1:
        raise BadInputError(f"sample table {source} mixes sensors {sorted(sensors)}; one is allowed")
    dates = sorted({d for d, _ in parsed})
    missing = [f"{c}@{d}" for d in dates for c in components if (d, c) not in parsed]
    if missing:
        raise BadInputError(
            f"sample table {source} lacks feature columns for {missing[:10]}: every band must be present at every date"
        )
    sensor = sensors.pop()
    order = [parsed[(d, c)] for d in dates for c in components]
    try:
        flat = np.stack([np.asarray(cols[name], dtype=np.float32) for name in order], axis=1)
        labels = np.asarray(cols[label_column], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"sample table {source}: non-numeric feature or label values ({exc})") from exc
    if np.isnan(labels).any() or (labels != np.round(labels)).any():
        raise BadInputError(f"sample table {source}: column '{label_column}' must hold integer codes")
    labels_i = labels.astype(np.int64)
    polygon_ids = None
    if polygon_column and polygon_column in cols:
        polygon_ids = np.asarray(cols[polygon_column], dtype=np.float64).astype(np.int64)
    features = flat.reshape(flat.shape[0], len(dates), len(components))
    classes = sorted(int(c) for c in np.unique(labels_i))
    samples = SampleSet(
        reader=ArrayReader(features),
        labels=labels_i,
        polygon_ids=polygon_ids,
        dates=dates,
        component_names=components,
        feature_names=[f"{sensor}_{c}_{d}" for d in dates for c in components],
        sensor=sensor,
        classes=classes,
        class_names={str(c): str(c) for c in classes},
        sensors=(sensor,),
    )
    _check(samples, source)
    samples.stats = compute_stats(samples.reader, chunk=max(1, samples.n))
    return samples


def load_samples(
    uri: str, *, label_column: str = "label", polygon_column: str | None = "polygon_id", empty_ok: bool = False
) -> SampleSet:
    """Load a sample database into memory: NetCDF (``.nc``), Parquet (``.parquet``) or CSV (``.csv``).

    ``uri`` is a local path or ``s3://`` URI (read through :func:`sitsflow.storage.local_path`).
    ``label_column`` / ``polygon_column`` apply to tables only; ``empty_ok`` to NetCDF only
    (see :func:`open_netcdf`).
    """
    ext = uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else ""
    if ext not in ("nc", "parquet", "pq", "csv"):
        raise BadInputError(f"sample database {uri}: unknown extension '.{ext}'; allowed: .nc, .parquet, .csv")
    if not storage.exists(uri):
        raise InputNotFoundError(f"sample database {uri} does not exist")
    with storage.local_path(uri) as path:
        if ext == "nc":
            return open_netcdf(str(path), lazy=False, empty_ok=empty_ok)
        cols = _read_table(str(path), "parquet" if ext in ("parquet", "pq") else "csv")
    return table_to_samples(cols, source=uri, label_column=label_column, polygon_column=polygon_column)


# --- statistics ------------------------------------------------------------------------------
def compute_stats(reader: FeatureReader, *, chunk: int) -> dict[str, np.ndarray]:
    """NaN-aware per-feature min, max, mean and (population) variance, read ``chunk`` rows at a time.

    Returns arrays of shape (nb_dates * nb_components,), float32; NaN where a feature has no value.
    Chunks are merged with Chan's parallel variance formula (float64 accumulators).
    """
    count: Any = None  # float64 accumulators, set by the first chunk
    mean: Any = None
    m2: Any = None
    vmin: Any = None
    vmax: Any = None
    for start in range(0, reader.n, chunk):
        x = reader.read(start, min(reader.n, start + chunk)).astype(np.float64)
        x = x.reshape(x.shape[0], -1)
        valid = ~np.isnan(x)
        c = valid.sum(axis=0).astype(np.float64)
        s = np.where(valid, x, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = np.where(c > 0, s / np.maximum(c, 1), 0.0)
        d = np.where(valid, x - mu, 0.0)
        q = (d * d).sum(axis=0)
        lo = np.where(valid, x, np.inf).min(axis=0)
        hi = np.where(valid, x, -np.inf).max(axis=0)
        if count is None:
            count, mean, m2, vmin, vmax = c, mu, q, lo, hi
            continue
        total = count + c
        delta = mu - mean
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(total > 0, c / np.maximum(total, 1), 0.0)
            m2 = m2 + q + delta * delta * count * frac
        mean = mean + delta * frac
        count, vmin, vmax = total, np.minimum(vmin, lo), np.maximum(vmax, hi)
    assert count is not None and mean is not None and m2 is not None and vmin is not None and vmax is not None
    empty = count == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        var = m2 / np.maximum(count, 1)
    out = {
        "min": np.where(empty, np.nan, vmin),
        "max": np.where(empty, np.nan, vmax),
        "mean": np.where(empty, np.nan, mean),
        "var": np.where(empty, np.nan, var),
    }
    return {k: v.astype(np.float32) for k, v in out.items()}


def quantile_stats(reader: FeatureReader, fraction: float, seed: int, *, chunk: int) -> dict[str, np.ndarray]:
    """Quantiles 0.1 / 0.5 / 0.95 per feature on a seeded random ``fraction`` of the samples.

    ``ceil(fraction * n)`` rows (at least one) are drawn without replacement with
    ``numpy.random.default_rng(seed)`` and read ``chunk`` rows at a time. Returns
    ``{"quantile_0.1": (nb_dates * nb_components,), ...}`` float32, NaN-aware.
    """
    if not 0.0 < fraction <= 1.0:
        raise BadInputError(f"additional_statistics_percentage must be in ]0, 1], got {fraction}")
    n = reader.n
    m = max(1, min(n, math.ceil(fraction * n)))
    rows = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    parts = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sel = rows[(rows >= start) & (rows < stop)]
        if sel.size:
            block = reader.read(start, stop)
            parts.append(block[sel - start].reshape(sel.size, -1))
    x = np.concatenate(parts, axis=0).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        qs = np.nanquantile(x, QUANTILES, axis=0)
    return {f"quantile_{q}": qs[i].astype(np.float32) for i, q in enumerate(QUANTILES)}
