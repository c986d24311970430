"""``RowRing``: the most recent rows of a stream in a ring buffer.

Both the online critic's pair window and the semi-oracle's gradient subspace keep "the last N
rows" of something that arrives a batch at a time. Concatenating and trimming each step copies
the whole buffer; a ring writes only the new rows and hands back the ones they displaced (the
critic's window keeps running sums of its rows, which those must leave).
"""

from __future__ import annotations

import torch


class RowRing:
    """Up to ``size`` rows, oldest overwritten first.

    Storage grows as rows arrive, doubling up to ``size`` (a window of 10**9 pairs allocated
    all of them at the first :meth:`add` and failed there). It grows only before the first
    wrap, while the rows held are slots ``[0, count)`` in arrival order, so the rows, their
    storage order and the rows displaced are those of a buffer of ``size`` rows made at once.
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a ring needs a positive number of rows, got {size}")
        self.size = size
        self.buf: torch.Tensor | None = None
        self.count = 0  # valid rows
        self.head = 0  # next slot to write

    def __len__(self) -> int:
        return self.count

    def add(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Write ``rows`` (only the last ``size`` if there are more); return the rows they
        displaced, oldest first, or None if none were."""
        rows = rows[-self.size :]
        n = rows.shape[0]
        if n == 0:
            return None
        self._reserve(rows, min(self.size, self.count + n))
        evicted = None
        evict = n + self.count - self.size
        if evict > 0:
            oldest = (self.head - self.count) % self.size  # slot 0 until the first wrap
            evicted = self.buf[(torch.arange(evict, device=rows.device) + oldest) % self.size]
        slots = (torch.arange(n, device=rows.device) + self.head) % self.size
        self.buf[slots] = rows
        self.head = (self.head + n) % self.size
        self.count = min(self.size, self.count + n)
        return evicted

    def _reserve(self, rows: torch.Tensor, need: int) -> None:
        """Storage for ``need`` rows (a doubling, at most ``size``; never past the first wrap,
        which needs all ``size`` slots)."""
        held = 0 if self.buf is None else self.buf.shape[0]
        if held >= need:
            return
        like = rows if self.buf is None else self.buf
        buf = like.new_empty((min(self.size, max(need, 2 * held)), *like.shape[1:]))
        if self.count:
            buf[: self.count] = self.buf[: self.count]
        self.buf = buf

    def restore(self, rows: torch.Tensor, head: int) -> None:
        """Hold ``rows`` as a saved ring stored them (storage order), with its write head."""
        self.buf = rows.clone()
        self.count, self.head = len(rows), head % self.size

    def valid(self) -> torch.Tensor | None:
        """The rows held, in storage order (no copy): for order-free uses."""
        return None if self.buf is None else self.buf[: self.count]

    def ordered(self) -> torch.Tensor | None:
        """The rows held, oldest first."""
        if self.buf is None or self.count < self.size:
            return self.valid()
        return torch.cat([self.buf[self.head :], self.buf[: self.head]])

    def clear(self) -> None:
        self.buf = None
        self.count = self.head = 0
