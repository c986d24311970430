"""Data features, labels, records and sinks: paired with the right gradients, nothing lost."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ReusedRelu,
    TinyCNN,
    fail_estimate_at,
    make_data,
    make_private,
    train,
    without_timing,
)
from torch import nn

from opacus_mi import LeakageMonitor, LeakageRecord, MIValue, mi_upper_bound, read_jsonl
from opacus_mi.features import one_hot_labels, pool_features


def test_pool_features_caps_dimension_and_keeps_small_inputs():
    x = torch.randn(3, 3, 64, 64)
    pooled = pool_features(x)
    assert pooled.shape[0] == 3 and pooled.shape[1] <= 1024
    # spatial average pooling: a constant image stays constant
    torch.testing.assert_close(
        pool_features(torch.ones(2, 3, 64, 64)), torch.ones(2, pooled.shape[1])
    )
    small = torch.randn(4, 1, 6, 6)
    assert torch.equal(pool_features(small), small.reshape(4, 36))
    assert pool_features(torch.randn(2, 5000)).shape == (2, 1024)


def _capture_features(monitor, model, opt, loader, criterion, after_step=None):
    """Each measured step's (captures, features); ``monitor`` needs a critic (only critics
    read features, so without one none are made)."""
    got = []
    original = monitor._capture.features

    def spy(captures, batch):
        out = original(captures, batch)
        got.append((captures, out))
        return out

    monitor._capture.features = spy
    train(model, opt, loader, criterion=criterion, after_step=after_step)
    return got


def _spy_features(monitor) -> list:
    """Each measured step's features, as the monitor made them (appended as they are made)."""
    got: list = []
    original = monitor._capture.features
    monitor._capture.features = lambda c, b: got.append(original(c, b)) or got[-1]
    return got


def test_default_features_are_inputs_plus_one_hot_labels():
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine")
    got = _capture_features(
        monitor, model, opt, loader, monitor.wrap_criterion(nn.CrossEntropyLoss())
    )
    x, y = next(iter(loader))
    captures, feats = got[0]
    assert feats.shape == (16, 36 + 3)
    assert torch.equal(feats[:, :36], x.reshape(16, 36))
    assert torch.equal(feats[:, 36:], nn.functional.one_hot(y, 3).float())


def _one_hot_reference(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Brute force: row i has a 1 at column labels[i] if 0 <= labels[i] < classes, NaNs past
    the output, and no 1 at all for a negative (ignored) label."""
    out = torch.zeros(len(labels), classes)
    for i, label in enumerate(labels.tolist()):
        if label >= classes:
            out[i] = math.nan
        elif label >= 0:
            out[i, label] = 1.0
    return out


@pytest.mark.parametrize("wraps", [1, 2])
@pytest.mark.parametrize("ignore", [-100, 3])
def test_labels_the_loss_ignores_are_all_zero_one_hot_rows(ignore, wraps):
    """CrossEntropyLoss(ignore_index=-100) labels: index_select failed on -100, so every record
    was flagged features_error and the learned critics skipped every step. An ignore_index
    past the outputs (255 in segmentation; 3 here) is the loss's to ignore too. A monitor's
    wrapper wrapped again reads the loss's ignore_index through it (as under ghost clipping,
    through Opacus's loss wrapper)."""
    x, y = make_data(48).tensors
    y[::5] = ignore
    engine, model, opt, loader = make_private(
        poisson=False, data=torch.utils.data.TensorDataset(x, y)
    )
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine", train_every=1)
    criterion = nn.CrossEntropyLoss(ignore_index=ignore)
    for _ in range(wraps):
        criterion = monitor.wrap_criterion(criterion)
    got = _capture_features(monitor, model, opt, loader, criterion)
    monitor.flush()  # (an overlap worker's last step)
    labels = [yb for _, yb in loader]
    assert len(got) == len(labels) == 3 and (labels[0] == ignore).sum() == 4
    for (_, feats), yb in zip(got, labels, strict=True):
        assert torch.equal(feats[:, 36:], _one_hot_reference(yb.masked_fill(yb == ignore, -1), 3))
    assert not any(r.flags for r in monitor.history)
    assert all("clipped/mine" in r.mi for r in monitor.history[1:])


def test_a_label_past_the_outputs_is_named_in_a_features_error():
    """A label the loss accepts but the output has no column for (a loss function ignoring 3
    with three outputs, whose ignore_index the wrapper cannot see): a features_error whose
    warning names the labels and the width."""
    x, y = make_data(32).tensors
    y[::4] = 3
    engine, model, opt, loader = make_private(
        poisson=False, data=torch.utils.data.TensorDataset(x, y)
    )
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine")
    criterion = monitor.wrap_criterion(
        lambda out, target: nn.functional.cross_entropy(out, target, ignore_index=3)
    )
    with pytest.warns(RuntimeWarning, match=r"include \[3\], outside its 3 classes"):
        train(model, opt, loader, criterion=criterion)
    assert [r.flags for r in monitor.history] == [["features_error"]] * 2
    assert all("private/oracle" in r.mi for r in monitor.history)


def test_one_hot_labels_against_brute_force_with_and_without_the_range_check():
    labels = torch.tensor([2, -100, 0, -1, 4, 1, 5, 0])
    assert torch.equal(
        one_hot_labels(labels[labels < 4], 4), _one_hot_reference(labels[labels < 4], 4)
    )
    # Unchecked (no host read, as on a GPU): a label past the output is a NaN row.
    got = one_hot_labels(labels, 4, check=False)
    assert torch.equal(got.isnan(), _one_hot_reference(labels, 4).isnan())
    assert torch.equal(got.nan_to_num(), _one_hot_reference(labels, 4).nan_to_num())
    with pytest.raises(ValueError, match=r"include \[4, 5\], outside its 4 classes"):
        one_hot_labels(labels, 4)


def test_wrapped_criterion_takes_keywords_as_the_loss_does():
    """crit(input=logits, target=y) raised a TypeError in the wrapper, not in the loss."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine")
    crit = monitor.wrap_criterion(nn.CrossEntropyLoss())
    got = _capture_features(monitor, model, opt, loader, lambda out, y: crit(input=out, target=y))
    _, y = next(iter(loader))
    assert torch.equal(got[0][1][:, 36:], nn.functional.one_hot(y, 3).float())
    x, y = next(iter(loader))
    out = model(x)
    assert torch.equal(crit(out, target=y), nn.CrossEntropyLoss()(out, y))


def test_a_layer_named_twice_in_features_is_its_output_once():
    """features=("conv", "conv") hooked the layer twice: its output went into the features
    twice, and the second hook warned that the layer ran twice in one forward (it ran once)."""
    got = {}
    for names in (("conv",), ("conv", "conv"), ("input", "conv", "input", "conv")):
        engine, model, opt, loader = make_private(poisson=False)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, features=names, every=1)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="opacus-mi")  # (no "ran more than once")
            seen = _capture_features(monitor, model, opt, loader, None)
            monitor.flush()  # (an overlap worker's last step: its features are in seen after)
            got[names] = [f for _, f in seen]
    assert all(f.shape == (16, 4 * 4 * 4) for f in got[("conv",)])
    for one, two in zip(got[("conv",)], got[("conv", "conv")], strict=True):
        assert torch.equal(one, two)
    assert all(f.shape[1] == 36 + 64 for f in got[("input", "conv", "input", "conv")])


def test_named_layers_and_callable_features_come_from_the_same_forward():
    engine, model, opt, loader = make_private(poisson=False)
    calls = []
    model._module.conv.register_forward_hook(lambda *a: calls.append(1))
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine", features=["conv"])
    got = _capture_features(monitor, model, opt, loader, nn.CrossEntropyLoss())
    assert len(calls) == len(loader)  # no extra forward pass
    x, _ = next(iter(loader))
    with torch.no_grad():
        expected = model._module.conv.__class__.forward(model._module.conv, x)  # reference
    assert got[0][1].shape == (16, 4 * 4 * 4)
    assert got[0][1].shape == expected.flatten(1).shape

    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(
        engine,
        model,
        opt,
        delta=1e-5,
        estimator="mine",
        features=lambda x: x.mean(dim=(1, 2, 3))[:, None],
    )
    got = _capture_features(monitor, model, opt, loader, nn.CrossEntropyLoss())
    x, _ = next(iter(loader))
    torch.testing.assert_close(got[0][1], x.mean(dim=(1, 2, 3))[:, None])


class _Block(nn.Module):
    """Ends in a new tensor, not Opacus's hooked conv output (in place on that is refused)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x) * 2.0


class _InplaceNet(nn.Module):
    """A named block whose output an in-place ReLU overwrites right after."""

    def __init__(self):
        super().__init__()
        self.block, self.act, self.fc = _Block(), nn.ReLU(inplace=True), nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.act(self.block(x)).flatten(1))


@pytest.mark.parametrize("overlap", [False, True])
def test_named_layer_features_are_its_output_even_if_an_inplace_op_follows(overlap):
    """Reference: the block applied to the batch with the weights it had at that step, before
    the in-place ReLU (so negative values are kept)."""
    engine, model, opt, loader = make_private(poisson=False, n=48, batch_size=12, net=_InplaceNet)
    conv = model._module.block.conv
    weights = [(conv.weight.detach().clone(), conv.bias.detach().clone())]
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, estimator="mine", features=["block"], overlap=overlap
    )

    def snapshot():  # the conv's weights for the next step's forward
        weights.append((conv.weight.detach().clone(), conv.bias.detach().clone()))

    got = _capture_features(monitor, model, opt, loader, nn.CrossEntropyLoss(), snapshot)
    monitor.flush()
    batches = list(loader)
    assert len(got) == len(batches) == 4
    for (x, _), (_, feats), (w, b) in zip(batches, got, weights, strict=False):
        expected = (nn.functional.conv2d(x, w, b) * 2.0).flatten(1)
        assert (expected < 0).any()  # the ReLU would have changed these
        torch.testing.assert_close(feats, expected, rtol=0, atol=0)


@pytest.mark.parametrize("overlap", [False, True])
def test_jsonl_sink_appends_and_flushes_every_record(tmp_path, overlap):
    path = tmp_path / "records.jsonl"
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, jsonl=str(path), train_every=1, overlap=overlap
    )
    lines_seen = []
    train(
        model,
        opt,
        loader,
        epochs=2,
        after_step=lambda: lines_seen.append(len(path.read_text().splitlines())),
    )
    # On disk right after each step; with overlap, at the next step (the worker made it).
    lag = int(overlap)
    assert lines_seen == [i + 1 - lag for i in range(len(lines_seen))]
    monitor.flush()
    assert len(path.read_text().splitlines()) == len(lines_seen)
    back = read_jsonl(path)
    assert [r.as_dict() for r in back] == [r.as_dict() for r in monitor.history]
    for line in path.read_text().splitlines():
        d = json.loads(line)  # strict JSON: NaN/Inf are stored as "nan"/"inf" strings
        assert {"step", "epsilon", "mi", "noise_multiplier", "monitor_seconds"} <= d.keys()


def test_the_jsonl_gets_each_record_before_the_sinks_and_its_folders_are_made(tmp_path):
    """The JSONL is the first sink (a user sink that raises, Ctrl-C say, cannot keep a record
    out of it), and a path in folders not yet made is made, as the sink itself makes them.
    Reference: the file's line count as each user sink is called."""
    path = tmp_path / "runs" / "a" / "records.jsonl"
    engine, model, opt, loader = make_private(poisson=False)
    on_disk = []
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, estimator=None, jsonl=path, overlap=False,
        sinks=lambda r: on_disk.append((r.step, len(path.read_text().splitlines()))),
    )  # fmt: skip
    train(model, opt, loader)
    monitor.detach()
    assert on_disk == [(i, i + 1) for i in range(len(loader))]
    assert [r.step for r in read_jsonl(path)] == list(range(len(loader)))


def test_record_contents_and_summary():
    engine, model, opt, loader = make_private(poisson=False, noise=0.5, clip=2.0)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    train(model, opt, loader, epochs=3, criterion=criterion)
    r = monitor.history[-1]
    assert isinstance(r, LeakageRecord)
    assert (r.batch_size, r.noise_multiplier, r.max_grad_norm) == (16, 0.5, 2.0)
    assert r.sample_rate == engine.accountant.history[-1][1]
    assert r.mi_bound == 1 / (2 * 0.5**2)
    # Fixed batches (poisson=False), read from the module: one release per epoch, 3 epochs
    expected = mi_upper_bound(0.5, r.sample_rate, r.step + 1, poisson_sampling=False)
    assert r.mi_upper_bound == expected == 3 * 1 / (2 * 0.5**2)
    assert r.monitor_seconds > 0
    v = r.mi["private/oracle"]
    assert v.ci_low <= v.nats <= v.ci_high and v.n == 16
    for key in ("clipped/mine", "private/mine"):  # an e^T mean's interval needs 32 pairs
        v = r.mi[key]
        assert v.n == 16 and math.isfinite(v.nats)
        assert math.isnan(v.ci_low) or v.ci_low == v.nats == v.ci_high == 0  # (0: the null)
    assert r.mi["private/oracle"].nats <= math.log(16)
    text = monitor.summary()
    for word in ("private/oracle", "clipped/mine", "epsilon", f"{r.epsilon:.3f}"):
        assert word in text
    assert "not bounds" not in text
    # Per-step rows beside a whole-run figure: the summary says which is which.
    one = " ".join(text.split())
    assert f"any one example has leaked <= {r.mi_upper_bound:.4g} nats over the run" in one
    assert "MI accountant's figure is over the run so far" in one
    assert "not a bound on these rows" in one


def test_a_record_has_the_per_step_channel_bound_only_when_it_measures_the_private_view():
    """``mi_bound`` bounds the private view's figures (a Gaussian channel, 1 / (2 sigma^2)
    nats); without that view no figure is under it and the record carries none, while the
    whole-run bound, of the training itself, is there either way."""
    for views, bound in ((("raw", "clipped"), None), (("private",), 1 / (2 * 0.5**2))):
        engine, model, opt, loader = make_private(poisson=False, noise=0.5)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, views=views, train_every=1)
        train(model, opt, loader)
        monitor.detach()
        for r in monitor.history:
            assert r.mi_bound == bound
            whole = mi_upper_bound(0.5, r.sample_rate, r.step + 1, poisson_sampling=False)
            assert r.mi_upper_bound == whole


def _cells(text: str, key: str) -> list[str]:
    """The cells of the summary table's row for ``key``."""
    row = next(line for line in text.splitlines() if line.startswith(f"│ {key} "))
    return [c.strip() for c in row.strip("│").split("│")]


def test_the_table_shows_small_and_infinite_bounds_and_what_each_mean_averages(monkeypatch):
    """At sigma 20 the bound per step, 1/(2 * 400) = 0.00125 nats, read 0.001; at sigma 0 its
    infinite bound read '-', the mark of a figure that does not apply, and mi.png listed it in
    the legend with no line and no note; a series some of the last records lack was headed
    'mean of last N' over fewer than N values."""
    from opacus_mi import plots
    from opacus_mi.report import fmt_interval, mean_with_ci, summary_table

    texts = []
    monkeypatch.setattr(
        plots, "_save", lambda fig, path: texts.extend(t.get_text() for t in fig.axes[0].texts)
    )
    for sigma, bound in ((20.0, "0.00125"), (0.0, "inf")):
        engine, model, opt, loader = make_private(poisson=False, noise=sigma)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
        train(model, opt, loader)
        records = list(monitor.history)
        assert _cells(summary_table(records), "private/oracle")[-1] == bound
        texts.clear()
        plots.plot_mi(records, "unused.png")
        assert any(f"bound/step {bound}" in t for t in texts) == (sigma == 0)
    # (The learned figures begin once the critics' windows hold pairs: not at the first step.)
    learned = [r.mi["clipped/mine"].nats for r in records if "clipped/mine" in r.mi]
    finite = [x for x in learned if math.isfinite(x)]
    assert 0 < len(finite) < len(records) == 6
    mean, lo, hi = mean_with_ci(finite)
    text = summary_table(records)
    assert "mean of last 6" in text
    cells = _cells(text, "clipped/mine")
    assert cells[2] == f"{fmt_interval(mean, lo, hi)} (n={len(finite)})"
    assert "(n=" not in _cells(text, "private/oracle")[2]


def test_plots_of_one_record_or_no_finite_figure(monkeypatch):
    """One record put the step axis at -0.04 .. 0.04; a run with no finite figure left the
    zero line out of view and listed its series as if they had data."""
    from opacus_mi import plots

    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
    train(model, opt, loader)
    one = [monitor.history[0]]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_mi(one, "unused.png")
    plots.plot_epsilon(one, "unused.png")
    for fig in figures:
        ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t]
        assert ticks and all(float(t).is_integer() for t in ticks)
    figures.clear()
    blank = copy.deepcopy(one)
    for v in blank[0].mi.values():
        v.nats = v.ci_low = v.ci_high = math.nan
    plots.plot_mi(blank, "unused.png")
    ax = figures[0].axes[0]
    low, high = ax.get_ylim()
    assert low < 0 < high
    labels = ax.get_legend_handles_labels()[1]
    assert "private/oracle (no finite figure)" in labels


def test_a_misspelled_series_and_a_detached_monitors_criterion_say_so():
    """series('private/orcale') returned [] (read as "nothing measured"); a criterion wrapped
    by a monitor since detached went on passing its labels to no monitor, and the next
    monitor's critics learned without them, with no word."""
    engine, model, opt, loader = make_private(poisson=False)
    first = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
    criterion = first.wrap_criterion(nn.CrossEntropyLoss())
    train(model, opt, loader, criterion=criterion)
    with pytest.raises(KeyError, match=r"'private/orcale'.* reports \['clipped/mine', "):
        first.series("private/orcale")
    assert first.series("private/oracle")
    assert set(first.keys()) == {"clipped/mine", "private/mine", "private/oracle"}
    first.detach()
    second = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
    assert second.series("clipped/mine") == []  # (reported, not yet measured)
    x, y = next(iter(loader))
    with pytest.warns(RuntimeWarning, match="wrapped by a monitor that is detached"):
        loss = criterion(model(x), y)
    assert torch.equal(loss, nn.functional.cross_entropy(model(x), y))
    second.detach()
    with warnings.catch_warnings():  # (a test loss after training, no monitor on the model)
        warnings.simplefilter("error")
        fresh = first.wrap_criterion(nn.CrossEntropyLoss())
        fresh(model(x), y)


def test_a_detached_monitors_criterion_says_so_once_not_at_every_call():
    """The warning that a criterion's monitor is detached is said once per wrapper: under an
    "always" filter (pytest's, a notebook's) a loop said it at every batch."""
    engine, model, opt, loader = make_private(poisson=False)
    first = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None)
    criterion = first.wrap_criterion(nn.CrossEntropyLoss())
    first.detach()
    second = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None)
    x, y = next(iter(loader))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            criterion(model(x), y)
    said = [w for w in caught if "wrapped by a monitor that is detached" in str(w.message)]
    assert len(said) == 1
    second.detach()


