"""``Chunk``: what the monitor measured on one physical batch, and its wire format under DPDDP.

One logical DP step is one or more chunks (``BatchMemoryManager`` splits it; under DPDDP every
rank contributes its own). Each chunk holds the gradient views' tokens, the paired features and
the oracle's per-example terms. Under DPDDP the private view's random draws wait until every
rank's chunks are gathered (``pending``), so that all ranks draw them in the same order from
identically seeded generators; :func:`pack` and :func:`unpack` turn a chunk into the
``(metadata, tensors)`` items :func:`opacus_mi.distributed.all_gather_items` moves, and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# How far above the clipping bound an example's released gradient may read before the step is
# flagged exceeds_clip (see LeakageMonitor._check_contribution): rounding stays below this.
CLIP_SLACK = 0.01


def half_slack(dtype: torch.dtype) -> float:
    """The slack for gradients or norms in a half precision: 4 ulps of one (3.1% in bfloat16)."""
    return max(CLIP_SLACK, 4 * torch.finfo(dtype).eps)


@dataclass
class Chunk:
    """One physical batch's measurements (``batch`` examples, ``flags`` for what went wrong)."""

    batch: int
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None
    oracle_terms: torch.Tensor | None = None
    oracle_var: torch.Tensor | None = None  # each term's Monte Carlo variance (OracleResult)
    # The Gram matrix and noise std the oracle drew with, until the record: its union floor
    # (estimators.oracle.union_deficits) is made from them where it reads near ln B.
    oracle_gram: tuple[torch.Tensor, float] | None = None
    oracle_top: float | torch.Tensor | None = None  # its largest diagonal entry (OracleResult)
    flags: list[str] = field(default_factory=list)
    slack: float = CLIP_SLACK  # (see half_slack)
    # Distributed only: (clipped tokens, Gram matrix, noise std) whose random draws wait until
    # every rank's chunks are gathered.
    pending: tuple[torch.Tensor, torch.Tensor, float] | None = None
    # Sync-free (off the CPU, one process): which rows are finite (gradients and features, and
    # gradients alone), still on the device; rows are dropped once the record has read them.
    keep: torch.Tensor | None = None
    grads_ok: torch.Tensor | None = None
    seconds: float = 0.0  # the time measuring it took (on this rank): its record's to report
    rank: int = 0  # the DPDDP rank that measured it (0 in one process)


Item = tuple[dict[str, Any], dict[str, torch.Tensor | None]]


def pack(chunk: Chunk) -> Item:
    """A chunk as ``(metadata, tensors)`` for :func:`~opacus_mi.distributed.all_gather_items`."""
    tensors: dict[str, torch.Tensor | None] = {f"tokens/{v}": t for v, t in chunk.tokens.items()}
    tensors["features"] = chunk.features
    tensors["oracle_terms"] = chunk.oracle_terms
    tensors["oracle_var"] = chunk.oracle_var
    std = None
    if chunk.pending is not None:
        clipped, gram, std = chunk.pending
        if chunk.tokens.get("clipped") is not clipped:  # else sent once, as tokens/clipped
            tensors["pending/clipped"] = clipped
        tensors["pending/gram"] = gram
    return {"batch": chunk.batch, "flags": chunk.flags, "std": std, "slack": chunk.slack}, tensors


def empty_item(flags: list[str] | None = None) -> Item:
    """What a rank sends when it has nothing (no chunk, or packing failed): it still joins."""
    return {"batch": 0, "flags": list(flags or []), "std": None}, {}


def unpack(item: Item) -> tuple[Chunk, torch.Tensor | None, torch.Tensor | None, float | None]:
    """``(chunk, clipped tokens, Gram, noise std)`` of a gathered item; the last three are
    None unless its private-view draws are still to be made (see :func:`pack`)."""
    meta, tensors = item
    tensors = dict(tensors)
    gram = tensors.pop("pending/gram", None)
    clipped = tensors.pop("pending/clipped", None)
    chunk = Chunk(
        batch=meta["batch"],
        features=tensors.pop("features", None),
        oracle_terms=tensors.pop("oracle_terms", None),
        oracle_var=tensors.pop("oracle_var", None),
        flags=list(meta["flags"]),
        slack=meta.get("slack", CLIP_SLACK),
    )
    chunk.tokens = {k.removeprefix("tokens/"): t for k, t in tensors.items()}
    if meta["std"] is not None and clipped is None:
        clipped = chunk.tokens.get("clipped")
    return chunk, clipped, gram, meta["std"]
