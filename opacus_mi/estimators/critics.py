"""Critics ``T(features, token)`` for the variational MI bounds.

A separable critic ``T(x, y) = <phi(x), psi(y)> / sqrt(e)`` scores all n x n pairs with one
matrix product, so every batch yields n matched and n(n-1) mismatched pairs for free. It can
represent the Bayes-optimal critic of a Gaussian channel exactly (a bilinear term plus terms in x
or y alone, through a constant coordinate), which is the private view's noise model.

Parameters are initialised from the monitor's own ``torch.Generator``: building a critic never
touches the global RNG the user's training draws from.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The dtype of the estimators' modules and buffers, named rather than left to torch's default:
# their inputs are float32 whatever the user's default, and a user's
# torch.set_default_dtype(torch.float64) must change neither the figures nor whether they run.
DTYPE = torch.float32


def _linear(d_in: int, d_out: int, generator: torch.Generator, device) -> nn.Linear:
    layer = torch.nn.utils.skip_init(nn.Linear, d_in, d_out, device=device, dtype=DTYPE)
    bound = 1.0 / math.sqrt(d_in)
    with torch.no_grad():
        # Values are drawn on the generator's device, then moved: same numbers on every device.
        w = torch.empty((d_out, d_in), device=generator.device, dtype=DTYPE).uniform_(
            -bound, bound, generator=generator
        )
        b = torch.empty((d_out,), device=generator.device, dtype=DTYPE).uniform_(
            -bound, bound, generator=generator
        )
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer


# Below this exp(x) - 1 rounds to -1 in float32 and float64 (exp(-40) = 4e-18 is still a normal
# float32, never a slow denormal).
_ELU_FLOOR = -40.0


class _ELUFunction(torch.autograd.Function):
    """``elu(x) = x if x > 0 else exp(x) - 1`` from ``exp`` of a clamped input.

    torch's CPU ``elu`` goes through ``expm1``, whose AVX-512 kernel in torch 2.14 ran at ~10 ns
    per element on an AMD EPYC (Zen 5) CPU, 17x ``exp``: ELU alone was a third of a critic
    round. This form agrees with ``F.elu`` to 1 float32 ulp of 1 (6e-8, from ``exp(x) - 1`` vs
    ``expm1`` near 0); its gradient is read off the output, as torch's own ELU backward does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = torch.exp(x.clamp(_ELU_FLOOR, 0.0)).sub_(1.0).add_(x.clamp_min(0.0))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return grad * y.clamp_max(0.0).add_(1.0)  # 1 where x > 0, exp(x) = y + 1 elsewhere


class ELU(nn.Module):
    """``nn.ELU()`` (alpha 1) at the cost of one ``exp``: see :class:`_ELUFunction`. It has no
    parameters, so critics saved with ``nn.ELU`` load unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ELUFunction.apply(x)


def _mlp(d_in: int, hidden: int, d_out: int, generator: torch.Generator, device) -> nn.Sequential:
    return nn.Sequential(
        _linear(d_in, hidden, generator, device),
        ELU(),
        _linear(hidden, hidden, generator, device),
        ELU(),
        _linear(hidden, d_out, generator, device),
    )


# Up to this bound the soft bound is computed through a sigmoid (below), whose float32 rounding
# near 1/2, times 2 bound, costs ~1.5e-7 x bound in absolute terms: 1.5e-6 at the default 10,
# 1.5e-5 at 100, but 0.12 at 1e6, and at 1e8 every score rounded to 0 (estimate_mi read 0 nats
# for 0.83). Above it, bound * tanh(raw / bound) itself (~1e-6 at any bound).
_SIGMOID_MAX_BOUND = 100.0


class SeparableCritic(nn.Module):
    """``T(x, y) = <phi(x), psi(y)> / sqrt(embed)`` with per-side standardisation."""

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        *,
        hidden: int = 128,
        embed: int = 32,
        bound: float | None = 10.0,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.bound = bound
        self.x_dim, self.y_dim = x_dim, y_dim
        self.phi = _mlp(x_dim, hidden, embed, generator, device)
        self.psi = _mlp(y_dim, hidden, embed, generator, device)
        self.scale = 1.0 / math.sqrt(embed)
        for name, dim in (("x", x_dim), ("y", y_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim, device=device, dtype=DTYPE))
            self.register_buffer(f"{name}_std", torch.ones(dim, device=device, dtype=DTYPE))

    @torch.no_grad()
    def fit_scaler(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Standardise inputs with statistics of the training pairs (tokens can be ~1e-4)."""
        stats = []
        for v in (x, y):
            mean = v.mean(0)
            std = v.std(0, unbiased=False) if v.shape[0] > 1 else torch.ones_like(mean)
            stats += [mean, std]
        self.set_scaler(*stats)

    @torch.no_grad()
    def set_scaler(
        self, x_mean: torch.Tensor, x_std: torch.Tensor, y_mean: torch.Tensor, y_std: torch.Tensor
    ) -> None:
        """Set the standardisation directly (an online window keeps running moments)."""
        for name, mean, std in (("x", x_mean, x_std), ("y", y_mean, y_std)):
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_std").copy_(
                std.clamp_min(1e-12) + 1e-3 * std.max().clamp_min(1e-12)
            )

    def embed_x(self, x: torch.Tensor) -> torch.Tensor:
        return self.phi((x - self.x_mean) / self.x_std)

    def embed_y(self, y: torch.Tensor) -> torch.Tensor:
        return self.psi((y - self.y_mean) / self.y_std)

    def scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(n, n)`` matrix of ``T(x_i, y_j)``, softly bounded to ``(-bound, bound)``.

        Unbounded DV/MINE critics drift to ever larger scores online; one unseen pair with a
        large score then dominates ``log E[exp T]`` and the held-out estimate collapses (seen:
        +2 nats falling to -12 over 180 steps). A soft bound keeps every estimate finite.
        """
        raw = self.embed_x(x) @ self.embed_y(y).T * self.scale
        if not self.bound:
            return raw
        if self.bound > _SIGMOID_MAX_BOUND:  # (the sigmoid form's rounding grows with it)
            return self.bound * torch.tanh(raw / self.bound)
        # bound * tanh(raw / bound) as 2 bound sigmoid(2 raw / bound) - bound: the same function
        # (to ~3e-7 of the bound), 2-4x cheaper on CPUs where torch's tanh kernel is slow.
        return torch.sigmoid(raw * (2.0 / self.bound)) * (2.0 * self.bound) - self.bound
