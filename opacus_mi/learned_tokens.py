"""Learned privacy tokens: trainable encoders over the per-layer count-sketch tokens.

The source paper ("privacy tokens", arXiv 2502.02913) turns gradients into tokens with a learned
gradient extractor, an autoencoder or a Transformer, whose output the MINE network pairs with
data features. Here the extractor sits on top of the seeded count-sketch (which is what keeps
the private view's noise exact and the cost O(B x P)): the monitor's token for one example is
the concatenation of per-layer sketch tokens ``[t_1 | t_2 | ... | t_L]`` with ``t_l`` of
``k_l = layer_dims[l]`` dimensions, and a learned encoder maps it to the vector the critic's
token tower ``psi`` reads.

* :class:`LayerAutoencoder`: per layer an encoder ``k_l -> code`` and a decoder
  ``code -> k_l``; the codes are concatenated. Trained by the critic's loss through the codes
  plus a reconstruction loss on the (standardised) sketch tokens, so the code keeps what the
  layer's token holds even before the critic has found what matters.
* :class:`LayerTransformer`: per layer a linear projection ``k_l -> d_model`` plus a learned
  layer embedding; a small ``nn.TransformerEncoder`` runs over the sequence of L layer tokens,
  and the outputs are pooled (mean, or flattened) into the token.

Both are trained online together with the critic, by the critic's own Adam, on the critic's
schedule (:class:`~opacus_mi.estimators.online.OnlineEstimator` with ``token_encoder=...``).

The guest rule holds: every weight is drawn from the monitor's ``torch.Generator``
(``nn.TransformerEncoderLayer`` is built with ``skip_init``, which allocates without drawing,
then filled from the generator), dropout is 0, so building and training never touch the global
RNG that the user's training draws from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .checks import is_int_at_least, python_number
from .estimators.critics import DTYPE, ELU, SeparableCritic, _linear, _mlp

TOKEN_ENCODERS: tuple[str, ...] = ("sketch", "autoencoder", "transformer")


def check_layer_dims(layer_dims: Sequence[int] | None, y_dim: int | None = None) -> list[int]:
    """``layer_dims`` as a list of positive ints, checked against the token width ``y_dim``."""
    if layer_dims is None:
        raise ValueError(
            "layer_dims is required for a learned token encoder: the per-layer token sizes, "
            "e.g. CountSketchTokenizer(...).dims"
        )
    # (Each an int as given: int() made 2.5 a 2, "64" the sizes 6 and 4, and True a 1.)
    try:
        dims = [] if isinstance(layer_dims, (str, bytes)) else list(map(python_number, layer_dims))
    except TypeError:  # (not a list at all: 64)
        dims = []
    if not dims or not all(is_int_at_least(d, 1) for d in dims):
        raise ValueError(
            "layer_dims must be a non-empty list of positive integer sizes (the tokenizer's "
            f"dims); got {layer_dims!r}"
        )
    if y_dim is not None and sum(dims) != y_dim:
        raise ValueError(
            f"layer_dims sum to {sum(dims)} but the tokens have {y_dim} dimensions; pass the "
            "tokenizer's own dims (the per-layer sizes the tokens were concatenated from)"
        )
    return dims


def split_layers(y: torch.Tensor, layer_dims: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Split concatenated tokens ``(n, sum k_l)`` into the per-layer tokens ``(n, k_l)``."""
    dims = check_layer_dims(layer_dims, y.shape[-1])
    return torch.split(y, dims, dim=-1)


