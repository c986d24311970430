"""Variational lower bounds on mutual information from a critic's score matrix.

All functions take ``scores[i, j] = T(x_i, y_j)`` for n paired samples: the diagonal holds the
matched (joint) pairs, the off-diagonal entries are samples from the product of marginals. Values
are in nats. Bootstrap helpers resample the evaluation pairs (rows), which is the uncertainty of
a fixed critic's estimate on finite data; ``permuted_bounds`` re-pairs them, which is the null
distribution of a fixed critic's estimate under independence.

The four bounds, for a critic ``T``:

* ``mine``: Donsker-Varadhan, ``E_P[T] - log E_Q[e^T]`` (Belghazi et al. 2018).
* ``infonce``: ``E_i[T_ii - log mean_j e^T_ij]``, never above ``ln n`` (van den Oord et al. 2018).
* ``nwj``: ``E_P[T] - E_Q[e^(T - 1)]`` (Nguyen, Wainwright & Jordan 2010; ``f``-divergence form).
* ``smile``: DV with the partition term on ``clip(T, -tau, tau)`` (Song & Ermon 2020). Clipping
  trades a bias (it is a lower bound only as ``tau`` grows) for far less variance than DV.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BOUNDS = ("mine", "infonce", "nwj", "smile")

# SMILE's clipping threshold (Song & Ermon use tau = 5 in their benchmarks).
SMILE_TAU = 5.0

# exp() arguments are floored at -60 below the maximum: terms that small change a log-sum by
# < e^-60, while letting them underflow into denormal floats made CPU training steps ~8x slower.
_FLOOR = -60.0


def _check_kind(kind: str) -> None:
    if kind not in BOUNDS:
        raise ValueError(f"estimator must be one of {BOUNDS}, got {kind!r}")


@functools.lru_cache(maxsize=8)
def _eye(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, dtype=torch.bool, device=device)


def _offdiag_logmeanexp(scores: torch.Tensor) -> torch.Tensor:
    n = scores.shape[0]
    eye = _eye(n, scores.device)
    m = scores.detach().masked_fill(eye, float("-inf")).max()
    total = torch.exp((scores - m).clamp_min(_FLOOR)).masked_fill(eye, 0.0).sum()
    return torch.log(total) + m - math.log(n * (n - 1))


def _row_logsumexp(scores: torch.Tensor) -> torch.Tensor:
    m = scores.amax(dim=1, keepdim=True).detach()
    return torch.log(torch.exp((scores - m).clamp_min(_FLOOR)).sum(dim=1)) + m.squeeze(1)


def dv_bound(scores: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan: ``E_joint[T] - log E_marginal[exp T]`` (MINE's objective)."""
    return scores.diagonal().mean() - _offdiag_logmeanexp(scores)


def baseline_bound(scores: torch.Tensor, baseline: float | torch.Tensor) -> torch.Tensor:
    """TUBA with a fixed baseline ``c``: ``E_joint[T] - (c - 1) - E_marginal[exp(T - c)]``.

    A lower bound on the MI for any ``c`` (``log u <= u/e^c + c - 1``), equal to the DV bound
    when ``c`` is the log-partition. Unlike DV's ``log`` of the batch's own marginal mean, it
    is linear in ``e^T``, so a batch gives an unbiased estimate of it: DV on a batch of n pairs
    sits above its critic's bound by Jensen's gap, which grows as n falls (a reviewer's MINE
    critic at I = 3.92: 4.13 on batches of 8, 11.3 on batches of 2). MINE's held-out figures
    use it with ``c`` taken from the validation pairs (see ``OnlineEstimator``).
    """
    return (
        scores.diagonal().mean()
        - (baseline - 1.0)
        - torch.exp(_offdiag_logmeanexp(scores) - baseline)
    )


