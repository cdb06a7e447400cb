"""The training stage: ``run(cfg, region, seed, hyp) -> dict`` trains one candidate model.

See :mod:`sitsflow.training.stage` for the stage, :mod:`sitsflow.training.data` for the sample
database readers (``load_samples`` accepts NetCDF, Parquet and CSV), and
:mod:`sitsflow.training.early_stop` for the early-stop rules.
"""

from sitsflow.training.data import SampleSet, class_weights, load_samples, split_learn_validation
from sitsflow.training.early_stop import EarlyStopping
from sitsflow.training.metrics import CRITERIA, CRITERION_COLUMN
from sitsflow.training.stage import run, train

__all__ = [
    "CRITERIA",
    "CRITERION_COLUMN",
    "EarlyStopping",
    "SampleSet",
    "class_weights",
    "load_samples",
    "run",
    "split_learn_validation",
    "train",
]
