"""Readers of the real on-disk layouts of THEIA Sentinel-2 L2A / L3A, Sen2Cor and Landsat 8.

Products of a tile are looked for under ``{chain path}/{tile}/`` (iota2's layout), or directly
under the chain path when that folder does not exist; a product belongs to the tile when its
folder name holds the tile name. Files are read in place (local or ``s3://``, through GDAL's
/vsis3/ with windowed reads), never downloaded whole.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.windows import Window

from sitsflow import storage
from sitsflow.errors import BadInputError
from sitsflow.log import get_logger
from sitsflow.process import open_files_budget
from sitsflow.sensors.base import (
    MASKS,
    VALUES,
    Grid,
    NativeUnavailable,
    ReadBuffers,
    Sensor,
    grid_of,
    new_array,
    per_acquisition,
    read_on_grid,
)
from sitsflow.sensors.catalogue import OPTICAL_SENSORS, SCL_CLEAR, OpticalSensor

log = get_logger(__name__)


@dataclass(frozen=True)
class Product:
    """One acquisition: its date, its band files and its mask files.

    Attributes:
        name: the product folder name.
        date: YYYYMMDD of the acquisition.
        order: sort key (date and time of acquisition, then name).
        bands: band name -> file URI.
        masks: (file URI, rule) pairs; a rule turns mask values into validity (see ``_valid``).
        offset: added to the digital numbers before scaling (Sen2Cor baseline >= 04.00: -1000).
    """

    name: str
    date: int
    order: str
    bands: dict[str, str]
    masks: tuple[tuple[str, str], ...]
    offset: float = 0.0


@dataclass(frozen=True)
class Layout:
    """How one product type (of a sensor of the catalogue) is laid out on disk."""

    sensor: OpticalSensor
    folder: re.Pattern  # groups: date (YYYYMMDD), time
    band_file: re.Pattern  # group "band"
    masks: tuple[tuple[re.Pattern, str], ...]
    nodata: float
    scale: float = 1e-4
    grid_band: str = ""


LAYOUTS: dict[str, Layout] = {
    "Sentinel_2": Layout(
        OPTICAL_SENSORS["Sentinel_2"],
        re.compile(r"^SENTINEL2[A-D]_(?P<date>\d{8})-(?P<time>\d{6}-\d{3})_L2A_(?P<tile>[A-Z0-9]+)_"),
        re.compile(r"_FRE_(?P<band>B\d+A?)\.tif$", re.I),
        (
            (re.compile(r"/MASKS/[^/]*_CLM_R1\.tif$", re.I), "zero"),
            (re.compile(r"/MASKS/[^/]*_SAT_R1\.tif$", re.I), "zero"),
            (re.compile(r"/MASKS/[^/]*_EDG_R1\.tif$", re.I), "zero"),
        ),
        nodata=-10000.0,
        grid_band="B2",
    ),
    "Sentinel_2_L3A": Layout(
        OPTICAL_SENSORS["Sentinel_2_L3A"],
        re.compile(r"^SENTINEL2X_(?P<date>\d{8})-(?P<time>\d{6}-\d{3})_L3A_(?P<tile>[A-Z0-9]+)_"),
        re.compile(r"_FRC_(?P<band>B\d+A?)\.tif$", re.I),
        ((re.compile(r"/MASKS/[^/]*_FLG_R1\.tif$", re.I), "flg"),),
        nodata=-10000.0,
        grid_band="B2",
    ),
    "Sentinel_2_S2C": Layout(
        OPTICAL_SENSORS["Sentinel_2_S2C"],
        re.compile(
            r"^S2[A-D]_MSIL2A_(?P<date>\d{8})T(?P<time>\d{6})_N(?P<baseline>\d{4})_R\d{3}_(?P<tile>T[A-Z0-9]+)_"
        ),
        re.compile(r"_(?P<band>B\d\d|B8A)_(?P<res>10|20|60)m\.(jp2|tif)$", re.I),
        ((re.compile(r"_SCL_20m\.(jp2|tif)$", re.I), "scl"),),
        nodata=0.0,
        grid_band="B02",
    ),
    "Landsat8": Layout(
        OPTICAL_SENSORS["Landsat8"],
        re.compile(r"^LANDSAT8(-OLITIRS-XS)?_(?P<date>\d{8})-(?P<time>\d{6}-\d{3})_L2A_(?P<tile>[A-Z0-9]+)_"),
        re.compile(r"_FRE_(?P<band>B\d)\.tif$", re.I),
        (
            (re.compile(r"/MASKS/[^/]*_CLM_XS\.tif$", re.I), "zero"),
            (re.compile(r"/MASKS/[^/]*_SAT_XS\.tif$", re.I), "zero"),
            (re.compile(r"/MASKS/[^/]*_EDG_XS\.tif$", re.I), "zero"),
        ),
        nodata=-10000.0,
        grid_band="B1",
    ),
}
"""The product types, by configuration section."""


# Sen2Cor scene classification: the classes 0..11 that are not clear are invalid
SCL_INVALID = np.setdiff1d(np.arange(12), SCL_CLEAR)


class _OpenFiles:
    """The datasets one thread keeps open, the least recently used closed beyond ``limit``.

    A product series is hundreds of files (13 per Sentinel-2 date); reading a window opens every
    one of them, and an open costs a header read (a request or two on S3): opening them once per
    thread, not once per window, keeps that off the per-window cost.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.datasets: OrderedDict[str, rasterio.io.DatasetReader] = OrderedDict()

    def get(self, uri: str):
        dataset = self.datasets.pop(uri, None)
        path = storage.rasterio_path(uri)
        if dataset is not None and dataset.name != path:
            dataset.close()  # opened with a token since renewed (storage.sign_with): opened afresh
        if dataset is None or dataset.closed:
            dataset = rasterio.open(path)
        self.datasets[uri] = dataset
        while len(self.datasets) > self.limit:
            self.datasets.popitem(last=False)[1].close()
        return dataset

    def forget(self, uri: str) -> None:
        """Close the dataset of ``uri`` (after a failed read: the retry opens it afresh)."""
        dataset = self.datasets.pop(uri, None)
        if dataset is not None:
            dataset.close()

    def __del__(self) -> None:
        for dataset in self.datasets.values():
            dataset.close()


