"""Overlap: the monitor's measurement runs on a worker thread while training goes on.

On a CPU the monitor's work for a step (tokens, the exact Gram matrix, the oracle's draws, the
record, critic rounds) is a few hundred small tensor operations: on the 10k-parameter digits CNN
it is ~40% of a DP step, and no exact Gram matrix gets it under 15% (README, "Performance").
None of it is needed by the training step, so it need not run *in* it: the training thread
takes references to what the step produced (``grad_sample`` tensors, which Opacus replaces and
never writes again; the detached inputs the monitor's hooks copied; the accountant's history)
and hands them to one worker thread, which computes while the next step's forward and backward
run. PyTorch releases the GIL inside its operations, so a free core does the work; it holds the
GIL while parsing each call, so two threads issuing small operations still take turns (on the
digits CNN the every-step oracle costs a median 1.21x overlapped against 1.45x inline, and
varies more from run to run, with where the OS places the two threads). What the worker costs
the training thread is neither the second core's arithmetic nor the GIL alone
(``benchmarks/contention.py``'s controls on a 2-vCPU VM, digits CNN): a second core computing
without pause in another process cost it 1.01-1.02x; waking the worker with an empty task once
a step 1.02-1.03x; a task holding the GIL in Python for 100 us 1.05-1.06x; one 1.2 ms matrix
product on the worker 1.04-1.09x; the measurement itself (~100 torch calls on the step's fresh
gradients) 1.13-1.17x here and 1.15-1.19x in a separate process with its own GIL. The worker
lets go of a chunk's gradients once it has measured them (``_Taken.release``), before it makes
the record.

Why one worker, in order: every random number comes from the monitor's own generator, drawn in
the same order as without overlap, so records are bit-identical either way. Why at most one
chunk in flight: a chunk's per-sample gradients stay alive until the worker has read them, and a
second one queued behind them would hold another copy (``BatchMemoryManager`` exists because
that memory is scarce); the training thread waits until the worker has finished everything
handed over before (a previous chunk, a previous record) before handing over the next chunk
(on the digits CNN it waited 0.06-0.3 ms per step on average: the worker is faster than a step).
Why one hand-over per step: each wakes the worker thread, which costs on a busy or virtual CPU;
a step's last chunk is handed over with the making of its record, as one task (digits CNN with
the measurement replaced by a no-op, one run each: 1.145x with two hand-overs, 1.12x with one).

When it is on (``overlap=None``): a CPU model on one process (under DPDDP the gathers are
collectives, which must stay on the training thread), and only if a core is free: more usable
cores than torch's intra-op threads. A worker on a core that training's own thread pool uses
would oversubscribe it. On a GPU the device already runs the monitor's kernels asynchronously.
Ghost clipping has no ``grad_sample`` to hand over: there the monitor's backward hooks record
each layer's inputs and backprops (references) and the worker replays them
(``FactoredCapture(defer=True)``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import torch


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def resolve_overlap(overlap: bool | None, *, device: torch.device, distributed: bool) -> bool:
    """Whether the monitor's work runs on a worker thread (see the module docs for when)."""
    if overlap is not None and not isinstance(overlap, bool):
        raise ValueError(f"overlap must be True, False or None (automatic); got {overlap!r}")
    reasons = []
    if device.type != "cpu":
        reasons.append(f"the model is on {device.type}, whose kernels already run asynchronously")
    if distributed:
        reasons.append("under DPDDP the monitor's gathers are collectives on the training thread")
    if overlap is None:
        return not reasons and usable_cores() > torch.get_num_threads()
    if overlap and reasons:
        raise ValueError(
            f"overlap=True cannot be honoured: {'; '.join(reasons)}. Pass overlap=None (automatic) "
            "or overlap=False"
        )
    return overlap


def keep_input(t: torch.Tensor, *, later: bool) -> torch.Tensor:
    """A layer's input that a hook saw, kept to be read after its step.

    Autograd's own activations are never written again, but a tensor no graph produced (the
    loop's batch, or a view of it) may be a buffer the loop refills for its next step, and a
    view of a parameter (``latent.expand(B, -1)``: its own grad_fn, the parameter's storage)
    changes at the optimizer's step: one that is read ``later`` (on the overlap worker, while
    the next step runs) is copied where the tensor whose storage it shares has no grad_fn.
    """
    root = t
    while root._base is not None:
        root = root._base
    return t.detach().clone() if later and root.grad_fn is None else t.detach()


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextlib.contextmanager
def without_autocast() -> Iterator[None]:
    """The monitor's own arithmetic, out of the user's ``torch.autocast``.

    Autocast is thread-local, and a worker's thread never has it: inline (in a backward hook,
    at ``optimizer.step()``) the monitor computes what the worker would, in the precision of
    the tensors it reads, instead of a Gram formed in bfloat16 or a float32-by-bfloat16 product
    that fails.
    """
    with contextlib.ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


class Worker:
    """One thread running the monitor's tasks in submission order.

    Each task runs with the grad mode the training thread had when it was submitted (grad mode
    is thread-local; ``optimizer.step`` runs without grad, and so does the monitor's work
    there). A task must not raise: the monitor's tasks catch their own failures and flag them.
    """

    def __init__(self) -> None:
        # A name unique to this worker: ``on_worker`` must not mistake another monitor's.
        self._prefix = f"opacus-mi-{id(self):x}"
        # torch sets a thread's OpenMP and MKL thread counts lazily, on its first parallel
        # operation: a BLAS call before that (a worker's first task may begin with a GEMM)
        # runs on every core, the training thread's included. ``get_num_threads`` is that
        # lazy initialisation, to torch's setting, and changes nothing else.
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=self._prefix, initializer=torch.get_num_threads
        )
        self._last: Future | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        grad = torch.is_grad_enabled()

        def task() -> Any:
            with torch.set_grad_enabled(grad):
                return fn(*args)

        self._last = self._pool.submit(task)
        return self._last

    def wait(self) -> float:
        """Block until every submitted task is done; the seconds the caller waited (none on the
        worker itself, whose own tasks finish in order anyway)."""
        if self._last is None or self._last.done() or self.on_worker():
            return 0.0
        t0 = time.perf_counter()
        wait_futures([self._last])  # never re-raises: a task's failure is its own to report
        return time.perf_counter() - t0

    def on_worker(self) -> bool:
        """Whether the caller is the worker thread (a sink or feature callable running there)."""
        return threading.current_thread().name.startswith(self._prefix)

    @property
    def idle(self) -> bool:
        return self._last is None or self._last.done()

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        self._pool.shutdown(wait=True)
