"""Tests of sitsflow.nn: base class, built-in networks, dl_parameters, dl_module, model files, inference."""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sitsflow.errors import BadInputError, ConfigError
from sitsflow.nn import (
    ANN,
    NETWORKS,
    InceptionTime,
    Iota2NeuralNetwork,
    LTAEClassifier,
    LTAEEncoder,
    MLPClassifier,
    SimpleSelfAttentionClassifier,
    TempCNN,
    auto_batch_size,
    build_network,
    fingerprint,
    load_model,
    network_parameters,
    predict_proba,
    save_model,
)
from sitsflow.nn import modelfile

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "user_network" / "my_network.py"
SENSOR = "s2_theia"

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Small but complete configurations of each built-in, to keep the tests fast.
SMALL: dict[str, dict] = {
    "LTAEClassifier": {"d_model": 32, "n_head": 4, "d_k": 4, "mlp": [32, 16], "decoder": [16, 8]},
    "ANN": {"hidden_1": 32, "hidden_2": 16},
    "MLPClassifier": {"hidden_layers": [32, 16]},
    "SimpleSelfAttentionClassifier": {"d_model": 16, "n_head": 2, "n_layers": 1, "dim_feedforward": 32},
    "TempCNN": {"filters": 8, "dense": 16},
    "InceptionTime": {"filters": 4, "bottleneck": 4, "kernel_sizes": [9, 5, 3], "depth": 3},
}


def make_dates(n: int, start: dt.date = dt.date(2018, 1, 3), step: int = 10) -> list[int]:
    """n YYYYMMDD dates, irregularly spaced (step, step+3, step, ...)."""
    out, day = [], start
    for i in range(n):
        out.append(int(day.strftime("%Y%m%d")))
        day += dt.timedelta(days=step + 3 * (i % 2))
    return out


def make_stats(t: int, c: int, seed: int = 0, **extra: np.ndarray) -> dict:
    rng = np.random.default_rng(seed)
    stats = {
        "mean": rng.normal(0.2, 0.1, t * c).astype(np.float32),
        "var": rng.uniform(0.01, 0.05, t * c).astype(np.float32),
        "min": np.zeros(t * c, np.float32),
        "max": np.ones(t * c, np.float32),
    }
    stats.update(extra)
    return {SENSOR: stats}


def framework(t: int = 6, c: int = 3, k: int = 4, **over) -> dict:
    args = {
        "nb_dates": t,
        "nb_components": c,
        "nb_classes": k,
        "dates": make_dates(t),
        "stats": make_stats(t, c),
        "sensor": SENSOR,
    }
    args.update(over)
    return args


def build(name: str, params: dict | None = None, seed: int = 0, **fw) -> Iota2NeuralNetwork:
    torch.manual_seed(seed)
    return build_network(name, SMALL[name] | (params or {}), **framework(**fw))


def pixels(n: int, t: int, c: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.15 * torch.randn(n, t, c, generator=g)


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ============================================================================ base class
class PlainNet(Iota2NeuralNetwork):
    """The smallest possible user network, to test the base class alone."""

    def __init__(self, **fw) -> None:
        super().__init__(**fw)
        self.lin = torch.nn.Linear(self.nb_dates * self.nb_components, self.nb_classes)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.normalize_input(x).flatten(1))


def test_stats_are_buffers_with_the_documented_shapes() -> None:
    q = {"quantile_0.1": np.zeros(18), "quantile_0.5": np.zeros(18), "quantile_0.95": np.zeros(18)}
    fw = framework(t=6, c=3, stats={**make_stats(6, 3, **q), "s1_desvv": {"mean": [0.0] * 18, "var": [1.0] * 18}})
    net = PlainNet(**fw)
    assert set(net._stats) == {SENSOR, "s1_desvv"}
    assert set(net._stats[SENSOR]) == {"mean", "var", "min", "max", "quantile_0.1", "quantile_0.5", "quantile_0.95"}
    for tensor in net._stats[SENSOR].values():
        assert tensor.shape == (18,) and tensor.dtype == torch.float32
    np.testing.assert_allclose(net._stats[SENSOR]["mean"].numpy(), fw["stats"][SENSOR]["mean"])
    buffers = {id(b) for b in net.buffers()}
    assert all(id(v) in buffers for s in net._stats.values() for v in s.values())
    assert sum(1 for k in net.state_dict() if k.startswith("_stat_")) == 9
    net.to(torch.float64)  # buffers follow .to(...)
    assert net._stats[SENSOR]["mean"].dtype == torch.float64


