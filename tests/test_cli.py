"""The ``opacus-mi`` command line, end to end, with tiny real runs (fake 3x32x32 images)."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import without_timing

from opacus_mi import cli
from opacus_mi.records import read_jsonl

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--dataset",
    "fake",
    "--fake-size",
    "64",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--accountant",
    "rdp",
    "--no-progress",
]
RUN_FILES = (
    "records.jsonl",
    "records.csv",
    "config.json",
    "result.json",
    "summary.txt",
    "mi.png",
    "epsilon.png",
    "report.html",
)


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cli") / "run"
    rc, stdout, stderr = _main(["run", *TINY, "--out", str(out)])
    assert rc == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cli") / "sweep"
    argv = ["sweep", "--noise-multipliers", "0.5", "2", *TINY, "--estimator", "none"]
    rc, stdout, stderr = _main([*argv, "--out", str(out)])
    assert rc == 0, stderr
    return out, stdout


# ------------------------------------------------------------------------------ run
def test_run_prints_table_and_writes_files(run_dir):
    from opacus_mi.training import RUN_OUTPUTS

    # what a new run clears first is everything a run writes (else a stale file survives)
    assert set(RUN_OUTPUTS) == set(RUN_FILES)
    out, stdout = run_dir
    assert "private/oracle" in stdout
    assert "epsilon" in stdout
    assert "clipped/mine" in stdout
    assert "test accuracy" in stdout
    assert str(out) in stdout
    for name in RUN_FILES:
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name


def test_records_csv_joins_flags_with_semicolons_and_keeps_series_in_first_seen_order(tmp_path):
    """records.csv's flags cell holds the flags joined by ';' (',' would split the cell's
    meaning for readers of the text) and its MI columns follow the order the series were
    first seen. Reference: Python's csv module reading the file."""
    import csv as csv_module

    from opacus_mi.records import MI_FIELDS, LeakageRecord, MIValue
    from opacus_mi.training import write_records_csv

    def record(step, keys, flags):
        mi = {k: MIValue(nats=0.1 * step, ci_low=0.0, ci_high=0.2, n=8) for k in keys}
        return LeakageRecord(step, 16, 1.0, 1.0, 0.25, 0.5, 1e-5, mi=mi, flags=flags)

    records = [record(0, ["z/mine"], ["a", "b"]), record(1, ["z/mine", "a/oracle"], [])]
    path = write_records_csv(records, tmp_path / "records.csv")
    with open(path, newline="") as fh:
        rows = list(csv_module.DictReader(fh))
    assert [r["flags"] for r in rows] == ["a;b", ""]
    mi_columns = [c for c in rows[0] if "/" in c]
    assert mi_columns == [f"{k}_{f}" for k in ("z/mine", "a/oracle") for f in MI_FIELDS]
    assert float(rows[1]["a/oracle_nats"]) == pytest.approx(0.1)


def test_run_records_csv_matches_jsonl(run_dir):
    out, _ = run_dir
    records = read_jsonl(out / "records.jsonl")
    assert records
    with open(out / "records.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records)
    for col in (
        "step",
        "epsilon",
        "epsilon_step",
        "mi_bound",
        "mi_upper_bound",
        "private/oracle_nats",
        "private/oracle_ci_low",
        "private/oracle_ci_high",
        "clipped/mine_mismatched",
    ):
        assert col in rows[0], col
    assert float(rows[-1]["private/oracle_nats"]) == pytest.approx(
        records[-1].mi["private/oracle"].nats
    )
    for row, record in zip(rows, records, strict=True):
        assert int(row["epsilon_step"]) == record.epsilon_step
        assert float(row["mi_upper_bound"]) == pytest.approx(record.mi_upper_bound, rel=1e-12)
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "fake" and config["views"] == ["clipped", "private"]
    result = json.loads((out / "result.json").read_text())
    assert result["epsilon"] > 0 and 0 <= result["test_accuracy"] <= 1


def test_report_html_is_self_contained(run_dir):
    out, _ = run_dir
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "private/oracle" in html
    assert "1/(2 sigma^2)" in html
    assert "<script" not in html and 'src="http' not in html


class _Page(HTMLParser):
    """What a browser shows of a page: each element's text, by tag, and the images' sources."""

    def __init__(self, page: str):
        super().__init__()
        self.open, self.text, self.images = [], {}, []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.open.append(tag)
        self.text.setdefault(tag, []).append("")
        if tag == "img":
            self.images.append(dict(attrs))
            self.open.pop()  # (a void element)

    def handle_endtag(self, tag):
        while self.open and self.open.pop() != tag:
            pass

    def handle_data(self, data):
        if self.open:
            self.text[self.open[-1]][-1] += data


def test_the_report_page_shows_each_part_as_given_and_only_the_parts_given(tmp_path):
    """write_html's parts read back through Python's own HTML parser: a title, table, setting
    or file name holding <, & or a quote shows as written (escaped, never read as markup), None
    as '-', a list as its items; a Results or Settings section only when there is one; 'No
    table.' only without either table; each image whole as a base64 PNG data URI."""
    import base64

    from opacus_mi.html_report import EXPLANATION, sweep_explanation, write_html

    image = tmp_path / 'a "b" <c>.png'
    image.write_bytes(bytes(range(256)) * 3)
    title, table = 'MI <b>&</b> "eps"', "view  <private/oracle> & 'ln B'"
    settings = {"views": ["clipped", "private"], "seed": None, "note": "<i>x</i> & y"}
    path = write_html(tmp_path, title=title, settings=settings, table=table, images=[image],
                      results={"epsilon": "<1"}, explanation="<p>mine</p>")  # fmt: skip
    page = _Page(path.read_text(encoding="utf-8"))
    assert page.text["title"] == [title] and page.text["h1"] == [title]
    assert page.text["pre"] == [table] and "No table." not in page.text.get("p", [])
    assert page.text["h2"] == [
        "Results", "Leakage summary", "What the columns mean", "Plots", "Settings"
    ]  # fmt: skip
    cells = dict(zip(page.text["th"], page.text["td"], strict=True))
    assert cells == {"epsilon": "<1", "views": "clipped, private", "seed": "-",
                     "note": "<i>x</i> & y"}  # fmt: skip
    assert page.text["figcaption"] == [image.name] and page.images[0]["alt"] == image.name
    prefix, _, data = page.images[0]["src"].partition(",")
    assert prefix == "data:image/png;base64" and base64.b64decode(data) == image.read_bytes()
    assert page.text["p"] == ["mine"] and "Units." not in path.read_text(encoding="utf-8")
    assert "Units." in EXPLANATION  # (the default the argument replaced)

    # Neither results nor settings nor images: no sections for them; a trusted table as is.
    path = write_html(tmp_path, title="t", settings={}, results={}, table_html="<em>rows</em>")
    page = _Page(path.read_text(encoding="utf-8"))
    assert page.text["h2"] == ["Leakage summary", "What the columns mean"]
    assert page.text["em"] == ["rows"] and "No table." not in page.text.get("p", [])
    assert "Units." in page.text["b"]  # (the default explanation)
    page = _Page(write_html(tmp_path, title="t", settings={}).read_text(encoding="utf-8"))
    assert "No table." in page.text["p"]
    # A sweep's estimator, read from its folder's settings, is text too.
    notes = _Page(sweep_explanation("<b>mine</b>"))
    assert "the learned critic's (<b>mine</b>) held-out lower bound" in "".join(notes.text["li"])


def test_report_subcommand_rerenders_a_run(run_dir):
    out, _ = run_dir
    for name in ("report.html", "mi.png", "records.csv", "summary.txt"):
        (out / name).unlink()
    rc, stdout, stderr = _main(["report", str(out)])
    assert rc == 0, stderr
    assert "private/oracle" in stdout and "epsilon" in stdout
    for name in ("report.html", "mi.png", "records.csv", "summary.txt"):
        assert (out / name).is_file(), name
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_rerun_starts_a_fresh_records_file(tmp_path):
    out = tmp_path / "again"
    argv = ["run", *TINY, "--estimator", "none", "--out", str(out)]
    assert _main(argv)[0] == 0
    first = len(read_jsonl(out / "records.jsonl"))
    assert _main(argv)[0] == 0
    assert len(read_jsonl(out / "records.jsonl")) == first


def test_a_runs_test_accuracy_is_its_last_epochs(tmp_path, monkeypatch):
    """result.json's and the result's test accuracy is the last epoch's evaluation (the
    CLI tests' one-epoch runs have no other). Reference: the evaluations themselves, each
    epoch given its own figure."""
    from opacus_mi import training

    seen: list[float] = []

    def evaluate(*args, **kwargs):
        seen.append(0.25 * (len(seen) + 1))
        return seen[-1]

    monkeypatch.setattr(training, "_evaluate", evaluate)
    cfg = training.RunConfig(
        dataset="fake", fake_size=64, epochs=2, batch_size=16, accountant="rdp",
        estimator=None, out=str(tmp_path / "run"),
    )  # fmt: skip
    result = training.train_and_monitor(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert seen == [0.25, 0.5] and saved["accuracy_per_epoch"] == seen
    assert saved["test_accuracy"] == result.test_accuracy == seen[-1]


# ------------------------------------------------------------------------------ sweep
def test_sweep_writes_rows_and_noise_lowers_epsilon(sweep_dir):
    out, stdout = sweep_dir
    with open(out / "sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    by_sigma = {float(r["noise_multiplier"]): r for r in rows}
    assert set(by_sigma) == {0.5, 2.0}
    assert float(by_sigma[2.0]["epsilon"]) < float(by_sigma[0.5]["epsilon"])
    assert float(by_sigma[2.0]["bound_per_step"]) == pytest.approx(1 / (2 * 2.0**2))
    assert float(by_sigma[2.0]["oracle_mi"]) < float(by_sigma[0.5]["oracle_mi"])
    for name in ("sweep.png", "report.html", "sigma_0.5/records.jsonl", "sigma_2/report.html"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert "epsilon" in stdout and "private/oracle" in stdout
    # the sweep's own columns explained, not a run's (shuffled, detected: not in its table)
    assert "<b>wall s.</b>" in page and "<b>shuffled.</b>" not in page
    assert "<b>shuffled.</b>" in (out / "sigma_2/report.html").read_text()
    assert "without a learned estimator" in page  # (this sweep's --estimator none)
    # every file the sweep wrote at its top, as the console line names them (not its runs')
    said = next(ln for ln in stdout.splitlines() if ln.startswith("files written to"))
    written = {p.name for p in out.iterdir() if p.is_file()}
    assert sorted(said.partition("/: ")[2].split(", ")) == sorted(written)


@pytest.mark.parametrize(
    "estimator, views, says, header",
    [
        ("smile", None, "an estimate, not a bound", "clipped/smile MI"),
        ("mine", ["clipped", "private"], "(mine) held-out lower bound", "clipped/mine MI"),
        (None, None, "held-out figure", "clipped MI"),  # a sweep folder without its settings
        # (its column empty, where the page described the critic's clipped figure)
        ("mine", ["raw", "private"], "did not measure the clipped view", "clipped/mine MI"),
        ("none", ["private"], "without a learned estimator", "clipped MI"),
    ],
)
def test_sweep_report_says_what_its_clipped_column_is(tmp_path, estimator, views, says, header):
    """The sweep's page called SMILE's figure a held-out lower bound whatever the estimator."""
    from opacus_mi.sweep import write_sweep_outputs

    row = {"setting": "sigma_1", "noise_multiplier": 1.0, "epsilon": 2.0, "clipped_mi": 0.4,
           "clipped_ci_low": 0.3, "clipped_ci_high": 0.5}  # fmt: skip
    settings = None if estimator is None else {"estimator": estimator, "views": views}
    table, _ = write_sweep_outputs(tmp_path, [row], settings=settings)
    page = (tmp_path / "report.html").read_text()
    assert says in page
    assert ("lower bound" in page) == (estimator == "mine" and "clipped" in (views or []))
    assert header in table


def test_report_subcommand_rerenders_a_sweep(sweep_dir, tmp_path):
    out, _ = sweep_dir
    (out / "sweep.png").unlink()
    # sweep.csv is the report's source, read and never rewritten: a column of a user's (or
    # another version's) and an unparsable cell used to be dropped or blanked
    source = out / "sweep.csv"
    text = source.read_text(encoding="utf-8")
    lines = text.splitlines()
    edited = "\n".join([lines[0] + ",notes"] + [ln + ",n/a" for ln in lines[1:]]) + "\n"
    source.write_text(edited, encoding="utf-8")
    try:
        rc, stdout, stderr = _main(["report", str(out)])
        assert rc == 0, stderr
        assert source.read_text(encoding="utf-8") == edited
    finally:
        source.write_text(text, encoding="utf-8")
    assert (out / "sweep.png").is_file()
    assert "private/oracle" in stdout
    # a sweep.csv of another kind is refused, not replaced by rows of empty cells
    (tmp_path / "sweep.csv").write_text("lr,loss\n0.1,2.3\n", encoding="utf-8")
    rc, _, stderr = _main(["report", str(tmp_path)])
    _assert_one_line_error(rc, stderr, "no noise_multiplier or epsilon column")
    assert (tmp_path / "sweep.csv").read_text(encoding="utf-8") == "lr,loss\n0.1,2.3\n"


# ------------------------------------------------------------------------------ errors
def _assert_one_line_error(rc: int, stderr: str, *needles: str) -> None:
    assert rc == 2
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("opacus-mi: error:"), stderr
    for needle in needles:
        assert needle in lines[0], (needle, stderr)


def test_bad_delta_is_one_clear_line(tmp_path, capsys):
    rc = cli.main(["run", *TINY, "--delta", "2", "--out", str(tmp_path / "x")])
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err, "--delta")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--noise-multiplier", "-1"], "--noise-multiplier"),
        (["--epochs", "0"], "--epochs"),
        (["--max-grad-norm", "0"], "--max-grad-norm"),
        (["--every", "0"], "--every"),
        (["--target-epsilon", "-3"], "--target-epsilon"),
    ],
)
def test_invalid_values_exit_2(tmp_path, capsys, args, flag):
    rc = cli.main(["run", *TINY, *args, "--out", str(tmp_path / "x")])
    _assert_one_line_error(rc, capsys.readouterr().err, flag)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", True, "--lr must be a positive finite number; got True"),
        ("lr", 10**400, "--lr must be a positive finite number"),  # no OverflowError
        ("lr", float("nan"), "--lr must be a positive finite number; got nan"),
        # (float32 overflowed inside torch's SGD step: a traceback at the first step)
        ("lr", 1e308, "--lr must be at most 3.4e.38 (float32's largest number"),
        ("batch_size", 2.0, "--batch-size must be an integer >= 1; got 2.0"),
        ("seed", -1, "--seed must be an integer from 0 to 4294967295; got -1"),
        ("seed", 2**32, "--seed must be an integer from 0 to 4294967295; got 4294967296"),
        ("fake_size", 3, "--fake-size must be an integer >= 4; got 3"),
        ("model", "vgg", "--model must be one of"),
        ("delta", 10**400, "--delta must lie strictly between 0 and 1"),
        # (an unset shell variable's '': it trained on ./cifar-10-batches-py)
        ("data_root", "", "--data-root must be a folder path; got ''"),
        ("overlap", "on", "--overlap on needs --device cpu"),  # (with device="cuda", below)
        ("delta", 0.0, "--delta must lie strictly between 0 and 1"),
        ("views", (), r"--views must be one or more of raw, clipped, private; got \[\]"),
    ],
)
def test_run_config_names_the_flag_of_a_bad_value(field, value, message):
    """RunConfig and ValidateConfig share one set of checks (opacus_mi.checks)."""
    from dataclasses import replace

    from opacus_mi.training import RunConfig

    base = RunConfig(device="cuda") if field == "overlap" else RunConfig()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        replace(base, **{field: value}).validate()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"views": ("raw",), "estimator": "none"}, "raw would never be measured"),
        ({"views": ("clipped", "private"), "estimator": "none"}, "clipped would never be"),
        ({"estimator": "none", "control": True}, "--control trains a learned critic"),
        ({"views": ("clipped",), "semi_oracle": True}, "--semi-oracle scores the private view"),
    ],
)
def test_run_config_refuses_settings_that_measure_nothing_asked(changes, message):
    """Each ran to the end before, with an empty table or without the figure asked for."""
    from dataclasses import replace

    from opacus_mi.training import RunConfig

    with pytest.raises(ValueError, match=message):
        replace(RunConfig(), **changes).validate()


def test_run_config_views_are_a_word_or_words_kept_once_in_order():
    """--views given as one word is that view (not its letters), and a view given twice is
    measured once, in the order first given. Reference: an order-keeping loop."""
    from opacus_mi.training import RunConfig

    assert RunConfig(views="private").validate().view_tuple == ("private",)
    given = ("private", "clipped", "private", "raw", "clipped")
    want: list[str] = []
    for v in given:
        if v not in want:
            want.append(v)
    cfg = RunConfig(views=given).validate()
    assert cfg.view_tuple == tuple(want) and cfg.as_dict()["views"] == want


