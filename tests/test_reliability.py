"""Faults, checkpoints and durability: the monitor never kills a job or loses a record."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TinyCNN, fail_estimate_at, make_data, make_private, train, without_timing
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from opacus_mi import LeakageMonitor, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_nan_per_sample_gradient_is_flagged_excluded_and_warned_once():
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, (x, y) in enumerate(loader):
            opt.zero_grad()
            criterion(model(x), y).backward()
            if step == 1:  # simulate a fault in one example's per-sample gradient
                with torch.no_grad():
                    model._module.fc.weight.grad_sample[3, 0, 0] = float("nan")
            opt.step()
            if step == 2:  # Opacus's update was NaN at step 1: every gradient is NaN now
                break
    ours = [w for w in caught if "opacus-mi" in str(w.message)]
    assert len(ours) == 1 and "NaN/Inf" in str(ours[0].message)
    r0, r1, r2 = monitor.history
    assert not r0.flags
    assert "nonfinite_grad_sample" in r1.flags
    assert r1.mi["private/oracle"].n == 15  # the bad example is excluded, the rest measured
    assert "nonfinite_grad_sample" in r2.flags and not r2.mi  # nothing finite left to measure


def test_a_flag_of_several_chunks_of_one_step_is_on_its_record_once():
    """A logical step of four physical chunks (BatchMemoryManager), two of them with a NaN
    example: the record says ``nonfinite_grad_sample`` once, and measures the 30 finite
    examples. Reference: the examples spoiled by hand."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    engine, model, opt, loader = make_private(poisson=False, batch_size=32, n=32)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=8, optimizer=opt) as mm:
            for chunk, (x, y) in enumerate(mm):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                if chunk in (1, 2):
                    with torch.no_grad():
                        model._module.fc.weight.grad_sample[3, 0, 0] = float("nan")
                opt.step()
    monitor.detach()
    (record,) = monitor.history
    assert record.chunks == 4 and record.batch_size == 32
    assert record.flags == ["nonfinite_grad_sample"]
    assert record.mi["private/oracle"].n == 30


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_float64_model_keeps_examples_whose_squared_norms_pass_float32s_range(mode):
    """Norms of ~4e20 are finite in float64 and Opacus clips them as usual; the monitor's
    float32 Gram squared them to inf: it dropped those examples as non-finite (hooks) or
    measured an infinite Gram (ghost clipping)."""
    import copy

    from opacus_mi.estimators.oracle import gram_oracle

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) * 1e20

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4).double(), torch.randint(0, 3, (24,)))
    module = Scaled().double()
    reference = copy.deepcopy(module)
    engine = PrivacyEngine(accountant="rdp")
    made = engine.make_private(
        module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.0),
        data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode=mode,
        **({"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}),
    )
    if mode == "ghost":  # (Opacus's ghost clipping returns its loss third)
        model, opt, criterion, loader = made
    else:
        (model, opt, loader), criterion = made, nn.CrossEntropyLoss()
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, every=1, overlap=False, estimator=None, oracle_draws=4000
    )
    x, y = next(iter(loader))
    opt.zero_grad()
    criterion(model(x), y).backward()
    opt.step()
    monitor.flush()
    # Each example's gradient by a loop, clipped as Opacus clips in float64.
    grads = []
    for i in range(8):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in reference.parameters()]))
    flat = torch.stack(grads)
    norms = flat.norm(dim=1)
    assert float(norms.max()) > 1e20 and torch.isfinite(norms).all()
    flat = flat * (1.0 / (norms + 1e-6)).clamp(max=1.0)[:, None]
    truth = gram_oracle(flat @ flat.T, 1.0, draws=20000, generator=torch.Generator().manual_seed(1))
    (record,) = monitor.history
    assert "nonfinite_grad_sample" not in record.flags
    assert record.mi["private/oracle"].n == 8
    assert record.mi["private/oracle"].nats == pytest.approx(truth.nats, abs=0.05)
    monitor.detach()


def test_nan_features_exclude_only_the_bad_pairs():
    def feature(x):
        f = x.mean(dim=(1, 2, 3))[:, None].clone()
        f[0] = float("nan")
        return f

    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, features=feature, train_every=1)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        train(model, opt, loader, epochs=2)
    assert all("nonfinite_features" in r.flags for r in monitor.history)
    learned = [r.mi["clipped/mine"] for r in monitor.history if "clipped/mine" in r.mi]
    assert learned and all(v.n == 15 for v in learned)


