"""Online critic for the monitor: evaluate each batch first, then learn from it.

Each monitored batch is scored by the current critic BEFORE the critic ever trains on it, so the
recorded bound is held out (an honest lower bound, not memorisation). The batch then joins a
bounded window of recent pairs, and on a schedule the critic takes a few optimizer steps on
minibatches drawn from that window with its own Adam and its own generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bounds import (
    BOUNDS,
    CriticLoss,
    bootstrap_bound,
    bootstrap_counts,
    bound,
    percentile_interval,
)
from .critics import SeparableCritic

MIN_CI_PAIRS = 8


class PairWindow:
    """The most recent (x, y) pairs, capped at ``size``: what an online critic trains on."""

    def __init__(self, size: int):
        self.size = size
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.x is None else self.x.shape[0]

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x = x if self.x is None else torch.cat([self.x, x])[-self.size :]
        self.y = y if self.y is None else torch.cat([self.y, y])[-self.size :]

    def clear(self) -> None:
        self.x = self.y = None

    def recent(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[-n:], self.y[-n:]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A minibatch of ``min(n, len)`` distinct pairs drawn with the caller's generator."""
        pick = torch.randperm(len(self), generator=generator, device=generator.device)[:n]
        pick = pick.to(self.x.device)
        return self.x[pick], self.y[pick]

    def state_dict(self) -> dict:
        return {"x": self.x, "y": self.y}

    def load_state_dict(self, state: dict) -> None:
        self.x, self.y = state["x"], state["y"]


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


class OnlineEstimator:
    """A critic trained online on a window of (feature, token) pairs.

    Args:
        kind: ``"mine"`` or ``"infonce"``.
        window: pairs kept for training (oldest dropped first).
        train_every: train after every n-th observed batch (a critic update costs about as much
            as a small DP step, so the default does not train on every step).
        train_iters: optimizer steps per training round.
        batch_size: pairs per critic minibatch.
        generator: the monitor's generator; minibatch draws and initialisation come from it.
    """

    def __init__(
        self,
        kind: str = "mine",
        *,
        window: int = 4096,
        train_every: int = 2,
        train_iters: int = 4,
        batch_size: int = 256,
        lr: float = 1e-3,
        hidden: int = 128,
        embed: int = 32,
        bootstrap: int = 200,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ):
        if kind not in BOUNDS:
            raise ValueError(f"estimator must be one of {BOUNDS}, got {kind!r}")
        self.kind = kind

        self.train_every = max(1, train_every)
        self.train_iters = train_iters
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
        self.updates = 0

    def _build(self, x_dim: int, y_dim: int) -> None:
        self._new_critic(x_dim, y_dim)
        self.pairs.clear()

    def _new_critic(self, x_dim: int, y_dim: int) -> None:
        self.critic = SeparableCritic(
            x_dim,
            y_dim,
            hidden=self.hidden,
            embed=self.embed,
            generator=self.generator,
            device=self.device,
        )
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.lr, foreach=True)
        self.loss = CriticLoss(self.kind)
        self.updates = 0

    @property
    def ready(self) -> bool:
        return self.critic is not None and self.updates > 0

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> BatchEstimate | None:
        """Held-out bound on this batch; None before the critic has trained or if n < 2."""
        n = x.shape[0]
        if (
            not self.ready
            or n < 2
            or x.shape[1] != self.critic.x_dim
            or y.shape[1] != self.critic.y_dim
        ):
            return None
        self.critic.eval()
        scores = self.critic.scores(x.to(self.device).float(), y.to(self.device).float())
        matched = float(bound(self.kind, scores))
        shuffle = torch.randperm(n, generator=self.generator, device=self.generator.device)
        mismatched = float(bound(self.kind, scores[:, shuffle.to(scores.device)]))
        lo = hi = math.nan  # a bootstrap over fewer than MIN_CI_PAIRS pairs is no interval
        if n >= MIN_CI_PAIRS:
            counts = bootstrap_counts(n, self.bootstrap, self.generator, scores.device)
            lo, hi = percentile_interval(bootstrap_bound(self.kind, scores, counts))
        return BatchEstimate(matched=matched, mismatched=mismatched, ci_low=lo, ci_high=hi, n=n)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Add a batch of pairs to the window and train if the schedule says so.

        Returns True if training diverged (non-finite loss) and the critic was reset: a fresh
        critic restarts from the window rather than a NaN propagating into every later estimate.
        """
        x, y = x.detach().to(self.device).float(), y.detach().to(self.device).float()
        if x.shape[0] == 0:
            return False
        if (
            self.critic is None
            or x.shape[1] != self.critic.x_dim
            or y.shape[1] != self.critic.y_dim
        ):
            self._build(x.shape[1], y.shape[1])
        self.pairs.add(x, y)
        self.batches_seen += 1
        if self.batches_seen % self.train_every == 0 and len(self.pairs) >= 4:
            if not math.isfinite(self.train()):
                self._new_critic(self.critic.x_dim, self.critic.y_dim)
                return True
        return False

    def train(self) -> float:
        """A few critic steps on minibatches of the window; returns the last training bound."""
        assert self.critic is not None and self.optimizer is not None
        self.critic.train()
        # Standardise with the most recent pairs: gradient scales drift as training goes on.
        self.critic.fit_scaler(*self.pairs.recent(1024))
        last = math.nan
        with torch.enable_grad():
            for _ in range(self.train_iters):
                scores = self.critic.scores(*self.pairs.sample(self.batch_size, self.generator))
                loss = self.loss(scores)  # MINE's corrected gradient, JS for SMILE, else -bound
                if not torch.isfinite(loss):
                    return math.nan  # never step on a NaN: the caller resets the critic
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                last = -float(loss)
        self.updates += 1
        return last

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "critic": None if self.critic is None else self.critic.state_dict(),
            "dims": None if self.critic is None else (self.critic.x_dim, self.critic.y_dim),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "log_ma": self.loss.log_ma,
            "pairs": self.pairs.state_dict(),
            "batches_seen": self.batches_seen,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["dims"] is not None:
            self._build(*state["dims"])
            self.critic.load_state_dict(state["critic"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.loss.log_ma = state["log_ma"]
        self.pairs.load_state_dict(state["pairs"])
        self.batches_seen = state["batches_seen"]
        self.updates = state["updates"]
