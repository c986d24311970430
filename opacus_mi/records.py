"""Records: one row per monitored DP step, and the sinks that keep them.

A record is plain data (floats, ints, strings) so it serialises to JSON without custom encoders
and can be re-read by ``opacus-mi report``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .warn import say

# A record's private-view estimate is flagged ``exceeds_bound`` above its proven bound at this
# two-sided level (see the monitor's _exceeds): a correct estimate whose truth is at the bound
# is flagged in EXCEEDS_RATE of records, so a long run shows some by chance; the report calls a
# run's flags a bug only where they are more than that rate explains (exceedances).
EXCEEDS_LEVEL = 0.999
EXCEEDS_RATE = (1 - EXCEEDS_LEVEL) / 2

MI_FIELDS = ("nats", "ci_low", "ci_high", "n", "mismatched", "control", "ceiling")
_OPTIONAL_MI_FIELDS = ("mismatched", "control", "ceiling")


@dataclass
class MIValue:
    """One MI series value in nats: the (held-out) bound and its confidence interval."""

    nats: float
    ci_low: float
    ci_high: float
    n: int
    mismatched: float | None = None  # the same critic on shuffled pairs (estimator bias floor)
    control: float | None = None  # a critic trained on shuffled pairs, held out: should be ~0
    # The most the figure can read where that is not ln n: the oracle's candidates are each
    # physical chunk's (BatchMemoryManager) or rank's (DPDDP) examples, so its ceiling is the
    # per-example mean of ln of their sizes (sum n_i ln n_i / sum n_i), below ln B.
    ceiling: float | None = None

    @property
    def log_b(self) -> float:
        """The ceiling of an InfoNCE-type figure: ``ceiling``, else ``ln n``."""
        if self.ceiling is not None:
            return self.ceiling
        return math.log(self.n) if self.n > 0 else math.nan

    @property
    def difference(self) -> float | None:
        """Matched less shuffled pairs' figure: what the critic finds beyond what it reads
        where there is nothing to find (None where no shuffled figure is made)."""
        return None if self.mismatched is None else self.nats - self.mismatched

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain values, with ``difference`` (a JSON line's ``mi`` entries)."""
        d = asdict(self)
        d["difference"] = self.difference
        return d