def test_failing_feature_callable_does_not_stop_training_or_the_oracle():
    def broken(x):
        raise RuntimeError("user bug")

    e0, m0, o0, l0 = make_private(poisson=False)
    train(m0, o0, l0)
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, features=broken)
    with pytest.warns(RuntimeWarning, match="feature extraction failed"):
        train(model, opt, loader)
    for a, b in zip(m0.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all("features_error" in r.flags and "private/oracle" in r.mi for r in monitor.history)


def test_frozen_parameters_and_half_precision_inputs():
    class HalfInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(36, 8)
            self.head = nn.Linear(8, 3)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.head(torch.relu(self.frozen(x.float().flatten(1))))

    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x = torch.randn(64, 1, 6, 6).to(torch.float16)
    y = torch.randint(0, 3, (64,))
    model = HalfInput()
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
    assert monitor.tokenizer.dims == [8 * 3 if 8 * 3 < 64 else 64, 3]
    train(model, opt, loader, epochs=2, criterion=monitor.wrap_criterion(nn.CrossEntropyLoss()))
    assert all(not r.flags for r in monitor.history)
    assert any("clipped/mine" in r.mi for r in monitor.history)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_parameters_frozen_mid_run_are_refused_not_mismeasured(mode):
    """The sketch, rank-one inputs and ghost capture index the parameters the monitor was built
    for. A layer frozen mid-run shifted them: records with mismatched layers (a Gram 94% off,
    no flag) or an IndexError flagged as an empty batch. Now each later record is flagged
    ``error:ParamsChanged`` with one warning that says what to do, and training goes on."""

    def run(monitored: bool):
        engine, model, opt, criterion, loader = make_private(
            poisson=False, mode=mode, with_criterion=True
        )
        monitor = (
            LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None) if monitored else None
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step, (x, y) in enumerate(loader):
                if step == 2:
                    model._module.conv.requires_grad_(False)  # the body frozen from here on
                opt.zero_grad()
                criterion(model(x), y).backward()
                opt.step()
        ours = [str(w.message) for w in caught if "opacus-mi" in str(w.message)]
        return monitor, [p.detach().clone() for p in model.parameters()], ours

    monitor, weights, warned = run(True)
    _, plain, _ = run(False)
    assert all(torch.equal(a, b) for a, b in zip(weights, plain, strict=True))
    assert [r.flags for r in monitor.history] == [[]] * 2 + [["error:ParamsChanged"]] * 4
    if monitor._linear_inputs is not None:  # the refused steps' inputs are let go of
        assert not monitor._linear_inputs._seen
    assert all("private/oracle" in r.mi for r in monitor.history[:2])
    assert len(warned) == 1 and "create a new LeakageMonitor" in warned[0]


def test_a_non_finite_oracle_is_flagged(monkeypatch):
    """Off the CPU a Gram its factor cannot take gives a NaN oracle (never a wrong number);
    the record carried it without a flag."""
    import opacus_mi.monitor as monitor_module
    from opacus_mi.estimators.oracle import OracleResult

    def broken(gram, *args, **kwargs):
        return OracleResult(terms=torch.full((gram.shape[0],), math.nan), batch_size=len(gram))

    monkeypatch.setattr(monitor_module, "gram_oracle", broken)
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None)
    train(model, opt, loader)
    assert all("estimate_nonfinite:private/oracle" in r.flags for r in monitor.history)


def _poison_at_step_3(monitor, estimator) -> tuple[Callable[[], None], dict]:
    """An ``after_step`` that fills the estimator's critic with NaN once, after step 3, and
    the record of whether it did."""
    poisoned = {"done": False}

    def poison():
        monitor.flush()  # no critic update in flight on an overlap worker while we write
        if estimator.critic is not None and not poisoned["done"] and monitor.steps == 3:
            with torch.no_grad():
                next(estimator.critic.parameters()).fill_(float("nan"))
            poisoned["done"] = True

    return poison, poisoned


def test_diverging_critic_is_reset_and_flagged_not_propagated():
    engine, model, opt, loader = make_private(poisson=False, n=160)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, views=("clipped",), train_every=1)
    poison, _ = _poison_at_step_3(monitor, monitor.estimators["clipped"])
    with pytest.warns(RuntimeWarning, match="diverged"):
        train(model, opt, loader, epochs=2, after_step=poison)
    flags = [f for r in monitor.history for f in r.flags]
    assert "critic_reset:clipped" in flags
    later = [r.mi["clipped/mine"].nats for r in monitor.history[6:] if "clipped/mine" in r.mi]
    assert later and all(v == v for v in later)  # finite again after the reset


