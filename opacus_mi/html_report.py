"""A single self-contained ``report.html``: settings, results, the summary table, embedded plots."""

from __future__ import annotations

import base64
import html
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .report import write_text_whole

EXPLANATION = """
<ul>
<li><b>Units.</b> Every mutual-information (MI) figure is in <b>nats</b> (1 nat = 1.443 bits),
measured per DP-SGD step: how much one step's gradient view tells about which example of the
batch produced it, paired with that example's data.</li>
<li><b>view / estimator.</b> <code>raw</code> = per-sample gradients before clipping,
<code>clipped</code> = after clipping to the max grad norm, <code>private</code> = clipped plus
Opacus's Gaussian noise (what DP-SGD releases). <code>mine</code>, <code>infonce</code>,
<code>nwj</code> and <code>smile</code> are learned critics; <code>private/oracle</code> is the
white-box Bayes oracle for the private view: a Monte Carlo estimate of its exact MI (unbiased,
not a bound), drawn from the Gram matrix of the clipped gradients; <code>private/semi</code>
(with <code>--semi-oracle</code>) is an estimate too, not a bound: a learned model of each
example's clean token, scored with the known noise.</li>
<li><b>last / mean [95% CI].</b> Learned estimates are <b>lower bounds evaluated on held-out
pairs</b> the critic never trained on (<code>smile</code>'s excepted: its clipping can
overshoot; and <code>private/semi</code>, an estimate), with Student-t intervals from a
delete-one-pair jackknife (<code>infonce</code>;
blank near ln B, where a batch cannot show its spread) or bootstrap intervals (blank on too
few pairs for the figure); the oracle's is Student-t, reaching down to a proven floor near ln B.
The mean averages the last records with an interval across steps.</li>
<li><b>shuffled.</b> The same critic on <b>shuffled (mismatched) pairs</b>: what it scores on
pairs that tell nothing of each other. Strongly negative for <code>mine</code>, <code>nwj</code>
and <code>smile</code> (their <code>e^T</code> terms punish it), so a real signal sits well above
it; the zero-MI baseline is the control's.</li>
<li><b>control.</b> Where shown (<code>control=True</code>, CLI <code>--control</code>): a second
critic trained on shuffled pairs with the same windows and schedule, what the estimator reads
when there is nothing to find (about 0).</li>
<li><b>detected.</b> Where shown: "yes" when the interval over steps lies above 0 and above the
shuffled and control figures.</li>
<li><b>ln B.</b> The log of the number of pairs a figure was measured on (on a learned row,
its held-out pairs): InfoNCE and the oracle cannot exceed it (the <code>e^T</code> bounds,
<code>mine</code>, <code>nwj</code>, <code>smile</code>, can). On the oracle's row, the mean log
of its candidate sets' sizes: the batch, each physical chunk under BatchMemoryManager, each
rank's batch under DPDDP.</li>
<li><b>bound/step.</b> <code>1/(2 sigma^2)</code> nats, the capacity-style bound of one use of the
Gaussian channel with noise multiplier sigma (signal norm at most C, noise std sigma*C). The
private view's true MI per step cannot exceed it; the oracle's Monte Carlo figure and interval
can lie a little above it by sampling noise (a record is flagged <code>exceeds_bound</code> only
beyond the 99.9% quantile of its noise, which a correct estimate is in 0.05% of records, and
the summary calls the flags a bug only where more of them than chance explains). Epsilon
composes the whole run instead.</li>
<li><b>MI accountant.</b> In the title: a bound on what any one example leaked over the run so
far as Opacus releases it (in a noisy sum, in a fraction q of the steps), not a bound on the
per-step rows.</li>
</ul>
"""


def sweep_explanation(estimator: str | None, *, clipped_view: bool = True) -> str:
    """The sweep's column notes, with what its clipped column is for ``estimator`` (a run
    config's: ``"none"``, or None where the sweep's settings are not known) and whether its
    runs measured the clipped view (``--views`` without it leaves the column empty)."""
    if estimator == "none":
        clipped = "empty: the sweep ran without a learned estimator"
    elif not clipped_view:
        clipped = "empty: the sweep's runs did not measure the clipped view (--views)"
    elif estimator == "smile":
        clipped = "SMILE's held-out estimate on the clipped view (an estimate, not a bound)"
    elif estimator is None:
        clipped = "the learned critic's held-out figure on the clipped view"
    else:
        name = html.escape(estimator)
        clipped = f"the learned critic's ({name}) held-out lower bound on the clipped view"
    return SWEEP_EXPLANATION.replace("{clipped}", clipped)


