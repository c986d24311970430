"""Online critic for the monitor: evaluate each batch first, then learn from it.

Each monitored batch is scored by the current critic BEFORE the critic ever trains on it, so the
recorded bound is held out (an honest lower bound, not memorisation). The batch then joins a
bounded window of recent pairs, and on a schedule the critic takes a few optimizer steps on
minibatches drawn from that window with its own Adam and its own generator.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import is_int_at_least
from ..reads import ReadBatch
from ..ring import RowRing
from .bounds import (
    BOUNDS,
    CriticLoss,
    _offdiag_logmeanexp,
    baseline_bound,
    bootstrap_bound,
    bootstrap_counts,
    bound,
    infonce_jackknife,
    jackknife_interval,
    percentile_tensor,
    random_cycle,
)
from .critics import SeparableCritic

MIN_CI_PAIRS = 8
# The bounds with a mean of e^T over the marginal pairs (MINE, NWJ, SMILE) hang on its rare
# large terms, which a small batch often lacks and its bootstrap cannot see, the more so the
# larger the MI. Reviewers' runs (the interval's low end above the truth, nominal 2.5%): at 8
# pairs 10% (3.9 nats); at 16, 6-8% (4 nats) to 15-18% (6-8 nats); at 32, 1.4-1.8% (4 nats),
# 3.5-6% (5-6), 8% (8); at 48, 3.3% (6 nats), 4.3% (8); at 64, at most 1.1% up to 8 nats. So
# at least 32 pairs, and PAIRS_PER_NAT pairs for each nat the figure reads (an interval
# over-reaches when its own figure reads high). InfoNCE's per-row terms are bounded: 8 pairs.
# A later review, with the exact critic soft-bounded as the library's (1,500-2,000 batches
# each), found the pairs needed growing faster than the nats, as the e^T terms' spread grows
# like e^I: over the truth 6-8% at 7 nats and 64 pairs (1-2 dims), 3.4% at 8 and 80, 4.2% at 8
# and 128, 12% at 8 and 96, 16-20% at 10 and 128; within nominal where the truth was at most
# ln n + 2 (0.6-0.9% at 5 nats and 64 pairs, 2.4% at 6 and 64, 0.7% at 6 and 96). So also no
# interval where the figure reads above ln n + LN_PAIRS_EXCESS: then 0 of 49-1,040 kept batches
# over the truth in each of those settings.
MIN_CI_PAIRS_EXP = 32
PAIRS_PER_NAT = 8
LN_PAIRS_EXCESS = 2.0
# InfoNCE's likewise near its ceiling ln n: n (ln n - figure) is the batch's summed loss, in nats,
# of picking each pair's partner among the n candidates; under ~8 the critic's rare confusions
# are mostly missing from the batch, and nothing in it shows their spread. The jackknife's low
# end, exact critic (nominal 2.5%): 11% at a summed loss of 4 (4 nats, 16 pairs), 26-37% at 1-2
# (8-10 nats, 64-128 pairs); withheld below 8, at most 0.1% in 13 settings of 1-10 nats and
# 8-256 pairs, all kept where the expected loss is 58 or more.
INFONCE_MIN_LOSS = 8.0
MIN_VALIDATION = 64  # validation pairs before a learned critic may report
NULL_MARGIN_SE = 2.0  # a learned critic must validate this many standard errors above 0


def interval_withheld(kind: str, n: int, figure: float | torch.Tensor) -> bool | torch.Tensor:
    """Whether n pairs are too few for an interval of a ``kind`` figure (the rules of
    ``MIN_CI_PAIRS_EXP`` and ``INFONCE_MIN_LOSS`` above; also ``estimate_mi``'s). A tensor
    ``figure`` gives a tensor, where it is (no host read)."""
    if kind == "infonce":
        return (n < MIN_CI_PAIRS) | (n * (math.log(max(n, 1)) - figure) < INFONCE_MIN_LOSS)
    excess = math.log(max(n, 1)) + LN_PAIRS_EXCESS
    return (n < MIN_CI_PAIRS_EXP) | (figure * PAIRS_PER_NAT > n) | (figure > excess)


class PairWindow:
    """The most recent (x, y) pairs, capped at ``size``: what an online critic trains on.

    A ring buffer: adding a batch writes B rows (no copy of the whole window per
    step, which at 4,096 pairs cost more than the tokens themselves), and running float64 sums
    give the window's per-column mean and std in O(d) for the critic's input scaler.

    Rows are stored in bfloat16 by default (``dtype``): the window is the monitor's largest
    state, and a critic that standardises its inputs loses nothing to a 2^-8 relative rounding
    (float32's range is kept, so tiny clipped tokens do not underflow as in float16). They are
    stored less float32 column means (offsets), so that rounding is relative to a column's
    spread, not to its offset (a feature of 2000 + z, rounded whole, kept steps of 8 and none
    of z). Once a window's worth of rows has arrived since the offsets were fixed, they are
    fixed again from the newest batch and the rows held are stored anew: tokens shrink as
    training goes on, and rows of 1e-3 of the first batch's spread, stored less its means,
    kept 3 distinct values (a known 1.02 nats read -8.9). Rows are rounded on the way in (and
    at such a re-anchoring), so the running sums see exactly the values stored, and read back
    as float32.
    """

    def __init__(self, size: int, dtype: torch.dtype = torch.bfloat16):
        if size < 1:
            raise ValueError(f"window must be a positive number of pairs, got {size}")
        self.size = size
        self.dtype = dtype
        self._x, self._y = RowRing(size), RowRing(size)
        # [sum x, sum x^2, sum y, sum y^2] of the stored (offset) rows, float64
        self._sums: list[torch.Tensor] = []
        self._offsets: tuple[torch.Tensor, torch.Tensor] | None = None  # float32 column means
        self._since_anchor = 0  # rows added since the offsets were fixed

    def __len__(self) -> int:
        return len(self._x)

    @property
    def x(self) -> torch.Tensor | None:
        return self._wide(self._x.ordered(), 0)

    @property
    def y(self) -> torch.Tensor | None:
        return self._wide(self._y.ordered(), 1)

    def _wide(self, t: torch.Tensor | None, which: int) -> torch.Tensor | None:
        return None if t is None else t.float() + self._offsets[which]

    def anchor(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fix the stored rows' offsets from this batch, if none are fixed yet or if with it a
        window's worth of rows will have arrived since (:meth:`add` does it otherwise; then the
        rows held are stored anew). Column means in float64, kept as float32 (a bfloat16
        offset was off by up to half its ulp, which the residuals then carried): the same rows
        in any order (the control critic's re-paired batch) give the same offsets, so the same
        stored rows. Float32 or wider rows are stored as they are."""
        if x.shape[0] == 0:
            return
        narrow = torch.finfo(self.dtype).bits < 32
        due = narrow and self._since_anchor + x.shape[0] > self.size
        if self._offsets is not None and not due:
            return
        new = tuple(
            v.double().mean(0).float() if narrow else v.new_zeros(v.shape[1], dtype=torch.float32)
            for v in (x, y)
        )
        if self._offsets is not None and len(self):  # the rows held, less the new offsets
            for ring, old, offset in zip((self._x, self._y), self._offsets, new, strict=True):
                rows = ring.valid()  # (a view of the ring's storage)
                rows.copy_((rows.float() + old - offset).to(self.dtype))
            self.resync()  # (the sums are of the rows as stored)
        self._offsets, self._since_anchor = new, 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        self.anchor(x, y)
        x = (x.float() - self._offsets[0]).to(self.dtype)
        y = (y.float() - self._offsets[1]).to(self.dtype)
        if not self._sums:
            self._sums = [
                torch.zeros(d, dtype=torch.float64, device=x.device)
                for d in (x.shape[1], x.shape[1], y.shape[1], y.shape[1])
            ]
        old_x, old_y = self._x.add(x), self._y.add(y)
        if old_x is not None:  # the displaced oldest rows leave the running sums
            self._update_sums(old_x, old_y, -1.0)
        self._update_sums(x[-self.size :], y[-self.size :], 1.0)
        self._since_anchor += x.shape[0]

    def _update_sums(self, x: torch.Tensor, y: torch.Tensor, sign: float) -> None:
        x64, y64 = x.to(torch.float64), y.to(torch.float64)
        moments = (x64.sum(0), (x64 * x64).sum(0), y64.sum(0), (y64 * y64).sum(0))
        for acc, v in zip(self._sums, moments, strict=True):
            acc.add_(v, alpha=sign)

    def resync(self) -> None:
        """Recompute the running sums from the rows held (drops accumulated rounding)."""
        if not len(self):
            return
        for acc in self._sums:
            acc.zero_()
        self._update_sums(self._x.valid(), self._y.valid(), 1.0)  # float64 in _update_sums

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-column (mean x, std x, mean y, std y) of the window, in float32."""
        n = max(len(self), 1)
        out = []
        for (s, s2), offset in zip((self._sums[:2], self._sums[2:]), self._offsets, strict=True):
            mean = s / n
            var = (s2 / n - mean * mean).clamp_min(0.0)  # (a shift leaves it as it is)
            out += [(mean + offset.double()).float(), var.sqrt().float()]
        return out[0], out[1], out[2], out[3]

    def clear(self) -> None:
        self._x.clear()
        self._y.clear()
        self._sums = []
        self._offsets = None
        self._since_anchor = 0

    def recent(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[-n:], self.y[-n:]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A minibatch of ``min(n, len)`` distinct pairs drawn with the caller's generator."""
        pick = torch.randperm(len(self), generator=generator, device=generator.device)[:n]
        x, y = self._x.valid(), self._y.valid()
        pick = pick.to(x.device)
        return x[pick].float() + self._offsets[0], y[pick].float() + self._offsets[1]

    def state_dict(self) -> dict:
        """The rows as stored (bfloat16 less their offsets, in ring order) with the offsets,
        the write head and the running sums: a round trip restores the window exactly, so a
        resumed run draws the same minibatches from the same values as one never stopped."""
        if self._x.buf is None:  # no rows; the offsets an anchor fixed still hold
            offsets = None if self._offsets is None else [o.clone() for o in self._offsets]
            return {"x": None, "y": None, "offsets": offsets, "since_anchor": self._since_anchor}
        n = len(self)
        return {
            "stored": {
                "size": self.size,
                "x": self._x.buf[:n].clone(),
                "y": self._y.buf[:n].clone(),
                "head": self._x.head,
                "offsets": [o.clone() for o in self._offsets],
                "sums": [t.clone() for t in self._sums],
                "since_anchor": self._since_anchor,
            }
        }

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        stored = state.get("stored")
        if (
            stored is not None
            and stored["x"].dtype == self.dtype
            and stored.get("size") == self.size
        ):
            for ring, rows in ((self._x, stored["x"]), (self._y, stored["y"])):
                ring.restore(rows, stored["head"])
            self._offsets = tuple(o.clone() for o in stored["offsets"])
            self._sums = [t.clone() for t in stored["sums"]]
            # (An earlier version's state: its offsets were fixed at its first batch.)
            self._since_anchor = int(stored.get("since_anchor", len(self)))
            return
        if stored is not None:  # another window size or precision: re-add the rows, oldest first
            n = len(stored["x"])
            order = torch.roll(torch.arange(n), -(int(stored["head"]) % n))  # the oldest at head
            (ox, oy), x, y = stored["offsets"], stored["x"][order], stored["y"][order]
            self.add(x.float() + ox, y.float() + oy)
        elif state.get("x") is not None:  # a checkpoint from before the rows were kept stored
            self.add(state["x"], state["y"])
        elif state.get("offsets") is not None:  # empty, anchored
            self._offsets = tuple(o.clone() for o in state["offsets"])
            self._since_anchor = int(state.get("since_anchor", 0))


@dataclass(frozen=True)
class BatchEstimate:
    """Held-out bound on one batch: matched pairs, shuffled pairs, and their difference."""

    matched: float
    mismatched: float
    ci_low: float
    ci_high: float
    n: int

    @property
    def difference(self) -> float:
        return self.matched - self.mismatched

    @classmethod
    def of(cls, values: Sequence[float], n: int) -> BatchEstimate:
        """From ``[matched, mismatched, ci_low, ci_high]`` read back to the host."""
        matched, mismatched, lo, hi = values
        return cls(matched=matched, mismatched=mismatched, ci_low=lo, ci_high=hi, n=n)

    def shown(self, kind: str) -> BatchEstimate:
        """As a record shows it: InfoNCE's interval withheld near ln n (``INFONCE_MIN_LOSS``;
        :func:`held_out_figures` computes it there too, for the bug check and the semi-oracle's
        floor)."""
        if kind == "infonce" and interval_withheld(kind, self.n, self.matched):
            return dataclasses.replace(self, ci_low=math.nan, ci_high=math.nan)
        return self


def held_out_figures(
    kind: str,
    scores: torch.Tensor,
    generator: torch.Generator,
    bootstrap: int,
    baseline: float | None = None,
) -> torch.Tensor:
    """``[matched, mismatched, ci_low, ci_high]`` of a fixed critic's scores on a batch, as one
    float64 tensor where the scores are (not read: off the CPU each read is a sync).

    Mismatched: the same critic on one random re-pairing (the estimator's bias floor). The
    interval: InfoNCE's, Student's t with a delete-one-pair jackknife's standard error (from
    ``MIN_CI_PAIRS`` pairs and a summed loss of ``INFONCE_MIN_LOSS``;
    :func:`~opacus_mi.estimators.bounds.infonce_jackknife`); the bounds with a marginal mean of
    ``e^T``, a percentile bootstrap over the pairs (from ``MIN_CI_PAIRS_EXP`` pairs and
    ``PAIRS_PER_NAT`` per nat of the figure); else NaN. ``baseline``: MINE's figures in
    :func:`~opacus_mi.estimators.bounds.baseline_bound`'s form with this ``c`` (unbiased on a
    batch of any size), not DV's. InfoNCE's interval is given near ``ln n`` too: a record
    withholds it there (:meth:`BatchEstimate.shown`), the monitor's bug check and the
    semi-oracle's union floor read it.
    """
    n = scores.shape[0]

    def figure(s: torch.Tensor) -> torch.Tensor:
        return (
            baseline_bound(s, baseline)
            if kind == "mine" and baseline is not None
            else bound(kind, s)
        )

    matched = figure(scores)
    # A random n-cycle: no pair keeps its partner (a plain permutation left one matched on
    # average, the matched figure itself in half the batches at n = 2).
    mismatched = figure(scores[:, random_cycle(n, generator).to(scores.device)])
    if kind == "infonce" and n >= MIN_CI_PAIRS:
        # Its row terms share their candidates, so they are not independent: Student's t with
        # a delete-one-pair jackknife's spread (a percentile bootstrap of the rows put the low
        # end above the truth 4.5-6.4% of the time at 8-16 pairs; t over the rows, 12.6% at 5
        # nats on 48; this, 2-5%, and near ln n see INFONCE_MIN_LOSS).
        interval = jackknife_interval(infonce_jackknife(scores), matched, 0.95)
    elif kind != "infonce" and n >= MIN_CI_PAIRS_EXP:
        counts = bootstrap_counts(n, bootstrap, generator, scores.device)
        interval = percentile_tensor(bootstrap_bound(kind, scores, counts, baseline))
        # decided where the figure is (no host read)
        interval = torch.where(interval_withheld(kind, n, matched), math.nan, interval)
    else:  # too few pairs for an interval
        interval = torch.full((2,), math.nan, dtype=torch.float64, device=scores.device)
    return torch.cat([torch.stack([matched, mismatched]).double(), interval])


class OnlineEstimator:
    """A critic trained online on a window of (feature, token) pairs.

    Args:
        kind: ``"mine"`` or ``"infonce"``.
        window: pairs kept for training (oldest dropped first).
        train_every: train after every n-th observed batch (a critic update costs about as much
            as a small DP step, so the default does not train on every step).
        warmup: train after each of the first ``warmup`` batches regardless of ``train_every``:
            a fresh critic is what needs the updates; later rounds only track drift.
        holdout: every ``holdout``-th pair of each batch (0: none) goes to a validation window
            the critic never trains on; after each round the critic that reports is whichever
            of the new iterate, the previous choice and a constant critic (bound 0) scores
            higher there (online early stopping; a learned critic must clear 0 by 2 standard
            errors, and until 64 validation pairs exist the constant one reports). The
            reported figure is still the next batch, unseen by all of them.
        train_iters: optimizer steps per training round.
        batch_size: pairs per critic minibatch.
        generator: the monitor's generator; minibatch draws and initialisation come from it.
        token_encoder: ``"sketch"`` (the critic reads the concatenated sketch tokens) or a
            learned encoder in front of the critic's token tower, trained with it by the same
            Adam: ``"autoencoder"`` or ``"transformer"`` (:mod:`opacus_mi.learned_tokens`).
        layer_dims: per-layer token sizes the tokens are concatenated from (learned encoders).
    """

    def __init__(
        self,
        kind: str = "mine",
        *,
        window: int = 4096,
        train_every: int = 2,
        train_iters: int = 4,
        warmup: int = 32,
        holdout: int = 4,
        validation: int = 512,
        batch_size: int = 256,
        lr: float = 1e-3,
        hidden: int = 128,
        embed: int = 32,
        bootstrap: int = 200,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        token_encoder: str = "sketch",
        layer_dims: Sequence[int] | None = None,
    ):
        if kind not in BOUNDS:
            raise ValueError(f"estimator must be one of {BOUNDS}, got {kind!r}")
        self.kind = kind
        # Imported here: learned_tokens builds on estimators.critics (no import cycle).
        from ..learned_tokens import TOKEN_ENCODERS, check_layer_dims

        if token_encoder not in TOKEN_ENCODERS:
            raise ValueError(
                f"token_encoder must be one of {TOKEN_ENCODERS}, got {token_encoder!r}"
            )
        self.token_encoder = token_encoder
        self.layer_dims = None if token_encoder == "sketch" else check_layer_dims(layer_dims)

        if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
            raise ValueError(f"holdout must be an integer >= 0 (0 turns it off), got {holdout!r}")
        if not is_int_at_least(batch_size, 2):  # (one pair has no mismatched pair to score)
            raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
        self.train_every = max(1, train_every)
        self.train_iters = train_iters
        self.warmup = max(0, warmup)
        self.holdout = holdout
        self.val = PairWindow(validation)
        self.selected: nn.Module | None = None  # the critic that reports (see ``train``)
        self.kept_previous = 0  # rounds after which the earlier critic validated better
        self.resets = 0  # diverged rounds, each followed by a fresh critic
        self.null_selected = False  # no learned critic validated above 0 (see ``train``)
        self.baseline: float | None = None  # MINE's c from the validation pairs (see ``_select``)
        self.batch_size = batch_size
        self.lr = lr
        self.hidden, self.embed = hidden, embed
        self.bootstrap = bootstrap
        self.generator = generator
        self.device = torch.device(device)
        self.critic: SeparableCritic | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.loss = CriticLoss(self.kind)
        self.pairs = PairWindow(window)
        self.batches_seen = 0
        self.small_batches = 0  # batches smaller than holdout (see observe)
        self.updates = 0

    def _build(self, x_dim: int, y_dim: int) -> None:
        self._new_critic(x_dim, y_dim)
        self.pairs.clear()
        self.val.clear()
        self.batches_seen = 0

    def _make_critic(self, x_dim: int, y_dim: int, generator: torch.Generator):
        """A critic for ``x_dim`` features and ``y_dim`` token coordinates, and its Adam."""
        if self.token_encoder == "sketch":
            critic = SeparableCritic(
                x_dim,
                y_dim,
                hidden=self.hidden,
                embed=self.embed,
                generator=generator,
                device=self.device,
            )
        else:  # encoder params are critic params: the same Adam and state_dict train/save them
            from ..learned_tokens import EncodedCritic

            critic = EncodedCritic(
                x_dim,
                y_dim,
                self.token_encoder,
                self.layer_dims,
                hidden=self.hidden,
                embed=self.embed,
                generator=generator,
                device=self.device,
            )
        return critic, torch.optim.Adam(critic.parameters(), lr=self.lr, foreach=True)

    def _new_critic(self, x_dim: int, y_dim: int) -> None:
        self.critic, self.optimizer = self._make_critic(x_dim, y_dim, self.generator)
        self.loss = CriticLoss(self.kind)
        self.selected = None
        self.null_selected = False
        self.baseline = None
        self.updates = 0

    @property
    def ready(self) -> bool:
        return self.critic is not None and self.updates > 0

    @property
    def worth_training(self) -> bool:
        """Whether a training round now could change what this estimator reports: not before
        the validation window can select a learned critic (until then the constant critic
        reports 0 whatever the round learns). Used by the overhead budget, which should not
        spend a round's time on nothing."""
        return len(self.pairs) >= 4 and (self.holdout <= 1 or len(self.val) >= MIN_VALIDATION)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> BatchEstimate | None:
        """Held-out bound on this batch; None before the critic has trained or if n < 2."""
        values = self.evaluate_on_device(x, y)
        if values is None:
            return None
        return BatchEstimate.of(values.tolist(), x.shape[0]).shown(self.kind)

    @torch.no_grad()
    def evaluate_on_device(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """:meth:`evaluate`'s ``[matched, mismatched, ci_low, ci_high]`` as one float64 tensor
        on the critic's device, not yet read: off the CPU each read is a host sync, and the
        monitor reads a record's figures in one transfer. InfoNCE's interval near ln n is
        not withheld here (:meth:`BatchEstimate.shown`): the caller decides, once it is read."""
        n = x.shape[0]
        if (
            not self.ready
            or n < 2
            or x.shape[1] != self.critic.x_dim
            or y.shape[1] != self.critic.y_dim
        ):
            return None
        if self.null_selected:  # the constant critic validated best: its bound is exactly 0
            return torch.zeros(4, dtype=torch.float64, device=self.device)
        critic = self.selected if self.selected is not None else self.critic
        critic.eval()
        scores = critic.scores(x.to(self.device).float(), y.to(self.device).float())
        return held_out_figures(
            self.kind, scores, self.generator, self.bootstrap, baseline=self.baseline
        )

    def observe(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        train: bool | None = None,
        reads: ReadBatch | None = None,
    ) -> bool:
        """Add a batch of pairs to the window and train if the schedule says so (``train``
        overrides the schedule: the monitor's overhead budget decides, see
        :mod:`opacus_mi.budget`).

        Returns True if training diverged (non-finite loss) and the critic was reset: a fresh
        critic restarts from the window rather than a NaN propagating into every later estimate.
        Rows with a non-finite value are dropped on the CPU (without ``reads``: the monitor has
        dropped them already); a batch smaller than ``holdout`` is not split, but every
        ``holdout``-th such batch goes to the validation window whole.
        With ``reads`` the round's outcome is read with the rest of the batch (the monitor reads
        all of a step's rounds at once): its model selection, and a reset (counted in
        ``resets``), happen at ``reads.read()``, and this returns False.
        """
        x, y = x.detach().to(self.device).float(), y.detach().to(self.device).float()
        if reads is None and self.device.type == "cpu":
            # (The monitor, which reads a step's figures at once, has dropped them already.)
            finite = torch.isfinite(x).all(dim=1) & torch.isfinite(y).all(dim=1)
            if not bool(finite.all()):  # a NaN row in the window reset every round after it
                x, y = x[finite], y[finite]
        if x.shape[0] == 0:
            return False
        if (
            self.critic is None
            or x.shape[1] != self.critic.x_dim
            or y.shape[1] != self.critic.y_dim
        ):
            self._build(x.shape[1], y.shape[1])
        for window in (self.pairs, self.val):  # from the whole batch, before the split
            window.anchor(x, y)
        if self.holdout > 1 and x.shape[0] >= self.holdout:
            # Every holdout-th pair is held out. The others are indexed, not masked: a boolean
            # mask would read its count back to the host (a sync off the CPU).
            h, n = self.holdout, x.shape[0]
            self.val.add(x[::h], y[::h])
            j = torch.arange(n - (n + h - 1) // h, device=x.device)
            rest = j + j // (h - 1) + 1  # the j-th index that is not a multiple of h
            x, y = x[rest], y[rest]
        elif self.holdout > 1:
            # A batch smaller than holdout: every holdout-th such batch goes to validation
            # whole (split per batch, the window never filled, and the critic never reported,
            # silently reading 0).
            self.small_batches += 1
            if self.small_batches % self.holdout == 0:
                self.val.add(x, y)
                x, y = x[:0], y[:0]
        if x.shape[0]:
            self.pairs.add(x, y)
        self.batches_seen += 1
        due = self.batches_seen <= self.warmup or self.batches_seen % self.train_every == 0
        if train is not None:
            due = train
        if due and len(self.pairs) >= 4:
            before, own = self.resets, reads is None
            reads = ReadBatch(self.device) if own else reads
            self._round(reads, reset=True)
            if own:
                reads.read()
                return self.resets > before
        return False

    def _reset(self) -> None:
        """A fresh training critic after a diverged round, restarting from the window. The
        reporting critic, a copy the diverged round never touched, stays with its baseline and
        round count (they went too: no learned figure until the next round, then one from a
        critic of a single round, 0.17-0.48 nats where the kept one read ~1.0)."""
        kept = (self.selected, self.null_selected, self.baseline, self.updates)
        self._new_critic(self.critic.x_dim, self.critic.y_dim)
        if kept[0] is not None:
            self.selected, self.null_selected, self.baseline, self.updates = kept
        self.pairs.resync()
        self.resets += 1

    @torch.no_grad()
    def _validation_bound(self, critic: nn.Module) -> torch.Tensor:
        """``[bound, standard error, baseline]`` on the validation pairs (float64, not read).

        The standard error is that of the mean of the per-pair matched terms (the joint term
        ``T_ii``; InfoNCE's per-row term), the part of the bound that varies pair to pair. The
        baseline: the critic's log-partition ``log mean e^T`` over the validation pairs' many
        marginal pairs, MINE's ``c`` for the next batches (:func:`held_out_figures`).
        """
        critic.eval()
        scores = critic.scores(self.val.x, self.val.y)
        terms = scores.diagonal()
        if self.kind == "infonce":
            terms = terms - torch.logsumexp(scores, dim=1)
        se = terms.std() / math.sqrt(len(self.val))
        if self.kind == "mine":  # DV's own log-partition term, computed once for both
            baseline = _offdiag_logmeanexp(scores)
            value = scores.diagonal().mean() - baseline
        else:  # (only MINE's figures use a baseline)
            baseline, value = torch.full_like(se, math.nan), bound(self.kind, scores)
        return torch.stack([value, se, baseline]).double()

    def train(self) -> float:
        """One training round, then online model selection on the validation pairs.

        The critic always keeps training (a strict "never get worse" rule stalls it: progress
        passes through noisy dips), but the critic that *reports* is the one with the higher
        bound on the current validation pairs: the new iterate, the previously selected one
        (both re-scored now, so a choice made on an older gradient distribution cannot go
        stale), or a constant critic, whose bound is exactly 0 for every estimator here. The
        constant wins when no learned critic validates above 0: a learned critic that found
        nothing then reports 0 [0, 0] rather than a confidently negative figure. All three are
        fixed before the next batch is scored, so that score stays a held-out lower bound.
        Returns the last minibatch's training bound (NaN if the round diverged).

        One host read per round (off the CPU, one sync): the round's outcome and both
        critics' validation figures together.
        """
        reads = ReadBatch(self.device)
        outcome = self._round(reads)
        reads.read()
        return outcome[0]

    def _round(self, reads: ReadBatch, *, reset: bool = False) -> list[float]:
        """Train now; select (see :meth:`train`) when ``reads`` is read: one read for the
        round's outcome and both critics' validation figures. Returns a one-item list that
        then holds the round's last training bound (NaN if it diverged; with ``reset``, the
        critic is then replaced)."""
        assert self.critic is not None and self.optimizer is not None
        outcome = [math.nan]
        values = self._train_round()
        if values is None:  # no iterations: nothing learned
            self.updates += 1
            if reset:
                self._reset()
            return outcome
        created = self.selected is None
        if created:
            self.selected = copy.deepcopy(self.critic)
        # The validation figures are computed now (wasted only if the round diverged), while
        # the critics are as this round left them; nothing trains them before the read.
        validate = len(self.val) >= MIN_VALIDATION
        if validate:
            figures = [self._validation_bound(c) for c in (self.critic, self.selected)]
            values = torch.cat([values, *figures])

        def select(numbers: list[float]) -> None:
            outcome[0] = self._select(numbers, validate=validate, created=created)
            if reset and not math.isfinite(outcome[0]):
                self._reset()

        reads.add(values, select)
        return outcome

    def _select(self, numbers: list[float], *, validate: bool, created: bool) -> float:
        """Model selection from a round's figures read back: ``[finite, last bound]`` then,
        if ``validate``, ``[new, its se, its baseline, previous, its se, its baseline]``.
        Returns the last bound or NaN."""
        finite, last = numbers[:2]
        if not finite:  # never report from a diverged critic; the caller replaces it
            if created:
                self.selected = None
            return math.nan
        self.updates += 1
        new, new_se, new_c, old, old_se, old_c = numbers[2:] if validate else [math.nan] * 6
        if math.isnan(new):  # no usable validation figure: follow the new iterate, report 0
            self.selected.load_state_dict(self.critic.state_dict())
            self.null_selected = self.holdout > 1
            # Without a validation window (holdout <= 1) MINE reads the baseline form with c
            # from its training's moving average (any c the batch did not set keeps the bound):
            # DV on the batch's own marginal mean sat above the truth by Jensen's gap (7.65
            # nats at B = 2, 2.37 at B = 8, for a truth of 2.33).
            self.baseline = self.loss.log_ma if self.kind == "mine" and self.holdout <= 1 else None
            return last
        if new >= old:
            self.selected.load_state_dict(self.critic.state_dict())
            best, se, self.baseline = new, new_se, new_c
        else:
            self.kept_previous += 1
            best, se, self.baseline = old, old_se, old_c
        if not math.isfinite(self.baseline):
            self.baseline = None
        # The constant critic (bound 0) reports unless the learned one validates clearly above
        # it: a critic fitted to noise can edge past 0 on the validation pairs by chance, and
        # then scores far below 0 on the next batch.
        self.null_selected = best <= NULL_MARGIN_SE * se
        return last

    def _train_round(self) -> torch.Tensor | None:
        """``train_iters`` critic steps on minibatches of the window: ``[all losses finite,
        last training bound]`` (float64, not yet read), None if there were no iterations.

        Finiteness is read once, by the caller (a read per minibatch would be a sync each off
        the CPU). A step taken on a NaN loss corrupts only ``self.critic``, which the caller
        then replaces (see :meth:`observe`); the reporting critic is a separate copy.
        """
        self.critic.train()
        # Standardise with the window's statistics (running sums: O(d), not a pass over it).
        self.critic.set_scaler(*self.pairs.moments())
        finite = last = None
        with torch.enable_grad():
            for _ in range(self.train_iters):
                scores = self.critic.scores(*self.pairs.sample(self.batch_size, self.generator))
                loss = self.loss(scores)  # MINE's corrected gradient, JS for SMILE, else -bound
                bound_loss = loss
                aux = self.critic.aux_loss() if self.token_encoder != "sketch" else None
                if aux is not None:  # e.g. the autoencoder's reconstruction term
                    loss = loss + aux
                ok = torch.isfinite(loss.detach())
                finite = ok if finite is None else finite & ok
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                last = bound_loss.detach()
        if last is None:
            return None
        return torch.stack([finite.double(), -last.double()])

    def state_dict(self) -> dict:
        """A snapshot: nothing in it is the live critic's, its Adam moments included (a state
        kept in memory and loaded later, or into another estimator, must not go on training)."""
        return copy.deepcopy(self._state())

    def _state(self) -> dict:
        return {
            "kind": self.kind,
            "token_encoder": self.token_encoder,
            "critic": None if self.critic is None else self.critic.state_dict(),
            "dims": None if self.critic is None else (self.critic.x_dim, self.critic.y_dim),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "log_ma": self.loss.log_ma,
            "pairs": self.pairs.state_dict(),
            "batches_seen": self.batches_seen,
            "small_batches": self.small_batches,
            "updates": self.updates,
            "val": self.val.state_dict(),
            "selected": None if self.selected is None else self.selected.state_dict(),
            "kept_previous": self.kept_previous,
            "null_selected": self.null_selected,
            "baseline": self.baseline,
        }

    def check_state_dict(self, state: dict) -> None:
        """Raise what :meth:`load_state_dict` would on ``state``'s critic (another token
        encoder; weights of other shapes or names: a damaged state, or another model's), with
        nothing of this estimator changed: they are loaded into a throwaway critic."""
        saved = state.get("token_encoder", "sketch")
        if saved != self.token_encoder:
            raise ValueError(
                f"this state was saved with token_encoder={saved!r} but the estimator uses "
                f"{self.token_encoder!r}; build it (or the monitor's tokenizer) with {saved!r}"
            )
        for key in ("batches_seen", "updates"):
            if isinstance(state[key], bool) or not isinstance(state[key], int):
                raise TypeError(f"{key} is {state[key]!r}, not a count")
        # Its windows too, into throwaway ones (a damaged window failed in load_state_dict, or
        # loaded and then failed every training round), of the critic's widths.
        dims = state.get("dims")
        for key, size in (("pairs", self.pairs.size), ("val", self.val.size)):
            window = PairWindow(size, self.pairs.dtype)
            window.load_state_dict(state[key] if key == "pairs" else state.get(key) or {})
            widths = (window.x.shape[1], window.y.shape[1]) if len(window) else None
            if dims is not None and widths is not None and widths != tuple(dims):
                raise ValueError(f"its {key} window's rows are {widths} wide, its critic's {dims}")
        if dims is None:
            return
        spare = torch.Generator(device=self.generator.device)
        critic, optimizer = self._make_critic(*dims, spare)
        critic.load_state_dict(state["critic"])
        optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if state.get("selected") is not None:
            critic.load_state_dict(state["selected"])

    def load_state_dict(self, state: dict) -> None:
        # A copy: Adam keeps the moment tensors it is given, and the state stays the caller's.
        state = copy.deepcopy(state)
        saved = state.get("token_encoder", "sketch")
        if saved != self.token_encoder:
            raise ValueError(
                f"this state was saved with token_encoder={saved!r} but the estimator uses "
                f"{self.token_encoder!r}; build it (or the monitor's tokenizer) with {saved!r}"
            )
        if state["dims"] is not None:
            self._build(*state["dims"])
            self.critic.load_state_dict(state["critic"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # saved before its first batch: no critic yet (this one's trained one went on)
            self.critic = self.optimizer = self.selected = None
            self.loss = CriticLoss(self.kind)
        self.loss.log_ma = state["log_ma"]
        self.pairs.load_state_dict(state["pairs"])
        self.batches_seen = state["batches_seen"]
        self.small_batches = state.get("small_batches", 0)
        self.updates = state["updates"]
        self.val.load_state_dict(state.get("val", {"x": None, "y": None}))
        if state.get("selected") is not None:
            self.selected = copy.deepcopy(self.critic)
            self.selected.load_state_dict(state["selected"])
        self.kept_previous = state.get("kept_previous", 0)
        self.null_selected = state.get("null_selected", False)
        self.baseline = state.get("baseline")
        if (  # an earlier version's state: c from the validation pairs, as a round sets it
            "baseline" not in state
            and self.selected is not None
            and not self.null_selected
            and len(self.val) >= MIN_VALIDATION
        ):
            baseline = float(self._validation_bound(self.selected)[2])
            self.baseline = baseline if math.isfinite(baseline) else None
