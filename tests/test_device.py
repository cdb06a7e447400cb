"""A GPU step given a GPU that torch cannot use fails with exit 2 naming the problem."""

from __future__ import annotations

import pytest
import torch

from sitsflow import device
from sitsflow.errors import BadInputError


def test_outside_kubernetes_the_device_is_chosen_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("SITSFLOW_GPUS", "1")  # `sitsflow run` passes the template's value too
    assert device.gpus_given() == 0
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.choose().type == expected
    assert device.choose("cpu") == "cpu"  # an explicit device wins


def test_a_cpu_pod_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("SITSFLOW_GPUS", "0")  # nb_gpu : 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.choose().type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is unusable")
def test_a_pod_given_a_gpu_it_cannot_use_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("SITSFLOW_GPUS", "1")
    problem = device.cuda_problem()
    assert problem is not None
    if torch.version.cuda is None:
        assert "CPU build" in problem and "gpu image" in problem
    with pytest.raises(BadInputError, match=r"given 1 GPU\(s\) but"):
        device.choose()
    from sitsflow.nn.predict import resolve_device

    with pytest.raises(BadInputError, match="GPU"):
        resolve_device(None)  # inference's path


def test_bad_gpu_count_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("SITSFLOW_GPUS", "one")
    with pytest.raises(BadInputError, match="SITSFLOW_GPUS='one'"):
        device.gpus_given()


def test_the_code_version_is_part_of_every_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    from sitsflow import __version__, manifest

    monkeypatch.delenv("SITSFLOW_REVISION", raising=False)
    assert manifest.code_version() == __version__
    before = manifest.fingerprint({"epochs": 3})
    monkeypatch.setenv("SITSFLOW_REVISION", "1a2b3c4")  # an image built from other code
    assert manifest.code_version() == f"{__version__}+1a2b3c4"
    assert manifest.fingerprint({"epochs": 3}) != before
    monkeypatch.setattr("sitsflow.manifest.__version__", "9.9.9")
    monkeypatch.delenv("SITSFLOW_REVISION")
    assert manifest.fingerprint({"epochs": 3}) != before
