"""The library's defaults timed the way a user would: one plain Opacus loop against the same
loop with the monitor's two lines, public API only, torch's own thread count.

    .venv/bin/python benchmarks/side_by_side.py                      # defaults, digits CNN
    .venv/bin/python benchmarks/side_by_side.py --threads 1          # a free core: overlap on
    .venv/bin/python benchmarks/side_by_side.py --monitor '{"every": 1000000000}'  # hooks only
    .venv/bin/python benchmarks/side_by_side.py --processes 4        # each loop in its own process

Why, beside ``report.py``: that report pins one intra-op thread (so the overlap worker has a
core) and builds its loops with the benchmark helpers. Out of the box, on a 2-core machine, torch
uses both cores, so overlap is off and the budget alone keeps the cost down; this script is
what a side-by-side check by someone else would see. The two loops train the real digits data
(fixed batches of 64, no Poisson sampling, so both see the same batches) in alternating blocks;
the ratio is total monitored time / total plain time, and the median of each block pair's ratio.

``--processes N`` times the two loops the other way someone might: each in a fresh process of
its own, N of each, alternating; the ratio is of the median step times. Both ways glibc's malloc
thresholds are pinned for both loops (:mod:`allocator`: otherwise each process pays page faults
set by its allocation history, 0 to ~1,000 per step here); ``--malloc default`` shows what they
do, and every line gives the page faults per step. Separate processes are the noisier way on a
machine whose speed drifts: two runs of eight pairs here read 0.79-1.70x pair by pair, 1.08x and
1.10x as the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from opacus_mi import LeakageMonitor
from opacus_mi.data import load_dataset
from opacus_mi.models import DigitsCNN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocator import PINNED_ENV, page_faults, pin_malloc  # noqa: E402

warnings.filterwarnings("ignore", module="opacus")
warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")


def loop(data, monitor_kwargs: dict | None):
    """``steps(k)``: k DP-SGD steps of a fresh digits CNN (monitored if ``monitor_kwargs``)."""
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data.train, batch_size=64),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    criterion = nn.CrossEntropyLoss()
    monitor = None
    if monitor_kwargs is not None:
        monitor = LeakageMonitor(engine, model, optimizer, delta=1e-5, **monitor_kwargs)
        criterion = monitor.wrap_criterion(criterion)
    batches = list(loader)
    done = 0

    def steps(k: int) -> None:
        nonlocal done
        for _ in range(k):
            x, y = batches[done % len(batches)]
            done += 1
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        if monitor is not None:
            monitor.flush()  # an overlap worker's last work belongs to these steps

    return steps, monitor


def _child(args, kwargs: dict | None, malloc: str) -> None:
    """One loop alone in this (fresh) process: warm up, time ``--steps`` steps, print JSON."""
    steps, monitor = loop(load_dataset("digits"), kwargs)
    steps(30)
    faults, t0 = page_faults(), time.perf_counter()
    steps(args.steps)
    seconds = time.perf_counter() - t0
    out = {"ms": 1e3 * seconds / args.steps, "faults": (page_faults() - faults) / args.steps}
    out["malloc"] = malloc
    if monitor is not None:
        out["overlap"], out["summary"] = monitor.overlap, monitor.summary().splitlines()[-1]
    print(json.dumps(out))


def _processes(args, expected: str) -> None:
    """Each loop in its own fresh process, ``--processes`` of each, alternating; ``expected``
    is the malloc state each child must report (this process's, set as asked)."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["OPACUS_MI_BENCH_MALLOC"] = args.malloc
    if args.malloc == "pinned":
        env.update(PINNED_ENV)
    runs: dict[str, list[dict]] = {"plain": [], "monitored": []}
    for i in range(args.processes):
        order = ["plain", "monitored"] if i % 2 == 0 else ["monitored", "plain"]
        for name in order:
            cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps)]
            cmd += ["--monitor", args.monitor, "--malloc", args.malloc]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"the {name} process failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = runs[name][-1]
            if r["malloc"] != expected:  # the comparison would not be what it says
                raise SystemExit(f"the {name} process ran with {r['malloc']!r}, not {expected!r}")
            print(
                f"{name:9s} process {i + 1}: {r['ms']:.2f} ms/step, {r['faults']:.0f} faults/step"
            )
    med = {k: statistics.median(r["ms"] for r in v) for k, v in runs.items()}
    pairs = [m["ms"] / p["ms"] for p, m in zip(runs["plain"], runs["monitored"], strict=True)]
    print(
        f"{expected}; fresh processes per loop: {args.processes}, {args.steps} steps each: "
        f"plain DP step {med['plain']:.2f} ms (range {_range(runs['plain'])}), monitored "
        f"{med['monitored']:.2f} ms ({_range(runs['monitored'])}); monitored / plain: "
        f"{med['monitored'] / med['plain']:.3f}x (median of each), pairs "
        f"{min(pairs):.2f}-{max(pairs):.2f}x"
    )
    print(runs["monitored"][-1]["summary"])


