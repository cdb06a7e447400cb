"""Reference data: labelled polygons, regions, the nomenclature and the colour table."""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from rasterio.features import rasterize
from rasterio.warp import transform_geom
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from rasterio.windows import transform as window_transform

from sitsflow import storage
from sitsflow.errors import BadInputError
from sitsflow.log import get_logger

log = get_logger(__name__)

_SIDECARS = (".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx")


@contextlib.contextmanager
def local_vector(uri: str) -> Iterator[str]:
    """A local copy of a vector file (with a Shapefile's sidecar files) for OGR to read."""
    if not storage.is_s3(uri):
        if not storage.exists(uri):
            raise BadInputError(f"vector file {uri} does not exist")
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="sitsflow-vector-") as tmp:
        name = uri.rsplit("/", 1)[-1]
        storage.copy(uri, str(Path(tmp) / name))
        if name.lower().endswith(".shp"):
            stem = uri[: -len(".shp")]
            for ext in _SIDECARS:
                for candidate in (stem + ext, stem + ext.upper()):
                    if storage.exists(candidate):
                        storage.copy(candidate, str(Path(tmp) / (name[:-4] + ext)))
        yield str(Path(tmp) / name)


@dataclass
class Polygons:
    """Polygons in the tile's CRS.

    Attributes:
        ids: int64 (n,) polygon ids (the feature's position in the file, 0-based: stable).
        values: int64 (n,) the value of the attribute field (class or region).
        geoms: shapely geometries (n,), valid, in the target CRS.
    """

    ids: np.ndarray
    values: np.ndarray
    geoms: np.ndarray


def _no_feature(key: str, uri: str) -> BadInputError:
    return BadInputError(f"{key}: vector file {uri} holds no feature (0 polygons); it must hold polygons")


def read_polygons(uri: str, field: str, key: str, *, crs) -> tuple[Polygons, dict]:
    """Read polygons with an integer attribute ``field`` and reproject them to ``crs``.

    Polygons whose value is null or 0 have no class: they are excluded and counted.
    Invalid geometries are repaired (``shapely.make_valid``) and counted; empty ones are dropped.

    Args:
        uri: local path or s3:// URI of a GeoPackage, Shapefile or GeoJSON.
        field: the attribute holding integer values.
        key: the configuration key naming the file (for messages).
        crs: the CRS of the tile grid (rasterio CRS).

    Returns:
        The polygons and a report dict (counts of excluded, repaired, dropped polygons).
    """
    import pyogrio  # here, not at the top: the stages that read no vector (and their images) skip its GDAL

    with local_vector(uri) as path:
        try:
            info = pyogrio.read_info(path)
        except Exception as exc:  # pyogrio raises DataSourceError and others
            raise BadInputError(f"{key}: cannot read vector file {uri}: {exc}") from None
        if int(info.get("features") or 0) == 0:  # -1: the driver cannot count them cheaply
            raise _no_feature(key, uri)
        fields = [str(f) for f in info["fields"]]
        if field not in fields:
            raise BadInputError(f"{key}: {uri} has no field {field!r}; its fields are {fields}")
        try:
            meta, _, wkb, columns = pyogrio.raw.read(path, columns=[field])
        except Exception as exc:  # noqa: BLE001 - a file OGR cannot read is bad input, whatever OGR says
            raise BadInputError(f"{key}: cannot read the features of vector file {uri}: {exc}") from None
    raw = columns[0]
    src_crs = meta.get("crs")
    n = len(wkb)
    if n == 0:
        raise _no_feature(key, uri)
    values = np.zeros(n, np.int64)
    excluded = []
    for i, v in enumerate(raw):
        if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
            excluded.append(i)
            continue
        try:
            fv = float(v)
        except (TypeError, ValueError):
            raise BadInputError(
                f"{key}: polygon {i} of {uri} has {field}={v!r}; class and region values must be integers"
            ) from None
        if fv != int(fv):
            raise BadInputError(f"{key}: polygon {i} of {uri} has {field}={v!r}; values must be integers")
        values[i] = int(fv)
        if values[i] == 0:
            excluded.append(i)
        elif values[i] < 0:
            raise BadInputError(
                f"{key}: polygon {i} of {uri} has {field}={v!r}; values must be positive (0 = no class)"
            )
    try:
        geoms = shapely.from_wkb(wkb)
    except shapely.errors.GEOSException as exc:
        raise BadInputError(f"{key}: vector file {uri} holds a geometry that cannot be decoded: {exc}") from None
    keep = np.ones(n, bool)
    keep[excluded] = False
    missing = np.array([g is None for g in geoms])
    keep &= ~missing
    invalid = keep & ~np.array([g is not None and g.is_valid for g in geoms])
    repaired = int(invalid.sum())
    for i in np.nonzero(invalid)[0].tolist():
        geoms[i] = shapely.make_valid(geoms[i])
    if src_crs and crs is not None and str(src_crs) != "":
        from rasterio.crs import CRS

        src = CRS.from_user_input(src_crs)
        if src != crs:
            for i in np.nonzero(keep)[0].tolist():
                geoms[i] = shapely.geometry.shape(transform_geom(src, crs, shapely.geometry.mapping(geoms[i])))
    empty = keep & np.array([g is None or g.is_empty for g in geoms])
    keep &= ~empty
    report = {
        "polygons": n,
        "without_class": len(excluded),
        "repaired": repaired,
        "dropped_empty": int(empty.sum() + missing.sum()),
    }
    if excluded:
        log.info("%s: %d of %d polygons have no %s (null or 0) and are excluded", uri, len(excluded), n, field)
    if repaired:
        log.warning("%s: %d invalid geometries were repaired", uri, repaired)
    ids = np.nonzero(keep)[0].astype(np.int64)
    return Polygons(ids=ids, values=values[keep], geoms=np.asarray(geoms, dtype=object)[keep]), report


