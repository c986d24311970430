"""Data features: the "data" side of I(data; gradient), captured on the user's own forward pass.

Everything here is read-only: hooks copy what the model was given and computed (the batch, the
named layers' outputs, the labels) at the moment it saw them, so the monitor adds no forward
pass and no autograd edge, and nothing done to those tensors afterwards changes the features: an
in-place op after a named layer (``nn.ReLU(inplace=True)``), a loop that refills one input buffer
for its next step while an overlap worker is still reading the last. Captures happen only for
training forwards with grad enabled while the GradSampleModule's hooks are on (the ones Opacus
computes per-sample gradients for), mirroring Opacus's own activation hooks, so evaluation passes
and forwards under ``disable_hooks()`` (an adversarial attack's) do not confuse the pairing.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.grad_sample import GradSampleModuleExpandedWeights
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import PackedSequence

from .hooks import GuestHook
from .warn import say

MAX_FEATURES = 1024
FeatureFn = Callable[[torch.Tensor], torch.Tensor]
# What may sit between the GradSampleModule and the user's own model under torchrun: layer
# names are the user's model's, as on one process (and so is a checkpoint's features setting).
DATA_PARALLEL = (DifferentiallyPrivateDistributedDataParallel, DistributedDataParallel)


def pool_features(x: torch.Tensor, max_dim: int = MAX_FEATURES) -> torch.Tensor:
    """Flatten a batch to ``(B, d)`` with ``d <= max_dim``, average-pooling when larger.

    Images ``(B, C, H, W)`` are pooled spatially first (keeps channels and layout meaningful),
    anything else is pooled along the flattened axis.
    """
    x = x.detach()
    if not torch.is_floating_point(x):
        x = x.float()
    batch = x.shape[0]
    if x.ndim == 4 and x.shape[1:].numel() > max_dim:
        c, h, w = x.shape[1:]
        scale = math.sqrt(max_dim / max(c, 1) / (h * w))
        oh, ow = max(1, int(h * scale)), max(1, int(w * scale))
        x = F.adaptive_avg_pool2d(x.float(), (oh, ow))
    flat = x.reshape(batch, -1).float()
    if flat.shape[1] > max_dim:
        flat = F.adaptive_avg_pool1d(flat.unsqueeze(1), max_dim).squeeze(1)
    return flat


@functools.lru_cache(maxsize=8)
def _one_hot_rows(classes: int, device: torch.device) -> torch.Tensor:
    """``(classes + 2, classes)`` float32 rows a label picks, made once per size and device
    (never written to): all-zero, the identity's, then NaN (see :func:`one_hot_labels`)."""
    eye = torch.eye(classes, device=device, dtype=torch.float32)  # as pooled features, always
    zero = torch.zeros((1, classes), device=device, dtype=torch.float32)
    return torch.cat([zero, eye, torch.full_like(zero, math.nan)])


def one_hot_labels(labels: torch.Tensor, classes: int, *, check: bool = True) -> torch.Tensor:
    """``(B, classes)`` one-hot rows of integer ``labels``; a negative label, one the loss
    ignores (``CrossEntropyLoss``'s ``ignore_index=-100``), is an all-zero row.

    A label >= ``classes`` raises with ``check``, a host read; without it (where that read
    would be a device sync each step) its row is NaN, which the monitor drops and flags
    (``nonfinite_features``). Rows of a cached table, picked in one gather: ``F.one_hot``
    range-checks with host reads and refuses negative labels.
    """
    if check and labels.numel() and int(labels.max()) >= classes:
        bad = sorted(set(labels[labels >= classes].tolist()))
        raise ValueError(
            f"the labels given to the wrapped criterion include {bad[:5]}, outside its "
            f"{classes} classes (wrap_criterion's num_classes, else the logits' last dimension): "
            f"a label must be a class index in [0, {classes}), or "
            "negative for an example the loss ignores (ignore_index=-100; wrap a loss module "
            "such as nn.CrossEntropyLoss(ignore_index=...) and its ignore_index is read)"
        )
    return _one_hot_rows(classes, labels.device).index_select(
        0, labels.long().clamp(-1, classes) + 1
    )


def _packed(value: Any) -> bool:
    return isinstance(value, PackedSequence)