@pytest.mark.parametrize(
    "args, says",
    [
        (["--lr", "1e30"], "Lower --lr (1e+30 here)"),
        (["--noise-multiplier", "1e37", "--max-grad-norm", "1000"], "--max-grad-norm (1e+40 here)"),
    ],
)
def test_a_diverged_run_stops_at_the_epochs_end_and_says_why(tmp_path, capsys, args, says):
    """It ran to the end and printed a table of a NaN model (test accuracy 0.1, only flags):
    now the first epoch's end stops it, naming the setting to lower, and its records stay."""
    out = tmp_path / "x"
    rc = cli.main(["run", *TINY, "--epochs", "3", *args, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("opacus-mi: error:")]
    assert len(line) == 1 and "training diverged in epoch 1 of 3 (by step 4)" in line[0]
    assert says in line[0] and f"the records up to then are in {out / 'records.jsonl'}" in line[0]
    records = [json.loads(s) for s in (out / "records.jsonl").read_text().splitlines()]
    assert records and max(r["step"] for r in records) == 3  # the first epoch's, all kept
    assert not (out / "result.json").exists()  # no results of a diverged model


def test_a_sweep_stopped_by_a_diverged_setting_says_which_and_what_it_kept(tmp_path, capsys):
    """The run's message alone did not say which setting of the sweep it was, nor that the
    finished settings' rows were kept in sweep.csv for --resume."""
    from opacus_mi.sweep import read_sweep_csv

    out = tmp_path / "sw"
    argv = ["sweep", *TINY, "--estimator", "none", "--out", str(out)]
    rc = cli.main([*argv, "--noise-multipliers", "1", "1e37", "--max-grad-norm", "1000"])
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("opacus-mi: error:")]
    assert rc == 2 and len(line) == 1 and "Traceback" not in err
    assert line[0].startswith("opacus-mi: error: sigma_1e+37/: training diverged in epoch 1")
    assert f"{out / 'sweep.csv'} holds the rows of the settings finished before it (1)" in line[0]
    assert [r["setting"] for r in read_sweep_csv(out / "sweep.csv")] == ["sigma_1"]
    rc = cli.main([*argv, "--noise-multipliers", "1e37", "--max-grad-norm", "1000"])
    assert rc == 2 and "no setting had finished before it" in capsys.readouterr().err


def test_a_setting_that_fails_after_its_row_is_not_counted_finished(tmp_path, monkeypatch):
    """A setting whose run fails after its row was written (in its plots, say) is not one of
    the settings "finished before it"; the earlier sweep's table, plot and report are gone once
    the new sweep starts (they would be rendered over these runs), its config is the new one."""
    from opacus_mi import sweep as sweep_module
    from opacus_mi.sweep import read_sweep_csv, run_sweep
    from opacus_mi.training import RunConfig

    out = tmp_path / "s"
    base = RunConfig(
        dataset="fake", fake_size=64, epochs=1, batch_size=16, accountant="rdp", estimator=None,
        out=str(out),
    )  # fmt: skip
    run_sweep(base, noise_multipliers=[1.0], progress=False)
    assert {"sweep.txt", "sweep.png", "report.html"} <= {p.name for p in out.iterdir()}
    train = sweep_module.train_and_monitor

    def fails_after_its_row(cfg, **kwargs):
        train(cfg, **kwargs)
        raise ValueError("its plots failed")

    monkeypatch.setattr(sweep_module, "train_and_monitor", fails_after_its_row)
    with pytest.raises(ValueError) as err:
        run_sweep(base, noise_multipliers=[1.0, 2.0], progress=False)
    assert str(err.value) == (
        "sigma_1/: its plots failed. The sweep stopped there: no setting had finished before it"
    )
    assert [r["setting"] for r in read_sweep_csv(out / "sweep.csv")] == ["sigma_1"]
    assert not {"sweep.txt", "sweep.png", "report.html"} & {p.name for p in out.iterdir()}
    swept = json.loads((out / "sweep_config.json").read_text(encoding="utf-8"))["swept"]
    assert swept == "--noise-multipliers 1 2"


