"""The benchmark scripts measure what they say they measure.

``benchmarks/`` is timed by hand, not by this suite, so a script that silently times nothing
(as ``contention.py`` did once the monitor began releasing a measured chunk's tensors) would go
unnoticed. References: the monitor's own measurement of the replayed chunk, and a counted call.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def contention():
    """``benchmarks/contention.py``, imported as its command line does. The scripts put
    ``benchmarks/`` first on ``sys.path`` (where its ``conftest.py`` would shadow the tests'
    own in any process spawned later) and set the device variable: both are undone."""
    path, modules, env = list(sys.path), set(sys.modules), os.environ.copy()
    spec = importlib.util.spec_from_file_location("opacus_mi_contention", BENCH / "contention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = path
    for name in set(sys.modules) - modules:  # the scripts' own modules (not torch's, say)
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(BENCH)):
            del sys.modules[name]
    os.environ.clear()
    os.environ.update(env)


def test_replay_measures_the_chunk_the_monitor_measured(contention):
    lib = contention._load_lib("cpu")
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
