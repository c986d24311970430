"""PNG plots of leakage records and sweeps (matplotlib, headless Agg backend)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .records import LeakageRecord  # noqa: E402
from .report import is_lower_bound, save_figure  # noqa: E402


def _finite(x: Any) -> float:
    if x is None:
        return math.nan
    try:
        x = float(x)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def _keys(records: Sequence[LeakageRecord]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for k in r.mi:
            seen.setdefault(k, None)
    return list(seen)


def _isolated(ok: list[bool]) -> list[int]:
    """Indices that are ``True`` with no ``True`` neighbour: a line or band through them,
    broken on both sides, draws nothing."""
    return [
        i
        for i, here in enumerate(ok)
        if here and not (i > 0 and ok[i - 1]) and not (i + 1 < len(ok) and ok[i + 1])
    ]


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_mi(records: Sequence[LeakageRecord], path: str | os.PathLike) -> Path:
    """MI (nats) per series against step, with its 95% CI band, the per-step bound and ln B.

    The bound ``1/(2 sigma^2)`` (``LeakageRecord.mi_bound``) is dashed when present; ``ln B``
    (log of the batch size, the ceiling of any batch-contrastive bound) is dotted, and the
    oracle's own ceiling dash-dotted where its chunks make it lower (``MIValue.ceiling``).
    """
    fig, ax = plt.subplots(figsize=(10.5, 4.5))
    for key in _keys(records):
        # From the series' first figure on, a record without one (a step flagged, its
        # estimate non-finite or its features of another width) breaks the line as NaN does:
        # drawn across, it read as measured figures between the two sides.
        first = next(i for i, r in enumerate(records) if key in r.mi)
        pts = [(r.step, r.mi.get(key)) for r in records[first:]]
        steps = [s for s, _ in pts]
        nats = [math.nan if v is None else _finite(v.nats) for _, v in pts]
        lo = [math.nan if v is None else _finite(v.ci_low) for _, v in pts]
        hi = [math.nan if v is None else _finite(v.ci_high) for _, v in pts]
        # (A lone point: a line and a band of one point draw nothing; a marker and a bar do.)
        lone = sum(v is not None for _, v in pts) == 1
        # (A series with no finite figure draws nothing: its legend entry says so.)
        label = key if any(math.isfinite(v) for v in nats) else f"{key} (no finite figure)"
        (line,) = ax.plot(steps, nats, label=label, linewidth=1.3, marker="o" if lone else None)
        if not lone:
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
            # The line breaks at NaN too: a finite figure with none on either side gets a dot.
            ok = [math.isfinite(v) for v in nats]
            dots = _isolated(ok)
            if dots:
                ax.plot(
                    [steps[i] for i in dots],
                    [nats[i] for i in dots],
                    linestyle="none",
                    marker="o",
                    markersize=4,
                    color=line.get_color(),
                )
        # The band breaks at NaN intervals (records of < 8 pairs), so an interval with none on
        # either side is a band of one point too: it gets a bar.
        has = [math.isfinite(a) and math.isfinite(b) for a, b in zip(lo, hi, strict=True)]
        alone = _isolated(has)
        if alone:
            ax.vlines(
                [steps[i] for i in alone],
                [lo[i] for i in alone],
                [hi[i] for i in alone],
                color=line.get_color(),
                alpha=0.5,
                linewidth=3,
            )
    bound = [(r.step, _finite(r.mi_bound)) for r in records if r.mi_bound is not None]
    if any(math.isfinite(b) for _, b in bound):  # (sigma 0: infinite, noted by _robust_ylim)
        ax.plot(
            [s for s, _ in bound],
            [b for _, b in bound],
            linestyle="--",
            color="black",
            linewidth=1.2,
            marker="_" if len(bound) == 1 else None,
            markersize=12,
            label="private view bound/step 1/(2 sigma^2)",
        )
    ln_b = [(r.step, math.log(r.batch_size)) for r in records if r.batch_size > 0]
    # The oracle's candidates are each chunk's (BatchMemoryManager) or rank's (DPDDP)
    # examples: where that puts its ceiling below the logical batch's ln B, draw it apart.
    ceilings = [
        (r, r.mi["private/oracle"].log_b)
        for r in records
        if "private/oracle" in r.mi and math.isfinite(r.mi["private/oracle"].log_b)
    ]
    oracle = [(r.step, c) for r, c in ceilings]
    apart = any(r.batch_size > 0 and abs(c - math.log(r.batch_size)) > 1e-9 for r, c in ceilings)
    for series, label, style in (
        (ln_b, "ln B (InfoNCE ceiling)" if apart else "ln B (InfoNCE / oracle ceiling)", ":"),
        (oracle if apart else [], "oracle ceiling (mean ln of its chunks' sizes)", "-."),
    ):
        if series:
            ax.plot(
                [s for s, _ in series],
                [v for _, v in series],
                linestyle=style,
                color="gray",
                linewidth=1.2,
                marker="_" if len(series) == 1 else None,
                markersize=12,
                label=label,
            )
    _robust_ylim(ax, records)
    ax.axhline(0.0, color="lightgray", linewidth=0.8, zorder=0)
    _step_axis(ax, [r.step for r in records])
    ax.set_ylabel("mutual information (nats)")
    kinds = dict.fromkeys(k.rpartition("/")[2] for k in _keys(records))  # (in order shown)
    estimates = [k for k in kinds if k != "oracle" and not is_lower_bound(k)]
    ax.set_title(
        "Measured leakage per DP-SGD step\n(95% CI; learned rows: held-out lower bounds"
        + "".join(f"; {k}: an estimate" for k in estimates)
        + ")"
    )
    if not records:
        ax.text(0.5, 0.5, "no monitored steps", ha="center", va="center", transform=ax.transAxes)
    else:  # beside the axes: inside, it covered series and the ln B line
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _step_axis(ax, steps: Sequence[int]) -> None:
    """Label the x axis with whole steps (one record's axis read -0.04 .. 0.04)."""
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(set(steps)) == 1:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)


