"""What the overlap worker costs the training thread: the same measurement on a thread, in a
process, and inline, beside an unmonitored DP training loop.

    .venv/bin/python benchmarks/contention.py                    # digits CNN, 40 blocks
    .venv/bin/python benchmarks/contention.py --model mlp --blocks 60

Why: with overlap the monitor's every-step measurement (tokens, exact Gram matrix, the oracle's
draws) runs on a worker thread, yet still slows training by ~20% on the digits CNN. Either the
second core's work slows the first (shared hardware: caches, memory, a host's SMT sibling) or
the two threads take turns at the GIL. This separates the two: the *same* work, a real chunk's
``LeakageMonitor._measure_chunk``, runs once per training step

* ``inline``: on the training thread, after the step (the monitor with ``overlap=False``);
* ``thread``: on a worker thread of the training process, measuring the step's own per-sample
  gradients, handed over by reference (what ``overlap=True`` does);
* ``thread_same``: the same, but measuring the captured chunk every time, whose tensors stay
  in cache: the difference to ``thread`` is the cost of moving a step's fresh gradients;
* ``process``: in a separate process, with its own interpreter and GIL. The training process
  copies each step's per-sample gradients into shared memory and signals over a pipe, which is
  what a process worker would have to do; the worker measures those gradients.

* ``ops_1``, ``ops_n``: on the worker thread, no measurement but matrix products on cached
  data that take as long as it: one product (``ops_1``), or as many as the measurement makes
  torch calls (``ops_n``, each call releases and retakes the GIL). Same work, same second core:
  the difference is what the number of GIL hand-overs costs the training thread.

Controls, which separate the hand-over, the GIL and the hardware:

* ``handover``: the worker thread is handed a task that does nothing (its wake-up alone);
* ``python``: a task that holds the GIL in a Python loop for 100 us (no torch call);
* ``busy_core``: no worker; the separate process computes matrix products without pause for
  the whole block, on its own core and GIL: what a second core's arithmetic alone costs this
  one (caches, memory, a host's SMT sibling or power budget).

A thread and a process share the hardware alike; only the thread shares the GIL. The record
itself (epsilon, the figures) is not part of the replayed work: ``report.py``'s every-step
variants include it, and the hooks that feed the monitor. Blocks of
``k`` steps of every kind run in rotating order, each waiting at its end until its worker has
done every step's work; a ratio is paired per block (the
median over blocks, with quartiles) and also given as total time over the DP step's total.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.overrides import TorchFunctionMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import load_lib, machine_line  # noqa: E402  (the shared builders)

KINDS = (
    "alone",
    "inline",
    "thread",
    "thread_same",
    "process",
    "ops_1",
    "ops_n",
    "handover",
    "python",
    "busy_core",
)
PYTHON_SECONDS = 100e-6  # the ``python`` control's hold on the GIL


def replay(lib, model: str):
    """A warmed-up monitored setup and ``work(grad_samples=None)``, which measures a real chunk
    of it again: the captured chunk, or the same inputs with other per-sample gradients."""
    setup = lib.build_setup(model, "oracle_sync")
    lib.warm(setup, 20)
    monitor, got, measured = setup.monitor, [], []
    measure = monitor._measure_chunk

    def spy(taken):
        got.append(copy.copy(taken))  # the measurement releases what it reads (_Taken.release)
        measured.append(measure(taken))
        return measured[-1]

    monitor._measure_chunk = spy
    setup.run(1)
    del monitor._measure_chunk
    kept = got[0]

    def work(grad_samples=None):
        taken = copy.copy(kept)
        if grad_samples is not None:
            taken.grad_samples = grad_samples
        return measure(taken)

    chunk = work()
    if chunk.batch != setup.batch or chunk.flags:  # a replay that measures nothing lies
        raise RuntimeError(f"replayed chunk measured nothing useful: {chunk}")
    work.monitored = measured[0]  # what the monitor itself measured of that chunk
    return setup, work


def _process_worker(conn, model: str, grad_samples, device: str) -> None:
    lib = load_lib(device)
    lib.torch.set_num_threads(1)
    _, work = replay(lib, model)
    a = lib.torch.randn(256, 256)
    conn.send_bytes(b"ready")
    while (msg := conn.recv_bytes()) != b"q":
        if msg == b"busy":  # compute until told to stop: the busy_core control
            while not conn.poll():
                a @ a
            conn.recv_bytes()  # b"stop"
            continue
        work(grad_samples)
        conn.send_bytes(b"d")


def torch_calls(fn: Callable[[], Any]) -> int:
    """Torch calls ``fn`` makes from Python that dispatch an operation (each releases the GIL
    for its duration); attribute reads such as ``.shape`` do not count."""
    calls = 0

    class _Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal calls
            calls += getattr(func, "__name__", "") != "__get__"
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return calls


def products(torch, calls: int, seconds: float) -> Callable[[], None]:
    """``calls`` float32 products of two square matrices, sized so they take ~``seconds``."""
    size = 8
    while True:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(calls):
            a @ b
        if time.perf_counter() - t0 >= seconds:
            break
        size = int(size * 1.05) + 1

    def run() -> None:
        for _ in range(calls):
            a @ b

    return run


def _hold_gil(seconds: float = PYTHON_SECONDS) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass


def _thread_worker(jobs: queue.SimpleQueue, done: queue.SimpleQueue, work, torch) -> None:
    torch.get_num_threads()  # the thread's OpenMP/MKL counts, as opacus_mi's Worker sets them
    while (job := jobs.get()) is not None:
        if callable(job):
            job()
        else:
            work(job or None)  # () : the captured chunk
        done.put(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--blocks", type=int, default=40, help="repetitions of every kind")
    parser.add_argument("--k", type=int, default=10, help="training steps per timed block")
    args = parser.parse_args(argv)
    lib = load_lib("cpu")
    torch = lib.torch
    torch.set_num_threads(1)  # the worker needs a core of its own, as overlap requires

    dp = lib.build_setup(args.model, "dp")
    lib.warm(dp, 20)
    dp.step()
    shared = [g.detach().clone().share_memory_() for g in dp.optimizer.grad_samples]
    _, work = replay(lib, args.model)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    work_alone = statistics.median(times)
    n_calls = torch_calls(work)
    ops = {"ops_1": products(torch, 1, work_alone), "ops_n": products(torch, n_calls, work_alone)}
    ops_alone = {}
    for name, run in ops.items():
        t0 = time.perf_counter()
        run()
        ops_alone[name] = time.perf_counter() - t0

    jobs, done = queue.SimpleQueue(), queue.SimpleQueue()
    ops["handover"], ops["python"] = (lambda: None), _hold_gil
    thread = threading.Thread(target=_thread_worker, args=(jobs, done, work, torch), daemon=True)
    thread.start()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_process_worker, args=(child, args.model, shared, "cpu"))
    proc.start()
    assert parent.recv_bytes() == b"ready"

    def block(kind: str) -> float:
        """Seconds per step of ``k`` steps of ``kind``, its worker drained at the end."""
        opt = dp.optimizer
        if kind == "busy_core":
            parent.send_bytes(b"busy")
        t0 = time.perf_counter()
        for _ in range(args.k):
            dp.step()
            if kind == "inline":
                work(opt.grad_samples)
            elif kind == "thread":  # references, as overlap hands them over
                jobs.put(opt.grad_samples)
            elif kind == "thread_same":  # the captured chunk again: data already in cache
                jobs.put(())
            elif kind in ops:
                jobs.put(ops[kind])
            elif kind == "process":
                for g, s in zip(opt.grad_samples, shared, strict=True):
                    s.copy_(g)
                parent.send_bytes(b"s")
        for _ in range(args.k if kind.startswith(("thread", "ops")) else 0):
            done.get()
        for _ in range(args.k if kind == "process" else 0):
            parent.recv_bytes()
        elapsed = time.perf_counter() - t0
        if kind == "busy_core":
            parent.send_bytes(b"stop")
        opt.zero_grad(set_to_none=True)
        return elapsed / args.k

    out: dict[str, list[float]] = {k: [] for k in KINDS}
    for r in range(args.blocks):
        for kind in KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]:
            out[kind].append(block(kind))
    jobs.put(None)
    parent.send_bytes(b"q")
    proc.join()

    step = statistics.median(out["alone"])
    print(f"# {args.model}: one chunk's measurement beside DP training\n")
    print(machine_line(lib, "cpu") + "\n")
    print(
        f"DP step {1e3 * step:.2f} ms; the measurement alone {1e3 * work_alone:.2f} ms "
        f"in {n_calls} torch calls; the products alone: "
        + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in ops_alone.items())
        + f" ({args.blocks} blocks of {args.k} steps per kind)\n"
    )
    print("| where the measurement runs | total | paired median [quartiles] |")
    print("|---|---:|---:|")
    totals = lib.total_ratios(out, baseline="alone")
    for kind in KINDS[1:]:
        med, q1, q3 = lib.paired_spread(out, kind, baseline="alone")
        print(f"| {kind} | {totals[kind]:.3f}x | {med:.3f}x [{q1:.3f}-{q3:.3f}] |")


if __name__ == "__main__":
    main()
