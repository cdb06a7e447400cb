"""Batched inference: ``predict_proba``."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from sitsflow.device import choose
from sitsflow.errors import BadInputError
from sitsflow.features.compute import RawFeatures
from sitsflow.log import get_logger
from sitsflow.nn.base import Iota2NeuralNetwork

log = get_logger(__name__)

#: Bounds of the automatic batch size.
MIN_BATCH, MAX_BATCH_CPU, MAX_BATCH_CUDA = 64, 16384, 1 << 18
#: Share of the free device memory the automatic batch size may use.
CUDA_MEMORY_SHARE = 0.5
PROBABILITY_SCALE = 1000
"""Probability maps hold each class's probability (0-1) times it, rounded (iota2's 0-1000 scale)."""
CPU_MEMORY_BUDGET = 8 * 1024 * 1024  # bytes of the largest activation tensor of a CPU batch (cache-sized)
#: ``SITSFLOW_COMPILE`` choices -> (compile?, torch.compile mode); "auto" = compiled on CUDA only.
COMPILE_CHOICES = {
    "auto": (None, None),
    "1": (True, None),
    "0": (False, None),
    "max": (True, "max-autotune-no-cudagraphs"),
}


Features = np.ndarray | torch.Tensor | RawFeatures
"""What a :class:`Predictor` classifies: features, or observations as read."""


def _torch_dtype(a: np.ndarray | torch.Tensor) -> torch.dtype:
    return a.dtype if isinstance(a, torch.Tensor) else torch.from_numpy(np.empty(0, a.dtype)).dtype


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


def activation_floats_per_pixel(
    network: Iota2NeuralNetwork, probe: int = 4, module: torch.nn.Module | None = None
) -> int:
    """The largest output of any module of ``network`` (or of ``module``, a form of it), in float
    values per pixel.

    Measured with forward hooks on a ``probe``-pixel zero batch, on the network's device, in eval
    mode (the training mode is restored).
    """
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    largest_shape = (network.nb_dates, network.nb_components)
    largest = [network.nb_dates * network.nb_components]
    measured: torch.nn.Module = module if module is not None else network

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            largest.append(output.numel() // probe)

    handles = [m.register_forward_hook(hook) for m in measured.modules()]
    was_training = measured.training
    try:
        measured.eval()
        with torch.inference_mode():
            measured(torch.zeros((probe, *map(int, largest_shape)), device=device))
    finally:
        for h in handles:
            h.remove()
        measured.train(was_training)
    return max(*largest, int(getattr(measured, "floats_per_pixel", 0)))


def auto_batch_size(network: Iota2NeuralNetwork, device: torch.device, module: torch.nn.Module | None = None) -> int:
    """A batch size that fits the device.

    CUDA: a 256-pixel probe of the training form measures the peak memory per pixel (an upper
    bound for the inference form); the batch takes
    ``CUDA_MEMORY_SHARE`` of the free memory. CPU: the largest activation tensor of a batch of
    ``module`` (the form that will run; the network when None) (``activation_floats_per_pixel``,
    float32) is kept to ``CPU_MEMORY_BUDGET`` (and a quarter of
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
    per_pixel = activation_floats_per_pixel(network, module=module) * 4
    budget = CPU_MEMORY_BUDGET
    try:
        budget = min(budget, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
    except (ValueError, OSError, AttributeError):
        pass
    return int(max(MIN_BATCH, min(MAX_BATCH_CPU, budget // per_pixel)))


def _env_choice(name: str, allowed: tuple[str, ...], default: str) -> str:
    text = os.environ.get(name, "").strip().lower() or default
    if text not in allowed:
        raise BadInputError(f"{name} must be one of {', '.join(allowed)}, got {text!r}")
    return text


class Predictor:
    """Classifies pixel time series with the inference form of a network, batch by batch.

    Built once per model and reused for every part of a chunk. On the CPU the form runs in float32
    (the machines here have no fast bf16); on CUDA it runs under bfloat16 autocast, compiled with
    ``torch.compile`` (``SITSFLOW_COMPILE``: ``auto`` = on CUDA only, ``1``, ``0``, with a dynamic
    batch dimension, so that one compiled graph serves parts of every size; ``max``: Inductor's
    ``max-autotune-no-cudagraphs`` mode on one static batch shape, every batch padded to
    ``batch_size``: faster kernels for a one-time tuning of about 25 s); inputs go
    through reused pinned host buffers and are copied on a side stream while the previous batch
    computes; labels, confidences and probabilities are made on the device and only they come back.

    Args:
        network: a sitsflow network (moved to ``device``).
        device: "cpu", "cuda", "cuda:K"; CUDA when available when None.
        batch_size: pixels per batch; chosen from the device's memory when None.
        form: "inference" (folded, see :mod:`sitsflow.nn.inference_form`) or "reference" (the
            training form, under ``torch.inference_mode``).
        precision: "fp32" or "bf16"; bf16 on CUDA, fp32 on the CPU when None.
        compile: wrap the form in ``torch.compile``; from ``SITSFLOW_COMPILE`` when None; "max"
            as ``SITSFLOW_COMPILE=max``.
    """

    def __init__(
        self,
        network: Iota2NeuralNetwork,
        *,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        form: str = "inference",
        precision: str | None = None,
        compile: bool | str | None = None,
    ) -> None:
        from sitsflow.nn.inference_form import inference_form

        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise BadInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if form not in ("inference", "reference"):
            raise BadInputError(f"form must be 'inference' or 'reference', got {form!r}")
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        self.precision = precision or ("bf16" if cuda else "fp32")
        if self.precision not in ("fp32", "bf16"):
            raise BadInputError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if compile is None or isinstance(compile, str):
            choice = _env_choice("SITSFLOW_COMPILE", tuple(COMPILE_CHOICES), "auto") if compile is None else compile
            if choice not in COMPILE_CHOICES:
                raise BadInputError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
            wanted, mode = COMPILE_CHOICES[choice]
            compile = cuda if wanted is None else wanted
        else:
            mode = None
        self.network = network
        self.nb_dates, self.nb_components = network.nb_dates, network.nb_components
        self.nb_classes = network.nb_classes
        network.to(self.device)
        module = inference_form(network) if form == "inference" else network.eval()
        self.batch_size = batch_size or auto_batch_size(network, self.device, module if not cuda else None)
        self.module = module
        self.compiled = False
        #: every batch is padded to ``batch_size`` (one static shape for the tuned kernels)
        self.static = bool(compile) and mode is not None
        run: Callable[..., torch.Tensor] = module
        if compile:
            try:
                mode_kw: dict[str, Any] = {"mode": mode} if mode else {}
                run = torch.compile(module, dynamic=not self.static, **mode_kw)
                self.compiled = True
            except Exception as exc:  # noqa: BLE001 - a missing compiler must not stop the stage
                log.warning("torch.compile unavailable (%s): running eagerly", exc)
        self._run = run
        self._pinned: list[list[torch.Tensor]] = []
        self._pinned_layout: tuple[list, int] | None = None
        #: the device failed to compute features of observations as read: the host computes them
        self._host_features = False
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        #: seconds spent copying inputs to the device, computing features of observations as read
        #: (:class:`~sitsflow.features.compute.RawFeatures`) and running the network (CUDA: measured
        #: on the device with events, so overlapping copies and computations are each counted whole)
        self.seconds = {"copy_s": 0.0, "features_s": 0.0, "compute_s": 0.0}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        """Time a step into ``self.seconds[key]`` (on CUDA with events on the current stream)."""
        if self.device.type != "cuda":
            tic = time.perf_counter()
            yield
            self.seconds[key] += time.perf_counter() - tic
            return
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events.append((key, start, end))

    def _collect(self) -> None:
        """Add up the CUDA events of the finished batches."""
        for key, start, end in self._events:
            end.synchronize()
            self.seconds[key] += start.elapsed_time(end) / 1000.0
        self._events.clear()

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self._run(batch)
        return self._run(batch)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Probabilities (float32) of one batch already on the device (at most ``batch_size`` pixels)."""
        m = int(batch.shape[0])
        if self.static and m < self.batch_size:  # one shape for the statically compiled kernels
            batch = torch.cat([batch, batch.new_zeros((self.batch_size - m, *batch.shape[1:]))])
        try:
            logits = self._logits(batch)
        except BadInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch.compile compiles at the first call
            if not self.compiled:
                raise
            log.warning("torch.compile failed (%s: %s): running eagerly", type(exc).__name__, exc)
            self._run, self.compiled = self.module, False
            logits = self._logits(batch)
        return torch.softmax(logits[:m].float(), dim=1)

    def _batches(self, x: Features):
        """Yield (start, stop, batch on the device, float32 features).

        ``x``'s pixels go to the device as they are: float32 features, or observations as read
        (:class:`~sitsflow.features.compute.RawFeatures`: the files' integers and valid flags),
        whose features the device computes, batch by batch."""
        n, size = int(x.shape[0]), self.batch_size
        raw = isinstance(x, RawFeatures)
        if self.device.type != "cuda":
            for start in range(0, n, size):
                stop = min(n, start + size)
                if isinstance(x, RawFeatures):
                    yield self._prepared(x, start, stop, [torch.from_numpy(a) for a in x.arrays(start, stop)])
                    continue
                chunk = x[start:stop]
                batch = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(chunk))
                yield start, stop, batch.float()
            return

        def arrays(start: int, stop: int) -> list[np.ndarray | torch.Tensor]:
            return list(x.arrays(start, stop)) if isinstance(x, RawFeatures) else [x[start:stop]]

        # CUDA: two sets of pinned host buffers, copies on a side stream overlap the previous batch's compute
        rows = size if self.static else min(size, n)  # a small call does not pin a whole batch
        first = arrays(0, min(n, 1))
        layout = [(tuple(a.shape[1:]), _torch_dtype(a) if raw else torch.float32) for a in first]
        if self._pinned_layout is None or self._pinned_layout[0] != layout or self._pinned_layout[1] < rows:
            self._pinned = [
                [torch.empty((rows, *shape), dtype=dtype, pin_memory=True) for shape, dtype in layout] for _ in range(2)
            ]
            self._pinned_layout = (layout, rows)
        stream = self._copy_stream
        assert stream is not None
        ready: list[torch.cuda.Event | None] = [None, None]
        pending = None
        current = torch.cuda.current_stream(self.device)
        for k, start in enumerate(range(0, n, size)):
            stop = min(n, start + size)
            slot = k % 2
            event = ready[slot]
            if event is not None:
                event.synchronize()  # the copy that last used these host buffers is done
            hosts = [buffer[: stop - start] for buffer in self._pinned[slot]]
            for host, src in zip(hosts, arrays(start, stop)):
                host.copy_(src if isinstance(src, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(src)))
            with torch.cuda.stream(stream), self._timed("copy_s"):
                devs = [host.to(self.device, non_blocking=True) for host in hosts]
            with torch.cuda.stream(stream):
                event = torch.cuda.Event()
                event.record(stream)
            ready[slot] = event
            if pending is not None:
                yield self._prepared(x, *pending)
            current.wait_event(event)
            for dev in devs:
                dev.record_stream(current)
            pending = (start, stop, devs)
        if pending is not None:
            yield self._prepared(x, *pending)

    def _prepared(self, x: Features, start: int, stop: int, devs: list[torch.Tensor]) -> tuple[int, int, torch.Tensor]:
        """A batch's tensors on the device -> (start, stop, its float32 features there)."""
        if not isinstance(x, RawFeatures):
            return start, stop, devs[0]
        with self._timed("features_s"):
            if not self._host_features:
                try:
                    # conversion, same-day merges, gap filling, indices, on the device
                    return start, stop, x.compute(devs)
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError as exc:  # an operation this device lacks (for these data types)
                    log.warning(
                        "the features cannot be computed on %s (%s: %s): the host computes them",
                        self.device,
                        type(exc).__name__,
                        exc,
                    )
                    self._host_features = True
            return start, stop, x.features(start, stop).to(self.device)

    def _check(self, x: Features) -> None:
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.nb_dates, self.nb_components):
            raise BadInputError(
                f"predict_proba expects pixels shaped (N, {self.nb_dates}, {self.nb_components}), got {tuple(x.shape)}"
            )

    def proba(self, x: Features) -> np.ndarray:
        """(N, nb_dates, nb_components), NaN = missing (or observations as read) -> (N, nb_classes)
        float32 probabilities."""
        self._check(x)
        out = np.empty((int(x.shape[0]), self.nb_classes), dtype=np.float32)
        with torch.inference_mode():
            for start, stop, batch in self._batches(x):
                with self._timed("compute_s"):
                    p = self.forward(batch)
                out[start:stop] = p.cpu().numpy()
        self._collect()
        return out

    def classify(
        self, x: Features, codes: np.ndarray | Sequence[int], *, probabilities: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Labels, confidence and (optionally) probabilities of N pixels, made on the device.

        Args:
            x: (N, nb_dates, nb_components) features (NaN = missing), or N pixels' observations as
                read (:class:`~sitsflow.features.compute.RawFeatures`: their features are computed
                on the device).
            codes: (nb_classes,) class codes in the order of the network's outputs.
            probabilities: also return the probabilities in iota2's 0-1000 scale.

        Returns:
            labels (N,) uint16 (the codes), confidence (N,) float32 (the largest probability),
            probabilities (nb_classes, N) uint16 or None.
        """
        self._check(x)
        n = int(x.shape[0])
        labels = np.empty(n, np.uint16)
        confidence = np.empty(n, np.float32)
        probas = np.empty((self.nb_classes, n), np.uint16) if probabilities else None
        table = torch.as_tensor(np.asarray(codes, dtype=np.int32), device=self.device)
        with torch.inference_mode():
            for start, stop, batch in self._batches(x):
                with self._timed("compute_s"):
                    p = self.forward(batch)
                    conf, best = p.max(dim=1)
                # 2 bytes a value come back, not 4: int16 on the device (every device has it), the
                # same 16 bits read as uint16 here (codes up to 65535; probabilities 0-1000)
                labels[start:stop] = table[best].to(torch.int16).cpu().numpy().view(np.uint16)
                confidence[start:stop] = conf.cpu().numpy()
                if probas is not None:
                    probas[:, start:stop] = (
                        torch.round(p.T * PROBABILITY_SCALE).to(torch.int16).cpu().numpy().view(np.uint16)
                    )
        self._collect()
        return labels, confidence, probas


def predict_proba(
    network: Iota2NeuralNetwork,
    x: np.ndarray | torch.Tensor,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    form: str = "inference",
) -> np.ndarray:
    """Class probabilities of pixel time series.

    Runs the inference form of the network (:mod:`sitsflow.nn.inference_form`; ``form="reference"``
    runs the training form) in eval mode under ``torch.inference_mode``, batch by batch; on CUDA
    with bfloat16 autocast, on the CPU in float32 (see :class:`Predictor`, which the inference stage
    builds once per model; this function builds one per call and never compiles). The network is
    moved to ``device`` (and stays there); its training mode is restored afterwards.

    Args:
        network: a sitsflow network.
        x: (N, nb_dates, nb_components), numpy (any real dtype; NaN = missing) or a tensor.
        batch_size: pixels per batch; chosen from the device's memory when None.
        device: "cpu", "cuda", "cuda:K" ...; CUDA when available when None.
        form: "inference" or "reference".

    Returns:
        (N, nb_classes) float32 probabilities (softmax of the logits; rows sum to 1).
    """
    if x.ndim != 3 or tuple(x.shape[1:]) != (network.nb_dates, network.nb_components):
        raise BadInputError(
            f"predict_proba expects pixels shaped (N, {network.nb_dates}, {network.nb_components}), "
            f"got {tuple(x.shape)}"
        )
    was_training = network.training
    try:
        predictor = Predictor(network, device=device, batch_size=batch_size, form=form, compile=False)
        if int(x.shape[0]) == 0:
            return np.empty((0, network.nb_classes), dtype=np.float32)
        log.debug(
            "predict_proba: %d pixels on %s, batches of %d", int(x.shape[0]), predictor.device, predictor.batch_size
        )
        return predictor.proba(x)
    finally:
        network.train(was_training)
