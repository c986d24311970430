"""The four variational bounds against brute force, and estimate_mi's accuracy and p-value."""

from __future__ import annotations

import math

import pytest
import torch

from opacus_mi import estimate_mi
from opacus_mi.estimators.bounds import (
    BOUNDS,
    SMILE_TAU,
    CriticLoss,
    MineLoss,
    baseline_bound,
    bootstrap_bound,
    bootstrap_counts,
    bound,
    infonce_bound,
    infonce_jackknife,
    jackknife_interval,
    js_objective,
    nwj_bound,
    permutation_p_value,
    permuted_bounds,
    random_permutations,
    smile_bound,
)


def _scores(n: int = 7, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    # scale 4: several entries fall outside SMILE's [-5, 5] clipping window
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, n, generator=g, dtype=torch.float64)


def _brute(kind: str, s: torch.Tensor, idx: list[int] | None = None) -> torch.Tensor:
    """The bound by explicit loops over the (resampled) pairs: joint = same draw, marginal =
    distinct draws of distinct pairs."""
    n = s.shape[0]
    idx = list(range(n)) if idx is None else idx
    joint = torch.stack([s[i, i] for i in idx]).mean()
    marg = torch.stack([s[a, b] for a in idx for b in idx if a != b])
    if kind == "mine":
        return joint - torch.log(marg.exp().mean())
    if kind == "nwj":
        return joint - (marg - 1).exp().mean()
    if kind == "smile":
        return joint - torch.log(marg.clamp(-SMILE_TAU, SMILE_TAU).exp().mean())
    raise AssertionError(kind)


def test_bounds_list_and_dispatch():
    assert BOUNDS == ("mine", "infonce", "nwj", "smile")
    s = _scores()
    for kind in BOUNDS:
        assert torch.isfinite(bound(kind, s))
    with pytest.raises(ValueError, match="estimator"):
        bound("kde", s)
    with pytest.raises(ValueError, match="estimator"):
        bootstrap_bound("kde", s, bootstrap_counts(7, 2, torch.Generator()))


def test_nwj_and_smile_against_brute_force():
    s = _scores()
    assert (s.abs() > SMILE_TAU).any()  # the clipping is exercised
    off = [s[i, j] for i in range(7) for j in range(7) if i != j]
    nwj = s.diagonal().mean() - torch.stack([torch.exp(v - 1) for v in off]).mean()
    torch.testing.assert_close(nwj_bound(s), nwj)
    torch.testing.assert_close(bound("nwj", s), nwj)
    clipped = [min(max(float(v), -SMILE_TAU), SMILE_TAU) for v in off]
    smile = s.diagonal().mean() - math.log(sum(math.exp(v) for v in clipped) / len(clipped))
    torch.testing.assert_close(smile_bound(s), smile)  # joint term unclipped
    torch.testing.assert_close(bound("smile", s), smile)
    # tau -> infinity recovers Donsker-Varadhan
    torch.testing.assert_close(smile_bound(s, tau=1e9), bound("mine", s))


def test_nwj_is_tight_at_one_plus_log_ratio_and_below_dv():
    # NWJ <= DV for any critic, with equality iff the marginal mean of e^(T-1) is 1
    for seed in range(5):
        s = _scores(seed=seed, scale=1.0)
        assert nwj_bound(s) <= bound("mine", s) + 1e-12
        shifted = s - torch.log(torch.exp(s).masked_fill(torch.eye(7, dtype=torch.bool), 0).sum())
        shifted = shifted + math.log(42) + 1  # off-diagonal mean of e^(T - 1) is exactly 1
        torch.testing.assert_close(nwj_bound(shifted), bound("mine", shifted))


def test_js_objective_against_brute_force():
    s = _scores(scale=1.0)
    sp = torch.nn.functional.softplus
    joint = torch.stack([-sp(-s[i, i]) for i in range(7)]).mean()
    marg = torch.stack([sp(s[i, j]) for i in range(7) for j in range(7) if i != j]).mean()
    torch.testing.assert_close(js_objective(s), joint - marg)


@pytest.mark.parametrize("kind", ["nwj", "smile", "mine"])
def test_bootstrap_bound_against_explicit_resampling(kind):
    s = _scores()
    g = torch.Generator().manual_seed(1)
    counts = bootstrap_counts(7, 6, g)
    got = bootstrap_bound(kind, s, counts)
    for r in range(6):  # expand multiplicities, skip same-pair draws
        idx = [i for i in range(7) for _ in range(int(counts[r, i]))]
        torch.testing.assert_close(got[r], _brute(kind, s, idx))


