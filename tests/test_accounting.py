"""MI accountant and epsilon tracking against independent computations."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from opacus_mi import MIAccountant, gaussian_channel_bound, mi_upper_bound, pure_dp_mi_bound
from opacus_mi.accounting import (
    PRV_FIXED_POINTS,
    EpsilonTracker,
    _LazyRdp,
    _RdpSum,
    history_continues,
    once_per_epoch_bound,
    sample_rate_of,
    step_kl,
    steps_counted,
)


def _kl_trapezoid(s: float, q: float) -> float:
    """Reference: KL(P || Q) = int p log(p/q) on a fine grid, written independently."""
    x = np.linspace(-12 * s - 1, 12 * s + 2, 400_001)
    norm = lambda mu: np.exp(-((x - mu) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi))  # noqa: E731
    p = (1 - q) * norm(0.0) + q * norm(1.0)
    qd = norm(0.0)
    integrand = np.where(p > 0, p * (np.log(p) - np.log(qd)), 0.0)
    return float(np.trapezoid(integrand, x))


def _kl_monte_carlo(s: float, q: float, n: int = 2_000_000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, s, n) + (rng.random(n) < q)
    lr = np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * s * s))
    return float(lr.mean()), float(lr.std() / math.sqrt(n))


@pytest.mark.parametrize("s,q", [(1.0, 0.005), (1.0, 0.1), (0.5, 0.05), (2.0, 0.3), (0.8, 0.9)])
def test_step_kl_matches_quadrature_and_monte_carlo(s, q):
    got = step_kl(s, q)
    assert got == pytest.approx(_kl_trapezoid(s, q), rel=1e-4, abs=1e-9)
    mc, se = _kl_monte_carlo(s, q)
    assert abs(got - mc) <= 5 * se + 1e-7


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda: mi_upper_bound(1.0, 0.05, 2.5), "steps must be an integer"),
        (lambda: mi_upper_bound(1.0, 0.05, -1), "steps must be an integer >= 0"),
        (lambda: mi_upper_bound(1.0, 1.5, 10), "sample_rate must be in"),
        (lambda: gaussian_channel_bound(-1.0), "noise_multiplier must be >= 0"),
        (lambda: gaussian_channel_bound(float("nan")), "noise_multiplier must be >= 0"),
        (lambda: gaussian_channel_bound(1.0, dim=0), "dim must be a positive integer"),
        (lambda: pure_dp_mi_bound(-1.0), "epsilon must be >= 0"),
        # each of these gave a figure: 0.0, 0.0, a bound for sigma = 1, and NaN
        (lambda: mi_upper_bound(float("nan"), 0.05, 10), "noise_multiplier must be >= 0"),
        (lambda: mi_upper_bound(1.0, float("nan"), 10), "sample_rate must be in"),
        (lambda: mi_upper_bound(True, 0.05, 10), "noise_multiplier must be a number"),
        (lambda: pure_dp_mi_bound(float("nan")), "epsilon must be >= 0"),
    ],
)
def test_bounds_refuse_what_has_no_meaning(call, says):
    """A negative sigma used to give an infinite channel bound and 2.5 steps a figure."""
    with pytest.raises(ValueError, match=says):
        call()


def test_the_bound_leaves_the_warnings_a_loop_has_shown_alone():
    """Each new sigma's KL integral ran inside warnings.catch_warnings(), which resets which
    warnings have been shown: a loop's own "once per location" warning (Opacus's, say) came
    back at every step whose noise had changed."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for i in range(5):
            warnings.warn("a loop's warning", UserWarning, stacklevel=1)
            step_kl(0.5 + 0.1 * i, 0.05)
            step_kl(2.0, 1e-7)  # (where quad cannot reach its tolerance: said before, not now)
    assert [str(w.message) for w in seen] == ["a loop's warning"]


