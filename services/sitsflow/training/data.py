"""Reading the learning + validation (L+V) sample database and preparing it for training.

Two inputs are accepted:

* the NetCDF database written by the sampling stage (``Samples_region_R_seedS_learn.nc``, layout in
  ``docs/architecture.md``): ``features`` (sample, date, component) float32, ``label`` (sample),
  ``polygon_id`` (sample), ``date`` (date), ``component_name`` (component), ``feature_name``
  (feature), ``stats_min/max/mean/var`` (feature) and the global attributes ``sensor``,
  ``classes`` (JSON list) and ``class_names`` (JSON object);
* a table (Parquet or CSV, told apart by the extension) with a label column, an optional polygon
  id column and feature columns named ``sensor_band_YYYYMMDD``.

A :class:`SampleSet` holds the metadata, the labels and polygon ids (small 1-D arrays) and a
:class:`FeatureReader` that reads feature rows on demand, so the ``stream`` data-loader mode never
holds the whole feature array in memory.
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

STAT_KEYS = ("min", "max", "mean", "var")
QUANTILES = (0.1, 0.5, 0.95)
VALIDATION_FRACTION = 0.2
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
    """The L+V samples of one region and seed.

    Attributes:
        reader: feature rows, shape (n, nb_dates, nb_components), float32, NaN = missing.
        labels: class codes, shape (n,), int64.
        polygon_ids: reference polygon of each sample, shape (n,), int64, or None (each sample
            is then its own group for the polygon-wise split).
        dates: YYYYMMDD integers, length nb_dates.
        component_names: band / index names, length nb_components.
        feature_names: ``sensor_band_YYYYMMDD``, date-major, length nb_dates * nb_components.
        sensor: sensor key of the statistics.
        sensors: every sensor key the features come from (the ``sensors`` attribute of a
            multi-sensor database); the statistics are registered under each of them.
        classes: every class code of the reference, sorted; index i of the network's output is
            ``classes[i]``.
        class_names: code (as a string) -> name.
        stats: ``min``/``max``/``mean``/``var`` (+ quantiles once added), each of shape
            (nb_dates * nb_components,), date-major.
        fingerprint: the database's own fingerprint attribute, when it has one.
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

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

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


# --- NetCDF ----------------------------------------------------------------------------------
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


