"""Overhead budget: the monitor spends at most a set fraction of the training loop's own time.

A monitor that doubles the cost of training gets switched off. The fixed costs differ by orders
of magnitude between models: on a 10k-parameter CNN a DP step takes ~6 ms on one CPU core, the
exact Gram oracle ~1.5 ms, one critic training round ~25 ms; on a ResNet on a GPU the same
monitor is a few percent. So with ``every=None`` / ``train_every=None`` (the defaults) the
monitor does not follow a fixed schedule: it measures its own time and the training loop's and
plans its work so that ``monitor time <= fraction x training time``, measuring every step where
that is affordable and fewer where it is not.

Two kinds of work share the budget, each through a token bucket filled at its share of
``fraction x`` the training loop's time: the per-step measurement (tokens, the Gram oracle,
scoring) gets ``measure_share`` when critics exist, so a slow critic can never starve the exact
oracle; critic training rounds get the rest. A full bucket overflows into the other, and each
holds at most about one unit of its work (two cheap measurements, one critic round): unused
budget does not pile up into a long burst later
(a cumulative account would let a monitor that sat idle for a while spend a lot at once).

Decisions are made once per measured step, as a plan: how many logical steps until the next
measured one, and whether the critics train on this one. Under DPDDP every rank's plan travels
with the gathered chunks and all ranks follow the most frugal (the longest interval; critics and
an expensive epsilon only where every rank affords them): the ranks never disagree about a
collective, and no rank's work exceeds its own budget.
Timing makes the schedule, hence the records, vary run to run; pass integers to ``every`` and
``train_every`` for a reproducible schedule.

With overlap (:mod:`opacus_mi.overlap`) the monitor's work runs on a worker thread, beside the
training loop rather than inside its steps: it is booked to its kind as always, so the schedule is
as conservative as without overlap, but not subtracted from the training loop's time
(``charge(..., concurrent=True)``); the time the training thread spends waiting for the worker is
(:meth:`OverheadBudget.exclude`). The budget is shared by both threads, behind one lock.

The monitor's own time on the training thread outside those brackets (its step wrapper,
handing over the captures, delivering records to the sinks, this budget's own tick) is booked too
(:meth:`OverheadBudget.book_overhead`), from every bucket at its share: counted as training time,
a slow sink would have grown the budget. What no clock here sees is the monitor's effect on the
training steps themselves (its hooks, caches it leaves cold): on the 10k-parameter digits CNN
with torch's two threads, at a budget of 8% the books read 7.2-7.7% while side-by-side runs cost
1.083-1.148x (``benchmarks/side_by_side.py``, glibc's malloc pinned, eight runs), which is why the
default is 6% (books 5.4-5.7%, 1.087-1.107x).

Time on a GPU is device time: CUDA events bracket the monitor's work and are read once complete
(never waited on), so the budget adds no host synchronisation.

A fixed schedule (``every=N``) has no budget for its measurements, but an expensive epsilon
(Opacus's PRV) still gets a quarter of ``budget``, of the wall time: :class:`EpsilonPacer`.
Either way its cost is kept per unit of work (``EpsilonTracker.work``: the points of PRV's
domain, which follows epsilon and the steps) and scaled to the call a plan would make: on the
digits CNN at batch 1,024 (q = 0.7) the first call took 0.2 s and the next, at step ~830, 1.8 s;
costed as the last call, that one step put the books at 13-14% against a budget of 6%
(2.9-4.0% costed by its work).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

_EMA = 0.2  # weight of the newest cost in the running cost estimates
_GAP = 3.0  # one interval between steps counts as at most this many typical steps
_EARLY = 3  # the first intervals, judged together (their median is the first typical step)
# A bucket holds at most this many units of its work: two (cheap) measurements, or one critic
# round and a quarter (so rounds never come back to back after a quiet spell).
_CAP = {"measure": 2.0, "critic": 1.25, "epsilon": 1.25}
# The critics' first round is ordinary critic work, made once its bucket holds this many
# training steps' worth of credit (its cost is unknown before it runs; on a small CPU model a
# round costs ~5-10 steps, on a large GPU model a fraction of one). Its real cost then sets the
# running estimate, and any excess is a debt the bucket repays before the next round.
_FIRST_ROUND_STEPS = 4.0
# Kinds whose first step is booked as one-off setup: a measurement's first calls and tables, the
# first (PRV) epsilon. The critics' first round is not: it is a round like the others.
_SETUP_KINDS = ("measure", "epsilon")


@dataclass(frozen=True)
class Plan:
    """What the monitor does next: measure again in ``next_in`` logical steps; train the critics
    now; recompute an expensive epsilon (Opacus's PRV) now rather than report the latest one."""

    next_in: int
    train: bool
    epsilon: bool = True
    costed: bool = True  # next_in was planned from a measurement's cost (not known at setup)


class _Span:
    """Seconds of one bracket of monitor work: host clock on CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.t0 = time.perf_counter()
        self.excluded = 0.0  # host seconds inside the bracket that are not the monitor's
        self.start = self.end = None
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record(torch.cuda.current_stream(device))

    def stop(self) -> None:
        self.t1 = time.perf_counter()
        if self.cuda:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record(torch.cuda.current_stream(self.device))

    def seconds(self) -> float | None:
        """Elapsed seconds, or None while the GPU has not finished the bracketed work.

        On a GPU this is the bracket's span on the stream's timeline: from when the work queued
        before it (training's) finished to when the monitor's last kernel did, host-launch gaps
        included. The host clock would also count the monitor's one sync waiting for training.
        """
        if not self.cuda:
            return max(0.0, self.t1 - self.t0 - self.excluded)
        if not self.end.query():
            return None
        return max(0.0, self.start.elapsed_time(self.end) / 1e3 - self.excluded)

    def exclude(self, seconds: float) -> None:
        """Leave out ``seconds`` of the bracket: under DPDDP, waiting at the first collective
        for a slower rank, which without the monitor training would spend at Opacus's
        gradient all-reduce instead."""
        self.excluded += seconds


KINDS = ("measure", "critic", "epsilon")
# The share of the budget set aside for recomputing an expensive epsilon (see OverheadBudget).
EPSILON_SHARE = 0.25


def check_fraction(fraction: float) -> float:
    """``budget`` as a float, or a ValueError naming it and what it means."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction < math.inf
    ):
        raise ValueError(
            f"budget must be a positive number (the monitor's share of training time, e.g. "
            f"0.06 for at most 6% overhead); got {fraction!r}"
        )
    return float(fraction)


class EpsilonPacer:
    """When a fixed schedule (``every=N``) recomputes an expensive epsilon (Opacus's PRV).

    A fixed schedule says which steps are measured, not what their epsilon may cost, and PRV's
    ``get_epsilon`` costs ~25 ms at a few hundred steps and ~1 s at 10,000 (its FFT grows with
    the steps): 10-400 DP steps of a small model, for every record. So it is recomputed only
    once the wall time since the last recomputation ended is at least that one's cost x
    ``(1 / fraction - 1)``: epsilon then takes at most ``fraction`` of the loop's wall time,
    and a record in between carries the latest exact value and its step (``epsilon_step``).
    The first record always computes it; like the budget's setup kinds, that first call (which
    also fills the RDP tables and checks the tracker against Opacus, 2-3x a later call) sets no
    pace, so the second record computes it again and its cost does.
    ``LeakageMonitor(exact_epsilon=True)`` opts out.
    """

    def __init__(self, fraction: float):
        self.fraction = check_fraction(fraction)
        self.cost: float | None = None  # the cheapest seconds per unit of work seen
        self.count = 0  # recomputations so far
        self._end: float | None = None

    def due(self, work: float = 1.0) -> bool:
        """Whether a recomputation of ``work`` units (``EpsilonTracker.work``: the next call's
        PRV domain, which can be 100x the last one's) fits the pace now."""
        if self._end is None or self.cost is None:
            return True
        return time.perf_counter() - self._end >= self.cost * work * (1 / self.fraction - 1)

    def done(self, seconds: float, work: float = 1.0) -> None:
        """A recomputation of ``work`` units that took ``seconds`` has just ended.

        ``seconds``: the call's CPU time on its thread (the monitor's), not wall time, which
        also counts an overlap worker's waits for the GIL while training runs Python. The pace
        then follows the cheapest cost per unit seen, as a call is only ever slowed by what else
        runs: one slow call taken as the cost paced epsilon out of a whole run (the README's
        main job once kept step 1's epsilon for all 184 records)."""
        if self.count:  # the first is setup (see above)
            per_unit = seconds / work
            self.cost = per_unit if self.cost is None else min(self.cost, per_unit)
        self._end = time.perf_counter()
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        """The pace learned so far (the wall clock is the process's: not saved)."""
        return {"cost": self.cost, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on at a saved pace from now: a resumed run's first recomputation waits a pace,
        as the saved run's next one would have, instead of learning the cost again."""
        self.cost, self.count = state["cost"], state["count"]
        self._end = time.perf_counter() if self.count else None


class _Foreground:
    """Every budget's monitor seconds on the training thread, and its steps, summed over this
    process: with monitors of several models in one loop (a GAN's two), each is told the
    others' time, which is not its training time, and how many steps of theirs its own step
    spanned, so that each plans for its part of the fraction (see ``OverheadBudget._tick``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.ticks = 0
        self.lock = threading.Lock()  # (taken inside a budget's own lock, never around one)

    def add(self, seconds: float) -> None:
        with self.lock:
            self.seconds += seconds

    def read(self) -> float:
        with self.lock:
            return self.seconds

    def tick(self) -> int:
        """Count a step of some budget's loop; the count after it."""
        with self.lock:
            self.ticks += 1
            return self.ticks


_FOREGROUND = _Foreground()


def foreground(seconds: float) -> None:
    """A monitor without a budget (a fixed schedule) reports its training-thread seconds: a
    budgeted monitor of another model in the loop leaves them out of its training time."""
    if seconds > 0:
        _FOREGROUND.add(seconds)


class OverheadBudget:
    """Tracks training vs monitor time and plans the monitor's work to fit ``fraction``.

    Monitors of several models in one loop (one process) share the fraction: each leaves
    the others' time out of its training time and plans for ``fraction / n``, ``n`` - 1 the
    other budgets' steps that ended during its last one (see ``_Foreground``).

    Args:
        fraction: the most monitor time per unit of training time (0.06: at most 6%).
        measure_share: share of the budget reserved for the per-step measurement when critics
            exist (1.0 without critics); the critics get the rest.
        epsilon_share: share set aside, before that split, for recomputing an expensive epsilon
            (Opacus's PRV ``get_epsilon``: tens of ms, ~1 s at 10,000 steps); unused with a cheap
            accountant.
        device: where the monitor's work runs (CUDA work is timed with events).
    """

    def __init__(
        self,
        fraction: float,
        *,
        measure_share: float = 0.5,
        epsilon_share: float = EPSILON_SHARE,
        device=None,
    ):
        self.fraction = check_fraction(fraction)
        self.measure_share = float(measure_share)
        self.epsilon_share = float(epsilon_share)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.train_seconds = 0.0  # the training loop's own time (monitor time excluded)
        self.step_seconds: float | None = None  # running estimate of one training step
        # Per kind of work: seconds spent, running cost of one step's worth, token bucket.
        for kind in KINDS:
            setattr(self, f"{kind}_seconds", 0.0)
            setattr(self, f"{kind}_cost", None)
            setattr(self, f"{kind}_credit", 0.0)
        self._last_tick: float | None = None
        # The first intervals, uncapped until they are judged together (see _tick); None after.
        self._early: list[float] | None = []
        self._early_taken = 0.0  # what their judgement so far took back from training time
        self._spent_since_tick = 0.0  # host seconds of monitor work since the last tick
        # Host seconds the training thread spent inside brackets or excluded waits, ever: what
        # the step wrapper's own time leaves out (see host_booked).
        self._host_booked = 0.0
        self._pending: list[tuple[_Span, str, float]] = []
        # An expensive epsilon's cost grows with the run (Opacus's PRV domain follows epsilon
        # and the steps): its cost is estimated per unit of work (EpsilonTracker.work), and
        # the next call's work, given with each plan, scales it for the decision and the cap.
        self._epsilon_work = 1.0
        # One-off costs (first-call dispatch, lazy allocations, the sketch's tables) are paid by
        # the first step that measures (or computes a PRV epsilon); booked apart, they would
        # otherwise read as hundreds of steps of debt.
        self.setup_seconds = 0.0
        # The monitor's own bookkeeping on the training thread outside any bracket (its step
        # wrapper, taking the captures, delivering records to sinks): see book_overhead.
        self.overhead_seconds = 0.0
        self._seen: set[str] = set()
        self._seen_this_step: set[str] = set()
        self._step_cost: dict[str, float] = {}  # this step's settled seconds, by kind
        self._setup_cost: dict[str, float] = {}  # this step's setup seconds, by kind
        self._seeded: set[str] = set()  # kinds whose cost estimate is still a setup's
        self.critics = True  # whether critics share the budget (set by each plan)
        self.slow_epsilon = False  # whether epsilon has a share (set by each plan)
        self._lock = threading.RLock()  # the training thread ticks, an overlap worker charges
        self.sharing = 1  # 1 + the other budgets' steps within this one's last step
        self._foreground_at_tick = _FOREGROUND.read()
        self._ticks_at_tick = 0

    def _foreground(self, seconds: float) -> None:
        """``seconds`` of this monitor's time on the training thread, out of this interval."""
        self._spent_since_tick += seconds
        _FOREGROUND.add(seconds)

    # ------------------------------------------------------------------ bookkeeping
    def span(self) -> _Span:
        """Start timing a bracket of monitor work; pass it to :meth:`charge` when done."""
        return _Span(self.device)

    def charge(
        self, span: _Span, kind: str, *, concurrent: bool = False, work: float = 1.0
    ) -> None:
        """Book a finished bracket as ``"measure"``, ``"critic"`` or ``"epsilon"`` work.

        ``concurrent``: the work ran on a worker thread beside training (overlap), so it was not
        part of the interval between two training steps and is not subtracted from it.
        ``work``: the units of work it did (an epsilon's, see :meth:`plan`); its cost estimate
        is per unit.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        with self._lock:
            if getattr(span, "charged", False):
                raise RuntimeError("a monitor bracket was charged twice; start a new span")
            span.charged = True
            span.concurrent = concurrent
            span.stop()
            if not concurrent:
                self._host_booked += max(0.0, span.t1 - span.t0 - getattr(span, "excluded", 0))
            if not span.cuda and not concurrent:  # a GPU bracket: once its device time is known
                self._foreground(span.seconds())
            self._pending.append((span, kind, work))
            self._settle()

    def exclude(self, seconds: float) -> None:
        """Seconds the training thread spent on the monitor that no kind is charged for (waiting
        for an overlap worker whose work is booked as it runs): not training time."""
        with self._lock:
            self._foreground(seconds)
            self._host_booked += seconds

    def book_overhead(self, seconds: float) -> None:
        """Host seconds the monitor spent on the training thread outside any bracket (its
        per-step wrapper, handing over the captures, delivering records to the sinks): monitor
        time, not training time (counted as training time, it would have grown the budget).
        Paid from every bucket at its share, as off the top of the budget: paid from the
        measurement's alone, a wrapper costing more than that share (17 us a step, a 0.6 ms
        step's 2.8%, against its 2.25%) left it in a debt that grew all run, and the gaps
        between measured steps with it (114 steps at the start, 2,354 by step 20,000)."""
        if not seconds > 0:  # (a GPU bracket settling meanwhile can make the remainder < 0)
            return
        with self._lock:
            self._foreground(seconds)
            self.overhead_seconds += seconds
            for kind, share in self._shares(self.critics, self.slow_epsilon).items():
                setattr(self, f"{kind}_credit", getattr(self, f"{kind}_credit") - share * seconds)

    def spent_since_tick(self) -> float:
        """Monitor seconds taken out of the current training interval so far."""
        with self._lock:
            return self._spent_since_tick

    def host_booked(self) -> float:
        """Host seconds, ever, of the training thread inside brackets (charged, or waiting
        excluded): the step wrapper books its own time less these. On a GPU a bracket is its
        device time, and the host's wait in it for training's queued kernels (the monitor's
        one read per step) is training's, booked neither as the bracket's nor as overhead."""
        with self._lock:
            return self._host_booked

    def _settle(self) -> None:
        waiting = []
        for span, kind, work in self._pending:
            sec = span.seconds()
            if sec is None:
                waiting.append((span, kind, work))
                continue
            if span.cuda and not getattr(span, "concurrent", False):
                self._foreground(sec)
            if kind not in self._seen and kind in _SETUP_KINDS:
                self.setup_seconds += sec
                self._seen_this_step.add(kind)
                # Setup is not charged, but a PRV epsilon's is its first cost estimate: with
                # none, the next step would look free and compute it again at once. A
                # measurement is cheap enough to learn its cost from the next step.
                if kind != "measure":
                    self._setup_cost[kind] = self._setup_cost.get(kind, 0.0) + sec / work
                continue
            setattr(self, f"{kind}_seconds", getattr(self, f"{kind}_seconds") + sec)
            setattr(self, f"{kind}_credit", getattr(self, f"{kind}_credit") - sec)
            self._step_cost[kind] = self._step_cost.get(kind, 0.0) + sec / work
        self._pending = waiting

    def tick(self) -> None:
        """End of a logical training step: the time since the last tick, less the monitor's,
        was the training loop's."""
        with self._lock:
            self._tick()

    def _tick(self) -> None:
        now = time.perf_counter()
        self._settle()  # GPU brackets finished by now count against this interval
        foreground = _FOREGROUND.read()
        # Other monitors' time on this thread since the last tick: not this loop's training.
        others = max(0.0, foreground - self._foreground_at_tick - self._spent_since_tick)
        self._foreground_at_tick = foreground
        ticks = _FOREGROUND.tick()
        if self._last_tick is not None:
            self.sharing = 1 + max(0, ticks - 1 - self._ticks_at_tick)
            own = max(0.0, now - self._last_tick - self._spent_since_tick - others)
            typical = None
            if self._early is not None:
                # No typical step yet to cap an interval by: the first few are judged together,
                # each capped at a few of their median (of two, the smaller), and the step time
                # is seeded from that.
                # Not the first alone (an evaluation at step 0 counted as training, and the step
                # time it set made plans measure every step for dozens of steps), nor the first
                # by the second: a monitored read that waits for training's queued kernels (a
                # GPU loop syncing after the step) moves that wait into the interval before it,
                # leaving the next one short; a typical first interval was then taken for a
                # pause, and the step time seeded from the short one capped the next ten (a
                # 0.1 s loop booked 2.3 s of training in 30 steps, not 3.0; it measured 22).
                if own > 0:  # (a zero interval is a clock artefact, see below)
                    self._early.append(own)
                if len(self._early) >= 2:  # (judged again as each comes: a short run too)
                    typical = sorted(self._early)[(len(self._early) - 1) // 2]
                    excess = sum(max(0.0, e - _GAP * typical) for e in self._early)
                    change, self._early_taken = excess - self._early_taken, excess
                    if change:
                        self.train_seconds -= change
                        self._refill(-change, self.critics, self.slow_epsilon)
                    if len(self._early) == _EARLY:
                        self._early = None  # (this interval's own excess is in it: not capped)
            elif self.step_seconds:
                # A pause between steps (an evaluation loop, a checkpoint, another job) is not
                # training time: credit at most a few typical steps for one interval.
                own = min(own, _GAP * self.step_seconds)
            self.train_seconds += own
            if own > 0:  # (a step of no training time is a clock artefact: a zero estimate
                # would cap every later interval at zero and the budget would never refill)
                self.step_seconds = _ema(self.step_seconds, own)
            if typical is not None:
                self.step_seconds = typical
            self._refill(own, self.critics, self.slow_epsilon)
        self._last_tick, self._ticks_at_tick = now, ticks
        self._spent_since_tick = 0.0
        self._seen |= self._seen_this_step
        self._seen_this_step = set()
        # Costs are estimated per step (a step books several spans of each kind).
        for kind, sec in self._step_cost.items():
            # A setup call's cost (a PRV epsilon's first, 2-3x a later one: it also checks
            # Opacus's own call and fills tables) only seeds the estimate until a real one comes.
            old = None if kind in self._seeded else getattr(self, f"{kind}_cost")
            setattr(self, f"{kind}_cost", _ema(old, sec))
            self._seeded.discard(kind)
        for kind, sec in self._setup_cost.items():
            if getattr(self, f"{kind}_cost") is None:
                setattr(self, f"{kind}_cost", sec)
                self._seeded.add(kind)
        self._step_cost, self._setup_cost = {}, {}

    @property
    def spent(self) -> float:
        return sum(getattr(self, f"{kind}_seconds") for kind in KINDS) + self.overhead_seconds

    # ------------------------------------------------------------------ decisions
    def _shares(self, critics: bool, slow_epsilon: bool) -> dict[str, float]:
        eps = self.epsilon_share if slow_epsilon else 0.0
        measure = self.measure_share if critics else 1.0
        return {"measure": (1 - eps) * measure, "critic": (1 - eps) * (1 - measure), "epsilon": eps}

    def _fraction(self) -> float:
        return self.fraction / self.sharing

    def _refill(self, seconds: float, critics: bool, slow_epsilon: bool = False) -> None:
        """Add ``fraction x seconds`` of training time to the buckets at their shares; what
        overflows a full bucket goes to the others (measurement first), the rest expires."""
        shares = self._shares(critics, slow_epsilon)
        caps = {}
        excess = 0.0
        for kind in KINDS:
            cost = getattr(self, f"{kind}_cost")
            if cost is not None and kind == "epsilon":
                cost *= self._epsilon_work  # the next call's, not the last one's
            caps[kind] = (
                0.0 if shares[kind] == 0 else (math.inf if cost is None else _CAP[kind] * cost)
            )
            credit = getattr(self, f"{kind}_credit") + shares[kind] * self._fraction() * seconds
            excess += max(0.0, credit - caps[kind])
            setattr(self, f"{kind}_credit", min(credit, caps[kind]))
        for kind in KINDS:
            room = caps[kind] - getattr(self, f"{kind}_credit")
            if excess <= 0:
                break
            if room > 0:
                take = min(excess, room)
                setattr(self, f"{kind}_credit", getattr(self, f"{kind}_credit") + take)
                excess -= take

    def plan(self, *, critics: bool, slow_epsilon: bool = False, epsilon_work: float = 1.0) -> Plan:
        """The plan at a measured step (see module docs): whether the critics train and an
        expensive epsilon is recomputed now, and when to measure next. ``epsilon_work``: the
        units of work (``EpsilonTracker.work``) that recomputing epsilon now would take; pass
        the same to :meth:`charge` when it is done."""
        with self._lock:
            return self._plan(critics, slow_epsilon, epsilon_work)

    def _plan(self, critics: bool, slow_epsilon: bool, epsilon_work: float = 1.0) -> Plan:
        self.critics, self.slow_epsilon = critics, slow_epsilon
        self._epsilon_work = float(epsilon_work)
        if self.critic_cost is not None:
            round_cost = self.critic_cost
        else:  # before the first round: a prior in training steps (see _FIRST_ROUND_STEPS)
            round_cost = _FIRST_ROUND_STEPS * self.step_seconds if self.step_seconds else math.inf
        train = critics and self.critic_credit >= round_cost
        epsilon = not slow_epsilon or self.epsilon_credit >= (
            (self.epsilon_cost or 0.0) * self._epsilon_work
        )
        # The first charged measurement plans before its step's tick folds in its cost and the
        # first interval: its own cost and this step's training time so far stand in (else
        # the next step was measured too, at any cost: 13% against a 6% budget at startup
        # when a measurement costs 30 steps).
        cost = self.measure_cost
        if cost is None:
            cost = self._step_cost.get("measure")
        step = self.step_seconds
        if step is None and self._last_tick is not None:
            step = max(0.0, time.perf_counter() - self._last_tick - self._spent_since_tick)
        next_in = 1
        if cost is not None and step:
            short = cost - self.measure_credit
            rate = self._shares(critics, slow_epsilon)["measure"] * self._fraction()
            rate *= step
            if short > 0:
                next_in = max(1, min(1_000_000, math.ceil(short / max(rate, 1e-12))))
        early = self._early
        if early is not None and len(early) >= 2 and max(early) > _GAP * min(early):
            # The first intervals disagree (a pause, or a GPU read's wait moved from one into
            # the other): the step time judged from them so far is a guess, the smaller one's.
            # Plan no further than the end of the judging, and plan again from the typical step
            # then: a GPU loop syncing after the step measured none of steps 4-36 of 0.1 s at a
            # 2.5 ms measurement, planned from a 2.8 ms "step".
            next_in = min(next_in, _EARLY - len(early) + 1)
        return Plan(next_in=next_in, train=train, epsilon=epsilon, costed=bool(cost and step))

    def state(self) -> dict[str, float]:
        """Seconds so far, for records and reports."""
        with self._lock:
            return self._state()

    def _state(self) -> dict[str, float]:
        return {
            "train_seconds": self.train_seconds,
            **{f"{kind}_seconds": getattr(self, f"{kind}_seconds") for kind in KINDS},
            "setup_seconds": self.setup_seconds,
            "overhead_seconds": self.overhead_seconds,
        }


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EMA) * old + _EMA * new
