"""Overlap: measuring on a worker thread changes when records arrive, never what they are.

References: the same monitor without overlap (records and its generator, bit for bit), the same
run without any monitor (training and the global RNG, bit for bit), and Opacus's accountant.
"""

from __future__ import annotations

import copy
import gc
import threading
import time
import warnings
import weakref

import pytest
import torch
from conftest import (
    TinyCNN,
    fail_estimate_at,
    make_private,
    per_example_norms,
    train,
    without_timing,
)
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn

import opacus_mi.factored as factored_mod
import opacus_mi.overlap as overlap_mod
from opacus_mi import LeakageMonitor
from opacus_mi.overlap import resolve_overlap


def _run(overlap, *, memory_manager=False, epochs=2, **monitor_kwargs):
    """A monitored run; ``overlap=None`` for no monitor at all."""
    engine, model, opt, loader = make_private(poisson=True, n=128, batch_size=16)
    monitor = None
    criterion = nn.CrossEntropyLoss()
    if overlap is not None:
        kwargs = {
            "delta": 1e-5,
            "views": ("raw", "clipped", "private"),
            "train_every": 1,
            "control": True,
            "overlap": overlap,
        }
        kwargs.update(monitor_kwargs)
        monitor = LeakageMonitor(engine, model, opt, **kwargs)
        assert monitor.overlap is overlap
        criterion = monitor.wrap_criterion(criterion)
    for _ in range(epochs):
        if memory_manager:
            with BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=6, optimizer=opt
            ) as chunks:
                train(model, opt, chunks, criterion=criterion)
        else:
            train(model, opt, loader, criterion=criterion)
    params = [p.detach().clone() for p in model.parameters()]
    return engine, monitor, params, torch.get_rng_state()


@pytest.mark.parametrize("memory_manager", [False, True], ids=["whole", "chunks"])
def test_overlap_gives_the_synchronous_records_and_leaves_training_unchanged(memory_manager):
    _, sync, _, _ = _run(False, memory_manager=memory_manager)
    engine, over, params, rng = _run(True, memory_manager=memory_manager)
    _, _, ref_params, ref_rng = _run(None, memory_manager=memory_manager)
    records = without_timing(over.history)
    assert records == without_timing(sync.history)
    assert len(records) == over.steps and any("clipped/mine" in r["mi"] for r in records)
    # Same draws in the same order from the monitor's own generator; none from the global one.
    assert torch.equal(over.generator.get_state(), sync.generator.get_state())
    assert torch.equal(rng, ref_rng)
    for got, want in zip(params, ref_params, strict=True):
        assert torch.equal(got, want)
    assert records[-1]["epsilon"] == engine.get_epsilon(1e-5)


def test_a_features_callable_reads_the_weights_of_its_forward_with_overlap_too():
    """A features callable may read the model's own weights (features from its first layer).
    The worker called it after the optimizer's update, or while the update wrote them: it saw
    the forward's weights in about half the steps, and the records differed from inline ones
    by timing. It is called at the step on the training thread now."""

    def run(overlap: bool):
        engine, model, opt, loader = make_private(poisson=True, n=128, batch_size=16)
        conv = model._module.conv
        at_forward, seen = [], []
        handle = model._module.register_forward_pre_hook(
            lambda m, args: at_forward.append(conv.weight.detach().clone())
        )

        def features(x):
            seen.append(conv.weight.detach().clone())
            return conv(x).flatten(1)

        monitor = LeakageMonitor(
            engine,
            model,
            opt,
            delta=1e-5,
            every=1,
            train_every=1,
            features=features,
            overlap=overlap,
        )
        train(model, opt, loader, epochs=2, criterion=monitor.wrap_criterion(nn.CrossEntropyLoss()))
        monitor.detach()
        handle.remove()
        assert len(seen) == len(at_forward) == monitor.record_count > 10
        assert all(torch.equal(a, b) for a, b in zip(seen, at_forward, strict=True))
        return without_timing(monitor.history)

    assert run(True) == run(False)


