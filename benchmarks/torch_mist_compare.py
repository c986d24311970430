"""``estimate_mi`` next to torch-mist on the ground-truth tasks: same data, same run.

torch-mist (github.com/mfederici/torch-mist) is never a dependency of opacus-mi: it needs
``numpy<2`` and pandas, so it lives in a throwaway virtual environment outside the repository::

    python3 -m venv /tmp/mistenv
    /tmp/mistenv/bin/pip install "numpy<2" pandas torch==2.13.0 torch-mist
    python benchmarks/torch_mist_compare.py [--mist-python /tmp/mistenv/bin/python]

Protocol, so that both sides get exactly the same pairs (which of them are held out differs:
ours are drawn inside ``estimate_mi``; only the split sizes are shared):

* each task of ``benchmarks/test_ground_truth.py`` (imported, not redefined) is sampled ONCE
  (seed 0, ``min(task.n, --n)`` pairs) and written to ``x.npy`` / ``y.npy`` in a temp dir;
* ours: ``estimate_mi(x, y, "mine" | "infonce", seed=0)`` with its defaults, in this process;
* torch-mist: its high-level ``torch_mist.estimate_mi`` on the same files in a subprocess of
  the throwaway venv (this file with ``--worker``), one subprocess per task with a timeout.
  It gets the same split sizes as ours (30% held-out evaluation pairs capped at 4096, 15% of
  the rest for validation / early stopping, the rest for training) through ``split.npy``;
  its figure is evaluated on the held-out pairs only (``test_data``). Its estimators, at its
  library defaults (Adam at lr 5e-4, batch 128, validation once per epoch, early stopping
  where it allows it: not for MINE, whose ``lower_bound`` flag is False) except at most 3,000
  iterations (ours: ``max_steps=3000``; its default 5,000 would take the run past 8 minutes;
  its README example uses 1,000): ``mine`` (MINE, joint critic ``[x, y] -> 128 -> 128 -> 1``,
  one shuffled negative per pair, EMA gamma 0.9) and ``infonce`` (separable critic, both
  towers ``-> 128 -> 128 -> 32``, the size of ours; the whole batch as negatives). Its
  ``estimate_mi`` averages the bound over evaluation minibatches of 128 pairs (InfoNCE is then
  capped at ln 128 = 4.85); the same trained critic evaluated on the whole held-out split in
  one batch (as ours is) is reported alongside. It does not standardise inputs (ours does).

CPU seconds are ``time.process_time`` around each estimator call (training + evaluation, one
thread), excluding interpreter start-up and imports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_MIST_PYTHON = "/tmp/mistenv/bin/python"
VENV_CMD = (
    'python3 -m venv /tmp/mistenv && /tmp/mistenv/bin/pip install "numpy<2" pandas '
    "torch==2.13.0 torch-mist"
)
OURS = ("mine", "infonce")
# torch-mist factory name -> constructor arguments (critic sizes matched to ours, see docstring)
MIST = {
    "mine": {"critic_type": "joint", "hidden_dims": [128, 128]},
    "infonce": {"critic_type": "separable", "hidden_dims": [128, 128, 32]},
}
MIST_MAX_ITERATIONS = 3000  # = estimate_mi's max_steps; torch-mist's own default is 5000
EVAL_FRACTION, MAX_EVAL, VAL_FRACTION = 0.3, 4096, 0.15  # estimate_mi's defaults


# --------------------------------------------------------------------------- worker (mist venv)


def worker(task_dir: Path) -> None:
    """Run torch-mist's estimators on ``task_dir``/{x,y,split}.npy; write ``mist.json``."""
    import random

    import torch
    import torch_mist
    from torch_mist.utils.evaluation import evaluate_mi

    torch.set_num_threads(1)
    x = torch.as_tensor(np.load(task_dir / "x.npy"), dtype=torch.float32)
    y = torch.as_tensor(np.load(task_dir / "y.npy"), dtype=torch.float32)
    split = np.load(task_dir / "split.npy")
    config = json.loads((task_dir / "config.json").read_text())
    data = {}
    for i, k in enumerate(("tr", "va", "te")):
        idx = torch.as_tensor(np.flatnonzero(split == i))
        data[k] = (x[idx], y[idx])
    out = {"torch_mist_version": torch_mist.__version__, "torch_version": torch.__version__}
    for name, params in MIST.items():
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        c0, t0 = time.process_time(), time.perf_counter()
        value, estimator, log = torch_mist.estimate_mi(
            data=data["tr"],
            valid_data=data["va"],
            test_data=data["te"],
            valid_percentage=0,
            estimator=name,
            max_iterations=MIST_MAX_ITERATIONS,
            patience=config.get("patience"),  # None: its default, ~2% of the epochs
            verbose=False,
            return_estimator=True,
            **params,
        )
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        n_te = len(data["te"][0])
        with torch.no_grad():
            full = evaluate_mi(estimator, data=data["te"], batch_size=n_te)
        out[name] = {
            "estimate": float(value),
            "estimate_full_batch": float(full),
            "iterations": int(log["iteration"].max()) if "iteration" in log else None,
            "cpu_s": cpu,
            "wall_s": wall,
        }
    (task_dir / "mist.json").write_text(json.dumps(out))


