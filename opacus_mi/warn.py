"""Warnings said at the user's line, not at the library frame that noticed the problem.

The monitor notices most problems deep in a call that started in the user's code: inside
Opacus's ``optimizer.step()`` (a step hook), inside a forward hook torch runs, inside
``make_private`` of :class:`~opacus_mi.MonitoredPrivacyEngine`. A fixed ``stacklevel`` names
whichever frame sits there on that path: Opacus's optimizer module or torch's ``Module``, so a
filter that quiets Opacus's own warnings (``module="opacus"``) hid the monitor's too, and the
location shown was not a line the user wrote.
"""

from __future__ import annotations

import sys
import warnings

_INTERNAL = ("opacus_mi", "opacus", "torch")


def say(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` at the first caller outside opacus_mi, Opacus and torch (the user's
    ``optimizer.step()``, ``model(x)`` or ``make_private`` line); at the caller when every
    frame is theirs (a finaliser at exit, the CLI)."""
    frame, level = sys._getframe(1), 2  # (stacklevel 2: say's caller)
    while frame is not None and _internal(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)


def _internal(module: str) -> bool:
    """Whether frames of ``module`` sit between a user's code and the library."""
    return any(module == name or module.startswith(name + ".") for name in _INTERNAL)
