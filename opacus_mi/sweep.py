"""Sweeps: one monitored training run per noise multiplier or target epsilon, side by side.

``run_sweep`` is what ``opacus-mi sweep`` does: it repeats :func:`~opacus_mi.training.
train_and_monitor` per setting (``<out>/sigma_<v>/`` or ``<out>/eps_<v>/``) and writes
``sweep.csv`` (one row per run: epsilon, accuracy, the private view's oracle MI and each
view's learned MI, with CIs), ``sweep.png`` and a sweep ``report.html``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .accounting import gaussian_channel_bound
from .checks import is_finite_number, plain_values
from .records import LeakageRecord
from .report import (
    EMPTY_BOUND,
    fmt_interval,
    fmt_number,
    is_lower_bound,
    mean_with_ci,
    read_csv_rows,
    render_table,
    write_csv_rows,
    write_text_whole,
)
from .training import (
    RunConfig,
    RunResult,
    _read_json,
    _settings_for_html,
    _write_json,
    calibrate_noise,
    claim_out_dir,
    finished_run,
    json_keys_are,
    mi_keys,
    preflight,
    prepare_out_dir,
    refuse_foreign_outputs,
    train_and_monitor,
)

SWEEP_OUT = "runs/sweep"  # the CLI's default --out for a sweep (a run's is runs/latest)
# Everything a sweep writes at its top level (each run has its own folder below).
SWEEP_OUTPUTS = ("sweep.csv", "sweep.txt", "sweep.png", "report.html", "sweep_config.json")
# Keys every sweep_config.json has held: how a sweep tells an earlier one's folder.
_SWEEP_MARK = frozenset({"dataset", "epochs", "delta", "out"})
SWEEP_LAST = 10  # sweep MI figures average the last this-many records of each run

SWEEP_COLUMNS = (
    "setting",
    "noise_multiplier",
    "target_epsilon",
    "epsilon",
    "test_accuracy",
    "oracle_mi",
    "oracle_ci_low",
    "oracle_ci_high",
    "clipped_mi",
    "clipped_ci_low",
    "clipped_ci_high",
    "raw_mi",  # (the raw view, where measured: --views raw)
    "raw_ci_low",
    "raw_ci_high",
    "private_mi",  # the learned critic's on the private view (the oracle's is oracle_mi)
    "private_ci_low",
    "private_ci_high",
    "bound_per_step",
    "wall_seconds",
    "out",
)


# A sweep row's learned-critic figures, one per view; the private view's oracle (and the
# semi-oracle, which learns only the clean token) are not a learned critic's.
_LEARNED_VIEWS = ("clipped", "raw", "private")
_NOT_LEARNED = frozenset({"private/oracle", "private/semi"})


def _mean_ci_of(records: Sequence[LeakageRecord], key: str | None) -> tuple[float, float, float]:
    if key is None:
        return math.nan, math.nan, math.nan
    tail = [r.mi[key].nats for r in records if key in r.mi][-SWEEP_LAST:]
    return mean_with_ci(tail)


def sweep_row(result: RunResult, *, setting: str, target_epsilon: float | None) -> dict[str, Any]:
    """One ``sweep.csv`` row from a finished run (MI averaged over the last 10 records)."""
    records = result.records
    keys = mi_keys(records)

    def learned(view: str) -> str | None:  # the view's learned critic (not the oracle's)
        return next((k for k in keys if k.startswith(f"{view}/") and k not in _NOT_LEARNED), None)

    figures = {"oracle": _mean_ci_of(records, "private/oracle")}
    figures.update({view: _mean_ci_of(records, learned(view)) for view in _LEARNED_VIEWS})
    sigma = result.noise_multiplier
    return {
        "setting": setting,
        "noise_multiplier": sigma,
        "target_epsilon": math.nan if target_epsilon is None else float(target_epsilon),
        "epsilon": result.epsilon,
        "test_accuracy": result.test_accuracy,
        **{
            f"{name}_{part}": value
            for name, triple in figures.items()
            for part, value in zip(("mi", "ci_low", "ci_high"), triple, strict=True)
        },
        "bound_per_step": gaussian_channel_bound(sigma),
        "wall_seconds": result.wall_seconds,
        "out": str(result.out_dir),
    }


def _setting_name(prefix: str, value: float) -> str:
    return f"{prefix}_{value:g}"


def run_sweep(
    base: RunConfig,
    *,
    noise_multipliers: Sequence[float] | None = None,
    target_epsilons: Sequence[float] | None = None,
    progress: bool = True,
    resume: bool = False,
) -> tuple[list[dict[str, Any]], str, list[Path]]:
    """One run per noise multiplier (``<out>/sigma_<v>/``) or target epsilon (``eps_<v>/``).

    ``resume``: a setting whose folder holds a run that finished with the same settings
    (:func:`~opacus_mi.training.finished_run`) is kept, not trained again; each setting's
    outcome is said on stderr. Returns the sweep rows, the rendered table, and the files
    written at the sweep level.
    """
    if (noise_multipliers is None) == (target_epsilons is None):
        raise ValueError("give exactly one of --noise-multipliers or --target-epsilons")
    values = list(
        plain_values(noise_multipliers if noise_multipliers is not None else target_epsilons)
    )
    flag = "--noise-multipliers" if noise_multipliers is not None else "--target-epsilons"
    if not values:
        raise ValueError(f"{flag} needs at least one value")
    noise = noise_multipliers is not None  # (a noise multiplier of 0: the non-private baseline)
    for v in values:
        if not is_finite_number(v) or (float(v) < 0 if noise else float(v) <= 0):
            what = "finite numbers >= 0 (0: no noise)" if noise else "positive finite numbers"
            raise ValueError(f"{flag} values must be {what}; got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} values must be distinct; got {values!r}")
    base = replace(base, target_epsilon=None).validate()
    # Every run's own checks (the data set, the batch size against it, TensorBoard) come before
    # anything is written: a failing first run had cleared the last sweep's outputs.
    split = preflight(base, kind="sweep")
    if Path(base.out).expanduser().is_dir():
        refuse_foreign_outputs(
            base.out,
            SWEEP_OUTPUTS,
            kind="sweep",
            marks=(("sweep_config.json", json_keys_are(_SWEEP_MARK)),),
        )
    if target_epsilons is not None:
        # Every target is calibrated as its run will be before anything is written or trained,
        # not in its turn (at most seconds per target, under any accountant).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (Opacus's; each run gives them in its turn)
            for v in values:
                cfg = replace(base, target_epsilon=float(v))
                calibrate_noise(cfg, n_train=len(split.train), option="target_epsilons")
    names = [_setting_name("sigma" if noise_multipliers is not None else "eps", v) for v in values]
    if len(set(names)) != len(names):
        same = next(n for n in names if names.count(n) > 1)
        clash = [v for v, n in zip(values, names, strict=True) if n == same]
        raise ValueError(
            f"{flag} values {clash} would share the run folder {same}/ (named to 6 significant "
            "digits): pass values that differ there"
        )
    out = prepare_out_dir(base.out)
    with claim_out_dir(out):
        configs = []
        for name, v in zip(names, values, strict=True):
            if noise_multipliers is not None:
                cfg = replace(base, noise_multiplier=float(v), out=str(out / name))
            else:
                cfg = replace(base, target_epsilon=float(v), out=str(out / name))
            preflight(cfg, split)  # (its folder's kind: a file or a sweep's folder there)
            if Path(cfg.out).is_dir():  # another process's run there: refused before clearing
                with claim_out_dir(Path(cfg.out)):
                    pass
            configs.append((name, cfg))
        for stale in SWEEP_OUTPUTS:  # an earlier sweep's, which would be rendered over these runs
            (out / stale).unlink(missing_ok=True)
        settings = {k: v for k, v in base.as_dict().items() if k not in ("noise_multiplier", "out")}
        settings["out"] = str(out)
        settings["swept"] = f"{flag} {' '.join(f'{v:g}' for v in values)}"
        settings["runs"] = names  # (what a stopped sweep's report names as missing)
        _write_json(out / "sweep_config.json", settings)
        rows = []
        for name, cfg in configs:

            def keep(result: RunResult, name: str = name, cfg: RunConfig = cfg) -> None:
                # A sweep that stops keeps its finished rows: a run's row is written once its
                # result.json is, before its plots (a stop while they were drawn lost the row).
                rows.append(sweep_row(result, setting=name, target_epsilon=cfg.target_epsilon))
                write_sweep_csv(rows, out / "sweep.csv")

            if resume:
                kept, why = finished_run(cfg)
                if kept is not None:  # (else the run says whether it resumes, and why not)
                    print(f"{cfg.out}: kept: {why}", file=sys.stderr)  # (as run says it)
                    keep(kept)
                    continue
            try:
                train_and_monitor(cfg, progress=progress, trained=keep, resume=resume)
            except ValueError as err:  # (a setting that diverged, say: what the sweep kept)
                done = [r for r in rows if r.get("setting") != name]  # (its row may be in)
                kept = (
                    f"{out / 'sweep.csv'} holds the rows of the settings finished before it "
                    f"({len(done)}), which sweep --resume keeps when rerun with the same other "
                    "settings"
                    if done
                    else "no setting had finished before it"
                )
                raise ValueError(f"{name}/: {err}. The sweep stopped there: {kept}") from err
        table, files = write_sweep_outputs(out, rows, settings=settings)
        return rows, table, files


def write_sweep_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    return write_csv_rows(rows, path, SWEEP_COLUMNS)


def read_sweep_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``sweep.csv`` with numbers parsed (blank cells become NaN)."""
    return read_csv_rows(path, text_columns=("setting", "out"))