# --------------------------------------------------------------------------- driver (project venv)


def _split(n: int, seed: int = 0) -> np.ndarray:
    """0 train / 1 validation / 2 held-out evaluation, with estimate_mi's default sizes."""
    n_eval = max(4, min(MAX_EVAL, int(round(n * EVAL_FRACTION))))
    n_val = max(4, min(MAX_EVAL, int(round((n - n_eval) * VAL_FRACTION))))
    perm = np.random.default_rng(seed).permutation(n)
    split = np.zeros(n, dtype=np.int64)
    split[perm[:n_eval]] = 2
    split[perm[n_eval : n_eval + n_val]] = 1
    return split


def _run_mist(mist_python: str, task_dir: Path, timeout: float) -> dict:
    cmd = [mist_python, str(Path(__file__).resolve()), "--worker", str(task_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=task_dir
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads((task_dir / "mist.json").read_text())


def _rel(est: float, truth: float) -> str:
    if not math.isfinite(est):
        return "-"
    return f"{(est - truth) / truth:+.1%}" if truth else f"{est - truth:+.3f} abs"


def _num(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "-"


def run(
    n_max: int,
    mist_python: str,
    timeout: float,
    only: list[str] | None,
    patience: int | None = None,
) -> str:
    import torch

    sys.path.insert(0, str(HERE))
    from test_ground_truth import TASKS  # the task definitions live there, once

    from opacus_mi import estimate_mi

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rows, meta = [], {}
    with tempfile.TemporaryDirectory(prefix="mist_cmp_") as tmp:
        for name, task in TASKS.items():
            if only and name not in only:
                continue
            n = min(task.n, n_max)
            x, y = task.sample(0, n)  # the benchmark's own sampler and seed, sampled once
            task_dir = Path(tmp) / name
            task_dir.mkdir()
            np.save(task_dir / "x.npy", x.numpy())
            np.save(task_dir / "y.npy", y.numpy())
            np.save(task_dir / "split.npy", _split(n))
            (task_dir / "config.json").write_text(json.dumps({"patience": patience}))
            row = {"task": name, "n": n, "full_n": task.n, "truth": task.truth}
            for k in OURS:
                xs, ys = np.load(task_dir / "x.npy"), np.load(task_dir / "y.npy")
                c0 = time.process_time()
                est = estimate_mi(xs, ys, k, seed=0)
                row[f"ours_{k}"] = {"estimate": est.nats, "cpu_s": time.process_time() - c0}
            mist = _run_mist(mist_python, task_dir, timeout)
            for k in MIST:
                row[f"mist_{k}"] = mist.get(k, {"estimate": math.nan, "cpu_s": math.nan})
            row["mist_error"] = mist.get("error")
            meta.update({k: v for k, v in mist.items() if k.endswith("_version")})
            rows.append(row)
            print(_line(row), file=sys.stderr, flush=True)
    wall = time.perf_counter() - t_start
    return _markdown(rows, meta, wall, n_max, timeout, patience)


COLS = [("ours_mine", "ours mine"), ("ours_infonce", "ours infonce")] + [
    (f"mist_{k}", f"torch-mist {k}") for k in MIST
]


def _line(row: dict) -> str:
    parts = [f"{row['task']:16s} truth {row['truth']:.3f}"]
    for key, label in COLS:
        r = row[key]
        parts.append(f"{label} {_num(r['estimate'])} ({r['cpu_s']:.1f}s)")
    if row["mist_error"]:
        parts.append(f"torch-mist error: {row['mist_error']}")
    return " | ".join(parts)


def _markdown(
    rows: list[dict],
    meta: dict,
    wall: float,
    n_max: int,
    timeout: float,
    patience: int | None = None,
) -> str:
    import torch

    head = " | ".join(label for _, label in COLS)
    lines = [
        "## Estimates (nats) on the same held-out split sizes, relative error in parentheses",
        "",
        f"| task | n | truth | {head} |",
        "|---|---:|---:|" + "---:|" * len(COLS),
    ]
    for r in rows:
        cells = [
            f"{_num(r[k]['estimate'])} ({_rel(r[k]['estimate'], r['truth'])})" for k, _ in COLS
        ]
        lines.append(f"| {r['task']} | {r['n']} | {r['truth']:.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## torch-mist's trained critics evaluated on the whole held-out split in one batch",
        "",
        "`torch_mist.estimate_mi` averages the bound over evaluation minibatches of 128 pairs "
        "(the table above); ours evaluates all held-out pairs at once. Same trained critics:",
        "",
        "| task | truth | " + " | ".join(f"torch-mist {k}, one batch" for k in MIST) + " |",
        "|---|---:|" + "---:|" * len(MIST),
    ]
    for r in rows:
        cells = []
        for k in MIST:
            v = r[f"mist_{k}"].get("estimate_full_batch", math.nan)
            cells.append(f"{_num(v)} ({_rel(v, r['truth'])})")
        lines.append(f"| {r['task']} | {r['truth']:.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## CPU seconds per estimate (training + evaluation, 1 thread)",
        "",
        f"| task | {head} | torch-mist iterations ({', '.join(MIST)}) |",
        "|---|" + "---:|" * len(COLS) + "---|",
    ]
    totals = dict.fromkeys((k for k, _ in COLS), 0.0)
    for r in rows:
        cells = []
        for k, _ in COLS:
            c = r[k]["cpu_s"]
            totals[k] += c if math.isfinite(c) else 0.0
            cells.append(f"{c:.1f}" if math.isfinite(c) else "-")
        iters = ", ".join(str(r[f"mist_{k}"].get("iterations", "-")) for k in MIST)
        lines.append(f"| {r['task']} | " + " | ".join(cells) + f" | {iters} |")
    lines.append("| **total** | " + " | ".join(f"**{totals[k]:.0f}**" for k, _ in COLS) + " | |")
    errors = [f"{r['task']}: {r['mist_error']}" for r in rows if r["mist_error"]]
    if errors:
        lines += ["", "torch-mist failures: " + "; ".join(errors) + "."]
    shrunk = sorted({(r["full_n"], r["n"]) for r in rows if r["n"] < r["full_n"]})
    note = (
        " Tasks the ground-truth benchmark runs at "
        + ", ".join(f"{a:,}" for a, _ in shrunk)
        + f" pairs ran here at {n_max:,} (run time), so ours differ from "
        "`ground_truth_results.md` there."
        if shrunk
        else ""
    )
    lines += [
        "",
        f"Measured {datetime.date.today().isoformat()} on a 2-core CPU ({platform.machine()}, "
        f"1 thread, shared with other jobs): ours with torch {torch.__version__}; torch-mist "
        f"{meta.get('torch_mist_version', '?')} with torch {meta.get('torch_version', '?')} in "
        f"its throwaway venv, early-stopping patience "
        f"{'its default (~2% of the epochs)' if patience is None else f'{patience} epochs'}; "
        f"per-task timeout {timeout:.0f} s; whole run {wall / 60:.1f} min "
        f"wall.{note}",
    ]
    return "\n".join(lines)


HEADER = """# torch-mist next to `estimate_mi` on the ground-truth tasks

Same pairs for both (each task sampled once with `benchmarks/test_ground_truth.py`'s samplers,
seed 0), same split sizes, both evaluated on held-out pairs only. Protocol and the torch-mist
settings: the docstring of `benchmarks/torch_mist_compare.py`. torch-mist is not a dependency of
opacus-mi; reproduce with

    python3 -m venv /tmp/mistenv
    /tmp/mistenv/bin/pip install "numpy<2" pandas torch==2.13.0 torch-mist
    python benchmarks/torch_mist_compare.py --out benchmarks/torch_mist_results.md

"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mist-python", default=DEFAULT_MIST_PYTHON)
    parser.add_argument("--n", type=int, default=10_000, help="pairs per task at most")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per torch-mist task")
    parser.add_argument("--tasks", nargs="*", help="only these task names")
    parser.add_argument(
        "--mist-patience",
        type=int,
        help="torch-mist early-stopping patience in epochs (default: its own, ~2%% of epochs)",
    )
    parser.add_argument("--out", default=str(HERE / "torch_mist_results.md"))
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if not Path(args.mist_python).exists():
        print(
            f"--mist-python {args.mist_python} does not exist: create the throwaway torch-mist "
            f"venv first ({VENV_CMD}) or pass --mist-python PATH",
            file=sys.stderr,
        )
        return 2
    check = subprocess.run(
        [args.mist_python, "-c", "import torch_mist"], capture_output=True, text=True
    )
    if check.returncode != 0:
        print(
            f"{args.mist_python} cannot import torch_mist ({check.stderr.strip().splitlines()[-1]})"
            f": install it there with {VENV_CMD}",
            file=sys.stderr,
        )
        return 2
    text = run(args.n, args.mist_python, args.timeout, args.tasks, args.mist_patience)
    print(text)
    if args.out:
        Path(args.out).write_text(HEADER + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