def test_a_criterion_wrapped_twice_records_its_labels_once_and_says_nothing():
    """From a review: the warning's own advice (wrap again with the monitor now attached) around
    a detached monitor's wrapper warned at each run that the labels reach no monitor, though the
    outer wrapper passed them; one monitor's wrapper wrapped again by it warned of a second
    target for one forward. Reference: the loss wrapped once (records, weights)."""

    def run(wrap):
        engine, model, opt, loader = make_private(poisson=False)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
        loss_fn, monitor = wrap(monitor, lambda: LeakageMonitor(
            engine, model, opt, delta=1e-5, train_every=1))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # (nothing said either)
            train(model, opt, loader, criterion=loss_fn)
            monitor.detach()
        return without_timing(monitor.history), [p.detach().clone() for p in model.parameters()]

    def once(monitor, _):
        return monitor.wrap_criterion(nn.CrossEntropyLoss()), monitor

    def twice(monitor, _):
        return monitor.wrap_criterion(monitor.wrap_criterion(nn.CrossEntropyLoss())), monitor

    def around_a_detached_monitors(monitor, new_monitor):
        wrapped = monitor.wrap_criterion(nn.CrossEntropyLoss())
        monitor.detach()
        monitor = new_monitor()
        return monitor.wrap_criterion(wrapped), monitor

    def outer_sees_no_target(monitor, _):  # (its target under another name: the inner records)
        inner = monitor.wrap_criterion(nn.CrossEntropyLoss())
        outer = monitor.wrap_criterion(lambda logits, labels: inner(logits, labels))
        return lambda out, y: outer(logits=out, labels=y), monitor

    want_records, want_weights = run(once)
    assert any(k.startswith("clipped/") for k in want_records[-1]["mi"])
    for wrap in (twice, around_a_detached_monitors, outer_sees_no_target):
        records, weights = run(wrap)
        assert records == want_records, wrap.__name__
        assert all(torch.equal(a, b) for a, b in zip(weights, want_weights, strict=True))


def test_the_summary_names_the_series_asked_for_that_have_no_figure(tmp_path):
    """A one-step run with a critic: its summary, report.html and mi.png showed private/oracle
    alone, and nothing said the clipped and private critics (or the semi-oracle) had no figure
    yet. The series the run's settings ask for are named under the table when absent."""
    from opacus_mi.report import summary_table
    from opacus_mi.training import _series_asked, write_run_outputs

    def record(step, keys):
        return LeakageRecord(
            step=step, batch_size=16, noise_multiplier=1.0, max_grad_norm=1.0,
            sample_rate=0.1, epsilon=1.0, delta=1e-5,
            mi={k: MIValue(0.2, 0.1, 0.3, 16) for k in keys},
        )  # fmt: skip

    config = {"views": ["clipped", "private"], "estimator": "mine", "semi_oracle": True}
    asked = _series_asked(config)
    assert asked == ["clipped/mine", "private/mine", "private/oracle", "private/semi"]
    # The semi-oracle learns without an estimator too (--estimator none --semi-oracle).
    assert _series_asked({**config, "estimator": "none"}) == ["private/oracle", "private/semi"]
    assert _series_asked({**config, "semi_oracle": False}) == asked[:3]
    assert _series_asked({"views": ["raw"], "estimator": "nwj"}) == ["raw/nwj"]
    assert _series_asked(None) == [] == _series_asked({"views": "clipped"})
    early = [record(0, ["private/oracle"]), record(1, ["private/oracle", "clipped/mine"])]
    text = summary_table(early, expected=asked)
    assert "no figure yet: private/mine, private/semi;" in text
    assert "windows hold pairs" in text and "fitted its subspace" in text
    text = summary_table(early, expected=["private/oracle", "clipped/mine"])
    assert "no figure yet" not in text  # (every series asked for has one)
    assert "no figure yet" not in summary_table(early)  # (nothing asked: the API's tables)
    summary, _ = write_run_outputs(tmp_path, early[:1], config=config, results=None)
    assert "no figure yet: clipped/mine, private/mine, private/semi;" in summary
    assert "no figure yet" in (tmp_path / "report.html").read_text()


def test_the_monitors_own_summary_names_its_series_without_a_figure():
    """``monitor.summary()`` (the two-line snippet's table) showed private/oracle alone after a
    short run, and nothing said the critics had no figure yet: the CLI's summary said so, the
    API's did not. Reference: the series the history holds (``keys()``) against those the
    monitor's settings report."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, semi_oracle=True)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    x, y = next(iter(loader))
    opt.zero_grad()
    criterion(model(x), y).backward()
    opt.step()
    asked = ["clipped/mine", "private/mine", "private/oracle", "private/semi"]
    missing = [k for k in asked if k not in monitor.keys()]
    assert "private/oracle" in monitor.keys() and missing  # (one step: no critic figure yet)
    assert f"no figure yet: {', '.join(missing)};" in monitor.summary()
    monitor.detach()
    engine, model, opt, loader = make_private(poisson=False)
    oracle = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, every=1)
    train(model, opt, loader)
    assert oracle.keys() == ["private/oracle"] and "no figure yet" not in oracle.summary()
    oracle.detach()


def test_an_intervals_ends_are_given_to_its_midpoints_places():
    """The sweep's sigma-4 oracle cell read 0.015 [0.00915, 0.021]: each figure by its own rule,
    one end to more places than the figure it brackets. The ends now take the midpoint's
    decimals, whatever the midpoint's own rule (3 decimals, or 3 significant digits below 0.01),
    and a figure that is missing, infinite or in exponent form keeps its own, as does an end
    those decimals would show as zero (-0.000 for -0.0004)."""
    from opacus_mi.report import fmt_interval, fmt_number

    nan, inf = math.nan, math.inf
    cases = {
        (0.015, 0.00915, 0.021): "0.015 [0.009, 0.021]",
        (2.311, 1.5967, 3.0412): "2.311 [1.597, 3.041]",
        (0.00125, 0.000912, 0.0016): "0.00125 [0.00091, 0.00160]",
        # (a non-zero end those places round to zero: its own rule, not "-0.000")
        (0.2, -0.0004, 0.5): "0.200 [-0.0004, 0.500]",
        (0.0, -4e-05, 9e-04): "0.000 [-4e-05, 0.001]",
        (0.0, 0.0, 0.0): "0.000 [0.000, 0.000]",
        (0.5, nan, inf): "0.500 [-, inf]",
        (nan, 0.1, 0.2): "- [0.100, 0.200]",
        (inf, 0.1, inf): "inf [0.100, inf]",
        (1.5e-7, 1e-7, 2.5e-7): "1.5e-07 [1e-07, 2.5e-07]",
    }
    for (mid, lo, hi), said in cases.items():
        assert fmt_interval(mid, lo, hi) == said
        # (the midpoint itself as fmt_number gives it, always)
        assert said.partition(" [")[0] == fmt_number(mid)
    assert fmt_interval(0.432, 0.0091, 0.519, 2) == "0.43 [0.01, 0.52]"


@pytest.mark.parametrize("kind", ["smile", "semi"])
def test_the_summary_does_not_call_smile_or_semi_rows_lower_bounds(monkeypatch, kind):
    """SMILE clips its critic's marginal term: on a known 5 nats it read 5.36 on average, so
    the table's and the plot's 'learned rows are lower bounds' must except it; so must they
    the semi-oracle's, an estimate (a learned clean-token model scored with the known noise),
    which they called a lower bound too (report.is_lower_bound already excepted both)."""
    from opacus_mi import plots
    from opacus_mi.report import is_lower_bound

    engine, model, opt, loader = make_private(poisson=False)
    settings = (
        {"estimator": "smile"}
        if kind == "smile"
        else {"estimator": None, "semi_oracle": True, "token_dim": 8, "every": 1}
    )
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1, **settings)
    train(model, opt, loader, epochs=2)
    key = "clipped/smile" if kind == "smile" else "private/semi"
    assert key in monitor.history[-1].mi and not is_lower_bound(kind)
    said = {
        "smile": "smile rows are estimates, not bounds",
        "semi": "private/semi is an estimate, not a bound",
    }
    assert said[kind] in monitor.summary()
    titles = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: titles.append(fig.axes[0].get_title()))
    plots.plot_mi(monitor.history, "unused.png")
    assert f"{kind}: an estimate" in titles[0]


def test_state_dict_round_trip_continues_identically():
    def run(split: bool):
        engine, model, opt, loader = make_private(poisson=False)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
        crit = monitor.wrap_criterion(nn.CrossEntropyLoss())
        train(model, opt, loader, criterion=crit)
        if split:
            state = monitor.state_dict()
            monitor.detach()
            monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
            monitor.load_state_dict(state)
            crit = monitor.wrap_criterion(nn.CrossEntropyLoss())
        train(model, opt, loader, criterion=crit)
        return [r.as_dict() for r in monitor.history]

    a, b = run(False), run(True)
    for ra, rb in zip(a, b, strict=True):
        ra.pop("monitor_seconds"), rb.pop("monitor_seconds")
        assert ra == rb


def test_a_state_kept_in_memory_is_a_snapshot_and_loads_into_its_own_copy():
    """The critics' weights and Adam moments in ``state_dict()`` were the live ones: a state
    kept in memory went on training with the monitor (a rollback to it scored pairs its critic
    had trained on: clipped/mine 1.61 -> 4.10), and a monitor loaded from it shared its Adam
    moments with the source."""
    import io

    def critic_tensors(state):
        est = state["estimators"]["clipped"]
        return [*est["critic"].values(), *itertools.chain.from_iterable(
            v.values() for v in est["optimizer"]["state"].values()
        )]  # fmt: skip

    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, every=1, train_every=1, views=("clipped", "private")
    )
    crit = monitor.wrap_criterion(nn.CrossEntropyLoss())
    train(model, opt, loader, criterion=crit)
    state = monitor.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    kept = [t.clone() for t in critic_tensors(state)]
    train(model, opt, loader, criterion=crit)  # the monitor's critic trains on
    assert all(torch.equal(a, b) for a, b in zip(critic_tensors(state), kept, strict=True))
    buffer.seek(0)
    from_disk = torch.load(buffer, weights_only=True)
    engine2, model2, opt2, _ = make_private(poisson=False)
    other = LeakageMonitor(
        engine2, model2, opt2, delta=1e-5, every=1, train_every=1, views=("clipped", "private")
    )
    other.load_state_dict(state)
    theirs = other.estimators["clipped"].optimizer.state_dict()["state"]
    mine = monitor.estimators["clipped"].optimizer.state_dict()["state"]
    shared = {id(t) for v in mine.values() for t in v.values() if isinstance(t, torch.Tensor)}
    assert not any(id(t) in shared for v in theirs.values() for t in v.values())
    pairs = zip(critic_tensors(state), critic_tensors(from_disk), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_an_earlier_versions_state_without_own_step_resumes_every_on_its_steps():
    """A state saved before ``own_step`` was: the monitor's own step count is its steps, so a
    run resumed mid-schedule (every=2, saved after 3 steps) measures the steps the
    uninterrupted run measures. Reference: that run's record steps."""

    def run(split: bool) -> list[int]:
        engine, model, opt, loader = make_private(poisson=False)
        kwargs = {"delta": 1e-5, "every": 2, "estimator": None}
        monitor = LeakageMonitor(engine, model, opt, **kwargs)
        for i, (x, y) in enumerate(loader):
            if split and i == 3:
                state = monitor.state_dict()
                del state["own_step"]  # (an earlier version's)
                monitor.detach()
                monitor = LeakageMonitor(engine, model, opt, **kwargs)
                monitor.load_state_dict(state)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        monitor.detach()
        return [r.step for r in monitor.history]

    assert run(split=True) == run(split=False) == [0, 2, 4]


def test_schedule_note_after_a_resume_counts_the_whole_run():
    """A monitor attached after the accountant was restored, then given the checkpoint: the
    note said 'measured 30 of 10 steps' (the checkpoint's records over the steps since attach)."""
    engine, model, opt, loader = make_private(poisson=False, n=16 * 10)
    budgeted = {"delta": 1e-5, "estimator": None, "every": None}  # (conftest pins every=1)
    first = LeakageMonitor(engine, model, opt, **budgeted)
    train(model, opt, loader)
    state = first.state_dict()
    first.detach()
    second = LeakageMonitor(engine, model, opt, **budgeted)
    second.load_state_dict(state)
    train(model, opt, loader)
    note = second.schedule_note()
    assert f"measured {second.record_count} of {2 * len(loader)} steps" in note, note
    # (its time share is this process's, since the resume; the first monitor's, of no resume)
    assert f"training loop's since the resume at step {len(loader)} (" in note, note
    assert "since the resume" not in first.schedule_note()


def test_an_accountant_loaded_after_attach_numbers_the_records_and_not_the_note():
    """Opacus's ``load_checkpoint`` after the monitor was attached: the accountant's count jumps
    by the earlier run's steps. Records follow the accountant's numbering; the schedule note
    counts the steps this loop trained (a mutation audit found the note unguarded: it would
    say 'measured 8 of 12 steps')."""
    engine, model, opt, loader = make_private(poisson=False, n=16 * 4)
    train(model, opt, loader)  # the earlier run: 4 steps counted
    saved = copy.deepcopy(engine.accountant.state_dict())
    engine, model, opt, loader = make_private(poisson=False, n=16 * 4, seed=1)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, every=None)
    engine.accountant.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="opacus-mi: .*")
        train(model, opt, loader, epochs=2)
    records = monitor.history
    assert records and records[0].step == len(loader)  # (numbered as the accountant counts)
    assert records[-1].step < 3 * len(loader)
    note = monitor.schedule_note()
    assert f"measured {len(records)} of {2 * len(loader)} steps" in note, note


def _trained_monitor(seed: int = 0, **settings):
    """The tiny CNN trained one epoch (6 fixed batches) with a monitor measuring every 3rd
    step and training its critics at each measured one."""
    engine, model, opt, loader = make_private(poisson=False, seed=seed)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=3, train_every=1, **settings)
    train(model, opt, loader)
    return engine, model, opt, loader, monitor


@pytest.mark.parametrize("damage", ["critic weights", "a later part"])
def test_a_state_that_fails_to_load_leaves_the_monitor_as_it_was(monkeypatch, damage):
    """A state with a part that would not load (a critic's weights of another shape) raised
    once the steps, the schedule, the first critic and the generator had been replaced: the
    monitor then measured steps 0, 3, 5, 8, 11 (not 0, 3, 6, 9) with other figures. Critic
    weights are now tried on a throwaway critic first (a ValueError naming the critic, before
    Opacus's checkpoint is loaded too), and any other part that fails puts back what was
    replaced: the monitor goes on exactly as one never given the state."""
    engine, model, opt, loader, reference = _trained_monitor()
    train(model, opt, loader)
    expected = without_timing(reference.history)

    state = _trained_monitor(seed=1)[-1].state_dict()  # another run's, of the same settings
    engine, model, opt, loader, monitor = _trained_monitor()  # (seeded as the reference)
    if damage == "critic weights":
        weights = state["estimators"]["private"]["critic"]
        name = next(iter(weights))
        weights[name] = torch.zeros(*weights[name].shape[:-1], weights[name].shape[-1] + 1)
        with pytest.raises(ValueError, match="private critic does not load .*damaged"):
            monitor.load_state_dict(state)
    else:
        victim = monitor.estimators["private"]  # loaded after the clipped view's critic
        calls = []

        def fails_once(part_state):
            calls.append(True)
            if len(calls) == 1:
                raise RuntimeError("a damaged window")
            return type(victim).load_state_dict(victim, part_state)

        monkeypatch.setattr(victim, "load_state_dict", fails_once)
        with pytest.raises(RuntimeError, match="a damaged window"):
            monitor.load_state_dict(state)
        assert len(calls) == 2  # (the second: its own state put back)
    train(model, opt, loader)
    assert [r["step"] for r in expected] == [0, 3, 6, 9]
    assert without_timing(monitor.history) == expected


def test_a_resume_beside_an_unmonitored_model_on_the_engine_is_not_warned():
    """One engine, two private models, a monitor on A only; B steps before A. The accountant
    and A's state, saved together and restored together, looked 'ahead' at A's first step
    (B's step had counted), and the user was told to restore the accountant they had."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    def setup():
        torch.manual_seed(0)
        engine = PrivacyEngine(accountant="rdp")
        made = []
        for seed in (0, 1):
            model = TinyCNN()
            made.append(
                engine.make_private(
                    module=model,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    data_loader=DataLoader(make_data(48, seed=seed), batch_size=16),
                    noise_multiplier=1.0,
                    max_grad_norm=1.0,
                    poisson_sampling=False,
                )
            )
        a, b = made
        return engine, a, b, LeakageMonitor(engine, a[0], a[1], delta=1e-5, every=1)

    def epoch(a, b):
        for (xa, ya), (xb, yb) in zip(a[2], b[2], strict=True):
            for (model, opt, _), x, y in ((b, xb, yb), (a, xa, ya)):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

    engine, a, b, monitor = setup()
    epoch(a, b)
    saved = copy.deepcopy((engine.accountant.state_dict(), a[0].state_dict(), b[0].state_dict()))
    state, rng = monitor.state_dict(), torch.get_rng_state()
    epoch(a, b)
    whole = without_timing(monitor.history)
    monitor.detach()
    engine, a, b, monitor = setup()
    engine.accountant.load_state_dict(saved[0])
    a[0].load_state_dict(saved[1])
    b[0].load_state_dict(saved[2])
    monitor.load_state_dict(state)
    torch.set_rng_state(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        epoch(a, b)
    assert without_timing(monitor.history) == whole
    assert [r["step"] for r in whole] == [1, 3, 5, 7, 9, 11]


def test_a_state_the_engines_accountant_does_not_match_is_warned():
    """A monitor state loaded without the accountant of its checkpoint (model, optimizer and
    monitor saved by hand, the accountant left fresh): the records followed the accountant's
    count without a word, so the history ran 0..5, 0, 1, ... and epsilon fell back."""
    *_, first = _trained_monitor()
    state = first.state_dict()
    engine, model, opt, loader = make_private(poisson=False, seed=0)  # a fresh accountant
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=3, train_every=1)
    monitor.load_state_dict(state)
    says = "accountant had counted 6 steps, but it has counted 0: .* 5 to 0"
    with pytest.warns(RuntimeWarning, match=says):
        train(model, opt, loader)
    # An accountant ahead of the state (restored from a later checkpoint, or never rolled back
    # with the model and the monitor in a notebook) is one too: the history jumped 5 to 12.
    # (Beside an attached monitor of another model on the engine: a notebook's earlier cell)
    engine, model, opt, loader = make_private(poisson=False, seed=0)
    train(model, opt, loader, epochs=2)
    other = TinyCNN()
    other, other_opt, _ = engine.make_private(
        module=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
    )  # fmt: skip
    stale = LeakageMonitor(engine, other, other_opt, delta=1e-5, every=3)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=3, train_every=1)
    monitor.load_state_dict(state)
    says = "accountant had counted 6 steps, but it has counted 12: .* 5 to 12"
    with pytest.warns(RuntimeWarning, match=says):
        train(model, opt, loader)
    monitor.detach()
    stale.detach()
    # Restored with it (the engine's own checkpoint state), nothing is said.
    engine, model, opt, loader = make_private(poisson=False, seed=0)
    engine.accountant.load_state_dict(first.engine.accountant.state_dict())
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=3, train_every=1)
    monitor.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train(model, opt, loader)
    assert [r.step for r in monitor.history] == [0, 3, 6, 9]


def test_a_state_of_another_input_size_or_delta_says_so():
    """Critics saved for features of another width (another model or input size, the same
    settings) loaded silently and were then blamed on 'inputs of varying shape'; a state of
    another delta mixed two deltas' epsilons in one history without a word."""
    *_, first = _trained_monitor(features=lambda x: x.flatten(1))  # 36 per example
    state = first.state_dict()
    for delta, features in ((1e-6, lambda x: x.flatten(1)), (1e-5, lambda x: x.flatten(1)[:, :20])):
        engine, model, opt, loader = make_private(poisson=False, seed=0)
        engine.accountant.load_state_dict(first.engine.accountant.state_dict())
        monitor = LeakageMonitor(
            engine, model, opt, delta=delta, every=3, train_every=1, features=features
        )
        if delta != 1e-5:
            mixed = "at delta 1e-05, this monitor's at delta 1e-06"
            with pytest.warns(RuntimeWarning, match=mixed):
                monitor.load_state_dict(state)
            continue
        monitor.load_state_dict(state)
        says = "features of width 36, this step's have width 20: the state was saved with another"
        with pytest.warns(RuntimeWarning, match=says):
            train(model, opt, loader)
        assert all("features_width_changed" in r.flags for r in monitor.history[-2:])


