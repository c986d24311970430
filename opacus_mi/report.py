"""Reports: records -> readable tables (more sinks and plots live here as they arrive)."""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .checks import is_int_at_least
from .estimators.bounds import t_quantile
from .records import LeakageRecord, exceedances


def fmt_number(x: Any, digits: int = 3) -> str:
    """``digits`` decimals; a small figure to ``digits`` significant ones (a bound of 0.00125
    nats at sigma 20 read 0.001); an infinite bound (sigma 0) as ``inf``, not the ``-`` of a
    figure that does not apply or is missing (None, NaN, not a number). The summary's, the
    sweep's and validate's tables alike."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(x):
        return "-"
    x = float(x)  # (NumPy's scalars too)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    # (decided on the rounded figure: 0.96 at one decimal is 1.0, as 1.04 is)
    if x != 0 and abs(float(f"{x:.{digits}g}")) < 10 ** (1 - digits):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}"


def fmt_interval(mid: Any, low: Any, high: Any, digits: int = 3) -> str:
    """``mid [low, high]``, the ends to the midpoint's decimals (``0.015 [0.009, 0.021]``, where
    each by itself read ``0.015 [0.00915, 0.021]``: one end to more places than the figure it
    brackets). A midpoint :func:`fmt_number` writes in exponent form, or that is missing, leaves
    each end to its own rule, as does a non-zero end those places round to zero; a missing or
    infinite end reads as :func:`fmt_number` says."""
    text = fmt_number(mid, digits)
    if text in ("-", "inf", "-inf") or "e" in text:
        return f"{text} [{fmt_number(low, digits)}, {fmt_number(high, digits)}]"
    places = len(text.partition(".")[2])

    def end(x: Any) -> str:
        said = fmt_number(x, digits)
        if said in ("-", "inf", "-inf"):
            return said
        rounded = f"{float(x):.{places}f}"
        # (an end the midpoint's places round to zero, -0.0003 as "-0.000": by its own rule)
        return said if x != 0 and float(rounded) == 0 else rounded

    return f"{text} [{end(low)}, {end(high)}]"


def fmt_epsilon(x: float) -> str:
    """Epsilon as :func:`fmt_number` gives it (2.5e-05 at sigma 1e4 read 0.000), and NaN, an
    accountant that could not compute it, as ``nan``."""
    return "nan" if isinstance(x, float) and math.isnan(x) else fmt_number(x)


def render_table(table: Table, width: int) -> str:
    """``table`` as plain text ``width`` wide, without the trailing spaces rich pads a wrapped
    title's lines with (they went into summary.txt and the sweep's and validate's tables)."""
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip().splitlines())


def mean_with_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-step estimates with Student's t interval (NaN-safe)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, math.nan
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    half = t_quantile(level, len(v) - 1) * sd / math.sqrt(len(v))
    return m, m - half, m + half


