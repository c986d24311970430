"""Gradient views: what each party sees of one example's gradient in a DP-SGD step.

``raw``      the per-sample gradient ``g_i`` (what a non-private step would leak),
``clipped``  ``c_i * g_i`` with Opacus's exact clip factor (what enters ``p.summed_grad``),
``private``  ``c_i * g_i + N(0, sigma^2 C^2 I)``: the release an attacker sees when the example is
             alone in a step (any larger batch only adds other examples' gradients, leaking less);
             its std is what Opacus adds (:func:`release_noise_std`: adaptive clipping's is larger).

The private view is never materialised in parameter space: the noise is drawn in token space or
through the Gram matrix (see :mod:`opacus_mi.tokens` and :mod:`opacus_mi.estimators.oracle`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from opacus.optimizers import (
    AdaClipDPOptimizer,
    DPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
)

VIEWS = ("raw", "clipped", "private")


def unmeasured_views(views: Sequence[str], estimator: str | None) -> list[str]:
    """The views in ``views`` that would never get a figure: without a learned estimator all
    but the private view (its Gram oracle)."""
    return [] if estimator is not None else [v for v in views if v != "private"]


def default_views(estimator: str | None) -> tuple[str, ...]:
    """The views measured when none are named: clipped and private with a learned estimator,
    the private view alone without one (only it has a figure then: its Gram oracle)."""
    return ("clipped", "private") if estimator is not None else ("private",)


def series_names(views: Sequence[str], estimator: str | None, semi_oracle: bool) -> list[str]:
    """The MI series (record keys) these settings report: each view's learned estimator, then
    the private view's Gram oracle and, if asked for, its semi-oracle (which learns without an
    estimator too). One rule for the monitor's KeyError and a run summary's "no figure yet"."""
    names = [f"{view}/{estimator}" for view in views] if estimator is not None else []
    if "private" in views:
        names.append("private/oracle")
        if semi_oracle:
            names.append("private/semi")
    return names


# Opacus adds this to per-sample norms before dividing (optimizer.py, perlayeroptimizer.py).
_OPACUS_EPS = 1e-6


@dataclass(frozen=True)
class ClipInfo:
    """Per-sample clip factors, shaped ``(B,)`` for flat clipping or ``(B, L)`` per layer."""

    factors: torch.Tensor
    norms: torch.Tensor
    per_layer: bool

    def for_layer(self, layer: int) -> torch.Tensor:
        """Clip factor of every example for parameter ``layer`` (shape ``(B,)``)."""
        return self.factors[:, layer] if self.per_layer else self.factors


def release_noise_std(optimizer) -> float:
    """The std per coordinate of the noise Opacus adds to the summed clipped gradient.

    ``sigma * C``, except under adaptive clipping, which also releases a noisy count of
    unclipped examples and so adds gradient noise of ``(sigma^-2 - (2 sigma_u)^-2)^(-1/2) * C``
    (Andrew et al.'s Theorem 1), while the accountant composes ``sigma``: ``AdaClipDPOptimizer``
    computes it in its ``add_noise``; ghost clipping's (``PrivacyEngineAdaptiveClipping``, with
    ``sigma_u = B / 20``) sets it each backward as ``_adjusted_noise_multiplier``, which its
    optimizer's ``add_noise`` uses (FSDP's does not). The private view is the gradient's
    release, so it uses this std; the per-step bound ``1/(2 sigma^2)`` still covers both
    releases together.
    """
    sigma, bound = float(optimizer.noise_multiplier), float(optimizer.max_grad_norm)
    if isinstance(optimizer, AdaClipDPOptimizer) and sigma > 0:
        sigma = (sigma**-2 - (2 * float(optimizer.unclipped_num_std)) ** -2) ** -0.5
    adjusted = getattr(optimizer, "_adjusted_noise_multiplier", None)
    if (
        adjusted is not None
        and isinstance(optimizer, DPOptimizerFastGradientClipping)
        and not isinstance(optimizer, FSDPOptimizerFastGradientClipping)
    ):
        sigma = float(adjusted)
    return sigma * bound


def flat_clip(norms: torch.Tensor, max_grad_norm: float) -> ClipInfo:
    """Opacus's flat clip factors ``min(1, C / (norm + 1e-6))`` from per-sample norms."""
    factors = (float(max_grad_norm) / (norms + _OPACUS_EPS)).clamp(max=1.0)
    return ClipInfo(factors=factors, norms=norms, per_layer=False)