def infonce_bound(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE: ``E_i[T_ii - logsumexp_j T_ij] + ln n``; can never exceed ``ln n``."""
    n = scores.shape[0]
    return (scores.diagonal() - _row_logsumexp(scores)).mean() + math.log(n)


def nwj_bound(scores: torch.Tensor) -> torch.Tensor:
    """NWJ: ``E_joint[T] - E_marginal[exp(T - 1)]`` over the off-diagonal pairs.

    Tight at ``T = 1 + log p(x, y) / (p(x) p(y))``; the marginal mean is taken in log space so
    large scores do not overflow before the subtraction.
    """
    return scores.diagonal().mean() - torch.exp(_offdiag_logmeanexp(scores) - 1.0)


def smile_bound(scores: torch.Tensor, tau: float = SMILE_TAU) -> torch.Tensor:
    """SMILE: ``E_joint[T] - log E_marginal[exp clip(T, -tau, tau)]`` (joint term unclipped)."""
    return scores.diagonal().mean() - _offdiag_logmeanexp(scores.clamp(-tau, tau))


def js_objective(scores: torch.Tensor) -> torch.Tensor:
    """The f-GAN Jensen-Shannon objective ``-E_P[softplus(-T)] - E_Q[softplus(T)]``.

    Not an MI bound: it is what SMILE trains its critic with (maximised at ``T = log p / q``,
    with bounded per-pair gradients), before the SMILE bound is evaluated on that critic.
    """
    n = scores.shape[0]
    diag = scores.diagonal()
    joint = F.softplus(-diag).mean()
    marginal = (F.softplus(scores).sum() - F.softplus(diag).sum()) / (n * (n - 1))
    return -joint - marginal


def bound(kind: str, scores: torch.Tensor) -> torch.Tensor:
    """The ``kind`` bound (one of ``BOUNDS``) of a score matrix."""
    if kind == "mine":
        return dv_bound(scores)
    if kind == "infonce":
        return infonce_bound(scores)
    if kind == "nwj":
        return nwj_bound(scores)
    if kind == "smile":
        return smile_bound(scores)
    raise ValueError(f"estimator must be one of {BOUNDS}, got {kind!r}")


class MineLoss:
    """MINE training loss with the moving-average bias correction of Belghazi et al. (2018).

    The gradient of ``log E[exp T]`` on a minibatch is biased; MINE replaces its denominator
    with an exponential moving average of ``E[exp T]`` (kept here in log space for stability).
    """

    def __init__(self, rate: float = 0.01):
        self.rate = rate
        # Where the scores are (a 0-d float64 tensor): reading it back every minibatch would be
        # a host sync off the CPU. A float after load_state_dict, None before the first call.
        self._log_ma: torch.Tensor | float | None = None

    @property
    def log_ma(self) -> float | None:
        """The moving average's log, read back to the host (for checkpoints)."""
        return None if self._log_ma is None else float(self._log_ma)

    @log_ma.setter
    def log_ma(self, value: float | None) -> None:
        self._log_ma = None if value is None else float(value)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        log_marg = _offdiag_logmeanexp(scores)
        current = log_marg.detach().to(torch.float64)
        if self._log_ma is None:
            log_ma = current
        else:  # log((1 - rate) ma + rate e^current), restarted from current if ma is not finite
            prev = torch.as_tensor(self._log_ma, dtype=torch.float64, device=current.device)
            a, b = prev + math.log1p(-self.rate), current + math.log(self.rate)
            mixed = torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))
            log_ma = torch.where(torch.isfinite(prev), mixed, current)
        self._log_ma = log_ma
        # d/dtheta of exp(log_marg - log_ma) = grad E[e^T] / ma: the corrected gradient.
        return -(scores.diagonal().mean() - torch.exp(log_marg - log_ma.to(log_marg.dtype)))


class CriticLoss(MineLoss):
    """The loss a critic for bound ``kind`` is trained with (minimise it).

    ``mine``: MINE's moving-average corrected DV gradient (state in ``log_ma``, as MineLoss).
    ``infonce`` and ``nwj``: minus their own bound. ``smile``: minus the Jensen-Shannon
    objective (``js_objective``), as in Song & Ermon; the SMILE bound is then evaluated on the
    trained critic. Maximising the SMILE bound itself is ill-posed: once the marginal scores
    are clipped nothing stops the joint scores from growing without limit.
    """

    def __init__(self, kind: str = "mine", rate: float = 0.01):
        _check_kind(kind)
        super().__init__(rate)
        self.kind = kind

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.kind == "mine":
            return super().__call__(scores)
        if self.kind == "smile":
            return -js_objective(scores)
        return -bound(self.kind, scores)


