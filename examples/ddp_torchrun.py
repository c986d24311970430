"""Opacus DPDDP on 2 CPU processes (gloo) with the leakage monitor on the global batch.

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py [--epochs 2]

Each rank draws its own Poisson sample of its shard of the digits; the monitor all-gathers the
ranks' tokens, features and Gram matrices at every monitored step, so the learned critics see
the global batch. The white-box oracle's candidates stay each rank's own batch (its Gram needs
that rank's per-sample gradients), so its ceiling is the per-example mean of ln of the local
batch sizes, not ln of the global one. Every rank computes the same records; rank 0 alone
prints and writes them (``runs/ddp_leakage.jsonl``).
Everything else is the usual Opacus DPDDP recipe; the monitor needs no distributed code of its
own: create it on every rank, like the optimizer.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings

import torch
import torch.distributed as dist
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch import nn
from torch.utils.data import DataLoader

from opacus_mi import LeakageMonitor
from opacus_mi.data import load_dataset
from opacus_mi.models import DigitsCNN

warnings.filterwarnings("ignore", category=UserWarning)  # Opacus: secure RNG off, etc.


def main(epochs: int = 2, batch_size: int = 64, noise: float = 1.0, delta: float = 1e-5) -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank = dist.get_rank()
    torch.set_num_threads(1)
    # Seed per rank: with Opacus's default (no generator) each rank's Poisson mask comes from
    # the global RNG, so equal seeds would select the same positions of every shard. DPDDP
    # broadcasts rank 0's initial weights, so the model still starts identical everywhere.
    torch.manual_seed(rank)
    data = load_dataset("digits")
    model = DPDDP(DigitsCNN())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    # A plain loader over the whole data set: make_private sees the DPDDP module and switches
    # to Opacus's distributed Poisson sampler, with the global sample rate batch_size / N.
    loader = DataLoader(data.train, batch_size=batch_size)

    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=1.0,
    )
    jsonl = os.path.join("runs", "ddp_leakage.jsonl")
    monitor = LeakageMonitor(engine, model, optimizer, delta=delta, jsonl=jsonl)  # every rank
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())

    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        if rank == 0:
            model.eval()
            with torch.no_grad():
                x, y = data.test.tensors
                acc = (model(x).argmax(-1) == y).float().mean().item()
            eps = engine.get_epsilon(delta)
            print(f"epoch {epoch + 1}: test accuracy {acc:.3f}, epsilon {eps:.3f}")

    if rank == 0:
        # The single-process run with the same global batch: q = 1 / ceil(N / batch), same steps.
        single = RDPAccountant()
        q = 1 / math.ceil(len(data.train) / batch_size)
        single.history = [(noise, q, monitor.steps)]
        print(
            f"{dist.get_world_size()} ranks, {monitor.steps} steps, global batch "
            f"{sum(r.batch_size for r in monitor.history) / len(monitor.history):.1f} on average; "
            f"epsilon {engine.get_epsilon(delta):.4f} vs single process "
            f"{single.get_epsilon(delta):.4f}"
        )
        print(monitor.summary())
        print(f"records: {jsonl} (rank 0 only)")
    monitor.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Opacus DPDDP with the leakage monitor")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the data (default 2)")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    main(epochs=args.epochs)