def test_a_width_change_after_a_resumed_step_is_the_inputs_not_the_states():
    """Only the first step after a load can find the state's critics of another width; once
    a step of their width was measured, a later change is the inputs' (varying shape) and
    said as such. Reference: the widths fed (36, then 20)."""
    width = [36]

    def features(x):
        return x.flatten(1)[:, : width[0]]

    def monitor_of(engine, model, opt):
        return LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1, features=features)

    engine, model, opt, loader = make_private(poisson=False)
    first = monitor_of(engine, model, opt)
    train(model, opt, loader)
    state = first.state_dict()
    first.detach()
    resumed = monitor_of(engine, model, opt)
    resumed.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(loader):
            width[0] = 36 if i < 2 else 20
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        resumed.flush()
    said = [str(w.message) for w in caught]
    assert any("features changed width (36 -> 20 per example)" in m for m in said), said
    assert not any("monitor state loaded" in m for m in said), said
    resumed.detach()
    assert [bool(r.flags) for r in resumed.history[-6:]] == [False] * 2 + [True] * 4


@pytest.mark.parametrize(
    "other, says",
    [
        ({"views": ("clipped",)}, "views=['clipped', 'private'] there, ['clipped'] here"),
        ({"estimator": "infonce"}, "estimator='mine' there, 'infonce' here"),
        ({"token_dim": 32}, "token_dim=64 there, 32 here"),
        ({"estimator": None}, "estimator='mine' there, None here"),
        ({"seed": 1}, "seed=0 there, 1 here"),  # another sketch: the critics fit other tokens
        # critics of another width: rebuilt at the saved one, every later step then flagged
        # features_width_changed (a warning about inputs of varying shape) with no figure
        ({"features": "fc"}, "features=None there, ['fc'] here"),
        ({"features": ("input", "act")}, "features=None there, ['input', 'act'] here"),
        ({"features": lambda x: x.flatten(1)}, "features=None there, 'callable' here"),
    ],
)
def test_a_checkpoint_loads_only_into_a_monitor_with_its_settings(other, says):
    """Another estimator or token size used to load silently (a MINE critic scoring InfoNCE, a
    critic for 64-dim tokens rebuilt from nothing at the next step); other views raised a bare
    KeyError after half the state had been loaded. Now a ValueError, before anything changes."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
    train(model, opt, loader)
    state = monitor.state_dict()
    monitor.detach()
    fresh = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1, **other)
    assert fresh.steps == len(loader)  # numbered on from the accountant's steps
    with pytest.raises(ValueError, match=re.escape(says)):
        fresh.load_state_dict(state)
    assert fresh.steps == len(loader) and not fresh.history  # untouched
    with pytest.raises(ValueError, match="not a LeakageMonitor.state_dict"):
        fresh.load_state_dict({"model": {}})
    # A corrupt record or a generator state of another size: refused before anything changed
    # (steps and critics were replaced, then it raised)
    corrupt = {**fresh.state_dict(), "steps": 999}  # (its own settings and critics)
    for bad in (
        {"history": [{**state["history"][0], "step": "zero"}]},
        {"generator": torch.zeros(3, dtype=torch.uint8)},
    ):
        with pytest.raises(ValueError, match="monitor state's (history|generator) does not load"):
            fresh.load_state_dict({**corrupt, **bad})
        assert fresh.steps == len(loader) and not fresh.history
    # An earlier version's checkpoint (without seed, token_dims and features) is compared on
    # what it has
    for key in ("seed", "token_dims", "features"):
        state["settings"].pop(key, None)
    if "seed" in other or "features" in other:
        fresh.load_state_dict(state)
        assert fresh.steps == len(loader) and len(fresh.history) == len(loader)


def test_a_checkpoint_without_settings_is_refused_by_its_critics_views_kind_and_tokens():
    """An earlier version's state saved no settings: its critics themselves say what they are
    for (their views, kind and token encoder, a state older still none: sketch tokens), and
    a monitor of other ones refuses it, naming the argument, before anything changes.
    Reference: the settings of the monitor that saved it."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
    train(model, opt, loader)
    state = monitor.state_dict()
    monitor.detach()
    del state["settings"]  # (an earlier version's)
    for est_state in state["estimators"].values():
        est_state.pop("token_encoder")  # (older still: sketch tokens, never named)
    cases = [
        ({"views": ("private",)}, "critics are for views ['clipped', 'private'], this monitor's "
         "for ['private']: create it with the same views"),
        ({"estimator": "infonce"}, "clipped critic was saved with kind='mine', this monitor's "
         "has 'infonce': create the monitor with estimator='mine'"),
        ({"tokenizer": "autoencoder"}, "clipped critic was saved with token_encoder='sketch', "
         "this monitor's has 'autoencoder': create the monitor with tokenizer='sketch'"),
    ]  # fmt: skip
    for other, says in cases:
        fresh = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1, **other)
        with pytest.raises(ValueError, match=re.escape(says)):
            fresh.load_state_dict(state)
        assert fresh.steps == len(loader) and not fresh.history  # untouched
        fresh.detach()
    same = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
    same.load_state_dict(state)
    assert same.steps == len(loader) and len(same.history) == len(loader)
    same.detach()


@pytest.mark.parametrize("overlap", [False, True])
def test_max_history_keeps_the_latest_records_and_the_sinks_get_every_one(tmp_path, overlap):
    """Reference: an unbounded monitor on the same run (its history is every record)."""
    path = tmp_path / "records.jsonl"

    def run(**kwargs):
        engine, model, opt, loader = make_private(poisson=False)
        monitor = LeakageMonitor(
            engine, model, opt, delta=1e-5, every=1, estimator=None, overlap=overlap, **kwargs
        )
        train(model, opt, loader, epochs=2)
        return monitor

    full = run()
    kept = run(max_history=4, jsonl=str(path))
    everything = without_timing(full.history)
    assert len(everything) == 12  # 96 examples / 16, twice: more than kept
    assert without_timing(kept.history) == everything[-4:]
    assert without_timing(read_jsonl(path)) == everything  # the sink saw every record
    assert kept.record_count == full.record_count == 12
    assert "records=12" in repr(kept)
    # A checkpoint holds the kept records and the count; a smaller bound trims on loading.
    state = kept.state_dict()
    assert len(state["history"]) == 4 and state["record_count"] == 12
    engine, model, opt, _ = make_private(poisson=False)
    smaller = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, estimator=None, max_history=2)
    smaller.load_state_dict(state)
    assert without_timing(smaller.history) == everything[-2:] and smaller.record_count == 12


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "10"])
def test_max_history_must_be_a_positive_integer(bad):
    engine, model, opt, _ = make_private(poisson=False)
    with pytest.raises(ValueError, match="max_history must be a positive integer"):
        LeakageMonitor(engine, model, opt, delta=1e-5, max_history=bad)


def _private_bag(classes: int):
    """An embedding bag of token ids (mean of 8-d embeddings) to ``classes`` logits, made
    private for batches of 16 (fixed-size: each test feeds its own batches)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, classes)

        def forward(self, x):
            return self.fc(self.emb(x).mean(1))

    torch.manual_seed(0)
    model = Bag()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    return engine, model, opt


@pytest.mark.parametrize("which", ["first", "second"])
@pytest.mark.parametrize("how", ["forward", "error"])
def test_a_step_with_a_chunk_whose_features_do_not_pair_gets_the_oracle_only(how, which):
    """A step of two physical chunks (BatchMemoryManager's way), one of them unpaired: by a
    forward of part of its batch besides (a regulariser: features_unpaired) or by a features
    callable that fails on it (features_error), in the first chunk or the second. The step's
    learned figure was made from the other chunk's rows alone, where the README says such a
    step gets the oracle only (and, under DPDDP, another rank's rows alone: not what a single
    process of the same examples gives). A mutation audit found the first chunk's case and a
    failing callable's unguarded. (No private view here: no oracle.)"""
    engine, model, opt, loader = make_private(poisson=False, batch_size=16)
    halves = (slice(0, 6), slice(6, 16))  # (unequal: the callable knows its chunk by size)
    spoiled_half = halves[0] if which == "first" else halves[1]
    spoiled, now = {3, 4}, {"step": 0}

    def features(x: torch.Tensor) -> torch.Tensor:
        if now["step"] in spoiled and len(x) == spoiled_half.stop - spoiled_half.start:
            raise RuntimeError("a user's bug")
        return x.flatten(1)

    monitor = LeakageMonitor(
        engine,
        model,
        opt,
        delta=1e-5,
        every=1,
        train_every=1,
        views=("clipped",),
        overlap=False,
        **({"features": features} if how == "error" else {}),
    )
    criterion = nn.CrossEntropyLoss()
    if how == "forward":  # (its features: the wrapped criterion's inputs)
        criterion = monitor.wrap_criterion(criterion)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="opacus-mi: .*")
        for step, (x, y) in enumerate(loader):
            now["step"] = step
            for half in halves:
                opt.zero_grad()  # (Opacus keeps a skipped step's sum: BatchMemoryManager's loop)
                loss = criterion(model(x[half]), y[half])
                if how == "forward" and step in spoiled and half == spoiled_half:
                    loss = loss + 0.0 * model(x[half][:4]).sum()  # (4 of the chunk's examples)
                loss.backward()
                opt.signal_skip_step(do_skip=half is halves[0])  # as BatchMemoryManager does
                opt.step()
    monitor.flush()
    records = monitor.history
    flag = "features_unpaired" if how == "forward" else "features_error"
    assert [r.chunks for r in records] == [2] * len(loader)
    assert [r.batch_size for r in records] == [16] * len(loader)
    for r in records:
        if r.step in spoiled:
            assert flag in r.flags and not r.mi, (r.step, r.flags, r.mi)  # (clipped alone)
        elif r.step > 1:  # (the critics' windows hold pairs from the second step on)
            assert r.mi["clipped/mine"].n == 16, r.step


def test_features_of_another_width_are_flagged_not_silently_dropped():
    """Token ids padded per batch make the default features change width from step to step.
    A critic learns on one width: such a step is flagged and warned about (with the fix), the
    critics are neither scored nor fed on it nor rebuilt (they used to restart from scratch,
    silently), and steps of the critics' width go on as before."""
    engine, model, opt = _private_bag(classes=2)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, train_every=1)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    widths = [6] * 8 + [4] + [6] * 4 + [9]  # two steps whose batches were padded otherwise
    g = torch.Generator().manual_seed(1)
    critic = None
    with pytest.warns(RuntimeWarning, match="features changed width.*features=") as caught:
        for step, width in enumerate(widths):
            x = torch.randint(0, 50, (16, width), generator=g)
            y = torch.randint(0, 2, (16,), generator=g)
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
            if step == 7:
                monitor.flush()
                critic = monitor.estimators["clipped"].critic
    records = monitor.history
    flagged = [r.step for r in records if "features_width_changed" in r.flags]
    assert flagged == [8, 13]
    assert sum("features changed width" in str(w.message) for w in caught) == 1  # once
    for r in records:
        if r.step in flagged:
            assert set(r.mi) == {"private/oracle"}  # the oracle needs no features
    assert "clipped/mine" in records[12].mi  # back to the critics' width: scored again
    est = monitor.estimators["clipped"]
    assert est.critic is critic and est.resets == 0  # not rebuilt
    assert est.batches_seen == len(widths) - len(flagged)


def test_micro_batches_of_other_widths_in_one_step_are_flagged_as_of_another_width():
    """Gradients accumulated over two micro-batches of token ids, each padded to its own length:
    their 8 + 8 feature rows pair with the 16 gradient rows, only their widths differ. The step
    was flagged features_unpaired, with a warning blaming a regulariser or EmbeddingBag; it is
    a width change, flagged and said as one (with the fix), and the critics go on after it."""
    engine, model, opt = _private_bag(classes=3)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, train_every=1)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(1)
    steps = [(6, 6)] * 4 + [(6, 7)] + [(6, 6)] * 2  # step 4: the two padded otherwise
    with pytest.warns(RuntimeWarning, match="features changed width") as caught:
        for widths in steps:
            opt.zero_grad()
            for width in widths:  # two micro-batches of 8 sequences into one step
                x = torch.randint(0, 50, (8, width), generator=g)
                criterion(model(x), x[:, 0] % 3).backward()
            opt.step()
    said = [str(w.message) for w in caught if "opacus-mi" in str(w.message)]
    assert len(said) == 1 and "within one step (9 -> 10 per example" in said[0], said  # (+3 labels)
    assert "features=" in said[0] and "do not pair" not in said[0]
    records = monitor.history
    assert [r.step for r in records if r.flags] == [4]
    assert records[4].flags == ["features_width_changed"]
    assert set(records[4].mi) == {"private/oracle"}
    assert "clipped/mine" in records[6].mi  # the critics' width again: scored
    assert monitor.estimators["clipped"].resets == 0


def test_a_killed_runs_torn_line_is_named_and_a_resumed_run_keeps_its_records(tmp_path):
    """A killed run leaves a torn last line without a newline. The resumed run's first record
    was appended onto it, and read_jsonl skipped the merged line without a word: both lost."""
    from opacus_mi.records import JsonlSink

    path = tmp_path / "records.jsonl"
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None)
    train(model, opt, loader, epochs=1)
    first, second = monitor.history[0], monitor.history[1]
    whole = json.dumps(first.as_dict()) + "\n"
    path.write_text(whole + json.dumps(second.as_dict())[:40], encoding="utf-8")  # killed
    sink = JsonlSink(path)  # the resumed run
    sink(second)
    sink.close()
    with pytest.warns(RuntimeWarning, match=r"skipped 1 line\(s\) .*\(line 2\)"):
        back = read_jsonl(path)
    assert [r.as_dict() for r in back] == [first.as_dict(), second.as_dict()]
    # a clean file reads without a warning
    path.write_text(whole, encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.as_dict() for r in read_jsonl(path)] == [first.as_dict()]
    # complete JSON that is not a record is not skipped: this is not a records file
    path.write_text(whole + '{"step": 1, "colour": "red"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: JSON but not a leakage record"):
        read_jsonl(path)


def test_records_files_of_a_resumed_run_an_old_version_or_another_kind(tmp_path):
    """read_jsonl against what can be in a records file besides one clean run."""
    path = tmp_path / "records.jsonl"
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None)
    train(model, opt, loader, epochs=1)
    lines = [json.dumps(r.as_dict()) for r in monitor.history]  # steps 0..5
    # A run resumed from a checkpoint at step 4 after a crash at step 5: its steps 4 and 5
    # follow the abandoned run's. Both were read (steps repeated, means over a run that no
    # longer exists); the later records supersede, with a warning.
    redone = [json.loads(line) for line in lines[4:]]
    for d in redone:
        d["batch_size"] = 15  # (another draw)
    path.write_text("\n".join(lines + [json.dumps(d) for d in redone]) + "\n", encoding="utf-8")
    with pytest.warns(RuntimeWarning, match=r"left out 2 record\(s\) that a later record"):
        back = read_jsonl(path)
    assert [(r.step, r.batch_size) for r in back] == [(s, 16) for s in range(4)] + [
        (4, 15),
        (5, 15),
    ]
    # An earlier version wrote a non-finite epsilon as null: read as NaN, and reports render
    old = json.loads(lines[0])
    old["epsilon"] = None
    path.write_text(json.dumps(old) + "\n", encoding="utf-8")
    (record,) = read_jsonl(path)
    assert math.isnan(record.epsilon)
    # Fields of the wrong type name the line and the field (not a format error later on)
    for field, value in (("epsilon", "n/a"), ("batch_size", None), ("flags", "error")):
        bad = {**json.loads(lines[0]), field: value}
        path.write_text(json.dumps(bad) + "\n", encoding="utf-8")
        with pytest.raises(
            ValueError, match=f"line 1: JSON but not a leakage record \\({field} is"
        ):
            read_jsonl(path)
    # Not text, or no line of JSON at all: not a records file (it was 'torn lines', read as
    # an empty run whose report overwrote the folder's good outputs)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="records.jsonl is not text"):
        read_jsonl(path)
    path.write_text("step,epsilon\n0,1.5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no line is a leakage record"):
        read_jsonl(path)


def test_a_record_whose_write_failed_is_not_in_the_jsonl_and_its_lines_stay_whole(tmp_path):
    """A full disk mid-line: the line's written part stayed as a torn line, and its unwritten
    rest, kept in the file's buffer, landed with the next record's flush once there was room,
    so a record whose write raised was in the file or not by chance, and the monitor's count
    of records missed could be wrong. The OS refuses the writes here (a child process under a
    file size limit: EFBIG, as ENOSPC, after a short write); reference: which writes raised."""
    script = textwrap.dedent(
        """
        import json, resource, signal, sys
        from opacus_mi.records import JsonlSink, LeakageRecord

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (a write past the limit: EFBIG)
        sink = JsonlSink(sys.argv[1])
        outcomes = []
        for step in range(1, 9):
            if step == 3:  # room for the first two lines and part of the third only
                room = int(sys.argv[2])
                resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))
            if step == 6:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            record = LeakageRecord(step, 64, 1.0, 1.0, 0.01, 0.5 * step, 1e-5, flags=["x" * 300])
            try:
                sink(record)
                outcomes.append((step, "ok"))
            except OSError as err:
                outcomes.append((step, err.errno))
        sink.close()
        print(json.dumps(outcomes))
        """
    )
    import errno

    from opacus_mi.records import LeakageRecord

    one = len(
        json.dumps(LeakageRecord(1, 64, 1.0, 1.0, 0.01, 0.5, 1e-5, flags=["x" * 300]).as_dict())
    )
    path = tmp_path / "records.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), str(2 * (one + 1) + one // 2)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout)
    assert outcomes[:2] == [[1, "ok"], [2, "ok"]] and outcomes[5:] == [
        [6, "ok"],
        [7, "ok"],
        [8, "ok"],
    ]
    assert [o for _, o in outcomes[2:5]] == [errno.EFBIG] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no torn line to skip)
        back = read_jsonl(path)
    assert [r.step for r in back] == [s for s, o in outcomes if o == "ok"]
    assert path.read_text(encoding="utf-8").count("\n") == 5


