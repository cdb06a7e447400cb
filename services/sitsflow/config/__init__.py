"""sitsflow's configuration: iota2's ``.cfg`` syntax, checked into frozen pydantic models.

>>> cfg = load_config("config.cfg", ["arg_train.deep_learning_parameters.epochs=3"])
>>> cfg.chain.tiles, cfg.dl.epochs, cfg.dl.hyperparameter_pairs()

The reference of every key is ``docs/configuration.md``.
"""

from __future__ import annotations

from sitsflow.config.loader import load_config, parse_override
from sitsflow.config.models import (
    BUILTIN_NETWORKS,
    SECTION_MODELS,
    ArgClassificationSection,
    ArgTrainSection,
    ChainSection,
    DatedRasterSection,
    DeepLearningParameters,
    ExternalFeaturesSection,
    HyperparametersSolver,
    PythonDataManagingSection,
    SitsflowConfig,
    TrainingOptions,
)

__all__ = [
    "BUILTIN_NETWORKS",
    "SECTION_MODELS",
    "ArgClassificationSection",
    "ArgTrainSection",
    "ChainSection",
    "DatedRasterSection",
    "DeepLearningParameters",
    "ExternalFeaturesSection",
    "HyperparametersSolver",
    "PythonDataManagingSection",
    "SitsflowConfig",
    "TrainingOptions",
    "load_config",
    "parse_override",
]