def test_step_kl_limits():
    assert step_kl(1.7, 1.0) == pytest.approx(1 / (2 * 1.7**2))
    assert step_kl(1.0, 0.0) == 0.0
    assert step_kl(0.0, 0.01) == math.inf  # no noise: no finite bound
    assert mi_upper_bound(0.0, 0.01, 10) == math.inf
    assert step_kl(math.inf, 0.3) == 0.0  # infinite noise releases nothing (no quadrature)
    assert mi_upper_bound(np.float32(1.5), np.float64(0.3), 4) == 4 * step_kl(1.5, 0.3)
    assert mi_upper_bound(1.5, 0.3, np.int64(4)) == 4 * step_kl(1.5, 0.3)  # NumPy steps too
    assert gaussian_channel_bound(2.0, np.int64(3)) == gaussian_channel_bound(2.0, 3)
    # small q: chi-square approximation (q^2 / 2)(e^{1/s^2} - 1)
    s, q = 1.5, 1e-3
    assert step_kl(s, q) == pytest.approx(q * q / 2 * math.expm1(1 / s**2), rel=0.01)
    # KL of the mixture never exceeds the q = 1 Gaussian shift (convexity)
    for q in (0.01, 0.3, 0.99):
        assert step_kl(0.7, q) <= 1 / (2 * 0.7**2)
    with pytest.raises(ValueError, match="sample_rate"):
        step_kl(1.0, 1.5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        step_kl(-1.0, 0.5)


def test_mi_upper_bound_composes_over_steps_and_follows_changing_history():
    assert mi_upper_bound(1.0, 0.01, 500) == pytest.approx(500 * step_kl(1.0, 0.01))
    acc = RDPAccountant()
    for _ in range(30):
        acc.step(noise_multiplier=1.0, sample_rate=0.02)
    for _ in range(20):
        acc.step(noise_multiplier=2.0, sample_rate=0.05)
    expected = 30 * _kl_trapezoid(1.0, 0.02) + 20 * _kl_trapezoid(2.0, 0.05)
    assert MIAccountant(acc).bound() == pytest.approx(expected, rel=1e-4)
    standalone = MIAccountant()
    for _ in range(3):
        standalone.step(noise_multiplier=1.0, sample_rate=0.02)
    assert standalone.history == [(1.0, 0.02, 3)]
    assert standalone.bound() == pytest.approx(3 * step_kl(1.0, 0.02))
    # A step whose sample rate alone changes (a larger batch after a warm-up) starts an entry,
    # as Opacus's own history does (a mutation audit found merging on the noise alone passed).
    opacus = RDPAccountant()
    for sigma, q in [(1.0, 0.02), (1.0, 0.05), (1.0, 0.05), (2.0, 0.05)]:
        standalone.step(noise_multiplier=sigma, sample_rate=q)
        opacus.step(noise_multiplier=sigma, sample_rate=q)
    assert opacus.history == [(1.0, 0.02, 1), (1.0, 0.05, 2), (2.0, 0.05, 1)]
    assert standalone.history == [(1.0, 0.02, 4), *opacus.history[1:]]
    assert standalone.bound() == pytest.approx(
        4 * step_kl(1.0, 0.02) + 2 * step_kl(1.0, 0.05) + step_kl(2.0, 0.05)
    )


def _shuffled_epoch_mi(s: float, steps: int, directions: int = 20_000, n: int = 400):
    """Reference: I(Z; one epoch's releases) when each example is in one of ``steps`` fixed
    batches (a shuffle, as Opacus's ``poisson_sampling=False``), by Monte Carlo of the exact
    posterior. The example's clipped gradient is ``e_Z`` (Z uniform on orthonormal directions,
    norm C = 1), the others' are 0, and each step adds N(0, s^2 I)."""
    rng = np.random.default_rng(0)
    y = rng.normal(0.0, s, size=(n, steps, directions))
    y[:, 0, 0] += 1.0  # by symmetry: its batch is the first, its direction the first
    logits = y / (s * s)
    logits -= logits.max(axis=(1, 2), keepdims=True)
    post = np.exp(logits)
    post /= post.sum(axis=(1, 2), keepdims=True)
    pz = post.sum(axis=1)  # posterior on Z, the batch summed out
    h = -(pz * np.log(np.clip(pz, 1e-300, None))).sum(axis=1)
    return math.log(directions) - h.mean(), h.std() / math.sqrt(n)


def test_shuffled_batches_need_the_once_per_epoch_bound():
    """With fixed batches that hold each example once per epoch, Poisson's subsampled KL at
    q = 1/K is no bound: one epoch of two steps at s = 0.3 leaks ~4.75 nats, above its 4.41.
    One release per epoch, 1/(2 s^2) = 5.56, holds."""
    s, k = 0.3, 2
    truth, se = _shuffled_epoch_mi(s, k)
    assert truth - 4 * se > mi_upper_bound(s, 1 / k, k)  # Poisson's bound: broken
    bound = mi_upper_bound(s, 1 / k, k, poisson_sampling=False)
    assert bound == 1 / (2 * s * s) and truth + 4 * se < bound
    acc = MIAccountant(poisson_sampling=False)
    for _ in range(k):
        acc.step(noise_multiplier=s, sample_rate=1 / k)
    assert acc.bound() == bound


def _per_step_epochs(history) -> float:
    """Reference for once_per_epoch_bound: the history expanded step by step, cut into epochs
    of 1/q steps (a new rate starts a new epoch), each counting its largest 1/(2 s^2)."""
    total, epoch, worst, length = 0.0, 0, 0.0, None
    for noise, rate, steps in history:
        k = round(1 / rate)
        for _ in range(steps):
            if k != length or epoch == k:
                total, epoch, worst, length = total + worst, 0, 0.0, k
            epoch, worst = epoch + 1, max(worst, 1 / (2 * noise * noise))
    return total + worst


@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 1 / 4, 10)],  # 2 epochs and a half: 3 releases
        [(1.0, 1 / 4, 8)],
        [(1.0, 1 / 3, 2), (0.5, 1 / 3, 5), (2.0, 1 / 3, 4)],  # a schedule, changing mid-epoch
        [(1.0, 1 / 5, 3), (1.0, 1 / 2, 3), (0.7, 1 / 5, 12)],  # rates changing
        [(0.9, 1 / 7, 100), (1.1, 1 / 7, 1)],
        # 1/(1/93) is 92.99999999999999: epochs of 93 steps all the same (2 releases, not 3)
        [(1.0, 1 / 93, 186)],
    ],
)
def test_once_per_epoch_bound_against_a_step_by_step_count(history):
    assert once_per_epoch_bound(history) == pytest.approx(_per_step_epochs(history), rel=1e-12)
    steps = sum(h[2] for h in history)
    if len(history) == 1:  # closed form: ceil(T q) releases
        noise, rate, _ = history[0]
        assert mi_upper_bound(noise, rate, steps, poisson_sampling=False) == pytest.approx(
            math.ceil(steps * rate) / (2 * noise * noise)
        )


