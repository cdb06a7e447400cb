"""Batched inference: ``predict_proba``."""

from __future__ import annotations

import os

import numpy as np
import torch

from sitsflow.device import choose
from sitsflow.errors import BadInputError
from sitsflow.log import get_logger
from sitsflow.nn.base import Iota2NeuralNetwork

log = get_logger(__name__)

#: Bounds of the automatic batch size.
MIN_BATCH, MAX_BATCH_CPU, MAX_BATCH_CUDA = 64, 16384, 1 << 20
#: Share of the free device memory the automatic batch size may use.
CUDA_MEMORY_SHARE = 0.5
CPU_MEMORY_BUDGET = 8 * 1024 * 1024  # bytes of the largest activation tensor of a CPU batch (cache-sized)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> :func:`sitsflow.device.choose` (CUDA when available, else the CPU); anything
    else is checked."""
    if device is None:
        return choose()  # CUDA when available; a pod given a GPU it cannot use fails (exit 2)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BadInputError(f"device {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1' ...): {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {device!r} asked for, but this machine has no CUDA device")
    return dev


def activation_floats_per_pixel(network: Iota2NeuralNetwork, probe: int = 4) -> int:
    """The largest output of any module of ``network``, in float values per pixel.

    Measured with forward hooks on a ``probe``-pixel zero batch, on the network's device, in eval
    mode (the training mode is restored).
    """
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    largest = [network.nb_dates * network.nb_components]

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            largest.append(output.numel() // probe)

    handles = [m.register_forward_hook(hook) for m in network.modules()]
    was_training = network.training
    try:
        network.eval()
        with torch.inference_mode():
            network(torch.zeros((probe, network.nb_dates, network.nb_components), device=device))
    finally:
        for h in handles:
            h.remove()
        network.train(was_training)
    return max(largest)


def auto_batch_size(network: Iota2NeuralNetwork, device: torch.device) -> int:
    """A batch size that fits the device.

    CUDA: a 256-pixel probe measures the peak memory per pixel; the batch takes
    ``CUDA_MEMORY_SHARE`` of the free memory. CPU: the largest activation tensor of a batch
    (``activation_floats_per_pixel``, float32) is kept to ``CPU_MEMORY_BUDGET`` (and a quarter of
    the available RAM): batches whose tensors stay in the caches run fastest on CPUs.
    """
    shape = (network.nb_dates, network.nb_components)
    if device.type == "cuda":
        probe = 256
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        was_training = network.training
        try:
            network.eval()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                network(torch.zeros((probe, *shape), device=device))
        finally:
            network.train(was_training)
        torch.cuda.synchronize(device)
        per_pixel = max(1, (torch.cuda.max_memory_allocated(device) - before) // probe)
        free, _ = torch.cuda.mem_get_info(device)
        size = int(CUDA_MEMORY_SHARE * free // per_pixel)
        return int(max(256, min(MAX_BATCH_CUDA, size // 256 * 256)))
    per_pixel = activation_floats_per_pixel(network) * 4
    budget = CPU_MEMORY_BUDGET
    try:
        budget = min(budget, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
    except (ValueError, OSError, AttributeError):
        pass
    return int(max(MIN_BATCH, min(MAX_BATCH_CPU, budget // per_pixel)))


def predict_proba(
    network: Iota2NeuralNetwork,
    x: np.ndarray | torch.Tensor,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Class probabilities of pixel time series.

    Runs in eval mode under ``torch.inference_mode``, batch by batch; on CUDA with bfloat16
    autocast, on the CPU in float32. The network is moved to ``device`` (and stays there); its
    training mode is restored afterwards.

    Args:
        network: a sitsflow network.
        x: (N, nb_dates, nb_components), numpy (any real dtype; NaN = missing) or a tensor.
        batch_size: pixels per batch; chosen from the device's memory when None.
        device: "cpu", "cuda", "cuda:K" ...; CUDA when available when None.

    Returns:
        (N, nb_classes) float32 probabilities (softmax of the logits; rows sum to 1).
    """
    if x.ndim != 3 or tuple(x.shape[1:]) != (network.nb_dates, network.nb_components):
        raise BadInputError(
            f"predict_proba expects pixels shaped (N, {network.nb_dates}, {network.nb_components}), "
            f"got {tuple(x.shape)}"
        )
    dev = resolve_device(device)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise BadInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = int(x.shape[0])
    out = np.empty((n, network.nb_classes), dtype=np.float32)
    if n == 0:
        return out
    was_training = network.training
    network.to(dev)
    network.eval()
    try:
        size = batch_size or auto_batch_size(network, dev)
        log.debug("predict_proba: %d pixels on %s, batches of %d", n, dev, size)
        pin = dev.type == "cuda"
        with torch.inference_mode():
            for start in range(0, n, size):
                stop = min(n, start + size)
                if isinstance(x, torch.Tensor):
                    batch = x[start:stop]
                else:
                    batch = torch.from_numpy(np.ascontiguousarray(x[start:stop]))
                if pin and batch.device.type == "cpu":
                    batch = batch.pin_memory()
                batch = batch.to(dev, non_blocking=pin).float()
                if dev.type == "cuda":
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        logits = network(batch)
                else:
                    logits = network(batch)
                probs = torch.softmax(logits.float(), dim=1)
                out[start:stop] = probs.cpu().numpy()
    finally:
        network.train(was_training)
    return out
