"""Inference forms of the built-in networks: the same function, folded for speed.

A trained network (the *training form*, the reference, what model files hold) is turned into an
*inference form* that maps the same raw input — pixels ``(batch, nb_dates, nb_components)``,
float, NaN (or ±inf) = missing — to the same logits with fewer operations and far smaller
intermediate tensors. Every fold is exact algebra (fp64 forms agree to rounding; the tests bound the
fp32 and bf16 differences); nothing is retrained and model files do not change.

* **Input normalisation.** Missing values are imputed with the mean and standardised to exactly 0,
  so ``standardise then zero the non-finite`` is what every form does first (as the training form
  does under ``torch.inference_mode``).
* **BatchNorm** (eval mode: fixed statistics) is folded into the preceding ``Linear``; dropout is
  the identity.
* **L-TAE** (:class:`FoldedLTAE`): the per-date embedding ``z = W x + b`` (d_model wide) is never
  materialised. With ``x~ = [x, 1]`` (C + 1 values per date):

  - the LayerNorm mean is a linear map of ``x~``, so ``z - mean(z) = Wc x~``;
  - the LayerNorm variance ``|Wc x~|^2 / d`` is a quadratic form of ``x~``: with
    ``Q = Wc^T Wc / d = R R^T`` (eigen-decomposition, C + 1 squares instead of d);
  - the attention scores of the folded master queries (``q_h^T W_k e / sqrt(d_k)``) are
    ``(S x~) / sigma_t + c_t``: the LayerNorm's scale folded into S, its shift, the positional
    encoding of each date and the key bias into a per-date constant ``c_t``;
  - each head's output ``sum_t a_th e_th`` is ``gamma_h * (Wc_h g_h) + beta_h + sum_t a_th P_th``
    with ``g_h = sum_t (a_th / sigma_t) x~_t``: C + 1 values aggregated per head instead of
    d_model / n_head, then one small map;
  - the MLP's BatchNorm and the LayerNorm shift are folded into the next ``Linear``.

  The largest tensor per pixel is then ``nb_dates x (n_head + C + 1)`` values instead of
  ``nb_dates x d_model``, and the operation count drops about fourfold (36 dates x 10 bands,
  defaults: about 75 k multiply-adds per pixel instead of about 300 k).

* **TempCNN** (:class:`FoldedTempCNN`) and **InceptionTime** (:class:`FoldedInceptionTime`): each
  BatchNorm is folded into the convolution (or Linear) before it, per output channel
  (``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``). In an inception
  module the BatchNorm follows the concatenation of the four branches: each branch's convolution
  takes its slice of the channels. The convolutions pad with zeros and the BatchNorm acts after
  them, so the fold is exact at the series' ends too.

Other networks (the self-attention classifier, users' networks) have no fold here: their inference
form is the network itself, run under ``torch.inference_mode`` (whose normalisation is already
fused).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import cast

import torch

from sitsflow.nn.base import Iota2NeuralNetwork
from sitsflow.nn.inception import InceptionModule, InceptionTime, Shortcut, run_stack
from sitsflow.nn.ltae import LTAEClassifier
from sitsflow.nn.mlp import ANN, MLPClassifier
from sitsflow.nn.tempcnn import TempCNN


class NormalizedInput(torch.nn.Module):
    """Standardise with the training statistics; missing values become 0 (= imputed with the mean).

    (batch, T, C) raw -> (batch, T, C) in the dtype of the form.
    """

    mean: torch.Tensor  # buffers
    inv_std: torch.Tensor

    def __init__(self, network: Iota2NeuralNetwork) -> None:
        super().__init__()
        stats = network._stats[network.sensor]
        probe = torch.empty(0, dtype=torch.float64)
        mean = network._mean_grid(stats["mean"].double(), probe, network.default_mean)
        std = network._std_grid(torch.sqrt(stats["var"].double()), probe, network.default_std)
        self.register_buffer("mean", mean)
        self.register_buffer("inv_std", 1.0 / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, T, C) -> standardised (batch, T, C), finite."""
        out = (x.to(self.mean.dtype) - self.mean).mul_(self.inv_std)  # in place: one new tensor, not three
        return out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def fold_linear_bn(linear: torch.nn.Linear, bn: torch.nn.BatchNorm1d | None) -> torch.nn.Linear:
    """``bn(linear(x))`` as one Linear (BatchNorm in eval mode: its running statistics), in fp64."""
    w = linear.weight.detach().double()
    b = linear.bias.detach().double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        # iota2's BatchNorm layers track running statistics (torch's default), which eval mode uses
        assert bn.running_var is not None and bn.running_mean is not None, "BatchNorm without running statistics"
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        w = w * scale[:, None]
        b = (b - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()
    out = torch.nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


def fold_sequential(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Fold each ``Linear`` or ``Conv1d`` with the ``BatchNorm1d`` right after it; drop dropouts;
    keep the rest (a ``ReLU`` after a folded layer works in place: that layer's output is its own)."""
    out: list[torch.nn.Module] = []
    k = 0
    while k < len(modules):
        m = modules[k]
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)):
            nxt = modules[k + 1] if k + 1 < len(modules) else None
            bn = nxt if isinstance(nxt, torch.nn.BatchNorm1d) else None
            out.append(fold_linear_bn(m, bn) if isinstance(m, torch.nn.Linear) else fold_conv_bn(m, bn))
            k += 2 if bn is not None else 1
            continue
        if isinstance(m, torch.nn.ReLU) and out and isinstance(out[-1], (torch.nn.Linear, torch.nn.Conv1d)):
            out.append(torch.nn.ReLU(inplace=True))
        elif not isinstance(m, torch.nn.Dropout):
            out.append(m)
        k += 1
    return out


class FoldedPerceptron(torch.nn.Module):
    """Inference form of ``ANN`` and ``MLPClassifier``: normalisation, then Linear layers with their
    BatchNorm folded in. (batch, T, C) -> logits (batch, nb_classes)."""

    def __init__(self, network: Iota2NeuralNetwork, layers: list[torch.nn.Module]) -> None:
        super().__init__()
        self.normalize = NormalizedInput(network)
        self.layers = torch.nn.Sequential(*fold_sequential(layers)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, T, C) -> logits (batch, nb_classes)."""
        return self.layers(self.normalize(x).flatten(1))


def fold_conv_bn(
    conv: torch.nn.Conv1d, bn: torch.nn.BatchNorm1d | None, channels: slice | None = None
) -> torch.nn.Conv1d:
    """``bn(conv(x))`` as one Conv1d with a bias, in fp64 (BatchNorm in eval mode).

    ``channels``: the slice of ``bn``'s channels that ``conv``'s outputs are (a branch of a
    concatenation); all of them when None. The folded Conv1d keeps ``padding`` and ``dilation``:
    the built-in networks' convolutions have no stride, groups or other padding mode.
    """
    assert conv.stride == (1,) and conv.groups == 1 and conv.padding_mode == "zeros", "unsupported Conv1d"
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        # iota2's BatchNorm layers track running statistics (torch's default), which eval mode uses
        assert bn.running_var is not None and bn.running_mean is not None, "BatchNorm without running statistics"
        part = channels if channels is not None else slice(0, w.shape[0])
        scale = bn.weight.detach().double()[part] / torch.sqrt(bn.running_var.detach().double()[part] + bn.eps)
        w = w * scale[:, None, None]
        b = (b - bn.running_mean.detach().double()[part]) * scale + bn.bias.detach().double()[part]
    out = torch.nn.Conv1d(
        w.shape[1],
        w.shape[0],
        w.shape[2],
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        dtype=torch.float64,
    )  # torch's stubs type Conv1d's padding/dilation as 1-tuples, its attributes as n-tuples
    assert out.bias is not None
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


class FoldedTempCNN(torch.nn.Module):
    """Inference form of ``TempCNN``: normalisation, convolutions and the dense layer with their
    BatchNorm folded in. (batch, T, C) -> logits (batch, nb_classes)."""

    def __init__(self, network: TempCNN) -> None:
        super().__init__()
        self.normalize = NormalizedInput(network)
        self.conv = torch.nn.Sequential(*fold_sequential(list(network.conv))).double()
        self.flatten = network.pooling == "flatten"
        self.head = torch.nn.Sequential(*fold_sequential(list(network.head))).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, T, C) -> logits (batch, nb_classes)."""
        h = self.conv(self.normalize(x).transpose(1, 2))
        return self.head(h.flatten(1) if self.flatten else h.mean(dim=2))


class _FoldedInceptionModule(torch.nn.Module):
    """An inception module whose BatchNorm is folded into its four branch convolutions."""

    def __init__(self, module: InceptionModule) -> None:
        super().__init__()
        bb = module.bottleneck
        self.bottleneck = fold_conv_bn(bb, None) if isinstance(bb, torch.nn.Conv1d) else torch.nn.Identity()
        f = module.pool_conv.out_channels
        self.convs = torch.nn.ModuleList(
            fold_conv_bn(cast(torch.nn.Conv1d, conv), module.bn, slice(i * f, (i + 1) * f))
            for i, conv in enumerate(module.convs)
        )
        n = len(module.convs)
        self.pool = copy.deepcopy(module.pool)
        self.pool_conv = fold_conv_bn(module.pool_conv, module.bn, slice(n * f, (n + 1) * f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, in_channels, T) -> (batch, 4 * filters, T)."""
        z = self.bottleneck(x)
        branches = [conv(z) for conv in self.convs] + [self.pool_conv(self.pool(x))]
        return torch.relu(torch.cat(branches, dim=1))


class FoldedInceptionTime(torch.nn.Module):
    """Inference form of ``InceptionTime``: normalisation, then the modules and the residual
    shortcuts with their BatchNorm folded in. (batch, T, C) -> logits (batch, nb_classes)."""

    def __init__(self, network: InceptionTime) -> None:
        super().__init__()
        self.normalize = NormalizedInput(network)
        self.blocks = torch.nn.ModuleList(_FoldedInceptionModule(cast(InceptionModule, m)) for m in network.blocks)
        shortcuts = [cast(Shortcut, s) for s in network.shortcuts]
        self.shortcuts = torch.nn.ModuleList(fold_conv_bn(s.conv, s.bn) for s in shortcuts)
        self.residual_every = network.residual_every
        self.head = fold_linear_bn(network.head, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, T, C) -> logits (batch, nb_classes)."""
        h = run_stack(self.blocks, self.shortcuts, self.residual_every, self.normalize(x).transpose(1, 2))
        return self.head(h.mean(dim=2))


class FoldedLTAE(torch.nn.Module):
    """Inference form of ``LTAEClassifier`` (see the module's docstring for the algebra).

    (batch, T, C) raw -> logits (batch, nb_classes).
    """

    proj: torch.Tensor  # buffers
    score_bias: torch.Tensor
    head_map: torch.Tensor
    positional: torch.Tensor
    head_bias: torch.Tensor | None

    def __init__(self, network: LTAEClassifier) -> None:
        super().__init__()
        enc = network.encoder
        d, n_head, d_k = enc.d_model, enc.n_head, enc.d_k
        dh = d // n_head
        self.n_head, self.dh = n_head, dh
        c1 = network.nb_components + 1
        #: the largest tensor of the forward pass, in values per pixel (sizes CPU batches)
        self.floats_per_pixel = network.nb_dates * (n_head + c1)
        self.normalize = NormalizedInput(network)
        eps = enc.in_norm.eps
        self.ln_eps = float(eps)

        w_in = torch.cat([enc.inconv.weight.detach().double(), enc.inconv.bias.detach().double()[:, None]], 1)
        wc = w_in - w_in.mean(0, keepdim=True)  # (d, C+1): z - mean(z) = wc @ x~
        gamma = enc.in_norm.weight.detach().double()
        beta = enc.in_norm.bias.detach().double()
        q = wc.T @ wc / d  # (C+1, C+1), PSD: var(z) = x~^T q x~
        lam, vec = torch.linalg.eigh(q)
        r = vec * torch.sqrt(torch.clamp(lam, min=0.0))[None, :]  # var = |x~ @ r|^2

        scale = 1.0 / math.sqrt(d_k)
        w_key = enc.key.weight.detach().double().view(n_head, d_k, d)
        b_key = enc.key.bias.detach().double().view(n_head, d_k)
        query = enc.query.detach().double()
        w_fold = torch.einsum("hk,hkd->hd", query, w_key) * scale  # (H, d)
        b_fold = (query * b_key).sum(1) * scale  # (H,)
        s = (w_fold * gamma[None, :]) @ wc  # (H, C+1): scores = (x~ @ s^T) / sigma + c
        positional = network.positional.detach().double()  # (T, d)
        c = (beta[None, :] + positional) @ w_fold.T + b_fold[None, :]  # (T, H)

        # one matmul gives the raw scores (H columns) and the variance projection (C+1 columns)
        self.register_buffer("proj", torch.cat([s.T, r], 1))  # (C+1, H + C+1)
        self.register_buffer("score_bias", c)  # (T, H)
        self.register_buffer("head_map", (wc * gamma[:, None]).view(n_head, dh, -1))  # (H, dh, C+1)
        self.register_buffer("positional", positional.view(-1, n_head, dh))  # (T, H, dh)

        mlp = fold_sequential(list(enc.mlp))
        first = next(m for m in mlp if isinstance(m, torch.nn.Linear)) if mlp else None
        if first is not None:  # the LayerNorm shift beta reaches the MLP's first Linear unchanged
            with torch.no_grad():
                first.bias.add_(first.weight @ beta)
            self.head_bias = None
        else:
            self.register_buffer("head_bias", beta)
        self.mlp = torch.nn.Sequential(*mlp).double()
        self.out_norm = copy.deepcopy(enc.out_norm).double()
        self.decoder = torch.nn.Sequential(*fold_sequential(list(network.decoder))).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, T, C) raw -> logits (batch, nb_classes)."""
        # the attention runs in the form's own precision even under autocast: it is a small part of
        # the work (C + 1 and n_head wide), and the softmax of low-precision scores flips labels
        with torch.autocast(x.device.type, enabled=False):
            xn = self.normalize(x)
            xt = torch.cat([xn, torch.ones_like(xn[..., :1])], dim=-1)  # (B, T, C+1)
            p = xt @ self.proj  # (B, T, H + C+1)
            raw_scores, var_proj = p[..., : self.n_head], p[..., self.n_head :]
            inv_sigma = torch.rsqrt(var_proj.square().sum(-1, keepdim=True) + self.ln_eps)  # (B, T, 1)
            attn = torch.softmax(raw_scores * inv_sigma + self.score_bias, dim=1)  # (B, T, H)
            g = torch.einsum("bth,btc->bhc", attn * inv_sigma, xt)  # (B, H, C+1)
            heads = torch.einsum("bhc,hjc->bhj", g, self.head_map)
            heads = heads + torch.einsum("bth,thj->bhj", attn, self.positional)
            heads = heads.reshape(x.shape[0], -1)  # (B, d_model)
            if self.head_bias is not None:
                heads = heads + self.head_bias
        return self.decoder(self.out_norm(self.mlp(heads)))


# FOLDS picks these by exact class (inference_form checks it): the asserts only tell the type checker
def _ltae(network: Iota2NeuralNetwork) -> torch.nn.Module:
    assert isinstance(network, LTAEClassifier)
    return FoldedLTAE(network)


def _ann(network: Iota2NeuralNetwork) -> torch.nn.Module:
    assert isinstance(network, ANN)
    layers: list[torch.nn.Module] = [
        network.hidden1,
        network.bnhidden1,
        torch.nn.ReLU(),
        network.hidden2,
        network.bnhidden2,
        torch.nn.ReLU(),
        network.output,
    ]
    return FoldedPerceptron(network, layers)


def _mlp(network: Iota2NeuralNetwork) -> torch.nn.Module:
    assert isinstance(network, MLPClassifier)
    return FoldedPerceptron(network, list(network.layers))


def _tempcnn(network: Iota2NeuralNetwork) -> torch.nn.Module:
    assert isinstance(network, TempCNN)
    return FoldedTempCNN(network)


def _inception(network: Iota2NeuralNetwork) -> torch.nn.Module:
    assert isinstance(network, InceptionTime)
    return FoldedInceptionTime(network)


#: Networks with a folded inference form, by class name (only the exact built-in classes: a user
#: subclass may change ``_forward``).
FOLDS: dict[str, Callable[[Iota2NeuralNetwork], torch.nn.Module]] = {
    "LTAEClassifier": _ltae,
    "ANN": _ann,
    "MLPClassifier": _mlp,
    "TempCNN": _tempcnn,
    "InceptionTime": _inception,
}


def _is_builtin(network: Iota2NeuralNetwork) -> bool:
    from sitsflow.nn.registry import NETWORKS

    cls = NETWORKS.get(type(network).__name__)
    return cls is type(network)


def inference_form(network: Iota2NeuralNetwork, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The inference form of ``network`` (eval mode, on the network's device, in ``dtype``).

    The folds are computed in float64, then cast to ``dtype`` (float64 shows that they are exact).

    Folded for ``LTAEClassifier``, ``ANN``, ``MLPClassifier``, ``TempCNN`` and ``InceptionTime``;
    the network itself otherwise. The
    form is a snapshot: it does not follow later changes of the network's weights.
    """
    fold = FOLDS.get(type(network).__name__)
    if fold is None or not _is_builtin(network):
        return network.eval()
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            form = fold(network.cpu() if device.type != "cpu" else network)
    finally:
        network.to(device)
        network.train(was_training)
    return form.eval().to(device=device, dtype=dtype)
