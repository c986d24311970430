"""Host reads on the monitor's hot path: one per monitored step (and one more for the critics'
training rounds, all of a step's together, when they train), as on a GPU.

Off the CPU, every read of a device value on the host (``item``, ``tolist``, a boolean mask's
count, ...) waits for the device to finish everything queued before it: a host sync. On a GPU
the monitor therefore measures a step optimistically and reads its record's figures back in one
transfer (``LeakageMonitor._sync_free``, set from the model's device). These tests switch that
behaviour on for a CPU model and count, with a dispatch mode, every operation that reads tensor
values on the host: what a GPU run would wait for, checked where CI runs. ``tests/test_cuda.py``
checks the same on a GPU with ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
import traceback
from collections import Counter

import pytest
import torch
from conftest import make_private, without_timing
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from opacus_mi import LeakageMonitor
from opacus_mi.estimators.bounds import percentile_tensor
from opacus_mi.estimators.online import OnlineEstimator
from opacus_mi.reads import ReadBatch

aten = torch.ops.aten


class HostReads(TorchDispatchMode):
    """Counts the monitor's operations that read tensor values on the host, or copy host data
    to the device (which PyTorch also synchronises, from pageable memory).

    Scalar reads (``item``, ``float()``, ``bool()``: ``_local_scalar_dense``), data-dependent
    shapes (``nonzero``, boolean-mask indexing, ``masked_select``), linear algebra that checks
    its status (``_linalg_check_errors``), ``tolist``/``numpy`` (which never reach the
    dispatcher on a CPU tensor, so they are wrapped), and tensors made from host data
    (``torch.tensor(...)``, ``as_tensor``: ``lift_fresh``, then a copy to the device). A read
    counts as the monitor's when the innermost library frame above it is ``opacus_mi``:
    Opacus's own reads are not ours, and ``torch.optim`` keeps its step counters on the host
    by design (no sync).
    """

    OPS = {
        aten._local_scalar_dense.default,
        aten.nonzero.default,
        aten.masked_select.default,
        aten._linalg_check_errors.default,
        aten.equal.default,
        aten.is_nonzero.default,
        aten.lift_fresh.default,
        aten.lift_fresh_copy.default,
    }

    def __init__(self):
        super().__init__()
        self.sites: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def hit(self) -> None:
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = frame.filename.replace("\\", "/")
            if "/opacus_mi/" in path:
                self.sites[f"{path.rsplit('/opacus_mi/', 1)[1]}:{frame.lineno}"] += 1
                return
            if "/opacus/" in path or "/torch/optim/" in path:
                return

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if func in self.OPS or masked:
            self.hit()
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.thread = threading.get_ident()
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)


_ACTIVE: list[HostReads] = []  # tolist/numpy report to the innermost active counter


@pytest.fixture
def counting(monkeypatch):
    """``counting()`` -> a fresh HostReads; ``tolist``/``numpy`` count while one is active."""
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, **kwargs):
            # (this thread's only, as the dispatch mode's are: an earlier test's overlap worker
            # still finishing its last record read on its own thread, and was counted here)
            if _ACTIVE and _ACTIVE[-1].thread == threading.get_ident():
                _ACTIVE[-1].hit()
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return HostReads


@pytest.fixture
def rounds(monkeypatch):
    """A list that gets one entry per critic training round (any critic, control included)."""
    calls: list[int] = []
    original = OnlineEstimator._train_round

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(OnlineEstimator, "_train_round", counted)
    return calls


def _monitored_steps(monitor, model, opt, loader, counting, rounds, *, criterion=None, bmm=False):
    """Per logical step: (host reads by the monitor, critic rounds in it)."""
    criterion = criterion or monitor.wrap_criterion(nn.CrossEntropyLoss())
    batches = (
        BatchMemoryManager(data_loader=loader, max_physical_batch_size=6, optimizer=opt)
        if bmm
        else _Null(loader)
    )
    # CI read "step 1: 3 reads, expected 2" once: another monitor's reads counted as this
    # step's. Besides an earlier test's overlap worker (see counting), a monitor the garbage
    # collector finalises mid-step runs on this thread: collected first, none while counting.
    gc.collect()
    gc.disable()
    try:
        return _counted_steps(model, opt, criterion, batches, counting, rounds)
    finally:
        gc.enable()


def _counted_steps(model, opt, criterion, batches, counting, rounds) -> list:
    out = []
    with batches as data:
        mode, before = counting(), len(rounds)
        for x, y in data:
            with mode:
                opt.zero_grad()
                criterion(model(x), y).backward()
                opt.step()
            if not getattr(opt, "_is_last_step_skipped", False):
                out.append((mode.count, len(rounds) - before, dict(mode.sites)))
                mode, before = counting(), len(rounds)
    return out


class _Null:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def _sync_free_monitor(engine, model, opt, **kwargs) -> LeakageMonitor:
    if kwargs.get("estimator", "mine") is not None:
        kwargs.setdefault("views", ("clipped", "private"))
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, overlap=False, **kwargs)
    monitor._sync_free = True  # what a CUDA model gets: the CPU path reads freely
    return monitor


@pytest.mark.parametrize(
    "setup, options",
    [
        ({}, {}),
        ({}, {"views": ("raw", "clipped", "private"), "control": True}),
        ({"clipping": "per_layer"}, {}),
        ({}, {"estimator": "infonce", "every": 2}),
        ({}, {"estimator": None}),
    ],
    ids=["default-views", "all-views-control", "per-layer", "infonce-every-2", "oracle-only"],
)
def test_a_monitored_step_reads_once_plus_once_for_its_critic_rounds(
    counting, rounds, setup, options
):
    every = options.get("every", 1)
    # Enough steps to pass the critics' 32 warm-up rounds (one per monitored step).
    engine, model, opt, loader = make_private(poisson=False, n=16 * 36 * every, **setup)
    monitor = _sync_free_monitor(engine, model, opt, **options)
    steps = _monitored_steps(monitor, model, opt, loader, counting, rounds)
    for step, (reads, trained, sites) in enumerate(steps):
        if step == 0:
            continue  # one-off work (e.g. per-layer bounds cached on the device) is not per step
        expected = (1 if step % every == 0 else 0) + (trained > 0)
        assert reads == expected, f"step {step}: {reads} reads, expected {expected}: {sites}"
    if options.get("estimator", "mine") is None:
        assert all(t == 0 for _, t, _ in steps)  # no critic: one read per step, that is all
    else:  # both kinds of step occurred: the critics' first 32 batches train, then every 8th
        assert any(t == 0 and step % every == 0 for step, (_, t, _) in enumerate(steps))
        assert max(t for _, t, _ in steps) >= 2  # several critics' rounds, read together
    assert monitor.history and all("private/oracle" in r.mi for r in monitor.history)


def test_ghost_clipping_and_batch_memory_manager_read_once_per_logical_step(counting, rounds):
    from test_factored import _make

    for mode, bmm in (("ghost", False), ("hooks", True)):
        engine, model, opt, criterion, loader = _make(mode, n=96 * 4)
        monitor = _sync_free_monitor(engine, model, opt, estimator="mine")
        criterion = monitor.wrap_criterion(criterion)
        steps = _monitored_steps(
            monitor, model, opt, loader, counting, rounds, criterion=criterion, bmm=bmm
        )
        assert len(steps) == len(monitor.history) > 10
        for step, (reads, trained, sites) in enumerate(steps):
            if step == 0:
                continue  # one-off work
            if monitor.history[step].batch_size == 0:  # Poisson's empty batch: nothing to read
                assert reads == (trained > 0), sites
            else:
                assert reads == 1 + (trained > 0), f"{mode}, bmm={bmm}, step {step}: {sites}"
        if bmm:
            assert max(r.chunks for r in monitor.history) > 1


@pytest.mark.parametrize("estimator", ["mine", None], ids=["critics", "oracle-only"])
@pytest.mark.parametrize("nan_at", [None, 1], ids=["finite", "nan-gradient-row"])
def test_sync_free_records_equal_the_immediate_checks(nan_at, estimator):
    """The optimistic measurement gives the CPU path's records: the same rows kept, the same
    draws (so the same private tokens, critics and estimates), the same flags. Only the exact
    oracle moves, by ~1e-6: off the CPU its Cholesky jitter is 1e-6 of the largest squared norm
    (no status read to fall back on), on the CPU 1e-10 of the mean."""

    def run(sync_free: bool):
        engine, model, opt, loader = make_private(poisson=False)
        monitor = LeakageMonitor(
            engine,
            model,
            opt,
            delta=1e-5,
            train_every=1,
            overlap=False,
            control=estimator is not None,
            estimator=estimator,
        )
        monitor._sync_free = sync_free
        criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
        # Each path warns once about the bad row, as the CPU path always has.
        warned = (
            contextlib.nullcontext()
            if nan_at is None
            else pytest.warns(RuntimeWarning, match="1 of 16 examples had NaN/Inf")
        )
        with warned:
            for step, (x, y) in enumerate(loader):
                opt.zero_grad()
                criterion(model(x), y).backward()
                if step == nan_at:  # one example's per-sample gradient goes bad
                    with torch.no_grad():
                        model._module.fc.weight.grad_sample[3, 0, 0] = float("nan")
                opt.step()
                if nan_at is not None and step == nan_at + 1:  # every row is NaN by now
                    break
        return monitor

    immediate, optimistic = run(False), run(True)
    a, b = without_timing(immediate.history), without_timing(optimistic.history)
    assert len(a) == len(b) >= 3
    for ra, rb in zip(a, b, strict=True):
        oa, ob = ra["mi"].pop("private/oracle", None), rb["mi"].pop("private/oracle", None)
        assert ra == rb
        assert (oa is None) == (ob is None)
        if oa is not None:
            assert oa["n"] == ob["n"]
            for key in ("nats", "ci_low", "ci_high"):
                assert math.isclose(oa[key], ob[key], rel_tol=1e-4, abs_tol=1e-5), key
    for view in ("clipped", "private") if estimator else ():  # the critics' windows hold
        wa, wb = immediate.estimators[view].pairs, optimistic.estimators[view].pairs  # the same
        assert torch.equal(wa.x, wb.x) and torch.equal(wa.y, wb.y)
    if nan_at is not None:
        bad = a[nan_at]
        assert "nonfinite_grad_sample" in bad["flags"]
        assert optimistic.history[nan_at].mi["private/oracle"].n == 15  # the bad row dropped
        assert not a[nan_at + 1]["mi"]  # nothing finite left


def test_read_batch_reads_once_and_hands_each_part_its_numbers(counting):
    got = []
    batch = ReadBatch("cpu")
    a = batch.add(torch.tensor([1.5, 2.5]), got.append)
    b = batch.add(torch.tensor(3, dtype=torch.int64))  # any dtype and shape, read as float64
    c = batch.add(torch.arange(4.0).reshape(2, 2), lambda v: got.append(sum(v)))
    with counting() as reads:
        batch.read()
    assert reads.count == 1 and len(batch) == 3
    assert (batch[a], batch[b], batch[c]) == ([1.5, 2.5], [3.0], [0.0, 1.0, 2.0, 3.0])
    assert got == [[1.5, 2.5], 6.0]  # callbacks in the order the parts were added
    with counting() as reads:
        ReadBatch("cpu").read()
    assert reads.count == 0  # nothing added: nothing read


def test_the_bootstrap_interval_reads_nothing(counting):
    """``percentile_tensor`` (each critic's interval at each record) reads nothing back: in
    torch 2.11 ``torch.nanquantile`` checked its ``q`` on the device, a sync per call."""
    values = torch.randn(200, dtype=torch.float64)
    values[3] = math.nan
    with counting() as reads:
        interval = percentile_tensor(values)
    assert reads.count == 0, dict(reads.sites)
    assert interval.shape == (2,) and bool(interval[0] < interval[1])
