"""Argument checks shared by the command-line front ends (``run``, ``sweep``, ``validate``)
and, as predicates, by ``LeakageMonitor``'s constructor.

The ``require_*`` checks raise ``ValueError`` naming the flag as it is typed on the command line
and what it accepts, so a bad value fails before any data is loaded or any step is trained.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any


def flag(name: str) -> str:
    """A config field's command-line spelling: ``max_grad_norm`` -> ``--max-grad-norm``."""
    return "--" + name.replace("_", "-")


def python_number(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds (hyperparameters computed with NumPy);
    anything else as it is."""
    item = getattr(value, "item", None)
    if item is not None and type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        return item()
    return value


def is_finite_number(x: Any) -> bool:
    """A finite int or float (``bool`` is an int to Python, but never a valid number here; an
    int too large for a float is not finite either, rather than an ``OverflowError``)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def is_int_at_least(x: Any, low: int) -> bool:
    """An ``int`` >= ``low`` (``True`` is an int to Python, not a count to a user)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def require_positive(name: str, value: Any) -> None:
    if not is_finite_number(value) or value <= 0:
        raise ValueError(f"{flag(name)} must be a positive finite number; got {value!r}")


def require_int_at_least(name: str, value: Any, low: int) -> None:
    if not is_int_at_least(value, low):
        raise ValueError(f"{flag(name)} must be an integer >= {low}; got {value!r}")


SEED_MAX = 2**32 - 1  # NumPy's and scikit-learn's seeds (the digits split) stop here


def require_seed(value: Any) -> None:
    if not is_int_at_least(value, 0) or value > SEED_MAX:
        raise ValueError(f"{flag('seed')} must be an integer from 0 to {SEED_MAX}; got {value!r}")


def require_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{flag(name)} must be one of {', '.join(choices)}; got {value!r}")


def require_folder(name: str, value: Any) -> None:
    """A folder to write into: a path, not blank (it need not exist yet)."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"{flag(name)} must be a folder path; got {value!r}")