def summary_table(
    records: Sequence[LeakageRecord],
    *,
    last: int = 20,
    width: int = 132,
    note: str | None = None,
    epsilon_now: float | None = None,
    steps: int | None = None,
    mi_bound_now: float | None = None,
    expected: Sequence[str] = (),
) -> str:
    """Render the leakage table: one row per MI series, averaged over the last records.

    ``last`` value is the latest held-out estimate with its CI (its step named where the last
    record has none: a semi-oracle still warming up, non-finite gradients); ``mean`` averages the
    last ``last`` records with a 95% interval across steps; ``shuffled`` is the same critic on
    mismatched pairs (what the estimator reports when there is nothing to find). ``note`` is
    appended as a last line (the monitor's schedule). ``epsilon_now``: the accountant's epsilon
    now, shown beside a last record that carries an earlier step's (a paced PRV epsilon).
    ``steps``: the steps the run has taken; where the last record is of an earlier one
    (``every`` > 1), the title says so and gives ``epsilon_now`` and ``mi_bound_now`` (the MI
    accountant's figure) after the last step, not the record's as the run's. ``expected``: the
    series the run asked for (``view/estimator``); one no record holds is named under the
    table (a short run's critics still filling their windows), not left out without a word.
    """
    if not is_int_at_least(last, 1):  # (0 averaged every record: [-0:] is the whole list)
        raise ValueError(f"last must be an integer >= 1, the records to average; got {last!r}")
    if not records:
        return "no monitored steps yet"
    tail = list(records)[-last:]
    final = records[-1]
    keys: dict[str, None] = {}
    for r in records:
        for k in r.mi:
            keys.setdefault(k, None)
    behind = steps is not None and steps > final.step + 1
    after = [  # (the run after its last step, where the last record is older)
        *([f"epsilon {fmt_epsilon(epsilon_now)}"] if epsilon_now is not None else []),
        *([f"MI accountant <= {mi_bound_now:.4g} nats"] if mi_bound_now is not None else []),
    ]
    table = Table(
        title=(
            (
                f"opacus-mi leakage at step {final.step}, the last measured of {steps}"
                if behind
                else f"opacus-mi leakage after step {final.step}"
            )
            + f" - epsilon {fmt_epsilon(final.epsilon)}"
            + (
                f" (exact at step {final.epsilon_step}"
                + ("" if epsilon_now is None or behind else f"; {fmt_epsilon(epsilon_now)} now")
                + ")"
                if final.carries_earlier_epsilon
                else ""
            )
            + " at "
            f"delta {final.delta:g} (sigma {final.noise_multiplier:g}, C {final.max_grad_norm:g}, "
            f"q {final.sample_rate:.4g})"
            + (
                f"; MI accountant: any one example had leaked <= {final.mi_upper_bound:.4g} "
                "nats by then"
                if behind and final.mi_upper_bound is not None
                else f"; MI accountant: any one example has leaked <= {final.mi_upper_bound:.4g}"
                " nats over the run"
                if final.mi_upper_bound is not None
                else ""
            )
            + (f"; after step {steps - 1}: {', '.join(after)}" if behind and after else "")
        ),
        title_justify="left",
    )
    has_control = any(v.control is not None for r in tail for v in r.mi.values())
    columns = (
        "view / estimator",
        "last [95% CI]",
        f"mean of last {len(tail)} [95% CI]",
        "shuffled",
        *(("control",) if has_control else ()),
        "detected",
        "ln B",
        "bound/step",
    )
    for col in columns:
        table.add_column(col, justify="left" if col.startswith("view") else "right")
    below = []  # learned bounds whose mean's whole CI is under 0 (said under the table)
    for key in keys:
        latest = next(r for r in reversed(records) if key in r.mi)
        v = latest.mi[key]
        series = [r.mi[key].nats for r in tail if key in r.mi]
        mean, lo, hi = mean_with_ci(series)
        averaged = sum(1 for x in series if math.isfinite(x))
        # (A series some of the last records lack, or hold as NaN: says how many it averages.)
        over = "" if averaged == len(tail) else f" (n={averaged})"
        mism = [r.mi[key].mismatched for r in tail if key in r.mi]
        mism_mean = mean_with_ci([m for m in mism if m is not None])[0]
        ctrl_mean = mean_with_ci([r.mi[key].control for r in tail if key in r.mi])[0]
        # Leakage is only claimed when the interval clears zero and both shuffled controls.
        floor = max([0.0] + [m for m in (mism_mean, ctrl_mean) if math.isfinite(m)])
        detected = "yes" if math.isfinite(lo) and lo > floor else "no"
        if hi < 0 and is_lower_bound(key.rpartition("/")[2]):
            below.append(key)
        # (A series the last record lacks: its latest figure is an earlier step's, said.)
        stale = "" if latest is final else f" (step {latest.step})"
        table.add_row(
            key,
            f"{fmt_interval(v.nats, v.ci_low, v.ci_high)}{stale}",
            f"{fmt_interval(mean, lo, hi)}{over}",
            fmt_number(mism_mean),
            *((fmt_number(ctrl_mean),) if has_control else ()),
            detected,
            fmt_number(v.log_b) if math.isfinite(v.log_b) else "-",
            fmt_number(latest.mi_bound) if key.startswith("private") else "-",
        )
    flagged = sorted({f for r in records for f in r.flags})
    for key, k, n, p in reversed(exceedances(records)):
        if p < BUG_P:
            said = f"BUG? {key} exceeded its bound beyond its CI in {k} of {n} records"
            flagged.insert(0, f"{said} (by chance: p = {p:.1g})")
        else:  # (a long run's noise: 0.05% of a correct estimate's records are flagged)
            i = flagged.index(f"exceeds_bound:{key}")
            flagged[i] += f" ({k} of {n} records: as often as noise flags a correct estimate)"
    if "unclipped_release" in flagged:  # (ghost clipping trained with a plain loss)
        flagged.insert(
            0,
            "Opacus released a step's gradient unclipped (ghost clipping, a plain loss): "
            "train with the criterion make_private returned; epsilon and the bounds do not "
            "hold there",
        )
    if "exceeds_clip" in flagged:  # (which also lets an estimate exceed the bounds)
        flagged.insert(
            0,
            "Opacus released an example above its clipping bound: epsilon and the bounds "
            "do not hold there",
        )
    text = render_table(table, width)
    text += (
        "\nnats per example per step; learned rows are lower bounds on pairs the critic never"
        "\ntrained on; 'detected' needs the CI over steps above 0 and above the shuffled controls"
        "\n(shuffled: the same critic on re-paired pairs; control: a critic trained on them);"
        "\nbound/step = 1/(2 sigma^2), the Gaussian channel limit of one private release"
        + (
            ";\nthe MI accountant's figure is over the run so far as Opacus releases each example"
            "\n(in a noisy sum, in a fraction q of the steps), not a bound on these rows."
            if final.mi_upper_bound is not None
            else "."
        )
    )
    if any(k.endswith("/smile") for k in keys):
        text += "\nsmile rows are estimates, not bounds: its clipped critic can read above truth."
    if any(k.endswith("/semi") for k in keys):
        text += (
            "\nprivate/semi is an estimate, not a bound: a learned clean-token model scored with"
            "\nthe known noise."
        )
    if below:
        text += (
            f"\n{', '.join(below)}: below 0 over these steps, {EMPTY_BOUND}:"
            "\nthe critic does not fit these steps' pairs (the gradients move faster than it"
            "\nlearns: high sigma, early training)."
        )
    missing = [k for k in expected if k not in keys]
    if missing:
        why = []
        if any(not k.endswith("/semi") for k in missing):
            why.append("a learned critic's first figure comes once its windows hold pairs")
        if any(k.endswith("/semi") for k in missing):
            why.append("the semi-oracle's first figure comes once it has fitted its subspace")
        text += (
            f"\nno figure yet: {', '.join(missing)};\n{'; '.join(why)}"
            "\n(after more measured steps, unless the flags below say what stopped it)"
        )
    if flagged:
        text += f"\nflags seen: {', '.join(flagged)}"
    if note:
        text += f"\n{note}"
    return text


