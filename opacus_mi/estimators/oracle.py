"""White-box oracle for the private view: the exact Bayes posterior over who produced a release.

Let ``g_1..g_B`` be the clipped per-sample gradients of a batch, J uniform on the batch and
``Y = g_J + s xi`` with ``s = sigma * C`` (the private view). The Bayes posterior is
``p(J = i | y) ∝ exp((2 <y, g_i> - |g_i|^2) / (2 s^2))`` and
``I(J; Y) = ln B + E[log p(J | Y)]`` (the InfoNCE bound with the optimal critic, so <= ln B).

Only inner products are needed: with ``y_j = g_j + s xi_j``,
``<y_j, g_i> = G_ji + s z_j(i)`` where ``G`` is the B x B Gram matrix and ``z_j ~ N(0, G)``.
So the noise is drawn in B dimensions with covariance G, never in P dimensions, and the result is
exact for the full gradient (a k-dim sketch would keep only ~k/P of the signal energy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..checks import is_finite_number, python_number

# Noise draws are scored in blocks of at most BLOCK_LOGITS logits (B x B a draw; with their
# normals and log-softmax ~28 bytes each, ~120 MB a block: 10**5 draws at B = 128 at once asked
# for 13 GB a tensor), and of at least MIN_BLOCK_DRAWS (the monitor's default), so a default run
# is one block at any B, its random stream unchanged (one big randn and several smaller ones
# draw other numbers).
BLOCK_LOGITS = 2**22
MIN_BLOCK_DRAWS = 4


@dataclass(frozen=True)
class OracleResult:
    """Per-example contributions ``ln B + log p(J=j | y_j)`` averaged over noise draws."""

    terms: torch.Tensor  # (B,) float64
    batch_size: int
    # (B,) float64: each term's Monte Carlo variance (its draws' variance / draws); None from
    # one draw. The spread between terms alone understates the error where a few examples
    # carry the batch's information (see bounds.mean_sd).
    mc_var: torch.Tensor | None = None
    # The largest squared norm (the Gram's largest diagonal entry): a float where it was read
    # already (on the CPU), else a 0-d tensor, read with the record (see exceeds_clip).
    largest_sq: float | torch.Tensor | None = None

    @property
    def nats(self) -> float:
        return float(self.terms.mean()) if self.batch_size else float("nan")


def _check_gram(gram: Any, noise_std: Any) -> None:
    """Shapes and settings only (host side): the values are the caller's, read nowhere here."""
    if not isinstance(gram, torch.Tensor) or gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        got = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(f"gram must be a square (B, B) tensor of inner products, got {got}")
    if not is_finite_number(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be a finite number >= 0 (sigma * C), got {noise_std!r}")


def _psd_sqrt_factor(
    gram: torch.Tensor, sync_free: bool | None = None, noise_std: float | None = None
) -> torch.Tensor:
    """L with L L^T = G (+ a small diagonal jitter) for a PSD, possibly singular, Gram matrix.

    Cholesky is ~5x cheaper than eigh at B = 64, and reads only G's lower triangle (so a Gram
    whose float32 GEMM left it asymmetric in the last bit needs no symmetrising). The jitter
    adds independent noise of its variance to each inner product, whose logit carries it over
    ``noise_std``: between examples with equal gradients (duplicates, exactly-zero rows),
    whose logits tie, it breaks the tie at random and takes E log p below -ln k (at sigma =
    1e-3 off the CPU, 1.04 nats where the truth is 1.39). So it is capped relative to
    ``noise_std^2``: on the CPU at 1e-8 of it (and 1e-10 x the mean squared norm), the logits'
    extra noise <= 1e-4; a matrix that is then not numerically PD falls back to eigh of the
    symmetrised matrix. Off the CPU reading Cholesky's status would cost a host sync (and
    eigh checks its own), so there the jitter is 1e-6 x the largest squared norm, above the
    float32 rounding of a Gram formed on the device (logit noise <= 0.1), unless noise_std^2
    is below 0.99e-4 of that norm, where the monitor forms the Gram exactly in float64 (sigma
    < 0.01) and it is 1e-4 x noise_std^2 (at least 1e-12 of the norm); a factorisation that
    still fails gives NaN (a flagged, non-finite oracle value), never silently wrong numbers.
    Few tensor operations: inside a training loop each costs several microseconds however
    small (see ``benchmarks/README.md``).
    """
    if sync_free is None:
        sync_free = gram.device.type != "cpu"
    var = math.inf if noise_std is None else float(noise_std) ** 2
    jittered = gram.clone()  # the jitter goes in place, on a copy
    diag = jittered.diagonal()
    if sync_free:
        top = diag.max().clamp_min(1e-300)
        # Below sigma = 0.01 the monitor forms the Gram in float64; clipped norms are <= C,
        # so var = sigma^2 C^2 < 1e-4 x the largest squared norm says so, with a 1% margin
        # for a float32 Gram's rounding of a norm of C (else at sigma = 0.01 the small jitter
        # met a float32 Gram: Cholesky failed, NaN).
        exact = var < 0.99e-4 * top  # (a tensor: no read)
        small = torch.clamp_min(1e-4 * var * torch.ones_like(top), 1e-12 * top)
        diag.add_(torch.where(exact, small, 1e-6 * top))
        factor, info = torch.linalg.cholesky_ex(jittered)
        return torch.where(info == 0, factor, torch.full_like(factor, math.nan))
    diag.add_(max(min(1e-10 * float(diag.sum()) / len(gram), 1e-8 * var), 1e-300))
    factor, info = torch.linalg.cholesky_ex(jittered)
    if int(info) == 0:
        return factor
    vals, vecs = torch.linalg.eigh((gram + gram.T) / 2)
    return vecs * vals.clamp_min(0).sqrt()


def gram_oracle(
    gram: torch.Tensor,
    noise_std: float,
    *,
    draws: int = 8,
    generator: torch.Generator,
    sync_free: bool | None = None,
) -> OracleResult:
    """Monte Carlo of I(J; Y) from the Gram matrix of the clipped gradients.

    Args:
        gram: ``(B, B)`` Gram matrix of clipped per-sample gradients (float64 recommended).
        noise_std: ``sigma * C``, the std of Opacus's noise per coordinate.
        draws: noise draws per example (each costs a B x B matrix product; many are made in
            blocks of bounded memory, see ``BLOCK_LOGITS``).
        generator: the monitor's own generator (on the Gram matrix's device).
        sync_free: factorise without reading anything back to the host (default: off the
            CPU, where each read is a sync); a Gram that is not numerically PD then gives NaN.
            Equal gradients at tiny noise are merged only without it (see _merged_oracle).
    """
    noise_std, draws = python_number(noise_std), python_number(draws)  # (NumPy's scalars)
    _check_gram(gram, noise_std)
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1 (noise draws per example), got {draws!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    b = gram.shape[0]
    if b == 0:
        return OracleResult(terms=torch.zeros(0, dtype=torch.float64), batch_size=0)
    g = gram.to(torch.float64)
    sq = g.diagonal()
    if sync_free is None:
        sync_free = g.device.type != "cpu"
    top = sq.max() if sync_free else float(sq.max())
    if noise_std <= 0:
        # Noise-free release: Y identifies J up to examples with identical clipped gradients.
        dist2 = sq[:, None] + sq[None, :] - 2 * g
        # Equal up to rounding, relative to the pair's own norms (relative to the batch's
        # largest, distinct small gradients of well-fit examples counted as one)
        tol = 1e-12 * torch.maximum(sq[:, None], sq[None, :])
        same = (dist2 <= tol).sum(dim=1).to(torch.float64)
        terms = math.log(b) - torch.log(same)
        return OracleResult(
            terms=terms, batch_size=b, mc_var=torch.zeros_like(terms), largest_sq=top
        )
    if not sync_free and noise_std**2 < TINY_NOISE * top:
        merged = _merged_duplicates(g, sq, noise_std)
        if merged is not None:
            result = _merged_oracle(g, sq, merged, noise_std, draws, generator)
            return replace(result, largest_sq=top)
    factor = _psd_sqrt_factor(g, sync_free, noise_std)
    own, mc_var = _averaged(
        lambda n: _own_log_posterior(g, sq, factor, noise_std, n, generator),
        draws,
        max(MIN_BLOCK_DRAWS, BLOCK_LOGITS // (b * b)),
        sq,
    )
    return OracleResult(terms=own.add_(math.log(b)), batch_size=b, mc_var=mc_var, largest_sq=top)


def _averaged(
    drawn: Callable[[int], torch.Tensor], draws: int, block: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each example's mean over ``draws`` draws of ``drawn(n) -> (n, B)``, and that mean's
    Monte Carlo variance (None from one draw), made at most ``block`` draws at a time: sums
    and sums of squares where they take several blocks (bounded memory)."""
    if draws <= block:
        each = drawn(draws)
        if draws == 1:
            return each[0], None
        var, mean = torch.var_mean(each, dim=0)
        return mean, var.div_(draws)
    mean, squares = torch.zeros_like(like), torch.zeros_like(like)
    for d in range(0, draws, block):
        each = drawn(min(block, draws - d))
        mean += each.sum(0)
        squares += each.pow(2).sum(0)
    mean /= draws
    return mean, (squares - draws * mean.pow(2)).clamp_min_(0).div_((draws - 1) * draws)


# Below this noise variance, relative to the largest squared norm (sigma below ~1e-3), equal
# gradients are scored as one candidate (see _merged_oracle).
TINY_NOISE = 1e-6


def _merged_duplicates(g: torch.Tensor, sq: torch.Tensor, noise_std: float) -> torch.Tensor | None:
    """For each example the index of the first with an equal gradient, or None if all are
    distinct. Equal: within float64 rounding of the pair's squared norms, or so close that the
    noise cannot tell them apart (a squared distance of 1e-4 s^2, 5e-5 nats of separation);
    not the noise-free case's 1e-12 of the norms, which at s = 1e-7 merged rows the noise
    does tell apart (1.04 nats read where the truth is 1.09)."""
    dist2 = sq[:, None] + sq[None, :] - 2 * g
    rounding = 16 * torch.finfo(torch.float64).eps * torch.maximum(sq[:, None], sq[None, :])
    same = dist2 <= rounding.clamp_min(1e-4 * noise_std**2)
    first = same.to(torch.uint8).argmax(dim=1)  # (each row holds its own diagonal)
    return None if bool((first == torch.arange(len(g), device=g.device)).all()) else first


def _merged_oracle(
    g: torch.Tensor,
    sq: torch.Tensor,
    first: torch.Tensor,
    noise_std: float,
    draws: int,
    generator: torch.Generator,
) -> OracleResult:
    """The oracle with equal gradients scored as one candidate of prior weight ``k`` (their
    count): ``log p(J = j | y) = log p(group of j | y) - ln k``, exactly, as the noise-free
    case. Scored as separate candidates, their tied logits were broken by the rounding of
    ``G / s^2`` and the jitter, taking E log p below -ln k: at sigma = 1e-8 a batch of equal
    examples read -1.3 nats, where the truth is 0."""
    b = len(g)
    reps, group = torch.unique(first, return_inverse=True)  # candidates; each example's one
    r = len(reps)
    log_k = torch.bincount(group, minlength=r).to(torch.float64).log()
    g_r = g[reps][:, reps]
    factor = _psd_sqrt_factor(g_r, False, noise_std)
    # logits[d, j, r] = (<y_j, g_r> - |g_r|^2 / 2) / s^2 + ln k_r, y_j = g_j + s xi_j
    fixed = (g_r - sq[reps] / 2)[group] / noise_std**2 + log_k

    def drawn(n: int) -> torch.Tensor:
        """(n, B): log p(J = j | y_j) for n draws per example."""
        eps = torch.randn(  # (as _own_log_posterior: float32 draws, widened)
            (n, b, r), generator=generator, device=generator.device, dtype=torch.float32
        )
        logits = torch.baddbmm(
            fixed.expand(n, b, r),
            eps.to(device=g.device, dtype=torch.float64),
            factor.T.expand(n, r, r),
            alpha=1 / noise_std,
        )
        own = torch.log_softmax(logits, dim=2).gather(2, group.expand(n, b)[..., None])[..., 0]
        return own - log_k[group]

    mean, mc_var = _averaged(drawn, draws, max(MIN_BLOCK_DRAWS, BLOCK_LOGITS // (b * r)), sq)
    return OracleResult(terms=mean + math.log(b), batch_size=b, mc_var=mc_var)


def _own_log_posterior(
    g: torch.Tensor,
    sq: torch.Tensor,
    factor: torch.Tensor,
    noise_std: float,
    draws: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``(draws, B)``: ``log p(J = j | y_j)`` for ``draws`` noise draws per example."""
    b = g.shape[0]
    eps = torch.randn(  # float32 draws (then widened), whatever torch's default dtype
        (draws, b, b), generator=generator, device=generator.device, dtype=torch.float32
    )
    # logits[d, j, i] = (2 <y_j, g_i> - |g_i|^2) / (2 s^2) = (G_ji - |g_i|^2 / 2) / s^2 + z_j(i) / s
    # with z[d, j] = L eps[d, j] ~ N(0, G): one batched GEMM adds the noise to the fixed part,
    # both scales folded into it (beta, alpha).
    logits = torch.baddbmm(
        g.sub(sq, alpha=0.5).expand(draws, b, b),
        eps.to(device=g.device, dtype=torch.float64),
        factor.T.expand(draws, b, b),
        beta=1 / noise_std**2,
        alpha=1 / noise_std,
    )
    # log p(J = j | y_j): the diagonal of the log-posterior (one fused log-softmax).
    return torch.log_softmax(logits, dim=2).diagonal(dim1=1, dim2=2)


# The union floor (below) is used where the batch is nearly identifiable: its per-row sums of
# pairwise confusion terms average at most UNION_TIGHT nats, and the oracle reads within
# UNION_NEAR nats of ln B (so the floor need not be made elsewhere, as on the CPU's hot path it
# is not: a union <= 3 bounds the truth's distance from ln B by 3 nats, and the estimate's is
# that within its noise; the digits CNN at sigma 1 reads ~4). There the Monte Carlo terms are rare
# confusions that a few draws per example mostly miss: the t interval collapsed around ln B, its
# low end above the truth in 13-72% of batches at unions <= 0.5 (B = 8-64, sigma 0.1-0.3), and
# still 4-23% at unions of 0.5-2 (nominal 2.5%; more draws help only slowly: 11% / 7% / 9%
# with 4 / 16 / 64). Beyond a union of ~3 the terms are common and the t interval covers.
UNION_TIGHT = 3.0
UNION_NEAR = 3.5


def union_deficits(gram: torch.Tensor, noise_std: float) -> torch.Tensor:
    """Per example i, an upper bound on ``E[-log p(J=i | Y)]`` given J = i: the union bound.

    ``-log p(i | y) = log(1 + sum_j e^{Z_j})`` with ``Z_j = logit_j - logit_i``, which given
    J = i is ``N(-a_ij, 2 a_ij)``, ``a_ij = |g_i - g_j|^2 / (2 s^2)``; ``log(1 + sum x_j) <=
    sum log(1 + x_j)``, and ``softplus(z) <= max(0, z) + e^{-|z|}``, whose Gaussian mean is in
    closed form. So ``ln B - mean_i(union_deficits)`` is a lower bound on I(J; Y) with no Monte
    Carlo in it (7-15% looser in the union terms than the exact softplus means). Float64,
    ``(B,)``.
    """
    noise_std = python_number(noise_std)
    _check_gram(gram, noise_std)
    if noise_std == 0:
        raise ValueError("noise_std must be > 0 for a union bound (a noise-free release has none)")
    g = gram.to(torch.float64)
    sq = g.diagonal()
    a = (sq[:, None] + sq[None, :] - 2 * g).clamp_min_(0).div_(2 * noise_std**2)
    r = a.mul(0.5).sqrt_()  # the standard scores of Z = 0: Z's mean is -r of its sds
    tail = torch.special.ndtr(-r)  # P(Z > 0), and E[e^Z; Z < 0] (that is Phi(-r) too)
    positive = r.mul(-0.5 * r).exp_().mul_(2 * r / math.sqrt(2 * math.pi)).sub_(a * tail)
    negative_z = torch.exp(2 * a + torch.special.log_ndtr(-3 * r))  # E[e^{-Z}; Z > 0]
    terms = positive.add_(tail).add_(negative_z)
    terms.fill_diagonal_(0)
    return terms.sum(dim=1)


def union_mean(grams: list) -> torch.Tensor:
    """The mean union deficit over the rows of a step's chunks (``(gram, noise std)`` each;
    NaN where there is none: a noise-free release, a chunk whose Gram is gone)."""
    if not grams or any(g is None or g[1] <= 0 for g in grams):
        return torch.tensor(math.nan, dtype=torch.float64)
    return torch.cat([union_deficits(gram, std) for gram, std in grams]).mean()


def oracle_interval(
    mean: float, low: float, high: float, log_b: float, union: float | None
) -> tuple[float, float, float]:
    """The oracle's ``(mean, low, high)``: the t interval's low end lowered to the union floor
    ``log_b - union`` (``log_b``: mean ln B over the rows, ``union``: mean union_deficits)
    where the batch is nearly identifiable (see ``UNION_TIGHT``). The floor is a bound, not an
    estimate: that low end holds whatever the draws."""
    near = union is not None and union <= UNION_TIGHT and log_b - mean < UNION_NEAR
    if not (near and math.isfinite(low)):  # (a NaN union is not <= anything)
        return mean, low, high
    # (I(J; Y) >= 0: a floor below 0, at small B where ln B itself is < UNION_NEAR, says
    # nothing a floor of 0 does not.)
    return mean, min(low, max(0.0, log_b - union), mean), high


def floored_interval(
    mean: float, low: float, high: float, log_b: float, grams: Callable[[], list]
) -> tuple[float, float, float]:
    """:func:`oracle_interval`, its union made from ``grams()`` (``(gram, noise std)`` pairs,
    as :func:`union_mean` takes) only where the floor can be used, within ``UNION_NEAR`` of
    ln B: the oracle's, and the semi-oracle's from its clean tokens' Gram."""
    union = float(union_mean(grams())) if log_b - mean < UNION_NEAR else math.nan
    return oracle_interval(mean, low, high, log_b, union)