def test_bad_step_settings_are_refused_where_they_are_given():
    """A bad sigma or rate returned 0 at steps = 0, and MIAccountant.step took them, to fail
    at a later bound() that did not point at the call."""
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        mi_upper_bound(-1.0, 0.5, 0)
    with pytest.raises(ValueError, match="sample_rate must be in"):
        MIAccountant().step(noise_multiplier=1.0, sample_rate=2.0)
    with pytest.raises(ValueError, match="poisson_sampling must be True or False"):
        MIAccountant(poisson_sampling="no")
    # mi_upper_bound went by truthiness: "False" gave the Poisson bound (1.326, not valid for
    # the once-per-epoch sampling asked for: 2.0), None the other
    for wrong in ("False", None, 1):
        with pytest.raises(ValueError, match="poisson_sampling must be True or False"):
            mi_upper_bound(0.5, 0.5, 2, poisson_sampling=wrong)
    import numpy as np

    for flag in (False, True):
        assert mi_upper_bound(0.5, 0.5, 2, poisson_sampling=np.bool_(flag)) == mi_upper_bound(
            0.5, 0.5, 2, poisson_sampling=flag
        )
        assert MIAccountant(poisson_sampling=np.bool_(flag)).poisson_sampling is flag
    # An engine (or a name) for its accountant, and step() beside an accountant, were taken
    # and then ignored: the bound read 0 after 100 steps
    from opacus import PrivacyEngine

    for wrong in (PrivacyEngine(), "rdp"):
        with pytest.raises(ValueError, match="engine.accountant, not the engine"):
            MIAccountant(wrong)
    with pytest.raises(ValueError, match="step the accountant, or make it with accountant=None"):
        MIAccountant(RDPAccountant()).step(noise_multiplier=1.0, sample_rate=0.1)


@pytest.mark.parametrize("poisson", [True, False])
def test_a_history_given_to_bound_is_checked_entry_by_entry(poisson):
    """``bound(history=...)`` checked each entry's sigma and rate but not its steps: -5 steps
    gave a negative "upper bound" (Poisson) or 0, 2.5 steps a figure (truncated to 2 without
    Poisson), a 0-step sigma-0 entry NaN (0 x inf), a short entry an IndexError."""
    acc = MIAccountant(poisson_sampling=poisson)
    for history, says in (
        ([(1.0, 0.1, -5)], r"history entry \(1.0, 0.1, -5\): steps must be an integer >= 0"),
        ([(1.0, 0.1, 2.5)], "steps must be an integer >= 0"),
        ([(1.0, 0.1, True)], "steps must be a number"),
        ([(1.0, 0.1)], r"entries must be \(noise_multiplier, sample_rate, steps\)"),
        ([5], "history must be a sequence of"),
        ([(1.0, 2.0, 3)], "sample_rate must be in"),
    ):
        with pytest.raises(ValueError, match=says):
            acc.bound(history)
    # A sigma-0 entry of no steps releases nothing: the bound of the others alone.
    good = [(1.0, 0.25, 8)]
    assert (
        acc.bound([*good, (0.0, 0.25, 0)])
        == acc.bound(good)
        == mi_upper_bound(1.0, 0.25, 8, poisson_sampling=poisson)
    )
    # (a NumPy count is the count it holds; a tensor sigma, which Opacus keeps in its history
    # where the optimizer's noise_multiplier was set as one, the number it holds)
    assert acc.bound([(1.0, 0.25, np.int64(8))]) == acc.bound(good)
    assert acc.bound([(torch.tensor(1.0), 0.25, 8)]) == acc.bound(good)
    assert acc.bound([(np.float32(1.0), np.float64(0.25), 8.0)]) == acc.bound(good)
    with pytest.raises(ValueError, match="noise_multiplier must be a number"):
        acc.bound([(torch.ones(2), 0.25, 8)])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (Opacus's RDP of a tensor sigma)
@pytest.mark.parametrize("poisson", [True, False])
def test_a_tensor_noise_multiplier_is_recorded_as_before(poisson):
    """Opacus takes ``optimizer.noise_multiplier = torch.tensor(1.0)`` and keeps the tensor in
    its accountant's history: checking each entry as a plain number lost every record of such
    a run ("leakage record failed: noise_multiplier must be a number")."""
    from conftest import make_private, train

    from opacus_mi import LeakageMonitor

    engine, model, opt, loader = make_private(poisson=poisson)
    opt.noise_multiplier = torch.tensor(1.0)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, estimator=None)
    train(model, opt, loader, epochs=2)
    monitor.flush()
    assert len(monitor.history) == 2 * len(loader)
    steps = 2 * len(loader)
    want = mi_upper_bound(1.0, engine.accountant.history[-1][1], steps, poisson_sampling=poisson)
    assert monitor.history[-1].mi_upper_bound == pytest.approx(want, rel=1e-12)


def test_a_subnormal_sample_rate_gives_a_bound_without_poisson_sampling():
    """1/1e-310 is inf: floor() of it raised OverflowError. One release at most: 1/(2 sigma^2)."""
    assert mi_upper_bound(1.0, 1e-310, 3, poisson_sampling=False) == 0.5
    acc = MIAccountant(poisson_sampling=False)
    acc.step(noise_multiplier=2.0, sample_rate=1e-310)
    assert acc.bound() == gaussian_channel_bound(2.0)


def test_steps_that_release_nothing_bound_nothing_whatever_the_noise():
    """No steps, or steps that sample no one (q = 0), release nothing about the example: a
    bound of 0 under either sampling, sigma = 0 included (whose per-step KL is inf: 0 x inf
    was NaN). Without Poisson sampling a rate of 0 was a ZeroDivisionError; between two
    epochs it changes nothing. Reference: I(example; nothing) = 0; an epoch of two steps at
    q = 1/2 releases once, 1/(2 sigma^2)."""
    for poisson in (True, False):
        assert mi_upper_bound(0.0, 0.5, 0, poisson_sampling=poisson) == 0.0
        assert mi_upper_bound(1.0, 0.0, 5, poisson_sampling=poisson) == 0.0
        assert mi_upper_bound(0.0, 0.0, 5, poisson_sampling=poisson) == 0.0
        acc = MIAccountant(poisson_sampling=poisson)
        acc.step(noise_multiplier=1.0, sample_rate=0.0)
        assert acc.bound() == 0.0
    assert once_per_epoch_bound([(1.0, 0.5, 2), (1.0, 0.0, 3), (1.0, 0.5, 2)]) == 2 * 0.5


