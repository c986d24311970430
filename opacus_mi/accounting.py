"""Privacy accounting next to the MI figures: epsilon from the engine's own accountant.

``engine.get_epsilon(delta)`` costs 10-100 ms (RDP conversion, PRV composition), too much for
every step of a fast loop. ``EpsilonTracker`` returns the very same number for less: it caches by
the accountant's (already compressed) history, and for RDP it composes Opacus's own per-order
values with Opacus's own functions in Opacus's own order, so the value is bit-identical to
``engine.get_epsilon(delta)`` at every step.

It also computes those per-order values only where they can matter. Opacus evaluates its 151
default orders with a Python series each (60-80 ms for a typical sample rate and noise, paid on
the first record); epsilon is the minimum over orders, and three facts bound every order not
yet evaluated from below: ``(a - 1) RDP(a)`` is convex in the order ``a`` and 0 at ``a = 1``
(secants through evaluated orders, extended, lie below it), RDP is non-decreasing in the order
(Renyi divergences are), and it is non-negative. So an order is evaluated, with Opacus's
function, only if its lower bound does not exclude it from the minimum; orders proven irrelevant
stay at ``inf`` in Opacus's own conversion, which then picks the same order and returns the same
float as the full computation (12 of 151 orders on a digits run's first epsilon).

Opacus's PRV accountant (its default) spends most of a ``get_epsilon`` at the step counts of a
training run on two RDP epsilons, which only size its discretisation domain
(``compute_safe_domain_size``): 50-110 ms of 60-150 ms up to 1,000 steps. ``EpsilonTracker``
takes those two from the same cached RDP tables, then runs Opacus's own discretisation,
composition and conversion: the same float as ``engine.get_epsilon(delta)``, checked against it
on the first call (a PRV of another Opacus version that differs falls back to Opacus's own
call). Its FFT composition stays, and grows with the steps and with epsilon (~1 s at 10,000
steps): what a record may afford is the monitor's schedule's to decide (``LeakageMonitor``),
by the size of the domain the call would run over (``EpsilonTracker.work``).

Opacus's GDP accountant solves its dual with ``brentq`` over ``scipy.stats.norm.cdf``, whose
per-call overhead makes one epsilon ~0.9 ms (a third of a small model's DP step, at every
record). The tracker runs the same solver on the same function through ``scipy.special.ndtr``,
which ``norm.cdf`` evaluates: the same float (checked the same way) in ~30 us.
"""

from __future__ import annotations

import copy
import math
import numbers
import sys
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import numpy as np
from opacus.accountants import GaussianAccountant, IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis import gdp as gdp_analysis
from opacus.accountants.analysis import prv as prv_analysis
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy import optimize, special


class _LazyRdp:
    """Opacus's per-step RDP of one (noise, sample rate) at each order, computed on demand."""

    # Evaluations in tables a kept sum holds: while it stands still, none of those changed.
    evaluations = 0

    def __init__(self, noise: float, rate: float, orders: list[float]):
        self.noise, self.rate, self.orders = noise, rate, orders
        self.values = np.full(len(orders), np.nan)
        self.done = np.zeros(len(orders), dtype=bool)  # evaluated (a value may be inf or NaN)
        self._lower: np.ndarray | None = None  # cached until the next evaluation
        self._known: np.ndarray | None = None  # likewise
        self.generation = 0  # evaluations so far: what a certificate (see EpsilonTracker) saw
        self.summed = False  # whether an _RdpSum holds it (it must then see its evaluations)
        if (
            rate == 0
            or noise == 0
            or rate == 1
            or not (math.isfinite(noise) and math.isfinite(rate))
        ):  # Opacus's closed forms: cheap, so all at once
            self.fill(range(len(orders)))

    def fill(self, idx) -> int:
        """Evaluates the orders ``idx`` not evaluated yet; returns how many that was."""
        count = 0
        for k in idx:
            if not self.done[k]:
                # Opacus's own function for this order: the float it puts in its full vector.
                self.values[k] = rdp_analysis.compute_rdp(
                    q=self.rate, noise_multiplier=self.noise, steps=1, orders=[self.orders[k]]
                )[0]
                self.done[k] = True
                self._lower = self._known = None
                self.generation += 1
                count += 1
        if self.summed:
            _LazyRdp.evaluations += count
        return count

    def known(self) -> np.ndarray:
        """The values evaluated so far, inf at the orders not yet evaluated."""
        if self._known is None:
            self._known = np.where(self.done, self.values, np.inf)
        return self._known

    def lower(self) -> np.ndarray:
        """A lower bound at every order, from the orders evaluated so far.

        ``f(a) = (a - 1) RDP(a) = log A_a`` is convex in ``a`` (a log-moment of the privacy loss)
        and ``f(1) = 0``: a secant through two known points, extended beyond them, lies below
        ``f``. RDP is also non-decreasing in the order and non-negative. The best of these.
        """
        if self._lower is None:
            self._lower = self._bound()
        return self._lower

    def _bound(self) -> np.ndarray:
        ok = self.done & ~np.isnan(self.values)
        known = np.where(ok, self.values, 0.0)
        bound = np.fmax.accumulate(known)  # monotone (0 below the first known order)
        xs = np.concatenate([[1.0], np.asarray(self.orders)[ok]])
        fs = np.concatenate([[0.0], (xs[1:] - 1) * self.values[ok]])
        if len(xs) < 2 or not np.isfinite(fs).all():
            return bound
        a = np.asarray(self.orders, dtype=np.float64)
        pos = np.searchsorted(xs, a)  # xs[pos - 1] < a <= xs[pos]
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.full(len(a), -np.inf)
            for lo, hi in ((pos - 2, pos - 1), (pos, pos + 1)):  # left pair, right pair
                valid = (lo >= 0) & (hi < len(xs))
                i, j = np.clip(lo, 0, len(xs) - 1), np.clip(hi, 0, len(xs) - 1)
                slope = (fs[j] - fs[i]) / (xs[j] - xs[i])
                f = np.where(valid & (xs[j] > xs[i]), np.fmax(f, fs[i] + slope * (a - xs[i])), f)
            return np.where(ok, known, np.fmax(bound, f / (a - 1)))