@pytest.mark.parametrize("memory_manager", [False, True], ids=["whole", "chunks"])
def test_overlap_keeps_one_chunk_in_flight_and_detach_stops_the_worker(memory_manager):
    """Every hand-over finds the worker idle, so at most one chunk's per-sample gradients are
    held for it; a whole batch is one hand-over per step (its chunk, then its record)."""
    engine, model, opt, loader = make_private(poisson=False, n=96, batch_size=8)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1, overlap=True)
    worker = monitor._worker
    idle_at_submit = []
    submit = worker.submit

    def spy(fn, *args):
        idle_at_submit.append(worker.idle)
        return submit(fn, *args)

    worker.submit = spy
    for _ in range(2):
        if memory_manager:  # logical batch 8 in physical chunks of 3: chunks 3, 3, 2
            with BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=3, optimizer=opt
            ) as mm:
                train(model, opt, mm)
        else:
            train(model, opt, loader)
    per_step = 3 if memory_manager else 1  # two early chunks, then the last with the record
    assert monitor.steps == 24 and len(idle_at_submit) == per_step * 24 and all(idle_at_submit)
    threads = list(worker._pool._threads)
    assert threads and all(t.is_alive() and t.name.startswith("opacus-mi") for t in threads)
    monitor.detach()
    assert [r.step for r in monitor.history] == list(range(24))  # the last one delivered too
    assert all(r.chunks == per_step and r.batch_size == 8 for r in monitor.history)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("memory_manager", [False, True], ids=["whole", "chunks"])
def test_overlap_lets_go_of_the_per_sample_gradients_before_making_the_record(memory_manager):
    """Once the worker has measured a chunk, nothing of the monitor's holds its per-sample
    gradients: while the record is being made (epsilon, the critics' rounds) the training
    thread's next step can reuse their memory. Reference: weak references to the very tensors
    Opacus made, checked on the worker when the record starts, after training dropped its own."""
    engine, model, opt, loader = make_private(poisson=False, n=24, batch_size=12)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1, overlap=True)
    dropped, alive_at_record = threading.Event(), []
    real_finish, refs = monitor._finish_step, []

    def finish(chunks, step, accounting):
        assert dropped.wait(timeout=60)
        gc.collect()
        alive_at_record.append(sum(r() is not None for r in refs))
        return real_finish(chunks, step, accounting)

    monitor._finish_step = finish
    x, y = next(iter(loader))
    for part in (torch.arange(0, 6), torch.arange(6, 12)) if memory_manager else (None,):
        opt.zero_grad()
        xs, ys = (x, y) if part is None else (x[part], y[part])
        monitor.wrap_criterion(nn.CrossEntropyLoss())(model(xs), ys).backward()
        refs += [weakref.ref(p.grad_sample) for p in model.parameters()]
        if part is not None and part[0] == 0:
            opt.signal_skip_step(do_skip=True)  # as BatchMemoryManager does for a chunk
        opt.step()
    opt.zero_grad(set_to_none=True)  # Opacus drops grad_sample (and summed_grad) here
    gc.collect()
    dropped.set()
    monitor.flush()
    assert alive_at_record == [0]
    assert len(refs) == (2 if memory_manager else 1) * len(list(model.parameters()))
    assert [r.step for r in monitor.history] == [0] and "private/oracle" in monitor.history[0].mi