def test_pure_dp_and_gaussian_channel_bounds():
    assert pure_dp_mi_bound(0.5) == 0.125 and pure_dp_mi_bound(3.0) == 3.0
    assert gaussian_channel_bound(1.0, dim=4) == pytest.approx(2 * math.log(1.25))
    # the k-dim channel bound increases with k towards 1/(2 sigma^2)
    vals = [gaussian_channel_bound(0.8, dim=k) for k in (1, 10, 1000)]
    assert vals == sorted(vals) and vals[-1] < gaussian_channel_bound(0.8)


@pytest.mark.parametrize(
    "call",
    [
        lambda v: pure_dp_mi_bound(v),
        lambda v: gaussian_channel_bound(v),
        lambda v: MIAccountant().step(noise_multiplier=v, sample_rate=0.1),
        lambda v: MIAccountant().step(noise_multiplier=1.0, sample_rate=v),
        lambda v: mi_upper_bound(v, 0.1, 3),
    ],
)
@pytest.mark.parametrize("bad", [True, False, "1", None])
def test_every_bound_names_an_argument_that_is_no_number(call, bad):
    """True was taken as 1 (pure_dp_mi_bound(False) returned False), "1" failed in a
    comparison that named nothing."""
    with pytest.raises(ValueError, match=r"(epsilon|noise_multiplier|sample_rate) must be a num"):
        call(bad)


