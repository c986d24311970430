"""The monitor under Opacus DPDDP: 2 CPU processes (gloo) against one process on the same data.

Reference: a single process whose logical batch is the global batch (rank 0's examples, then
rank 1's) run through BatchMemoryManager with one physical chunk per rank, so the oracle's
candidate sets (chunks) match the ranks'. Fixed, non-Poisson batches make it exact; seeds for
the model, Opacus's noise and the monitor are shared. Everything runs in one spawn of 2 workers.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TinyCNN, fail_estimate_at, make_data, spy_noise_stds, train
from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import opacus_mi.monitor as monitor_module
from opacus_mi import LeakageMonitor, read_jsonl
from opacus_mi import distributed as mi_dist

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed gloo missing",
    ),
    # One pytest-xdist worker runs every process group (the module's fixtures spawn them once,
    # and two groups' four processes on two cores are not left to share them).
    pytest.mark.xdist_group("process_groups"),
]

WORLD, LOCAL_BATCH, N = 2, 8, 96  # 6 logical steps of 16 examples
MONITOR = {
    "delta": 1e-5,
    "every": 1,
    "views": ("raw", "clipped", "private"),
    "estimator": "infonce",
    "train_every": 1,
    "train_iters": 2,
    "semi_oracle": True,
    "seed": 3,
}


def _collate(batch):
    """default_collate that also accepts an empty batch (a rank with nothing this step)."""
    if not batch:
        return torch.empty(0, 1, 6, 6), torch.empty(0, dtype=torch.long)
    return torch.stack([x for x, _ in batch]), torch.stack([y for _, y in batch])


def _make_private(model, loader, accountant: str = "rdp"):
    engine = PrivacyEngine(accountant=accountant)
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(1),  # Opacus's noise (rank 0 under DDP)
    )
    return engine, model, opt, loader


def _record_inputs(monitor):
    """Wrap each learned estimator's ``observe`` to keep the pairs it learns from."""
    seen = []
    for view, est in monitor.estimators.items():

        def observe(x, y, _orig=est.observe, _view=view, **kwargs):
            seen.append((_view, x.clone(), y.clone()))
            return _orig(x, y, **kwargs)

        est.observe = observe
    return seen


def _train(model, opt, loader, criterion):
    for x, y in loader:
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()


def _ddp_run(rank: int, monitored: bool, tmp: str) -> dict:
    torch.manual_seed(0)
    loader = _local_loader(rank)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), loader)
    criterion = nn.CrossEntropyLoss()
    out: dict = {}
    if monitored:
        sunk: list = []
        jsonl = os.path.join(tmp, f"rank{rank}.jsonl")
        monitor = LeakageMonitor(engine, model, opt, jsonl=jsonl, sinks=[sunk.append], **MONITOR)
        criterion = monitor.wrap_criterion(criterion)
        out["seen"] = _record_inputs(monitor)
    _train(model, opt, loader, criterion)
    out["params"] = [p.detach().clone() for p in model.parameters()]
    out["rng"] = torch.get_rng_state()
    out["epsilon"] = engine.get_epsilon(1e-5)
    if monitored:
        monitor.detach()
        out.update(
            distributed=monitor.distributed,
            history=[r.as_dict() for r in monitor.history],
            sunk=len(sunk),
            jsonl_exists=os.path.exists(jsonl),
        )
    return out


def _robustness_run(rank: int, tmp: str) -> dict:
    """every=2; rank 1 fails to pack at step 0 and has an empty batch at step 2."""
    torch.manual_seed(0)
    data = make_data(N)
    mine = list(range(rank, N, WORLD))
    batches = [mine[i : i + LOCAL_BATCH] for i in range(0, len(mine), LOCAL_BATCH)]
    if rank == 1:
        batches[2] = []
    loader = DataLoader(data, batch_sampler=batches, collate_fn=_collate)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), loader)
    jsonl = os.path.join(tmp, "shared.jsonl")  # the same path on both ranks
    monitor = LeakageMonitor(engine, model, opt, jsonl=jsonl, **{**MONITOR, "every": 2})
    original_pack, calls = monitor_module.pack, []

    def failing_pack(chunk):
        calls.append(1)
        if rank == 1 and len(calls) == 1:
            raise RuntimeError("injected on rank 1")
        return original_pack(chunk)

    monitor_module.pack = failing_pack
    try:
        _train(model, opt, loader, monitor.wrap_criterion(nn.CrossEntropyLoss()))
    finally:
        monitor_module.pack = original_pack
    monitor.detach()
    return {
        "history": [r.as_dict() for r in monitor.history],
        "params": [p.detach().clone() for p in model.parameters()],
        "steps": monitor.steps,
    }


def _budget_run(rank: int, frugal: int = 0) -> dict:
    """The wall-time budget schedule, with very different budgets per rank: the ``frugal`` rank
    alone would measure rarely, the other every step. Both must follow the frugal rank's plan
    (else a gather has no partner and the 60 s collective timeout fails the run, or one rank
    spends far beyond its budget)."""
    torch.manual_seed(0)
    loader = _local_loader(rank)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), loader)
    budget = 1e-3 if rank == frugal else 1e3
    kwargs = {**MONITOR, "every": None, "train_every": None, "budget": budget}
    monitor = LeakageMonitor(engine, model, opt, **kwargs)
    if rank == 1 and frugal == 0:  # its second record fails after the gather (an OOM on one
        fail_estimate_at(monitor, 2)  # GPU, say): it measured the next step alone, and hung
    for _ in range(3):
        _train(model, opt, loader, monitor.wrap_criterion(nn.CrossEntropyLoss()))
    monitor.detach()
    return {"history": [r.as_dict() for r in monitor.history], "steps": monitor.steps}