def _valid(rule: str, values: np.ndarray) -> np.ndarray:
    """Validity from mask values. ``zero``: 0 = valid (THEIA CLM/SAT/EDG, any set bit is invalid);
    ``flg``: THEIA L3A FLG, 0 = no data and 1 = cloud are invalid (2 snow, 3 water, 4 land valid);
    ``scl``: Sen2Cor SCL, classes in :data:`SCL_INVALID` are invalid."""
    if rule == "zero":
        return values == 0
    if rule == "flg":
        return values >= 2
    if rule == "scl":
        return ~np.isin(values, SCL_INVALID)
    raise ValueError(rule)


def _product_folder(uri: str, root: str, pattern: re.Pattern) -> tuple[str, re.Match] | None:
    """The product folder (URI prefix) of a file and the folder name's match, or None."""
    rel = uri[len(root) :].lstrip("/")
    parts = rel.split("/")
    prefix = root.rstrip("/")
    for part in parts[:-1]:
        prefix = f"{prefix}/{part}"
        match = pattern.match(part)
        if match:
            return prefix, match
    return None


def discover(layout: Layout, root: str, tile: str, where: str) -> list[Product]:
    """Every product of ``tile`` under ``root`` (sorted by acquisition time)."""
    tile_root = f"{root.rstrip('/')}/{tile}"
    files = storage.list_files(tile_root)
    base = tile_root
    if not files:
        files = storage.list_files(root)
        base = root
    groups: dict[str, dict] = {}
    for uri in files:
        found = _product_folder(uri, base, layout.folder)
        if found is None:
            continue
        folder, match = found
        if match.group("tile").lstrip("T") != tile.lstrip("T"):
            continue
        entry = groups.setdefault(folder, {"match": match, "bands": {}, "res": {}, "masks": []})
        rel = uri[len(folder) :]
        band = layout.band_file.search(rel)
        if band:
            name = band.group("band").upper()
            name = name if name in layout.sensor.bands else None
            if name is None:
                continue
            res = int(band.groupdict().get("res") or 0)
            best = entry["res"].get(name)
            # Sen2Cor ships bands at several resolutions: keep the finest one
            if best is None or (res and res < best):
                entry["bands"][name] = uri
                entry["res"][name] = res
            continue
        for pattern, rule in layout.masks:
            if pattern.search(rel):
                entry["masks"].append((uri, rule))
    products = []
    for folder, entry in sorted(groups.items()):
        match = entry["match"]
        name = folder.rsplit("/", 1)[-1]
        missing = [b for b in layout.sensor.bands if b not in entry["bands"]]
        if missing:
            raise BadInputError(
                f"{where}: product {folder} lacks the band files {missing} "
                f"(expected one file per band {list(layout.sensor.bands)})"
            )
        if len(entry["masks"]) != len(layout.masks):
            expected = [p.pattern for p, _ in layout.masks]
            raise BadInputError(f"{where}: product {folder} lacks mask files: expected files matching {expected}")
        offset = 0.0
        if "baseline" in match.groupdict() and int(match.group("baseline")) >= 400:
            offset = -1000.0  # Sen2Cor processing baseline 04.00: BOA_ADD_OFFSET
        products.append(
            Product(
                name,
                int(match.group("date")),
                match.group("date") + match.group("time") + name,
                dict(entry["bands"]),
                tuple(sorted(entry["masks"])),
                offset,
            )
        )
    products.sort(key=lambda p: p.order)
    return products