def test_bootstrap_bound_refuses_infonce():
    """Resampling its rows alone understates InfoNCE's spread (they share the candidates)."""
    with pytest.raises(ValueError, match="infonce_jackknife"):
        bootstrap_bound("infonce", _scores(), bootstrap_counts(7, 2, torch.Generator()))


def test_dv_nwj_and_their_bootstrap_of_a_separating_critic_against_brute_force():
    """Joint scores far above the marginal ones (a critic without ``critic_bound``): the
    marginal mean is taken relative to the largest marginal score. Relative to the largest
    score (a joint one), the floor at -60 replaced every marginal term by e^-60 of it and the
    bootstrap's e^(T - max) underflowed to 0 (a bound of +inf). Reference: explicit loops."""
    s = _scores(scale=1.0, seed=3)
    s.diagonal().add_(1000.0)
    for kind in ("mine", "nwj"):
        torch.testing.assert_close(bound(kind, s), _brute(kind, s))
    counts = bootstrap_counts(7, 4, torch.Generator().manual_seed(0))
    got = bootstrap_bound("mine", s, counts)
    for r in range(4):
        idx = [i for i in range(7) for _ in range(int(counts[r, i]))]
        torch.testing.assert_close(got[r], _brute("mine", s, idx))


def test_bootstrap_counts_are_multinomial_resamples_of_every_pair():
    """A resample draws n of the n pairs with replacement, each equally likely: its
    multiplicities sum to n and each pair's is Binomial(n, 1/n). Only the bound of given
    counts was checked: counts that never drew the last pair passed. Reference: scipy's
    binomial pmf, within 5 standard errors of each frequency."""
    from scipy import stats

    n, draws = 5, 20_000
    counts = bootstrap_counts(n, draws, torch.Generator().manual_seed(0))
    assert counts.shape == (draws, n) and counts.dtype == torch.float64
    assert (counts.sum(dim=1) == n).all() and (counts == counts.round()).all()
    for j in range(n):
        for k in range(n + 1):
            p = stats.binom.pmf(k, n, 1 / n)
            freq = float((counts[:, j] == k).double().mean())
            assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-12, (j, k)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3, "ties", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_infonce_jackknife_against_deleting_each_pair(scale, dtype):
    """Pair i leaves the rows and the candidates. At scale 1e3 a row's largest entry holds all
    of its sum but e^-1000 of it: taking it out by subtraction would leave 0 (log: -inf). A
    row whose entries are -inf but its largest (a perfect critic) read NaN."""
    n = 9
    s = _scores(n=n, scale=30.0 if isinstance(scale, str) else scale, seed=4)
    s[2, 5] = s[2].max() + 3 * s.abs().max()  # a row whose top entry is not its own pair's
    if scale == "ties":
        s[3, 3] = s[3, 1] = s[3, 7] = s[3].max()  # three entries share a row's maximum
    if scale == "-inf":
        s[0, 1:] = -math.inf
        s[4, :4] = s[4, 5:] = -math.inf  # only its own pair's finite
    s = s.to(dtype)

    def brute(keep: list[int]) -> torch.Tensor:
        sub = s[keep][:, keep]
        return (sub.diagonal() - torch.logsumexp(sub, dim=1)).mean() + math.log(len(keep))

    want = torch.stack([brute([j for j in range(n) if j != i]) for i in range(n)]).double()
    atol = 1e-9 if dtype == torch.float64 else 1e-6 * float(s[s.isfinite()].abs().max())
    torch.testing.assert_close(infonce_jackknife(s), want, rtol=0, atol=atol)