def open_netcdf(path: str, *, lazy: bool) -> SampleSet:
    """Open a local NetCDF sample database.

    With ``lazy`` the features stay on disk behind a :class:`NetCDFReader`; otherwise they are
    read into memory at once. Statistics missing from the file are computed (in chunks when lazy).
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
                f"variable 'features' of {path} must be (sample, date, component), "
                f"got dimensions {feats.dimensions}"
            )
        n, nb_dates, nb_comp = (int(s) for s in feats.shape)
        labels = np.asarray(ds.variables["label"][:], dtype=np.int64)
        polygon_ids = (
            np.asarray(ds.variables["polygon_id"][:], dtype=np.int64)
            if "polygon_id" in ds.variables
            else None
        )
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
        sensor = str(ds.getncattr("sensor")) if "sensor" in ds.ncattrs() else "sensor"
        feature_names = (
            _strings(ds.variables["feature_name"])
            if "feature_name" in ds.variables
            else [f"{sensor}_{c}_{d}" for d in dates for c in components]
        )
        classes = sorted(int(c) for c in _json_attr(ds, "classes", path))
        names_raw = _json_attr(ds, "class_names", path) if "class_names" in ds.ncattrs() else {}
        class_names = {str(k): str(v) for k, v in dict(names_raw).items()}
        stats = {
            key: np.asarray(ds.variables[f"stats_{key}"][:], dtype=np.float32)
            for key in STAT_KEYS
            if f"stats_{key}" in ds.variables
        }
        fp = str(ds.getncattr("fingerprint")) if "fingerprint" in ds.ncattrs() else None
        sensors = tuple(str(ds.getncattr("sensors")).split()) if "sensors" in ds.ncattrs() else (sensor,)
        features = None if lazy else np.asarray(feats[:], dtype=np.float32)
    reader: FeatureReader = NetCDFReader(path, n) if lazy else ArrayReader(features)  # type: ignore[arg-type]
    samples = SampleSet(
        reader=reader,
        labels=labels,
        polygon_ids=polygon_ids,
        dates=dates,
        component_names=components,
        feature_names=feature_names,
        sensor=sensor,
        classes=classes,
        class_names=class_names,
        stats=stats,
        fingerprint=fp,
        sensors=sensors,
    )
    _check(samples, path)
    missing = [k for k in STAT_KEYS if k not in stats]
    if missing:
        computed = compute_stats(samples.reader, chunk=4096)
        for key in missing:
            samples.stats[key] = computed[key]
    return samples


def _check(samples: SampleSet, path: str) -> None:
    n_feat = samples.nb_dates * samples.nb_components
    if samples.n == 0:
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
    if not samples.classes:
        raise BadInputError(f"{path}: attribute 'classes' is empty")


# --- tables ----------------------------------------------------------------------------------
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
            f"sample table {source} has no feature column named sensor_band_YYYYMMDD "
            "(e.g. sentinel2_b2_20180511)"
        )
    if len(sensors) != 1:
        raise BadInputError(f"sample table {source} mixes sensors {sorted(sensors)}; one is allowed")
    dates = sorted({d for d, _ in parsed})
    missing = [f"{c}@{d}" for d in dates for c in components if (d, c) not in parsed]
    if missing:
        raise BadInputError(
            f"sample table {source} lacks feature columns for {missing[:10]}: every band must be "
            "present at every date"
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
    )
    _check(samples, source)
    samples.stats = compute_stats(samples.reader, chunk=max(1, samples.n))
    return samples


def load_samples(
    uri: str, *, label_column: str = "label", polygon_column: str | None = "polygon_id"
) -> SampleSet:
    """Load a sample database into memory: NetCDF (``.nc``), Parquet (``.parquet``) or CSV (``.csv``).

    ``uri`` is a local path or ``s3://`` URI (read through :func:`sitsflow.storage.local_path`).
    ``label_column`` / ``polygon_column`` apply to tables only.
    """
    ext = uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else ""
    if ext not in ("nc", "parquet", "pq", "csv"):
        raise BadInputError(
            f"sample database {uri}: unknown extension '.{ext}'; allowed: .nc, .parquet, .csv"
        )
    if not storage.exists(uri):
        raise InputNotFoundError(f"sample database {uri} does not exist")
    with storage.local_path(uri) as path:
        if ext == "nc":
            return open_netcdf(str(path), lazy=False)
        cols = _read_table(str(path), "parquet" if ext in ("parquet", "pq") else "csv")
    return table_to_samples(cols, source=uri, label_column=label_column, polygon_column=polygon_column)


# --- statistics ------------------------------------------------------------------------------
def compute_stats(reader: FeatureReader, *, chunk: int) -> dict[str, np.ndarray]:
    """NaN-aware per-feature min, max, mean and (population) variance, read ``chunk`` rows at a time.

    Returns arrays of shape (nb_dates * nb_components,), float32; NaN where a feature has no value.
    Chunks are merged with Chan's parallel variance formula (float64 accumulators).
    """
    count = mean = m2 = vmin = vmax = None
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
        if count is None or mean is None or m2 is None or vmin is None or vmax is None:  # the first chunk
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


def quantile_stats(
    reader: FeatureReader, fraction: float, seed: int, *, chunk: int
) -> dict[str, np.ndarray]:
    """Quantiles 0.1 / 0.5 / 0.95 per feature on a seeded random ``fraction`` of the samples.

    ``ceil(fraction * n)`` rows (at least one) are drawn without replacement with
    ``numpy.random.default_rng(seed)`` and read ``chunk`` rows at a time. Returns
    ``{"quantile_0.1": (nb_dates * nb_components,), ...}`` float32, NaN-aware.
    """
    if not 0.0 < fraction <= 1.0:
        raise BadInputError(
            f"additional_statistics_percentage must be in ]0, 1], got {fraction}"
        )
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


# --- split and weights -----------------------------------------------------------------------
def split_learn_validation(
    labels: np.ndarray,
    polygon_ids: np.ndarray | None,
    seed: int,
    validation_fraction: float = VALIDATION_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """Polygon-wise, class-stratified split of L+V into learning (80 %) and validation (20 %).

    Each polygon (or, without polygon ids, each sample) is a group whose class is its most
    frequent label (ties: the smallest code). Per class, its groups (sorted by id) are permuted
    with ``numpy.random.default_rng(seed)``; ``n_val = min(n - 1, max(1, round(0.2 n)))`` of them
    go to validation, the rest to learning, so every class with >= 2 polygons has one in
    validation. A class with a single polygon puts it in both sets (as iota2 does).

    Args:
        labels: class codes, shape (n,).
        polygon_ids: polygon of each sample, shape (n,), or None.
        seed: split seed.

    Returns:
        (learn_mask, validation_mask), boolean arrays of shape (n,).
    """
    n = labels.shape[0]
    groups = polygon_ids if polygon_ids is not None else np.arange(n, dtype=np.int64)
    uniq, inverse = np.unique(groups, return_inverse=True)
    # majority label per group
    pairs, counts = np.unique(np.stack([inverse, labels]), axis=1, return_counts=True)
    group_class = np.empty(uniq.shape[0], dtype=np.int64)
    best = np.full(uniq.shape[0], -1, dtype=np.int64)
    for (g, lab), cnt in zip(pairs.T.tolist(), counts.tolist(), strict=True):
        if cnt > best[g] or (cnt == best[g] and lab < group_class[g]):
            best[g] = cnt
            group_class[g] = lab
    rng = np.random.default_rng(seed)
    learn_group = np.zeros(uniq.shape[0], dtype=bool)
    val_group = np.zeros(uniq.shape[0], dtype=bool)
    for cls in np.unique(group_class):
        members = np.flatnonzero(group_class == cls)  # already sorted by polygon id
        k = members.shape[0]
        if k == 1:
            learn_group[members] = True
            val_group[members] = True
            continue
        perm = members[rng.permutation(k)]
        n_val = min(k - 1, max(1, int(math.floor(validation_fraction * k + 0.5))))
        val_group[perm[:n_val]] = True
        learn_group[perm[n_val:]] = True
    return learn_group[inverse], val_group[inverse]


def class_weights(label_idx: np.ndarray, nb_classes: int) -> np.ndarray:
    """Inverse class proportions on L+V: ``w_c = 1 / p_c = n / n_c`` (0 for an absent class).

    With 80 % of class 1 and 20 % of class 2 the weights are 1.25 and 5 (reference example).

    Args:
        label_idx: class indices, shape (n,).
    Returns:
        float32 array of shape (nb_classes,).
    """
    counts = np.bincount(label_idx, minlength=nb_classes).astype(np.float64)
    n = counts.sum()
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, n / np.maximum(counts, 1), 0.0)
    return w.astype(np.float32)
