"""Privacy tokens: compact, seeded linear embeddings of per-sample gradients.

A count-sketch maps each parameter tensor's P entries onto ``k = min(token_dim, P)`` buckets with a
balanced hash (every bucket gets floor or ceil of P/k entries) and random signs, each row scaled
to unit norm. Rows have disjoint supports, so they are orthonormal: the sketch of isotropic
Gaussian noise N(0, s^2 I_P) is exactly N(0, s^2 I_k). That is why the private view can be
tokenised as ``S(clipped) + N(0, sigma^2 C^2 I_k)``, drawing noise in k dimensions, never in P.

State is O(P) integers and signs per parameter, never a dense P x k matrix, and the sketch is
linear, so ``token(c_i g_i) = c_i token(g_i)``: one sketch serves the raw, clipped and private
views.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Below this many entries (P x k) a sketch is one dense GEMM: at that size the time is the
# number of tensor operations, not their arithmetic.
TINY_SKETCH_ELEMS = 1 << 14


def dense_sketch_t(
    cache: dict[tuple, torch.Tensor],
    dense_matrix: Callable[[int], torch.Tensor],
    layer: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A tiny parameter's sketch as a dense ``(P, k)`` matrix (``dense_matrix(layer).T``) on
    ``device``/``dtype``, made once and kept in ``cache`` (both tokenizers' one-GEMM path)."""
    key = (layer, device, dtype)
    mat = cache.get(key)
    if mat is None:
        mat = cache[key] = dense_matrix(layer).T.contiguous().to(device, dtype)
    return mat


class CountSketchTokenizer:
    """Seeded per-parameter count-sketch with orthonormal rows.

    Args:
        shapes: shape of each trainable parameter (per-sample gradients add a batch dim).
        token_dim: buckets per parameter (parameters with fewer entries keep all of them).
        seed: hash seed; the same seed gives the same sketch on every run and device.
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size | tuple[int, ...]],
        token_dim: int,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        if token_dim < 1:
            raise ValueError(f"token_dim must be a positive integer, got {token_dim}")
        self.token_dim = int(token_dim)
        self.seed = int(seed)
        self.device = torch.device(device)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self._buckets: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        self.dims: list[int] = []
        for shape in shapes:
            numel = 1
            for s in shape:
                numel *= int(s)
            k = min(self.token_dim, numel)
            # Balanced hash: a random permutation of (0, 1, ..., k-1, 0, 1, ...) so that every
            # bucket is non-empty and row norms are as equal as possible.
            buckets = torch.arange(numel) % k
            buckets = buckets[torch.randperm(numel, generator=gen)]
            signs = torch.randint(0, 2, (numel,), generator=gen).mul_(2).sub_(1).float()
            counts = torch.bincount(buckets, minlength=k).float()
            weights = signs / counts[buckets].sqrt()
            self._buckets.append(buckets.to(self.device))
            self._weights.append(weights.to(self.device))
            self.dims.append(k)
        self.total_dim = sum(self.dims)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._dense_cache: dict[tuple, torch.Tensor] = {}  # tiny parameters' one-GEMM sketches

    def to(self, device: torch.device | str) -> CountSketchTokenizer:
        """Move the hash tables to ``device`` (in place; returns self)."""
        self.device = torch.device(device)
        self._buckets = [b.to(self.device) for b in self._buckets]
        self._weights = [w.to(self.device) for w in self._weights]
        self._cache, self._dense_cache = {}, {}
        return self

    def sketch_layer(self, layer: int, grad_sample: torch.Tensor) -> torch.Tensor:
        """Token of parameter ``layer`` for each example: ``(B, *shape) -> (B, k_layer)``."""
        batch = grad_sample.shape[0]
        flat = grad_sample if grad_sample.ndim == 2 else grad_sample.reshape(batch, -1)
        numel = self._buckets[layer].numel()
        if flat.shape[1] != numel:
            raise ValueError(
                f"parameter {layer} has {flat.shape[1]} entries per example but the sketch was "
                f"built for {numel}"
            )
        if numel * self.dims[layer] <= TINY_SKETCH_ELEMS:
            # A bias or a norm's scale: one GEMM with the dense (P, k) sketch (the scatter
            # takes three operations, and at this size each costs more than its arithmetic).
            dense_t = dense_sketch_t(
                self._dense_cache, self.dense_matrix, layer, flat.device, flat.dtype
            )
            return flat @ dense_t
        buckets, weights = self._tables(layer, flat.device, flat.dtype)
        out = torch.zeros((batch, self.dims[layer]), dtype=flat.dtype, device=flat.device)
        return out.index_add_(1, buckets, flat * weights)

    def _tables(self, layer: int, device: torch.device, dtype: torch.dtype):
        """Hash tables on the gradient's device and dtype, converted once and then cached."""
        key = (layer, device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = (self._buckets[layer].to(device), self._weights[layer].to(device, dtype))
            self._cache[key] = hit
        return hit

    def sketch(self, grad_samples: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer tokens of the raw per-sample gradients, a list of ``(B, k_l)`` tensors."""
        if len(grad_samples) != len(self.dims):
            raise ValueError(
                f"expected {len(self.dims)} per-sample gradient tensors, got {len(grad_samples)}"
            )
        return [self.sketch_layer(i, g) for i, g in enumerate(grad_samples)]

    def dense_matrix(self, layer: int) -> torch.Tensor:
        """The sketch of ``layer`` as a dense ``(k, P)`` matrix: for tests and small layers only."""
        numel = self._buckets[layer].numel()
        mat = torch.zeros((self.dims[layer], numel), dtype=torch.float64)
        mat[self._buckets[layer].cpu(), torch.arange(numel)] = self._weights[layer].cpu().double()
        return mat

    def state_bytes(self) -> int:
        """Memory held by the hash tables (grows as P, not P x token_dim)."""
        return sum(b.numel() * b.element_size() for b in self._buckets) + sum(
            w.numel() * w.element_size() for w in self._weights
        )
