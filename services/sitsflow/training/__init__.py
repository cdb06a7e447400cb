"""The training stage: ``run(cfg, region, seed, hyp) -> dict`` trains one candidate model.

See :mod:`sitsflow.training.stage` for the stage, :mod:`sitsflow.samples` for the sample
database (``load_samples`` accepts NetCDF, Parquet and CSV), :mod:`sitsflow.training.data` for
the learning/validation split and the class weights, and :mod:`sitsflow.training.early_stop` for
the early-stop rules.
"""

from sitsflow.samples import SampleSet, load_samples
from sitsflow.training.data import class_weights, split_learn_validation
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
