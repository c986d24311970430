"""opacus-mi: how much a DP-SGD step actually leaks, measured live, next to epsilon."""

from .accounting import MIAccountant, gaussian_channel_bound, mi_upper_bound, pure_dp_mi_bound
from .engine import MonitoredPrivacyEngine
from .estimators import MIEstimate, estimate_mi
from .monitor import LeakageMonitor
from .records import LeakageRecord, MIValue, read_jsonl

__all__ = [
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
