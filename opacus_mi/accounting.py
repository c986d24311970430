"""Privacy accounting next to the MI figures: epsilon from the engine's own accountant.

``engine.get_epsilon(delta)`` costs 10-100 ms (RDP conversion, PRV composition), too much for
every step of a fast loop. ``EpsilonTracker`` returns the very same number for less: it caches by
the accountant's (already compressed) history, and for RDP it keeps one per-step RDP vector per
(noise, sample rate) and composes with Opacus's own functions in Opacus's own order, so the
value is bit-identical to ``engine.get_epsilon(delta)`` at every step.
"""

from __future__ import annotations

import math

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
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=sum(parts), delta=self.delta)
        return float(eps)


def sample_rate_of(accountant: IAccountant) -> float:
    """Sample rate of the accountant's latest step (NaN before any step)."""
    history = getattr(accountant, "history", None)
    return float(history[-1][1]) if history else math.nan
