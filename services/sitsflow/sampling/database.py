"""The NetCDF4 sample database (layout in docs/architecture.md and the README)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import netCDF4
import numpy as np

from sitsflow import storage

SAMPLE_CHUNK = 1024  # samples per NetCDF chunk: batch-sized reads in stream mode touch few chunks


@dataclass
class SampleSet:
    """Samples of one (region, seed, set).

    Attributes:
        features: float32 (n, nb_dates, nb_components).
        label, polygon_id, region, tile, row, col: (n,) per-sample attributes.
    """

    features: np.ndarray
    label: np.ndarray
    polygon_id: np.ndarray
    region: np.ndarray
    tile: np.ndarray
    row: np.ndarray
    col: np.ndarray
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.label.shape[0])


def statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """Per-feature min, max, mean and var (NaN-aware), shaped (nb_dates * nb_components), date-major."""
    flat = features.reshape(features.shape[0], -1).astype(np.float64)
    if flat.shape[0] == 0:
        nan = np.full(flat.shape[1], np.nan, np.float32)
        return {"min": nan, "max": nan, "mean": nan, "var": nan}
    with np.errstate(all="ignore"), _quiet():
        return {
            "min": np.nanmin(flat, axis=0).astype(np.float32),
            "max": np.nanmax(flat, axis=0).astype(np.float32),
            "mean": np.nanmean(flat, axis=0).astype(np.float32),
            "var": np.nanvar(flat, axis=0).astype(np.float32),
        }


class _quiet:
    """Silence numpy's all-NaN-slice RuntimeWarnings (an all-NaN feature has NaN statistics)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def write_samples(
    uri: str,
    samples: SampleSet,
    *,
    dates: list[int],
    components: list[str],
    feature_names: list[str],
    tiles: list[str],
    sensor: str,
    classes: list[int],
    class_names: dict[int, str],
    attrs: dict,
) -> None:
    """Write one sample database atomically (local or object storage)."""
    n = len(samples)
    nb_dates, nb_comp = len(dates), len(components)
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
                var[:] = samples.features
            for name, dtype, values in (
                ("label", "i4", samples.label),
                ("polygon_id", "i8", samples.polygon_id),
                ("region", "i4", samples.region),
                ("tile", "i2", samples.tile),
                ("row", "i4", samples.row),
                ("col", "i4", samples.col),
            ):
                v = ds.createVariable(name, dtype, ("sample",), chunksizes=(chunk,))
                if n:
                    v[:] = values
            ds.createVariable("date", "i4", ("date",))[:] = np.asarray(dates, np.int32)
            comp = ds.createVariable("component_name", str, ("component",))
            for i, c in enumerate(components):
                comp[i] = c
            fname = ds.createVariable("feature_name", str, ("feature",))
            for i, f in enumerate(feature_names):
                fname[i] = f
            for key, values in statistics(samples.features).items():
                ds.createVariable(f"stats_{key}", "f4", ("feature",))[:] = values
            ds.sensor = sensor
            ds.tiles = " ".join(tiles)
            ds.classes = json.dumps([int(c) for c in classes])
            ds.class_names = json.dumps({str(k): v for k, v in class_names.items()})
            for key, value in attrs.items():
                setattr(ds, key, value if isinstance(value, (int, float, str)) else json.dumps(value))


def read_samples(uri: str) -> tuple[SampleSet, dict]:
    """Read a whole sample database (for evaluation and small sets). Returns (samples, metadata)."""
    with storage.local_path(uri) as path, netCDF4.Dataset(path) as ds:
        ds.set_auto_mask(False)
        samples = SampleSet(
            features=np.asarray(ds["features"][:], np.float32),
            label=np.asarray(ds["label"][:]),
            polygon_id=np.asarray(ds["polygon_id"][:]),
            region=np.asarray(ds["region"][:]),
            tile=np.asarray(ds["tile"][:]),
            row=np.asarray(ds["row"][:]),
            col=np.asarray(ds["col"][:]),
        )
        meta = {
            "dates": [int(d) for d in ds["date"][:]],
            "components": [str(c) for c in ds["component_name"][:]],
            "tiles": ds.tiles.split(),
            "sensor": ds.sensor,
            "classes": json.loads(ds.classes),
            "class_names": {int(k): v for k, v in json.loads(ds.class_names).items()},
        }
    return samples, meta
