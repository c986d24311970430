"""MI estimators: variational bounds, critics, the white-box oracle, and ``estimate_mi``."""

from .bounds import BOUNDS, dv_bound, infonce_bound, nwj_bound, smile_bound
from .estimate import MIEstimate, estimate_mi
from .online import OnlineEstimator
from .oracle import gram_oracle

__all__ = [
    "BOUNDS",
    "MIEstimate",
    "OnlineEstimator",
    "dv_bound",
    "estimate_mi",
    "gram_oracle",
    "infonce_bound",
    "nwj_bound",
    "smile_bound",
]
