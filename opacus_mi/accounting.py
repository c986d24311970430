"""Privacy accounting next to the MI figures: epsilon from the engine's own accountant.

``engine.get_epsilon(delta)`` costs 10-100 ms (RDP conversion, PRV composition), too much for
every step of a fast loop. ``EpsilonTracker`` returns the very same number for less: it caches by
the accountant's (already compressed) history, and for RDP it keeps one per-step RDP vector per
(noise, sample rate) and composes with Opacus's own functions in Opacus's own order, so the
value is bit-identical to ``engine.get_epsilon(delta)`` at every step.
"""

from __future__ import annotations

import math

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis


class EpsilonTracker:
    """Epsilon at ``delta`` for the current accountant history, cached."""

    def __init__(self, accountant: IAccountant, delta: float):
        self.accountant = accountant
        self.delta = delta
        self._key: tuple | None = None
        self._value: float = 0.0
        self._rdp_cache: dict[tuple[float, float], object] = {}
        self._orders: np.ndarray | None = None

    @property
    def cheap(self) -> bool:
        """Whether a fresh epsilon costs microseconds (RDP, composed here; GDP, closed form).
        Opacus's PRV composes a discretised distribution per call: 0.1-0.4 s."""
        return type(self.accountant).__name__ in ("RDPAccountant", "GaussianAccountant")

    def latest(self) -> float:
        """The epsilon last computed (0 before any), without computing anything."""
        return self._value

    def history(self) -> tuple:
        return tuple(tuple(h) for h in getattr(self.accountant, "history", ()))

    def epsilon(self) -> float:
        key = self.history()
        if key == self._key:
            return self._value
        if not key:
            value = 0.0
        elif type(self.accountant) is RDPAccountant:
            value = self._rdp_epsilon(key)
        else:
            value = float(self.accountant.get_epsilon(self.delta))
        self._key, self._value = key, value
        return value

    def _rdp_epsilon(self, history: tuple) -> float:
        orders = RDPAccountant.DEFAULT_ALPHAS
        parts = []
        for noise, rate, steps in history:
            one = self._rdp_cache.get((noise, rate))
            if one is None:
                one = rdp_analysis.compute_rdp(
                    q=rate, noise_multiplier=noise, steps=1, orders=orders
                )
                self._rdp_cache[(noise, rate)] = one
            # compute_rdp(steps=n) returns rdp(1) * n: the same floats in the same order.
            parts.append(one * steps)
        # The orders as the array Opacus would build from the list (same floats), made once.
        if self._orders is None:
            self._orders = np.atleast_1d(orders)
        eps, _ = rdp_analysis.get_privacy_spent(
            orders=self._orders, rdp=sum(parts), delta=self.delta
        )
        return float(eps)


def sample_rate_of(accountant: IAccountant) -> float:
    """Sample rate of the accountant's latest step (NaN before any step)."""
    history = getattr(accountant, "history", None)
    return float(history[-1][1]) if history else math.nan


# ---------------------------------------------------------------------------------------------
# MI accountant: a rigorous upper bound, in nats, on what one example can leak.
# ---------------------------------------------------------------------------------------------


def step_kl(noise_multiplier: float, sample_rate: float) -> float:
    """``KL((1-q) N(0, s^2) + q N(1, s^2) || N(0, s^2))`` in nats, by numerical integration.

    One Poisson-subsampled Gaussian step with add/remove adjacency, in units of the clipping
    norm: the example is present with probability q and shifts the release by at most C. By
    the variational form of MI, I(example; release) <= this KL. Exact closed form at q = 1
    (``1/(2 s^2)``), 0 at q = 0 and infinite at s = 0.
    """
    s, q = float(noise_multiplier), float(sample_rate)
    if not 0 <= q <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    if s < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if q == 0:
        return 0.0
    if s == 0:
        return math.inf  # a noise-free release of the clipped gradient: no finite bound
    if q == 1:
        return 1.0 / (2.0 * s * s)
    import numpy as np
    from scipy import integrate

    log_keep, log_q = math.log1p(-q), math.log(q)

    def log_ratio(x: float) -> float:  # log p(x)/q(x) with p the mixture, q = N(0, s^2)
        return float(np.logaddexp(log_keep, log_q + (2.0 * x - 1.0) / (2.0 * s * s)))

    def expect(mu: float) -> float:  # E_{x ~ N(mu, s^2)} log_ratio(x), in standard units
        def f(t: float) -> float:
            return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi) * log_ratio(mu + s * t)

        value, _ = integrate.quad(f, -40.0, 40.0, points=[(0.5 - mu) / s], limit=400, epsabs=0)
        return value

    return max(0.0, (1.0 - q) * expect(0.0) + q * expect(1.0))


def mi_upper_bound(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """Upper bound in nats on I(one example; everything released over ``steps`` DP-SGD steps).

    Adaptive composition (chain rule of MI): the per-step KL bound adds up over steps.
    ``noise_multiplier = 0`` gives ``inf``: without noise no finite bound exists.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return 0.0
    return steps * step_kl(noise_multiplier, sample_rate)


def pure_dp_mi_bound(epsilon: float) -> float:
    """MI bound of a pure epsilon-DP mechanism: ``min(eps, eps^2 / 2)`` nats."""
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return min(epsilon, epsilon * epsilon / 2.0)


def gaussian_channel_bound(noise_multiplier: float, dim: int | None = None) -> float:
    """Per-step leakage bound of one example's private view, in nats.

    A release ``g + N(0, sigma^2 C^2 I_k)`` with ``|g| <= C`` carries at most
    ``(k/2) ln(1 + 1/(k sigma^2)) <= 1/(2 sigma^2)`` nats (Gaussian channel capacity under the
    clipping power constraint); ``dim=None`` gives the dimension-free limit.
    """
    if noise_multiplier <= 0:
        return math.inf
    if dim is None:
        return 1.0 / (2.0 * noise_multiplier**2)
    return dim / 2.0 * math.log1p(1.0 / (dim * noise_multiplier**2))


class MIAccountant:
    """Cumulative MI bound that follows an Opacus accountant's history.

    Noise and sample rate may change between steps; the per-step KL is cached per
    ``(noise_multiplier, sample_rate)`` so following a long run costs one integral per setting.
    """

    def __init__(self, accountant: IAccountant | None = None):
        self.accountant = accountant
        self.history: list[tuple[float, float, int]] = []
        self._kl: dict[tuple[float, float], float] = {}

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one step (for use without an Opacus accountant)."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            n, q, k = self.history[-1]
            self.history[-1] = (n, q, k + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def _entries(self):
        if self.accountant is not None:
            return getattr(self.accountant, "history", [])
        return self.history

    def bound(self) -> float:
        """Cumulative bound in nats for any one example after all recorded steps."""
        total = 0.0
        for noise, rate, steps in self._entries():
            key = (float(noise), float(rate))
            if key not in self._kl:
                self._kl[key] = step_kl(*key)
            total += steps * self._kl[key]
        return total
