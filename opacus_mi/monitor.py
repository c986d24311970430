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
* With overlap (the default on a CPU with a free core, :mod:`opacus_mi.overlap`) the hook only
  takes references to what the step produced and a worker thread does the measuring while the
  next step runs; records are the same, delivered to ``history`` and the sinks one step later
  (reading ``history`` or calling :meth:`LeakageMonitor.flush` waits for them).
* Off the CPU (a GPU), every host read of a device value waits for the queued kernels. There a
  monitored step reads once: it is measured as if every example were finite, and the record's
  figures and the count of finite rows come back in one transfer (:mod:`opacus_mi.reads`); a
  chunk that had NaN/Inf rows is then trimmed and its draws made again from the saved
  generator state (rare). The critics' training rounds of a step read once more, together.
* Ghost clipping (``grad_sample_mode="ghost"``) has no ``grad_sample``: a
  :class:`~opacus_mi.factored.FactoredCapture` keeps each layer's activations and first-pass
  backprops and gives the same tokens, norms and Gram matrix without per-sample gradients.

Multi-process (Opacus DPDDP under torchrun): Opacus releases one noisy sum over the global batch,
so at the end of each monitored logical step every rank's chunks are all-gathered in rank order
(:mod:`opacus_mi.distributed`) and every rank estimates MI on the global batch, identically;
rank 0 alone calls the sinks (JSONL included), every rank keeps ``history``. Warnings follow
the same rule: rank 0 alone says those of what every rank has alike (the records, the critics,
the settings), and a rank says its own (its features, a failure) as ``opacus-mi (rank r)``.
Epsilon is each rank's own accountant, which Opacus steps with the global sample rate. Create
the monitor on every rank, with the same arguments (compared as it is created): the gathers are
collectives, made unconditionally on each monitored step (a local failure sends an empty,
flagged contribution rather than skipping the call). A collective that itself fails means a
broken process group, which stops training's gradient all-reduce as well.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import copy
import dataclasses
import functools
import math
import numbers
import os
import sys
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from opacus.accountants import IAccountant, PRVAccountant
from opacus.grad_sample import (
    AbstractGradSampleHooks,
    AbstractGradSampleModule,
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, DPPerLayerOptimizer

from .accounting import (
    PRV_MAX_POINTS,
    EpsilonTracker,
    MIAccountant,
    gaussian_channel_bound,
    history_continues,
    sample_rate_of,
    steps_counted,
)
from .budget import (
    EPSILON_SHARE,
    EpsilonPacer,
    OverheadBudget,
    Plan,
    check_fraction,
    foreground,
)
from .checks import check_torch_seed, is_int_at_least, python_number
from .chunks import CLIP_SLACK, Chunk, empty_item, half_slack, pack, unpack
from .distributed import (
    GatherError,
    all_gather_items,
    check_same_on_every_rank,
    should_gather,
    world_size,
)
from .distributed import rank as dist_rank
from .estimators.bounds import BOUNDS, interval_from, mean_sd, random_cycle, t_quantile
from .estimators.online import MIN_CI_PAIRS, BatchEstimate, OnlineEstimator
from .estimators.oracle import floored_interval, gram_oracle, oracle_interval, union_mean
from .estimators.semi_oracle import SemiOracleEstimator
from .factored import (
    FactoredCapture,
    FactoredRecording,
    KroneckerTokenizer,
    LinearInputs,
    opacus_samples,
    rank_one_backprop,
    zero_padded_by_opacus,
)
from .features import FeatureCapture, FeatureFn, WidthsDiffer
from .hooks import GuestHook
from .learned_tokens import TOKEN_ENCODERS
from .overlap import Worker, resolve_overlap, without_autocast
from .reads import ReadBatch
from .records import EXCEEDS_LEVEL, JsonlSink, LeakageRecord, MIValue
from .subspace import GradientSubspace
from .views import (
    VIEWS,
    ClipInfo,
    clip_factors,
    clipped_grad_samples,
    clipped_gram,
    default_views,
    flat_clip,
    raw_gram,
    release_noise_std,
    scale_gram,
    series_names,
    unmeasured_views,
)
from .warn import say

_HALF = (torch.float16, torch.bfloat16)
_NOT_COPIED = (
    "a LeakageMonitor holds live hooks on its model and optimizer and is not copied or "
    "pickled: copy monitor.state_dict() (or pickle it) and load it into a new monitor instead"
)
MONITOR_STATE_KEY = "opacus_mi_monitor_state_dict"  # the monitor's entry in an engine checkpoint
SKETCH_SIGNS = 2  # the sketch's sign rule, saved with a checkpoint's settings
STATE_FORMAT = 2  # state_dict's layout; a state of a higher one is refused (a newer version's)
# A chunk's flags that say its examples' features could not be paired with their gradients.
_UNPAIRED = ("features_error", "features_unpaired", "features_width_changed")
# What a step whose features change width gets, and what gives them one width.
_WIDTH = (
    "The learned critics need one width, so such steps get the oracle only (flag "
    "'features_width_changed'). Pass features= a callable giving a fixed width per example "
    "(token ids: lambda ids: F.one_hot(ids, vocab_size).sum(1).float()) or names of layers whose "
    "outputs have a fixed width"
)
_GHOST_HINT = (
    "ghost clipping is supported for grad_sample_mode='ghost' (GradSampleModuleFastGradientClipping"
    " with DPOptimizerFastGradientClipping or its DDP variant), not 'ghost_fsdp' or tensor "
    "parallel; pass the module and optimizer that one make_private call returned"
)


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _check_combination(
    views: tuple[str, ...],
    estimator: str | None,
    *,
    control: bool,
    semi_oracle: bool,
    tokenizer: str = "sketch",
) -> None:
    """Refuse settings under which a requested figure could never be made, or an option would
    do nothing: without a learned estimator only the private view has a figure (its oracle),
    the semi-oracle and the control are of the private view and of a learned critic, and a
    token encoder is for the learned critics alone (the semi-oracle reads its own tokens)."""
    unmeasured = unmeasured_views(views, estimator)
    if unmeasured:
        raise ValueError(
            f"views={views!r} with estimator=None: without a learned estimator only the private "
            f"view has a figure (its Gram oracle), so {unmeasured!r} would never be measured; "
            "pass views=('private',) (the default without an estimator) or an estimator, e.g. "
            "estimator='mine'"
        )
    if tokenizer != "sketch" and estimator is None:
        raise ValueError(
            f"tokenizer={tokenizer!r} encodes tokens for the learned critics, and estimator=None "
            "trains none (the oracle needs no tokens, the semi-oracle makes its own); "
            "pass an estimator, e.g. estimator='mine', or leave tokenizer at 'sketch'"
        )
    if control and estimator is None:
        raise ValueError(
            "control=True trains a learned critic on shuffled pairs, so it needs a learned "
            "estimator; pass e.g. estimator='mine', or control=False"
        )
    if semi_oracle and "private" not in views:
        raise ValueError(
            f"semi_oracle=True scores the private view, which views={views!r} leaves out; add "
            "'private' to views, or semi_oracle=False"
        )


def _check_attach(engine, module, optimizer) -> None:
    if not isinstance(optimizer, DPOptimizer):
        raise TypeError(
            f"optimizer must be the DPOptimizer returned by PrivacyEngine.make_private, got "
            f"{type(optimizer).__name__}; pass the optimizer that make_private returned"
        )
    if isinstance(module, AbstractGradSampleHooks) and not isinstance(
        module, AbstractGradSampleModule
    ):
        raise ValueError(
            f"module is the {type(module).__name__} that make_private(wrap_model=False) "
            "returns: the monitor needs the GradSampleModule of make_private(wrap_model=True), "
            "the default; make the model private with it and pass the module it returns"
        )
    if not isinstance(module, AbstractGradSampleModule):
        raise TypeError(
            f"module must be the GradSampleModule returned by PrivacyEngine.make_private, got "
            f"{type(module).__name__}; pass the module that make_private returned"
        )
    if _is_ghost(module, optimizer) and (
        type(module) is not GradSampleModuleFastGradientClipping
        or not isinstance(optimizer, DPOptimizerFastGradientClipping)
        or type(optimizer).__name__.startswith("FSDP")
    ):
        raise ValueError(
            f"unsupported ghost-clipping pair {type(module).__name__} / "
            f"{type(optimizer).__name__}: {_GHOST_HINT}"
        )
    own = {id(p) for p in module.parameters()}
    strangers = sum(id(p) not in own for p in optimizer.params)
    if strangers:
        # (Two models made private by one engine, mixed up: the records paired one model's
        # inputs with the other's per-sample gradients, unflagged with fixed-size batches.)
        raise ValueError(
            f"module and optimizer do not belong together: {strangers} of the optimizer's "
            f"{len(optimizer.params)} trainable parameters are not the module's; pass the "
            "module and the optimizer that one make_private call returned"
        )
    if not hasattr(engine, "accountant"):
        raise TypeError(
            f"engine must be the opacus.PrivacyEngine that made the optimizer private, got "
            f"{type(engine).__name__}"
        )
    stepped = _hooked_accountant(optimizer)
    if stepped is not None and stepped is not engine.accountant:
        # Another engine's accountant never steps: every record read epsilon 0, unflagged.
        raise ValueError(
            "engine is not the PrivacyEngine that made this optimizer private: the optimizer "
            "steps another engine's accountant; pass the engine whose make_private returned it"
        )
    if "pre_step" in vars(optimizer):
        raise ValueError(
            "optimizer already has a monitor (or another pre_step wrapper) attached; call "
            "detach() on the existing monitor first"
        )


def _hooked_accountant(optimizer) -> Any:
    """The accountant Opacus's step hook (``get_optimizer_hook_fn``) steps, if it is one."""
    hook = getattr(optimizer, "step_hook", None)
    for cell in getattr(hook, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # (an empty cell)
            if isinstance(cell.cell_contents, IAccountant):
                return cell.cell_contents
    return None


def _ghost_release_warnings(module) -> list[tuple[str, str]]:
    """``(key, message)`` for the layers whose released gradient can exceed the clipping bound
    under Opacus ghost clipping: Opacus clips them with its samplers' norms, which are not
    those of the true per-example gradients that its second pass releases."""
    sampled = [
        m
        for m in module.modules()
        if opacus_samples(module, m) and any(p.requires_grad for p in m.parameters())
    ]
    said = []
    padded = sorted(
        {
            f"{type(m).__name__}(padding_mode={m.padding_mode!r})"
            for m in sampled
            if zero_padded_by_opacus(m)
        }
    )
    if padded:
        said.append(
            (
                "ghost:padding_mode",
                f"ghost clipping clips {', '.join(padded)} with the norms of Opacus's grad "
                "sampler, which pads with zeros, and releases autograd's true gradients: an "
                "example can contribute more than max_grad_norm, which Opacus's epsilon does "
                "not allow for (the monitor measures what is released). Use "
                "padding_mode='zeros', or grad_sample_mode='hooks'",
            )
        )
    if any(isinstance(m, torch.nn.EmbeddingBag) for m in sampled):
        said.append(
            (
                "ghost:embedding_bag",
                "ghost clipping clips an EmbeddingBag with the norms of Opacus's grad "
                "sampler, which counts an id repeated within a bag once, and releases "
                "autograd's true gradients: such an example can contribute more than "
                "max_grad_norm, which Opacus's epsilon does not allow for, and the monitor's "
                "figures follow Opacus's per-sample gradients, not the released ones. Use "
                "grad_sample_mode='hooks', or bags without repeated ids",
            )
        )
    if any(
        isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.scale_grad_by_freq
        for m in sampled
    ):
        said.append(
            (
                "ghost:scale_grad_by_freq",
                "ghost clipping clips an embedding with scale_grad_by_freq=True with the norms "
                "of Opacus's grad sampler, which ignores the scaling, and releases autograd's "
                "second pass, which divides each id's gradient by its count in the whole batch: "
                "one example's ids change what the others release, which Opacus's epsilon does "
                "not allow for, and the monitor's figures follow Opacus's per-sample gradients, "
                "not the released ones. Use scale_grad_by_freq=False, or "
                "grad_sample_mode='hooks'",
            )
        )
    return said


# How a ghost-clipping loop gets the loss whose backward clips (named where one did not).
_GHOST_LOSS = (
    "model, optimizer, criterion, loader = engine.make_private(..., "
    "criterion=nn.CrossEntropyLoss(), grad_sample_mode='ghost')"
)


def _classes_of(output: Any) -> int | None:
    """The number of classes a loss's first argument shows: its last dimension, or that of its
    ``.logits`` or ``["logits"]`` (a model output object's or dict's); 1 for a single logit per
    example (the classes are then the labels'); None where it shows none."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        return None
    return logits.shape[-1] if logits.ndim > 1 else 1


def _plain_loss_under_ghost(criterion) -> bool:
    """Whether ``criterion`` is known, before it is called, to be a plain loss: a module that
    is not Opacus's ghost-clipping loss (whose backward runs its two passes). Any other
    callable (a function around that loss, a monitor's wrapper of it) is judged by what it
    returns (:func:`_plain_pass`)."""
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    return isinstance(criterion, torch.nn.Module) and not isinstance(
        criterion, DPLossFastGradientClipping
    )


def _plain_pass(loss) -> bool:
    """Whether a loss under ghost clipping is a plain tensor, whose ``backward()`` is one
    pass (Opacus's loss returns its own type, arithmetic on it included)."""
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    return not isinstance(loss, DPTensorFastGradientClipping)


# The monitor whose wrapper recorded the labels of the loss call now running (a wrapper inside
# it neither records them a second time nor says they reach no monitor).
_TAKING_LABELS: contextvars.ContextVar[Any] = contextvars.ContextVar("_TAKING_LABELS", default=None)


def _is_ghost(module, optimizer) -> bool:
    """Ghost (fast gradient) clipping: per-sample gradients never exist, only layer factors."""
    return isinstance(module, GradSampleModuleFastGradientClipping) or isinstance(
        optimizer, DPOptimizerFastGradientClipping
    )


class ParamsChanged(RuntimeError):
    """The optimizer's trainable parameters are not those the monitor was built for."""


@dataclass
class _Taken:
    """What one physical chunk's measurement reads, taken on the training thread at
    ``pre_step``: references only (Opacus replaces ``grad_sample`` tensors, never writes them
    again), so the measuring can happen later, on an overlap worker."""

    captures: list
    grad_samples: list[torch.Tensor] | None = None
    linear_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    factored: Any = None  # ghost clipping: a FactoredBatch, or (overlap) its FactoredRecording
    noise_multiplier: float = 0.0
    max_grad_norm: float = 0.0
    noise_std: float = 0.0  # of the noise Opacus adds (views.release_noise_std)
    max_grad_norms: list[float] | None = None  # per-layer clipping
    # Ghost clipping in half precision: the norms Opacus clipped with, in their own precision
    # (the monitor's float64 norms of the same factors gave factors 4e-3 off).
    ghost_norms: torch.Tensor | None = None
    # (the bound Opacus clipped with, the one its noise is scaled by) where they differ: a
    # grad-clip scheduler moves only ``optimizer.max_grad_norm``
    mismatch: tuple[float, float] | None = None
    error: Exception | None = None  # taking them failed: the chunk is flagged
    unclipped: bool = False  # ghost clipping released it unclipped (see _unclipped_release)

    def release(self) -> None:
        """Drop the references once measured. With overlap the hand-over (a task's arguments)
        lives until the record is made; holding B x P per-sample gradients that long keeps
        the allocator from reusing their memory for the next step's."""
        self.captures, self.grad_samples, self.linear_inputs, self.factored = [], None, {}, None


@dataclass
class _Estimates:
    """A logical step's figures, read back (see ``LeakageMonitor._estimate``), and the batch the
    critics learn from next."""

    mi: dict[str, MIValue] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    features: torch.Tensor | None = None
    learned: dict[str, torch.Tensor] = field(default_factory=dict)
    usable: list[Chunk] = field(default_factory=list)  # the chunks paired with features
    # The largest norm of an example's clipped gradient, over the oracle's chunks (the square
    # root of its Gram's largest diagonal entry): at most the clipping bound, unless Opacus
    # released more than it clipped (see exceeds_clip), by more than ``slack`` (rounding).
    contribution: float | None = None
    slack: float = CLIP_SLACK
    # The intervals withheld from ``mi`` (InfoNCE's near ln B), for the bug check alone: a
    # private figure there reads far above the bound exactly when something is wrong.
    withheld: dict[str, tuple[float, float]] = field(default_factory=dict)
    # The bug check's half-width where the displayed interval cannot give it (see _exceeds):
    # the oracle's, whose interval is as wide as its Monte Carlo part's t with few degrees of
    # freedom where that part dominates.
    margins: dict[str, float] = field(default_factory=dict)


class LeakageMonitor:
    """Live MI leakage monitor for an Opacus-private model; attaches on construction.

    Args:
        engine: the ``opacus.PrivacyEngine`` (its accountant gives epsilon).
        module: the module returned by ``make_private``.
        optimizer: the ``DPOptimizer`` returned by ``make_private``.
        delta: delta at which epsilon is reported.
        every: monitor one in ``every`` of this optimizer's logical steps (others cost nothing;
            another model stepping the same accountant does not count). ``None`` (default):
            as many as ``budget`` affords, every step where the monitor is cheap relative to
            the model (:mod:`opacus_mi.budget`).
        views: gradient views to measure, from ``("raw", "clipped", "private")``. ``None``
            (default): clipped and private, or private alone with ``estimator=None``.
        estimator: learned estimator per view, ``"mine"``, ``"infonce"``, ``"nwj"``,
            ``"smile"`` or None (the private view's white-box oracle is always computed; with
            None and no semi-oracle no features or tokens are made: nothing would read them).
        token_dim: sketch dimensions per parameter tensor (Kronecker ``k1 * k2 <= token_dim``
            for Linear/Conv2d/Embedding weights, see :mod:`opacus_mi.factored`).
        features: None (the batch the model saw, plus labels if ``wrap_criterion`` is used), a
            callable ``inputs -> (B, d)``, or a sequence of names where ``"input"`` is the batch
            and any other name is a layer of the model whose output is captured.
        seed: seeds the monitor's own generator and the sketch.
        jsonl: path of a JSONL file to append each record to (flushed per record).
        sinks: callables receiving each record (or one callable).
        max_history: keep only the latest this many records in ``history`` (and checkpoints);
            the sinks and the JSONL still get every record. ``None`` (default) keeps all of
            them, 0.7-1.3 KB of host memory each (digits CNN, without and with critics): set
            it for a long every-step run.
        train_every, train_iters, window: schedule and memory of the learned critic. A critic
            update costs a few DP steps of a small model. ``train_every=None`` (default): the
            critics train whenever ``budget`` affords a round; an integer n trains each critic
            on each of its first 32 batches, then every n-th monitored step (the CLI, an
            analysis job, uses 2). Either way it scores every monitored batch, held out, once
            it has trained.
        budget: with ``every=None`` or ``train_every=None``, the most monitor time per unit of
            the training loop's own time (0.06: the monitor's own work adds at most 6%; what no
            clock of its own sees, caches its work leaves cold and its hooks, adds 1-5% more:
            1.056-1.098x measured side by side on the digits CNN; README, Performance). Half is kept
            for the per-step measurement when critics exist (none with ``every`` fixed: the
            critics get all of it). The schedule then depends on
            timing: pass integers for both for reproducible records. A quarter of it also
            paces an expensive accountant's epsilon (see ``exact_epsilon``).
        oracle_draws: noise draws per example for the oracle.
        semi_oracle: also report ``private/semi``: a learned ``features -> clean token`` model
            scored with the known Gaussian noise (needs "private" in views). Its tokens are the
            ``token_dim``-dim principal subspace of recent clipped gradients
            (:mod:`opacus_mi.subspace`; hooks/functorch/ew modes on one process, models up to a
            few hundred thousand parameters), else the sketch tokens.
        control: per learned view, also train a second critic, identically configured, on
            pairs whose features are re-paired at random (a random cycle, so no example keeps
            its own features) and report its held-out bound as ``MIValue.control``. There is
            nothing to find in those pairs, so it measures the estimator's own bias under the
            exact same schedule; "detected" then needs the CI above it. Doubles critic cost.
        tokenizer: what the learned critic reads: ``"sketch"`` (default: the concatenated
            per-layer sketch tokens) or a learned privacy-token encoder over the per-layer
            sketch tokens, trained online with the critic (:mod:`opacus_mi.learned_tokens`):
            ``"autoencoder"`` or ``"transformer"``. On the digits CNN the Transformer found far
            more than the sketch on 3 of 3 seeds (3.78-3.85 vs 2.13-2.20 nats, clipped view),
            at 1.46x the monitor's cost, but on one data set and in an earlier version on 2 of
            3 seeds only (README, "Learned privacy tokens"), hence the cheap default.
        distributed: under Opacus DPDDP (torchrun), gather every rank's chunks so MI is measured
            on the global batch and only rank 0 calls the sinks/JSONL. ``None`` (default) does so
            iff ``make_private`` built a distributed optimizer and there is more than one rank;
            ``False`` keeps each rank local: each calls its own sinks, and rank r > 0 writes
            ``jsonl`` as ``<stem>.rank<r><suffix>`` beside it. Create the monitor on *every*
            rank: its gathers are collectives (see "Multi-process" in the module docstring).
        overlap: measure on a worker thread while the next training step runs
            (:mod:`opacus_mi.overlap`): the same records, a step later, for less of the training
            thread's time (every-step tokens + oracle on the digits CNN, 2-core VMs: 1.45x
            inline, 1.21x overlapped on an Intel Xeon; 1.61-1.65x and 1.21-1.27x on an AMD
            EPYC, whose DP step is 3x faster; the rest is mostly waking the worker and the
            hardware the two threads share: ``benchmarks/contention.py``).
            ``None`` (default): on for a CPU model on one process when a core is free (more
            usable cores than ``torch.get_num_threads()``); with ghost clipping the hooks then
            only record each layer's factors. Sinks and a ``features`` callable are still called
            on the training thread (the callable at the step, before the weights change).
        exact_epsilon: compute the accountant's epsilon afresh for every record, whatever it
            costs. Off (default): an accountant whose ``get_epsilon`` is cheap (RDP, composed
            here from cached values, bit-identical to Opacus; GDP) is exact at every record
            anyway, but Opacus's PRV (its default) costs ~25 ms at a few hundred steps and
            ~1 s at 10,000: then it is recomputed when a quarter of ``budget`` affords it (of
            the training loop's time under the budget, of the wall time on a fixed schedule:
            :class:`~opacus_mi.budget.EpsilonPacer`), and a record in between carries the
            latest exact value and its step (``epsilon_step``). The MI figures do not depend
            on it.
        poisson_sampling: as given to ``make_private``. False: the MI accountant's whole-run
            bound (``mi_upper_bound``) counts one release per epoch, since Poisson's subsampled
            bound does not hold for a loader that visits each example once per epoch. ``None``
            (default): read from the module, on which Opacus forbids gradient accumulation
            exactly when it samples by Poisson (``MonitoredPrivacyEngine`` passes it on).
    """

    def __init__(
        self,
        engine,
        module: torch.nn.Module,
        optimizer: DPOptimizer,
        *,
        delta: float,
        every: int | None = None,
        views: Sequence[str] | None = None,
        estimator: str | None = "mine",
        token_dim: int = 64,
        features: FeatureFn | Sequence[str] | None = None,
        seed: int = 0,
        jsonl: str | os.PathLike | None = None,
        sinks: Iterable[Callable[[LeakageRecord], Any]] | Callable[[LeakageRecord], Any] = (),
        max_history: int | None = None,
        train_every: int | None = None,
        train_iters: int = 4,
        window: int = 4096,
        oracle_draws: int = 4,
        semi_oracle: bool = False,
        control: bool = False,
        tokenizer: str = "sketch",
        distributed: bool | None = None,
        budget: float = 0.06,
        overlap: bool | None = None,
        exact_epsilon: bool = False,
        poisson_sampling: bool | None = None,
    ):
        _check_attach(engine, module, optimizer)
        self._warned: set[str] = set()
        # Per sink (by id): its name, the records it missed and its first error (see _deliver).
        self._missed: dict[int, list] = {}
        self.distributed = should_gather(distributed, optimizer)
        self.rank = dist_rank()  # (0 without a process group)
        self._ranks = world_size()  # (1 without one; see _speaker)
        if tokenizer not in TOKEN_ENCODERS:
            raise ValueError(
                f"tokenizer must be one of {TOKEN_ENCODERS} ('sketch' is the default); "
                f"got {tokenizer!r}"
            )
        # NumPy scalars (np.float32(1e-5), np.int64(5): hyperparameters computed with NumPy) as
        # the Python numbers they hold, before the checks and everything after them.
        delta, every, train_every, token_dim, oracle_draws, train_iters, window, seed = (
            python_number(v)
            for v in (delta, every, train_every, token_dim, oracle_draws, train_iters, window, seed)
        )
        max_history, budget = python_number(max_history), python_number(budget)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"delta must be a float in (0, 1), e.g. 1e-5; got {delta!r}")
        for name, value in (("every", every), ("train_every", train_every)):
            if value is not None and not is_int_at_least(value, 1):
                raise ValueError(
                    f"{name} must be a positive integer, or None to follow the overhead budget; "
                    f"got {value!r}"
                )
        if not is_int_at_least(token_dim, 1):
            raise ValueError(f"token_dim must be a positive integer, e.g. 64; got {token_dim!r}")
        if not is_int_at_least(oracle_draws, 1):
            raise ValueError(
                "oracle_draws must be a positive integer (noise draws per example for the "
                f"oracle's Monte Carlo, e.g. 4); got {oracle_draws!r}"
            )
        if not is_int_at_least(train_iters, 1):
            raise ValueError(
                "train_iters must be a positive integer (critic steps per training round, e.g. "
                f"4); got {train_iters!r}"
            )
        if not is_int_at_least(window, 4):
            raise ValueError(
                "window must be an integer >= 4: the (feature, token) pairs, examples rather "
                "than steps, a learned critic keeps to train on (it trains on at least 4; "
                f"default 4096); got {window!r}"
            )
        check_torch_seed(seed)
        budget = check_fraction(budget)  # also on a fixed schedule: a quarter paces PRV's epsilon
        if budget >= 2:  # (a percentage given as one: 6 for 6% would be 600%)
            say(
                f"{self._speaker()}: budget={budget:g} lets the monitor take {budget:.0%} of the "
                f"training loop's time; for {budget:g}% pass budget={budget / 100:g}",
                UserWarning,
            )
        for name, value in (("semi_oracle", semi_oracle), ("control", control)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False; got {value!r}")
        if not isinstance(exact_epsilon, bool):
            raise ValueError(
                "exact_epsilon must be True (every record's epsilon computed afresh, whatever the "
                f"accountant costs) or False (the default); got {exact_epsilon!r}"
            )
        if max_history is not None and not is_int_at_least(max_history, 1):
            raise ValueError(
                "max_history must be a positive integer (the latest records kept in memory), or "
                f"None to keep every record; got {max_history!r}"
            )
        self.max_history = max_history
        if estimator is not None and estimator not in BOUNDS:
            raise ValueError(f"estimator must be one of {BOUNDS} or None; got {estimator!r}")
        if views is None:
            views = default_views(estimator)
        elif isinstance(views, str):
            views = (views,)
        views = tuple(dict.fromkeys(views))  # each view once, in the order given
        bad = [v for v in views if v not in VIEWS]
        if not views or bad:
            raise ValueError(f"views must be a non-empty subset of {VIEWS}; got {views!r}")
        _check_combination(
            views, estimator, control=control, semi_oracle=semi_oracle, tokenizer=tokenizer
        )
        feature_spec = self._parse_features(features)  # checked before anything attaches
        sinks = [sinks] if callable(sinks) else list(sinks) if _iterable(sinks) else [sinks]
        if not all(callable(s) for s in sinks):
            raise ValueError(
                "sinks must be callables (or one callable), each given every record; got "
                f"{[s for s in sinks if not callable(s)]!r}"
            )
        if jsonl is not None and not isinstance(jsonl, (str, os.PathLike)):
            raise ValueError(
                f"jsonl must be a file path (str or os.PathLike) or None; got {jsonl!r}"
            )
        if self.distributed:  # (checked before anything attaches, like everything above)
            # What decides the steps every rank gathers at and the records, critics and
            # generator each computes alike from the gathered batch. Not ``budget``: every rank
            # follows the most frugal rank's plan.
            use_input, layers, fn = feature_spec
            read = "callable" if fn is not None else ["input"] * use_input + list(layers)
            check_same_on_every_rank(
                {
                    "every": every,
                    "train_every": train_every,
                    "views": views,
                    "estimator": estimator,
                    "token_dim": token_dim,
                    "features": read,
                    "seed": seed,
                    "tokenizer": tokenizer,
                    "control": control,
                    "semi_oracle": semi_oracle,
                    "train_iters": train_iters,
                    "window": window,
                    "oracle_draws": oracle_draws,
                    # (else rank 0, which writes the records, followed the other ranks' pacing)
                    "exact_epsilon": exact_epsilon,
                    # (each rank's epsilon and MI bound from its own: rank 1's history and
                    # summary read other figures than the JSONL rank 0 writes)
                    "delta": delta,
                    "poisson_sampling": poisson_sampling,
                }
            )
        self.engine, self.module, self.optimizer = engine, module, optimizer
        self.delta = float(delta)
        self.every = every
        self.train_every = train_every
        self.views = views
        self.estimator = estimator
        self.token_dim = token_dim
        self.seed = seed
        self.oracle_draws = oracle_draws
        params = optimizer.params
        # The sketch, the rank-one inputs and ghost mode's capture index these parameters: a
        # later change of the set (a layer frozen or unfrozen, add_param_group) is refused.
        self._param_ids = tuple(map(id, params))
        self.device = params[0].device if params else torch.device("cpu")
        # Off the CPU each host read of a device value waits for the device (a sync): there a
        # monitored step reads once, all of its record's figures together (see _finish_step).
        self._sync_free = self.device.type != "cpu"
        self.overlap = resolve_overlap(
            overlap,
            device=self.device,
            distributed=self.distributed,
        )
        # The overhead budget plans whatever has no fixed schedule (see opacus_mi.budget).
        budgeted_critics = train_every is None and estimator is not None
        self.budget: OverheadBudget | None = None
        if every is None or budgeted_critics or semi_oracle and train_every is None:
            # Measured on a fixed schedule, the measurement is outside the budget: the critics
            # get all of it (a measurement share would sit in debt to the fixed schedule).
            share = 0.5 if every is None else 0.0
            self.budget = OverheadBudget(budget, measure_share=share, device=self.device)
        self.epsilon = EpsilonTracker(engine.accountant, self.delta)
        self.exact_epsilon = exact_epsilon
        # An expensive accountant (PRV) recomputes epsilon as the budget affords it: under the
        # overhead budget from its epsilon share, on a fixed schedule by the wall-time pacer.
        self._slow_epsilon = not exact_epsilon and not self.epsilon.cheap
        self._epsilon_pacer: EpsilonPacer | None = None
        # The largest EpsilonTracker.work figured: a lower bound on the next recomputation's
        # (work grows with the history; after a rollback it only makes pacing wait longer).
        self._epsilon_work = 1.0
        self._noise_std: float | None = None  # the latest private view's (release_noise_std)
        if every is not None and self._slow_epsilon:
            self._epsilon_pacer = EpsilonPacer(budget * EPSILON_SHARE)
        self._measure_at = 0  # budget mode: the step index of the next measured step
        # The latest plan as (measured step, next measured step), made by _finish_step (on the
        # overlap worker, if any) and adopted by the training thread between two steps.
        self._planned: tuple[int, int] | None = None
        self._adopted = -1  # the measured step whose plan _measure_at follows
        self._last_measured = -1  # the latest measured step (training thread)
        self._next_in = 1  # the latest plan's interval: the guess while a plan is being made
        self._plan_costed = True  # whether it was planned from a known measurement cost
        # The latest exact epsilon a record carried, and its step (a paced epsilon's records
        # repeat them until the next recomputation).
        self._epsilon: tuple[float, int | None] = (0.0, None)
        self._epsilon_history: tuple = ()  # the accountant's history that value is exact for
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # Kronecker sketch for Linear/Conv2d/Embedding weights in every mode: ghost clipping
        # tokenises from activations and backprops, and the tokens are the same in both modes.
        self.tokenizer = KroneckerTokenizer.for_params(
            module, params, token_dim, seed=seed, device=self.device
        )

        def critic() -> OnlineEstimator:  # the learned critic of one view (or its control)
            return OnlineEstimator(
                estimator,
                window=window,
                train_every=train_every or 8,
                train_iters=train_iters,
                generator=self.generator,
                device=self.device,
                token_encoder=tokenizer,
                layer_dims=self.tokenizer.dims,
            )

        learned = views if estimator is not None else ()
        self.estimators: dict[str, OnlineEstimator] = {view: critic() for view in learned}
        self.controls: dict[str, OnlineEstimator] = (
            {view: critic() for view in learned} if control else {}
        )
        self.tokenizer_kind = tokenizer
        self.semi_oracle: SemiOracleEstimator | None = None
        self._new_semi_oracle = functools.partial(
            SemiOracleEstimator,
            window=window,
            train_every=train_every or 8,
            train_iters=train_iters,
            generator=self.generator,
            device=self.device,
        )
        if semi_oracle:  # with the private view (_check_combination)
            self.semi_oracle = self._new_semi_oracle()
        # The semi-oracle's tokens: the principal subspace of recent clipped gradients, which
        # keeps ~90% of their energy where a sketch keeps ~k/P (see opacus_mi/subspace.py).
        # It needs materialised per-sample gradients on one process; otherwise: sketch tokens.
        self.subspace: GradientSubspace | None = None
        if self.semi_oracle is not None:
            if _is_ghost(module, optimizer):
                self._warn_once(
                    "subspace:ghost",
                    "with ghost clipping the semi-oracle uses sketch tokens (no per-sample "
                    "gradients to fit a gradient subspace to), which keep far less of them",
                    shared=True,
                )
            elif self.distributed:
                self._warn_once(
                    "subspace:ddp",
                    "under DPDDP the semi-oracle uses sketch tokens (each rank would fit its own "
                    "gradient subspace)",
                    shared=True,
                )
            else:
                self._new_subspace = functools.partial(
                    GradientSubspace, sum(p.numel() for p in params), token_dim, device=self.device
                )
                try:
                    self.subspace = self._new_subspace()
                except ValueError as exc:
                    self._warn_once(
                        "subspace:size", f"semi-oracle uses sketch tokens: {exc}", shared=True
                    )
        self.mi_accountant = MIAccountant(
            engine.accountant, poisson_sampling=self._sampling(engine, module, poisson_sampling)
        )
        self._history: list[LeakageRecord] = []
        self._trimmed = 0  # records max_history let go of (see _record_count)
        # The step a loaded state ended at (load_state_dict), until the first step after it
        # has been checked against the accountant and the features.
        self._resumed_at: int | None = None
        self._resumed_accountant = 0  # the accountant's count when the state loaded was saved
        self._accountant_at_load = 0  # and when it was loaded
        self._unchecked_resume = self._features_unchecked = False
        self._rank_widths: dict[int, int] = {}  # each rank's feature width at its last step
        self._done: deque[LeakageRecord] = deque()  # records made, not yet delivered
        # Warnings not said where they arose: the worker's, and the training thread's own
        # inside a step (see _deferring); said by the next delivery outside one.
        self._worker_warnings: deque[str] = deque()
        # From the step's captures taken to the optimizer's update: a warning a user's error
        # filter turned into an exception after Opacus's pre_step stopped the update of a
        # step the accountant had counted (a failing sink's, with overlap off: the default on
        # a busy CPU); before it, it lost the step's captures to its retry.
        self._deferring = False
        self._detach_at_step_end = False
        self.sinks: list[Callable[[LeakageRecord], Any]] = list(sinks)
        # Logical steps, numbered as the accountant counts them: a monitor attached to an
        # engine that has trained already (a resumed checkpoint, a re-attach) names each
        # record's step so that its epsilon is get_epsilon after that step.
        self.steps = self._first_step = steps_counted(getattr(engine.accountant, "history", ()))
        # This optimizer's own logical steps, counted on from there: what ``every`` schedules
        # on. ``steps`` follows the accountant, which other models made private by the same
        # engine step too (it jumped past their steps, and ``every=2`` measured all of one
        # model's steps and half of the other's).
        self._own_step = self.steps
        self._chunks: list[Chunk] = []
        self._recorded = -1  # the step whose record _finish_safely has made (see there)
        self._gather_wait = 0.0  # DPDDP: seconds waited for other ranks since the last booking
        self._step_bound = 0.0
        self._step_bounds: dict[int, float] = {}  # step -> its clipping bound, until recorded
        use_input, layers, fn = feature_spec
        # What the critics read, for checkpoints (_settings); features=None and ("input",) are
        # the same features, and a callable is known by its kind only.
        names = ["input"] * use_input + list(layers)
        self._features_setting = (
            "callable" if fn is not None else None if names == ["input"] else names
        )
        # Features and tokens are what the learned critics read; the oracle needs neither, so
        # without critics none are made (the benchmarks set it to time tokens + oracle).
        self._tokens = bool(self.estimators) or self.semi_oracle is not None
        # The parameters' versions after the latest captured forward (its own writes, such as
        # an Embedding's max_norm, included), compared before the next: prepended, so a stale
        # capture goes before the features' hook takes the new forward's. It also decides, once
        # per forward, whether the forward is one to watch and the stamp its captures get.
        self._params = list(params)  # (the optimizer's, as built for: see ParamsChanged)
        self._forward_versions: tuple[int, ...] | None = None
        self._watching = False
        self._forward_stamp: Any = None
        self._ghost_zero_grad: tuple[int, int] | None = None  # (see _settle_ghost_zero_grad)
        # Ghost clipping: this step's backward was one plain pass (see _unclipped_release).
        self._unclipped_now = False
        self._watch: list = []
        self._capture: FeatureCapture | None = None
        # Hooks/functorch: inputs of the 2-D Linear layers Opacus hooks (none in ew mode), whose
        # rank-one token and Gram are cheap.
        self._linear_inputs: LinearInputs | None = None
        self._factored: FactoredCapture | None = None  # ghost clipping: layer factors
        self._jsonl: JsonlSink | None = None
        self._worker: Worker | None = None
        # Hooks first, then what is opened or replaced: a refusal on the way (a features layer
        # or ghost-mode parameters not found, a JSONL path that cannot be opened) leaves no
        # hook of a half-made monitor on the model, whose next forward it broke.
        try:
            self._capture = FeatureCapture(
                module,
                layers=layers,
                fn=fn,
                use_input=use_input,
                batch_first=getattr(module, "batch_first", True),
                active=lambda: self._tokens and self._due(),
                check_labels=lambda: not self._sync_free,  # a host read: a sync off the CPU
                stamp=lambda: self._forward_stamp,
                warn=self._warn_once,
            )
            self._watch = [
                module.register_forward_pre_hook(GuestHook(self._on_forward), prepend=True),
                module.register_forward_hook(GuestHook(self._after_forward)),
            ]
            # A float64 model's Gram in float64: its squared norms past ~3e38 (norms Opacus
            # clips as usual) are inf in float32, which dropped those examples as non-finite
            # (hooks) or made the Gram infinite (ghost clipping).
            self._float64 = any(p.dtype == torch.float64 for p in params)
            if _is_ghost(module, optimizer):
                self._factored = FactoredCapture(
                    module,
                    params,
                    self.tokenizer,
                    active=self._due,
                    exact=lambda: self._float64 or float(self.optimizer.noise_multiplier) < 0.01,
                    need_gram="private" in views,
                    need_tokens=lambda: self._tokens,
                    defer=self.overlap,  # the hooks only keep references; the worker computes
                )
            else:
                self._linear_inputs = LinearInputs(
                    module,
                    params,
                    active=self._due,
                    stamp=lambda: self._forward_stamp,
                )
            # Under DPDDP every rank holds the same records; only rank 0 writes them out. Kept
            # local (distributed=False), each rank's records are its own: in a file of its own.
            self._writes = self.rank == 0 or not self.distributed
            if jsonl and self._writes and self.rank > 0:
                path = Path(jsonl)
                jsonl = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
            if jsonl and self._writes:
                _check_appendable(jsonl)  # (before the monitor it replaces lets go)
            # Before this monitor opens its JSONL: the one it replaces may still have records
            # to write there (see _detach_replaced).
            _detach_replaced(module, optimizer)
            self._jsonl = JsonlSink(jsonl) if jsonl and self._writes else None
            self._worker = Worker() if self.overlap else None
        except BaseException:
            self._remove_hooks()
            if self._jsonl is not None:
                self._jsonl.close()
            raise
        if self._jsonl is not None:  # first: a user sink that raises Ctrl-C cannot keep it out
            self.sinks.insert(0, self._jsonl)
        if self._factored is not None:
            for key, message in _ghost_release_warnings(module):  # (the model's: every rank's)
                self._warn_once(key, message, shared=True)
        self._delivering = False  # (a sink that calls back: see _deliver)
        self._sending: LeakageRecord | None = None  # the record being delivered, and
        self._sent = 0  # the sinks that have had it (an interrupted delivery goes on there)
        self._stop_requested = False  # DPDDP: a sink detached the monitor (see detach)
        self._finaliser = None
        # The last records reach the sinks at exit (an overlap worker's thread is joined by
        # then; without one, a record an interrupt cut short): a script that never reads
        # ``history`` still gets every JSONL line.
        atexit.register(_flush_at_exit, weakref.ref(self))
        # And the JSONL gets them if the monitor is collected first (a run in a function that
        # returned, or that an interrupt ended), and the warnings it kept are said. What the
        # finaliser holds never refers back to the monitor (a user's sink might: it would
        # never be collected).
        self._finaliser = weakref.finalize(
            self, _deliver_rest, self._done, self._jsonl, self._worker_warnings
        )
        self._finaliser.atexit = False  # (at exit, the flush above: every sink)
        self._original_pre_step = optimizer.pre_step
        optimizer.pre_step = self._pre_step  # instance attribute; detach() deletes it
        # The per-sample gradients the latest pre_step read (see _zero_grad): at attach, any
        # the loop holds are a past step's (a monitor attached mid-run).
        self._consumed: weakref.ref | None = None
        self._mark_read()
        self._original_zero_grad = optimizer.zero_grad
        # (An instance's own zero_grad, another tool's wrapper, say: put back at detach.)
        self._own_zero_grad = vars(optimizer).get("zero_grad")
        optimizer.zero_grad = self._zero_grad  # (as pre_step)
        self.attached = True
        _ATTACHED.add(self)

    # ------------------------------------------------------------------ attach / detach
    @staticmethod
    def _parse_features(features) -> tuple[bool, tuple[str, ...], FeatureFn | None]:
        if features is None:
            return True, (), None
        if callable(features):
            return False, (), features
        if isinstance(features, str):
            features = (features,)
        names = tuple(features) if _iterable(features) else ()
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(
                "features must be None, a callable inputs -> (B, d), or names ('input' and/or "
                f"layer names of the model); got {features!r}"
            )
        # A name given twice is the layer's output once, as repeated views are one view (each
        # name's own hook doubled the feature and warned that the layer ran twice a forward).
        names = tuple(dict.fromkeys(names))
        return "input" in names, tuple(n for n in names if n != "input"), None

    def _sampling(self, engine, module, poisson_sampling: bool | None) -> bool:
        """Whether the MI accountant may count Poisson sampling (see ``poisson_sampling``)."""
        if poisson_sampling is None:
            # A module without the flag (grad_sample_mode="ew") says nothing: the once-per-
            # epoch bound then, which is never below Poisson's, so it holds either way.
            poisson_sampling = not getattr(module, "grad_accumulation_allowed", True)
        try:
            size = len(getattr(engine, "dataset", None) or ())
        except TypeError:  # (an iterable dataset: its size is unknown)
            size = 0
        if self.distributed and not poisson_sampling and size % world_size():
            # DistributedSampler (drop_last=False, its default) pads the data to a multiple of
            # the ranks: the padded examples are in two batches an epoch (or twice in one).
            self._warn_once(
                "ddp:padding",
                f"{size} examples over {world_size()} ranks: if the data loader's "
                "DistributedSampler keeps drop_last=False (its default), it repeats some of "
                "them each epoch, which neither Opacus's epsilon nor the MI bound (one release "
                "per epoch) allows for; pass DistributedSampler(..., drop_last=True)",
                shared=True,
            )
        return poisson_sampling

    def __deepcopy__(self, memo: dict):
        # A copy would reach the DPOptimizer, whose copy (torch's Optimizer.__setstate__)
        # re-patches DPOptimizer.step for the whole class and breaks the live training.
        raise TypeError(_NOT_COPIED)

    def __copy__(self):
        # A shallow copy shares the hooks, the worker and the JSONL: its detach() shut the
        # worker, and the next optimizer.step() of the user's training raised.
        raise TypeError(_NOT_COPIED)

    def __reduce_ex__(self, protocol: Any):
        raise TypeError(_NOT_COPIED)  # (pickle failed on a hook's local lambda)

    def detach(self) -> None:
        """Remove every hook and wrapper: the optimizer and module are exactly as before.
        Records still being made (overlap) are finished and delivered first.

        Under DPDDP, called by a sink (rank 0's: the only rank calling them) it takes effect at
        the next monitored step, on every rank together: that step's gather carries the
        request, and the step gets no record (every rank's history ends with the record the
        sink was given, as on one process). Called directly, it must be called on every rank
        at the same step (after training, say): a rank that lets go alone leaves the others
        waiting at their next gather until the process group's timeout. To stop monitoring
        from one rank while training goes on, call :meth:`request_stop` there."""
        if not self.attached:
            return
        if self.distributed and self._delivering:
            # This rank alone letting go would leave the others waiting in the next gather.
            self._stop_requested = True
            return
        if getattr(self, "_deferring", False):
            # Inside a step (a user's step hook, a sink, request_stop from either): the step
            # is finished, its record made, and the monitor lets go at its end. At once, the
            # step went on with the worker closed and the JSONL shut (with overlap it raised
            # after the accountant had counted the step: the update was skipped).
            self._detach_at_step_end = True
            return
        self._detach()

    def _detach(self) -> None:
        try:
            self.flush()  # (its last warnings may raise, under an error filter: detached still)
            self._say_missed()
        finally:
            if self._worker is not None:
                self._worker.close()
            self._unhook()
            if self._jsonl is not None and not self._delivering and not self._done:
                # (A sink detaching: once the record it got is delivered. Records an interrupt
                # left undelivered keep it open: the exit flush or the finaliser writes them.)
                self._jsonl.close()

    def _say_missed(self) -> None:
        """How many records each failing sink missed: after its first failure's warning (said
        once a run), a full disk's later losses were silent."""
        missed, self._missed = self._missed, {}
        if self.distributed and self.rank != 0:  # (rank 0 alone calls the sinks)
            return
        for name, count, first in missed.values():
            say(
                f"{self._speaker(True)}: {count} record{'s' if count != 1 else ''} did not reach "
                f"{name} (its first error: {first!r}); they are in history (as max_history "
                "keeps it)"
            )

    def request_stop(self) -> None:
        """Detach every rank's monitor at the next monitored step (DPDDP: the request travels
        with that step's gather, as a sink's :meth:`detach` does); on one process, now.
        Callable from one rank alone, such as ``if rank == 0:`` code."""
        if not self.attached:
            return
        if self.distributed:
            self._stop_requested = True
        else:
            self.detach()

    def _unhook(self) -> None:
        # The accountant's history as the monitor leaves it: a detached summary() speaks of
        # the run it saw (the accountant may go on, or be rolled back, without it).
        self._seen_history = self.epsilon.history()
        if vars(self.optimizer).get("pre_step") == self._pre_step:
            del self.optimizer.pre_step
        if vars(self.optimizer).get("zero_grad") == self._zero_grad:
            if self._own_zero_grad is None:
                del self.optimizer.zero_grad
            else:
                self.optimizer.zero_grad = self._own_zero_grad
        self._remove_hooks()
        if self._finaliser is not None and not (
            self._worker_warnings or self._done or getattr(self, "_deferring", False)
        ):
            # Delivered, or (a forked child) the parent's to deliver. Warnings still queued, or
            # yet to come (a sink detached the monitor inside a step), are said by a later
            # flush, at exit, or when it is collected.
            self._finaliser.detach()
        self.attached = False
        _ATTACHED.discard(self)

    def _remove_hooks(self) -> None:
        for handle in self._watch:
            handle.remove()
        for capture in (self._capture, self._factored, self._linear_inputs):
            if capture is not None:
                capture.remove()

    def _stand_aside(self) -> None:
        """In a forked child (``os.fork``, a multiprocessing "fork" process) the copy lets go of
        the model: its worker thread did not survive the fork (waiting on it hung), and its
        records, sinks and JSONL are the parent's (a child wrote the parent's pending record a
        second time). The child trains on, unmonitored; the parent's monitor is unchanged."""
        self._worker = None
        self._done.clear()
        self._worker_warnings.clear()
        self._chunks = []
        self.sinks = []
        self._jsonl = None  # (the parent's file: neither written nor closed here)
        self._unhook()

    def wrap_criterion(
        self, criterion: Callable[..., torch.Tensor], *, num_classes: int | None = None
    ) -> Callable[..., torch.Tensor]:
        """Return ``criterion`` that also shows the monitor each chunk's labels (one line)::

            criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())

        Labels become one-hot features; a label the loss ignores (its ``ignore_index``) is an
        all-zero row. The number of classes is ``num_classes``, else the last dimension of the
        loss's first argument (or of its ``.logits``, a model output object's): a loss called
        with neither would take it from each batch's largest label, and a batch without the
        top class would change the features' width, which the critics cannot follow.
        """
        if isinstance(criterion, type) or not callable(criterion):
            # (Accepted, these failed at the first loss, in a message naming neither.)
            got = (
                f"the class {criterion.__name__}"
                if isinstance(criterion, type)
                else (f"{type(criterion).__name__} {criterion!r}")
            )
            raise TypeError(
                f"wrap_criterion's criterion is {got}, not a loss: pass a callable "
                "(logits, labels) -> loss, e.g. monitor.wrap_criterion(nn.CrossEntropyLoss())"
            )
        num_classes = python_number(num_classes)
        if num_classes is not None and not is_int_at_least(num_classes, 2):
            raise ValueError(
                f"wrap_criterion's num_classes={num_classes!r}: give the classifier's number of "
                "classes (an int >= 2), or leave it None to read it from the loss's first "
                "argument, the logits"
            )

        def plain_loss(what: str) -> ValueError:
            return ValueError(
                f"wrap_criterion got {what} under ghost clipping: its backward is one pass, "
                "and Opacus then releases the gradient unclipped (not differentially private). "
                "Wrap the criterion make_private returned, which runs Opacus's two passes: "
                f"{_GHOST_LOSS}; criterion = monitor.wrap_criterion(criterion)"
            )

        if self._factored is not None and _plain_loss_under_ghost(criterion):
            raise plain_loss(f"{type(criterion).__name__}, a plain loss,")
        # (ghost: Opacus's wrapper's loss; a monitor's wrapper: the loss it wraps)
        inner = getattr(criterion, "criterion", criterion)
        # (a monitor's wrapper wrapped again: its classes, if given, unless these are)
        num_classes = num_classes or getattr(criterion, "num_classes", None)
        ignore_index = getattr(inner, "ignore_index", None)
        ignore_index = ignore_index if isinstance(ignore_index, int) else None

        said = []

        def wrapped(*args, **kwargs):
            taking = _TAKING_LABELS.get()
            if taking is self:  # (wrapped twice: the outer wrapper has recorded them)
                return criterion(*args, **kwargs)
            if not self.attached:
                # (A notebook's next monitor, the criterion kept from the cell before: its
                # critics would learn without the labels, and nothing said so. A test loss
                # after training, with no monitor on the model, is fine as it is; so is this
                # wrapper inside the attached monitor's, which has recorded them.)
                if (
                    taking is None
                    and not said
                    and any(m.module is self.module for m in list(_ATTACHED))
                ):
                    said.append(True)
                    warnings.warn(
                        "opacus-mi: this criterion was wrapped by a monitor that is detached, "
                        "so it passes labels to no monitor; wrap the loss again with the monitor "
                        "now attached: criterion = monitor.wrap_criterion(loss)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                return criterion(*args, **kwargs)
            # Called as the loss is: positionally, or as torch's losses name them.
            output = args[0] if args else kwargs.get("input")
            target = args[1] if len(args) > 1 else kwargs.get("target")
            token = None
            if isinstance(target, torch.Tensor):
                classes = num_classes or _classes_of(output)
                self._capture.record_labels(target, classes, ignore_index, output)
                token = _TAKING_LABELS.set(self)  # (recorded: a wrapper inside need not)
            try:
                loss = criterion(*args, **kwargs)
            finally:
                if token is not None:
                    _TAKING_LABELS.reset(token)
            if self._factored is not None and _plain_pass(loss):
                raise plain_loss(f"a callable returning a plain {type(loss).__name__}")
            return loss

        wrapped.criterion = inner  # (a wrapper of this wrapper reads its ignore_index there)
        wrapped.num_classes = num_classes  # (and its classes here)
        return wrapped

    # ------------------------------------------------------------------ the hot path
    def _on_forward(self, module: torch.nn.Module, _args: tuple) -> None:
        """Drop the captures of earlier forwards when the parameters changed since them with no
        step of this optimizer: another optimizer trains the model now (``make_private`` run
        again on it, with no monitor of its own), and without this the captures of every batch
        it saw piled up here, never to be taken. (And settles a ghost zero_grad: see
        ``_settle_ghost_zero_grad``.)"""
        if self._ghost_zero_grad is not None:
            self._settle_ghost_zero_grad()
        if self._factored is not None:
            self._factored.begin_forward()  # (see FactoredCapture.begin_forward)
        self._watching = self._capture.training_forward() and self._due()
        if not self._watching:
            return
        self._forward_stamp = self._stamp()
        if self._forward_versions is not None and self._param_versions() != self._forward_versions:
            self._discard_captures()
            self._warn_once(
                "forward:stale",
                "the model's parameters changed between two training forwards with no step of "
                "this monitor's optimizer (another optimizer trains the model: make_private "
                "called again?); the earlier forwards' captures are dropped. Call "
                "monitor.detach() when its optimizer is done, or attach a monitor to the new one",
            )

    def _after_forward(self, module: torch.nn.Module, _args: tuple, _output) -> None:
        if self._factored is not None:
            self._factored.returned()
        if self._watching:
            self._forward_versions = self._param_versions()

    def _zero_grad(self, *args, **kwargs):
        """Opacus's ``zero_grad``, after dropping the captures of a step skipped after its
        backward (``zero_grad(); continue`` on a non-finite loss, say): Opacus drops that
        backward's per-sample gradients, and its captures were paired with the next step's.
        Per-sample gradients the latest pre_step read are a past step's (the loop may call
        ``zero_grad`` between its forward and backward): those leave the captures alone, as
        does ghost clipping's own ``zero_grad`` between its two backward passes."""
        fc = self._factored
        if fc is not None:
            self._settle_ghost_zero_grad()  # (one with no second pass since was the user's)
            if fc.reweighted:  # a whole DP backward no step read: it goes, and its forwards
                first = fc.firsts
                self._capture.keep(lambda stamp: stamp >= first)
                fc.discard_passes()
                fc.reweighted = False
                self._forward_versions = None
            elif fc.opened:
                # A first pass with no second yet: ghost clipping's own zero_grad between its
                # passes, or the user's after a plain backward (an adversarial example's input
                # gradient): told apart by whether a second pass follows.
                fc.zeroed = True
                self._ghost_zero_grad = (fc.firsts, fc.passes)
        else:
            latest = _per_sample_marker(self._params)
            if latest is not None and (self._consumed is None or self._consumed() is not latest):
                # Forwards made after that backward are the next step's (a loop may zero the
                # gradients between its forward and backward): only the ones before it go.
                def after(stamp) -> bool:
                    return stamp is not None and stamp() is latest

                self._capture.keep(after)
                if self._linear_inputs is not None:
                    self._linear_inputs.keep(after)
                self._forward_versions = None
        return self._original_zero_grad(*args, **kwargs)

    def _stamp(self) -> Any:
        """What a captured forward is stamped with: the backward passes before it (ghost:
        first passes begun; hooks: a reference to the newest per-sample gradients)."""
        if self._factored is not None:
            return self._factored.firsts
        latest = _per_sample_marker(self._params)
        return None if latest is None else weakref.ref(latest)

    def _mark_read(self) -> None:
        """Note the per-sample gradients the loop holds now as read (see ``_zero_grad``)."""
        latest = _per_sample_marker(self._params)
        self._consumed = weakref.ref(latest) if latest is not None else None

    def _param_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._params)

    def _settle_ghost_zero_grad(self) -> None:
        """Act on the latest ambiguous ghost ``zero_grad`` (see ``_zero_grad``), at the next
        forward, step or ``zero_grad``. Followed by a second pass, it was Opacus's: forwards
        before the previous first pass go (micro-batches: Opacus steps with the last).
        Otherwise it was the user's, and the pass then open went: the forwards before it go,
        and its results unless a later pass has begun (which supersedes them)."""
        mark, self._ghost_zero_grad = self._ghost_zero_grad, None
        if mark is None:
            return
        first, passes = mark  # the first pass open at that zero_grad, the second passes then
        fc = self._factored
        if fc.passes > passes:
            self._capture.keep(lambda stamp: stamp >= first - 1)
        else:
            self._capture.keep(lambda stamp: stamp >= first)
            if fc.firsts == first:
                fc.discard_passes()
                fc.opened = False

    def _unclipped_release(self) -> None:
        """Ghost clipping, a step after a first backward pass with no second: a plain
        ``loss.backward()``, not the loss ``make_private`` returned. Opacus's optimizer takes
        the gradient as clipped and releases it as it is: said, and its chunks flagged (as
        ``_Taken.unclipped`` carries it to :meth:`_measure_safely`)."""
        self._warn_once(
            "ghost:unclipped",
            f"step {self.steps}'s backward was one plain pass under ghost clipping, not the "
            "criterion make_private returned (which runs Opacus's two passes): Opacus released "
            "that gradient unclipped, so the step is not differentially private, and the "
            "private view's figures, made as if it were clipped, understate what it revealed "
            "(flag 'unclipped_release'). Compute the loss with the criterion make_private "
            f"returned: {_GHOST_LOSS}",
        )

    def _discard_captures(self) -> None:
        """Forget what the hooks kept since the last step: forwards no step will read."""
        self._capture.take()
        if self._linear_inputs is not None:
            self._linear_inputs.take()
        if self._factored is not None:
            self._factored.discard()

    def _due(self) -> bool:
        if not self.attached:
            return False
        if self.every is not None:
            return self._own_step % self.every == 0
        return self.steps >= self._measure_at

    def _pre_step(self, closure=None):
        # The wrapper's own time, less what brackets book, is monitor time too (book_overhead).
        budget, t0 = self.budget, time.perf_counter()
        booked = budget.host_booked() if budget is not None else 0.0
        if self._unchecked_resume:  # (before Opacus's step: an error filter spends nothing)
            self._check_resumed_accountant()
        if self._done or self._worker_warnings:
            self._deliver()  # records an overlap worker finished since the last step (and
            # warnings: before Opacus's step, one an error filter raises spends nothing)
            if not self.attached:  # a sink detached the monitor: the step is Opacus's alone
                self._chunks = []
                return self._original_pre_step(closure)
        monitored = self._due()
        if monitored and self._worker is not None:
            # At most one chunk in flight (its per-sample gradients live until it is read):
            # every earlier record is made, and delivered, before this step's captures are
            # taken, so that a sink's error (or its warning under an error filter) refuses
            # the step whole: retried, it finds its captures (taken, they were lost to it).
            waited = self._worker.wait()
            if self.budget is not None:
                self.budget.exclude(waited)
            self._deliver()
            if not self.attached:  # (as above: a sink detached it)
                self._chunks = []
                return self._original_pre_step(closure)
        self._deferring = True
        try:
            return self._step(closure, monitored, t0, booked)
        finally:
            if self._detach_at_step_end:  # (asked inside the step: see detach)
                self._detach_at_step_end = False
                self._detach()  # (still deferring: what it has to say waits, see _unhook)
            self._deferring = False

    def _step(self, closure: Any, monitored: bool, t0: float, booked: float) -> Any:
        """:meth:`_pre_step` from the moment it takes the step's captures: its warnings wait
        for the next delivery outside it (see ``_deferring``)."""
        if self._ghost_zero_grad is not None:
            self._settle_ghost_zero_grad()
        captures = self._capture.take()
        self._forward_versions = None  # (the next forward is this optimizer's next step's)
        if self._factored is not None:
            self._unclipped_now = self._factored.opened and not self._factored.reweighted
            if self._unclipped_now:
                self._unclipped_release()
            self._factored.new_step()
        self._mark_read()
        if monitored:
            # This step's clipping bound for its record, read before pre_step (where adaptive
            # clipping moves it) and on this thread (a scheduler moves it after the step).
            self._step_bound = float(self.optimizer.max_grad_norm)
            if self._worker is None:
                with without_autocast():  # (the user's, thread-local: a worker never has it)
                    self._chunks.append(self._measure_safely(captures))
            else:  # handed over below, with the record if it is the last
                self._chunks.append(self._take(captures))
        t1 = time.perf_counter()
        try:
            result = self._original_pre_step(closure)
        except BaseException:
            # The step did not happen (an error, or Ctrl-C caught by a notebook that trains
            # on): its chunks must not join the next step's record.
            self._chunks = []
            raise
        t2 = time.perf_counter()
        return self._step_tail(result, monitored, t0, t1, t2, booked)

    def _step_tail(
        self, result: Any, monitored: bool, t0: float, t1: float, t2: float, booked: float
    ) -> Any:
        """The rest of :meth:`_pre_step`, after Opacus's (the accountant has counted the step;
        the optimizer updates the parameters once it returns): the record, the next plan."""
        budget = self.budget
        if getattr(self.optimizer, "_is_last_step_skipped", False):
            # A BatchMemoryManager chunk: the logical step is not over yet; measure it now.
            if monitored and self._worker is not None:
                self._chunks[-1] = self._worker.submit(self._measure_safely, self._chunks[-1])
            self._book_wrapper(t1 - t0, t2, booked)
            return result
        if monitored:
            # The accountant has just stepped (its hook runs inside pre_step): this step's
            # history, copied here, is what the record's epsilon and MI bound are computed from.
            accounting = self.epsilon.history()
            self._follow_accountant(accounting)
            self._last_measured = self.steps
            self._step_bounds[self.steps] = self._step_bound  # read by this step's record
            chunks, self._chunks = self._chunks, []
            if self._worker is None:
                try:
                    with without_autocast():
                        self._finish_safely(chunks, self.steps, accounting)
                    self._deliver()
                except BaseException:  # (Ctrl-C: the step happened, and its record is made)
                    self.steps += 1
                    self._own_step += 1
                    self._adopt_plan()
                    raise
            else:
                # Until the worker's plan is in, the last interval holds (a step measured too
                # early is charged, and the next plan repays it). But the last plan's interval
                # may have been made before any measurement's cost was known (setup's): then
                # the plan of this one, which learns it, is waited for (guessed, it measured
                # two more steps at any cost).
                if not self._plan_costed and self.every is None and self.steps > self._first_step:
                    self._measure_at = math.inf
                else:
                    self._measure_at = self.steps + self._next_in
                # One hand-over per step: the last chunk is measured, then the record made.
                self._worker.submit(self._finish_safely, chunks, self.steps, accounting)
        self.steps += 1
        self._own_step += 1
        self._adopt_plan()
        self._book_wrapper(t1 - t0, t2, booked)
        if budget is not None:
            t3 = time.perf_counter()
            budget.tick()
            # The tick's own bookkeeping (~10 us a step on a CPU) falls in the interval it
            # opens: monitor time there, like the rest of the wrapper.
            budget.book_overhead(time.perf_counter() - t3)
        return result

    def _check_resumed_accountant(self) -> None:
        """At the first step after :meth:`load_state_dict`: warn if the engine's accountant
        has not counted the steps the state was saved after (the accountant not restored with
        it): records follow the accountant's count, and the history would jump."""
        self._unchecked_resume = False
        counted = steps_counted(self.epsilon.history())
        # Ahead only if it was ahead at the load too: another model on the same engine may
        # have stepped since (the accountant, restored with the state, was not ahead then),
        # and a plain engine's accountant may be restored after the monitor's state.
        saved = self._resumed_accountant
        if counted < saved or (counted > saved and self._accountant_at_load > saved):
            self._warn_once(
                "state:accountant",
                f"the monitor state loaded was saved when the privacy engine's accountant had "
                f"counted {saved} steps, but it has counted {counted}: the "
                "records follow the "
                f"accountant, so the history jumps from step {self._resumed_at - 1} to "
                f"{counted}. Restore the accountant from the same checkpoint as the monitor "
                "(Opacus's load_checkpoint, or engine.accountant.load_state_dict) before "
                "training on",
            )

    def _follow_accountant(self, accounting: tuple) -> None:
        """Number this step as the accountant counts it, if its count jumped since attach
        (Opacus's ``load_checkpoint`` after ``make_private``, a rolled-back history, another
        model on the same engine): each record names the step whose ``get_epsilon`` it carries.
        A fixed ``every`` goes on counting this optimizer's own steps (``_own_step``)."""
        if not accounting:
            return
        shift = steps_counted(accounting) - 1 - self.steps
        if shift:
            self.steps += shift
            self._first_step += shift
            self._measure_at += shift
            self._adopted = self.steps - 1  # this step's plan is the next to follow

    def _book_wrapper(self, before: float, since: float, booked: float) -> None:
        """Book ``pre_step``'s own time (``before`` Opacus's step, and from ``since`` on) less
        the host time inside brackets meanwhile (``booked``: ``budget.host_booked()`` on
        entry)."""
        waited, self._gather_wait = self._gather_wait, 0.0  # training's time (_finish_step)
        own = before + time.perf_counter() - since - waited
        if self.budget is not None:
            self.budget.book_overhead(own - (self.budget.host_booked() - booked))
        else:  # (a fixed schedule: told to other models' budgeted monitors, see foreground)
            foreground(own)

    def _adopt_plan(self) -> None:
        """Follow the latest plan (training thread, between steps: the forward hooks and
        ``pre_step`` of one step always agree on whether it is measured)."""
        planned = self._planned
        # Only the plan of the latest measured step: with overlap an older one can arrive
        # after a later step was measured on a guess (it would pull the next measurement
        # back), and after a rollback one of a step still to come.
        if (
            planned is not None
            and self._adopted < planned[0]
            and (self._last_measured <= planned[0] <= self.steps)
        ):
            self._adopted = planned[0]
            self._measure_at = max(planned[1], self.steps)

    def _take(self, captures) -> _Taken:
        """References to what this chunk's measurement reads (on the training thread)."""
        opt = self.optimizer
        taken = _Taken(captures=captures, unclipped=self._unclipped_now)
        if self._tokens and self._capture.fn is not None:
            # The learned critics' features: a callable's read the model's weights now. (Out
            # of the user's autocast, as inline and on a worker, which never has it.)
            with without_autocast():
                self._capture.evaluate(captures)
        try:
            if tuple(map(id, opt.params)) != self._param_ids:
                for capture in (self._factored, self._linear_inputs):
                    if capture is not None:  # let go of what its hooks kept for this step
                        with contextlib.suppress(Exception):
                            capture.take()
                raise ParamsChanged(
                    "the optimizer's trainable parameters changed after the monitor was created "
                    "(a layer frozen or unfrozen, or add_param_group), and its sketch and Gram "
                    "follow the ones it was built for: for records of the new set, detach() "
                    "this monitor and create a new LeakageMonitor"
                )
            taken.noise_multiplier = float(opt.noise_multiplier)
            # The bound this chunk is clipped with, read now: adaptive clipping moves it inside
            # pre_step, a user's scheduler after the step, both before an overlap worker reads.
            owner = self.module if self._factored is not None else opt  # (ghost: the module's)
            taken.max_grad_norm = float(owner.max_grad_norm)
            taken.noise_std = release_noise_std(opt)
            if isinstance(opt, DPPerLayerOptimizer):
                taken.max_grad_norms = [float(c) for c in opt.max_grad_norms]
            clipped = (  # the bound the examples were clipped to, as a whole
                math.hypot(*taken.max_grad_norms)
                if taken.max_grad_norms is not None
                else taken.max_grad_norm
            )
            noised = float(opt.max_grad_norm)  # the one Opacus scales its noise by
            if not math.isclose(clipped, noised, rel_tol=1e-5):
                taken.mismatch = (clipped, noised)
            if self._factored is not None:
                taken.factored = self._factored.take()
                norms = getattr(self.module, "_per_sample_gradient_norms", None)
                if isinstance(norms, torch.Tensor):
                    taken.ghost_norms = norms  # (Opacus assigns a new one at each backward)
            else:
                if self._linear_inputs is not None:
                    taken.linear_inputs = self._linear_inputs.take()
                taken.grad_samples = opt.grad_samples
        except Exception as exc:
            taken.error = exc
        return taken

    def _measure_safely(self, taken: _Taken | list) -> Chunk:
        """One chunk's measurement, booked to the budget; a failure is flagged, never raised.
        ``taken``: what :meth:`_take` handed over, or (inline) the captures to take it from."""
        t0 = time.perf_counter()
        span = self.budget.span() if self.budget is not None else None
        try:
            if not isinstance(taken, _Taken):
                taken = self._take(taken)
            if taken.error is not None:
                raise taken.error
            chunk = self._measure_chunk(taken)
        except Exception as exc:  # never let the monitor break training
            self._warn_once(f"chunk:{type(exc).__name__}", f"leakage measurement failed: {exc!r}")
            chunk = Chunk(batch=0, flags=[f"error:{type(exc).__name__}"])
        # (inline, ``taken`` is still the captures where taking them raised: this step's)
        if taken.unclipped if isinstance(taken, _Taken) else self._unclipped_now:
            chunk.flags.append("unclipped_release")
        if isinstance(taken, _Taken):  # read: let go of the step's tensors (see _Taken)
            taken.release()
        if span is not None:
            self.budget.charge(span, "measure", concurrent=self.overlap)
        # Its own: a step that failed after its chunks were measured (pre_step raised) left
        # their time in an accumulator, added to the next record's monitor_seconds.
        chunk.seconds = time.perf_counter() - t0
        return chunk

    def _finish_safely(self, chunks: list, step: int, accounting: tuple) -> None:
        """The logical step's record (see :meth:`_finish_step`); a failure is warned about and
        the next step measured, never raised."""
        self._recorded = -1  # (a state loaded since may replay this step: not an old record's)
        try:
            chunks = [
                c.result()
                if isinstance(c, Future)
                else self._measure_safely(c)
                if isinstance(c, _Taken)
                else c
                for c in chunks
            ]
            self._finish_step(chunks, step, accounting)
        except GatherError:  # (DPDDP: the step will not complete on any rank; no record)
            raise
        except Exception as exc:
            self._warn_once(f"step:{type(exc).__name__}", f"leakage record failed: {exc!r}")
            if not (self.distributed and self._planned is not None and self._planned[0] == step):
                # (Under DPDDP, once the ranks' plan for this step is in, it holds: a rank of
                # its own measuring the next step would meet the others' gradient all-reduce
                # with its gather, and training would hang.)
                self._next_in, self._planned = 1, (step, step + 1)
            if self._recorded != step:  # (a failure after its record was made: kept)
                try:  # the step still gets its record: settings, epsilon and bounds, flagged
                    self._done.append(self._failed_record(chunks, step, accounting, exc))
                except Exception:  # (already warned about: nothing more to say)
                    pass
        except BaseException as exc:
            # Ctrl-C while the record is made (inline: the accountant has counted the step):
            # the step keeps its record, flagged error:KeyboardInterrupt; the interrupt goes on.
            # (Once its record is made, in the budget's last charge, it keeps that one: a
            # second, failed record of the same step followed it.)
            if self._recorded != step:
                with contextlib.suppress(Exception):
                    self._done.append(self._failed_record(chunks, step, accounting, exc))
            raise
        finally:
            self._step_bounds.pop(step, None)

    def _step_settings(self, step: int, accounting: tuple) -> tuple[float, float]:
        """The noise multiplier and clipping bound step ``step`` used: the accountant's entry
        for it and the bound read at its pre_step. The optimizer's own may have moved since
        (a scheduler, adaptive clipping), by the time an overlap worker gets here."""
        sigma = float(accounting[-1][0]) if accounting else float(self.optimizer.noise_multiplier)
        bound = self._step_bounds.get(step)  # (let go of in _finish_safely)
        return sigma, float(self.optimizer.max_grad_norm) if bound is None else bound

    def _check_contribution(
        self, record: LeakageRecord, largest: float | None, bound: float, slack: float
    ) -> None:
        """Flag a step whose release let an example contribute more than the clipping bound,
        which Opacus's epsilon and the MI bounds take as the most any example can change the
        sum. More than ``slack`` above, which rounding stays below: 1% in single precision (a
        float32 Gram's rounding is near 1e-6), 4 ulps of one in half precision (3.1% in
        bfloat16, whose rounded norms and factors let Opacus release up to 1.012 C). A step
        already flagged ``noise_clip_mismatch`` says why it exceeds, and is not flagged twice."""
        if (
            largest is None
            or not largest > bound * (1 + slack)
            or "noise_clip_mismatch" in record.flags
        ):
            return
        record.flags.append("exceeds_clip")
        self._warn_once(
            "exceeds_clip",
            f"at step {record.step} an example's clipped gradient, as released, has norm "
            f"{largest / bound:.4g} x the clipping bound {bound:g} (flag 'exceeds_clip'): "
            "Opacus's epsilon and the MI upper bound assume at most 1 x, so neither holds for "
            "such steps. Under ghost clipping this is a layer whose per-sample norm Opacus's "
            "norm sampler gets wrong (a conv with a padding_mode other than 'zeros', an "
            "EmbeddingBag with an id repeated in a bag, a weight also used by a module Opacus "
            "has no sampler for); train it with grad_sample_mode='hooks'. With a grad-clip "
            "scheduler, see 'noise_clip_mismatch'",
            shared=True,
        )

    def _settings_record(
        self, step: int, batch: int, chunks: int, accounting: tuple, sigma: float, bound: float
    ) -> LeakageRecord:
        """A step's record before its figures: settings and bounds (epsilon set by the caller)."""
        return LeakageRecord(
            step=step,
            batch_size=batch,
            noise_multiplier=sigma,
            max_grad_norm=bound,
            sample_rate=sample_rate_of(None, accounting),
            epsilon=math.nan,
            delta=self.delta,
            mi_bound=gaussian_channel_bound(sigma) if "private" in self.views else None,
            mi_upper_bound=self.mi_accountant.bound(accounting),
            chunks=chunks,
        )

    def _failed_record(
        self, chunks: list, step: int, accounting: tuple, exc: BaseException
    ) -> LeakageRecord:
        """What is known of a step whose measurement failed, flagged ``error:<type>``: no MI,
        but its settings, epsilon and bounds (and a batch size from the chunks measured)."""
        sigma, bound = self._step_settings(step, accounting)
        epsilon = self._epsilon_or_nan(accounting, sigma)
        measured = [c for c in chunks if isinstance(c, Chunk)]
        record = self._settings_record(
            step, sum(c.batch for c in measured), len(chunks), accounting, sigma, bound
        )
        record.epsilon, record.epsilon_step = epsilon, step
        record.flags = sorted({f for c in measured for f in c.flags})
        record.flags.append(f"error:{type(exc).__name__}")
        if math.isnan(epsilon):
            record.flags.append("epsilon_failed")
        if accounting and self.epsilon.used_rdp(accounting):
            record.flags.append("epsilon_rdp")
        return record

    def _deliver(self) -> None:
        """Hand finished records to ``history`` and the sinks, on the training thread, then the
        warnings kept for it (the worker's, a step's) to the user's filters. A sink that calls
        back (reads ``history``, detaches the monitor) finds the delivery under way: this loop
        goes on with every record, in order, and a detach closes the JSONL after it.

        A record leaves the queue only once every sink has had it, so an interrupt (Ctrl-C, the
        CLI's SIGTERM) landing mid-delivery loses nothing: the next delivery, the flush at exit
        or the finaliser goes on from the sink it stopped at (the JSONL skips a record it has
        just written). Popped first, the record was lost to the JSONL."""
        if self._delivering:
            return
        try:
            self._delivering = True
            while self._done:
                record = self._done[0]
                if not (self._history and self._history[-1] is record):  # (else resumed)
                    self._history.append(record)
                    self._trim_history()
                if self._sending is not record:
                    self._sending, self._sent = record, 0
                if self._writes:  # under DPDDP every rank has this record; one writes it
                    while self._sent < len(self.sinks):
                        sink = self.sinks[self._sent]
                        try:
                            sink(record)
                        except Exception as exc:  # a full disk or a buggy callback: go on
                            # (It has had the record: a warning raised by an error filter
                            # stops this delivery, and the next must not call it again.)
                            self._sent += 1
                            missed = self._missed.setdefault(id(sink), [_sink_name(sink), 0, exc])
                            missed[1] += 1
                            self._warn_once(
                                f"sink:{type(exc).__name__}",
                                f"a record sink failed: {exc!r} ({missed[0]}; the record stays "
                                "in history, and the records it misses are counted when the "
                                "monitor detaches)",
                                shared=True,
                            )
                            continue
                        except BaseException:
                            # A sink that stops training (sys.exit, a StopTraining of its
                            # own, Ctrl-C inside it) has had the record: called again with
                            # it at every later delivery, it stopped each one, detach()'s
                            # too. The JSONL alone is retried (it writes a line once).
                            if sink is not self._jsonl:
                                self._sent += 1
                            raise
                        self._sent += 1
                if self._done and self._done[0] is record:  # (a sink that forked: cleared)
                    self._done.popleft()
            # After the records: a warning an error filter raises leaves none undelivered.
            while self._worker_warnings and not self._deferring:
                say(self._worker_warnings.popleft())
        finally:
            self._delivering = False
        if not self.attached and self._jsonl is not None:
            self._jsonl.close()  # (a sink detached the monitor meanwhile)

    def flush(self) -> None:
        """Wait for records an overlap worker is still making and deliver them, and say the
        warnings the last step kept (see ``_deferring``). Reading ``history``, ``summary()`` or
        ``state_dict()`` flushes; call it before reading the critics' state (``estimators``,
        ``controls``) directly."""
        if self._worker is not None:
            # (The plan that came with them waits for the next pre_step: adopted here, mid-step
            # (history read between backward and step), it moved the step's own decision after
            # its forward hooks had taken it.)
            self._worker.wait()
        self._deliver()

    def _plan(self, epsilon_work: float = 1.0) -> Plan:
        """This rank's plan for the work with no fixed schedule (see :mod:`opacus_mi.budget`);
        ``epsilon_work``: what recomputing an expensive epsilon now would take
        (``EpsilonTracker.work``)."""
        pacer = self._epsilon_pacer
        if self.budget is None:
            epsilon = pacer is None or pacer.due(epsilon_work)
            return Plan(next_in=self.every or 1, train=False, epsilon=epsilon)
        critics = self.train_every is None and bool(
            self.estimators or self.controls or self.semi_oracle is not None
        )
        # Until a round could change a learned figure (see OnlineEstimator.worth_training), the
        # whole budget goes to measurement: a round on a near-empty window is time for nothing.
        if self.estimators and not any(e.worth_training for e in self.estimators.values()):
            critics = False
        # A costly epsilon (PRV) has a share of the budget when the measurement is budgeted
        # (every=None); on a fixed schedule the epsilon pacer decides instead (below).
        slow_epsilon = self.every is None and self._slow_epsilon
        plan = self.budget.plan(
            critics=critics, slow_epsilon=slow_epsilon, epsilon_work=epsilon_work
        )
        if pacer is not None:  # a fixed schedule with budgeted critics
            plan = dataclasses.replace(plan, epsilon=pacer.due(epsilon_work))
        return plan

    def _measure_chunk(self, taken: _Taken) -> Chunk:
        captures = taken.captures
        factored = grad_samples = None
        sigma = taken.noise_multiplier
        if taken.factored is not None:  # ghost clipping: tokens, norms, Gram from layer factors
            factored = taken.factored
            if isinstance(factored, FactoredRecording):  # recorded by the hooks (overlap)
                factored = factored.compute()
            batch = factored.batch
        else:
            linear_inputs = taken.linear_inputs
            grad_samples = taken.grad_samples
            if not grad_samples:
                return Chunk(batch=0, flags=["no_trainable_params"])
            batch = len(grad_samples[0])
            linear_inputs = {k: a for k, a in linear_inputs.items() if a.shape[0] == batch}
        chunk = Chunk(batch=batch)
        if taken.mismatch is not None:
            chunk.flags.append("noise_clip_mismatch")
            self._warn_once(
                "noise_clip_mismatch",
                f"Opacus clipped this step's examples to {taken.mismatch[0]:g}"
                f"{' (per-layer bounds, together)' if taken.max_grad_norms else ''} but scaled "
                f"its noise by max_grad_norm {taken.mismatch[1]:g}: a grad-clip scheduler moves "
                "only optimizer.max_grad_norm, not per-layer clipping's max_grad_norms or ghost "
                "clipping's module.max_grad_norm, so the release is not what Opacus's epsilon "
                "and the MI bound assume (the oracle measures what it is; flag "
                "'noise_clip_mismatch'). Move those bounds with the scheduler, or use flat "
                "clipping in hooks mode",
            )
        if batch == 0:
            return chunk
        feats = self._chunk_features(captures, batch, chunk) if self._tokens else None
        # sigma >= 0.01: float32 Gram and rank-one Linear layers (see views.clipped_gram); not
        # for a float64 model (see _float64).
        fast = sigma >= 0.01 and not self._float64
        gram32 = None  # raw float32 Gram (hooks mode, flat clipping, private view)
        backprops: dict[int, torch.Tensor] = {}
        if factored is not None:
            if taken.ghost_norms is not None and taken.ghost_norms.dtype in _HALF:
                chunk.slack = half_slack(taken.ghost_norms.dtype)
            if taken.ghost_norms is not None and len(taken.ghost_norms) == batch:
                # The norms Opacus clipped with, so its clip factors exactly, in its precision.
                # Its norm samplers can miss part of a gradient (a weight tied to a module it
                # has no sampler for; a layer this step skipped, whose last norm it reuses):
                # the release is clipped with these all the same.
                clip = flat_clip(taken.ghost_norms, taken.max_grad_norm)
            else:
                clip = factored.clip_info(taken.max_grad_norm)  # the bound ghost clipping used
        else:
            per_layer = taken.max_grad_norms is not None
            bound = taken.max_grad_norms if per_layer else taken.max_grad_norm
            # Half-precision gradients are sketched in float32; their clip factors are
            # Opacus's, from norms in their own precision (a float32 norm moved them ~1e-2).
            half = [g.dtype for g in grad_samples if g.dtype in _HALF]
            if half:
                chunk.slack = max(half_slack(d) for d in half)
            wide = [g.float() if g.dtype in _HALF else g for g in grad_samples]
            backprops = self._rank_one_backprops(wide, linear_inputs) if fast else {}
            if fast and not per_layer and "private" in self.views:
                gram32 = raw_gram(wide, rank_one=linear_inputs, backprops=backprops)
                # The Gram's diagonal holds the squared norms: no separate norm pass.
                clip = (
                    clip_factors(grad_samples, bound)
                    if half
                    else flat_clip(gram32.diagonal().clamp_min(0).sqrt(), bound)
                )
            else:
                clip = clip_factors(grad_samples, bound)
            grad_samples = wide
        # A norm is finite iff every entry is: one check per example, not one per parameter.
        # (A norm is >= 0 or NaN, so ``< inf`` is ``isfinite``, in one operation, not four.)
        norms = clip.norms if clip.norms.ndim == 1 else clip.norms.norm(dim=1)
        grads_ok = norms < math.inf
        keep = grads_ok if feats is None else grads_ok & (feats.abs() < math.inf).all(dim=1)
        if self._sync_free and not self.distributed and self.subspace is None:
            # Optimistic: measured as if every row were finite; the kept count is read with the
            # record's figures, and a chunk with bad rows is redone then (_drop_nonfinite).
            chunk.keep, chunk.grads_ok, kept = keep, grads_ok, batch
        else:  # a host read: free on the CPU. Under DPDDP (whose gathers read sizes anyway)
            # and with the subspace semi-oracle (which learns from the rows as they are
            # measured, before the record) it is made here, off the CPU too.
            kept = int(keep.sum())
        if kept < batch:
            self._flag_nonfinite(chunk, grads_ok, feats, kept)
            idx = keep.nonzero().squeeze(1)
            if factored is not None:
                factored = factored.select(idx)
            else:
                grad_samples = [g.index_select(0, idx.to(g.device)) for g in grad_samples]
                linear_inputs = {k: a[idx.to(a.device)] for k, a in linear_inputs.items()}
                backprops = {k: b[idx.to(b.device)] for k, b in backprops.items()}
                if gram32 is not None:
                    gram32 = gram32[idx.to(gram32.device)][:, idx.to(gram32.device)]
            clip = ClipInfo(clip.factors[idx], clip.norms[idx], clip.per_layer)
            feats = None if feats is None else feats[idx.to(feats.device)]
        if kept == 0:
            return chunk
        if not self._tokens:
            raw = None
        elif factored is not None:
            raw = factored.tokens
        else:
            raw = [
                self.tokenizer.rank_one_token(i, backprops[i], linear_inputs[i].to(g.dtype))
                if i in backprops
                else self.tokenizer.sketch_layer(i, g)
                for i, g in enumerate(grad_samples)
            ]
        # All layers' raw tokens in one tensor: the raw view, and flat clipping's one product.
        raw_all = None
        if raw is not None and ("raw" in self.views or not clip.per_layer):
            raw_all = torch.cat(raw, dim=1)
        if "raw" in self.views and raw_all is not None:
            chunk.tokens["raw"] = raw_all.float()
        if "clipped" in self.views or "private" in self.views:
            if raw is None:
                clipped = None  # nothing learns from tokens: the oracle needs only the Gram
            elif clip.per_layer:
                clipped = torch.cat(
                    [t * clip.for_layer(i).to(t.dtype)[:, None] for i, t in enumerate(raw)], dim=1
                ).float()
            else:  # one factor per example: one product over all layers' tokens
                clipped = (raw_all * clip.factors.to(raw_all.dtype)[:, None]).float()
            if clipped is not None and ("clipped" in self.views or self.semi_oracle is not None):
                chunk.tokens["clipped"] = clipped
            if self.subspace is not None and grad_samples is not None:
                flat = torch.cat(
                    [g.reshape(kept, -1) for g in clipped_grad_samples(grad_samples, clip)], dim=1
                ).float()
                semi = self.subspace.project(flat)  # fitted on earlier steps only
                if semi is not None:
                    chunk.tokens["semi"] = semi
                self.subspace.observe(flat)
            if "private" in self.views:
                std = self._noise_std = taken.noise_std
                if factored is not None:
                    gram = factored.clipped_gram(clip)
                elif gram32 is not None:
                    gram = scale_gram(gram32, clip)
                else:
                    gram = clipped_gram(
                        grad_samples,
                        clip,
                        exact=not fast,
                        rank_one=linear_inputs,
                        backprops=backprops,
                    )
                # Drawn at the record, chunk by chunk (after gathering, in rank order, under
                # DPDDP, see _gather_chunks; once the rows to keep are known, sync-free): see
                # _estimate.
                chunk.pending = (clipped, gram, std)
        chunk.features = feats
        return chunk

    def _rank_one_backprops(
        self, grad_samples: list[torch.Tensor], inputs: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """``b_i`` of each Linear layer seen on a 2-D input (``g_i = b_i a_i^T``): its bias's
        per-sample gradient where it has one (exactly ``b_i``, nothing to compute), else read
        back from the weight's ``grad_sample``. Feeds both its token and its Gram term."""
        out = {}
        bias_of = self._linear_inputs.bias_of if self._linear_inputs is not None else {}
        for layer, a in inputs.items():
            g = grad_samples[layer]
            if g.ndim != 3:
                continue
            bias = bias_of.get(layer)
            if bias is not None and grad_samples[bias].shape == g.shape[:2]:
                out[layer] = grad_samples[bias]
            else:
                out[layer] = rank_one_backprop(g, a.to(g.device, g.dtype))
        return out

    def _privatise(
        self, chunk: Chunk, clipped: torch.Tensor | None, gram: torch.Tensor, std: float
    ):
        """The chunk's random draws: private-view token noise, then the oracle's noise."""
        if clipped is not None:
            noise = torch.randn(  # float32 draws, whatever torch's default dtype
                clipped.shape,
                generator=self.generator,
                device=self.generator.device,
                dtype=torch.float32,
            )
            if noise.device != clipped.device:
                noise = noise.to(clipped.device)
            chunk.tokens["private"] = torch.add(clipped, noise, alpha=std)
        oracle = gram_oracle(
            gram, std, draws=self.oracle_draws, generator=self.generator, sync_free=self._sync_free
        )
        chunk.oracle_terms, chunk.oracle_var = oracle.terms, oracle.mc_var
        chunk.oracle_gram = (gram, std)  # for the union floor, at the record
        chunk.oracle_top = oracle.largest_sq  # (for exceeds_clip)

    def _flag_nonfinite(
        self, chunk: Chunk, grads_ok: torch.Tensor, feats: torch.Tensor | None, kept: int
    ) -> None:
        if not bool(grads_ok.all()):
            chunk.flags.append("nonfinite_grad_sample")
        if feats is not None and not bool(torch.isfinite(feats).all()):
            chunk.flags.append("nonfinite_features")
        self._warn_once(
            "nonfinite",
            f"{chunk.batch - kept} of {chunk.batch} examples had NaN/Inf per-sample gradients or "
            "features; they are excluded from MI estimation and the record is flagged",
        )

    def _drop_nonfinite(self, chunk: Chunk, kept: int) -> None:
        """Drop a sync-free chunk's non-finite rows, once the record's read has shown it has
        some (rare; the reads here are not the hot path's): what ``_measure_chunk`` does on the
        CPU before it draws. The private view and the oracle are drawn again by the caller."""
        keep, grads_ok = chunk.keep, chunk.grads_ok
        chunk.keep = chunk.grads_ok = None
        self._flag_nonfinite(chunk, grads_ok, chunk.features, kept)
        chunk.oracle_terms = chunk.oracle_var = chunk.oracle_gram = chunk.oracle_top = None
        if kept == 0:  # nothing left to measure
            chunk.tokens, chunk.features, chunk.pending = {}, None, None
            return
        idx = keep.nonzero().squeeze(1)
        chunk.tokens = {v: t[idx] for v, t in chunk.tokens.items() if v != "private"}
        if chunk.features is not None:
            chunk.features = chunk.features[idx]
        if chunk.pending is not None:
            clipped, gram, std = chunk.pending
            clipped = None if clipped is None else clipped[idx]
            chunk.pending = (clipped, gram[idx][:, idx], std)

    def _feature_width(self) -> int | None:
        """The feature width the learned critics were built for (None before any is)."""
        for est in (*self.estimators.values(), *self.controls.values()):
            if est.critic is not None:
                return est.critic.x_dim
        if self.semi_oracle is not None and self.semi_oracle.dims is not None:
            return self.semi_oracle.dims[0]
        return None

    def _chunk_features(self, captures, batch: int, chunk: Chunk) -> torch.Tensor | None:
        """Features paired with this chunk's gradients, or None (flagged) if they cannot be."""
        first = None
        try:
            feats = self._capture.features(captures, batch)
            if feats is None:
                feats = first = self._capture.first_forward(captures, batch)
        except WidthsDiffer as exc:  # (forwards of one step, each padded to its own length)
            chunk.flags.append("features_width_changed")
            self._warn_once(
                "features:width",
                f"features changed width within one step ({exc.widths[0]} -> {exc.widths[-1]} "
                "per example, across the forwards whose gradients it sums): inputs of varying "
                f"shape, e.g. micro-batches of sequences padded each to its own length? {_WIDTH}",
            )
            return None
        except Exception as exc:  # a user feature callable failed: keep the oracle going
            self._warn_once(f"features:{type(exc).__name__}", f"feature extraction failed: {exc!r}")
            chunk.flags.append("features_error")
            return None
        if first is not None:
            self._warn_once(
                "features:first_forward",
                "several training forwards of the step's examples went into its per-sample "
                "gradients (e.g. a regulariser's second forward of the batch; Opacus "
                "sums them into one row per example): the learned critics pair each row with "
                "the first forward's features (flag features_first_forward); a training "
                "forward that is not part of the step's loss belongs under torch.no_grad()",
            )
            chunk.flags.append("features_first_forward")
        elif feats is None:
            self._warn_once(
                "features:unpaired",
                "the forwards since the last step do not pair with its per-sample gradients "
                "(training forwards whose rows do not add up to the gradients', e.g. a "
                "regulariser's forward of part of the batch, or an input that is not one row "
                "per example such as nn.EmbeddingBag's flat ids, which features= a callable of "
                "the inputs or a layer name pairs in a step of one forward): the learned "
                "critics skip such steps (flag features_unpaired)",
            )
            chunk.flags.append("features_unpaired")
        return feats

    def _finish_step(self, chunks: list[Chunk], step: int, accounting: tuple) -> None:
        """The record of logical step ``step`` from its chunks (``accounting``: the accountant's
        history right after that step), and the critics' learning; plans the next measurement."""
        t0 = time.perf_counter()
        measured = sum(c.seconds for c in chunks)  # (this rank's, before any gather)
        span = self.budget.span() if self.budget is not None else None
        opt = self.optimizer
        # An expensive epsilon's cost follows the run (PRV: its domain, which only grows), so
        # the plan weighs the recomputation this step would make, not the last one. The last
        # one's work is a lower bound: only a plan that affords that needs the true figure
        # (~70 us).
        # A figure a plan declined is kept too: asking again each record was an O(history)
        # call that, with a scheduler stepped every step, never led to a recomputation.
        work = lower = self._epsilon_work
        plan = self._plan(work)
        if plan.epsilon and self._slow_epsilon:
            try:
                work = self.epsilon.work(accounting)
            except Exception:  # (sigma = 0: Opacus's own epsilon fails the same way, below)
                work = lower
            self._epsilon_work = max(lower, work)
            if work > lower:
                plan = self._plan(work)
        # Gathering comes first: nothing local may fail before this rank joins the collectives.
        # Under DPDDP every rank's plan travels with its chunks; all follow the most frugal.
        if self.distributed:
            chunks, plan, waited = self._gather_chunks(chunks, plan)
            # Waiting there for a slower rank is training's time (it would wait at Opacus's
            # all-reduce instead), not the monitor's: neither its record nor its budget.
            t0 += waited
            self._gather_wait += waited
            if span is not None:
                span.exclude(waited)
            if self._stop_requested:  # a sink detached the monitor: every rank lets go here
                self.detach()
                return
        self._next_in, self._planned = plan.next_in, (step, step + plan.next_in)
        self._plan_costed = plan.costed
        # None: the critics' own schedule (train_every); else the budget's decision.
        train = plan.train if self.train_every is None else None
        batch = sum(c.batch for c in chunks)
        sigma, bound = self._step_settings(step, accounting)
        # Epsilon is exact for this step unless the plan says the budget cannot afford an
        # expensive accountant's recomputation now: then the latest exact value and its step,
        # if this history continues the one it was exact for (after a rollback, one of a later
        # step, or of steps retaken with other noise, is of a run that no longer is).
        latest = self._epsilon[1]
        if (
            plan.epsilon
            or latest is None
            or latest > step
            or not history_continues(accounting, self._epsilon_history)
        ):
            # Booked as its own kind only where it has its own share (see _plan), and only a
            # real computation (a cached value, e.g. after summary(), would teach the budget
            # and the pacer that epsilon costs nothing).
            fresh = not self.epsilon.cached(accounting)
            slow = span is not None and self.every is None and self._slow_epsilon and fresh
            if slow:
                self._charge(span, "measure")
                span = self.budget.span()
            # CPU time of this thread: what the call itself costs, without the GIL waits of an
            # overlap worker while training runs Python (a 10x wall-time outlier at step 1 once
            # paced epsilon out of a whole run).
            t_eps = time.thread_time()
            epsilon = self._epsilon_or_nan(accounting, sigma)
            self._epsilon, self._epsilon_history = (epsilon, step), accounting
            if self._epsilon_pacer is not None and fresh:
                self._epsilon_pacer.done(time.thread_time() - t_eps, work)
            if slow:
                self._charge(span, "epsilon", work)
                span = self.budget.span()
        else:
            epsilon = self._epsilon[0]
        record = self._settings_record(step, batch, len(chunks), accounting, sigma, bound)
        record.epsilon, record.epsilon_step = epsilon, self._epsilon[1]
        # Sync-free chunks were measured as if every row were finite. If the read shows some
        # were not, their rows are dropped and the draws made again from the same state, so
        # the record is the one the CPU's immediate check gives.
        state = self.generator.get_state() if any(c.keep is not None for c in chunks) else None
        estimates = self._estimate(chunks)
        if estimates is None:
            self.generator.set_state(state)
            estimates = self._estimate(chunks)
        record.flags = sorted({f for c in chunks for f in c.flags})
        if math.isnan(epsilon):
            record.flags.append("epsilon_failed")
        if self._epsilon_history and self.epsilon.used_rdp(self._epsilon_history):
            record.flags.append("epsilon_rdp")  # (PRV's would cost minutes: see EpsilonTracker)
        if batch == 0 and not any(f.startswith("error:") for f in record.flags):
            record.flags.append("empty_batch")  # (not a failed measurement's zero rows)
        record.mi.update(estimates.mi)
        record.flags.extend(estimates.flags)
        self._check_contribution(record, estimates.contribution, bound, estimates.slack)
        learned, feats = estimates.learned, estimates.features
        if span is not None:
            self._charge(span, "measure")
            span = self.budget.span()  # a new bracket: a charged one must not be booked twice
        # The critics learn from this batch (after scoring it): the budget's "critic" work.
        # Their rounds' outcomes are read together, once (model selection and resets then).
        rounds = ReadBatch(self.device)
        watched = [  # (view, critic, is it the control, its resets so far)
            (view, est, est is not self.estimators[view], est.resets)
            for view in learned
            for est in (self.estimators[view], self.controls.get(view))
            if est is not None
        ]
        for view, tokens in learned.items():
            self.estimators[view].observe(feats, tokens, train=train, reads=rounds)
            self._control_observe(view, feats, tokens, train, rounds)
        rounds.read()
        for view, est, control, before in watched:
            if est.resets == before:
                continue
            if control:
                self._warn_once(
                    f"reset:control:{view}",
                    f"the {view}-view control critic was reset",
                    shared=True,
                )
                continue
            record.flags.append(f"critic_reset:{view}")
            self._warn_once(
                f"reset:{view}",
                f"the {view}-view critic diverged (non-finite loss) and was reset",
                shared=True,
            )
        if self.semi_oracle is not None and estimates.usable:
            # The std this step's private view was drawn with (taken at its pre_step: adaptive
            # clipping has moved C since, when an overlap worker gets here).
            std = self._noise_std if self._noise_std is not None else release_noise_std(opt)
            self._semi_oracle_step(record, estimates.usable, std, train)
        if self.subspace is not None:
            change = self.subspace.step()  # refit when due, after this step's tokens were used
            if change is not None:
                self.semi_oracle.change_basis(change)
        if span is not None:
            self._charge(span, "critic" if train else "measure")
            span = self.budget.span()
        for key, value in record.mi.items():
            if key in estimates.withheld:  # (see _Estimates.withheld)
                low, high = estimates.withheld[key]
                value = dataclasses.replace(value, ci_low=low, ci_high=high)
            margin = estimates.margins.get(key)
            if key.startswith("private/") and _exceeds(value, record.mi_bound, margin):
                record.flags.append(f"exceeds_bound:{key}")
        record.monitor_seconds = measured + (time.perf_counter() - t0)
        self._done.append(record)  # delivered to history and the sinks on the training thread
        self._recorded = step
        if span is not None:
            self._charge(span, "measure")

    def _estimate(self, chunks: list[Chunk]) -> _Estimates | None:
        """The step's private-view draws, held-out critic scores and oracle, read back in one
        transfer: off the CPU each read is a host sync. None if that read shows a sync-free
        chunk had non-finite rows: they are dropped, and the caller estimates again."""
        if not self.distributed:
            drawn = [c for c in chunks if c.pending is not None]
            std = _released_std([(0, c.pending[2]) for c in drawn])
            for c in drawn:
                clipped, gram, _ = c.pending
                self._privatise(c, clipped, gram, std)
        out = _Estimates()
        reads = ReadBatch(self.device)
        usable = [c for c in chunks if c.batch > 0 and c.tokens and c.features is not None]
        if any(f in c.flags for c in chunks for f in _UNPAIRED):
            # A chunk whose examples have no features paired with them leaves the whole step to
            # the oracle: the other chunks' rows alone (another rank's, under DPDDP; another
            # physical batch's) gave a learned figure of part of the batch, which a single
            # process's step of the same examples did not.
            usable = []
        widths = {c.features.shape[1] for c in usable}
        built = self._feature_width()
        ranks = {c.rank: c.features.shape[1] for c in usable}
        # (DPDDP: whether any rank's own width moved since its last step, as padding per batch
        # moves it; only ranks each steady in width are blamed on their pipelines differing)
        moved = any(self._rank_widths.get(r, w) != w for r, w in ranks.items())
        self._rank_widths.update(ranks)
        if len(widths) > 1 or (built is not None and widths and widths != {built}):
            # A critic learns on one feature width: a batch of another (inputs of varying shape,
            # e.g. sequences padded per batch) can be neither scored nor learned from. Said, not
            # skipped silently (the critic used to be rebuilt from scratch on each change).
            out.flags.append("features_width_changed")
            between_ranks = len(set(ranks.values())) > 1 and not moved
            if between_ranks:  # (DPDDP: one step's ranks, not a change in time)
                self._warn_once(
                    "features:width:ranks",
                    "the ranks' features differ in width this step ("
                    + ", ".join(f"rank {r}: {w}" for r, w in sorted(ranks.items()))
                    + " per example): every rank must feed inputs of one shape (the same "
                    "data pipeline and model). The learned critics need one width, so such steps "
                    "get the oracle only (flag 'features_width_changed')",
                    shared=True,
                )
            elif self._features_unchecked and built is not None:  # (the first since a load)
                self._warn_once(
                    "features:width:state",
                    f"the monitor state loaded has critics for features of width {built}, "
                    f"this step's have width {sorted(widths - {built})[0]}: the state was "
                    "saved with another model or input size (or this model's inputs vary in "
                    "shape), so its critics can neither score nor learn on such steps (flag "
                    "'features_width_changed'). Load a state saved with this model and input "
                    "size, or start a fresh monitor",
                    shared=True,
                )
                self._warned.add("features:width")  # (the message above names both causes)
            if not between_ranks:  # (a rank's own width moved: said below, when it does)
                self._warn_once(
                    "features:width",
                    f"features changed width ({built or sorted(widths)[0]} -> "
                    f"{sorted(widths - {built})[0] if built else sorted(widths)[-1]} per example): "
                    f"inputs of varying shape, e.g. sequences padded per batch? {_WIDTH}",
                    shared=True,
                )
            usable = []
        out.usable = usable
        if usable:
            self._features_unchecked = False
        scored = []  # (view, kind, slot of its figures, slot of its control's or None)
        if usable:
            out.features = feats = torch.cat([c.features for c in usable])
            for view, est in self.estimators.items():
                out.learned[view] = tokens = torch.cat([c.tokens[view] for c in usable])
                value = est.evaluate_on_device(feats, tokens)  # held out: before it trains
                control = self._control_eval(view, feats, tokens)
                if value is not None:
                    slots = [reads.add(v) if v is not None else None for v in (value, control)]
                    scored.append((view, est.kind, *slots))
        oracled = [c for c in chunks if c.oracle_terms is not None and c.oracle_terms.numel()]
        terms = [c.oracle_terms for c in oracled]
        n_oracle = sum(t.numel() for t in terms)
        mc_var = (  # (one draw per example has none)
            torch.cat([c.oracle_var for c in oracled])
            if oracled and all(c.oracle_var is not None for c in oracled)
            else None
        )
        oracle = reads.add(mean_sd(torch.cat(terms), mc_var, self.oracle_draws)) if terms else None
        grams = [c.oracle_gram for c in oracled]
        # The union floor's mean (see oracle_interval): off the CPU made always and read with
        # the rest; on the CPU below, only where the oracle reads near ln B (~0.1 ms at B = 64).
        union = reads.add(union_mean(grams).reshape(1)) if terms and self._sync_free else None
        # The largest squared norm of a clipped example (exceeds_clip): read by the oracle on
        # the CPU already (floats), else float64 tensors on the Gram's device, read here.
        tops = [c.oracle_top for c in oracled if c.oracle_top is not None]
        largest = known = None
        if tops and not self._sync_free:
            known = max(tops)
        elif tops:
            largest = reads.add(torch.stack(tops).max())
        deferred = [(c, reads.add(c.keep.sum())) for c in chunks if c.keep is not None]
        reads.read()
        dropped = False
        for chunk, slot in deferred:
            kept = int(reads[slot][0])
            if kept < chunk.batch:
                self._drop_nonfinite(chunk, kept)
                dropped = True
            else:
                chunk.keep = chunk.grads_ok = None  # every row finite: nothing to do
        if dropped:
            return None
        for view, kind, slot, control_slot in scored:
            value = BatchEstimate.of(reads[slot], len(out.features))
            control = math.nan if control_slot is None else reads[control_slot][0]
            if math.isfinite(value.matched):
                shown = value.shown(kind)
                if shown is not value:
                    out.withheld[f"{view}/{kind}"] = (value.ci_low, value.ci_high)
                out.mi[f"{view}/{kind}"] = MIValue(
                    nats=value.matched,
                    ci_low=shown.ci_low,
                    ci_high=shown.ci_high,
                    n=value.n,
                    mismatched=value.mismatched,
                    control=control if math.isfinite(control) else None,
                )
            else:
                out.flags.append(f"estimate_nonfinite:{view}")
        if largest is not None:
            known = reads[largest][0]
        if known is not None:
            out.contribution = math.sqrt(max(known, 0.0))
            out.slack = max(c.slack for c in oracled)
        if oracle is not None:
            mean, sd, mc_se, mc_df = reads[oracle]
            if not math.isfinite(mean):  # (off the CPU: a Gram its factor could not take)
                out.flags.append("estimate_nonfinite:private/oracle")
            mc = (mc_se, mc_df)
            mean, lo, hi = interval_from(mean, sd, n_oracle, min_n=MIN_CI_PAIRS, mc=mc)
            out.margins["private/oracle"] = _oracle_margin(mean, sd, n_oracle, mc)
            log_b = sum(t.numel() * math.log(t.numel()) for t in terms) / n_oracle
            if union is not None:  # (made on the device with the figures, read with them)
                mean, lo, hi = oracle_interval(mean, lo, hi, log_b, reads[union][0])
            else:
                mean, lo, hi = floored_interval(mean, lo, hi, log_b, lambda: grams)
            out.mi["private/oracle"] = MIValue(
                nats=mean, ci_low=lo, ci_high=hi, n=n_oracle, ceiling=log_b
            )
        return out

    def _charge(self, span, kind: str, work: float = 1.0) -> None:
        self.budget.charge(span, kind, concurrent=self.overlap, work=work)

    def _gather_chunks(self, chunks: list[Chunk], plan: Plan) -> tuple[list[Chunk], Plan, float]:
        """Every rank's chunks of this logical step in rank order, their draws made (DPDDP).

        Collectives: one metadata gather plus one gather per dtype, made on every monitored
        logical step by every rank whatever happened locally: an empty Poisson batch or a
        failure while packing still sends a (possibly empty) contribution, so no rank waits for
        a call another never makes; the step counter, hence ``every``, advances alike on all
        ranks. Each rank's oracle stays per rank (its Gram matrix is built from that rank's
        per-sample gradients; only the B x B matrix travels), just as a BatchMemoryManager chunk
        is the oracle's candidate set. The private view's draws (token noise, then oracle noise,
        chunk by chunk) are made here, after gathering, from the identically seeded generator:
        every rank computes the same record and keeps the same generator and critic state
        (rank 0 alone estimating would save no wall time, as ranks meet at the gradient
        all-reduce right after), and the result equals one process that saw the same examples
        as chunks of one logical step. Also returns the seconds spent waiting at the first
        collective for the slowest rank.
        """
        try:
            items = [pack(c) for c in chunks] or [empty_item()]
        except Exception as exc:  # still join the collectives, with nothing
            self._warn_once(f"pack:{type(exc).__name__}", f"leakage gather failed: {exc!r}")
            items = [empty_item([f"error:{type(exc).__name__}"])]
        for meta, _ in items:  # the plan rides along (every rank follows the most frugal)
            meta["plan"] = (plan.next_in, plan.train, plan.epsilon)
            meta["stop"] = self._stop_requested  # (and so does a sink's detach: see detach)
            meta["rank"] = self.rank
        chunks = []  # every rank's, in rank order
        timings: dict[str, float] = {}
        try:
            gathered = all_gather_items(items, device=self.device, timings=timings)
        except Exception as exc:  # the group is broken: not a measurement's failure
            raise GatherError(
                f"opacus-mi: the monitor's gather of step {self.steps} across the DPDDP ranks "
                f"failed ({type(exc).__name__}: {str(exc).strip()[:300]}): another rank "
                "stopped, failed or timed out before its optimizer.step(), or this rank's "
                "collective failed (the error above), and Opacus's gradient all-reduce, next, "
                "cannot complete either"
            ) from exc
        # Every rank follows the most frugal of the ranks' plans, so no rank's work exceeds its
        # own budget (rank 0's alone let a rank with slower measurements spend 65% on its
        # books while rank 0's read 6%); all ranks reach the same plan from the same metadata.
        plans = [Plan(*meta["plan"]) for meta, _ in gathered]
        plan = Plan(
            next_in=max(p.next_in for p in plans),
            train=all(p.train for p in plans),
            epsilon=all(p.epsilon for p in plans),
        )
        self._stop_requested = any(meta["stop"] for meta, _ in gathered)
        unpacked = [(item[0]["rank"], *unpack(item)) for item in gathered]
        released = _released_std([(r, std) for r, *_, std in unpacked if std is not None])
        for rank, chunk, clipped, gram, std in unpacked:
            chunk.rank = rank
            if std is not None:
                try:  # local arithmetic only: no collective left in this step
                    self._privatise(chunk, clipped, gram, released)
                except Exception as exc:
                    self._warn_once(
                        f"chunk:{type(exc).__name__}", f"leakage measurement failed: {exc!r}"
                    )
                    chunk.flags.append(f"error:{type(exc).__name__}")
            chunks.append(chunk)
        return chunks, plan, timings.get("first", 0.0)

    def _control_eval(
        self, view: str, feats: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor | None:
        """The shuffled-pairs control's held-out bound on this batch, re-paired at random (as
        ``evaluate_on_device``'s four figures, not yet read)."""
        est = self.controls.get(view)
        if est is None or feats.shape[0] < 2:
            return None
        return est.evaluate_on_device(feats[self._derangement(feats.shape[0])], tokens)

    def _control_observe(
        self,
        view: str,
        feats: torch.Tensor,
        tokens: torch.Tensor,
        train: bool | None,
        reads: ReadBatch,
    ) -> None:
        """The control critic learns from another random re-pairing of this batch."""
        est = self.controls.get(view)
        if est is None or feats.shape[0] < 2:
            return
        est.observe(feats[self._derangement(feats.shape[0])], tokens, train=train, reads=reads)

    def _derangement(self, n: int) -> torch.Tensor:
        """A uniformly random n-cycle from the monitor's generator: no index maps to itself."""
        return random_cycle(n, self.generator).to(self.device)

    def _semi_oracle_step(
        self, record: LeakageRecord, usable: list[Chunk], std: float, train: bool | None
    ) -> None:
        """Score the private tokens with the learned clean-token model, then learn from them."""
        feats = torch.cat([c.features for c in usable])
        if self.subspace is not None:  # subspace tokens; their private view is drawn here
            if not all("semi" in c.tokens for c in usable):
                return  # the subspace is not fitted yet
            clean = torch.cat([c.tokens["semi"] for c in usable])
            noise = torch.randn(
                clean.shape,
                generator=self.generator,
                device=self.generator.device,
                dtype=torch.float32,
            )
            private = clean + std * noise.to(clean.device)
        else:
            clean = torch.cat([c.tokens["clipped"] for c in usable])
            private = torch.cat([c.tokens["private"] for c in usable])
        value = self.semi_oracle.evaluate(feats, private, std)
        if value is not None and math.isfinite(value.matched):
            # Near ln n its row terms are rare confusions one draw mostly misses, as the
            # oracle's are (its t interval's low end lay above the truth in 9-43% of batches):
            # the union floor of the clean tokens' Gram bounds I(J; private tokens), which the
            # semi's figure bounds from below.
            c = clean.double()
            mean, lo, hi = floored_interval(
                value.matched, value.ci_low, value.ci_high, math.log(value.n),
                lambda: [(c @ c.T, std)],
            )  # fmt: skip
            record.mi["private/semi"] = MIValue(
                nats=mean, ci_low=lo, ci_high=hi, n=value.n, mismatched=value.mismatched
            )
        if self.semi_oracle.observe(feats, clean, train=train):
            record.flags.append("critic_reset:semi")

    def _warn_once(self, key: str, message: str, *, shared: bool = False) -> None:
        """Say ``message`` once a run (once per ``key``).

        ``shared``: of what every rank has alike under DPDDP (the records and critics of the
        gathered batch, settings checked the same on every rank, the model, the accountant's
        history), so rank 0 says it for all, as it writes the records, and the other ranks keep
        quiet: said by each, a run on 8 GPUs printed it 8 times. Any other warning is of this
        process's own step (its features, forwards, chunk, a failure): each process says its
        own, naming its rank where there are several (see :meth:`_speaker`)."""
        if key not in self._warned:
            self._warned.add(key)
            if shared and self.distributed and self.rank != 0:
                return
            message = f"{self._speaker(shared)}: {message}; the monitor left training unchanged"
            worker = getattr(self, "_worker", None)
            if (worker is not None and worker.on_worker()) or getattr(self, "_deferring", False):
                # Said on the training thread (see _deliver), outside a step: the user's
                # warning filters act there, and a warning turned error on the worker lost the
                # step's record; inside a step it skipped its update (see _deferring).
                self._worker_warnings.append(message)
            else:
                say(message)

    def _speaker(self, shared: bool = False) -> str:
        """Who says a warning: ``opacus-mi``, or ``opacus-mi (rank r)`` where several processes
        run (torchrun) and the warning is this process's own, not one rank 0 says for all."""
        if self._ranks > 1 and not (shared and self.distributed):
            return f"opacus-mi (rank {self.rank})"
        return "opacus-mi"

    def _trim_history(self) -> None:
        """Keep the latest ``max_history`` records (all of them when it is None)."""
        if self.max_history is not None and len(self._history) > self.max_history:
            gone = len(self._history) - self.max_history
            del self._history[:gone]
            self._trimmed += gone

    @property
    def _record_count(self) -> int:
        """Every record made, kept in history or not: counted from the history itself, so an
        interrupt mid-delivery cannot leave the count and the history apart."""
        return self._trimmed + len(self._history)

    # ------------------------------------------------------------------ results
    @property
    def record_count(self) -> int:
        """Records made so far, kept in ``history`` or not (``max_history``); waits, as
        ``history`` does, for any an overlap worker is making (it lagged one behind)."""
        self.flush()
        return self._record_count

    @property
    def history(self) -> list[LeakageRecord]:
        """Every record so far (the latest ``max_history`` if set), in step order; waits for
        any an overlap worker is making."""
        self.flush()
        return self._history

    def series(self, key: str) -> list[tuple[int, MIValue]]:
        """``(step, value)`` for one MI series, e.g. ``"private/oracle"`` or ``"clipped/mine"``
        (empty until it has a figure). A key this monitor never reports is a KeyError listing
        those it does: a misspelled one read as an empty series, "nothing measured"."""
        history = self.history
        if not any(key in r.mi for r in history) and key not in self._series_names():
            raise KeyError(
                f"no MI series {key!r} in this monitor: it reports {self._series_names()}"
            )
        return [(r.step, r.mi[key]) for r in history if key in r.mi]

    def _series_names(self) -> list[str]:
        """The series this monitor reports: each view's learned estimator, the private
        view's oracle (and semi-oracle), and any other the history holds."""
        asked = series_names(self.views, self.estimator, self.semi_oracle is not None)
        names = dict.fromkeys(asked)
        names.update(dict.fromkeys(self.keys()))
        return list(names)

    def keys(self) -> list[str]:
        """The MI series the history holds (``"private/oracle"``, ``"clipped/mine"``, ...), in
        the order they first appear: what :meth:`series` takes."""
        seen: dict[str, None] = {}
        for r in self.history:
            for k in r.mi:
                seen.setdefault(k, None)
        return list(seen)

    def _epsilon_or_nan(self, accounting: tuple | None, sigma: float) -> float:
        """The accountant's epsilon, or NaN (warned once) where it cannot compute one: Opacus's
        PRV accountant overflows or runs out of memory at a small enough noise multiplier
        (inf from ~0.03 on the digits run, a grid of hundreds of GiB at 1e-4). The record keeps
        its MI."""
        fix = "PrivacyEngine(accountant='rdp') (CLI: --accountant rdp) gives a finite bound there"
        try:
            value = self.epsilon.epsilon(accounting)
        except Exception as exc:  # (MemoryError is an Exception; KeyboardInterrupt is not)
            self._warn_once(
                "epsilon",
                f"the accountant could not compute epsilon at sigma {sigma:g} "
                f"({type(exc).__name__}: {str(exc)[:120]}); records carry NaN, flagged "
                "epsilon_failed"
                + (
                    f". Opacus's PRV accountant fails this way at small noise multipliers and "
                    f"at a very small delta (this one's: {self.delta:g}): {fix}"
                    if isinstance(self.epsilon.accountant, PRVAccountant)
                    else f" ({type(self.epsilon.accountant).__name__})"
                ),
            )
            return math.nan
        if value == math.inf and sigma > 0 and not self.epsilon.cheap:
            self._warn_once(
                "epsilon-inf",
                f"the accountant's epsilon is inf at sigma {sigma:g}, as Opacus's PRV accountant "
                f"gives when its discretisation overflows (a valid but empty guarantee); {fix}",
                shared=True,
            )
        if accounting and self.epsilon.used_rdp(accounting):
            self._warn_once(
                "epsilon-rdp",
                f"Opacus's PRV epsilon would now run over more than {PRV_MAX_POINTS:,} points "
                "(minutes and gigabytes a call; the domain grows with the steps): records "
                "carry Opacus's RDP epsilon for the same history instead, a valid and slightly "
                "looser bound (flag 'epsilon_rdp')",
                shared=True,
            )
        return value

    def epsilon_now(self) -> float:
        """The accountant's epsilon at ``delta`` after every step so far (computed now, on the
        caller's time), or NaN, warned once, where the accountant cannot compute one."""
        if self._worker is not None:  # its records use the tracker too (one cache, no lock):
            self._worker.wait()  # a record could carry the previous step's epsilon
        return self._epsilon_or_nan(None, float(self.optimizer.noise_multiplier))

    def summary(self, last: int = 20) -> str:
        """A readable table of every MI series over the last ``last`` records; where the last
        carries an earlier step's (paced) epsilon, the accountant's epsilon now beside it."""
        from .report import summary_table

        records = self.history  # (flushes: an overlap worker is idle, the tracker free)
        # The run as the monitor saw it (detached, the accountant may have gone on without
        # it), its steps counted as the records' are: the accountant's.
        history = self.epsilon.history() if self.attached else self._seen_history
        steps = steps_counted(history)
        now = bound = None
        behind = bool(records) and steps > records[-1].step + 1  # (every > 1)
        if records and (records[-1].carries_earlier_epsilon or behind):
            # one fresh epsilon, on the caller's time
            now = self._epsilon_or_nan(history, float(self.optimizer.noise_multiplier))
        if behind:
            bound = self.mi_accountant.bound(history)
        return summary_table(
            records,
            last=last,
            note=self.schedule_note(),
            epsilon_now=now,
            steps=steps,
            mi_bound_now=bound,
            # (a short run's table showed only the oracle, and nothing said why the critics'
            # rows were missing: the CLI's summary said "no figure yet", this did not)
            expected=series_names(self.views, self.estimator, self.semi_oracle is not None),
        )

    def schedule_note(self) -> str | None:
        """One line on what the overhead budget let the monitor do (None on a fixed schedule;
        with ``every`` fixed and ``train_every=None``, what it let the critics do)."""
        b = self.budget
        if b is None or self.steps == self._first_step:
            return None
        self.flush()  # an overlap worker's records and time are in
        rounds = sum(e.updates for e in [*self.estimators.values(), *self.controls.values()])
        if self.every is not None:  # measured on a fixed schedule: the budget has the critics
            share = b.critic_seconds / b.train_seconds if b.train_seconds > 0 else math.nan
            return (
                f"schedule: every={self.every}, critics under the overhead budget "
                f"{b.fraction:.0%} - {rounds} critic rounds; critic time {share:.1%} of the "
                "training loop's."
            )
        share = b.spent / b.train_seconds if b.train_seconds > 0 else math.nan
        parts = [f"measured {self._record_count} of {self.steps - self._first_step} steps"]
        # (The budget's books are this process's: a resumed run's start from the resume.)
        resumed = f" since the resume at step {self._resumed_at}" if self._resumed_at else ""
        if self.train_every is None and self.estimators:
            parts.append(f"{rounds} critic rounds")
        return (
            f"schedule: overhead budget {b.fraction:.0%} - {', '.join(parts)}; monitor time "
            f"{share:.1%} of the training loop's{resumed} (+{b.setup_seconds:.2f} s one-off "
            "setup). "
            "For every step: every=1, train_every=8."
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on as this one would (steps, the generator, each
        critic with its windows and Adam state, the history, the settings it was made with):
        save it beside Opacus's checkpoint; :meth:`load_state_dict` continues from it."""
        self.flush()  # the worker's generator and critics are settled, its records in
        if getattr(self.optimizer, "_is_last_step_skipped", False):
            # Saved between a BatchMemoryManager logical step's physical batches: neither this
            # nor Opacus's checkpoint holds the chunks summed so far (nor does a resumed run
            # release them), and the generator has drawn for the measured ones.
            say(
                f"{self._speaker()}: state_dict() was taken in the middle of logical step "
                f"{self.steps} (physical batches of a BatchMemoryManager step still to come): "
                "neither it nor Opacus's checkpoint holds that step's batches so far, so a run "
                "resumed from here releases and records that step from the resume on, and its "
                "later records differ from an uninterrupted run's. Save after a step that ends "
                "a logical batch (optimizer._is_last_step_skipped is False)"
            )
        return {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "own_step": self._own_step,
            "first_step": self._first_step,  # where the run's first monitor attached
            "generator": self.generator.get_state(),
            "estimators": {k: e.state_dict() for k, e in self.estimators.items()},
            "controls": {k: e.state_dict() for k, e in self.controls.items()},
            "semi_oracle": None if self.semi_oracle is None else self.semi_oracle.state_dict(),
            "subspace": None if self.subspace is None else self.subspace.state_dict(),
            "history": [r.as_dict() for r in self.history],
            "record_count": self._record_count,
            # (More than steps when another model on the same engine stepped since this one.)
            "accountant_steps": steps_counted(self.epsilon.history()),
            # A paced epsilon (PRV on a fixed schedule): the latest exact value the records
            # carry on, and the pace, which a resumed run goes on with.
            "epsilon": {
                "value": self._epsilon[0],
                "step": self._epsilon[1],
                "history": [list(entry) for entry in self._epsilon_history],
                "work": self._epsilon_work,
                "pacer": None if self._epsilon_pacer is None else self._epsilon_pacer.state_dict(),
                # (Opacus's RDP epsilon where PRV's would cost minutes: flagged on the records)
                "rdp": bool(self._epsilon_history) and self.epsilon.used_rdp(self._epsilon_history),
            },
            "settings": self._settings(),
            "delta": self.delta,  # (not a setting: another delta is warned, not refused)
        }

    def _settings(self) -> dict[str, Any]:
        """What a checkpoint's critics and records were made with: a monitor loading it must
        have the same (see :meth:`load_state_dict`)."""
        return {
            "views": list(self.views),
            "estimator": self.estimator,
            "token_dim": self.token_dim,
            "tokenizer": self.tokenizer_kind,
            "control": bool(self.controls),
            "semi_oracle": self.semi_oracle is not None,
            # Which tokens it learns on (one process: a gradient subspace; else sketch tokens).
            "semi_tokens": self._semi_tokens(),
            # The sketch's hash and per-layer widths: critics fitted on other tokens.
            "seed": self.seed,
            "token_dims": list(self.tokenizer.dims),
            # The model's size: per-layer widths can agree across models (a 3x3 and a 5x5 conv
            # at token_dim 8), and the subspace's rows and basis are P-dimensional.
            "parameters": sum(p.numel() for p in self._params),
            # The features' width, which the critics are built for: None, names or "callable".
            "features": self._features_setting,
            # 2: a one-bucket sketch axis never has all of one sign (see _balanced_hash).
            "sketch_signs": SKETCH_SIGNS,
        }

    def _semi_tokens(self) -> str | None:
        if self.semi_oracle is None:
            return None
        return "subspace" if self.subspace is not None else "sketch"

    def check_state(self, state: Any) -> None:
        """Raise the ValueError :meth:`load_state_dict` would, without changing anything: a
        caller that loads other state with it (a checkpoint) can check first."""
        self._parsed_state(state)

    def _parsed_state(self, state: Any) -> tuple:
        """Check ``state`` (see :meth:`check_state`) and parse what :meth:`load_state_dict`
        takes from it: ``(steps, first_step, own_step, history, record_count,
        accountant_steps, epsilon)``."""
        keys = ("steps", "generator", "estimators", "history")
        missing = [k for k in keys if k not in state] if isinstance(state, dict) else []
        if not isinstance(state, dict) or missing:
            hint = (
                f": this is a whole checkpoint; pass its {MONITOR_STATE_KEY!r} entry, or load "
                "it with MonitoredPrivacyEngine.load_checkpoint"
                if isinstance(state, dict) and MONITOR_STATE_KEY in state
                else ""
            )
            raise ValueError(
                f"not a LeakageMonitor.state_dict() (missing {missing or 'everything'}){hint}"
            )
        saved = state.get("settings")  # (absent from checkpoints of earlier versions)
        # A newer version's state: another format, or settings this version does not know
        # (whose critics were made with something it cannot set). Unknown settings are judged
        # only in states that say their format: an earlier version's may hold ones since
        # dropped.
        fmt, mine = state.get("format"), self._settings()
        unknown = sorted(set(saved) - set(mine)) if fmt and saved else []
        if (fmt is not None and (not isinstance(fmt, int) or fmt > STATE_FORMAT)) or unknown:
            also = f"; settings {', '.join(unknown)} unknown here" if unknown else ""
            raise ValueError(
                f"this monitor state was saved by a newer opacus-mi (state format {fmt!r}, this "
                f"one reads up to {STATE_FORMAT}{also}): upgrade opacus-mi to continue from it, "
                "or start a fresh monitor (training resumes from the rest of the checkpoint "
                "unchanged)"
            )
        if (saved is None or "sketch_signs" not in saved) and self.tokenizer.sign_flips:
            raise ValueError(
                "this checkpoint was saved by an earlier version of opacus-mi, whose sketch of "
                "this model at this seed differs from today's (one of its one-bucket axes had "
                "all of one sign, which sketched a classifier head's backprops to 0): its "
                "critics were fitted on other tokens; start a fresh monitor (its state is only "
                "the monitor's: training resumes from the rest of the checkpoint unchanged)"
            )
        if saved is not None:
            differ = {  # (a setting an earlier version did not save is not compared)
                k: (v, saved[k])
                for k, v in mine.items()
                if k in saved and saved[k] != v and k != "semi_tokens"  # (see _replace_state)
            }
            if differ:
                parts = ", ".join(
                    f"{k}={old!r} there, {new!r} here" for k, (new, old) in differ.items()
                )
                raise ValueError(
                    f"this checkpoint was saved by a monitor with other settings ({parts}): "
                    "create the monitor with the checkpoint's settings to continue from it"
                )
        elif set(state["estimators"]) != set(self.estimators):
            raise ValueError(
                f"this checkpoint's critics are for views {sorted(state['estimators'])}, this "
                f"monitor's for {sorted(self.estimators)}: create it with the same views and "
                "estimator"
            )
        # Each critic's own kind and token encoder (saved with it since before the settings
        # were: a checkpoint of an earlier version has no "tokenizer" setting to compare),
        # here and not only in the critic's load_state_dict, which runs once the monitor's
        # steps and history have been replaced.
        ours = {**self.estimators, **{f"control:{v}": e for v, e in self.controls.items()}}
        theirs = {**state["estimators"]}
        theirs.update({f"control:{v}": e for v, e in (state.get("controls") or {}).items()})
        for name, est in ours.items():
            saved_est = theirs.get(name)
            if not isinstance(saved_est, dict):
                continue
            for key, mine in (("kind", est.kind), ("token_encoder", est.token_encoder)):
                saved_value = saved_est.get(key, "sketch" if key == "token_encoder" else mine)
                if saved_value != mine:
                    setting = "tokenizer" if key == "token_encoder" else "estimator"
                    raise ValueError(
                        f"this checkpoint's {name} critic was saved with {key}="
                        f"{saved_value!r}, this monitor's has {mine!r}: create the monitor "
                        f"with {setting}={saved_value!r} to continue from it"
                    )
            # Its weights, into a throwaway critic: one that cannot load (a damaged state)
            # failed in load_state_dict, after Opacus's checkpoint had been loaded.
            try:
                est.check_state_dict(saved_est)
            except (RuntimeError, KeyError, TypeError, ValueError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                raise ValueError(
                    f"this checkpoint's {name} critic does not load ({first}): the state is "
                    "damaged or was saved with another model; load an undamaged one, or start "
                    "a fresh monitor (training resumes from the rest of the checkpoint "
                    "unchanged)"
                ) from err
        # The rest, parsed here too (a corrupt record, a generator state of another size): it
        # failed in load_state_dict, after Opacus's checkpoint had replaced the model.
        part = "steps"
        try:
            steps, first_step = _count(state["steps"]), _count(state.get("first_step", 0))
            part = "own_step"  # (absent from earlier versions' states)
            own_step = _count(state.get("own_step", steps))
            part = "history"
            history = [LeakageRecord.from_dict(d) for d in state["history"]]
            part = "record_count"
            record_count = _count(state.get("record_count", len(history)))
            part = "accountant_steps"  # (absent from earlier versions' states, as epsilon)
            accountant_steps = _count(state.get("accountant_steps", steps))
            part = "epsilon"
            epsilon = _epsilon_state(state.get("epsilon"))
            part = "delta"
            if state.get("delta") is not None:
                _real(state["delta"], "delta")
            part = "generator"
            spare = torch.Generator(device=self.generator.device)
            spare.set_state(state["generator"])
            if (  # (into throwaway ones, on a spare generator: this monitor's is not drawn)
                self.semi_oracle is not None
                and state.get("semi_oracle") is not None
                and _saved_semi_tokens(state) == self._semi_tokens()
            ):
                part = "semi_oracle"
                self._new_semi_oracle(generator=spare).load_state_dict(state["semi_oracle"])
                if self.subspace is not None and state.get("subspace") is not None:
                    part = "subspace"
                    self._new_subspace().load_state_dict(state["subspace"])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ValueError(
                f"this monitor state's {part} does not load ({first}): the state is damaged; "
                "load an undamaged one, or start a fresh monitor (training resumes from the "
                "rest of the checkpoint unchanged)"
            ) from err
        return steps, first_step, own_step, history, record_count, accountant_steps, epsilon

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`. Checked before anything changes: a checkpoint of
        another kind, or of a monitor with other settings (whose critics would not fit this
        one's tokens and views), or a damaged one, is a ValueError naming what differs."""
        parsed = self._parsed_state(state)
        steps, first_step, own_step, history, record_count, accountant_steps, epsilon = parsed
        self.flush()  # nothing of the old state may land after the new one
        undo = self._loadable_state()
        try:
            self._replace_state(state, steps, first_step, own_step)
        except BaseException:  # (a part that would not load: the monitor goes on as it was)
            self._replace_state(undo, undo["steps"], undo["first_step"], undo["own_step"])
            self._measure_at, self._planned, self._adopted, self._last_measured = undo["plan"]
            raise
        self._history = history
        self._trim_history()
        # (Before max_history a checkpoint held every record.)
        self._trimmed = max(0, record_count - len(self._history))
        self._resumed_at, self._unchecked_resume = steps, True
        self._resumed_accountant = accountant_steps
        self._accountant_at_load = steps_counted(self.epsilon.history())
        saved_delta = state.get("delta")
        other_delta = saved_delta is not None and float(saved_delta) != self.delta
        # (Records check that the accountant's history continues it; one at another delta is
        # not this monitor's epsilon.)
        if epsilon is not None and not other_delta:
            self._epsilon, self._epsilon_history = epsilon["latest"], epsilon["history"]
            self._epsilon_work = epsilon["work"]
            if self._epsilon_pacer is not None and epsilon["pacer"] is not None:
                self._epsilon_pacer.load_state_dict(epsilon["pacer"])
            if epsilon["rdp"] and self._epsilon_history:  # (a PRV accountant's only)
                self.epsilon.rdp_from(self._epsilon_history)
        else:
            self._epsilon, self._epsilon_history = (0.0, None), ()
        self._features_unchecked = True
        if other_delta:
            self._warn_once(
                "state:delta",
                f"this monitor state's records carry epsilon at delta {float(saved_delta):g}, "
                f"this monitor's at delta {self.delta:g}: its history mixes the two (epsilon "
                f"jumps at step {steps}). Create the monitor with delta={float(saved_delta):g} "
                "to continue as before",
            )

    def _loadable_state(self) -> dict[str, Any]:
        """What :meth:`_replace_state` replaces, to put back if a part of a state fails to
        load (each critic's state is a snapshot: see ``OnlineEstimator.state_dict``)."""
        return {
            "steps": self.steps,
            "first_step": self._first_step,
            "own_step": self._own_step,
            "plan": (self._measure_at, self._planned, self._adopted, self._last_measured),
            "generator": self.generator.get_state(),
            "estimators": {k: e.state_dict() for k, e in self.estimators.items()},
            "controls": {k: e.state_dict() for k, e in self.controls.items()},
            "semi_oracle": _snapshot(self.semi_oracle),
            "subspace": _snapshot(self.subspace),
        }

    def _replace_state(
        self, state: dict[str, Any], steps: int, first_step: int, own_step: int
    ) -> None:
        self.steps, self._first_step, self._own_step = steps, first_step, own_step
        # The schedule restarts here: plans made for steps of the state replaced do not hold.
        self._measure_at, self._planned = self.steps, None
        self._adopted = self._last_measured = self.steps - 1
        for k, est_state in state["estimators"].items():
            self.estimators[k].load_state_dict(est_state)
        for k, est_state in state.get("controls", {}).items():
            if k in self.controls:
                self.controls[k].load_state_dict(est_state)
        if self.semi_oracle is not None and state.get("semi_oracle") is not None:
            theirs, ours = _saved_semi_tokens(state), self._semi_tokens()
            if theirs == ours:
                self.semi_oracle.load_state_dict(state["semi_oracle"])
                if self.subspace is not None and state.get("subspace") is not None:
                    self.subspace.load_state_dict(state["subspace"])
            else:
                # Its regression window and network are of another coordinate system (a run
                # moved from one process to DPDDP, or from hooks to ghost clipping): continuing
                # would mix the two in one window. Everything else loads; it starts afresh.
                self.semi_oracle = self._new_semi_oracle()
                if self.subspace is not None:
                    self.subspace = self._new_subspace()
                say(
                    f"{self._speaker()}: this checkpoint's semi-oracle learned on {theirs} "
                    f"tokens, this monitor's reads {ours} tokens ({_SEMI_TOKENS[ours]}): it "
                    "starts afresh here, and everything else continues from the checkpoint",
                )
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return (
            f"LeakageMonitor(views={self.views}, estimator={self.estimator!r}, every={self.every}, "
            f"token_dim={self.token_dim}, records={self._record_count}, attached={self.attached})"
        )


_SEMI_TOKENS = {
    "subspace": "a gradient subspace, on one process with per-sample gradients",
    "sketch": "under DPDDP, with ghost clipping, or where a subspace would not fit",
}


def _saved_semi_tokens(state: dict[str, Any]) -> str:
    """The tokens a saved semi-oracle learned on (a checkpoint of an earlier version without
    the setting: a saved subspace says which)."""
    saved = (state.get("settings") or {}).get("semi_tokens")
    if saved is not None:
        return saved
    return "subspace" if state.get("subspace") is not None else "sketch"


def _epsilon_state(saved: Any) -> dict[str, Any] | None:
    """A state's paced epsilon (see ``state_dict``), checked; None if it has none."""
    if saved is None:
        return None
    if not isinstance(saved, dict):
        raise ValueError(f"{saved!r} is not a mapping")
    history = tuple(tuple(entry) for entry in saved["history"])
    if not all(len(entry) == 3 for entry in history):
        raise ValueError(f"history {saved['history']!r} is not (noise, rate, steps) entries")
    pacer = saved.get("pacer")
    if pacer is not None:
        cost = None if pacer["cost"] is None else _real(pacer["cost"], "pacer cost")
        pacer = {"cost": cost, "count": _count(pacer["count"])}
    step = saved["step"]
    return {
        "latest": (_real(saved["value"], "value"), None if step is None else _count(step)),
        "history": history,
        "work": _real(saved["work"], "work"),
        "pacer": pacer,
        "rdp": bool(saved.get("rdp", False)),
    }


def _unwrapped(value: Any) -> Any:
    """A 0-d tensor's Python number (anything else as it is): saved numbers may be tensors."""
    return value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value


def _real(value: Any, name: str) -> float:
    """A saved number (NumPy's or a 0-d tensor's too) as a float, else a ValueError naming it."""
    value = _unwrapped(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} {value!r} is not a number")
    return float(value)


def _count(value: Any) -> int:
    """A saved step count or index: a non-negative integer (NumPy's, a 0-d tensor's, or a
    float 6.0 as JSON tools save one), else a ValueError."""
    value = _unwrapped(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ValueError(f"{value!r} is not a whole number")
    if value < 0:
        raise ValueError(f"{value!r} is negative")
    return int(value)


# Attached monitors, for a forked child to set aside (see LeakageMonitor._stand_aside).
_ATTACHED: weakref.WeakSet[LeakageMonitor] = weakref.WeakSet()


def _snapshot(part: Any) -> dict | None:
    """A copy of ``part.state_dict()`` that nothing live shares (None for no part)."""
    return None if part is None else copy.deepcopy(part.state_dict())


def _stand_aside_after_fork() -> None:
    for monitor in list(_ATTACHED):
        monitor._stand_aside()


def _released_std(stds: Sequence[tuple[int, float]]) -> float:
    """The std of the noise Opacus added in a logical step, from its chunks' ``(rank, std)``
    in order: rank 0 adds it, at its last chunk's pre_step (a scheduler stepped after every
    physical batch changes the std from chunk to chunk); every chunk is drawn with it."""
    return next((std for r, std in reversed(stds) if r == 0), stds[-1][1] if stds else 0.0)


def _per_sample_marker(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The newest ``grad_sample`` Opacus attached to the first parameter that has one (the
    last of an accumulated list): each backward makes a new one, so it tells whether a
    backward ran since it was last seen."""
    for p in params:
        latest = getattr(p, "grad_sample", None)
        if isinstance(latest, list):
            latest = latest[-1] if latest else None
        if isinstance(latest, torch.Tensor):
            return latest
    return None


def _check_appendable(path: str | os.PathLike) -> None:
    """Refuse, naming ``jsonl``, a path no record could be appended to (a folder, no write
    permission), before anything is changed; it opens nothing that stays open."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise OSError(
            f"jsonl={str(path)!r} cannot be opened to append records: "
            f"{err.strerror or err}; pass a writable file path (or None)"
        ) from None


def _detach_replaced(module, optimizer) -> None:
    """Detach, with a warning, a monitor of ``module`` that another optimizer steps.

    ``make_private`` called again on a model (a re-run notebook cell, a second phase with less
    noise) returns the same GradSampleModule with a new DPOptimizer. The old optimizer's monitor
    stayed hooked to the module: never stepped again, always due, it cloned every batch the
    model saw into a list nothing emptied.
    """
    for old in list(_ATTACHED):
        if old.module is not module or old.optimizer is optimizer:
            continue
        old.detach()
        kept = f" and in {old._jsonl.path}" if old._jsonl is not None else ""
        say(
            "opacus-mi: this model already had a LeakageMonitor, attached to another optimizer "
            "(make_private called again on it, e.g. a re-run notebook cell); that monitor is "
            f"detached now, and its {old.record_count} records so far stay in its history"
            f"{kept}. The new monitor records the model's steps from here on",
            UserWarning,
        )


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_stand_aside_after_fork)


def _said_not_raised() -> None:
    """Inside ``catch_warnings()``: the user's filters, but an "error" one only says (a
    "default" for all of them also said what the user had told to "ignore")."""
    warnings.filters[:] = [("default", *f[1:]) if f[0] == "error" else f for f in warnings.filters]


def _flush_at_exit(ref: weakref.ref) -> None:
    """Deliver the last records when the interpreter exits: an overlap worker's (its thread
    has been joined by then), or one an interrupt cut short. Its warnings are said, never
    raised: under a warnings-as-errors filter the first raised here took the records after
    it with it."""
    monitor = ref()
    if monitor is not None:
        try:
            with warnings.catch_warnings():
                _said_not_raised()
                monitor.flush()
                monitor._say_missed()  # (a monitor never detached)
        except Exception:  # exiting: nothing left to protect
            pass


def _sink_name(sink: Callable) -> str:
    """A sink as a warning names it: the JSONL by its file, a callable by its qualified name."""
    if isinstance(sink, JsonlSink):
        return f"the records file {str(sink.path)!r}"
    name = getattr(sink, "__qualname__", None) or type(sink).__qualname__
    return f"sink {name}"


def _deliver_rest(done: deque, jsonl: JsonlSink | None, said: deque) -> None:
    """The JSONL lines (and warnings) of a collected monitor that it had not delivered yet
    (an overlap worker's, or one an interrupt cut short)."""
    while done and jsonl is not None:
        try:
            jsonl(done.popleft())
        except Exception:  # collected: nothing left to protect
            pass
    if jsonl is not None:
        jsonl.close()
    # Said, never raised (see _flush_at_exit), but without catch_warnings: the garbage
    # collector runs this on whichever thread it collects on, another monitor's overlap worker
    # included, and catch_warnings swaps the process's filters under the thread that set them
    # (a test's warnings-as-errors or record block lost warnings, or its "error" filter).
    while said:
        message = said.popleft()
        try:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        except Warning as raised:  # an "error" filter: say it as "default" would, from where
            caller = sys._getframe(1)  # warn's stacklevel=2 points (the collector's call)
            warnings.showwarning(raised, RuntimeWarning, caller.f_code.co_filename, caller.f_lineno)


def _oracle_margin(mean: float, sd: float, n: int, mc: tuple[float, float]) -> float:
    """The oracle's bug-check half-width (see _exceeds): its interval's, at EXCEEDS_LEVEL."""
    return mean - interval_from(mean, sd, n, min_n=MIN_CI_PAIRS, level=EXCEEDS_LEVEL, mc=mc)[1]


def _exceeds(value: MIValue, bound: float | None, margin: float | None = None) -> bool:
    """Whether an estimate lies above a proven bound beyond its noise (a bug, if often).

    The displayed CIs are 95%: over hundreds of steps some would miss a true value near the
    bound by chance. The check asks for the 99.9% quantile instead: ``margin``, that quantile's
    half-width, where the figure's maker knows it (the oracle's: its interval may be as wide as
    its Monte Carlo part's t with about ``oracle_draws - 1`` degrees of freedom, which the
    standard error read off the 95% interval with ``n - 1`` misreads, flagging 0.6% of correct
    records, not 0.05%); else the standard error read off the 95% interval, both of Student's t
    with ``n - 1`` degrees of freedom as that interval is (read as normal, at a batch of 8 the
    check flagged 0.27% of correct records, not 0.05%).
    """
    if bound is None or value.n < 2:
        return False
    if margin is not None:
        return math.isfinite(margin) and value.nats - margin > bound + 1e-9
    if not (math.isfinite(value.ci_low) and math.isfinite(value.ci_high)):
        return False
    df = value.n - 1
    se = (value.ci_high - value.ci_low) / (2 * t_quantile(0.95, df))
    return value.nats - t_quantile(EXCEEDS_LEVEL, df) * se > bound + 1e-9
