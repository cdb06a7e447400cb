"""``SimpleSelfAttentionClassifier``: a small Transformer encoder over the dates of a pixel."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sitsflow.nn._layers import check, check_probability
from sitsflow.nn.base import Iota2NeuralNetwork, sinusoid_table


class SimpleSelfAttentionClassifier(Iota2NeuralNetwork):
    """Full self-attention between the dates, then mean pooling.

    (batch, nb_dates, nb_components) -> normalize_input -> Linear(nb_components -> d_model) per
    date + sinusoidal encoding of the day offsets (size d_model, period T) -> n_layers pre-norm
    Transformer encoder layers (n_head heads, feed-forward dim_feedforward, GELU, dropout) ->
    LayerNorm -> mean over the dates (batch, d_model) -> Linear(nb_classes) -> logits.

    Unlike the L-TAE (one master query per head, O(T) attention), every date attends to every
    other one (O(T^2)): more expressive, slower on long series.

    Args:
        d_model: width of the per-date embedding (64).
        n_head: attention heads (4); must divide d_model.
        n_layers: number of encoder layers (2).
        dim_feedforward: hidden width of each layer's feed-forward block (128).
        dropout: dropout inside the encoder layers (0.1).
        T: period of the positional encoding of the day offsets (1000).
        default_mean, default_std: statistics fallbacks (see Iota2NeuralNetwork).
    """

    def __init__(
        self,
        *,
        nb_dates: int,
        nb_components: int,
        nb_classes: int,
        dates: Sequence[int],
        stats: Mapping[str, Mapping[str, Any]],
        sensor: str,
        default_mean: float = 0.0,
        default_std: float = 1.0,
        d_model: int = 64,
        n_head: int = 4,
        n_layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
        T: float = 1000.0,
    ) -> None:
        super().__init__(
            nb_dates=nb_dates,
            nb_components=nb_components,
            nb_classes=nb_classes,
            dates=dates,
            stats=stats,
            sensor=sensor,
            default_mean=default_mean,
            default_std=default_std,
        )
        name = type(self).__name__
        check(d_model > 0, name, "d_model", f"must be > 0, got {d_model}")
        check(n_head > 0 and d_model % n_head == 0, name, "n_head", f"must divide d_model={d_model}, got {n_head}")
        check(n_layers > 0, name, "n_layers", f"must be > 0, got {n_layers}")
        check(dim_feedforward > 0, name, "dim_feedforward", f"must be > 0, got {dim_feedforward}")
        dropout = check_probability(dropout, name, "dropout")
        check(T > 0, name, "T", f"must be > 0, got {T}")
        self.embedding = torch.nn.Linear(nb_components, d_model)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(
                d_model,
                n_head,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(n_layers)
        )
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, nb_classes)
        self.register_buffer("positional", sinusoid_table(self.day_offsets, d_model, T), persistent=False)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, nb_dates, nb_components) -> logits (batch, nb_classes)."""
        h = self.embedding(self.normalize_input(x)) + self.positional.to(x.dtype)  # (B, T, d_model)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(dim=1))
