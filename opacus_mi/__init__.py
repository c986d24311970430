"""opacus-mi: how much a DP-SGD step actually leaks, measured live, next to epsilon."""

from .engine import MonitoredPrivacyEngine
from .estimators import MIEstimate, estimate_mi, gaussian_channel_bound
from .monitor import LeakageMonitor
from .records import LeakageRecord, MIValue, read_jsonl

__all__ = [
    "LeakageMonitor",
    "LeakageRecord",
    "MIEstimate",
    "MIValue",
    "MonitoredPrivacyEngine",
    "estimate_mi",
    "gaussian_channel_bound",
    "read_jsonl",
]
__version__ = "0.1.0"
