"""An ordinary Opacus training loop on digits, plus the two lines that add the leakage monitor.

    python examples/wrap_privacy_engine.py

Everything except the two marked lines is the usual Opacus recipe.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from opacus_mi import LeakageMonitor
from opacus_mi.data import load_dataset
from opacus_mi.models import DigitsCNN

warnings.filterwarnings("ignore", category=UserWarning)  # Opacus: secure RNG off, etc.


def main(epochs: int = 4) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a 10k-parameter model runs fastest on one thread
    data = load_dataset("digits")
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(data.train, batch_size=64)

    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )

    monitor = LeakageMonitor(engine, model, optimizer, delta=1e-5)  # <- line 1
    criterion = monitor.wrap_criterion(criterion)  # <- line 2

    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            x, y = data.test.tensors
            acc = (model(x).argmax(-1) == y).float().mean().item()
        print(f"epoch {epoch + 1}: test accuracy {acc:.3f}, epsilon {engine.get_epsilon(1e-5):.2f}")

    print(monitor.summary())
    monitor.detach()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The monitor's two lines in a plain Opacus loop")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the data (default 4)")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    main(args.epochs)