def test_non_finite_figures_survive_the_jsonl_round_trip(tmp_path):
    """A noiseless run's epsilon and bounds are inf, a failed figure NaN: written as strict JSON
    (``allow_nan=False`` accepts it) and read back as the same floats, not None (which lost
    the one fact an infinite epsilon states, and broke the summary of records read back)."""
    from opacus_mi.report import summary_table

    path = tmp_path / "records.jsonl"
    engine, model, opt, loader = make_private(poisson=False, noise=0.0, accountant="prv")
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, jsonl=str(path))
    train(model, opt, loader, epochs=1)
    monitor.flush()
    last = monitor.history[-1]
    last.mi["clipped/test"] = MIValue(math.nan, -math.inf, math.inf, 3)  # a failed figure
    for line in path.read_text().splitlines():
        json.dumps(json.loads(line), allow_nan=False)  # strict JSON
    back = read_jsonl(path)
    assert [r.epsilon for r in back] == [math.inf] * len(monitor.history)
    assert all(r.mi_bound == r.mi_upper_bound == math.inf for r in back)
    row = json.loads(json.dumps(last.as_dict(), allow_nan=False))
    got = LeakageRecord.from_dict(row).mi["clipped/test"]
    assert math.isnan(got.nats) and (got.ci_low, got.ci_high) == (-math.inf, math.inf)
    assert "epsilon inf" in summary_table(back)
    # NumPy's inf was written "np.float64(inf)", which made the whole file unreadable; an MI
    # value that is no number loaded silently
    import numpy as np

    row["epsilon"], row["step"] = np.float64("inf"), np.int64(7)
    from opacus_mi.records import json_safe

    assert LeakageRecord.from_dict(json.loads(json.dumps(json_safe(row)))).epsilon == math.inf
    row = json.loads(json.dumps(json_safe(row)))
    row["mi"]["clipped/test"]["nats"] = "high"
    with pytest.raises(TypeError, match="mi\\['clipped/test'\\] has \\{'nats': 'high'\\}"):
        LeakageRecord.from_dict(row)


def test_a_figures_difference_is_matched_less_shuffled_and_booleans_stay_booleans():
    """What a JSONL line says of a learned figure: ``difference`` is the matched pairs' figure
    less the shuffled pairs' (None without a shuffled figure), and a truth value written through
    ``json_safe`` (validate.json's ``fano_holds``) stays JSON's true, not 1. A mutation audit
    found both unguarded."""
    from opacus_mi.records import json_safe

    value = MIValue(0.75, 0.5, 1.0, 64, mismatched=0.25)
    assert value.difference == 0.75 - 0.25
    record = LeakageRecord(3, 64, 1.0, 1.0, 0.1, 2.0, 1e-5, mi={"clipped/infonce": value})
    line = json.loads(json.dumps(json_safe(record.as_dict())))
    assert line["mi"]["clipped/infonce"]["difference"] == 0.5
    assert MIValue(0.75, 0.5, 1.0, 64).difference is None
    text = json.dumps(json_safe({"fano_holds": True, "nested": [False], "n": 3, "x": math.inf}))
    assert json.loads(text) == {"fano_holds": True, "nested": [False], "n": 3, "x": "inf"}
    assert json.loads(text)["fano_holds"] is True


def test_a_step_written_again_replaces_its_earlier_record(tmp_path):
    """A JSONL file whose last step was written twice (a run that wrote a step's record, then
    was resumed from before it): reading it keeps one record of that step, the later line's,
    and says it left one out. A mutation audit found the repeated step unguarded: kept twice."""

    def record(step: int, nats: float) -> dict:
        mi = {"private/oracle": MIValue(nats, 0.0, 1.0, 8)}
        return LeakageRecord(step, 8, 1.0, 1.0, 0.1, 1.0, 1e-5, mi=mi).as_dict()

    path = tmp_path / "records.jsonl"
    lines = [record(0, 0.1), record(1, 0.2), record(2, 0.3), record(2, 0.9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.warns(RuntimeWarning, match="left out 1 record"):
        back = read_jsonl(path)
    assert [r.step for r in back] == [0, 1, 2]
    assert back[-1].mi["private/oracle"].nats == 0.9


def _plain_record(step: int = 0, **kwargs) -> LeakageRecord:
    """A record built by hand (no run needed), as ``as_dict`` would write it."""
    return LeakageRecord(step, 8, 1.0, 1.0, 0.1, 1.0, 1e-5, **kwargs)


def test_an_oracles_ceiling_of_zero_is_its_ceiling_and_one_example_reads_ln_1():
    """``log_b`` is the oracle's own ceiling where it has one, else ln n. A ceiling of 0 (every
    physical chunk one example: sum n_i ln n_i / sum n_i = 0) is a ceiling, not a missing one;
    one example's ceiling is ln 1 = 0, not NaN. Reference: the per-example mean of ln chunk
    sizes, brute force. A mutation audit found both unguarded."""
    sizes = [1] * 8  # BatchMemoryManager chunks of one example each
    ceiling = sum(n * math.log(n) for n in sizes) / sum(sizes)
    assert MIValue(0.0, 0.0, 0.0, 8, ceiling=ceiling).log_b == 0.0
    assert MIValue(0.0, 0.0, 0.0, 8).log_b == math.log(8)
    assert MIValue(0.0, 0.0, 0.0, 1).log_b == 0.0
    assert math.isnan(MIValue(math.nan, math.nan, math.nan, 0).log_b)


def test_a_record_carries_an_earlier_epsilon_only_where_it_names_another_step():
    """``carries_earlier_epsilon``: the record's epsilon is another step's (a paced PRV value).
    An older version's record has no ``epsilon_step`` (None): it carries its own. A mutation
    audit found the None case and an earlier step unguarded."""
    assert not _plain_record(5).carries_earlier_epsilon  # (older versions: None)
    assert not _plain_record(5, epsilon_step=5).carries_earlier_epsilon
    assert _plain_record(5, epsilon_step=3).carries_earlier_epsilon
    back = LeakageRecord.from_dict(json.loads(json.dumps(_plain_record(5).as_dict())))
    assert back.epsilon_step is None and not back.carries_earlier_epsilon


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("batch_size", 1.5, "batch_size is 1.5, not an integer"),
        ("step", True, "step is True, not an integer"),
        ("epsilon", False, "epsilon is False, not a number"),
        ("flags", [1], r"flags is \[1\], not a list of strings"),
        ("mi", {"private/oracle": 3}, "mi is .*, not a mapping of estimates"),
        ("mi/n", None, r"mi\['private/oracle'\] has \{'n': None\}"),
        ("mi/nats", True, r"mi\['private/oracle'\] has \{'nats': True\}"),
        ("mi/ceiling", "high", r"mi\['private/oracle'\] has \{'ceiling': 'high'\}"),
    ],
)
def test_a_record_field_of_the_wrong_type_is_a_type_error_naming_it(field, value, says):
    """``from_dict``'s promise: a field of the wrong type is a TypeError naming it (a float
    step count, a boolean where JSON holds a number, a flag that is no string, an estimate
    that is no mapping or lacks its count). A mutation audit found each of these accepted or
    failing elsewhere. Reference: a record Python's json module wrote, with one field
    replaced."""
    mi = {"private/oracle": MIValue(0.5, 0.25, 0.75, 8)}
    row = json.loads(json.dumps(_plain_record(2, mi=mi).as_dict()))
    LeakageRecord.from_dict(copy.deepcopy(row))  # (the row as written loads)
    if field.startswith("mi/"):
        row["mi"]["private/oracle"][field.removeprefix("mi/")] = value
    else:
        row[field] = value
    with pytest.raises(TypeError, match=says):
        LeakageRecord.from_dict(row)


def test_an_older_records_null_figure_and_absent_optional_fields_read_as_nan_and_none():
    """An earlier version wrote a non-finite MI figure as null: it reads back as NaN (as the
    record's own floats do), and the optional fields a line lacks are None. A mutation audit
    found the figure's null unguarded (refused as 'not numbers')."""
    row = json.loads(
        json.dumps(_plain_record(0, mi={"clipped/infonce": MIValue(1, 0, 2, 8)}).as_dict())
    )
    entry = row["mi"]["clipped/infonce"]
    entry.update(nats=None, ci_low=None, ci_high=None)
    for optional in ("mismatched", "control", "ceiling", "difference"):
        del entry[optional]
    got = LeakageRecord.from_dict(row).mi["clipped/infonce"]
    assert all(math.isnan(v) for v in (got.nats, got.ci_low, got.ci_high))
    assert (got.n, got.mismatched, got.control, got.ceiling) == (8, None, None, None)


def test_json_safe_reaches_inside_tuples():
    """A tuple (a pair of interval ends) is a JSON array: its non-finite or NumPy numbers are
    made safe as a list's are, so strict JSON (``allow_nan=False``) holds it. A mutation audit
    found tuples left as they were (Infinity written, not JSON)."""
    import numpy as np

    from opacus_mi.records import json_safe

    value = {"interval": (1, math.inf, np.float64(2.5)), "nested": [(np.int64(3), -math.inf)]}
    text = json.dumps(json_safe(value), allow_nan=False)
    assert json.loads(text) == {"interval": [1, "inf", 2.5], "nested": [[3, "-inf"]]}


def test_read_jsonl_skips_blank_lines_and_keeps_records_around_torn_ones(tmp_path):
    """What read_jsonl does with lines besides records: a blank line is nothing (no warning); a
    file whose only line is torn (a run killed writing its first record) is an empty run with
    a warning, not 'no line is a leakage record'; several torn lines among records are skipped,
    each named, and the records kept. A mutation audit found all three unguarded. Reference:
    the lines written, read with Python's json module."""
    rows = [
        _plain_record(s, mi={"private/oracle": MIValue(0.1 * s, 0, 1, 8)}).as_dict()
        for s in range(3)
    ]
    lines = [json.dumps(r) for r in rows]
    path = tmp_path / "records.jsonl"
    path.write_text("\n" + lines[0] + "\n\n" + lines[1] + "\n   \n" + lines[2] + "\n\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = read_jsonl(path)
    assert [r.as_dict() for r in back] == [json.loads(line) for line in lines]
    path.write_text(lines[0][:30])  # killed while writing its first record
    with pytest.warns(RuntimeWarning, match=r"skipped 1 line\(s\) .*\(line 1\)"):
        assert read_jsonl(path) == []
    path.write_text("\n".join([lines[0], lines[1][:25], lines[1], lines[2][:-3], lines[2]]) + "\n")
    with pytest.warns(RuntimeWarning, match=r"skipped 2 line\(s\) .*\(line 2, 4\)"):
        back = read_jsonl(path)
    assert [r.step for r in back] == [0, 1, 2]


@pytest.mark.parametrize("line", ["[1, 2]", "3", '"step"'])
def test_a_json_line_that_is_no_object_is_not_a_records_file(tmp_path, line):
    """Complete JSON that is not an object (an array, a number, a string) names its line as
    not a leakage record, as an object of other fields does; it escaped as an AttributeError
    from inside the parse. A mutation audit found it unguarded."""
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(_plain_record(0).as_dict()) + "\n" + line + "\n")
    with pytest.raises(ValueError, match="line 2: JSON but not a leakage record"):
        read_jsonl(path)


def test_exceedances_count_the_records_with_a_bound_and_sort_by_key():
    """``exceedances``: per key flagged exceeds_bound, the records that could have been flagged
    (the key measured against a bound: those without ``mi_bound`` cannot), never fewer than
    those flagged, and the chance of at least that many flags. Keys come sorted, whatever
    order the flags arrive in. Reference: the binomial tail summed term by term with
    math.comb. A mutation audit found the bound condition, the floor and the order
    unguarded."""
    from opacus_mi.records import EXCEEDS_RATE, exceedances

    def tail(k: int, n: int) -> float:
        p = EXCEEDS_RATE
        return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))

    records = []
    for step in range(10):
        flags = ["exceeds_bound:private/oracle"] if step in (1, 3) else []
        if step == 4:  # a flag whose figure the record no longer has
            flags.append("exceeds_bound:clipped/infonce")
        mi = {"private/oracle": MIValue(0.05, 0.04, 0.06, 8)}
        bound = 0.06 if step < 6 else None  # the last 4 have no bound: cannot be flagged
        records.append(_plain_record(step, mi=mi, mi_bound=bound, flags=flags + ["exceeds_clip"]))
    got = exceedances(records)
    assert [(key, k, n) for key, k, n, _ in got] == [
        ("clipped/infonce", 1, 1),
        ("private/oracle", 2, 6),
    ]
    for key, k, n, p in got:
        assert p == pytest.approx(tail(k, n), rel=1e-9), key


def test_a_superseded_sinks_records_are_left_out_with_one_warning(tmp_path):
    """Once a newer sink opens the file, an older one writes nothing more and says so once
    (not at every record of a long run), counting what it left out. Reference: the file's
    lines, read with Python's json module. A mutation audit found the single warning
    unguarded."""
    from opacus_mi.records import JsonlSink

    path = tmp_path / "records.jsonl"
    old = JsonlSink(path)
    old(_plain_record(0))
    new = JsonlSink(path)
    with pytest.warns(RuntimeWarning) as said:
        for step in (1, 2, 3):
            old(_plain_record(step))
    assert [str(w.message) for w in said if "newer monitor" in str(w.message)] == [
        str(said[0].message)
    ] and "step 1 was not written" in str(said[0].message)
    assert old.left_out == 3
    new(_plain_record(1))
    old.close(), new.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize("case", ["control", "shuffled floor", "neither"])
def test_detected_needs_the_whole_interval_above_zero_and_both_controls(case):
    """The run summary's 'detected' column, as its note says: the 95% t interval over steps lies
    above 0, above the shuffled pairs' mean and above the control critic's. A mutation audit
    found the control and the interval's lower end (against the shuffled floor) unguarded.
    The interval is scipy's here; each control is put between its lower end and the mean."""
    from scipy import stats

    from opacus_mi.report import summary_table

    key, nats = "clipped/infonce", [0.30, 0.50, 0.40, 0.60, 0.45]
    mean = sum(nats) / len(nats)
    low, _ = stats.t.interval(0.95, len(nats) - 1, loc=mean, scale=stats.sem(nats))
    between = (low + mean) / 2
    assert 0 < low < between < mean
    shuffled, control = {
        "control": (0.0, between),
        "shuffled floor": (between, None),
        "neither": (low - 0.01, low - 0.01),
    }[case]
    records = [
        LeakageRecord(
            step, 64, 1.0, 1.0, 0.1, 1.0, 1e-5,
            mi={key: MIValue(v, v - 0.1, v + 0.1, 64, mismatched=shuffled, control=control)},
        )
        for step, v in enumerate(nats)
    ]  # fmt: skip
    row = next(line for line in summary_table(records).splitlines() if key in line)
    assert re.findall(r"\b(yes|no)\b", row) == ["yes" if case == "neither" else "no"], row


def _summary_records(nats, key="clipped/infonce"):
    """Records of one series at steps 0.. (sigma 1, so the private bound per step is 0.5)."""
    return [
        LeakageRecord(
            step, 64, 1.0, 1.0, 0.1, 1.0, 1e-5, mi={key: MIValue(v, v - 0.1, v + 0.1, 64)},
            mi_bound=1 / (2 * 1.0**2),
        )
        for step, v in enumerate(nats)
    ]  # fmt: skip


def test_the_summary_averages_exactly_the_last_records_and_their_shuffled_mean():
    """'mean of last N' over records[-N:] (scipy's t interval), 'shuffled' the mean of their
    shuffled figures (not an end of its interval), 'bound/step' 1/(2 sigma^2) on the private
    rows only. A mutation audit found all three unguarded by the tests that call the report."""
    from scipy import stats

    from opacus_mi.report import summary_table

    nats = [0.1 * i + 0.05 * (i % 3) for i in range(25)]
    records = _summary_records(nats)
    shuffled = [0.02 * (i % 4) for i in range(25)]  # varies: its mean is not its interval's end
    for r, m in zip(records, shuffled, strict=True):
        r.mi["clipped/infonce"].mismatched = m
        r.mi["private/oracle"] = MIValue(0.3, 0.2, 0.4, 64)
    text = summary_table(records, last=20)
    assert "mean of last 20 [95% CI]" in text
    tail = nats[-20:]
    mean = sum(tail) / 20
    low, high = stats.t.interval(0.95, 19, loc=mean, scale=stats.sem(tail))
    cells = _cells(text, "clipped/infonce")
    assert cells[2] == f"{mean:.3f} [{low:.3f}, {high:.3f}]", cells
    assert cells[3] == f"{sum(shuffled[-20:]) / 20:.3f}", cells
    assert cells[-1] == "-" and _cells(text, "private/oracle")[-1] == f"{1 / 2:.3f}"


@pytest.mark.parametrize("steps", [None, 7, 8])
def test_the_summary_title_says_behind_only_when_a_step_came_after_the_last_record(steps):
    """Records up to step 6: a run of 7 steps ended on its last record ('after step 6'); one of
    8 measured its last step before the end ('at step 6, the last measured of 8')."""
    from opacus_mi.report import summary_table

    title = summary_table(_summary_records([0.1] * 7), steps=steps).splitlines()[0]
    if steps == 8:
        assert title.startswith("opacus-mi leakage at step 6, the last measured of 8"), title
    else:
        assert title.startswith("opacus-mi leakage after step 6 "), title


def test_a_learned_series_of_exact_zeros_is_neither_detected_nor_below_zero():
    """The constant critic's figure, 0 nats every step: its interval over the steps, [0, 0],
    does not clear 0 ('no'), and it is not an empty bound below 0 either."""
    from opacus_mi.report import EMPTY_BOUND, summary_table

    text = summary_table(_summary_records([0.0] * 5, key="clipped/mine"))
    assert re.findall(r"\b(yes|no)\b", " ".join(_cells(text, "clipped/mine"))) == ["no"]
    assert "below 0" not in text and EMPTY_BOUND not in " ".join(text.split())


def test_a_control_in_an_earlier_record_of_the_tail_gets_its_column():
    """A control critic's figure in any of the averaged records (it reports on some steps):
    the table has a 'control' column with their mean, not only when the last record has one."""
    from opacus_mi.report import summary_table

    records = _summary_records([0.2, 0.3, 0.4])
    records[0].mi["clipped/infonce"].control = 0.06
    text = summary_table(records)
    header = next(line for line in text.splitlines() if "view / estimator" in line)
    assert [c.strip() for c in header.strip("┃").split("┃")][4] == "control"
    assert _cells(text, "clipped/infonce")[4] == "0.060"


def test_infinite_and_missing_figures_keep_their_sign_and_meaning_in_text_and_csv(tmp_path):
    """-inf (a bound at sigma 0 read from below, a diverged critic) is not +inf in a table or
    a CSV cell; an epsilon the accountant could not compute reads 'nan', a missing figure '-';
    an interval around a figure in exponent form gives each end its own form (with the
    midpoint's places, 1.25e-05's "25e-05" counted as six)."""
    from opacus_mi.report import (
        csv_cell,
        fmt_epsilon,
        fmt_interval,
        fmt_number,
        read_csv_rows,
        write_csv_rows,
    )

    inf = math.inf
    assert (fmt_number(inf), fmt_number(-inf), fmt_number(math.nan)) == ("inf", "-inf", "-")
    assert (fmt_epsilon(math.nan), fmt_epsilon(2.5)) == ("nan", "2.500")
    assert fmt_interval(1.25e-5, 1e-5, 1.5e-5) == f"{1.25e-5:.3g} [{1e-5:.3g}, {1.5e-5:.3g}]"
    assert (csv_cell(inf), csv_cell(-inf), csv_cell(math.nan)) == ("inf", "-inf", "")
    path = write_csv_rows([{"a": -inf, "b": inf}], tmp_path / "t.csv", ["a", "b"])
    assert read_csv_rows(path) == [{"a": float("-inf"), "b": float("inf")}]


def test_a_series_with_a_non_finite_figure_averages_the_finite_ones_and_says_how_many():
    """A NaN figure (a step whose critic diverged) is left out of the mean, which says it
    averages 2 of the last 3 (NumPy's nanmean and the t interval of the two)."""
    import numpy as np
    from scipy import stats

    from opacus_mi.report import summary_table

    nats = [0.2, math.nan, 0.5]
    text = summary_table(_summary_records(nats))
    finite = [0.2, 0.5]
    low, high = stats.t.interval(0.95, 1, loc=np.nanmean(nats), scale=stats.sem(finite))
    assert (
        _cells(text, "clipped/infonce")[2]
        == f"{np.nanmean(nats):.3f} [{low:.3f}, {high:.3f}] (n=2)"
    )


