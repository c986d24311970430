"""Semi-oracle: a learned clean-token model scored with the known noise, vs the exact oracle."""

from __future__ import annotations

import torch
from conftest import make_private, train

from opacus_mi import LeakageMonitor
from opacus_mi.estimators.oracle import gram_oracle
from opacus_mi.estimators.semi_oracle import SemiOracleEstimator


def test_semi_oracle_approaches_the_exact_oracle_on_a_learnable_channel():
    """Clean token = W f (learnable); the exact posterior over the batch is the Gram oracle."""
    g = torch.Generator().manual_seed(0)
    d, k, s, batch = 6, 12, 0.5, 64
    w = torch.randn(k, d, generator=g) / d**0.5
    est = SemiOracleEstimator(train_every=1, train_iters=20, generator=torch.Generator())
    semi, exact = [], []
    for step in range(60):
        f = torch.randn(batch, d, generator=g)
        clean = f @ w.T
        private = clean + s * torch.randn(batch, k, generator=g)
        value = est.evaluate(f, private, s)
        if step >= 40:
            semi.append(value.matched)
            oracle = gram_oracle(
                (clean @ clean.T).double(), s, draws=64, generator=torch.Generator()
            )
            exact.append(oracle.nats)
        est.observe(f, clean)
    semi_mean, exact_mean = sum(semi) / len(semi), sum(exact) / len(exact)
    assert exact_mean > 0.5
    assert semi_mean > 0.8 * exact_mean, (semi_mean, exact_mean)
    assert semi_mean < exact_mean + 0.1  # a lower bound: never well above the exact value


def test_monitor_reports_semi_oracle_series():
    engine, model, opt, loader = make_private(poisson=False, noise=0.3)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, views=("private",), estimator=None, semi_oracle=True
    )
    train(model, opt, loader, epochs=2)
    values = [r.mi["private/semi"] for r in monitor.history if "private/semi" in r.mi]
    assert values and all(v.n == 16 and v.ci_low <= v.nats <= v.ci_high for v in values)
    assert "clipped/mine" not in monitor.keys()  # clean tokens are used, not reported