def _g(x: Any) -> str:
    """A setting as its folder is named (``:g``): settings 4 digits told apart (1.00001 and
    1.00004) read alike at ``.4g``."""
    return f"{x:g}" if is_finite_number(x) else "-"


def _ci_cell(row: dict[str, Any], prefix: str) -> str:
    mid = row.get(f"{prefix}_mi")
    if not is_finite_number(mid):
        return "-"
    lo, hi = row.get(f"{prefix}_ci_low"), row.get(f"{prefix}_ci_high")
    return fmt_interval(mid, lo, hi)


def sweep_table(
    rows: Sequence[dict[str, Any]], *, width: int | None = None, estimator: str | None = None
) -> str:
    """The sweep summary as a text table (rich), one row per setting; ``estimator`` (the
    learned one, if known) names the clipped view's column. ``width=None``: at least 120
    characters, wider (up to 200) where the columns need it, so no cell wraps (a raw column
    or target epsilons split every interval over two lines)."""
    from rich.table import Table

    table = Table(
        title=f"opacus-mi sweep - MI in nats, mean of the last {SWEEP_LAST} records [95% CI]",
        title_justify="left",
    )
    targets = any(is_finite_number(r.get("target_epsilon")) for r in rows)
    columns = ["noise"] + (["target eps"] if targets else []) + ["epsilon", "test acc"]
    clipped = f"clipped/{estimator} MI" if estimator not in (None, "none") else "clipped MI"
    raw = any(is_finite_number(r.get("raw_mi")) for r in rows)  # (an opt-in view)
    columns += ["private/oracle MI", clipped] + ([clipped.replace("clipped", "raw")] if raw else [])
    columns += ["bound/step 1/(2 sigma^2)", "wall s"]
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [_g(r.get("noise_multiplier"))]
        if targets:
            cells.append(_g(r.get("target_epsilon")))
        cells += [
            fmt_number(r.get("epsilon")),
            fmt_number(r.get("test_accuracy")),
            _ci_cell(r, "oracle"),
            _ci_cell(r, "clipped"),
            *([_ci_cell(r, "raw")] if raw else []),
            fmt_number(r.get("bound_per_step")),
            fmt_number(r.get("wall_seconds"), 1),
        ]
        table.add_row(*cells)
    if width is None:
        from rich.console import Console

        needed = Console(width=1000).measure(table).maximum
        width = min(_TABLE_MAX_WIDTH, max(_TABLE_WIDTH, needed))
    # Learned bounds whose whole CI is under 0, said as a run's summary says them.
    below = [
        f"{view} at noise {_g(r.get('noise_multiplier'))}"
        for r in rows
        for view in ("clipped", "raw")
        if is_finite_number(r.get(f"{view}_ci_high")) and r[f"{view}_ci_high"] < 0
    ]
    note = (
        f"\n{'; '.join(below)}: below 0, {EMPTY_BOUND}:\nthe critic did not fit the run's last "
        "steps (see that run's summary)."
        if below and is_lower_bound(estimator)
        else ""
    )
    return render_table(table, width) + note