@pytest.mark.parametrize("missing", ["clipped/infonce", "private/semi"])
def test_a_series_asked_for_without_a_figure_is_given_its_own_reason(missing):
    """A learned critic waits for pairs in its windows, the semi-oracle for its subspace: each
    missing series gets its reason, not the other's."""
    from opacus_mi.report import summary_table

    text = " ".join(
        summary_table(_summary_records([0.1], key="private/oracle"), expected=[missing]).split()
    )
    critic, semi = "windows hold pairs" in text, "fitted its subspace" in text
    assert f"no figure yet: {missing};" in text
    assert (critic, semi) == ((True, False) if missing == "clipped/infonce" else (False, True))


def test_a_release_above_its_clipping_bound_is_said_first_under_the_table():
    """An 'exceeds_clip' flag on any record: the summary says, before the other flags, that
    epsilon and the bounds do not hold there."""
    from opacus_mi.report import summary_table

    records = _summary_records([0.1, 0.2])
    records[0].flags.append("exceeds_clip")
    text = " ".join(summary_table(records).split())
    said = "Opacus released an example above its clipping bound: epsilon and the bounds do not hold"
    assert f"flags seen: {said}" in text and "exceeds_clip" in text
    assert said not in " ".join(summary_table(_summary_records([0.1, 0.2])).split())


def test_the_title_gives_an_earlier_steps_epsilon_with_its_step_and_the_epsilon_now():
    """A record whose epsilon is its own step's says nothing more; one carrying step 3's (paced
    PRV) says so, with the accountant's epsilon now beside it, or, when a later step was not
    measured, after that last step."""
    from opacus_mi.report import summary_table

    records = _summary_records([0.1] * 6)
    records[-1].epsilon_step = 5  # its own step
    assert "exact at step" not in summary_table(records, epsilon_now=2.0).splitlines()[0]
    records[-1].epsilon_step = 3
    title = summary_table(records, epsilon_now=2.0, steps=6).splitlines()[0]
    assert "epsilon 1.000 (exact at step 3; 2.000 now) at delta" in title, title
    title = " ".join(summary_table(records, epsilon_now=2.0, steps=9).split())
    assert "epsilon 1.000 (exact at step 3) at delta" in title, title
    assert "; after step 8: epsilon 2.000" in title, title


def test_a_figure_is_a_real_number_and_a_blank_csv_cell_is_none(tmp_path):
    """True is not 1.000 in a table; None is a blank CSV cell (read back as NaN, or as "" in a
    text column), not the text 'None'; a midpoint of five places gives a zero end five places
    too (0.00000)."""
    import csv

    from opacus_mi.report import fmt_interval, fmt_number, read_csv_rows, write_csv_rows

    assert (fmt_number(True), fmt_number("0.5"), fmt_number(0.5)) == ("-", "-", "0.500")
    assert fmt_interval(0.00125, 0.0, 0.0025) == f"0.00125 [{0:.5f}, {0.0025:.5f}]"
    path = write_csv_rows([{"a": None, "b": 2}], tmp_path / "t.csv", ["a", "b"])
    with open(path, newline="") as fh:
        assert list(csv.DictReader(fh)) == [{"a": "", "b": "2"}]
    assert math.isnan(read_csv_rows(path)[0]["a"])
    assert read_csv_rows(path, text_columns=["a"]) == [{"a": "", "b": 2.0}]  # text stays text


def test_a_file_is_written_beside_its_target_under_a_hidden_name():
    """The partial file is a sibling (so the rename over the target stays on one file system,
    atomic) and hidden (a listing of the run folder mid-write shows no half file)."""
    from pathlib import Path

    from opacus_mi.report import partial_path

    target = Path("run") / "records.csv"
    part = partial_path(target)
    assert part.parent == target.parent and part.name.startswith(".") and part != target


def test_a_refused_write_names_the_file_asked_for_not_its_part(tmp_path, monkeypatch):
    """A folder that refuses new files failed on the hidden ``.summary.txt.part``, the name
    the CLI then printed. Reference: the OSError the open itself raised (its errno, reason)."""
    import io

    from opacus_mi.report import partial_path, write_text_whole, write_whole

    target = tmp_path / "summary.txt"
    real, raised = io.open, []

    def refusing(path, *args, **kwargs):
        if Path(str(path)) == partial_path(target):
            raised.append(PermissionError(13, "Permission denied", str(path)))
            raise raised[-1]
        return real(path, *args, **kwargs)

    monkeypatch.setattr(io, "open", refusing)
    with pytest.raises(PermissionError) as caught:
        write_text_whole(target, "x")
    assert (caught.value.errno, caught.value.strerror) == (raised[0].errno, raised[0].strerror)
    assert caught.value.filename == str(target) and caught.value.__cause__ is raised[0]
    monkeypatch.setattr(io, "open", real)
    full = OSError(28, "No space left on device", str(partial_path(target)))

    def fails(part):
        part.write_text("half")
        raise full

    with pytest.raises(OSError, match="No space left") as caught:
        write_whole(target, fails)
    assert caught.value.errno == 28 and caught.value.filename == str(target)
    assert not target.exists() and not partial_path(target).exists()
    other = OSError(5, "Input/output error", str(tmp_path / "elsewhere"))

    def elsewhere(part):
        raise other

    with pytest.raises(OSError) as caught:
        write_whole(target, elsewhere)
    assert caught.value is other  # (an error about another file passes unchanged)


@pytest.mark.parametrize("last", [0, -1, 2.5, True])
def test_a_summary_over_no_records_is_refused_naming_last(last):
    """``summary(last=0)`` averaged every record (``records[-0:]`` is the whole list), and a
    negative ``last`` all but the first few: refused, naming the argument."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, every=1)
    train(model, opt, loader)
    with pytest.raises(ValueError, match=r"last must be an integer >= 1.*got"):
        monitor.summary(last=last)
    assert "private/oracle" in monitor.summary(last=1)


class _FrozenBackbone(nn.Module):
    """A frozen extractor the model runs in eval() under no_grad, then a trainable head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(36, 8)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        self.backbone.eval()
        with torch.no_grad():
            h = self.backbone(x.flatten(1))
        return self.head(h)


class _TimeMajor(nn.Module):
    def forward(self, x):  # (B, 36) -> (6, B, 6), as an RNN with batch_first=False
        return x.reshape(x.shape[0], 6, 6).transpose(0, 1)


class _TimeMajorNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = _TimeMajor()
        self.fc = nn.Linear(36, 3)

    def forward(self, x):
        return self.fc(self.seq(x.flatten(1)).transpose(0, 1).flatten(1))


def test_named_layer_of_a_frozen_extractor_is_captured():
    """Captured whatever the layer's own mode: a backbone in eval() under no_grad gave no
    features at all (labels only), without a flag or a warning."""
    engine, model, opt, loader = make_private(poisson=False, net=_FrozenBackbone)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, estimator="mine", features=["backbone"]
    )
    got = _capture_features(monitor, model, opt, loader, nn.CrossEntropyLoss())
    x, _ = next(iter(loader))
    with torch.no_grad():
        expected = model._module.backbone(x.flatten(1))
    torch.testing.assert_close(got[0][1], expected)
    assert not any(r.flags for r in monitor.history)


@pytest.mark.parametrize(
    "features, says",
    [
        (["seq"], "features layer 'seq' gave an output of shape (6, 16, 6)"),
        (lambda x: x.mean(), "got ()"),
        (lambda x: x.flatten(1)[:, :0], "got (16, 0)"),
        (lambda x: x.flatten(1)[:15], "got (15, 36)"),
    ],
    ids=["time-major-layer", "scalar", "no-columns", "wrong-rows"],
)
def test_features_that_cannot_be_paired_are_flagged_with_a_clear_warning(features, says):
    """A time-major layer was left out silently; a scalar callable raised an IndexError that
    named nothing; a (B, 0) callable divided by zero in the critic and lost every record."""
    engine, model, opt, loader = make_private(poisson=False, net=_TimeMajorNet)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, every=1, train_every=1, features=features
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, loader)
        history = monitor.history
    assert len(history) == monitor.steps == len(loader)
    for r in history:
        assert r.flags == ["features_error"] and "private/oracle" in r.mi
    messages = [str(w.message) for w in caught if "feature extraction failed" in str(w.message)]
    assert len(messages) == 1 and says in messages[0]


@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "overlap"])
@pytest.mark.parametrize("attack_first", [True, False], ids=["attack-first", "attack-in-step"])
def test_forwards_under_disable_hooks_are_no_examples(overlap, attack_first):
    """DP adversarial training runs the attack's forward/backward inside model.disable_hooks()
    / enable_hooks(): Opacus makes no per-sample gradients of it, and (as its own hooks) the
    monitor captures none of its inputs, Linear inputs or labels either. Every step was flagged
    features_unpaired (the critics never reported) and lost the rank-one shortcut. References:
    the trained forward's input and labels; the unmonitored loop's training, bit for bit."""

    def run(monitored: bool):
        engine, model, opt, loader = make_private(poisson=False)
        criterion, monitor, feats, rank_one = nn.CrossEntropyLoss(), None, [], []
        if monitored:
            monitor = LeakageMonitor(
                engine, model, opt, delta=1e-5, estimator="mine", train_every=1, overlap=overlap
            )
            criterion = monitor.wrap_criterion(criterion)
            features, backprops = monitor._capture.features, monitor._rank_one_backprops

            def spy(captures, batch):
                feats.append(features(captures, batch))
                return feats[-1]

            def tap(grad_samples, inputs):
                out = backprops(grad_samples, inputs)
                rank_one.append(set(out))
                return out

            monitor._capture.features, monitor._rank_one_backprops = spy, tap

        def attack(x, target):  # a targeted FGSM step: no per-sample gradients
            model.disable_hooks()
            xa = x.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(criterion(model(xa), target), xa)
            model.enable_hooks()
            return (x - 0.1 * gx.sign()).detach()

        trained = []
        for x, y in loader:
            opt.zero_grad()
            if attack_first:  # adversarial training: the loss of the attack's examples
                x = attack(x, (y + 1) % 3)
                criterion(model(x), y).backward()
            else:  # an attack between the step's loss and its backward
                loss = criterion(model(x), y)
                attack(x, (y + 1) % 3)
                loss.backward()
            opt.step()
            trained.append((x, y))
        if monitor is not None:
            monitor.flush()
        return [p.detach().clone() for p in model.parameters()], monitor, feats, rank_one, trained

    p0, *_ = run(False)
    p1, monitor, feats, rank_one, trained = run(True)
    for a, b in zip(p0, p1, strict=True):
        assert torch.equal(a, b), "the monitor changed the training"
    history = monitor.history
    assert len(history) == len(trained) and not any(r.flags for r in history)
    assert any("clipped/mine" in r.mi and "private/mine" in r.mi for r in history)
    for f, (x, y) in zip(feats, trained, strict=True):  # the trained forward's, not the attack's
        assert torch.equal(f, torch.cat([x.flatten(1), nn.functional.one_hot(y, 3).float()], 1))
    assert rank_one == [{2}] * len(trained)  # the head, called once with hooks on


@pytest.mark.parametrize("both_first", [False, True], ids=["criterion-between", "both-first"])
@pytest.mark.parametrize("features", [None, "mean", ["conv"]], ids=["inputs", "callable", "layer"])
def test_a_regularisers_second_forward_pairs_the_first_forwards_features(features, both_first):
    """A loss adding a regulariser on a second forward of the batch: Opacus sums both forwards
    into one gradient row per example, and the captures (2B rows against B) were flagged
    features_unpaired at every step, whatever features= was: no learned figure was ever made.
    Reference: the first forward's own batch (its input, the callable or the layer on it,
    and its one-hot labels), not the second forward's perturbed copy. With both forwards
    before the criterion, the labels (recorded on the last forward) were left out."""
    engine, model, opt, loader = make_private(poisson=False)
    if features == "mean":
        features = lambda x: x.mean(dim=(1, 2, 3))[:, None]  # noqa: E731
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, every=1, train_every=1, overlap=False, features=features
    )
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    got = []
    original = monitor._chunk_features
    monitor._chunk_features = lambda c, b, ch: got.append(original(c, b, ch)) or got[-1]
    expected = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for x, y in loader:
                with torch.no_grad():
                    if features is None:
                        own = x.reshape(len(x), -1)
                    elif callable(features):
                        own = features(x)
                    else:
                        own = model._module.conv(x).reshape(len(x), -1)
                expected.append(torch.cat([own, nn.functional.one_hot(y, 3).float()], 1))
                opt.zero_grad()
                noisy = x + 0.1 * torch.randn_like(x)
                if both_first:
                    out, reg = model(x), model(noisy)
                    loss = criterion(out, y) + 0.1 * reg.pow(2).mean()
                else:
                    loss = criterion(model(x), y) + 0.1 * model(noisy).pow(2).mean()
                loss.backward()
                assert opt.grad_samples[0].shape[0] == len(x)  # one row per example
                opt.step()
        history = monitor.history
    assert len(got) == len(expected) == len(history) == 2 * len(loader)
    for feats, reference in zip(got, expected, strict=True):
        assert feats is not None
        torch.testing.assert_close(feats, reference)
    assert all(r.flags == ["features_first_forward"] for r in history)
    assert any("clipped/mine" in r.mi and "private/mine" in r.mi for r in history)
    said = [str(w.message) for w in caught if "features_first_forward" in str(w.message)]
    assert len(said) == 1 and "first forward" in said[0]


@pytest.mark.parametrize("extra", ["half-regulariser", "two-backwards"])
def test_forwards_of_other_sizes_stay_unpaired_and_backwards_concatenate(extra):
    """Only forwards of the gradients' B examples each pair with the first one. A regulariser
    on half the batch (Opacus adds its rows into the first B/2) leaves the step unpaired; two
    forward-backwards in one step (2B gradient rows) pair row for row, as before."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, train_every=1, overlap=False)
    got = []
    original = monitor._chunk_features
    monitor._chunk_features = lambda c, b, ch: got.append(original(c, b, ch)) or got[-1]
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in loader:
            opt.zero_grad()
            if extra == "half-regulariser":
                (criterion(model(x), y) + model(x[: len(x) // 2]).pow(2).mean()).backward()
            else:
                criterion(model(x), y).backward()
                criterion(model(x.flip(0)), y.flip(0)).backward()
            opt.step()
        history = monitor.history
    if extra == "half-regulariser":
        assert got and all(f is None for f in got)
        assert all(r.flags == ["features_unpaired"] for r in history)
    else:
        for feats, (x, _) in zip(got, loader, strict=True):
            torch.testing.assert_close(feats, torch.cat([x, x.flip(0)]).reshape(2 * len(x), -1))
        assert not any(r.flags for r in history) and any("clipped/mine" in r.mi for r in history)


class _SeqFirstNet(nn.Module):
    """Input (T, B, 4), as ``make_private(batch_first=False)`` models take it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).mean(0)


def test_a_time_major_models_features_are_each_examples_own_input():
    """batch_first=False at T == B: feature row i was time step i of every example (no flag,
    learned figures paired with the wrong examples), for the input and for a named layer's
    output alike; at T != B every step was unpaired (or the layer refused)."""
    from torch.utils.data import TensorDataset

    for steps in (16, 5):
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(64, steps, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        )
        engine, model, opt, loader = make_private(
            poisson=False, net=_SeqFirstNet, data=data, private_kwargs={"batch_first": False}
        )
        monitor = LeakageMonitor(
            engine,
            model,
            opt,
            delta=1e-5,
            estimator="mine",
            overlap=False,
            features=["input", "fc"],
        )
        criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
        got = _spy_features(monitor)
        for x, y in loader:  # x: (B, T, 4)
            with torch.no_grad():  # the named layer's (T, B, 3) output, example by example
                fc = model._module.fc(x).reshape(len(x), -1)
            opt.zero_grad()
            criterion(model(x.transpose(0, 1)), y).backward()
            opt.step()
            feats = got[-1]
            assert feats is not None
            assert torch.equal(feats[:, : steps * 4], x.reshape(len(x), -1))
            torch.testing.assert_close(feats[:, steps * 4 : steps * 7], fc)
            assert torch.equal(feats[:, steps * 7 :], nn.functional.one_hot(y, 3).float())
        assert not any(r.flags for r in monitor.history)


def test_an_embedding_bags_flat_ids_pair_through_a_named_layer():
    """nn.EmbeddingBag called with flat ids and offsets: its input is not one row per example,
    so a named layer (or a callable) gives the features; they were refused against the flat
    ids' length."""
    from torch.utils.data import TensorDataset

    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(20, 6, mode="mean")
            self.fc = nn.Linear(6, 3)

        def forward(self, flat, offsets):
            return self.fc(self.bag(flat, offsets))

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(0, 20, (64, 5), generator=gen), torch.randint(0, 3, (64,), generator=gen)
    )
    engine, model, opt, loader = make_private(poisson=False, net=Bags, data=data)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine", features=["bag"])
    criterion = nn.CrossEntropyLoss()
    for _ in range(2):
        for ids, y in loader:  # (B, 5) ids, passed flat with offsets
            opt.zero_grad()
            offsets = torch.arange(0, ids.numel(), ids.shape[1])
            criterion(model(ids.reshape(-1), offsets), y).backward()
            opt.step()
    assert len(monitor.history) == 8 and not any(r.flags for r in monitor.history)
    assert "clipped/mine" in monitor.history[-1].mi


def test_a_single_logit_heads_integer_labels_become_one_hot_features():
    """A (B, 1) head with a loss that casts 0/1/2 labels itself: one class from the output's
    width made the one-hot fail at every step (features_error, every learned figure lost)."""
    engine, model, opt, loader = make_private(
        poisson=False, net=lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 1))
    )
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine")

    def loss(out, y):
        return nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), (y > 0).float())

    got = _capture_features(monitor, model, opt, loader, monitor.wrap_criterion(loss))
    _, y = next(iter(loader))
    assert torch.equal(got[0][1][:, 36:], nn.functional.one_hot(y, 3).float())
    assert not any(r.flags for r in monitor.history)