def _compose(state: tuple | None, table: _LazyRdp, steps: int) -> tuple:
    """Opacus's sum of per-step RDP one history entry further, as ``(known, rdp, lower)`` by
    order: evaluated in every entry so far, the sum (inf where not), its lower bound."""
    if state is None:
        return table.done.copy(), table.known() * steps, table.lower() * steps
    known, rdp, lower = state
    return known & table.done, rdp + table.known() * steps, lower + table.lower() * steps


class _RdpSum:
    """:func:`_compose` over the first entries of a history, kept for the next, longer one.

    A noise scheduler adds an accountant entry a step: re-summing every entry at every record
    made a record's cost grow with the run (14 ms at 2,000 entries, 0.006 ms with one setting).
    Opacus sums left to right, so this prefix plus the new entries is the very same float.

    It holds for the tables as they were summed. An evaluation in one (its ``generation``)
    voids the sum from that entry on, which is re-summed from the state kept before its block
    of ``BLOCK`` entries: the orders a record newly needs are mostly missing from the latest
    few tables only (each was evaluated where it was needed as the last entry). While
    ``_LazyRdp.evaluations`` stands still no table can have changed.
    """

    BLOCK = 32  # entries per kept state (3.8 kB each): at most this many re-summed per change

    def __init__(self) -> None:
        self.entries: tuple = ()
        self.tables: list[_LazyRdp] = []
        self.generations: list[int] = []  # each table's, when it was summed
        self.evaluations = _LazyRdp.evaluations  # no table has changed since this count
        self.state: tuple | None = None
        self.marks: list[tuple | None] = []  # the state before each block's first entry
        self.blocks: list[np.ndarray] = []  # per block: orders evaluated in all its tables

    def extend(self, entries: tuple, tables: list[_LazyRdp]) -> None:
        for (_, _, steps), table in zip(entries, tables, strict=True):
            if len(self.tables) % self.BLOCK == 0:
                # The block before is closed: it is re-summed only when an order is added
                # everywhere. Its tables' caches (2.4 kB each, a table per step under a noise
                # scheduler) go; the open block's stay, as its newest tables gain an order at
                # most records, and each gain re-sums the block.
                for done in self.tables[-self.BLOCK :]:
                    done._lower = done._known = None  # (made again if ever needed)
                self.marks.append(self.state)
                self.blocks.append(table.done.copy())
            else:
                self.blocks[-1] &= table.done
            table.summed = True
            self.generations.append(table.generation)  # (read before its arrays are)
            self.tables.append(table)
            self.state = _compose(self.state, table, steps)
        self.entries += entries

    def truncate(self, n: int) -> None:
        """Keeps the sum over the first ``n`` entries (re-summed from its block's start)."""
        if n >= len(self.tables):
            return
        block = n // self.BLOCK
        start = block * self.BLOCK
        entries, tables = self.entries[start:n], self.tables[start:n]
        self.state = self.marks[block]
        del self.marks[block:], self.blocks[block:], self.tables[start:], self.generations[start:]
        self.entries = self.entries[:start]
        self.extend(entries, tables)

    def refresh(self) -> None:
        """Re-sums from the first table evaluated further since it was summed, if any."""
        now = _LazyRdp.evaluations
        if now != self.evaluations:
            generations = [t.generation for t in self.tables]
            if generations != self.generations:
                pairs = zip(generations, self.generations, strict=True)
                self.truncate(next(i for i, (a, b) in enumerate(pairs) if a != b))
            self.evaluations = now

    def fill(self, idx: list[int]) -> int:
        """Evaluates the orders ``idx`` in every table that lacks one, then re-sums from the
        first that changed; returns how many evaluations that took."""
        before, count, first = _LazyRdp.evaluations, 0, None
        for block, done in enumerate(self.blocks):
            if not done[idx].all():
                start = block * self.BLOCK
                for i, table in enumerate(self.tables[start : start + self.BLOCK], start):
                    evaluated = table.fill(idx)
                    if evaluated and first is None:
                        first = i
                    count += evaluated
        if first is not None:
            self.truncate(first)
        if before == self.evaluations:
            self.evaluations = before + count  # (current before: those were the only changes)
        return count


# The part of a PRV epsilon that does not grow with its domain, in points: ~7 ms of setup and
# Python at ~0.3 us a point (digits runs: 9-10 ms at 5.5k points, 13-41 ms at 25-85k). Without
# it, a cost per point learnt on the tiny domain of the first steps (1.7 us a point at 5.5k)
# predicted 40 ms where 15 ms came, and one slow early call paced PRV out of a whole run.
PRV_FIXED_POINTS = 25_000
# The largest discretisation domain (points) a PRV epsilon is computed over: above it Opacus's
# call takes minutes and gigabytes (sigma 0.01 on digits: 16 GB and no value after 2 minutes at
# 23 steps; sigma 0.6, q 0.005 at 300,000 steps: 94 s and 7.5 GB for a 41.6M-point domain).
# Such a history gets Opacus's RDP epsilon instead (microseconds here, a valid and slightly
# looser bound: 96.98 against PRV's 92.06 there), flagged on its records.
PRV_MAX_POINTS = 40_000_000


