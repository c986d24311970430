"""Cross-rank gathering for the monitor under Opacus ``DPDDP`` / ``torch.distributed`` (torchrun).

Under DPDDP each rank sees only its own slice of the logical batch, while Opacus releases one
noisy sum over the *global* batch (``DistributedDPOptimizer`` adds the noise on rank 0 and
all-reduces). So the monitor gathers, once per monitored logical step, every rank's chunks
(tokens, features, Gram matrices, ...) in rank order: rank 0's examples, then rank 1's, ...,
which is exactly the batch a single process would hold.

The ``all_gather_*`` functions are *collectives*: all ranks must call them, in the same order,
with data whose sizes may differ (even be empty). The number of ``torch.distributed`` calls one
makes is derived only from data all ranks have already exchanged, so it is identical on every
rank; that is what keeps a rank with an empty Poisson batch, or with a local monitor failure,
from leaving the others waiting. Data travels on :func:`comm_device` (CPU for gloo, which the
tests run; CUDA for NCCL, not yet tested on GPUs) and comes back on the caller's device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from opacus.optimizers import (
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
)
from opacus.optimizers.ddp_perlayeroptimizer import DistributedPerLayerOptimizer

from .warn import say

# What make_private builds for a DPDDP/DDP/FSDP module (SimpleDistributedPerLayerOptimizer
# subclasses DistributedDPOptimizer); each calls pre_step, then all-reduces the gradients.
DISTRIBUTED_OPTIMIZERS = (
    DistributedDPOptimizer,
    DistributedPerLayerOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
)

Item = tuple[Any, dict[str, "torch.Tensor | None"]]


def process_group_active() -> bool:
    """Whether ``torch.distributed`` is built and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 when no process group is active."""
    return dist.get_rank() if process_group_active() else 0


def world_size() -> int:
    """Number of ranks, 1 when no process group is active."""
    return dist.get_world_size() if process_group_active() else 1


def should_gather(distributed: bool | None, optimizer: Any) -> bool:
    """Resolve the monitor's ``distributed`` argument.

    ``None`` (auto) gathers iff Opacus made a distributed optimizer (it does so exactly when the
    module was wrapped in DPDDP/DDP) and more than one rank is running: a process group alone is
    not enough, since ranks may train unrelated models (e.g. a sweep) whose batches must not be
    mixed. ``True`` demands a process group; ``False`` keeps every rank local (each rank then
    records its own slice and calls its own sinks).
    """
    if distributed is None:
        return (
            process_group_active()
            and isinstance(optimizer, DISTRIBUTED_OPTIMIZERS)
            and world_size() > 1
        )
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be None (auto), True or False; got {distributed!r}")
    if distributed and not process_group_active():
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) (torchrun sets the environment) before "
            "creating the monitor, or pass distributed=None"
        )
    if (
        distributed
        and world_size() > 1
        and rank() == 0  # (said once, for every rank: all were given the same optimizer type)
        and not isinstance(optimizer, DISTRIBUTED_OPTIMIZERS)
    ):
        # (Allowed: a loop that averages the ranks' gradients itself. But for ranks that each
        # train a model of their own, their records would mix unrelated batches as one.)
        say(
            f"opacus-mi: distributed=True with a {type(optimizer).__name__}, not the "
            "distributed optimizer Opacus makes for a DPDDP- or DDP-wrapped module: the "
            "records gather every rank's examples as one global batch, which is right only if "
            "the ranks train one model together; for ranks training models of their own pass "
            "distributed=False (or None)",
        )
    return distributed


def comm_device() -> torch.device:
    """Where collective payloads live: CUDA for a pure NCCL group, otherwise CPU (gloo)."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (pickled; for small metadata only)."""
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same_on_every_rank(settings: dict[str, Any]) -> None:
    """Raise a ValueError on every rank alike if any of ``settings`` (argument name -> value)
    differs between ranks: one gather of them all (a collective: every rank must call it)."""
    every = all_gather_objects(settings)  # identical on all ranks, and so is the decision
    differ: dict[str, str] = {}
    for name, value in every[0].items():
        values = [s.get(name) for s in every]
        if any(v != value for v in values):
            ranks: dict[str, list[int]] = {}
            for r, v in enumerate(values):
                ranks.setdefault(repr(v), []).append(r)
            differ[name] = "; ".join(f"{v} on ranks {rs}" for v, rs in ranks.items())
    if differ:
        shown = ", ".join(f"{name} ({values})" for name, values in differ.items())
        raise ValueError(
            f"the monitor's arguments differ between ranks: {shown}. Under DPDDP every rank "
            "measures the same steps and makes the same records from the gathered batch: pass "
            f"the same {', '.join(differ)} on every rank"
        )