SWEEP_EXPLANATION = """
<ul>
<li><b>One row per setting</b> (a noise multiplier, or a target epsilon the noise was solved
for), each a full monitored run in its own folder.</li>
<li><b>epsilon.</b> The run's final epsilon at its delta, from Opacus's accountant.</li>
<li><b>test acc.</b> The model's accuracy on the held-out split after training.</li>
<li><b>private/oracle MI, clipped MI.</b> Nats per example per step: the mean of the run's last
records with a 95% interval across them. The oracle is the white-box Bayes estimate for the
private view; clipped MI is {clipped}. A raw MI column (the learned critic on the unclipped
per-sample gradients) appears where the runs measured that view (<code>--views</code>);
<code>sweep.csv</code> also holds the learned critic's figure on the private view
(<code>private_mi</code>), usually near 0 where the oracle reads more: the critic must learn
through the noise what the oracle is given.</li>
<li><b>bound/step.</b> <code>1/(2 sigma^2)</code> nats: what one private release can carry at
most. The private view's true MI per step cannot exceed it; the oracle's Monte Carlo mean and
interval can lie a little above it by sampling noise.</li>
<li><b>wall s.</b> The run's wall-clock seconds, training and monitor together.</li>
</ul>
"""

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table.kv { border-collapse: collapse; }
table.kv td, table.kv th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
table.kv th { background: #f3f3f3; font-weight: 600; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto;
      font-size: 0.85em; line-height: 1.25; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
footer { margin-top: 2em; color: #777; font-size: 0.85em; }
"""


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_show(v))}</td></tr>"
        for k, v in items.items()
    )
    return f'<table class="kv">\n{rows}\n</table>'


def _show(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def image_data_uri(path: str | os.PathLike) -> str:
    """``data:image/png;base64,...`` for a PNG file."""
    data = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def write_html(
    out_dir: str | os.PathLike,
    *,
    title: str,
    settings: Mapping[str, Any],
    table: str | None = None,
    table_html: str | None = None,
    images: Sequence[str | os.PathLike] = (),
    results: Mapping[str, Any] | None = None,
    filename: str = "report.html",
    explanation: str = EXPLANATION,
) -> Path:
    """Write a self-contained ``<out_dir>/report.html`` and return its path.

    ``table`` is a text table (escaped, shown preformatted); ``table_html`` is trusted HTML used
    as is. ``images`` are PNG files embedded as base64 data URIs, so the file needs nothing else.
    ``explanation``: the notes on the table's columns (trusted HTML; a sweep's has its own).
    """
    out = Path(out_dir)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if results:
        parts += ["<h2>Results</h2>", _kv_table(results)]
    parts.append("<h2>Leakage summary</h2>")
    if table_html is not None:
        parts.append(table_html)
    if table is not None:
        parts.append(f"<pre>{html.escape(table)}</pre>")
    if table is None and table_html is None:
        parts.append("<p>No table.</p>")
    parts += ["<h2>What the columns mean</h2>", explanation]
    if images:
        parts.append("<h2>Plots</h2>")
        for img in images:
            name = html.escape(Path(img).name)
            parts.append(f'<figure><img alt="{name}" src="{image_data_uri(img)}">')
            parts.append(f"<figcaption>{name}</figcaption></figure>")
    if settings:
        parts += ["<h2>Settings</h2>", _kv_table(settings)]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts.append(f"<footer>Generated by opacus-mi on {html.escape(stamp)}.</footer>")
    parts.append("</body></html>")
    path = out / filename
    # Whole or not at all: report.html is a run's last output, and a sweep's --resume keeps a
    # run whose outputs all exist (a stop mid-write left a truncated report kept as finished).
    write_text_whole(path, "\n".join(parts) + "\n")
    return path