@dataclass
class LeakageRecord:
    """Everything known about one monitored logical step."""

    step: int
    batch_size: int
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    epsilon: float
    delta: float
    mi: dict[str, MIValue] = field(default_factory=dict)  # key: "view/estimator"
    mi_bound: float | None = None  # per-step Gaussian channel bound of the private view
    mi_upper_bound: float | None = None  # MI accountant: cumulative bound for one example
    chunks: int = 1
    monitor_seconds: float = 0.0
    flags: list[str] = field(default_factory=list)
    # The step whose accountant history gave ``epsilon``: ``step`` itself, except when the
    # overhead budget (on a fixed schedule, its epsilon pacer) could not afford recomputing an
    # expensive (PRV) epsilon on this step and the record carries the latest exact value
    # instead. None in records from older versions.
    epsilon_step: int | None = None

    @property
    def carries_earlier_epsilon(self) -> bool:
        """Whether ``epsilon`` is an earlier step's (``epsilon_step``), not this step's own."""
        return self.epsilon_step is not None and self.epsilon_step != self.step

    def as_dict(self) -> dict[str, Any]:
        """The record as plain values (one JSON line of ``records.jsonl``; ``from_dict`` reads
        it back)."""
        d = asdict(self)
        d["mi"] = {k: v.as_dict() for k, v in self.mi.items()}
        return json_safe(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LeakageRecord:
        """A record from :meth:`as_dict`; a field of the wrong type is a TypeError naming it."""
        d = {k: float_of(v) for k, v in d.items()}
        for name in _FLOATS:  # (earlier versions wrote a non-finite float as null)
            if name in d and d[name] is None:
                d[name] = math.nan
        for names, kinds, optional in (
            (_FLOATS, "a number", False),
            (_OPTIONAL_FLOATS, "a number or null", True),
            (_INTS, "an integer", False),
            (("epsilon_step",), "an integer or null", True),
        ):
            for name in names:
                value = d.get(name)
                if name not in d or (optional and value is None):
                    continue
                want = int if kinds.startswith("an integer") else (int, float)
                if isinstance(value, bool) or not isinstance(value, want):
                    raise TypeError(f"{name} is {value!r}, not {kinds}")
        flags = d.get("flags", [])
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise TypeError(f"flags is {flags!r}, not a list of strings")
        mi = d.pop("mi", {})
        if not isinstance(mi, dict) or not all(isinstance(v, dict) for v in mi.values()):
            raise TypeError(f"mi is {mi!r}, not a mapping of estimates")
        mi = {k: MIValue(**{f: float_of(v.get(f)) for f in MI_FIELDS}) for k, v in mi.items()}
        for key, value in mi.items():
            for f in ("nats", "ci_low", "ci_high"):  # (null, as NaN once was: NaN again)
                if getattr(value, f) is None:
                    setattr(value, f, math.nan)
            bad = {
                f: getattr(value, f)
                for f in MI_FIELDS
                if not _number_or_none(getattr(value, f), optional=f in _OPTIONAL_MI_FIELDS)
            }
            if bad:
                raise TypeError(f"mi[{key!r}] has {bad}, not numbers")
        return cls(mi=mi, **d)


_FLOATS = (
    "noise_multiplier", "max_grad_norm", "sample_rate", "epsilon", "delta", "monitor_seconds"
)  # fmt: skip
_OPTIONAL_FLOATS = ("mi_bound", "mi_upper_bound")
_INTS = ("step", "batch_size", "chunks")


# JSON has no NaN/Inf. Written as null they were lost: a noiseless run's epsilon (inf) read back
# as None. As these strings they stay valid JSON and read back as the floats they were.
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _number_or_none(value: Any, *, optional: bool) -> bool:
    if value is None:
        return optional
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def float_of(value: Any) -> Any:
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def json_safe(obj: Any) -> Any:
    """A dict JSON can hold: NaN/Inf floats as ``"nan"``, ``"inf"``, ``"-inf"``; NumPy scalars
    as the Python numbers they are (a NumPy inf was written ``"np.float64(inf)"``, which made
    the whole file unreadable)."""
    if isinstance(obj, numbers.Integral) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, numbers.Real) and not isinstance(obj, bool):
        obj = float(obj)
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


# The newest JsonlSink of each file in this process, by serial number (see JsonlSink).
_NEWEST: dict[str, int] = {}
_SERIALS = itertools.count()