def _prv_run(rank: int) -> dict:
    """A fixed schedule with Opacus's PRV accountant, its epsilon paced, with very different
    budgets per rank (rank 0's would recompute it once in a while, rank 1's at every record):
    every rank's records must carry the frugal rank's (rank 0's) choice."""
    torch.manual_seed(0)
    loader = _local_loader(rank)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), loader, accountant="prv")
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, every=1, estimator=None, budget=1e-3 if rank == 0 else 1e3
    )
    for _ in range(3):
        _train(model, opt, loader, monitor.wrap_criterion(nn.CrossEntropyLoss()))
    monitor.detach()
    return {"history": [r.as_dict() for r in monitor.history], "steps": monitor.steps}


def _straggler_run(rank: int) -> dict:
    """Rank 1 reaches each step 200 ms after rank 0, which waits for it at the monitor's first
    gather: training's time (it would wait at Opacus's all-reduce), not the monitor's."""
    torch.manual_seed(0)
    loader = _local_loader(rank)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), loader)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, estimator=None)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    for x, y in loader:
        opt.zero_grad()
        criterion(model(x), y).backward()
        if rank == 1:
            time.sleep(STRAGGLE)
        opt.step()
    monitor.detach()
    return {"seconds": [r.monitor_seconds for r in monitor.history]}


STRAGGLE = 0.2  # (x6 steps; long beside a loaded machine's measuring, ~1.6 ms alone)


def _scheduler_run(rank: int) -> dict:
    """A noise scheduler stepped after every physical chunk (4 per logical step on each rank):
    sigma changes from chunk to chunk, but rank 0 adds one noise per logical step, at its last
    chunk's pre_step. The stds every rank drew each step's chunks with, and (rank 0) the std
    of the noise Opacus added."""
    from opacus.schedulers import ExponentialNoise

    torch.manual_seed(0)
    loader = _local_loader(rank)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), loader)
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, estimator=None)
    drawn, added = spy_noise_stds(monitor, opt)
    scheduler = ExponentialNoise(opt, gamma=0.8)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as mm:
        train(model, opt, mm, after_step=scheduler.step)
    monitor.detach()
    del opt.add_noise
    return {"drawn": drawn, "added": added if rank == 0 else None}


def _local_run(rank: int, tmp: str) -> dict:
    """distributed=False under DPDDP: each rank measures its own local batch."""
    torch.manual_seed(0)
    loader = _local_loader(rank)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), loader)
    jsonl = os.path.join(tmp, "local.jsonl")  # the same path on both ranks, as a user writes it
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, every=1, estimator=None, distributed=False, jsonl=jsonl
    )
    _train(model, opt, loader, monitor.wrap_criterion(nn.CrossEntropyLoss()))
    monitor.detach()
    return {"rank": monitor.rank, "history": [r.as_dict() for r in monitor.history]}


def _padding_warning(rank: int) -> list[str]:
    """Fixed batches over a DistributedSampler that pads N = 97 to 98 over two ranks."""
    data = make_data(N + 1)
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=LOCAL_BATCH, sampler=sampler)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), loader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LeakageMonitor(engine, model, opt, delta=1e-5, estimator=None).detach()
    return [str(w.message) for w in caught if "opacus-mi" in str(w.message)]


def _primitives(rank: int) -> dict:
    """The gathering primitives with unequal and empty contributions."""
    rows = torch.arange(3 * 4, dtype=torch.float64).reshape(3, 4) + 100 * rank
    local = rows if rank == 0 else rows[:0]
    items = [({"r": rank}, {"a": torch.full((rank + 1, 2), float(rank)), "b": None})]
    if rank == 0:
        items.append(({"r": 0, "k": 1}, {"g": torch.eye(2, dtype=torch.float64)}))
    return {
        "rows": mi_dist.all_gather_rows(local),
        "items": mi_dist.all_gather_items(items),
        "objects": mi_dist.all_gather_objects(("rank", rank)),
    }


def _join(rank: int, port: int, seconds: int) -> None:
    """One thread, and the gloo group on ``port``: a desynchronised collective fails after
    ``seconds``, not hangs."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=seconds),
    )


def _worker(rank: int, port: int, tmp: str) -> None:
    _join(rank, port, 60)
    try:
        out = {"primitives": _primitives(rank)}
        out["with"] = _ddp_run(rank, True, tmp)
        out["without"] = _ddp_run(rank, False, tmp)
        out["robust"] = _robustness_run(rank, tmp)
        out["budget"] = _budget_run(rank)
        out["budget_frugal_1"] = _budget_run(rank, frugal=1)
        out["prv"] = _prv_run(rank)
        out["straggler"] = _straggler_run(rank)
        out["scheduler"] = _scheduler_run(rank)
        out["local"] = _local_run(rank, tmp)
        out["padding"] = _padding_warning(rank)
        torch.save(out, os.path.join(tmp, f"out{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _local_loader(rank: int) -> DataLoader:
    data = make_data(N)
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=False)
    return DataLoader(data, batch_size=LOCAL_BATCH, sampler=sampler)


def _features_run(rank: int, tmp: str) -> dict:
    """features=["fc"], named as in the user's own model (DPDDP wraps it as ``module``)."""
    torch.manual_seed(0)
    net = TinyCNN()
    engine, model, opt, loader = _make_private(DPDDP(net), _local_loader(rank))
    fc_outputs: list[torch.Tensor] = []  # the reference: what the user's layer computed
    net.fc.register_forward_hook(lambda m, args, out: fc_outputs.append(out.detach().clone()))
    settings = {"delta": 1e-5, "views": ("clipped",), "estimator": "infonce", "train_every": 1}
    try:
        LeakageMonitor(engine, model, opt, features=["module.fc"], **settings).detach()
        wrapper_name = "accepted"
    except ValueError as exc:
        wrapper_name = str(exc)
    monitor = LeakageMonitor(engine, model, opt, features=["fc"], every=1, **settings)
    seen = _record_inputs(monitor)
    _train(model, opt, loader, nn.CrossEntropyLoss())  # no labels: the features are fc's alone
    monitor.detach()
    return {
        "seen": [x for _, x, _ in seen],
        "fc": fc_outputs,
        "saved": monitor.state_dict()["settings"]["features"],
        "wrapper_name": wrapper_name,
    }


