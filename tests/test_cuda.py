"""CUDA: the monitor's tensors live on the model's device, and a monitored step makes one host
synchronisation (its record's figures, read in one transfer), plus one when its critics train
(all of the step's rounds read together). Run by ``benchmarks/gpu.sh``; skipped without a GPU.

References: where each tensor is (its ``.device``), and PyTorch's own sync detector
(``torch.cuda.set_sync_debug_mode("warn")`` warns on every synchronising call).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TinyCNN, make_data
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from opacus_mi import LeakageMonitor
from opacus_mi.estimators.online import OnlineEstimator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_setup(**monitor_kwargs):
    torch.manual_seed(0)
    data = make_data(128)
    model = TinyCNN().cuda()
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    kwargs = {"delta": 1e-5, "views": ("raw", "clipped", "private"), **monitor_kwargs}
    monitor = LeakageMonitor(engine, model, opt, **kwargs)
    return model, opt, loader, monitor


def _steps(model, opt, loader, monitor, n):
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    done = 0
    while done < n:
        for x, y in loader:
            opt.zero_grad()
            criterion(model(x.cuda()), y.cuda()).backward()
            opt.step()
            done += 1
            if done == n:
                return


def test_cuda_monitor_state_lives_on_the_model_device():
    model, opt, loader, monitor = _cuda_setup(every=1, train_every=1)
    _steps(model, opt, loader, monitor, 12)
    assert monitor.device.type == "cuda" and monitor.generator.device.type == "cuda"
    for est in monitor.estimators.values():
        assert all(p.device.type == "cuda" for p in est.critic.parameters())
        assert est.pairs._x.buf.device.type == "cuda" and est.pairs._y.buf.device.type == "cuda"
    for axes in monitor.tokenizer._axes:
        for ax in axes or ():
            assert ax.buckets.device.type == "cuda"
    assert all(r.mi["private/oracle"].nats == r.mi["private/oracle"].nats for r in monitor.history)
    assert any("clipped/mine" in r.mi for r in monitor.history)


def test_cuda_monitored_step_syncs_once_plus_once_for_its_critic_rounds(monkeypatch):
    """The sync count ``tests/test_host_reads.py`` checks on the CPU (by counting host reads
    with the device behaviour switched on), checked by PyTorch's own detector."""
    model, opt, loader, monitor = _cuda_setup(every=1, train_every=8, control=True)
    _steps(model, opt, loader, monitor, 3)  # one-off work (cached sketch matrices) done
    rounds = []
    original = OnlineEstimator._train_round

    def counted_round(self):
        rounds.append(1)
        return original(self)

    monkeypatch.setattr(OnlineEstimator, "_train_round", counted_round)
    step, per_step = opt.step, []

    def counted_step(*args, **kwargs):
        before = len(rounds)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return step(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                ours = [
                    w
                    for w in caught
                    if "synchroniz" in str(w.message) and "opacus_mi" in str(w.filename)
                ]
                per_step.append((len(ours), len(rounds) - before))

    opt.step = counted_step
    _steps(model, opt, loader, monitor, 40)  # past the critics' 32 warm-up rounds
    assert monitor._sync_free
    assert all(syncs == 1 + (trained > 0) for syncs, trained in per_step), per_step
    assert any(trained == 0 for _, trained in per_step)


def test_cuda_budget_reads_device_time_from_events():
    model, opt, loader, monitor = _cuda_setup(every=None, train_every=None, budget=1.0)
    _steps(model, opt, loader, monitor, 20)
    torch.cuda.synchronize()
    monitor.budget.tick()  # settles any event still pending
    assert monitor.budget.measure_seconds > 0 and monitor.budget.train_seconds > 0
    assert monitor.history