class ProductSensor(Sensor):
    """A sensor read from product folders (one per acquisition)."""

    band_files = True

    products: list[Product]
    layout: Layout
    native_dtype: str | None
    _open_files: threading.local  # per thread: the files it opened (see _dataset)

    @classmethod
    def build(cls, cfg, section: str, tile: str) -> ProductSensor:
        layout = LAYOUTS[section]
        facts = layout.sensor
        chain_key = facts.chain_key
        root = getattr(cfg.chain, chain_key)
        opts = getattr(cfg, section)
        where = f"chain.{chain_key}"
        products = discover(layout, root, tile, where)
        if not products:
            raise BadInputError(
                f"{where}: no {section} product of tile {tile!r} under {root} (expected folders "
                f"named like {layout.folder.pattern!r} under {root.rstrip('/')}/{tile}/)"
            )
        start, end = opts.start_date, opts.end_date
        kept = [p for p in products if (start is None or p.date >= start) and (end is None or p.date <= end)]
        if not kept:
            raise BadInputError(
                f"{section}: none of the {len(products)} acquisitions of tile {tile!r} "
                f"({products[0].date}..{products[-1].date}) lies between start_date {start} and end_date {end}"
            )
        indices = [i.lower() for i in cfg.arg_train.features]
        sensor = cls(
            key=facts.key,
            prefix=facts.prefix,
            ext_name=facts.ext_name,
            section=section,
            bands=list(facts.bands),
            keep=list(opts.keep_bands or facts.bands),
            roles=dict(facts.roles),
            indices=indices,
            raw_dates=[p.date for p in kept],
            start_date=start,
            end_date=end,
            temporal_resolution=int(opts.temporal_resolution),
            tile=tile,
            settings={"root": root, "products": [p.name for p in kept]},
        )
        sensor.products = kept
        sensor.layout = layout
        sensor.native_dtype = None  # the data type of the first product's grid band (native_grid)
        sensor._open_files = threading.local()
        log.info("tile %s: %s, %d acquisitions kept (%d found) from %s", tile, section, len(kept), len(products), root)
        return sensor

    def native_grid(self) -> Grid:
        """The grid of the grid band's file; its internal blocks become the sensor's block shape."""
        uri = self.products[0].bands[self.layout.grid_band]

        def grid():
            with storage.rasterio_env(), rasterio.open(storage.rasterio_path(uri)) as src:
                return grid_of(src), src.block_shapes[0], np.dtype(src.dtypes[0])

        found, (self.block_rows, self.block_cols), dtype = storage.raster_call(
            "open", uri, grid, culprit=self._culprit(self.products[0], self.layout.grid_band)
        )
        self.sample_bytes, self.native_dtype = dtype.itemsize, dtype.name
        return found

    def native_conversion(self, grid: Grid) -> tuple[np.ndarray, float] | None:
        """Digital numbers as the files hold them (the data type of the first product's grid
        band), ``(dn + product offset) * scale``; none on a target grid (the files' integers would be
        interpolated there, :meth:`read` interpolates their values), nor once a file of another data
        type was met (:class:`~sitsflow.sensors.base.NativeUnavailable`)."""
        if grid.resampled or self.native_dtype is None or not np.issubdtype(np.dtype(self.native_dtype), np.integer):
            return None
        return np.array([p.offset for p in self.products], np.float32), self.layout.scale

    def input_files(self) -> list[str]:
        return [u for p in self.products for u in (*p.bands.values(), *(m for m, _ in p.masks))]

    def _dataset(self, uri: str):
        """The open dataset of ``uri`` for this thread (opened once, see :class:`_OpenFiles`)."""
        files = getattr(self._open_files, "files", None)
        if files is None:
            files = self._open_files.files = _OpenFiles(open_files_budget())
        return files.get(uri)

    def _read_file(
        self,
        uri: str,
        window: Window,
        grid: Grid,
        fill: float,
        culprit: str,
        *,
        mask: bool = False,
        dtype: str | None = None,
    ):
        """``read_on_grid`` of the single-band file ``uri``, under the storage contract: a band
        (reflectances: cubic on a target grid, the product's nodata left out) or a ``mask``
        (nearest neighbour: a mask value is never interpolated); float32 values, or ``dtype``'s
        (which must hold every value of the file's data type)."""
        how = {"resampling": MASKS} if mask else {"resampling": VALUES, "nodata": self.layout.nodata}

        def read():
            src = self._dataset(uri)
            if dtype is not None and not np.can_cast(np.dtype(src.dtypes[0]), np.dtype(dtype)):
                self.native_dtype = None  # (this sensor's values are read converted from now on)
                raise NativeUnavailable(
                    f"{culprit}: {uri} holds {src.dtypes[0]} values, while {self.section}'s first file holds {dtype}"
                )
            return read_on_grid(src, window, grid, [1], uri, fill=fill, dtype=dtype or "float32", **how)

        def forget() -> None:
            files = getattr(self._open_files, "files", None)
            if files is not None:
                files.forget(uri)

        return storage.raster_call(
            "read",
            uri,
            read,
            culprit=culprit,
            on_retry=forget,
        )

    def _culprit(self, product: Product, band: str) -> str:
        return f"{self.section} acquisition {product.date} ({product.name}), band {band}"

    def surely_empty(self, window: Window, grid: Grid) -> bool:
        """The first band of each acquisition alone (one file in ``len(bands)`` + masks): where it
        is nodata on every date, no acquisition is valid. No file is read after the first valid
        value is found; remote files on their acquisition's thread, as :meth:`read` reads them (the
        blocks it fetched serve the read)."""
        band = self.bands[0]
        found = threading.Event()

        def acquisition(t: int) -> None:
            if found.is_set():
                return
            product = self.products[t]
            with storage.rasterio_env():
                data, inside = self._read_file(
                    product.bands[band], window, grid, self.layout.nodata, self._culprit(product, band)
                )
            dn = data[0]
            if (inside & (dn != np.float32(self.layout.nodata)) & np.isfinite(dn)).any():
                found.set()

        per_acquisition(len(self.products), acquisition, self.remote)
        return not found.is_set()

    def read(self, window: Window, grid: Grid, buffers: ReadBuffers | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self._read(window, grid, buffers, native=False)

    def read_native(
        self, window: Window, grid: Grid, buffers: ReadBuffers | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._read(window, grid, buffers, native=True)

    def _read(
        self, window: Window, grid: Grid, buffers: ReadBuffers | None, native: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        h, w = int(window.height), int(window.width)
        nb_raw, nb_bands = len(self.products), len(self.bands)
        dtype = np.dtype(self.native_dtype) if native and self.native_dtype else np.dtype(np.float32)
        values = new_array(buffers, f"{self.section}:values", (h, w, nb_raw, nb_bands), dtype)
        valid = new_array(buffers, f"{self.section}:valid", (h, w, nb_raw), bool)
        valid[...] = True
        scale = np.float32(self.layout.scale)
        nodata = self.layout.nodata
        marker = None  # the nodata value as native digital numbers hold it (none when they cannot)
        if native and float(nodata).is_integer():
            bounds = np.iinfo(dtype.name)
            marker = dtype.type(nodata) if bounds.min <= nodata <= bounds.max else None

        def acquisition(t: int) -> None:
            product = self.products[t]
            with storage.rasterio_env():
                for b, band in enumerate(self.bands):
                    uri = product.bands[band]
                    culprit = self._culprit(product, band)
                    if native:
                        data, inside = self._read_file(uri, window, grid, 0, culprit, dtype=dtype.name)
                        dn = data[0]
                        valid[:, :, t] &= inside if marker is None else inside & (dn != marker)
                        values[:, :, t, b] = dn
                        continue
                    data, inside = self._read_file(uri, window, grid, nodata, culprit)
                    dn = data[0]
                    valid[:, :, t] &= inside & (dn != np.float32(nodata)) & np.isfinite(dn)
                    values[:, :, t, b] = (dn + np.float32(product.offset)) * scale
                for uri, rule in product.masks:
                    data, inside = self._read_file(
                        uri,
                        window,
                        grid,
                        0,
                        f"{self.section} acquisition {product.date} ({product.name}), mask {uri.rsplit('/', 1)[-1]}",
                        mask=True,
                    )
                    valid[:, :, t] &= inside & _valid(rule, data[0])

        # remote files: each acquisition on its own thread (see per_acquisition)
        per_acquisition(nb_raw, acquisition, self.remote)
        if not native:
            values[~valid] = 0.0
        return values, valid
