"""The online critic's machinery: ring-buffer window, validation hold-out, online early stopping,
warm-up schedule. References are brute force: a naive concatenated window, torch's own moments,
and the validation bound recomputed from scratch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opacus_mi.estimators.bounds import bound
from opacus_mi.estimators.online import OnlineEstimator, PairWindow


def test_ring_window_equals_naive_concatenation_and_its_moments():
    g = torch.Generator().manual_seed(0)
    win = PairWindow(50, dtype=torch.float32)
    naive_x = torch.zeros(0, 3)
    naive_y = torch.zeros(0, 2)
    for n in (7, 13, 1, 0, 29, 64, 5, 50, 3):  # includes a batch larger than the window
        x, y = torch.randn(n, 3, generator=g) * 5 + 2, torch.randn(n, 2, generator=g)
        win.add(x, y)
        naive_x, naive_y = torch.cat([naive_x, x])[-50:], torch.cat([naive_y, y])[-50:]
        assert len(win) == len(naive_x)
        torch.testing.assert_close(win.x, naive_x, rtol=0, atol=0)
        torch.testing.assert_close(win.y, naive_y, rtol=0, atol=0)
        if len(win):
            mx, sx, my, sy = win.moments()
            torch.testing.assert_close(mx, naive_x.mean(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sx, naive_x.std(0, unbiased=False), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(my, naive_y.mean(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sy, naive_y.std(0, unbiased=False), rtol=1e-4, atol=1e-5)
    state = win.state_dict()
    other = PairWindow(50, dtype=torch.float32)
    other.load_state_dict(state)
    torch.testing.assert_close(other.x, win.x, rtol=0, atol=0)


def test_default_window_stores_bfloat16_rows_and_their_exact_moments():
    """The default window rounds rows to bfloat16 once, on the way in, less the first batch's
    column means (until a window's worth has arrived): the rounding is relative to a column's
    spread, not its offset (a column of 2000 + z keeps z), tiny values keep float32's range,
    and the running moments are those of the rows it returns."""
    g = torch.Generator().manual_seed(2)
    win = PairWindow(120)
    raw = torch.zeros(0, 4)
    scale, shift = torch.tensor([1e-6, 1.0, 1e3, 1.0]), torch.tensor([5e-6, 0.0, 0.0, 2000.0])
    for n in (30, 29, 17, 33):
        x = torch.randn(n, 4, generator=g) * scale + shift
        win.add(x, torch.randn(n, 2, generator=g))
        raw = torch.cat([raw, x])
        assert win.x.dtype == torch.float32 and win._x.buf.dtype == torch.bfloat16
        mx, sx, _, _ = win.moments()
        torch.testing.assert_close(mx, win.x.double().mean(0).float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(
            sx, win.x.double().std(0, unbiased=False).float(), rtol=1e-4, atol=0
        )
    offset = win._offsets[0]
    err = (win.x - raw).abs()
    # rounded once: half an ulp of bfloat16's 8-bit mantissa of the offset value, plus the
    # float32 rounding of adding the offset back
    bound = 2**-8 * (raw - offset).abs() + 2**-23 * raw.abs()
    assert (err <= bound * (1 + 1e-6)).all() and (err > 0).any()
    assert (win.x[:, 0].abs() > 0).all()  # 1e-6-scale entries keep float32's range
    z = raw[:, 3] - 2000.0
    assert torch.corrcoef(torch.stack([win.x[:, 3] - 2000.0, z]))[0, 1] > 0.9999


def test_a_window_of_shrinking_rows_keeps_their_detail():
    """Tokens shrink as training goes on. The offsets were the first batch's column means for
    good: rows of 1e-3 of its spread, stored less them, kept 2-3 distinct values (a known 1.02
    nats read -8.9). Once a window's worth of rows has arrived the offsets are the newest
    batch's, and the rows held are stored anew."""
    g = torch.Generator().manual_seed(5)
    win = PairWindow(256)
    win.add(torch.randn(64, 3, generator=g) + 1.0, torch.randn(64, 2, generator=g))
    raw = []
    for _ in range(8):  # two windows' worth of late rows, a batch at a time
        x = torch.randn(64, 3, generator=g) * 1e-3
        raw.append(x)
        win.add(x, torch.randn(64, 2, generator=g))
    late = torch.cat(raw)[-256:]
    # Rounded at most twice (on the way in, and at a re-anchoring), each time to bfloat16's
    # 8-bit mantissa of the row less an offset of the late rows, which is ~1e-3 of it
    assert ((win.x - late).abs() <= 2 * 2**-8 * 5e-3).all()
    assert torch.corrcoef(torch.stack([win.x[:, 0], late[:, 0]]))[0, 1] > 0.9999
    mx, sx, _, _ = win.moments()
    torch.testing.assert_close(sx, late.double().std(0, unbiased=False).float(), rtol=1e-2, atol=0)
    other = PairWindow(256)  # its state: the offsets and when they were fixed
    other.load_state_dict(win.state_dict())
    x, y = torch.randn(200, 3, generator=g) * 1e-6, torch.randn(200, 2, generator=g)
    for w in (win, other):
        w.add(x, y)
    assert torch.equal(other.x, win.x) and torch.equal(other._offsets[0], win._offsets[0])


def test_a_window_keeps_a_large_columns_detail_to_its_own_spread():
    """The offset itself was rounded to bfloat16 (101126 -> 101376): the residuals carried
    that error and rounded to bfloat16 relative to it, and a column of 101126 + 0.5 u kept 5
    distinct values (a known 0.83 nats read 0.68). It is float32 now."""
    g = torch.Generator().manual_seed(6)
    win = PairWindow(1024)
    raw = []
    for _ in range(8):
        x = 101126 + 0.5 * torch.randn(64, 1, generator=g)
        raw.append(x)
        win.add(x, torch.randn(64, 1, generator=g))
    raw = torch.cat(raw)
    # (float32 itself holds 101126 to 2^-7)
    assert ((win.x - raw).abs() <= 2**-8 * 2.5 + 2**-7).all()
    assert len(torch.unique(win.x)) > 200


def _correlated(n: int, g: torch.Generator, rho: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 4, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, 4, generator=g)
    return x, y


def test_validation_pairs_are_never_trained_on():
    g = torch.Generator().manual_seed(1)
    est = OnlineEstimator("mine", holdout=4, train_every=1, generator=torch.Generator())
    est.pairs.dtype = est.val.dtype = torch.float32  # ids stored exactly
    seen = 0
    for _ in range(6):
        x, y = _correlated(32, g)
        ids = torch.arange(seen, seen + 32, dtype=torch.float32)[:, None]
        seen += 32
        est.observe(torch.cat([ids, x], 1), torch.cat([ids, y], 1))
    val_ids = set(est.val.x[:, 0].tolist())
    train_ids = set(est.pairs.x[:, 0].tolist())
    assert val_ids and not val_ids & train_ids
    assert val_ids == {float(i) for i in range(0, seen, 4)}  # every 4th pair of each batch
    assert len(val_ids) + len(train_ids) == seen


def _val_bound(est: OnlineEstimator, critic) -> float:
    with torch.no_grad():
        return float(bound(est.kind, critic.scores(est.val.x, est.val.y)))


def test_the_reporting_critic_is_the_better_validated_one():
    """Online early stopping: after every round the reporting critic validates at least as well
    as the training iterate, re-scored on the current validation pairs. A huge learning rate
    ruins the iterate; the reported held-out figure must not follow it down."""
    g = torch.Generator().manual_seed(2)
    est = OnlineEstimator("mine", train_every=1, warmup=0, generator=torch.Generator())
    for _ in range(30):
        est.observe(*_correlated(64, g))
        assert _val_bound(est, est.selected) >= _val_bound(est, est.critic)
    good = [est.evaluate(*_correlated(64, g)).matched for _ in range(5)]
    for group in est.optimizer.param_groups:
        group["lr"] = 1.0
    kept = est.kept_previous
    for _ in range(10):
        est.observe(*_correlated(64, g))
        assert _val_bound(est, est.selected) >= _val_bound(est, est.critic)
    assert est.kept_previous > kept  # the ruined iterate was passed over at least once
    x, y = _correlated(64, g)
    reported = est.evaluate(x, y).matched
    with torch.no_grad():
        iterate = float(bound("mine", est.critic.scores(x, y)))
    assert reported > iterate
    assert reported > 0.5 * sum(good) / len(good)


def test_online_selection_keeps_a_learnable_critic_learning():
    g = torch.Generator().manual_seed(3)
    est = OnlineEstimator("infonce", train_every=1, generator=torch.Generator())
    for _ in range(40):
        est.observe(*_correlated(64, g))
    held_out = [est.evaluate(*_correlated(64, g)).matched for _ in range(10)]
    truth = 4 * -0.5 * math.log(1 - 0.9**2)  # 4 independent coordinate pairs
    assert 0.6 * truth < sum(held_out) / len(held_out) <= min(truth, math.log(64)) + 0.2


@pytest.mark.parametrize(
    ("warmup", "train_every", "batches", "updates"),
    [(3, 8, 3, 3), (3, 8, 8, 4), (3, 8, 16, 5), (0, 2, 6, 3)],
)
def test_warmup_then_every_nth_batch(warmup, train_every, batches, updates):
    g = torch.Generator().manual_seed(4)
    est = OnlineEstimator(
        "mine", warmup=warmup, train_every=train_every, holdout=0, generator=torch.Generator()
    )
    for _ in range(batches):
        est.observe(*_correlated(16, g))
    assert est.updates == updates


def test_holdout_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="holdout"):
        OnlineEstimator("mine", holdout=-1, generator=torch.Generator())


