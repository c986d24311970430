"""Shared builders for the monitor-overhead benchmarks (used by ``test_overhead.py`` and
``report.py``).

Everything a comparison needs is built here so that every variant of one model sees exactly the
same work: same architecture and initial weights (global seed), same pre-generated batches
(synthetic tensors of the right shape, generated once: data loading is excluded), the same Opacus
``PrivacyEngine`` settings. The variants differ only in what is attached:

* ``nonprivate``  plain model + SGD,
* ``dp``          Opacus DP-SGD step (``grad_sample_mode="hooks"``, flat clipping),
* ``oracle``      DP + ``LeakageMonitor(estimator=None, every=1)``: tokens + Gram oracle on
                  every step (views clipped + private; the tokens and features a critic would
                  read are made too, which the library skips without a critic); overlap
                  automatic (on a CPU with the one intra-op thread below and a second core: on,
                  :mod:`opacus_mi.overlap`),
* ``oracle_sync`` the same with ``overlap=False``: all of it inside the training step,
* ``default``     DP + ``LeakageMonitor`` with its defaults: the overhead budget
                  (``every=None``, ``train_every=None``, ``budget=0.06``: :mod:`opacus_mi.budget`),
* ``fixed``       DP + monitor on the fixed schedule (``every=1``, ``train_every=8``): every step
                  measured, each critic trained every 8th step (the previous default),
* ``critic_every_step``  DP + monitor with the critic trained on every step (``train_every=1``).

The accountant is RDP: the monitor reports ``engine.get_epsilon(delta)`` exactly at every
monitored step, which for RDP is composed incrementally (microseconds), while Opacus's PRV
``get_epsilon`` costs ~0.2 s per call and would dominate any fast loop. The PRV case is measured
separately (``test_prv_ratio`` / ``report.py``).

Device: ``OPACUS_MI_BENCH_DEVICE`` (default ``cpu``). On CPU one intra-op thread is used so that
runs are comparable across machines and not disturbed by other processes competing for cores.
glibc's malloc thresholds are pinned on import (:mod:`allocator`; ``OPACUS_MI_BENCH_MALLOC=default``
leaves them adaptive).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from allocator import page_faults, pin_malloc
from bench_names import GHOST_MODELS, GHOST_VARIANTS, VARIANTS  # noqa: F401  (report.py)
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, Dataset

from opacus_mi import LeakageMonitor
from opacus_mi.models import MLP, DigitsCNN, resnet18_groupnorm

warnings.filterwarnings("ignore", module="opacus")
warnings.filterwarnings("ignore", message=".*Secure RNG.*")
warnings.filterwarnings("ignore", message=".*full backward hook.*")
warnings.filterwarnings("ignore", message=".*Full backward hook.*")

DEVICE = os.environ.get("OPACUS_MI_BENCH_DEVICE", "cpu")
if torch.device(DEVICE).type == "cpu":
    torch.set_num_threads(1)
# Every compared loop runs with the same fixed malloc thresholds, so that page faults set by the
# process's allocation history do not move the ratios (allocator.py).
MALLOC = pin_malloc()

MONITORED: tuple[str, ...] = ("oracle", "oracle_sync", "default", "fixed", "critic_every_step")
DELTA = 1e-5
NOISE = 1.0
CLIP = 1.0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]
    classes: int
    dataset_size: int  # only sets Opacus's sample rate q = batch / dataset_size
    build: Callable[[], nn.Module]
    cpu_batch: int
    cuda_batch: int

    def batch(self, device: str | torch.device) -> int:
        return self.cuda_batch if torch.device(device).type == "cuda" else self.cpu_batch


# Kept as a name for the benchmark table; the in-place fix now lives in models.py.
resnet18_gn_for_hooks = resnet18_groupnorm


SPECS: dict[str, ModelSpec] = {
    "digits_cnn": ModelSpec("digits_cnn", (1, 8, 8), 10, 1437, DigitsCNN, 64, 128),
    "mlp": ModelSpec("mlp", (1, 8, 8), 10, 1437, lambda: MLP(64, 10), 64, 128),
    "resnet18_gn": ModelSpec("resnet18_gn", (3, 32, 32), 10, 50_000, resnet18_gn_for_hooks, 8, 128),
}


class _SizedDataset(Dataset):
    """A dataset that only has a length: ``make_private`` reads the sample rate off the loader,
    the benchmark never iterates it (batches are pre-generated)."""

    def __init__(self, n: int, shape: tuple[int, ...]):
        self.n, self.shape = n, shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.zeros(self.shape), 0


def make_batches(
    spec: ModelSpec, batch: int, count: int, device: str | torch.device, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` fixed synthetic batches (inputs correlated with labels), already on device."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        y = torch.randint(0, spec.classes, (batch,), generator=g)
        x = torch.randn((batch, *spec.input_shape), generator=g)
        x = x + 0.5 * (y.float() / spec.classes).view(-1, *([1] * len(spec.input_shape)))
        out.append((x.to(device), y.to(device)))
    return out


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Setup:
    """One model + optimizer (+ engine, + monitor) that can take training steps."""

    model_name: str
    variant: str
    device: torch.device
    batch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable[..., torch.Tensor]
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    engine: PrivacyEngine | None = None
    monitor: LeakageMonitor | None = None
    accountant: str = "rdp"
    mode: str = "hooks"  # Opacus grad_sample_mode
    i: int = 0
    extra: dict = field(default_factory=dict)
    faults: int = 0  # page faults during timed(): the allocator's share of a timing
    timed_steps: int = 0

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.criterion(self.model(x), y).backward()
        self.optimizer.step()

    def run(self, k: int) -> None:
        for _ in range(k):
            self.step()
        if self.monitor is not None:
            self.monitor.flush()  # an overlap worker's last work belongs to these k steps
        sync(self.device)

    def timed(self, k: int) -> float:
        """Seconds for ``k`` steps (device synchronised before and after). Gradients are freed
        afterwards, outside the timed region, so idle setups do not hold B x P per-sample grads
        while others run."""
        sync(self.device)
        f0, t0 = page_faults(), time.perf_counter()
        self.run(k)
        elapsed = time.perf_counter() - t0
        self.faults += page_faults() - f0
        self.timed_steps += k
        self.optimizer.zero_grad(set_to_none=True)
        return elapsed

    def faults_per_step(self) -> float:
        """Page faults per step over every :meth:`timed` call so far."""
        return self.faults / self.timed_steps if self.timed_steps else math.nan

    def per_sample_grads(self) -> list[torch.Tensor]:
        """Per-sample gradients of one forward/backward (no optimizer step): tokenizer input."""
        x, y = self.batches[self.i % len(self.batches)]
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(x), y).backward()
        grads = [g.detach().clone() for g in self.optimizer.grad_samples]
        self.optimizer.zero_grad(set_to_none=True)
        if self.monitor is not None:
            self.monitor._capture.take()  # drop the capture of this stray forward
        return grads


def bench_config(model_name: str, device: str | torch.device = DEVICE) -> dict[str, int]:
    """Steps per timed block (``k``, a multiple of 8 so every block of the fixed schedule holds
    the same critic work), pytest-benchmark rounds, interleaved repetitions, warm-up steps.
    ResNet-18 on CPU takes ~0.5 s per DP step at batch 8: fewer, shorter blocks."""
    if model_name == "resnet18_gn" and torch.device(device).type == "cpu":
        return {"k": 2, "rounds": 2, "reps": 3, "warmup": 3}
    if model_name == "resnet18_gn":
        return {"k": 10, "rounds": 5, "reps": 7, "warmup": 10}
    # Long enough (12 x 40 = 480 steps per variant) that the budgeted default's bursts (one
    # critic round every ~50-100 steps) average out as they do in a real run.
    return {"k": 40, "rounds": 5, "reps": 12, "warmup": 10}


def monitor_kwargs(variant: str) -> dict | None:
    if variant == "oracle":
        return {"estimator": None, "every": 1}
    if variant == "oracle_sync":
        return {"estimator": None, "every": 1, "overlap": False}
    if variant == "default":
        return {}
    if variant == "fixed":
        return {"every": 1, "train_every": 8}
    if variant == "critic_every_step":
        return {"every": 1, "train_every": 1}
    return None


def build_setup(
    model_name: str,
    variant: str,
    *,
    device: str | torch.device = DEVICE,
    batch: int | None = None,
    accountant: str = "rdp",
    seed: int = 0,
    n_batches: int = 16,
    extra_monitor_kwargs: dict | None = None,
    grad_sample_mode: str = "hooks",
) -> Setup:
    """Build one variant of one model; every variant of a model starts from the same weights.
    ``grad_sample_mode="ghost"``: Opacus ghost clipping (its loss wrapper does both passes)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if grad_sample_mode not in ("hooks", "ghost"):
        raise ValueError(f"grad_sample_mode must be 'hooks' or 'ghost', got {grad_sample_mode!r}")
    spec = SPECS[model_name]
    device = torch.device(device)
    batch = batch or spec.batch(device)
    batches = make_batches(spec, batch, n_batches, device, seed=seed)
    torch.manual_seed(seed)
    model = spec.build().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if variant == "nonprivate":
        return Setup(
            model_name, variant, device, batch, model, optimizer, nn.CrossEntropyLoss(), batches
        )
    engine = PrivacyEngine(accountant=accountant)
    loader = DataLoader(_SizedDataset(spec.dataset_size, spec.input_shape), batch_size=batch)
    criterion: Callable[..., torch.Tensor] = nn.CrossEntropyLoss()
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        grad_sample_mode=grad_sample_mode,
        criterion=criterion,
    )
    if grad_sample_mode == "ghost":
        model, optimizer, criterion, _ = private
    else:
        model, optimizer, _ = private
    monitor = None
    kwargs = monitor_kwargs(variant)
    if kwargs is not None:
        kwargs = {**kwargs, **(extra_monitor_kwargs or {})}
        monitor = LeakageMonitor(engine, model, optimizer, delta=DELTA, **kwargs)
        if variant in ("oracle", "oracle_sync"):
            # The "tokens + Gram oracle every step": features and tokens are made (and
            # dropped) as for a critic. Without a critic the library makes none (the oracle
            # needs only the Gram); side_by_side.py times that, the public configuration.
            monitor._tokens = True
            monitor.views = ("clipped", "private")  # (estimator=None's default: private alone)
        criterion = monitor.wrap_criterion(criterion)
    return Setup(
        model_name,
        variant,
        device,
        batch,
        model,
        optimizer,
        criterion,
        batches,
        engine=engine,
        monitor=monitor,
        accountant=accountant,
        mode=grad_sample_mode,
    )