_TABLE_WIDTH, _TABLE_MAX_WIDTH = 120, 200


def write_sweep_outputs(
    out: str | os.PathLike,
    rows: Sequence[dict[str, Any]],
    *,
    settings: dict[str, Any] | None = None,
    csv: bool = True,
) -> tuple[str, list[Path]]:
    """Write ``sweep.csv`` (unless ``csv=False``), ``sweep.txt``, ``sweep.png`` and
    ``report.html`` for a sweep."""
    from .html_report import sweep_explanation, write_html
    from .plots import plot_sweep

    out = Path(out)
    files = [write_sweep_csv(rows, out / "sweep.csv")] if csv else []
    estimator = (settings or {}).get("estimator")
    estimator = estimator if isinstance(estimator, str) else None
    views = (settings or {}).get("views")  # (None: the default views, which include it)
    views = views if isinstance(views, list) else ["clipped"]
    table = sweep_table(rows, estimator=estimator)
    runs = (settings or {}).get("runs")
    done = {r.get("setting") for r in rows}
    runs = [n for n in runs if isinstance(n, str)] if isinstance(runs, list) else []
    missing = [n for n in runs if n not in done]  # (a hand-edited entry of another kind: left)
    if missing:  # (a stopped sweep's report read like a sweep of the settings it finished)
        table += (
            f"\nnot finished: no row for {', '.join(f'{n}/' for n in missing)}; the same "
            "command with --resume goes on"
        )
    write_text_whole(out / "sweep.txt", table + "\n")
    files.append(out / "sweep.txt")
    image = plot_sweep(rows, out / "sweep.png")
    files.append(image)
    files.append(
        write_html(
            out,
            title="opacus-mi sweep: leakage and accuracy against epsilon",
            settings=_settings_for_html(settings),
            table=table,
            images=[image],
            explanation=sweep_explanation(estimator, clipped_view="clipped" in views),
        )
    )
    return table, files


def rerender_sweep(out: str | os.PathLike) -> tuple[str, list[Path]]:
    """Re-render a sweep folder's table, plot and report from its ``sweep.csv``, which is
    read, never rewritten (its columns of another version, or a user's, stay as they are)."""
    import csv

    out = Path(out)
    with open(out / "sweep.csv", newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    missing = [c for c in ("noise_multiplier", "epsilon") if c not in header]
    if missing:
        raise ValueError(
            f"OUTDIR {str(out)!r}: its sweep.csv has no {' or '.join(missing)} column, so it "
            "is not an opacus-mi sweep's (written by `opacus-mi sweep`)"
        )
    rows = read_sweep_csv(out / "sweep.csv")
    settings = _read_json(out / "sweep_config.json")
    return write_sweep_outputs(out, rows, settings=settings, csv=False)