def _range(runs: list[dict]) -> str:
    ms = [r["ms"] for r in runs]
    return f"{min(ms):.2f}-{max(ms):.2f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--monitor", default="{}", help="LeakageMonitor keyword arguments, as JSON")
    ap.add_argument("--blocks", type=int, default=20, help="blocks per loop (default 20)")
    ap.add_argument("--k", type=int, default=50, help="steps per block (default 50)")
    ap.add_argument(
        "--processes",
        type=int,
        default=0,
        help="time each loop in N fresh processes of its own instead (default: one process)",
    )
    ap.add_argument("--steps", type=int, default=500, help="timed steps per process (default 500)")
    ap.add_argument(
        "--malloc",
        choices=("pinned", "default"),
        default="pinned",
        help="glibc's malloc thresholds: pinned for both loops (default), or left adaptive",
    )
    ap.add_argument("--child", choices=("plain", "monitored"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be a positive integer, got {args.threads}")
    if args.blocks < 1 or args.k < 1 or args.steps < 1 or args.processes < 0:
        ap.error("--blocks, --k and --steps must be positive integers, --processes >= 0")
    try:
        kwargs = json.loads(args.monitor)
    except json.JSONDecodeError as err:
        ap.error(f"--monitor must be a JSON object of LeakageMonitor arguments: {err}")
    if not isinstance(kwargs, dict):
        ap.error(f"--monitor must be a JSON object, got {args.monitor!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["OPACUS_MI_BENCH_MALLOC"] = args.malloc
    malloc = pin_malloc()
    if args.child:
        _child(args, kwargs if args.child == "monitored" else None, malloc)
        return
    if args.processes:
        _processes(args, malloc)
        return

    data = load_dataset("digits")
    plain, _ = loop(data, None)
    monitored, monitor = loop(data, kwargs)
    plain(30)  # warm-up: allocator, first calls, the monitor's one-off setup
    monitored(30)
    times: dict[str, list[float]] = {"plain": [], "monitored": []}
    faults = {"plain": 0, "monitored": 0}
    for block in range(args.blocks):
        order = [("plain", plain), ("monitored", monitored)]
        for name, run in order if block % 2 == 0 else order[::-1]:
            f0, t0 = page_faults(), time.perf_counter()
            run(args.k)
            times[name].append(time.perf_counter() - t0)
            faults[name] += page_faults() - f0
    plain_s, mon_s = times["plain"], times["monitored"]
    steps = args.blocks * args.k
    paired = statistics.median(m / p for m, p in zip(mon_s, plain_s, strict=True))
    print(
        f"torch threads {torch.get_num_threads()}, overlap {monitor.overlap}; "
        f"plain DP step {1e3 * sum(plain_s) / steps:.2f} ms; monitored / plain: "
        f"total {sum(mon_s) / sum(plain_s):.3f}x, "
        f"paired median {paired:.3f}x "
        f"({args.blocks} blocks of {args.k} steps each)"
    )
    print(
        f"{malloc}; page faults per step: plain {faults['plain'] / steps:.1f}, "
        f"monitored {faults['monitored'] / steps:.1f}"
    )
    print(monitor.summary().splitlines()[-1])


if __name__ == "__main__":
    main()