def all_gather_flat(local: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Every rank's 1-D ``local`` (whose lengths ``sizes`` all ranks already know), in rank order.

    Pads to the longest, gathers once, trims. Makes no call at all when every rank is empty,
    a decision all ranks reach alike because they share ``sizes``.
    """
    me = rank()
    if local.ndim != 1 or local.numel() != sizes[me]:
        raise ValueError(
            f"local must be 1-D with sizes[rank] = {sizes[me]} elements; got shape "
            f"{tuple(local.shape)}"
        )
    longest = max(sizes)
    if longest == 0:
        return [local.new_empty(0) for _ in sizes]
    device = comm_device()
    padded = torch.zeros(longest, dtype=local.dtype, device=device)
    padded[: local.numel()] = local.to(device)
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [t[:n] for t, n in zip(out, sizes, strict=True)]


class GatherError(RuntimeError):
    """A collective of the monitor's gather failed: the process group is broken (a rank
    stopped or timed out), so the step cannot complete on any rank. Raised, not recorded."""


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``(n_r, ...)`` tensor along dim 0 in rank order (``n_r`` may be 0).

    Sizes are exchanged first (one small gather), then the padded rows (one gather). The
    trailing shape and dtype must agree across ranks.
    """
    device = comm_device()
    shape = torch.tensor([local.shape[0], math.prod(local.shape[1:])], device=device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    widths = {int(s[1]) for s in shapes if int(s[0]) > 0}
    if len(widths) > 1:
        raise ValueError(f"ranks disagree on the row shape: widths {sorted(widths)}")
    parts = all_gather_flat(local.detach().reshape(-1), [int(s[0]) * int(s[1]) for s in shapes])
    rows = torch.cat(parts).to(local.device)
    return rows.reshape(-1, *local.shape[1:])


def all_gather_items(
    items: Sequence[Item],
    device: torch.device | str = "cpu",
    *,
    timings: dict[str, float] | None = None,
) -> list[Item]:
    """Every rank's ``(meta, {name: tensor or None})`` items, concatenated in rank order.

    ``meta`` is any small picklable value. Tensors may have any shape (empty too) and are
    grouped by dtype, so a step costs one metadata gather plus one gather per dtype, however
    many items and tensors each rank holds. Tensors come back on ``device``. ``timings`` gets
    ``"first"``: the host seconds of the metadata gather, which is mostly waiting for the
    slowest rank to arrive (its transfer is a few hundred bytes).
    """
    specs = [
        (meta, [(k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in tensors.items()])
        for meta, tensors in items
    ]
    t0 = time.perf_counter()
    every_spec = all_gather_objects(specs)  # identical on all ranks from here on
    if timings is not None:
        timings["first"] = time.perf_counter() - t0
    dtypes = sorted({dtype for specs in every_spec for _, dtype in _shapes(specs)}, key=str)
    buffers: dict[torch.dtype, list[torch.Tensor]] = {}
    comm = comm_device()  # tensors of one item may live on different devices
    for dtype in dtypes:
        mine = [
            t.detach().reshape(-1).to(comm)
            for _, tensors in items
            for t in tensors.values()
            if t is not None and t.dtype == dtype
        ]
        sizes = [
            sum(math.prod(shape) for shape, d in _shapes(sp) if d == dtype) for sp in every_spec
        ]
        local = torch.cat(mine) if mine else torch.empty(0, dtype=dtype, device=comm)
        buffers[dtype] = all_gather_flat(local, sizes)
    out: list[Item] = []
    for r, rank_specs in enumerate(every_spec):
        offsets = dict.fromkeys(dtypes, 0)
        for meta, fields in rank_specs:
            tensors: dict[str, torch.Tensor | None] = {}
            for key, spec in fields:
                if spec is None:
                    tensors[key] = None
                    continue
                shape, dtype = spec
                start, offsets[dtype] = offsets[dtype], offsets[dtype] + math.prod(shape)
                tensors[key] = buffers[dtype][r][start : offsets[dtype]].reshape(shape).to(device)
            out.append((meta, tensors))
    return out


def _shapes(specs: list) -> Iterator[tuple[tuple[int, ...], torch.dtype]]:
    """The ``(shape, dtype)`` of every tensor (not None) one rank described, in order."""
    for _, fields in specs:
        for _, spec in fields:
            if spec is not None:
                yield spec