def test_a_diverging_control_critic_is_reset_and_said_without_flagging_the_records():
    """The control critic measures the estimator's own bias: its reset is said (once), but the
    records' figures, the main critic's, are not flagged ``critic_reset`` for it. Reference:
    the poisoned critic is the control's, and it is the one rebuilt."""
    engine, model, opt, loader = make_private(poisson=False, n=160)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, views=("clipped",), train_every=1, control=True
    )
    ctrl = monitor.controls["clipped"]
    poison, poisoned = _poison_at_step_3(monitor, ctrl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, loader, epochs=2, after_step=poison)
        monitor.flush()
    said = [str(w.message) for w in caught]
    assert poisoned["done"] and ctrl.resets >= 1 and monitor.estimators["clipped"].resets == 0
    assert sum("the clipped-view control critic was reset" in m for m in said) == 1
    assert not any("diverged" in m for m in said)
    assert not any(f.startswith("critic_reset") for r in monitor.history for f in r.flags)
    monitor.detach()


def test_checkpoint_resume_gives_identical_following_records(tmp_path):
    ckpt = tmp_path / "ckpt.pt"

    def run(resume: bool):
        engine, model, opt, loader = make_private(poisson=False, seed=0)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
        train(model, opt, loader, criterion=monitor.wrap_criterion(nn.CrossEntropyLoss()))
        if resume:
            engine.save_checkpoint(
                path=ckpt,
                module=model,
                optimizer=opt,
                checkpoint_dict={"monitor": monitor.state_dict(), "rng": torch.get_rng_state()},
            )
            monitor.detach()
            del engine, model, opt, monitor
            # a new process: fresh objects with different initial weights, then restore
            engine, model, opt, loader = make_private(poisson=False, seed=123)
            extra = engine.load_checkpoint(path=ckpt, module=model, optimizer=opt)
            torch.set_rng_state(extra["rng"])
            monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
            monitor.load_state_dict(extra["monitor"])
        train(model, opt, loader, criterion=monitor.wrap_criterion(nn.CrossEntropyLoss()))
        return without_timing(monitor.history), [p.detach().clone() for p in model.parameters()]

    (a, pa), (b, pb) = run(False), run(True)
    assert len(a) == len(b) == 12
    assert a == b
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)


