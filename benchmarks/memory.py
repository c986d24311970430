"""Monitor memory against the DP step's peak at a chosen batch size (no timing).

    .venv/bin/python benchmarks/memory.py                       # ResNet-18 GN, batch 128, CPU
    .venv/bin/python benchmarks/memory.py --model digits_cnn --batch 64 256 1024

The issue's memory target (monitor <= 5% of the DP step's peak) is about the models whose
memory is tight: ResNet-18 at batch 128, the GPU configuration. Its timing needs a GPU, but its
memory can be counted on a CPU: one DP step and one monitored step (fixed schedule, so the
critics and their windows exist), windows filled to capacity, then the same counting as
``report.py`` (``conftest.memory_report``: tensor bytes on CPU, ``max_memory_allocated`` on CUDA).
ResNet-18 at batch 128 holds 5.7 GB of per-sample gradients: expect ~12 GB of RAM and a minute.
"""

from __future__ import annotations

import argparse
import sys

from report import HERE, header, load_lib, machine_line, mb


def measure(lib, model: str, batch: int, device: str) -> dict:
    dp = lib.build_setup(model, "dp", device=device, batch=batch, n_batches=1)
    mon = lib.build_setup(model, "fixed", device=device, batch=batch, n_batches=1)
    for s in (dp, mon):
        s.run(1)
        s.optimizer.zero_grad(set_to_none=True)  # counting needs shapes, not B x P grads
    lib.fill_windows(mon)
    mem = lib.memory_report(dp, mon)
    mem["batch"], mem["params"] = batch, lib.param_count(dp)
    return mem


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18_gn")
    ap.add_argument("--batch", type=int, nargs="+", default=[128])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="markdown file ('-' = stdout only); default memory_results.md")
    args = ap.parse_args(argv)
    if any(b < 1 for b in args.batch):
        ap.error("--batch: batch sizes must be positive integers")
    lib = load_lib(args.device)
    rows = []
    for batch in args.batch:
        print(f"counting {args.model} at batch {batch} ...", file=sys.stderr, flush=True)
        rows.append(measure(lib, args.model, batch, args.device))
    lines = [
        *header(
            f"opacus-mi monitor memory ({args.model}, {args.device})",
            machine_line(lib, args.device),
            "memory.py",
        ),
        f"- method: {rows[0]['method']} (see `benchmarks/overhead_results.md` for what is counted)",
        "",
        "| batch | DP peak MiB | monitor state MiB | of which windows | monitor transient MiB "
        "| monitor / DP peak |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for m in rows:
        lines.append(
            f"| {m['batch']} | {mb(m['dp_peak_bytes'])} | {mb(m['monitor_state_bytes'])} | "
            f"{mb(m['state_window'])} | {mb(m['monitor_transient_bytes'])} | "
            f"{100 * m['monitor_fraction']:.1f}% |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out != "-":
        out = args.out or str(HERE / "memory_results.md")
        with open(out, "w") as f:
            f.write(text)
        print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
