"""arg_train.training_options: each option has its effect (sitsflow.training.options)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sitsflow import layout, storage
from sitsflow.config import ArgTrainSection, SitsflowConfig, TrainingOptions, load_config
from sitsflow.errors import ConfigError
from sitsflow.training import run
from sitsflow.training.options import TrainingExtras, fingerprint_part, lr_factor
from sitsflow.training.plots import read_history
from test_training import _one_thread, make_cfg, make_samples, model_state, out, write_db  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def with_options(cfg: SitsflowConfig, **options: Any) -> SitsflowConfig:
    """``cfg`` with ``arg_train.training_options`` set (validated, rules included)."""
    arg_train = ArgTrainSection(deep_learning_parameters=cfg.dl, training_options=TrainingOptions(**options))
    return SitsflowConfig(**{**dict(cfg), "arg_train": arg_train})


def extras(labels: np.ndarray | None = None, *, nb_classes: int = 3, t: int = 6, c: int = 2,
           var: np.ndarray | None = None, stream: bool = False, **options: Any) -> TrainingExtras:
    labels = np.arange(30) % nb_classes if labels is None else labels
    stats = {"var": np.full(t * c, 4.0) if var is None else var}
    return TrainingExtras(TrainingOptions(**options), learning_rate=0.01, epochs=10, steps_per_epoch=5,
                          learn_labels=labels, nb_classes=nb_classes, stats=stats, nb_dates=t, nb_components=c,
                          stream=stream)


# --- configuration ---------------------------------------------------------------------------
def test_defaults_change_nothing_and_stay_out_of_the_fingerprint() -> None:
    assert fingerprint_part(TrainingOptions()) == {}
    assert fingerprint_part(TrainingOptions(label_smoothing=0.1)) == {"label_smoothing": 0.1}
    e = extras()
    assert isinstance(e.optimizer([torch.nn.Parameter(torch.zeros(2))]), torch.optim.Adam)
    assert not e.scheduled
    x = torch.randn(4, 6, 2)
    y = torch.tensor([0, 1, 2, 0])
    assert e.batch(x, y, torch.Generator())[0] is x  # untouched


@pytest.mark.parametrize(("sets", "pattern"), [
    (["arg_train.training_options.lr_schedule='cosine'",
      "arg_train.deep_learning_parameters.adaptive_lr={'patience': 2}"],
     r"arg_train\.training_options\.lr_schedule: .*cannot be combined with deep_learning_parameters\.adaptive_lr"),
    (["arg_train.training_options.balanced_sampling=True", "arg_train.deep_learning_parameters.weighted_labels=True"],
     r"arg_train\.training_options\.balanced_sampling: .*over-correct"),
    (["arg_train.training_options.lr_schedule='one_cycle'"],
     r"arg_train\.training_options\.warmup_epochs: expected a number > 0 with lr_schedule 'one_cycle'"),
    (["arg_train.training_options.warmup_epochs=500"],
     r"arg_train\.training_options\.warmup_epochs: expected fewer epochs than"),
    (["arg_train.training_options.label_smoothing=1.0"], r"arg_train\.training_options\.label_smoothing: expected"),
    (["arg_train.training_options.time_shift=-1"], r"arg_train\.training_options\.time_shift: expected"),
    (["arg_train.training_options.lr_schedule='linear'"], r"arg_train\.training_options\.lr_schedule: expected"),
])
def test_bad_options_are_config_errors(sets: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(str(ROOT / "examples" / "slovenia" / "config.cfg"), sets)


def test_options_round_trip_through_the_cfg_text(tmp_path: Path) -> None:
    cfg = load_config(str(ROOT / "examples" / "slovenia" / "config.cfg"),
                      ["arg_train.training_options={'label_smoothing': 0.1, 'time_shift': 2}"])
    assert cfg.arg_train.training_options.time_shift == 2
    path = tmp_path / "resolved.cfg"
    path.write_text(cfg.to_cfg())
    assert load_config(str(path)).arg_train.training_options == cfg.arg_train.training_options


# --- loss, optimizer, schedule ---------------------------------------------------------------
def test_label_smoothing_follows_the_formula() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    eps = 0.2
    logp = torch.log_softmax(logits, dim=1)
    nll = -logp[torch.arange(8), y].mean()
    uniform = -logp.mean(dim=1).mean()  # cross-entropy against the uniform distribution
    got = extras(nb_classes=4, label_smoothing=eps).loss(logits, y, None)
    torch.testing.assert_close(got, (1 - eps) * nll + eps * uniform)
    torch.testing.assert_close(extras(nb_classes=4).loss(logits, y, None), nll)
    assert not torch.isclose(got, nll)


def test_label_smoothing_with_class_weights_weights_each_sample_by_its_own_class() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 0, 0, 0, 1])
    eps, weights = 0.2, torch.tensor([0.5, 1.0, 3.0, 8.0])
    loss = extras(nb_classes=4, label_smoothing=eps).loss
    logp = torch.log_softmax(logits, dim=1)
    per_sample = -(1 - eps) * logp[torch.arange(8), y] - eps * logp.mean(dim=1)
    torch.testing.assert_close(loss(logits, y, weights), (weights[y] * per_sample).sum() / weights[y].sum())
    # equal weights: the unweighted smoothed loss; no smoothing: PyTorch's weighted cross-entropy
    torch.testing.assert_close(loss(logits, y, torch.full((4,), 3.0)), loss(logits, y, None))
    torch.testing.assert_close(
        extras(nb_classes=4).loss(logits, y, weights), torch.nn.functional.cross_entropy(logits, y, weight=weights)
    )
    # the Slovenia W11 trap: samples of a common class, equal logits, a rare class weighted 100.
    # PyTorch's weighted smoothing pushes every sample toward the rare class; this loss does not.
    logits = torch.zeros(4, 2, requires_grad=True)
    y, weights = torch.zeros(4, dtype=torch.long), torch.tensor([1.0, 100.0])
    loss(logits, y, weights).backward()
    assert (logits.grad[:, 1] > 0).all()  # descending lowers the rare class's logit
    logits.grad = None
    torch.nn.functional.cross_entropy(logits, y, weight=weights, label_smoothing=eps).backward()
    assert (logits.grad[:, 1] < 0).all()  # PyTorch's: descending raises it


def test_weight_decay_shrinks_the_weights() -> None:
    def trained_norm(weight_decay: float) -> float:
        torch.manual_seed(0)
        net = torch.nn.Linear(6, 3)
        opt = extras(weight_decay=weight_decay).optimizer(net.parameters())
        x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
        for _ in range(50):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        return float(net.weight.detach().norm())

    assert isinstance(extras(weight_decay=0.5).optimizer([torch.nn.Parameter(torch.zeros(1))]), torch.optim.AdamW)
    assert trained_norm(0.5) < 0.9 * trained_norm(0.0)


def test_cosine_schedule_with_warmup() -> None:
    opts = TrainingOptions(lr_schedule="cosine", warmup_epochs=2)
    # 10 epochs of 5 steps: linear warm-up over the first 10 steps, cosine to 0 over the other 40
    assert [lr_factor(opts, s, 50, 5) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(opts, 10, 50, 5) == pytest.approx(1.0)
    assert lr_factor(opts, 30, 50, 5) == pytest.approx(0.5)
    assert lr_factor(opts, 49, 50, 5) == pytest.approx((1 + math.cos(math.pi * 39 / 40)) / 2)
    constant = TrainingOptions(warmup_epochs=1)
    assert [lr_factor(constant, s, 50, 5) for s in (0, 4, 5, 49)] == pytest.approx([0.2, 1.0, 1.0, 1.0])


def test_one_cycle_is_pytorchs() -> None:
    opts = TrainingOptions(lr_schedule="one_cycle", warmup_epochs=3)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=50, pct_start=0.3, cycle_momentum=False)
    expected = []
    for _ in range(50):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    got = [0.01 * lr_factor(opts, s, 50, 5) for s in range(50)]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_the_schedule_reaches_the_optimizer_step_by_step(out: str) -> None:
    cfg = with_options(make_cfg(out, epochs=4), lr_schedule="cosine", warmup_epochs=1)
    summary = run(cfg, 1, 0, 0)
    hist = read_history(storage.read_bytes(layout.model_history(out, 1, 0, 0)))
    # batches of 32; the history holds the learning rate of each epoch's first step
    steps = -(-summary["nb_learn"] // 32)
    assert steps > 1
    opts = cfg.arg_train.training_options
    assert [h["lr"] for h in hist] == pytest.approx([0.01 * lr_factor(opts, (e - 1) * steps, 4 * steps, steps)
                                                     for e in (1, 2, 3, 4)])


# --- sampling and augmentation ---------------------------------------------------------------
def test_balanced_sampling_draws_every_class_equally() -> None:
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    e = extras(labels, balanced_sampling=True)
    order = e.epoch_order(torch.from_numpy(labels), torch.Generator().manual_seed(0))
    assert order.shape == (1000,)
    counts = np.bincount(labels[order.numpy()], minlength=3)
    assert np.all(np.abs(counts - 1000 / 3) < 60), counts  # 900/90/10 without
    plain = extras(labels).epoch_order(torch.from_numpy(labels), torch.Generator().manual_seed(0))
    assert sorted(plain.tolist()) == list(range(1000))  # a permutation
    # stream mode: each batch is redrawn with the same weights
    s = extras(labels, balanced_sampling=True, stream=True)
    gen = torch.Generator().manual_seed(1)
    y = torch.from_numpy(labels[np.random.default_rng(0).permutation(1000)[:500]])
    x = y.float()[:, None, None].expand(500, 6, 2).clone()
    xb, yb = s.batch(x, y, gen)
    assert torch.equal(xb[:, 0, 0].long(), yb)  # rows and labels drawn together
    counts = np.bincount(yb.numpy(), minlength=3)
    assert counts.min() > 100, counts


def test_augmentation_is_seeded_and_does_what_it_says() -> None:
    b, t, c = 400, 12, 2
    x = torch.arange(t, dtype=torch.float32)[None, :, None].expand(b, t, c).clone()  # value = date index
    y = torch.zeros(b, dtype=torch.long)

    shifted = extras(t=t, c=c, time_shift=2).batch(x, y, torch.Generator().manual_seed(0))[0]
    diff = shifted - x  # a shifted series is its dates moved by k: value - index = -k, NaN where shifted in
    per_series = torch.nanmean(diff[..., 0], dim=1)
    assert set(per_series.round().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    k = -per_series.round()
    assert torch.all(torch.isnan(shifted[..., 0]).sum(1) == k.abs())

    dropped = extras(t=t, c=c, date_dropout=0.3).batch(x, y, torch.Generator().manual_seed(0))[0]
    missing = torch.isnan(dropped)
    assert torch.equal(missing[..., 0], missing[..., 1])  # whole dates
    assert abs(missing[..., 0].float().mean().item() - 0.3) < 0.03
    assert torch.equal(dropped[~missing], x[~missing])

    var = np.full(t * c, 4.0)
    var[1::2] = 0.25  # std 2 for component 0, 0.5 for component 1
    noisy = extras(t=t, c=c, var=var, gaussian_noise=0.1).batch(x, y, torch.Generator().manual_seed(0))[0]
    noise = noisy - x
    assert noise[..., 0].std().item() == pytest.approx(0.2, rel=0.05)
    assert noise[..., 1].std().item() == pytest.approx(0.05, rel=0.05)

    # seeded: the same generator state gives the same batch; another gives another
    e = extras(t=t, c=c, time_shift=1, date_dropout=0.2, gaussian_noise=0.1)
    a = e.batch(x, y, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a.nan_to_num(-9), e.batch(x, y, torch.Generator().manual_seed(5))[0].nan_to_num(-9))
    assert not torch.equal(a.nan_to_num(-9), e.batch(x, y, torch.Generator().manual_seed(6))[0].nan_to_num(-9))
    assert not torch.isnan(x).any()  # the input batch is not modified


def test_augmentation_reaches_training_batches_only(out: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With date dropout, the network sees missing dates while training and never while validating."""
    from sitsflow.nn.mlp import MLPClassifier

    seen: dict[bool, list[float]] = {True: [], False: []}
    original = MLPClassifier._forward

    def recording(self: MLPClassifier, x: torch.Tensor) -> torch.Tensor:
        seen[self.training].append(float(torch.isnan(x).all(dim=2).float().mean()))
        return original(self, x)

    monkeypatch.setattr(MLPClassifier, "_forward", recording)
    run(with_options(make_cfg(out, epochs=2), date_dropout=0.5), 1, 0, 0)
    assert seen[True] and seen[False]
    assert min(seen[True]) > 0.3  # about half of the dates of every training batch
    assert max(seen[False]) == 0.0  # the samples have no missing date