def test_a_state_dict_taken_between_a_logical_steps_physical_batches_says_so():
    """Saved between BatchMemoryManager's physical batches, neither the monitor's state nor
    Opacus's checkpoint holds the batches summed so far: the resumed run released and recorded
    that step short (5 of 16 examples) with no word. Opacus's own flag is the reference."""
    engine, model, opt, loader = make_private(poisson=False, seed=0)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, estimator=None)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    x, y = next(iter(loader))
    for part, last in ((slice(0, 6), False), (slice(6, 16), True)):
        opt.zero_grad()
        criterion(model(x[part]), y[part]).backward()
        opt.signal_skip_step(do_skip=not last)  # as BatchMemoryManager does
        opt.step()
        assert opt._is_last_step_skipped == (not last)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monitor.state_dict()
        said = [str(w.message) for w in caught if "middle of logical step" in str(w.message)]
        assert len(said) == (0 if last else 1)
    assert said == [] and [r.batch_size for r in monitor.history] == [16]


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, sys.argv[2])
    from conftest import make_private
    from opacus_mi import LeakageMonitor
    engine, model, opt, loader = make_private(poisson=False, n=64, batch_size=4)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, jsonl=sys.argv[1], every=1, overlap=sys.argv[3] == "1"
    )
    for epoch in range(1000):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            print("step", monitor.steps - 1, flush=True)
    """
)


@pytest.mark.parametrize("overlap", [False, True])
def test_sigkill_mid_run_loses_no_completed_record(tmp_path, overlap):
    """Every step's record is on disk once the step returns; with overlap, once the next step
    returns (the worker makes it meanwhile), so a kill loses at most the record in flight."""
    path = tmp_path / "records.jsonl"
    script = tmp_path / "job.py"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(ROOT / "tests"), str(int(overlap))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    completed = -1
    try:
        for line in proc.stdout:
            completed = int(line.split()[1])
            if completed >= 25:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    records = read_jsonl(path)
    steps = [r.step for r in records]
    delivered = completed + 1 - int(overlap)
    assert steps[:delivered] == list(range(delivered))


def _interrupt_at(function: str, *, event: str = "call"):
    """A trace function raising Ctrl-C the first time ``function`` reaches ``event``: an
    interrupt landing at an exact point of the monitor's (or a sink's) code. Only code of
    ``opacus_mi`` or of this file counts: a ``__call__`` elsewhere (a ``weakref.finalize`` that
    the garbage collector runs mid-step, say) is not the point the test means to interrupt."""
    import opacus_mi

    ours = (str(Path(opacus_mi.__file__).parent), __file__)
    fired = []

    def tracer(frame, seen, arg):
        code = frame.f_code
        if (
            not fired
            and seen == event
            and code.co_name == function
            and code.co_filename.startswith(ours)
        ):
            fired.append(True)
            sys.settrace(None)
            raise KeyboardInterrupt
        return tracer

    return tracer, fired


@pytest.mark.parametrize(
    ("where", "event", "in_detach", "overlap"),
    [
        ("__call__", "call", False, False),  # the JSONL's write not begun, mid-run
        ("__call__", "call", False, True),
        # The same in detach's last delivery (an overlap worker's record: the CLI's SIGTERM).
        ("__call__", "call", True, True),
        ("__call__", "return", True, True),  # the JSONL written, the delivery not told so
        ("sink", "call", False, False),  # inside a user sink, after the JSONL
        ("sink", "call", False, True),
    ],
)
def test_an_interrupt_mid_delivery_loses_no_record(tmp_path, overlap, where, event, in_detach):
    """Ctrl-C (or the CLI's SIGTERM) landing while a record is handed out: the record was
    popped first, so the JSONL and every sink after the interrupted one never got it, and a
    run ended by the interrupt lost its last record from disk. Each record now reaches the
    JSONL exactly once and every other sink once, but the one the interrupt landed in (it had
    it): at the next delivery, or (the JSONL) from the finaliser once the interrupted monitor
    is collected."""
    import gc

    engine, model, opt, loader = make_private()
    path = tmp_path / "records.jsonl"
    seen = []

    def sink(record):
        seen.append(record.step)

    tracer, fired = _interrupt_at(where, event=event)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, estimator=None, overlap=overlap, jsonl=path, sinks=[sink]
    )
    interrupted = False
    for i, (x, y) in enumerate(loader):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if i == 2 and not in_detach:
            gc.collect()  # (an earlier test's monitor, finalised mid-step, is not this one)
            sys.settrace(tracer)
        try:
            opt.step()  # (interrupted, the step counts if Opacus's pre_step had finished)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
    steps = sum(n for _, _, n in engine.accountant.history)  # the steps Opacus released
    if in_detach:
        gc.collect()
        sys.settrace(tracer)
        try:
            monitor.detach()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
        history = [r.step for r in monitor._history]
        del monitor, model, opt  # (the CLI returns: the interrupted monitor is collected)
        gc.collect()
    else:
        monitor.detach()
        history = [r.step for r in monitor.history]
    assert fired and interrupted
    everything = list(range(steps))
    assert [r.step for r in read_jsonl(path)] == everything
    assert len(path.read_text().splitlines()) == steps  # (and none written twice)
    assert history == everything
    if in_detach:  # (a user sink hears of the last record at a delivery the CLI never makes)
        assert seen == everything[: len(seen)] and len(seen) >= steps - 1
    elif where == "sink":  # (the sink the interrupt landed in is not called again with it)
        assert len(seen) == steps - 1 and seen == sorted(set(seen))
    else:
        assert seen == everything
        assert monitor.record_count == steps


def test_a_jsonl_write_an_interrupt_cut_short_is_resumed_once_and_synced(tmp_path, monkeypatch):
    """An interrupt after the line was written but before its fsync: the resumed call wrote
    nothing (right) but synced nothing either, so detach() closed an unsynced last record."""
    from opacus_mi.records import JsonlSink, LeakageRecord

    path = tmp_path / "records.jsonl"
    sink = JsonlSink(path, fsync=True)
    record = LeakageRecord(step=0, batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0,
                           sample_rate=0.1, epsilon=1.0, delta=1e-5)  # fmt: skip
    synced = []

    def fsync(fd):
        synced.append(fd)
        if len(synced) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        sink(record)
    sink(record)  # (the delivery, resumed)
    sink.close()
    assert len(synced) == 2 and [r.step for r in read_jsonl(path)] == [0]
    assert len(path.read_text().splitlines()) == 1


class _StopTraining(BaseException):
    """What a sink raises to end a loop (an exception no ``except Exception`` swallows)."""


@pytest.mark.parametrize("overlap", [False, True])
def test_a_sink_that_stops_training_is_not_called_again_with_its_record(tmp_path, overlap):
    """A sink that ends training by raising a BaseException at step 2 was called again with
    the same record at every later delivery, and raised again: detach(), history, summary()
    and the next step all raised it, and a new monitor on the model could not attach."""
    engine, model, opt, loader = make_private()
    path = tmp_path / "records.jsonl"
    calls = []

    def stop_at_two(record):
        calls.append(record.step)
        if record.step == 2:
            raise _StopTraining

    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, estimator=None, overlap=overlap, jsonl=path,
        sinks=[stop_at_two],
    )  # fmt: skip
    with pytest.raises(_StopTraining):
        train(model, opt, loader)
    monitor.detach()  # (raised _StopTraining, every time)
    assert calls == [0, 1, 2] and [r.step for r in monitor.history] == [0, 1, 2]
    assert [r.step for r in read_jsonl(path)] == [0, 1, 2]
    assert "private/oracle" in monitor.summary()
    LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None).detach()


def _private_bfloat16(*, clip: float):
    """The tiny CNN and its 64 images in bfloat16, made private (fixed batches of 16)."""
    from torch.utils.data import TensorDataset

    x, y = make_data(64).tensors
    return make_private(
        poisson=False,
        clip=clip,
        net=lambda: TinyCNN().to(torch.bfloat16),
        data=TensorDataset(x.to(torch.bfloat16), y),
    )


def test_bfloat16_model_is_monitored_without_changing_training():

    def run(monitored: bool):
        engine, model, opt, loader = _private_bfloat16(clip=1.0)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5) if monitored else None
        train(model, opt, loader, epochs=2)
        return monitor, [p.detach().clone() for p in model.parameters()]

    (_, p0), (monitor, p1) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    assert all(not r.flags and "private/oracle" in r.mi for r in monitor.history)


def test_bfloat16_clip_factors_are_opacus_own(monkeypatch):
    """Opacus clips bfloat16 gradients with norms taken in bfloat16; the monitor took them from
    its float32 Gram's diagonal, up to 6.6e-3 off, so the oracle's Gram diagonal was ~1.5% off
    Opacus's clipped norms. (The rest is float32 against Opacus's rounded grad_sample.)"""

    import opacus_mi.monitor as monitor_module

    engine, model, opt, loader = _private_bfloat16(clip=0.1)
    errors, original = [], monitor_module.gram_oracle

    def checked(gram, std, **kwargs):
        grads = [g.reshape(16, -1) for g in opt.grad_samples]  # Opacus's, bfloat16
        norms = torch.stack([g.norm(2, dim=-1) for g in grads], dim=1).norm(2, dim=1)
        factors = (0.1 / (norms + 1e-6)).clamp(max=1.0)  # as DPOptimizer.clip_and_accumulate
        want = (factors.double() * torch.cat(grads, 1).double().norm(dim=1)) ** 2
        errors.append(float((gram.double().diagonal() / want - 1).abs().max()))
        return original(gram, std, **kwargs)

    monkeypatch.setattr(monitor_module, "gram_oracle", checked)
    LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, overlap=False)
    train(model, opt, loader)
    assert len(errors) == 4 and max(errors) < 4e-3


def test_a_replayed_step_whose_record_fails_still_gets_its_flagged_record():
    """Rolled back (accountant and monitor state) to before a step it had recorded, the
    monitor took that step's record as made when its replay failed: the step had none."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, estimator=None)
    batches = iter(loader)

    def step():
        x, y = next(batches)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        monitor.flush()

    step(), step()
    state, accountant = monitor.state_dict(), engine.accountant.state_dict()
    step()  # step 2, recorded
    engine.accountant.load_state_dict(accountant)
    monitor.load_state_dict(state)
    fail_estimate_at(monitor, 1)
    with pytest.warns(RuntimeWarning, match="leakage record failed"):
        step()  # step 2 again: its record fails
    assert [r.step for r in monitor.history] == [0, 1, 2]
    assert "error:RuntimeError" in monitor.history[-1].flags
    monitor.detach()