def _widths_run(rank: int, features, distributed: bool | None = None) -> dict:
    """A run whose features are ``features(x)`` on this rank: warnings said, records' flags."""
    torch.manual_seed(0)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), _local_loader(rank))
    monitor = LeakageMonitor(
        engine,
        model,
        opt,
        delta=1e-5,
        every=1,
        train_every=1,
        views=("clipped",),
        features=features,
        distributed=distributed,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, loader, monitor.wrap_criterion(nn.CrossEntropyLoss()))
        monitor.detach()
    return {
        "warnings": [str(w.message) for w in caught if "opacus-mi" in str(w.message)],
        "flags": [r.flags for r in monitor.history],
    }


def _width_run(rank: int, tmp: str) -> dict:
    """Features of another width on each rank (as a rank-dependent pipeline would give)."""
    return _widths_run(rank, lambda x: x.flatten(1)[:, : 10 + rank])


def _padded_run(rank: int, tmp: str) -> dict:
    """Each rank's features change width from step to step (sequences padded per batch), so
    the ranks differ at some steps too."""
    calls = itertools.count()
    return _widths_run(rank, lambda x: x.flatten(1)[:, : 10 + (next(calls) + rank) % 3])


def _rank_failure_run(rank: int, tmp: str) -> dict:
    """Rank 1's features callable fails at every step (its own data pipeline, say); rank 0's
    works. Then, each rank measuring its own batch (``distributed=False``), features padded per
    batch."""

    def features(x: torch.Tensor) -> torch.Tensor:
        if rank == 1:
            raise ZeroDivisionError("rank 1's pipeline")
        return x.flatten(1)

    calls = itertools.count()
    return {
        "failing": _widths_run(rank, features),
        "local_padded": _widths_run(
            rank, lambda x: x.flatten(1)[:, : 10 + next(calls) % 3], distributed=False
        ),
    }


COLLECTIVES = ("all_gather_object", "all_gather", "all_reduce", "broadcast", "barrier", "gather")


def _settings_run(rank: int, tmp: str) -> dict:
    """Arguments that differ between ranks, and the collectives a monitor's construction makes."""
    engine, model, opt, _ = _make_private(DPDDP(TinyCNN()), _local_loader(rank))
    errors = {}
    for case, differ in (
        ("every", {"every": 1 + rank}),
        ("two", {"token_dim": 8 << rank, "seed": rank, "budget": 0.01 * (1 + rank)}),
        # (rank 0 alone asking for it wrote records of a paced, out-of-date PRV epsilon)
        ("exact", {"exact_epsilon": rank == 0}),
        # (each rank's records held its own epsilon and MI bound, rank 0's alone written)
        ("accounting", {"delta": [1e-5, 1e-3][rank], "poisson_sampling": rank > 0 or None}),
    ):
        try:
            kwargs = {"delta": 1e-5, "estimator": None, **differ}
            LeakageMonitor(engine, model, opt, **kwargs).detach()
            errors[case] = None
        except ValueError as exc:
            errors[case] = str(exc)
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}
    for name, fn in originals.items():
        setattr(dist, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    try:  # (budget may differ: every rank follows the most frugal rank's plan)
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, budget=0.01 * (1 + rank))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    monitor.detach()
    return {"errors": errors, "calls": calls}


def _sink_detach_run(rank: int, tmp: str) -> dict:
    """A sink (rank 0 alone calls them) detaches the monitor at step 2: an early stop."""
    torch.manual_seed(0)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), _local_loader(rank))
    sunk = []

    def stop(record):
        sunk.append(record.step)
        if record.step == 2:
            monitor.detach()

    jsonl = os.path.join(tmp, "stop.jsonl")
    monitor = LeakageMonitor(engine, model, opt, jsonl=jsonl, sinks=[stop], **MONITOR)
    _train(model, opt, loader, monitor.wrap_criterion(nn.CrossEntropyLoss()))
    return {
        "attached": monitor.attached,
        "wrapped": "pre_step" in vars(opt),
        "history": [r.step for r in monitor.history],
        "sunk": sunk,
        "accounted": sum(int(h[2]) for h in engine.accountant.history),
        "params": [p.detach().clone() for p in model.parameters()],
    }


def _request_stop_run(rank: int, tmp: str) -> dict:
    """Rank 0 alone asks to stop after step 2, outside any sink (``if rank == 0:`` code):
    ``detach()`` there left rank 1 waiting at its next gather until the group's timeout."""
    torch.manual_seed(0)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), _local_loader(rank))
    monitor = LeakageMonitor(engine, model, opt, **MONITOR)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    for step, (x, y) in enumerate(loader):
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()
        if step == 2 and rank == 0:
            monitor.request_stop()
    return {
        "attached": monitor.attached,
        "history": [r.step for r in monitor.history],
        "params": [p.detach().clone() for p in model.parameters()],
    }