def mean_sd(
    terms: torch.Tensor, mc_var: torch.Tensor | None = None, draws: int = 0
) -> torch.Tensor:
    """``[mean, sd, mc_se, mc_df]`` of per-example terms, float64, where the terms are (not
    read: off the CPU each read is a sync, and the monitor reads a record's figures in one
    transfer); :func:`interval_from` makes the interval from them.

    ``mc_var``: each term's own Monte Carlo variance from ``draws`` draws (the oracle's). The
    mean's Monte Carlo error is ``mc_se = sqrt(sum mc_var) / n``, with Welch-Satterthwaite's
    ``mc_df`` degrees of freedom (NaN, NaN without ``mc_var``). Where two of 64 examples carry
    the batch's information, the spread between the terms rests on those two: the t interval
    from it alone had its high end below the truth in 10% of batches (nominal 2.5%).
    """
    t = terms.to(torch.float64)
    nan = torch.full_like(t.sum(), math.nan)
    if t.numel() < 2:  # no spread from one term (and no degrees-of-freedom warning)
        return torch.stack([t.mean(), nan, nan, nan])
    sd, mean = torch.std_mean(t)
    if mc_var is None or draws < 2:
        return torch.stack([mean, sd, nan, nan])
    v = mc_var.to(torch.float64)
    total = v.sum()
    df = total.square() / v.square().sum().mul(1 / (draws - 1)).clamp_min(1e-300)
    return torch.stack([mean, sd, total.sqrt() / t.numel(), df])


def interval_from(
    mean: float,
    sd: float,
    n: int,
    *,
    min_n: int = 2,
    level: float = 0.95,
    mc: tuple[float, float] | None = None,
) -> tuple[float, float, float]:
    """``(mean, low, high)``: a mean of n per-example terms (a :func:`mean_sd` read back) with
    Student's t interval; fewer than ``min_n`` terms give a NaN interval. ``mc``: the mean's
    own Monte Carlo ``(se, df)`` where known: the interval is then at least ``t_df * se`` wide
    on each side.

    For a plain mean the percentile bootstrap and mean +- t * sd / sqrt(n) agree to O(1/n); the
    latter needs no resampling, which matters on the monitor's every-step path. Student's t,
    not the normal z: the oracle's interval at a batch of 8 covered 91% with z (t: 2.36, not
    1.96, times the standard error).
    """
    if n == 0:
        return math.nan, math.nan, math.nan
    if n < max(min_n, 2):
        return mean, math.nan, math.nan
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    if mc is not None and math.isfinite(mc[0]) and mc[1] > 0:  # (df NaN: not > 0)
        half = max(half, t_quantile(level, round(mc[1], 1)) * mc[0])
    return mean, mean - half, mean + half


@functools.lru_cache(maxsize=256)
def t_quantile(level: float, df: float) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.special import stdtrit

    return float(stdtrit(df, 0.5 + level / 2))


