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


def plain_numbers(config: Any) -> None:
    """A config dataclass's NumPy scalars (also inside tuples and lists) as Python numbers, in
    place: a grid built with ``np.arange`` or ``np.int64`` counts is taken as typed."""
    for name in getattr(config, "__dataclass_fields__", {}):
        setattr(config, name, plain_values(getattr(config, name)))


def plain_values(value: Any) -> Any:
    """:func:`python_number` of a value, or of each in a tuple, list or 1-D NumPy array (one
    made with ``np.arange``: a tuple)."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", 0) == 1:
        value = tuple(value.tolist())
    if isinstance(value, (tuple, list)):
        return type(value)(python_number(v) for v in value)
    return python_number(value)


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


def is_torch_seed(x: Any) -> bool:
    """An integer ``torch.Generator.manual_seed`` takes: from -2**63 to 2**64 - 1 (beyond,
    torch raises a bare 'Overflow when unpacking long long')."""
    return is_int_at_least(x, -(2**63)) and x < 2**64


def check_torch_seed(value: Any) -> None:
    """Refuse a ``seed`` torch's ``manual_seed`` would not take, saying its range."""
    if not is_torch_seed(value):
        raise ValueError(
            "seed must be an integer from -2**63 to 2**64 - 1, as torch's manual_seed takes; "
            f"got {value!r}"
        )


def available_device(name: str, value: Any) -> Any:
    """``torch.device(value)``, refused naming ``name`` if torch does not know it (``"gpu"``)
    or this machine lacks it (CUDA without a GPU or past its last index, MPS off a Mac)."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):  # (torch's message lists every device type it knows)
        raise ValueError(
            f"{name} must be a torch device such as 'cpu', 'cuda' or 'cuda:1'; got {value!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {value!r} asked for CUDA, but CUDA is not available here")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"{name} {value!r} asked for a GPU this machine lacks: it has "
            f"{torch.cuda.device_count()} (indices from 0)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {value!r} asked for MPS, but MPS is not available here")
    # Any other accelerator (xpu, ...) by its torch module's is_available(); meta tensors hold
    # no data to compute on.
    available = getattr(getattr(torch, dev.type, None), "is_available", None)
    if dev.type == "meta" or (
        dev.type not in ("cpu", "cuda", "mps") and not (callable(available) and available())
    ):
        raise ValueError(
            f"{name} {value!r}: {dev.type} is not available here; pass {name} 'cpu' or an "
            "accelerator this machine has"
        )
    return dev


def require_positive(name: str, value: Any) -> None:
    if not is_finite_number(value) or value <= 0:
        raise ValueError(f"{flag(name)} must be a positive finite number; got {value!r}")


FLOAT32_MAX = 3.4028234663852886e38  # the models' weights are float32


def require_learning_rate(name: str, value: Any) -> None:
    """A positive learning rate that a float32 step can take (above float32's largest number
    torch's SGD fails inside ``optimizer.step()`` with an overflow traceback)."""
    require_positive(name, value)
    if value > FLOAT32_MAX:
        raise ValueError(
            f"{flag(name)} must be at most {FLOAT32_MAX:.3g} (float32's largest number, the "
            f"weights' type); got {value!r}. SGD on these models takes about 0.05-1"
        )


def require_finite_weights(
    model: Any, *, when: str, lr: float, noise: float, records: str = ""
) -> None:
    """Stop a run whose weights have gone NaN or infinite: every later step, the accuracy and
    the monitor's records would be of a diverged model (test accuracy at chance, flags only).
    ``noise``: the DP noise's standard deviation, sigma x C.
    One host read of the model's weights: call it at an epoch's end, not every step."""
    import torch

    with torch.no_grad():
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if not finite:
        raise ValueError(
            f"training diverged {when}: the model's weights are no longer finite (NaN or inf), "
            f"so its accuracy and any later figure would mean nothing. Lower {flag('lr')} "
            f"({lr:g} here) or the noise's standard deviation, {flag('noise_multiplier')} x "
            f"{flag('max_grad_norm')} ({noise:g} here){records}"
        )


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


def is_folder_path(value: Any) -> bool:
    """A str or path-like that is not blank (whether a folder is there is another question)."""
    return isinstance(value, (str, os.PathLike)) and bool(str(value).strip())


def require_folder(name: str, value: Any) -> None:
    """A folder path, not blank (one to write into need not exist yet)."""
    if not is_folder_path(value):
        raise ValueError(f"{flag(name)} must be a folder path; got {value!r}")