def test_a_step_whose_measurement_fails_still_gets_a_flagged_record():
    """Every step gets its record: a failure in the estimates used to lose it, epsilon and all."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, overlap=False)
    fail_estimate_at(monitor, 2)  # the second step's estimates raise
    epsilons = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, opt, loader, after_step=lambda: epsilons.append(engine.get_epsilon(1e-5)))
    history = monitor.history
    assert [r.step for r in history] == list(range(len(loader)))
    failed = history[1]
    assert failed.flags == ["error:RuntimeError"] and not failed.mi
    assert failed.epsilon == epsilons[1] and failed.batch_size == 16
    bound = mi_upper_bound(1.0, 16 / 96, 2, poisson_sampling=False)  # (fixed batches)
    assert failed.mi_upper_bound == pytest.approx(bound, rel=1e-12)
    assert all(not r.flags and r.mi for i, r in enumerate(history) if i != 1)


def test_a_chunk_whose_measurement_fails_is_flagged_as_the_error_not_as_an_empty_batch():
    """A chunk that failed to measure counts no examples (batch 0) but was no empty batch: its
    record says the error alone, and the steps around it are measured as ever. Reference: the
    same run without the failure."""

    def run(fail: bool):
        engine, model, opt, loader = make_private(poisson=False)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, overlap=False)
        measure, calls = monitor._measure_chunk, []

        def failing(taken):
            calls.append(1)
            if fail and len(calls) == 2:
                raise RuntimeError("injected")
            return measure(taken)

        monitor._measure_chunk = failing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(model, opt, loader)
        monitor.detach()
        return monitor.history

    clean, failed = run(False), run(True)
    assert failed[1].flags == ["error:RuntimeError"] and not failed[1].mi
    assert failed[1].batch_size == 0 and clean[1].batch_size == 16
    assert failed[1].epsilon == clean[1].epsilon
    assert len(failed) == len(clean) == 6
    for i, (got, ref) in enumerate(zip(failed, clean, strict=True)):
        if i != 1:
            assert got.flags == ref.flags == [] and got.batch_size == ref.batch_size
            assert "private/oracle" in got.mi


def test_plots_show_lone_points_small_sigma_and_infinite_epsilon(tmp_path, monkeypatch):
    """Three figures that drew nothing useful: a series of one record (a line of one point and
    a band of one point are invisible), a run at small sigma (the 200-nat bound set the axis,
    every estimate a flat line at its foot), an all-infinite epsilon (an empty panel)."""
    from opacus_mi import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig.axes[0]))

    def record(step, sigma, nats, epsilon=1.0):
        return LeakageRecord(
            step=step, batch_size=16, noise_multiplier=sigma, max_grad_norm=1.0,
            sample_rate=0.1, epsilon=epsilon, delta=1e-5,
            mi={"private/oracle": MIValue(nats, nats - 0.1, nats + 0.1, 16)},
            mi_bound=1 / (2 * sigma * sigma),
        )  # fmt: skip

    plots.plot_mi([record(0, 1.0, 0.3)], tmp_path / "mi.png")
    ax = seen.pop()
    oracle = next(line for line in ax.get_lines() if line.get_label() == "private/oracle")
    assert oracle.get_marker() == "o" and len(ax.collections) == 1  # the point and its CI bar
    plots.plot_mi([record(s, 0.05, 2.8) for s in range(5)], tmp_path / "mi.png")
    ax = seen.pop()
    top = ax.get_ylim()[1]
    assert math.log(16) < top < 5  # estimates and ln B in view, not 0..200
    assert any("bound/step 200 nats: above the axis" in t.get_text() for t in ax.texts)
    plots.plot_epsilon([record(s, 1.0, 0.3, math.inf) for s in range(3)], tmp_path / "e.png")
    assert any("no finite epsilon" in t.get_text() for t in seen.pop().texts)


def test_mi_plot_breaks_a_series_at_records_without_its_figure(tmp_path, monkeypatch):
    """A step whose learned figure is left out (its estimate non-finite, its features of
    another width: flagged) was skipped over: one segment joined steps 2 and 7 as if measured
    between them. It breaks there now, as a NaN figure does; the oracle, at every step, not."""
    from opacus_mi import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig.axes[0]))

    def record(step):
        mi = {"private/oracle": MIValue(0.2, 0.1, 0.3, 16)}
        if step not in (3, 4, 5, 6):
            mi["clipped/mine"] = MIValue(1.0 + step, 0.5 + step, 1.5 + step, 16)
        return LeakageRecord(
            step=step, batch_size=16, noise_multiplier=1.0, max_grad_norm=1.0,
            sample_rate=0.1, epsilon=1.0, delta=1e-5, mi=mi,
            flags=[] if "clipped/mine" in mi else ["estimate_nonfinite:clipped"],
        )  # fmt: skip

    plots.plot_mi([record(s) for s in range(10)], tmp_path / "mi.png")
    lines = {line.get_label(): line for line in seen.pop().get_lines()}
    x, y = (list(map(float, a)) for a in lines["clipped/mine"].get_data())
    assert x == list(range(10))
    drawn = [s for s, v in zip(x, y, strict=True) if math.isfinite(v)]
    assert drawn == [0, 1, 2, 7, 8, 9]  # (segments only between neighbours that both have one)
    assert all(math.isfinite(v) for v in lines["private/oracle"].get_ydata())


def test_sweep_plot_draws_no_bar_for_an_interval_it_does_not_have(tmp_path, monkeypatch):
    """A sweep row without a learned CI (sweep.txt's ``0.000 [-, -]``) was drawn with a capped
    bar from the midpoint to itself, as a measured zero-width interval is; a missing lower end
    as a bar from the midpoint. Such a point is hollow now, without a bar."""
    from matplotlib.collections import LineCollection

    from opacus_mi import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig.axes[0]))
    nan = math.nan
    rows = [
        {"setting": "a", "epsilon": 1.0, "clipped_mi": 0.5, "clipped_ci_low": nan,
         "clipped_ci_high": nan},
        {"setting": "b", "epsilon": 2.0, "clipped_mi": 0.5, "clipped_ci_low": 0.5,
         "clipped_ci_high": 0.5},
        {"setting": "c", "epsilon": 3.0, "clipped_mi": 0.5, "clipped_ci_low": nan,
         "clipped_ci_high": 0.9},
        {"setting": "d", "epsilon": 4.0, "clipped_mi": 0.6, "clipped_ci_low": 0.2,
         "clipped_ci_high": 0.9},
    ]  # fmt: skip
    plots.plot_sweep(rows, tmp_path / "sweep.png")
    ax = seen.pop()
    bars = [
        tuple(map(float, seg[:, 1]))
        for c in ax.collections
        if isinstance(c, LineCollection)
        for seg in c.get_segments()
    ]
    assert sorted(bars) == [(0.2, 0.9), (0.5, 0.5)]  # d's, and b's measured zero width
    hollow = [ln for ln in ax.get_lines() if ln.get_markerfacecolor() == "white"]
    assert [list(map(float, ln.get_xdata())) for ln in hollow] == [[1.0, 3.0]]


def test_mi_plot_draws_an_interval_whose_neighbours_have_none(tmp_path, monkeypatch):
    """Records of < 8 pairs have NaN intervals; fill_between breaks the band there, and an
    interval between two such records became a zero-width (invisible) polygon."""
    from matplotlib.collections import LineCollection, PolyCollection

    from opacus_mi import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig.axes[0]))
    nan = math.nan
    rows = [(21, .251, nan, nan), (22, .043, nan, nan), (23, .137, -.220, .494),
            (24, .096, nan, nan), (25, .50, .103, .897), (26, .45, .2, .7), (27, .4, .1, .6),
            (28, .3, nan, nan), (29, .2, -.1, .5)]  # fmt: skip
    records = [
        LeakageRecord(
            step=s,
            batch_size=8,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.06,
            epsilon=1.0,
            delta=1e-5,
            mi={"private/oracle": MIValue(m, lo, hi, 8)},
        )  # fmt: skip
        for s, m, lo, hi in rows
    ]
    plots.plot_mi(records, tmp_path / "mi.png")
    ax = seen.pop()
    covered = {}  # step -> (low, high) of a visible band or bar there
    for c in ax.collections:
        if isinstance(c, LineCollection):
            for seg in c.get_segments():
                if len(seg) and seg[0][1] != seg[1][1]:
                    covered[float(seg[0][0])] = (min(seg[:, 1]), max(seg[:, 1]))
        elif isinstance(c, PolyCollection):
            for path in c.get_paths():
                xs, ys = path.vertices[:, 0], path.vertices[:, 1]
                if xs.max() > xs.min():  # a band has width
                    for x in set(xs.tolist()):
                        at = ys[xs == x]
                        covered[x] = (float(at.min()), float(at.max()))
    expected = {float(s): (lo, hi) for s, _, lo, hi in rows if math.isfinite(lo)}
    assert set(covered) == set(expected)
    for s, (lo, hi) in expected.items():
        assert covered[s] == pytest.approx((lo, hi))


def test_mi_plot_shows_isolated_figures_and_the_oracles_own_ceiling(tmp_path, monkeypatch):
    """A finite figure between two NaN ones drew nothing (a line of one point), and under
    BatchMemoryManager the one 'ln B' line sat at the logical batch's ln 32 above an oracle
    whose candidates are each chunk's 8 examples."""
    from opacus_mi import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig.axes[0]))
    nan = math.nan

    def record(step, nats, ceiling):
        return LeakageRecord(
            step=step, batch_size=32, noise_multiplier=1.0, max_grad_norm=1.0,
            sample_rate=0.1, epsilon=1.0, delta=1e-5,
            mi={"private/oracle": MIValue(nats, nan, nan, 32, ceiling=ceiling)},
        )  # fmt: skip

    nats = [0.3, nan, 0.4, nan, 0.5, 0.6]
    plots.plot_mi([record(s, v, math.log(8)) for s, v in enumerate(nats)], tmp_path / "mi.png")
    ax = seen.pop()
    dots = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert [(x, y) for ln in dots for x, y in ln.get_xydata().tolist()] == [(0, 0.3), (2, 0.4)]
    by_label = {ln.get_label(): ln.get_ydata() for ln in ax.get_lines()}
    assert list(by_label["ln B (InfoNCE ceiling)"]) == [math.log(32)] * 6
    assert list(by_label["oracle ceiling (mean ln of its chunks' sizes)"]) == [math.log(8)] * 6
    # one chunk per step: one line, as before
    plots.plot_mi([record(s, 0.3, math.log(32)) for s in range(3)], tmp_path / "mi.png")
    labels = [ln.get_label() for ln in seen.pop().get_lines()]
    assert "ln B (InfoNCE / oracle ceiling)" in labels and not any("chunks" in x for x in labels)


def _plot_record(step, nats, lo, hi, *, batch=16, sigma=1.0, key="private/oracle", **kw):
    """A record of one series for the plots: its figure, interval, batch and bound."""
    mi = {} if nats is None else {key: MIValue(nats, lo, hi, max(batch, 1), **kw)}
    bound = None if sigma is None else (math.inf if sigma == 0 else 1 / (2 * sigma * sigma))
    return LeakageRecord(
        step=step, batch_size=batch, noise_multiplier=sigma or 0.0, max_grad_norm=1.0,
        sample_rate=0.1, epsilon=1.0, delta=1e-5, mi=mi, mi_bound=bound,
    )  # fmt: skip


def test_mi_plot_draws_each_line_only_where_it_has_values(tmp_path, monkeypatch):
    """An interval with one end unknown beside a whole one hid the whole one's bar; sigma 0's
    infinite bound was listed in the legend with no line; one record's bound and ln B are
    marks, not invisible lines of one point; an empty batch (B = 0) put ln B at 0; a run
    partly under BatchMemoryManager lost the oracle's own ceiling; the title called the
    oracle an estimate among the learned rows."""
    from matplotlib.collections import LineCollection

    from opacus_mi import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig.axes[0]))
    nan = math.nan

    def bars(ax):
        return [tuple(map(float, seg[:, 0])) + tuple(map(float, seg[:, 1]))
                for c in ax.collections if isinstance(c, LineCollection)
                for seg in c.get_segments()]  # fmt: skip

    records = [_plot_record(0, 0.3, 0.1, nan), _plot_record(1, 0.4, 0.2, 0.6),
               _plot_record(2, 0.5, 0.3, nan)]  # fmt: skip
    plots.plot_mi(records, tmp_path / "mi.png")
    assert bars(seen.pop()) == [(1.0, 1.0, 0.2, 0.6)]  # (a band needs both ends on two steps)

    plots.plot_mi([_plot_record(s, 0.3, 0.2, 0.4, sigma=0) for s in range(3)], "unused.png")
    labels = [ln.get_label() for ln in seen.pop().get_lines()]
    assert not any("bound/step" in label for label in labels)

    plots.plot_mi([_plot_record(0, 0.3, 0.2, 0.4)], "unused.png")
    lines = {ln.get_label(): ln for ln in seen.pop().get_lines()}
    assert lines["private view bound/step 1/(2 sigma^2)"].get_marker() == "_"
    assert lines["ln B (InfoNCE / oracle ceiling)"].get_marker() == "_"

    records = [_plot_record(0, 0.3, 0.2, 0.4), _plot_record(1, None, nan, nan, batch=0),
               _plot_record(2, 0.3, 0.2, 0.4, batch=8)]  # fmt: skip
    plots.plot_mi(records, "unused.png")
    lines = {ln.get_label(): ln for ln in seen.pop().get_lines()}
    ln_b = lines["ln B (InfoNCE / oracle ceiling)"].get_xydata().tolist()
    assert ln_b == [[0, math.log(16)], [2, math.log(8)]]

    chunked = [_plot_record(0, 0.3, 0.2, 0.4, batch=32, ceiling=math.log(32)),
               _plot_record(1, 0.3, 0.2, 0.4, batch=32, ceiling=math.log(8))]  # fmt: skip
    plots.plot_mi(chunked, "unused.png")
    lines = {ln.get_label(): ln for ln in seen.pop().get_lines()}
    ceiling = lines["oracle ceiling (mean ln of its chunks' sizes)"].get_ydata().tolist()
    assert ceiling == [math.log(32), math.log(8)]

    record = _plot_record(0, 0.3, 0.2, 0.4)
    record.mi["clipped/smile"] = MIValue(0.1, 0.0, 0.2, 16)
    plots.plot_mi([record], "unused.png")
    title = seen.pop().get_title()
    assert "smile: an estimate" in title and "oracle: an estimate" not in title


def test_mi_plot_keeps_ln_b_and_a_near_bound_in_view_and_cuts_at_a_quarter_of_the_top(
    tmp_path, monkeypatch
):
    """The y range: ln B always in view (estimates of 0.05 nats put the axis top at 0.1 and
    the ln B line above it); the bound in view unless above twice the largest figure (then
    noted); values below -max(1, top / 4) cut off with a note."""
    from opacus_mi import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig.axes[0]))

    def axis(records):
        plots.plot_mi(records, "unused.png")
        ax = seen.pop()
        return ax.get_ylim(), " ".join(t.get_text() for t in ax.texts)

    (_, top), _ = axis([_plot_record(s, 0.05, 0.04, 0.06, sigma=None) for s in range(3)])
    assert top > math.log(16)
    for sigma, kept in ((0.25, False), (0.35, True)):  # bounds 8 and 4.1 nats, ln 16 = 2.77
        (_, top), notes = axis([_plot_record(s, 0.3, 0.2, 0.4, sigma=sigma) for s in range(3)])
        bound = 1 / (2 * sigma**2)
        assert (top >= bound) == kept and ("above the axis" in notes) == (not kept)
        assert kept or f"bound/step {bound:.4g} nats" in notes
    records = [_plot_record(s, 5.0, 4.9, 5.1, batch=256, sigma=None) for s in range(3)]
    records[1].mi["private/oracle"].nats = -10.0
    (low, _), notes = axis(records)
    top = math.log(256)  # (the largest value: ln B)
    assert low == pytest.approx(-top / 4) and f"axis cut at {-top / 4:.2f} nats" in notes


def test_sweep_plot_orders_and_scales_by_finite_positive_epsilons(tmp_path, monkeypatch):
    """The raw view's column (opt-in) gets its own series; accuracy and the bound are lines
    along increasing epsilon through the rows that have one (rows come in sigma's order, or
    any order from a hand-edited sweep.csv); an epsilon of 0 does not make the axes log."""
    from opacus_mi import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig.axes))
    nan = math.nan
    rows = [
        {"setting": "b", "epsilon": 2.0, "test_accuracy": 0.8, "bound_per_step": 0.3,
         "oracle_mi": 0.2, "raw_mi": 0.9, "raw_ci_low": 0.8, "raw_ci_high": 1.0},
        {"setting": "a", "epsilon": 1.0, "test_accuracy": 0.6, "bound_per_step": 0.1,
         "oracle_mi": 0.1, "raw_mi": 0.7, "raw_ci_low": 0.6, "raw_ci_high": 0.8},
        {"setting": "c", "epsilon": 3.0, "test_accuracy": 0.9, "bound_per_step": 0.5,
         "oracle_mi": 0.3, "raw_mi": 1.1, "raw_ci_low": 1.0, "raw_ci_high": 1.2},
        {"setting": "d", "epsilon": nan, "test_accuracy": 0.95, "bound_per_step": 9.0},
    ]  # fmt: skip
    plots.plot_sweep(rows, tmp_path / "sweep.png")
    ax_mi, ax_acc = seen.pop()
    lines = {ln.get_label(): ln.get_xydata().tolist() for ln in ax_mi.get_lines()}
    assert lines["raw (learned)"] == [[1.0, 0.7], [2.0, 0.9], [3.0, 1.1]]
    assert lines["bound/step 1/(2 sigma^2)"] == [[1.0, 0.1], [2.0, 0.3], [3.0, 0.5]]
    assert ax_acc.get_lines()[0].get_xydata().tolist() == [[1.0, 0.6], [2.0, 0.8], [3.0, 0.9]]
    assert ax_mi.get_xscale() == ax_acc.get_xscale() == "linear"  # (3 < 10 x 1)
    rows[3]["epsilon"] = 0.0  # (a setting of no steps, or sigma beyond the accountant's grid)
    plots.plot_sweep(rows, tmp_path / "sweep.png")
    assert [ax.get_xscale() for ax in seen.pop()] == ["linear", "linear"]


def test_a_learned_row_below_zero_is_said_to_be_an_empty_bound_not_a_measurement():
    """From a review: at sigma 4 early in training a critic that validated above 0 read
    confidently below 0 on the next steps' pairs (raw/mine -0.99 [-1.48, -0.50] as the mean of
    the last 20), and the summary said nothing of what a negative MI figure means. Only a
    learned row whose mean's whole CI (the one the table shows) is below 0 is named."""
    from opacus_mi.report import mean_with_ci, summary_table

    def record(step, learned, oracle):
        return LeakageRecord(
            step=step, batch_size=32, noise_multiplier=4.0, max_grad_norm=1.0,
            sample_rate=0.1, epsilon=1.0, delta=1e-5,
            mi={"raw/mine": MIValue(learned, learned - 1, learned + 1, 32),
                "clipped/mine": MIValue(learned + 1.2, learned, learned + 2, 32),
                "private/oracle": MIValue(oracle, oracle - 0.1, oracle + 0.1, 32)},
        )  # fmt: skip

    below = [-1.0, -0.4, -1.6, -0.8, -1.2]  # raw: mean -1, CI below 0; clipped: around 0
    records = [record(s, v, -0.05 * (s % 2) - 0.1) for s, v in enumerate(below)]
    for key, under in (("raw/mine", True), ("clipped/mine", False), ("private/oracle", True)):
        hi = mean_with_ci([r.mi[key].nats for r in records])[2]
        assert (hi < 0) == under, key
    text = summary_table(records)
    assert "\nraw/mine: below 0 over these steps, an empty lower bound (MI is >= 0)," in text
    assert "clipped/mine:" not in text and "private/oracle:" not in text  # (an oracle: noise)
    lifted = [record(s, v + 2, 0.1) for s, v in enumerate(below)]
    assert "below 0 over these steps" not in summary_table(lifted)
    for r in records:  # smile's rows are estimates, not bounds (the table says so): not named
        r.mi = {k.replace("mine", "smile"): v for k, v in r.mi.items()}
    assert "below 0 over these steps" not in summary_table(records)


class _DictNet(nn.Module):
    """Called with a dict batch, as a tokenizer's collate gives one."""

    def __init__(self):
        super().__init__()
        self.fa, self.fb, self.fc = nn.Linear(5, 4), nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, batch):
        return self.fc(torch.tanh(self.fa(batch["a"]) + self.fb(batch["b"])))


