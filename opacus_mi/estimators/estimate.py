"""``estimate_mi``: a held-out neural MI lower bound, with a bootstrap confidence interval.

Protocol, chosen so the figure is an honest lower bound rather than a memorised one: split the
pairs into train / validation / evaluation; train the critic on minibatches, early-stop on the
validation bound, then report the bound of the best critic on the evaluation pairs it never saw,
with a percentile bootstrap interval over those pairs (InfoNCE: a jackknife's). The same critic
on random re-pairings of the evaluation pairs gives the estimator's own bias floor
(``shuffled``) and a permutation-test p-value for "any leakage at all" (``p_value``).
"""

from __future__ import annotations

import copy
import inspect
import math
import reprlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..checks import (
    available_device,
    check_torch_seed,
    is_finite_number,
    is_int_at_least,
    python_number,
)
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
    percentile_interval,
    permutation_p_value,
    permuted_bounds,
    random_permutations,
)
from .critics import SeparableCritic
from .online import MIN_VALIDATION, interval_withheld

MIN_PAIRS = 16  # >= 4 pairs in each of the evaluation, validation and training splits
BASELINE_PAIRS = 1024  # training pairs MINE's baseline comes from when validation pairs are few


@dataclass(frozen=True)
class MIEstimate:
    """A mutual-information estimate in nats with its confidence interval."""

    nats: float
    ci_low: float
    ci_high: float
    estimator: str
    n_train: int
    n_eval: int
    shuffled: float = float("nan")  # mean bound on re-paired evaluation pairs: the zero floor
    upper_limit: float = math.inf  # InfoNCE can never exceed ln(n_eval)
    p_value: float = float("nan")  # permutation test of "no leakage" (independence)
    in_sample: float = float("nan")  # the same critic's bound on (up to max_eval) training pairs
    heldout_ci_high: float = float("nan")  # the held-out bound's bootstrap high end alone

    def as_dict(self) -> dict:
        """The fields as plain values (for JSON or a DataFrame row)."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.nats:.3f} nats [{self.ci_low:.3f}, {self.ci_high:.3f}] "
            f"({self.estimator}, n_eval={self.n_eval})"
        )


def _as_2d_float(name: str, v) -> torch.Tensor:
    # Detached: the critics' backward must not reach into the caller's graph (activations
    # straight from a model, or a leaf that requires grad).
    if isinstance(v, torch.Tensor) and v.layout != torch.strided:  # (sparse: failed in isfinite)
        raise ValueError(f"{name} is a {v.layout} tensor: pass {name}.to_dense()")
    if isinstance(v, (list, tuple)) and any(isinstance(r, torch.Tensor) for r in v):
        v = [r.detach() if isinstance(r, torch.Tensor) else r for r in v]  # (numpy() of a row
        # that requires grad raised torch's RuntimeError)
    try:
        if isinstance(v, torch.Tensor):
            t = v.detach()
        else:
            a = np.asarray(v)
            if a.dtype.kind == "f" and a.dtype.itemsize > 8:  # (torch has no float128)
                a = a.astype(np.float64)
            t = torch.as_tensor(a)
    except (TypeError, ValueError, RuntimeError):  # None, strings, ragged rows: their words
        raise ValueError(
            f"{name} must be numeric, of shape (n,) or (n, d): an array, a tensor or a list of "
            f"equal-length rows of numbers; got {reprlib.repr(v)}"
        ) from None
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (n_pairs, dim); got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"{name} is complex: pass its real and imaginary parts as columns")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no columns: each pair needs at least one value")
    if t.shape[0] == 0:  # (refused here: a column's largest |value| below needs a row)
        raise ValueError(f"{name} has no rows: estimate_mi needs at least {MIN_PAIRS} pairs")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf: drop or impute those pairs first")
    # MI does not change with each column's shift and scale: standardised here, in float64,
    # so that the critics' float32 keeps inputs that are tiny, huge or far from 0 (x * 1e-15
    # read 0.18 nats for 0.81; x + 1e9 read 0; x * 1e39 was 'NaN or Inf'). Each column is
    # first brought near 1 by the power of two of its largest |value| (0 for a zero column),
    # else std_mean's squares overflow or underflow float64 (x * 1e160, x * 1e-170 read 0 nats).
    # A power of two scales exactly: other columns standardise bit for bit as before. (In two
    # halves: 2**1074, a subnormal column's factor, is no float64.)
    _, exponent = torch.frexp(t.abs().amax(dim=0))
    t = torch.ldexp(torch.ldexp(t, -(exponent // 2)), -(exponent - exponent // 2))
    std, mean = torch.std_mean(t, dim=0, unbiased=False)
    # Nor with any monotone map of a column. A heavy-tailed one (Cauchy: a few outliers set
    # its std, and standardised 2/3 of its values sat within 0.05 of 0) is first brought to
    # asinh((x - median) / (IQR / 1.349)), a bijection that keeps its middle and compresses its
    # tails logarithmically: X, Y = X + Cauchy noise (ln 2 = 0.693 nats) read 0.26 standardised,
    # 0.49 so. Others (Gaussian, Student-t 5: std / robust std 1.0, 1.2) are left as they
    # were, bit for bit; a Gaussian cubed (8.5, its sample's above 10 in 1% of 2,000 pairs) is
    # tamed only then, by a bijection, which changes no MI.
    ordered = t.sort(dim=0).values
    n = t.shape[0] - 1
    robust = (ordered[(3 * n) // 4] - ordered[n // 4]) / 1.349
    heavy = (robust > 0) & (std > HEAVY_TAILS * robust)
    if bool(heavy.any()):
        centre = ordered[n // 2]
        tamed = torch.asinh((t - centre) / torch.where(heavy, robust, torch.ones_like(robust)))
        t = torch.where(heavy, tamed, t)
        std, mean = torch.std_mean(t, dim=0, unbiased=False)
    return ((t - mean) / torch.where(std > 0, std, torch.ones_like(std))).to(torch.float32)


# A column whose std exceeds this many robust stds (IQR / 1.349) has heavy tails: see
# _as_2d_float.
HEAVY_TAILS = 10.0


def _adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where this torch and device support it (~10% faster critic steps on CPU)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def estimate_mi(x, y, estimator: str = "mine", **kwargs) -> MIEstimate:
    """Estimate I(x; y) in nats from paired samples (rows of ``x`` and ``y`` are pairs).

    Args:
        x, y: arrays or tensors of shape ``(n,)`` or ``(n, d)`` with the same n (n >= 16).
        estimator: ``"mine"`` (Donsker-Varadhan with MINE's moving-average gradient; its
            figures in :func:`~opacus_mi.estimators.bounds.baseline_bound`'s form, see below),
            ``"infonce"`` (bounded by ``ln n_eval``), ``"nwj"`` (NWJ, trained on its own bound)
            or ``"smile"`` (Song & Ermon's clipped DV with tau=5 on a critic trained with the
            Jensen-Shannon objective; not a strict lower bound: it can overshoot at high MI).
        eval_fraction: share of pairs held out for the reported figure (capped at ``max_eval``).
        max_steps, batch_size, lr, hidden, embed, patience, check_every: critic training.
        max_batch: the minibatch doubles (up to this) once the held-out bound nears
            ``ln(batch)``: high-MI bounds saturate or get noisy on small batches.
        critic_bound: soft bound on critic scores (``bound * tanh(s / bound)``; None: none).
        ema: decay of the moving average of the critic's weights that is validated, early
            stopped and reported (0 turns it off).
        bootstrap, confidence: the interval (``bootstrap`` 0 or at least ``2 / (1 - confidence)``
            resamples, 40 at 0.95, so that each tail expects one). Its low end is the
            percentile-bootstrap limit of the held-out bound (evaluation noise only: a ~97.5% lower
            confidence limit on the critic's bound, nearer 96.8% at small MI, which a near-optimal
            critic puts above the truth at about that rate); InfoNCE's is Student's t with a
            delete-one-pair jackknife's standard error instead, since its row terms share the
            candidates (``bootstrap`` then only says whether there is an interval). Its high end
            is the larger of that limit and
            the same critic's bound on as many of its *training* pairs plus the same half-width.
            Why: the held-out figure is pessimistic by the critic's estimation error and the
            in-sample one optimistic by it; on the ground-truth tasks the held-out bound sat ~4%
            under the truth (outside a pure evaluation-noise interval 20-40% of the time) while the
            in-sample bound averaged within 1% of it; and at least 0, as MI is (a constant
            column's held-out bounds read -4e-5 [-5e-5, -2e-5]). ``heldout_ci_high`` keeps the
            evaluation-noise-only high end. Too few evaluation pairs for an interval (the online
            estimator's rule: 32, 8 per nat the figure reads, and a figure at most ln n_eval + 2;
            InfoNCE 8, and n_eval (ln
            n_eval - figure) >= 8 near its ceiling) give a NaN one, the
            figure still reported.
        permutations: re-pairings of the evaluation pairs for the permutation test: ``p_value``
            is ``(1 + #{re-paired bound >= matched bound}) / (permutations + 1)``, an exact
            p-value for "x and y are independent" (0 skips it: p_value is NaN); ``shuffled``
            is the mean re-paired bound, the estimator's own floor at zero MI.
        seed: seeds this call's own generator (-2**63 to 2**64 - 1); the global RNG is never
            touched.
        device: where the critic trains (refused if this machine lacks it).
    """
    valid = list(inspect.signature(_estimate_mi).parameters)[3:]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:  # (named here: the TypeError of the function below names a private one)
        raise TypeError(
            f"estimate_mi got unknown options {', '.join(map(repr, unknown))}; it takes "
            f"x, y, estimator and {', '.join(valid)}"
        )
    # The critic trains whatever the caller's grad mode (features are often computed in an
    # eval block, under no_grad or inference_mode: its backward failed there). Everything made
    # inside is an ordinary tensor, inputs made in inference mode included (standardising
    # copies them), so autograd can save them.
    with torch.inference_mode(False), torch.enable_grad():
        return _estimate_mi(x, y, estimator, **kwargs)


def _estimate_mi(
    x,
    y,
    estimator: str = "mine",
    *,
    eval_fraction: float = 0.3,
    max_eval: int = 4096,
    batch_size: int = 256,
    max_batch: int = 512,
    max_steps: int = 3000,
    lr: float = 1e-3,
    hidden: int = 128,
    embed: int = 32,
    critic_bound: float | None = 10.0,
    ema: float = 0.99,
    patience: int = 8,
    check_every: int = 50,
    bootstrap: int = 500,
    permutations: int = 200,
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
    if n < MIN_PAIRS:
        raise ValueError(
            f"estimate_mi needs at least {MIN_PAIRS} pairs to train and evaluate, got {n}"
        )
    eval_fraction, confidence, ema = map(python_number, (eval_fraction, confidence, ema))
    if not (is_finite_number(eval_fraction) and 0 < eval_fraction < 1):
        raise ValueError(f"eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
    if not (is_finite_number(confidence) and 0 < confidence < 1):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if not (is_finite_number(ema) and 0 <= ema < 1):
        raise ValueError(f"ema must be a number in [0, 1), got {ema!r}")
    counts = {
        "max_eval": (max_eval, 4),
        "batch_size": (batch_size, 2),  # (a minibatch of one pair has no mismatched pair)
        "max_batch": (max_batch, 1),
        "max_steps": (max_steps, 1),
        "hidden": (hidden, 1),
        "embed": (embed, 1),
        "patience": (patience, 1),
        "check_every": (check_every, 1),
        "bootstrap": (bootstrap, 0),
        "permutations": (permutations, 0),
    }
    for name, (value, low) in counts.items():
        if not is_int_at_least(python_number(value), low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    # A percentile interval's ends are meaningful once each tail beyond them expects a resample:
    # with fewer, they are the extreme draws (bootstrap=1 gave a low end above the estimate).
    least = math.ceil(2 / (1 - confidence) - 1e-9)
    if 0 < bootstrap < least:
        raise ValueError(
            f"bootstrap must be 0 (no interval) or at least 2 / (1 - confidence) = {least} "
            f"resamples at confidence={confidence}, got {bootstrap!r}"
        )
    seed, lr, critic_bound = python_number(seed), python_number(lr), python_number(critic_bound)
    check_torch_seed(seed)
    if not (is_finite_number(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if critic_bound is not None and not (is_finite_number(critic_bound) and critic_bound > 0):
        raise ValueError(f"critic_bound must be a positive number or None, got {critic_bound!r}")
    device = available_device("device", device)
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
        raise ValueError(
            f"{n} pairs leave {train_idx.numel()} to train a critic after {n_eval} held out for "
            f"evaluation (eval_fraction={eval_fraction}, max_eval={max_eval}) and {n_val} for "
            "validation: lower eval_fraction or max_eval, or provide more pairs (at least 32)"
        )
    xt, yt = xt.to(device), yt.to(device)
    critic = SeparableCritic(
        xt.shape[1],
        yt.shape[1],
        hidden=hidden,
        embed=embed,
        bound=critic_bound,
        generator=gen,
        device=device,
    )
    critic.fit_scaler(xt[train_idx], yt[train_idx])
    # Validation and the reported figure use an exponential moving average of the weights:
    # a much smoother curve to early-stop on, and less overfit than the raw iterate.
    averaged = copy.deepcopy(critic) if ema > 0 else critic
    for p in averaged.parameters():
        p.requires_grad_(averaged is critic)
    opt = _adam(critic.parameters(), lr)
    loss_fn = CriticLoss(estimator)
    n_train = train_idx.numel()
    bs = min(batch_size, n_train)

    def held_out(idx: torch.Tensor) -> float:
        with torch.no_grad():
            return float(bound(estimator, averaged.scores(xt[idx], yt[idx])))

    best, best_state, stale = -math.inf, None, 0
    for step in range(1, max_steps + 1):
        pick = train_idx[torch.randint(0, n_train, (bs,), generator=gen)]
        loss = loss_fn(critic.scores(xt[pick], yt[pick]))
        if not torch.isfinite(loss):
            break  # diverged (e.g. NWJ's exp overflowing): keep the best validated critic
        opt.zero_grad()
        loss.backward()
        opt.step()
        if averaged is not critic:
            with torch.no_grad():
                for pa, pc in zip(averaged.parameters(), critic.parameters(), strict=True):
                    pa.lerp_(pc, 1.0 - ema)
        if step % check_every == 0 or step == max_steps:
            val = held_out(val_idx)
            if val > best + 1e-3:
                best, stale = val, 0
                best_state = {k: v.detach().clone() for k, v in averaged.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
            # High MI: minibatch bounds saturate near ln(batch) (InfoNCE) or get noisy (DV,
            # NWJ), so the batch doubles once the held-out figure nears ln(batch), while the
            # training split is large enough (>= 16 batches) not to be overfit faster.
            if val > math.log(bs) - 2.0 and 2 * bs <= min(max_batch, n_train // 16):
                bs *= 2
    if best_state is not None:
        averaged.load_state_dict(best_state)
    with torch.no_grad():
        # MINE's figures take baseline_bound's form, as the online estimator's do: DV's log of
        # the evaluation pairs' own marginal mean sits above the critic's bound by Jensen's gap,
        # large on a few pairs (max_eval=4: 3.78 nats on average for a truth of 3.0, 60 seeds).
        # c, the critic's log-partition, comes from the validation pairs, as the online
        # estimator's, when there are as many as it asks for (MIN_VALIDATION). max_eval caps
        # them too, and c from 4 of them put single figures at -347 nats: then c comes from
        # training pairs. Any c chosen without the evaluation pairs keeps the bound; what a
        # poor c costs is tightness, and a thousand pairs' c is steady.
        c = None
        if estimator == "mine":
            pool = val_idx if n_val >= MIN_VALIDATION else train_idx[:BASELINE_PAIRS]
            c = float(_offdiag_logmeanexp(averaged.scores(xt[pool], yt[pool])))
            c = c if math.isfinite(c) else None

        def figure(s: torch.Tensor) -> float:
            return float(bound(estimator, s) if c is None else baseline_bound(s, c))

        scores = averaged.scores(xt[eval_idx], yt[eval_idx])
        point = figure(scores)
        if bootstrap == 0:
            lo = hi = math.nan
        elif estimator == "infonce":  # its rows share candidates: see infonce_jackknife
            lo, hi = jackknife_interval(
                infonce_jackknife(scores), torch.as_tensor(point), confidence
            ).tolist()
        else:
            counts = bootstrap_counts(n_eval, bootstrap, gen)
            lo, hi = percentile_interval(
                bootstrap_bound(estimator, scores, counts.to(device), c), confidence
            )
        if interval_withheld(estimator, n_eval, point):  # too few pairs: the online rule
            lo = hi = math.nan
        # Permutation test: the same critic on random re-pairings of the evaluation pairs.
        # Under independence the matched pairing is just one more re-pairing (the critic never
        # saw these pairs), so the rank of the matched bound among them is an exact p-value.
        shuffles = random_permutations(n_eval, max(1, permutations), gen)
        shuffled = permuted_bounds(estimator, scores, shuffles, c)
        matched = permuted_bounds(estimator, scores, torch.arange(n_eval)[None, :], c)
        p_value = permutation_p_value(float(matched[0]), shuffled) if permutations > 0 else math.nan
        cap = math.log(n_eval) if estimator == "infonce" else math.inf  # InfoNCE's ceiling
        seen = train_idx[:n_eval]  # pairs the critic trained on, as many as it was scored on
        in_sample = figure(averaged.scores(xt[seen], yt[seen]))
    return MIEstimate(
        nats=point,
        ci_low=lo,
        ci_high=max(0.0, min(max(hi, in_sample + (hi - point)), cap))
        if math.isfinite(hi)
        else math.nan,
        heldout_ci_high=hi,
        estimator=estimator,
        n_train=int(n_train),
        n_eval=int(n_eval),
        shuffled=float(shuffled.mean()),
        upper_limit=math.log(n_eval) if estimator == "infonce" else math.inf,
        p_value=p_value,
        in_sample=in_sample,
    )


# What help(estimate_mi) and editors show: every option with its default (estimate_mi takes
# them as **kwargs only to name a misspelled one itself).
estimate_mi.__signature__ = inspect.signature(_estimate_mi)  # type: ignore[attr-defined]
