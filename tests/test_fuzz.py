"""Property-based fuzzing: the only exceptions are the documented ones, results are well formed.

``estimate_mi`` documents ``ValueError`` for bad shapes, too few pairs, NaN/Inf and unknown
estimators; ``LeakageMonitor`` documents ``ValueError``/``TypeError`` at attach time and nothing
at run time (faults become flags).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from conftest import make_private, train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from opacus_mi import LeakageMonitor, estimate_mi

FAST = {"max_steps": 6, "check_every": 3, "bootstrap": 40, "hidden": 8, "embed": 4}


@st.composite
def pair_arrays(draw):
    n = draw(st.integers(0, 40))
    dx, dy = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.int8, bool]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.normal(size=(n, dx)) * draw(st.sampled_from([1e-6, 1.0, 1e4]))
    y = rng.normal(size=(n, dy))
    if draw(st.booleans()) and n:
        x[:, 0] = 3.0  # a constant column
    if draw(st.booleans()) and dy > 1:
        y[:, 1] = y[:, 0]  # a duplicate column
    if draw(st.booleans()):
        x = x.astype(dtype)
    one_d = draw(st.booleans())
    return (x[:, 0] if one_d else x), y


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair_arrays(), st.sampled_from(["mine", "infonce"]))
def test_estimate_mi_fuzz(pairs, estimator):
    x, y = pairs
    try:
        est = estimate_mi(x, y, estimator, seed=0, **FAST)
    except ValueError as exc:
        assert len(x) < 16, f"unexpected ValueError for n={len(x)}: {exc}"
        return
    assert len(x) >= 16
    assert math.isfinite(est.nats)
    # (an interval from under 32 evaluation pairs, 8 for InfoNCE, is withheld: NaN)
    assert est.ci_low <= est.ci_high or (math.isnan(est.ci_low) and math.isnan(est.ci_high))
    if estimator == "infonce":
        assert est.nats <= math.log(est.n_eval) + 1e-6


@st.composite
def monitor_configs(draw):
    views = draw(st.lists(st.sampled_from(["raw", "clipped", "private"]), min_size=1, unique=True))
    estimator = draw(st.sampled_from(["mine", "infonce", "nwj", "smile", None]))
    if estimator is None:  # only the private view has a figure: others are refused (test_budget)
        views = ["private"]
    return {
        "views": tuple(views),
        "estimator": estimator,
        "every": draw(st.integers(1, 3)),
        "token_dim": draw(st.integers(1, 80)),
        "features": draw(
            st.sampled_from([None, "input", ["conv"], ["input", "fc"], lambda x: x[:, 0, 0, :2]])
        ),
        "train_every": draw(st.integers(1, 2)),
        "seed": draw(st.integers(0, 3)),
    }


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(monitor_configs(), st.integers(1, 6), st.booleans(), st.booleans())
def test_monitor_config_fuzz(config, batch_size, poisson, labels):
    engine, model, opt, loader = make_private(batch_size=batch_size, n=12, poisson=poisson)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # any monitor failure would warn
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, **config)
        criterion = monitor.wrap_criterion(nn.CrossEntropyLoss()) if labels else None
        train(model, opt, loader, criterion=criterion)
    expected = [s for s in range(monitor.steps) if s % config["every"] == 0]
    assert [r.step for r in monitor.history] == expected
    for r in monitor.history:
        assert set(r.flags) <= {"empty_batch"}
        for key, v in r.mi.items():
            assert key.split("/")[0] in config["views"]
            assert math.isfinite(v.nats) and v.n >= 1
            if key == "private/oracle":  # each Monte Carlo term is ln B + log p <= ln B
                assert v.nats <= math.log(max(r.batch_size, 1)) + 1e-9
    if (monitor.steps - 1) % config["every"] == 0:  # the last step was monitored
        assert monitor.history[-1].epsilon == engine.get_epsilon(1e-5)
