"""Semi-oracle for the private view: learn the clean token, use the known noise exactly.

A learned critic on noisy tokens has to discover the Gaussian noise model from data and, at
realistic noise, finds nothing. But the noise is known: the private token is
``t = S(clipped g) + N(0, s^2 I_k)`` with ``s = sigma * C`` (orthonormal sketch rows). So only
the data-dependent part is learned: a regressor ``mu(f) ~ E[clean token | features]`` trained on
(features, clipped token) pairs, and the private token is scored with the exact likelihood
``log N(t; mu(f), (s^2 + r^2) I)``, with ``r^2`` (per coordinate) what the regressor still
misses of the clean token on its window: the private token's spread around ``mu(f)`` if that
miss is Gaussian. InfoNCE over the batch with this critic is a valid lower bound for any ``mu``
and ``r`` (the Bayes-optimal one when ``mu`` is exact), evaluated before training on it. With
``s`` alone, a regressor missing by more than the noise read far below zero at low noise (-42
nats at sigma 0.03 on digits), a bound too loose to be of use.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .critics import _mlp
from .online import BatchEstimate, PairWindow, held_out_figures


def _floored_std(v: torch.Tensor) -> torch.Tensor:
    std = v.std(0, unbiased=False)
    return std.clamp_min(0.1 * float(std.mean()) + 1e-12)


class SemiOracleEstimator:
    """Online ``features -> clean token`` regressor scored with the known Gaussian noise."""

    kind = "semi"

    def __init__(
        self,
        *,
        window: int = 4096,
        train_every: int = 2,
        train_iters: int = 4,
        batch_size: int = 256,
        lr: float = 1e-3,
        hidden: int = 128,
        bootstrap: int = 200,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ):
        self.train_every, self.train_iters = max(1, train_every), train_iters
        self.batch_size, self.lr, self.hidden, self.bootstrap = batch_size, lr, hidden, bootstrap
        self.generator = generator
        self.device = torch.device(device)
        self.net: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.dims: tuple[int, int] | None = None
        # float32: every change of basis rewrites the stored tokens, and repeated bfloat16
        # rounding would accumulate.
        self.pairs = PairWindow(window, dtype=torch.float32)
        self.stats: dict[str, torch.Tensor] = {}
        self.batches_seen = 0
        self.updates = 0

    def _build(self, x_dim: int, y_dim: int) -> None:
        self.net = _mlp(x_dim, self.hidden, y_dim, self.generator, self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr, foreach=True)
        self.dims = (x_dim, y_dim)
        self.updates = 0

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``mu(f)``: the predicted clean token, in token units."""
        s = self.stats
        return self.net(self._standardise(x)) * s["y_std"] + s["y_mean"]

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        # Constant-in-window inputs (blank digit corners) must not turn into 1e6 outliers on a
        # new example: floor the scale and clip, so an unseen input cannot explode mu(f).
        s = self.stats
        return ((x - s["x_mean"]) / s["x_std"]).clamp(-10.0, 10.0)

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, private: torch.Tensor, noise_std: float
    ) -> BatchEstimate | None:
        """Held-out InfoNCE bound of I(example; private token) on this batch."""
        n = x.shape[0]
        if (
            self.updates == 0
            or n < 2
            or noise_std <= 0
            or (x.shape[1], private.shape[1]) != self.dims
        ):
            return None
        mu = self.predict(x.to(self.device).float()).double()
        t = private.to(self.device).double()
        # scores[j, i] = log N(t_j; mu_i, diag(s^2 + r^2)) + const: which example made token j?
        # (A state saved before r was kept has none: s alone.)
        var = noise_std**2 + self.stats.get("resid_var", torch.zeros(())).double()
        scale = var.rsqrt()
        scores = -torch.cdist(t * scale, mu * scale).pow(2) / 2.0
        # (Its interval near ln n too: the monitor floors its low end by the union bound.)
        figures = held_out_figures("infonce", scores, self.generator, self.bootstrap)
        return BatchEstimate.of(figures.tolist(), n)

    def observe(self, x: torch.Tensor, clean: torch.Tensor, *, train: bool | None = None) -> bool:
        """Add (features, clipped token) pairs; train on schedule (or as ``train`` says). True
        if it had to reset."""
        x, clean = x.detach().to(self.device).float(), clean.detach().to(self.device).float()
        if x.shape[0] == 0:
            return False
        if (x.shape[1], clean.shape[1]) != self.dims:
            self._build(x.shape[1], clean.shape[1])
            self.pairs.clear()
        self.pairs.add(x, clean)
        self.batches_seen += 1
        due = self.batches_seen % self.train_every == 0 if train is None else train
        if not due or len(self.pairs) < 4:
            return False
        if not math.isfinite(self.train()):
            self._build(*self.dims)
            return True
        return False

    @torch.no_grad()
    def change_basis(self, m: torch.Tensor) -> None:
        """Clean tokens are now expressed as ``t' = m t`` (a refitted token subspace).

        The window's tokens are mapped, and the regressor's output layer re-expressed for the
        new coordinates and the window's new standardisation, so ``mu(f)`` is the same function
        (exactly, up to what the new subspace drops) and nothing learned is lost.
        """
        if len(self.pairs) == 0:
            return
        m = m.to(self.device, torch.float32)
        x, y = self.pairs.x.clone(), self.pairs.y @ m.T
        self.pairs.clear()
        self.pairs.add(x, y)
        if self.net is None or not self.stats:
            return
        old = self.stats
        recent = y[-1024:]
        mean, std = recent.mean(0), recent.std(0, unbiased=False).clamp_min(1e-12)
        last = self.net[-1]
        a = m * old["y_std"][None, :] / std[:, None]  # diag(1/s') m diag(s)
        last.bias.copy_(a @ last.bias + (m @ old["y_mean"] - mean) / std)
        last.weight.copy_(a @ last.weight)
        self.stats = {**old, "y_mean": mean, "y_std": std}
        if "resid_var" in old:  # the miss in the new coordinates (its cross terms left out)
            self.stats["resid_var"] = (m * m) @ old["resid_var"]
        # Adam's moments belong to the old coordinates of the output layer.
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr, foreach=True)

    def train(self) -> float:
        """A few regression steps (MSE on standardised clean tokens) on the window."""
        recent_x, recent_y = self.pairs.recent(1024)
        self.stats = {
            "x_mean": recent_x.mean(0),
            "x_std": _floored_std(recent_x),
            "y_mean": recent_y.mean(0),
            "y_std": recent_y.std(0, unbiased=False).clamp_min(1e-12),
        }
        s = self.stats
        last = math.nan
        self.net.train()
        with torch.enable_grad():
            for _ in range(self.train_iters):
                x, y = self.pairs.sample(self.batch_size, self.generator)
                pred = self.net(self._standardise(x))
                loss = (pred - (y - s["y_mean"]) / s["y_std"]).pow(2).mean()
                if not torch.isfinite(loss):
                    return math.nan
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                last = float(loss.detach())
        with torch.no_grad():  # what it still misses, per coordinate, in token units
            s["resid_var"] = (self.predict(recent_x) - recent_y).pow(2).mean(0)
        self.updates += 1
        return last

    def state_dict(self) -> dict:
        """A snapshot (see ``OnlineEstimator.state_dict``)."""
        return copy.deepcopy(self._state())

    def _state(self) -> dict:
        return {
            "net": None if self.net is None else self.net.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "dims": self.dims,
            "stats": self.stats,
            "pairs": self.pairs.state_dict(),
            "batches_seen": self.batches_seen,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        state = copy.deepcopy(state)  # (see OnlineEstimator.load_state_dict)
        if state["dims"] is not None:
            self._build(*state["dims"])
            self.net.load_state_dict(state["net"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # saved before its first batch: no network yet (this one's trained one went on)
            self.net = self.optimizer = self.dims = None
        self.stats = state["stats"]
        self.pairs.load_state_dict(state["pairs"])
        self.batches_seen, self.updates = state["batches_seen"], state["updates"]