def test_a_failure_after_a_step_was_recorded_adds_no_second_record_of_it(monkeypatch):
    """The budget's last charge comes after the record is made: a failure there must keep that
    record, not append a failed one of the same step beside it (a mutation audit found this
    unguarded). Reference: one record per measured step, in order."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(  # (budgeted: a fixed schedule charges nothing)
        engine, model, opt, delta=1e-5, estimator=None, every=None, overlap=False
    )
    charge = monitor._charge

    def failing_once_recorded(span, kind, work=1.0):
        if monitor._recorded == monitor.steps:  # (this step's record is made)
            raise RuntimeError("the books")
        return charge(span, kind, work)

    monkeypatch.setattr(monitor, "_charge", failing_once_recorded)
    with pytest.warns(RuntimeWarning, match="leakage record failed"):
        train(model, opt, loader, epochs=2)
    monitor.flush()
    steps = [r.step for r in monitor.history]
    assert steps[0] == 0 and steps == sorted(set(steps)), steps
    assert not any(f.startswith("error:") for r in monitor.history for f in r.flags)


def test_a_failed_record_carries_its_own_steps_epsilon():
    """A failed measurement's record keeps the step's epsilon, named as that step's: the value
    the engine's own accountant gives after it (a mutation audit found ``epsilon_step``
    unguarded on failed records)."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, every=1, overlap=False)
    for call in range(1, len(loader) + 1):
        fail_estimate_at(monitor, call)  # (each wraps the last: the call-th estimate fails)
    epsilons: list[float] = []
    with pytest.warns(RuntimeWarning, match="leakage record failed"):
        train(model, opt, loader, after_step=lambda: epsilons.append(engine.get_epsilon(1e-5)))
    monitor.flush()
    history = monitor.history
    assert [r.step for r in history] == list(range(len(loader)))
    for r in history:
        assert "error:RuntimeError" in r.flags
        assert r.epsilon_step == r.step and r.epsilon == epsilons[r.step]


