"""``estimate_mi``: a held-out neural MI lower bound, with a bootstrap confidence interval.

Protocol, chosen so the figure is an honest lower bound rather than a memorised one: split the
pairs into train / validation / evaluation; train the critic on minibatches, early-stop on the
validation bound, then report the bound of the best critic on the evaluation pairs it never saw,
with a percentile bootstrap interval over those pairs. The same critic on shuffled evaluation
pairs gives the estimator's own bias floor (``shuffled``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .bounds import BOUNDS, MineLoss, bootstrap_bound, bootstrap_counts, bound, percentile_interval
from .critics import SeparableCritic


@dataclass(frozen=True)
class MIEstimate:
    """A mutual-information estimate in nats with its confidence interval."""

    nats: float
    ci_low: float
    ci_high: float
    estimator: str
    n_train: int
    n_eval: int
    shuffled: float = float("nan")
    upper_limit: float = math.inf  # InfoNCE can never exceed ln(n_eval)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.nats:.3f} nats [{self.ci_low:.3f}, {self.ci_high:.3f}] "
            f"({self.estimator}, n_eval={self.n_eval})"
        )


def _as_2d_float(name: str, v) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (n_pairs, dim); got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or not (
        torch.is_floating_point(t) or t.dtype.is_signed or t.dtype == torch.uint8
    ):
        t = t.to(torch.float32)
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf: drop or impute those pairs first")
    return t


def estimate_mi(x, y, estimator: str = "mine", **kwargs) -> MIEstimate:
    """Estimate I(x; y) in nats from paired samples (rows of ``x`` and ``y`` are pairs).

    Args:
        x, y: arrays or tensors of shape ``(n,)`` or ``(n, d)`` with the same n (n >= 8).
        estimator: ``"mine"`` (Donsker-Varadhan with MINE's moving-average gradient) or
            ``"infonce"`` (bounded by ``ln n_eval``).
        eval_fraction: share of pairs held out for the reported figure (capped at ``max_eval``).
        max_steps, batch_size, lr, hidden, embed, patience, check_every: critic training.
        bootstrap, confidence: the percentile bootstrap interval over evaluation pairs.
        seed: seeds this call's own generator; the global RNG is never touched.
        device: where the critic trains.
    """
    return _estimate_mi(x, y, estimator, **kwargs)


def _estimate_mi(
    x,
    y,
    estimator: str = "mine",
    *,
    eval_fraction: float = 0.3,
    max_eval: int = 4096,
    batch_size: int = 256,
    max_steps: int = 2000,
    lr: float = 1e-3,
    hidden: int = 128,
    embed: int = 32,
    patience: int = 6,
    check_every: int = 50,
    bootstrap: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> MIEstimate:
    if estimator not in BOUNDS:
        raise ValueError(f"estimator must be one of {BOUNDS}, got {estimator!r}")
    xt, yt = _as_2d_float("x", x), _as_2d_float("y", y)
    n = xt.shape[0]
    if yt.shape[0] != n:
        raise ValueError(f"x and y must have the same number of rows (pairs): {n} vs {yt.shape[0]}")
    if n < 8:
        raise ValueError(f"estimate_mi needs at least 8 pairs to train and evaluate, got {n}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_eval = max(4, min(max_eval, int(round(n * eval_fraction))))
    n_val = max(4, min(max_eval, int(round((n - n_eval) * 0.15))))
    eval_idx, val_idx, train_idx = (
        perm[:n_eval],
        perm[n_eval : n_eval + n_val],
        perm[n_eval + n_val :],
    )
    if train_idx.numel() < 4:
        raise ValueError(f"too few pairs ({n}) to train a critic; provide at least 32")
    xt, yt = xt.to(device), yt.to(device)
    critic = SeparableCritic(
        xt.shape[1], yt.shape[1], hidden=hidden, embed=embed, generator=gen, device=device
    )
    critic.fit_scaler(xt[train_idx], yt[train_idx])
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    mine = MineLoss()
    bs = min(batch_size, train_idx.numel())

    def held_out(idx: torch.Tensor) -> float:
        with torch.no_grad():
            return float(bound(estimator, critic.scores(xt[idx], yt[idx])))

    best, best_state, stale = -math.inf, None, 0
    for step in range(1, max_steps + 1):
        pick = train_idx[torch.randint(0, train_idx.numel(), (bs,), generator=gen)]
        scores = critic.scores(xt[pick], yt[pick])
        if estimator == "mine":
            loss = mine(scores)
        else:
            loss = -bound("infonce", scores)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0 or step == max_steps:
            val = held_out(val_idx)
            if val > best + 1e-4:
                best, stale = val, 0
                best_state = {k: v.detach().clone() for k, v in critic.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
    if best_state is not None:
        critic.load_state_dict(best_state)
    with torch.no_grad():
        scores = critic.scores(xt[eval_idx], yt[eval_idx])
        point = float(bound(estimator, scores))
        counts = bootstrap_counts(n_eval, bootstrap, gen)
        lo, hi = percentile_interval(
            bootstrap_bound(estimator, scores, counts.to(device)), confidence
        )
        shuffle = torch.randperm(n_eval, generator=gen).to(device)
        shuffled = float(bound(estimator, scores[:, shuffle]))
    return MIEstimate(
        nats=point,
        ci_low=lo,
        ci_high=hi,
        estimator=estimator,
        n_train=int(train_idx.numel()),
        n_eval=int(n_eval),
        shuffled=shuffled,
        upper_limit=math.log(n_eval) if estimator == "infonce" else math.inf,
    )