def _lifecycle_worker(rank: int, port: int, tmp: str) -> None:
    """Each case's result, or the error it raised (a desynchronised collective times out)."""
    _join(rank, port, 30)
    try:
        out = {"without": _ddp_run(rank, False, tmp)}
        cases = {"features": _features_run, "settings": _settings_run}
        cases["width"] = _width_run
        cases["padded"] = _padded_run
        cases["rank_failure"] = _rank_failure_run
        cases["request_stop"] = _request_stop_run
        cases["sink_detach"] = _sink_detach_run  # last: it hung, leaving the group unusable
        for name, case in cases.items():
            try:
                out[name] = case(rank, tmp)
            except Exception as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
        torch.save(out, os.path.join(tmp, f"out{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _broken_group_worker(rank: int, port: int, tmp: str) -> None:
    """Rank 1 stops after its first step (a user error) and lets go of its group; rank 0 goes
    on to its second step."""
    _join(rank, port, 20)
    torch.manual_seed(0)
    engine, model, opt, loader = _make_private(DPDDP(TinyCNN()), _local_loader(rank))
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5, every=1, estimator=None)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    out: dict = {"raised": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for step, (x, y) in enumerate(loader):
                opt.zero_grad()
                criterion(model(x), y).backward()
                if rank == 1 and step == 1:
                    break  # (its exception, caught by the user's own code)
                opt.step()
        except Exception as exc:
            out["raised"] = (type(exc).__name__, str(exc), type(exc.__cause__).__name__)
    out["steps"] = [r.step for r in monitor.history]
    out["warnings"] = [str(w.message) for w in caught if "opacus-mi" in str(w.message)]
    torch.save(out, os.path.join(tmp, f"out{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("own_clipped", [True, False])
def test_a_chunk_crosses_the_gather_whole(own_clipped):
    """A chunk's wire format (``chunks.pack``/``unpack``, what DPDDP's gather carries) keeps
    everything its record reads. A mutation audit found the half-precision clip slack
    unguarded: dropped, a bfloat16 DPDDP step whose release reads 1.01-1.03 C was flagged
    ``exceeds_clip`` where one process of the same examples is not. The pending clipped tokens
    travel once when they are the clipped view's tokens, on their own otherwise."""
    from opacus_mi.chunks import CLIP_SLACK, Chunk, half_slack, pack, unpack

    slack = half_slack(torch.bfloat16)
    assert slack == 4 * 2.0**-7 > CLIP_SLACK  # 4 ulps of one in bfloat16 (eps = 2**-7)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 4, generator=gen)
    clipped = tokens if own_clipped else torch.randn(3, 4, generator=gen)
    gram = clipped @ clipped.T
    chunk = Chunk(
        batch=3,
        tokens={"clipped": tokens, "raw": torch.randn(3, 4, generator=gen)},
        features=torch.randn(3, 5, generator=gen),
        oracle_terms=torch.randn(3, generator=gen),
        oracle_var=torch.rand(3, generator=gen),
        flags=["features_first_forward"],
        slack=slack,
        pending=(clipped, gram, 0.5),
    )
    meta, tensors = pack(chunk)
    assert ("pending/clipped" in tensors) is not own_clipped
    back, got_clipped, got_gram, std = unpack((meta, tensors))
    assert (back.batch, back.flags, back.slack, std) == (3, ["features_first_forward"], slack, 0.5)
    assert back.tokens.keys() == chunk.tokens.keys()
    assert all(torch.equal(back.tokens[v], chunk.tokens[v]) for v in chunk.tokens)
    for name in ("features", "oracle_terms", "oracle_var"):
        assert torch.equal(getattr(back, name), getattr(chunk, name)), name
    assert torch.equal(got_clipped, clipped) and torch.equal(got_gram, gram)


def test_the_clip_slack_of_each_precision_is_never_below_rounding_of_one_percent():
    """``half_slack``: 4 ulps of one where that is above CLIP_SLACK (bfloat16), CLIP_SLACK
    itself where 4 ulps are smaller (float16's 4 * 2**-10 = 0.4%, float32): without the floor
    float16 would flag a 1.005 C release exceeds_clip. Reference: torch.finfo. A mutation
    audit found the floor unguarded."""
    from opacus_mi.chunks import CLIP_SLACK, half_slack

    assert 4 * torch.finfo(torch.float16).eps == 2.0**-8 < CLIP_SLACK
    for dtype in (torch.float16, torch.float32, torch.float64):
        assert half_slack(dtype) == CLIP_SLACK, dtype
    assert half_slack(torch.bfloat16) == 4 * torch.finfo(torch.bfloat16).eps


def test_the_wire_format_of_a_drawn_chunk_and_of_a_rank_with_nothing():
    """A chunk whose private-view draws were made (no ``pending``) unpacks with no draws to
    make, even though it has clipped tokens: (chunk, None, None, None). A rank with nothing
    sends its flags (what went wrong there) and no examples. A mutation audit found both
    unguarded: the clipped tokens handed back as draws to make, the flags dropped."""
    from opacus_mi.chunks import Chunk, empty_item, pack, unpack

    tokens = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    chunk = Chunk(batch=3, tokens={"clipped": tokens}, flags=["x"])
    back, clipped, gram, std = unpack(pack(chunk))
    assert (clipped, gram, std) == (None, None, None)
    assert torch.equal(back.tokens["clipped"], tokens) and back.flags == ["x"]
    flags = ["error:RuntimeError"]
    back, clipped, gram, std = unpack(empty_item(flags))
    assert (back.batch, back.flags, back.tokens, clipped, gram, std) == (
        0, flags, {}, None, None, None
    )  # fmt: skip
    back.flags.append("more")
    assert flags == ["error:RuntimeError"]  # (the caller's list is not the chunk's)
    assert unpack(empty_item())[0].flags == []


def test_a_rank_that_stops_makes_the_others_gather_raise_not_record(tmp_path):
    """The gather's failure was taken for a measurement's: rank 0 delivered a record flagged
    error:RuntimeError for a step that never completed, and the user then saw Opacus's vaguer
    all-reduce failure ("pair closure") with the monitor's warning only at exit."""
    rank0, rank1 = _spawn(_broken_group_worker, str(tmp_path), 120)
    assert rank1["raised"] is None and rank1["steps"] == [0]
    name, message, cause = rank0["raised"]
    assert name == "GatherError" and cause in ("RuntimeError", "DistBackendError"), rank0
    assert "the monitor's gather of step 1 across the DPDDP ranks failed" in message
    assert "another rank stopped, failed or timed out before its optimizer.step()" in message
    assert rank0["steps"] == [0]  # no record of the step that never completed
    assert not [w for w in rank0["warnings"] if "leakage record failed" in w]


def _single_process() -> dict:
    """One process, global batches in rank order, one BatchMemoryManager chunk per rank."""
    torch.manual_seed(0)
    data = make_data(N)
    order = []
    for t in range(N // (WORLD * LOCAL_BATCH)):
        for r in range(WORLD):
            order += list(range(r, N, WORLD))[t * LOCAL_BATCH : (t + 1) * LOCAL_BATCH]
    loader = DataLoader(data, batch_size=WORLD * LOCAL_BATCH, sampler=order)
    engine, model, opt, loader = _make_private(TinyCNN(), loader)
    monitor = LeakageMonitor(engine, model, opt, **MONITOR)
    # Under DPDDP the semi-oracle reads sketch tokens (a gradient subspace would be fitted per
    # rank); the one-process reference does the same, so the two are comparable.
    assert monitor.subspace is not None
    monitor.subspace = None
    seen = _record_inputs(monitor)
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=LOCAL_BATCH, optimizer=opt
    ) as chunked:
        _train(model, opt, chunked, criterion)
    monitor.detach()
    return {
        "history": [r.as_dict() for r in monitor.history],
        "seen": seen,
        "params": [p.detach().clone() for p in model.parameters()],
        "epsilon": engine.get_epsilon(1e-5),
        "distributed": monitor.distributed,
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, tmp: str, seconds: float) -> list[dict]:
    """Run ``worker(rank, port, tmp)`` on WORLD processes and load what each saved as
    ``out<rank>.pt``; fail (never hang) after ``seconds``."""
    ctx = mp.spawn(worker, args=(_free_port(), tmp), nprocs=WORLD, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish within {seconds:g} s (a hung collective?)")
    return [torch.load(os.path.join(tmp, f"out{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ddp"))
    return _spawn(_worker, tmp, 180), _single_process(), tmp


def _same_record(a: dict, b: dict, *, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Records equal: exact fields exactly, MI values to float tolerance (NaN == NaN)."""
    skip = {"mi", "monitor_seconds"}
    assert {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip
    }
    assert a["mi"].keys() == b["mi"].keys()
    for key in a["mi"]:
        for field in ("nats", "ci_low", "ci_high", "mismatched", "n"):
            x, y = a["mi"][key][field], b["mi"][key][field]
            if x is None or y is None:
                assert x is None and y is None, (key, field)
            else:
                assert math.isclose(x, y, rel_tol=rtol, abs_tol=atol), (key, field, x, y)


def test_primitives_gather_in_rank_order_with_empty_ranks(runs):
    ranks, _, _ = runs
    rows = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    for out in ranks:
        p = out["primitives"]
        assert torch.equal(p["rows"], rows)  # rank 1 sent 0 rows
        assert p["objects"] == [("rank", 0), ("rank", 1)]
        metas = [m for m, _ in p["items"]]
        assert metas == [{"r": 0}, {"r": 0, "k": 1}, {"r": 1}]
        a0, g, a1 = (t for _, ts in p["items"] for t in ts.values() if t is not None)
        assert torch.equal(a0, torch.zeros(1, 2)) and torch.equal(a1, torch.ones(2, 2))
        assert torch.equal(g, torch.eye(2, dtype=torch.float64))
        assert p["items"][0][1]["b"] is None and p["items"][2][1]["b"] is None


def test_global_batch_estimates_equal_single_process(runs):
    ranks, single, _ = runs
    assert single["distributed"] is False and ranks[0]["with"]["distributed"] is True
    hist = ranks[0]["with"]["history"]
    assert len(hist) == len(single["history"]) == N // (WORLD * LOCAL_BATCH)
    assert all(r["batch_size"] == WORLD * LOCAL_BATCH and r["chunks"] == WORLD for r in hist)
    keys = set(hist[-1]["mi"])
    assert {"private/oracle", "private/semi", "raw/infonce", "private/infonce"} <= keys
    for mine, ref in zip(hist, single["history"], strict=True):
        _same_record(mine, ref)
    # The learned estimators learned from the same (gathered) features and tokens.
    seen, ref_seen = ranks[0]["with"]["seen"], single["seen"]
    assert len(seen) == len(ref_seen) > 0
    for (view, x, y), (ref_view, rx, ry) in zip(seen, ref_seen, strict=True):
        assert view == ref_view and x.shape == rx.shape and y.shape == ry.shape
        assert torch.equal(x, rx)  # features: inputs and labels, exact
        torch.testing.assert_close(y, ry, rtol=1e-4, atol=1e-6)
    # Opacus's DDP step equals the one-process step, so the reference is the right one.
    for p, q in zip(ranks[0]["with"]["params"], single["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_epsilon_matches_single_process(runs):
    ranks, single, _ = runs
    for out in ranks:
        assert out["with"]["epsilon"] == single["epsilon"]
        assert [r["epsilon"] for r in out["with"]["history"]] == [
            r["epsilon"] for r in single["history"]
        ]


def test_only_rank0_writes_and_every_rank_holds_the_same_records(runs):
    ranks, _, tmp = runs
    r0, r1 = ranks[0]["with"], ranks[1]["with"]
    assert r0["jsonl_exists"] and not r1["jsonl_exists"]
    assert r0["sunk"] == len(r0["history"]) and r1["sunk"] == 0
    written = [r.as_dict() for r in read_jsonl(os.path.join(tmp, "rank0.jsonl"))]
    assert len(written) == len(r0["history"])
    for a, b in zip(written, r0["history"], strict=True):
        _same_record(a, b, rtol=0, atol=0)
    for a, b in zip(
        r0["history"], r1["history"], strict=True
    ):  # symmetric state: bit-identical records
        _same_record(a, b, rtol=0, atol=0)


def test_guest_rule_under_ddp(runs):
    ranks, _, _ = runs
    for out in ranks:
        for p, q in zip(out["with"]["params"], out["without"]["params"], strict=True):
            assert torch.equal(p, q)
        assert torch.equal(out["with"]["rng"], out["without"]["rng"])


def test_local_failure_and_empty_rank_do_not_desynchronise(runs):
    ranks, _, tmp = runs
    r0, r1 = ranks[0]["robust"], ranks[1]["robust"]
    assert r0["steps"] == r1["steps"] == N // (WORLD * LOCAL_BATCH)  # nobody hung or skipped
    for p, q in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(p, q)  # DDP replicas stayed in sync
    hist = r0["history"]
    assert [r["step"] for r in hist] == [0, 2, 4]  # every=2 on both ranks
    # step 0: rank 1's contribution failed and is flagged; step 2: rank 1 had no examples.
    assert hist[0]["batch_size"] == LOCAL_BATCH and "error:RuntimeError" in hist[0]["flags"]
    assert hist[1]["batch_size"] == LOCAL_BATCH and hist[1]["chunks"] == WORLD
    assert hist[2]["batch_size"] == WORLD * LOCAL_BATCH and not hist[2]["flags"]
    assert hist[2]["mi"]["private/oracle"]["n"] == WORLD * LOCAL_BATCH
    for a, b in zip(hist, r1["history"], strict=True):
        _same_record(a, b, rtol=0, atol=0)
    written = read_jsonl(os.path.join(tmp, "shared.jsonl"))  # one writer despite a shared path
    assert [r.step for r in written] == [0, 2, 4]


def test_budget_schedule_follows_the_most_frugal_rank_under_ddp(runs):
    ranks, _, _ = runs
    # rank 1's tiny budget decides too: rank 0's huge one alone measured every step, and rank 1
    # (a slower rank, say) spent far beyond its own budget
    a, b = ranks[0]["budget_frugal_1"], ranks[1]["budget_frugal_1"]
    assert a["steps"] == b["steps"] > 0
    steps = [r["step"] for r in a["history"]]
    assert steps == [r["step"] for r in b["history"]]
    assert 0 < len(steps) < a["steps"]
    for x, y in zip(a["history"], b["history"], strict=True):
        _same_record(x, y, rtol=0, atol=0)
    a, b = ranks[0]["budget"], ranks[1]["budget"]
    assert a["steps"] == b["steps"] > 0
    steps = [r["step"] for r in a["history"]]
    assert steps == [r["step"] for r in b["history"]]
    # rank 0's tiny budget decided: not every step was measured (rank 1's would have been)
    assert 0 < len(steps) < a["steps"]
    failed = [y for y in b["history"] if "error:RuntimeError" in y["flags"]]
    assert [y["step"] for y in failed] == [steps[1]]  # rank 1's own failure, flagged there
    for x, y in zip(a["history"], b["history"], strict=True):
        if y not in failed:
            _same_record(x, y, rtol=0, atol=0)


def test_paced_prv_epsilon_follows_the_most_frugal_rank_under_ddp(runs):
    ranks, _, _ = runs
    a, b = ranks[0]["prv"], ranks[1]["prv"]
    assert a["steps"] == b["steps"] == len(a["history"]) == 18
    # rank 0's tiny budget decided: some records carry an earlier step's epsilon (rank 1's
    # huge one would have recomputed it at each), and both ranks' records are the same.
    assert any(r["epsilon_step"] < r["step"] for r in a["history"])
    for x, y in zip(a["history"], b["history"], strict=True):
        _same_record(x, y, rtol=0, atol=0)


@pytest.fixture
def group_of_one():
    """A gloo group of this process alone, for this test only (``distributed=True`` needs one)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("peer", [(1, True, True), (3, False, True)])
def test_a_peer_that_affords_less_decides_the_interval_and_the_critics(
    group_of_one, monkeypatch, peer
):
    """Every rank follows the most frugal plan: the longest interval, critics only if every rank
    trains them. The two-process runs only compare the ranks with each other, which a rule such
    as 'critics if any rank trains' passes as well (a mutation audit found it). Here a phantom
    peer rank joins each gather with an empty item carrying a fixed plan: a generous one changes
    nothing (every step measured, critics trained), one measuring every 3rd step and never
    training makes every interval >= 3 and no critic round. This rank's own plan is pinned to
    "measure every step and train" (the real one follows wall time)."""
    from opacus_mi.budget import OverheadBudget, Plan

    monkeypatch.setattr(
        OverheadBudget, "plan", lambda self, **kw: Plan(next_in=1, train=True, epsilon=True)
    )
    real = monitor_module.all_gather_items

    def with_a_peer(items, *args, **kwargs):
        meta = {"batch": 0, "flags": [], "std": None, "plan": peer, "stop": False, "rank": 1}
        return real(items, *args, **kwargs) + [(meta, {})]

    monkeypatch.setattr(monitor_module, "all_gather_items", with_a_peer)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 6, generator=gen), torch.randint(0, 2, (256,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    engine, model, opt, loader = _make_private(model, loader)
    monitor = LeakageMonitor(
        engine,
        model,
        opt,
        delta=1e-5,
        every=None,
        train_every=None,
        estimator="infonce",
        train_iters=2,
        seed=3,
        distributed=True,
    )
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    train(model, opt, loader, epochs=2, criterion=criterion)
    monitor.detach()
    steps = [r.step for r in monitor.history]
    rounds = sum(e.updates for e in monitor.estimators.values())
    if peer[0] == 1:
        assert steps == list(range(2 * len(loader))) and rounds > 0
    else:
        gaps = [b - a for a, b in itertools.pairwise(steps)]
        assert gaps and min(gaps) >= peer[0] and rounds == 0, (gaps, rounds)


def test_distributed_true_with_a_local_optimizer_is_warned_about(private_setup, monkeypatch):
    """``distributed=True`` where Opacus made no distributed optimizer (the model not wrapped
    in DPDDP: each rank trains its own) was accepted without a word, and the records mixed the
    ranks' unrelated batches as one global batch."""
    from opacus.optimizers import DistributedDPOptimizer

    _, _, opt, _ = private_setup()
    monkeypatch.setattr(mi_dist, "process_group_active", lambda: True)
    monkeypatch.setattr(mi_dist, "world_size", lambda: 2)
    monkeypatch.setattr(mi_dist, "rank", lambda: 0)
    with pytest.warns(RuntimeWarning, match="distributed=True with a DPOptimizer, not the"):
        assert mi_dist.should_gather(True, opt)
    monkeypatch.setattr(mi_dist, "rank", lambda: 1)  # (rank 0 says it for every rank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mi_dist.should_gather(True, opt)
    monkeypatch.setattr(mi_dist, "world_size", lambda: 1)  # (nothing to mix up)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mi_dist.should_gather(True, opt)
    monkeypatch.setattr(mi_dist, "world_size", lambda: 2)
    ddp_opt = object.__new__(DistributedDPOptimizer)  # (the type is what is checked)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mi_dist.should_gather(True, ddp_opt)
        assert not mi_dist.should_gather(False, opt)


def test_distributed_argument_is_validated(private_setup):
    engine, model, opt, _ = private_setup()
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        LeakageMonitor(engine, model, opt, delta=1e-5, distributed=True)
    with pytest.raises(ValueError, match="distributed must be"):
        LeakageMonitor(engine, model, opt, delta=1e-5, distributed="yes")
    monitor = LeakageMonitor(engine, model, opt, delta=1e-5)  # auto: no process group
    assert monitor.distributed is False and monitor.rank == 0
    monitor.detach()


def test_waiting_for_a_slower_rank_is_not_booked_as_monitor_time(runs):
    """Rank 0's records (the ones written) put 40 ms of waiting for rank 1 into each step's
    monitor_seconds (1.6 ms of measuring), and its budget measured ~10x less often."""
    ranks, _, _ = runs
    seconds = sorted(ranks[0]["straggler"]["seconds"])
    assert len(seconds) == 6
    assert seconds[len(seconds) // 2] < STRAGGLE / 2, seconds


def test_every_chunk_is_drawn_at_the_noise_rank_0_adds(runs):
    """A scheduler stepped per physical chunk: each gathered chunk had been drawn at its own
    sigma (the oracle a third low at the first step), where Opacus adds rank 0's last chunk's."""
    ranks, _, _ = runs
    added = ranks[0]["scheduler"]["added"]
    assert len(added) == 6 and len(set(added)) == 6
    for r in range(WORLD):
        drawn = ranks[r]["scheduler"]["drawn"]
        assert drawn == [std for std in added for _ in range(8)]  # 4 chunks on each of 2 ranks


def test_local_monitors_write_a_file_per_rank(runs):
    """distributed=False: every rank reported rank 0 and appended its own records to the one
    JSONL, each step twice with nothing saying which rank wrote which line."""
    ranks, _, tmp = runs
    assert [r["local"]["rank"] for r in ranks] == [0, 1]
    for rank, name in enumerate(("local.jsonl", "local.rank1.jsonl")):
        written = [r.as_dict() for r in read_jsonl(os.path.join(tmp, name))]
        assert len(written) == N // (WORLD * LOCAL_BATCH)
        assert {r["batch_size"] for r in written} == {LOCAL_BATCH}
        for a, b in zip(written, ranks[rank]["local"]["history"], strict=True):
            _same_record(a, b, rtol=0, atol=0)


def test_a_padding_distributed_sampler_is_warned_about(runs):
    """DistributedSampler(drop_last=False) repeats examples to fill the ranks: they are in two
    batches an epoch, which neither Opacus's epsilon nor the once-per-epoch bound allows for."""
    ranks, _, _ = runs
    (said,) = ranks[0]["padding"]  # once, by rank 0
    assert "97 examples over 2 ranks: if the data loader's DistributedSampler" in said
    assert "drop_last=True" in said and not ranks[1]["padding"]


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ddp_lifecycle"))
    return _spawn(_lifecycle_worker, tmp, 150), tmp


def test_one_rank_may_request_the_stop_outside_a_sink(lifecycle):
    ranks, _ = lifecycle
    r0, r1 = (out["request_stop"] for out in ranks)
    assert isinstance(r0, dict) and isinstance(r1, dict), (r0, r1)
    for out in (r0, r1):  # both let go at step 3's gather, which made no record
        assert out["history"] == [0, 1, 2] and not out["attached"]
    for out in ranks:  # training is exactly the unmonitored one
        for p, q in zip(out["request_stop"]["params"], out["without"]["params"], strict=True):
            assert torch.equal(p, q)


def test_a_sink_may_detach_the_monitor_under_ddp(lifecycle):
    """As on one process (test_overlap.py::test_a_sink_may_detach_the_monitor): rank 0's sink
    detached, rank 1 gathered at the next step alone, and training hung."""
    ranks, tmp = lifecycle
    r0, r1 = (out["sink_detach"] for out in ranks)
    assert isinstance(r0, dict) and isinstance(r1, dict), (r0, r1)
    assert r0["sunk"] == [0, 1, 2] and r1["sunk"] == []
    assert [r.step for r in read_jsonl(os.path.join(tmp, "stop.jsonl"))] == [0, 1, 2]
    for out in (r0, r1):  # every rank let go together, after the record the sink was given
        assert out["history"] == [0, 1, 2]
        assert not out["attached"] and not out["wrapped"]
        assert out["accounted"] == N // (
            WORLD * LOCAL_BATCH
        )  # every step trained and was accounted
    for out in ranks:  # training is exactly the unmonitored one
        for p, q in zip(out["sink_detach"]["params"], out["without"]["params"], strict=True):
            assert torch.equal(p, q)


def test_arguments_that_differ_between_ranks_raise_on_every_rank(lifecycle):
    """every=1 on rank 0 and 2 on rank 1 hung at the second step; now construction raises."""
    ranks, _ = lifecycle
    for out in ranks:
        errors = out["settings"]["errors"]
        assert "every (1 on ranks [0]; 2 on ranks [1])" in errors["every"]
        assert "pass the same every on every rank" in errors["every"]
        assert "token_dim (8 on ranks [0]; 16 on ranks [1])" in errors["two"]
        assert "pass the same token_dim, seed on every rank" in errors["two"]
        assert "budget" not in errors["two"]  # (every rank follows the most frugal plan)
        assert "exact_epsilon (True on ranks [0]; False on ranks [1])" in errors["exact"]
        assert "delta (1e-05 on ranks [0]; 0.001 on ranks [1])" in errors["accounting"]
        assert "poisson_sampling (None on ranks [0]; True on ranks [1])" in errors["accounting"]
        assert out["settings"]["calls"] == ["all_gather_object"]  # one collective, no more
    assert ranks[0]["settings"] == ranks[1]["settings"]


def test_feature_layers_are_named_as_in_the_users_model_under_ddp(lifecycle):
    """features=["fc"] raised under DPDDP (it wanted "module.fc"); the critic now reads fc's
    outputs of the global batch, rank 0's rows then rank 1's, as the layer computed them."""
    ranks, _ = lifecycle
    r0, r1 = (out["features"] for out in ranks)
    assert isinstance(r0, dict) and isinstance(r1, dict), (r0, r1)
    assert r0["saved"] == r1["saved"] == ["fc"]  # a checkpoint's setting, as on one process
    assert "features names layers ['module.fc']" in r0["wrapper_name"]
    assert "'fc'" in r0["wrapper_name"]
    assert len(r0["seen"]) == len(r0["fc"]) == N // (WORLD * LOCAL_BATCH)
    for seen0, seen1, *local in zip(r0["seen"], r1["seen"], r0["fc"], r1["fc"], strict=True):
        assert torch.equal(seen0, torch.cat(local)) and torch.equal(seen1, seen0)


def test_features_of_another_width_on_each_rank_are_said_to_be_the_ranks(lifecycle):
    """The warning blamed "inputs of varying shape, e.g. sequences padded per batch?" when
    the ranks fed features of different widths; it now names each rank's width. It is of the
    gathered batch, which every rank has alike: rank 0 says it for all (every rank said it)."""
    ranks, _ = lifecycle
    for out in ranks:
        assert isinstance(out["width"], dict), out["width"]
        assert all("features_width_changed" in f for f in out["width"]["flags"])
    said = [w for w in ranks[0]["width"]["warnings"] if "width" in w]
    assert len(said) == 1, said
    widths = "(rank 0: 13, rank 1: 14"  # (10 + rank input columns, 3 one-hot labels)
    assert said[0].startswith(f"opacus-mi: the ranks' features differ in width this step {widths}")
    assert "padded" not in said[0]
    assert ranks[1]["width"]["warnings"] == []


def test_features_padded_per_batch_on_each_rank_get_the_padding_advice(lifecycle):
    """Under DPDDP, features whose width each rank changes step by step (padding per batch)
    were blamed on the ranks' pipelines differing and the padding advice was withheld."""
    ranks, _ = lifecycle
    assert isinstance(ranks[0]["padded"], dict), ranks[0]["padded"]
    said = [w for w in ranks[0]["padded"]["warnings"] if "width" in w]
    assert any("padded per batch" in w and "features=" in w for w in said), said
    assert ranks[1]["padded"]["warnings"] == []  # (rank 0 said it for both)


def test_a_ranks_own_warning_is_said_by_that_rank_and_names_it(lifecycle):
    """Rank 1's features failing is rank 1's alone to say, with its rank (under torchrun the
    processes' warnings interleave on one terminal); rank 0 has nothing to say of it. Each rank
    of local monitors (``distributed=False``) says its own warnings, naming its rank."""
    ranks, _ = lifecycle
    r0, r1 = (out["rank_failure"] for out in ranks)
    assert isinstance(r0, dict) and isinstance(r1, dict), (r0, r1)
    (said,) = r1["failing"]["warnings"]
    assert said.startswith("opacus-mi (rank 1): feature extraction failed: ZeroDivisionError(")
    assert r0["failing"]["warnings"] == []
    for out in (r0, r1):  # one record per step on both ranks, each flagged for rank 1's part
        assert out["failing"]["flags"] and all(
            "features_error" in f for f in out["failing"]["flags"]
        )
    for rank, out in enumerate((r0, r1)):
        said = [w for w in out["local_padded"]["warnings"] if "width" in w]
        assert len(said) == 1, said
        assert said[0].startswith(f"opacus-mi (rank {rank}): features changed width")
