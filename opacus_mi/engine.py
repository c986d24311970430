"""``MonitoredPrivacyEngine``: an ``opacus.PrivacyEngine`` that attaches a LeakageMonitor."""

from __future__ import annotations

import difflib
import inspect
import os
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine

from .monitor import MONITOR_STATE_KEY, LeakageMonitor


def _read_checkpoint(path: Any, torch_load_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A checkpoint read ahead of Opacus's own read: memory-mapped from a file (nothing is
    copied until used), or from a stream put back where it was."""
    kwargs = {"weights_only": False, **(torch_load_kwargs or {})}
    if isinstance(path, (str, os.PathLike)):
        try:
            return torch.load(path, **{"mmap": True, **kwargs})
        except RuntimeError:  # (a legacy, non-zip file cannot be mapped)
            return torch.load(path, **{**kwargs, "mmap": False})
    start = path.tell()
    try:
        return torch.load(path, **kwargs)
    finally:
        path.seek(start)


def _check_monitor_kwargs(kwargs: dict[str, Any]) -> None:
    """Unknown monitor options fail here, not at make_private (after it made the model
    private), with the nearest valid names."""
    valid = _monitor_options()
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        said = ", ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()
        )
        raise TypeError(
            f"MonitoredPrivacyEngine got unknown monitor options {said}; "
            f"LeakageMonitor takes {', '.join(sorted(valid))}"
        )


def _monitor_options() -> list[str]:
    params = inspect.signature(LeakageMonitor).parameters
    return [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


class MonitoredPrivacyEngine(PrivacyEngine):
    """Drop-in ``PrivacyEngine``: ``make_private*`` return the usual tuple and set ``.monitor``.

    Keyword arguments other than ``accountant`` and ``secure_mode`` configure the monitor
    (see :class:`LeakageMonitor`). ``delta`` defaults to ``target_delta`` with
    ``make_private_with_epsilon`` and is required with ``make_private``. Each model made
    private gets its own monitor (``.monitors``; ``.monitor`` is the latest; a model made
    private again gets a new one in its old one's place, which is detached), and checkpoints
    carry the state of the saved module's. A copy or pickle of the engine leaves them out:
    they hold live hooks (copy ``monitor.state_dict()`` instead).
    """

    def __init__(
        self, *, accountant: str = "prv", secure_mode: bool = False, **monitor_kwargs: Any
    ):
        _check_monitor_kwargs(monitor_kwargs)
        super().__init__(accountant=accountant, secure_mode=secure_mode)
        self.monitor_kwargs = monitor_kwargs
        self.monitors: list[LeakageMonitor] = []  # one per model, in the order first made private
        self._latest: LeakageMonitor | None = None
        self._target_delta: float | None = None

    @property
    def monitor(self) -> LeakageMonitor | None:
        """The monitor of the model made private last."""
        return self._latest

    def _monitor_of(self, module: Any) -> LeakageMonitor | None:
        """The monitor of ``module``: the module ``make_private`` returned, or the model inside
        it (which Opacus's checkpoints take as well)."""
        return next(
            (
                m
                for m in reversed(self.monitors)
                if m.module is module or getattr(m.module, "_module", None) is module
            ),
            None,
        )

    def __getstate__(self) -> dict[str, Any]:
        # The monitors reference the DPOptimizer, whose copy (torch's Optimizer.__setstate__)
        # re-patches DPOptimizer.step for the whole class and breaks the live training.
        return {**self.__dict__, "monitors": [], "_latest": None}

    def __deepcopy__(self, memo: dict) -> MonitoredPrivacyEngine:
        import copy

        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        return clone

    def _check_before(self, kwargs: dict[str, Any]) -> None:
        """What would fail the monitor, refused before Opacus hooks the user's model."""
        if "delta" not in self.monitor_kwargs and self._target_delta is None:
            raise ValueError(
                "MonitoredPrivacyEngine needs delta for epsilon: pass "
                "MonitoredPrivacyEngine(delta=1e-5, ...) or use make_private_with_epsilon"
            )
        sampling = self.monitor_kwargs.get("poisson_sampling")
        if sampling is not None and sampling != bool(kwargs.get("poisson_sampling", True)):
            raise ValueError(
                f"MonitoredPrivacyEngine(poisson_sampling={sampling!r}) contradicts "
                f"make_private(poisson_sampling={kwargs.get('poisson_sampling', True)!r}): "
                "leave it out of the engine's options, make_private's value is passed on"
            )
        misplaced = [k for k in kwargs if k in _monitor_options() and k != "poisson_sampling"]
        if misplaced:
            # Opacus would pass them on to the DPOptimizer, which ignores unknown keywords.
            raise TypeError(
                f"{', '.join(map(repr, misplaced))} "
                f"{'configures' if len(misplaced) == 1 else 'configure'} the monitor, not "
                "make_private: "
                f"pass them to MonitoredPrivacyEngine({misplaced[0]}=...)"
            )
        if kwargs.get("wrap_model", True) is False:
            raise ValueError(
                "MonitoredPrivacyEngine needs make_private(wrap_model=True), the default: the "
                "monitor reads the per-sample gradients of the GradSampleModule it returns"
            )

    def _attach(self, result: tuple, delta: float | None, poisson_sampling: bool) -> tuple:
        kwargs = dict(self.monitor_kwargs)
        kwargs.setdefault("delta", delta)
        kwargs.setdefault("poisson_sampling", bool(poisson_sampling))  # (the MI bound's)
        module, optimizer = result[0], result[1]
        # make_private again on a model (same module, new optimizer): its new monitor takes the
        # old one's place (which it detaches) and file; another model gets a file of its own.
        old = self._monitor_of(module)
        slot = len(self.monitors) if old is None else self.monitors.index(old)
        jsonl = kwargs.get("jsonl")
        if jsonl and isinstance(jsonl, (str, os.PathLike)) and slot:  # (else the monitor refuses)
            path = Path(jsonl)
            kwargs["jsonl"] = path.with_name(f"{path.stem}.model{slot}{path.suffix}")
        try:
            monitor = LeakageMonitor(self, module, optimizer, **kwargs)
            self.monitors[slot : slot + 1] = [monitor]
            self._latest = monitor
        except Exception:
            # Opacus has hooked the user's model by now: undo that, so that a retry with the
            # option fixed can make the same model private again.
            to_standard = getattr(module, "to_standard_module", None)
            if to_standard is not None:
                to_standard()
            raise
        return result

    def make_private(self, *args: Any, **kwargs: Any):
        """Opacus's ``make_private`` (same arguments, same returned tuple), then a
        :class:`LeakageMonitor` attached to the model and optimizer it returns, as ``.monitor``
        (with the engine's monitor options; ``delta`` is required here). Monitor options passed
        here instead of to the engine, and ``wrap_model=False`` (no per-sample gradients to
        read), are refused before anything is made private."""
        # make_private_with_epsilon calls this too, after setting _target_delta.
        self._check_before(kwargs)
        result = super().make_private(*args, **kwargs)
        return self._attach(result, self._target_delta, kwargs.get("poisson_sampling", True))

    def save_checkpoint(self, *, checkpoint_dict: dict[str, Any] | None = None, **kwargs: Any):
        """Opacus's checkpoint, with the monitor's state in it (critics, generator, records,
        schedule): :meth:`load_checkpoint` resumes the monitor where it stopped."""
        checkpoint_dict = dict(checkpoint_dict or {})
        monitor = self._monitor_of(kwargs.get("module"))
        if monitor is not None:
            checkpoint_dict[MONITOR_STATE_KEY] = monitor.state_dict()
        return super().save_checkpoint(checkpoint_dict=checkpoint_dict, **kwargs)

    def load_checkpoint(self, *, path: Any, **kwargs: Any) -> dict[str, Any]:
        """Opacus's ``load_checkpoint`` (after ``make_private``), then the monitor's state.

        The monitor's state is checked first (other settings are a ValueError), so a refused
        checkpoint leaves the model, optimizer and accountant as they were too."""
        monitor = self._monitor_of(kwargs.get("module"))
        if monitor is not None:
            state = _read_checkpoint(path, kwargs.get("torch_load_kwargs")).get(MONITOR_STATE_KEY)
            if state is not None:
                monitor.check_state(state)
        checkpoint = super().load_checkpoint(path=path, **kwargs)
        state = checkpoint.pop(MONITOR_STATE_KEY, None)
        if state is not None and monitor is not None:
            monitor.load_state_dict(state)
        return checkpoint

    def make_private_with_epsilon(self, *args: Any, target_delta: float, **kwargs: Any):
        """Opacus's ``make_private_with_epsilon``, then a monitor as :meth:`make_private`
        attaches, whose ``delta`` defaults to ``target_delta``."""
        self._target_delta = target_delta
        try:
            return super().make_private_with_epsilon(*args, target_delta=target_delta, **kwargs)
        finally:
            self._target_delta = None