def test_a_broken_pipe_that_is_not_stdouts_is_an_error(tmp_path, capsys, monkeypatch):
    """Only a gone stdout reader ends a command silently (141): a pipe or socket the command
    itself writes that breaks is an error, said as any other, and stdout's text is kept."""

    def report(args):
        print("the summary so far")
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_report", report)
    rc = cli.main(["report", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "the summary so far\n"
    assert err == "opacus-mi: error: [Errno 32] Broken pipe\n"


def test_a_warning_is_one_line_naming_another_librarys_file_from_its_package():
    """The monitor's own warnings (which start with "opacus-mi: ") are said once prefixed,
    not "opacus-mi: warning: opacus-mi: ..."; another library's name their file from its
    package on (numpy/...), or in full outside site-packages, and opacus_mi's own none."""
    site = "/venv/lib/python3.11/site-packages/numpy/lib/_methods.py"
    cases = [
        ("opacus-mi: the critic was reset", "/venv/x/opacus_mi/monitor.py", "the critic was reset"),
        ("Mean of empty slice", site, "Mean of empty slice (from numpy/lib/_methods.py:7)"),
        ("odd", "/home/me/tool.py", "odd (from /home/me/tool.py:7)"),
        ("a message of ours", "/venv/x/opacus_mi/budget.py", "a message of ours"),
    ]  # fmt: skip
    for message, filename, said in cases:
        out = io.StringIO()
        cli._show_warning(message, RuntimeWarning, filename, 7, file=out)
        assert out.getvalue() == f"opacus-mi: warning: {said}\n", message


def test_report_of_a_path_that_is_no_folder_says_so(tmp_path, capsys):
    """`report` given a run's file, or a folder that does not exist, says that it wants the
    folder (not that the folder lacks a records.jsonl)."""
    run_file = tmp_path / "records.jsonl"
    run_file.write_text("", encoding="utf-8")
    for path in (run_file, tmp_path / "missing"):
        rc = cli.main(["report", str(path)])
        _assert_one_line_error(rc, capsys.readouterr().err, f"OUTDIR {str(path)!r} is not a folder")


def test_an_error_of_several_lines_is_said_on_one(tmp_path, capsys, monkeypatch):
    """Each error is one `opacus-mi: error:` line, as argparse's are (a log reader or `grep`
    sees it whole), whatever the message's own line breaks and indentation."""

    def report(args):
        raise ValueError("OUTDIR 'x': the first part\n    and  the second\t")

    monkeypatch.setattr(cli, "_cmd_report", report)
    rc = cli.main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err == "opacus-mi: error: OUTDIR 'x': the first part and the second\n"


def test_a_batch_of_every_training_example_is_accepted():
    """A batch as large as the training set is Opacus's q = 1 (one step an epoch), allowed;
    one larger is refused. Reference: len(DataLoader) of that batch size is 1."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from opacus_mi.training import RunConfig, preflight

    split = SimpleNamespace(train=list(range(48)))
    assert len(DataLoader(split.train, batch_size=48)) == 1
    cfg = RunConfig(dataset="fake", batch_size=48, out=str(Path(os.devnull).parent / "nope"))
    assert preflight(cfg, split) is split
    with pytest.raises(ValueError, match="--batch-size 49 exceeds the 48 training examples"):
        preflight(RunConfig(dataset="fake", batch_size=49, out=cfg.out), split)


def test_batch_larger_than_the_data_is_refused(tmp_path, capsys):
    """Opacus takes q = 1 / len(loader): a batch of 2,000 on 1,437 digits silently ran q = 1."""
    rc = cli.main(["run", "--epochs", "1", "--batch-size", "2000", "--out", str(tmp_path / "x")])
    _assert_one_line_error(rc, capsys.readouterr().err, "--batch-size 2000 exceeds the 1437")
    assert not (tmp_path / "x").exists()


def test_validate_config_names_the_flag_of_a_bad_value():
    from dataclasses import replace

    from opacus_mi.validate import ValidateConfig

    for field, value, message in [
        ("lr", 0, "--lr must be a positive finite number; got 0"),
        ("train_noise_multiplier", float("inf"), "--train-noise-multiplier must be a positive"),
        ("bootstrap", -1, r"--bootstrap must be 0 \(no intervals\) or an integer >= 40"),
        # (a 95% interval from one resample read [1, 1] and a verdict "met" on 8 settings)
        ("bootstrap", 1, r"--bootstrap must be 0 \(no intervals\) .*; got 1"),
        # (one draw has no standard error: every setting read "Fano violated")
        ("draws", 1, "--draws must be an integer >= 2; got 1"),
        ("stages", "3", "--stages must be a number or a sequence of numbers; got '3'"),
        ("candidates", 1, "--candidates must be an integer >= 2; got 1"),
        ("out", " ", "--out must be a folder path; got ' '"),
        ("out", None, "--out must be a folder path; got None"),
        ("data_root", " ", "--data-root must be a folder path; got ' '"),
        ("seed", 2**32, "--seed must be an integer from 0 to 4294967295"),
    ]:
        with pytest.raises(ValueError, match=message):
            replace(ValidateConfig(), **{field: value}).validate()


def test_validate_argument_errors_leave_no_empty_out_folder(tmp_path, capsys):
    """Its --out was made before the checks against the data: each error left an empty folder
    (and --images beyond the data asked for more candidates than there are)."""
    base = ["validate", "--noise-multipliers", "0", "0.1", "--stages", "0", "--iters", "1"]
    for extra, message in [
        (["--candidates", "5000"], "--candidates 5000 exceeds the 1437"),
        (["--batch-sizes", "1", "4", "2000"], "batch sizes up to"),
        (["--images", "2000", "--candidates", "100"], "pass --images <= 1437"),
    ]:
        rc = cli.main([*base, *extra, "--out", str(tmp_path / "v")])
        _assert_one_line_error(rc, capsys.readouterr().err, message)
        assert not (tmp_path / "v").exists()


def test_help_gives_one_default_per_flag():
    """Flags whose None default says "not given" read "(default 64) (default: None)"."""
    for command in ("run", "sweep", "validate", "report"):
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            assert cli.main([command, "--help"]) == 0
        assert "(default: None)" not in text.getvalue()
        assert command == "report" or "(default: " in text.getvalue()


def test_config_from_kwargs_takes_run_settings_and_ignores_the_rest():
    """A sweep builds its runs' configs from keyword arguments holding more than a run's
    settings. Reference: RunConfig built with its own fields."""
    from opacus_mi.training import RunConfig, config_from_kwargs

    got = config_from_kwargs(epochs=2, lr=0.25, noise_multipliers=[1, 2], resume=True)
    assert got == RunConfig(epochs=2, lr=0.25)


def test_configs_take_numpy_scalars_as_the_numbers_they_hold():
    """A grid built with NumPy (``np.int64`` counts, ``np.arange`` sigmas) was refused as "must
    be an integer", or failed with a TypeError naming no flag."""
    from opacus_mi.training import RunConfig
    from opacus_mi.validate import ValidateConfig

    cfg = ValidateConfig(
        images=np.int64(8), stages=np.int64(3), noise_multipliers=tuple(np.arange(1, 3.0))
    ).validate()
    assert (cfg.images, cfg.stages, cfg.noise_multipliers) == (8, (3,), (1.0, 2.0))
    assert type(cfg.images) is int and all(type(s) is float for s in cfg.noise_multipliers)
    run = RunConfig(epochs=np.int64(2), noise_multiplier=np.float32(0.5)).validate()
    assert (run.epochs, run.noise_multiplier) == (2, 0.5) and type(run.epochs) is int
    grid = ValidateConfig(stages=np.arange(0, 181, 90), batch_sizes=np.array([1, 4])).validate()
    assert (grid.stages, grid.batch_sizes) == ((0, 90, 180), (1, 4))


def test_a_sweep_takes_a_numpy_grid_and_refuses_a_file_where_a_run_folder_goes(tmp_path, capsys):
    """np.arange noise multipliers were refused as not positive finite numbers; a file named
    like a run's folder failed the first run after the last sweep's outputs were deleted."""
    from opacus_mi.sweep import run_sweep
    from opacus_mi.training import RunConfig

    out = tmp_path / "s"
    base = RunConfig(
        dataset="fake", fake_size=64, epochs=1, batch_size=16, accountant="rdp", estimator=None,
        out=str(out),
    )  # fmt: skip
    rows, _, _ = run_sweep(base, noise_multipliers=np.arange(1.0, 3.0), progress=False)
    assert [r["setting"] for r in rows] == ["sigma_1", "sigma_2"]
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    (out / "sigma_3").write_text("not a folder")
    with pytest.raises(ValueError, match="--out .*sigma_3' is a file, not a folder"):
        run_sweep(base, noise_multipliers=[1.0, 3.0], progress=False)
    after = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != "sigma_3"}
    assert after == before


def test_a_sweep_stopped_while_a_finished_run_is_plotted_keeps_that_runs_row(tmp_path, monkeypatch):
    """A run's row was added once its plots and report were drawn (~1 s): Ctrl-C there lost
    the row of a run whose records and result.json were all on disk. Reference: the rows an
    uninterrupted sweep of the same settings writes."""
    import opacus_mi.training as training
    from opacus_mi.sweep import read_sweep_csv, run_sweep
    from opacus_mi.training import RunConfig

    def base(out):
        return RunConfig(
            dataset="fake", fake_size=64, epochs=1, batch_size=16, accountant="rdp",
            estimator=None, out=str(out),
        )  # fmt: skip

    full, _, _ = run_sweep(base(tmp_path / "full"), noise_multipliers=[1.0, 2.0], progress=False)
    drawn = training.write_run_outputs

    def stop_at_the_second(out, *args, **kwargs):
        if Path(out).name == "sigma_2":
            raise KeyboardInterrupt
        return drawn(out, *args, **kwargs)

    monkeypatch.setattr(training, "write_run_outputs", stop_at_the_second)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(base(out), noise_multipliers=[1.0, 2.0], progress=False)
    kept = read_sweep_csv(out / "sweep.csv")
    assert [r["setting"] for r in kept] == ["sigma_1", "sigma_2"]
    for got, want in zip(kept, read_sweep_csv(tmp_path / "full" / "sweep.csv"), strict=True):
        for key in ("epsilon", "oracle_mi", "oracle_ci_low", "test_accuracy", "noise_multiplier"):
            assert got[key] == want[key], key
    assert [r["setting"] for r in full] == ["sigma_1", "sigma_2"]


def test_overlap_on_and_off_write_the_same_records(tmp_path):
    """The worker thread changes when a record is made, not what it holds (nor training)."""
    got = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        rc, _, stderr = _main(["run", *TINY, "--overlap", mode, "--out", str(out)])
        assert rc == 0, stderr
        records = without_timing(read_jsonl(out / "records.jsonl"))
        result = json.loads((out / "result.json").read_text())
        got[mode] = records, result["test_accuracy"], result["epsilon"]
    assert len(got["on"][0]) == 4 and got["on"] == got["off"]


def test_missing_data_root(tmp_path, capsys):
    argv = ["run", "--dataset", "cifar10", "--data-root", "/nonexistent", "--no-progress"]
    rc = cli.main([*argv, "--out", str(tmp_path / "x")])
    _assert_one_line_error(rc, capsys.readouterr().err, "--data-root")


@pytest.mark.parametrize(
    "argv, says",
    [
        # each was accepted and changed nothing, without a word (the data set's warning was
        # a UserWarning, which the CLI hides as Opacus's and torch's chatter)
        (
            ["run", "--dataset", "digits", "--data-root", "/my/cifar"],
            "--data-root is read only for --dataset cifar10 or celeba ('digits' is built in)",
        ),
        (  # (validate reads no CelebA)
            ["validate", "--data-root", "/my/cifar"],
            "--data-root is read only for --dataset cifar10 ('digits' is built in)",
        ),
        (
            ["sweep", "--noise-multipliers", "1", "--dataset", "fake", "--data-root", "d"],
            "('fake' is built in)",
        ),
        (["run", "--dataset", "digits", "--fake-size", "50"], "--fake-size sizes --dataset fake"),
        (["run", "--accountant", "rdp", "--exact-epsilon"], "--exact-epsilon: with --accountant"),
        (
            ["sweep", "--noise-multipliers", "1", "--accountant", "gdp", "--exact-epsilon"],
            "already",
        ),
        (["run", *TINY, "--estimator", "none", "--token-dim", "8"], "--token-dim: with"),
        (
            [
                "sweep",
                *TINY,
                "--noise-multipliers",
                "1",
                "--estimator",
                "none",
                "--tokenizer",
                "transformer",
                "--train-every",
                "7",
                "--train-iters",
                "2",
            ],
            "--tokenizer --train-every --train-iters: with --estimator none nothing is learnt",
        ),  # fmt: skip
        (["run", *TINY, "--device", "xpu"], "--device 'xpu': xpu is not available here"),
        (["run", *TINY, "--device", "meta"], "--device 'meta': meta is not available"),
    ],
)
def test_flags_without_effect_are_refused_before_anything_runs(tmp_path, capsys, argv, says):
    out = tmp_path / "x"
    rc = cli.main([*argv, "--no-progress", "--out", str(out)])
    _assert_one_line_error(rc, capsys.readouterr().err, says)
    assert not out.exists()


def test_learning_flags_stay_with_the_semi_oracle_but_a_token_encoder_does_not(tmp_path):
    """The semi-oracle learns from sketch tokens without an estimator: the sketch's width and
    its training flags reach the monitor; a token encoder (the critics' alone) is refused."""
    from opacus_mi.cli import _config, build_parser

    argv = ["run", *TINY, "--estimator", "none", "--semi-oracle", "--token-dim", "8"]
    argv += ["--train-iters", "3", "--out", str(tmp_path / "x")]
    cfg = _config(build_parser().parse_args(argv))
    assert cfg.token_dim == 8 and cfg.train_iters == 3 and cfg.tokenizer == "sketch"
    with pytest.raises(ValueError, match="--tokenizer: with --estimator none no critic"):
        _config(build_parser().parse_args([*argv, "--tokenizer", "transformer"]))


_FLAG_OF_FIELD = {  # each RunConfig field: the run flags that set it, and the value they give
    "dataset": (["--dataset", "fake"], "fake"),
    "data_root": (["--dataset", "cifar10", "--data-root", "d"], "d"),
    "model": (["--model", "mlp"], "mlp"),
    "epochs": (["--epochs", "3"], 3),
    "batch_size": (["--batch-size", "32"], 32),
    "lr": (["--lr", "0.125"], 0.125),
    "noise_multiplier": (["--noise-multiplier", "2.5"], 2.5),
    "target_epsilon": (["--target-epsilon", "3.5"], 3.5),
    "max_grad_norm": (["--max-grad-norm", "0.75"], 0.75),
    "delta": (["--delta", "1e-6"], 1e-6),
    "accountant": (["--accountant", "rdp"], "rdp"),
    "exact_epsilon": (["--exact-epsilon"], True),
    "estimator": (["--estimator", "infonce"], "infonce"),
    "views": (["--views", "private", "raw"], ("private", "raw")),
    "token_dim": (["--token-dim", "24"], 24),
    "every": (["--every", "3"], 3),
    "train_every": (["--train-every", "5"], 5),
    "train_iters": (["--train-iters", "7"], 7),
    "control": (["--control"], True),
    "semi_oracle": (["--semi-oracle"], True),
    "tokenizer": (["--tokenizer", "autoencoder"], "autoencoder"),
    "device": (["--device", "cpu:0"], "cpu:0"),
    "seed": (["--seed", "11"], 11),
    "out": (["--out", "elsewhere"], "elsewhere"),
    "tensorboard": (["--tensorboard"], True),
    "fake_size": (["--dataset", "fake", "--fake-size", "40"], 40),
    "threads": (["--threads", "2"], 2),
    "overlap": (["--overlap", "off"], "off"),
}


def test_each_run_flag_sets_its_own_run_config_field_and_no_other():
    """`_config` copies 28 flags into RunConfig by hand: one copied into the wrong field, or
    left at its default, was accepted and ignored. Each field (RunConfig's own list) is set by
    its flag to a value none of the defaults has, and every other field keeps its default."""
    import dataclasses

    from opacus_mi.cli import _config, build_parser
    from opacus_mi.training import RunConfig

    fields = [f.name for f in dataclasses.fields(RunConfig)]
    assert sorted(_FLAG_OF_FIELD) == sorted(fields)  # (a new field gets its line here)
    parser = build_parser()
    default = _config(parser.parse_args(["run"]))
    assert default == RunConfig().validate()
    for name, (flags, value) in _FLAG_OF_FIELD.items():
        cfg = _config(parser.parse_args(["run", *flags]))
        assert getattr(default, name) != value and getattr(cfg, name) == value, name
        changed = {f for f in fields if getattr(cfg, f) != getattr(default, f)}
        assert changed == {name} | ({"dataset"} if "--dataset" in flags else set()), name


def test_each_validate_flag_sets_its_own_validate_config_field_and_no_other(monkeypatch):
    """The same for `validate`, whose flags are a subset of ValidateConfig's fields (the rest
    are the library's): each sets its field and no other."""
    import dataclasses
    from types import SimpleNamespace

    from opacus_mi import validate
    from opacus_mi.validate import ValidateConfig

    seen = []

    def run_validate(cfg, progress=True):
        seen.append(cfg)
        return SimpleNamespace(text="", out_dir=Path(cfg.out), files=[])

    monkeypatch.setattr(validate, "run_validate", run_validate)
    flags = {
        "dataset": (["--dataset", "cifar10", "--data-root", "d"], "cifar10"),
        "data_root": (["--dataset", "cifar10", "--data-root", "d"], "d"),
        "out": (["--out", "elsewhere"], "elsewhere"),
        "seed": (["--seed", "11"], 11),
        "noise_multipliers": (["--noise-multipliers", "0.5", "3"], (0.5, 3.0)),
        "batch_sizes": (["--batch-sizes", "2", "4"], (2, 4)),
        "stages": (["--stages", "0", "7"], (0, 7)),
        "restarts": (["--restarts", "3"], 3),
        "iters": (["--iters", "9"], 9),
        "images": (["--images", "5"], 5),
        "candidates": (["--candidates", "40"], 40),
    }
    assert cli.main(["validate"]) == 0
    default = seen.pop()
    assert default == ValidateConfig()
    for name, (argv, value) in flags.items():
        assert cli.main(["validate", *argv]) == 0, name
        cfg = seen.pop()
        assert getattr(default, name) != value and getattr(cfg, name) == value, name
        changed = {f.name for f in dataclasses.fields(ValidateConfig)
                   if getattr(cfg, f.name) != getattr(default, f.name)}  # fmt: skip
        assert changed == {name} | ({"dataset", "data_root"} if "--dataset" in argv else set())


def test_progress_bar_redraws_rarely_off_a_terminal(tmp_path, monkeypatch):
    """Written to a file, the bar drew 56 lines in a 69-step run."""
    import tqdm.auto

    seen, real = {}, tqdm.auto.tqdm

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)  # (imported inside the run: it gets the spy)
    argv = ["run", *TINY, "--estimator", "none", "--out", str(tmp_path / "x")]
    assert cli.main([a for a in argv if a != "--no-progress"]) == 0
    assert seen["mininterval"] == 30.0  # (pytest's stderr is no terminal)


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = cli.main(["run", *TINY, "--out", str(blocker / "sub")])
    _assert_one_line_error(rc, capsys.readouterr().err, "--out")


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--noise-multiplier", "1", "--target-epsilon", "3"],  # mutually exclusive
        ["run", "--accountant", "moments"],
        ["run", "--views", "gradients"],
        ["run", "--overlap", "sometimes"],
        ["sweep", "--epochs", "1"],  # needs --noise-multipliers or --target-epsilons
        [],
    ],
)
def test_parse_errors_exit_2(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and "error:" in err


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_noiseless_run_is_the_non_private_baseline(tmp_path, accountant):
    """``--noise-multiplier 0`` was refused ("must be a positive finite number") though the
    library, the plots and ``validate`` take sigma = 0 as the non-private baseline. Reference:
    Opacus's own accountant at sigma 0 (RDP: inf), the Gaussian channel's 1/(2 sigma^2) and the
    oracle's ceiling ln B (distinct gradients); the folder re-renders and ``--resume`` keeps it."""
    from opacus.accountants import RDPAccountant

    from opacus_mi.records import read_jsonl

    out = tmp_path / "baseline"
    tiny = [*TINY[: TINY.index("--accountant")], "--accountant", accountant, "--no-progress"]
    argv = ["run", *tiny, "--noise-multiplier", "0", "--estimator", "none", "--out", str(out)]
    rc, stdout, stderr = _main(argv)
    assert rc == 0, stderr
    rdp = RDPAccountant()
    rdp.step(noise_multiplier=0.0, sample_rate=16 / 64)
    assert rdp.get_epsilon(1e-5) == math.inf
    result = json.loads((out / "result.json").read_text())
    assert result["noise_multiplier"] == 0 and float(result["epsilon"]) == math.inf
    records = read_jsonl(out / "records.jsonl")
    assert records and all(r.noise_multiplier == 0 and r.epsilon == math.inf for r in records)
    assert all(r.mi_bound == math.inf for r in records)
    full = [r for r in records if r.batch_size > 1]
    assert full and all(
        r.mi["private/oracle"].nats == pytest.approx(math.log(r.batch_size), abs=1e-6) for r in full
    )
    assert "epsilon: inf" in stdout and "(noise multiplier 0)" in stdout
    rc, _, stderr = _main(["report", str(out)])
    assert rc == 0, stderr
    rc, _, stderr = _main([*argv, "--resume"])
    assert rc == 0 and "kept: finished with these settings" in stderr, stderr


def test_sweep_rejects_bad_values(tmp_path, capsys):
    rc = cli.main(["sweep", "--noise-multipliers", "1", "-2", *TINY, "--out", str(tmp_path)])
    _assert_one_line_error(rc, capsys.readouterr().err, "--noise-multipliers")


def test_sweep_refuses_each_bad_grid_by_name_before_writing(tmp_path):
    """Every sweep value must be finite, a target epsilon positive and a noise multiplier >= 0
    (0, no noise, is the non-private baseline; a target epsilon of 0 is the edge), distinct (an
    exact repeat named as such, not as a folder clash), and exactly one kind of grid is given;
    all refused before --out is made."""
    from opacus_mi.sweep import run_sweep
    from opacus_mi.training import RunConfig

    out = tmp_path / "s"
    base = RunConfig(dataset="fake", fake_size=64, epochs=1, batch_size=16, out=str(out))
    for kwargs, message in [
        ({"noise_multipliers": [1.0, -1e-9]}, r"--noise-multipliers values must be finite num"),
        ({"noise_multipliers": [0.0, math.inf]}, r"must be finite numbers >= 0 \(0: no noise\)"),
        ({"target_epsilons": [0]}, "--target-epsilons values must be positive finite numbers"),
        ({"noise_multipliers": [2.0, 1.0, 2.0]}, r"--noise-multipliers values must be distinct"),
        ({"target_epsilons": [3.0, 3.0]}, r"--target-epsilons values must be distinct"),
        ({"noise_multipliers": [1.0], "target_epsilons": [1.0]}, "give exactly one of"),
        ({}, "give exactly one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_sweep(base, progress=False, **kwargs)
        assert not out.exists()


def test_report_names_a_torn_line_in_one_warning_line(run_dir, tmp_path, capsys):
    """A killed run's torn last record: the report is made and the skip is said, on one line."""
    import shutil

    out = tmp_path / "torn"
    shutil.copytree(run_dir[0], out)
    with open(out / "records.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 99, "batch')
    assert cli.main(["report", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "warning" in line] == [
        f"opacus-mi: warning: {out / 'records.jsonl'}: skipped 1 line(s) that are not complete "
        f"JSON (line {len((run_dir[0] / 'records.jsonl').read_text().splitlines()) + 1}): a record "
        "a killed run was writing"
    ]


def test_report_says_which_run_file_it_could_not_read(run_dir, tmp_path, capsys):
    """A corrupt config.json was skipped without a word; a missing result.json (a run stopped
    before it finished) is no surprise and is not warned about."""
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(run_dir[0], out)
    (out / "config.json").write_text("{bad", encoding="utf-8")
    (out / "result.json").unlink()
    assert cli.main(["report", str(out)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"opacus-mi: warning: {out / 'config.json'}: not read (")


def test_report_renders_a_run_whose_config_json_is_not_an_object(run_dir, tmp_path):
    """A config.json holding JSON that is no object (an edited one: a list) is read as no
    config, warned, and the run rendered without it, not an AttributeError. Reference: the
    file as json reads it, a list."""
    import shutil

    from opacus_mi.training import rerender_run

    out = tmp_path / "edited"
    shutil.copytree(run_dir[0], out)
    (out / "config.json").write_text("[1, 2]", encoding="utf-8")
    assert isinstance(json.loads((out / "config.json").read_text()), list)
    with pytest.warns(RuntimeWarning, match=r"config.json: not read \(a JSON list, not an"):
        summary, files = rerender_run(out)
    assert "private/oracle" in summary and (out / "report.html") in files


def test_outputs_written_without_a_runs_config_are_not_called_unfinished(run_dir, tmp_path):
    """write_run_outputs for records of one's own loop (no config, no result.json) makes no
    "not finished" line: that is said of an opacus-mi run's folder (a config) only.
    Reference: the records of a run, read back with read_jsonl."""
    from opacus_mi.training import write_run_outputs

    records = read_jsonl(run_dir[0] / "records.jsonl")
    mine, run = tmp_path / "mine", tmp_path / "run"
    for folder in (mine, run):
        folder.mkdir()
    summary, _ = write_run_outputs(mine, records)
    assert "not finished" not in summary and "private/oracle" in summary
    summary, _ = write_run_outputs(run, records, config={"dataset": "fake"})
    assert (
        f"not finished: the run has no result.json; its records end at step {records[-1].step}"
        in (summary)
    )


def test_report_renders_an_edited_result_json_without_a_field_that_is_not_a_number(
    run_dir, tmp_path, capsys
):
    """``"epsilon": "abc"`` in result.json stopped ``report`` with "Unknown format code 'f'
    for object of type 'str'", naming neither the file nor the field."""
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(run_dir[0], out)
    result = json.loads((out / "result.json").read_text())
    result.update(epsilon="abc", test_accuracy=None, accuracy_per_epoch=["x"])
    (out / "result.json").write_text(json.dumps(result), encoding="utf-8")
    assert cli.main(["report", str(out)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [
        f"opacus-mi: warning: {out / 'result.json'}: epsilon, accuracy_per_epoch not a number "
        "as a run writes it; rendered without"
    ]
    summary = (out / "summary.txt").read_text()
    assert "epsilon: " not in summary and "test accuracy" not in summary
    # a run's own result.json (its NaN accuracies written "nan") renders without a warning
    result = json.loads((run_dir[0] / "result.json").read_text())
    result["accuracy_per_epoch"] = ["nan", *result["accuracy_per_epoch"]]
    (out / "result.json").write_text(json.dumps(result), encoding="utf-8")
    assert cli.main(["report", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_stopped_sweeps_hint_names_a_folder_report_renders(run_dir, tmp_path, capsys):
    """Stopped before its first run finished, a sweep has no sweep.csv yet: the hint named
    ``report OUT``, which refused it (neither a run nor a sweep); the stopped run's records are
    in its own folder."""
    import argparse
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(run_dir[0], out / "sigma_2")  # an earlier sweep's run: not this one's
    os.utime(out / "sigma_2" / "records.jsonl", ns=(1, 1))
    (out / "sweep_config.json").write_text("{}", encoding="utf-8")
    args = argparse.Namespace(command="sweep", out=str(out))
    assert cli._kept(args, 0) == ""
    shutil.copytree(run_dir[0], out / "sigma_1")
    os.utime(out / "sigma_1" / "records.jsonl")  # (written since the config, as a run's is)
    hint = cli._kept(args, 0)
    assert hint == (
        f"; no run finished; the stopped one's records are in {out / 'sigma_1'} "
        f"(`opacus-mi report {out / 'sigma_1'}` renders them)"
    )
    assert cli.main(["report", str(out / "sigma_1")]) == 0
    assert cli.main(["report", str(out)]) == 2  # (what the hint named before)
    (out / "sweep.csv").write_text("noise_multiplier,epsilon\n1,2\n", encoding="utf-8")
    assert (
        cli._kept(args, 0)
        == f"; what was finished is in {out} (`opacus-mi report {out}` renders it)"
    )
    assert cli._kept(argparse.Namespace(command="sweep", out=str(tmp_path / "none")), 0) == ""


@pytest.mark.parametrize(
    "args, says",
    [
        # was "--candidates must be at least 2001", which no --candidates could satisfy
        (["--batch-sizes", "2000"], "--batch-sizes 2000 leaves no candidate outside the batch"),
        (["--batch-sizes", "64", "--candidates", "20"], "--candidates 20 is too few for batch"),
    ],
)
def test_validate_batch_and_candidates_errors_name_the_flag_to_change(tmp_path, capsys, args, says):
    rc = cli.main(["validate", *args, "--out", str(tmp_path / "v"), "--no-progress"])
    _assert_one_line_error(rc, capsys.readouterr().err, says)


def test_run_finishes_where_opacus_prv_cannot_compute_epsilon(tmp_path, capsys):
    """sigma 1e-4: Opacus's PRV accountant raises MemoryError. The run used to end in a
    traceback after training, then with epsilon NaN; now its outputs are written with
    Opacus's RDP epsilon for the same history, flagged and said."""
    from opacus.accountants import RDPAccountant

    out = tmp_path / "x"
    argv = [
        "run",
        *TINY,
        "--accountant",
        "prv",
        "--noise-multiplier",
        "1e-4",
        "--estimator",
        "none",
    ]
    argv += ["--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "flags seen: epsilon_rdp" in captured.out
    assert "records carry Opacus's RDP epsilon" in captured.err
    result = json.loads((out / "result.json").read_text())
    records = read_jsonl(out / "records.jsonl")
    rdp = RDPAccountant()
    rdp.history = [(1e-4, records[-1].sample_rate, result["steps"])]
    assert result["epsilon"] == rdp.get_epsilon(result["delta"])


def test_report_keeps_counts_of_zero_and_drops_counts_that_are_no_whole_number(tmp_path):
    """An edited result.json's steps or records that are negative or fractional are left out
    (warned), a count of 0 (a run stopped before its first step) is kept. Reference: the
    fields' meaning: a whole number of steps at or above 0."""
    from opacus_mi.training import _numbers_only

    path = tmp_path / "result.json"
    assert _numbers_only(path, {"steps": 0, "records": 0}) == {"steps": 0, "records": 0}
    with pytest.warns(RuntimeWarning, match="steps, records not a whole number"):
        kept = _numbers_only(path, {"steps": 2.5, "records": -1, "epsilon": 1.0})
    assert kept == {"epsilon": 1.0}


@pytest.mark.parametrize(
    "edit, says, line",
    [
        ({"delta": None, "noise_multiplier": None}, None, "at delta - (noise multiplier -)"),
        ({"steps": "inf"}, "steps not a whole number", "at delta 1e-05 (noise multiplier 1)"),
        ({"steps": math.nan}, "steps not a whole number", "at delta 1e-05"),
        ({"steps": 2.5, "records": -1}, "steps, records not a whole number", "at delta"),
        ({"epsilon": 9.023709355578559e-05}, None, "epsilon: 9.02e-05 at delta 1e-05"),
    ],
)
def test_report_renders_result_json_fields_that_are_null_or_no_count(
    run_dir, tmp_path, capsys, edit, says, line
):
    """``"delta": null`` failed with "unsupported format string passed to NoneType", naming
    nothing; ``"steps": "inf"`` with an OverflowError traceback, after records.csv was
    rewritten. And the results line gave a 9.02e-05 epsilon (sigma 1e4) as 0.000, where the
    table's title gave it as 9.02e-05."""
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(run_dir[0], out)
    result = json.loads((out / "result.json").read_text())
    result.update(edit)
    (out / "result.json").write_text(json.dumps(result), encoding="utf-8")
    assert cli.main(["report", str(out)]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warned == ([] if says is None else [
        f"opacus-mi: warning: {out / 'result.json'}: {says} as a run writes it; rendered without"
    ])  # fmt: skip
    summary = (out / "summary.txt").read_text()
    assert line in summary
    assert line.removeprefix("epsilon: ") in (out / "report.html").read_text()


def test_report_of_a_stopped_run_says_it_did_not_finish(run_dir, tmp_path, capsys):
    """A run stopped by Ctrl-C, rendered by ``report``: its summary and report.html read like a
    finished run's, less the results, with nothing saying it stopped."""
    import shutil

    out = tmp_path / "stopped"
    shutil.copytree(run_dir[0], out)
    (out / "result.json").unlink()
    last = read_jsonl(out / "records.jsonl")[-1].step
    assert cli.main(["report", str(out)]) == 0
    said = f"not finished: the run has no result.json; its records end at step {last}"
    assert said in (out / "summary.txt").read_text()
    assert "not finished" in (out / "report.html").read_text()
    (out / "checkpoint.pt").write_bytes(b"")  # (its latest epoch's, which --resume goes on from)
    assert cli.main(["report", str(out)]) == 0
    assert f"{said} (--resume goes on from its latest epoch)" in (out / "summary.txt").read_text()
    shutil.copytree(run_dir[0], tmp_path / "finished")
    assert cli.main(["report", str(tmp_path / "finished")]) == 0
    assert "not finished" not in (tmp_path / "finished" / "summary.txt").read_text()
    # (a finished run's result.json that cannot be read is said so, not called unfinished)
    (tmp_path / "finished" / "result.json").write_text("{bad", encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "finished")]) == 0
    assert "result.json: not read" in capsys.readouterr().err
    assert "not finished" not in (tmp_path / "finished" / "summary.txt").read_text()


def test_report_keeps_an_infinite_epsilon(tmp_path):
    """result.json wrote inf (a noiseless run's epsilon, or PRV's at a tiny sigma) as null, so a
    re-rendered summary lost the epsilon line the run's own summary had."""
    import math

    from opacus_mi.records import JsonlSink, LeakageRecord, MIValue
    from opacus_mi.training import _write_json, rerender_run, write_run_outputs

    records = [
        LeakageRecord(
            step=i,
            batch_size=16,
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            sample_rate=0.25,
            epsilon=math.inf,
            delta=1e-5,
            mi={"private/oracle": MIValue(2.7, 2.6, 2.8, 16)},
            epsilon_step=i,
        )
        for i in range(3)
    ]
    sink = JsonlSink(tmp_path / "records.jsonl")
    for r in records:
        sink(r)
    sink.close()
    results = {"epsilon": math.inf, "delta": 1e-5, "noise_multiplier": 0.0, "steps": 3}
    _write_json(tmp_path / "result.json", results)
    assert json.loads((tmp_path / "result.json").read_text())["epsilon"] == "inf"
    first, _ = write_run_outputs(tmp_path, records, results=results)
    again, _ = rerender_run(tmp_path)
    assert "epsilon: inf at delta" in first
    assert again == first


def test_a_target_epsilon_prv_could_not_calibrate_is_refused_with_the_ceiling(tmp_path, capsys):
    """--target-epsilon 1000 under PRV ran Opacus's bisection into noise multipliers where one
    epsilon takes minutes (it had not finished after 5 minutes on digits)."""
    from opacus.accountants import RDPAccountant

    from opacus_mi.training import PRV_CALIBRATION_FLOOR

    argv = ["run", *TINY, "--accountant", "prv", "--target-epsilon", "1000"]
    rc = cli.main([*argv, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    rdp = RDPAccountant()  # the ceiling the message quotes: RDP at the floor, 4 steps at q 1/4
    rdp.history = [(PRV_CALIBRATION_FLOOR, 0.25, 4)]
    _assert_one_line_error(rc, err, "--target-epsilon 1000 needs a noise multiplier below 0.2")
    assert f"at most {rdp.get_epsilon(1e-5):.0f})" in err and "--accountant rdp" in err
    assert not (tmp_path / "x").exists()
    # a sweep checks every target before it writes or trains anything
    sweep = ["sweep", *TINY, "--accountant", "prv", "--target-epsilons", "20", "1000"]
    rc = cli.main([*sweep, "--estimator", "none", "--out", str(tmp_path / "s")])
    _assert_one_line_error(rc, capsys.readouterr().err, "--target-epsilons 1000 needs a noise")
    assert not (tmp_path / "s").exists()
    # a target within reach calibrates, under PRV as under RDP
    assert cli.main([*argv[:-1], "20", "--out", str(tmp_path / "y")]) == 0


def test_a_target_epsilon_out_of_rdps_reach_is_refused_before_anything_is_written(tmp_path, capsys):
    """Opacus said only "The privacy budget is too low." (naming no flag), after the previous
    run's records had been deleted."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import MAX_SIGMA

    out = tmp_path / "x"
    assert cli.main(["run", *TINY, "--estimator", "none", "--out", str(out)]) == 0
    before = (out / "records.jsonl").read_bytes()
    rdp = RDPAccountant()  # the floor the message quotes: where Opacus's search gives up
    rdp.history = [(2 * MAX_SIGMA, 0.25, 4)]
    floor = rdp.get_epsilon(1e-5)
    argv = ["run", *TINY, "--target-epsilon", f"{floor / 2:g}", "--out", str(out)]
    rc = cli.main(argv)
    _assert_one_line_error(rc, capsys.readouterr().err, "out of reach", f"at least {floor:.3g}")
    assert (out / "records.jsonl").read_bytes() == before  # the last run's records kept
    sweep = ["sweep", *TINY, "--target-epsilons", "5", f"{floor / 2:g}", "--estimator", "none"]
    rc = cli.main([*sweep, "--out", str(tmp_path / "s")])
    _assert_one_line_error(rc, capsys.readouterr().err, "--target-epsilons", "out of reach")
    assert not (tmp_path / "s").exists()


def test_a_target_epsilon_too_large_for_the_calibration_to_end_is_refused(tmp_path, capsys):
    """From about 7e13 Opacus's RDP search (within 0.01 of the target) never ended."""
    rc = cli.main(["run", *TINY, "--target-epsilon", "1e14", "--out", str(tmp_path / "x")])
    _assert_one_line_error(rc, capsys.readouterr().err, "--target-epsilon 1e+14 is too large")
    assert not (tmp_path / "x").exists()
    sweep = ["sweep", *TINY, "--target-epsilons", "5", "1e300", "--estimator", "none"]
    rc = cli.main([*sweep, "--out", str(tmp_path / "s")])
    _assert_one_line_error(rc, capsys.readouterr().err, "--target-epsilons 1e+300 is too large")


def test_a_sweep_whose_first_run_would_fail_keeps_the_last_sweeps_outputs(tmp_path, capsys):
    """A batch larger than the data (or a missing --data-root) failed in the first run, after
    the last sweep's sweep.csv, plots and report had been deleted and its sweep_config.json
    overwritten: `opacus-mi report` could no longer render it."""
    out = tmp_path / "s"
    sweep = ["sweep", *TINY, "--noise-multipliers", "1", "2", "--estimator", "none"]
    assert cli.main([*sweep, "--out", str(out)]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    assert "sweep.csv" in before
    capsys.readouterr()
    rc = cli.main([*sweep, "--batch-size", "5000", "--out", str(out)])
    _assert_one_line_error(rc, capsys.readouterr().err, "--batch-size 5000 exceeds")
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    rc = cli.main([*sweep, "--batch-size", "5000", "--out", str(tmp_path / "new")])
    assert rc == 2 and not (tmp_path / "new").exists()


def test_a_gdp_target_too_large_to_calibrate_asks_for_a_smaller_one(tmp_path, capsys):
    """GDP's epsilon solver fails ("f(a) and f(b) must have different signs") where epsilon is
    above 500 as well as where it is 0: --target-epsilon 10 was told "Pass a larger target",
    though 2 calibrates."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    def opacus(target: float) -> float:  # Opacus's own calibration at TINY's q = 1/3, 3 steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_noise_multiplier(
                target_epsilon=target,
                target_delta=1e-5,
                sample_rate=1 / 3,
                epochs=1,
                accountant="gdp",
            )

    assert opacus(2) > 0
    for target, way in (("10", "smaller"), ("1e-09", "larger")):
        with pytest.raises(ValueError, match="different signs"):
            opacus(float(target))
        argv = ["run", *TINY, "--accountant", "gdp", "--target-epsilon", target]
        rc = cli.main([*argv, "--estimator", "none", "--out", str(tmp_path / target)])
        err = capsys.readouterr().err
        _assert_one_line_error(rc, err, f"--target-epsilon {target}:", f"Pass a {way} target")
        assert "--noise-multiplier" in err
        assert not (tmp_path / target).exists()  # calibrated before --out was made


def test_a_target_epsilon_runs_at_the_noise_opacus_make_private_with_epsilon_picks(tmp_path):
    """The run calibrates before it makes --out, then trains at that sigma: it must be the one
    Opacus's own make_private_with_epsilon gives the same loader, target and epochs."""
    import warnings

    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    from opacus_mi.data import load_dataset

    out = tmp_path / "x"
    argv = ["run", *TINY, "--target-epsilon", "3", "--estimator", "none", "--out", str(out)]
    assert cli.main(argv) == 0
    run_sigma = json.loads((out / "result.json").read_text())["noise_multiplier"]
    split = load_dataset("fake", seed=0, fake_size=64)
    model = torch.nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, optimizer, _ = PrivacyEngine(accountant="rdp").make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(split.train, batch_size=16),
            target_epsilon=3.0,
            target_delta=1e-5,
            epochs=1,
            max_grad_norm=1.0,
        )
    assert run_sigma == optimizer.noise_multiplier


def _loader_rate(examples: int, batch_size: int) -> float:
    """Opacus's sample rate for a loader: make_private takes 1 / len(data_loader)."""
    from torch.utils.data import DataLoader

    return 1 / len(DataLoader(range(examples), batch_size=batch_size))


def test_the_sample_rate_is_one_over_the_loaders_length_where_the_batch_does_not_divide():
    """The calibration and the refusals use opacus_sample_rate: it must be Opacus's own
    1 / len(loader), a last short batch counted (the CLI tests' 64 / 16 divides evenly).
    Reference: torch's DataLoader length, as make_private reads it."""
    from opacus_mi.training import opacus_sample_rate

    for examples in range(1, 70):
        for batch_size in (1, 3, 7, 16, 64, 100):
            want = _loader_rate(examples, batch_size)
            assert opacus_sample_rate(examples, batch_size) == want, (examples, batch_size)


@pytest.mark.parametrize(
    ("accountant", "epochs", "n_train", "batch_size"), [("rdp", 3, 70, 16), ("gdp", 2, 50, 8)]
)
def test_calibrate_noise_is_opacus_get_noise_multiplier_for_the_runs_epochs_and_accountant(
    accountant, epochs, n_train, batch_size
):
    """The CLI tests calibrate one epoch under RDP at an even q: a calibration that dropped
    the epochs, the accountant or the last short batch passed them. Reference: Opacus's
    get_noise_multiplier at the loader's sample rate."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    from opacus_mi.training import RunConfig, calibrate_noise

    cfg = RunConfig(target_epsilon=2.0, epochs=epochs, batch_size=batch_size, accountant=accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (GDP's "experimental" warning)
        want = get_noise_multiplier(
            target_epsilon=2.0,
            target_delta=1e-5,
            sample_rate=_loader_rate(n_train, batch_size),
            epochs=epochs,
            accountant=accountant,
        )
        assert calibrate_noise(cfg, n_train=n_train) == want


def test_rdp_calibrates_a_target_above_prvs_ceiling():
    """The ceiling on a target (noise below 0.2) is PRV's alone: RDP calibrates such a target
    in milliseconds. Reference: Opacus's get_noise_multiplier under RDP."""
    from dataclasses import replace

    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from opacus_mi.training import PRV_CALIBRATION_FLOOR, RunConfig, calibrate_noise

    rdp = RDPAccountant()
    rdp.history = [(PRV_CALIBRATION_FLOOR, 0.25, 4)]  # (64 examples, batches of 16, one epoch)
    target = 2 * rdp.get_epsilon(1e-5)
    cfg = RunConfig(target_epsilon=target, epochs=1, batch_size=16, accountant="rdp")
    want = get_noise_multiplier(
        target_epsilon=target, target_delta=1e-5, sample_rate=0.25, epochs=1, accountant="rdp"
    )
    assert want < PRV_CALIBRATION_FLOOR
    assert calibrate_noise(cfg, n_train=64) == want
    with pytest.raises(ValueError, match="needs a noise multiplier below 0.2"):
        calibrate_noise(replace(cfg, accountant="prv"), n_train=64)


def test_a_target_out_of_rdps_reach_is_judged_over_every_epoch_of_the_run():
    """The reach of RDP's calibration (its epsilon at Opacus's largest noise) grows with the
    steps: a target between one epoch's floor and three epochs' is out of reach for a
    three-epoch run, and so is the floor itself. Reference: Opacus's RDP accountant at
    2 * MAX_SIGMA over epochs / q steps."""
    import warnings

    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import MAX_SIGMA

    from opacus_mi.training import RunConfig, calibrate_noise

    def floor(steps: int) -> float:
        rdp = RDPAccountant()
        rdp.history = [(2 * MAX_SIGMA, 0.25, steps)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rdp.get_epsilon(1e-5)

    one, three = floor(4), floor(12)  # (64 examples in batches of 16: q = 1/4)
    assert one < three
    for target in ((one + three) / 2, three):
        cfg = RunConfig(target_epsilon=target, epochs=3, batch_size=16, accountant="rdp")
        with pytest.raises(ValueError, match="out of reach") as raised:
            calibrate_noise(cfg, n_train=64)
        assert f"at least {three:.3g} at --delta" in str(raised.value)


@pytest.mark.parametrize(
    "accountant, bad, way", [("gdp", "10", "smaller"), ("prv", "1e-09", "larger")]
)
def test_a_sweep_calibrates_every_target_before_it_trains_any(
    tmp_path, capsys, monkeypatch, accountant, bad, way
):
    """A target Opacus could not calibrate failed in its turn, after the earlier ones had
    trained, naming the run's --target-epsilon and --noise-multiplier; and it left a sweep
    folder without a sweep.csv."""
    from opacus_mi import sweep as sweep_module

    def train(cfg, **kwargs):
        pytest.fail(f"{cfg.out} trained before every target was calibrated")

    monkeypatch.setattr(sweep_module, "train_and_monitor", train)
    argv = ["sweep", *TINY, "--accountant", accountant, "--target-epsilons", "2", bad]
    rc = cli.main([*argv, "--estimator", "none", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    _assert_one_line_error(rc, err, f"--target-epsilons {bad}:", f"Pass a {way} target")
    assert "--noise-multipliers" in err and "--target-epsilon " not in err
    assert not (tmp_path / "s").exists()


def test_a_stopped_run_leaves_its_own_records_and_config_not_the_last_runs(tmp_path, monkeypatch):
    """A run stopped midway (Ctrl-C at the first evaluation) into the folder of a finished one:
    its records sat beside the old run's config.json, result.json and summary."""
    from opacus_mi import training

    out = tmp_path / "x"
    assert cli.main(["run", *TINY, "--estimator", "none", "--out", str(out)]) == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_evaluate", interrupted)
    argv = ["run", *TINY, "--estimator", "none", "--noise-multiplier", "4", "--out", str(out)]
    assert cli.main(argv) == 130  # "opacus-mi: interrupted"
    config = json.loads((out / "config.json").read_text())
    # the views measured: without an estimator the private view alone (clipped was listed too)
    assert config["noise_multiplier"] == 4 and config["views"] == ["private"]
    records = read_jsonl(out / "records.jsonl")
    assert records and {r.noise_multiplier for r in records} == {4.0}
    for stale in ("result.json", "summary.txt", "records.csv", "report.html", "mi.png"):
        assert not (out / stale).exists(), stale


def test_a_new_run_leaves_other_tensorboard_logs_in_the_folder(tmp_path):
    """Clearing the last run's files removed <out>/tensorboard whole, a user's logs with it."""
    out = tmp_path / "proj"
    assert cli.main(["run", *TINY, "--estimator", "none", "--out", str(out)]) == 0
    theirs = out / "tensorboard" / "resnet_experiment_3" / "events.out.tfevents.1"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"someone else's")
    ours = out / "tensorboard" / "events.out.tfevents.2"  # a last run's, where ours go
    ours.write_bytes(b"a last run's")
    assert cli.main(["run", *TINY, "--estimator", "none", "--out", str(out)]) == 0
    assert theirs.read_bytes() == b"someone else's" and not ours.exists()


@pytest.mark.parametrize(
    ("command", "files"),
    [
        ("run", {"config.json": '{"lr": 0.0003}', "report.html": "<p>my notes</p>"}),
        ("run", {"tensorboard/events.out.tfevents.1700000000.host": "my logs"}),
        ("run", {"records.csv": "a,b\n1,2\n"}),  # (no config.json at all)
        ("sweep", {"report.html": "<p>my notes</p>", "sweep_config.json": "[1, 2]"}),
        ("validate", {"validate.txt": "my notes", "validate.csv": "x,y\n"}),
    ],
)
def test_a_folder_of_someone_elses_files_is_refused_not_cleared(tmp_path, capsys, command, files):
    """``--out .`` in a project: a run cleared or overwrote the config.json, report.html,
    records.csv or summary.txt it found there, and deleted tensorboard/events.out.tfevents.*,
    whoever had written them (a sweep and a validate likewise their own names). Each now
    clears only what an earlier one of its kind wrote (a run's config.json, a sweep's
    sweep_config.json, a validate's validate.csv) and is refused by name, before anything is
    written, otherwise."""
    argv = {
        "run": ["run", *TINY, "--estimator", "none"],
        "sweep": ["sweep", *TINY, "--estimator", "none", "--noise-multipliers", "1", "2"],
        "validate": "validate --stages 0 --batch-sizes 1 --iters 1 --restarts 1 --images 1 "
        "--candidates 8 --no-progress --noise-multipliers 0 0.01 0.03 0.1 0.3".split(),
    }[command]
    out = tmp_path / "project"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text, encoding="utf-8")
    (out / "notes.md").write_text("mine", encoding="utf-8")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc = cli.main([*argv, "--out", str(out)])
    _assert_one_line_error(rc, capsys.readouterr().err, "--out", f"no earlier opacus-mi {command}")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_output_counts_as_ours_only_with_every_key_or_column_ours_have(tmp_path):
    """A config.json or validate.csv marks an earlier opacus-mi output (which a new one may
    clear) only if it holds every key or column ours always write: a user's config.json with
    one of those keys, or a CSV with a "step" column, is not ours; a records.jsonl is a run's
    where its first record reads back. Reference: files written with json and csv, read_jsonl."""
    import csv as csv_module
    import warnings

    from opacus_mi.training import csv_header_has, json_keys_are

    keys = frozenset({"dataset", "seed", "delta"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"dataset": "mine", "lr": 0.1}))
    assert not json_keys_are(keys)(path)
    path.write_text(json.dumps({"dataset": "x", "seed": 1, "delta": 0.1, "more": 2}))
    assert json_keys_are(keys)(path)
    path.write_text(json.dumps(sorted(keys)))
    assert not json_keys_are(keys)(path)
    table = tmp_path / "validate.csv"
    for header, ours in ((["step", "loss"], False), (["setting", "seed", "step", "delta"], True)):
        with open(table, "w", newline="") as fh:
            csv_module.writer(fh).writerow(header)
        assert csv_header_has(frozenset({"setting", "step"}))(table) is ours, header
    # a records.jsonl marks a run's folder where read_jsonl reads a record from it
    from opacus_mi.records import LeakageRecord
    from opacus_mi.training import records_file

    jsonl = tmp_path / "records.jsonl"
    line = json.dumps(LeakageRecord(0, 16, 1.0, 1.0, 0.25, 0.5, 1e-5).as_dict())
    for text, ours in ((f"\n{line}\n", True), ('{"step": 0}\n', False)):
        jsonl.write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                readable = bool(read_jsonl(jsonl))
            except ValueError:
                readable = False
        assert readable is ours and records_file(jsonl) is ours, text


def test_a_run_folder_of_an_earlier_version_stopped_before_its_config_is_reused(tmp_path):
    """Versions before this one wrote config.json last: one stopped midway left records.jsonl
    alone, and the check for someone else's files refused that folder (the default
    runs/latest) as not a run's. Its records.jsonl marks it as a run's too."""
    out = tmp_path / "latest"
    assert cli.main(["run", *TINY, "--estimator", "none", "--out", str(out)]) == 0
    for p in out.iterdir():
        if p.is_file() and p.name != "records.jsonl":
            p.unlink()
    assert cli.main(["run", *TINY, "--estimator", "none", "--out", str(out)]) == 0
    assert (out / "config.json").is_file()
    # One stopped at its first step: an empty records.jsonl, which loses nothing.
    for p in out.iterdir():
        if p.is_file():
            p.unlink()
    (out / "records.jsonl").write_text("", encoding="utf-8")
    assert cli.main(["run", *TINY, "--estimator", "none", "--out", str(out)]) == 0


def test_an_output_folder_that_is_a_broken_link_or_a_file_says_so(tmp_path):
    """A dangling or looping symbolic link, or a file, at --out was refused with the OS's
    "File exists", which names neither the link nor the fix."""
    from opacus_mi.training import prepare_out_dir

    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("", encoding="utf-8")
    cases = {
        "dangling": "symbolic link to '.*nowhere', which does not exist; create that folder",
        "loop": "symbolic link .* that loops; remove the link or pass another --out",
        "file": "it is a file, not a folder; pass another --out",
        "file/sub": "'.*file' is a file, not a folder; pass another --out",
    }
    for name, says in cases.items():
        with pytest.raises(OSError, match=f"output folder --out '.*{name}': (it is a )?{says}"):
            prepare_out_dir(tmp_path / name)
    assert prepare_out_dir(tmp_path / "new" / "run").is_dir()


def test_run_sweep_and_validate_each_refuse_the_others_folders(run_dir, tmp_path, capsys):
    """A run and a sweep refused each other's folders, but a validate wrote into either, and
    either into a validate's (the README said a run refused one)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir[0], run)
    quick = ["--iters", "2", "--restarts", "1", "--images", "2", "--no-progress"]
    rc = cli.main(["validate", *quick, "--out", str(run)])
    _assert_one_line_error(rc, capsys.readouterr().err, "holds a run (records.jsonl)")
    checked = tmp_path / "validate"
    checked.mkdir()
    (checked / "validate.csv").write_text("setting,step,batch_size,noise_multiplier\n")
    rc = cli.main(["run", *TINY, "--out", str(checked)])
    _assert_one_line_error(rc, capsys.readouterr().err, "holds a validate (validate.csv)")
    rc = cli.main(["sweep", *TINY, "--noise-multipliers", "1", "2", "--out", str(checked)])
    _assert_one_line_error(rc, capsys.readouterr().err, "holds a validate (validate.csv)")
    assert sorted(p.name for p in checked.iterdir()) == ["validate.csv"]


def test_sweep_keeps_finished_rows_and_refuses_clashing_folders(tmp_path, capsys, monkeypatch):
    from opacus_mi import sweep as sweep_module
    from opacus_mi.sweep import read_sweep_csv

    base = ["sweep", *TINY, "--estimator", "none"]
    rc = cli.main([*base, "--noise-multipliers", "1", "1.0000001", "--out", str(tmp_path / "c")])
    _assert_one_line_error(rc, capsys.readouterr().err, "would share the run folder sigma_1/")
    run = tmp_path / "run"
    assert cli.main(["run", *TINY, "--estimator", "none", "--out", str(run)]) == 0
    rc = cli.main([*base, "--noise-multipliers", "1", "2", "--out", str(run)])
    _assert_one_line_error(rc, capsys.readouterr().err, "holds a run (records.jsonl)")
    # the second run fails: the first one's row is in sweep.csv all the same
    train = sweep_module.train_and_monitor
    calls = []

    def second_fails(cfg, **kwargs):
        calls.append(cfg)
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return train(cfg, **kwargs)

    monkeypatch.setattr(sweep_module, "train_and_monitor", second_fails)
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="stopped"):
        cli.main([*base, "--noise-multipliers", "1", "2", "--out", str(out)])
    rows = read_sweep_csv(out / "sweep.csv")
    assert [r["setting"] for r in rows] == ["sigma_1"]
    assert cli.main(["report", str(out)]) == 0


def test_sweep_has_its_own_default_folder():
    parser = cli.build_parser()
    assert parser.parse_args(["sweep", "--noise-multipliers", "1"]).out == "runs/sweep"
    assert parser.parse_args(["run"]).out == "runs/latest"


def test_report_of_a_folder_without_records(tmp_path, capsys):
    rc = cli.main(["report", str(tmp_path)])
    _assert_one_line_error(rc, capsys.readouterr().err, "records.jsonl")


def test_tensorboard_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    # simulate a machine without tensorboard: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    rc = cli.main(["run", *TINY, "--tensorboard", "--out", str(tmp_path / "x")])
    _assert_one_line_error(rc, capsys.readouterr().err, "pip install tensorboard")


def test_tensorboard_scalars_for_epsilon_and_every_mi_series(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert cli.main(["run", *TINY, "--tensorboard", "--out", str(out)]) == 0
    records = read_jsonl(out / "records.jsonl")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"privacy/epsilon", "mi/private/oracle", "mi/accountant_upper_bound"} <= tags
    eps = acc.Scalars("privacy/epsilon")
    assert [e.step for e in eps] == [r.step for r in records]
    assert [e.value for e in eps] == pytest.approx([r.epsilon for r in records], rel=1e-6)


# ------------------------------------------------------------------------------ console script
def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "opacus-mi"
    if not script.exists():
        pytest.skip("opacus-mi console script not installed in this environment")
    out = tmp_path / "script"
    argv = [str(script), "run", *TINY, "--fake-size", "32", "--estimator", "none"]
    proc = subprocess.run(
        [*argv, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "private/oracle" in proc.stdout and "epsilon" in proc.stdout
    # Opacus's and torch's chatter is filtered (Python's form, and ours for what got through)
    assert "Warning" not in proc.stderr and "warning" not in proc.stderr, proc.stderr
    assert (out / "report.html").is_file()

    # Its reader gone before it printed (`| head -c 0`): the files are written, and the exit
    # is a shell's on SIGPIPE, not "error: [Errno 32] Broken pipe" with status 2.
    (out / "report.html").unlink()
    read_end, write_end = os.pipe()
    os.close(read_end)
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:  # (buffered, as by default: the pipe's error came at the interpreter's last flush)
        gone = subprocess.run(
            [str(script), "report", str(out)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=buffered,
        )
    finally:
        os.close(write_end)
    assert (gone.returncode, gone.stderr) == (141, "")
    assert (out / "report.html").is_file()

    bad = subprocess.run(
        [str(script), "run", "--delta", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("opacus-mi: error:") and "--delta" in bad.stderr


def test_an_unwritable_folder_is_named_by_the_argument_that_gave_it(tmp_path):
    """The report's error named ``--out``, which `opacus-mi report` does not have."""
    from opacus_mi.training import prepare_out_dir

    taken = tmp_path / "file"
    taken.write_text("", encoding="utf-8")
    with pytest.raises(OSError, match="output folder --out '.*file'"):
        prepare_out_dir(taken)
    with pytest.raises(OSError, match="output folder OUTDIR '.*file'"):
        prepare_out_dir(taken, name="OUTDIR")


def test_report_names_other_ranks_records_it_does_not_render(run_dir, tmp_path):
    """A DPDDP monitor with distributed=False writes each rank's records beside rank 0's;
    the report rendered rank 0's without a word about the others."""
    import shutil

    from opacus_mi.training import rerender_run

    out = tmp_path / "run"
    shutil.copytree(run_dir[0], out)
    shutil.copy(out / "records.jsonl", out / "records.rank1.jsonl")
    with pytest.warns(RuntimeWarning, match=r"rank 0\) only, not records.rank1.jsonl"):
        rerender_run(out)


def test_run_help_states_the_librarys_critic_schedule(capsys):
    """--train-every's help gave the library's default as 8; it is the overhead budget's."""
    assert cli.main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "library default 8" not in text
    assert "first 32 batches, then once per TRAIN_EVERY monitored steps" in text


def test_tensorboard_ends_at_the_runs_epsilon_and_numbers_steps_as_records(tmp_path, monkeypatch):
    """A paced PRV epsilon left TensorBoard's curve at the last value a record computed, not
    the run's; accuracy was logged one step past the record of the same step."""
    from opacus_mi import training

    points: dict[str, list] = {}

    class Writer:
        def add_scalar(self, tag, value, step):
            points.setdefault(tag, []).append((step, value))

        def flush(self):
            pass

        close = flush

    monkeypatch.setattr(training, "_tensorboard_writer", lambda log_dir, purge_step=None: Writer())
    out = tmp_path / "tb"
    argv = ["run", *TINY, "--accountant", "prv", "--epochs", "2", "--tensorboard"]
    assert cli.main([*argv, "--estimator", "none", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    last = result["steps"] - 1
    assert points["privacy/epsilon"][-1] == (last, pytest.approx(result["epsilon"], rel=1e-12))
    steps = [s for s, _ in points["privacy/epsilon"]]
    assert steps == sorted(set(steps))  # each step once
    per_epoch = result["steps"] // 2
    assert [s for s, _ in points["test/accuracy"]] == [per_epoch - 1, last]


@pytest.mark.parametrize("sigma, bound", [(1e-170, math.inf), (1e155, 0.0), (2.0, 0.125)])
def test_a_sweep_row_bounds_any_noise(tmp_path, sigma, bound):
    """sweep_row kept its own 1/(2 sigma^2): a ZeroDivisionError at 1e-170 and an
    OverflowError at 1e155, after both runs had trained."""
    from opacus_mi.sweep import sweep_row
    from opacus_mi.training import RunResult

    result = RunResult([], 1.0, 0.5, 1.0, tmp_path, noise_multiplier=sigma)
    assert sweep_row(result, setting="s", target_epsilon=None)["bound_per_step"] == bound


@pytest.mark.parametrize(
    "low, high, named", [(-0.2, 0.3, False), (-1.4, -0.5, True), (-0.5, 0.0, False)]
)
def test_the_sweep_names_a_figure_below_zero_only_when_its_whole_interval_is(low, high, named):
    """The sweep table's 'below 0, an empty lower bound' note is for a learned figure whose whole
    95% interval lies under 0 (the run summary's rule); one straddling 0 is a figure like any
    other (a mutation audit found the interval's ends interchangeable), as is one reaching 0."""
    from opacus_mi.sweep import sweep_table

    row = {
        "setting": "sigma_4", "noise_multiplier": 4.0, "epsilon": 1.0, "test_accuracy": 0.5,
        "oracle_mi": 0.01, "oracle_ci_low": 0.0, "oracle_ci_high": 0.02,
        "clipped_mi": (low + high) / 2, "clipped_ci_low": low, "clipped_ci_high": high,
        "bound_per_step": 1 / 32, "wall_seconds": 1.0, "out": "x",
    }  # fmt: skip
    assert ("clipped at noise 4: below 0" in sweep_table([row], estimator="mine")) is named


def test_the_sweep_and_validate_tables_show_infinite_and_small_figures():
    """The sweep's table showed sigma 0's infinite bound and epsilon as '-' (a figure that
    does not apply) and a bound of 0.00125 nats (sigma 20) as 0.001; validate's showed -inf
    as inf. One formatter now, the summary's."""
    from opacus_mi.sweep import sweep_table
    from opacus_mi.validate import _fmt

    rows = [
        {"noise_multiplier": 0.0, "epsilon": math.inf, "bound_per_step": math.inf},
        {"noise_multiplier": 20.0, "epsilon": 0.25, "bound_per_step": 1 / (2 * 20.0**2)},
    ]
    lines = sweep_table(rows, width=200).splitlines()
    zero = next(
        line for line in lines if line.startswith("│ ") and line.split("│")[1].strip() == "0"
    )
    twenty = next(
        line for line in lines if line.startswith("│ ") and line.split("│")[1].strip() == "20"
    )
    assert [c.strip() for c in zero.split("│")[2:4]] == ["inf", "-"]  # epsilon, test acc
    assert "inf" in [c.strip() for c in zero.split("│")]  # the bound
    assert "0.00125" in [c.strip() for c in twenty.split("│")]
    assert (_fmt(-math.inf), _fmt(math.inf), _fmt(0.0034), _fmt(None)) == (
        "-inf",
        "inf",
        "0.0034",
        "-",
    )
    # decided on the rounded figure; NumPy's scalars are numbers
    got = (_fmt(0.96, 1), _fmt(1.04, 1), _fmt(0.0999), _fmt(np.float32(0.5)))
    assert got == ("1.0", "1.0", "0.10", "0.50")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_sigterm_stops_a_run_as_ctrl_c_does_keeping_every_finished_steps_record(tmp_path, how):
    """``kill``, ``timeout`` and a scheduler's time limit send SIGTERM: the process died with
    no message, and with overlap (the default with a free core) the last finished step's record
    never reached the JSONL. Reference: the same run stopped with Ctrl-C at the same point (the
    first evaluation, after the first epoch's steps), and the steps the optimizer took."""
    out = tmp_path / "run"
    script = f"""
import os, signal, sys
# Ctrl-C's handler, as in a terminal: a test run launched in the background (nohup, a shell's
# &) hands its children SIGINT ignored, and Python then installs none (the run went on).
signal.signal(signal.SIGINT, signal.default_int_handler)
from opacus.optimizers import DPOptimizer
from opacus_mi import cli, training
steps = []
step = DPOptimizer.step
def counted(self, *a, **k):
    result = step(self, *a, **k)
    steps.append(1)
    return result
DPOptimizer.step = counted
def stop(*a, **k):
    sys.stderr.write(f"steps taken {{len(steps)}}\\n")
    signal.raise_signal(signal.{how})  # (to this thread: its handler runs before it returns)
    raise AssertionError("the signal should have stopped the run")
training._evaluate = stop
argv = {[*TINY, "--overlap", "on", "--epochs", "2", "--out", str(out)]!r}
sys.exit(cli.main(["run", *argv]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    taken = int(done.stderr.split("steps taken ")[1].split()[0])
    word, status = ("terminated", 143) if how == "SIGTERM" else ("interrupted", 130)
    assert done.returncode == status, done.stderr
    assert f"opacus-mi: {word}; what was finished is in {out}" in done.stderr
    records = read_jsonl(out / "records.jsonl")
    assert taken > 0 and [r.step for r in records] == list(range(taken))


def test_a_folder_in_use_by_another_run_is_refused_and_left_as_it_is(tmp_path, capsys):
    """Two runs into one --out (the default runs/latest from two terminals): the second cleared
    the first's files mid-run; the first went on writing records into a deleted file and ended
    with its result.json beside the second's records. Now the second is refused, and so is a
    ``report`` of the folder, which rewrote the running one's summary.txt, CSV and plots. Here
    the first is this process holding the folder's claim, as a running opacus-mi does."""
    from opacus_mi.training import claim_out_dir

    run = ["run", *TINY, "--estimator", "none"]
    sweep = ["sweep", *TINY, "--estimator", "none", "--noise-multipliers", "1", "2"]
    for argv, out in ((run, tmp_path / "latest"), (sweep, tmp_path / "sweep")):
        assert cli.main([*argv, "--out", str(out)]) == 0
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        capsys.readouterr()
        with claim_out_dir(out):
            rc = cli.main([*argv, "--seed", "1", "--out", str(out)])
            _assert_one_line_error(rc, capsys.readouterr().err, "--out", "is in use by another")
            # (report too: it draws the same tables and plots the run draws at its end)
            rc = cli.main(["report", str(out)])
            _assert_one_line_error(rc, capsys.readouterr().err, "OUTDIR", "is in use by another")
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        assert cli.main([*argv, "--out", str(out)]) == 0  # let go: it runs


def test_csv_files_are_replaced_whole_or_not_at_all(tmp_path):
    """sweep.csv and validate.csv are rewritten after each run: an interrupt (a SIGTERM) during
    the rewrite emptied them, finished rows and all."""
    from opacus_mi.report import read_csv_rows, write_csv_rows

    path = tmp_path / "sweep.csv"
    write_csv_rows([{"a": 1.0}, {"a": 2.0}], path, ["a"])

    def rows():
        yield {"a": 1.0}
        raise KeyboardInterrupt  # (the signal, mid-write)

    with pytest.raises(KeyboardInterrupt):
        write_csv_rows(rows(), path, ["a"])
    assert [r["a"] for r in read_csv_rows(path)] == [1.0, 2.0]
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.csv"]  # (no part file left)


def test_a_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """report.html is a run's last output, and a sweep's --resume keeps a run whose outputs all
    exist: a stop mid-write left a truncated report, kept as the finished run's. Here the
    write is cut off halfway by the signal: the last complete report stays, with no part file."""
    from pathlib import Path

    from opacus_mi.html_report import write_html

    path = write_html(tmp_path, title="first", settings={"sigma": 1.0})
    first = path.read_text(encoding="utf-8")
    real = Path.write_text

    def cut_off(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # (the signal, mid-write)

    monkeypatch.setattr(Path, "write_text", cut_off)
    with pytest.raises(KeyboardInterrupt):
        write_html(tmp_path, title="second", settings={"sigma": 2.0})
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == first and "<title>first</title>" in first
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # (no part file left)


@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_a_stop_mid_write_leaves_each_output_whole(tmp_path, monkeypatch, kind):
    """summary.txt, records.csv, result.json, the PNGs and sweep.txt were written in place, so
    a stop mid-write (Ctrl-C, SIGTERM) left a torn file beside the others. Here the same
    outputs are written again and each file in turn is cut off halfway through its first
    write: the stop reaches the caller and every file is byte for byte the last complete one,
    no part file."""
    from types import SimpleNamespace

    from conftest import writes_cut_off

    from opacus_mi import html_report
    from opacus_mi.records import LeakageRecord, MIValue
    from opacus_mi.sweep import write_sweep_outputs
    from opacus_mi.training import _write_json, write_run_outputs

    monkeypatch.setattr(html_report, "time", SimpleNamespace(strftime=lambda _: "then"))
    records = [
        LeakageRecord(step=i, batch_size=16, noise_multiplier=1.0, max_grad_norm=1.0,
                      sample_rate=0.25, epsilon=0.5 * (i + 1), delta=1e-5, epsilon_step=i,
                      mi={"private/oracle": MIValue(0.2 + 0.1 * i, 0.1, 0.4 + 0.1 * i, 16)})
        for i in range(3)
    ]  # fmt: skip
    rows = [{"setting": f"sigma_{s}", "noise_multiplier": s, "epsilon": 4.0 / s,
             "clipped_mi": 0.4 / s, "clipped_ci_low": 0.3 / s, "clipped_ci_high": 0.5 / s}
            for s in (1, 2)]  # fmt: skip
    results = {"epsilon": 1.5, "delta": 1e-5, "noise_multiplier": 1.0, "steps": 3}

    def write():
        if kind == "run":
            _write_json(tmp_path / "result.json", results)
            outputs = write_run_outputs(tmp_path, records, config={"dataset": "x"}, results=results)
            return outputs[0], [*outputs[1], tmp_path / "result.json"]
        return write_sweep_outputs(tmp_path, rows, settings={"estimator": "none"})

    _, files = write()
    whole = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(whole) == sorted(p.name for p in files) and len(whole) >= 4
    patch, opened = writes_cut_off(tmp_path, at=0)
    with patch:
        write()
    assert len(opened) == len(whole)  # (each output opened once: each is cut off below)
    for at in range(1, len(whole) + 1):
        patch, opened = writes_cut_off(tmp_path, at)
        with patch, pytest.raises(KeyboardInterrupt):
            write()
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == whole, opened[-1]


def test_csv_cells_read_back_numpy_floats_and_edited_files_are_refused_by_name(tmp_path):
    """NumPy 2 writes repr(np.float64(3.2)) as "np.float64(3.2)", which read back as NaN; an
    edited sweep.csv (an extra cell, another encoding, a NUL) failed with a TypeError or a codec
    message naming neither the file nor the fix, or lost rows without a word."""
    from opacus_mi.report import read_csv_rows, write_csv_rows

    path = tmp_path / "sweep.csv"
    values = [np.float64(3.2), np.float32(0.1), np.float64("inf"), np.float64("nan"), np.int64(7)]
    write_csv_rows([{"a": v} for v in values], path, ["a"])
    got = [r["a"] for r in read_csv_rows(path)]
    assert got[:3] == [3.2, float(np.float32(0.1)), math.inf] and got[4] == 7.0
    assert math.isnan(got[3])

    for text, says in [
        ("setting,epsilon\nsigma_1,2,a note\n", "line 2: 3 cells where its header has 2"),
        ("setting,epsilon\nsigma_1,2\nsigma_2\n", "line 3: 1 cells where its header has 2"),
        ('setting,epsilon\nsigma_1,2\n"sigma_2,3\nsigma_3,4\n', "line 4: 1 cells where"),
        ("setting,epsilon\nsigma_1,2\n\x00\x00\x00\n", "line 3: 1 cells"),  # (a crash's tail)
    ]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match="sweep.csv, " + says):
            read_csv_rows(path, text_columns=("setting",))
    path.write_bytes("setting,epsilon\ncaf\u00e9,2\n".encode("latin-1"))
    with pytest.raises(ValueError, match="sweep.csv is not UTF-8 text"):
        read_csv_rows(path, text_columns=("setting",))


def test_a_target_sweeps_row_keeps_its_target_and_sweep_csv_reads_back_as_written(tmp_path):
    """sweep_row's target_epsilon is the run's target (NaN for a noise sweep), beside the
    epsilon it reached, and the table shows it; sweep.csv reads back as written, its setting
    and out columns as text. References: the RunResults' own fields and 1 / (2 sigma^2)."""
    from opacus_mi import sweep as S
    from opacus_mi.training import RunResult

    runs = [
        (2.5, RunResult([], 2.4999, 0.75, 1.5, tmp_path / "eps_2.5", noise_multiplier=0.8)),
        (None, RunResult([], 1.25, 0.5, 2.0, tmp_path / "sigma_2", noise_multiplier=2.0)),
    ]
    rows = [S.sweep_row(r, setting=r.out_dir.name, target_epsilon=t) for t, r in runs]
    assert rows[0]["target_epsilon"] == 2.5 and math.isnan(rows[1]["target_epsilon"])
    for (_, r), row in zip(runs, rows, strict=True):
        assert (row["setting"], row["out"]) == (r.out_dir.name, str(r.out_dir))
        assert (row["epsilon"], row["test_accuracy"], row["wall_seconds"]) == (
            r.epsilon, r.test_accuracy, r.wall_seconds,
        )  # fmt: skip
        assert row["bound_per_step"] == pytest.approx(1 / (2 * r.noise_multiplier**2))
    back = S.read_sweep_csv(S.write_sweep_csv(rows, tmp_path / "sweep.csv"))
    for row, got in zip(rows, back, strict=True):
        assert tuple(got) == S.SWEEP_COLUMNS
        for k in S.SWEEP_COLUMNS:
            assert got[k] == row[k] or (math.isnan(got[k]) and math.isnan(row[k])), k
    table = S.sweep_table(rows[:1], width=200).splitlines()
    assert [c.strip() for c in table[2].split("┃")[1:4]] == ["noise", "target eps", "epsilon"]
    line = next(x for x in table if x.startswith("│ ") and x.split("│")[1].strip() == "0.8")
    assert [c.strip() for c in line.split("│")[1:4]] == ["0.8", "2.5", "2.500"]


def test_the_sweep_table_shows_a_figure_not_measured_as_a_dash():
    """A run without a learned critic (--estimator none) has no clipped figure: its cell is
    "-", not an interval of dashes, beside the oracle's interval (fmt_interval's form)."""
    from opacus_mi.report import fmt_interval
    from opacus_mi.sweep import sweep_table

    row = {"noise_multiplier": 1.0, "epsilon": 2.0, "test_accuracy": 0.5, "oracle_mi": 0.25,
           "oracle_ci_low": 0.125, "oracle_ci_high": 0.375, "clipped_mi": math.nan,
           "clipped_ci_low": math.nan, "clipped_ci_high": math.nan}  # fmt: skip
    line = next(x for x in sweep_table([row], width=200).splitlines() if x.startswith("│ "))
    cells = [c.strip() for c in line.split("│")[1:-1]]
    assert cells[3:5] == [fmt_interval(0.25, 0.125, 0.375), "-"]


def test_the_sweep_table_tells_settings_apart_as_their_folders_do():
    from opacus_mi.sweep import _setting_name, sweep_table

    rows = [
        {"noise_multiplier": v, "target_epsilon": t}
        for v, t in [(1.00001, 2.00001), (1.00004, 2.00004)]
    ]
    cells = [
        [c.strip() for c in line.split("│")[1:3]]
        for line in sweep_table(rows, width=200).splitlines()
        if line.startswith("│ ") and "1.0000" in line
    ]
    assert cells == [["1.00001", "2.00001"], ["1.00004", "2.00004"]]
    assert [_setting_name("sigma", r["noise_multiplier"]) for r in rows] == [
        "sigma_" + c[0] for c in cells
    ]


def test_a_stopped_command_that_wrote_nothing_to_render_names_no_folder(tmp_path):
    """A run stopped after its config.json but before its first record, and a validate
    before its first setting's text (or with an earlier validate's), have nothing for
    `report` to render: no "what was finished is in OUT" for them."""
    import argparse
    import time

    now = time.time_ns()
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}", encoding="utf-8")
    args = argparse.Namespace(command="run", out=str(out))
    assert cli._kept(args, now) == ""
    (out / "records.jsonl").write_text("", encoding="utf-8")
    assert "what was finished is in" in cli._kept(args, now)

    grid = tmp_path / "validate"
    grid.mkdir()
    args = argparse.Namespace(command="validate", out=str(grid))
    assert cli._kept(args, now) == ""
    (grid / "validate.txt").write_text("the grid\n", encoding="utf-8")
    os.utime(grid / "validate.txt", ns=(1, 1))  # an earlier validate's
    assert cli._kept(args, now) == ""
    os.utime(grid / "validate.txt")
    assert cli._kept(args, now) == (
        f"; what was finished is in {grid} (`opacus-mi report {grid}` renders it)"
    )


def test_a_stopped_command_names_no_earlier_commands_results_as_its_own(run_dir, tmp_path):
    """A run stopped before it started writing (in Opacus's calibration, say) said "what was
    finished is in OUT" of the previous run's files; a sweep likewise of an earlier sweep's."""
    import argparse
    import shutil
    import time

    out = tmp_path / "run"
    shutil.copytree(run_dir[0], out)
    for name in ("config.json", "records.jsonl"):
        os.utime(out / name, ns=(1, 1))  # an earlier run's
    now = time.time_ns()
    assert cli._kept(argparse.Namespace(command="run", out=str(out)), now) == ""
    os.utime(out / "config.json")  # this run started (its config is written as it does)
    assert "what was finished is in" in cli._kept(
        argparse.Namespace(command="run", out=str(out)), now
    )

    sweep = tmp_path / "sweep"
    shutil.copytree(run_dir[0], sweep / "sigma_1")
    (sweep / "sweep.csv").write_text("noise_multiplier,epsilon\n1,2\n", encoding="utf-8")
    (sweep / "sweep_config.json").write_text("{}", encoding="utf-8")
    for path in [sweep / "sweep.csv", sweep / "sweep_config.json", *sweep.rglob("*.jsonl")]:
        os.utime(path, ns=(1, 1))
    args = argparse.Namespace(command="sweep", out=str(sweep))
    assert cli._kept(args, now) == ""
    (sweep / "sweep.csv").unlink()  # an earlier sweep stopped before a run finished
    os.utime(sweep / "sigma_1" / "records.jsonl", ns=(2, 2))
    assert cli._kept(args, now) == ""


def test_a_sweep_whose_run_folder_is_in_use_is_refused_before_it_clears_anything(tmp_path, capsys):
    """A run writing into a sweep's sigma_1/ (started by hand): the sweep started again was
    refused at that run, after it had deleted the last sweep's sweep.csv, plots and report."""
    from opacus_mi.training import claim_out_dir

    out = tmp_path / "sweep"
    argv = ["sweep", *TINY, "--estimator", "none", "--noise-multipliers", "1", "2"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    with claim_out_dir(out / "sigma_1"):
        rc = cli.main([*argv, "--seed", "1", "--out", str(out)])
    _assert_one_line_error(rc, capsys.readouterr().err, "sigma_1", "is in use by another")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_output_folder_that_cannot_be_opened_is_named(tmp_path, capsys, monkeypatch):
    """A folder without read permission: a raw '[Errno 13] Permission denied' naming neither
    --out nor the fix. (Root ignores permissions: the refusal is made by hand here.)"""
    import os as os_module

    out = tmp_path / "locked"
    out.mkdir()
    real = os_module.open

    def refusing(path, flags, *args, **kwargs):
        if Path(path) == out:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os_module, "open", refusing)
    rc = cli.main(["run", *TINY, "--estimator", "none", "--out", str(out)])
    _assert_one_line_error(rc, capsys.readouterr().err, "--out", "Permission denied", "chmod")


@pytest.mark.parametrize(
    "code, fix",
    [(errno.EACCES, "chmod u+rw"), (errno.ENOSPC, "free some space there"), (errno.EIO, None)],
)
def test_a_file_the_run_may_not_write_is_named_once_with_the_fix(
    tmp_path, capsys, monkeypatch, code, fix
):
    """An OSError from a file inside --out (summary.txt here) printed Python's "[Errno 28] No
    space left on device: '...'" (or "permission denied: [Errno 13] Permission denied: '...'",
    the reason twice) and no fix. Reference: the OS's own reason for the errno
    (``os.strerror``) and the file the run was asked to write."""
    import builtins

    out = tmp_path / "run"
    real = builtins.open
    refused = {}

    def refusing(path, *args, **kwargs):
        if "summary.txt" in Path(str(path)).name:
            refused["err"] = OSError(code, os.strerror(code), str(path))
            raise refused["err"]
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    monkeypatch.setattr(io, "open", refusing)  # (pathlib's write_text opens through io.open)
    rc = cli.main(["run", *TINY, "--estimator", "none", "--out", str(out)])
    err = capsys.readouterr().err
    assert refused["err"].filename == str(out / ".summary.txt.part")  # (refused: its part file)
    path = str(out / "summary.txt")  # (named: the file asked for)
    reason = os.strerror(code).lower()
    _assert_one_line_error(rc, err, f"error: {reason}: {path!r}", *([fix] if fix else []))
    assert err.lower().count(reason) == 1 and "[Errno" not in err, err
    assert fix is not None or err.rstrip().endswith(f"{path!r}"), err  # (no fix made up)


def test_a_ctrl_c_while_the_cli_imports_torch_ends_as_an_interrupt(monkeypatch, capsys):
    """The CLI's imports (torch, Opacus: 2.5-4 s here) came before its Ctrl-C handler: an
    interrupt in them printed a traceback through the import and died of SIGINT. Reference:
    the exit an interrupt later gives (one line, status 130)."""
    import importlib.abc

    import tomllib

    from opacus_mi import _console

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "opacus_mi.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "opacus_mi.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    assert _console.main() == 130
    assert capsys.readouterr().err == "opacus-mi: interrupted\n"
    scripts = tomllib.loads(Path("pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["opacus-mi"] == "opacus_mi._console:main"


def test_the_package_imports_without_torch_and_names_its_api():
    """``import opacus_mi`` (and so the console script's first line) imported torch and Opacus;
    the public names now load on first use, as ``from opacus_mi import ...`` always did."""
    code = (
        "import sys, opacus_mi; assert 'torch' not in sys.modules, 'torch imported'; "
        "monitor_module = opacus_mi.monitor; "  # (a submodule as an attribute, as before)
        "from opacus_mi import LeakageMonitor, mi_upper_bound, estimate_mi, read_jsonl; "
        "assert set(opacus_mi.__all__) <= set(dir(opacus_mi)); "
        "assert set(opacus_mi.__all__) == set(opacus_mi._EXPORTS); "
        "assert opacus_mi.LeakageMonitor is LeakageMonitor is monitor_module.LeakageMonitor; "
        "print(mi_upper_bound(1, 1 / 23, 184))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(0.2733, abs=5e-5)
    import opacus_mi

    with pytest.raises(AttributeError, match="no attribute 'LeakageMonitors'"):
        opacus_mi.LeakageMonitors  # noqa: B018


def test_a_resumed_sweep_trains_only_what_did_not_finish_and_gives_the_full_sweeps_rows(
    tmp_path, capsys, monkeypatch
):
    """``sweep --resume`` after a stop: the finished run is kept (not trained again), the
    stopped one trained; the rows are those of an uninterrupted sweep of the same settings.
    Other settings, a damaged result, or no --resume train again."""
    from opacus_mi import sweep as sweep_module
    from opacus_mi.sweep import read_sweep_csv

    base = ["sweep", *TINY, "--estimator", "none", "--noise-multipliers", "1", "2"]
    assert cli.main([*base, "--out", str(tmp_path / "full")]) == 0
    full = read_sweep_csv(tmp_path / "full" / "sweep.csv")
    import opacus_mi.training as training

    train, write_json = sweep_module.train_and_monitor, training._write_json
    trained: list[str] = []

    def counting(cfg, **kwargs):
        trained.append(Path(cfg.out).name)
        return train(cfg, **kwargs)

    def stop_before_the_second_result(path, obj):
        if path.name == "result.json" and path.parent.name == "sigma_2":
            raise KeyboardInterrupt  # its config and records are written, its result not
        write_json(path, obj)

    monkeypatch.setattr(sweep_module, "train_and_monitor", counting)
    monkeypatch.setattr(training, "_write_json", stop_before_the_second_result)
    out = str(tmp_path / "s")
    assert cli.main([*base, "--out", out]) == 130  # (Ctrl-C: the CLI's stop)
    assert (tmp_path / "s" / "sigma_2" / "records.jsonl").stat().st_size > 0
    monkeypatch.setattr(training, "_write_json", write_json)
    # (its report said nothing of the setting it has no row for: as if a sweep of sigma 1)
    assert cli.main(["report", out]) == 0
    said = "not finished: no row for sigma_2/; the same command with --resume goes on"
    assert said in (tmp_path / "s" / "sweep.txt").read_text()
    assert said in (tmp_path / "s" / "report.html").read_text()
    settings = json.loads((tmp_path / "s" / "sweep_config.json").read_text())
    assert settings["runs"] == ["sigma_1", "sigma_2"]
    edited = {**settings, "runs": ["sigma_1", ["x"], 3, "sigma_2"]}  # (by hand: not names)
    (tmp_path / "s" / "sweep_config.json").write_text(json.dumps(edited), encoding="utf-8")
    assert cli.main(["report", out]) == 0  # (was "error: unhashable type: 'list'")
    assert said in (tmp_path / "s" / "sweep.txt").read_text()
    (tmp_path / "s" / "sweep_config.json").write_text(json.dumps(settings), encoding="utf-8")
    trained.clear()
    capsys.readouterr()
    assert cli.main([*base, "--out", out, "--resume"]) == 0
    assert trained == ["sigma_2"]
    err = capsys.readouterr().err
    # (each run's folder named alike, whichever of the sweep and the run says it)
    assert f"{Path(out) / 'sigma_1'}: kept: finished with these settings" in err
    assert f"{Path(out) / 'sigma_2'}: trained from the start: no epoch of a run there" in err
    got = read_sweep_csv(tmp_path / "s" / "sweep.csv")
    assert [r["setting"] for r in got] == ["sigma_1", "sigma_2"]
    assert "not finished" not in (tmp_path / "s" / "sweep.txt").read_text()
    for g, w in zip(got, full, strict=True):
        for key in ("epsilon", "test_accuracy", "oracle_mi", "oracle_ci_low", "oracle_ci_high"):
            assert g[key] == w[key], key

    # everything finished: nothing trains; without --resume, everything does
    trained.clear()
    assert cli.main([*base, "--out", out, "--resume", "--overlap", "off"]) == 0
    assert trained == []
    assert cli.main([*base, "--out", out]) == 0
    assert trained == ["sigma_1", "sigma_2"]
    # another setting, or a run whose records are not all there, is trained again
    trained.clear()
    capsys.readouterr()
    assert cli.main([*base, "--out", out, "--resume", "--lr", "0.25"]) == 0
    assert trained == ["sigma_1", "sigma_2"]
    assert "it ran with other settings (--lr 0.5 there, 0.25 now)" in capsys.readouterr().err
    jsonl = tmp_path / "s" / "sigma_2" / "records.jsonl"
    jsonl.write_text("".join(jsonl.read_text().splitlines(keepends=True)[:-1]))
    trained.clear()
    assert cli.main([*base, "--out", out, "--resume", "--lr", "0.25"]) == 0
    assert trained == ["sigma_2"]
    assert "its records.jsonl holds" in capsys.readouterr().err
    # --tensorboard: a run that has its logs is kept, one without them trained
    trained.clear()
    lr = ["--lr", "0.25", "--tensorboard"]
    assert cli.main([*base, "--out", out, "--resume", *lr]) == 0
    assert trained == ["sigma_1", "sigma_2"]
    assert "--tensorboard False there, True now" in capsys.readouterr().err
    trained.clear()
    assert cli.main([*base, "--out", out, "--resume", *lr]) == 0
    assert cli.main([*base, "--out", out, "--resume", "--lr", "0.25"]) == 0
    assert trained == []


def test_a_resumed_sweep_draws_a_kept_runs_missing_files(tmp_path, monkeypatch):
    """A run stopped while its plots were drawn has its figures on disk but not all its files:
    --resume keeps it and draws them (as ``report`` would)."""
    import opacus_mi.training as training
    from opacus_mi import sweep as sweep_module

    base = ["sweep", *TINY, "--estimator", "none", "--noise-multipliers", "1"]
    drawn = training.write_run_outputs

    def stop(out, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "write_run_outputs", stop)
    assert cli.main([*base, "--out", str(tmp_path / "s")]) == 130
    run = tmp_path / "s" / "sigma_1"
    assert not (run / "report.html").exists()
    monkeypatch.setattr(training, "write_run_outputs", drawn)
    monkeypatch.setattr(sweep_module, "train_and_monitor", None)  # (kept: never called)
    assert cli.main([*base, "--out", str(tmp_path / "s"), "--resume"]) == 0
    assert all((run / name).is_file() for name in RUN_FILES)


def test_a_stopped_sweep_says_how_to_go_on(tmp_path):
    """The stop message of a sweep that started names --resume; before it started (its
    sweep_config.json an earlier sweep's) and for a run it does not."""
    import argparse
    import time

    out = tmp_path / "sweep"
    out.mkdir()
    args = argparse.Namespace(command="sweep", out=str(out))
    assert cli._resumable(args, 0) == ""  # (no sweep_config.json)
    (out / "sweep_config.json").write_text("{}", encoding="utf-8")
    assert "the same command with --resume goes on from there" in cli._resumable(args, 0)
    assert cli._resumable(args, time.time_ns() + 10**10) == ""  # an earlier sweep's
    assert cli._resumable(argparse.Namespace(command="run", out=str(out)), 0) == ""


def test_a_stopped_sweeps_table_keeps_its_finished_rows_and_names_the_rest(tmp_path):
    """A sweep stopped after sigma_1 of sigma_1, sigma_2: sweep.txt is the finished rows' table
    followed by the runs with no row (an entry that is not a name is left out). Reference:
    sweep_table of the same rows."""
    from opacus_mi.sweep import sweep_table, write_sweep_outputs

    row = {
        "setting": "sigma_1", "noise_multiplier": 1.0, "epsilon": 2.0, "test_accuracy": 0.5,
        "oracle_mi": 0.01, "oracle_ci_low": 0.0, "oracle_ci_high": 0.02,
        "bound_per_step": 0.5, "wall_seconds": 1.0, "out": str(tmp_path / "sigma_1"),
    }  # fmt: skip
    settings = {"runs": ["sigma_1", "sigma_2", 3]}
    text, _ = write_sweep_outputs(tmp_path, [row], settings=settings)
    assert text == sweep_table([row]) + (
        "\nnot finished: no row for sigma_2/; the same command with --resume goes on"
    )
    assert (tmp_path / "sweep.txt").read_text(encoding="utf-8") == text + "\n"


def test_a_sweep_row_holds_each_views_learned_figure_and_the_table_a_measured_raw_view():
    """The sweep's row held the oracle and the clipped view only: a sweep measuring the raw
    view (``--views raw``) lost it, and the learned critic's private figure was in no table.
    Reference: each key's mean and CI over the last SWEEP_LAST records, computed here."""
    from opacus_mi.records import LeakageRecord, MIValue
    from opacus_mi.report import mean_with_ci
    from opacus_mi.sweep import SWEEP_LAST, sweep_row, sweep_table
    from opacus_mi.training import RunResult

    keys = {"private/oracle": 0.1, "clipped/mine": 2.0, "raw/mine": 3.0, "private/mine": 0.01}
    keys["private/semi"] = 0.5  # (learns only the clean token: not the private view's critic)

    def record(i: int) -> LeakageRecord:
        return LeakageRecord(
            step=i, batch_size=16, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25,
            epsilon=1.0, delta=1e-5, epsilon_step=i,
            mi={k: MIValue(v + 0.01 * (i % 7), v - 1, v + 1, 16) for k, v in keys.items()},
        )  # fmt: skip

    records = [record(i) for i in range(SWEEP_LAST + 5)]
    row = sweep_row(
        RunResult(records, 1.0, 0.5, 1.0, Path("x"), 1.0), setting="s", target_epsilon=None
    )
    for column, key in [("oracle", "private/oracle"), ("clipped", "clipped/mine"),
                        ("raw", "raw/mine"), ("private", "private/mine")]:  # fmt: skip
        want = mean_with_ci([r.mi[key].nats for r in records[-SWEEP_LAST:]])
        got = (row[f"{column}_mi"], row[f"{column}_ci_low"], row[f"{column}_ci_high"])
        assert got == pytest.approx(want, rel=1e-12), column
    assert "raw/mine MI" in sweep_table([row], estimator="mine", width=300)
    row["target_epsilon"] = 3.0  # a raw column and targets: wider, no interval split in two
    lines = [line for line in sweep_table([row], estimator="mine").splitlines() if "[" in line]
    assert len(lines) == 2 and lines[1].count("[") == lines[1].count("]") == 3
    for r in records:
        del r.mi["raw/mine"]
    row = sweep_row(
        RunResult(records, 1.0, 0.5, 1.0, Path("x"), 1.0), setting="s", target_epsilon=None
    )
    assert math.isnan(row["raw_mi"])
    assert "raw" not in sweep_table([row], estimator="mine", width=300)
    assert "below 0" not in sweep_table([row], estimator="mine")
    # a learned figure whose whole CI is under 0 (a stale critic, sigma 4): said, as in a run's
    row["clipped_mi"], row["clipped_ci_low"], row["clipped_ci_high"] = -0.99, -1.48, -0.5
    row["noise_multiplier"] = 4.0
    text = sweep_table([row], estimator="mine")
    assert "\nclipped at noise 4: below 0, an empty lower bound (MI is >= 0)" in text
    assert "below 0" not in sweep_table([row], estimator="smile")  # (an estimate, not a bound)


def _stop_at_evaluation(monkeypatch, k: int):
    """Make the next run raise KeyboardInterrupt at its ``k``-th evaluation (epoch k's end, its
    steps done and recorded, the checkpoint of epoch k - 1 on disk); returns the undo."""
    import opacus_mi.training as training

    evaluate, calls = training._evaluate, []

    def stop(*args):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(training, "_evaluate", stop)
    return lambda: monkeypatch.setattr(training, "_evaluate", evaluate)


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_a_run_stopped_in_an_epoch_resumes_from_the_last_one_as_if_never_stopped(
    tmp_path, capsys, monkeypatch, overlap
):
    """``run --resume`` after a stop in epoch 3 of 3 goes on from the checkpoint written at the
    end of epoch 2: its records (critics included), epsilon and accuracies are those of an
    uninterrupted run of the same settings, and the records the stopped run wrote after the
    checkpoint are not in the file twice. Reference: the uninterrupted run."""
    argv = ["run", *TINY, "--epochs", "3", "--overlap", overlap]
    assert cli.main([*argv, "--out", str(tmp_path / "full")]) == 0
    undo = _stop_at_evaluation(monkeypatch, 3)
    out = tmp_path / "run"
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(out)]) == 130
    assert "--resume goes on from the end of its latest epoch" in capsys.readouterr().err
    stopped = read_jsonl(out / "records.jsonl")
    assert (out / "checkpoint.pt").is_file() and not (out / "result.json").exists()
    undo()
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0
    assert "resumed after epoch 2 of 3" in capsys.readouterr().err
    want = without_timing(read_jsonl(tmp_path / "full" / "records.jsonl"))
    got = without_timing(read_jsonl(out / "records.jsonl"))
    assert len(stopped) == len(want) and got == want  # (the stop came after epoch 3's steps)
    assert any(k.startswith("clipped/") for k in got[-1]["mi"])  # (the critics' state resumed)
    full, resumed = (json.loads((d / "result.json").read_text()) for d in (tmp_path / "full", out))
    for key in ("epsilon", "test_accuracy", "accuracy_per_epoch", "steps", "records"):
        assert resumed[key] == full[key], key
    assert not (out / "checkpoint.pt").exists()
    # finished: --resume keeps it; other settings start over
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0
    assert "kept: finished with these settings" in capsys.readouterr().err
    assert cli.main([*argv, "--out", str(out), "--resume", "--lr", "0.25"]) == 0
    assert "trained from the start: it ran with other settings (--lr 0.5 there, 0.25 now)" in (
        capsys.readouterr().err
    )


def test_a_resumed_sweep_goes_on_with_its_stopped_run_from_that_runs_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """A sweep stopped in its run's second epoch: --resume goes on from the run's checkpoint,
    and the row is an unstopped sweep's."""
    from opacus_mi.sweep import read_sweep_csv

    base = ["sweep", *TINY, "--epochs", "2", "--noise-multipliers", "1"]
    assert cli.main([*base, "--out", str(tmp_path / "full")]) == 0
    undo = _stop_at_evaluation(monkeypatch, 2)
    out = str(tmp_path / "s")
    assert cli.main([*base, "--out", out]) == 130
    undo()
    capsys.readouterr()
    assert cli.main([*base, "--out", out, "--resume"]) == 0
    assert "resumed after epoch 1 of 2" in capsys.readouterr().err
    (got,), (want,) = (
        read_sweep_csv(tmp_path / "s" / "sweep.csv"),
        read_sweep_csv(tmp_path / "full" / "sweep.csv"),
    )
    for key in ("epsilon", "test_accuracy", "oracle_mi", "oracle_ci_low", "clipped_mi"):
        assert got[key] == want[key], key


def test_run_resume_refuses_another_runs_checkpoint_and_mends_its_records_file(
    tmp_path, capsys, monkeypatch
):
    """From a review of run --resume: a checkpoint.pt copied from another run's folder was
    taken up (records with steps 6-7 missing, another run's accuracies), and a records.jsonl
    deleted or cut before --resume ended a run with fewer records than result.json counts.
    Reference: an unstopped run of the same settings."""
    import shutil

    argv = ["run", *TINY, "--epochs", "3"]
    assert cli.main([*argv, "--out", str(tmp_path / "full")]) == 0
    want = without_timing(read_jsonl(tmp_path / "full" / "records.jsonl"))
    other, out = tmp_path / "other", tmp_path / "run"
    for folder, extra in ((other, ["--fake-size", "128"]), (out, [])):
        undo = _stop_at_evaluation(monkeypatch, 3)
        assert cli.main([*argv, *extra, "--out", str(folder)]) == 130
        undo()
    saved = out / "checkpoint.pt.own"
    shutil.copy(out / "checkpoint.pt", saved)
    shutil.copy(other / "checkpoint.pt", out / "checkpoint.pt")
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "trained from the start: its checkpoint.pt is another run's" in err
    assert "--fake-size 128 there, 64 now" in err
    assert without_timing(read_jsonl(out / "records.jsonl")) == want
    # its own checkpoint, with the records file cut to two lines: made whole from the state
    undo = _stop_at_evaluation(monkeypatch, 3)
    assert cli.main([*argv, "--out", str(out)]) == 130
    undo()
    jsonl = out / "records.jsonl"
    jsonl.write_text("".join(jsonl.read_text().splitlines(keepends=True)[:2]))
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0
    assert without_timing(read_jsonl(jsonl)) == want
    assert json.loads((out / "result.json").read_text())["records"] == len(want)


def test_run_resume_refuses_a_checkpoint_whose_bytes_changed(tmp_path, capsys, monkeypatch):
    """``torch.load`` never checks the CRC-32 that ``torch.save``'s zip holds per record: a
    checkpoint with one flipped byte in a tensor loaded, and the run went on from a wrong
    weight without a word. Reference: an unstopped run of the same settings."""
    import zipfile

    import opacus_mi.training as training

    argv = ["run", *TINY, "--epochs", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "run"
    undo = _stop_at_evaluation(monkeypatch, 2)
    assert cli.main([*argv, "--out", str(out)]) == 130
    undo()
    path = out / "checkpoint.pt"
    config = (out / "config.json").read_bytes()  # (and its config.json missing, or damaged)
    for damaged, why in ((None, "is missing"), (b"{", "cannot be read")):
        (out / "config.json").unlink(missing_ok=True)
        if damaged is not None:
            (out / "config.json").write_bytes(damaged)
        assert training._resume_point(out, training.RunConfig()) is None
        assert f"trained from the start: its config.json {why}" in capsys.readouterr().err
    (out / "config.json").write_bytes(config)
    with zipfile.ZipFile(path) as archive:  # the largest tensor's bytes (model or critic)
        info = max(archive.infolist(), key=lambda i: i.file_size if "/data/" in i.filename else 0)
    data, h = bytearray(path.read_bytes()), info.header_offset  # (its local header at h:)
    name_and_extra = sum(int.from_bytes(data[h + i : h + i + 2], "little") for i in (26, 28))
    data[h + 30 + name_and_extra + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "trained from the start: its checkpoint.pt cannot be read (its record" in err
    assert "fails its CRC check" in err
    want = without_timing(read_jsonl(tmp_path / "full" / "records.jsonl"))
    assert without_timing(read_jsonl(out / "records.jsonl")) == want


def test_the_checkpoint_crc_check_passes_what_torch_wrote_without_crcs(tmp_path):
    """From a review: a checkpoint saved with torch's CRC-32s turned off (a public option,
    whose files torch.load reads) was refused as changed. Reference: torch.load itself."""
    import torch

    from opacus_mi.training import _check_intact

    path = tmp_path / "c.pt"
    state = {"w": torch.arange(4096.0)}
    try:
        torch.serialization.set_crc32_options(False)
        torch.save(state, path)
    finally:
        torch.serialization.set_crc32_options(True)
    _check_intact(path)
    assert torch.equal(torch.load(path)["w"], state["w"])
    torch.save(state, path)  # with CRCs: a changed byte in the tensor is caught
    data = bytearray(path.read_bytes())
    data[data.find(torch.tensor([1234.0]).numpy().tobytes())] ^= 0x10  # (w[1234]'s bytes)
    path.write_bytes(bytes(data))
    assert torch.load(path)["w"][1234] != 1234  # (which torch.load takes as it is)
    with pytest.raises(ValueError, match="fails its CRC check"):
        _check_intact(path)


def test_run_resume_purges_tensorboards_steps_after_the_checkpoint(tmp_path, monkeypatch):
    """A resumed run's TensorBoard showed the steps after the checkpoint twice (the stopped
    run's events and its own); now each step once, as an unstopped run's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ["run", *TINY, "--epochs", "3", "--tensorboard"]
    out = tmp_path / "run"
    undo = _stop_at_evaluation(monkeypatch, 3)
    assert cli.main([*argv, "--out", str(out)]) == 130
    undo()
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("privacy/epsilon")]
    assert steps == [r.step for r in read_jsonl(out / "records.jsonl")]
    per_epoch = len(steps) // 3
    assert [e.step for e in acc.Scalars("test/accuracy")] == [per_epoch * k - 1 for k in (1, 2, 3)]


def test_run_resume_says_why_a_finished_run_is_not_kept_and_how_a_resumed_one_goes_on(
    tmp_path, capsys
):
    """A finished run with other settings was 'trained from the start: no epoch of a run there
    finished'; a resumed run stopped again before its next checkpoint had no hint; a kept run
    kept a stray checkpoint.pt."""
    import argparse
    import shutil

    out = tmp_path / "run"
    assert cli.main(["run", *TINY, "--out", str(out)]) == 0
    shutil.copy(out / "config.json", out / "checkpoint.pt")  # (a stop before it was removed)
    capsys.readouterr()
    assert cli.main(["run", *TINY, "--out", str(out), "--resume"]) == 0
    assert "kept: finished with these settings" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()
    assert cli.main(["run", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    assert "trained from the start: it ran with other settings (--epochs 1 there, 2 now)" in (
        capsys.readouterr().err
    )
    (out / "checkpoint.pt").write_bytes(b"")  # (an earlier command's)
    args = argparse.Namespace(command="run", out=str(out), resume=True)
    later = time.time_ns() + 10**10
    assert "--resume goes on from the end of its latest epoch" in cli._resumable(args, later)
    assert "what was finished is in" in cli._kept(args, later)
    args.resume = False
    assert cli._resumable(args, later) == "" and cli._kept(args, later) == ""


def _finished_copy(run_dir, tmp_path):
    """A copy of the module's finished run, and the RunConfig its config.json holds."""
    import shutil

    from opacus_mi.training import config_from_kwargs

    out = tmp_path / "run"
    shutil.copytree(run_dir[0], out)
    config = json.loads((out / "config.json").read_text())
    return out, config_from_kwargs(**{**config, "views": tuple(config["views"]), "out": str(out)})


def test_finished_run_keeps_a_run_of_these_settings_however_it_was_run(run_dir, tmp_path):
    """--resume keeps a finished run given where and how it ran otherwise (threads, overlap,
    --out, --tensorboard where its logs are there), not one whose records fall short of
    result.json's count or whose result.json holds a boolean for a number, nor a run with
    --tensorboard asked for now and no logs. Reference: the files, read with json."""
    from dataclasses import replace

    from opacus_mi.training import finished_run

    out, cfg = _finished_copy(run_dir, tmp_path)
    done, why = finished_run(cfg)
    assert why == "finished with these settings"
    result = json.loads((out / "result.json").read_text())
    assert done.epsilon == result["epsilon"] and len(done.records) == result["records"]
    for same in ({"threads": 3}, {"overlap": "off"}):
        assert finished_run(replace(cfg, **same))[1] == "finished with these settings", same
    done, why = finished_run(replace(cfg, tensorboard=True))
    assert done is None and "--tensorboard False there, True now" in why
    events = out / "tensorboard" / "events.out.tfevents.1"
    events.parent.mkdir()
    events.write_bytes(b"")
    assert finished_run(replace(cfg, tensorboard=True))[1] == "finished with these settings"
    assert finished_run(replace(cfg, lr=0.25))[0] is None
    jsonl = out / "records.jsonl"
    lines = jsonl.read_text().splitlines(keepends=True)
    jsonl.write_text("".join(lines[:-1]))
    done, why = finished_run(cfg)
    assert done is None and f"holds {len(lines) - 1} records" in why
    jsonl.write_text("".join(lines))
    (out / "mi.png").unlink()  # (a run stopped while its plots were drawn: drawn here)
    done, why = finished_run(cfg)
    assert why == "finished with these settings" and (out / "mi.png") in done.files
    assert (out / "mi.png").is_file()
    (out / "result.json").write_text(json.dumps({**result, "epsilon": True}))
    done, why = finished_run(cfg)
    assert done is None and why == "its result.json holds no number for epsilon"
    (out / "result.json").unlink()  # (a run stopped before it finished)
    assert finished_run(cfg) == (None, "its run did not finish (no result.json)")


def test_resume_returns_a_kept_runs_table_and_files(run_dir, tmp_path, capsys):
    """``run --resume`` of a finished run prints the result's summary: a kept run with all
    its files returned an empty one. Reference: the summary.txt and files on disk."""
    from opacus_mi.training import RUN_OUTPUTS, train_and_monitor

    out, cfg = _finished_copy(run_dir, tmp_path)
    done = train_and_monitor(cfg, progress=False, resume=True)
    assert "kept: finished with these settings" in capsys.readouterr().err
    assert "private/oracle" in done.summary
    assert done.summary + "\n" == (out / "summary.txt").read_text()
    drawn = set(RUN_OUTPUTS) - {"records.jsonl", "config.json", "result.json"}
    assert {p.name for p in done.files} == drawn


def test_resume_keeps_a_target_epsilon_runs_config_as_the_same_setting(tmp_path):
    """A run given --target-epsilon writes its noise multiplier as null (Opacus calibrates
    it): --resume must read that config.json as these settings, and another target as
    other settings. Reference: config.json read with json."""
    from dataclasses import replace

    from opacus_mi.training import RESUME_IGNORES, RunConfig, _other_settings, _start_run_folder

    cfg = RunConfig(target_epsilon=3.0, out=str(tmp_path))
    _start_run_folder(tmp_path, cfg)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["noise_multiplier"] is None and config["target_epsilon"] == 3.0
    assert _other_settings(config, cfg, RESUME_IGNORES) is None
    assert _other_settings(config, replace(cfg, noise_multiplier=2.0), RESUME_IGNORES) is None
    why = _other_settings(config, replace(cfg, target_epsilon=4.0), RESUME_IGNORES)
    assert why == "it ran with other settings (--target-epsilon 3.0 there, 4.0 now)"


def test_a_new_run_clears_the_last_runs_checkpoint(tmp_path):
    """A run started afresh clears the last run's checkpoint.pt (and a partial one): left
    there, a new run stopped in its first epoch read as resumable from another run's epoch.
    Reference: the folder's files."""
    from opacus_mi.report import partial_path
    from opacus_mi.training import CHECKPOINT, RunConfig, _start_run_folder

    stale = [tmp_path / CHECKPOINT, partial_path(tmp_path / CHECKPOINT)]
    for path in stale:
        path.write_bytes(b"the last run's")
    (tmp_path / "notes.md").write_text("mine")
    _start_run_folder(tmp_path, RunConfig(out=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.md"]


def test_other_settings_names_three_differences_and_a_setting_only_the_folder_has():
    """The reason a run is trained again names the first three differing flags (sorted) and
    says there are more; a setting config.json holds that this version has no flag for is a
    difference too. Reference: the differences made by hand."""
    from dataclasses import replace

    from opacus_mi.training import RESUME_IGNORES, RunConfig, _as_read_back, _other_settings

    cfg = RunConfig()
    config = _as_read_back(cfg.as_dict())
    now = replace(cfg, seed=1, lr=0.25, epochs=2, batch_size=32)
    assert _other_settings(config, now, RESUME_IGNORES) == (
        "it ran with other settings (--batch-size 64 there, 32 now, --epochs 8 there, 2 now, "
        "--lr 0.5 there, 0.25 now, ...)"
    )
    now = replace(cfg, seed=1, lr=0.25, epochs=2)
    assert _other_settings(config, now, RESUME_IGNORES) == (
        "it ran with other settings (--epochs 8 there, 2 now, --lr 0.5 there, 0.25 now, "
        "--seed 0 there, 1 now)"
    )
    assert _other_settings({**config, "future_flag": 1}, cfg, RESUME_IGNORES) == (
        "it ran with other settings (--future-flag 1 there, '(unset)' now)"
    )


def _stopped_run_folder(tmp_path, cfg):
    """A folder as a stopped run leaves it: config.json (as the run writes it) and a
    checkpoint.pt."""
    from opacus_mi.training import _start_run_folder

    out = tmp_path / "run"
    out.mkdir()
    _start_run_folder(out, cfg)
    return out


def test_resume_point_needs_the_checkpoints_tensorboard_setting_and_all_its_parts(tmp_path, capsys):
    """A checkpoint's run goes on with its TensorBoard logs as they began (unlike a finished
    run's, --tensorboard is compared), and a checkpoint missing a part (here all but the
    epoch) is trained from the start, said, not a KeyError. Reference: the file torch wrote."""
    from dataclasses import replace

    from opacus_mi.training import RunConfig, _resume_point

    cfg = RunConfig(dataset="fake", fake_size=64, epochs=2)
    out = _stopped_run_folder(tmp_path, cfg)
    torch.save({"epoch": 1}, out / "checkpoint.pt")
    capsys.readouterr()
    assert _resume_point(out, replace(cfg, tensorboard=True)) is None
    assert "(--tensorboard False there, True now)" in capsys.readouterr().err
    assert _resume_point(out, cfg) is None
    err = capsys.readouterr().err
    assert "trained from the start: its checkpoint.pt cannot be read (it has no " in err
    assert "module_state_dict" in err and "config" in err


def test_the_checkpoint_crc_check_passes_a_file_torch_wrote_in_its_legacy_format(tmp_path):
    """torch.save's legacy (non-zip) format has no CRCs to check: torch.load is its judge.
    Reference: torch.load reading it back."""
    from opacus_mi.training import _check_intact

    path = tmp_path / "c.pt"
    state = {"w": torch.arange(16.0)}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    _check_intact(path)
    assert torch.equal(torch.load(path)["w"], state["w"])


def test_resume_takes_a_data_root_written_otherwise_as_the_same_folder(tmp_path, monkeypatch):
    """``--resume --data-root good/`` after a run with ``--data-root good`` trained a finished
    run again, and a stopped one from the start, deleting its checkpoint: the settings were
    compared as strings. The same folder is the same setting; another folder is not."""
    from dataclasses import replace

    from opacus_mi.training import RESUME_IGNORES, RunConfig, _as_read_back, _other_settings

    (tmp_path / "good").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "good")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = RunConfig(dataset="cifar10", data_root="good", epochs=1)
    config = _as_read_back(cfg.as_dict())  # (as config.json reads back)
    for same in (
        "good/",
        "./good",
        "good//",
        str(tmp_path / "good"),
        "~/good",
        "link",
        "x/../good",
    ):
        assert _other_settings(config, replace(cfg, data_root=same), RESUME_IGNORES) is None, same
    for other in ("other", "link/..", None):
        why = _other_settings(config, replace(cfg, data_root=other), RESUME_IGNORES)
        assert why == f"it ran with other settings (--data-root 'good' there, {other!r} now)"
    # config.json keeps the folder as an absolute path: a --resume from another working
    # directory, with the folder given relative to that one, is the same setting too.
    from opacus_mi.training import _start_run_folder

    out = tmp_path / "run"
    out.mkdir()
    written = _start_run_folder(out, cfg)
    assert written["data_root"] == str(tmp_path / "good")
    assert json.loads((out / "config.json").read_text())["data_root"] == str(tmp_path / "good")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for same in ("../good", "../link/", str(tmp_path / "good")):
        assert _other_settings(written, replace(cfg, data_root=same), RESUME_IGNORES) is None
    assert _other_settings(written, replace(cfg, data_root="good"), RESUME_IGNORES) is not None
    monkeypatch.chdir(tmp_path)
    # (a folder gone since, spelled otherwise, is still the same path)
    gone = RunConfig(dataset="cifar10", data_root="gone/", epochs=1)
    config = _as_read_back(gone.as_dict())
    assert _other_settings(config, replace(gone, data_root="./gone"), RESUME_IGNORES) is None
    assert _other_settings(config, replace(gone, data_root="gone2"), RESUME_IGNORES) is not None


def test_run_resume_after_a_kill_keeps_every_tensorboard_step_before_the_checkpoint(tmp_path):
    """Killed (no finally) right after a checkpoint, a run had the epoch's last record only in
    memory, never in TensorBoard, and the resumed run purges from the checkpoint's step on:
    that step was missing for good. Reference: the records, every step once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["run", *TINY, "--epochs", "3", "--tensorboard", "--out", str(out)]
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        import opacus_mi.training as training
        from opacus_mi import cli
        save = training._save_training
        def kill_after(out, engine, model, opt, monitor, epoch, *rest):
            save(out, engine, model, opt, monitor, epoch, *rest)
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # (a preempted job, the OOM killer)
        training._save_training = kill_after
        sys.exit(cli.main({argv!r}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert cli.main([*argv, "--resume"]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("privacy/epsilon")]
    assert steps == [r.step for r in read_jsonl(out / "records.jsonl")] == list(range(len(steps)))


# Rules of checks.py a mutation audit found unguarded (each test below fails under its
# mutation), against closed forms, brute-force loops, torch itself or the documented rule.


def test_finite_numbers_and_counts_at_their_edges():
    from opacus_mi import checks

    assert not checks.is_finite_number(True) and not checks.is_finite_number(False)
    assert checks.is_finite_number(0) and not checks.is_finite_number(float("inf"))
    assert checks.is_int_at_least(2, 2) and not checks.is_int_at_least(1, 2)
    with pytest.raises(ValueError, match="--lr must be a positive finite number"):
        checks.require_positive("lr", 0)
    with pytest.raises(ValueError, match="--lr must be a positive finite number"):
        checks.require_positive("lr", True)
    checks.require_positive("lr", 1e-300)


def test_torch_seed_range_is_what_torch_manual_seed_takes():
    """Reference: torch itself, at both ends of the documented range."""
    from opacus_mi import checks

    for seed in (-(2**63), 2**64 - 1, -(2**63) - 1, 2**64):
        try:
            torch.Generator().manual_seed(seed)
            torch_takes = True
        except (RuntimeError, ValueError):  # ('Overflow when unpacking long long')
            torch_takes = False
        assert checks.is_torch_seed(seed) == torch_takes, seed


def test_learning_rate_stops_at_float32s_largest_number():
    from opacus_mi import checks

    top = float(torch.finfo(torch.float32).max)
    checks.require_learning_rate("lr", top)
    with pytest.raises(ValueError, match="--lr must be at most"):
        checks.require_learning_rate("lr", top * (1 + 5e-8))


def test_seed_and_folder_edges():
    from opacus_mi import checks

    checks.require_seed(2**32 - 1)
    checks.require_seed(0)
    with pytest.raises(ValueError, match="--seed must be an integer from 0 to 4294967295"):
        checks.require_seed(2**32)
    assert not checks.is_folder_path("   ") and not checks.is_folder_path("")
    assert checks.is_folder_path(" a ")


def test_python_number_leaves_arrays_as_they_are():
    """'A NumPy scalar as the Python number it holds; anything else as it is'."""
    from opacus_mi import checks

    arr = np.array([1.5, 2.5])
    assert checks.python_number(arr) is arr
    one = np.array([3])
    assert checks.python_number(one) is one
    assert type(checks.python_number(np.float32(0.5))) is float


def test_a_gpu_past_the_last_index_is_refused(monkeypatch):
    """'CUDA without a GPU or past its last index': with one GPU, cuda:0 is taken and cuda:1
    refused (torch.cuda faked, no GPU needed)."""
    from opacus_mi import checks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert checks.available_device("device", "cuda:0") == torch.device("cuda:0")
    assert checks.available_device("device", "cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match="asked for a GPU this machine lacks: it has 1"):
        checks.available_device("device", "cuda:1")
