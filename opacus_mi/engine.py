"""``MonitoredPrivacyEngine``: an ``opacus.PrivacyEngine`` that attaches a LeakageMonitor."""

from __future__ import annotations

from typing import Any

from opacus import PrivacyEngine

from .monitor import LeakageMonitor


class MonitoredPrivacyEngine(PrivacyEngine):
    """Drop-in ``PrivacyEngine``: ``make_private*`` return the usual tuple and set ``.monitor``.

    Keyword arguments other than ``accountant`` and ``secure_mode`` configure the monitor
    (see :class:`LeakageMonitor`). ``delta`` defaults to ``target_delta`` with
    ``make_private_with_epsilon`` and is required with ``make_private``.
    """

    def __init__(
        self, *, accountant: str = "prv", secure_mode: bool = False, **monitor_kwargs: Any
    ):
        super().__init__(accountant=accountant, secure_mode=secure_mode)
        self.monitor_kwargs = monitor_kwargs
        self.monitor: LeakageMonitor | None = None
        self._target_delta: float | None = None

    def _attach(self, result: tuple, delta: float | None) -> tuple:
        kwargs = dict(self.monitor_kwargs)
        if "delta" not in kwargs:
            if delta is None:
                raise ValueError(
                    "MonitoredPrivacyEngine needs delta for epsilon: pass "
                    "MonitoredPrivacyEngine(delta=1e-5, ...) or use make_private_with_epsilon"
                )
            kwargs["delta"] = delta
        if self.monitor is not None:
            self.monitor.detach()
        module, optimizer = result[0], result[1]
        self.monitor = LeakageMonitor(self, module, optimizer, **kwargs)
        return result

    def make_private(self, *args: Any, **kwargs: Any):
        # make_private_with_epsilon calls this too, after setting _target_delta.
        return self._attach(super().make_private(*args, **kwargs), self._target_delta)

    def make_private_with_epsilon(self, *args: Any, target_delta: float, **kwargs: Any):
        self._target_delta = target_delta
        try:
            return super().make_private_with_epsilon(*args, target_delta=target_delta, **kwargs)
        finally:
            self._target_delta = None