def test_bounds_at_noise_so_small_or_large_that_its_square_leaves_the_floats():
    """sigma = 1e-156 gave a bound of 0 (its integrand NaN, max(0, NaN) = 0), 1e-170 a
    ZeroDivisionError and 1e155 an OverflowError. The limits are inf and 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (scipy's quad on a NaN integrand)
        assert mi_upper_bound(1e-156, 0.5, 1) == math.inf
    assert mi_upper_bound(1e-170, 0.5, 1) == math.inf == gaussian_channel_bound(1e-170)
    assert gaussian_channel_bound(1e-170, dim=5) == math.inf
    assert gaussian_channel_bound(1e155) == 0.0 == gaussian_channel_bound(1e155, dim=5)
    assert mi_upper_bound(1e155, 0.1, 5, poisson_sampling=False) == 0.0
    assert isinstance(pure_dp_mi_bound(2), float)


def test_epsilon_tracker_equals_opacus_with_changing_noise():
    acc = RDPAccountant()
    tracker = EpsilonTracker(acc, 1e-5)
    for step in range(60):
        acc.step(noise_multiplier=1.0 if step < 30 else 1.3, sample_rate=0.03)
        if step % 7 == 0:
            assert tracker.epsilon() == acc.get_epsilon(1e-5)
    assert tracker.epsilon() == acc.get_epsilon(1e-5)


def test_epsilon_tracker_is_opacus_bit_for_bit_across_histories():
    """Orders proven irrelevant are never evaluated, yet every epsilon equals Opacus's own:
    random noise / sample-rate / step histories, including the closed-form corners."""
    rng = random.Random(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's "optimal order is the smallest alpha"
        for _ in range(25):
            acc, delta = RDPAccountant(), rng.choice([1e-3, 1e-5, 1e-7])
            tracker = EpsilonTracker(acc, delta)
            for _segment in range(rng.randint(1, 3)):
                sigma = rng.choice([0.0, 0.4, 0.8, 1.0, 1.7, 4.0])
                q = rng.choice([0.0, 1e-3, 0.0356, 0.2, 1.0])
                steps = rng.choice([1, 40, 500])
                for k in range(steps):
                    acc.step(noise_multiplier=sigma, sample_rate=q)
                    if k % 97 == 0 or k == steps - 1:
                        got, want = tracker.epsilon(), acc.get_epsilon(delta)
                        assert got == want or (math.isnan(got) and math.isnan(want))


@pytest.mark.parametrize(
    "sigma,q,delta", [(1.0, 64 / 1797, 1e-5), (0.6, 0.01, 1e-6), (2.5, 0.2, 1e-3), (4.0, 1.0, 1e-5)]
)
def test_epsilon_tracker_every_step_is_opacus_bit_for_bit_and_mostly_certified(
    sigma, q, delta, monkeypatch
):
    """Step by step over 4,000 steps of one (noise, rate), as a record computes it: every
    epsilon equals Opacus's (its own per-step RDP vector x steps through its own conversion,
    which is what ``get_epsilon`` computes, and ``get_epsilon`` itself at some steps), while
    the vector path runs only where the best order changes."""
    acc = RDPAccountant()
    tracker = EpsilonTracker(acc, delta)
    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    per_step = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    vector_calls = []
    vector = tracker._vector_epsilon
    monkeypatch.setattr(tracker, "_vector_epsilon", lambda h: vector_calls.append(h) or vector(h))
    best_orders = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's "optimal order is the largest alpha"
        for steps in range(1, 4001):
            acc.step(noise_multiplier=sigma, sample_rate=q)
            got = tracker.epsilon()
            want, order = rdp_analysis.get_privacy_spent(
                orders=orders, rdp=per_step * steps, delta=delta
            )
            assert got == want, (steps, got, want)
            best_orders.add(float(order))
            if steps % 997 == 0:
                assert got == acc.get_epsilon(delta)
    # The vector path runs about once per change of the best order (plus the start), not
    # once per step.
    assert len(vector_calls) <= 2 * len(best_orders) + 5 < 4000 // 20


def test_epsilon_tracker_first_epsilon_evaluates_few_orders():
    acc = RDPAccountant()
    tracker = EpsilonTracker(acc, 1e-5)
    acc.step(noise_multiplier=1.0, sample_rate=64 / 1797)
    assert tracker.epsilon() == acc.get_epsilon(1e-5)
    # Opacus's full vector runs its series for all 151 default orders.
    assert tracker.orders_evaluated <= 20 < len(RDPAccountant.DEFAULT_ALPHAS)


def _scheduled_noise(schedule: str, step: int) -> float:
    """A noise scheduler's sigma at ``step``: one accountant entry a step, either a new
    setting each time (Opacus's ExponentialNoise) or a few settings in turn."""
    if schedule == "decay":
        return 1.5 * 0.995**step
    return (1.0, 1.3, 0.8, 1.1)[step % 4]


@pytest.mark.parametrize("schedule", ["decay", "cycle"])
def test_epsilon_tracker_with_a_noise_scheduler_is_opacus_bit_for_bit_through_rollbacks(schedule):
    """One history entry a step, as a noise scheduler makes it, with the history rolled back
    (truncated), two entries swapped and an earlier frozen history asked for: every epsilon
    is Opacus's own composition of its own per-step RDP vectors (``get_epsilon``'s sum and
    conversion; ``get_epsilon`` itself on the short histories)."""
    q, delta = 0.01, 1e-5
    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    per_step: dict[float, np.ndarray] = {}

    def opacus(history) -> float:
        for noise, _, _ in history:
            if noise not in per_step:
                per_step[noise] = rdp_analysis.compute_rdp(
                    q=q, noise_multiplier=noise, steps=1, orders=orders
                )
        rdp = sum([per_step[noise] * steps for noise, _, steps in history])
        return rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]

    acc = RDPAccountant()
    tracker = EpsilonTracker(acc, delta)
    frozen = None
    for step in range(1, 161):
        acc.step(noise_multiplier=_scheduled_noise(schedule, step), sample_rate=q)
        if step % 3 == 0:  # an entry of two steps
            acc.step(noise_multiplier=_scheduled_noise(schedule, step), sample_rate=q)
        assert tracker.epsilon() == opacus(acc.history), step
        if step in (4, 12):
            assert tracker.epsilon() == acc.get_epsilon(delta)
        if step == 50:
            frozen = tracker.history()
        if step in (60, 110, 140):  # a rollback: the latest entries gone
            del acc.history[-(step // 4) :]
            assert tracker.epsilon() == opacus(acc.history), step
        if step == 90:  # an entry in the middle changed
            acc.history[20], acc.history[30] = acc.history[30], acc.history[20]
            assert tracker.epsilon() == opacus(acc.history)
        if step == 120:  # an overlap worker's earlier history, then the current one again
            assert tracker.epsilon(frozen) == opacus(frozen)
    assert len(acc.history) > 60


def test_epsilon_tracker_per_record_work_does_not_grow_with_a_noise_scheduler(monkeypatch):
    """Under a noise scheduler (a new entry a step) a record sums only the entries it has not
    seen and those whose table it has just evaluated further (re-summed from their block's
    start): a record that evaluates one order reads two tables, at 20 entries as at 300. It
    re-summed every entry, 0.7 ms a record at 10 entries, 15 ms at 1,000."""
    reads, series = [], []
    known, compute_rdp = _LazyRdp.known, rdp_analysis.compute_rdp
    monkeypatch.setattr(_LazyRdp, "known", lambda table: reads.append(1) or known(table))
    monkeypatch.setattr(
        rdp_analysis, "compute_rdp", lambda **kw: series.append(1) or compute_rdp(**kw)
    )
    acc = RDPAccountant()
    tracker = EpsilonTracker(acc, 1e-5)
    per_record = []
    for step in range(1, 301):
        acc.step(noise_multiplier=_scheduled_noise("decay", step), sample_rate=0.01)
        reads.clear()
        series.clear()
        tracker.epsilon()
        evaluations = len(series)  # Opacus's series, one order of one table each
        # Tables summed: the new entry's, the one it pushes into the sum kept, and those just
        # evaluated with the rest of their block (Opacus's series for each of those: the part
        # of a record's cost that exactness needs, as the best order moves to a new one).
        assert len(reads) <= 4 + 2 * evaluations + _RdpSum.BLOCK, (step, len(reads))
        per_record.append(len(reads))
    # A typical record reads two or three tables, at 200-300 entries as at 20-100.
    assert np.median(per_record[200:]) <= 3 and np.median(per_record[20:100]) <= 3


def test_a_noise_schedulers_tables_keep_their_caches_only_in_the_open_block():
    """A table a step under a noise scheduler: the sum kept cleared each table's caches and
    then made them again (summing reads them), so every table of the run held four arrays,
    3.8 kB a step (5 kB of RSS a step in a 10k-step run). A closed block's tables let theirs go;
    the open block's keep them, as its newest tables gain orders. Still Opacus's epsilon."""
    acc = RDPAccountant()
    tracker = EpsilonTracker(acc, 1e-5)
    for step in range(1, 301):
        acc.step(noise_multiplier=1.5 * 0.999**step, sample_rate=0.01)
        tracker.epsilon()
    tables = list(tracker._rdp_cache.values())
    assert len(tables) == 300
    cached = [t for t in tables if t._known is not None or t._lower is not None]
    assert len(cached) <= _RdpSum.BLOCK + 1, len(cached)
    per_step = {
        noise: rdp_analysis.compute_rdp(
            q=0.01, noise_multiplier=noise, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
        )
        for noise, _, _ in acc.history
    }
    rdp = sum([per_step[noise] * steps for noise, _, steps in acc.history])
    want = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=1e-5)[
        0
    ]
    assert tracker.epsilon() == want


@pytest.mark.parametrize("sigma,q", [(0.5, 0.01), (1.0, 0.0356), (2.0, 0.3), (0.8, 0.9)])
def test_lazy_rdp_lower_bound_holds_against_every_order(sigma, q):
    """The convexity + monotonicity bound never exceeds Opacus's value at any order, whatever
    subset of orders is known."""
    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    full = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    rng = random.Random(1)
    for size in (1, 2, 3, 6, 12, 40):
        table = _LazyRdp(sigma, q, orders)
        table.fill(sorted(rng.sample(range(len(orders)), size)))
        lower = table.lower()
        assert (lower <= full * (1 + 1e-9) + 1e-15).all()
        assert (lower[table.done] == full[table.done]).all()
        assert (lower > 0).sum() > size  # the bound says something beyond the known orders


def test_prv_epsilon_is_opacus_bit_for_bit_and_its_domain_evaluates_few_rdp_orders(monkeypatch):
    """Opacus's PRV ``get_epsilon`` replicated step for step, its safe domain's two RDP
    epsilons taken from the cached tables: the same float as Opacus over changing histories,
    while Opacus's RDP series runs only for single orders the tables lack (Opacus's own PRV
    runs it for all 151 orders twice per call: most of its cost below ~1,000 steps)."""
    from opacus.accountants import PRVAccountant

    calls = []
    series = rdp_analysis.compute_rdp
    rng = random.Random(1)
    for _ in range(3):
        acc, delta = PRVAccountant(), rng.choice([1e-4, 1e-5, 1e-6])
        tracker = EpsilonTracker(acc, delta)
        acc.step(noise_multiplier=1.0, sample_rate=0.03)
        assert tracker.epsilon() == acc.get_epsilon(delta) and tracker._replica_ok
        for steps in (30, 41, 7):
            for _ in range(steps):
                acc.step(noise_multiplier=1.0, sample_rate=0.03)
            calls.clear()
            with monkeypatch.context() as m:
                m.setattr(
                    rdp_analysis, "compute_rdp", lambda **kw: calls.append(kw) or series(**kw)
                )
                got = tracker.epsilon()
            assert got == acc.get_epsilon(delta)
            assert all(len(c["orders"]) == 1 and c["steps"] == 1 for c in calls)
            assert len(calls) < 40
        # A second setting (its own table, filled as needed).
        sigma, q = rng.choice([0.7, 1.3, 2.0]), rng.choice([0.01, 0.1])
        for _ in range(rng.choice([1, 25])):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert len(acc.history) == 2
        assert tracker.epsilon() == acc.get_epsilon(delta)
        # A frozen history (what an overlap worker is handed) gives the value of its step.
        assert tracker.epsilon(((1.0, 0.03, 5),)) == _prv((1.0, 0.03, 5), delta)


def test_prv_replica_that_disagrees_with_opacus_is_not_used():
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    tracker = EpsilonTracker(acc, 1e-5)
    tracker._replica[PRVAccountant] = lambda history: 123.0  # an Opacus whose PRV changed
    acc.step(noise_multiplier=1.0, sample_rate=0.05)
    assert tracker.epsilon() == acc.get_epsilon(1e-5) and tracker._replica_ok is False
    acc.step(noise_multiplier=1.0, sample_rate=0.05)
    assert tracker.epsilon() == acc.get_epsilon(1e-5)


def test_an_infinite_prv_epsilon_stays_infinite_without_recomputing_it(monkeypatch):
    """At sigma 0.01 Opacus's PRV gave inf from the second step, and each longer history was
    computed again: at 23 steps the monitor's summary() used 16 GB and never returned. Epsilon
    never falls as steps are added, so a history extending one whose epsilon was inf is inf;
    and a history whose discretisation would exceed PRV_MAX_POINTS (minutes and gigabytes a
    call; 391 million points there) gets Opacus's RDP epsilon instead, without a PRV call."""
    from opacus.accountants import PRVAccountant

    from opacus_mi.accounting import PRV_MAX_POINTS, _extends

    calls = []

    def opacus_or_replica(history):
        calls.append(history)
        return math.inf if history[-1][2] >= 2 else 706.6

    acc = PRVAccountant()
    tracker = EpsilonTracker(acc, 1e-5)
    monkeypatch.setattr(tracker, "_replica_ok", True)
    tracker._replica[PRVAccountant] = opacus_or_replica
    for steps, want in ((1, 706.6), (2, math.inf), (3, math.inf), (23, math.inf)):
        assert tracker.epsilon(((0.01, 1 / 6, steps),)) == want
    assert calls == [((0.01, 1 / 6, 1),), ((0.01, 1 / 6, 2),)]
    # Another setting after it (a noise change) extends it too; fewer steps, or another
    # earlier setting, do not.
    assert tracker.epsilon(((0.01, 1 / 6, 2), (1.0, 1 / 6, 5))) == math.inf
    assert len(calls) == 2
    assert not _extends(((0.01, 1 / 6, 1), (1.0, 1 / 6, 5)), ((0.01, 1 / 6, 2),))
    assert not _extends(((0.02, 1 / 6, 5),), ((0.01, 1 / 6, 2),))
    assert _extends(((1.0, 0.1, 3), (0.01, 1 / 6, 4)), ((1.0, 0.1, 3), (0.01, 1 / 6, 2)))
    # The domain check, on a fresh tracker: Opacus's own domain size, and no call above it.
    tracker = EpsilonTracker(PRVAccountant(), 1e-5)
    tracker._replica[PRVAccountant] = opacus_or_replica
    monkeypatch.setattr(tracker, "_opacus_epsilon", opacus_or_replica)
    huge = ((0.01, 1 / 6, 23),)
    assert tracker.work(huge) > PRV_MAX_POINTS and tracker.prv_too_large(huge)
    assert not tracker.prv_too_large(((1.0, 0.045, 1000),))
    rdp = RDPAccountant()
    for history in (huge, ((0.01, 1 / 6, 24),), ((0.01, 1 / 6, 24), (0.5, 0.2, 3))):
        rdp.history = list(history)
        assert tracker.epsilon(history) == rdp.get_epsilon(1e-5) and tracker.used_rdp(history)
    assert len(calls) == 2 and not tracker.used_rdp(((0.01, 1 / 6, 22),))


def test_prv_domain_is_sized_once_per_history(monkeypatch):
    """The budget's work(), the size check and the epsilon each sized Opacus's PRV domain
    (two RDP epsilons and a grid) for the same history: three times a record."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    tracker = EpsilonTracker(acc, 1e-5)
    sized = []
    real = tracker._prv_domain_uncached
    monkeypatch.setattr(tracker, "_prv_domain_uncached", lambda h, e: sized.append(h) or real(h, e))
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=0.05)
        tracker.work()
        assert tracker.epsilon() == acc.get_epsilon(1e-5)
    assert sized == [((1.0, 0.05, n),) for n in (1, 2, 3)]


def test_prv_work_is_the_size_of_opacus_own_domain():
    """``EpsilonTracker.work`` (what the budget scales an epsilon's cost by) is the number of
    points Opacus's PRV discretises over, as its own ``_get_domain`` builds them (from a few
    thousand at one step to millions where epsilon is large), plus a fixed part."""
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.analysis import prv as prv_analysis

    histories = [
        ((1.0, 0.045, 1),),
        ((1.0, 0.045, 1000),),
        ((1.0, 0.7, 830),),  # epsilon ~300: a domain ~100x that of 10 steps
        ((0.5, 0.045, 200),),
        ((1.0, 0.03, 40), (2.0, 0.1, 7)),  # a noise change: two parts
    ]
    for delta in (1e-5, 1e-6):
        tracker = EpsilonTracker(PRVAccountant(), delta)
        sizes = []
        for history in histories:
            acc = PRVAccountant()
            acc.history = [tuple(h) for h in history]
            prvs = [prv_analysis.PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history]
            domain = acc._get_domain(
                prvs=prvs,
                num_self_compositions=[n for *_, n in history],
                eps_error=0.01,
                delta_error=delta / 1000,
            )
            work = tracker.work(history)
            assert work == len(history) * (domain.size + PRV_FIXED_POINTS), history
            sizes.append(domain.size)
        assert sizes[2] > 50 * tracker.work(((1.0, 0.7, 10),))  # why a last cost misleads
    assert EpsilonTracker(RDPAccountant(), 1e-5).work(((1.0, 0.045, 1000),)) == 1.0


def test_noiseless_history_has_infinite_epsilon_under_every_accountant():
    """sigma = 0 (a non-private baseline trained through Opacus): epsilon is infinite. Opacus's
    RDP says so; its PRV and GDP raise, which the tracker must not pass on (it would cost the
    monitor every record of such a run). A part with no sampling (q = 0) releases nothing."""
    from opacus.accountants import GaussianAccountant, PRVAccountant

    history = ((1.0, 0.05, 10), (0.0, 0.05, 3))
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert rdp.get_epsilon(1e-5) == math.inf  # the reference
    for kind, error in ((PRVAccountant, OverflowError), (GaussianAccountant, ZeroDivisionError)):
        acc = kind()
        acc.history = [history[-1]]
        with pytest.raises(error):  # Opacus itself
            acc.get_epsilon(1e-5)
    for kind in (RDPAccountant, PRVAccountant, GaussianAccountant):
        acc = kind()
        acc.history = list(history[-1:] if kind is GaussianAccountant else history)
        tracker = EpsilonTracker(acc, 1e-5)
        assert tracker.epsilon() == math.inf and tracker.work() == 1.0
    acc = RDPAccountant()
    acc.history = [(0.0, 0.0, 5)]
    assert EpsilonTracker(acc, 1e-5).epsilon() == acc.get_epsilon(1e-5) < math.inf


def test_epsilon_before_any_step_is_zero_under_every_accountant():
    """Asked before the first step (a monitor attached to a fresh engine, a summary before
    training), nothing has been released: epsilon 0, as Opacus's RDP says. Its PRV and GDP
    raise on an empty history (ValueError, IndexError), as the tracker did for all three."""
    from opacus.accountants import GaussianAccountant, PRVAccountant

    assert RDPAccountant().get_epsilon(1e-5) == 0  # the reference
    for kind in (RDPAccountant, PRVAccountant, GaussianAccountant):
        tracker = EpsilonTracker(kind(), 1e-5)
        assert tracker.epsilon() == 0.0 and tracker.epsilon(()) == 0.0


def _prv(part: tuple, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    ref = PRVAccountant()
    ref.history = [part]
    return ref.get_epsilon(delta)


def test_gdp_epsilon_is_opacus_bit_for_bit_without_its_norm_cdf_calls(monkeypatch):
    """Opacus's GDP epsilon (brentq over ``norm.cdf``, ~0.9 ms a call) by the same solver on
    ``special.ndtr``: the same float over noise, rates, deltas and step counts, and after the
    first call (checked against Opacus's own) no ``norm.cdf`` call at all."""
    from opacus.accountants import GaussianAccountant
    from opacus.accountants.analysis import gdp as gdp_analysis

    calls = []
    cdf = gdp_analysis.norm.cdf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: "GDP accounting is experimental"
        for sigma, q, delta in [(1.0, 64 / 1437, 1e-5), (0.6, 0.01, 1e-6), (3.0, 0.25, 1e-3)]:
            acc = GaussianAccountant()
            tracker = EpsilonTracker(acc, delta)
            for steps in range(1, 3001):
                acc.step(noise_multiplier=sigma, sample_rate=q)
                if steps in (1, 2, 3, 17, 100, 999, 3000):
                    with monkeypatch.context() as m:
                        m.setattr(gdp_analysis.norm, "cdf", lambda x: calls.append(x) or cdf(x))
                        calls.clear()
                        got = tracker.epsilon()
                        first = steps == 1
                        assert bool(calls) == first  # Opacus's own only for the check
                    assert got == acc.get_epsilon(delta), (sigma, q, delta, steps)
            assert tracker._replica_ok is True


@pytest.mark.parametrize("poisson", [True, False])
def test_mi_accountant_folds_only_new_entries_and_equals_the_whole_fold(poisson, monkeypatch):
    """A noise scheduler adds an accountant entry a step: the bound re-folded the whole history
    at every record (~2 ms at 2,000 entries). It now folds only the new entries; every bound
    equals the fold of the whole history (the same floats, in the same order), through a
    rollback and a replaced entry."""
    from opacus_mi.accounting import MIAccountant, once_per_epoch_bound, step_kl

    def whole(entries):
        if not poisson:
            return once_per_epoch_bound(entries)
        total = 0.0
        for noise, rate, steps in entries:
            total += steps * step_kl(noise, rate)
        return total

    acc = MIAccountant(poisson_sampling=poisson)
    calls = []
    original = MIAccountant._after
    monkeypatch.setattr(
        MIAccountant, "_after", lambda self, st, e: calls.append(1) or original(self, st, e)
    )
    history = []
    for step in range(60):
        history.append((1.0 * 0.99**step, 0.25, 1 + step % 2))
        if step == 40:
            history = history[:25]  # a rollback
        if step == 50:
            history[10] = (0.5, 0.25, 3)  # an entry replaced
        calls.clear()
        assert acc.bound(list(history)) == whole(history)
        assert len(calls) <= 2 or step in (40, 50)  # the new entry and the last, once a step


def test_mi_accountant_integrates_one_kl_per_setting(monkeypatch):
    """The per-step KL is a numerical integral: following a noise scheduler that cycles two
    settings, one entry a step, costs one per setting however many entries and records.
    Reference: the sum of each entry's steps times its setting's KL."""
    from opacus_mi import accounting

    real, calls = accounting.step_kl, []
    monkeypatch.setattr(accounting, "step_kl", lambda s, q: calls.append((s, q)) or real(s, q))
    acc = MIAccountant()
    history = [((1.0, 1.3)[i % 2], 0.02, 1 + i % 3) for i in range(40)]
    for end in (10, 25, 40):
        want = sum(k * real(s, q) for s, q, k in history[:end])
        assert acc.bound(history[:end]) == pytest.approx(want, rel=1e-12)
    assert sorted(calls) == [(1.0, 0.02), (1.3, 0.02)]


def test_a_resumed_rdp_instead_of_prv_is_a_prv_accountants_only():
    """A state whose carried epsilon was RDP's (PRV's too costly) tells the tracker so; a
    tracker of an RDP or GDP accountant flagged every record 'epsilon_rdp' after such a
    state and warned of PRV's cost."""
    from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

    history = ((1.0, 0.01, 100),)
    for accountant, kept in ((PRVAccountant(), True), (RDPAccountant(), False)):
        tracker = EpsilonTracker(accountant, 1e-5)
        tracker.rdp_from(history)
        assert tracker.used_rdp(history) is kept
        assert tracker.used_rdp(((1.0, 0.01, 150),)) is kept  # (and every extension)
    tracker = EpsilonTracker(GaussianAccountant(), 1e-5)
    tracker.rdp_from(history)
    assert not tracker.used_rdp(history)


def test_the_sample_rate_is_the_latest_steps():
    """A bound or tracker reads the rate of the latest step (a larger batch after a warm-up
    changes it); a mutation audit found the first entry's read unguarded. Reference: Opacus's
    own history after two settings."""
    accountant = RDPAccountant()
    for _ in range(3):
        accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    accountant.step(noise_multiplier=1.0, sample_rate=0.05)
    assert sample_rate_of(accountant) == accountant.history[-1][1] == 0.05
    assert sample_rate_of(None, accountant.history[:1]) == 0.01
    assert math.isnan(sample_rate_of(RDPAccountant()))


def test_a_history_continues_another_only_as_opacus_own_history_grows():
    """Whether a history continues an earlier one (an exact epsilon of the earlier stands in
    until recomputed) and how many steps it counts. Reference: snapshots of an Opacus
    accountant's own history as it is stepped, with the noise and then the rate changed;
    shorter ones (a rollback) and runs retaken with another noise or rate do not continue."""
    acc, snapshots = RDPAccountant(), [()]
    for sigma, q, k in [(1.0, 0.02, 3), (1.3, 0.02, 2), (1.3, 0.05, 2)]:
        for _ in range(k):
            acc.step(noise_multiplier=sigma, sample_rate=q)
            snapshots.append(tuple(acc.history))
    for i, earlier in enumerate(snapshots):
        assert steps_counted(earlier) == i
        for j, later in enumerate(snapshots):
            assert history_continues(later, earlier) is (j >= i), (j, i)
    for sigma, q in [(1.5, 0.02), (1.3, 0.03)]:  # the same steps, the last two retaken
        retaken = RDPAccountant()
        for k in range(5):
            retaken.step(noise_multiplier=1.0 if k < 3 else sigma, sample_rate=0.02 if k < 3 else q)
        assert not history_continues(tuple(retaken.history), snapshots[5])
