"""Shared fixtures: tiny real Opacus setups built from tensors the tests make themselves."""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import sys
import warnings

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Small tensors: one intra-op thread avoids oversubscription on a loaded 2-core CI box.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", module=r"opacus\.")  # (Opacus's own, not opacus_mi's)
warnings.filterwarnings("ignore", message=".*Secure RNG.*")
warnings.filterwarnings("ignore", message=".*full backward hook.*")


@pytest.fixture(autouse=True)
def fixed_schedule(monkeypatch):
    """Pin the monitor's fixed schedule for every test: each step measured, each critic trained
    on each of its first 32 batches, then every 8th. The library default instead follows wall
    time (``every=None``, ``train_every=None``: :mod:`opacus_mi.budget`), which the assertions
    here, written per step, must not depend on; tests of the budget itself restore it."""
    from opacus_mi import LeakageMonitor

    defaults = LeakageMonitor.__init__.__kwdefaults__
    monkeypatch.setitem(defaults, "every", 1)
    monkeypatch.setitem(defaults, "train_every", 8)


@pytest.fixture(autouse=True)
def close_figures():
    """Close the figures a test left open (the plot tests spy on ``plots._save``, which would
    close them): pyplot keeps each until closed and warns past 20 in one process."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")


class ReusedRelu(nn.Module):
    """An MLP on 1x6x6 inputs whose one ReLU module runs twice in a forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(36, 6), nn.Linear(6, 3), nn.ReLU()

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x.flatten(1)))))


class TinyCNN(nn.Module):
    """Small conv net on 1x6x6 inputs: conv + linear layers, ~600 parameters."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def make_data(n: int = 96, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def make_private(
    *,
    seed: int = 0,
    batch_size: int = 16,
    noise: float = 1.0,
    clip: float | list[float] = 1.0,
    clipping: str = "flat",
    mode: str = "hooks",
    accountant: str = "rdp",
    poisson: bool = True,
    n: int = 96,
    engine_cls=PrivacyEngine,
    net=TinyCNN,
    data: TensorDataset | None = None,
    private_kwargs: dict | None = None,
    with_criterion: bool = False,
    **engine_kwargs,
):
    """Seed everything, build model/optimizer/loader and make them private (``net``: the
    model's class or factory, on ``data``, by default ``make_data(n)``'s 1x6x6 images).

    ``(engine, model, optimizer, loader)``; with ``with_criterion``, ``(engine, model,
    optimizer, criterion, loader)``: the loss to train with, in ghost mode the one Opacus
    returns (its backward is the clipping's second pass), else a plain cross-entropy."""
    torch.manual_seed(seed)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(make_data(n) if data is None else data, batch_size=batch_size)
    engine = engine_cls(accountant=accountant, **engine_kwargs)
    if clipping == "per_layer" and not isinstance(clip, list):
        clip = [clip] * len([p for p in model.parameters() if p.requires_grad])
    out = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=clip,
        clipping=clipping,
        grad_sample_mode=mode,
        poisson_sampling=poisson,
        **({"criterion": nn.CrossEntropyLoss()} if with_criterion else {}),
        **(private_kwargs or {}),
    )
    if not with_criterion:
        return engine, *out
    model, opt, criterion, loader = out if len(out) == 4 else (*out[:2], None, out[2])
    return engine, model, opt, criterion or nn.CrossEntropyLoss(), loader


def per_example_norms(model: nn.Module, x, y, before=None) -> torch.Tensor:
    """Each example's gradient norm by plain autograd, one example at a time (the reference the
    monitor's per-sample figures are checked against): a mean-reduced cross-entropy of that
    example alone; parameters it gives no gradient count 0. ``before()`` runs before each
    example's forward (a model whose forward keeps state)."""
    norms = []
    for i in range(len(x)):
        if before is not None:
            before()
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
        norms.append(torch.cat(grads).norm())
    return torch.stack(norms)


def without_timing(records) -> list[dict]:
    """Records as dicts without ``monitor_seconds`` (wall time, the one field that differs
    between two runs that must otherwise agree exactly)."""
    out = []
    for r in records:
        d = r.as_dict()
        d.pop("monitor_seconds")
        out.append(d)
    return out


def train(model, opt, loader, *, epochs: int = 1, criterion=None, after_step=None):
    criterion = criterion or nn.CrossEntropyLoss()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
            if after_step is not None:
                after_step()


def spy_noise_stds(monitor, opt) -> tuple[list[float], list[float]]:
    """Test-only taps: the std each of the monitor's private draws is made with (one per
    chunk, in order) and the std of each noise Opacus adds (sigma C at ``add_noise``; undo
    with ``del opt.add_noise``)."""
    drawn: list[float] = []
    added: list[float] = []
    privatise = monitor._privatise
    monitor._privatise = lambda chunk, clipped, gram, std: (
        drawn.append(std),
        privatise(chunk, clipped, gram, std),
    )[1]
    add_noise = opt.add_noise
    opt.add_noise = lambda: (added.append(opt.noise_multiplier * opt.max_grad_norm), add_noise())
    return drawn, added


def fail_estimate_at(monitor, call: int) -> None:
    """Make the monitor's ``call``-th estimate (1-based) raise, as a bug in it would."""
    original, calls = monitor._estimate, []

    def failing(chunks):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("injected")
        return original(chunks)

    monitor._estimate = failing


@pytest.fixture
def private_setup():
    return make_private


def writes_cut_off(folder, at: int) -> tuple[contextlib.AbstractContextManager, list[str]]:
    """Open files in ``folder`` as usual, but let the ``at``-th one opened for writing (from 1;
    0: none) take half of its first write and then stop, as Ctrl-C would mid-write. Patches
    ``open`` and ``io.open``, through which Python's writers, csv, pathlib and Pillow's PNG
    encoder (matplotlib's savefig) all go. Returns the patch and the names opened for writing."""
    folder, opened = os.path.realpath(folder), []
    real = builtins.open

    class HalfThenStop:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            self._fh.write(data[: len(data) // 2])
            self._fh.flush()
            raise KeyboardInterrupt  # (the signal, mid-write)

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

    def cutting(file, mode="r", *args, **kwargs):
        fh = real(file, mode, *args, **kwargs)
        path = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        if any(m in mode for m in "wax") and os.path.dirname(os.path.realpath(path)) == folder:
            opened.append(os.path.basename(path))
            if len(opened) == at:
                return HalfThenStop(fh)
        return fh

    @contextlib.contextmanager
    def patch():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(builtins, "open", cutting)
            mp.setattr(io, "open", cutting)
            yield

    return patch(), opened