def _opaque_mapping(value: Any) -> bool:
    """A mapping pytree does not open, taking it for one leaf: a ``UserDict`` (a tokenizer's
    ``BatchEncoding``) or a dict subclass it has no registration for (an ``EasyDict`` output)."""
    return isinstance(value, Mapping) and type(value) not in pytree.SUPPORTED_NODES


def _plain(value: Any) -> Any:
    """A mapping pytree does not open as a dict; anything else as it is."""
    return dict(value) if _opaque_mapping(value) else value


def _first_leaf(value: Any) -> Any:
    """The first tensor or ``PackedSequence`` in a forward's argument (a dict, tuple or list
    of them: a tokenizer's dict batch gives its first field), or None."""
    if isinstance(value, (torch.Tensor, PackedSequence)):  # (the usual batch: no tree walk)
        return value
    for leaf in pytree.tree_leaves(_plain(value), is_leaf=_packed):
        if isinstance(leaf, (torch.Tensor, PackedSequence)):
            return leaf
    return None


def _output_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor a forward's output holds, once each: in mappings (a dict subclass, a
    ModelOutput), sequences, a ``PackedSequence``'s data, and the fields of a dataclass or a
    ``SimpleNamespace``, which pytree takes for one leaf (nothing of theirs was watched). Each
    container is opened once (an output whose parts link back to it cost n^3 a forward)."""
    found: dict[int, torch.Tensor] = {}
    opened: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, PackedSequence):
            item = item.data
        if isinstance(item, torch.Tensor):
            found.setdefault(id(item), item)
            continue
        if id(item) in opened:
            continue
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        elif is_dataclass(item) and not isinstance(item, type):
            children = [getattr(item, f.name, None) for f in fields(item)]
        elif isinstance(item, SimpleNamespace):
            children = vars(item).values()
        else:
            continue
        opened.add(id(item))
        stack.extend(reversed(list(children)))
    return list(found.values())


def _first_tensor(value: Any) -> torch.Tensor | None:
    leaf = _first_leaf(value)
    return leaf if isinstance(leaf, torch.Tensor) else None


def _kept(value: Any) -> Any:
    """A forward's first argument as the monitor keeps it: its tensors detached and copied
    (the loop may refill its input buffers in place), its structure as given (a mapping of
    another type rebuilt as that type where it can be, else a dict)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, PackedSequence):  # (a tuple subclass pytree would take apart)
        return PackedSequence(*(_kept(v) if v is not None else None for v in value))
    kept = pytree.tree_map_only(
        (torch.Tensor, PackedSequence), _kept, _plain(value), is_leaf=_packed
    )
    if _opaque_mapping(value):
        try:
            return type(value)(kept)
        except Exception:  # (a mapping type that takes no dict)
            return kept
    return kept


def _batch_first(value: Any) -> Any:
    """A time-major forward's input with its examples first: every tensor of it moved from
    dim 1 to 0 (a ``PackedSequence`` is neither, and stays)."""
    return pytree.tree_map_only(
        torch.Tensor,
        lambda t: t.movedim(1, 0) if t.ndim >= 2 else t,
        _plain(value),
        is_leaf=_packed,
    )


def _rows(value: Any) -> int | None:
    """How many examples a (batch-first) input holds: a ``PackedSequence``'s longest step's
    batch, else its first tensor's first dimension."""
    x = _first_leaf(value)
    if isinstance(x, PackedSequence):
        return int(x.batch_sizes[0]) if len(x.batch_sizes) else 0
    return None if x is None or x.ndim == 0 else x.shape[0]


def _hooks_enabled(module: nn.Module) -> bool:
    """Whether Opacus's hooks on the GradSampleModule run: a forward under ``disable_hooks()``
    adds no per-sample gradients, so it is no example (ew mode has no such switch)."""
    return getattr(module, "hooks_enabled", True)


NOT_CALLED = object()  # (a Capture's features callable, not called yet)


@dataclass
class Capture:
    """What one training forward showed: its input, named activations and (optional) labels."""

    # The forward's first argument (a tensor, or the dict, tuple or PackedSequence given)
    inputs: Any = None
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    num_classes: int | None = None
    stamp: Any = None  # which backward came before it (see FeatureCapture's ``stamp``)
    # [whether a backward has reached the forward's output]; None where it could not be seen
    # (an output with no tensor that requires grad): see FeatureCapture.take
    reached: list[bool] | None = None
    returned: bool = False  # the forward returned (one that raised added nothing to a step)
    outputs: list = field(default_factory=list)  # weakrefs to its output tensors (its labels)
    # The features callable's output for this forward, or what it raised: see
    # FeatureCapture.evaluate (NOT_CALLED: not called yet; None is a callable's output)
    user: Any = NOT_CALLED