class JsonlSink:
    """Appends one JSON line per record and flushes it to the OS at once.

    Opened in append mode so a resumed run continues the same file; a killed process loses at
    most the record it was writing. Once a newer sink in this process opens the same file, this
    one writes nothing more (with a warning): an abandoned monitor's last records, delivered at
    exit or when it is collected, landed among a resumed run's lines, and read_jsonl then took
    the stale step for a restart and left the resumed run's records out.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self._open()
        self.fsync = fsync
        self._key = os.path.realpath(self.path)
        self._serial = _NEWEST[self._key] = next(_SERIALS)
        self.left_out = 0  # records not written: a newer sink had the file
        # The latest record begun, and where its line starts: a resumed delivery of it writes
        # it only if the file has not grown since (see __call__).
        self._writing: LeakageRecord | None = None
        self._writing_at = 0

    def __call__(self, record: LeakageRecord) -> None:
        if _NEWEST.get(self._key) != self._serial:
            self.left_out += 1
            if self.left_out == 1:
                say(
                    f"opacus-mi: the record of step {record.step} was not written to "
                    f"{self.path}: a newer monitor writes to that file (this one was never "
                    "detached; call detach() when a run ends or is abandoned)"
                )
            return
        line = json.dumps(record.as_dict()) + "\n"
        if self._fh is None:  # (a failed write's reopening failed too: once more)
            self._fh = self._open()
        if record is self._writing and self._fh.tell() != self._writing_at:
            # A delivery an interrupt cut short, resumed: the line went out before it landed.
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            return
        self._writing_at = self._fh.tell()  # (first: an interrupt between the two rewrites)
        self._writing = record
        try:
            self._fh.write(line)
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
        except OSError:
            self._undo(self._writing_at)
            raise

    def _open(self) -> io.TextIOWrapper:
        fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run
        if fh.tell() and not _ends_with_newline(self.path):
            fh.write("\n")  # a killed run's torn last line: resume on a line of our own
        return fh

    def _undo(self, at: int) -> None:
        """The file as it was before a write that failed (a full disk, a file size limit): the
        line's unwritten rest, kept in the buffer, landed with the next record's flush once
        there was room, and its written part stayed as a torn line if none came; so a record
        whose write raised was in the file or not, by chance. Now it is not, and the file holds
        whole lines only."""
        fh, self._fh = self._fh, None
        with contextlib.suppress(OSError, ValueError):
            fh.buffer.raw.close()  # (the buffer dropped unwritten: closing would flush it)
            fh.close()
        with contextlib.suppress(OSError):
            os.truncate(self.path, at)
        with contextlib.suppress(OSError):
            self._fh = self._open()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def read_jsonl(path: str | os.PathLike) -> list[LeakageRecord]:
    """Records written by :class:`JsonlSink`, in step order.

    A line that is not complete JSON is the record a killed run was writing; it is skipped with
    a ``RuntimeWarning`` that names it (a resumed run appends after it). A complete JSON line
    that is not a record is an error: this is then not a records file. A record whose step
    does not follow the last one's starts over from there (a run resumed from an earlier
    checkpoint appends the steps since again): the records it supersedes are left out, with a
    ``RuntimeWarning`` that counts them.
    """
    out: list[LeakageRecord] = []
    torn: list[int] = []
    superseded = 0
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    torn.append(number)
                    continue
                try:
                    record = LeakageRecord.from_dict(d)
                except (TypeError, AttributeError) as err:
                    raise ValueError(
                        f"{name}, line {number}: JSON but not a leakage record ({err}); "
                        "pass a records.jsonl written by opacus-mi (JsonlSink)"
                    ) from None
                if out and record.step <= out[-1].step:
                    keep = [r for r in out if r.step < record.step]
                    superseded, out = superseded + len(out) - len(keep), keep
                out.append(record)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{name} is not text ({err.reason} at byte {err.start}): pass a records.jsonl "
            "written by opacus-mi (JsonlSink)"
        ) from None
    if len(torn) > 1 and not out:
        raise ValueError(
            f"{name}: no line is a leakage record ({len(torn)} lines are not JSON): pass a "
            "records.jsonl written by opacus-mi (JsonlSink)"
        )
    if superseded:
        warnings.warn(
            f"{name}: left out {superseded} record(s) that a later record's step superseded "
            "(a run resumed from an earlier checkpoint wrote those steps again, or another run "
            "was appended to the file)",
            RuntimeWarning,
            stacklevel=2,
        )
    if torn:
        warnings.warn(
            f"{os.fspath(path)}: skipped {len(torn)} line(s) that are not complete JSON (line "
            f"{', '.join(map(str, torn))}): a record a killed run was writing",
            RuntimeWarning,
            stacklevel=2,
        )
    return out


def exceedances(records: Sequence[LeakageRecord]) -> list[tuple[str, int, int, float]]:
    """Per key flagged ``exceeds_bound``: ``(key, flagged, records, p)``, ``p`` the chance
    that a correct estimate is flagged on at least that many of the records measuring it
    (a binomial tail at EXCEEDS_RATE a record)."""
    from scipy.stats import binom

    out = []
    flagged: dict[str, int] = {}
    for r in records:
        for f in r.flags:
            if f.startswith("exceeds_bound:"):
                key = f.removeprefix("exceeds_bound:")
                flagged[key] = flagged.get(key, 0) + 1
    for key, k in sorted(flagged.items()):
        n = sum(1 for r in records if key in r.mi and r.mi_bound is not None)
        out.append((key, k, max(n, k), float(binom.sf(k - 1, max(n, k), EXCEEDS_RATE))))
    return out