def clip_factors(
    grad_samples: Sequence[torch.Tensor],
    max_grad_norm: float | Sequence[float],
) -> ClipInfo:
    """Recompute Opacus's clip factors from per-sample gradients, with Opacus's own arithmetic.

    ``max_grad_norm`` is a float for flat clipping and one float per parameter for per-layer
    clipping (``DPPerLayerOptimizer.max_grad_norms``). The factors are local variables inside
    ``clip_and_accumulate``; recomputing them reads ``grad_sample`` and writes nothing.
    """
    if len(grad_samples) == 0:
        raise ValueError("clip_factors needs at least one per-sample gradient tensor")
    batch = len(grad_samples[0])
    device = grad_samples[0].device
    if isinstance(max_grad_norm, (int, float)):
        if batch == 0:
            empty = torch.zeros((0,), device=device)
            return ClipInfo(factors=empty, norms=empty, per_layer=False)
        per_param = [g.reshape(len(g), -1).norm(2, dim=-1).to(device) for g in grad_samples]
        return flat_clip(torch.stack(per_param, dim=1).norm(2, dim=1), max_grad_norm)
    bounds = list(max_grad_norm)
    if len(bounds) != len(grad_samples):
        raise ValueError(
            f"max_grad_norm has {len(bounds)} entries but there are {len(grad_samples)} "
            "parameters: per-layer clipping needs one bound per trainable parameter"
        )
    if batch == 0:
        empty = torch.zeros((0, len(bounds)), device=device)
        return ClipInfo(factors=empty, norms=empty, per_layer=True)
    per_layer = [g.norm(2, dim=tuple(range(1, g.ndim))) for g in grad_samples]
    norms = torch.stack([n.to(device) for n in per_layer], dim=1)
    # Opacus's own expression, layer by layer: C a Python float divided by the norms (torch
    # computes reciprocal() * C, in half precision in float32 and rounded once). A tensor of
    # bounds rounded C to the norms' dtype too (up to 7.5e-3 off in bf16).
    factors = torch.stack(
        [
            (float(b) / (n + _OPACUS_EPS)).clamp(max=1.0).to(device)
            for b, n in zip(bounds, per_layer, strict=True)
        ],
        dim=1,
    )
    return ClipInfo(factors=factors, norms=norms, per_layer=True)


def clipped_grad_samples(
    grad_samples: Sequence[torch.Tensor], clip: ClipInfo
) -> list[torch.Tensor]:
    """The clipped view in parameter space (``c_i * g_i``), one tensor per parameter.

    Summing over the batch gives exactly what Opacus accumulates into ``p.summed_grad``.
    Allocates B x P memory: the monitor itself works on tokens and the Gram matrix instead.
    """
    out = []
    for layer, g in enumerate(grad_samples):
        c = clip.for_layer(layer).to(device=g.device, dtype=g.dtype)
        out.append(c.view(-1, *([1] * (g.ndim - 1))) * g)
    return out


# Below this batch a Gram's GEMM (B x P times its own transpose: ~B/2 multiply-adds per float
# read) cannot keep a CPU's arithmetic busy, and a BLAS that packs both operands reads the B x P
# matrix twice: from memory, once it is larger than the last-level cache. In column blocks that
# stay in the cache each float comes from memory once. On the AMD EPYC VM (32 MiB L3), 8 x 2.36M
# (a ResNet-18 layer, 72 MiB) took 18 ms in one product and 8.5 ms in 16k-column blocks; 11 x
# 590k (25 MiB) 7.3 and 4.3 ms; matrices of 2-12 MiB 0.9-1.15x as fast blocked; B = 12-16 at
# 72 MiB 0-7% slower. Hence both bounds.
_BLOCKED_GRAM_BELOW = 12
_BLOCKED_GRAM_MIN_BYTES = 16 << 20
_GRAM_BLOCK_FLOATS = 1 << 17  # 512 KiB of float32 per block