class EpsilonTracker:
    """Epsilon at ``delta`` for the current accountant history, cached."""

    # Orders evaluated first, before any bound exists: a coarse sweep of Opacus's range.
    _SEED_ORDERS = (2.0, 4.0, 8.0, 16.0, 32.0, 63.0)

    def __init__(
        self,
        accountant: IAccountant,
        delta: float,
        *,
        _tables: dict[tuple[float, float], _LazyRdp] | None = None,
    ):
        self.accountant = accountant
        self.delta = delta
        self._key: tuple | None = None
        self._value: float = 0.0
        self._infinite: tuple | None = None  # a history whose epsilon was inf (see epsilon)
        self._domain_memo: tuple | None = None  # the latest PRV domain (see _prv_domain_of)
        # PRV: the first history given RDP's epsilon instead, and the RDP tracker for it.
        self._rdp_from: tuple | None = None
        self._rdp: EpsilonTracker | None = None
        # Per (noise, rate): Opacus's per-step RDP by order (shared with the PRV domain's).
        self._rdp_cache = {} if _tables is None else _tables
        # PRV and GDP: Opacus's computation replicated at less cost, and whether the replica
        # agreed with Opacus's own call (None: not checked yet); see _replica_epsilon.
        self._replica = {PRVAccountant: self._prv_replica, GaussianAccountant: self._gdp_replica}
        self._replica_ok: bool | None = None
        # PRV: the RDP epsilon of the whole history at Opacus's domain delta.
        self._prv_domain: EpsilonTracker | None = None
        orders = list(RDPAccountant.DEFAULT_ALPHAS)
        if orders != sorted(orders):
            raise RuntimeError("Opacus's default RDP orders are expected in increasing order")
        # The orders as the array Opacus builds from the list (same floats), made once, and the
        # two order-only terms of its conversion, as its ``get_privacy_spent`` forms them: the
        # epsilon vector is then ``rdp - sub + add`` operation for operation, bit for bit.
        self._orders = np.atleast_1d(orders)
        # One list every table shares (Opacus's function takes the orders as floats): a list
        # of its own in each was 6 KB per (noise, rate), a scheduler stepped per step's growth.
        self._order_list = [float(a) for a in self._orders]
        self._sub = (np.log(delta) + np.log(self._orders)) / (self._orders - 1)
        self._add = np.log((self._orders - 1) / self._orders)
        self._seed = [orders.index(a) for a in self._SEED_ORDERS if a in orders]
        self._best: int | None = None  # index of the order that gave the latest epsilon
        # (table, its generation, first and last step count it holds for, and the best order's
        # three floats): see _certify. The best order itself stays in _best.
        self._cert: tuple | None = None
        # The per-order sum over the latest history but its last entry (see _prefix).
        self._rdp_sum = _RdpSum()
        self.orders_evaluated = 0  # per (noise, rate) orders Opacus's series ran for

    @property
    def cheap(self) -> bool:
        """Whether a fresh epsilon costs microseconds (RDP, composed here; GDP, Opacus's
        solver on ``ndtr``: ~30 us). Under a noise scheduler an RDP record costs milliseconds,
        Opacus's series for the new entry's setting and, when the best order moves, for every
        entry's (see :class:`_RdpSum`): ~4 ms a record at 2,000 entries.
        Opacus's PRV composes a discretised distribution per call: tens of ms, ~1 s at 10,000
        steps (see :meth:`_prv_replica`)."""
        return type(self.accountant).__name__ in ("RDPAccountant", "GaussianAccountant")

    def history(self) -> tuple:
        return tuple(map(tuple, getattr(self.accountant, "history", ())))

    def cached(self, history: tuple) -> bool:
        """Whether :meth:`epsilon` of ``history`` is the cached value (no computation)."""
        return history == self._key

    def epsilon(self, history: tuple | None = None) -> float:
        """Epsilon after ``history`` (a :meth:`history` taken earlier, e.g. by the training
        thread for an overlap worker; default: the accountant's now)."""
        key = self.history() if history is None else history
        if key == self._key:
            return self._value
        if not key:
            value = 0.0
        elif _noiseless(key):
            value = math.inf  # no noise, no guarantee (Opacus's PRV and GDP raise instead)
        elif self._infinite is not None and _extends(key, self._infinite):
            self._key, self._value = key, math.inf
            return math.inf  # more steps of a history whose epsilon was inf: inf again
        elif type(self.accountant) is PRVAccountant and (
            self.used_rdp(key) or self.prv_too_large(key)
        ):
            if not self.used_rdp(key):
                self._rdp_from = key
            value = self._rdp_instead(key)
        elif type(self.accountant) is RDPAccountant:
            value = self._rdp_epsilon(key)
        elif type(self.accountant) in self._replica and self._replica_ok is not False:
            value = self._replica_epsilon(key)
        elif history is None:
            value = float(self.accountant.get_epsilon(self.delta))
        else:
            value = self._opacus_epsilon(key)
        self._key, self._value = key, value
        if value == math.inf and key and not _noiseless(key):
            # Epsilon never falls as steps are added: an overflowed PRV (sigma ~0.01) stays
            # inf, where recomputing it for each longer history took minutes and gigabytes.
            self._infinite = key
        return value

    def used_rdp(self, history: tuple) -> bool:
        """Whether the epsilon of ``history`` is Opacus's RDP one, PRV's being too costly:
        ``history`` extends the first such (the PRV domain only grows with the steps)."""
        return self._rdp_from is not None and _extends(history, self._rdp_from)

    def rdp_from(self, history: tuple) -> None:
        """Take Opacus's RDP epsilon for ``history`` and its extensions, as a run resumed from
        a state whose epsilon was already RDP's had done (PRV's would cost minutes)."""
        if self._rdp_from is None and type(self.accountant) is PRVAccountant:
            self._rdp_from = tuple(history)

    def _rdp_instead(self, history: tuple) -> float:
        if self._rdp is None:
            self._rdp = EpsilonTracker(RDPAccountant(), self.delta, _tables=self._rdp_cache)
        return self._rdp.epsilon(history)

    def prv_too_large(self, history: tuple | None = None) -> bool:
        """Whether Opacus's PRV epsilon for ``history`` would run over more than
        ``PRV_MAX_POINTS`` points (minutes and gigabytes; RDP's is given instead)."""
        key = self.history() if history is None else history
        if type(self.accountant) is not PRVAccountant or not key or _noiseless(key):
            return False
        return self._prv_domain_of(key)[0].size > PRV_MAX_POINTS

    def _opacus_epsilon(self, history: tuple) -> float:
        """Opacus's own ``get_epsilon``, on a copy of the accountant holding ``history``."""
        frozen = copy.copy(self.accountant)
        frozen.history = [tuple(h) for h in history]
        return float(frozen.get_epsilon(self.delta))

    def _replica_epsilon(self, history: tuple) -> float:
        """The accountant's ``get_epsilon(delta)`` for ``history`` by this tracker's replica of
        Opacus's computation (:meth:`_prv_replica`, :meth:`_gdp_replica`).

        The first call is compared with Opacus's own (on a copy holding the same history):
        an Opacus whose computation differs from the replica gets its own call from then on.
        """
        replica = self._replica[type(self.accountant)]
        if self._replica_ok is None:
            want = self._opacus_epsilon(history)
            try:
                got = replica(history)
            except Exception:
                got = math.nan
            self._replica_ok = got == want
            return want
        try:
            return replica(history)
        except Exception:  # what Opacus does then (its own error, or its value)
            return self._opacus_epsilon(history)

    def _gdp_replica(self, history: tuple) -> float:
        """``GaussianAccountant.get_epsilon(delta)`` (Poisson): Opacus's ``compute_mu_poisson``
        and ``eps_from_mu``, whose ``norm.cdf`` is ``special.ndtr`` without its per-call
        argument handling (``root_scalar``'s brentq is ``optimize.brentq`` with its defaults)."""
        noise, rate, steps = history[-1]
        mu = gdp_analysis.compute_mu_poisson(steps=steps, noise_multiplier=noise, sample_rate=rate)
        delta = self.delta

        def f(x):  # gdp_analysis.delta_eps_mu(eps=x, mu=mu) - delta
            return (
                special.ndtr(-x / mu + mu / 2) - np.exp(x) * special.ndtr(-x / mu - mu / 2) - delta
            )

        return float(optimize.brentq(f, 0, 500))

    def work(self, history: tuple | None = None) -> float:
        """How much computing epsilon for ``history`` costs, relative to other histories.

        For PRV: the points of Opacus's discretisation domain (``2 L / mesh``), which its
        discretisation and FFT composition run over, plus ``PRV_FIXED_POINTS`` for the part of
        a call that does not grow with them, times the history's entries: each is discretised
        and self-composed on its own (a noise scheduler adds one a step; one epsilon at 150
        entries took 14 s where one entry took 0.07 s). The half-width ``L`` follows epsilon
        and the mesh narrows as ``1/sqrt(steps)``, so one call can cost 100x an earlier one
        (digits at q = 0.7: 20 ms at 10 steps, 2.8 s at 830, where epsilon is ~300); a call
        costs ~7 ms plus 0.16-0.43 us a point over the settings timed
        (``benchmarks/README.md``). The budget scales its cost estimate by this instead of
        assuming the next call costs what the last one did. Microseconds (the RDP tables are
        cached); 1.0 for the others.
        """
        key = self.history() if history is None else history
        if type(self.accountant) is not PRVAccountant or not key or _noiseless(key):
            return 1.0
        domain, _ = self._prv_domain_of(key)
        return float(len(key) * (domain.size + PRV_FIXED_POINTS))

    def _prv_domain_of(self, history: tuple, eps_error: float = 0.01) -> tuple[Any, list]:
        """``(domain, prvs)``: Opacus's PRV discretisation domain for ``history`` (its
        ``_get_domain``) and the history's PRVs, with the two RDP epsilons of its
        ``compute_safe_domain_size`` from this tracker's tables. The latest is kept: the
        budget's ``work``, the size check and the epsilon itself each ask for the same one."""
        if self._domain_memo is not None and self._domain_memo[0] == (history, eps_error):
            return self._domain_memo[1]
        result = self._prv_domain_uncached(history, eps_error)
        self._domain_memo = ((history, eps_error), result)
        return result

    def _prv_domain_uncached(self, history: tuple, eps_error: float) -> tuple[Any, list]:
        # PRVAccountant.get_epsilon's defaults: eps_error 0.01, delta_error = delta / 1000.
        delta_error = self.delta / 1000
        prvs = [prv_analysis.PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history]
        counts = [steps for _, _, steps in history]
        total = sum(counts)
        # compute_safe_domain_size: the whole history's RDP epsilon at delta_error / 4, and
        # each part's one step at delta_error / (8 total), as Opacus's RDPAccountant gives them.
        if self._prv_domain is None:
            self._prv_domain = EpsilonTracker(
                RDPAccountant(), delta_error / 4, _tables=self._rdp_cache
            )
        parts = tuple(
            (p.noise_multiplier, p.sample_rate, n) for p, n in zip(prvs, counts, strict=True)
        )
        L_max = self._prv_domain.epsilon(parts)
        one = EpsilonTracker(RDPAccountant(), delta_error / (8 * total), _tables=self._rdp_cache)
        for p in prvs:
            L_max = max(L_max, one.epsilon(((p.noise_multiplier, p.sample_rate, 1),)))
        L = max(L_max, eps_error) + 3
        # PRVAccountant._get_domain's mesh and domain.
        mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return prv_analysis.Domain.create_aligned(-L, L, mesh_size), prvs

    def _prv_replica(self, history: tuple, eps_error: float = 0.01) -> float:
        """``PRVAccountant.get_epsilon(delta)`` for ``history``, Opacus's steps one by one, with
        the two RDP epsilons of its ``compute_safe_domain_size`` from this tracker's tables."""
        domain, prvs = self._prv_domain_of(history, eps_error)
        # PRVAccountant._get_dprv, then get_epsilon's conversion (delta_error = delta / 1000).
        tprvs = [
            prv_analysis.TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max) for p in prvs
        ]
        dprvs = [prv_analysis.discretize(t, domain) for t in tprvs]
        counts = [steps for _, _, steps in history]
        dprv = prv_analysis.compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
        _, _, eps_upper = dprv.compute_epsilon(self.delta, self.delta / 1000, eps_error)
        return float(eps_upper)

    def _table(self, noise: float, rate: float) -> _LazyRdp:
        table = self._rdp_cache.get((noise, rate))
        if table is None:
            table = self._rdp_cache[(noise, rate)] = _LazyRdp(noise, rate, self._order_list)
        return table

    def _prefix(self, history: tuple) -> _RdpSum:
        """The per-order sum over ``history`` but its last entry (which the next step may still
        extend), from the one kept: re-summed from the first entry that differs (a rollback, a
        replaced history, an earlier one) or whose table has changed, then extended."""
        keep, have = len(history) - 1, self._rdp_sum
        have.refresh()
        n = len(have.entries)
        if n > keep or history[:n] != have.entries:  # (C-speed when it extends, the usual)
            pairs = enumerate(zip(history[:keep], have.entries, strict=False))
            have.truncate(next((i for i, (a, b) in pairs if a != b), min(n, keep)))
            n = len(have.entries)
        if n < keep:
            new = history[n:keep]
            have.extend(new, [self._table(noise, rate) for noise, rate, _ in new])
        return have

    def _fill(self, prefix: _RdpSum, last: _LazyRdp, idx) -> None:
        """Evaluates the orders ``idx`` in every table of a history: ``prefix``'s (where its
        tables lack one) and ``last``'s."""
        idx = list(idx)
        if prefix.state is not None and not prefix.state[0][idx].all():
            self.orders_evaluated += prefix.fill(idx)
        self.orders_evaluated += last.fill(idx)

    def _rdp_epsilon(self, history: tuple) -> float:
        """Opacus's ``get_epsilon`` for an RDP history, bit for bit, at a fraction of its cost.

        A record computes this every measured step, inside someone else's training loop.
        Opacus's series is run only for the orders whose lower bound could still beat the best
        known epsilon (:meth:`_vector_epsilon`). A history of one (noise, rate), the usual
        case, is then mostly answered by a certificate: three float operations (see
        :meth:`_certify`).
        """
        if len(history) == 1 and self._cert is not None:
            table, generation, first, last, rdp, sub, add = self._cert
            noise, rate, steps = history[0]
            if (
                first <= steps <= last
                and table.generation == generation
                and self._rdp_cache.get((noise, rate)) is table
            ):
                return rdp * steps - sub + add  # Opacus's expression at the best order
        return self._vector_epsilon(history)

    def _vector_epsilon(self, history: tuple) -> float:
        # Only the entries a record has not seen yet are summed (see _RdpSum).
        prefix = self._prefix(history)
        noise, rate, steps = history[-1]
        last = self._table(noise, rate)
        order = self._best
        if order is None or not (
            (prefix.state is None or prefix.state[0][order]) and last.done[order]
        ):
            self._fill(prefix, last, self._seed if order is None else [order])
        while True:
            # Exact where evaluated in every part (Opacus's composition), inf where not yet.
            prefix = self._prefix(history)  # (re-extended if _fill changed its tables)
            known, rdp, lower = _compose(prefix.state, last, steps)
            if len(history) > 1:  # an order unknown in one part is unknown in the sum
                rdp = np.where(known, rdp, np.inf)
            eps = rdp - self._sub + self._add  # Opacus's expression (get_privacy_spent)
            best = np.fmin.reduce(eps)  # NaN-ignoring minimum
            if np.isnan(best):
                best = np.inf
            # Relative slack far above the float error of Opacus's series and conversion.
            floor = lower - self._sub + self._add  # a lower bound on every order's epsilon
            need = ~known & ~(floor > best + 1e-6 * max(1.0, abs(best)))
            if not need.any():
                break
            # Most promising first (smallest bound), a few at a time: each tightens the bounds.
            cand = np.flatnonzero(need)
            self._fill(prefix, last, cand[np.argsort(floor[cand], kind="stable")[:3]])
        nan = np.isnan(eps)
        if nan.all():
            return math.inf  # Opacus's "no privacy" answer
        best_at = int(np.argmin(np.where(nan, np.inf, eps)))  # np.nanargmin, as Opacus
        if best_at in (0, len(eps) - 1):  # Opacus warns that the order range is too narrow
            value, _ = rdp_analysis.get_privacy_spent(
                orders=self._orders, rdp=rdp, delta=self.delta
            )
        else:
            value = eps[best_at]
        self._best = best_at
        self._cert = None
        if len(history) == 1:
            self._certify(last, steps, best_at)
        return float(value)

    def _certify(self, table: _LazyRdp, steps: int, best: int) -> None:
        """For how many more steps of the same (noise, rate) the answer stays at order ``best``
        with no order left to evaluate, found once; until then epsilon is ``rdp[best] * steps
        - sub + add``, the float :meth:`_vector_epsilon` would return.

        Every condition the vector path checks is linear in the step count ``s``: order ``k``
        loses to ``best`` while ``(v_k - v_b) s + (c_k - c_b) > 0`` (``c = add - sub``, ``v``
        the known per-step RDP, or for an unevaluated order its lower bound, less the 1e-6
        relative slack bounded linearly). Each is tightened by a relative 1e-9, far above the
        rounding of the vector path's floats, so no rounding can reverse one inside the range.
        """
        n = len(self._orders)
        if best in (0, n - 1):
            return  # Opacus warns there: the vector path calls it
        known, lower, done = table.known(), table.lower(), table.done
        with np.errstate(invalid="ignore", over="ignore"):
            if np.isnan(np.where(done, table.values, 0.0)).any() or not np.isfinite(known[best]):
                return
            c = self._add - self._sub
            vb, cb = known[best], c[best]
            slope = np.where(done, known, lower)
            a = slope - vb
            b = c - cb
            # An unevaluated order must clear the slack 1e-6 max(1, |eps_best|) as well.
            a = np.where(done, a, a - 1e-6 * abs(vb))
            b = np.where(done, b, b - 1e-6 * (1.0 + abs(cb)))
            a = a - 1e-9 * (abs(vb) + np.abs(slope))
            b = b - 1e-9 * (1.0 + abs(cb) + np.abs(c))
            # Neither the best order nor one whose RDP is infinite competes.
            idle = ~np.isfinite(slope)
            idle[best] = True
            a[idle], b[idle] = 0.0, 1.0
            if np.isnan(a).any() or np.isnan(b).any() or not (a * steps + b > 0).all():
                return
            falling = a < 0
            last = np.ceil(-b[falling] / a[falling]) - 1 if falling.any() else np.array([])
        limit = int(min(last.min(), 2**53)) if last.size else 2**53
        if limit >= steps:
            self._cert = (
                table,
                table.generation,
                steps,
                limit,
                float(known[best]),
                float(self._sub[best]),
                float(self._add[best]),
            )