class _FlatMLP(nn.Module):
    """Its first layer is a Linear on a view of the loop's own batch (rank-one in hooks mode)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(36, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_overlap_reads_the_batch_it_measured_when_the_loop_refills_its_input_buffer(mode):
    """A loop that copies each batch into one preallocated input tensor overwrites the last
    batch while the worker may still be measuring it. The worker is held here until the next
    batch is in the buffer; its records must still equal the inline monitor's, bit for bit:
    an input no graph produced is copied when it will be read later (``keep_input``)."""

    from test_factored import _make

    def run(overlap: bool):
        engine, model, opt, criterion, loader = _make(
            mode, n=48, batch_size=12, net=_FlatMLP, poisson=False
        )
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, overlap=overlap)
        criterion = monitor.wrap_criterion(criterion)
        batches = list(loader)
        refilled = [threading.Event() for _ in range(len(batches) + 1)]
        if overlap:
            measure, seen = monitor._measure_chunk, []

            def held(taken):  # measure step k only once batch k + 1 is in the buffer
                seen.append(None)
                assert refilled[len(seen)].wait(timeout=60)
                return measure(taken)

            monitor._measure_chunk = held
        buf = torch.empty_like(batches[0][0])
        for k, (x, y) in enumerate(batches):
            buf.copy_(x)
            refilled[k].set()
            opt.zero_grad()
            criterion(model(buf), y).backward()
            opt.step()
        buf.fill_(float("nan"))  # what a next epoch would overwrite
        refilled[-1].set()
        monitor.flush()
        return monitor

    inline, over = run(False), run(True)
    assert over.overlap and not inline.overlap
    assert len(over.history) == 4 and all(not r.flags for r in over.history)
    assert without_timing(over.history) == without_timing(inline.history)


def test_overlap_failures_are_flagged_on_the_record_never_raised():
    engine, model, opt, loader = make_private(poisson=False, n=64, batch_size=16)

    def broken(_x):
        raise RuntimeError("feature bug")

    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, features=broken, overlap=True)
    real_finish = monitor._finish_step

    def finish(chunks, step, accounting):
        if step == 2:
            raise RuntimeError("record bug")
        return real_finish(chunks, step, accounting)

    monitor._finish_step = finish
    with pytest.warns(RuntimeWarning) as caught:
        train(model, opt, loader, epochs=2)
        monitor.flush()
    messages = " ".join(str(w.message) for w in caught)
    assert "feature extraction failed" in messages and "leakage record failed" in messages
    assert [r.step for r in monitor.history] == list(range(8))  # the failed step's too
    assert all("features_error" in r.flags for r in monitor.history)
    failed = monitor.history[2]
    assert "error:RuntimeError" in failed.flags and not failed.mi and failed.batch_size == 16
    # the oracle carried on
    assert all("private/oracle" in r.mi for r in monitor.history if r.step != 2)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_sink_is_warned_about_and_the_other_sinks_still_get_every_record(overlap):
    engine, model, opt, loader = make_private(poisson=False, n=64, batch_size=16)
    seen = []

    def broken(_record):
        raise OSError("disk full")

    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, sinks=[broken, seen.append], overlap=overlap
    )
    with pytest.warns(RuntimeWarning, match="a record sink failed"):
        train(model, opt, loader, epochs=2)
        monitor.flush()
    assert [r.step for r in seen] == [r.step for r in monitor.history] == list(range(8))


@pytest.mark.parametrize("overlap", [False, True])
def test_a_sink_may_detach_the_monitor(overlap, tmp_path):
    """Stopping the monitor from a sink (after some record): with overlap, records reach the
    sinks inside the next step's pre_step, which then handed a chunk to the closed worker and
    raised into the training loop after the accountant had counted the step. And the detach
    closed the JSONL before the record it was called with had reached it."""
    from opacus_mi import read_jsonl

    engine, model, opt, loader = make_private(poisson=False, n=96, batch_size=16)
    path = tmp_path / "records.jsonl"

    def stop(record):
        if record.step == 2:
            monitor.detach()

    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, overlap=overlap, sinks=[stop], jsonl=path
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (ours: no sink may fail)
        train(model, opt, loader)
    assert [r.step for r in read_jsonl(path)] == [0, 1, 2]
    _, plain, plain_opt, plain_loader = make_private(poisson=False, n=96, batch_size=16)
    train(plain, plain_opt, plain_loader)
    assert [r.step for r in monitor.history] == [0, 1, 2] and not monitor.attached
    assert sum(h[2] for h in engine.accountant.history) == 6
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True)
    )


def test_overlap_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(overlap_mod, "usable_cores", lambda: torch.get_num_threads() + 1)
    assert resolve_overlap(None, device=cpu, distributed=False)
    for kwargs in ({"device": cuda, "distributed": False}, {"device": cpu, "distributed": True}):
        assert not resolve_overlap(None, **kwargs)
        assert not resolve_overlap(False, **kwargs)
        with pytest.raises(ValueError, match="overlap=True cannot be honoured"):
            resolve_overlap(True, **kwargs)
    # No free core: training's own threads would share theirs with the worker.
    monkeypatch.setattr(overlap_mod, "usable_cores", lambda: torch.get_num_threads())
    assert not resolve_overlap(None, device=cpu, distributed=False)
    assert resolve_overlap(True, device=cpu, distributed=False)
    with pytest.raises(ValueError, match="overlap must be True, False or None"):
        resolve_overlap("yes", device=cpu, distributed=False)


def _omp_max_threads():
    """``omp_get_max_threads`` of the calling thread, read without torch's lazy set-up."""
    import ctypes
    import glob
    import os

    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))
    if not libs:
        pytest.skip("this torch build ships no libgomp to ask")
    return ctypes.CDLL(libs[0]).omp_get_max_threads


def test_the_worker_thread_computes_with_torchs_thread_count_from_its_first_task():
    """A fresh thread's first BLAS call would use every core (torch sets a thread's OpenMP
    count only on its first parallel op), the training thread's among them. Reference: a plain
    executor thread, which shows the default the worker must not have."""
    from concurrent.futures import ThreadPoolExecutor

    omp_max_threads = _omp_max_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(1) as plain:
            default = plain.submit(omp_max_threads).result()
        if default == 1:
            pytest.skip("one core: a fresh thread's default is torch's setting already")
        worker = overlap_mod.Worker()
        try:
            assert worker.submit(omp_max_threads).result() == 1
        finally:
            worker.close()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bmm", [False, True], ids=["whole", "chunks"])
