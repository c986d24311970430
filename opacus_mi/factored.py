"""Kronecker-factored privacy tokens and Gram matrices, from activations and backprops.

For ``nn.Linear`` the per-sample gradient of the weight is ``g_i = sum_t b_it a_it^T`` (``a`` the
layer input, ``b`` the gradient of the loss with respect to its output, ``t`` over positions);
``nn.Conv2d`` (groups=1) is the same after unfolding its input (``t`` over output positions) and
``nn.Embedding`` with ``a_it`` the one-hot of the token id. So, without ever forming ``g_i``:

* token: the Kronecker count-sketch ``R_out g_i R_in^T = sum_t (R_out b_it)(R_in a_it)^T``; both
  factors have orthonormal rows, hence so has ``R_out (x) R_in``, and the sketch of Opacus's noise
  ``N(0, s^2 I_P)`` is still ``N(0, s^2 I_k)`` (the private token needs no P-dimensional noise).
* Gram: ``<g_i, g_j> = sum_{t,s} (b_it . b_js)(a_it . a_js)``, at cost ``(BT)^2 (d_in + d_out)``,
  or by materialising the layer's per-sample gradients a column block at a time,
  ``B T d_in d_out + B^2 d_in d_out``: the cheaper is picked per layer (both give the same Gram).

This is what lets the monitor follow Opacus ghost clipping (``grad_sample_mode="ghost"``), where
per-sample gradients never exist. :class:`KroneckerTokenizer` is used in every mode, so a model
gets the same tokens whichever way Opacus computes its gradients. :class:`FactoredCapture` hooks
the layers Opacus hooks, keeps the first (per-example) backward pass's activations and backprops,
and for any layer Opacus handles without a norm sampler it calls Opacus's own grad sampler for
that layer (as Opacus itself does in ghost mode), one layer at a time.
"""

from __future__ import annotations

import collections
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN, RNNLinear
from opacus.utils.module_utils import requires_grad, trainable_parameters
from opacus.utils.tensor_utils import unfold2d
from torch import nn

from .hooks import GuestHook
from .overlap import keep_input, without_autocast
from .tokens import TINY_SKETCH_ELEMS, CountSketchTokenizer, dense_sketch_t
from .views import _OPACUS_EPS, ClipInfo, gram_product

GRAM_METHODS = ("auto", "factored", "materialised")
# Elements of one intermediate block (float32: 4 bytes each) in either Gram algorithm.
_BLOCK_ELEMS = 1 << 24
# Largest count-sketch applied as a dense (n x k) matrix in factored tokens.
_DENSE_SKETCH_ELEMS = 1 << 20


def kronecker_layers(module: nn.Module) -> dict[int, tuple[int, int]]:
    """``id(weight) -> (rows, cols)`` for every weight whose per-sample gradient is a sum of
    outer products: ``nn.Linear`` (out, in), ``nn.Conv2d`` with groups=1 (out, in*kh*kw) and
    ``nn.Embedding`` (num_embeddings, dim). Exact types only, as Opacus dispatches."""
    out: dict[int, tuple[int, int]] = {}
    for m in module.modules():
        if type(m) is nn.Linear or type(m) is nn.Embedding:
            out[id(m.weight)] = (m.weight.shape[0], m.weight.shape[1])
        elif type(m) is nn.Conv2d and m.groups == 1:
            out[id(m.weight)] = (m.weight.shape[0], m.weight[0].numel())
    return out


