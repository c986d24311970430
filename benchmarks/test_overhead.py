"""Overhead of ``LeakageMonitor`` on an Opacus DP-SGD step, measured side by side.

Run: ``.venv/bin/python -m pytest benchmarks/test_overhead.py`` (CPU, ~5-10 min on 2 cores), or
with ``OPACUS_MI_BENCH_DEVICE=cuda`` on a GPU (``benchmarks/gpu.sh``).

For every model (digits CNN, MLP, ResNet-18 with GroupNorm at CIFAR shape):

* ``test_step[model-variant]``: pytest-benchmark timings of K optimizer steps of each variant
  (non-private, DP, DP + tokens and Gram oracle every step, DP + monitor defaults (the overhead
  budget), DP + the fixed schedule (every step measured, critics every 8th), DP + monitor with
  the critic trained every step). ``extra_info`` carries ms per step and the ratio to the DP step
  measured by the earlier ``dp`` test (a cross-test ratio: indicative only).
* ``test_tokens[model]``: ``CountSketchTokenizer.sketch`` alone on one batch of per-sample grads.
* ``test_critic_update[model]``: one ``OnlineEstimator.train()`` on a full window.
* ``test_critic_activation``: the critics' ELU against ``torch.nn.ELU``, interleaved (ratio).
* ``test_ratio_<model>``: THE reported numbers. All variants timed interleaved in the same run
  (A, B, C, ..., A, B, C, ..., rotating the order), total time of each variant over all
  repetitions / the DP step's total (bursty schedules make a median misleading). Peak-memory
  figures go into the same ``extra_info``.
* ``test_prv_ratio``: the same ratios with Opacus's PRV accountant (its epsilon paced, and with
  ``exact_epsilon=True``); ``test_epsilon_call[accountant-steps]``: one PRV or GDP epsilon,
  the monitor's tracker against Opacus's ``get_epsilon`` (same float).
* ``test_ghost_ratio[model]``: Opacus ghost clipping (no per-sample gradients), the ghost DP
  step against the defaults and the every-step oracle with and without overlap.

Machines are noisy, so nothing here asserts an absolute time. The issue's targets (default
monitor <= 1.15 x DP for the digits CNN on CPU at batch 64, <= 1.05 for ResNet-18 on GPU, monitor
memory <= 5% of the DP step's peak) are asserted only with ``OPACUS_MI_BENCH_ENFORCE=1``; otherwise
they are reported in ``extra_info`` (``meets_target``) and printed (``-s``).
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
from bench_names import GHOST_MODELS, GHOST_VARIANTS, MODELS, VARIANTS

DEVICE = os.environ.get("OPACUS_MI_BENCH_DEVICE", "cpu")
ON_CUDA = torch.device(DEVICE).type == "cuda"
ENFORCE = os.environ.get("OPACUS_MI_BENCH_ENFORCE") == "1"


# Issue targets for the default monitor (ratio to the DP step), by (model, device type).
TARGETS = {("digits_cnn", "cpu"): 1.15, ("resnet18_gn", "cuda"): 1.05}
MEMORY_TARGET = 0.05

_SETUPS: dict[str, dict] = {}
_STEP_MS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="session")
def setups(bench_lib):
    """``setups(model)``: every variant of ``model``, built and warmed once per session."""

    def get(model: str) -> dict:
        if model not in _SETUPS:
            _SETUPS[model] = bench_lib.build_warm(
                model, VARIANTS, bench_lib.bench_config(model)["warmup"]
            )
        return _SETUPS[model]

    yield get
    _SETUPS.clear()


def _fresh(setup, bench_lib):
    """pedantic ``setup=``: start each round with no gradients and an idle device."""

    def prepare() -> None:
        setup.optimizer.zero_grad(set_to_none=True)
        bench_lib.sync(setup.device)

    return prepare


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_step(benchmark, setups, bench_lib, model, variant):
    s = setups(model)[variant]
    cfg = bench_lib.bench_config(model)
    benchmark.group = f"step-{model}"
    benchmark.pedantic(
        s.run,
        args=(cfg["k"],),
        setup=_fresh(s, bench_lib),
        rounds=cfg["rounds"],
        iterations=1,
        warmup_rounds=1,
    )
    ms = benchmark.stats.stats.median / cfg["k"] * 1e3
    _STEP_MS[(model, variant)] = ms
    benchmark.extra_info.update(
        {"device": DEVICE, "batch": s.batch, "steps_per_round": cfg["k"], "ms_per_step": ms}
    )
    if variant != "dp" and (model, "dp") in _STEP_MS:
        benchmark.extra_info["ratio_vs_dp_cross_test"] = ms / _STEP_MS[(model, "dp")]


@pytest.mark.parametrize("model", MODELS)
def test_tokens(benchmark, setups, bench_lib, model):
    s = setups(model)["oracle"]
    grads = s.per_sample_grads()
    tok = s.monitor.tokenizer
    benchmark.group = "tokens"

    def sketch():
        tok.sketch(grads)
        bench_lib.sync(s.device)

    benchmark.pedantic(
        sketch, rounds=10 if model != "resnet18_gn" or ON_CUDA else 3, iterations=1, warmup_rounds=1
    )
    benchmark.extra_info.update(
        {
            "batch": s.batch,
            "params": bench_lib.param_count(s),
            "token_dim_total": tok.total_dim,
            "ms": benchmark.stats.stats.median * 1e3,
        }
    )


@pytest.mark.parametrize("model", MODELS)
def test_critic_update(benchmark, setups, bench_lib, model):
    s = setups(model)["default"]
    bench_lib.fill_windows(s)
    est = next(iter(s.monitor.estimators.values()))
    benchmark.group = "critic-update"

    def update():
        est.train()
        bench_lib.sync(s.device)

    benchmark.pedantic(update, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        {
            "window_pairs": len(est.pairs),
            "x_dim": int(est.pairs.x.shape[1]),
            "y_dim": int(est.pairs.y.shape[1]),
            "train_iters": est.train_iters,
            "critics_in_default_monitor": len(s.monitor.estimators),
            "train_every": est.train_every,
            "ms": benchmark.stats.stats.median * 1e3,
        }
    )


def _interleaved(benchmark, group: dict, cfg: dict) -> dict[str, list[float]]:
    """Per-step seconds of every setup in ``group``; each pedantic round is one A, B, C, ...
    cycle, the order rotated from round to round."""
    names = list(group)
    times: dict[str, list[float]] = {v: [] for v in names}
    cycle = {"r": 0}

    def one_cycle():
        r = cycle["r"]
        cycle["r"] += 1
        for v in names[r % len(names) :] + names[: r % len(names)]:
            times[v].append(group[v].timed(cfg["k"]) / cfg["k"])

    benchmark.pedantic(one_cycle, rounds=cfg["reps"], iterations=1, warmup_rounds=0)
    return times


def _ratio(benchmark, setups, bench_lib, model: str) -> dict:
    """Interleaved timing of all variants; each pedantic round is one A, B, C, ... cycle."""
    group = setups(model)
    cfg = bench_lib.bench_config(model)
    benchmark.group = "ratio"
    times = _interleaved(benchmark, group, cfg)
    ratios = bench_lib.total_ratios(times, baseline="dp")
    mem = bench_lib.memory_report(group["dp"], group["fixed"])
    info = {
        "device": DEVICE,
        "batch": group["dp"].batch,
        "dp_step_ms": 1e3 * sorted(times["dp"])[len(times["dp"]) // 2],
        **{f"ratio_{v}": ratios[v] for v in VARIANTS if v != "dp"},
        # Median [quartiles] of the per-cycle ratios (paired; see conftest.paired_spread).
        **{f"paired_{v}": bench_lib.paired_spread(times, v) for v in ("oracle", "oracle_sync")},
        "memory_method": mem["method"],
        "monitor_memory_fraction": mem["monitor_fraction"],
        "monitor_state_bytes": mem["monitor_state_bytes"],
        "monitor_transient_bytes": mem["monitor_transient_bytes"],
        "dp_peak_bytes": mem["dp_peak_bytes"],
    }
    target = TARGETS.get((model, torch.device(DEVICE).type))
    if target is not None:
        info["target_default_ratio"] = target
        info["meets_target"] = bool(ratios["default"] <= target)
        info["oracle_meets_target"] = bool(ratios["oracle"] <= target)
    info["memory_meets_target"] = bool(mem["monitor_fraction"] <= MEMORY_TARGET)
    benchmark.extra_info.update(info)
    print(f"\n[{model} on {DEVICE}] " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if ENFORCE:
        if target is not None:
            assert ratios["oracle"] <= target, f"oracle-only ratio {ratios['oracle']:.3f}"
            assert ratios["default"] <= target, f"default ratio {ratios['default']:.3f}"
        assert mem["monitor_fraction"] <= MEMORY_TARGET, f"memory {mem['monitor_fraction']:.3f}"
    return info


def test_ratio_digits_cnn(benchmark, setups, bench_lib):
    _ratio(benchmark, setups, bench_lib, "digits_cnn")


def test_ratio_mlp(benchmark, setups, bench_lib):
    _ratio(benchmark, setups, bench_lib, "mlp")


def test_ratio_resnet18_gn(benchmark, setups, bench_lib):
    _ratio(benchmark, setups, bench_lib, "resnet18_gn")


def test_prv_ratio(benchmark, bench_lib):
    """DP + monitor with Opacus's PRV accountant (its default), digits CNN. PRV's
    ``get_epsilon`` costs tens of ms and grows with the steps, so the budgeted default and the
    every-step oracle recompute it only as a quarter of the budget affords (the overhead
    budget's share; on the fixed schedule the epsilon pacer): both are timed over hundreds of
    steps. ``exact_epsilon=True`` pays it at every step (a few steps suffice). pytest-benchmark
    times the whole comparison once."""
    group = bench_lib.build_prv_group()
    out: dict = {}

    def compare():
        out.update(bench_lib.prv_ratios(group, reps=12)[0])

    benchmark.group = "ratio"
    benchmark.pedantic(compare, rounds=1, iterations=1, warmup_rounds=0)
    pacer = group["oracle"].monitor._epsilon_pacer
    benchmark.extra_info.update(
        {
            "accountant": "prv",
            "batch": group["dp"].batch,
            "ratio_oracle": out["oracle"],
            "ratio_oracle_exact_epsilon": out["exact"],
            "ratio_default": out["default"],
            "oracle_exact_epsilons": pacer.count,
            "oracle_records": group["oracle"].monitor.record_count,
        }
    )
    print(
        f"\n[digits_cnn PRV on {DEVICE}] ratio every-step oracle = {out['oracle']:.2f} "
        f"(epsilon recomputed at {pacer.count} of {group['oracle'].monitor.record_count} "
        f"records), with exact_epsilon = {out['exact']:.2f}, default = {out['default']:.2f}"
    )


@pytest.mark.parametrize(
    "accountant,steps", [("prv", 100), ("prv", 1000), ("gdp", 1000)], ids=lambda v: str(v)
)
def test_epsilon_call(benchmark, accountant, steps):
    """One record's epsilon with an accountant that is not RDP: ``EpsilonTracker`` (PRV:
    Opacus's discretisation and composition, its safe domain's RDP epsilons from cached tables;
    GDP: Opacus's solver on ``ndtr``) against Opacus's own ``get_epsilon``, alternately on the
    same fresh histories (digits: sigma 1, q = 64 / 1437); the same float."""
    import warnings

    from opacus.accountants import GaussianAccountant, PRVAccountant

    from opacus_mi.accounting import EpsilonTracker

    kind = {"prv": PRVAccountant, "gdp": GaussianAccountant}[accountant]
    rate = 64 / 1437
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GDP: "experimental"
        acc = kind()
    acc.history = [(1.0, rate, steps)]
    tracker = EpsilonTracker(acc, 1e-5)
    tracker.epsilon()  # the first call: tables filled, checked against Opacus's
    times = {"tracker": [], "opacus": []}
    n = {"i": 0}

    def one():
        n["i"] += 1
        history = ((1.0, rate, steps + n["i"]),)  # a new step count: no cached answer
        ref = copy.copy(acc)
        ref.history = list(history)
        t0 = time.perf_counter()
        got = tracker.epsilon(history)
        t1 = time.perf_counter()
        want = ref.get_epsilon(1e-5)
        t2 = time.perf_counter()
        assert got == want
        times["tracker"].append(t1 - t0)
        times["opacus"].append(t2 - t1)

    benchmark.group = "epsilon"
    benchmark.pedantic(one, rounds=5, iterations=1, warmup_rounds=0)
    ms = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
    benchmark.extra_info.update(
        {
            "accountant": accountant,
            "steps": steps,
            **{f"{k}_ms": v for k, v in ms.items()},
            "ratio": ms["tracker"] / ms["opacus"],
        }
    )
    print(
        f"\n[{accountant.upper()} epsilon at {steps} steps] tracker {ms['tracker']:.2f} ms, "
        f"Opacus {ms['opacus']:.2f} ms ({ms['tracker'] / ms['opacus']:.2f}x)"
    )


def test_critic_activation(benchmark, bench_lib):
    """The critics' ELU (``exp`` of a clamped input, ``opacus_mi.estimators.critics.ELU``)
    against ``torch.nn.ELU``: forward + backward on a critic minibatch's hidden layer (256 pairs
    x 128 units), the two interleaved in one run. The ratio is why the critics have their own
    ELU: torch 2.14's CPU ``elu`` (its AVX-512 ``expm1``) ran ~10x slower on an AMD EPYC."""
    from opacus_mi.estimators.critics import ELU

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = (3 * torch.randn((256, 128), generator=g, device=DEVICE)).requires_grad_(True)
    fns = {"ours": ELU(), "torch": torch.nn.ELU()}

    def run(fn) -> None:
        for _ in range(20):
            fn(x).sum().backward()
        bench_lib.sync(DEVICE)

    totals = dict.fromkeys(fns, 0.0)
    for rep in range(12):  # alternate the order so drift hits both alike
        for name in fns if rep % 2 == 0 else reversed(list(fns)):
            t0 = time.perf_counter()
            run(fns[name])
            totals[name] += time.perf_counter() - t0
    benchmark.group = "critic-activation"
    benchmark.pedantic(lambda: run(fns["ours"]), rounds=5, iterations=1, warmup_rounds=1)
    info = {
        "device": DEVICE,
        "shape": [256, 128],
        "ms_ours": totals["ours"] / 12 / 20 * 1e3,
        "ms_torch": totals["torch"] / 12 / 20 * 1e3,
        "torch_over_ours": totals["torch"] / totals["ours"],
    }
    benchmark.extra_info.update(info)
    print(f"\n[critic ELU on {DEVICE}] " + ", ".join(f"{k}={v}" for k, v in info.items()))


@pytest.mark.parametrize("model", GHOST_MODELS)
def test_ghost_ratio(benchmark, bench_lib, model):
    """Opacus ghost clipping: the ghost DP step against the defaults and the every-step oracle
    (overlap on and off), interleaved like ``test_ratio_*``."""
    cfg = bench_lib.bench_config(model)
    group = bench_lib.build_warm(
        model, GHOST_VARIANTS, cfg["warmup"], device=DEVICE, grad_sample_mode="ghost"
    )
    benchmark.group = "ratio-ghost"
    times = _interleaved(benchmark, group, cfg)
    ratios = bench_lib.total_ratios(times, baseline="dp")
    info = {
        "device": DEVICE,
        "dp_step_ms": 1e3 * sorted(times["dp"])[len(times["dp"]) // 2],
        "overlap": group["oracle"].monitor.overlap,
        **{f"ratio_{v}": ratios[v] for v in GHOST_VARIANTS if v != "dp"},
        **{f"paired_{v}": bench_lib.paired_spread(times, v) for v in ("oracle", "oracle_sync")},
    }
    benchmark.extra_info.update(info)
    print(f"\n[{model}, ghost, on {DEVICE}] " + ", ".join(f"{k}={v}" for k, v in info.items()))
