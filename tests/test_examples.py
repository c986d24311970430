"""The examples run as the README says, and what they print obeys the closed forms.

References: the Gaussian channel's 1/(2 sigma^2) bound per private release, ln B, Opacus's own
calibration (epsilon at or under the target), and monotonicity in the noise multiplier.
``examples/ddp_torchrun.py`` needs ``torchrun``; its machinery is ``tests/test_distributed.py``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

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