def test_ghost_clipping_overlaps_and_gives_the_synchronous_records(bmm, monkeypatch):
    """Under ghost clipping the hooks only record each layer's inputs and backprops; the worker
    makes the tokens, norms and Gram from them. References: the same monitor inline (records
    and generator, bit for bit), an unmonitored ghost run (training and the global RNG), and
    Opacus's accountant."""
    from test_factored import _run

    made_on = []
    add = factored_mod._Results.add

    def spy(self, call):
        made_on.append(threading.current_thread().name)
        return add(self, call)

    monkeypatch.setattr(factored_mod._Results, "add", spy)
    kwargs = {"estimator": "mine", "bmm": bmm, "n": 64}
    _, sync, *_ = _run("ghost", True, overlap=False, **kwargs)
    assert made_on and all(name == "MainThread" for name in made_on)
    made_on.clear()
    engine, over, params, rng, _, _ = _run("ghost", True, overlap=True, **kwargs)
    assert over.overlap and over._factored.defer
    assert made_on and all(name.startswith("opacus-mi-") for name in made_on)
    _, _, ref_params, ref_rng, _, _ = _run("ghost", False, bmm=bmm, n=64)
    records = without_timing(over.history)
    assert records == without_timing(sync.history)
    assert len(records) == over.steps and any("clipped/mine" in r["mi"] for r in records)
    assert not bmm or any(r["chunks"] > 1 for r in records)
    assert torch.equal(over.generator.get_state(), sync.generator.get_state())
    assert torch.equal(rng, ref_rng)
    for got, want in zip(params, ref_params, strict=True):
        assert torch.equal(got, want)
    assert records[-1]["epsilon"] == engine.get_epsilon(1e-5)


class _TopParameter(nn.Module):
    """A model owning a raw parameter (a ViT's position embedding): Opacus's ghost clipping
    hands the whole model to functorch, which reads its parameters."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(4, 6) * 0.1)
        self.hidden, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x + self.pos)).mean(1))


@pytest.mark.parametrize("overlap", [False, True])
def test_ghost_functorch_layers_are_measured_with_their_steps_parameters(overlap, monkeypatch):
    """With overlap the worker made a functorch layer's per-sample gradients from the parameters
    as the step had left them: its Gram diagonal was 1.2-2.2x each example's squared gradient
    norm (per-example autograd, the reference). The worker is held here until the step is done,
    as it is whenever training outruns it."""
    from test_factored import _ghost_private

    stepped = threading.Event()
    compute = factored_mod.FactoredRecording.compute

    def after_the_step(self):
        assert stepped.wait(10)
        stepped.clear()
        return compute(self)

    monkeypatch.setattr(factored_mod.FactoredRecording, "compute", after_the_step)
    torch.manual_seed(0)
    x, y = torch.randn(48, 4, 6), torch.randint(0, 3, (48,))
    net = _TopParameter()
    twin = copy.deepcopy(net)
    # (C = 10 clips none: the clipped Gram's diagonal is the squared norms)
    engine, model, opt, criterion = _ghost_private(net, x, y, max_grad_norm=10.0, lr=1.0)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, overlap=overlap)
    assert monitor.overlap is overlap
    grams, want = [], []
    privatise = monitor._privatise
    monkeypatch.setattr(
        monitor, "_privatise", lambda c, t, g, s: (grams.append(g.clone()), privatise(c, t, g, s))
    )
    for step in range(3):
        xb, yb = x[16 * step : 16 * step + 16], y[16 * step : 16 * step + 16]
        twin.load_state_dict(model._module.state_dict())
        want.append(per_example_norms(twin, xb, yb).double().square())
        opt.zero_grad()
        criterion(model(xb), yb).backward()
        opt.step()
        stepped.set()
    monitor.flush()
    monitor.detach()
    assert len(grams) == 3
    for gram, norms in zip(grams, want, strict=True):
        torch.testing.assert_close(gram.diagonal().double(), norms, rtol=1e-5, atol=0)


def _autocast_run(mode, overlap):
    """Forward, backward and step under CPU bfloat16 autocast: float32 parameters with ghost
    clipping; bfloat16 ones in hooks mode, where Opacus cannot train float32 ones so (its
    clipped sum, an einsum under autocast, is bfloat16 and not assignable to a float32
    ``.grad``). ``overlap=None``: no monitor."""
    dtype = torch.float32 if mode == "ghost" else torch.bfloat16
    engine, model, opt, criterion, loader = make_private(
        mode=mode, n=128, batch_size=16, with_criterion=True, net=lambda: TinyCNN().to(dtype)
    )
    monitor = None
    if overlap is not None:
        monitor = LeakageMonitor(
            engine, model, opt, delta=1e-5, views=("raw", "clipped", "private"),
            train_every=1, overlap=overlap,
        )  # fmt: skip
    for _ in range(3):
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                opt.zero_grad()
                criterion(model(x), y).backward()
                opt.step()
    return monitor, [p.detach().clone() for p in model.parameters()], torch.get_rng_state()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_inline_measurement_under_the_users_autocast_gives_the_overlap_records(mode):
    """Autocast is thread-local: the worker never has it, but inline the ghost backward hook and
    the step's measurement ran under the user's, so ghost clipping on a conv net failed every
    record (float32 by bfloat16 products), hooks mode every record too, and a Gram or the
    critics' rounds ran in bfloat16. References: the overlap monitor's records and generator,
    bit for bit, and an unmonitored run's training and RNG."""
    sync, *_ = _autocast_run(mode, False)
    over, params, rng = _autocast_run(mode, True)
    _, ref_params, ref_rng = _autocast_run(mode, None)
    records = without_timing(sync.history)
    assert all(not r["flags"] for r in records)
    assert any(r["mi"].get("clipped/mine", {}).get("nats", 0) > 0 for r in records)  # learned
    assert records == without_timing(over.history)
    assert torch.equal(over.generator.get_state(), sync.generator.get_state())
    assert torch.equal(rng, ref_rng)
    for got, want in zip(params, ref_params, strict=True):
        assert torch.equal(got, want)


