"""Checks before work: what ``prepare`` (and ``run``, before its first task) validates without data.

``run(cfg)`` finds, in a second or two and without reading a pixel or a polygon, the mistakes that
would otherwise surface hours later in a stage:

1. the nomenclature and the colour table: readable, no code or name given twice, every class of
   the nomenclature has a colour (``sitsflow.reference.check_class_files``);
2. the network: ``dl_module`` readable and importable, ``dl_name`` a class of it (or a built-in)
   derived from ``Iota2NeuralNetwork``, ``dl_parameters`` accepted by its constructor;
3. every tile has its inputs and a grid (``sitsflow.features.check_tile_grids``): the sensors
   share a CRS, or ``chain.proj`` is a CRS the tile's footprint reprojects into and the target
   grid of ``chain.proj`` / ``chain.spatial_resolution`` is sane; planning uses the same grid;
4. the network *builds and runs* on a dummy input of the configured shape: the first tile's
   features are laid out from the inputs' metadata (file names, raster headers: the date axis
   after gap-filling or the raw dates, and the components of one date: bands, indices,
   external features), exactly as sampling will lay them out; the classes are those of the
   nomenclature (at least 2; 2 without a nomenclature, the ground truth being data); statistics
   are dummies with the keys training computes (min, max, mean, var, and the quantiles when
   ``additional_statistics_percentage`` is set) under every sensor key. A batch of 2 random
   series goes through ``forward`` in eval mode, and the logits must be (2, nb_classes);
5. the ``strategy.byclass.in`` files of ``arg_train.sample_selection``: readable, one
   ``class count`` line per class (``sitsflow.sampling.strategies.read_byclass``).

Every failure is bad input (exit 2) naming the culprit; nothing is written.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

from sitsflow.errors import ConfigError, SitsflowError
from sitsflow.log import get_logger

log = get_logger(__name__)

#: Batch size of the dummy forward pass.
DUMMY_BATCH = 2


def _network_shape(cfg: Any) -> dict[str, Any]:
    """The first tile's feature layout from the inputs' metadata (no pixel is read)."""
    from sitsflow.features import FeaturePipeline

    pipe = FeaturePipeline(cfg, cfg.chain.tiles[0])
    return {
        "tile": cfg.chain.tiles[0],
        "dates": list(pipe.dates),
        "nb_components": len(pipe.components),
        "sensor": pipe.sensor,
        "sensors": list(pipe.sensor_keys),
    }


def _dummy_stats(cfg: Any, size: int, sensors: list[str]) -> dict[str, dict[str, Any]]:
    import torch

    from sitsflow.samples import QUANTILES

    stats = {"min": -torch.ones(size), "max": torch.ones(size), "mean": torch.zeros(size), "var": torch.ones(size)}
    if cfg.dl.additional_statistics_percentage is not None:
        stats |= {f"quantile_{q}": torch.full((size,), float(q)) for q in QUANTILES}
    return {key: stats for key in dict.fromkeys(sensors)}


def check_network(cfg: Any, shape: dict[str, Any], nb_classes: int) -> dict[str, Any]:
    """Build ``cfg.dl``'s network on ``shape`` and run a dummy batch through it.

    Returns:
        ``{"network", "parameters", "nb_dates", "nb_components", "nb_classes"}``.

    Raises:
        ConfigError: the network cannot be built, or its forward pass fails or returns logits of
            another shape (the user's file and line named when the failure is in a dl_module).
    """
    import torch

    from sitsflow import nn
    from sitsflow.nn.registry import DL_NAME_KEY, user_line

    dl = cfg.dl
    source = nn.read_dl_module(dl.dl_module)
    dates = shape["dates"]
    size = len(dates) * shape["nb_components"]
    shape_text = f"{len(dates)} dates x {shape['nb_components']} components, {nb_classes} classes"
    try:
        network = nn.build_network(
            dl.dl_name,
            dl.dl_parameters,
            module_source=source,
            module_uri=dl.dl_module,
            nb_dates=len(dates),
            nb_components=shape["nb_components"],
            nb_classes=nb_classes,
            dates=dates,
            stats=_dummy_stats(cfg, size, shape["sensors"]),
            sensor=shape["sensor"],
        )
    except ConfigError:
        raise
    except SitsflowError as exc:  # framework arguments refused by the network's constructor
        raise ConfigError(f"{DL_NAME_KEY}: network {dl.dl_name} cannot be built for {shape_text}: {exc}") from None
    where = f" ({dl.dl_module})" if source is not None else ""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((DUMMY_BATCH, len(dates), shape["nb_components"]), generator=generator)
    network.eval()
    try:
        with torch.no_grad():
            logits = network(x)
    except Exception as exc:  # a network's forward may fail in any way
        line = user_line(exc, dl.dl_module or "<dl_module>") if source is not None else ""
        raise ConfigError(
            f"{DL_NAME_KEY}: network {dl.dl_name}{where} fails on a dummy batch of {shape_text} (the first "
            f"tile's layout){line}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (DUMMY_BATCH, nb_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(
            f"{DL_NAME_KEY}: network {dl.dl_name}{where} returns {got} for a batch of {DUMMY_BATCH} series of "
            f"{shape_text}; expected logits shaped (batch, nb_classes) = ({DUMMY_BATCH}, {nb_classes})"
        )
    return {
        "network": dl.dl_name,
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "nb_dates": len(dates),
        "nb_components": shape["nb_components"],
        "nb_classes": nb_classes,
    }


def run(cfg: Any) -> dict[str, Any]:
    """Validate everything that can be validated without data (see the module docstring).

    Returns a JSON-able summary; raises a ``BadInputError`` (exit 2) for the first problem found.
    """
    from sitsflow import nn
    from sitsflow.features import check_tile_grids
    from sitsflow.reference import check_class_files
    from sitsflow.sampling.strategies import byclass_tables

    tic = time.monotonic()
    names, colors = check_class_files(cfg.chain.nomenclature_path, cfg.chain.color_table)
    byclass_tables(cfg.arg_train.sample_selection)
    # stdout carries prepare's JSON: whatever a user's module prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        # the network's class and parameters first: configuration mistakes before any input is opened
        source = nn.read_dl_module(cfg.dl.dl_module)
        cls = nn.resolve_network(cfg.dl.dl_name, source, cfg.dl.dl_module)
        nn.check_dl_parameters(cls, cfg.dl.dl_parameters, cfg.dl.dl_name)
        check_tile_grids(cfg)
        shape = _network_shape(cfg)
        nb_classes = max(2, len(names))
        network = check_network(cfg, shape, nb_classes)
    summary = {**network, "colours": len(colors), "seconds": round(time.monotonic() - tic, 2)}
    log.info(
        "checks before work passed in %.1f s: network %s builds and runs on %d dates x %d components (tile %s), "
        "%d classes (%d parameters)",
        summary["seconds"],
        network["network"],
        network["nb_dates"],
        network["nb_components"],
        shape["tile"],
        nb_classes,
        network["parameters"],
    )
    return summary


__all__ = ["check_network", "run"]