def fill_windows(setup: Setup) -> None:
    """Bring every online critic's window to its capacity (steady state) by repeating the pairs
    it has already seen. The per-step cost of the window (concatenation) and of training depends
    on its size; at small batches filling it by real steps would take hundreds of steps."""
    if setup.monitor is None:
        return
    setup.monitor.flush()  # no critic update in flight on an overlap worker while we write
    for est in setup.monitor.estimators.values():
        for pairs in (est.pairs, est.val):  # training and validation windows
            if len(pairs) == 0 or len(pairs) >= pairs.size:
                continue
            x, y = pairs.x.clone(), pairs.y.clone()
            while len(pairs) < pairs.size:
                pairs.add(x, y)


def warm(setup: Setup, steps: int) -> None:
    """Warm-up steps (allocator, kernels, critic built and trained), then steady-state windows.
    Under the overhead budget the critics' first round (booked as setup) comes at a measured step
    after the windows are full: warming up runs until it has happened (at most 300 steps)."""
    setup.run(steps)
    fill_windows(setup)
    setup.run(2)
    estimators = setup.monitor.estimators.values() if setup.monitor is not None else ()
    for _ in range(300):
        if all(e.updates > 0 for e in estimators):
            break
        setup.run(1)  # (flushes: the check above sees the worker's last round)
    sync(setup.device)