_EXIT_SCRIPT = """
import sys, torch, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[2])
from conftest import make_private, train
from opacus_mi import LeakageMonitor
engine, model, opt, loader = make_private(poisson=False, n=64, batch_size=8)
monitor = LeakageMonitor(engine, model, opt, delta=1e-5, jsonl=sys.argv[1], every=1, overlap=True)
train(model, opt, loader)
print(len(monitor._history), monitor.steps)  # the last record is still undelivered here
"""


def test_overlap_delivers_the_last_records_at_interpreter_exit(tmp_path):
    """A script that never reads ``history`` nor detaches still gets every JSONL line."""
    import subprocess
    import sys
    from pathlib import Path

    from opacus_mi import read_jsonl

    path, script = tmp_path / "records.jsonl", tmp_path / "job.py"
    script.write_text(_EXIT_SCRIPT)
    tests = Path(__file__).resolve().parent
    out = subprocess.run(
        [sys.executable, str(script), str(path), str(tests)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    delivered, steps = map(int, out.stdout.split())
    assert steps == 8 and delivered < steps
    assert [r.step for r in read_jsonl(path)] == list(range(8))


def test_warnings_turned_errors_act_on_the_training_thread_as_inline():
    """Under a warnings-as-errors filter (pytest -W error) a failure's warning raised on the
    worker, where nothing saw it, and took the step's record with it. The worker's warnings
    are now said on the training thread: overlap raises and records as inline does."""

    def broken(_x):
        raise RuntimeError("feature bug")

    def run(overlap):
        engine, model, opt, loader = make_private(poisson=False, n=64, batch_size=16)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, features=broken, overlap=overlap)
        raised = []
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                try:
                    opt.step()
                except RuntimeWarning as exc:
                    raised.append(str(exc))
            monitor.flush()
        return raised, [r.step for r in monitor.history]

    (inline, records), (overlapped, same) = run(False), run(True)
    assert records == same == [0, 1, 2]  # (the step whose warning raised was not taken)
    assert len(inline) == len(overlapped) == 1
    assert "feature extraction failed" in inline[0] and "feature extraction failed" in overlapped[0]


def test_reading_history_mid_step_leaves_the_steps_decision_alone():
    """Reading ``history`` between backward() and step() flushed, and the flush adopted the
    worker's new plan: the step's forward hooks had taken it as measured (or not), its
    pre_step then decided otherwise (ghost mode: 'no activations were captured' records).
    Plans now wait for the next pre_step, as inline."""
    from opacus_mi.budget import Plan

    engine, model, opt, loader = make_private(poisson=False, n=128, batch_size=16)

    def slow(x):  # the worker's record comes well after its step's pre_step has returned
        time.sleep(0.03)
        return x.flatten(1)

    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, every=None, features=slow, overlap=True
    )
    calls = []

    def plan(**_):  # intervals of 1 and 3 steps in turn
        calls.append(1)
        return Plan(next_in=1 if len(calls) % 2 else 3, train=False)

    monitor.budget.plan = plan
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        due = monitor._due()
        assert len(monitor.history) <= monitor.steps  # (a log line between backward and step)
        assert monitor._due() == due
        opt.step()
    assert all(not r.flags for r in monitor.history)


def test_the_last_records_survive_a_warnings_as_errors_filter_at_exit(tmp_path):
    """At exit (or collection) the worker's queued warnings were said before the records: under
    a warnings-as-errors filter the first raised and took the records after it with it."""
    from opacus_mi import read_jsonl
    from opacus_mi.monitor import _flush_at_exit

    path = tmp_path / "records.jsonl"
    engine, model, opt, loader = make_private(poisson=False, n=64, batch_size=16)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, jsonl=path, overlap=True)
    train(model, opt, loader)
    monitor._worker.wait()
    monitor._worker_warnings.append("opacus-mi: a warning the worker had to say")
    assert monitor._done  # the last record, not delivered yet
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=RuntimeWarning)
        _flush_at_exit(weakref.ref(monitor))
    assert [r.step for r in read_jsonl(path)] == [0, 1, 2, 3]