@torch.no_grad()
def _fill_uniform(p: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    # Drawn on the generator's device, then moved: the same numbers on every device.
    v = torch.empty(p.shape, device=generator.device, dtype=DTYPE)
    v.uniform_(-bound, bound, generator=generator)
    p.copy_(v)


class TokenEncoder(nn.Module):
    """Base of the learned token encoders: ``(n, sum k_l) -> (n, out_dim)``.

    ``aux_loss()`` is the encoder's own training term for the last forward pass in training
    mode (zero if it has none); the online estimator adds it to the critic's loss.
    """

    out_dim: int

    def __init__(self, layer_dims: Sequence[int]):
        super().__init__()
        self.layer_dims = check_layer_dims(layer_dims)
        self._aux: torch.Tensor | None = None

    def aux_loss(self) -> torch.Tensor | None:
        aux, self._aux = self._aux, None
        return aux


class LayerAutoencoder(TokenEncoder):
    """Per-layer autoencoders; the token is the concatenation of the layer codes.

    Args:
        layer_dims: per-layer sketch token sizes ``k_l``.
        code: code size per layer.
        hidden: hidden width of each layer's encoder and decoder.
        recon_weight: weight of the reconstruction loss (mean squared error on standardised
            tokens, averaged over layers) added to the critic's loss.
    """

    def __init__(
        self,
        layer_dims: Sequence[int],
        *,
        code: int = 8,
        hidden: int = 32,
        recon_weight: float = 1.0,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ):
        super().__init__(layer_dims)
        self.code, self.recon_weight = code, float(recon_weight)
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()

        def one_hidden(d_in: int, d_out: int) -> nn.Sequential:
            return nn.Sequential(
                _linear(d_in, hidden, generator, device),
                ELU(),
                _linear(hidden, d_out, generator, device),
            )

        for k in self.layer_dims:  # encoder, then decoder: the generator's order is kept
            self.encoders.append(one_hidden(k, code))
            self.decoders.append(one_hidden(code, k))
        self.out_dim = code * len(self.layer_dims)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        parts = split_layers(y, self.layer_dims)
        codes = [enc(p) for enc, p in zip(self.encoders, parts, strict=True)]
        if self.training and self.recon_weight > 0:
            recon = [
                (dec(c) - p).pow(2).mean()
                for dec, c, p in zip(self.decoders, codes, parts, strict=True)
            ]
            self._aux = self.recon_weight * torch.stack(recon).mean()
        return torch.cat(codes, dim=-1)


class LayerTransformer(TokenEncoder):
    """A small Transformer encoder over the sequence of per-layer tokens.

    Args:
        layer_dims: per-layer sketch token sizes ``k_l``.
        d_model, heads, layers, ff: Transformer width, attention heads, encoder layers and
            feed-forward width (pre-norm, GELU, no dropout: dropout would draw from the global
            RNG and make the monitor a noisy guest).
        pool: ``"mean"`` over the L outputs (``out_dim = d_model``) or ``"flatten"``
            (``out_dim = L * d_model``, keeps which layer said what).
    """

    def __init__(
        self,
        layer_dims: Sequence[int],
        *,
        d_model: int = 32,
        heads: int = 4,
        layers: int = 1,
        ff: int = 64,
        pool: str = "flatten",
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ):
        super().__init__(layer_dims)
        if pool not in ("mean", "flatten"):
            raise ValueError(f"pool must be 'mean' or 'flatten'; got {pool!r}")
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.pool = pool
        self.proj = nn.ModuleList(_linear(k, d_model, generator, device) for k in self.layer_dims)
        n_layers = len(self.layer_dims)
        self.layer_embed = nn.Parameter(torch.empty(n_layers, d_model, device=device, dtype=DTYPE))
        _fill_uniform(self.layer_embed, 1.0 / math.sqrt(d_model), generator)
        block = torch.nn.utils.skip_init(
            nn.TransformerEncoderLayer,
            d_model,
            heads,
            ff,
            0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
            device=device,
            dtype=DTYPE,
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model, device=device, dtype=DTYPE)
        with torch.no_grad():
            for name, p in self.encoder.named_parameters():
                if "norm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:  # weights (out, in): uniform(+-1/sqrt(fan_in)), as nn.Linear's default
                    _fill_uniform(p, 1.0 / math.sqrt(p.shape[1]), generator)
        self.out_dim = d_model * (n_layers if pool == "flatten" else 1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        parts = split_layers(y, self.layer_dims)
        seq = torch.stack([proj(p) for proj, p in zip(self.proj, parts, strict=True)], dim=1)
        h = self.norm(self.encoder(seq + self.layer_embed))
        return h.flatten(1) if self.pool == "flatten" else h.mean(dim=1)


def build_token_encoder(
    kind: str, layer_dims: Sequence[int], *, generator: torch.Generator, device
) -> TokenEncoder:
    """The learned encoder called ``kind`` (``"autoencoder"`` or ``"transformer"``)."""
    if kind == "autoencoder":
        return LayerAutoencoder(layer_dims, generator=generator, device=device)
    if kind == "transformer":
        return LayerTransformer(layer_dims, generator=generator, device=device)
    raise ValueError(
        f"token_encoder must be one of {TOKEN_ENCODERS}; got {kind!r} ('sketch' needs no encoder)"
    )


class EncodedCritic(SeparableCritic):
    """``T(x, y) = <phi(x), psi(E(y))>``: a separable critic with a learned token encoder E.

    The encoder is the first stage of the token tower (``psi = Sequential(E, mlp)``), so the
    per-side standardisation, scoring and soft bound are the parent's, unchanged; the tokens the
    encoder sees are standardised per coordinate, which per layer is what an autoencoder or a
    projection wants (raw gradient tokens can be ~1e-4).
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        token_encoder: str,
        layer_dims: Sequence[int],
        *,
        hidden: int = 128,
        embed: int = 32,
        bound: float | None = 10.0,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ):
        dims = check_layer_dims(layer_dims, y_dim)
        super().__init__(
            x_dim,
            y_dim,
            hidden=hidden,
            embed=embed,
            bound=bound,
            generator=generator,
            device=device,
        )
        encoder = build_token_encoder(token_encoder, dims, generator=generator, device=device)
        # The parent's psi (over raw y) is replaced; its initial draws are simply not used.
        self.psi = nn.Sequential(encoder, _mlp(encoder.out_dim, hidden, embed, generator, device))
        self.token_encoder = token_encoder

    @property
    def encoder(self) -> TokenEncoder:
        return self.psi[0]

    def aux_loss(self) -> torch.Tensor | None:
        """The encoder's own training term from the last training forward (None if none)."""
        return self.encoder.aux_loss()