def build_warm(model_name: str, variants: Sequence[str], warmup: int, **kw) -> dict[str, Setup]:
    setups = {v: build_setup(model_name, v, **kw) for v in variants}
    for s in setups.values():
        warm(s, warmup)
    return setups


def build_prv_group(device: str | torch.device = DEVICE) -> dict[str, Setup]:
    """The digits CNN with Opacus's PRV accountant, warmed: the DP step, the every-step oracle
    (its epsilon paced), the budgeted default, and the every-step oracle with
    ``exact_epsilon=True`` (``"exact"``)."""
    group = {
        v: build_setup("digits_cnn", v, accountant="prv", device=device)
        for v in ("dp", "oracle", "default")
    }
    group["exact"] = build_setup(
        "digits_cnn",
        "oracle",
        accountant="prv",
        device=device,
        extra_monitor_kwargs={"exact_epsilon": True},
    )
    for s in group.values():
        warm(s, 2)
    return group


def prv_ratios(group: dict[str, Setup], reps: int) -> tuple[dict[str, float], dict]:
    """Ratios to the DP step of a :func:`build_prv_group`: ``exact`` over a few steps (each pays
    a PRV epsilon), the paced ``oracle`` and the ``default`` over ``reps`` x 50 steps (both
    recompute epsilon only as the budget affords, so a short window would read high or low by
    luck). Also returns the long run's per-step times."""
    short = interleaved_times({v: group[v] for v in ("dp", "exact")}, 3, 3)
    long = interleaved_times({v: group[v] for v in ("dp", "oracle", "default")}, 50, reps)
    ratios = total_ratios(long, baseline="dp")
    ratios["exact"] = total_ratios(short, baseline="dp")["exact"]
    return ratios, long