def test_at_exit_the_users_ignore_filter_holds_and_an_error_one_only_says(tmp_path):
    """The exit hook set every filter to "default" so that an "error" one could not raise:
    it also said what the user had told to "ignore"."""
    from opacus_mi.monitor import _flush_at_exit

    engine, model, opt, loader = make_private(poisson=False, n=64, batch_size=16)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, overlap=True)
    train(model, opt, loader)
    monitor._worker.wait()
    for kind in ("ignore", "error"):
        monitor._worker_warnings.append(f"opacus-mi: said under {kind}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter(kind)
            _flush_at_exit(weakref.ref(monitor))
        said = [str(w.message) for w in caught]
        assert said == ([] if kind == "ignore" else ["opacus-mi: said under error"]), said


class _Latent(nn.Module):
    """A learned latent spread over the batch (Perceiver-style): a view of a parameter."""

    def __init__(self):
        super().__init__()
        self.latent = nn.Parameter(torch.randn(1, 8))

    def forward(self, x):
        return self.latent.expand(x.shape[0], -1)


class _LatentModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.lat, self.lin2 = nn.Linear(36, 3), _Latent(), nn.Linear(8, 3)

    def forward(self, x):
        return self.lin1(x.flatten(1)) + self.lin2(self.lat(x))


def test_overlap_reads_a_linear_input_that_is_a_view_of_a_parameter_as_it_was():
    """lin2's input is latent.expand(B, -1): it has a grad_fn, so it was kept by reference,
    yet it shares the parameter's storage, which the optimizer's step changes in place while
    the worker measures (oracle 0.40347 with overlap, 0.40355 inline)."""

    def run(overlap: bool):
        engine, model, opt, loader = make_private(poisson=False, net=_LatentModel)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, overlap=overlap)
        train(model, opt, loader)
        monitor.flush()
        return monitor

    inline, over = run(False), run(True)
    assert over.overlap and not inline.overlap and len(over.history) == 6
    assert without_timing(over.history) == without_timing(inline.history)


def test_a_collected_monitor_delivers_its_last_records(tmp_path):
    """A run inside a function (a sweep's shape) whose monitor is never read: once collected,
    its undelivered last record was lost (the exit hook held it by weak reference)."""
    import time

    from opacus_mi import read_jsonl

    path = tmp_path / "records.jsonl"

    def run():
        engine, model, opt, loader = make_private(poisson=False, n=64, batch_size=8)
        seen = []

        def watch(record):  # a sink that refers to its monitor (kept it alive forever)
            seen.append(monitor.record_count)

        monitor = LeakageMonitor(
            engine, model, opt, delta=1e-5, jsonl=path, overlap=True, sinks=[watch]
        )
        train(model, opt, loader)
        return weakref.ref(monitor)

    ref = run()
    deadline = time.monotonic() + 30
    while ref() is not None and time.monotonic() < deadline:  # (until the worker lets go)
        gc.collect()
        time.sleep(0.01)
    assert ref() is None
    assert [r.step for r in read_jsonl(path)] == list(range(8))


def test_an_abandoned_monitors_last_record_stays_out_of_a_resumed_runs_file(tmp_path):
    """A run abandoned without detach() (an exception in a notebook), then resumed into the
    same JSONL: the old monitor's undelivered record was appended when it was collected, after
    the resumed run's lines, and read_jsonl took it for a restart (the resumed records left
    out)."""
    from opacus_mi import read_jsonl

    path = tmp_path / "records.jsonl"

    def abandoned():
        engine, model, opt, loader = make_private(poisson=False, n=64, batch_size=8)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, jsonl=path, overlap=True)
        train(model, opt, loader)  # 8 steps, the last record made but not yet delivered
        monitor._worker.wait()
        assert len(monitor._done) == 1
        return monitor

    old = abandoned()
    engine, model, opt, loader = make_private(poisson=False, n=64, batch_size=8)
    resumed = LeakageMonitor(engine, model, opt, delta=1e-5, jsonl=path, overlap=False)
    train(model, opt, loader)
    with pytest.warns(RuntimeWarning, match="step 7 was not written .* a newer monitor"):
        old._finaliser()  # what collecting it, or the exit, runs
    resumed.detach()
    lines = path.read_text().splitlines()
    assert len(lines) == 7 + 8  # the old run's delivered 7, the new run's 8, nothing after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the new run starts over at step 0)
        assert [r.step for r in read_jsonl(path)] == list(range(8))


