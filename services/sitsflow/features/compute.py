"""The feature computation, pure (no reading): raw observations of some pixels -> features.

Same-day acquisitions merged, then gap filling onto the date axis (or raw dates kept, masked
values NaN), then per date and sensor the kept bands, the spectral indices and the external
features (see :mod:`sitsflow.features`).

Written once, in torch, so that it runs where the network runs: sampling computes its features on
the CPU (:meth:`FeatureComputer.compute`, numpy in and out); inference on a GPU hands the device
the observations as read (:class:`RawFeatures`: the files' integers and the valid flags) and the
device converts and gap-fills them batch by batch (:meth:`FeatureComputer.compute_native`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sitsflow.features.dates import DateAxis
from sitsflow.sensors import Sensor
from sitsflow.sensors.external import ExternalFeatures


class FeatureComputer:
    """Computes the features of one tile's sensors on a date axis.

    Args:
        sensors: the sensors, in stacking order.
        axis: their date axis.
        components: per sensor, the names of its components (bands, indices, external features).
        external: the user's external features, if any.
        conversions: per sensor, how its native values become its reads' values on the tile grid
            (:meth:`~sitsflow.sensors.base.Sensor.native_conversion`); None when a sensor has none
            (no :meth:`compute_native` then).
    """

    def __init__(
        self,
        sensors: list[Sensor],
        axis: DateAxis,
        components: list[list[str]],
        external: ExternalFeatures | None,
        conversions: list[tuple[np.ndarray, float]] | None = None,
    ) -> None:
        self.sensors = sensors
        self.conversions = conversions
        self.axis = axis
        self._components = components
        self.external = external
        #: small constant tensors (day groups, interpolation indices, offsets) per device, made once:
        #: a copy to a GPU would otherwise wait for the work queued before it, batch after batch
        self._constants: dict[tuple[str, int, str], torch.Tensor] = {}

    @property
    def shape(self) -> tuple[int, int]:
        """(nb_dates, nb_components) of the features of one pixel."""
        return len(self.axis.dates), sum(len(c) for c in self._components)

    def compute(self, raw, valid) -> np.ndarray:
        """Turn raw observations of some pixels into features, on the CPU.

        Args:
            raw: per sensor float32 (P, nb_raw_s, nb_bands_s) (a list; an array for one sensor).
            valid: per sensor bool (P, nb_raw_s).

        Returns:
            float32 (P, nb_dates, nb_components).
        """
        if isinstance(raw, np.ndarray):
            raw, valid = [raw], [valid]
        with torch.inference_mode():
            out = self.compute_tensors(
                [torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32)) for r in raw],
                [torch.from_numpy(np.ascontiguousarray(v, dtype=bool)) for v in valid],
            )
        return out.numpy()

    def compute_native(self, values: Sequence[torch.Tensor], valid: Sequence[torch.Tensor]) -> torch.Tensor:
        """Features of observations as read (see :class:`RawFeatures`), on their tensors' device:
        each sensor's values converted as its :meth:`~sitsflow.sensors.base.Sensor.read` converts
        them (``(dn + offset of the acquisition) * scale``, float32: one operation without offsets),
        then :meth:`compute_tensors`. Invalid observations keep their values (nodata, NaN): the
        computation never reads them (same-day merges weigh them 0, gap filling interpolates
        between valid ones, raw dates turn them into NaN)."""
        if self.conversions is None:
            raise TypeError("a sensor of this tile reads no native values")
        raw = []
        for k, v in enumerate(values):
            offsets, scale = self.conversions[k]
            factor = self._constant("scale", k, v.device, lambda f=scale: np.float32(f))
            if offsets.any():
                offset = self._constant("offset", k, v.device, lambda o=offsets: o.astype(np.float32)[:, None])
                raw.append((v.to(torch.float32) + offset) * factor)
            elif v.dtype in (torch.uint16, torch.uint32, torch.uint64):  # (few operations take them)
                raw.append(v.to(torch.float32) * factor)
            else:
                raw.append(v * factor)  # int * float32 scalar tensor: float32, in one pass
        return self.compute_tensors(raw, valid, owned=True)

    def compute_tensors(
        self, raw: Sequence[torch.Tensor], valid: Sequence[torch.Tensor], owned: bool = False
    ) -> torch.Tensor:
        """:meth:`compute` on tensors, on their device: float32 (P, nb_raw_s, nb_bands_s) and bool
        (P, nb_raw_s) per sensor -> float32 (P, nb_dates, nb_components); ``owned``: the ``raw``
        tensors are the caller's to lose (gap filling may write into them)."""
        series = [self._series(k, r, v, owned) for k, (r, v) in enumerate(zip(raw, valid))]
        external: dict[str, dict[str, torch.Tensor]] = {}
        if self.external is not None:  # the user's numpy code, on the CPU
            device = series[0].device
            computed = self.external.compute(
                {s.ext_name: x.cpu().numpy() for s, x in zip(self.sensors, series)},
                {s.ext_name: list(s.bands) for s in self.sensors},
                self.axis.dates,
            )
            external = {
                name: {c: torch.as_tensor(np.asarray(a, np.float32)).to(device) for c, a in values.items()}
                for name, values in computed.items()
            }
        if (
            len(self.sensors) == 1
            and not external
            and self._components[0] == [b.lower() for b in self.sensors[0].bands]
        ):
            # the features are the sensor's bands as read: no re-stacking copy
            return series[0].contiguous()
        parts = []
        for s, x, comps in zip(self.sensors, series, self._components):
            for c in comps:
                bands = [b.lower() for b in s.bands]
                if c in s.indices and s.roles and c not in external.get(s.ext_name, {}):
                    parts.append(_index(c, x, s))
                elif c in external.get(s.ext_name, {}):
                    parts.append(external[s.ext_name][c])
                else:
                    parts.append(x[:, :, bands.index(c)])
        return torch.stack(parts, dim=-1)

    def _constant(self, name: str, k: int, device: torch.device, make) -> torch.Tensor:
        key = (name, k, str(device))
        value = self._constants.get(key)
        if value is None:
            value = self._constants[key] = torch.as_tensor(make()).to(device)
        return value

    def _series(self, k: int, raw: torch.Tensor, valid: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """One sensor's series on the date axis: float32 (P, nb_dates, nb_bands_s); a static
        sensor's one "acquisition" repeated on every date."""
        if self.sensors[k].static:
            return raw[:, :1].to(torch.float32).expand(-1, len(self.axis.dates), -1)
        st = self.axis.times[k]
        device = raw.device
        if len(st.unique_dates) < raw.shape[1]:
            raw, valid = _merge_same_day(
                raw, valid, self._constant("day_group", k, device, lambda: st.day_group), len(st.unique_dates)
            )
        if self.axis.raw_dates_mode:
            out = torch.full((raw.shape[0], len(self.axis.dates), raw.shape[2]), np.nan, device=device)
            out[:, self._constant("positions", k, device, lambda: st.positions)] = raw.masked_fill(
                ~valid[..., None], np.nan
            )
            return out
        return _gapfill(raw, valid, st.unique_ordinals, self.axis.target_ordinals, self, k, overwrite=owned)


@dataclass(eq=False)
class RawFeatures:
    """Observations of some pixels as read, and the computation that turns them into features.

    What inference hands the network's device instead of features: per sensor, the files' values
    as read (their integers: int16/uint16, half the bytes of float32 features when there are as
    many acquisitions as dates) and the valid flags,
    the conversion, masks and gap filling being left to :meth:`FeatureComputer.compute_native` on
    that device, batch by batch (:class:`sitsflow.nn.Predictor`).

    Attributes:
        values: per sensor (P, nb_raw_s, nb_bands_s), the files' data type.
        valid: per sensor bool (P, nb_raw_s).
        computer: the feature computation.
    """

    values: list[np.ndarray]
    valid: list[np.ndarray]
    computer: FeatureComputer

    @property
    def shape(self) -> tuple[int, int, int]:
        """The features' shape: (P, nb_dates, nb_components)."""
        return (int(self.values[0].shape[0]), *self.computer.shape)

    @property
    def ndim(self) -> int:
        return 3

    def __len__(self) -> int:
        return int(self.values[0].shape[0])

    def __getitem__(self, index) -> RawFeatures:
        """The pixels ``index`` picks (a bool mask, integer indices or a slice)."""
        return RawFeatures([v[index] for v in self.values], [m[index] for m in self.valid], self.computer)

    def arrays(self, start: int, stop: int) -> list[np.ndarray]:
        """The host arrays of pixels [start, stop): every sensor's values, then its valid flags."""
        return [*(v[start:stop] for v in self.values), *(m[start:stop] for m in self.valid)]

    def compute(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        """The features of :meth:`arrays`' tensors (on any device), float32 (P, nb_dates, nb_components)."""
        n = len(self.values)
        return self.computer.compute_native(arrays[:n], arrays[n:])

    def features(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The features of pixels [start, stop), on the CPU."""
        stop = len(self) if stop is None else stop
        return self.compute([torch.from_numpy(np.ascontiguousarray(a)) for a in self.arrays(start, stop)])


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a - b) / (a + b), 0 where the sum is 0 (NaN stays NaN)."""
    den = a + b
    nonzero = den != 0
    return torch.where(nonzero, (a - b) / torch.where(nonzero, den, 1.0), 0.0)


def _index(name: str, x: torch.Tensor, s: Sensor) -> torch.Tensor:
    """A spectral index per date from a sensor's series x (P, nb_dates, nb_bands): (P, nb_dates).

    NDVI = (NIR - red) / (NIR + red); NDWI = (NIR - SWIR) / (NIR + SWIR) (Gao's water index, SWIR at
    1.6 µm); Brightness = sqrt(sum over every band of the sensor of reflectance²).
    """
    band = {role: x[:, :, s.bands.index(b)] for role, b in s.roles.items()}
    if name == "ndvi":
        return _ratio(band["nir"], band["red"])
    if name == "ndwi":
        return _ratio(band["nir"], band["swir"])
    if name == "brightness":
        return torch.sqrt(torch.sum(x.to(torch.float32) ** 2, dim=-1))
    raise ValueError(name)


def _merge_same_day(
    raw: torch.Tensor, valid: torch.Tensor, day_group: torch.Tensor, nb_days: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the valid acquisitions that fall on the same day.

    Args:
        raw: float32 (P, nb_raw, nb_bands); valid: bool (P, nb_raw); day_group: (nb_raw,) the day of
        each acquisition, on their device.

    Returns:
        (P, nb_days, nb_bands) float32 and (P, nb_days) bool.
    """
    if nb_days == raw.shape[1]:
        return raw, valid
    sums = torch.zeros((raw.shape[0], nb_days, raw.shape[2]), dtype=torch.float32, device=raw.device)
    counts = torch.zeros((raw.shape[0], nb_days), dtype=torch.float32, device=raw.device)
    sums.index_add_(1, day_group, torch.where(valid[..., None], raw, 0.0))
    counts.index_add_(1, day_group, valid.to(torch.float32))
    return sums / counts.clamp_min(1.0)[..., None], counts > 0


def _gapfill(
    raw: torch.Tensor,
    valid: torch.Tensor,
    t_obs: np.ndarray,
    targets: np.ndarray,
    constants: FeatureComputer | None = None,
    k: int = 0,
    fast: bool | None = None,
    overwrite: bool = False,
) -> torch.Tensor:
    """Linear interpolation in time onto ``targets`` (nearest valid value outside the observed
    range); pixels with no valid observation at all get NaN.

    Args:
        raw: float32 (P, nb_obs, nb_bands); valid: bool (P, nb_obs); t_obs: (nb_obs,) ordinals;
        targets: (nb_dates,) ordinals (float64); constants, k: where the constant tensors of
        sensor ``k`` are kept per device (made afresh when None); fast: interpolate every pixel
        between the same observations, then redo only the values next to an invalid observation
        (on the CPU when None: on a GPU, asking which values those are would wait for the
        device); otherwise every value is interpolated between its pixel's valid observations,
        without a look at the data; overwrite: ``raw`` may become the result (it is not kept).

    Returns:
        float32 (P, nb_dates, nb_bands).
    """
    nb_pix, nb_obs, nb_bands = raw.shape
    device = raw.device

    def const(name: str, make) -> torch.Tensor:
        if constants is None:
            return torch.as_tensor(make()).to(device)
        return constants._constant(name, k, device, make)

    gaps = _Gaps(t_obs, targets, const)
    if device.type == "cpu" if fast is None else fast:
        filled = _gapfill_sparse(raw, valid, gaps, overwrite)
        if filled is not None:
            return filled
    pixels = torch.arange(nb_pix, device=device)[:, None]
    return gaps.fill(raw, valid, pixels, const("dates", lambda: np.arange(len(targets)))[None, :])


class _Gaps:
    """Where each target falls among the acquisitions, and the interpolation of chosen (pixel,
    target) pairs between their pixel's valid observations."""

    def __init__(self, t_obs: np.ndarray, targets: np.ndarray, const) -> None:
        nb_obs = len(t_obs)
        self.t_obs, self.targets, self.const = t_obs, targets, const
        self.left_pos = np.searchsorted(t_obs, targets, side="right") - 1  # last obs <= t
        self.right_pos = np.searchsorted(t_obs, targets, side="left")  # first obs >= t
        self.lo, self.hi = np.clip(self.left_pos, 0, nb_obs - 1), np.clip(self.right_pos, 0, nb_obs - 1)

    def fill(self, raw: torch.Tensor, valid: torch.Tensor, pixels: torch.Tensor, dates: torch.Tensor) -> torch.Tensor:
        """The values of the (pixel, target) pairs that ``pixels`` and ``dates`` (int64 index
        tensors of one broadcast shape S) name, each interpolated between the valid observations
        of its pixel around its target: float32 (*S, nb_bands)."""
        nb_pix, nb_obs, nb_bands = raw.shape
        const = self.const
        # per pixel, 1 + the last valid observation at or before each one (0: none), a running
        # maximum; nb_obs - the first at or after each one (0: none), the same from the end (kept
        # in flipped order: read at nb_obs - 1 - position); int16 when the positions fit (less
        # memory traffic than int64)
        kind = np.int16 if nb_obs < 2**15 else np.int64
        flags = valid.to(torch.int16 if kind == np.int16 else torch.int64)
        before = (flags * const("ranks", lambda: np.arange(1, nb_obs + 1, dtype=kind))).cummax(dim=1).values
        after = flags * const("ranks from the end", lambda: np.arange(nb_obs, 0, -1, dtype=kind))
        after = after.flip(1).cummax(dim=1).values
        rows = pixels * nb_obs
        left = before.reshape(-1)[rows + const("left", lambda: self.lo)[dates]].to(torch.int64) - 1
        right = nb_obs - after.reshape(-1)[rows + const("right flipped", lambda: nb_obs - 1 - self.hi)[dates]].to(
            torch.int64
        )
        has_left = (left >= 0) & const("inside left", lambda: self.left_pos >= 0)[dates]
        has_right = (right < nb_obs) & const("inside right", lambda: self.right_pos < nb_obs)[dates]
        # no valid observation on one side: the nearest one on the other (outside the observed
        # range, or before the pixel's first / after its last valid one)
        left = torch.where(has_left, left, right)
        right = torch.where(has_right, right, left)
        none = ~(has_left | has_right)  # no valid observation at all: NaN (any position will do)
        left, right = left.clamp_(0, nb_obs - 1), right.clamp_(0, nb_obs - 1)
        t = const("t_obs", lambda: np.asarray(self.t_obs, np.float64))
        when = const("targets", lambda: np.asarray(self.targets, np.float64))[dates]
        w = _weight(t[left], t[right], when)[..., None]
        # raw[left] * (1 - w) + raw[right] * w: whole rows of bands picked (one index per pixel and
        # date, not per value), in place
        flat = raw.reshape(nb_pix * nb_obs, nb_bands)
        shape = (*left.shape, nb_bands)
        out = flat.index_select(0, (rows + left).reshape(-1)).reshape(shape).mul_(1.0 - w)
        out += flat.index_select(0, (rows + right).reshape(-1)).reshape(shape).mul_(w)
        return out.masked_fill_(none[..., None], np.nan)

    def shared(self, raw: torch.Tensor) -> torch.Tensor:
        """Every pixel interpolated between the observations around each target, as if all were
        valid: (P, nb_dates, nb_bands); ``raw`` itself when the targets are the acquisitions."""
        lo, hi = self.lo, self.hi
        if np.array_equal(lo, hi):  # every target on an acquisition (or outside them)
            if lo.size == raw.shape[1] and np.array_equal(lo, np.arange(lo.size)):
                return raw  # the grid is the acquisitions: nothing to interpolate
            return raw.index_select(1, self.const("left", lambda: lo))
        t = torch.from_numpy(np.asarray(self.t_obs, np.float64))
        when = torch.from_numpy(np.asarray(self.targets, np.float64))
        w = self.const("weights", lambda: _weight(t[lo], t[hi], when).numpy()[None, :, None])
        out = raw.index_select(1, self.const("left", lambda: lo)).mul_(1.0 - w)
        out += raw.index_select(1, self.const("right", lambda: hi)).mul_(w)
        return out


def _weight(t_left: torch.Tensor, t_right: torch.Tensor, when: torch.Tensor) -> torch.Tensor:
    """The weight of the later observation when interpolating at ``when`` (float64 days) between
    observations at ``t_left`` and ``t_right``, clipped to [0, 1], float32; where the two are one
    observation (span 0) either weight gives its value exactly."""
    return ((when - t_left) / (t_right - t_left).clamp_min(1e-300)).clamp_(0.0, 1.0).to(torch.float32)


def _gapfill_sparse(
    raw: torch.Tensor, valid: torch.Tensor, gaps: _Gaps, overwrite: bool = False
) -> torch.Tensor | None:
    """:func:`_gapfill` that touches only the values that need their pixel's own observations.

    Every pixel is first interpolated between the observations around each target as if all were
    valid (:meth:`_Gaps.shared`: no work at all when the targets are the acquisitions); then only
    the (pixel, target) pairs next to an invalid observation are interpolated again, between that
    pixel's valid observations (with 10 % clouds a date and the targets on acquisitions, a tenth of
    the values). Identical bit for bit to the general path: where both observations around a target
    are valid it picks them with the same weight. None when the general path is cheaper.
    """
    nb_pix, nb_obs, nb_bands = raw.shape
    nb_dates = len(gaps.targets)
    # a target's value needs the observations it is interpolated from (one when it falls on one)
    on_acquisitions = np.array_equal(gaps.lo, gaps.hi)
    # the shared interpolation costs about as much as the general path when the targets fall
    # between acquisitions: worth it only when few values are redone (each invalid observation
    # spoils up to two targets); on acquisitions it is a copy, worth it up to about half the values
    # (measured: bench/gapfill.py, docs/benchmarks.md)
    if not on_acquisitions and 16 * int(valid.numel() - valid.sum()) > valid.numel():
        return None
    if on_acquisitions and nb_dates == nb_obs and np.array_equal(gaps.lo, np.arange(nb_obs)):
        ok = valid
    else:
        ok = valid.index_select(1, gaps.const("left", lambda: gaps.lo))
        if not on_acquisitions:
            ok = ok & valid.index_select(1, gaps.const("right", lambda: gaps.hi))
    redo = (~ok).reshape(-1).nonzero().squeeze(1)  # pixel * nb_dates + target
    if (8 if not on_acquisitions else 2) * redo.numel() > nb_pix * nb_dates:
        return None
    out = gaps.shared(raw)
    if redo.numel() == 0:
        return out
    if out is raw and not (overwrite and raw.is_contiguous()):
        out = raw.clone(memory_format=torch.contiguous_format)  # (the caller's observations stay)
    out.reshape(nb_pix * nb_dates, nb_bands).index_copy_(
        0, redo, gaps.fill(raw, valid, redo // nb_dates, redo % nb_dates)
    )
    return out