# --------------------------------------------------------------------------- timing


def interleaved_times(setups: dict[str, Setup], k: int, reps: int) -> dict[str, list[float]]:
    """Per-step seconds of every setup, timed A, B, C, A, B, C, ... (order rotated each rep so
    that no variant always runs right after the same one). Returns name -> list over reps."""
    names = list(setups)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        rot = names[r % len(names) :] + names[: r % len(names)]
        for n in rot:
            out[n].append(setups[n].timed(k) / k)
    return out


def total_ratios(times: dict[str, list[float]], baseline: str = "dp") -> dict[str, float]:
    """Total time of each variant over all repetitions / the baseline's total: the honest
    figure for work done in bursts (a critic round every n-th step, the budget's schedule),
    which a median over short blocks would skip."""
    base = sum(times[baseline])
    return {n: sum(ts) / base for n, ts in times.items()}


def paired_spread(
    times: dict[str, list[float]], variant: str, baseline: str = "dp"
) -> tuple[float, float, float]:
    """Median and quartiles of ``variant``'s per-repetition ratio to the baseline. A
    repetition times every variant back to back, so each ratio is paired: a slow spell of a
    shared machine that spans a repetition cancels out, where in the total it does not. For
    steady per-step work (the every-step variants); bursty work needs the total."""
    ratios = sorted(a / b for a, b in zip(times[variant], times[baseline], strict=True))
    if len(ratios) < 2:
        return (ratios[0],) * 3 if ratios else (math.nan,) * 3
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    return med, q1, q3


def time_fn(fn: Callable[[], object], device, reps: int, inner: int = 1) -> float:
    """Median seconds of one call of ``fn`` (``inner`` calls per timed repetition)."""
    samples = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


# --------------------------------------------------------------------------- memory


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def param_count(setup: Setup) -> int:
    return sum(p.numel() for p in setup.optimizer.params if p.requires_grad)


def monitor_state_bytes(monitor: LeakageMonitor) -> dict[str, int]:
    """Bytes of tensors the monitor keeps between steps, by component (every learned critic:
    views, controls; windows as allocated: training ring + validation ring, bfloat16 rows)."""
    out = {"tokenizer": monitor.tokenizer.state_bytes(), "critic": 0, "adam": 0, "window": 0}
    for est in [*monitor.estimators.values(), *monitor.controls.values()]:
        if est.critic is not None:
            out["critic"] += sum(_tensor_bytes(t) for t in est.critic.state_dict().values())
        if est.selected is not None:
            out["critic"] += sum(_tensor_bytes(t) for t in est.selected.state_dict().values())
        if est.optimizer is not None:
            for st in est.optimizer.state.values():
                out["adam"] += sum(_tensor_bytes(v) for v in st.values() if torch.is_tensor(v))
        for win in (est.pairs, est.val):
            out["window"] += _tensor_bytes(win._x.buf) + _tensor_bytes(win._y.buf)
    return out


def monitor_transient_bytes(setup: Setup) -> dict[str, int]:
    """Largest tensors the monitor allocates inside one monitored step, counted from the code
    path (``LeakageMonitor._measure_chunk``, sigma >= 0.01): the sketch's largest intermediate
    (a Kronecker weight's ``(B, rows, k2)`` or ``(B, k1, cols)`` GEMM output, or a count-sketched
    parameter's ``flat * weights``), the float32 raw Gram (``addmm_`` into one B x B buffer, no
    copy of any per-sample gradient) and its float64 clipped copy, tokens of the views, and the
    oracle's draws x B x B float64 buffers."""
    b = setup.batch
    mon = setup.monitor
    tok = mon.tokenizer
    inter = 0
    for i, p in enumerate(setup.optimizer.params):
        axes = tok._axes[i]
        if axes is None:
            inter = max(inter, p.numel())
        else:
            rows, cols = axes[0].buckets.numel(), axes[1].buckets.numel()
            inter = max(inter, min(rows * axes[1].k, axes[0].k * cols))
    d_tok = tok.total_dim
    return {
        "sketch_temp": b * inter * 4,
        "gram": b * b * (4 + 8),
        "tokens": b * d_tok * 4 * (2 + len(mon.views)),  # raw list, clipped, + one per view
        "oracle": 3 * mon.oracle_draws * b * b * 8,
    }