def _extends(history: tuple, earlier: tuple) -> bool:
    """Whether ``history`` is ``earlier`` with steps added (the same entries, its last one
    counting at least as many steps, then any more): its epsilon is at least ``earlier``'s."""
    if len(history) < len(earlier) or history[: len(earlier) - 1] != earlier[:-1]:
        return False
    last, now = earlier[-1], history[len(earlier) - 1]
    return now[:2] == last[:2] and now[2] >= last[2]


def _noiseless(history: tuple) -> bool:
    """Whether some step released a sampled batch's gradient without noise (sigma = 0): then
    epsilon is infinite at any delta < 1. Opacus's RDP says so (``inf``); its PRV raises
    ``OverflowError`` and its GDP ``ZeroDivisionError``, which left a non-private baseline run
    (a sweep's sigma = 0) without a single record under Opacus's default accountant."""
    if 0 not in map(itemgetter(0), history):  # (at C speed: a scheduler's history is long)
        return False
    return any(noise == 0 and rate > 0 and steps > 0 for noise, rate, steps in history)


def steps_counted(history: Sequence) -> int:
    """How many steps an accountant's ``history`` (``(noise, rate, steps)`` entries) counts:
    the steps a record after them is numbered from."""
    # At C speed: under a noise scheduler the history has an entry a step, and this is read at
    # every measured step (a Python loop over 8k entries took 1.2 ms a step).
    return int(sum(map(itemgetter(2), history)))


