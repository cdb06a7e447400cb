"""The torch device of training and inference, and the check that a pod given a GPU can use it.

On Kubernetes, the WorkflowTemplate tells the GPU stages how many GPUs their pod requested
(``SITSFLOW_GPUS``, from the resource block's ``nb_gpu``). A pod that was given a GPU but whose
torch cannot use CUDA (a CPU build of torch in the image, a node driver older than the CUDA build
needs, no device visible to the container) fails with exit 2 and a message naming the problem,
instead of running for hours on the CPU. Outside Kubernetes (``sitsflow run``, tests) CUDA is used
when available, else the CPU.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, TypeVar

from sitsflow.errors import BadInputError

if TYPE_CHECKING:  # torch is imported where a device is chosen, not with this module
    import torch

_Device = TypeVar("_Device")


def gpus_given() -> int:
    """GPUs this pod was given: ``SITSFLOW_GPUS`` inside a Kubernetes pod, else 0.

    Raises:
        BadInputError: ``SITSFLOW_GPUS`` is not a whole number.
    """
    raw = os.environ.get("SITSFLOW_GPUS", "").strip()
    if not raw or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return 0
    if not raw.isdigit():
        raise BadInputError(f"SITSFLOW_GPUS={raw!r}: expected the number of GPUs of the pod (0, 1)")
    return int(raw)


def cuda_problem() -> str | None:
    """Why torch cannot use CUDA here, or None when it can."""
    import torch

    if torch.version.cuda is None:
        return (
            f"this image's torch {torch.__version__} is a CPU build: use the gpu image "
            "(the Dockerfile's gpu target, workflow parameter gpu-image)"
        )
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - torch's message names the driver/runtime problem
        return (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot initialise CUDA: {exc} "
            "(the node's NVIDIA driver must support this CUDA version, and the GPU must be visible "
            "to the container: NVIDIA device plugin, NVIDIA_VISIBLE_DEVICES; see docs/deploy.md)"
        )
    if torch.cuda.device_count() == 0:
        return (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: none is visible "
            "to the container (NVIDIA device plugin, NVIDIA_VISIBLE_DEVICES)"
        )
    return None


def choose(device: _Device | None = None) -> _Device | torch.device:
    """The torch device to train or infer on: ``device`` when given, else CUDA when the pod was
    given a GPU (checked: exit 2 naming the problem when it cannot be used) or when available
    outside Kubernetes, else the CPU.

    Raises:
        BadInputError: the pod was given a GPU that torch cannot use.
    """
    import torch

    if device is not None:
        return device
    if gpus_given() > 0:
        problem = cuda_problem()
        if problem is not None:
            raise BadInputError(f"this step was given {gpus_given()} GPU(s) but {problem}")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