@pytest.mark.parametrize("features", ["layer", "callable", "default"])
def test_a_dict_batch_pairs_through_a_layer_a_callable_or_its_first_field(features):
    """A dict (or tuple) batch had no features at all, even with features= a layer name or a
    callable, the fixes the monitor's own warning offered: every record features_unpaired."""
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(48, 5, generator=gen),
        torch.randn(48, 3, generator=gen),
        torch.randint(0, 3, (48,), generator=gen),
    )
    engine, model, opt, loader = make_private(poisson=False, net=_DictNet, data=data)
    chosen = {
        "layer": ["fa"],
        "callable": lambda batch: torch.cat([batch["a"], batch["b"]], dim=1),
        "default": None,
    }[features]
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, estimator="mine", features=chosen, overlap=False
    )
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    got = _spy_features(monitor)
    for a, b, y in loader:
        with torch.no_grad():  # (before the step moves the weights)
            if features == "layer":
                expected = model._module.fa(a)
            else:  # (the default: the first field)
                expected = torch.cat([a, b], dim=1) if features == "callable" else a
        opt.zero_grad()
        criterion(model({"a": a, "b": b}), y).backward()
        opt.step()
        torch.testing.assert_close(got[-1][:, :-3], expected)
        assert torch.equal(got[-1][:, -3:], nn.functional.one_hot(y, 3).float())
    assert not any(r.flags for r in monitor.history)
    assert "clipped/mine" in monitor.history[-1].mi


def test_targets_that_are_no_examples_labels_are_said_not_paired_or_failed():
    """A penalty's scalar target made every record features_error (an IndexError); a second
    wrapped loss replaced the first's labels; token-level targets (k B rows) were dropped
    without a word."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine", overlap=False)
    ce = monitor.wrap_criterion(nn.CrossEntropyLoss())
    mse = monitor.wrap_criterion(nn.MSELoss())
    got = _spy_features(monitor)
    with pytest.warns(RuntimeWarning, match="a second target for one forward"):
        for x, y in loader:
            opt.zero_grad()
            out = model(x)
            loss = ce(out, y)
            loss = loss + mse(out.pow(2).mean(), torch.tensor(0.0))  # a scalar target
            loss = loss + mse(out, torch.zeros_like(out))  # another per-example target
            loss.backward()
            opt.step()
            assert torch.equal(got[-1][:, 36:], nn.functional.one_hot(y, 3).float())
    assert not any(r.flags for r in monitor.history)
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine", overlap=False)
    ce = monitor.wrap_criterion(nn.CrossEntropyLoss())
    with pytest.warns(RuntimeWarning, match="targets have 32 rows for 16 examples"):
        for x, y in loader:
            opt.zero_grad()
            out = model(x)
            ce(torch.cat([out, out]), torch.cat([y, y])).backward()  # two "tokens" each
            opt.step()


def test_a_named_layer_called_twice_gives_its_first_output_and_says_so():
    """Its last call's output was the feature, with no word."""
    engine, model, opt, loader = make_private(poisson=False, net=ReusedRelu)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, estimator="mine", features=["act"], overlap=False
    )
    got = _spy_features(monitor)
    with pytest.warns(RuntimeWarning, match="'act' ran more than once in one forward"):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():  # (before the step moves the weights)
                expected = torch.relu(model._module.a(x.flatten(1)))
            opt.step()
            torch.testing.assert_close(got[-1], expected)


@pytest.mark.parametrize("container", ["tensor", "dict", "UserDict"])
def test_a_time_major_models_features_callable_gets_the_batch_first_input(container):
    """The README's recipe (one-hot ids summed over positions) got the (T, B) input and summed
    over the batch: at T == B every row was another example's, with no flag. A UserDict batch
    (a tokenizer's BatchEncoding) was no container to the monitor (the callable got None), and
    a time-major dict batch was counted along its T."""
    from collections import UserDict

    from torch.utils.data import TensorDataset

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(20, 4), nn.Linear(4, 3)

        def forward(self, ids):  # (T, B), or {"ids": (T, B)}: every layer time-major
            ids = ids if isinstance(ids, torch.Tensor) else ids["ids"]
            return self.fc(self.emb(ids)).mean(0)

    wrap = {"tensor": lambda ids: ids, "dict": lambda ids: {"ids": ids}}
    wrap["UserDict"] = lambda ids: UserDict(ids=ids)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(0, 20, (64, 16), generator=gen), torch.randint(0, 3, (64,), generator=gen)
    )
    engine, model, opt, loader = make_private(
        poisson=False, net=Tokens, data=data, private_kwargs={"batch_first": False}
    )

    def bags(batch):
        ids = batch if isinstance(batch, torch.Tensor) else batch["ids"]
        return nn.functional.one_hot(ids, 20).sum(1).float()

    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, estimator="mine", features=bags, overlap=False
    )
    got = _spy_features(monitor)
    for ids, y in loader:  # (B, T) ids, given time-major
        opt.zero_grad()
        nn.functional.cross_entropy(model(wrap[container](ids.T)), y).backward()
        opt.step()
        torch.testing.assert_close(got[-1], bags(ids))
    assert not any(r.flags for r in monitor.history)


def test_batches_keep_their_kind_and_are_counted_by_their_examples():
    """A PackedSequence inside a dict was taken apart (its data's dims swapped for a
    time-major model, its tokens counted as examples); a UserDict reached a callable as a
    plain dict (no attribute access); a dataclass batch reached it as None."""
    from collections import UserDict
    from dataclasses import dataclass

    from torch.nn.utils.rnn import pack_padded_sequence

    from opacus_mi import features as F

    class Encoding(UserDict):  # as transformers' BatchEncoding: fields as attributes too
        def __getattr__(self, name):
            return self.data[name]

    seqs = torch.randn(5, 4, 3)  # (T, B, 3), lengths 5, 4, 3, 2
    packed = pack_padded_sequence(seqs, torch.tensor([5, 4, 3, 2]))
    for batch in (packed, {"seq": packed}, (packed, torch.ones(4))):
        for layout in (lambda v: v, F._batch_first):
            kept = layout(F._kept(batch))
            inner = kept if isinstance(kept, F.PackedSequence) else next(iter(
                kept.values() if isinstance(kept, dict) else kept
            ))  # fmt: skip
            assert isinstance(inner, F.PackedSequence) and torch.equal(inner.data, packed.data)
            assert F._rows(kept) == 4
    ids = torch.arange(12).reshape(4, 3)
    kept = F._kept(Encoding(input_ids=ids))
    assert isinstance(kept, Encoding) and torch.equal(kept.input_ids, ids)
    assert kept.input_ids is not ids  # (a copy: the loop may refill its buffer)

    @dataclass
    class Batch:
        a: torch.Tensor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(36, 3)

        def forward(self, batch):
            return self.fc(batch.a.flatten(1))

    engine, model, opt, loader = make_private(poisson=False, net=Net)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, estimator="mine", overlap=False,
        features=lambda b: b.a.flatten(1),
    )  # fmt: skip
    got = _spy_features(monitor)
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(Batch(x)), y).backward()
        opt.step()
        assert torch.equal(got[-1], x.flatten(1))
    assert not any(r.flags for r in monitor.history)


def _same_records_with_and_without(loop, **private) -> list[dict]:
    """Records of a fixed-schedule monitor (every step measured, critics every second one) over
    ``loop(model, opt, criterion, loader, extra)``, run without its extra forwards (the
    reference) and with them: they must be equal. Returns the reference's, for the test's own
    checks that it measured something."""

    def records(extra: bool) -> list[dict]:
        engine, model, opt, loader = make_private(poisson=False, **private)
        mon = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, train_every=2)
        loop(model, opt, mon.wrap_criterion(nn.CrossEntropyLoss()), loader, extra)
        mon.detach()
        return without_timing(mon.history)

    reference = records(False)
    assert records(True) == reference
    return reference


@pytest.mark.parametrize("where", ["after_forward", "in_criterion"])
def test_a_forward_whose_loss_never_ran_backward_is_not_paired_with_the_next_step(where):
    """A loop that catches an exception between forward and backward (a user bug, a bad target
    inside the wrapped criterion) and goes on: in ew mode (the others fail in Opacus on such a
    loop) the abandoned forward's batch was paired with the next step's gradients, as a
    regulariser's second forward, and a bad target's labels made it features_error. Reference:
    the same loop skipping that batch before its forward; records identical."""

    def loop(model, opt, criterion, loader, abandon):
        for i, (x, y) in enumerate(itertools.chain(loader, loader)):
            opt.zero_grad()
            if i in (2, 6):
                if not abandon:
                    continue
                try:
                    out = model(x)
                    if where == "after_forward":
                        raise ValueError("a bug in the user's loop")
                    criterion(out, torch.full_like(y, 99))  # a target out of range
                except (ValueError, IndexError):
                    continue
            criterion(model(x), y).backward()
            opt.step()

    reference = _same_records_with_and_without(loop, mode="ew", n=96)
    assert len(reference) == 10 and any("clipped/mine" in r["mi"] for r in reference)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_a_forward_that_raised_inside_the_model_is_not_paired_with_the_next_step(mode):
    """A malformed batch raising inside the model, caught, the loop training on: the dead
    forward's capture (added before the forward ran) was paired with the next step's
    gradients and flagged as a regulariser's second forward. Reference: the same loop
    skipping that batch before its forward; records identical."""

    def loop(model, opt, criterion, loader, malformed):
        for i, (x, y) in enumerate(loader):
            opt.zero_grad()
            if i == 2:
                if malformed:
                    with pytest.raises(RuntimeError):
                        model(x[:, :, :, :5].flatten(2))  # (B, 1, 30): no image the conv takes
                continue
            criterion(model(x), y).backward()
            opt.step()

    reference = _same_records_with_and_without(loop, mode=mode, n=96)
    assert len(reference) == 5 and any("clipped/mine" in r["mi"] for r in reference)


@pytest.mark.parametrize(
    "transform",
    [lambda out: out, lambda out: out.log_softmax(1), lambda out: out[:, :3]],
    ids=["output", "log_softmax", "slice"],
)
def test_a_detached_forward_after_the_private_one_leaves_the_labels_with_the_loss(transform):
    """``out = model(x); target = model(x2).detach(); criterion(out, y).backward()`` (a
    consistency target): the labels went to the latest forward, the detached one, which the
    step then left out as no backward reached it. The step's features lost their labels, the
    critics were built for that width, and every later step was features_width_changed with
    no learned figure; on a transform of the output (not known as that output's) the labels
    were lost at every step, with no flag. Reference: the same loop without the detached
    forward (ew mode, whose detached forward adds nothing to the per-sample gradients);
    records identical."""

    def loop(model, opt, criterion, loader, detached):
        for x, y in itertools.chain(loader, loader):
            opt.zero_grad()
            out = model(x)
            if detached:
                model(x.flip(0)).detach()
            criterion(transform(out), y).backward()
            opt.step()

    reference = _same_records_with_and_without(loop, mode="ew", n=96)
    assert len(reference) == 12 and all(not r["flags"] for r in reference)
    assert sum("clipped/mine" in r["mi"] for r in reference) >= 10


class _NestedOutputCNN(TinyCNN):
    """Returns what a HuggingFace model does: a dict with a tuple of hidden states in it."""

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(1)
        return {"logits": self.fc(h), "hidden_states": (h,)}


@pytest.mark.filterwarnings("ignore:opacus-mi. several training forwards")
@pytest.mark.parametrize("through", ["logits", "hidden_states"])
def test_a_second_forward_counts_through_any_tensor_of_its_output(through):
    """A regulariser's second forward whose loss uses only a nested tensor of the output
    (hidden_states) was taken for a forward no backward reached and left out, so the step
    lost its features_first_forward flag, although Opacus summed both forwards into each row.
    Reference: the same loop through the top-level logits."""
    engine, model, opt, loader = make_private(net=_NestedOutputCNN, mode="ew")
    mon = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, train_every=2, overlap=False)
    criterion = mon.wrap_criterion(nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(5)
    for _, (x, y) in zip(range(3), loader, strict=False):
        opt.zero_grad()
        out, other = model(x), model(torch.randn(len(x), 1, 6, 6, generator=g))
        extra = other["hidden_states"][0] if through == "hidden_states" else other["logits"]
        (criterion(out["logits"], y) + 0.1 * extra.pow(2).mean()).backward()
        opt.step()
    mon.detach()
    assert [r.flags for r in mon.history] == [["features_first_forward"]] * 3


class _LogitsDict(dict):
    """A dict subclass pytree has no registration for (an EasyDict-style output)."""


@dataclass
class _LogitsRecord:
    logits: torch.Tensor


_OUTPUT_KINDS = {  # (wrap the logits, read them back)
    "dict_subclass": (lambda t: _LogitsDict(logits=t), lambda out: out["logits"]),
    "dataclass": (_LogitsRecord, lambda out: out.logits),
    "namespace": (lambda t: SimpleNamespace(logits=t), lambda out: out.logits),
}


@pytest.mark.parametrize("kind", list(_OUTPUT_KINDS))
def test_outputs_pytree_does_not_open_are_watched_as_a_dict_is(kind):
    """pytree takes an unregistered dict subclass, a dataclass or a SimpleNamespace for one
    leaf: no output tensor was watched, so a forward whose loss never ran backward (a bad
    target, caught) was paired with the next step and its labels made it features_error.
    Reference: the same loop skipping that batch."""
    wrap, logits = _OUTPUT_KINDS[kind]

    class Net(TinyCNN):
        def forward(self, x):
            return wrap(super().forward(x))

    def loop(model, opt, criterion, loader, abandon):
        for i, (x, y) in enumerate(loader):
            opt.zero_grad()
            if i == 2:
                if abandon:
                    with pytest.raises(IndexError):
                        criterion(logits(model(x)), torch.full_like(y, 99))
                continue
            criterion(logits(model(x)), y).backward()
            opt.step()

    reference = _same_records_with_and_without(loop, mode="ew", n=80, net=Net)
    assert len(reference) == 4 and any("clipped/mine" in r["mi"] for r in reference)


def test_a_monitored_output_saves_without_a_warning():
    """The hook that notes a backward reaching a forward's output made torch.save of that
    output warn that a backward hook is not serialized: an error under -W error."""
    import io

    engine, model, opt, loader = make_private()
    mon = LeakageMonitor(engine, model, opt, delta=1e-5, every=1)
    x, _ = next(iter(loader))
    out = model(x)
    assert out.grad_fn is not None and out._backward_hooks  # (watched)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.save(out, io.BytesIO())
    mon.detach()


@pytest.mark.filterwarnings("ignore:opacus-mi. several training forwards")
def test_labels_go_to_the_forward_the_loss_is_on_whatever_ran_after_it():
    """Forward A, a regulariser's forward B of the same batch, then an eval-mode forward C with
    grad on (a probe), then the loss on A's output: A was neither the latest captured forward
    nor the latest uncaptured one, so its labels were dropped at every step, unflagged.
    Reference: the same loop with C under no_grad."""

    def loop(model, opt, criterion, loader, probe_with_grad):
        for x, y in loader:
            opt.zero_grad()
            out, again = model(x), model(x + 0.01)
            model.eval()
            with torch.set_grad_enabled(probe_with_grad):
                model(x[:2])
            model.train()
            (criterion(out, y) + 0.1 * (out - again).pow(2).mean()).backward()
            opt.step()

    reference = _same_records_with_and_without(loop, n=64)
    assert len(reference) == 4 and any("clipped/mine" in r["mi"] for r in reference)


def test_an_output_linking_back_to_itself_is_walked_once():
    """The output walk had only a depth cap: an output whose n parts each link back to it was
    walked 1 + n + n^2 times a forward (56 ms at n = 60) and each tensor hooked once a visit."""
    from opacus_mi.features import _output_tensors

    root = SimpleNamespace(parts=[])
    for i in range(60):
        root.parts.append(SimpleNamespace(value=torch.full((2,), float(i)), parent=root))
    root.total = root.parts[0].value  # (one tensor reached twice)
    found = _output_tensors(root)
    assert [float(t[0]) for t in found] == [float(i) for i in range(60)]


def test_a_private_infonce_figure_at_ln_b_keeps_its_bug_check(monkeypatch):
    """Near ln B an InfoNCE record's interval is withheld (NaN: the batch lacks the rare
    confusions that would show its spread), and the bug check read that as 'no interval,
    nothing to check': a private figure of ln B at a bound of 0.5 nats went unflagged. The
    check now reads the jackknife's interval the record does not show. A figure short of the
    ceiling keeps its interval in the record, and nothing is flagged there."""
    from opacus_mi.estimators.online import OnlineEstimator

    def scripted(gap):
        def evaluate_on_device(self, x, y):  # [matched, mismatched, ci_low, ci_high]
            top = math.log(x.shape[0])
            return torch.tensor([top - gap, 0.0, top - gap - 0.002, top - gap + 0.002])

        return evaluate_on_device

    for gap, flagged in ((0.01, True), (2.5, False)):
        monkeypatch.setattr(OnlineEstimator, "evaluate_on_device", scripted(gap))
        engine, model, opt, loader = make_private(poisson=False, noise=1.0)
        monitor = LeakageMonitor(
            engine, model, opt, delta=1e-5, estimator="infonce", views=("private",)
        )
        train(model, opt, loader, criterion=monitor.wrap_criterion(nn.CrossEntropyLoss()))
        r = monitor.history[-1]
        v = r.mi["private/infonce"]
        assert v.nats == pytest.approx(math.log(16) - gap) and r.mi_bound == 0.5
        assert math.isnan(v.ci_low) == flagged  # 16 x 0.01 < 8: withheld; 16 x 2.5: kept
        assert ("exceeds_bound:private/infonce" in r.flags) == flagged, r.flags
        monitor.detach()


def test_a_summary_whose_last_record_is_older_than_the_run_says_so_and_gives_the_run_now():
    """With ``every`` > 1 the last record can be of an earlier step than the run's last. The
    title said "leakage after step 0 - epsilon 2.717 ...; any one example has leaked <= 0.04
    nats over the run" after four steps (epsilon 4.2, bound 0.16). It now names the record's
    step as the last measured and gives, after the last step, Opacus's epsilon and the closed
    form's MI bound."""
    engine, model, opt, loader = make_private(poisson=True, n=64, batch_size=16)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, every=3)
    train(model, opt, loader, epochs=2)  # steps 0..7; measured 0, 3, 6
    assert [r.step for r in monitor.history] == [0, 3, 6]
    title = monitor.summary().split("\n┏")[0].replace("\n", " ")
    noise, rate, steps = engine.accountant.history[-1]
    assert steps == 8
    assert title.startswith("opacus-mi leakage at step 6, the last measured of 8 - epsilon ")
    assert f"had leaked <= {monitor.history[-1].mi_upper_bound:.4g} nats by then" in title
    now = engine.get_epsilon(1e-5)
    bound = mi_upper_bound(noise, rate, 8)
    assert title.endswith(f"after step 7: epsilon {now:.3f}, MI accountant <= {bound:.4g} nats")
    assert bound > monitor.history[-1].mi_upper_bound
    from opacus.accountants import RDPAccountant
    from torch.utils.data import DataLoader, TensorDataset

    # Detached, it still speaks of the run it saw, not of the accountant's steps since
    attached = monitor.summary()
    monitor.detach()
    assert monitor.summary() == attached
    train(model, opt, loader)
    title = monitor.summary().split("\n┏")[0].replace("\n", " ")
    assert title.endswith(f"after step 7: epsilon {now:.3f}, MI accountant <= {bound:.4g} nats")
    assert engine.accountant.history[-1][2] == 12
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, every=3)
    two = DataLoader(TensorDataset(*loader.dataset[:32]), batch_size=16)
    train(model, opt, two)  # steps 12, 13; measured 12 (its first), then 15 would be next
    assert [r.step for r in monitor.history] == [12]
    ref = RDPAccountant()
    ref.history = [(noise, rate, 14)]
    title = monitor.summary().split("\n┏")[0].replace("\n", " ")
    assert title.startswith("opacus-mi leakage at step 12, the last measured of 14 - epsilon ")
    assert title.endswith(
        f"after step 13: epsilon {ref.get_epsilon(1e-5):.3f}, MI accountant <= "
        f"{mi_upper_bound(noise, rate, 14):.4g} nats"
    )
    train(model, opt, DataLoader(TensorDataset(*loader.dataset[:16]), batch_size=16))  # 14
    train(model, opt, DataLoader(TensorDataset(*loader.dataset[:16]), batch_size=16))  # 15
    assert monitor.history[-1].step == 15
    assert monitor.summary().startswith("opacus-mi leakage after step 15 - epsilon ")