def burn(
    polygons: Polygons,
    window: Window,
    transform: Affine,
    values: np.ndarray | None = None,
    *,
    tree: shapely.STRtree | None = None,
) -> np.ndarray:
    """Burn ``values`` (default: the polygons' own values) of ``polygons`` on ``window`` of the grid
    whose transform is ``transform``; 0 outside every polygon. Pixel centres decide membership;
    where polygons overlap the last one wins. Sampling and inference burn regions with this one
    rule, so a pixel is classified by the model of the region it was sampled in.

    ``tree`` (a ``shapely.STRtree`` of ``polygons.geoms``) restricts the burn to the polygons that
    intersect the window (same result, faster on large vector files).

    Returns:
        int64 (window height, window width).
    """
    h, w = int(window.height), int(window.width)
    values = polygons.values if values is None else values
    if tree is not None:
        hits = tree.query(shapely.box(*window_bounds(window, transform)), predicate="intersects")
    else:
        hits = np.arange(len(polygons.geoms))
    if hits.size == 0:
        return np.zeros((h, w), np.int64)
    shapes = ((polygons.geoms[i], int(values[i])) for i in np.sort(hits))
    return rasterize(shapes, out_shape=(h, w), transform=window_transform(window, transform), fill=0, dtype="int64")


_LINE = re.compile(r"^\s*(.*?)\s*:\s*(.*?)\s*$")
NOMENCLATURE_KEY = "chain.nomenclature_path"
COLOR_TABLE_KEY = "chain.color_table"


def read_nomenclature(uri: str | None) -> dict[int, str]:
    """Read class names: one ``name:code`` line per class (iota2's format; ``code:name`` also works).

    Returns {} when ``uri`` is None.

    Raises:
        BadInputError: a line that is not ``name:code``, a class code or a class name given twice
            (file, line, the duplicate and the line it first appears on), or no class at all.
    """
    if uri is None:
        return {}
    names: dict[int, str] = {}
    code_line: dict[int, int] = {}
    name_line: dict[str, int] = {}
    for lineno, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{NOMENCLATURE_KEY}: {uri}:{lineno}"
        match = _LINE.match(line)
        if not match:
            raise BadInputError(f"{where}: expected 'name:code', got {line!r}")
        left, right = match.groups()
        if right.lstrip("-").isdigit():
            code, name = int(right), left
        elif left.lstrip("-").isdigit():
            code, name = int(left), right
        else:
            raise BadInputError(f"{where}: no integer class code in {line!r}")
        if code in code_line:
            raise BadInputError(
                f"{where}: class code {code} is given twice (line {code_line[code]} names it {names[code]!r}, this "
                f"line {name!r}); each code names one class"
            )
        if name in name_line:
            raise BadInputError(
                f"{where}: class name {name!r} is given twice (line {name_line[name]} with code "
                f"{next(c for c, n in names.items() if n == name)}, this line with code {code}); each class has "
                f"its own name"
            )
        names[code], code_line[code], name_line[name] = name, lineno, lineno
    if not names:
        raise BadInputError(f"{NOMENCLATURE_KEY}: {uri} lists no class (expected one 'name:code' line per class)")
    return names


def read_color_table(uri: str | None) -> dict[int, tuple[int, int, int]]:
    """Read a colour table: one ``code R G B`` line per class (iota2's format). {} when None.

    Raises:
        BadInputError: a malformed line, a component outside 0..255, a code given twice (file,
            line, the code and the line it first appears on), or no colour at all.
    """
    if uri is None:
        return {}
    colors: dict[int, tuple[int, int, int]] = {}
    code_line: dict[int, int] = {}
    for lineno, line in enumerate(storage.read_text(uri).splitlines(), 1):
        parts = line.replace(",", " ").replace(":", " ").split()
        if not parts or parts[0].startswith("#"):
            continue
        where = f"{COLOR_TABLE_KEY}: {uri}:{lineno}"
        try:
            code, r, g, b = (int(p) for p in parts[:4])
        except ValueError:
            raise BadInputError(f"{where}: expected 'code R G B', got {line!r}") from None
        if not all(0 <= c <= 255 for c in (r, g, b)):
            raise BadInputError(f"{where}: colour components must be 0..255, got {line.strip()!r}")
        if code in code_line:
            raise BadInputError(
                f"{where}: class code {code} is given twice (first at line {code_line[code]}); each code has one colour"
            )
        colors[code], code_line[code] = (r, g, b), lineno
    if not colors:
        raise BadInputError(f"{COLOR_TABLE_KEY}: {uri} lists no colour (expected one 'code R G B' line per class)")
    return colors


def check_class_files(
    nomenclature_uri: str | None, color_table_uri: str | None
) -> tuple[dict[int, str], dict[int, tuple[int, int, int]]]:
    """Read the nomenclature and the colour table and check they agree: when both are given, every
    class of the nomenclature has a colour. Returns ``(names, colours)`` as the readers do.

    Raises:
        BadInputError: what the readers raise, or nomenclature codes without a colour (listed).
    """
    names = read_nomenclature(nomenclature_uri)
    colors = read_color_table(color_table_uri)
    missing = [c for c in names if colors and c not in colors]
    if missing:
        listed = ", ".join(f"{c} ({names[c]})" for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise BadInputError(
            f"{COLOR_TABLE_KEY}: {color_table_uri} has no colour for {len(missing)} class(es) of "
            f"{nomenclature_uri}: {listed}; add a 'code R G B' line for each"
        )
    return names, colors
