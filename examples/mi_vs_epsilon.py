"""Measured leakage against epsilon: MonitoredPrivacyEngine.make_private_with_epsilon per target.

    python examples/mi_vs_epsilon.py

For each target epsilon Opacus calibrates the noise multiplier sigma; the monitor's white-box
oracle then measures the private view's MI per step, next to the 1/(2 sigma^2) bound.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

from opacus_mi import MonitoredPrivacyEngine
from opacus_mi.data import load_dataset
from opacus_mi.models import DigitsCNN
from opacus_mi.report import mean_with_ci

warnings.filterwarnings("ignore", category=UserWarning)

DELTA = 1e-5


class UnreachableTarget(ValueError):
    """A target epsilon no noise multiplier reaches in the run's steps."""


def measure(target_epsilon: float, epochs: int = 2) -> dict[str, float]:
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    # The oracle alone (fast), on every step: the figures do not depend on the machine's
    # speed, as they would under the default overhead budget's schedule.
    engine = MonitoredPrivacyEngine(accountant="rdp", estimator=None, every=1)
    try:
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(data.train, batch_size=64),
            target_epsilon=target_epsilon,
            target_delta=DELTA,
            epochs=epochs,
            max_grad_norm=1.0,
        )
    except ValueError as exc:  # Opacus's calibration ("The privacy budget is too low.")
        raise UnreachableTarget(f"target epsilon {target_epsilon:g}: {exc}") from exc
    criterion = engine.monitor.wrap_criterion(nn.CrossEntropyLoss())
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        x, y = data.test.tensors
        acc = (model(x).argmax(-1) == y).float().mean().item()
    oracle = [v.nats for _, v in engine.monitor.series("private/oracle")][-10:]
    mi, lo, hi = mean_with_ci(oracle)
    sigma = optimizer.noise_multiplier
    engine.monitor.detach()
    return {
        "target": target_epsilon,
        "epsilon": engine.get_epsilon(DELTA),
        "sigma": sigma,
        "mi": mi,
        "lo": lo,
        "hi": hi,
        "bound": 1 / (2 * sigma**2),
        "acc": acc,
    }


def main(targets: tuple[float, ...] = (0.5, 1.0, 2.0, 8.0)) -> None:
    torch.set_num_threads(1)  # a 10k-parameter model runs fastest on one thread
    print(
        f"{'target eps':>10} {'epsilon':>8} {'sigma':>7} {'MI/step [95% CI] (nats)':>26} "
        f"{'bound':>7} {'test acc':>8}"
    )
    for t in targets:
        r = measure(t)
        ci = f"{r['mi']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
        print(
            f"{r['target']:>10g} {r['epsilon']:>8.3f} {r['sigma']:>7.3f} {ci:>26} "
            f"{r['bound']:>7.3f} {r['acc']:>8.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="MI against the epsilon a run is calibrated to")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 1.0, 2.0, 8.0])
    args = parser.parse_args()
    bad = [t for t in args.targets if not (math.isfinite(t) and t > 0)]
    if bad:
        parser.error(f"every --targets value must be a finite epsilon > 0; got {bad[0]!r}")
    try:
        main(tuple(args.targets))
    except UnreachableTarget as exc:
        parser.error(f"--targets: {exc} Pass a larger target epsilon.")
