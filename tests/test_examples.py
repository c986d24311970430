"""The examples run as the README says, and what they print obeys the closed forms.

References: the Gaussian channel's 1/(2 sigma^2) bound per private release, ln B, Opacus's own
calibration (epsilon at or under the target), monotonicity in the noise multiplier, and for
DPDDP the single-process accountant on the same global batch (the machinery itself is
``tests/test_distributed.py``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opacus_mi.records import read_jsonl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"opacus_mi_example_{name}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _own_cwd_and_threads(tmp_path, monkeypatch):
    """Examples write under runs/ and set torch's thread count (which decides whether later
    monitors overlap): both are put back."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_wrap_privacy_engine_prints_epochs_and_the_summary(capsys):
    _load("wrap_privacy_engine.py").main(epochs=1)
    out = capsys.readouterr().out
    assert "epoch 1: test accuracy" in out
    assert "private/oracle" in out and "bound/step" in out


def test_mi_vs_epsilon_meets_its_target_and_stays_under_the_bound():
    example = _load("mi_vs_epsilon.py")
    low, high = example.measure(1.0, epochs=1), example.measure(4.0, epochs=1)
    for r in (low, high):
        assert r["epsilon"] <= r["target"] + 1e-9  # Opacus calibrates sigma from above
        assert r["epsilon"] > 0.9 * r["target"]
        assert math.isclose(r["bound"], 1 / (2 * r["sigma"] ** 2))
        assert 0 < r["lo"] <= r["mi"] <= r["hi"]
        assert r["lo"] <= r["bound"]  # a lower bound on leakage under the channel's limit
        assert r["mi"] <= math.log(64)
    assert low["sigma"] > high["sigma"] and low["mi"] < high["mi"]


def test_noise_sweep_rows_fall_with_sigma_and_stay_under_the_bound(capsys):
    rows = _load("noise_sweep.py").main((1.0, 4.0), epochs=1)
    assert [r[0] for r in rows] == [1.0, 4.0]
    (_, eps1, mi1, *_), (_, eps4, mi4, *_) = rows
    assert eps1 > eps4 > 0
    assert mi1 > mi4 > 0
    for sigma, _, mi, lo, hi, acc in rows:
        assert lo <= mi <= hi
        # Monte Carlo: at sigma = 4 the oracle's mean sits near the bound, its CI reaches under.
        assert lo <= 1 / (2 * sigma**2)
        assert 0 <= acc <= 1
    assert Path("runs/noise_sweep/sigma_1/report.html").is_file()
    assert "MI/step" in capsys.readouterr().out


@pytest.mark.xdist_group("process_groups")  # (with tests/test_distributed.py's)
def test_ddp_torchrun_on_two_processes_matches_the_single_process_epsilon(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run(
        [*cmd, str(EXAMPLES / "ddp_torchrun.py"), "--epochs", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    match = re.search(r"epsilon (\d+\.\d+) vs single process (\d+\.\d+)", run.stdout)
    assert match, run.stdout[-3000:]
    assert match.group(1) == match.group(2)
    assert run.stdout.count("epoch 1: test accuracy") == 1  # rank 0 alone prints
    records = read_jsonl(tmp_path / "runs" / "ddp_leakage.jsonl")
    steps = [r.step for r in records]
    assert steps and steps == sorted(set(steps))  # rank 0 alone writes: no step twice
    assert all("private/oracle" in r.mi for r in records)