def test_infonce_jackknife_of_one_pair_is_nan_and_of_two_is_each_pair_alone():
    """One pair leaves none to keep: NaN (no interval), where ``topk(2)`` of its one score
    raised. Two pairs leave one each, and InfoNCE of a lone pair, its own candidate only, is
    ``T_ii - log e^T_ii + ln 1 = 0`` (brute force)."""
    one = infonce_jackknife(torch.tensor([[0.3]], dtype=torch.float64))
    assert one.shape == (1,) and one.isnan().all()
    torch.testing.assert_close(
        infonce_jackknife(_scores(n=2)), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_jackknife_interval_is_t_times_the_jackknife_standard_error():
    values = torch.tensor([0.9, 1.1, 1.0, 1.3, 0.7], dtype=torch.float64)
    se = math.sqrt(4 / 5 * sum((v - 1.0) ** 2 for v in values.tolist()))
    t = 2.7764451051977987  # Student's t, 4 df, 97.5%
    got = jackknife_interval(values, torch.tensor(2.0), 0.95)
    torch.testing.assert_close(got, torch.tensor([2.0 - t * se, 2.0 + t * se], dtype=torch.float64))


@pytest.mark.parametrize("kind", BOUNDS)
def test_permuted_bounds_match_bound_of_repaired_scores(kind):
    s = _scores(n=9, scale=3.0, seed=2)
    g = torch.Generator().manual_seed(3)
    perms = random_permutations(9, 5, g)
    assert all(sorted(p.tolist()) == list(range(9)) for p in perms)
    got = permuted_bounds(kind, s, perms)
    for k in range(5):
        torch.testing.assert_close(got[k], bound(kind, s[:, perms[k]]))
    torch.testing.assert_close(permuted_bounds(kind, s, torch.arange(9)[None])[0], bound(kind, s))


@pytest.mark.parametrize("kind", BOUNDS)
def test_permuted_bounds_of_joint_scores_far_above_the_rest_match_bound(kind):
    """Each row's marginal entries were its whole sum less the joint one, which cancelled to 0
    where the joint score is ~37 nats above the rest; a clamp then made up a log-marginal of
    -700 (the identity pairing read 712 nats for a critic at 40). Reference: ``bound`` of the
    re-paired scores, summed without the joint entries."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(12, 12, generator=g, dtype=torch.float64)
    s.diagonal().add_(40.0)
    perms = torch.cat([torch.arange(12)[None], random_permutations(12, 4, g)])
    got = permuted_bounds(kind, s, perms)
    want = torch.stack([bound(kind, s[:, p]) for p in perms])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ties = torch.zeros(6, 6, dtype=torch.float64)
    ties[:, 0] = 50.0  # every row's largest entry in one column, and two rows pairing with it
    perms = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 0, 2, 3, 4, 5]])
    want = torch.stack([bound(kind, ties[:, p]) for p in perms])
    torch.testing.assert_close(permuted_bounds(kind, ties, perms), want, rtol=1e-12, atol=1e-12)
    if kind == "mine":
        torch.testing.assert_close(
            permuted_bounds(kind, s, torch.arange(12)[None], 1.5)[0],
            baseline_bound(s, 1.5),
        )


def test_permutation_p_value_counts_ties_and_the_matched_pairing():
    shuffled = torch.tensor([0.1, 0.5, 0.2, 0.5])
    assert permutation_p_value(0.5, shuffled) == pytest.approx(3 / 5)
    assert permutation_p_value(1.0, shuffled) == pytest.approx(1 / 5)
    assert permutation_p_value(-1.0, shuffled) == pytest.approx(1.0)


def test_critic_loss_objectives():
    s = _scores(scale=1.0).requires_grad_(True)
    torch.testing.assert_close(CriticLoss("infonce")(s), -infonce_bound(s))
    torch.testing.assert_close(CriticLoss("nwj")(s), -nwj_bound(s))
    torch.testing.assert_close(CriticLoss("smile")(s), -js_objective(s))  # as Song & Ermon
    mine = CriticLoss("mine")
    mine(s)
    assert mine.log_ma is not None  # MINE's moving average, as MineLoss keeps it
    with pytest.raises(ValueError, match="estimator"):
        CriticLoss("kde")


def test_mine_moving_average_is_the_exponential_average_of_e_to_the_marginal_term():
    """MINE's bias correction (Belghazi et al. 2018): the denominator of the DV gradient is a
    moving average ``ma <- (1 - rate) ma + rate E_marginal[e^T]``, kept in log space. Only
    its existence was checked: dropping the average (or swapping rate and 1 - rate) trained
    every MINE critic on the uncorrected, biased gradient and no test failed."""
    gen = torch.Generator().manual_seed(0)
    s1, s2, s3 = (torch.randn(8, 8, dtype=torch.float64, generator=gen) * k for k in (1, 2, 3))
    off = ~torch.eye(8, dtype=torch.bool)

    def log_marginal(s):  # log of the mean of e^T over the 56 off-diagonal pairs
        return math.log(sum(math.exp(v) for v in s[off].tolist()) / 56)

    loss = CriticLoss("mine", rate=0.1)  # (a MineLoss: what the MINE critics train with)
    assert isinstance(loss, MineLoss)
    loss(s1)
    assert loss.log_ma == pytest.approx(log_marginal(s1), rel=1e-12)
    ma = math.exp(log_marginal(s1))
    for s in (s2, s3):
        value = loss(s)
        ma = 0.9 * ma + 0.1 * math.exp(log_marginal(s))
        assert loss.log_ma == pytest.approx(math.log(ma), rel=1e-12)
        # The loss: minus (joint mean - e^(log marginal) / ma), whose gradient is MINE's.
        want = -(s.diagonal().mean().item() - math.exp(log_marginal(s)) / ma)
        assert value.item() == pytest.approx(want, rel=1e-12)


def test_mine_moving_average_restarts_after_a_batch_with_no_finite_marginal_term():
    """A batch whose marginal term is not finite (an overflowed score; or a damaged
    checkpoint's ``log_ma``) leaves the moving average NaN: the next batch restarts it from
    its own marginal mean, where folding it in kept every later MINE loss NaN. Reference:
    the log of the brute-force off-diagonal mean of e^T."""
    s = _scores(n=6, scale=1.0)
    off = [float(s[i, j]) for i in range(6) for j in range(6) if i != j]
    log_marginal = math.log(sum(math.exp(v) for v in off) / len(off))
    bad = s.clone()
    bad[0, 1] = math.inf
    for start in ("overflow", "loaded"):
        loss = MineLoss(rate=0.1)
        if start == "overflow":
            loss(bad)
        else:
            loss.log_ma = math.nan
        assert math.isnan(loss.log_ma)
        value = loss(s)
        assert loss.log_ma == pytest.approx(log_marginal, rel=1e-12)
        # e^(log marginal - log_ma) = 1: minus (joint mean - 1)
        assert value.item() == pytest.approx(-(s.diagonal().mean().item() - 1.0), rel=1e-12)


def test_infonce_never_exceeds_ln_n():
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 64):
        s = 50 * torch.randn(n, n, generator=g, dtype=torch.float64)
        s.diagonal().add_(1e3)  # a perfectly separating critic
        assert infonce_bound(s) <= math.log(n) + 1e-12
        assert (infonce_jackknife(s) <= math.log(n - 1) + 1e-9).all()
        perms = random_permutations(n, 20, g)
        assert (permuted_bounds("infonce", s, perms) <= math.log(n) + 1e-9).all()


def _gaussian(n: int, d: int, mi: float, seed: int):
    rho = math.sqrt(1 - math.exp(-2 * mi / d))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)


@pytest.fixture(scope="module")
def one_nat_estimates():
    x, y = _gaussian(2000, 1, 1.0, seed=5)
    return {kind: estimate_mi(x, y, kind, seed=2, max_steps=600) for kind in BOUNDS}


@pytest.mark.parametrize("kind", BOUNDS)
def test_estimate_mi_each_estimator_recovers_one_nat(one_nat_estimates, kind):
    est = one_nat_estimates[kind]
    assert est.estimator == kind
    assert abs(est.nats - 1.0) <= 0.2, est
    assert est.ci_low < est.nats < est.ci_high
    assert est.p_value < 0.01  # leakage detected
    assert est.shuffled < 0.1
    if kind == "infonce":
        assert est.nats <= est.upper_limit == pytest.approx(math.log(est.n_eval))
    # The interval: held-out low end; high end reaches the in-sample bound plus the same
    # half-width (the held-out bound is pessimistic, the in-sample one optimistic).
    assert est.heldout_ci_high <= est.ci_high
    half = est.heldout_ci_high - est.nats
    assert est.ci_high == pytest.approx(
        min(max(est.heldout_ci_high, est.in_sample + half), est.upper_limit)
    )
    assert est.ci_low <= 1.0 <= est.ci_high  # the closed-form truth, 1 nat


def test_estimate_mi_p_value_on_independent_pairs_is_not_small():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 3, generator=g), torch.randn(2000, 2, generator=g)
    before = torch.get_rng_state()
    est = estimate_mi(x, y, "infonce", seed=0, max_steps=300)
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is never touched
    assert est.p_value > 0.05, est
    assert 1 / 201 <= est.p_value <= 1.0
    assert abs(est.nats) < 0.05


def test_estimate_mi_infonce_capped_by_ln_n_eval_on_deterministic_pairs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 2, generator=g)
    est = estimate_mi(x, x, "infonce", seed=0, max_steps=300)
    cap = math.log(est.n_eval)
    assert est.nats <= cap + 1e-6 and est.ci_high <= cap + 1e-6
    assert est.nats > 0.5 * cap and est.p_value < 0.01


def test_estimate_mi_permutations_zero_skips_the_test():
    x, y = _gaussian(400, 1, 0.5, seed=0)
    est = estimate_mi(x, y, "nwj", seed=0, max_steps=100, permutations=0)
    assert math.isnan(est.p_value) and math.isfinite(est.shuffled)