class WidthsDiffer(ValueError):
    """A step's forwards gave features of different widths (micro-batches of sequences padded
    each to its own length): their rows pair with the gradients', but no one critic reads
    them."""

    def __init__(self, widths: Sequence[int]):
        super().__init__(f"features of widths {', '.join(map(str, widths))} in one step")
        self.widths = list(widths)


class FeatureCapture:
    """Forward hooks on the Opacus-wrapped module that record the batch each chunk saw.

    Args:
        module: the module returned by ``make_private`` (a GradSampleModule).
        layers: names (as in the user's model's ``named_modules()``: ``module._module``, inside
            DPDDP/DDP its ``.module``) of intermediate layers whose outputs become features.
        fn: optional callable ``inputs -> (B, d)`` features, computed without autograd: the
            forward's first argument (batch-first; a dict, tuple or ``PackedSequence`` as given).
        use_input: whether the (pooled) input batch is a feature.
        batch_first: the module's layout (``make_private(batch_first=...)``): with False the
            input's examples lie along its dim 1, as Opacus reads them.
        active: callable telling whether the current forward is worth capturing (the monitor
            only pays for copies on monitored steps).
        check_labels: callable telling whether a label past the output raises, a host read
            (see :func:`one_hot_labels`; the monitor makes none where it would be a sync).
        warn: ``(key, message)``, said once per key (the monitor's ``_warn_once``).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        layers: Sequence[str] = (),
        fn: FeatureFn | None = None,
        use_input: bool = True,
        batch_first: bool = True,
        active: Callable[[], bool] = lambda: True,
        check_labels: Callable[[], bool] = lambda: True,
        stamp: Callable[[], Any] = lambda: None,
        warn: Callable[[str, str], None] | None = None,
    ):
        self.module = module
        self._warn = warn or self._warn_once
        self._said: set[str] = set()  # (the keys _warn_once has said)
        self.fn = fn
        self.use_input = use_input
        self.batch_first = batch_first
        self.layer_names = tuple(layers)
        self._active = active
        self._check_labels = check_labels
        self._stamp = stamp
        self.pending: list[Capture] = []
        inner = getattr(module, "_module", module)
        if isinstance(inner, DATA_PARALLEL):
            inner = inner.module
        named = dict(inner.named_modules())
        missing = [n for n in self.layer_names if n not in named]
        if missing:
            raise ValueError(
                f"features names layers {missing} that the model does not have; valid names "
                f"are {sorted(k for k in named if k)[:20]}"
            )
        # The layers whose per-sample gradients Opacus records: it skips a forward where they
        # are in eval mode (``model.eval()`` on the user's own model leaves the wrapper's flag).
        self._trainable = [
            m for m in inner.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        self._open = False  # a captured training forward of the module is running
        self._labelled = False  # the latest forward of the module was captured (its labels)
        # The outputs (tensors, or those a tuple, list or dict holds) of the latest captured
        # and uncaptured (grad-enabled) forwards: a loss on one of them says whose labels it
        # has, whatever forward ran in between.
        self._outputs: dict[bool, list[weakref.ref]] = {}
        self._handles = [
            module.register_forward_pre_hook(GuestHook(self._on_forward), with_kwargs=True),
            module.register_forward_hook(GuestHook(self._after_forward)),
        ]
        for name in self.layer_names:
            hook = GuestHook(self._layer_hook(name))
            self._handles.append(named[name].register_forward_hook(hook))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            say(message)

    def training_forward(self) -> bool:
        """Whether a forward of the module now makes per-sample gradients of the coming step,
        as Opacus decides (each layer's mode, autograd on, its hooks enabled): the forwards the
        monitor captures when due. Expanded Weights (``grad_sample_mode="ew"``) samples every
        forward with autograd on, in ``eval()`` too (fine-tuning with dropout off)."""
        if isinstance(self.module, GradSampleModuleExpandedWeights):
            return torch.is_grad_enabled()
        return (
            self.module.training
            and torch.is_grad_enabled()
            and _hooks_enabled(self.module)
            and any(m.training for m in self._trainable)
        )

    def _capturing(self) -> bool:
        return self.training_forward() and self._active()

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._open = self._capturing()  # (reset by every forward, even one that raised)
        if torch.is_grad_enabled():  # (a no_grad forward before the loss leaves its labels)
            self._labelled = self._open
        if not self._open:
            return
        # (the first argument that holds a tensor: a dict batch, a PackedSequence, a tensor;
        # else the first argument as it is: a dataclass batch, for a features callable)
        given = (*args, *kwargs.values())
        first = next((a for a in given if _first_leaf(a) is not None), given[0] if given else None)
        # Each training forward adds to the per-sample gradients of the coming step (Opacus
        # concatenates the rows of separate backwards and sums forwards of one backward row by
        # row: see first_forward); labels arrive later through the criterion.
        self.pending.append(Capture(inputs=_kept(first), stamp=self._stamp()))

    def _after_forward(self, module: nn.Module, args: tuple, output) -> None:
        if torch.is_grad_enabled():
            # Every tensor the output holds, nested ones too (a ModelOutput's hidden_states)
            tensors = _output_tensors(output)
            self._outputs[self._open] = [weakref.ref(t) for t in tensors]
            if self._open and self.pending:
                self.pending[-1].outputs = self._outputs[True]
                self._watch_backward(self.pending[-1], tensors)
        if self._open and self.pending:
            self.pending[-1].returned = True
        self._open = False

    @staticmethod
    def _watch_backward(capture: Capture, outputs: list[torch.Tensor]) -> None:
        """Note when a backward reaches this forward's output: a forward whose loss was never
        backpropagated (the loop caught an exception between the two and went on) adds
        nothing to the step's gradients, and must not be paired with them. The hook only
        reads: it returns None, so the gradient flows on unchanged. Not on a leaf the forward
        returns (a parameter, for a penalty): a hook there outlives the forward (one more per
        step, kept after detach()), and any backward through the model reaches it."""
        flowing = [t for t in outputs if t.requires_grad and t.grad_fn is not None]
        if not flowing:
            return
        reached = capture.reached = [False]

        @torch.utils.hooks.unserializable_hook  # (torch.save of an output: no warning)
        def seen(grad: torch.Tensor) -> None:
            reached[0] = True

        for t in flowing:
            t.register_hook(seen)

    def _layer_hook(self, name: str):
        def hook(mod: nn.Module, args: tuple, output) -> None:
            # Inside a captured forward, whatever the layer's own mode: a frozen extractor
            # run in eval() or under no_grad is still part of this forward.
            if not self._open:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and self.pending:
                layers = self.pending[-1].layers
                if name in layers:  # the first call's output is the feature
                    self._warn(
                        f"features:twice:{name}",
                        f"features layer {name!r} ran more than once in one forward: its first "
                        "call's output is the feature (name a layer called once, or pass a "
                        "callable)",
                    )
                    return
                layers[name] = out.detach().clone()

        return hook

    def record_labels(
        self,
        labels: torch.Tensor,
        num_classes: int | None,
        ignore_index: int | None = None,
        output: Any = None,
    ) -> None:
        """Attach the labels the loss saw to the current chunk: only where the loss is on a
        captured forward's ``output`` (an evaluation batch's loss between backward and step
        lends none; nor does one on a forward Opacus skips, in eval or with its hooks off),
        or, on an output neither forward returned, follows a captured forward. Labels equal
        to the loss's non-negative ``ignore_index`` (255, say) become -1: no class, an
        all-zero row (see :func:`one_hot_labels`)."""
        lend = self._labelled
        owner = None  # the captured forward whose output the loss is on, if it is one's
        if isinstance(output, torch.Tensor):
            if not output.requires_grad:  # (a loss that cannot reach the gradients: eval's)
                return
            for captured, refs in self._outputs.items():
                if any(ref() is output for ref in refs):
                    lend = captured
            # Any captured forward of the step, not only the latest: forwards (a regulariser's,
            # an eval-mode one) may have run between it and its loss.
            owner = next(
                (c for c in reversed(self.pending) if any(r() is output for r in c.outputs)),
                None,
            )
            lend = lend or owner is not None
        if labels.ndim == 0:  # (a penalty's scalar target: no example's label)
            return
        if (
            lend
            and torch.is_grad_enabled()
            and self._active()
            and self.pending
            and _hooks_enabled(self.module)
        ):
            # That forward (a later one, say a detached target's, may have run in between),
            # else the latest.
            capture = owner if owner is not None else self.pending[-1]
            if capture.labels is not None:  # a second wrapped loss on the same forward
                self._warn(
                    "features:labels:twice",
                    "the wrapped criterion saw a second target for one forward: the first "
                    "loss's targets are the label features (wrap only the loss whose targets "
                    "describe the examples)",
                )
                return
            labels = labels.detach().clone()
            if ignore_index is not None and ignore_index >= 0 and not labels.is_floating_point():
                labels = labels.masked_fill(labels == ignore_index, -1)
            capture.labels = labels
            capture.num_classes = num_classes

    def keep(self, stamped: Callable[[Any], bool]) -> None:
        """Keep only the captures whose stamp passes ``stamped`` (the others are forwards whose
        gradients Opacus dropped)."""
        self.pending = [c for c in self.pending if stamped(c.stamp)]

    def take(self) -> list[Capture]:
        """Hand over the captures since the last optimizer step and start afresh. Forwards no
        backward reached are left out, where another one of the step's was seen reached (so
        the loop's outputs do show their backward)."""
        captured, self.pending = self.pending, []
        captured = [c for c in captured if c.returned]  # (a forward that raised: none of it)
        if any(c.reached is not None and c.reached[0] for c in captured):
            left = [c for c in captured if c.reached is not None and not c.reached[0]]
            captured = [c for c in captured if c.reached is None or c.reached[0]]
            self._move_labels(left, captured)
        return captured

    def _move_labels(self, left: list[Capture], kept: list[Capture]) -> None:
        """Labels on a forward left out go to the latest kept one of their rows, where no kept
        one has any: a loss on a transform of the output (``log_softmax(out)``, ``out[:, :k]``)
        is not known as that output's, so its labels went to the latest forward, which may be
        a detached one (a consistency target) that no backward reached."""
        orphan = next((c for c in reversed(left) if c.labels is not None), None)
        if orphan is None or any(c.labels is not None for c in kept):
            return
        rows = len(orphan.labels)
        for c in reversed(kept):
            if self._examples(c) == rows:
                c.labels, c.num_classes = orphan.labels, orphan.num_classes
                return

    def evaluate(self, captures: Sequence[Capture]) -> None:
        """Call the features callable on each forward's input now, at the step, on the training
        thread. It may read the model's weights (features from the model's own layers): an
        overlap worker measures after the optimizer's update, and read them changed, or while
        the update wrote them; inline they were the forward's."""
        if self.fn is None:
            return
        for capture in captures:
            if capture.user is NOT_CALLED:
                inputs = self._inputs(capture)
                # (Every CUDA device: a batch's first tensor can be a CPU one, lengths, or
                # none, a PackedSequence's; Opacus's noise comes from the default generators.)
                cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
                try:
                    # (Its own draws, dropout in a layer it runs: not from training's generators)
                    with torch.random.fork_rng(devices=cuda), torch.no_grad():
                        capture.user = self.fn(inputs)
                except Exception as exc:  # (raised where the measurement reads it)
                    capture.user = exc

    def features(self, captures: Sequence[Capture], batch: int) -> torch.Tensor | None:
        """The ``(B, d)`` features of the forwards behind one step's per-sample gradients.

        Returns None when the captured rows do not add up to ``batch`` (features and gradients
        cannot be paired, so the monitor flags the step instead of guessing). A forward's rows
        are its input's examples; a step of one forward has ``batch`` of them, which is what a
        callable's or a layer's output must then have even where the input is not one row per
        example (``nn.EmbeddingBag``'s flat ids with offsets).
        """
        alone = batch if len(captures) == 1 else None
        rows = [self._features_of(c, alone) for c in captures]
        rows = [r for r in rows if r is not None]
        if not rows or sum(r.shape[0] for r in rows) != batch:
            return None
        widths = sorted({r.shape[1] for r in rows})
        if len(widths) > 1:  # (paired, but no one critic reads them: not "unpaired")
            raise WidthsDiffer(widths)
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)

    def first_forward(self, captures: Sequence[Capture], batch: int) -> torch.Tensor | None:
        """The first forward's ``(B, d)`` features when the step's are several forwards of
        ``batch`` examples each behind ``batch`` gradient rows: forwards of one batch through
        one backward (a regulariser's second forward), which Opacus sums into one per-sample
        gradient row per example. None otherwise (their rows cannot be told apart). The labels
        are the loss's, whichever forward the criterion followed (forwards of one batch, so
        they are every forward's)."""
        if len(captures) < 2 or any(self._examples(c) != batch for c in captures):
            return None
        first = captures[0]
        labelled = next((c for c in captures if c.labels is not None), first)
        if labelled is not first:  # (both forwards ran before the criterion)
            first = replace(first, labels=labelled.labels, num_classes=labelled.num_classes)
        return self._features_of(first, batch)

    def _examples(self, capture: Capture) -> int | None:
        """How many examples one forward's input holds (along dim 1 when time-major)."""
        return _rows(self._inputs(capture))

    def _inputs(self, capture: Capture) -> Any:
        """One forward's input, batch-first (as Opacus reads a time-major model's)."""
        return capture.inputs if self.batch_first else _batch_first(capture.inputs)

    def _features_of(self, capture: Capture, batch: int | None) -> torch.Tensor | None:
        """One forward's ``(rows, d)`` features; ``batch``: its rows where known (else the
        input's examples)."""
        inputs = self._inputs(capture)
        x = _first_tensor(inputs)
        if batch is None:
            batch = _rows(inputs)
            if batch is None:
                return None  # (no rows to count: unpaired)
        parts: list[torch.Tensor] = []
        if self.use_input:
            if x is None or x.ndim == 0 or x.shape[0] != batch:
                return None  # not one row per example: unpaired (the warning names features=)
            parts.append(pool_features(x))
        if self.fn is not None:
            self.evaluate([capture])  # (batch-first, whatever the model's layout)
            user = capture.user
            if isinstance(user, Exception):
                raise user
            if (
                not isinstance(user, torch.Tensor)
                or user.ndim == 0
                or user.shape[0] != batch
                or user[:1].numel() == 0
            ):
                got = tuple(user.shape) if isinstance(user, torch.Tensor) else type(user)
                raise ValueError(
                    "the features callable must return a tensor with one non-empty row per "
                    f"example, (B, ...) with B = {batch}; got {got}"
                )
            parts.append(pool_features(user))
        for name in self.layer_names:
            act = capture.layers.get(name)
            if act is not None and not self.batch_first and act.ndim >= 2:
                act = act.movedim(1, 0)  # time-major, as Opacus reads every layer's
            if act is None or act.ndim == 0 or act.shape[0] != batch:
                got = "no output" if act is None else f"an output of shape {tuple(act.shape)}"
                raise ValueError(
                    f"features layer {name!r} gave {got} in this forward, not (B, ...) with "
                    f"B = {batch}: name a batch-first layer that runs in every forward, or "
                    "pass a callable"
                )
            parts.append(pool_features(act))
        if capture.labels is not None and capture.labels.shape[0] != batch:
            self._warn(
                "features:labels:rows",
                f"the wrapped criterion's targets have {capture.labels.shape[0]} rows for "
                f"{batch} examples (one label per token?): they are not label features; pass "
                "features= a callable of the inputs that builds per-example ones",
            )
        if capture.labels is not None and capture.labels.shape[0] == batch:
            labels = capture.labels
            if labels.ndim == 1 and not torch.is_floating_point(labels):
                k = capture.num_classes
                if k is None:
                    self._warn(
                        "features:labels:classes",
                        "the wrapped criterion's first argument is not the logits (nor has "
                        "them as .logits or ['logits']), so the number of classes is read from "
                        "each batch's largest label, and a batch without the top class changes "
                        "the features' width (flag 'features_width_changed'); pass it: "
                        "monitor.wrap_criterion(loss, num_classes=K)",
                    )
                if not k or k < 2:  # a single-logit head: classes from the labels themselves
                    k = max(2, int(labels.max().item()) + 1 if batch else 2)
                parts.append(one_hot_labels(labels, k, check=self._check_labels()))
            else:
                parts.append(pool_features(labels.reshape(batch, -1)))
        if not parts:
            return None
        device = parts[0].device
        return torch.cat([p if p.device == device else p.to(device) for p in parts], dim=1)

    def remove(self) -> None:
        """Remove the hooks and drop the captures no step will take now."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.pending = []
