"""The overhead budget (the library's default schedule): plans from measured time, bounded cost.

References: the plan's closed form from the recorded seconds; Opacus itself for the guest rule
(the same run without a monitor, bit for bit); the budget's own books for the bound it promises.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import make_private, train
from torch import nn

from opacus_mi import LeakageMonitor
from opacus_mi.budget import OverheadBudget


@pytest.fixture
def budget_defaults(monkeypatch):
    """The library's real defaults (the suite's conftest pins a fixed schedule)."""
    defaults = LeakageMonitor.__init__.__kwdefaults__
    monkeypatch.setitem(defaults, "every", None)
    monkeypatch.setitem(defaults, "train_every", None)


def _books(budget: OverheadBudget, *, train, measure, critic=0.0, m_cost, c_cost=None, step):
    budget.train_seconds, budget.measure_seconds, budget.critic_seconds = train, measure, critic
    budget.measure_cost, budget.critic_cost, budget.step_seconds = m_cost, c_cost, step
    return budget


def test_plan_is_the_smallest_gap_that_keeps_the_measurement_in_budget():
    # share 1 (no critics): need (0.05 + 0.01) / 0.1 = 0.6 s of training; have 0.5 s, and
    # 0.01 s per step, so the next measurement is 10 steps away.
    b = _books(OverheadBudget(0.1), train=0.5, measure=0.05, m_cost=0.01, step=0.01)
    plan = b.plan(critics=False)
    assert plan.next_in == math.ceil((0.06 / 0.1 - 0.5) / 0.01) == 10 and not plan.train
    # Well within budget: measure the very next step.
    b = _books(OverheadBudget(0.1), train=10.0, measure=0.05, m_cost=0.01, step=0.01)
    assert b.plan(critics=False).next_in == 1


def test_critics_get_a_round_only_when_it_fits_and_leave_half_to_the_measurement():
    # allowed 0.1 * 2 = 0.2 s; spent 0.1; a round of 0.05 fits, one of 0.15 does not.
    b = _books(
        OverheadBudget(0.1),
        train=2.0,
        measure=0.06,
        critic=0.04,
        m_cost=0.01,
        c_cost=0.05,
        step=0.01,
    )
    fits = b.plan(critics=True)
    assert fits.train
    b.critic_cost = 0.15
    plan = b.plan(critics=True)
    assert not plan.train
    # The measurement keeps its half: (0.06 + 0.01) / (0.5 * 0.1) = 1.4 s > 2.0 s is false,
    # so it may measure now; with 1.0 s of training it must wait (1.4 - 1.0) / 0.01 = 40 steps
    # unless unused critic budget covers it (it does not: 0.1 - 0.1 < 0.01).
    assert plan.next_in == 1
    b.train_seconds = 1.0
    assert b.plan(critics=True).next_in == 40


@pytest.mark.parametrize("bad", [0, -0.5, float("inf"), "0.1", True])
def test_budget_is_validated(private_setup, bad):
    engine, model, opt, _ = private_setup()
    with pytest.raises(ValueError, match="budget must be a positive number"):
        LeakageMonitor(engine, model, opt, delta=1e-5, budget=bad, every=None)


@pytest.mark.parametrize("name", ["every", "train_every"])
@pytest.mark.parametrize("bad", [0, 1.5, "2"])
def test_schedules_are_validated(private_setup, name, bad):
    engine, model, opt, _ = private_setup()
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, or None"):
        LeakageMonitor(engine, model, opt, delta=1e-5, **{name: bad})


def _run(sleep: float, budget: float, epochs: int = 3, monitored: bool = True):
    engine, model, opt, loader = make_private(n=96, batch_size=8, poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, budget=budget) if monitored else None
    base = nn.CrossEntropyLoss()

    def criterion(out, y):  # a slower training loop, as a larger model would be
        if sleep:
            time.sleep(sleep)
        return base(out, y)

    if monitor is not None:
        criterion = monitor.wrap_criterion(criterion)
    train(model, opt, loader, epochs=epochs, criterion=criterion)
    return engine, model, monitor, torch.get_rng_state()


def test_a_tight_budget_measures_few_steps_and_keeps_its_bound(budget_defaults):
    _, _, monitor, _ = _run(sleep=0.0, budget=0.02)
    b = monitor.budget
    assert monitor.every is None and b is not None
    assert 0 < len(monitor.history) < monitor.steps / 2
    # The promise: monitor time <= fraction x training time, give or take the one unit of work
    # that was planned with a cost estimate (the first measurement is made before any is known).
    slack = 2 * (
        max(b.measure_cost or 0, b.critic_cost or 0)
        + max(r.monitor_seconds for r in monitor.history)
    )
    assert b.spent <= b.fraction * b.train_seconds + slack


def test_a_loose_budget_measures_every_step_and_trains_the_critics(budget_defaults):
    _, _, monitor, _ = _run(sleep=0.01, budget=5.0)
    measured = {r.step for r in monitor.history}
    # The first measured step pays one-off costs (allocations, building the critics) and may
    # push the next few out; once that is amortised, every step fits.
    assert set(range(monitor.steps // 2, monitor.steps)) <= measured
    assert all(est.updates > 0 for est in monitor.estimators.values())
    assert monitor.budget.critic_seconds > 0


def test_budget_mode_is_still_a_guest(budget_defaults):
    e0, m0, _, rng0 = _run(sleep=0.0, budget=0.05, monitored=False)
    e1, m1, monitor, rng1 = _run(sleep=0.0, budget=0.05)
    assert monitor.history
    for a, b in zip(m0.parameters(), m1.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rng0, rng1)
    assert e0.accountant.history == e1.accountant.history
    assert e0.get_epsilon(1e-5) == e1.get_epsilon(1e-5)


def _spend(budget: OverheadBudget, kind: str, seconds: float) -> None:
    """Book a span of exactly ``seconds`` (the clock itself is not under test here)."""
    span = budget.span()
    span.t1 = span.t0 + seconds
    budget._pending.append((span, kind))
    budget._settle()


def test_first_step_of_each_kind_is_setup_and_costs_are_per_step():
    b = OverheadBudget(0.1)
    _spend(b, "measure", 0.5)  # first measured step: one-off costs
    _spend(b, "measure", 0.25)
    b.tick()
    assert b.setup_seconds == 0.75 and b.measure_seconds == 0 and b.measure_cost is None
    _spend(b, "measure", 0.002)  # a steady step booked in two spans
    _spend(b, "measure", 0.003)
    _spend(b, "critic", 0.04)  # the critics' first round: setup as well
    b.tick()
    assert b.measure_seconds == pytest.approx(0.005)
    assert b.measure_cost == pytest.approx(0.005)  # one step's total, not one span's
    assert b.critic_seconds == 0 and b.setup_seconds == pytest.approx(0.79)
    _spend(b, "critic", 0.03)
    b.tick()
    assert b.critic_seconds == pytest.approx(0.03) and b.critic_cost == pytest.approx(0.03)