def _robust_ylim(ax, records: Sequence[LeakageRecord]) -> None:
    """Keep the informative range in view: learned lower bounds can dip far below zero.

    Values below ``-max(1, top / 4)`` nats (they only say "nothing detected") are cut off,
    with a note, so that a few very negative estimates do not flatten every other line.
    """
    values = [
        _finite(x) for r in records for v in r.mi.values() for x in (v.nats, v.ci_low, v.ci_high)
    ]
    values += [math.log(r.batch_size) for r in records if r.batch_size > 0]
    values = [v for v in values if math.isfinite(v)]
    bounds = [b for b in (_finite(r.mi_bound) for r in records) if math.isfinite(b)]
    # The bound joins the range unless it dwarfs everything measured (small sigma: 200 nats
    # against estimates under ln B flattened every line); then its value is noted instead, as
    # is an infinite one (sigma 0: no noise), which no line can draw.
    above = None
    if bounds and (not values or max(bounds) <= 2 * max(max(values), 0.1)):
        values += bounds
    elif bounds:
        above = f"{max(bounds):.4g}"
    if any(r.mi_bound is not None and math.isinf(r.mi_bound) for r in records):
        above = "inf (sigma 0)"
    if above is not None:
        ax.text(
            0.99,
            0.99,
            f"bound/step {above} nats: above the axis",
            transform=ax.transAxes,
            fontsize="x-small",
            color="black",
            ha="right",
            va="top",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )
    if not values:  # (every figure NaN: the zero line in view, not matplotlib's 0.5 +- 0.05)
        if records:
            ax.set_ylim(-0.1, 1.0)
        return
    top = max(max(values), 0.1)
    floor = -max(1.0, top / 4)
    low = min(min(values), 0.0)  # (the zero line always in view: MI is >= 0)
    pad = 0.05 * (top - max(low, floor))
    if low < floor:
        ax.set_ylim(floor, top + pad)
        ax.text(
            0.01,
            0.01,
            f"axis cut at {floor:.2f} nats; lower values mean nothing detected",
            transform=ax.transAxes,
            fontsize="x-small",
            color="gray",
            va="bottom",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )
    else:
        ax.set_ylim(low - pad, top + pad)


