"""Variational lower bounds on mutual information from a critic's score matrix.

All functions take ``scores[i, j] = T(x_i, y_j)`` for n paired samples: the diagonal holds the
matched (joint) pairs, the off-diagonal entries are samples from the product of marginals. Values
are in nats. Bootstrap helpers resample the evaluation pairs (rows), which is the uncertainty of
a fixed critic's estimate on finite data.
"""

from __future__ import annotations

import math

import torch

BOUNDS = ("mine", "infonce")


# exp() arguments are floored at -60 below the maximum: terms that small change a log-sum by
# < e^-60, while letting them underflow into denormal floats made CPU training steps ~8x slower.
_FLOOR = -60.0


def _offdiag_logmeanexp(scores: torch.Tensor) -> torch.Tensor:
    n = scores.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=scores.device)
    m = scores.masked_fill(~off, float("-inf")).max().detach()
    total = (torch.exp((scores - m).clamp_min(_FLOOR)) * off).sum()
    return torch.log(total) + m - math.log(n * (n - 1))


def _row_logsumexp(scores: torch.Tensor) -> torch.Tensor:
    m = scores.amax(dim=1, keepdim=True).detach()
    return torch.log(torch.exp((scores - m).clamp_min(_FLOOR)).sum(dim=1)) + m.squeeze(1)


def dv_bound(scores: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan: ``E_joint[T] - log E_marginal[exp T]`` (MINE's objective)."""
    return scores.diagonal().mean() - _offdiag_logmeanexp(scores)


def infonce_bound(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE: ``E_i[T_ii - logsumexp_j T_ij] + ln n``; can never exceed ``ln n``."""
    n = scores.shape[0]
    return (scores.diagonal() - _row_logsumexp(scores)).mean() + math.log(n)


def bound(kind: str, scores: torch.Tensor) -> torch.Tensor:
    if kind == "mine":
        return dv_bound(scores)
    if kind == "infonce":
        return infonce_bound(scores)
    raise ValueError(f"estimator must be one of {BOUNDS}, got {kind!r}")


class MineLoss:
    """MINE training loss with the moving-average bias correction of Belghazi et al. (2018).

    The gradient of ``log E[exp T]`` on a minibatch is biased; MINE replaces its denominator
    with an exponential moving average of ``E[exp T]`` (kept here in log space for stability).
    """

    def __init__(self, rate: float = 0.01):
        self.rate = rate
        self.log_ma: float | None = None

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        log_marg = _offdiag_logmeanexp(scores)
        current = float(log_marg.detach())
        if self.log_ma is None or not math.isfinite(self.log_ma):
            self.log_ma = current
        else:
            a, b = math.log1p(-self.rate) + self.log_ma, math.log(self.rate) + current
            self.log_ma = max(a, b) + math.log1p(math.exp(-abs(a - b)))
        # d/dtheta of exp(log_marg - log_ma) = grad E[e^T] / ma: the corrected gradient.
        return -(scores.diagonal().mean() - torch.exp(log_marg - self.log_ma))


def bootstrap_counts(
    n: int, draws: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(draws, n)`` multiplicities of each pair in bootstrap resamples of n pairs."""
    idx = torch.randint(0, n, (draws, n), generator=generator, device=generator.device)
    counts = torch.zeros((draws, n), dtype=torch.float64, device=generator.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts.to(device)


def bootstrap_bound(kind: str, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The bound on each bootstrap resample of the rows (``counts`` from bootstrap_counts).

    DV: a resample with multiplicities w has joint term sum_i w_i T_ii / n and marginal pairs
    (a, b) of distinct draws of distinct pairs, so its marginal mean is
    ``sum_{i != j} w_i w_j e^{T_ij} / (n^2 - sum_i w_i^2)``, computed without materialising it.
    InfoNCE: the per-row terms are resampled (the candidate set stays the full evaluation set).
    """
    s = scores.to(torch.float64)
    n = s.shape[0]
    w = counts.to(torch.float64)
    if kind == "infonce":
        rows = s.diagonal() - torch.logsumexp(s, dim=1) + math.log(n)
        return (w @ rows) / n
    if kind != "mine":
        raise ValueError(f"estimator must be one of {BOUNDS}, got {kind!r}")
    joint = (w @ s.diagonal()) / n
    mask = torch.eye(n, dtype=torch.bool, device=s.device)
    m = s.masked_fill(mask, float("-inf")).max()
    e0 = torch.exp(s - m).masked_fill(mask, 0.0)
    total = ((w @ e0) * w).sum(dim=1)
    pairs = n * n - (w * w).sum(dim=1)
    return joint - (torch.log(total / pairs) + m)


def percentile_interval(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """Two-sided percentile interval of bootstrap values (NaNs dropped)."""
    v = values[torch.isfinite(values)].double()
    if v.numel() == 0:
        return float("nan"), float("nan")
    lo = torch.quantile(v, (1 - level) / 2).item()
    hi = torch.quantile(v, 1 - (1 - level) / 2).item()
    return lo, hi
