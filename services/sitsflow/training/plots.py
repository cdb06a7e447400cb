"""The two training figures iota2 draws next to each model (matplotlib, Agg backend), and the
per-epoch history table (Parquet)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "train_loss_db",
    "val_loss_db",
    "oa",
    "kappa",
    "fscore",
    "precision",
    "recall",
    "lr",
    "seconds",
)
"""Columns of ``model_R_seed_S_hyp_H_history.parquet``, one row per epoch (epochs from 1)."""


def loss_db(loss: float) -> float:
    """A loss in decibels relative to a loss of 1: ``10 * log10(loss)`` (NaN when loss <= 0)."""
    return 10.0 * math.log10(loss) if loss > 0 and math.isfinite(loss) else float("nan")


def _figure_png(draw: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    ax = fig.add_subplot(1, 1, 1)
    draw(ax)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def loss_plot(history: Sequence[dict[str, float]], title: str, selected_epoch: int | None) -> bytes:
    """PNG of the training and validation loss in dB (``10 log10(loss)``, re. a loss of 1) per epoch."""
    epochs = [row["epoch"] for row in history]

    def draw(ax: Any) -> None:
        ax.plot(epochs, [row["train_loss_db"] for row in history], "o-", label="training loss")
        ax.plot(epochs, [row["val_loss_db"] for row in history], "s-", label="validation loss")
        if selected_epoch is not None:
            ax.axvline(selected_epoch, color="grey", ls="--", label=f"selected epoch ({selected_epoch})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy loss (dB = 10 log10(loss))")
        ax.legend(loc="best")

    return _figure_png(draw)


def metrics_plot(history: Sequence[dict[str, float]], title: str, selected_epoch: int | None) -> bytes:
    """PNG of the validation kappa, OA, macro precision, recall and F-score per epoch."""
    epochs = [row["epoch"] for row in history]

    def draw(ax: Any) -> None:
        # distinct markers and line styles keep coinciding curves visible (e.g. OA = macro recall
        # when the validation classes are balanced)
        series = (
            ("kappa", "kappa", "o", "-"),
            ("oa", "overall accuracy", "s", "--"),
            ("precision", "precision (macro)", "^", "-."),
            ("recall", "recall (macro)", "v", ":"),
            ("fscore", "F-score (macro)", "D", "-"),
        )
        for key, label, marker, style in series:
            ax.plot(
                epochs,
                [row[key] for row in history],
                marker=marker,
                ls=style,
                label=label,
                markersize=5,
                markerfacecolor="none",
            )
        if selected_epoch is not None:
            ax.axvline(selected_epoch, color="grey", ls="--", label=f"selected epoch ({selected_epoch})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation score")
        ax.legend(loc="best")

    return _figure_png(draw)


def history_parquet(history: Sequence[dict[str, float]]) -> bytes:
    """Parquet bytes of the per-epoch history (columns :data:`HISTORY_COLUMNS`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {
        col: pa.array([row[col] for row in history], type=pa.int32() if col == "epoch" else pa.float64())
        for col in HISTORY_COLUMNS
    }
    buf = io.BytesIO()
    pq.write_table(pa.table(arrays), buf)
    return buf.getvalue()


def read_history(data: bytes) -> list[dict[str, float]]:
    """Rows of a history Parquet file (inverse of :func:`history_parquet`)."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data)).to_pylist()