def gram_product(flat: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """``flat @ flat.T`` for a ``(B, P)`` matrix, added into ``into`` if given (in place).

    On a CPU, a small batch's matrix larger than a cache goes a column block at a time (see
    ``_BLOCKED_GRAM_BELOW``); the same sum, in a different order."""
    batch, width = flat.shape
    if (
        flat.device.type != "cpu"
        or batch >= _BLOCKED_GRAM_BELOW
        or flat.numel() * flat.element_size() <= _BLOCKED_GRAM_MIN_BYTES
    ):
        return flat @ flat.T if into is None else into.addmm_(flat, flat.T)
    cols = max(1, _GRAM_BLOCK_FLOATS // max(1, batch))
    out = into if into is not None else flat.new_zeros((batch, batch))
    for start in range(0, width, cols):
        block = flat[:, start : start + cols]
        out.addmm_(block, block.T)
    return out


def raw_gram(
    grad_samples: Sequence[torch.Tensor],
    *,
    rank_one: dict[int, torch.Tensor] | None = None,
    backprops: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``G[i, j] = <g_i, g_j>`` of the raw per-sample gradients, ``(B, B)``, float32.

    One float32 GEMM per parameter accumulated in place (rank-one Linear layers as in
    :func:`clipped_gram`). Its diagonal is every example's squared norm, so flat clipping needs
    no separate norm pass; the clipped Gram is then ``c c^T * G`` (:func:`scale_gram`). Relative
    error ~1e-7: meant for sigma >= 0.01, like ``clipped_gram(exact=False)``.
    """
    from .factored import rank_one_gram

    batch = len(grad_samples[0])
    device = grad_samples[0].device
    gram = None  # the first term's product starts it (no zeros to add to)
    for layer, g in enumerate(grad_samples):
        if g.device != device or g.dtype != torch.float32:  # a no-op .to() is still a call
            g = g.to(device, torch.float32)
        if rank_one is not None and layer in rank_one and g.ndim == 3:
            term = rank_one_gram(g, rank_one[layer], (backprops or {}).get(layer))
            gram = term if gram is None else gram.add_(term)
            # A NaN/Inf anywhere in g_i still marks example i (as the GEMM's diagonal would):
            # the factors a, b can be finite while a corrupted grad_sample is not (0 x NaN/Inf
            # is NaN: alpha=0 adds nothing else).
            gram.diagonal().add_(g.sum(dim=(1, 2)), alpha=0)
        else:
            gram = gram_product(g.reshape(batch, -1), into=gram)
    if gram is None:
        gram = torch.zeros((batch, batch), dtype=torch.float32, device=device)
    return gram


def scale_gram(gram: torch.Tensor, clip: ClipInfo) -> torch.Tensor:
    """The clipped Gram ``c_i c_j G[i, j]`` (flat clipping), float64."""
    c = clip.factors.to(gram.device, torch.float64)
    return torch.outer(c, c).mul_(gram)  # the same products, in fewer operations


def clipped_gram(
    grad_samples: Sequence[torch.Tensor],
    clip: ClipInfo,
    *,
    exact: bool = True,
    rank_one: dict[int, torch.Tensor] | None = None,
    backprops: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``G[i, j] = <clipped g_i, clipped g_j>`` over all parameters, shape ``(B, B)``, float64.

    Full-dimensional; one GEMM per parameter, never a noisy gradient. ``exact=False`` runs the
    GEMMs in float32 (about 2x faster on CPU; for flat clipping through :func:`raw_gram`):
    relative error ~1e-7, which the oracle's logits amplify by 1/(2 sigma^2), so it is meant
    for sigma >= 0.01. ``rank_one`` maps a parameter index to its Linear layer's ``(B, d_in)``
    input (and ``backprops`` optionally to its ``b_i``, see
    :func:`opacus_mi.factored.rank_one_backprop`): with ``exact=False`` that layer's term is
    ``(b b^T)(a a^T)`` instead of the GEMM (it agrees to float32 rounding, ~1e-6 of the largest
    norm; Opacus's float32 ``grad_sample`` is only rank-one to that precision, so ``exact``
    keeps the GEMM).
    """
    from .factored import rank_one_gram

    if not exact and not clip.per_layer:
        return scale_gram(raw_gram(grad_samples, rank_one=rank_one, backprops=backprops), clip)
    batch = len(grad_samples[0])
    device = clip.factors.device
    gram = torch.zeros((batch, batch), dtype=torch.float64, device=device)
    for layer, g in enumerate(grad_samples):
        g = g.to(device)
        g = g.to(torch.float64) if exact else g.float()
        if not exact and rank_one is not None and layer in rank_one and g.ndim == 3:
            term = rank_one_gram(g, rank_one[layer], (backprops or {}).get(layer))
        else:
            term = gram_product(g.reshape(batch, -1))
        c = clip.for_layer(layer).to(torch.float64)
        gram += (c[:, None] * c[None, :]) * term.to(torch.float64)
    return gram
