"""A noise sweep through the high-level API: one monitored run per noise multiplier.

    python examples/noise_sweep.py

Each run writes its records, plots and report.html to runs/noise_sweep/sigma_<v>/.
"""

from __future__ import annotations

import warnings

from opacus_mi.training import RunConfig, train_and_monitor

warnings.filterwarnings("ignore", category=UserWarning)


def main(noise_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)) -> None:
    rows = []
    for sigma in noise_multipliers:
        cfg = RunConfig(
            epochs=2,
            noise_multiplier=sigma,
            accountant="rdp",
            estimator="none",  # the private view's white-box oracle only: seconds per run
            out=f"runs/noise_sweep/sigma_{sigma:g}",
        )
        result = train_and_monitor(cfg, progress=False)
        oracle = [r.mi["private/oracle"].nats for r in result.records if "private/oracle" in r.mi]
        tail = oracle[-10:]
        rows.append((sigma, result.epsilon, sum(tail) / len(tail), result.test_accuracy))
    print(f"{'sigma':>6} {'epsilon':>8} {'MI/step (nats)':>15} {'bound':>7} {'test acc':>8}")
    for sigma, eps, mi, acc in rows:
        print(f"{sigma:>6g} {eps:>8.3f} {mi:>15.4f} {1 / (2 * sigma**2):>7.3f} {acc:>8.3f}")


if __name__ == "__main__":
    main()