def activation_bytes(setup: Setup) -> int:
    """Bytes of every leaf module's output on one forward (an activation-memory estimate)."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if torch.is_tensor(out):
            total += _tensor_bytes(out)

    inner = getattr(setup.model, "_module", setup.model)
    handles = [m.register_forward_hook(hook) for m in inner.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            inner(setup.batches[0][0])
    finally:
        for h in handles:
            h.remove()
    return total


def dp_peak_estimate(setup: Setup) -> dict[str, int]:
    """The DP step's peak, counted: per-sample grads (B x P x 4), params + grad + summed_grad,
    and activations twice (autograd's saved tensors and Opacus's captured layer inputs)."""
    p = param_count(setup)
    return {
        "grad_samples": setup.batch * p * 4,
        "params_grads": 3 * p * 4,
        "activations": 2 * activation_bytes(setup),
    }


def memory_counted(dp: Setup, monitored: Setup) -> dict[str, float]:
    """CPU method: count tensor bytes (tracemalloc does not see torch's allocator)."""
    state = monitor_state_bytes(monitored.monitor)
    transient = monitor_transient_bytes(monitored)
    peak = dp_peak_estimate(dp)
    # The sketch's intermediates are freed before the Gram is formed: the larger of the two.
    trans_peak = max(transient["sketch_temp"], transient["gram"]) + transient["tokens"]
    dp_peak = sum(peak.values())
    return {
        "method": "counted",
        "dp_peak_bytes": dp_peak,
        "monitor_state_bytes": sum(state.values()),
        "monitor_transient_bytes": trans_peak + transient["oracle"],
        "monitor_fraction": (sum(state.values()) + trans_peak + transient["oracle"]) / dp_peak,
        **{f"state_{k}": v for k, v in state.items()},
    }


def memory_cuda(dp: Setup, monitored: Setup) -> dict[str, float]:
    """CUDA method: ``torch.cuda.max_memory_allocated`` during one step, relative to the memory
    allocated just before it, for the DP setup and the monitored one; the monitor's share is the
    difference of the two step peaks plus the state it keeps between steps (counted)."""

    def step_peak(s: Setup) -> int:
        s.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        s.run(2)  # two steps: the default schedule trains the critic on one of them
        return torch.cuda.max_memory_allocated() - base

    dp_step = step_peak(dp)
    mon_step = step_peak(monitored)
    params = sum(_tensor_bytes(p) for p in dp.optimizer.params)
    state = monitor_state_bytes(monitored.monitor)
    dp_peak = dp_step + params
    extra = max(0, mon_step - dp_step)
    return {
        "method": "cuda max_memory_allocated",
        "dp_peak_bytes": dp_peak,
        "monitor_state_bytes": sum(state.values()),
        "monitor_transient_bytes": extra,
        "monitor_fraction": (sum(state.values()) + extra) / dp_peak,
        **{f"state_{k}": v for k, v in state.items()},
    }


def memory_report(dp: Setup, monitored: Setup) -> dict[str, float]:
    if dp.device.type == "cuda":
        return memory_cuda(dp, monitored)
    return memory_counted(dp, monitored)


# --------------------------------------------------------------------------- micro-benchmarks


def tokens_seconds(setup: Setup, reps: int = 20) -> float:
    """``CountSketchTokenizer.sketch`` alone on one batch of per-sample gradients."""
    grads = setup.per_sample_grads()
    tok = setup.monitor.tokenizer
    tok.sketch(grads)
    return time_fn(lambda: tok.sketch(grads), setup.device, reps)


def critic_update_seconds(setup: Setup, reps: int = 10) -> float:
    """One ``OnlineEstimator.train()`` (``train_iters`` Adam steps) on a full window."""
    est = next(iter(setup.monitor.estimators.values()))
    fill_windows(setup)
    est.train()
    return time_fn(est.train, setup.device, reps)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def bench_lib():
    """This module's builders, for test files (conftest modules are not meant to be imported)."""
    return SimpleNamespace(**{k: v for k, v in vars(sys.modules[__name__]).items()})


@pytest.fixture(scope="session")
def bench_device() -> str:
    return DEVICE