def sample_rate_of(accountant: IAccountant | None, history: Sequence | None = None) -> float:
    """Sample rate of the accountant's latest step, or of ``history``'s (NaN before any)."""
    if history is None:
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
    _check_step_settings(s, q)  # (NaN too: it was a bound of 0)
    if q == 0 or s == math.inf:  # nothing released about the example
        return 0.0
    if s == 0 or 2.0 * s * s == 0:  # (the latter: s so small that its square underflows)
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

        # (At q <= 1e-6 quad warns that it cannot reach its relative tolerance on a KL of
        # ~1e-13: the value is right to ~1e-7 against a 50-digit quadrature, so not said.
        # full_output keeps it quiet; warnings.catch_warnings here reset which warnings the
        # user's loop had already shown, so a "once" warning came back at every new sigma,
        # and it is not thread-safe, while this runs on an overlap worker.)
        result = integrate.quad(
            f, -40.0, 40.0, points=[(0.5 - mu) / s], limit=400, epsabs=0, full_output=1
        )
        return result[0]

    kl = (1.0 - q) * expect(0.0) + q * expect(1.0)
    # NaN where the integrand overflowed (s far below any DP noise): no finite bound is known,
    # and max(0, NaN) was a bound of 0.
    return math.inf if math.isnan(kl) else max(0.0, kl)


