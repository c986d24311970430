"""``ReadBatch``: device values a step needs on the host, read back in one transfer.

Off the CPU every read of a device value on the host (``item()``, ``tolist()``, a boolean mask's
count) waits for everything queued on the device: a host synchronisation. So the monitor's step
collects what its record needs (critic bounds, the oracle's mean and spread, the count of finite
rows) and reads it once, and the critics' training rounds of a step likewise, together.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ReadBatch:
    """Tensors to read back together: ``add`` them, then ``read()`` once; each part's numbers
    are then ``batch[slot]`` and go to its ``then`` callback, in the order they were added."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._parts: list[torch.Tensor] = []
        self._then: list[Callable[[list[float]], object] | None] = []
        self._numbers: list[list[float]] = []

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, values: torch.Tensor, then: Callable[[list[float]], object] | None = None) -> int:
        """Queue ``values`` (any shape; read as float64, flattened); returns its slot."""
        self._parts.append(values.reshape(-1))
        self._then.append(then)
        return len(self._parts) - 1

    def read(self) -> None:
        """The one transfer (nothing if nothing was added), then the callbacks in order."""
        if not self._parts:
            return
        flat = torch.cat([p.to(self.device, torch.float64) for p in self._parts]).tolist()
        at = 0
        for part in self._parts:
            self._numbers.append(flat[at : at + part.numel()])
            at += part.numel()
        for numbers, then in zip(self._numbers, self._then, strict=True):
            if then is not None:
                then(numbers)

    def __getitem__(self, slot: int) -> list[float]:
        return self._numbers[slot]
