"""The shuffled-pairs control: a second critic, identically scheduled, trained and scored on
pairs re-paired by a random cycle. References: the permutation's definition, the main critic's
own window (same rows, other pairing), Opacus itself (bit-identical training)."""

from __future__ import annotations

import torch
from conftest import make_private, train
from torch import nn

from opacus_mi import LeakageMonitor


def _monitor(**kwargs):
    engine, model, opt, loader = make_private(poisson=False, n=128)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1, control=True, **kwargs)
    return engine, model, opt, loader, monitor


def test_derangement_is_a_permutation_without_fixed_points():
    *_, monitor = _monitor()
    for n in range(2, 12):
        for _ in range(20):
            perm = monitor._derangement(n)
            assert sorted(perm.tolist()) == list(range(n))
            assert not (perm == torch.arange(n)).any()


def test_control_critic_sees_the_same_rows_re_paired():
    engine, model, opt, loader, monitor = _monitor(views=("clipped",))
    train(model, opt, loader, epochs=2, criterion=monitor.wrap_criterion(nn.CrossEntropyLoss()))
    monitor.flush()  # the critics' state is final (overlap)
    main, ctrl = monitor.estimators["clipped"], monitor.controls["clipped"]
    assert ctrl.critic is not main.critic and ctrl.updates == main.updates > 0
    # The token side is row-for-row the same; the feature side is the same multiset of rows
    # per batch, in another order, so no pair keeps its own features.
    mx, my = torch.cat([main.pairs.x, main.val.x]), torch.cat([main.pairs.y, main.val.y])
    cx, cy = torch.cat([ctrl.pairs.x, ctrl.val.x]), torch.cat([ctrl.pairs.y, ctrl.val.y])
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(my) == key(cy) and key(mx) == key(cx)
    pairs_main = set(map(tuple, torch.cat([mx, my], 1).tolist()))
    pairs_ctrl = set(map(tuple, torch.cat([cx, cy], 1).tolist()))
    assert not pairs_main & pairs_ctrl
    records = [r for r in monitor.history if "clipped/mine" in r.mi]
    assert records and all(r.mi["clipped/mine"].control is not None for r in records)
    assert "control" in monitor.summary()


def test_without_a_control_critic_no_figure_carries_a_control():
    """``MIValue.control`` is the control critic's figure, or None where there is none: a
    monitor without ``control`` gave every learned figure a NaN control, which reads as a
    control that failed (and is written to the JSONL as one)."""
    engine, model, opt, loader = make_private(poisson=False, n=128)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1)
    train(model, opt, loader, epochs=2, criterion=monitor.wrap_criterion(nn.CrossEntropyLoss()))
    monitor.detach()
    values = [v for r in monitor.history for v in r.mi.values()]
    assert any(key.endswith("/mine") for r in monitor.history for key in r.mi)
    assert values and all(v.control is None for v in values)


def test_a_batch_of_two_is_re_paired_and_its_figures_carry_a_control():
    """Two examples are the fewest a random cycle re-pairs (a swap): every learned figure of
    such a batch still has its control beside it."""
    engine, model, opt, loader = make_private(poisson=False, batch_size=2, n=24)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, train_every=1, control=True, views=("clipped",)
    )
    train(model, opt, loader)
    monitor.detach()
    values = [r.mi["clipped/mine"] for r in monitor.history if "clipped/mine" in r.mi]
    assert values and all(v.n == 2 and v.control is not None for v in values)


def test_control_keeps_training_bit_identical_and_round_trips():
    def run(monitored: bool, split: bool = False):
        engine, model, opt, loader = make_private(poisson=False, n=128)
        crit = nn.CrossEntropyLoss()
        kw = {"delta": 1e-5, "train_every": 1, "control": True}
        monitor = LeakageMonitor(engine, model, opt, **kw) if monitored else None
        if monitor:
            crit = monitor.wrap_criterion(crit)
        train(model, opt, loader, criterion=crit)
        if split:
            state = monitor.state_dict()
            monitor.detach()
            monitor = LeakageMonitor(engine, model, opt, **kw)
            monitor.load_state_dict(state)
            crit = monitor.wrap_criterion(nn.CrossEntropyLoss())
        train(model, opt, loader, criterion=crit)
        history = [] if monitor is None else [r.as_dict() for r in monitor.history]
        for r in history:
            r.pop("monitor_seconds")
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state(), history

    p0, rng0, _ = run(False)
    p1, rng1, h1 = run(True)
    _, _, h2 = run(True, split=True)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    assert torch.equal(rng0, rng1)
    assert h1 == h2
    assert any(r["mi"].get("clipped/mine", {}).get("control") is not None for r in h1)