def kronecker_dims(rows: int, cols: int, token_dim: int) -> tuple[int, int]:
    """``(k1, k2)`` with ``k1 <= rows``, ``k2 <= cols`` and the largest ``k1 * k2 <= token_dim``;
    ties go to the pair that compresses both axes most evenly."""
    target = min(token_dim, rows * cols)
    best, best_key = (1, 1), None
    for k1 in range(1, min(rows, target) + 1):
        k2 = min(cols, target // k1)
        key = (k1 * k2, -abs(math.log(k1 / rows) - math.log(k2 / cols)))
        if best_key is None or key > best_key:
            best, best_key = (k1, k2), key
    return best


def _balanced_hash(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Count-sketch tables with orthonormal rows: bucket of every entry and its signed weight,
    and whether a sign was flipped (below: such a table differs from earlier versions')."""
    buckets = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    signs = torch.randint(0, 2, (n,), generator=gen).mul_(2).sub_(1).float()
    flipped = k == 1 and n > 1 and bool((signs == signs[0]).all())
    if flipped:
        # One bucket of every entry, all of one sign, sums them: a classifier head's backprops,
        # which sum to 0 over the classes, sketched to exactly 0 (a 2-class head on 111 of 200
        # seeds). One sign flipped; other tables are as drawn.
        signs[-1] = -signs[-1]
    counts = torch.bincount(buckets, minlength=k).float()
    return buckets, signs / counts[buckets].sqrt(), flipped


@dataclass
class _Axis:
    """A count-sketch ``R`` (k x n) applied along one axis of a tensor."""

    buckets: torch.Tensor
    weights: torch.Tensor
    k: int
    _dense: dict = field(default_factory=dict, repr=False)

    def small(self) -> bool:
        """Whether ``R`` is cheap to hold and apply as a dense ``(k, n)`` matrix."""
        return self.k * self.buckets.numel() <= _DENSE_SKETCH_ELEMS

    def matrix(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``R`` as a dense ``(k, n)`` matrix on ``device``/``dtype``, built once and cached."""
        key = (device, dtype)
        mat = self._dense.get(key)
        if mat is None:
            mat = self._dense[key] = self.dense().to(device, dtype)
        return mat

    def apply_last(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R^T`` along the last axis: a small dense GEMM where R fits (3-5x faster than
        ``index_add`` along a strided axis on CPU), else the O(n) scatter."""
        if not self.small():
            return self.apply(x, -1)
        mat = self.matrix(x.device, x.dtype)
        if x.ndim == 3 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
            # e.g. unfolded conv input: no copy of x (a contiguous x, even (B, 1, n), is one
            # GEMM below, where this would be B matrix-vector products)
            return (mat @ x.transpose(1, 2)).transpose(1, 2)
        return x @ mat.T

    def apply(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        dim = dim % x.ndim
        shape = [1] * x.ndim
        shape[dim] = -1
        w = self.weights.to(x.device, x.dtype).view(shape)
        out = x.new_zeros(x.shape[:dim] + (self.k,) + x.shape[dim + 1 :])
        return out.index_add_(dim, self.buckets.to(x.device), x * w)

    def columns(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``R[:, index]`` on the last axis: the sketch of one-hot vectors, ``(*index, k)``."""
        out = torch.zeros(index.shape + (self.k,), dtype=dtype, device=index.device)
        b = self.buckets.to(index.device)[index].unsqueeze(-1)
        w = self.weights.to(index.device, dtype)[index].unsqueeze(-1)
        return out.scatter_(-1, b, w)

    def dense(self) -> torch.Tensor:
        n = self.buckets.numel()
        mat = torch.zeros((self.k, n), dtype=torch.float64)
        mat[self.buckets.cpu(), torch.arange(n)] = self.weights.cpu().double()
        return mat


class KroneckerTokenizer:
    """Per-parameter privacy tokens: a Kronecker count-sketch ``R_out (x) R_in`` for weights that
    are sums of outer products (see :func:`kronecker_layers`), a count-sketch for the rest.

    Same interface as :class:`~opacus_mi.tokens.CountSketchTokenizer` (``sketch``,
    ``sketch_layer``, ``dims``, ``total_dim``, ``dense_matrix``, ``state_bytes``), plus
    :meth:`factored_token`, which gives the same token from activations and backprops.

    Args:
        shapes: shape of each trainable parameter.
        token_dim: token dimensions per parameter (``k1 * k2 <= token_dim`` for Kronecker ones).
        kron: per parameter, ``(rows, cols)`` of its Kronecker factorisation or None.
        seed: hash seed; the same seed gives the same sketch on every run and device.
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size | tuple[int, ...]],
        token_dim: int,
        *,
        kron: Sequence[tuple[int, int] | None] | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        if isinstance(token_dim, bool) or not isinstance(token_dim, int) or token_dim < 1:
            raise ValueError(f"token_dim must be a positive integer, got {token_dim!r}")
        shapes = [torch.Size(s) for s in shapes]
        kron = list(kron) if kron is not None else [None] * len(shapes)
        if len(kron) != len(shapes):
            raise ValueError(f"kron has {len(kron)} entries for {len(shapes)} parameter shapes")
        self.token_dim, self.seed, self.device = token_dim, int(seed), torch.device(device)
        gen = torch.Generator().manual_seed((self.seed * 2654435761 + 97) % (1 << 63))
        self._axes: list[tuple[_Axis, _Axis] | None] = []
        self._count_index: list[int | None] = []
        count_shapes = []
        self.dims: list[int] = []
        # Tables whose one-bucket axis had a sign flipped (_balanced_hash): a checkpoint of a
        # version before that flip holds critics fitted on other tokens.
        self.sign_flips = 0
        for shape, rc in zip(shapes, kron, strict=True):
            if rc is not None and rc[0] * rc[1] != shape.numel():
                raise ValueError(f"kron factorisation {rc} does not match parameter shape {shape}")
            if rc is None:
                self._axes.append(None)
                self._count_index.append(len(count_shapes))
                count_shapes.append(shape)
                self.dims.append(min(token_dim, shape.numel()))
                continue
            k1, k2 = kronecker_dims(rc[0], rc[1], token_dim)
            (*out_tables, out_flip), (*in_tables, in_flip) = (
                _balanced_hash(rc[0], k1, gen),
                _balanced_hash(rc[1], k2, gen),
            )
            self.sign_flips += out_flip + in_flip
            out_axis, in_axis = _Axis(*out_tables, k1), _Axis(*in_tables, k2)
            self._axes.append((out_axis, in_axis))
            self._count_index.append(None)
            self.dims.append(k1 * k2)
        self._count = CountSketchTokenizer(count_shapes, token_dim, seed=seed, device=device)
        self.total_dim = sum(self.dims)
        self._dense_cache: dict[tuple, torch.Tensor] = {}  # tiny weights' one-GEMM sketches
        self.to(device)

    @classmethod
    def for_params(
        cls,
        module: nn.Module,
        params: Sequence[torch.Tensor],
        token_dim: int,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> KroneckerTokenizer:
        """Tokenizer for ``params`` (the optimizer's), Kronecker where ``module`` allows it."""
        layers = kronecker_layers(module)
        return cls(
            [p.shape for p in params],
            token_dim,
            kron=[layers.get(id(p)) for p in params],
            seed=seed,
            device=device,
        )

    def to(self, device: torch.device | str) -> KroneckerTokenizer:
        """Move the hash tables to ``device`` (in place; returns self)."""
        self.device = torch.device(device)
        for axes in self._axes:
            for ax in axes or ():
                ax.buckets, ax.weights = ax.buckets.to(self.device), ax.weights.to(self.device)
                ax._dense.clear()
        self._count.to(self.device)
        self._dense_cache.clear()
        return self

    def is_kronecker(self, layer: int) -> bool:
        return self._axes[layer] is not None

    def sketch_layer(self, layer: int, grad_sample: torch.Tensor) -> torch.Tensor:
        """Token of parameter ``layer`` for each example: ``(B, *shape) -> (B, k_layer)``."""
        axes = self._axes[layer]
        if axes is None:
            return self._count.sketch_layer(self._count_index[layer], grad_sample)
        out_axis, in_axis = axes
        batch = grad_sample.shape[0]
        rows, cols = out_axis.buckets.numel(), in_axis.buckets.numel()
        if rows * cols * self.dims[layer] <= TINY_SKETCH_ELEMS:  # one GEMM: R_out (x) R_in
            kron_t = dense_sketch_t(
                self._dense_cache, self.dense_matrix, layer, grad_sample.device, grad_sample.dtype
            )
            return grad_sample.reshape(batch, -1) @ kron_t
        g = grad_sample.reshape(batch, rows, cols)
        if out_axis.small() and in_axis.small():
            # Two small dense GEMMs beat two strided index_add passes ~3x on CPU; the axis
            # that costs less to reduce first goes first.
            r_out = out_axis.matrix(g.device, g.dtype)
            r_in = in_axis.matrix(g.device, g.dtype)
            if rows * cols * in_axis.k + out_axis.k * rows * in_axis.k <= (
                out_axis.k * rows * cols + out_axis.k * cols * in_axis.k
            ):
                part = (g.reshape(batch * rows, cols) @ r_in.T).view(batch, rows, in_axis.k)
                return torch.matmul(r_out, part).reshape(batch, -1)
            part = torch.matmul(r_out, g)  # (B, k1, cols)
            return (part.reshape(-1, cols) @ r_in.T).reshape(batch, -1)
        # Reduce the axis that shrinks most first: the second pass then runs on a small tensor.
        if in_axis.buckets.numel() * out_axis.k >= out_axis.buckets.numel() * in_axis.k:
            g = out_axis.apply(in_axis.apply(g, 2), 1)
        else:
            g = in_axis.apply(out_axis.apply(g, 1), 2)
        return g.reshape(batch, -1)

    def sketch(self, grad_samples: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer tokens of the raw per-sample gradients, a list of ``(B, k_l)`` tensors."""
        if len(grad_samples) != len(self.dims):
            raise ValueError(
                f"expected {len(self.dims)} per-sample gradient tensors, got {len(grad_samples)}"
            )
        return [self.sketch_layer(i, g) for i, g in enumerate(grad_samples)]

    def factored_token(self, layer: int, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Token of ``g_i = sum_t left_it right_it^T`` without forming ``g_i``.

        ``left`` is ``(B, T, rows)``, or ``(B, T)`` integer ids standing for one-hot rows
        (``nn.Embedding``); ``right`` is ``(B, T, cols)``. Cost ``O(B T (rows + cols + k))``.
        """
        axes = self._axes[layer]
        if axes is None:
            raise ValueError(f"parameter {layer} has no Kronecker factorisation")
        out_axis, in_axis = axes
        if left.ndim == 3 and left.shape[1] == 1 and right.shape[1] == 1:  # Linear on (B, d)
            return self.rank_one_token(layer, left[:, 0], right[:, 0])
        if left.dtype in (torch.int32, torch.int64):
            sl = out_axis.columns(left, right.dtype)
        else:
            sl = out_axis.apply_last(left)
        sr = in_axis.apply_last(right)
        return torch.bmm(sl.transpose(1, 2), sr).reshape(left.shape[0], -1)

    def rank_one_token(self, layer: int, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Token of ``g_i = left_i right_i^T`` (``(B, rows)`` and ``(B, cols)``): the outer
        product of the two sketched factors, ``O(B (rows k1 + cols k2))``."""
        axes = self._axes[layer]
        if axes is None:
            raise ValueError(f"parameter {layer} has no Kronecker factorisation")
        sl, sr = axes[0].apply_last(left), axes[1].apply_last(right)  # 2-D: plain GEMMs
        return (sl[:, :, None] * sr[:, None, :]).reshape(left.shape[0], -1)

    def dense_matrix(self, layer: int) -> torch.Tensor:
        """The sketch of ``layer`` as a dense ``(k, P)`` matrix (row-major ``vec``): for tests
        and (transposed, cached) a tiny weight's one-GEMM sketch."""
        axes = self._axes[layer]
        if axes is None:
            return self._count.dense_matrix(self._count_index[layer])
        return torch.kron(axes[0].dense(), axes[1].dense())

    def state_bytes(self) -> int:
        """Memory held by the hash tables (grows as rows + cols per Kronecker weight)."""
        total = self._count.state_bytes()
        for axes in self._axes:
            for ax in axes or ():
                total += ax.buckets.numel() * ax.buckets.element_size()
                total += ax.weights.numel() * ax.weights.element_size()
        return total


# ---------------------------------------------------------------------------- Gram matrices
def _pair_products(left: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """``left_it . left_js`` for the (flattened) positions in ``rows`` against all positions."""
    flat = left.reshape(-1) if left.ndim == 2 else left.reshape(-1, left.shape[-1])
    part = flat if rows is None else flat[rows]
    if left.ndim == 2:  # ids of one-hot vectors
        return (part[:, None] == flat[None, :]).to(torch.float32)
    return part @ flat.T


def factored_gram(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``G_ij = sum_{t,s} (left_it . left_js)(right_it . right_js)`` in row blocks, ``(B, B)``.

    Runs in ``right``'s dtype (cast the factors to float64 for an exact Gram)."""
    batch, steps = right.shape[0], right.shape[1]
    n = batch * steps
    gram = right.new_zeros((batch, batch))
    per_block = max(1, _BLOCK_ELEMS // max(1, n * steps))
    for i0 in range(0, batch, per_block):
        i1 = min(batch, i0 + per_block)
        rows = slice(i0 * steps, i1 * steps)
        uu = _pair_products(left, rows).to(right.dtype)
        vv = right.reshape(n, -1)[rows] @ right.reshape(n, -1).T
        gram[i0:i1] = (uu * vv).view(i1 - i0, steps, batch, steps).sum(dim=(1, 3))
    return gram


def _materialise(left: torch.Tensor, right: torch.Tensor, rows: int, cols: slice) -> torch.Tensor:
    """``g_i[:, cols]`` for every example, ``(B, rows, |cols|)``: Opacus's grad sampler's values."""
    part = right[..., cols]
    if left.ndim == 2:  # embedding: scatter the backprops into the rows of the ids
        batch = left.shape[0]
        out = torch.zeros((batch, rows, part.shape[-1]), dtype=part.dtype, device=part.device)
        index = left.reshape(batch, -1, 1).expand(-1, -1, part.shape[-1])
        return out.scatter_add_(1, index, part.reshape(batch, -1, part.shape[-1]))
    return torch.bmm(left.transpose(1, 2), part)  # = einsum("bti,btj->bij"), stride-friendly


def materialised_gram(left: torch.Tensor, right: torch.Tensor, rows: int) -> torch.Tensor:
    """The same Gram from per-sample gradients formed a block of columns at a time, ``(B, B)``."""
    batch, cols = right.shape[0], right.shape[-1]
    gram = right.new_zeros((batch, batch))
    per_block = max(1, _BLOCK_ELEMS // max(1, batch * rows))
    for c0 in range(0, cols, per_block):
        g = _materialise(left, right, rows, slice(c0, min(cols, c0 + per_block)))
        gram_product(g.reshape(batch, -1), into=gram)
    return gram


def gram_costs(batch: int, steps: int, rows: int, cols: int, ids: bool) -> tuple[float, float]:
    """Multiply-adds of (factored, materialised) Gram for one layer."""
    n = batch * steps
    factored = n * n * ((1 if ids else rows) + cols + 1)
    form = batch * (steps * cols * (1 if ids else rows) + rows * cols)
    return float(factored), float(form + batch * batch * rows * cols)


def layer_sqnorms(
    left: torch.Tensor,
    right: torch.Tensor,
    rows: int,
    *,
    method: str = "auto",
    exact: bool = True,
) -> torch.Tensor:
    """``|g_i|^2`` alone (float64, ``(B,)``), as ghost clipping's norms: the Gram's diagonal at
    ``B T^2 (d_in + d_out)`` or, when cheaper, from per-sample gradients in column blocks."""
    if method not in GRAM_METHODS:
        raise ValueError(f"method must be one of {GRAM_METHODS}, got {method!r}")
    dtype = torch.float64 if exact else torch.float32
    batch, steps, cols = right.shape
    right = right.to(dtype)
    ids = left.ndim == 2
    left = left if ids else left.to(dtype)
    out = torch.zeros(batch, dtype=torch.float64, device=right.device)
    if method == "auto":  # per example: T^2 (rows + cols) against forming and reading g
        r = 1 if ids else rows
        factored = steps * steps * (r + cols + 1) <= steps * cols * r + rows * cols
        method = "factored" if factored else "materialised"
    if method == "factored":
        per_block = max(1, _BLOCK_ELEMS // max(1, steps * steps))
        for i0 in range(0, batch, per_block):
            lb, rb = left[i0 : i0 + per_block], right[i0 : i0 + per_block]
            uu = (lb[:, :, None] == lb[:, None, :]).to(dtype) if ids else lb @ lb.transpose(1, 2)
            out[i0 : i0 + per_block] = (uu * (rb @ rb.transpose(1, 2))).sum(dim=(1, 2)).double()
        return out
    per_block = max(1, _BLOCK_ELEMS // max(1, batch * rows))
    for c0 in range(0, cols, per_block):
        g = _materialise(left, right, rows, slice(c0, min(cols, c0 + per_block)))
        out += g.reshape(batch, -1).pow(2).sum(dim=1).double()
    return out


def layer_gram(
    left: torch.Tensor, right: torch.Tensor, rows: int, *, method: str = "auto", exact: bool = True
) -> torch.Tensor:
    """Gram of ``g_i = sum_t left_it right_it^T`` (float64, ``(B, B)``) by the cheaper method.

    ``exact=False`` runs the products in float32 (relative error ~1e-7, as
    :func:`~opacus_mi.views.clipped_gram`)."""
    if method not in GRAM_METHODS:
        raise ValueError(f"method must be one of {GRAM_METHODS}, got {method!r}")
    dtype = torch.float64 if exact else torch.float32
    right = right.to(dtype)
    ids = left.ndim == 2
    left = left if ids else left.to(dtype)
    if method == "auto":
        fac, mat = gram_costs(right.shape[0], right.shape[1], rows, right.shape[2], ids)
        method = "factored" if fac <= mat else "materialised"
    if method == "factored":
        return factored_gram(left, right).to(torch.float64)
    return materialised_gram(left, right, rows).to(torch.float64)


# ---------------------------------------------------------------------------- capture
@dataclass
class FactoredBatch:
    """One chunk's per-parameter raw tokens, raw Gram (optimizer parameters) and the per-sample
    gradient norms Opacus clips with (every trainable parameter of the module)."""

    tokens: list[torch.Tensor]
    gram: torch.Tensor | None  # None when the capture was told the Gram is not needed
    norms: torch.Tensor
    batch: int

    def clip_info(self, max_grad_norm: float) -> ClipInfo:
        """Opacus's ghost clip factors, ``min(1, C / (norm + 1e-6))`` (flat clipping only)."""
        factors = (float(max_grad_norm) / (self.norms + _OPACUS_EPS)).clamp(max=1.0)
        return ClipInfo(factors=factors, norms=self.norms, per_layer=False)

    def select(self, idx: torch.Tensor) -> FactoredBatch:
        """The examples in ``idx`` only (e.g. those with finite gradients)."""
        return FactoredBatch(
            tokens=[t[idx.to(t.device)] for t in self.tokens],
            gram=None
            if self.gram is None
            else self.gram[idx.to(self.gram.device)][:, idx.to(self.gram.device)],
            norms=self.norms[idx.to(self.norms.device)],
            batch=int(idx.numel()),
        )

    def clipped_gram(self, clip: ClipInfo) -> torch.Tensor:
        """``G[i, j] = <clipped g_i, clipped g_j>`` over the optimizer's parameters, float64."""
        if self.gram is None:
            raise ValueError("this batch was captured with need_gram=False: no Gram matrix")
        c = clip.factors.to(self.gram.device, torch.float64)
        return (c[:, None] * c[None, :]) * self.gram


@dataclass(eq=False)  # hashed by identity: the results are keyed by layer
class _Layer:
    module: nn.Module
    params: list[nn.Parameter]
    slots: list[int | None]  # index of each parameter among the optimizer's, None if absent
    kind: str  # "linear", "conv2d", "embedding" (factored) or "generic" (Opacus grad sampler)
    pending: list[list[torch.Tensor]] = field(default_factory=list)  # forward inputs
    n: int | None = None  # Opacus's max_batch_len, fixed at the pass's first backward call


@dataclass
class _Backward:
    """One first-pass backward call of a layer, as its hook saw it (references only)."""

    layer: _Layer
    acts: list
    back: torch.Tensor
    n: int  # Opacus's max_batch_len for this call
    scale: int | None  # mean-reduced loss: Opacus scales the backprops by n
    batch_dim: int
    last: bool  # the layer's last pending call: its results can be made
    # A generic layer's per-sample gradients, made in the hook even when the rest is deferred:
    # functorch (and a grad sampler may) read the layer's parameters, which the step changes
    # before an overlap worker gets to the call.
    done: dict | None = None

    def prepared(self) -> tuple[list, torch.Tensor]:
        """The activations and backprops batch-first, the backprops scaled as Opacus scales
        them (``n`` for a mean-reduced loss: each example's own gradient)."""
        back, acts = self.back, self.acts
        if self.scale is not None:
            back = back * self.scale
        if self.batch_dim:
            acts = [
                a.movedim(self.batch_dim, 0) if isinstance(a, torch.Tensor) else a for a in acts
            ]
            back = back.movedim(self.batch_dim, 0)
        return acts, back


def _kind(m: nn.Module) -> str:
    if type(m) is nn.Linear:
        return "linear"
    if type(m) is nn.Conv2d and m.groups == 1:
        return "conv2d"
    if type(m) is nn.Embedding:
        return "embedding"
    return "generic"


class _Results:
    """One chunk's tokens, Gram and norms, made layer by layer from its backward calls.

    Built inside the backward hooks (``defer=False``), or later from the recorded calls, on
    whichever thread measures the chunk (``defer=True``): the same calls in the same order give
    the same results either way.
    """

    def __init__(self, capture: FactoredCapture, exact: Callable[[], bool]):
        self._capture, self._exact = capture, exact
        self.calls: dict[_Layer, list[dict]] = {}
        self.clear()

    def clear(self) -> None:
        self.tokens: dict[int, torch.Tensor] = {}
        self.gram: torch.Tensor | None = None
        self.norms: dict[int, torch.Tensor] = {}  # id(param) -> (B,), every trainable param
        # id(param) -> (slot, summed per-sample gradient) of a parameter several layers share:
        # finished in batch_of, once every owner's part is in.
        self.shared: dict[int, tuple[int | None, torch.Tensor]] = {}
        self.done: set[_Layer] = set()
        self.batch: int | None = None

    def add(self, call: _Backward) -> None:
        layer = call.layer
        if call.n == 0:  # an empty Poisson batch: nothing to factor, the monitor records B = 0
            if layer in self.done:  # a pass like any other: it supersedes the last
                self.clear()
            self.done.add(layer)
            self.calls.pop(layer, None)
            self.batch = 0
            return
        done = call.done
        if done is None:
            done = self._capture._call(layer, *call.prepared(), call.n)
        self.calls.setdefault(layer, []).append(done)
        if call.last:
            self._finish(layer)

    def _finish(self, layer: _Layer) -> None:
        """All calls of the layer in this backward pass are in: tokens, Gram, norms."""
        cap = self._capture
        calls = self.calls.pop(layer)
        if layer in self.done:
            self.clear()  # a newer first backward pass supersedes the last, as in Opacus
        self.done.add(layer)
        n = max(c["n"] for c in calls)
        if self.batch is None:
            self.batch = n
        elif self.batch != n:
            raise ValueError(f"layers saw different batch sizes ({self.batch} and {n})")
        exact = bool(self._exact())
        tokens = bool(cap.need_tokens())
        grads: dict[int, torch.Tensor] = {}
        opacus_pair = None  # (left, right) of Opacus's per-sample gradient where it differs
        opacus: dict[int, torch.Tensor] = {}  # Opacus's version where it differs (its norms)
        if layer.kind == "generic":
            differs = any("opacus" in c for c in calls)
            for c in calls:  # several calls of one layer add up (Opacus pads to max_batch_len)
                for out, key in (
                    ((grads, "grads"), (opacus, "opacus")) if differs else ((grads, "grads"),)
                ):
                    for pid, g in c.get(key, c["grads"]).items():
                        acc = out.setdefault(pid, g.new_zeros((n,) + g.shape[1:]))
                        acc[: g.shape[0]] += g
        else:
            if any(c["right"].shape[0] != n for c in calls):
                raise ValueError(f"{type(layer.module).__name__} saw different batch sizes")
            # A layer called several times (weight sharing) sums over all its positions.
            left = _cat_positions([c["left"] for c in calls])
            right = _cat_positions([c["right"] for c in calls])
            if any("opacus" in c for c in calls):  # Opacus's per-sample gradient is not released
                opacus_pair = tuple(
                    _cat_positions([c.get("opacus", (c["left"], c["right"]))[k] for c in calls])
                    for k in (0, 1)
                )
            bias = getattr(layer.module, "bias", None)
            # Trainable when the capture was built (as every slot is), not now: a recording
            # may be computed after the user froze it (the step after is refused).
            if isinstance(bias, torch.Tensor) and any(bias is p for p in layer.params):
                grads[id(bias)] = left.sum(dim=1)
        for p, slot in zip(layer.params, layer.slots, strict=True):
            pid = id(p)
            factored_weight = p is getattr(layer.module, "weight", None) and layer.kind != "generic"
            if pid in cap._shared:  # this layer's part of the parameter's per-sample gradient
                part = grads.pop(pid) if pid in grads else None
                if part is None and factored_weight:
                    part = _materialise(left, right, p.shape[0], slice(None))
                if part is None:
                    raise ValueError(
                        f"no per-sample gradient for a {tuple(p.shape)} parameter of "
                        f"{type(layer.module).__name__}"
                    )
                part = part.reshape(n, -1)
                theirs = opacus.pop(pid, None)
                if opacus_pair is not None and factored_weight:
                    theirs = _materialise(*opacus_pair, p.shape[0], slice(None))
                theirs = None if theirs is None else theirs.reshape(n, -1)
                before = self.shared.get(pid)
                if before is not None:
                    if theirs is not None or before[2] is not None:
                        theirs = _or(before[2], before[1]) + _or(theirs, part)
                    part = before[1] + part
                self.shared[pid] = (slot, part, theirs)
                continue
            if pid in grads:
                theirs = opacus.pop(pid, None)
                theirs = None if theirs is None else theirs.reshape(n, -1)
                flat = grads.pop(pid).reshape(n, -1)
                token, gram, sq = self._of_flat(slot, flat, exact, tokens, theirs)
            elif factored_weight:
                token = (
                    None
                    if slot is None or not tokens
                    else cap._tokenizer.factored_token(slot, left, right)
                )
                rows, method = p.shape[0], cap.gram_method
                gram = sq = None
                if cap.need_gram:
                    gram = layer_gram(left, right, rows, method=method, exact=exact)
                    sq = gram.diagonal() if opacus_pair is None else None
                if sq is None:
                    sq = layer_sqnorms(
                        *(opacus_pair or (left, right)), rows, method=method, exact=exact
                    )
            else:
                raise ValueError(
                    f"no per-sample gradient for a {tuple(p.shape)} parameter of "
                    f"{type(layer.module).__name__}"
                )
            self._add(pid, slot, token, gram, sq)

    def _of_flat(
        self,
        slot: int | None,
        flat: torch.Tensor,
        exact: bool,
        tokens: bool,
        opacus: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Token, Gram term and squared norms of a materialised ``(B, P)`` per-sample gradient
        (the norms of ``opacus``, Opacus's version of it, where that is another tensor)."""
        cap = self._capture
        dtype = torch.float64 if exact else torch.float32
        token = None if slot is None or not tokens else cap._tokenizer.sketch_layer(slot, flat)
        f = flat.to(dtype)
        gram = (f @ f.T).to(torch.float64) if cap.need_gram else None
        if opacus is not None:
            sq = opacus.to(dtype).pow(2).sum(dim=1).double()
        else:
            sq = gram.diagonal() if gram is not None else f.pow(2).sum(dim=1).double()
        return token, gram, sq

    def _add(self, pid: int, slot: int | None, token, gram, sq: torch.Tensor) -> None:
        self.norms[pid] = sq.clamp_min(0).sqrt()
        if slot is not None:
            if token is not None:
                self.tokens[slot] = token
            if gram is not None:
                self.gram = gram if self.gram is None else self.gram + gram

    def batch_of(self) -> FactoredBatch:
        """The chunk's :class:`FactoredBatch` (every layer finished)."""
        cap = self._capture
        if self.batch is None:
            raise RuntimeError(
                "no activations/backprops were captured for this step: run the forward and "
                "backward pass of the module returned by make_private before optimizer.step() "
                "(a monitor attached after this step's forward sees none until the next step)"
            )
        batch = self.batch
        if batch == 0:
            return FactoredBatch(tokens=[], gram=None, norms=torch.zeros(0), batch=0)
        if self.shared:  # every owner's part is in: a shared parameter's gradient is their sum
            exact, tokens = bool(self._exact()), bool(cap.need_tokens())
            for pid, (slot, flat, opacus) in self.shared.items():
                self._add(pid, slot, *self._of_flat(slot, flat, exact, tokens, opacus))
            self.shared = {}
        device = next(iter(self.norms.values())).device
        tokens = []
        for slot, dim in enumerate(cap._tokenizer.dims if self.tokens else ()):  # () unwanted
            t = self.tokens.get(slot)  # a layer unused in this forward has zero gradient
            tokens.append(
                t
                if t is not None
                else torch.zeros((batch, dim), device=device, dtype=torch.float32)
            )
        pids = dict.fromkeys(id(p) for layer in cap._layers.values() for p in layer.params)
        norms_list = [self.norms.get(pid) for pid in pids]  # a shared parameter counted once
        norms = torch.stack(
            [
                x if x is not None else torch.zeros(batch, dtype=torch.float64, device=device)
                for x in norms_list
            ]
        ).norm(2, dim=0)
        gram = self.gram
        if gram is None and cap.need_gram:  # no optimizer parameter was used: all zero
            gram = torch.zeros((batch, batch), dtype=torch.float64, device=device)
        return FactoredBatch(tokens=tokens, gram=gram, norms=norms, batch=batch)


@dataclass
class FactoredRecording:
    """A chunk's first-pass backward calls, recorded by hooks that did nothing else
    (``FactoredCapture(defer=True)``): :meth:`compute` makes the :class:`FactoredBatch` later,
    on an overlap worker, from tensors the hooks only referenced."""

    capture: FactoredCapture
    calls: list[_Backward]
    exact: bool
    error: BaseException | None = None

    def compute(self) -> FactoredBatch:
        if self.error is not None:
            raise RuntimeError(
                f"factored capture failed in a backward hook: {self.error!r}"
            ) from self.error
        results = _Results(self.capture, lambda: self.exact)
        try:
            for call in self.calls:
                results.add(call)
        except Exception as exc:  # the error the hooks would have kept, raised the same way
            raise RuntimeError(f"factored capture failed in a backward hook: {exc!r}") from exc
        return results.batch_of()


class FactoredCapture:
    """Hooks that keep each layer's activations and first-pass backprops (Opacus ghost mode)
    and turn them, layer by layer, into raw tokens, the raw Gram and per-sample norms.

    Only reads: the hooks return None and touch no Opacus state; the second (clip-reweighted)
    backward pass of ghost clipping, run while Opacus's hooks are disabled, is ignored. Work
    happens only on monitored steps (``active()`` at forward time). An error inside a hook is
    kept and raised by :meth:`take`, never inside the user's ``backward``.

    Args:
        module: the ``GradSampleModuleFastGradientClipping`` from ``make_private``.
        params: the optimizer's parameters (tokens and Gram are over these, in this order).
        tokenizer: a :class:`KroneckerTokenizer` for ``params``.
        active: whether the current step is monitored.
        exact: whether the Gram must be computed in float64 (else float32, accumulated in float64).
        gram: ``"auto"`` (cheaper per layer), ``"factored"`` or ``"materialised"``.
        need_gram: False skips the B x B Gram (only norms, for the clip factors, and tokens).
        need_tokens: whether this step's tokens are wanted (False: none are made; a monitor
            without learned critics has nothing that reads them).
        defer: the hooks only keep references to each layer's inputs and backprops, and
            :meth:`take` returns a :class:`FactoredRecording` to compute later (the monitor's
            overlap worker). The chunk's factors then stay alive until it is computed, where
            otherwise each layer's are dropped as soon as its backward call is done.
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[torch.Tensor],
        tokenizer: KroneckerTokenizer,
        *,
        active: Callable[[], bool] = lambda: True,
        exact: Callable[[], bool] = lambda: True,
        gram: str = "auto",
        need_gram: bool = True,
        need_tokens: Callable[[], bool] = lambda: True,
        defer: bool = False,
    ):
        if gram not in GRAM_METHODS:
            raise ValueError(f"gram must be one of {GRAM_METHODS}, got {gram!r}")
        if len(tokenizer.dims) != len(params):
            raise ValueError(
                f"tokenizer has {len(tokenizer.dims)} parameters, the optimizer {len(params)}"
            )
        self._gsm, self._tokenizer = module, tokenizer
        self._active, self._exact, self.gram_method = active, exact, gram
        self.need_gram, self.need_tokens, self.defer = need_gram, need_tokens, defer
        # (layer, pending inputs it held) at the start of a forward not yet returned
        self._unfinished: list[tuple[_Layer, int]] | None = None
        self._params = list(params)
        slot_of = {id(p): i for i, p in enumerate(self._params)}
        self._layers: dict[nn.Module, _Layer] = {}
        covered: set[int] = set()
        for m in module.iterate_submodules(module._module):
            if type(m) in (DPRNN, DPLSTM, DPGRU):
                continue  # their RNNLinear cells are hooked instead (as Opacus does)
            # A module with a grad sampler makes its own parameters' rows (Opacus hooks its
            # children too); one it leaves to functorch, its whole subtree's.
            recurse = type(m) not in module.GRAD_SAMPLERS
            ps = [p for p in m.parameters(recurse=recurse) if p.requires_grad]
            slots = [slot_of.get(id(p)) for p in ps]
            covered.update(s for s in slots if s is not None)
            kind = _kind(m)
            weight_slot = slot_of.get(id(getattr(m, "weight", None)))
            if weight_slot is not None and not tokenizer.is_kronecker(weight_slot):
                kind = "generic"  # the tokenizer count-sketches this weight: materialise it
            self._layers[m] = _Layer(m, ps, slots, kind)
        # Parameters several layers own (tied weights): their per-sample gradient is the sum of
        # the owners' parts, so it is materialised and finished once all are in.
        owners = collections.Counter(id(p) for layer in self._layers.values() for p in layer.params)
        self._shared = {pid for pid, count in owners.items() if count > 1}
        missing = [i for i in range(len(self._params)) if i not in covered]
        if missing:
            raise ValueError(
                f"optimizer parameters {missing} belong to no layer Opacus hooks in this module; "
                "pass the module and optimizer returned by the same make_private call"
            )
        self._handles = []
        for m in self._layers:
            self._handles.append(m.register_forward_hook(GuestHook(self._forward_hook)))
            self._handles.append(m.register_full_backward_hook(GuestHook(self._backward_hook)))
        self._reset()

    # ------------------------------------------------------------------ hooks
    def _reset(self) -> None:
        """Forget everything: results, recorded calls, the error and half-finished passes."""
        self.discard_passes()
        self.new_step()
        for layer in self._layers.values():
            layer.pending.clear()
            layer.n = None
        self._unfinished = None

    def discard_passes(self) -> None:
        """Forget the backward passes made so far (results, recorded calls, their error), not
        the inputs of forwards whose backward is still to come."""
        self._results = _Results(self, self._exact)
        self._recorded: list[_Backward] = []
        self._error: BaseException | None = None

    def _forward_hook(self, m: nn.Module, inputs, _output) -> None:
        # Opacus's capture condition (ghost mode), plus: only on monitored steps.
        if (
            not requires_grad(m)
            or not m.training
            or not torch.is_grad_enabled()
            or not self._gsm.hooks_enabled
        ):
            return
        try:
            if not self._active():
                return
        except Exception as exc:  # never break the user's forward
            self._error = self._error or exc
            return
        self._layers[m].pending.append(
            [keep_input(t, later=self.defer) if isinstance(t, torch.Tensor) else t for t in inputs]
        )

    def begin_forward(self) -> None:
        """A forward of the module starts: if it raises, the inputs its layers that ran kept
        are dropped at the next forward or backward (no backward takes them; the next one
        popped them for its own, or its layers never finished, and its step lost them from
        its tokens and Gram, or failed)."""
        self.end_forward()
        self._unfinished = [(layer, len(layer.pending)) for layer in self._layers.values()]

    def end_forward(self) -> None:
        """The forward returned (or one that raised is let go of: its inputs dropped)."""
        for layer, held in self._unfinished or ():
            del layer.pending[held:]
        self._unfinished = None

    def returned(self) -> None:
        self._unfinished = None

    def _backward_hook(self, m: nn.Module, _grad_input, grad_output) -> None:
        if self._unfinished is not None:
            self.end_forward()  # (a forward that raised since the last one returned)
        if not self._gsm.hooks_enabled:
            if self.opened:  # ghost clipping's second, clip-reweighted pass
                self.reweighted, self.opened, self.zeroed = True, False, False
                self.passes += 1
            return  # (or a plain backward with Opacus's hooks disabled: neither pass)
        if not self.opened or self.zeroed:
            # A first pass begins (after a zero_grad a pass never continues: Opacus's own is
            # followed by its second pass, with the hooks off)
            self.firsts += 1
            self.reweighted, self.opened, self.zeroed = False, True, False
        layer = self._layers[m]
        if not layer.pending:
            return
        try:
            # Opacus's rule (rearrange_grad_samples): its RNN cells see (B, d) steps whatever
            # batch_first says.
            batch_dim = 0 if self._gsm.batch_first or type(m) is RNNLinear else 1
            if layer.n is None:
                # Opacus's max_batch_len: set at the pass's first call, over all of its calls,
                # and kept for the rest (a packed bidirectional RNN's reverse cells pop their
                # longest step first)
                layer.n = max(a[-1].shape[batch_dim] for a in layer.pending)
            n = layer.n
            acts = layer.pending.pop()
            if not layer.pending:
                layer.n = None
            call = _Backward(
                layer,
                acts,
                grad_output[0].detach(),
                n,
                n if self._gsm.loss_reduction == "mean" else None,
                batch_dim,
                last=not layer.pending,
            )
            if self.defer:
                if layer.kind == "generic" and n:  # (see _Backward.done)
                    with without_autocast():
                        call.done = self._call(layer, *call.prepared(), n)
                self._recorded.append(call)
            else:
                with without_autocast():  # (the user's backward may run under autocast)
                    self._results.add(call)
        except Exception as exc:  # never break the user's backward: report it at take()
            if self._error is None:
                self._error = exc
            layer.pending.clear()
            layer.n = None
            self._results.calls.pop(layer, None)

    # ------------------------------------------------------------------ per layer
    def _call(self, layer: _Layer, acts: list, back: torch.Tensor, n: int) -> dict:
        """Factors (or per-sample gradients) of one call of the layer."""
        m, batch = layer.module, back.shape[0]
        if layer.kind == "generic":  # what Opacus itself runs for this layer in ghost mode
            if not self._gsm.force_functorch and type(m) in self._gsm.GRAD_SAMPLERS:
                fn = self._gsm.GRAD_SAMPLERS[type(m)]
            else:
                fn = ft_compute_per_sample_gradient
            grads = {id(p): _widen(g) for p, g in fn(m, acts, back).items()}
            other_mode = zero_padded_by_opacus(m)
            if fn is not ft_compute_per_sample_gradient and (
                other_mode or misread_by_opacus(m, acts[0])
            ):
                # (as for Conv2d below) Opacus's norms; the released per-sample gradients are
                # its sampler's on the input in its own layout, padded as the layer pads
                first, layer = acts[0].contiguous(), m
                if other_mode:
                    first = nn.functional.pad(
                        first, m._reversed_padding_repeated_twice, mode=m.padding_mode
                    ).contiguous()
                    layer = copy.copy(m)  # (shares the parameters, the grads' keys)
                    layer.padding, layer.padding_mode = (0,) * len(m.kernel_size), "zeros"
                released = fn(layer, [first, *acts[1:]], back)
                return {
                    "n": n,
                    "grads": {id(p): _widen(g) for p, g in released.items()},
                    "opacus": grads,
                }
            return {"n": n, "grads": grads}
        back, a = _widen(back), acts[0]
        call: dict[str, Any] = {"n": n}
        if layer.kind == "embedding":
            left, right = a.reshape(batch, -1).long(), back.reshape(batch, -1, m.embedding_dim)
            if m.padding_idx is not None:
                # Opacus's grad sampler and norm sampler give the padding row its tokens'
                # backprops; the second pass, which is what ghost clipping releases, gives it
                # none. Norms (hence clip factors) as Opacus's, tokens and Gram as released.
                if opacus_samples(self._gsm, m):  # (else functorch's true ones: the same)
                    call["opacus"] = (left, right)
                right = right.masked_fill((left == m.padding_idx)[..., None], 0)
        elif layer.kind == "linear":
            left = back.reshape(batch, -1, m.out_features)
            right = a.to(back.dtype).reshape(batch, -1, m.in_features)
        else:  # conv2d, unfolded exactly as Opacus's conv grad sampler does
            left = back.reshape(batch, m.out_channels, -1).transpose(1, 2)
            a = a.to(back.dtype)
            right = self._unfold(m, a, m.padding)
            other_mode = zero_padded_by_opacus(m)
            if other_mode or misread_by_opacus(m, a):
                # Opacus unfolds with zeros whatever the mode, and reads the input as if it
                # were NCHW-contiguous (its norms, hence clip factors); the second pass
                # differentiates the layer's own padding of the input in its own layout.
                if opacus_samples(self._gsm, m):  # (else functorch's true ones: the same)
                    call["opacus"] = (left, right)
                if other_mode:
                    padded = nn.functional.pad(
                        a.contiguous(), m._reversed_padding_repeated_twice, mode=m.padding_mode
                    )
                    right = self._unfold(m, padded.contiguous(), (0, 0))
                else:
                    right = self._unfold(m, a.contiguous(), m.padding)
        call.update(left=left, right=right)
        return call

    @staticmethod
    def _unfold(m: nn.Conv2d, a: torch.Tensor, padding) -> torch.Tensor:
        cols = unfold2d(
            a, kernel_size=m.kernel_size, padding=padding, stride=m.stride, dilation=m.dilation
        )
        return cols.transpose(1, 2)

    # ------------------------------------------------------------------ results
    def take(self) -> FactoredBatch | FactoredRecording:
        """This chunk's tokens, Gram and norms (or, with ``defer``, the recording to compute
        them from); resets the capture for the next chunk."""
        try:
            if self.defer:
                return FactoredRecording(
                    self, self._recorded, bool(self._exact()), error=self._error
                )
            if self._error is not None:
                raise RuntimeError(
                    f"factored capture failed in a backward hook: {self._error!r}"
                ) from self._error
            return self._results.batch_of()
        finally:
            self._reset()

    def new_step(self) -> None:
        """A new optimizer step (measured or not): no pass is under way."""
        # Ghost clipping's second pass is the latest to have run: a whole loss.backward() is
        # in, whose gradients the next zero_grad discards unless a step reads them first.
        self.reweighted = False
        self.opened = False  # a first pass ran with no second pass after it (yet)
        self.zeroed = False  # a zero_grad came since that first pass began
        # First passes begun and second passes finished, ever (forwards are stamped with the
        # former: see LeakageMonitor._zero_grad).
        self.firsts = getattr(self, "firsts", 0)
        self.passes = getattr(self, "passes", 0)

    def discard(self) -> None:
        """Forget what was captured since the last :meth:`take` (forwards no step will take)."""
        self._reset()

    def remove(self) -> None:
        """Remove every hook this capture registered."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._reset()


def _cat_positions(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def zero_padded_by_opacus(m: nn.Module) -> bool:
    """Opacus's conv grad sampler unfolds with zeros whatever the layer's ``padding_mode``:
    its per-sample gradient (hence norm) is not the one autograd's second pass releases."""
    return (
        isinstance(m, nn.modules.conv._ConvNd)
        and m.padding_mode != "zeros"
        and any(m._reversed_padding_repeated_twice)  # (no padding: nothing differs)
    )


def misread_by_opacus(m: nn.Module, a: torch.Tensor) -> bool:
    """Opacus's ``unfold2d`` reads its zero-padded Conv2d input with NCHW-contiguous strides
    (``as_strided``): an input in another layout that ``F.pad`` keeps (channels_last, a
    transposed view; a strided one is copied) is unfolded from the wrong entries, so its
    per-sample gradient (hence norm) is not the one autograd's second pass releases."""
    if not isinstance(m, nn.Conv2d) or a.is_contiguous():
        return False
    # (F.pad's output layout, as unfold2d pads, found on a tensor without data)
    probe = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
    pads = m._reversed_padding_repeated_twice
    return not nn.functional.pad(probe, pads).is_contiguous()


def opacus_samples(gsm: nn.Module, m: nn.Module) -> bool:
    """Whether Opacus computes ``m``'s per-sample norms with its own norm or grad sampler (as
    in ``GradSampleModuleFastGradientClipping.capture_backprops_hook``), not functorch's true
    per-sample gradients (``force_functorch``, or no sampler)."""
    if getattr(gsm, "use_ghost_clipping", False) and type(m) in getattr(gsm, "NORM_SAMPLERS", {}):
        return True
    return not getattr(gsm, "force_functorch", False) and type(m) in gsm.GRAD_SAMPLERS


def _or(x: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return default if x is None else x


def _widen(x: torch.Tensor) -> torch.Tensor:
    """Half-precision factors are sketched in float32 (as the monitor does with grad_sample)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ------------------------------------------------------------------ hooks mode: rank-one layers


def rank_one_backprop(grad_sample: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``b_i`` with ``g_i = b_i a_i^T`` for a Linear layer on a 2-D input, ``(B, d_out)``.

    Read back from Opacus's own ``grad_sample`` in one pass (``b_i = g_i a_i / |a_i|^2``,
    ``B d_out d_in`` operations). An example whose input is all zeros has a zero gradient and
    gets ``b_i = 0``.
    """
    a = inputs.to(grad_sample.dtype)
    sq = (a * a).sum(dim=1)
    b = torch.bmm(grad_sample, a.unsqueeze(2)).squeeze(2)
    return b / torch.where(sq > 0, sq, 1.0)[:, None]


def rank_one_gram(
    grad_sample: torch.Tensor, inputs: torch.Tensor, backprop: torch.Tensor | None = None
) -> torch.Tensor:
    """Gram of a Linear layer's per-sample weight gradients ``g_i = b_i a_i^T`` (2-D input).

    ``<g_i, g_j> = (b_i . b_j)(a_i . a_j)``: ``B^2 (d_out + d_in)`` operations instead of the
    ``B^2 d_out d_in`` of the direct GEMM. ``backprop`` is ``b`` if already known (e.g. the
    bias's per-sample gradient), else it is read back with :func:`rank_one_backprop`.
    """
    device, dtype = grad_sample.device, grad_sample.dtype
    a = inputs if inputs.device == device and inputs.dtype == dtype else inputs.to(device, dtype)
    if backprop is None:
        b = rank_one_backprop(grad_sample, a)
    elif backprop.device == device and backprop.dtype == dtype:
        b = backprop
    else:
        b = backprop.to(device, dtype)
    return (b @ b.T).mul_(a @ a.T)


class LinearInputs:
    """Inputs of the model's ``nn.Linear`` layers on monitored forwards (hooks/functorch mode).

    A Linear layer applied once, to a ``(B, d_in)`` input, has rank-one per-sample weight
    gradients, whose Gram matrix :func:`rank_one_gram` forms from that input and ``grad_sample``
    far more cheaply than a GEMM over ``d_out x d_in``. The hooks keep the input (a copy where
    :func:`keep_input` makes one for a later read: a tensor the loop owns, its batch) and only
    on forwards the monitor will measure (as Opacus, none while the GradSampleModule's hooks
    are disabled); a layer applied more than once, or to inputs with more dimensions, is left
    to the GEMM. The copy is made inline too: a batch written in place between ``backward()``
    and ``step()`` (an adversarial perturbation, a refilled buffer; through ``.data`` or NumPy
    too, which no version counter sees) gave a Gram of what ``grad_sample`` was not made from.
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[torch.Tensor],
        active: Callable[[], bool],
        *,
        stamp: Callable[[], Any] = lambda: None,
    ):
        index = {id(p): i for i, p in enumerate(params)}
        self._gsm, self._active, self._stamp = module, active, stamp
        # Per parameter index, each forward's (stamp, input or None): see FeatureCapture's
        # stamps.
        self._seen: dict[int, list[tuple[Any, torch.Tensor | None]]] = {}
        self._handles = []
        # Weight index -> bias index: a Linear layer's per-sample bias gradient on a 2-D input
        # is exactly its backprop ``b_i`` (Opacus sums backprops over no positions).
        self.bias_of: dict[int, int] = {}
        # Only where the Linear's own Opacus hook makes its grad_sample, from that one call. A
        # module with parameters of its own hides its subtree from Opacus (its functorch
        # fallback's gradient holds every use of the weight there, F.linear calls included),
        # as Expanded Weights (ew) records every use; and a weight other hooked modules also
        # hold (tied to an embedding, say) gets their parts too. Those are left to the GEMM.
        hooked = (
            list(module.iterate_submodules(module._module))
            if isinstance(module, GradSampleModule)
            else []
        )
        owners = collections.Counter(id(p) for m in hooked for _, p in trainable_parameters(m))
        for m in hooked:
            if type(m) is nn.Linear and id(m.weight) in index and owners[id(m.weight)] == 1:
                layer = index[id(m.weight)]
                self._handles.append(m.register_forward_hook(GuestHook(self._hook(layer))))
                if m.bias is not None and id(m.bias) in index and owners[id(m.bias)] == 1:
                    self.bias_of[layer] = index[id(m.bias)]

    def _hook(self, layer: int):
        def hook(m: nn.Module, args: tuple, _output) -> None:
            if (
                m.training
                and torch.is_grad_enabled()
                and self._gsm.hooks_enabled  # (Opacus skips these forwards: so does its gradient)
                and self._active()
                and args
            ):
                x = args[0]
                # Kept only where take() can use it: a 2-D input (a copy of a sequence batch
                # was made at every measured step and thrown away). A layer's second call in a
                # step is kept too: keep() may drop its first (a forward of a skipped step).
                useful = isinstance(x, torch.Tensor) and x.ndim == 2
                kept = keep_input(x, later=True) if useful else None
                self._seen.setdefault(layer, []).append((self._stamp(), kept))

        return hook

    def take(self) -> dict[int, torch.Tensor]:
        """Per parameter index, the one 2-D input its layer saw since the last call."""
        seen, self._seen = self._seen, {}
        return {k: v[0][1] for k, v in seen.items() if len(v) == 1 and v[0][1] is not None}

    def keep(self, stamped: Callable[[Any], bool]) -> None:
        """Keep only the inputs of forwards whose stamp passes ``stamped``."""
        kept = {k: [e for e in v if stamped(e[0])] for k, v in self._seen.items()}
        self._seen = {k: v for k, v in kept.items() if v}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._seen = {}  # (inputs no step will take now)