def test_a_series_the_last_record_lacks_shows_its_latest_figure_with_its_step():
    """The "last" column took each series' latest record that had it, under a title naming the
    last record's step: step 0's figure read as step 7's (a run whose gradients went
    non-finite after step 0). It names its step now."""
    from opacus_mi.report import summary_table

    def record(step: int, keys: tuple[str, ...]) -> LeakageRecord:
        return LeakageRecord(
            step=step,
            batch_size=16,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.25,
            epsilon=1.0,
            delta=1e-5,
            mi={k: MIValue(nats=0.25 + step, ci_low=0.0, ci_high=1.0, n=16) for k in keys},
        )

    rows = summary_table(
        [record(0, ("private/oracle", "clipped/mine")), record(7, ("private/oracle",))]
    ).splitlines()
    mine = next(line for line in rows if "clipped/mine" in line)
    oracle = next(line for line in rows if "private/oracle" in line)
    assert "0.250 [0.000, 1.000] (step 0)" in mine
    assert "7.250 [0.000, 1.000] " in oracle and "(step" not in oracle


def test_a_state_of_a_model_of_another_size_is_refused_by_name():
    """A 3x3 and a 5x5 conv sketch to the same per-layer widths at token_dim 8: the state of
    one loaded into the other's monitor, whose semi-oracle's subspace rows and basis are
    P-dimensional, and every later record (the exact oracle's too) failed on a shape error."""
    from opacus_mi.subspace import GradientSubspace

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 5), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    def build(net):
        engine, model, opt, loader = make_private(poisson=False, net=net)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, train_every=1,
                                 estimator=None, semi_oracle=True, views=("private",),
                                 token_dim=8)  # fmt: skip
        return model, opt, loader, monitor

    model, opt, loader, monitor = build(TinyCNN)
    train(model, opt, loader, epochs=3)
    state = monitor.state_dict()
    *_, other = build(Wide)
    assert other.tokenizer.dims == monitor.tokenizer.dims  # (what the check compared)
    sizes = (monitor.subspace.num_params, other.subspace.num_params)
    with pytest.raises(ValueError, match=f"parameters={sizes[0]} there, {sizes[1]} here"):
        other.load_state_dict(state)
    assert not other.history
    assert monitor.subspace.basis is not None  # (it had fitted one)
    with pytest.raises(ValueError, match=f"model with {sizes[0]} parameters, this one has"):
        GradientSubspace(sizes[1], 8).load_state_dict(monitor.subspace.state_dict())
    monitor.detach(), other.detach()


def test_the_bound_check_flags_a_correct_estimate_at_its_stated_rate():
    """The check read its standard error off the 95% interval as if normal, but the interval
    is Student's t over the batch's n terms: at n = 8 a correct estimate whose truth sits at
    the bound was flagged in 0.27% of records, not 0.05%. Reference: the closed-form rate of
    the t interval over normal terms, P(T_7 > t_{0.9995}) = 0.0005."""
    import numpy as np

    from opacus_mi.estimators.bounds import interval_from
    from opacus_mi.monitor import _exceeds
    from opacus_mi.records import EXCEEDS_RATE, MIValue

    rng = np.random.default_rng(0)
    n, draws, bound = 8, 200_000, 0.05
    terms = bound + 0.01 * rng.standard_normal((draws, n))  # the truth at the bound
    flagged = 0
    for mean, sd in zip(terms.mean(1), terms.std(1, ddof=1), strict=True):
        m, lo, hi = interval_from(float(mean), float(sd), n)
        flagged += _exceeds(MIValue(m, lo, hi, n), bound)
    expected = EXCEEDS_RATE * draws  # 100, Poisson sd 10
    assert abs(flagged - expected) < 4 * expected**0.5, (flagged, expected)


def test_the_bound_check_reads_the_oracles_monte_carlo_width_at_its_own_df():
    """The oracle's interval is as wide as its Monte Carlo part's t with ``oracle_draws - 1``
    degrees of freedom where that part dominates; read off the interval with n - 1 = 63 (the
    check's reading before), a correct estimate at the bound was flagged in 0.59% of records,
    not 0.05%. Reference: the mean's Monte Carlo error over its estimated standard error from
    4 draws is exactly Student's t with 3 degrees of freedom, flagged at the stated rate."""
    import numpy as np

    from opacus_mi.estimators.bounds import interval_from
    from opacus_mi.monitor import _exceeds, _oracle_margin
    from opacus_mi.records import EXCEEDS_RATE, MIValue

    rng = np.random.default_rng(1)
    n, draws, bound, se, df = 64, 200_000, 0.05, 0.01, 3.0
    means = bound + se * rng.standard_normal(draws)  # the truth at the bound
    mc_se = se * np.sqrt(rng.chisquare(df, draws) / df)  # estimated from 4 draws
    sd = 1e-4  # the rows' spread: far below the Monte Carlo part's
    flagged = read_off = 0
    for mean, s in zip(means, mc_se, strict=True):
        m, lo, hi = interval_from(float(mean), sd, n, mc=(float(s), df))
        value = MIValue(m, lo, hi, n)
        flagged += _exceeds(value, bound, _oracle_margin(m, sd, n, (float(s), df)))
        read_off += _exceeds(value, bound)
    expected = EXCEEDS_RATE * draws  # 100, Poisson sd 10
    assert abs(flagged - expected) < 4 * expected**0.5, (flagged, expected)
    assert read_off > 8 * expected  # (what the record's interval alone gives: ~0.6%)


def test_a_monitors_oracle_is_checked_against_its_bound_with_its_own_wider_margin(monkeypatch):
    """The monitor hands the bound check the oracle's own 99.9% half-width (see the test
    above), not the record's 95% interval to read one off: wider than that interval's lower
    half at every record. Reference: each record's displayed interval."""
    import opacus_mi.monitor as monitor_module

    checked = []
    exceeds = monitor_module._exceeds
    monkeypatch.setattr(
        monitor_module,
        "_exceeds",
        lambda value, bound, margin=None: (
            checked.append((value, margin)),
            exceeds(value, bound, margin),
        )[1],
    )
    engine, model, opt, loader = make_private(poisson=False, noise=0.7)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None)
    train(model, opt, loader)
    monitor.detach()
    assert len(checked) == len(monitor.history) == len(loader)
    for (value, margin), record in zip(checked, monitor.history, strict=True):
        oracle = record.mi["private/oracle"]
        assert value.nats == oracle.nats and margin is not None
        assert margin > oracle.nats - oracle.ci_low > 0


def test_a_runs_bound_flags_are_called_a_bug_only_beyond_chance():
    """A 9,000-record run of a correct oracle had 2 records flagged exceeds_bound (0.05% of
    records are, by chance) and its summary opened with "BUG? an estimate exceeded its bound".
    Reference: the binomial tail at 0.05% a record (scipy)."""
    from scipy.stats import binom

    from opacus_mi.records import EXCEEDS_RATE
    from opacus_mi.report import summary_table

    def run(n: int, flagged: set[int]) -> list[LeakageRecord]:
        records = []
        for step in range(n):
            flags = ["exceeds_bound:private/oracle"] if step in flagged else []
            mi = {"private/oracle": MIValue(0.05, 0.04, 0.06, 64)}
            records.append(
                LeakageRecord(
                    step, 64, 3.0, 1.0, 0.05, 1.0, 1e-5, mi=mi, mi_bound=0.0556, flags=flags
                )
            )
        return records

    text = summary_table(run(9000, {3001, 5341}))
    assert "BUG?" not in text
    assert "exceeds_bound:private/oracle (2 of 9000 records: as often as noise flags" in text
    p = binom.sf(2, 100, EXCEEDS_RATE)  # 3 of 100: p ~ 2e-5
    text = summary_table(run(100, {5, 50, 90}))
    said = "BUG? private/oracle exceeded its bound beyond its CI in 3 of 100 records"
    assert f"{said} (by chance: p = {p:.1g})" in text.replace("\n", " ")


def _first_batch_without_the_top_class() -> torch.utils.data.TensorDataset:
    """make_data's 3 classes, ordered so that the first batch of 16 holds classes 0 and 1 only."""
    x, y = make_data(96).tensors
    order = torch.cat([torch.nonzero(y < 2).flatten()[:16], torch.nonzero(y == 2).flatten()])
    rest = torch.tensor([i for i in range(96) if i not in set(order.tolist())], dtype=torch.long)
    order = torch.cat([order[:16], rest, order[16:]])
    return torch.utils.data.TensorDataset(x[order], y[order])


@pytest.mark.parametrize("how", ["logits_attribute", "logits_key", "num_classes", "neither"])
def test_the_label_width_holds_when_the_loss_is_not_given_the_logits_tensor(how):
    """A model returning an output object, its loss called on the object: the wrapper read the
    classes from each batch's largest label, so a first batch without the top class built the
    critics one column narrow and every later step was flagged features_width_changed, with
    no learned figure. The classes now come from the object's ``.logits`` or from
    ``num_classes=``; where neither gives them, the monitor says so and how to give them."""

    class Net(TinyCNN):
        def forward(self, x):
            out = super().forward(x)
            if how == "logits_attribute":
                return SimpleNamespace(logits=out)
            return {"logits": out} if how == "logits_key" else _LogitsDict(z=out)

    data = _first_batch_without_the_top_class()
    assert int(data.tensors[1][:16].max()) == 1 and int(data.tensors[1].max()) == 2
    engine, model, opt, loader = make_private(poisson=False, data=data, net=Net)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine", every=1)

    def loss(out, y):
        logits = out.logits if how == "logits_attribute" else out.get("logits", out.get("z"))
        return nn.functional.cross_entropy(logits, y)

    criterion = monitor.wrap_criterion(loss, num_classes=3 if how == "num_classes" else None)
    if how == "neither":
        with pytest.warns(RuntimeWarning, match=r"num_classes=K"):
            train(model, opt, loader, criterion=criterion)
        assert any("features_width_changed" in r.flags for r in monitor.history)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="opacus-mi")
            train(model, opt, loader, criterion=criterion)
        assert not any(r.flags for r in monitor.history)
        assert monitor._feature_width() == 36 + 3
        assert "clipped/mine" in monitor.history[-1].mi
    monitor.detach()


@pytest.mark.parametrize("bad", [1, 0, 2.0, True, "3"])
def test_wrap_criterion_names_a_bad_num_classes(bad):
    engine, model, opt, _ = make_private()
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5)
    with pytest.raises(ValueError, match=r"num_classes=.*an int >= 2"):
        monitor.wrap_criterion(nn.CrossEntropyLoss(), num_classes=bad)
    monitor.detach()


@pytest.mark.parametrize(
    "bad, said",
    [(nn.CrossEntropyLoss, "the class CrossEntropyLoss"), ("ce", "str 'ce'"), (None, "NoneType")],
)
def test_wrap_criterion_refuses_what_is_not_a_loss_by_name(bad, said):
    """The loss class itself (brackets forgotten) or a name was accepted and failed at the
    first loss ("Boolean value of Tensor ... is ambiguous", "'str' object is not callable"),
    naming neither wrap_criterion nor the fix; the monitor and the model are left as they were."""
    engine, model, opt, loader = make_private()
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, every=1)
    with pytest.raises(
        TypeError, match=rf"wrap_criterion's criterion is {said}.*CrossEntropyLoss\(\)"
    ):
        monitor.wrap_criterion(bad)
    train(model, opt, loader, criterion=monitor.wrap_criterion(nn.CrossEntropyLoss()))
    assert monitor.history and not any(r.flags for r in monitor.history)
    monitor.detach()


def test_a_wrappers_classes_reach_a_wrapper_around_it():
    """A monitor's wrapper (num_classes=3) wrapped again, by the same monitor or a notebook's
    next one: the outer wrapper, which records the labels, read only its own num_classes or the
    output, so an output object without logits lost the classes given (and NumPy's int is an
    int, as for every other argument)."""
    import numpy as np

    class Net(TinyCNN):
        def forward(self, x):
            return _LogitsDict(z=super().forward(x))

    data = _first_batch_without_the_top_class()
    engine, model, opt, loader = make_private(poisson=False, data=data, net=Net)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine", every=1)
    inner = monitor.wrap_criterion(
        lambda out, y: nn.functional.cross_entropy(out["z"], y), num_classes=np.int64(3)
    )
    criterion = monitor.wrap_criterion(inner)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="opacus-mi")
        train(model, opt, loader, criterion=criterion)
    assert not any(r.flags for r in monitor.history)
    assert monitor._feature_width() == 36 + 3
    monitor.detach()


# Rules of features.py a mutation audit found unguarded (each test below fails under its
# mutation), against closed forms, brute-force loops, torch itself or the documented rule.


def _label_features(data, criterion_of, *, net=None, num_classes=None):
    """Each step's label columns (after the 36 input ones) and the labels the loader gave."""
    kwargs = {} if net is None else {"net": net}
    engine, model, opt, loader = make_private(poisson=False, data=data, **kwargs)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine", overlap=False)
    criterion = monitor.wrap_criterion(criterion_of(), num_classes=num_classes)
    got = _spy_features(monitor)
    targets = []
    for x, y in loader:
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()
        targets.append(y)
    return monitor, got, targets


def test_pool_features_pools_an_image_to_the_largest_grid_within_max_dim():
    """(B, 4, 64, 64) with max_dim 1024: per channel a 16 x 16 grid of 4 x 4 block means (the
    largest square grid with 4 * h * w <= 1024), channels kept in order."""
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = x.reshape(2, 4, 16, 4, 16, 4).mean(dim=(3, 5)).reshape(2, -1)  # brute block means
    got = pool_features(x)
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, ref)


def test_pool_features_adds_no_autograd_edge():
    """The module's rule: features are read-only copies, no autograd edge to the model."""
    x = torch.randn(3, 5, requires_grad=True)
    for inp in (x, x * 2, (x * 2).reshape(3, 5, 1, 1).expand(3, 5, 32, 32)):
        out = pool_features(inp)
        assert not out.requires_grad and out.grad_fn is None


def test_an_ignore_index_of_zero_makes_class_zeros_rows_all_zero():
    """wrap_criterion: 'a label the loss ignores (its ignore_index) is an all-zero row'; 0 is a
    valid ignore_index (record_labels: 'the loss's non-negative ignore_index')."""
    x, y = make_data(48).tensors
    assert (y == 0).any()
    data = torch.utils.data.TensorDataset(x, y)
    monitor, got, targets = _label_features(data, lambda: nn.CrossEntropyLoss(ignore_index=0))
    assert len(got) == len(targets) == 3
    for feats, yb in zip(got, targets, strict=True):
        ref = torch.zeros(len(yb), 3)  # brute force
        for i, label in enumerate(yb.tolist()):
            if label != 0:
                ref[i, label] = 1.0
        assert torch.equal(feats[:, 36:], ref)


def test_float_regression_targets_are_values_not_one_hot_classes():
    """A 1-D float target (a regression loss) is no class index: its feature is the value."""

    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 1))

    x, _ = make_data(48).tensors
    target = torch.linspace(-1.5, 2.75, 48)
    data = torch.utils.data.TensorDataset(x, target)
    monitor, got, targets = _label_features(
        data, lambda: lambda out, t: nn.functional.mse_loss(out.squeeze(1), t), net=net
    )
    assert len(got) == 3
    for feats, yb in zip(got, targets, strict=True):
        assert feats.shape == (16, 37)
        assert torch.equal(feats[:, 36], yb)


def test_a_label_past_two_given_classes_is_a_features_error():
    """num_classes=2 given and a label 2 (a loss that ignores it): one_hot_labels' rule, 'a
    label >= classes raises', holds at two classes too, not silently widened to three."""
    x, y = make_data(32).tensors
    assert (y == 2).any()
    data = torch.utils.data.TensorDataset(x, y)

    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 2))

    with pytest.warns(RuntimeWarning, match=r"include \[2\], outside its 2 classes"):
        monitor, got, _ = _label_features(
            data,
            lambda: lambda out, t: nn.functional.cross_entropy(out, t, ignore_index=2),
            net=net,
            num_classes=2,
        )
    assert all("features_error" in r.flags for r in monitor.history)


def test_a_loop_that_refills_its_input_and_label_buffers_before_the_step_changes_no_feature():
    """The module's rule: 'nothing done to those tensors afterwards changes the features' (a
    loop refilling one input buffer for its next step). Here the batch and its labels are
    overwritten in place between backward and step; the features are still the batch's."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine", overlap=False)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    got = _spy_features(monitor)
    for x, y in loader:
        ref = torch.cat([x.reshape(len(x), -1), nn.functional.one_hot(y, 3).float()], dim=1)
        opt.zero_grad()
        criterion(model(x), y).backward()
        x.fill_(7.0)  # the next batch is written into the same buffers
        y.fill_(1)
        opt.step()
        assert torch.equal(got[-1], ref)
    assert len(got) == 6


def _label_columns_with(loop_step) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of each step of a loop whose step is ``loop_step(model, crit, x, y)``
    (it returns the loss to backpropagate)."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator="mine", overlap=False)
    crit = monitor.wrap_criterion(nn.CrossEntropyLoss())
    penalty = monitor.wrap_criterion(lambda a, b: (a - b) ** 2)
    got = _spy_features(monitor)
    out = []
    for x, y in loader:
        opt.zero_grad()
        loop_step(model, crit, penalty, x, y).backward()
        opt.step()
        out.append((got[-1], y))
    assert not any(r.flags for r in monitor.history)
    return out


def test_a_penaltys_scalar_target_is_no_examples_label():
    """A wrapped loss with a 0-d target (a penalty towards 0) runs before the classifier's: it
    lends no labels, so the classifier's targets are the label features."""

    def step(model, crit, penalty, x, y):
        logits = model(x)
        return penalty(logits.pow(2).mean(), torch.tensor(0.0)) + crit(logits, y)

    for feats, y in _label_columns_with(step):
        assert torch.equal(feats[:, 36:], nn.functional.one_hot(y, 3).float())


def test_a_loss_on_a_detached_output_lends_no_labels():
    """record_labels: 'a loss that cannot reach the gradients' (a logged metric on the
    detached logits, here against a baseline of class 0) lends nothing; the loss that is
    backpropagated does."""

    def step(model, crit, penalty, x, y):
        logits = model(x)
        crit(logits.detach(), torch.zeros_like(y))  # (logged, never backpropagated)
        return crit(logits, y)

    for feats, y in _label_columns_with(step):
        assert torch.equal(feats[:, 36:], nn.functional.one_hot(y, 3).float())


def test_a_no_grad_forward_before_the_loss_leaves_its_labels():
    """'(a no_grad forward before the loss leaves its labels)': a no_grad forward of the same
    model (a target's) between the training forward and a loss on a transform of its output
    (log_softmax, not known as the output's) still gives the training forward the labels."""

    def step(model, crit, penalty, x, y):
        logits = model(x)
        with torch.no_grad():
            model(x)
        return crit(logits.log_softmax(-1), y)

    for feats, y in _label_columns_with(step):
        assert torch.equal(feats[:, 36:], nn.functional.one_hot(y, 3).float())