@pytest.mark.parametrize(
    ("stats", "message"),
    [
        ({"other": {"mean": [0.0] * 18, "var": [1.0] * 18}}, "no statistics for sensor 's2_theia'"),
        ({SENSOR: {"mean": [0.0] * 17, "var": [1.0] * 18}}, "expected nb_dates \\* nb_components"),
        ({SENSOR: {"var": [1.0] * 18}}, "lacks the 'mean'"),
        ({SENSOR: {"mean": [0.0] * 18, "var": [1.0] * 18, "median": [0.0] * 18}}, "unknown statistic 'median'"),
        ({SENSOR: {"mean": ["a"] * 18, "var": [1.0] * 18}}, "not a vector of numbers"),
    ],
)
def test_bad_stats_are_refused(stats: dict, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        PlainNet(**framework(t=6, c=3, stats=stats))


def test_dates_and_day_offsets() -> None:
    dates = [20191225, 20200101, 20200301, 20210301]  # across a year end and a leap day
    net = PlainNet(**framework(t=4, c=3, dates=dates))
    assert net.dates == dates
    assert net.day_offsets.tolist() == [0.0, 7.0, 67.0, 432.0]
    assert "day_offsets" in dict(net.named_buffers())
    with pytest.raises(BadInputError, match="chronological"):
        PlainNet(**framework(t=4, c=3, dates=[20200101, 20191225, 20200301, 20210301]))
    with pytest.raises(BadInputError, match="not a valid YYYYMMDD"):
        PlainNet(**framework(t=4, c=3, dates=[20200101, 20200231, 20200301, 20210301]))
    with pytest.raises(BadInputError, match="3 acquisition dates given for nb_dates=4"):
        PlainNet(**framework(t=4, c=3, dates=[20200101, 20200201, 20200301]))


def test_nans_imputation_uses_the_feature_mean_and_the_default() -> None:
    t, c = 3, 2
    mean = torch.arange(t * c, dtype=torch.float32)  # date-major: (d0 c0, d0 c1, d1 c0, ...)
    mean[3] = float("nan")  # date 1, component 1
    net = PlainNet(**framework(t=t, c=c))
    x = torch.full((2, t, c), 100.0)
    x[0, 2, 0] = float("nan")  # -> mean[2 * c + 0] = 4
    x[1, 1, 1] = float("nan")  # -> NaN mean -> default_mean
    x[1, 0, 1] = float("inf")  # -> mean[1] = 1
    out = net.nans_imputation(x, mean, -7.0)
    assert out[0, 2, 0] == 4.0 and out[1, 1, 1] == -7.0 and out[1, 0, 1] == 1.0
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out[x == 100.0] == 100.0).all()


def test_standardize_numerics_and_fallbacks() -> None:
    t, c = 2, 3
    net = PlainNet(**framework(t=t, c=c))
    x = torch.randn(5, t, c)
    mean = torch.randn(t * c)
    std = torch.rand(t * c) + 0.5
    expected = (x - mean.view(t, c)) / std.view(t, c)
    torch.testing.assert_close(net.standardize(x, mean, std, 0.0, 1.0), expected)
    mean[1], std[2], std[4] = float("nan"), 0.0, float("nan")
    out = net.standardize(x, mean, std, 10.0, 4.0)
    torch.testing.assert_close(out[:, 0, 1], (x[:, 0, 1] - 10.0) / std[1])
    torch.testing.assert_close(out[:, 0, 2], (x[:, 0, 2] - mean[2]) / 4.0)
    torch.testing.assert_close(out[:, 1, 1], (x[:, 1, 1] - mean[4]) / 4.0)
    with pytest.raises(BadInputError, match="expected nb_dates"):
        net.standardize(x, torch.zeros(5), std, 0.0, 1.0)


def test_forward_checks_the_input_shape() -> None:
    net = PlainNet(**framework(t=6, c=3))
    assert net(torch.zeros(2, 6, 3)).shape == (2, 4)
    with pytest.raises(BadInputError, match=r"\(batch, 6, 3\)"):
        net(torch.zeros(2, 5, 3))