@pytest.mark.parametrize("setting", ["schedulers", "adaptive"])
def test_records_carry_the_noise_and_bound_their_step_used(setting):
    """Opacus's noise and clipping schedulers (stepped after optimizer.step()) and adaptive
    clipping (which moves C inside pre_step) change sigma and C between steps. Records read
    them from the optimizer afterwards: inline they held the next step's C under adaptive
    clipping, with overlap a later step's sigma, C and mi_bound. Reference: the optimizer's
    values just before each step, which Opacus clips and noises with."""
    from opacus.schedulers import ExponentialGradClip, ExponentialNoise

    def run(overlap):
        kwargs = {}
        if setting == "adaptive":
            kwargs = {
                "clipping": "adaptive",
                "private_kwargs": {
                    "target_unclipped_quantile": 0.5,
                    "clipbound_learning_rate": 0.2,
                    "max_clipbound": 10.0,
                    "min_clipbound": 0.01,
                    "unclipped_num_std": 2.0,
                },
            }
        engine, model, opt, loader = make_private(poisson=False, n=128, **kwargs)
        monitor = LeakageMonitor(
            engine, model, opt, delta=1e-5, every=1, estimator=None, overlap=overlap
        )
        schedulers = []
        if setting == "schedulers":
            schedulers = [ExponentialNoise(opt, gamma=1.1), ExponentialGradClip(opt, gamma=0.9)]
        used = []

        def after_step():
            for s in schedulers:
                s.step()

        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            used.append((float(opt.noise_multiplier), float(opt.max_grad_norm)))
            opt.step()
            after_step()
        return monitor.history, used

    inline, used = run(False)
    assert len({c for _, c in used}) == len(used)  # C moves every step
    assert [(r.noise_multiplier, r.max_grad_norm) for r in inline] == used
    assert [r.mi_bound for r in inline] == [1 / (2 * s**2) for s, _ in used]
    overlapped, _ = run(True)
    assert without_timing(overlapped) == without_timing(inline)


def _train_through_interrupts(model, opt, loader) -> None:
    """One epoch, as a notebook that catches Ctrl-C and trains on."""
    for x, y in loader:
        try:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        except KeyboardInterrupt:
            pass


@pytest.mark.parametrize("overlap", [False, True])
def test_a_step_interrupted_inside_opacus_leaves_nothing_for_the_next_record(overlap):
    """Ctrl-C inside optimizer.step() (Opacus's noise), caught by a notebook that trains on:
    the interrupted step's chunk joined the next record (32 examples, 2 chunks, for 16)."""
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, every=1, estimator=None, overlap=overlap
    )
    add_noise, calls = opt.add_noise, []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return add_noise()

    opt.add_noise = interrupted
    _train_through_interrupts(model, opt, loader)
    history = monitor.history
    steps = sum(h[2] for h in engine.accountant.history)
    assert monitor.steps == steps == len(loader) - 1 == len(history)
    assert all(r.batch_size == 16 and r.chunks == 1 for r in history)
    assert all(r.mi["private/oracle"].n == 16 for r in history)


@pytest.mark.parametrize("every", [1, 2])
def test_ctrl_c_while_a_record_is_made_or_delivered_loses_no_record(tmp_path, every):
    """Ctrl-C inside the inline monitor's record-making came after the accountant had counted
    the step: that step got no record (and the count fell behind, measuring off schedule);
    inside a user's sink, the JSONL (called after the user's sinks) never got that record."""
    from opacus.accountants import RDPAccountant

    from opacus_mi import read_jsonl

    engine, model, opt, loader = make_private(poisson=False, n=128)
    calls = []

    def sink(record):
        calls.append(record.step)
        if len(calls) == 4:
            raise KeyboardInterrupt

    path = tmp_path / "records.jsonl"
    monitor = LeakageMonitor(
        engine,
        model,
        opt,
        delta=1e-5,
        every=every,
        overlap=False,
        estimator=None,
        jsonl=path,
        sinks=[sink],
    )
    finish = monitor._finish_step

    def interrupted(*args):
        if args[1] == 2:
            raise KeyboardInterrupt
        return finish(*args)

    monitor._finish_step = interrupted
    _train_through_interrupts(model, opt, loader)
    monitor.detach()
    steps = sum(h[2] for h in engine.accountant.history)
    assert steps == len(loader)
    measured = list(range(0, steps, every))
    assert [r.step for r in monitor.history] == measured
    interrupted = monitor.history[measured.index(2)]
    assert interrupted.flags == ["error:KeyboardInterrupt"]
    reference = RDPAccountant()  # epsilon after the interrupted step, as Opacus counts it
    reference.history = [(1.0, interrupted.sample_rate, 3)]
    assert interrupted.epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert [r.step for r in read_jsonl(path)] == measured