def test_a_collected_monitors_last_warnings_leave_the_warning_filters_alone(monkeypatch):
    """The garbage collector runs a collected monitor's finaliser on whichever thread it
    collects on, another monitor's overlap worker included. It said its kept warnings inside
    ``catch_warnings()``, which swaps the process's filter list for a copy: a test's (or a
    user's) warnings-as-errors or record block on the training thread lost warnings, or its
    "error" filter, meanwhile. They are now said with the filters as they are (an "error" one
    only says), and the same list stays in place throughout."""
    from collections import deque

    from opacus_mi.monitor import _deliver_rest

    monkeypatch.setattr(warnings, "filters", list(warnings.filters))  # (restored after)
    warnings.filterwarnings("error", message="opacus-mi: raised")
    filters = warnings.filters
    seen = []

    def show(message, category, filename, lineno, file=None, line=None):
        seen.append((str(message), warnings.filters is filters, filename))

    monkeypatch.setattr(warnings, "showwarning", show)
    _deliver_rest(deque(), None, deque(["opacus-mi: raised", "opacus-mi: said"]))
    # (both from where the finaliser was called, as warn's stacklevel puts it: here)
    assert seen == [("opacus-mi: raised", True, __file__), ("opacus-mi: said", True, __file__)]
    assert warnings.filters is filters


def test_a_collected_monitors_pending_records_are_written_in_order_and_its_file_closed(tmp_path):
    """The finaliser of a monitor collected with records still undelivered writes each to its
    JSONL, in order, and closes the file (its handle was held until the sink itself went).
    Reference: the records handed over, read back with read_jsonl."""
    from collections import deque

    from opacus_mi import LeakageRecord
    from opacus_mi.monitor import _deliver_rest
    from opacus_mi.records import JsonlSink

    path = tmp_path / "r.jsonl"
    sink = JsonlSink(path)
    records = [LeakageRecord(step, 16, 1.0, 1.0, 0.1, 0.5, 1e-5) for step in range(3)]
    done = deque(records)
    _deliver_rest(done, sink, deque())
    assert not done and sink._fh.closed
    assert [r.step for r in read_jsonl(path)] == [0, 1, 2]
