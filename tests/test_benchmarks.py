"""The benchmark scripts measure what they say they measure.

``benchmarks/`` is timed by hand, not by this suite, so a script that silently times nothing
(as ``contention.py`` did once the monitor began releasing a measured chunk's tensors) would go
unnoticed. References: the monitor's own measurement of the replayed chunk, and a counted call.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def _script(name: str):
    """``benchmarks/<name>.py``, imported as its command line does. The scripts put
    ``benchmarks/`` first on ``sys.path`` (where its ``conftest.py`` would shadow the tests'
    own in any process spawned later), set environment variables and torch's thread count: all
    undone. Pinning malloc could not be undone, so it is declined here."""
    path, modules, env = list(sys.path), set(sys.modules), os.environ.copy()
    threads = torch.get_num_threads()
    os.environ["OPACUS_MI_BENCH_MALLOC"] = "default"
    spec = importlib.util.spec_from_file_location(f"opacus_mi_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = path
        for mod in set(sys.modules) - modules:  # the scripts' own modules (not torch's, say)
            if str(getattr(sys.modules[mod], "__file__", None) or "").startswith(str(BENCH)):
                del sys.modules[mod]
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def contention():
    with _script("contention") as module:
        yield module


def test_replay_measures_the_chunk_the_monitor_measured(contention):
    lib = contention.load_lib("cpu")
    setup, work = contention.replay(lib, "digits_cnn")
    first, again, monitored = work(), work(), work.monitored
    assert first.batch == again.batch == monitored.batch == setup.batch
    assert not first.flags
    # Clipped tokens are deterministic (no draws): the replay is the monitor's measurement.
    assert torch.equal(first.tokens["clipped"], monitored.tokens["clipped"])
    assert torch.equal(again.tokens["clipped"], monitored.tokens["clipped"])
    if monitored.pending is None:
        # The oracle and the private view draw from the monitor's generator: new draws each time.
        assert first.oracle_terms is not None and first.oracle_terms.shape == (setup.batch,)
        assert not torch.equal(first.tokens["private"], again.tokens["private"])
    else:  # sync-free (a GPU): the draws wait for the record; the Gram they need is there
        assert first.pending[1].shape == (setup.batch, setup.batch)
        assert torch.equal(first.pending[1], monitored.pending[1])
    # Other per-sample gradients (another step's) give other tokens.
    setup.step()
    other = work([g.clone() for g in setup.optimizer.grad_samples])
    assert other.batch == setup.batch
    assert not torch.equal(other.tokens["clipped"], monitored.tokens["clipped"])


def test_torch_calls_counts_dispatched_operations_not_attribute_reads(contention):
    a, b = torch.ones(3, 3), torch.ones(3, 3)

    def fn():
        c = a + b
        _ = c.shape, c.dtype, c.device
        torch.mm(c, b).sum()

    assert contention.torch_calls(fn) == 3  # add, mm, sum


def _allocator(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` with ``benchmarks/allocator.py`` importable, in a process of its own (pinning
    malloc cannot be undone, so never in this one)."""
    full_env = {k: v for k, v in os.environ.items() if k != "OPACUS_MI_BENCH_MALLOC"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); {code}"],
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_pin_malloc_sets_glibc_thresholds_and_honours_the_opt_out():
    import ctypes.util

    if "libc.so" not in str(ctypes.util.find_library("c")):
        pytest.skip("not glibc")
    pinned = _allocator("import allocator; print(allocator.pin_malloc())")
    assert pinned.returncode == 0, pinned.stderr
    assert "pinned (no mmap, trim threshold 2 GiB)" in pinned.stdout
    left = _allocator(
        "import allocator; print(allocator.pin_malloc())", OPACUS_MI_BENCH_MALLOC="default"
    )
    assert "adaptive" in left.stdout
    bad = _allocator("import allocator; allocator.pin_malloc()", OPACUS_MI_BENCH_MALLOC="yes")
    assert bad.returncode != 0
    assert "OPACUS_MI_BENCH_MALLOC must be 'pinned' or 'default'" in bad.stderr


def test_side_by_side_times_both_ways(capsys):
    """In one process (blocks) and in fresh processes: each prints its ratio, the page faults,
    and the monitor's summary; the processes' ratio is their medians' (recomputed here)."""
    with _script("side_by_side") as module:
        module.main(["--blocks", "2", "--k", "3", "--malloc", "default", "--threads", "1"])
        one = capsys.readouterr().out
        # Adaptive malloc: each child must run as asked (it once pinned whatever it was told).
        module.main(["--processes", "1", "--steps", "4", "--threads", "1", "--malloc", "default"])
        two = capsys.readouterr().out
    assert re.search(r"monitored / plain: total \d+\.\d{3}x, paired median \d+\.\d{3}x", one)
    assert "glibc malloc adaptive" in one and "page faults per step: plain" in one
    rows = re.findall(r"(plain|monitored) +process (\d): ([\d.]+) ms/step, (\d+) faults/step", two)
    assert sorted((name, int(i)) for name, i, _, _ in rows) == [("monitored", 1), ("plain", 1)]
    median = {n: float(m) for n, _, m, _ in rows}  # one process each
    ratio = float(re.search(r"monitored / plain: ([\d.]+)x \(median of each\)", two).group(1))
    # (the printed times are rounded to 0.01 ms and the ratio to 0.001: within what the
    # rounding allows, which at a 2 ms step is more than a relative 4e-3)
    m, p = median["monitored"], median["plain"]
    assert (m - 0.005) / (p + 0.005) - 5e-4 <= ratio <= (m + 0.005) / (p - 0.005) + 5e-4
    assert "glibc malloc adaptive (its default; OPACUS_MI_BENCH_MALLOC=default)" in two
    assert "fresh processes per loop: 1, 4 steps each" in two
