"""sitsflow's neural-network bank (iota2's ``torch_nn_bank``).

Public API::

    Iota2NeuralNetwork                 # base class of built-in and user networks
    LTAEClassifier, ANN, MLPClassifier, SimpleSelfAttentionClassifier, TempCNN, InceptionTime
    NETWORKS                           # dl_name -> class
    build_network(dl_name, dl_parameters, *, module_source=None, module_uri=None,
                  nb_dates, nb_components, nb_classes, dates, stats, sensor)
    save_model(network, description) -> bytes
    load_model(data, *, module_source=None, module_uri=None) -> (network, description)
    read_dl_module(uri) -> text of the configured dl_module (the only code a model runs)
    predict_proba(network, x, *, batch_size=None, device=None, form='inference') -> (N, nb_classes) float32
    Predictor(network, *, device=None, ...)   # .proba(x), .classify(x, codes): the inference stage's
    inference_form(network)            # the folded network of the same function (LTAE, ANN, MLP,
                                       # TempCNN, InceptionTime)

See docs/networks.md.
"""

from sitsflow.nn.attention import SimpleSelfAttentionClassifier
from sitsflow.nn.base import FRAMEWORK_ARGS, Iota2NeuralNetwork
from sitsflow.nn.inception import InceptionTime
from sitsflow.nn.inference_form import inference_form
from sitsflow.nn.ltae import LTAEClassifier, LTAEEncoder
from sitsflow.nn.mlp import ANN, MLPClassifier
from sitsflow.nn.modelfile import fingerprint, load_model, module_sha256, read_model_file, save_model
from sitsflow.nn.predict import Predictor, auto_batch_size, predict_proba, resolve_device
from sitsflow.nn.registry import (
    NETWORKS,
    build_network,
    check_dl_parameters,
    network_parameters,
    read_dl_module,
    resolve_network,
)
from sitsflow.nn.tempcnn import TempCNN

__all__ = [
    "ANN",
    "FRAMEWORK_ARGS",
    "NETWORKS",
    "Predictor",
    "InceptionTime",
    "Iota2NeuralNetwork",
    "LTAEClassifier",
    "LTAEEncoder",
    "MLPClassifier",
    "SimpleSelfAttentionClassifier",
    "TempCNN",
    "auto_batch_size",
    "build_network",
    "check_dl_parameters",
    "fingerprint",
    "inference_form",
    "load_model",
    "module_sha256",
    "network_parameters",
    "predict_proba",
    "read_dl_module",
    "read_model_file",
    "resolve_device",
    "resolve_network",
    "save_model",
]