def test_a_failed_record_carries_its_own_steps_bound():
    """The step's bound was let go of before the failure reached the fallback record, which
    then read the optimizer's, moved on by a scheduler since (0.25 recorded, 0.5 used)."""
    from opacus.schedulers import ExponentialGradClip

    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, estimator=None, overlap=True)
    fail_estimate_at(monitor, 2)  # the second step's estimates raise
    scheduler, used = ExponentialGradClip(opt, gamma=0.5), []
    with pytest.warns(RuntimeWarning, match="leakage record failed"):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            used.append(float(opt.max_grad_norm))
            opt.step()
            scheduler.step()
        history = monitor.history
    assert "error:RuntimeError" in history[1].flags
    assert [r.max_grad_norm for r in history] == used
    assert not monitor._step_bounds  # every step's bound let go of once recorded


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="POSIX fork")
@pytest.mark.parametrize("overlap", [True, False])
def test_a_forked_child_trains_on_unmonitored_and_writes_nothing(tmp_path, overlap):
    """os.fork() (or a multiprocessing 'fork' process) mid-run: the child's copy of the overlap
    worker had no thread, so a child that trained on, or merely exited, hung waiting on it; a
    child that exited wrote the parent's pending record into the JSONL a second time."""
    import json
    import os

    engine, model, opt, loader = make_private(poisson=False, n=128)
    path = tmp_path / "records.jsonl"
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, overlap=overlap, jsonl=path)
    criterion = nn.CrossEntropyLoss()
    batches = iter(loader)
    for _ in range(3):
        x, y = next(batches)
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    pid = os.fork()
    if pid == 0:  # the child: trains two steps, as Opacus alone would
        code = 1
        try:
            for _ in range(2):
                x, y = next(batches)
                opt.zero_grad()
                criterion(model(x), y).backward()
                opt.step()
            code = 0 if not monitor.attached and "pre_step" not in vars(opt) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0  # (not hung)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    for x, y in batches:
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()
    monitor.detach()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [r.step for r in monitor.history] == list(range(len(loader)))


def test_record_count_waits_for_the_worker_as_history_does():
    """record_count lagged one record behind under overlap (README: how many were made)."""
    engine, model, opt, loader = make_private(poisson=False, n=48)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None, overlap=True)
    train(model, opt, loader)
    assert monitor.record_count == len(loader) == len(monitor.history)


def test_an_interrupt_during_detach_loses_no_jsonl_line(tmp_path):
    """Ctrl-C while detach() delivers the worker's last record: detach let go all the same
    (so it does not stay attached) but closed the JSONL with that record undelivered, and the
    flush at exit could not write it. The JSONL stays open while records wait."""
    from opacus_mi import monitor as monitor_mod
    from opacus_mi import read_jsonl

    engine, model, opt, loader = make_private(noise=0.7, poisson=False)
    path = tmp_path / "r.jsonl"
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, overlap=True, jsonl=path)
    train(model, opt, loader, epochs=1)
    monitor._worker.wait()
    handle = monitor._jsonl._fh
    write = handle.write

    def interrupted(text):
        handle.write = write  # (once)
        raise KeyboardInterrupt

    handle.write = interrupted
    with pytest.raises(KeyboardInterrupt):
        monitor.detach()
    assert not monitor.attached
    monitor_mod._flush_at_exit(weakref.ref(monitor))  # what the interpreter's exit runs
    assert [r.step for r in read_jsonl(path)] == list(range(len(loader)))


def test_epsilon_now_waits_for_the_worker_that_shares_its_tracker():
    """The epsilon tracker's one-entry cache has no lock: epsilon_now() on the training thread
    while the worker made a record could hand that record the previous step's epsilon (4 of
    10 records, the race widened). epsilon_now() now waits for the worker first."""
    from opacus_mi.accounting import EpsilonTracker

    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, estimator=None, overlap=True)
    assert monitor._worker is not None
    epsilon, busy, overlapped, nows = EpsilonTracker.epsilon, [0], [], []

    def watched(self, *args, **kwargs):
        overlapped.append(busy[0])  # calls under way on the other thread
        busy[0] += 1
        try:
            if threading.current_thread() is not threading.main_thread():
                time.sleep(0.05)  # (the worker's call: long enough to be met)
            return epsilon(self, *args, **kwargs)
        finally:
            busy[0] -= 1

    try:
        EpsilonTracker.epsilon = watched
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            nows.append(monitor.epsilon_now())
    finally:
        EpsilonTracker.epsilon = epsilon
    monitor.flush()
    assert len(overlapped) >= 2 * len(monitor.history) and not any(overlapped)
    assert [r.epsilon for r in monitor.history] == [nows[r.step] for r in monitor.history]
    monitor.detach()
