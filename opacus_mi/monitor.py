"""``LeakageMonitor``: measures, step by step, what an Opacus DP-SGD step leaks about its batch.

Data flow (one direction): Opacus ``pre_step`` -> gradient views (:mod:`views`) -> privacy
tokens (:mod:`tokens`) paired with data features (:mod:`features`) -> MI estimators
(:mod:`estimators`) -> :class:`~opacus_mi.records.LeakageRecord` -> sinks.

How it attaches, and why this way:

* It wraps the optimizer's ``pre_step`` on the instance (``detach`` deletes the wrapper, leaving
  the object exactly as before). ``pre_step`` runs for every physical chunk, including those
  ``BatchMemoryManager`` tells Opacus to skip, so every chunk's per-sample gradients are seen
  and paired with that chunk's inputs. The accountant's ``step_hook`` is never replaced: Opacus's
  ``attach_step_hook`` overwrites whatever is there, and a monitor that went through it would
  silently stop privacy accounting.
* It only reads: ``grad_sample`` (clip factors are recomputed, since Opacus keeps them local),
  the batch the model saw (forward pre-hook), labels the loss saw (``wrap_criterion``). Nothing
  is written into parameters, gradients or Opacus state; no forward or backward pass of the model
  is added; every random number comes from the monitor's own ``torch.Generator``.
* A failure inside the monitor is caught, flagged on the record and warned about once: the
  monitor is a guest in someone else's training loop and must never be the reason it dies.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer

from .accounting import EpsilonTracker, MIAccountant, gaussian_channel_bound, sample_rate_of
from .estimators.bounds import BOUNDS, bootstrap_counts, percentile_interval
from .estimators.online import MIN_CI_PAIRS, OnlineEstimator
from .estimators.oracle import gram_oracle
from .estimators.semi_oracle import SemiOracleEstimator
from .features import FeatureCapture, FeatureFn
from .records import JsonlSink, LeakageRecord, MIValue
from .tokens import CountSketchTokenizer
from .views import VIEWS, ClipInfo, clip_factors, clipped_gram

_HALF = (torch.float16, torch.bfloat16)
_GHOST_HINT = (
    "grad_sample_mode='ghost' never materialises per-sample gradients, which this monitor reads; "
    "use grad_sample_mode='hooks' (default), 'functorch' or 'ew' for now"
)


@dataclass
class _Chunk:
    batch: int
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None
    oracle_terms: torch.Tensor | None = None
    flags: list[str] = field(default_factory=list)


def _check_attach(engine, module, optimizer) -> None:
    if not isinstance(optimizer, DPOptimizer):
        raise TypeError(
            f"optimizer must be the DPOptimizer returned by PrivacyEngine.make_private, got "
            f"{type(optimizer).__name__}; pass the optimizer that make_private returned"
        )
    if type(optimizer).__name__.endswith("FastGradientClipping"):
        raise ValueError(f"optimizer is a ghost-clipping optimizer: {_GHOST_HINT}")
    if not isinstance(module, AbstractGradSampleModule):
        raise TypeError(
            f"module must be the GradSampleModule returned by PrivacyEngine.make_private, got "
            f"{type(module).__name__}; pass the module that make_private returned"
        )
    if type(module).__name__.startswith("GradSampleModuleFastGradientClipping"):
        raise ValueError(f"module is a ghost-clipping module: {_GHOST_HINT}")
    if not hasattr(engine, "accountant"):
        raise TypeError(
            f"engine must be the opacus.PrivacyEngine that made the optimizer private, got "
            f"{type(engine).__name__}"
        )
    if "pre_step" in vars(optimizer):
        raise ValueError(
            "optimizer already has a monitor (or another pre_step wrapper) attached; call "
            "detach() on the existing monitor first"
        )


class LeakageMonitor:
    """Live MI leakage monitor for an Opacus-private model; attaches on construction.

    Args:
        engine: the ``opacus.PrivacyEngine`` (its accountant gives epsilon).
        module: the module returned by ``make_private``.
        optimizer: the ``DPOptimizer`` returned by ``make_private``.
        delta: delta at which epsilon is reported.
        every: monitor one logical step in ``every`` (others cost nothing).
        views: gradient views to measure, from ``("raw", "clipped", "private")``.
        estimator: learned estimator per view, ``"mine"``, ``"infonce"`` or None (the private
            view's white-box oracle is always computed).
        token_dim: count-sketch dimensions per parameter tensor.
        features: None (the batch the model saw, plus labels if ``wrap_criterion`` is used), a
            callable ``inputs -> (B, d)``, or a sequence of names where ``"input"`` is the batch
            and any other name is a layer of the model whose output is captured.
        seed: seeds the monitor's own generator and the sketch.
        jsonl: path of a JSONL file to append each record to (flushed per record).
        sinks: callables receiving each record.
        train_every, train_iters, window: schedule and memory of the learned critic.
        oracle_draws: noise draws per example for the oracle.
        semi_oracle: also report ``private/semi``: a learned ``features -> clean token`` model
            scored with the known Gaussian noise (needs "private" in views).
    """

    def __init__(
        self,
        engine,
        module: torch.nn.Module,
        optimizer: DPOptimizer,
        *,
        delta: float,
        every: int = 1,
        views: Sequence[str] = ("clipped", "private"),
        estimator: str | None = "mine",
        token_dim: int = 64,
        features: FeatureFn | Sequence[str] | None = None,
        seed: int = 0,
        jsonl: str | None = None,
        sinks: Iterable[Callable[[LeakageRecord], Any]] = (),
        train_every: int = 2,
        train_iters: int = 4,
        window: int = 4096,
        oracle_draws: int = 4,
        semi_oracle: bool = False,
    ):
        _check_attach(engine, module, optimizer)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"delta must be a float in (0, 1), e.g. 1e-5; got {delta!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"every must be a positive integer (monitor 1 step in every); got {every!r}"
            )
        if isinstance(token_dim, bool) or not isinstance(token_dim, int) or token_dim < 1:
            raise ValueError(f"token_dim must be a positive integer, e.g. 64; got {token_dim!r}")
        if isinstance(views, str):
            views = (views,)
        views = tuple(views)
        bad = [v for v in views if v not in VIEWS]
        if not views or bad:
            raise ValueError(f"views must be a non-empty subset of {VIEWS}; got {views!r}")
        if estimator is not None and estimator not in BOUNDS:
            raise ValueError(f"estimator must be one of {BOUNDS} or None; got {estimator!r}")
        self.engine, self.module, self.optimizer = engine, module, optimizer
        self.delta = float(delta)
        self.every = every
        self.views = views
        self.estimator = estimator
        self.token_dim = token_dim
        self.seed = seed
        self.oracle_draws = oracle_draws
        params = optimizer.params
        self.device = params[0].device if params else torch.device("cpu")
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.tokenizer = CountSketchTokenizer(
            [p.shape for p in params], token_dim, seed=seed, device=self.device
        )
        self.estimators: dict[str, OnlineEstimator] = {}
        if estimator is not None:
            for view in views:
                self.estimators[view] = OnlineEstimator(
                    estimator,
                    window=window,
                    train_every=train_every,
                    train_iters=train_iters,
                    generator=self.generator,
                    device=self.device,
                )
        self.semi_oracle: SemiOracleEstimator | None = None
        if semi_oracle and "private" in views:
            self.semi_oracle = SemiOracleEstimator(
                window=window,
                train_every=train_every,
                train_iters=train_iters,
                generator=self.generator,
                device=self.device,
            )
        self.epsilon = EpsilonTracker(engine.accountant, self.delta)
        self.mi_accountant = MIAccountant(engine.accountant)
        self.history: list[LeakageRecord] = []
        self.sinks: list[Callable[[LeakageRecord], Any]] = list(sinks)
        self._jsonl = JsonlSink(jsonl) if jsonl else None
        if self._jsonl is not None:
            self.sinks.append(self._jsonl)
        self.steps = 0  # logical optimizer steps seen since attach
        self._chunks: list[_Chunk] = []
        self._chunk_seconds = 0.0
        self._warned: set[str] = set()
        use_input, layers, fn = self._parse_features(features)
        self._capture = FeatureCapture(
            module, layers=layers, fn=fn, use_input=use_input, active=self._due
        )
        self._original_pre_step = optimizer.pre_step
        optimizer.pre_step = self._pre_step  # instance attribute; detach() deletes it
        self.attached = True

    # ------------------------------------------------------------------ attach / detach
    @staticmethod
    def _parse_features(features) -> tuple[bool, tuple[str, ...], FeatureFn | None]:
        if features is None:
            return True, (), None
        if callable(features):
            return False, (), features
        if isinstance(features, str):
            features = (features,)
        names = tuple(features)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(
                "features must be None, a callable inputs -> (B, d), or names ('input' and/or "
                f"layer names of the model); got {features!r}"
            )
        return "input" in names, tuple(n for n in names if n != "input"), None

    def detach(self) -> None:
        """Remove every hook and wrapper: the optimizer and module are exactly as before."""
        if not self.attached:
            return
        if vars(self.optimizer).get("pre_step") == self._pre_step:
            del self.optimizer.pre_step
        self._capture.remove()
        if self._jsonl is not None:
            self._jsonl.close()
        self.attached = False

    def wrap_criterion(self, criterion: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Return ``criterion`` that also shows the monitor each chunk's labels (one line)::

            criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())

        Labels become one-hot features (classes taken from the output's last dimension).
        """

        def wrapped(output: torch.Tensor, target: torch.Tensor, *args, **kwargs):
            if isinstance(target, torch.Tensor):
                classes = (
                    output.shape[-1]
                    if isinstance(output, torch.Tensor) and output.ndim > 1
                    else None
                )
                self._capture.record_labels(target, classes)
            return criterion(output, target, *args, **kwargs)

        return wrapped

    # ------------------------------------------------------------------ the hot path
    def _due(self) -> bool:
        return self.attached and self.steps % self.every == 0

    def _pre_step(self, closure=None):
        monitored = self._due()
        captures = self._capture.take()
        if monitored:
            t0 = time.perf_counter()
            try:
                self._chunks.append(self._measure_chunk(captures))
            except Exception as exc:  # never let the monitor break training
                self._warn_once(
                    f"chunk:{type(exc).__name__}", f"leakage measurement failed: {exc!r}"
                )
                self._chunks.append(_Chunk(batch=0, flags=[f"error:{type(exc).__name__}"]))
            self._chunk_seconds += time.perf_counter() - t0
        result = self._original_pre_step(closure)
        if getattr(self.optimizer, "_is_last_step_skipped", False):
            return result  # a BatchMemoryManager chunk: the logical step is not over yet
        if monitored:
            t0 = time.perf_counter()
            try:
                self._finish_step()
            except Exception as exc:
                self._warn_once(f"step:{type(exc).__name__}", f"leakage record failed: {exc!r}")
            self._chunks = []
            self._chunk_seconds = 0.0
        self.steps += 1
        return result

    def _measure_chunk(self, captures) -> _Chunk:
        opt = self.optimizer
        grad_samples = opt.grad_samples
        if not grad_samples:
            return _Chunk(batch=0, flags=["no_trainable_params"])
        batch = len(grad_samples[0])
        chunk = _Chunk(batch=batch)
        if batch == 0:
            return chunk
        feats = self._chunk_features(captures, batch, chunk)
        bound = opt.max_grad_norms if isinstance(opt, DPPerLayerOptimizer) else opt.max_grad_norm
        clip = clip_factors(grad_samples, bound)
        # A norm is finite iff every entry is: one check per example, not one per parameter.
        norms = clip.norms if clip.norms.ndim == 1 else clip.norms.norm(dim=1)
        grads_ok = torch.isfinite(norms)
        keep = grads_ok if feats is None else grads_ok & torch.isfinite(feats).all(dim=1)
        kept = int(keep.sum())  # the one host sync of a monitored chunk
        if kept < batch:
            if not bool(grads_ok.all()):
                chunk.flags.append("nonfinite_grad_sample")
            if feats is not None and not bool(torch.isfinite(feats).all()):
                chunk.flags.append("nonfinite_features")
            self._warn_once(
                "nonfinite",
                f"{batch - kept} of {batch} examples had NaN/Inf per-sample gradients or features; "
                "they are excluded from MI estimation and the record is flagged",
            )
            idx = keep.nonzero().squeeze(1)
            grad_samples = [g.index_select(0, idx.to(g.device)) for g in grad_samples]
            clip = ClipInfo(clip.factors[idx], clip.norms[idx], clip.per_layer)
            feats = None if feats is None else feats[idx.to(feats.device)]
        if kept == 0:
            return chunk
        # Half-precision gradients are sketched in float32 (Opacus's clip factors are kept as is).
        grad_samples = [g.float() if g.dtype in _HALF else g for g in grad_samples]
        raw = self.tokenizer.sketch(grad_samples)
        if "raw" in self.views:
            chunk.tokens["raw"] = torch.cat(raw, dim=1).float()
        if "clipped" in self.views or "private" in self.views:
            clipped = torch.cat(
                [t * clip.for_layer(i).to(t.dtype)[:, None] for i, t in enumerate(raw)], dim=1
            ).float()
            if "clipped" in self.views or self.semi_oracle is not None:
                chunk.tokens["clipped"] = clipped
            if "private" in self.views:
                std = float(opt.noise_multiplier) * float(opt.max_grad_norm)
                noise = torch.randn(
                    clipped.shape, generator=self.generator, device=self.generator.device
                )
                chunk.tokens["private"] = clipped + std * noise.to(clipped.device)
                gram = clipped_gram(grad_samples, clip, exact=opt.noise_multiplier < 0.01)
                chunk.oracle_terms = gram_oracle(
                    gram, std, draws=self.oracle_draws, generator=self.generator
                ).terms
        chunk.features = feats
        return chunk

    def _chunk_features(self, captures, batch: int, chunk: _Chunk) -> torch.Tensor | None:
        """Features paired with this chunk's gradients, or None (flagged) if they cannot be."""
        try:
            feats = self._capture.features(captures, batch)
        except Exception as exc:  # a user feature callable failed: keep the oracle going
            self._warn_once(f"features:{type(exc).__name__}", f"feature extraction failed: {exc!r}")
            chunk.flags.append("features_error")
            return None
        if feats is None:
            chunk.flags.append("features_unpaired")
        return feats

    def _finish_step(self) -> None:
        t0 = time.perf_counter()
        opt = self.optimizer
        chunks = self._chunks
        batch = sum(c.batch for c in chunks)
        flags = sorted({f for c in chunks for f in c.flags})
        sigma = float(opt.noise_multiplier)
        record = LeakageRecord(
            step=self.steps,
            batch_size=batch,
            noise_multiplier=sigma,
            max_grad_norm=float(opt.max_grad_norm),
            sample_rate=sample_rate_of(self.engine.accountant),
            epsilon=self.epsilon.epsilon(),
            delta=self.delta,
            mi_bound=gaussian_channel_bound(sigma) if "private" in self.views else None,
            mi_upper_bound=self.mi_accountant.bound(),
            chunks=len(chunks),
            flags=flags,
        )
        if batch == 0:
            record.flags.append("empty_batch")
        usable = [c for c in chunks if c.batch > 0 and c.tokens and c.features is not None]
        if len({c.features.shape[1] for c in usable}) > 1:
            usable = []  # features changed shape mid-step: cannot be stacked into one batch
        if usable:
            feats = torch.cat([c.features for c in usable])
            for view, est in self.estimators.items():
                tokens = torch.cat([c.tokens[view] for c in usable])
                value = est.evaluate(feats, tokens)
                if value is not None and math.isfinite(value.matched):
                    record.mi[f"{view}/{est.kind}"] = MIValue(
                        nats=value.matched,
                        ci_low=value.ci_low,
                        ci_high=value.ci_high,
                        n=value.n,
                        mismatched=value.mismatched,
                    )
                elif value is not None:
                    record.flags.append(f"estimate_nonfinite:{view}")
                if est.observe(feats, tokens):
                    record.flags.append(f"critic_reset:{view}")
                    self._warn_once(
                        f"reset:{view}",
                        f"the {view}-view critic diverged (non-finite loss) and was reset",
                    )
        if self.semi_oracle is not None and usable:
            self._semi_oracle_step(record, usable, sigma * float(opt.max_grad_norm))
        terms = [
            c.oracle_terms for c in chunks if c.oracle_terms is not None and c.oracle_terms.numel()
        ]
        if terms:
            all_terms = torch.cat(terms)
            n = all_terms.numel()
            lo = hi = math.nan
            if n >= MIN_CI_PAIRS:
                counts = bootstrap_counts(n, 200, self.generator, all_terms.device)
                lo, hi = percentile_interval((counts @ all_terms.double()) / n)
            record.mi["private/oracle"] = MIValue(
                nats=float(all_terms.mean()), ci_low=lo, ci_high=hi, n=n
            )
        for key, value in record.mi.items():
            if key.startswith("private/") and _exceeds(value, record.mi_bound):
                record.flags.append(f"exceeds_bound:{key}")
        record.monitor_seconds = self._chunk_seconds + (time.perf_counter() - t0)
        self.history.append(record)
        for sink in self.sinks:
            sink(record)

    def _semi_oracle_step(self, record: LeakageRecord, usable: list[_Chunk], std: float) -> None:
        """Score the private tokens with the learned clean-token model, then learn from them."""
        feats = torch.cat([c.features for c in usable])
        value = self.semi_oracle.evaluate(
            feats, torch.cat([c.tokens["private"] for c in usable]), std
        )
        if value is not None and math.isfinite(value.matched):
            record.mi["private/semi"] = MIValue(
                nats=value.matched,
                ci_low=value.ci_low,
                ci_high=value.ci_high,
                n=value.n,
                mismatched=value.mismatched,
            )
        if self.semi_oracle.observe(feats, torch.cat([c.tokens["clipped"] for c in usable])):
            record.flags.append("critic_reset:semi")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"opacus-mi: {message}; training continues unchanged", RuntimeWarning, stacklevel=3
            )

    # ------------------------------------------------------------------ results
    def series(self, key: str) -> list[tuple[int, MIValue]]:
        """``(step, value)`` for one MI series, e.g. ``"private/oracle"`` or ``"clipped/mine"``."""
        return [(r.step, r.mi[key]) for r in self.history if key in r.mi]

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.history:
            for k in r.mi:
                seen.setdefault(k, None)
        return list(seen)

    def summary(self, last: int = 20) -> str:
        """A readable table of every MI series over the last ``last`` records."""
        from .report import summary_table

        return summary_table(self.history, last=last)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "generator": self.generator.get_state(),
            "estimators": {k: e.state_dict() for k, e in self.estimators.items()},
            "semi_oracle": None if self.semi_oracle is None else self.semi_oracle.state_dict(),
            "history": [r.as_dict() for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        for k, est_state in state["estimators"].items():
            self.estimators[k].load_state_dict(est_state)
        if self.semi_oracle is not None and state.get("semi_oracle") is not None:
            self.semi_oracle.load_state_dict(state["semi_oracle"])
        self.generator.set_state(state["generator"])
        self.history = [LeakageRecord.from_dict(d) for d in state["history"]]

    def __repr__(self) -> str:
        return (
            f"LeakageMonitor(views={self.views}, estimator={self.estimator!r}, every={self.every}, "
            f"token_dim={self.token_dim}, records={len(self.history)}, attached={self.attached})"
        )


def _exceeds(value: MIValue, bound: float | None) -> bool:
    """Whether an estimate lies above a proven bound beyond any plausible noise (a bug).

    The displayed CIs are 95%: over hundreds of steps some would miss a true value near the
    bound by chance. The bug check asks for 3.29 standard errors (99.9%, two-sided) instead,
    with the standard error read off the 95% interval.
    """
    if bound is None or not (math.isfinite(value.ci_low) and math.isfinite(value.ci_high)):
        return False
    se = (value.ci_high - value.ci_low) / (2 * 1.959963984540054)
    return value.nats - 3.2905 * se > bound + 1e-9
