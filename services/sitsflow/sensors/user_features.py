"""iota2's ``userFeat`` sensor: user rasters (a DEM, a slope, a soil map ...) as static features.

``chain.user_feat_path`` holds one folder per tile; for each pattern of ``userFeat.patterns`` the
tile's raster is the one file matching ``{user_feat_path}/{tile}/{arbo}{pattern}*`` (iota2's
``getUserFeatInTile``: the glob of ``arbo``, iota2's default ``/*``, then the pattern then ``*``).
Every band of each raster is a feature, named as iota2 labels them, ``{pattern}_band_{n}`` (n from
0), in the order of the patterns. As in iota2 the rasters have no date, no mask and no nodata
(iota2's footprint of user features is "every pixel valid"); off a raster's footprint the values
are NaN.

They are static: the networks take (pixels, nb_dates, nb_components), so the values are repeated
on every date of the date axis as extra components after the dated sensors' (see docs/sensors.md),
and they never count as a clear acquisition. They are read onto the tile grid like any raster
(:func:`~sitsflow.sensors.base.read_on_grid`: nearest neighbour from a coarser integer multiple,
the warper's cubic convolution onto a target grid, as iota2's ``Superimpose``), windowed, local,
``s3://`` or ``http(s)://`` (an http folder cannot be listed: its files cannot be found).
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np
import rasterio
from rasterio.windows import Window

from sitsflow import storage
from sitsflow.errors import BadInputError
from sitsflow.sensors.base import VALUES, Grid, ReadBuffers, Sensor, grid_of, new_array, read_on_grid

#: statistics key, feature prefix and external-feature name of the sensor (iota2's class name)
KEY = "userfeat"
EXT_NAME = "userFeatures"
#: side files of rasters, never a user raster
_SIDE_FILES = (".aux.xml", ".ovr")


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob (``*``, ``?``, ``[...]``; neither crosses a ``/``) as a regular expression."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (j := _class_end(pattern, i)) > 0:
            body = pattern[i + 1 : j]
            negated = body[:1] == "!"
            # a range such as 0-9 stays a range, as in glob; only what regular expressions read
            # otherwise inside a class is escaped
            inner = (body[1:] if negated else body).replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
            inner = re.sub(r"([&~|])", r"\\\1", inner)  # set operations of future regular expressions
            out.append("[" + ("^" if negated else "") + inner + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def _class_end(pattern: str, start: int) -> int:
    """The index of the ``]`` closing the class opened at ``start``, -1 when it is not closed (the
    ``[`` is then a plain character). As in glob: a ``]`` first in the class (after ``!``) is a
    member, not the end (``[]]``, ``[!]]``)."""
    j = start + 1
    if pattern[j : j + 1] == "!":
        j += 1
    if pattern[j : j + 1] == "]":
        j += 1
    return pattern.find("]", j)


def find_rasters(root: str, tile: str, arbo: str, patterns: list[str]) -> list[str]:
    """The raster of each pattern under ``{root}/{tile}``: the one file matching
    ``{arbo}{pattern}*`` relative to the tile folder (repeated ``/`` count as one, as in a glob)."""
    folder = f"{root.rstrip('/')}/{tile}"
    files = [f for f in storage.list_files(folder) if not f.endswith(_SIDE_FILES)]
    relative = {f: re.sub("/+", "/", "/" + f[len(folder) :].lstrip("/")) for f in files}
    found = []
    for pattern in patterns:
        glob = re.sub("/+", "/", "/" + (arbo + pattern + "*").lstrip("/"))
        try:
            regex = _glob_regex(glob)
        except re.error as exc:  # a class such as [z-a]
            raise BadInputError(
                f"userFeat.patterns: pattern {pattern!r} is no valid glob ({exc}); use *, ? and classes such as [0-9]"
            ) from None
        matches = sorted(f for f, rel in relative.items() if regex.fullmatch(rel))
        if not matches:
            raise BadInputError(
                f"userFeat.patterns: no raster of pattern {pattern!r} for tile {tile!r} in {folder} "
                f"(looked for {folder}{glob}, userFeat.arbo {arbo!r}); each pattern must match one raster per tile"
            )
        if len(matches) > 1:
            shown = ", ".join(matches[:4]) + (" ..." if len(matches) > 4 else "")
            raise BadInputError(
                f"userFeat.patterns: pattern {pattern!r} matches {len(matches)} rasters of tile {tile!r} in "
                f"{folder} ({shown}); each pattern must match one raster per tile (use a longer pattern)"
            )
        found.append(matches[0])
    return found


class UserFeatSensor(Sensor):
    """The ``userFeat`` rasters of one tile: static bands, no date, always valid on their footprint."""

    static: ClassVar[bool] = True
    paths: list[str]
    counts: list[int]

    @classmethod
    def build(cls, cfg, tile: str) -> UserFeatSensor:
        opts = cfg.userFeat
        patterns = opts.pattern_list
        paths = find_rasters(cfg.chain.user_feat_path, tile, opts.arbo, patterns)

        def header(path: str):
            def read():
                with storage.rasterio_env(), rasterio.open(storage.rasterio_path(path)) as src:
                    blocks = tuple(int(n) for n in src.block_shapes[0]) if src.block_shapes else (1, 1)
                    return src.count, blocks

            return storage.raster_call("open", path, read, culprit="chain.user_feat_path")

        headers = [header(p) for p in paths]
        counts = [count for count, _ in headers]
        bands = [f"{p}_band_{n}" for p, count in zip(patterns, counts) for n in range(count)]
        sensor = cls(
            key=KEY,
            prefix=KEY,
            ext_name=EXT_NAME,
            section="userFeat",
            bands=bands,
            keep=bands,
            roles={},
            indices=[],
            raw_dates=[],
            start_date=None,
            end_date=None,
            temporal_resolution=0,
            tile=tile,
            settings={"paths": paths, "arbo": opts.arbo, "patterns": patterns},
        )
        sensor.paths, sensor.counts = paths, counts
        sensor.block_rows = max(rows for _, (rows, _) in headers)
        sensor.block_cols = max(cols for _, (_, cols) in headers)
        return sensor

    def native_grid(self) -> Grid:
        def grid():
            with storage.rasterio_env(), rasterio.open(storage.rasterio_path(self.paths[0])) as src:
                return grid_of(src)

        return storage.raster_call("open", self.paths[0], grid, culprit="chain.user_feat_path")

    def input_files(self) -> list[str]:
        return list(self.paths)

    def read(self, window: Window, grid: Grid, buffers: ReadBuffers | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Values (h, w, 1, nb_bands): one "acquisition" holding every band of every raster, NaN
        off a raster's footprint; valid (h, w, 1): on every raster's footprint."""
        h, w = int(window.height), int(window.width)
        data = new_array(buffers, "userfeat:data", (h, w, 1, len(self.bands)), np.float32)
        valid = new_array(buffers, "userfeat:valid", (h, w, 1), bool)
        valid[...] = True
        first = 0
        for path, count in zip(self.paths, self.counts):

            def read_one(path: str = path, count: int = count, first: int = first):
                with storage.rasterio_env(), rasterio.open(storage.rasterio_path(path)) as src:
                    values, inside = read_on_grid(
                        src, window, grid, list(range(1, count + 1)), path, pixel_major=True, resampling=VALUES
                    )
                data[:, :, 0, first : first + count] = values
                return inside

            inside = storage.raster_call("read", path, read_one, culprit="chain.user_feat_path")
            valid[:, :, 0] &= inside
            first += count
        return data, valid
