"""The validated configuration: frozen pydantic models, one per section.

Instances are built by :func:`sitsflow.config.load_config`, which checks every value itself and
reports every problem at once (key path, value given, what is allowed, file and line). The models
hold normalised values only: absolute paths or ``s3://`` URIs, dates as ``YYYYMMDD`` integers,
tuples instead of lists. Assigning an attribute raises.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sitsflow.config.syntax import format_key, format_value
from sitsflow.config.resources import ResourcesSection

BUILTIN_NETWORKS: tuple[str, ...] = (
    "LTAEClassifier",
    "ANN",
    "MLPClassifier",
    "SimpleSelfAttentionClassifier",
)
"""The networks of iota2's ``torch_nn_bank.py`` that ``dl_name`` may name without ``dl_module``."""


class _Section(BaseModel):
    """Base of every section: immutable, no unknown attribute, one docstring per field."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ChainSection(_Section):
    """The ``chain`` section: where the inputs are and where the outputs go."""

    output_path: str
    """Root of every output (local folder or ``s3://bucket/prefix``), iota2's output tree."""
    list_tile: str
    """The tiles to process, iota2 style: names separated by spaces (``"T31TCJ T31TDJ"``)."""
    ground_truth: str
    """Reference polygons (a vector file readable by OGR) with the class code in ``data_field``."""
    data_field: str
    """Name of the integer attribute of ``ground_truth`` that holds the class codes."""
    region_path: str | None = None
    """Optional vector file of eco-climatic regions: one model is trained per region."""
    region_field: str = "region"
    """Attribute of ``region_path`` (and of the samples) holding the region number."""
    nomenclature_path: str | None = None
    """Optional text file ``name:code`` per line, naming the classes in reports."""
    color_table: str | None = None
    """Optional text file ``code R G B`` per line, for the colour-indexed final map."""
    s2_path: str | None = None
    """Folder of Sentinel-2 THEIA L2A products, one sub-folder per tile (``{s2_path}/T31TCJ/``)
    holding one folder per acquisition (``SENTINEL2A_YYYYMMDD-..._L2A_T31TCJ_...``)."""
    s2_l3a_path: str | None = None
    """Folder of Sentinel-2 THEIA L3A monthly syntheses, one sub-folder per tile."""
    s2_s2c_path: str | None = None
    """Folder of Sentinel-2 Sen2Cor L2A products (``.SAFE`` folders), one sub-folder per tile."""
    l8_path: str | None = None
    """Folder of Landsat 8 THEIA L2A products, one sub-folder per tile."""

    @property
    def tiles(self) -> tuple[str, ...]:
        """The tile names of ``list_tile``, in the order given."""
        return tuple(self.list_tile.split())


class DatedRasterSection(_Section):
    """The ``dated_raster`` section: the generic dated-raster sensor.

    One raster per tile (``path``, where ``{tile}`` is replaced by the tile name) stacks
    ``len(dates) * len(bands)`` bands, date-major: all bands of the first date, then the next date.
    """

    name: str = "generic"
    """Sensor key used in feature names (``{name}_{band}_{YYYYMMDD}``) and statistics."""
    path: str
    """Path pattern of the raster of each tile; ``{tile}`` is replaced by the tile name."""
    bands: tuple[str, ...]
    """Band (component) names in the order they are stacked for each date, e.g. ``("ndvi",)``."""
    dates: Literal["descriptions"] | tuple[int, ...] | str = "descriptions"
    """Acquisition dates: ``"descriptions"`` (read from the raster's band descriptions), a tuple of
    YYYYMMDD integers (one per date, increasing), or the path of a ``.json`` (list of strings)
    or ``.txt`` (one date per line) file."""
    scale: float = 1.0
    """Raw values are multiplied by ``scale`` (e.g. 0.0001 for reflectances stored as int16)."""
    nodata: float | None = None
    """Raw value meaning "no data" (such pixels are invalid at that date); None: none."""
    mask_path: str | None = None
    """Optional path pattern (with ``{tile}``) of a validity mask raster: one band per date,
    nonzero = invalid (cloud, shadow, saturation, edge)."""
    start_date: int | None = None
    """First date (YYYYMMDD) of the gap-filling grid and of the dates used; None: first date."""
    end_date: int | None = None
    """Last date (YYYYMMDD) of the gap-filling grid and of the dates used; None: last date."""
    temporal_resolution: int = 10
    """Interval in days of the regular date grid the series are gap-filled onto."""

    @property
    def dates_kind(self) -> Literal["descriptions", "list", "file"]:
        """How the dates are given: "descriptions", "list" (``dates`` is a tuple) or "file"."""
        if isinstance(self.dates, tuple):
            return "list"
        return "descriptions" if self.dates == "descriptions" else "file"


class OpticalSensorSection(_Section):
    """An iota2 sensor section (``Sentinel_2``, ``Sentinel_2_L3A``, ``Sentinel_2_S2C``,
    ``Landsat8``): which dates and bands of the products under the sensor's ``chain`` path are
    used."""

    start_date: int | None = None
    """First date (YYYYMMDD) of the acquisitions used and of the gap-filling grid; None: the first
    acquisition."""
    end_date: int | None = None
    """Last date (YYYYMMDD) of the acquisitions used and of the gap-filling grid; None: the last
    acquisition."""
    keep_bands: tuple[str, ...] | None = None
    """Bands fed to the network, in the sensor's order (e.g. ``["B2", "B3", "B4", "B8"]``); None:
    every band of the sensor. Spectral indices are computed from all bands either way."""
    temporal_resolution: int = 10
    """Interval in days of the regular date grid the series are gap-filled onto (iota2's default:
    10 for Sentinel-2, 16 for Landsat 8)."""


class HyperparametersSolver(_Section):
    """iota2's ``hyperparameters_solver``: the lists of batch sizes and learning rates to try."""

    batch_size: tuple[int, ...] = (1000,)
    """Batch sizes to try (each >= 1)."""
    learning_rate: tuple[float, ...] = (0.00001,)
    """Learning rates to try (each > 0)."""


class DeepLearningParameters(_Section):
    """``arg_train.deep_learning_parameters``: the 17 parameters of iota2's deep-learning mode."""

    dl_name: str
    """Available neural network's architecture (class name), currently 'LTAEClassifier', 'ANN',
    'MLPClassifier' or 'SimpleSelfAttentionClassifier'; with ``dl_module``, a class of that
    module."""
    dl_parameters: dict[str, Any] = Field(default_factory=dict)
    """Set of key/value to create the neural network instance (constructor parameters)."""
    model_selection_criterion: Literal["loss", "fscore", "oa", "kappa"] = "loss"
    """Select the model which maximizes one of these metrics computed on the validation set during
    the training process: "loss", "fscore", "oa", "kappa" (for "loss": the lowest loss)."""
    epochs: int = 100
    """Number of epochs for the learning stage."""
    weighted_labels: bool = False
    """Apply weights to samples according to the proportion of each class in the computation of the
    loss function (weight of a class = 1 / its proportion in the learning + validation database)."""
    num_workers: int = 1
    """How many sub-processes to use for data loading. 0 means that the data will be loaded in the
    main process."""
    hyperparameters_solver: HyperparametersSolver = Field(default_factory=HyperparametersSolver)
    """Key/value of hyperparameters to use to build models: one model per
    (batch_size, learning_rate) pair of the product of the two lists."""
    dl_module: str | None = None
    """Path to a user python module containing custom neural networks (classes derived from
    Iota2NeuralNetwork)."""
    restart_from_checkpoint: bool = True
    """If existing, restart learning from the checkpoint (saved after each epoch)."""
    dataloader_mode: Literal["stream", "full"] = "stream"
    """During the learning stage, load the full data-set into memory ('full') or by batch
    ('stream')."""
    enable_early_stop: bool = False
    """Flag to enable early stop during learning phase."""
    epoch_to_trigger: int = 5
    """Epoch number after which the monitoring of the metric trend starts."""
    early_stop_patience: int = 10
    """Number of epochs without improvement after which training will be stopped."""
    early_stop_tol: float = 0.01
    """Minimum change in the monitored quantity to qualify as an improvement. If the metric is
    'train_loss' or 'val_loss' the tolerance is in dB: dB = log10(loss_{N-1} / loss_N), with N the
    current epoch (the previous epoch, not the best so far); for scores: value_N - value_{N-1}."""
    early_stop_metric: Literal["train_loss", "val_loss", "fscore", "oa", "kappa"] = "val_loss"
    """Metric to monitor for early stopping (iota2's 'valid_loss' is read as 'val_loss')."""
    additional_statistics_percentage: float | None = None
    """Percentage ]0;1] of samples to use from the incoming database to compute quantiles
    (quantile_0.1, quantile_0.5, quantile_0.95); None: no quantiles."""
    adaptive_lr: dict[str, Any] = Field(default_factory=dict)
    """Allow the use of adaptive learning rate across epochs: keyword arguments of PyTorch's
    ReduceLROnPlateau (patience, factor, threshold, threshold_mode, cooldown, min_lr, eps, verbose),
    which monitors the validation loss (mode 'min') with the training optimizer. {}: disabled."""

    def hyperparameter_pairs(self) -> list[tuple[int, float]]:
        """The (batch_size, learning_rate) pairs to train, in hyperparameter-number order.

        ``itertools.product(batch_size, learning_rate)``: the batch size varies slowest, so the
        index of a pair in this list is the ``hyp`` number of its model
        (``model_{region}_seed_{seed}_hyp_{hyp}.txt``). With ``batch_size: [1000]`` and
        ``learning_rate: [0.1, 0.00001]``, hyp 0 is (1000, 0.1) and hyp 1 is (1000, 0.00001).
        """
        solver = self.hyperparameters_solver
        return list(itertools.product(solver.batch_size, solver.learning_rate))


class ArgTrainSection(_Section):
    """The ``arg_train`` section: sample split and training."""

    runs: int = 1
    """Number of random learning/test splits (seeds); each gives a full classification."""
    ratio: float = 0.5
    """Fraction of the reference polygons of each (region, class) used for learning + validation;
    the rest is the test set."""
    random_seed: int = 0
    """Seed of the first split; run ``r`` uses ``random_seed + r``."""
    features_from_raw_dates: bool = False
    """Feed the networks the raw acquisition dates instead of the gap-filled regular date grid."""
    features: tuple[str, ...] = ("NDVI", "NDWI", "Brightness")
    """Spectral indices computed per date for the optical sensors (Sentinel-2, Landsat 8) after
    their bands, among "NDVI", "NDWI", "Brightness"; [] turns them off. Not applied to
    dated_raster."""
    deep_learning_parameters: DeepLearningParameters
    """The deep-learning parameters (a section)."""


class ArgClassificationSection(_Section):
    """The ``arg_classification`` section."""

    enable_probability_map: bool = False
    """Write a probability raster per chunk and tile (one band per class)."""
    generate_final_probability_map: bool = False
    """Merge the probability rasters into ``final/ProbabilityMap_seed_{s}.tif`` (0-1000); requires
    ``enable_probability_map``."""


class PythonDataManagingSection(_Section):
    """The ``python_data_managing`` section: how tiles are cut into chunks for inference."""

    chunk_size_mode: Literal["split_number", "user_fixed"] = "split_number"
    """'split_number': ``number_of_chunks`` full-width horizontal strips; 'user_fixed': a grid of
    ``chunk_size_x`` x ``chunk_size_y`` pixel blocks."""
    number_of_chunks: int = 50
    """Number of strips per tile in 'split_number' mode."""
    chunk_size_x: int = 50
    """Block width in pixels in 'user_fixed' mode."""
    chunk_size_y: int = 50
    """Block height in pixels in 'user_fixed' mode."""


class ExternalFeaturesSection(_Section):
    """The optional ``external_features`` section: user functions adding per-date features."""

    module: str
    """Path of the user's Python module (.py) defining the functions."""
    functions: tuple[tuple[str, dict[str, Any]], ...]
    """The functions to call, in order, each as (name, keyword arguments)."""
    concat_mode: bool = True
    """True: the new features are appended to the sensor's bands; False: they replace them."""


SECTION_MODELS: dict[str, type[_Section]] = {
    "chain": ChainSection,
    "dated_raster": DatedRasterSection,
    "Sentinel_2": OpticalSensorSection,
    "Sentinel_2_L3A": OpticalSensorSection,
    "Sentinel_2_S2C": OpticalSensorSection,
    "Landsat8": OpticalSensorSection,
    "arg_train": ArgTrainSection,
    "arg_classification": ArgClassificationSection,
    "python_data_managing": PythonDataManagingSection,
    "external_features": ExternalFeaturesSection,
    "resources": ResourcesSection,
}
"""Top-level sections, in the order they are written."""


def _write_section(lines: list[str], name: str, values: dict[str, Any], depth: int) -> None:
    pad = "    " * depth
    lines.append(f"{pad}{format_key(name)} : {{")
    for key, value in values.items():
        if isinstance(value, dict) and key in _NESTED_SECTIONS:
            _write_section(lines, key, value, depth + 1)
        else:
            lines.append(f"{pad}    {format_key(key)} : {format_value(value)}")
    lines.append(f"{pad}}}")


_NESTED_SECTIONS = {"deep_learning_parameters"}


class SitsflowConfig(_Section):
    """The whole validated configuration.

    Two configurations are equal when all their settings are equal, wherever they were read from
    (``source`` is not compared).
    """

    source: str
    """Where the configuration was read (absolute local path or ``s3://`` URI)."""
    chain: ChainSection
    """The ``chain`` section."""
    dated_raster: DatedRasterSection | None = None
    """The ``dated_raster`` section (the generic dated-raster sensor), None when absent."""
    Sentinel_2: OpticalSensorSection | None = None
    """The ``Sentinel_2`` section (THEIA L2A); defaults apply when ``chain.s2_path`` is set
    without it; None when the sensor is not used."""
    Sentinel_2_L3A: OpticalSensorSection | None = None
    """The ``Sentinel_2_L3A`` section (THEIA L3A syntheses), as ``Sentinel_2``."""
    Sentinel_2_S2C: OpticalSensorSection | None = None
    """The ``Sentinel_2_S2C`` section (Sen2Cor L2A), as ``Sentinel_2``."""
    Landsat8: OpticalSensorSection | None = None
    """The ``Landsat8`` section (THEIA L2A), as ``Sentinel_2``."""
    arg_train: ArgTrainSection
    """The ``arg_train`` section, ``deep_learning_parameters`` included."""
    arg_classification: ArgClassificationSection = Field(default_factory=ArgClassificationSection)
    """The ``arg_classification`` section."""
    python_data_managing: PythonDataManagingSection = Field(
        default_factory=PythonDataManagingSection
    )
    """The ``python_data_managing`` section."""
    external_features: ExternalFeaturesSection | None = None
    """The ``external_features`` section, None when absent."""
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    """iota2's per-step resource blocks (``sitsflow.config.resources``): the pods' requests."""

    @property
    def dl(self) -> DeepLearningParameters:
        """Shortcut for ``arg_train.deep_learning_parameters``."""
        return self.arg_train.deep_learning_parameters

    def section_dict(self, name: str) -> dict[str, Any]:
        """A JSON-able dict of one section (``"chain"``, ``"arg_train"``, ...), for fingerprints.

        ``"arg_train.deep_learning_parameters"`` (or ``"deep_learning_parameters"``) gives the
        deep-learning parameters alone. An absent ``external_features`` section gives ``{}``.
        """
        if name in ("deep_learning_parameters", "arg_train.deep_learning_parameters"):
            return self.dl.model_dump(mode="json")
        if name not in SECTION_MODELS:
            raise KeyError(
                f"no configuration section {name!r}; sections: {', '.join(SECTION_MODELS)}"
            )
        section = getattr(self, name)
        return {} if section is None else section.model_dump(mode="json")

    def to_cfg(self) -> str:
        """The full resolved configuration (defaults included) in iota2's cfg syntax.

        :func:`sitsflow.config.load_config` of this text gives an equal configuration.
        """
        lines = [f"# sitsflow resolved configuration, read from {self.source}"]
        for name in SECTION_MODELS:
            section = getattr(self, name)
            if section is None:
                continue
            _write_section(lines, name, section.model_dump(mode="json"), 0)
        return "\n".join(lines) + "\n"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SitsflowConfig):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in SECTION_MODELS)

    def __hash__(self) -> int:
        return hash(self.to_cfg().split("\n", 1)[1])