def mi_upper_bound(
    noise_multiplier: float, sample_rate: float, steps: int, *, poisson_sampling: bool = True
) -> float:
    """Upper bound in nats on I(one example's data; everything released over ``steps`` DP-SGD
    steps), its inclusion in each step random and not itself released.

    Adaptive composition (chain rule of MI): the per-step KL bound adds up over steps.
    ``noise_multiplier = 0`` gives ``inf``: without noise no finite bound exists. Not a bound on
    membership (whether the example was in a step), which can leak far more.

    ``poisson_sampling=False``: batches from a sampler that visits each example once per epoch
    (Opacus's ``make_private(poisson_sampling=False)`` with a shuffled or sequential loader, or a
    ``DistributedSampler``), where the subsampled KL does not hold: one release per epoch
    (:func:`once_per_epoch_bound`).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (DP-SGD steps taken), got {steps!r}")
    steps = int(steps)  # (NumPy's integers too, as for the other arguments)
    poisson_sampling = _sampling_flag(poisson_sampling)
    _check_step_settings(noise_multiplier, sample_rate)  # at steps = 0 too
    if steps == 0:
        return 0.0
    if not poisson_sampling:
        return once_per_epoch_bound([(noise_multiplier, sample_rate, steps)])
    return steps * step_kl(noise_multiplier, sample_rate)


def _sampling_flag(poisson_sampling: Any) -> bool:
    """``poisson_sampling`` as a bool (NumPy's too); anything else is refused: its truthiness
    picked a bound (``"False"`` gave the Poisson one, not valid without Poisson sampling)."""
    if isinstance(poisson_sampling, (bool, np.bool_)):
        return bool(poisson_sampling)
    raise ValueError(
        f"poisson_sampling must be True or False (as given to make_private), got "
        f"{poisson_sampling!r}"
    )


def history_continues(history: tuple, earlier: tuple) -> bool:
    """Whether an accountant's ``history`` continues ``earlier`` (its ``(noise, rate, steps)``
    entries): the same entries, the last of them with as many steps or more."""
    if len(earlier) > len(history):
        return False
    if not earlier:
        return True
    *head, (noise, rate, steps) = earlier
    if tuple(history[: len(head)]) != tuple(head):
        return False
    later = history[len(head)]
    return (later[0], later[1]) == (noise, rate) and later[2] >= steps


def _check_number(name: str, value: Any) -> None:
    """A real number (NumPy's too), not a bool: ``True`` was taken as 1, ``"1"`` failed in a
    comparison that named neither the argument nor the fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _check_step_settings(noise_multiplier: float, sample_rate: float) -> None:
    _check_number("noise_multiplier", noise_multiplier)
    _check_number("sample_rate", sample_rate)
    if not 0 <= sample_rate <= 1:  # (NaN too)
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    if not noise_multiplier >= 0:  # (NaN too)
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")


def history_entry(entry: Any) -> tuple[float, float, int]:
    """One accountant history entry, ``(noise_multiplier, sample_rate, steps)``, checked: a
    hand-built or damaged one (negative or fractional steps, a missing field) gave a negative
    "upper bound", truncated steps or an IndexError instead of naming it. Each value as a
    number, as Opacus keeps it (a noise multiplier set as a tensor, or from a scheduler)."""
    try:
        noise, rate, steps = entry
    except (TypeError, ValueError):
        raise ValueError(
            "history entries must be (noise_multiplier, sample_rate, steps), as an Opacus "
            f"accountant's; got {entry!r}"
        ) from None
    values = []
    for name, v in (("noise_multiplier", noise), ("sample_rate", rate), ("steps", steps)):
        try:
            if isinstance(v, bool):
                raise TypeError
            values.append(float(v))
        except (TypeError, ValueError, RuntimeError):  # (a tensor of more than one value too)
            raise ValueError(f"history entry {entry!r}: {name} must be a number") from None
    noise, rate, count = values
    if not (math.isfinite(count) and count >= 0 and count.is_integer()):
        raise ValueError(
            f"history entry {entry!r}: steps must be an integer >= 0 (DP-SGD steps taken)"
        )
    _check_step_settings(noise, rate)
    return noise, rate, int(count)


def once_per_epoch_bound(history: Sequence) -> float:
    """MI bound in nats for fixed-size batches that hold each example once per epoch.

    ``history`` as an Opacus accountant's: ``(noise_multiplier, sample_rate, steps)`` entries,
    an epoch being ``1/sample_rate`` steps (Opacus's rate is ``1/len(loader)``). The order of a
    shuffle does not depend on the data, so conditioning on it can only raise the MI; given it,
    the example is in exactly one known step per epoch, which releases at most ``1/(2 s^2)``
    (:func:`gaussian_channel_bound`, the epoch's smallest ``s``). A change of rate starts a new
    epoch, which can only count the example once more. Poisson's subsampled KL
    (:func:`step_kl`) is no bound here: with one epoch of two steps at ``s = 0.35`` the true MI
    can reach 3.35 nats against its 3.07 (this bound: 4.08).
    """
    state = _EPOCHS_START
    for entry in history:
        state = _epochs_after(state, entry)
    return state[0] + state[1]


# (epochs closed, the open epoch's largest per-release bound, steps into it, its length)
_EPOCHS_START = (0.0, 0.0, 0, 0)


def _epochs_after(state: tuple, entry: Sequence) -> tuple:
    """:func:`once_per_epoch_bound`'s state after one more history entry."""
    total, worst, position, epoch = state
    noise, rate, steps = history_entry(entry)
    if rate == 0 or steps == 0:
        return state  # nothing released about anyone
    release = gaussian_channel_bound(noise)
    inverse = 1.0 / rate * (1 + 1e-9)  # (rounding: 1/(1/3) < 3)
    # (a subnormal rate's inverse is inf: an epoch longer than any run)
    length = max(1, math.floor(inverse)) if math.isfinite(inverse) else sys.maxsize
    if length != epoch:  # a new epoch length: close the open epoch
        total, worst, position, epoch = total + worst, 0.0, 0, length
    if position:  # finish the open epoch
        taken = min(steps, epoch - position)
        worst, position, steps = max(worst, release), position + taken, steps - taken
        if position == epoch:
            total, worst, position = total + worst, 0.0, 0
    epochs, steps = divmod(steps, epoch)
    if epochs:
        total += epochs * release
    if steps:
        worst, position = max(worst, release), steps
    return total, worst, position, epoch


def pure_dp_mi_bound(epsilon: float) -> float:
    """MI bound of a pure epsilon-DP mechanism: ``min(eps, eps^2 / 2)`` nats."""
    _check_number("epsilon", epsilon)
    if not epsilon >= 0:  # (NaN too)
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    epsilon = float(epsilon)
    return min(epsilon, epsilon * epsilon / 2.0)


def gaussian_channel_bound(noise_multiplier: float, dim: int | None = None) -> float:
    """Per-step leakage bound of one example's private view, in nats.

    A release ``g + N(0, sigma^2 C^2 I_k)`` with ``|g| <= C`` carries at most
    ``(k/2) ln(1 + 1/(k sigma^2)) <= 1/(2 sigma^2)`` nats (Gaussian channel capacity under the
    clipping power constraint); ``dim=None`` gives the dimension-free limit.
    """
    _check_number("noise_multiplier", noise_multiplier)
    if not noise_multiplier >= 0:  # (NaN too)
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if dim is not None and (
        isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1
    ):
        raise ValueError(f"dim must be a positive integer or None, got {dim!r}")
    try:
        square = float(noise_multiplier) ** 2
    except OverflowError:  # (s = 1e155: no information gets through)
        return 0.0
    if square == 0:  # (s = 0, or so small that its square underflows)
        return math.inf
    if dim is None:
        return 1.0 / (2.0 * square)
    return dim / 2.0 * math.log1p(1.0 / (dim * square))


class MIAccountant:
    """Cumulative MI bound that follows an Opacus accountant's history.

    Noise and sample rate may change between steps; the per-step KL is cached per
    ``(noise_multiplier, sample_rate)`` so following a long run costs one integral per setting.
    ``poisson_sampling=False`` (Opacus's ``make_private(poisson_sampling=False)``): one release
    per epoch instead (see :func:`once_per_epoch_bound`).
    """

    def __init__(self, accountant: IAccountant | None = None, *, poisson_sampling: bool = True):
        poisson_sampling = _sampling_flag(poisson_sampling)
        if accountant is not None and not isinstance(getattr(accountant, "history", None), list):
            raise ValueError(
                f"accountant must be an Opacus accountant (one with a history list: "
                f"engine.accountant, not the engine), or None to count step() calls; got "
                f"{type(accountant).__name__}"
            )
        self.accountant = accountant
        self.poisson_sampling = poisson_sampling
        self.history: list[tuple[float, float, int]] = []
        self._kl: dict[tuple[float, float], float] = {}
        # The bound's state over the entries of the last history but its last (which the next
        # step may extend): a noise scheduler adds an entry a step, and folding the whole
        # history at every record made its cost grow with the run (~2 ms at 2,000 entries).
        self._folded, self._state = (), None

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one step (for use without an Opacus accountant)."""
        if self.accountant is not None:  # (its history is what bound() reads: this was lost)
            raise ValueError(
                "step() counts steps of an MIAccountant without an accountant; this one follows "
                "its accountant's history: step the accountant, or make it with accountant=None"
            )
        _check_step_settings(noise_multiplier, sample_rate)  # here, not at a later bound()
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            n, q, k = self.history[-1]
            self.history[-1] = (n, q, k + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def _entries(self):
        if self.accountant is not None:
            return getattr(self.accountant, "history", [])
        return self.history

    def bound(self, history: Sequence | None = None) -> float:
        """Cumulative bound in nats for any one example after all recorded steps (or after
        ``history``, a copy of the accountant's taken earlier)."""
        try:
            entries = tuple(map(tuple, self._entries() if history is None else history))
        except TypeError:  # (an entry, or the history, that is no sequence)
            raise ValueError(
                "history must be a sequence of (noise_multiplier, sample_rate, steps) entries, "
                f"as an Opacus accountant's; got {history!r}"
            ) from None
        done, start = self._folded, 0.0 if self.poisson_sampling else _EPOCHS_START
        if (  # a rollback, another history, the other sampling: folded afresh
            entries[: len(done)] != done
            or len(done) >= len(entries)
            or type(self._state) is not type(start)
        ):
            done, self._state = (), start
        state = self._state
        for entry in entries[len(done) : -1]:
            state = self._after(state, entry)
        self._folded, self._state = entries[:-1], state
        if entries:
            state = self._after(state, entries[-1])
        return state[0] + state[1] if not self.poisson_sampling else state

    def _after(self, state: Any, entry: tuple) -> Any:
        """The bound's state after one more entry: once per epoch, or Poisson's KL sum."""
        if not self.poisson_sampling:
            return _epochs_after(state, entry)
        noise, rate, steps = history_entry(entry)
        if steps == 0:  # (0 x an infinite KL, sigma 0: nothing released)
            return state
        key = (noise, rate)
        if key not in self._kl:
            self._kl[key] = step_kl(*key)
        return state + steps * self._kl[key]
