"""The inference forms of the built-in networks compute the training form's function.

Folds are checked in float64 (exact algebra: agreement to rounding), in float32 (the CPU's form:
bounded probability differences) and in bfloat16 (the GPU's precision, run here through the CPU's
autocast: at least 99.5 % identical labels), on generated series and on the Slovenia example's
real NDVI series.
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from sitsflow.nn import LTAEClassifier, Predictor, build_network, inference_form, predict_proba
from sitsflow.nn.inference_form import FoldedInceptionTime, FoldedLTAE, FoldedPerceptron, FoldedTempCNN
from test_nn import _one_thread  # noqa: F401 - the module-wide one-thread fixture

SLOVENIA = Path(__file__).resolve().parents[1] / "examples" / "slovenia" / "data"
FORMS = {"LTAEClassifier": FoldedLTAE, "ANN": FoldedPerceptron, "MLPClassifier": FoldedPerceptron,
         "TempCNN": FoldedTempCNN, "InceptionTime": FoldedInceptionTime}
FOLDED = tuple(FORMS)
# the float64 and float32 checks run the default InceptionTime with 3 modules (one residual), to stay quick
QUICK = {"InceptionTime": {"depth": 3}}


def make_dates(n: int, step: int = 10) -> list[int]:
    start = dt.date(2018, 1, 3)
    return [int((start + dt.timedelta(days=step * i + (i % 3))).strftime("%Y%m%d")) for i in range(n)]


def series(n: int, dates: int, comps: int, seed: int = 0, missing: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.6, (n, dates, comps)).astype(np.float32)
    x[rng.random(x.shape) < missing] = np.nan
    x[0, 0, 0] = np.inf  # a non-finite value that is not NaN is missing too
    x[1] = np.nan  # a pixel with no value at all
    return x


def structured(n: int, dates: int, comps: int, seed: int = 0, kinds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Series of ``kinds`` land covers (smooth seasonal curves) with noise and 5 % missing values,
    and their classes."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2 * np.pi, dates)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, (kinds, 1, comps))
    level = rng.uniform(0.1, 0.5, (kinds, 1, comps))
    curves = (level + 0.15 * np.sin(t + phase)).astype(np.float32)  # (kinds, dates, comps)
    y = rng.integers(0, kinds, n)
    x = curves[y] + rng.normal(0, 0.05, (n, dates, comps)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = np.nan
    return x, y


def trained_like(name: str, x: np.ndarray, nb_classes: int = 7, seed: int = 0, **params) -> torch.nn.Module:
    """A network with random weights and random normalisation statistics (as after training)."""
    flat = np.nan_to_num(x[:500], nan=0.3, posinf=0.3).reshape(min(500, len(x)), -1)
    stats = {"s2_theia": {"mean": flat.mean(0), "var": flat.var(0)}}
    stats["s2_theia"]["var"][3] = 0.0  # a constant feature: the default std applies
    torch.manual_seed(seed)
    net = build_network(name, params, nb_dates=x.shape[1], nb_components=x.shape[2], nb_classes=nb_classes,
                        dates=make_dates(x.shape[1]), stats=stats, sensor="s2_theia")
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.LayerNorm)):
            m.weight.data.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
            m.bias.data.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return net.eval()


@pytest.mark.parametrize("name", FOLDED)
@pytest.mark.parametrize("dates,comps", [(7, 2), (23, 4), (68, 1)])
def test_fold_is_exact_in_float64(name: str, dates: int, comps: int) -> None:
    x = series(400, dates, comps)
    net = trained_like(name, x, **QUICK.get(name, {}))
    ref64 = copy.deepcopy(net).double()
    form = inference_form(net, dtype=torch.float64)
    assert isinstance(form, FORMS[name])
    with torch.inference_mode():
        expected = ref64(torch.from_numpy(x).double())
        got = form(torch.from_numpy(x).double())
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", FOLDED)
def test_fold_agrees_in_float32(name: str) -> None:
    x = series(2000, 36, 10, seed=1)
    net = trained_like(name, x, nb_classes=12, **QUICK.get(name, {}))
    reference = predict_proba(net, x, form="reference", batch_size=512)
    folded = predict_proba(net, x, batch_size=512)
    assert np.abs(folded - reference).max() < 2e-5
    assert (folded.argmax(1) == reference.argmax(1)).mean() > 0.999


def test_form_is_a_snapshot_and_leaves_the_network_untouched() -> None:
    x = series(50, 9, 3)
    net = trained_like("LTAEClassifier", x).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    form = inference_form(net)
    assert net.training  # its mode is restored
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(p is q for p in form.parameters() for q in net.parameters())


def test_user_subclass_is_not_folded() -> None:
    class Mine(LTAEClassifier):
        def _forward(self, x: torch.Tensor) -> torch.Tensor:
            return super()._forward(x) * 2.0

    x = series(20, 5, 2)
    flat = np.nan_to_num(x, nan=0.3, posinf=0.3).reshape(len(x), -1)
    net = Mine(nb_dates=5, nb_components=2, nb_classes=3, dates=make_dates(5),
               stats={"s": {"mean": flat.mean(0), "var": flat.var(0)}}, sensor="s").eval()
    assert inference_form(net) is net
    np.testing.assert_allclose(predict_proba(net, x), predict_proba(net, x, form="reference"), atol=1e-6)


def fit(net: torch.nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 40) -> torch.nn.Module:
    """A short full-batch training, so that the network decides as a trained one does.

    A random network's outputs are near-uniform: most of its pixels are ties that any rounding
    flips, which says nothing of a trained model's maps.
    """
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    return net.eval()


SMALL = {"LTAEClassifier": {"d_model": 64, "n_head": 8, "mlp": [64, 32], "decoder": [32, 16]},
         "ANN": {"hidden_1": 64, "hidden_2": 32}, "MLPClassifier": {"hidden_layers": [64, 32]},
         "TempCNN": {"filters": 32, "dense": 64},
         "InceptionTime": {"filters": 16, "bottleneck": 16, "kernel_sizes": [19, 9, 5], "depth": 3}}


def _bf16_agreement(net: torch.nn.Module, x: np.ndarray) -> float:
    reference = Predictor(net, device="cpu", form="reference", precision="fp32", compile=False).proba(x)
    low = Predictor(net, device="cpu", precision="bf16", compile=False).proba(x)
    return float((low.argmax(1) == reference.argmax(1)).mean())


# bf16 convolutions run emulated (slowly) on the CPU: the convolutional networks are checked on
# fewer generated pixels, and not on the Slovenia series (minutes on a shared CPU)
CONV = ("TempCNN", "InceptionTime")


@pytest.mark.parametrize("name", FOLDED)
def test_bf16_labels_agree_on_generated_series(name: str) -> None:
    x, y = structured(1500 if name in CONV else 4000, 36, 10, seed=2)
    net = fit(trained_like(name, x[:1000], nb_classes=10, seed=3, **SMALL[name]), x[:1000], y[:1000])
    assert _bf16_agreement(net, x) >= 0.995


def test_bf16_labels_agree_on_the_slovenia_series() -> None:
    with rasterio.open(SLOVENIA / "ndvi_68dates.tif") as src:
        ndvi = src.read(window=rasterio.windows.Window(0, 0, 80, 80)).astype(np.float32)
    with rasterio.open(SLOVENIA / "cloudmask_68dates.tif") as src:
        cloudy = src.read(window=rasterio.windows.Window(0, 0, 80, 80)) > 0
    ndvi[cloudy] = np.nan
    x = ndvi.reshape(ndvi.shape[0], -1).T[:, :, None].copy()  # (pixels, 68 dates, 1 component)
    # classes: quintiles of the pixel's mean NDVI, something a network can learn from the series
    mean = np.nanmean(np.where(np.isfinite(x[..., 0]), x[..., 0], np.nan), axis=1)
    y = np.searchsorted(np.nanquantile(mean, [0.2, 0.4, 0.6, 0.8]), np.nan_to_num(mean))
    for name in (n for n in FOLDED if n not in CONV):
        net = fit(trained_like(name, x, nb_classes=5, seed=4, **SMALL[name]), x[::4], y[::4])
        assert _bf16_agreement(net, x) >= 0.995, name


def test_classify_matches_proba() -> None:
    x = series(300, 12, 3, seed=5)
    net = trained_like("LTAEClassifier", x, nb_classes=4)
    predictor = Predictor(net, device="cpu", batch_size=64)
    codes = np.array([11, 21, 40000, 65535])  # uint16 codes beyond int16 come back whole
    labels, confidence, probas = predictor.classify(x, codes, probabilities=True)
    proba = predictor.proba(x)
    np.testing.assert_array_equal(labels, codes[proba.argmax(1)])
    np.testing.assert_array_equal(confidence, proba.max(1))
    np.testing.assert_array_equal(probas, np.rint(proba.T * 1000).astype(np.uint16))
    assert predictor.classify(x, codes)[2] is None


def test_predictor_checks_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    from sitsflow.errors import BadInputError

    x = series(10, 4, 2)
    net = trained_like("MLPClassifier", x, nb_classes=3)
    with pytest.raises(BadInputError, match="precision"):
        Predictor(net, device="cpu", precision="fp8")
    with pytest.raises(BadInputError, match="form"):
        Predictor(net, device="cpu", form="fast")
    monkeypatch.setenv("SITSFLOW_COMPILE", "maybe")
    with pytest.raises(BadInputError, match="SITSFLOW_COMPILE"):
        Predictor(net, device="cpu")
    monkeypatch.setenv("SITSFLOW_COMPILE", "0")
    assert not Predictor(net, device="cpu").compiled


def test_max_compile_runs_one_static_batch_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SITSFLOW_COMPILE=max``: Inductor's autotuning mode on one static shape; the last, shorter
    batch is padded to ``batch_size`` and the padding's outputs are dropped. (torch.compile is
    replaced by a recorder here: the autotuning itself needs a GPU.)"""
    calls: list[dict] = []
    shapes: list[int] = []

    def recording_compile(module, **kwargs):
        calls.append(kwargs)

        def run(batch):
            shapes.append(int(batch.shape[0]))
            return module(batch)

        return run

    monkeypatch.setattr(torch, "compile", recording_compile)
    x = series(150, 12, 3, seed=6)
    net = trained_like("LTAEClassifier", x, nb_classes=4)
    eager = Predictor(net, device="cpu", batch_size=64, compile=False).proba(x)
    monkeypatch.setenv("SITSFLOW_COMPILE", "max")
    predictor = Predictor(net, device="cpu", batch_size=64)
    assert predictor.compiled and predictor.static
    assert calls == [{"dynamic": False, "mode": "max-autotune-no-cudagraphs"}]
    np.testing.assert_allclose(predictor.proba(x), eager, atol=1e-6)
    assert shapes == [64, 64, 64]  # 150 pixels: 64 + 64 + 22 padded to 64
    monkeypatch.setenv("SITSFLOW_COMPILE", "1")
    calls.clear()
    assert not Predictor(net, device="cpu", batch_size=64).static
    assert calls == [{"dynamic": True}]