# What a learned figure whose whole CI is below 0 is (under a run's summary, a sweep's table).
EMPTY_BOUND = "an empty lower bound (MI is >= 0), not a measurement of 0"


def is_lower_bound(kind: str | None) -> bool:
    """Whether an estimator's figures are lower bounds on the MI: not the oracles' (estimates
    of the exact value), nor smile's (its clipped critic can read above the truth)."""
    return kind not in ("oracle", "semi", "smile")


BUG_P = 1e-3  # how improbable a run's exceeds_bound flags must be to be called a bug


def csv_cell(value: Any) -> Any:
    """A CSV cell that reads back exactly: None/NaN blank, +-inf spelled out, floats by repr."""
    if value is None:
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)  # (NumPy's: repr(np.float64(3.2)) is "np.float64(3.2)", read as NaN)
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return value


def write_csv_rows(
    rows: Iterable[dict[str, Any]], path: str | os.PathLike, columns: Sequence[str]
) -> Path:
    """Write dict rows under ``columns`` (missing keys blank, extra keys ignored), whole or not
    at all: into a file beside it, then renamed over it, so an interrupt mid-write (Ctrl-C,
    SIGTERM) leaves the last complete file (a sweep's finished rows were emptied)."""
    path = Path(path)

    def write(part: Path) -> None:
        with open(part, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: csv_cell(row.get(k)) for k in columns})

    write_whole(path, write)
    return path


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` into a file beside ``path``, then rename it over ``path``: an interrupt
    mid-write (Ctrl-C, SIGTERM) leaves the last complete file, and no part of the new one."""
    part = partial_path(path)
    try:
        write(part)
        os.replace(part, path)
    except OSError as err:  # (a refused or full folder: the file asked for named, not ".x.part")
        if err.filename is None or Path(err.filename) != part or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err  # (PermissionError for 13)
    finally:
        part.unlink(missing_ok=True)


def write_text_whole(path: str | os.PathLike, text: str) -> Path:
    """``text`` as ``path``'s whole content, through :func:`write_whole`."""
    path = Path(path)
    write_whole(path, lambda part: part.write_text(text, encoding="utf-8"))
    return path


def save_figure(fig: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """A matplotlib figure saved through :func:`write_whole` (a stop mid-save leaves the
    last whole image; the format named, since the part file's suffix is not the image's),
    then closed, saved or not: pyplot keeps every figure until it is."""
    import matplotlib.pyplot as plt  # (loaded already: the figure is pyplot's)

    path = Path(path)
    try:
        write_whole(path, lambda part: fig.savefig(part, format=path.suffix[1:], **savefig))
    finally:
        plt.close(fig)
    return path


def partial_path(path: Path) -> Path:
    """Where :func:`write_whole` writes ``path`` before it is complete (a hidden sibling)."""
    return path.with_name(f".{path.name}.part")


def read_csv_rows(path: str | os.PathLike, text_columns: Sequence[str] = ()) -> list[dict]:
    """Rows written by :func:`write_csv_rows`, numbers parsed (blank or unparsable -> NaN).

    A file changed since (a row with more or fewer cells than the header: an unquoted comma,
    an unclosed quote, a crash's tail of NUL bytes; text that is not UTF-8) is refused with its
    name and line: its rows were misread or dropped without a word.
    """
    rows = []
    fix = "write it again as UTF-8 CSV with one cell per column, or run the command again"
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        try:
            for raw in reader:
                if None in raw or None in raw.values():  # (DictReader's extra / missing cells)
                    cells = len(raw.get(None) or ()) + sum(
                        v is not None for k, v in raw.items() if k is not None
                    )
                    raise ValueError(
                        f"{path}, line {reader.line_num}: {cells} cells where its header has "
                        f"{len(reader.fieldnames or ())} (edited since it was written?): {fix}"
                    )
                rows.append(_parsed_row(raw, text_columns))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err.reason}): {fix}") from None
        except csv.Error as err:
            raise ValueError(f"{path}, line {reader.line_num}: {err}: {fix}") from None
    return rows


def _parsed_row(raw: dict[str, str], text_columns: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, cell in raw.items():
        if key in text_columns:
            row[key] = cell
            continue
        try:
            row[key] = float(cell) if cell != "" else math.nan
        except ValueError:
            row[key] = math.nan
    return row