# --- through the stage -----------------------------------------------------------------------
def test_a_changed_option_retrains_and_defaults_keep_the_old_fingerprint(out: str) -> None:
    first = run(make_cfg(out), 1, 0, 0)
    assert not first["skipped"] and run(make_cfg(out), 1, 0, 0)["skipped"]
    # an explicit default is no change
    assert run(with_options(make_cfg(out), label_smoothing=0.0), 1, 0, 0)["skipped"]
    before = model_state(layout.model_candidate(out, 1, 0, 0))
    changed = run(with_options(make_cfg(out), label_smoothing=0.1), 1, 0, 0)
    assert not changed["skipped"]
    after = model_state(layout.model_candidate(out, 1, 0, 0))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert run(with_options(make_cfg(out), label_smoothing=0.1), 1, 0, 0)["skipped"]


@pytest.mark.parametrize("mode", ["full", "stream"])
def test_every_option_trains_through_the_stage(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "out"
    (root / layout.LEARNING_SAMPLES).mkdir(parents=True)
    x, y, p = make_samples({11: 12, 12: 4, 31: 2})  # imbalanced
    write_db(layout.samples_learn(str(root), 1, 0), x, y, p)
    cfg = with_options(make_cfg(str(root), epochs=3, dataloader_mode=mode), label_smoothing=0.1, weight_decay=0.01,
                       lr_schedule="one_cycle", warmup_epochs=1, date_dropout=0.1, time_shift=1,
                       gaussian_noise=0.05, balanced_sampling=True)
    summary = run(cfg, 1, 0, 0)
    assert summary["epochs_run"] == 3
    hist = read_history(storage.read_bytes(layout.model_history(str(root), 1, 0, 0)))
    assert all(math.isfinite(h["train_loss"]) for h in hist)
    assert hist[0]["lr"] == pytest.approx(0.01 / 25)


def test_gradient_clip_bounds_the_gradient_norm_and_changes_training(out: str) -> None:
    net = torch.nn.Linear(6, 3)
    torch.nn.functional.cross_entropy(net(100 * torch.randn(64, 6)), torch.randint(0, 3, (64,))).backward()
    norm = lambda: float(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).norm())  # noqa: E731
    before = norm()
    extras().clip(net.parameters())  # 0: untouched
    assert norm() == pytest.approx(before)
    extras(gradient_clip=0.01).clip(net.parameters())
    assert before > 0.01 and norm() == pytest.approx(0.01, rel=1e-4)
    # through the stage: a new candidate, other weights
    run(make_cfg(out), 1, 0, 0)
    plain = model_state(layout.model_candidate(out, 1, 0, 0))
    clipped = run(with_options(make_cfg(out), gradient_clip=1e-3), 1, 0, 0)
    assert not clipped["skipped"]
    after = model_state(layout.model_candidate(out, 1, 0, 0))
    assert any(not torch.equal(plain[k], after[k]) for k in plain)


def test_more_epochs_do_not_continue_a_schedule_that_spans_the_epochs(out: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A cosine schedule decays to 0 at the last step of ``epochs``: 3 epochs then 5 would not be
    either schedule, so the checkpoint restarts (a constant rate continues: see test_training)."""
    run(with_options(make_cfg(out, epochs=3, restart_from_checkpoint=True), lr_schedule="cosine"), 1, 0, 0)
    caplog.set_level("INFO", logger="sitsflow")
    s = run(with_options(make_cfg(out, epochs=5, restart_from_checkpoint=True), lr_schedule="cosine"), 1, 0, 0)
    assert s["resumed_from_epoch"] == 0 and s["epochs_run"] == 5
    assert "the learning-rate schedule changed (schedule_epochs 3 -> 5)" in caplog.text, caplog.text
