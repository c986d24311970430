"""opacus-mi: how much a DP-SGD step actually leaks, measured live, next to epsilon.

The public names load on first use (PEP 562), not with the package: ``import opacus_mi`` and
the console script's first line then cost no torch or Opacus import (seconds), so a Ctrl-C in
them ends as one later does (see :mod:`opacus_mi._console`), and ``opacus-mi --help`` is quick.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# name -> the module that defines it
_EXPORTS = {
    "LeakageMonitor": "monitor",
    "MIAccountant": "accounting",
    "LeakageRecord": "records",
    "MIEstimate": "estimators",
    "MIValue": "records",
    "MonitoredPrivacyEngine": "engine",
    "estimate_mi": "estimators",
    "gaussian_channel_bound": "accounting",
    "mi_upper_bound": "accounting",
    "pure_dp_mi_bound": "accounting",
    "read_jsonl": "records",
}
__all__ = [  # (spelled out: linters read __all__ as a literal)
    "LeakageMonitor",
    "MIAccountant",
    "LeakageRecord",
    "MIEstimate",
    "MIValue",
    "MonitoredPrivacyEngine",
    "estimate_mi",
    "gaussian_channel_bound",
    "mi_upper_bound",
    "pure_dp_mi_bound",
    "read_jsonl",
]
__version__ = "0.1.0"

if TYPE_CHECKING:  # (for type checkers and IDEs: the names as they resolve)
    from .accounting import MIAccountant, gaussian_channel_bound, mi_upper_bound, pure_dp_mi_bound
    from .engine import MonitoredPrivacyEngine
    from .estimators import MIEstimate, estimate_mi
    from .monitor import LeakageMonitor
    from .records import LeakageRecord, MIValue, read_jsonl


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # A submodule, as ``import opacus_mi; opacus_mi.monitor`` found it when the package
        # imported its modules eagerly (importing it sets the attribute: not called again).
        return importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # (once: later lookups find it without this function)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
