"""Hooks the monitor leaves on the user's model, inert in any copy of it.

A model is copied (``copy.deepcopy`` for a best-model or EMA copy) and pickled
(``torch.save(model)``, a spawned process's argument) while it trains. The monitor's hooks are
closures and bound methods over its live state: pickling failed on them, and a deep copy
reached the monitor (which refuses to be copied) or fed the original monitor the copy's
activations. A copy gets a no-op in each hook's place: it is not monitored, and the model it
is a copy of keeps its hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _inert(*args: Any, **kwargs: Any) -> None:
    """What a copied or unpickled hook does: nothing (None: the module's call goes on as is)."""
    return None


def _make_inert() -> Callable[..., None]:
    return _inert


class GuestHook:
    """``fn`` as a module hook; copies and pickles of it are :func:`_inert`."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple:
        return (_make_inert, ())

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _inert