def test_a_critic_that_found_nothing_reports_zero_not_a_negative_figure():
    """Independent pairs: the constant critic (bound exactly 0) validates best, so the held-out
    figure is 0 [0, 0] instead of the DV bias of a critic fitted to noise. With real dependence
    a learned critic wins validation and reports."""
    g = torch.Generator().manual_seed(5)
    est = OnlineEstimator("mine", train_every=1, generator=torch.Generator())
    for _ in range(30):
        est.observe(torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g))
    values = [
        est.evaluate(torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g))
        for _ in range(10)
    ]
    assert est.null_selected
    assert all(v.matched == 0.0 and v.ci_low == 0.0 == v.ci_high for v in values)
    # the raw iterate, by contrast, is fitted to noise: its own held-out DV bound is negative
    with torch.no_grad():
        x, y = torch.randn(256, 4, generator=g), torch.randn(256, 4, generator=g)
        assert float(bound("mine", est.critic.scores(x, y))) < 0
    dependent = OnlineEstimator("mine", train_every=1, generator=torch.Generator())
    for _ in range(30):
        dependent.observe(*_correlated(64, g))
    assert not dependent.null_selected
    assert dependent.evaluate(*_correlated(64, g)).matched > 0.5


def test_resync_recomputes_the_running_moments_exactly():
    g = torch.Generator().manual_seed(6)
    win = PairWindow(40, dtype=torch.float32)
    for _ in range(30):  # many evictions: rounding accumulates in the running sums
        win.add(torch.randn(7, 3, generator=g) * 1e3 + 1e4, torch.randn(7, 2, generator=g))
    win.resync()
    mx, sx, my, sy = win.moments()
    torch.testing.assert_close(mx, win.x.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(sx, win.x.std(0, unbiased=False), rtol=1e-4, atol=0)


def test_moments_stay_exact_when_a_batch_first_overflows_a_partly_filled_window():
    """The first overflow of a window that is not yet full evicts the *oldest* rows (from slot
    0), not the still-empty slots after the write head."""
    g = torch.Generator().manual_seed(7)
    win = PairWindow(50, dtype=torch.float32)
    naive_x = torch.zeros(0, 3)
    for n in (30, 29, 17, 33):  # 30 -> 59 overflows by 9 while 20 slots are still empty
        x = torch.randn(n, 3, generator=g) + 5.0
        win.add(x, torch.randn(n, 2, generator=g))
        naive_x = torch.cat([naive_x, x])[-50:]
        mx, sx, _, _ = win.moments()
        torch.testing.assert_close(win.x, naive_x, rtol=0, atol=0)
        torch.testing.assert_close(mx, naive_x.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sx, naive_x.std(0, unbiased=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_window_state_round_trip_is_exact_and_resamples_alike(dtype):
    """load(save(window)) re-added the rows: re-anchored and re-rounded (1,426 of 5,616 stored
    values moved, by up to 0.008) and, once the ring had wrapped, in another storage order,
    so a resumed critic drew other minibatches than one never stopped."""
    g = torch.Generator().manual_seed(4)
    win = PairWindow(50, dtype=dtype)
    for n in (30, 29, 17, 33):  # wraps the ring
        win.add(torch.randn(n, 3, generator=g) * 3 + 7, torch.randn(n, 2, generator=g))
    other = PairWindow(50, dtype=dtype)
    other.load_state_dict(win.state_dict())
    assert torch.equal(other.x, win.x) and torch.equal(other.y, win.y)
    for a, b in zip(other.moments(), win.moments(), strict=True):
        assert torch.equal(a, b)
    draws = [w.sample(8, torch.Generator().manual_seed(1)) for w in (win, other)]
    assert all(torch.equal(a, b) for a, b in zip(*draws, strict=True))
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
    win.add(x, y)
    other.add(x, y)
    assert torch.equal(other.x, win.x)
    smaller = PairWindow(20, dtype=dtype)  # another size: the latest rows, re-added in order
    smaller.load_state_dict(win.state_dict())
    # (bfloat16: rounded again, relative to the re-added rows' own offsets)
    err = (smaller.x - win.x[-20:]).abs()
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-23
    assert (err <= ulp * (win.x[-20:] - smaller._offsets[0]).abs() + 1e-5).all()


def test_a_wrapped_window_loads_into_a_larger_one_oldest_first():
    """The exact restore kept a smaller window's write head: rows came back out of order and
    the next rows overwrote held ones while never-written memory counted as rows."""
    small = PairWindow(8)
    for start in (0, 5, 10):  # 15 rows into 8 slots: wrapped
        small.add(torch.arange(start, start + 5.0)[:, None], torch.zeros(5, 1))
    big = PairWindow(16)
    big.load_state_dict(small.state_dict())
    big.add(torch.tensor([[100.0], [101.0]]), torch.zeros(2, 1))
    torch.testing.assert_close(big.x[:, 0], torch.tensor([7.0, *range(8, 15), 100.0, 101.0]))
    assert len(big) == 10


def test_small_batches_fill_the_validation_window_and_nan_rows_are_dropped():
    """Batches smaller than ``holdout`` (4) were never split, so no pair was ever validated
    and the critic reported 0 for good without a word: every holdout-th one now goes to
    validation whole. And a NaN row given straight to an estimator sat in its window, each
    round after it diverged and reset (86 steps without a figure in a reviewer's run)."""
    gen = torch.Generator().manual_seed(0)
    est = OnlineEstimator("mine", train_every=1, generator=gen)
    for _ in range(40):
        x = torch.randn(3, 2, generator=gen)
        est.observe(x, x + 0.1 * torch.randn(3, 2, generator=gen))
    assert len(est.val) == 30 and len(est.pairs) == 90  # 10 of the 40 batches validate
    est = OnlineEstimator("mine", train_every=1, generator=gen)
    for step in range(30):
        x = torch.randn(32, 2, generator=gen)
        y = x + 0.1 * torch.randn(32, 2, generator=gen)
        if step == 10:
            y[5, 0] = math.nan
        est.observe(x, y)
    assert est.resets == 0 and torch.isfinite(est.pairs.y).all()


def test_an_anchored_empty_window_keeps_its_offsets_through_a_round_trip():
    """An empty window whose offsets a batch had fixed saved none, so after a resume the next
    rows were stored less other offsets than an uninterrupted run's (validation rows off by
    up to 0.006, enough to flip a close model selection)."""
    window = PairWindow(64)
    window.anchor(torch.full((3, 2), 1000.5), torch.full((3, 2), -7.25))
    again = PairWindow(64)
    again.load_state_dict(window.state_dict())
    x, y = torch.randn(8, 2) + 1000, torch.randn(8, 2)
    window.add(x, y)
    again.add(x, y)
    assert torch.equal(window.x, again.x) and torch.equal(window.y, again.y)


def test_a_ring_grows_as_rows_arrive_and_holds_what_one_made_at_full_size_holds():
    """A ring allocated all ``size`` rows at its first add: window=10**9 failed every record
    (error:RuntimeError, the oracle's figure with it) with an allocation message. Reference: a
    ring whose storage is all there from the start (as it used to be made), and a naive
    concatenated window."""
    from opacus_mi.ring import RowRing

    g = torch.Generator().manual_seed(3)
    grown, full = RowRing(50), RowRing(50)
    full.buf = torch.empty(50, 3)  # (the old first add: never grown)
    naive = torch.zeros(0, 3)
    for n in (7, 13, 1, 0, 2, 29, 64, 5, 50, 3):  # grows 7 -> 20 -> 40 -> 50, then wraps
        rows = torch.randn(n, 3, generator=g)
        out = grown.add(rows), full.add(rows)
        assert (out[0] is None) == (out[1] is None) and (out[0] is None or torch.equal(*out))
        assert (grown.count, grown.head) == (full.count, full.head)
        assert torch.equal(grown.valid(), full.valid())  # the same storage order
        naive = torch.cat([naive, rows])[-50:]
        assert torch.equal(grown.ordered(), naive) and torch.equal(full.ordered(), naive)
        assert len(grown.buf) <= max(2 * grown.count, 7)
    huge = RowRing(10**6)  # (4 MB a row of floats at its full size: none of it is made)
    huge.add(torch.randn(16, 1, generator=g))
    assert huge.buf.shape == (16, 1)
    huge.add(torch.randn(16, 1, generator=g))
    assert huge.buf.shape == (32, 1) and len(huge) == 32
    # A window restored from a state holds its rows, and grows on from there.
    window, again = PairWindow(10**6), PairWindow(10**6)
    window.add(torch.randn(24, 3, generator=g), torch.randn(24, 2, generator=g))
    again.load_state_dict(window.state_dict())
    assert len(again._x.buf) == 24
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    window.add(x, y)
    again.add(x, y)
    assert torch.equal(again.x, window.x) and torch.equal(again.y, window.y)
    assert all(torch.equal(a, b) for a, b in zip(again.moments(), window.moments(), strict=True))


def test_a_rings_edges_no_rows_exactly_full_a_restored_copy_and_doubling_storage():
    """RowRing at its edges. A ring of no rows is refused; a first add of no rows displaces
    none (it failed on the storage not yet made); filling the ring exactly displaces none
    (None, not an empty tensor), the next row displaces the oldest; a restored ring holds a
    copy (adds wrote into the caller's saved state); storage doubles as rows arrive (one
    row at a time it grows to the next power of two, up to size: the amortised growth the
    class promises). Reference: a plain list of rows and the closed form min(size,
    2**ceil(log2 k)). A mutation audit found each unguarded."""
    from opacus_mi.ring import RowRing

    with pytest.raises(ValueError, match="positive number of rows"):
        RowRing(0)
    ring = RowRing(4)
    assert ring.add(torch.zeros(0, 2)) is None and len(ring) == 0 and ring.ordered() is None
    rows = torch.arange(10.0).reshape(5, 2)
    assert ring.add(rows[:3]) is None
    assert ring.add(rows[3:4]) is None  # exactly full: nothing displaced
    assert torch.equal(ring.ordered(), rows[:4])
    assert torch.equal(ring.add(rows[4:]), rows[:1])  # the oldest leaves
    saved = ring.buf.clone()
    restored = RowRing(4)
    restored.restore(saved, ring.head)
    restored.add(torch.full((2, 2), -1.0))
    assert torch.equal(saved, ring.buf)  # the caller's rows untouched
    assert torch.equal(restored.ordered(), torch.cat([rows[3:5], torch.full((2, 2), -1.0)]))
    grown, held = RowRing(50), []
    for k in range(1, 61):
        row = torch.full((1, 1), float(k))
        grown.add(row)
        held = (held + [k])[-50:]
        assert len(grown.buf) == min(50, 2 ** math.ceil(math.log2(k))), k
        assert grown.ordered().flatten().tolist() == held


def test_a_huge_window_trains_the_critics_on_what_arrives():
    """window=10**9 (more pairs than a run sees): every record failed with error:RuntimeError
    and a torch allocation message (78 GB) that did not name window."""
    from conftest import make_private, train

    from opacus_mi import LeakageMonitor

    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, train_every=1, window=10**9)
    train(model, opt, loader, epochs=2)
    assert not any(r.flags for r in monitor.history)
    assert all("private/oracle" in r.mi for r in monitor.history)
    assert len(monitor.estimators["clipped"].pairs._x.buf) <= 2 * 12 * 16  # the pairs seen


def _rho_pairs(n, g, rho=0.95, d=2):
    x = torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1 - rho * rho) * torch.randn(n, d, generator=g)


def test_mine_without_a_validation_window_stays_a_lower_bound_on_small_batches():
    """With holdout=0 MINE read DV on the batch's own marginal mean (no baseline), which sits
    above its bound by Jensen's gap: 7.65 nats on average at B = 2 for a truth of 2.33. It now
    takes the baseline form with c from its training's moving average."""
    truth = -math.log(1 - 0.95**2)  # two coordinate pairs at rho 0.95
    g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    est = OnlineEstimator("mine", holdout=0, train_every=1, train_iters=8, generator=g)
    for _ in range(80):
        est.observe(*_rho_pairs(64, data))
    assert est.baseline is not None
    for b in (2, 4, 8):
        figures = [est.evaluate(*_rho_pairs(b, data)).matched for _ in range(400)]
        assert sum(figures) / len(figures) <= truth, b


def test_the_mismatched_figure_re_pairs_every_pair():
    """The shuffled figure's permutation left one pair matched on average: at n = 2 it was the
    matched figure itself in half the batches."""
    g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    est = OnlineEstimator("infonce", train_every=1, generator=g)
    for _ in range(40):
        est.observe(*_rho_pairs(64, data))
    same = [
        (e.matched == e.mismatched) for e in (est.evaluate(*_rho_pairs(2, data)) for _ in range(60))
    ]
    assert not any(same)


def test_a_state_saved_before_the_first_batch_rewinds_to_no_critic():
    """Loaded into an estimator that had trained since, it kept that critic, its Adam moments
    and its selection: the replayed stream's figures differed from the first pass's."""

    def run(est, data):
        for _ in range(20):
            est.observe(*_rho_pairs(64, data))
        return [est.evaluate(*_rho_pairs(64, data)).matched for _ in range(3)]

    est = OnlineEstimator("mine", train_every=1, generator=torch.Generator().manual_seed(0))
    fresh = est.state_dict()
    first = run(est, torch.Generator().manual_seed(1))
    est.load_state_dict(fresh)
    est.generator.manual_seed(0)
    assert run(est, torch.Generator().manual_seed(1)) == first


def test_a_diverged_round_keeps_the_reporting_critic():
    """The reset after a diverged training round replaced the separately kept, finite
    reporting critic too: no figure until the next round, then one from a fresh critic of a
    single round (0.17-0.48 nats in a monitor where the kept one read ~1.0)."""
    g = torch.Generator().manual_seed(0)

    def pairs(n=64):
        x = torch.randn(n, 2, generator=g)
        return x, 0.9 * x + math.sqrt(1 - 0.81) * torch.randn(n, 2, generator=g)

    est = OnlineEstimator(
        "infonce", train_every=1, warmup=0, generator=torch.Generator().manual_seed(1), hidden=32
    )
    for _ in range(40):
        est.observe(*pairs())
    probe = pairs()
    before = est.evaluate(*probe)
    rounds, kept = est.updates, [p.clone() for p in est.selected.parameters()]
    assert before.matched > 0.5 and not est.null_selected
    with torch.no_grad():  # the training iterate goes non-finite
        next(est.critic.parameters()).fill_(math.nan)
    est.observe(*pairs())
    assert est.resets == 1 and est.updates == rounds
    assert all(torch.equal(a, b) for a, b in zip(est.selected.parameters(), kept, strict=True))
    after = est.evaluate(*probe)  # the same critic reports, on the same pairs
    assert after is not None and after.matched == before.matched
    assert all(torch.isfinite(p).all() for p in est.critic.parameters())  # a fresh iterate


def test_mines_interval_is_a_bootstrap_of_its_figures_own_baseline_form():
    """MINE's held-out figure is in the baseline (TUBA) form with the validation pairs' ``c``;
    its percentile interval must resample that figure, not DV's (computed in DV form it
    moved the interval 0.01-0.03 nats off the figure it brackets, and no test saw it).
    Brute force per resample: a resample with multiplicities w has joint term
    sum_i w_i T_ii / n and marginal mean sum_{i != j} w_i w_j e^T_ij / (n^2 - sum_i w_i^2)."""
    from opacus_mi.estimators.bounds import (
        baseline_bound,
        bootstrap_counts,
        percentile_tensor,
        random_cycle,
    )
    from opacus_mi.estimators.online import held_out_figures

    n, draws, c = 64, 200, 0.4
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(n, n, dtype=torch.float64, generator=gen) * 0.5
    scores += torch.eye(n, dtype=torch.float64) * 1.5
    replay = torch.Generator().set_state(gen.get_state())
    got = held_out_figures("mine", scores, gen, draws, baseline=c)
    random_cycle(n, replay)  # (the mismatched figure's draw comes first)
    counts = bootstrap_counts(n, draws, replay)
    off = ~torch.eye(n, dtype=torch.bool)
    values = []
    for w in counts:
        joint = float((w * scores.diagonal()).sum()) / n
        pair_w = (w[:, None] * w[None, :])[off]
        marginal = float((pair_w * scores[off].exp()).sum()) / (n * n - float((w * w).sum()))
        values.append(joint - (c - 1) - marginal / math.exp(c))
    want = percentile_tensor(torch.tensor(values, dtype=torch.float64))
    assert float(got[0]) == pytest.approx(float(baseline_bound(scores, c)), rel=1e-12)
    assert float(got[2]) <= float(got[0]) <= float(got[3])
    torch.testing.assert_close(got[2:], want, rtol=1e-9, atol=1e-12)


def test_the_constant_critic_reports_unless_the_learned_one_validates_two_se_above_zero():
    """A critic fitted to noise can edge past 0 on the validation pairs by chance and score
    far below 0 on the next batch: the constant critic (bound 0) reports unless the selected
    critic validates more than NULL_MARGIN_SE = 2 standard errors above it. Each case from a
    round's validation figures ``[new, se, c, previous, se, c]`` (no test set one inside the
    margin: ``best <= 0`` passed them all)."""
    from opacus_mi.estimators.online import NULL_MARGIN_SE

    g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    est = OnlineEstimator("mine", train_every=1, generator=g)
    for _ in range(10):
        est.observe(*_rho_pairs(64, data))
    assert NULL_MARGIN_SE == 2.0
    for new, se, null in [(0.15, 0.1, True), (0.25, 0.1, False), (-0.1, 0.1, True)]:
        est._select([1.0, 0.3, new, se, 0.2, -5.0, 0.1, 0.2], validate=True, created=False)
        assert est.null_selected is null, (new, se)
        figure = est.evaluate(*_rho_pairs(64, data))
        assert (figure.matched == 0.0) is null, (new, se, figure.matched)


@pytest.mark.parametrize("kind", ["mine", "nwj", "smile"])
def test_e_t_intervals_are_made_exactly_where_the_pair_rules_allow(kind):
    """An interval of an e^T figure needs MIN_CI_PAIRS_EXP (32) pairs, PAIRS_PER_NAT (8) per nat
    the figure reads, and a figure at most ln n + 2. Each rule is probed alone at its edge:
    adding a to every matched score moves each bound by exactly a, so the figure is set at will.
    Reference: the three rules written out here, and the interval bracketing its figure."""
    from opacus_mi.estimators.online import held_out_figures, interval_withheld

    gen = torch.Generator().manual_seed(0)
    cases = [  # (n, figure, withheld): which rule decides
        (31, 1.0, True),  # too few pairs
        (32, 1.0, False),  # just enough
        (32, 3.9, False),  # 31.2 < 32 pairs per nat
        (32, 4.1, True),  # 32.8 > 32, though below ln 32 + 2 = 5.47
        (64, 5.9, False),  # 47 pairs per nat needed, below ln 64 + 2 = 6.16
        (64, 6.3, True),  # above ln 64 + 2, though 50 < 64 pairs per nat
    ]
    for n, target, withheld in cases:
        assert withheld == (n < 32 or 8 * target > n or target > math.log(n) + 2)
        scores = 0.3 * torch.randn(n, n, dtype=torch.float64, generator=gen)
        scores.diagonal().zero_()
        scores.diagonal().add_(target - float(bound(kind, scores)))
        f = held_out_figures(kind, scores, gen, 100)
        assert float(f[0]) == pytest.approx(target, abs=1e-9)
        assert bool(interval_withheld(kind, n, target)) is withheld
        assert bool(f[2:].isnan().all()) is withheld, (n, target)
        if not withheld:
            assert float(f[2]) <= target <= float(f[3])


def test_a_window_samples_its_own_pairs_whole_and_distinct():
    """A minibatch is drawn from the window's pairs: each drawn (x, y) is one of its rows with
    its own partner, read back as the window reads it (offsets added back on both sides), no
    row twice, and all of them when more are asked for. Reference: a search of the rows."""
    g = torch.Generator().manual_seed(8)
    win = PairWindow(40)  # bfloat16 rows less column means: the offsets are far from 0
    for n in (17, 19, 23):  # wraps the ring
        win.add(torch.randn(n, 3, generator=g) + 100.0, torch.randn(n, 2, generator=g) - 50.0)
    rows = torch.cat([win.x, win.y], 1)
    for ask in (12, 100):
        x, y = win.sample(ask, torch.Generator().manual_seed(ask))
        assert x.shape == (min(ask, len(win)), 3) and y.shape == (min(ask, len(win)), 2)
        where = []
        for pair in torch.cat([x, y], 1):
            (hit,) = [i for i in range(len(rows)) if torch.equal(rows[i], pair)]
            where.append(hit)
        assert len(set(where)) == len(where)


def _ids(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(start, start + n, dtype=torch.float32)[:, None]
    return torch.cat([ids, torch.randn(n, 2)], 1), torch.cat([ids, torch.randn(n, 2)], 1)


def test_a_batch_of_holdout_pairs_is_split_and_every_holdout_th_smaller_one_validates():
    """A batch of exactly ``holdout`` pairs is split like any larger one (its first pair
    validates); of the batches smaller than that, the holdout-th, 2 holdout-th, ... go to
    validation whole. Reference: the pairs' ids, listed by hand."""
    est = OnlineEstimator("mine", holdout=4, train_every=1, generator=torch.Generator())
    est.pairs.dtype = est.val.dtype = torch.float32  # ids stored exactly
    for b in range(5):
        est.observe(*_ids(4 * b, 4))
    assert sorted(est.val.x[:, 0].tolist()) == [0.0, 4.0, 8.0, 12.0, 16.0]
    assert len(est.pairs) == 15
    small = OnlineEstimator("mine", holdout=4, train_every=1, generator=torch.Generator())
    small.pairs.dtype = small.val.dtype = torch.float32
    for b in range(9):
        small.observe(*_ids(3 * b, 3))
    # batches 4 and 8 (counted from 1): ids 9-11 and 21-23
    assert sorted(small.val.x[:, 0].tolist()) == [9.0, 10.0, 11.0, 21.0, 22.0, 23.0]


@pytest.mark.parametrize("n", [3, 4])
def test_a_window_of_four_pairs_is_worth_a_round_and_gets_one(n):
    """A round runs once the window holds 4 pairs, as ``worth_training`` (the overhead budget's
    test) says: the two rules agree at the edge."""
    est = OnlineEstimator("mine", holdout=0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    est.observe(x, x + 0.1)
    assert est.worth_training is (n >= 4)
    assert est.updates == (1 if n >= 4 else 0)


def test_validation_selects_from_64_pairs_and_the_constant_critic_reports_before():
    """Until MIN_VALIDATION (64) validation pairs exist the constant critic reports, 0 [0, 0]
    exactly; the round at which there are 64 validates (MINE's c is then the selected critic's
    log mean e^T over the validation pairs' marginal pairs). Reference: c recomputed from the
    critic's scores by NumPy."""
    from opacus_mi.estimators.online import MIN_VALIDATION

    g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    est = OnlineEstimator("mine", train_every=1, generator=g)
    for _ in range(3):  # 3 x 16 = 48 validation pairs
        est.observe(*_rho_pairs(64, data))
        assert est.ready and est.null_selected and est.baseline is None
        got = est.evaluate(*_rho_pairs(64, data))
        assert (got.matched, got.mismatched, got.ci_low, got.ci_high) == (0.0, 0.0, 0.0, 0.0)
    est.observe(*_rho_pairs(64, data))
    assert len(est.val) == MIN_VALIDATION and est.baseline is not None
    est.selected.eval()
    with torch.no_grad():
        s = est.selected.scores(est.val.x, est.val.y).double().numpy()
    off = ~np.eye(len(s), dtype=bool)
    assert est.baseline == pytest.approx(math.log(float(np.exp(s[off]).mean())), rel=1e-5)


@pytest.mark.parametrize("kind", ["mine", "infonce"])
def test_validation_figures_against_brute_force(kind):
    """``[bound, se, c]`` on the validation pairs: the bound of the critic's scores, the
    standard error of the mean of the per-pair matched terms (InfoNCE's: T_ii less the log of
    its row's sum of e^T, over the candidates y_j of x_i), and MINE's c. Reference: loops."""
    g, data = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    est = OnlineEstimator(kind, train_every=1, generator=g)
    for _ in range(5):
        est.observe(*_rho_pairs(64, data, rho=0.8))
    critic = est.critic
    got = est._validation_bound(critic)
    critic.eval()
    with torch.no_grad():
        s = critic.scores(est.val.x, est.val.y).double()
    n = len(s)
    if kind == "infonce":
        terms = [
            float(s[i, i]) - math.log(sum(math.exp(float(s[i, j])) for j in range(n)))
            for i in range(n)
        ]
        value, c = sum(terms) / n + math.log(n), math.nan
    else:
        terms = [float(s[i, i]) for i in range(n)]
        marg = [math.exp(float(s[i, j])) for i in range(n) for j in range(n) if i != j]
        c = math.log(sum(marg) / len(marg))
        value = sum(terms) / n - c
    mean = sum(terms) / n
    se = math.sqrt(sum((t - mean) ** 2 for t in terms) / (n - 1) / n)
    assert float(got[0]) == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert float(got[1]) == pytest.approx(se, rel=1e-5)
    if kind == "mine":
        assert float(got[2]) == pytest.approx(c, rel=1e-5, abs=1e-6)
    else:
        assert math.isnan(float(got[2]))


def test_a_diverged_first_round_leaves_no_reporting_critic_behind():
    """The reporting critic is copied from the iterate at the first round; when that round
    diverges the copy (of a non-finite critic) must go with it, else later rounds compare
    against a NaN figure, never replace it and report NaN."""
    g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    est = OnlineEstimator("mine", train_every=1, generator=g, hidden=32)
    est._build(2, 2)
    with torch.no_grad():
        next(est.critic.parameters()).fill_(math.nan)
    assert est.observe(*_rho_pairs(64, data))  # diverged, reset
    assert est.resets == 1 and est.selected is None and not est.ready
    for _ in range(12):
        est.observe(*_rho_pairs(64, data))
    assert all(torch.isfinite(p).all() for p in est.selected.parameters())
    figure = est.evaluate(*_rho_pairs(64, data))
    assert math.isfinite(figure.matched) and math.isfinite(figure.mismatched)


def test_a_round_standardises_with_the_windows_own_moments():
    """Each round sets the critic's scaler from the window's running moments: the mean and
    (population) std of the pairs it holds, the std floored at 1e-3 of the largest. Reference:
    torch.mean and torch.std over the window's rows, for tokens far from 0 mean and unit
    scale (where no scaler and a stale one both differ from it)."""
    g = torch.Generator().manual_seed(4)
    est = OnlineEstimator("mine", holdout=0, train_every=1, generator=torch.Generator())
    for _ in range(3):
        x = torch.randn(32, 3, generator=g) * torch.tensor([1e-3, 1.0, 50.0]) + 7.0
        est.observe(x, torch.randn(32, 2, generator=g) * 1e-4 - 2.0)
    for side, rows in (("x", est.pairs.x), ("y", est.pairs.y)):
        mean = rows.double().mean(0)
        std = rows.double().var(0, unbiased=False).sqrt()
        want = std + 1e-3 * std.max()
        torch.testing.assert_close(
            getattr(est.critic, f"{side}_mean").double(), mean, rtol=1e-6, atol=0
        )
        torch.testing.assert_close(
            getattr(est.critic, f"{side}_std").double(), want, rtol=1e-3, atol=0
        )


def test_train_returns_the_last_minibatchs_training_bound():
    """``train`` returns the bound on the round's last minibatch (for InfoNCE, its own bound):
    with one step per round, that of the critic as it was, on the minibatch the round draws.
    Reference: the same draw, replayed from a copy of the generator and the critic."""
    import copy

    g, data = torch.Generator().manual_seed(6), torch.Generator().manual_seed(7)
    est = OnlineEstimator("infonce", train_every=1, train_iters=1, batch_size=32, generator=g)
    for _ in range(10):
        est.observe(*_rho_pairs(64, data))
    critic = copy.deepcopy(est.critic)
    critic.set_scaler(*est.pairs.moments())
    replay = torch.Generator().set_state(g.get_state())
    with torch.no_grad():
        want = float(bound("infonce", critic.scores(*est.pairs.sample(32, replay))))
    got = est.train()
    assert want > 0.5
    assert got == pytest.approx(want, rel=1e-5)


def test_evaluate_gives_none_before_a_round_and_for_a_single_pair():
    """No figure before the critic has trained (a freshly initialised critic's would read
    as a measurement) nor from one pair (no re-pairing of it)."""
    g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    est = OnlineEstimator("infonce", warmup=0, train_every=100, holdout=0, generator=g)
    est.observe(*_rho_pairs(64, data))
    assert est.critic is not None and est.updates == 0
    assert est.evaluate(*_rho_pairs(64, data)) is None
    est.train()
    assert est.evaluate(*_rho_pairs(64, data)) is not None
    assert est.evaluate(*_rho_pairs(1, data)) is None


def test_a_state_round_trip_keeps_the_small_batch_count_and_the_selection_tally():
    """A resumed estimator goes on sending every holdout-th small batch to validation as one
    never stopped would (the count of small batches is part of its state), and keeps its
    count of rounds that kept the earlier critic. Reference: an uninterrupted run."""
    g, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    batches = [_rho_pairs(3, data) for _ in range(12)]
    run = OnlineEstimator("mine", train_every=1, generator=g)
    for x, y in batches[:6]:
        run.observe(x, y)
    run.kept_previous = 3  # (a tally a round would have kept)
    resumed = OnlineEstimator("mine", train_every=1, generator=torch.Generator())
    resumed.load_state_dict(run.state_dict())
    assert resumed.kept_previous == 3
    for x, y in batches[6:]:
        run.observe(x, y)
        resumed.observe(x, y)
    assert len(run.val) == 9 and torch.equal(resumed.val.x, run.val.x)


def test_a_batch_estimates_difference_and_a_constant_critics_exact_interval():
    """``difference`` is matched less mismatched. A record withholds only InfoNCE's interval
    near ln n: an e^T figure's interval is withheld (or not) where it is made, and the
    constant critic's 0 [0, 0] is exact at any batch size, 8 pairs included."""
    from opacus_mi.estimators.online import BatchEstimate

    v = BatchEstimate.of([0.75, 0.25, 0.5, 1.0], 8)
    assert v.difference == 0.5
    assert v.shown("mine") == v and v.shown("nwj") == v
    assert math.isnan(BatchEstimate.of([2.0, 0.0, 1.5, 2.5], 4).shown("infonce").ci_low)
    g = torch.Generator().manual_seed(5)
    est = OnlineEstimator("mine", train_every=1, generator=torch.Generator())
    for _ in range(20):
        est.observe(torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g))
    assert est.null_selected
    got = est.evaluate(torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g))
    assert (got.matched, got.ci_low, got.ci_high) == (0.0, 0.0, 0.0)
