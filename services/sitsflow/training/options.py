"""sitsflow's training options (``arg_train.training_options``) at work in the training loop.

:class:`TrainingExtras` is built once per candidate by :func:`sitsflow.training.stage.train` and
gives the loop its optimizer, the learning rate of each step, the training loss, the epoch's
sample order ('full' mode), and the transformation of each training batch (class-balanced
redrawing in 'stream' mode, then augmentation). Its defaults change nothing: Adam, a constant
learning rate, the plain (weighted) cross-entropy, a uniform permutation and unchanged batches.

Randomness (augmentation, balanced draws) comes from the generator the stage already uses for
the batch order, which the checkpoint saves: a resumed run draws the same numbers. Validation
never sees augmentation (``evaluate`` does not call :meth:`TrainingExtras.batch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from sitsflow.config import TrainingOptions

ONE_CYCLE_DIV = 25.0
"""One-cycle: the first learning rate is lr / 25 (PyTorch's ``div_factor``)."""
ONE_CYCLE_FINAL_DIV = 1e4
"""One-cycle: the last one is lr / (25 * 1e4) (PyTorch's ``final_div_factor``)."""


def fingerprint_part(options: TrainingOptions) -> dict[str, Any]:
    """The options that differ from their defaults (``{}`` when none: fingerprints of runs without
    options stay those of earlier versions, so nothing retrains for nothing)."""
    return options.model_dump(mode="json", exclude_defaults=True)


def lr_factor(options: TrainingOptions, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate of step ``step`` (0-based) as a fraction of the candidate's learning rate.

    Args:
        options: the training options (``lr_schedule``, ``warmup_epochs``).
        step: the optimizer step, counted from the first step of epoch 1.
        total_steps: steps of the whole training (``epochs * steps_per_epoch``).
        steps_per_epoch: batches of one epoch.
    """
    warmup = options.warmup_epochs * steps_per_epoch
    total = max(total_steps, 1)
    if options.lr_schedule == "one_cycle":
        start, end = 1.0 / ONE_CYCLE_DIV, 1.0 / (ONE_CYCLE_DIV * ONE_CYCLE_FINAL_DIV)
        rise = max(warmup - 1.0, 1.0)  # PyTorch's OneCycleLR: the peak at step pct_start * total - 1
        if step <= rise:
            return _cos(start, 1.0, step / rise)
        return _cos(1.0, end, min(1.0, (step - rise) / max(total - 1 - rise, 1.0)))
    if step < warmup:
        return (step + 1) / warmup
    if options.lr_schedule == "cosine":
        return _cos(1.0, 0.0, min(1.0, (step - warmup) / max(total - warmup, 1.0)))
    return 1.0


def _cos(a: float, b: float, progress: float) -> float:
    """Cosine interpolation from ``a`` (progress 0) to ``b`` (progress 1)."""
    return b + (a - b) * (1.0 + math.cos(math.pi * progress)) / 2.0


class TrainingExtras:
    """The training options of one candidate, ready for the loop.

    Args:
        options: ``arg_train.training_options``.
        learning_rate: the candidate's learning rate (the schedule's peak).
        epochs: ``deep_learning_parameters.epochs``.
        steps_per_epoch: training batches of an epoch.
        learn_labels: class indices of the learning samples (balanced sampling's class counts).
        nb_classes: number of classes.
        stats: the training statistics ``{key: (nb_dates * nb_components,)}`` (noise scale: ``var``).
        nb_dates, nb_components: the series' shape.
        stream: the data loader mode is 'stream' (balanced sampling redraws each batch).
    """

    def __init__(
        self,
        options: TrainingOptions,
        *,
        learning_rate: float,
        epochs: int,
        steps_per_epoch: int,
        learn_labels: np.ndarray,
        nb_classes: int,
        stats: Mapping[str, Any],
        nb_dates: int,
        nb_components: int,
        stream: bool,
    ) -> None:
        self.options = options
        self.learning_rate = float(learning_rate)
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.total_steps = int(epochs) * self.steps_per_epoch
        self.stream = stream
        counts = np.bincount(np.asarray(learn_labels, dtype=np.int64), minlength=nb_classes).astype(np.float64)
        # weight of a sample = 1 / count of its class (classes absent from the learning set: 0)
        self.class_weight = torch.from_numpy(np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0))
        std = np.zeros(nb_dates * nb_components)
        if options.gaussian_noise > 0 and "var" in stats:
            var = np.asarray(stats["var"], dtype=np.float64).reshape(-1)
            std = np.where(np.isfinite(var) & (var > 0), np.sqrt(np.where(var > 0, var, 0.0)), 0.0)
        self.noise_std = torch.from_numpy(std.astype(np.float32)).reshape(nb_dates, nb_components)

    # ------------------------------------------------------------------ optimisation
    def optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Adam (iota2's), or AdamW with ``weight_decay`` when it is > 0."""
        if self.options.weight_decay > 0:
            return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.options.weight_decay)
        return torch.optim.Adam(params, lr=self.learning_rate)

    def clip(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Scale the gradients of ``params`` down to the L2 norm ``gradient_clip`` (0: nothing)."""
        if self.options.gradient_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.options.gradient_clip)

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate changes per step (a schedule or a warm-up is set)."""
        return self.options.lr_schedule != "constant" or self.options.warmup_epochs > 0

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based, from the first step of epoch 1)."""
        return self.learning_rate * lr_factor(self.options, step, self.total_steps, self.steps_per_epoch)

    def set_lr(self, optimizer: torch.optim.Optimizer, epoch: int, index: int) -> None:
        """Set the learning rate of batch ``index`` (0-based) of epoch ``epoch`` (1-based); nothing
        without a schedule."""
        if not self.scheduled:
            return
        lr = self.lr_at((epoch - 1) * self.steps_per_epoch + index)
        for group in optimizer.param_groups:
            group["lr"] = lr

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The training loss: cross-entropy with the class ``weights`` and the label smoothing ε.

        Each sample's loss is ``(1 - ε)·(-log p_y) + ε·mean_k(-log p_k)``; with class weights it is
        weighted by its own class's weight: ``sum_i w_{y_i}·l_i / sum_i w_{y_i}`` (PyTorch's
        weighted mean). PyTorch's ``cross_entropy(weight=, label_smoothing=)`` weights the
        smoothing term of class k by ``w_k`` instead, on every sample: with inverse-frequency
        weights the rarest class's large weight then rewards a high probability of that class on
        every sample, and the network predicted it everywhere (docs/training.md, Slovenia W11).
        Without weights or without smoothing this is exactly PyTorch's loss.
        """
        eps = self.options.label_smoothing
        if weights is None or eps == 0:
            return torch.nn.functional.cross_entropy(logits, y, weight=weights, label_smoothing=eps)
        log_p = torch.log_softmax(logits, dim=1)
        per_sample = -(1.0 - eps) * log_p.gather(1, y.unsqueeze(1)).squeeze(1) - eps * log_p.mean(dim=1)
        w = weights.to(per_sample.dtype)[y]
        return (w * per_sample).sum() / w.sum()

    # ------------------------------------------------------------------ data
    def epoch_order(self, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """'full' mode: the epoch's sample order: a permutation, or with balanced sampling as many
        draws with replacement, each sample weighted by 1 / count of its class."""
        n = int(targets.shape[0])
        if not self.options.balanced_sampling:
            return torch.randperm(n, generator=generator)
        weights = self.class_weight[targets]
        return torch.multinomial(weights, n, replacement=True, generator=generator)

    def batch(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch (CPU) through balanced redrawing ('stream' mode) and augmentation."""
        opts = self.options
        if opts.balanced_sampling and self.stream and y.numel() > 1:
            take = torch.multinomial(self.class_weight[y], y.numel(), replacement=True, generator=generator)
            x, y = x[take], y[take]
        if opts.time_shift or opts.date_dropout or opts.gaussian_noise:
            x = self.augment(x, generator)
        return x, y

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Temporal shift, date dropout, then Gaussian noise, as configured (a new tensor).

        Args:
            x: (batch, nb_dates, nb_components) float, NaN = missing.
            generator: the source of every random number.
        """
        opts = self.options
        b, t, _ = x.shape
        x = x.clone()
        if opts.time_shift:
            shift = torch.randint(-opts.time_shift, opts.time_shift + 1, (b, 1), generator=generator)
            source = torch.arange(t).unsqueeze(0) - shift  # out[:, d] = x[:, d - shift]
            inside = (source >= 0) & (source < t)
            index = source.clamp(0, t - 1).unsqueeze(-1).expand_as(x)
            x = torch.gather(x, 1, index)
            x[~inside] = float("nan")
        if opts.date_dropout:
            x[torch.rand((b, t), generator=generator) < opts.date_dropout] = float("nan")
        if opts.gaussian_noise:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = x + opts.gaussian_noise * self.noise_std.to(x.dtype) * noise
        return x
