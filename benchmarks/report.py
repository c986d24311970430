"""Measure the monitor's overhead side by side and write a markdown report (no pytest needed).

    .venv/bin/python benchmarks/report.py                  # CPU -> benchmarks/overhead_results.md
    .venv/bin/python benchmarks/report.py --device cuda    # -> benchmarks/overhead_results_cuda.md
    .venv/bin/python benchmarks/report.py --models digits_cnn --no-prv --no-profile --out -

For each model every variant (non-private, DP, DP + monitor defaults (the overhead budget),
DP + tokens and Gram oracle every step, DP + the fixed schedule, DP + critic every step) is built
from the same weights and batches and timed interleaved (A, B, C, ..., rotating the order); a
ratio is a variant's total time over all repetitions / the DP step's total over the same
repetitions. Builders live in ``conftest.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import importlib.util
import inspect
import os
import platform
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load_lib(device: str):
    """Import ``conftest.py`` (the shared builders) under its own name, device set first."""
    os.environ["OPACUS_MI_BENCH_DEVICE"] = device
    for path in (ROOT, HERE):  # the package, and conftest's sibling bench_names.py
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    spec = importlib.util.spec_from_file_location("opacus_mi_bench", HERE / "conftest.py")
    lib = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = lib
    spec.loader.exec_module(lib)
    return lib


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(lib, device: str) -> str:
    import opacus
    import torch

    parts = [
        f"{cpu_name()}, {os.cpu_count()} cores",
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)",
        f"opacus {opacus.__version__}",
        f"Python {platform.python_version()}",
        platform.platform(),
        lib.MALLOC,
    ]
    if torch.device(device).type == "cuda":
        parts.insert(0, torch.cuda.get_device_name())
    return "; ".join(parts)


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def measure_model(lib, model: str, device: str, quick: bool) -> dict:
    cfg = lib.bench_config(model, device)
    reps = max(3, cfg["reps"] // 2) if quick else cfg["reps"]
    setups = lib.build_warm(model, lib.VARIANTS, cfg["warmup"], device=device)
    times = lib.interleaved_times(setups, cfg["k"], reps)
    ratios = lib.total_ratios(times, baseline="dp")
    faults = {v: s.faults_per_step() for v, s in setups.items()}
    # What the budgeted default did (whole run, warm-up included), before the micro-benchmarks
    # below call its critics directly.
    dm = setups["default"].monitor
    measured = len(dm.history) / max(1, dm.steps)
    rounds = 100 * next(iter(dm.estimators.values())).updates / max(1, dm.steps)
    med = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
    mem = lib.memory_report(setups["dp"], setups["fixed"])
    heavy = model == "resnet18_gn" and device == "cpu"
    tokens_s = lib.tokens_seconds(setups["oracle"], reps=3 if heavy else 10)
    critic_s = lib.critic_update_seconds(setups["default"], reps=3 if heavy else 10)
    out = {
        "model": model,
        "batch": setups["dp"].batch,
        "params": lib.param_count(setups["dp"]),
        "nonprivate_ms": med["nonprivate"] * 1e3,
        "dp_ms": med["dp"] * 1e3,
        "ratios": ratios,
        "faults": faults,
        "spread": {v: lib.paired_spread(times, v) for v in ("oracle", "oracle_sync")},
        "tokens_ms": tokens_s * 1e3,
        "critic_ms": critic_s * 1e3,
        "critics": len(setups["default"].monitor.estimators),
        "train_every": setups["fixed"].monitor.train_every,
        "measured": measured,
        "rounds": rounds,
        "mem": mem,
        "reps": reps,
        "k": cfg["k"],
    }
    del setups
    return out


def measure_ghost(lib, model: str, device: str, quick: bool) -> dict:
    """The ghost-clipping variants of ``model``, timed interleaved like ``measure_model``."""
    cfg = lib.bench_config(model, device)
    reps = max(3, cfg["reps"] // 2) if quick else cfg["reps"]
    setups = lib.build_warm(
        model, lib.GHOST_VARIANTS, cfg["warmup"], device=device, grad_sample_mode="ghost"
    )
    times = lib.interleaved_times(setups, cfg["k"], reps)
    out = {
        "model": model,
        "dp_ms": 1e3 * sorted(times["dp"])[len(times["dp"]) // 2],
        "ratios": lib.total_ratios(times, baseline="dp"),
        "spread": {v: lib.paired_spread(times, v) for v in ("oracle", "oracle_sync")},
        "overlap": setups["oracle"].monitor.overlap,
    }
    del setups
    return out


def measure_cold(lib, device: str, steps=(100, 1000), reps: int = 3, block: int = 50) -> dict:
    """The defaults from a fresh monitor, as a user's first run sees them: a new DP setup and a
    new monitored one, both from step 0 (one-off setup included), timed in alternating blocks of
    ``block`` steps (so a drift in machine speed hits both alike) until each has taken ``n``
    steps; ``reps`` fresh pairs; the ratio of the totals."""
    out = {}
    for n in steps:
        totals = {"dp": 0.0, "default": 0.0}
        setup = 0.0
        for _ in range(reps):
            pair = {v: lib.build_setup("digits_cnn", v, device=device) for v in totals}
            done = 0
            while done < n:
                k = min(block, n - done)
                for variant, s in pair.items():
                    totals[variant] += s.timed(k)
                done += k
            setup += pair["default"].monitor.budget.setup_seconds / reps
            del pair
        out[n] = {"ratio": totals["default"] / totals["dp"], "setup_s": setup}
    return out


def measure_prv(lib, device: str) -> dict:
    """DP vs DP + monitor with Opacus's PRV accountant (digits CNN): the budgeted default and
    the every-step oracle over 1,000 steps (both recompute epsilon only as a quarter of the
    budget affords, so a short window would read 1.0x or 1.3x by luck), the every-step oracle
    with ``exact_epsilon=True`` over a few steps (each pays a PRV epsilon), and one epsilon by
    the monitor's tracker against Opacus's own ``get_epsilon`` at the same fresh history."""
    from opacus_mi.accounting import EpsilonTracker

    setups = lib.build_prv_group(device)
    ratios, long = lib.prv_ratios(setups, reps=20)
    acc = setups["dp"].engine.accountant
    tracker = EpsilonTracker(acc, lib.DELTA)
    tracker.epsilon()  # its first call: RDP tables filled, checked against Opacus's
    (noise, rate, steps), *_ = acc.history
    fresh = [((noise, rate, steps + 1 + i),) for i in range(3)]  # no cached answer
    t0 = time.perf_counter()
    for h in fresh:
        tracker.epsilon(h)
    tracker_s = (time.perf_counter() - t0) / len(fresh)
    eps_s = lib.time_fn(lambda: acc.get_epsilon(lib.DELTA), device, reps=3)
    om, dm = setups["oracle"].monitor, setups["default"].monitor
    return {
        "batch": setups["dp"].batch,
        "dp_ms": sorted(long["dp"])[len(long["dp"]) // 2] * 1e3,
        "steps": acc.history[0][2],
        "ratio_oracle": ratios["oracle"],
        "ratio_exact": ratios["exact"],
        "ratio_default": ratios["default"],
        "oracle_exact_epsilons": om._epsilon_pacer.count,
        "oracle_records": om.record_count,
        "default_measured": len(dm.history),
        "default_steps": dm.steps,
        "get_epsilon_ms": eps_s * 1e3,
        "tracker_ms": tracker_s * 1e3,
    }


def profile_monitor(
    lib, variant: str, device: str, model: str = "digits_cnn", steps: int = 40, top: int = 8
):
    """cProfile of the monitor's own per-step path (``_measure_chunk`` + ``_finish_step``, which
    hold everything it does in a step): function-level tottime shares. On CUDA the device is
    synchronised inside the profiled region, so the total includes the monitor's kernels; run
    with ``CUDA_LAUNCH_BLOCKING=1`` to attribute kernel time to the functions that launch it."""
    s = lib.build_setup(model, variant, device=device)
    lib.warm(s, 10 if model != "resnet18_gn" or device != "cpu" else 3)
    if model == "resnet18_gn" and device == "cpu":
        steps = 6
    mon = s.monitor
    prof = cProfile.Profile()

    def wrap(fn):
        def profiled(*args, **kwargs):
            prof.enable()
            try:
                out = fn(*args, **kwargs)
                lib.sync(device)
                return out
            finally:
                prof.disable()

        return profiled

    mon._measure_chunk = wrap(mon._measure_chunk)
    mon._finish_step = wrap(mon._finish_step)
    s.run(steps)
    stats = pstats.Stats(prof)
    total = stats.total_tt
    rows = []
    for (file, line, name), (_cc, ncalls, tottime, _ct, _callers) in sorted(
        stats.stats.items(), key=lambda kv: -kv[1][2]
    )[:top]:
        where = name if file == "~" else f"{Path(file).name}:{line} {name}"
        rows.append((where, tottime / total, tottime / steps * 1e3, ncalls / steps))
    stages = []
    for (file, _line, name), (_cc, ncalls, _tt, cumtime, _callers) in stats.stats.items():
        key = (Path(file).name, name)
        if key in _STAGES:
            stages.append((_STAGES[key], cumtime / total, cumtime / steps * 1e3, ncalls / steps))
    stages.sort(key=lambda r: -r[1])
    return {
        "model": model,
        "variant": variant,
        "ms_per_step": total / steps * 1e3,
        "rows": rows,
        "stages": stages,
    }


# Monitor functions whose cumulative time is a meaningful stage of the per-step path.
_STAGES = {
    ("monitor.py", "_chunk_features"): "features (pool inputs + one-hot labels)",
    ("views.py", "clip_factors"): "clip factors (per-sample norms)",
    ("tokens.py", "sketch"): "count-sketch tokens",
    ("factored.py", "sketch"): "sketch tokens (Kronecker + count-sketch)",
    ("views.py", "clipped_gram"): "clipped Gram matrix (float64)",
    ("oracle.py", "gram_oracle"): "Gram oracle (Cholesky + draws)",
    ("online.py", "evaluate_on_device"): "critic evaluate (held-out bound + bootstrap CI)",
    ("online.py", "observe"): "critic observe (window + scheduled training)",
    ("online.py", "_round"): "critic training (Adam steps + validation figures)",
    ("accounting.py", "epsilon"): "epsilon (EpsilonTracker)",
    ("accounting.py", "bound"): "MI accountant bound",
    ("bounds.py", "bootstrap_counts"): "bootstrap resampling counts",
    ("monitor.py", "_finish_step"): "record (_finish_step total)",
    ("monitor.py", "_measure_chunk"): "measure chunk (_measure_chunk total)",
}


def _default_budget() -> float:
    """The library's default overhead budget, read from its signature so the tables cannot
    drift from it (imported late: ``load_lib`` puts the package on the path)."""
    from opacus_mi import LeakageMonitor

    return inspect.signature(LeakageMonitor).parameters["budget"].default


def mb(b: float) -> str:
    return f"{b / 2**20:.1f}"


def _tables(results) -> list[str]:
    budget = _default_budget()
    lines = [
        f"| model | batch | DP step ms | ratio default (budget {budget:g}) | "
        "ratio tokens + oracle every step | same, overlap off | ratio fixed schedule | "
        "ratio critic every step | tokens-only ms | critic-update ms | monitor mem / DP peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        q = r["ratios"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['dp_ms']:.2f} | **{q['default']:.2f}** | "
            f"{q['oracle']:.2f} | {q['oracle_sync']:.2f} | {q['fixed']:.2f} | "
            f"{q['critic_every_step']:.2f} | "
            f"{r['tokens_ms']:.2f} | {r['critic_ms']:.2f} | "
            f"{100 * r['mem']['monitor_fraction']:.0f}% |"
        )
    lines += [
        "",
        "The every-step rows as paired figures: a repetition times every variant back to back, "
        "so each repetition's ratio to the DP step is paired, and a slow spell of the machine "
        "that spans a repetition cancels out (the total above does not cancel it). Median "
        "[quartiles] over the repetitions:",
        "",
        "| model | tokens + oracle every step | same, overlap off |",
        "|---|---:|---:|",
    ]
    for r in results:
        cells = [
            "{:.2f} [{:.2f}-{:.2f}]".format(*r["spread"][v]) for v in ("oracle", "oracle_sync")
        ]
        lines.append(f"| {r['model']} | {cells[0]} | {cells[1]} |")
    names = list(results[0]["faults"]) if results else []
    lines += [
        "",
        "Page faults per timed step, by variant (pages the OS mapped in during the timed blocks: "
        "a variant that pays many more than the DP step is timing the allocator, see "
        "`allocator.py`):",
        "",
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | " + " | ".join(f"{r['faults'][n]:.1f}" for n in names) + " |"
        )
    lines += [
        "",
        "Default = the library's defaults (`every=None`, `train_every=None`, "
        f"`budget={budget:g}`): the monitor plans its own work to cost at most "
        f"{budget:.0%} of the training loop's time. What it "
        "then did (whole run, warm-up included):",
        "",
        "| model | steps measured | critic rounds per 100 steps (per critic) |",
        "|---|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['model']} | {100 * r['measured']:.0f}% | {r['rounds']:.1f} |")
    lines += [
        "",
        "Context: non-private step ms and the DP step's own cost (ratio DP / non-private); "
        "critic-update = one `OnlineEstimator.train()` (train_iters Adam steps) on a full "
        "window; the fixed schedule (`every=1, train_every=8`) runs one critic per learned "
        "view every `train_every` monitored steps.",
        "",
        "| model | params | non-private ms | DP / non-private | critics x 1/train_every | "
        "steps x reps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['nonprivate_ms']:.2f} | "
            f"{1 / r['ratios']['nonprivate']:.2f} | {r['critics']} x 1/{r['train_every']} | "
            f"{r['k']} x {r['reps']} |"
        )
    method = results[0]["mem"]["method"] if results else ""
    lines += [
        "",
        f"Memory ({method}; MiB). "
        + (
            "CPU: tensor bytes counted, not measured (tracemalloc does not see torch's "
            "allocator). DP peak = per-sample grads (B x P x 4) + params, grads, summed grads "
            "+ 2 x leaf-module activations. Monitor = state it keeps (sketch tables, critic "
            "weights and the selected copy, Adam moments, training and validation windows of "
            "pairs in bfloat16) + its largest transient inside a step (the sketch's largest "
            "intermediate or the B x B Gram, tokens, oracle buffers)."
            if method == "counted"
            else "CUDA: DP peak = max_memory_allocated over two DP steps above the memory "
            "allocated before them, plus the parameters; monitor transient = the same for the "
            "monitored setup minus the DP step's; monitor state counted as on CPU."
        ),
        "",
        "| model | DP peak | monitor state | of which window | of which sketch tables | "
        "monitor transient | monitor / DP peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["mem"]
        lines.append(
            f"| {r['model']} | {mb(m['dp_peak_bytes'])} | {mb(m['monitor_state_bytes'])} | "
            f"{mb(m['state_window'])} | {mb(m['state_tokenizer'])} | "
            f"{mb(m['monitor_transient_bytes'])} | {100 * m['monitor_fraction']:.1f}% |"
        )
    return lines


def header(title: str, machine: str, script: str, *extra: str) -> list[str]:
    """A results file's opening lines: title, date, machine, ``extra`` lines, the command."""
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return [
        f"# {title}",
        "",
        f"- date: {now}",
        f"- machine: {machine}",
        *extra,
        "- command: `" + " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]) + "`",
    ]


def render(
    results,
    prv,
    profiles,
    *,
    device: str,
    machine: str,
    load: tuple[str, str],
    cold=None,
    ghost=(),
) -> str:
    lines = [
        *header(
            f"opacus-mi monitor overhead ({device})",
            machine,
            "report.py",
            f"- load average (1/5/15 min) at start: {load[0]}; at end: {load[1]}",
        ),
        "- ratios: total time of each variant over interleaved repetitions / total time of the DP"
        " step over the same repetitions (a total, not a median: the budgeted default and the"
        " critics work in bursts); accountant RDP; monitor views clipped + private",
        "",
    ]
    if results:
        lines += _tables(results)
    if ghost:
        lines += [
            "",
            'Opacus ghost clipping (`grad_sample_mode="ghost"`: no per-sample gradients; the '
            "monitor works from each layer's inputs and backprops), the same interleaved timing, "
            "ratios (total) to the ghost DP step, paired median [quartiles] in parentheses:",
            "",
            "| model | ghost DP step ms | default | tokens + oracle every step | "
            "same, overlap off |",
            "|---|---:|---:|---:|---:|",
        ]
        for g in ghost:
            q, sp = g["ratios"], g["spread"]
            cells = [
                f"{q[v]:.2f}x ({sp[v][0]:.2f} [{sp[v][1]:.2f}-{sp[v][2]:.2f}])"
                for v in ("oracle", "oracle_sync")
            ]
            overlap = "" if g["overlap"] else " (overlap off: no free core)"
            lines.append(
                f"| {g['model']} | {g['dp_ms']:.2f} | **{q['default']:.2f}x** | {cells[0]}"
                f"{overlap} | {cells[1]} |"
            )
    if cold:
        parts = [
            f"{r['ratio']:.2f}x over {n:,} steps ({1e3 * r['setup_s']:.0f} ms one-off setup)"
            for n, r in cold.items()
        ]
        lines += [
            "",
            "Cold start (digits CNN, library defaults; a fresh monitored setup and a fresh DP "
            "one, both from step 0, timed in alternating 50-step blocks, 3 fresh pairs, "
            "totals): " + "; ".join(parts) + ". "
            "Setup is the first measured step's one-off work (first calls, the first epsilon); "
            "the critics' first round is charged like any other, once the validation window "
            "can select a critic and the critics' share holds 4 steps' worth of time.",
        ]
    if prv is not None:
        lines += [
            "",
            f"PRV accountant (digits CNN, batch {prv['batch']}): DP step {prv['dp_ms']:.2f} ms; "
            f"defaults {prv['ratio_default']:.2f}x over 1,000 steps, in which it measured "
            f"{prv['default_measured']} of {prv['default_steps']} steps (warm-up included); "
            f"tokens + oracle every step {prv['ratio_oracle']:.2f}x (epsilon recomputed at "
            f"{prv['oracle_exact_epsilons']} of {prv['oracle_records']} records), "
            f"{prv['ratio_exact']:.1f}x with `exact_epsilon=True`. One epsilon at "
            f"{prv['steps']} steps: Opacus's `PRVAccountant.get_epsilon` "
            f"{prv['get_epsilon_ms']:.0f} ms, the monitor's tracker (the same float) "
            f"{prv['tracker_ms']:.0f} ms. An "
            "expensive epsilon has a quarter of the budget (of the training loop's time under "
            "the budget, of the wall time on a fixed schedule); records between recomputations "
            "carry the latest exact epsilon and its step (`epsilon_step`).",
        ]
    for p in profiles:
        lines += [
            "",
            f"cProfile of the monitor's per-step path, {p['model']}, `{p['variant']}` "
            f"({p['ms_per_step']:.1f} ms per step under the profiler): function tottime",
            "",
            "| function | share | ms / step | calls / step |",
            "|---|---:|---:|---:|",
        ]
        for where, share, ms, calls in p["rows"]:
            lines.append(f"| `{where}` | {100 * share:.1f}% | {ms:.2f} | {calls:.0f} |")
        lines += [
            "",
            "Same profile, cumulative time of the monitor's stages (nested: shares overlap):",
            "",
            "| stage | share | ms / step | calls / step |",
            "|---|---:|---:|---:|",
        ]
        for where, share, ms, calls in p["stages"]:
            lines.append(f"| {where} | {100 * share:.1f}% | {ms:.2f} | {calls:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=os.environ.get("OPACUS_MI_BENCH_DEVICE", "cpu"))
    ap.add_argument("--models", nargs="*", default=["digits_cnn", "mlp", "resnet18_gn"])
    ap.add_argument("--out", help="markdown file ('-' = stdout only); default by device")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-prv", action="store_true", help="skip the PRV-accountant case")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile tables")
    ap.add_argument("--no-ghost", action="store_true", help="skip the ghost-clipping table")
    ap.add_argument("--profile-model", default="digits_cnn", help="model for the cProfile tables")
    args = ap.parse_args(argv)

    lib = load_lib(args.device)
    load_start = load_average()
    machine = machine_line(lib, args.device)
    results = []
    for model in args.models:
        print(f"measuring {model} on {args.device} ...", file=sys.stderr, flush=True)
        results.append(measure_model(lib, model, args.device, args.quick))
    ghost = []
    for model in [m for m in args.models if m in lib.GHOST_MODELS] if not args.no_ghost else []:
        print(f"measuring {model} with ghost clipping ...", file=sys.stderr, flush=True)
        ghost.append(measure_ghost(lib, model, args.device, args.quick))
    cold = None
    if "digits_cnn" in args.models:
        print("measuring the cold start ...", file=sys.stderr, flush=True)
        cold = measure_cold(lib, args.device)
    prv = None if args.no_prv else measure_prv(lib, args.device)
    profiles = (
        []
        if args.no_profile
        else [
            profile_monitor(lib, v, args.device, model=args.profile_model)
            for v in ("oracle", "fixed")
        ]
    )
    text = render(
        results,
        prv,
        profiles,
        device=args.device,
        machine=machine,
        load=(load_start, load_average()),
        cold=cold,
        ghost=ghost,
    )
    print(text)
    out = args.out
    if out is None:
        name = "overhead_results.md" if args.device == "cpu" else "overhead_results_cuda.md"
        out = str(HERE / name)
    if out != "-":
        Path(out).write_text(text)
        print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