def bootstrap_counts(
    n: int, draws: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(draws, n)`` multiplicities of each pair in bootstrap resamples of n pairs."""
    idx = torch.randint(0, n, (draws, n), generator=generator, device=generator.device)
    counts = torch.zeros((draws, n), dtype=torch.float64, device=generator.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts.to(device)


def _bootstrap_log_marginal(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``log`` of each resample's off-diagonal mean of ``e^s`` (see ``bootstrap_bound``)."""
    n = s.shape[0]
    mask = torch.eye(n, dtype=torch.bool, device=s.device)
    m = s.masked_fill(mask, float("-inf")).max()
    e0 = torch.exp(s - m).masked_fill(mask, 0.0)
    total = ((w @ e0) * w).sum(dim=1)
    pairs = n * n - (w * w).sum(dim=1)
    return torch.log(total / pairs) + m


def bootstrap_bound(
    kind: str,
    scores: torch.Tensor,
    counts: torch.Tensor,
    baseline: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The bound on each bootstrap resample of the rows (``counts`` from bootstrap_counts).

    DV: a resample with multiplicities w has joint term sum_i w_i T_ii / n and marginal pairs
    (a, b) of distinct draws of distinct pairs, so its marginal mean is
    ``sum_{i != j} w_i w_j e^{T_ij} / (n^2 - sum_i w_i^2)``, computed without materialising it.
    NWJ and SMILE use the same resampled marginal mean (of ``e^(T-1)``, of ``e^clip(T)``).
    InfoNCE: none (a resample repeats pairs among the candidates; :func:`infonce_jackknife`).
    MINE with a ``baseline``: :func:`baseline_bound`'s form of the same resampled terms.
    """
    _check_kind(kind)
    s = scores.to(torch.float64)
    n = s.shape[0]
    w = counts.to(torch.float64)
    if kind == "infonce":
        raise ValueError(
            "bootstrap_bound does not resample InfoNCE: its row terms share the candidates, so "
            "resampling the rows understates its spread; use infonce_jackknife and "
            "jackknife_interval"
        )
    joint = (w @ s.diagonal()) / n
    if kind == "mine" and baseline is not None:
        return joint - (baseline - 1.0) - torch.exp(_bootstrap_log_marginal(s, w) - baseline)
    if kind == "mine":
        return joint - _bootstrap_log_marginal(s, w)
    if kind == "nwj":
        return joint - torch.exp(_bootstrap_log_marginal(s, w) - 1.0)
    clipped = s.clamp(-SMILE_TAU, SMILE_TAU)
    return joint - _bootstrap_log_marginal(clipped, w)


def infonce_jackknife(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE on the n pairs less pair i, for each i: ``(n,)`` float64, where the scores are.

    Pair i leaves both the rows and every row's candidate set. A resample of the rows alone
    keeps the candidates fixed and treats the row terms, which all share those candidates, as
    independent: at 5 nats on 48 pairs the interval from it put its low end above the figure's
    own expectation in 12.6% of batches (nominal 2.5%); this jackknife's, 4.8%.

    ``O(n^2)``, in the scores' precision (float32 at least): a row's sum without one candidate
    is its sum less that entry, scaled by the row's second-largest entry, with the largest added
    back through ``log1p``; without the largest it is the scaled sum itself. So nothing small is
    left from cancelling large terms, and no entry is floored.
    """
    s = scores.detach()
    s = s if s.dtype == torch.float64 else s.float()
    n = s.shape[0]
    if n < 2:  # no pair to leave out
        return torch.full((n,), math.nan, dtype=torch.float64, device=s.device)
    top2 = s.topk(2, dim=1)
    m, m2 = top2.values[:, :1], top2.values[:, 1:]
    m2 = torch.where(torch.isfinite(m2), m2, m)  # (a row all -inf but its largest: rest is 0)
    top = top2.indices[:, :1]
    e = torch.exp((s - m2).scatter(1, top, -math.inf))  # all but the row's largest: <= 1
    rest = e.sum(dim=1, keepdim=True)  # >= 1 (the second largest)
    # row r without candidate i: log(e^m + e^m2 (rest - e_ri)); without its largest: m2 + ln rest
    lse = (m + torch.log1p(torch.exp(m2 - m) * (rest - e))).scatter(1, top, m2 + torch.log(rest))
    terms = (s.diagonal()[:, None] - lse).masked_fill(_eye(n, s.device), 0.0)  # row i leaves too
    return terms.double().sum(dim=0) / (n - 1) + math.log(n - 1)


def jackknife_se(values: torch.Tensor) -> torch.Tensor:
    """The jackknife standard error of a figure from its n leave-one-out ``values``."""
    n = values.shape[0]
    v = values.double()
    return torch.sqrt((n - 1) / n * ((v - v.mean()) ** 2).sum())


def jackknife_interval(values: torch.Tensor, point: torch.Tensor, level: float) -> torch.Tensor:
    """``[low, high]``: ``point`` -/+ Student's t quantile (n - 1 df) times the jackknife
    standard error of leave-one-out ``values`` (n of them), where they are (no host read)."""
    half = t_quantile(level, values.shape[0] - 1) * jackknife_se(values)
    return torch.stack([point.double() - half, point.double() + half])


def random_permutations(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, n)`` independent uniform permutations of ``range(n)`` from ``generator``."""
    keys = torch.rand(  # float32 keys, whatever torch's default dtype: the same permutations
        (count, n), generator=generator, device=generator.device, dtype=torch.float32
    )
    return keys.argsort(dim=1)


def random_cycle(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random n-cycle of ``range(n)`` (one ``randperm`` of ``generator``): a
    re-pairing in which no index keeps its own partner."""
    order = torch.randperm(n, generator=generator, device=generator.device)
    cycle = torch.empty_like(order)
    cycle[order] = order.roll(-1)
    return cycle


def _row_logsumexp_without(s: torch.Tensor) -> torch.Tensor:
    """``out[i, j] = log sum_{k != j} e^s[i, k]``, without cancellation.

    The row's sum less one term (one O(n^2) pass for every j) cancels where that term is most
    of the row: a joint score 40 nats above the rest left 0, and a clamp then made up a
    log-marginal of -700 (a matched MINE figure of 712 for 40). Any other term is at most the
    row's largest, which stays in the sum, so only each row's largest is summed afresh.
    """
    top = s.max(dim=1, keepdim=True)
    e = torch.exp((s - top.values).clamp_min(_FLOOR))
    out = torch.log(e.sum(dim=1, keepdim=True) - e) + top.values
    without_top = s.scatter(1, top.indices, float("-inf"))
    return out.scatter(1, top.indices, torch.logsumexp(without_top, dim=1, keepdim=True))


def permuted_bounds(
    kind: str,
    scores: torch.Tensor,
    perms: torch.Tensor,
    baseline: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The bound of ``scores[:, perm]`` for each row ``perm`` of ``perms`` (float64, ``(K,)``).

    Re-pairing x_i with y_perm(i) only changes which entries are "joint": InfoNCE's row
    log-sum-exps are invariant, and the marginal entries of row i are the row less its joint
    one, so after one O(n^2) pass each re-pairing costs O(n). The identity permutation gives
    the matched bound. MINE with a ``baseline``: :func:`baseline_bound`'s form.
    """
    _check_kind(kind)
    s = scores.detach().to(torch.float64)
    n = s.shape[0]
    perms = perms.to(s.device)
    picked = s.gather(1, perms.T).T  # picked[k, i] = s[i, perms[k, i]]
    joint = picked.mean(dim=1)
    if kind == "infonce":
        lse = torch.logsumexp(s, dim=1)
        return joint - lse.mean() + math.log(n)
    if kind == "smile":
        s = s.clamp(-SMILE_TAU, SMILE_TAU)
    log_rest = _row_logsumexp_without(s).gather(1, perms.T).T  # row i less its joint entry
    log_marg = torch.logsumexp(log_rest, dim=1) - math.log(n * (n - 1))
    if kind == "mine" and baseline is not None:
        return joint - (baseline - 1.0) - torch.exp(log_marg - baseline)
    if kind == "nwj":
        return joint - torch.exp(log_marg - 1.0)
    return joint - log_marg


def permutation_p_value(matched: float, shuffled: torch.Tensor) -> float:
    """Monte Carlo permutation p-value ``(1 + #{shuffled >= matched}) / (K + 1)``."""
    k = int(shuffled.numel())
    return (1 + int((shuffled >= matched).sum())) / (k + 1)


def percentile_tensor(values: torch.Tensor, level: float = 0.95) -> torch.Tensor:
    """``[low, high]`` percentile interval of bootstrap values, non-finite ones ignored, left
    where the values are: a masked selection would need their count on the host (a sync).

    ``torch.nanquantile``'s linear interpolation, written out: in torch 2.11 (not 2.6 or 2.14)
    ``nanquantile`` checks that ``q`` lies in [0, 1] on the device and reads the answer back,
    one host sync per call. One sort serves both ends.
    """
    v = values.double().reshape(-1)
    if v.numel() == 0:
        return torch.full((2,), math.nan, dtype=v.dtype, device=v.device)
    v = torch.where(torch.isfinite(v), v, torch.full_like(v, math.nan))
    ordered = torch.sort(v).values  # NaN sorts last
    last = (~torch.isnan(v)).sum().to(v.dtype) - 1  # index of the largest finite value
    ends = []
    for q in ((1 - level) / 2, 1 - (1 - level) / 2):
        rank = (last * q).clamp_min(0)  # 0 when nothing is finite: ordered[0] is then NaN
        below = ordered.gather(0, rank.long().reshape(1))
        above = ordered.gather(0, rank.ceil().long().reshape(1))
        ends.append(torch.lerp(below, above, (rank - rank.floor()).reshape(1)))
    return torch.cat(ends)


def percentile_interval(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """Two-sided percentile interval of bootstrap values (non-finite ones dropped)."""
    lo, hi = percentile_tensor(values, level).tolist()
    return lo, hi