def plot_epsilon(
    records: Sequence[LeakageRecord],
    path: str | os.PathLike,
    *,
    final: tuple[int, float] | None = None,
) -> Path:
    """Epsilon (at each record's delta) against the step it is exact for: a record that
    carries an earlier step's epsilon (``epsilon_step``, an expensive accountant paced by the
    monitor) adds no point of its own, so the curve never shows a stale value as current.
    ``final``: ``(step, epsilon)`` of the accountant at the end of training (the CLI's closing
    epsilon), so a paced curve still reaches the run's last step."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    exact = {}
    for r in records:
        exact[r.step if r.epsilon_step is None else r.epsilon_step] = _finite(r.epsilon)
    if final is not None and (not exact or final[0] >= max(exact)):
        exact[final[0]] = _finite(final[1])
    steps = sorted(exact)
    ax.plot(
        steps, [exact[s] for s in steps], color="tab:red", linewidth=1.5, marker=".", markersize=3
    )
    _step_axis(ax, steps)
    delta = records[-1].delta if records else math.nan
    ax.set_ylabel(f"epsilon (delta {delta:g})")
    ax.set_title("Privacy budget spent (accountant)")
    if not records:
        ax.text(0.5, 0.5, "no monitored steps", ha="center", va="center", transform=ax.transAxes)
    elif not any(math.isfinite(exact[s]) for s in steps):
        ax.text(
            0.5,
            0.5,
            "not shown: no finite epsilon (no noise, or beyond the accountant's range)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _errorbar(ax, xs, mids, los, his, **kw) -> None:
    pts = [
        (x, m, lo, hi)
        for x, m, lo, hi in zip(xs, mids, los, his, strict=True)
        if math.isfinite(x) and math.isfinite(m)
    ]
    if not pts:
        return
    pts.sort()
    (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", **kw)
    # A bar only where both ends are known: a missing end drawn at the midpoint, capped, read
    # as a measured zero-width interval. A point without one is left hollow.
    known = [p for p in pts if math.isfinite(p[2]) and math.isfinite(p[3])]
    if known:
        ax.errorbar(
            [p[0] for p in known],
            [p[1] for p in known],
            yerr=[[m - lo for _, m, lo, _ in known], [hi - m for _, m, _, hi in known]],
            linestyle="none",
            capsize=3,
            color=line.get_color(),
        )
    unknown = [p for p in pts if p not in known]
    if unknown:
        ax.plot(
            [p[0] for p in unknown],
            [p[1] for p in unknown],
            linestyle="none",
            marker="o",
            markerfacecolor="white",
            color=line.get_color(),
        )


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Two panels against epsilon: MI (oracle, clipped, raw where measured, per-step bound)
    and test accuracy."""
    fig, (ax_mi, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    eps = [_finite(r.get("epsilon")) for r in rows]

    def col(name: str) -> list[float]:
        return [_finite(r.get(name)) for r in rows]

    _errorbar(
        ax_mi,
        eps,
        col("oracle_mi"),
        col("oracle_ci_low"),
        col("oracle_ci_high"),
        label="private/oracle",
    )
    _errorbar(
        ax_mi,
        eps,
        col("clipped_mi"),
        col("clipped_ci_low"),
        col("clipped_ci_high"),
        label="clipped (learned)",
    )
    if any(math.isfinite(v) for v in col("raw_mi")):  # (an opt-in view)
        _errorbar(
            ax_mi, eps, col("raw_mi"), col("raw_ci_low"), col("raw_ci_high"), label="raw (learned)"
        )
    bound = sorted(
        (e, b) for e, b in zip(eps, col("bound_per_step"), strict=True) if math.isfinite(e)
    )
    if bound:
        ax_mi.plot(
            [e for e, _ in bound],
            [b for _, b in bound],
            linestyle="--",
            color="black",
            marker="x",
            label="bound/step 1/(2 sigma^2)",
        )
    ax_mi.set_xlabel("epsilon")
    ax_mi.set_ylabel("MI per step (nats, mean of last records)")
    ax_mi.set_title("Leakage vs epsilon")
    ax_mi.grid(alpha=0.3)
    if rows:  # under the axes: inside, "best" still sat on the bound's line
        ax_mi.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small")
    acc = sorted((e, a) for e, a in zip(eps, col("test_accuracy"), strict=True) if math.isfinite(e))
    ax_acc.plot([e for e, _ in acc], [a for _, a in acc], marker="o", color="tab:green")
    placed = [e for e in eps if math.isfinite(e) and e > 0]
    if placed and max(placed) >= 10 * min(placed):  # (sigma 0.5-4 on digits: epsilon 0.56-21)
        for ax in (ax_mi, ax_acc):
            ax.set_xscale("log")
    ax_acc.set_xlabel("epsilon")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title("Accuracy vs epsilon")
    ax_acc.grid(alpha=0.3)
    unplaced = [
        str(r.get("setting", "?")) for r, e in zip(rows, eps, strict=True) if not math.isfinite(e)
    ]
    if unplaced:  # no finite epsilon to place them at (noiseless, or the accountant failed)
        fig.text(
            0.01,
            0.01,
            f"not shown, no finite epsilon: {', '.join(unplaced)} (see sweep.csv)",
            fontsize="small",
            color="dimgray",
        )
    return _save(fig, path)