# ============================================================================ built-in networks
def toy_problem(t: int, c: int, n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by component 0 over the second half of the series; 5 % NaN."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.2 + 0.05 * torch.randn(n, t, c, generator=g)
    x[:, t // 2 :, 0] += 0.1 * y.view(-1, 1).float()
    x[torch.rand(n, t, c, generator=g) < 0.05] = float("nan")
    return x, y


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("t", [7, 23, 68])
def test_every_builtin_trains_on_any_number_of_dates(name: str, t: int) -> None:
    c = 4
    x, y = toy_problem(t, c)
    flat = torch.nan_to_num(x, nan=0.2).reshape(len(x), -1).numpy()
    stats = {SENSOR: {"mean": flat.mean(0), "var": flat.var(0)}}
    torch.manual_seed(0)
    net = build_network(name, SMALL[name], **framework(t=t, c=c, k=3, stats=stats))
    loss_fn = torch.nn.CrossEntropyLoss()
    net.eval()
    with torch.no_grad():
        before = loss_fn(net(x), y).item()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(15):
        optimizer.zero_grad()
        loss = loss_fn(net(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        after = loss_fn(net(x), y).item()
    assert after < before
    # the default configuration also runs forward and backward on that many dates
    default = build_network(name, {}, **framework(t=t, c=c, k=3, stats=stats))
    loss_fn(default(x[:8]), y[:8]).backward()
    assert all(p.grad is not None for p in default.parameters())


def test_ltae_encoder_parameter_count() -> None:
    # The authors' L-TAE (config "112k": in_channels=128 from the pixel-set encoder, d_model=256,
    # n_head=16, d_k=8, mlp3=[256, 128], len_max_seq=24) counts exactly 112,000 parameters:
    #   input LayerNorm(128)                       256
    #   1x1 Conv1d(128 -> 256)                  33,024
    #   LayerNorm((256, 24)), tied to 24 dates  12,288
    #   master queries 16 x 8                      128
    #   keys Linear(256 -> 128)                 32,896
    #   MLP Linear(256 -> 128) + BatchNorm(128) 33,152
    #   output LayerNorm(128)                      256
    # Here the input normalisation is the statistics-based standardisation (no parameters) and
    # the post-convolution LayerNorm acts on the 256 channels of each date (512 parameters) so that
    # any number of dates works: 112,000 - 256 - 12,288 + 512 = 99,968.
    encoder = LTAEEncoder(128, d_model=256, n_head=16, d_k=8, mlp=[256, 128], dropout=0.2)
    assert n_params(encoder) == 112_000 - 256 - 2 * 256 * 24 + 2 * 256 == 99_968
    net = build_network("LTAEClassifier", {}, **framework(t=24, c=128, k=20, stats=make_stats(24, 128)))
    assert n_params(net.encoder) == 99_968
    # decoder [128, 64, 32, 20]: 3 Linear + 2 BatchNorm
    assert n_params(net.decoder) == (128 * 64 + 64) + 128 + (64 * 32 + 32) + 64 + (32 * 20 + 20)


def test_tempcnn_is_the_papers_architecture() -> None:
    # Pelletier et al. 2019: 3 x [Conv1d(64, kernel 5) + BatchNorm + ReLU + Dropout(0.2)], flatten,
    # Dense(256) + BatchNorm + ReLU + Dropout(0.2), softmax layer
    t, c, k = 24, 10, 7
    net = build_network("TempCNN", {}, **framework(t=t, c=c, k=k, stats=make_stats(t, c)))
    convs = [m for m in net.conv if isinstance(m, torch.nn.Conv1d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in convs] == [(c, 64, (5,)), (64, 64, (5,)),
                                                                               (64, 64, (5,))]
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == [0.2] * 4
    conv = (c * 64 * 5 + 64) + 2 * (64 * 64 * 5 + 64) + 3 * 2 * 64
    head = (64 * t * 256 + 256) + 2 * 256 + (256 * k + k)
    assert n_params(net) == conv + head
    # "mean" pooling: the weights no longer depend on the number of dates
    means = [build_network("TempCNN", {"pooling": "mean"}, **framework(t=n, c=c, k=k, stats=make_stats(n, c)))
             for n in (5, 40)]
    assert n_params(means[0]) == n_params(means[1]) == conv + (64 * 256 + 256) + 2 * 256 + (256 * k + k)


def test_inception_time_is_the_papers_architecture() -> None:
    # Ismail Fawaz et al. 2020: 6 inception modules (bottleneck 32, kernels 39/19/9, max-pool
    # branch, 32 filters each -> 128 channels, BatchNorm, ReLU), residual every 3, GAP, Linear
    t, c, k = 24, 10, 7
    net = build_network("InceptionTime", {}, **framework(t=t, c=c, k=k, stats=make_stats(t, c)))
    assert len(net.blocks) == 6 and len(net.shortcuts) == 2
    branches = 32 * 32 * (39 + 19 + 9)
    first = c * 32 + branches + c * 32 + 2 * 128
    other = 128 * 32 + branches + 128 * 32 + 2 * 128
    shortcuts = (c * 128 + 2 * 128) + (128 * 128 + 2 * 128)
    assert n_params(net) == first + 5 * other + shortcuts + (128 * k + k)
    with torch.no_grad():
        assert net.eval().features(torch.zeros(2, c, t)).shape == (2, 128, t)
    # a single input channel (an NDVI series): the first module has no bottleneck, as in the authors' code
    one = build_network("InceptionTime", {}, **framework(t=t, c=1, k=k, stats=make_stats(t, 1)))
    assert isinstance(one.blocks[0].bottleneck, torch.nn.Identity)
    assert [m.in_channels for m in one.blocks[0].convs] == [1, 1, 1]
    # the weights do not depend on the number of dates
    other_t = build_network("InceptionTime", {}, **framework(t=5, c=c, k=k, stats=make_stats(5, c)))
    assert n_params(other_t) == n_params(net)


@pytest.mark.parametrize("name", ["LTAEClassifier", "SimpleSelfAttentionClassifier"])
def test_attention_networks_use_the_acquisition_dates(name: str) -> None:
    t, c = 9, 3
    x = pixels(8, t, c)
    a, b = build(name, t=t, c=c).eval(), build(name, t=t, c=c).eval()
    with torch.no_grad():
        ya = a(x)
        torch.testing.assert_close(ya, b(x), rtol=0, atol=0)  # identical dates, same weights
        perm = torch.tensor([3, 0, 8, 1, 5, 2, 7, 4, 6])
        assert not torch.allclose(ya, a(x[:, perm]), atol=1e-4)  # shuffled acquisitions
        other = build(name, t=t, c=c, dates=make_dates(t, step=25)).eval()  # same order, other dates
        assert not torch.allclose(ya, other(x), atol=1e-4)


def test_ltae_attention_weights_are_a_distribution_over_dates() -> None:
    net = build("LTAEClassifier", t=11, c=3).eval()
    with torch.no_grad():
        attn = net.attention_weights(pixels(5, 11, 3))
    assert attn.shape == (5, 11, 4)
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(5, 4))


@pytest.mark.parametrize("name", list(NETWORKS))
def test_nan_inputs_give_finite_outputs(name: str) -> None:
    t, c = 8, 3
    stats = make_stats(t, c)
    stats[SENSOR]["mean"][:5] = np.nan
    stats[SENSOR]["var"][3:9] = np.nan
    stats[SENSOR]["var"][10] = 0.0
    net = build(name, t=t, c=c, stats=stats)
    x = pixels(6, t, c)
    x[0] = float("nan")  # a pixel with no valid value at all
    x[1, :, 1] = float("nan")
    x[2, 3] = float("inf")
    for mode in (True, False):
        net.train(mode)
        assert torch.isfinite(net(x)).all()


# Every constructor parameter, with a value whose effect a test sees (parameter count or output).
VARIANTS: dict[str, dict[str, dict]] = {
    "LTAEClassifier": {
        "d_model": {"d_model": 64, "mlp": [64, 16]},
        "n_head": {"n_head": 8},
        "d_k": {"d_k": 8},
        "mlp": {"mlp": [32, 24], "decoder": [24, 8]},
        "dropout": {"dropout": 0.6},
        "T": {"T": 10.0},
        "decoder": {"decoder": [16, 12, 8]},
        "default_mean": {"default_mean": 5.0},
        "default_std": {"default_std": 3.0},
    },
    "ANN": {
        "hidden_1": {"hidden_1": 40},
        "hidden_2": {"hidden_2": 20},
        "default_mean": {"default_mean": 5.0},
        "default_std": {"default_std": 3.0},
    },
    "MLPClassifier": {
        "hidden_layers": {"hidden_layers": [32, 16, 8]},
        "dropout": {"dropout": 0.6},
        "batch_norm": {"batch_norm": False},
        "activation": {"activation": "gelu"},
        "default_mean": {"default_mean": 5.0},
        "default_std": {"default_std": 3.0},
    },
    "SimpleSelfAttentionClassifier": {
        "d_model": {"d_model": 32},
        "n_head": {"n_head": 4},
        "n_layers": {"n_layers": 2},
        "dim_feedforward": {"dim_feedforward": 48},
        "dropout": {"dropout": 0.6},
        "T": {"T": 10.0},
        "default_mean": {"default_mean": 5.0},
        "default_std": {"default_std": 3.0},
    },
    "TempCNN": {
        "filters": {"filters": 12},
        "kernel_size": {"kernel_size": 3},
        "n_layers": {"n_layers": 2},
        "dense": {"dense": 24},
        "dropout": {"dropout": 0.6},
        "pooling": {"pooling": "mean"},
        "default_mean": {"default_mean": 5.0},
        "default_std": {"default_std": 3.0},
    },
    "InceptionTime": {
        "filters": {"filters": 6},
        "bottleneck": {"bottleneck": 0},
        "kernel_sizes": {"kernel_sizes": [7, 5, 3]},
        "depth": {"depth": 4},
        "residual_every": {"residual_every": 0},
        "default_mean": {"default_mean": 5.0},
        "default_std": {"default_std": 3.0},
    },
}


def test_the_variant_table_covers_every_parameter() -> None:
    for name, cls in NETWORKS.items():
        assert set(network_parameters(cls)) == set(VARIANTS[name]), name


@pytest.mark.parametrize(("name", "param"), [(n, p) for n, v in VARIANTS.items() for p in v])
def test_every_parameter_has_an_effect(name: str, param: str) -> None:
    t, c = 6, 3
    stats = make_stats(t, c)
    stats[SENSOR]["mean"][::2] = np.nan  # so that default_mean / default_std matter
    stats[SENSOR]["var"][1::2] = np.nan
    x = pixels(16, t, c)
    x[:, 1:3, 0] = float("nan")

    def outputs(params: dict) -> tuple[int, torch.Tensor, torch.Tensor]:
        net = build(name, params, t=t, c=c, stats=stats)
        net.eval()
        with torch.no_grad():
            y_eval = net(x)
            net.train()
            torch.manual_seed(123)
            y_train = net(x)
        return n_params(net), y_eval, y_train

    base = outputs({})
    variant = outputs(VARIANTS[name][param])
    changed = (
        base[0] != variant[0]
        or not torch.allclose(base[1], variant[1], atol=1e-5)
        or not torch.allclose(base[2], variant[2], atol=1e-5)
    )
    assert changed, f"{name}.{param} had no visible effect"


def test_docs_document_every_parameter() -> None:
    text = (ROOT / "docs" / "networks.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    for name, cls in NETWORKS.items():
        section = next(s for s in sections if s.startswith(f"`{name}`") or s.startswith(name))
        for param in network_parameters(cls):
            assert f"| `{param}` |" in section, f"{name}.{param} missing from docs/networks.md"


# ============================================================================ dl_parameters
@pytest.mark.parametrize(
    ("name", "params", "pattern"),
    [
        ("LTAEClassifier", {"d_modle": 64},
         r"dl_parameters\.d_modle: network LTAEClassifier has no parameter 'd_modle'; accepted parameters: "
         r"default_mean \(float, default 0\.0\), .*d_model \(int, default 256\), .*mlp \(Sequence\[int\], "
         r"default \[256, 128\]\)"),
        ("ANN", {"nb_classes": 3}, r"dl_parameters\.nb_classes: network ANN: 'nb_classes' is supplied by sitsflow"),
        ("ANN", {"dates": [20200101]}, r"'dates' is supplied by sitsflow"),
        ("LTAEClassifier", {"d_model": "256"},
         r"dl_parameters\.d_model: network LTAEClassifier: expected int, got '256' \(str\)"),
        ("LTAEClassifier", {"d_model": 256.0}, r"expected int, got 256\.0"),
        ("LTAEClassifier", {"n_head": True}, r"n_head: network LTAEClassifier: expected int, got True"),
        ("LTAEClassifier", {"dropout": "0.1"}, r"dropout: network LTAEClassifier: expected float"),
        ("LTAEClassifier", {"mlp": [256, "128"]}, r"mlp: network LTAEClassifier: expected Sequence\[int\]"),
        ("LTAEClassifier", {"mlp": 256}, r"mlp: network LTAEClassifier: expected Sequence\[int\]"),
        ("MLPClassifier", {"batch_norm": 1}, r"batch_norm: network MLPClassifier: expected bool"),
        ("MLPClassifier", {"activation": "swish"},
         r"activation: network MLPClassifier: expected Literal\['relu', 'gelu', 'tanh'\]"),
        ("LTAEClassifier", {"n_head": 7}, r"n_head: LTAEClassifier: must divide d_model=256"),
        ("LTAEClassifier", {"mlp": [128, 64]}, r"mlp: LTAEClassifier: first width must equal d_model=256"),
        ("LTAEClassifier", {"dropout": 1.5}, r"dropout: LTAEClassifier: must be in \[0, 1\)"),
        ("SimpleSelfAttentionClassifier", {"n_head": 5}, r"n_head: SimpleSelfAttentionClassifier: must divide"),
        ("MLPClassifier", {"hidden_layers": []}, r"hidden_layers: MLPClassifier: must list at least one"),
        ("ANN", {"hidden_1": 0}, r"hidden_1: ANN: must be > 0"),
    ],
)
def test_bad_dl_parameters_are_config_errors(name: str, params: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        build_network(name, params, **framework())
    assert info.value.exit_code == 2


def test_dl_parameters_reach_the_constructor_and_ints_pass_as_floats() -> None:
    net = build_network("LTAEClassifier", {"d_model": 64, "mlp": [64, 32], "decoder": [32, 8], "T": 500}, **framework())
    assert net.encoder.d_model == 64 and net.decoder[-1].in_features == 8
    with pytest.raises(ConfigError, match="must be a dict"):
        build_network("ANN", [("hidden_1", 3)], **framework())  # type: ignore[arg-type]


def test_unknown_dl_name_lists_the_builtins() -> None:
    with pytest.raises(ConfigError, match="unknown network 'LTAE'; built-in networks: LTAEClassifier, ANN"):
        build_network("LTAE", {}, **framework())


# ============================================================================ dl_module
def test_example_user_network_builds_trains_and_round_trips() -> None:
    source = EXAMPLE.read_text()
    torch.manual_seed(0)
    net = build_network("MyNetwork", {"hidden": 16, "dropout": 0.0}, module_source=source,
                        module_uri=str(EXAMPLE), **framework(t=6, c=3))
    assert isinstance(net, Iota2NeuralNetwork) and net.hidden1.out_features == 16
    x, y = toy_problem(6, 3)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    assert torch.isfinite(net.eval()(x)).all()
    data = save_model(net, {"classes": [11, 12, 13, 14]})
    # the file records the module's sha256, never its code: the configured module rebuilds it
    loaded, description = load_model(data, module_source=source, module_uri=str(EXAMPLE))
    assert "module_source" not in description and description["network"] == "MyNetwork"
    assert description["module_sha256"] == hashlib.sha256(source.encode()).hexdigest()
    assert description["module_uri"] == str(EXAMPLE)
    np.testing.assert_array_equal(predict_proba(net, x), predict_proba(loaded, x))
    # the **framework forwarding lets users set the base class defaults, nothing else
    build_network("MyNetwork", {"default_std": 2.0}, module_source=source, **framework())
    pattern = r"network MyNetwork has no parameter 'hiden'; accepted parameters: .*hidden \(int, default 64\)"
    with pytest.raises(ConfigError, match=pattern):
        build_network("MyNetwork", {"hiden": 3}, module_source=source, **framework())
    with pytest.raises(ConfigError, match=r"hidden: network MyNetwork: expected int, got 'x'"):
        build_network("MyNetwork", {"hidden": "x"}, module_source=source, **framework())


HEADER = "import torch\nfrom sitsflow.nn import Iota2NeuralNetwork\n"
GOOD = HEADER + (
    "class Net(Iota2NeuralNetwork):\n"
    "    def __init__(self, *, width: int = 4, **fw):\n"
    "        super().__init__(**fw)\n"
    "        self.lin = torch.nn.Linear(self.nb_components, self.nb_classes)\n"
    "    def _forward(self, x):\n"
    "        return self.lin(self.normalize_input(x).mean(dim=1))\n"
)


@pytest.mark.parametrize(
    ("source", "dl_name", "pattern"),
    [
        (HEADER + "class Net(Iota2NeuralNetwork):\n    def _forward(self, x)\n        return x\n", "Net",
         r"dl_module: /tmp/u\.py: syntax error at line 4"),
        (HEADER + "\n\nraise RuntimeError('no GPU here')\n", "Net",
         r"/tmp/u\.py: importing the module failed at line 5: RuntimeError: no GPU here"),
        ("import not_a_module_anyone_has\n", "Net", r"importing the module failed at line 1: ModuleNotFoundError"),
        (GOOD + "class Other(Iota2NeuralNetwork):\n    pass\nclass Helper:\n    pass\n", "Missing",
         r"class 'Missing' not found in /tmp/u\.py; networks found there: Net, Other; other classes: Helper"),
        (HEADER + "class Net(torch.nn.Module):\n    pass\n", "Net",
         r"'Net' in /tmp/u\.py must be a class derived from sitsflow\.nn\.Iota2NeuralNetwork; its bases are Module"),
        (HEADER + "def Net():\n    pass\n", "Net", r"must be a class derived from .*; it is a function"),
        (HEADER + "class Net(Iota2NeuralNetwork):\n    def __init__(self, **fw):\n        super().__init__(**fw)\n"
         "        raise ValueError('width too small')\n", "Net",
         r"building network Net \(/tmp/u\.py\) failed at line 6: ValueError: width too small"),
        (HEADER + "class Net(Iota2NeuralNetwork):\n    def __init__(self):\n        super().__init__()\n", "Net",
         r"building network Net \(/tmp/u\.py\) failed at line 5: TypeError: .*missing 6 required keyword-only"),
        (HEADER + "class Net(Iota2NeuralNetwork):\n    def __init__(self, **fw):\n"
         "        torch.nn.Module.__init__(self)\n",
         "Net", r"did not call Iota2NeuralNetwork\.__init__"),
        (GOOD, "Net", r"dl_parameters\.width: network Net: expected int, got 2\.5"),
    ],
)
def test_dl_module_errors(source: str, dl_name: str, pattern: str) -> None:
    params = {"width": 2.5} if source == GOOD else {}
    with pytest.raises(ConfigError, match=pattern) as info:
        build_network(dl_name, params, module_source=source, module_uri="/tmp/u.py", **framework())
    assert info.value.exit_code == 2


def test_dl_module_success_and_builtins_importable_from_it() -> None:
    net = build_network("Net", {"width": 8}, module_source=GOOD, **framework())
    assert net(torch.zeros(2, 6, 3)).shape == (2, 4)
    source = "from sitsflow.nn import LTAEClassifier as Imported\n"
    net = build_network("Imported", SMALL["LTAEClassifier"], module_source=source, **framework())
    assert isinstance(net, LTAEClassifier)


# ============================================================================ model files
def trained(name: str, **fw) -> Iota2NeuralNetwork:
    net = build(name, **fw)
    x, y = toy_problem(fw.get("t", 6), fw.get("c", 3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(2):  # moves weights and BatchNorm statistics away from their initial values
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y % fw.get("k", 4)).backward()
        optimizer.step()
    return net.eval()


@pytest.mark.parametrize("name", list(NETWORKS))
def test_model_round_trip_gives_identical_predictions(name: str) -> None:
    net = trained(name)
    extra = {"classes": [11, 12, 31, 211], "class_names": {"11": "wheat"}, "hyperparameters": {"lr": 0.001}}
    data = save_model(net, extra)
    loaded, description = load_model(data)
    assert not loaded.training and type(loaded) is type(net)
    x = pixels(50, 6, 3)
    x[0, 2] = float("nan")
    np.testing.assert_array_equal(predict_proba(net, x, device="cpu"), predict_proba(loaded, x, device="cpu"))
    with torch.no_grad():
        torch.testing.assert_close(net(x), loaded(x), rtol=0, atol=0)
    for sensor, keys in net._stats.items():
        for key, value in keys.items():
            torch.testing.assert_close(loaded._stats[sensor][key], value, rtol=0, atol=0)
    assert description["network"] == name and description["dl_parameters"] == SMALL[name]
    assert description["framework"] == {"nb_dates": 6, "nb_components": 3, "nb_classes": 4,
                                        "dates": make_dates(6), "sensor": SENSOR}
    assert description["classes"] == extra["classes"] and description["class_names"] == extra["class_names"]
    assert description["module_sha256"] is None and "module_source" not in description
    assert re.fullmatch(r"[0-9a-f]{64}", description["fingerprint"])


def test_fingerprint_is_stable_and_content_addressed() -> None:
    net = trained("ANN")
    first = load_model(save_model(net, {"classes": [1, 2, 3, 4]}))
    again = load_model(save_model(net, {"classes": [1, 2, 3, 4]}))[1]
    assert first[1]["fingerprint"] == again["fingerprint"]
    # a reloaded model saved with its own description keeps its fingerprint
    assert load_model(save_model(first[0], first[1]))[1]["fingerprint"] == first[1]["fingerprint"]
    other = load_model(save_model(net, {"classes": [1, 2, 3, 5]}))[1]
    assert other["fingerprint"] != first[1]["fingerprint"]
    with torch.no_grad():
        net.output.bias[0] += 1e-3
    assert load_model(save_model(net, {"classes": [1, 2, 3, 4]}))[1]["fingerprint"] != first[1]["fingerprint"]


def test_model_files_are_read_with_weights_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(save_model(trained("ANN"), {}))
    assert calls == [True]


class Evil:
    """A pickled object that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (print, ("pwned",))


def _payload(description: dict, state_dict: dict, stats: dict) -> bytes:
    description = dict(description)
    description["fingerprint"] = fingerprint(description, state_dict, stats)
    buffer = io.BytesIO()
    torch.save({"format": "sitsflow-model", "format_version": 1, "description": json.dumps(description),
                "state_dict": state_dict, "stats": stats}, buffer)
    return buffer.getvalue()


def test_bad_model_files_are_refused() -> None:
    net = trained("ANN")
    data = save_model(net, {})
    parsed = modelfile.read_model_file(data)
    buffer = io.BytesIO()
    torch.save({"format": "sitsflow-model", "evil": Evil()}, buffer)
    cases = [
        (buffer.getvalue(), "refusing the model file: it holds objects other than plain tensors"),
        (b"definitely not a model", "corrupt or not a sitsflow model"),
        (data[: len(data) // 2], "corrupt or not a sitsflow model"),
        (_bytes_of({"weights": torch.zeros(3)}), "not a sitsflow model file"),
        (_bytes_of({"format": "sitsflow-model", "format_version": 99}), "format version 99 is not supported"),
        (_payload(parsed["description"] | {"network": "MyLSTM"}, parsed["state_dict"], parsed["stats"]),
         "network 'MyLSTM' is not a built-in network .* records no dl_module"),
        (_payload(parsed["description"] | {"dl_parameters": {"hidden_1": 999}}, parsed["state_dict"], parsed["stats"]),
         "weights do not fit network 'ANN'"),
        (_payload(parsed["description"] | {"dl_parameters": {"bogus": 1}}, parsed["state_dict"], parsed["stats"]),
         "cannot rebuild the model file's network 'ANN'"),
    ]
    tampered = dict(parsed["state_dict"])
    tampered["output.bias"] = tampered["output.bias"] + 1.0
    buffer = io.BytesIO()
    torch.save({"format": "sitsflow-model", "format_version": 1, "description": json.dumps(parsed["description"]),
                "state_dict": tampered, "stats": parsed["stats"]}, buffer)
    cases.append((buffer.getvalue(), "fingerprint .* does not match"))
    for payload, message in cases:
        with pytest.raises(BadInputError, match=message):
            load_model(payload)


def _bytes_of(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_save_model_checks_its_description() -> None:
    net = trained("ANN")
    with pytest.raises(BadInputError, match="key 'network' is written by sitsflow"):
        save_model(net, {"network": "LTAEClassifier"})
    with pytest.raises(BadInputError, match="not plain JSON"):
        save_model(net, {"classes": {1, 2}})
    with pytest.raises(BadInputError, match="built by sitsflow.nn.build_network"):
        save_model(PlainNet(**framework()), {})


def test_load_model_builds_only_from_the_configured_module_it_records() -> None:
    net = build_network("Net", {"width": 8}, module_source=GOOD, module_uri="/train/u.py", **framework())
    data = save_model(net, {})
    loaded, description = load_model(data, module_source=GOOD, module_uri="/infer/u.py")
    assert loaded.build_info["module_source"] == GOOD
    assert description["module_sha256"] == hashlib.sha256(GOOD.encode()).hexdigest()
    again = load_model(save_model(loaded, description), module_source=GOOD)[1]
    assert again["fingerprint"] == description["fingerprint"]
    changed = GOOD + "\nVERSION = 2\n"
    sha = hashlib.sha256(changed.encode()).hexdigest()
    with pytest.raises(BadInputError, match=rf"trained with the dl_module /train/u\.py \(sha256 "
                       rf"{description['module_sha256']}\), which is not the configured dl_module "
                       rf"/infer/u\.py \(sha256 {sha}\)") as info:
        load_model(data, module_source=changed, module_uri="/infer/u.py")
    assert info.value.exit_code == 2
    with pytest.raises(BadInputError, match=r"trained with the dl_module /train/u\.py .* no dl_module is configured"):
        load_model(data)


# ============================================================================ predict_proba
@pytest.mark.parametrize("name", list(NETWORKS))
def test_predict_proba_shapes_and_sums(name: str) -> None:
    net = trained(name)
    net.train()
    x = pixels(300, 6, 3).numpy()
    auto = predict_proba(net, x)
    assert auto.shape == (300, 4) and auto.dtype == np.float32
    np.testing.assert_allclose(auto.sum(axis=1), 1.0, atol=1e-5)
    assert (auto >= 0).all()
    assert net.training  # mode restored
    np.testing.assert_allclose(predict_proba(net, x, batch_size=7), auto, atol=1e-6)
    np.testing.assert_allclose(predict_proba(net, torch.from_numpy(x), batch_size=64), auto, atol=1e-6)


def test_predict_proba_inputs() -> None:
    net = trained("LTAEClassifier")
    ints = (np.random.default_rng(0).integers(0, 3000, (20, 6, 3))).astype(np.int16)
    probs = predict_proba(net, ints)
    np.testing.assert_allclose(probs, predict_proba(net, ints.astype(np.float32)), atol=1e-6)
    assert predict_proba(net, np.zeros((0, 6, 3), np.float32)).shape == (0, 4)
    with pytest.raises(BadInputError, match=r"\(N, 6, 3\)"):
        predict_proba(net, np.zeros((4, 6, 2), np.float32))
    with pytest.raises(BadInputError, match="batch_size must be a positive integer"):
        predict_proba(net, ints, batch_size=0)
    with pytest.raises(BadInputError, match="not a torch device"):
        predict_proba(net, ints, device="tpu-9")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="no CUDA device"):
            predict_proba(net, ints, device="cuda")


def test_cpu_batch_size_follows_the_activation_size() -> None:
    from sitsflow.nn.predict import MAX_BATCH_CPU, MIN_BATCH, activation_floats_per_pixel

    fw = framework(t=36, c=10, k=20, stats=make_stats(36, 10))
    ltae = build_network("LTAEClassifier", {}, **fw)
    mlp = build_network("MLPClassifier", {}, **fw)
    assert activation_floats_per_pixel(ltae) == 36 * 256  # the per-date embedding
    assert activation_floats_per_pixel(mlp) == 512
    assert ltae.training  # the probe leaves the mode alone
    cpu = torch.device("cpu")
    small, large = auto_batch_size(ltae, cpu), auto_batch_size(mlp, cpu)
    assert MIN_BATCH <= small < large <= MAX_BATCH_CPU


def test_public_names() -> None:
    import sitsflow.nn as nn

    for name in ("Iota2NeuralNetwork", "build_network", "save_model", "load_model", "predict_proba",
                 "LTAEClassifier", "ANN", "MLPClassifier", "SimpleSelfAttentionClassifier", "TempCNN",
                 "InceptionTime"):
        assert name in nn.__all__
    assert NETWORKS == {"LTAEClassifier": LTAEClassifier, "ANN": ANN, "MLPClassifier": MLPClassifier,
                        "SimpleSelfAttentionClassifier": SimpleSelfAttentionClassifier, "TempCNN": TempCNN,
                        "InceptionTime": InceptionTime}
    assert all("dates" in inspect.signature(cls.__init__).parameters for cls in NETWORKS.values())


def test_fused_inference_normalisation_matches_imputation_then_standardisation():
    """Under inference_mode the built-ins normalise in fewer passes; the result must not change."""
    import torch

    from sitsflow.nn import build_network

    nb_dates, nb_comp = 5, 3
    rng = np.random.default_rng(0)
    mean = rng.normal(size=nb_dates * nb_comp).astype(np.float32)
    var = rng.uniform(0.5, 2.0, size=nb_dates * nb_comp).astype(np.float32)
    mean[2], var[4], var[7] = np.nan, 0.0, np.nan  # statistics falling back to the defaults
    net = build_network("MLPClassifier", {}, nb_dates=nb_dates, nb_components=nb_comp, nb_classes=2,
                        dates=[20200101 + i for i in range(nb_dates)], sensor="s",
                        stats={"s": {"mean": torch.from_numpy(mean), "var": torch.from_numpy(var)}})
    x = torch.from_numpy(rng.normal(size=(64, nb_dates, nb_comp)).astype(np.float32))
    x[0, 1, 2] = float("nan")
    x[3, 0, 0] = float("inf")
    x[5, 4, 1] = -float("inf")
    reference = net.normalize_input(x)
    with torch.inference_mode():
        fused = net.normalize_input(x)
    assert torch.equal(fused, reference)
