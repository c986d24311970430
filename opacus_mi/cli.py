"""``opacus-mi``: train with DP-SGD and watch the measured leakage next to epsilon.

Subcommands:

* ``opacus-mi run``: one monitored run; prints the leakage table, accuracy and epsilon, and
  writes records, CSV, plots and ``report.html`` into ``--out``.
* ``opacus-mi sweep --noise-multipliers 0.5 1 2 4`` (or ``--target-epsilons``): one run per
  setting in ``<out>/sigma_<v>/`` (``eps_<v>/``) plus ``sweep.csv``, ``sweep.png`` and a report.
* ``opacus-mi report OUTDIR``: re-render a run (``records.jsonl``), sweep (``sweep.csv``) or
  validate (``validate.csv``).
* ``opacus-mi validate``: check the measured MI against real attacks (gradient inversion,
  re-identification, membership inference) over noise, batch size and training stage; writes
  ``validate.csv``, ``correlations.csv``, tables and plots into ``--out``.

Errors in arguments, data or output folders end in one ``opacus-mi: error: ...`` line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from .data import DATASETS, DataRootError
from .models import MODELS
from .sweep import SWEEP_OUT
from .training import (
    ACCOUNTANTS,
    ESTIMATORS,
    OVERLAP_CHOICES,
    TOKENIZERS,
    VIEW_CHOICES,
    MissingDependencyError,
    RunConfig,
)

PROG = "opacus-mi"
_DEFAULTS = RunConfig()


def _add_training_options(p: argparse.ArgumentParser, *, out: str | None = None) -> None:
    d = _DEFAULTS
    data = p.add_argument_group("data and model")
    data.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="training data set")
    data.add_argument(
        "--data-root",
        default=d.data_root,
        metavar="DIR",
        help="folder with the torchvision layout (cifar10, celeba); nothing is downloaded",
    )
    data.add_argument(
        "--fake-size",
        type=int,
        default=None,
        metavar="N",
        help=f"number of training images of --dataset fake (default {d.fake_size})",
    )
    data.add_argument("--model", choices=MODELS, default=d.model, help="model architecture")

    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    train.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=(
            "expected (Poisson) batch size; as Opacus does, the sampling rate is q = 1 / "
            "ceil(N / BATCH_SIZE) for N training examples (the summary shows q)"
        ),
    )
    train.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    train.add_argument(
        "--max-grad-norm", type=float, default=d.max_grad_norm, help="per-sample clipping bound C"
    )
    train.add_argument("--delta", type=float, default=d.delta, help="delta of (epsilon, delta)")
    train.add_argument(
        "--accountant", choices=ACCOUNTANTS, default=d.accountant, help="Opacus accountant"
    )
    train.add_argument(
        "--exact-epsilon",
        action="store_true",
        help="compute epsilon afresh at every record (PRV: ~25 ms each at a few hundred steps, "
        "~1 s at 10,000; by default it is recomputed as 1.5%% of the wall time affords)",
    )
    train.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda")
    train.add_argument("--seed", type=int, default=d.seed, help="random seed")
    train.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="CPU threads for torch (default: 1 for small models on CPU, else torch's default)",
    )
    train.add_argument(
        "--overlap",
        choices=OVERLAP_CHOICES,
        default=d.overlap,
        help="measure on a worker thread while training runs (auto: on a CPU with a free core)",
    )

    mon = p.add_argument_group("leakage monitor")
    mon.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default=d.estimator,
        help=(
            "learned MI estimator per view ('none': only the private view's Gram oracle, and "
            "no features or tokens are made)"
        ),
    )
    mon.add_argument(
        "--views",
        nargs="+",
        choices=VIEW_CHOICES,
        default=None,
        help="gradient views to measure (default: clipped private; private alone with "
        "--estimator none)",
    )
    mon.add_argument(
        "--token-dim",
        type=int,
        default=None,
        help=f"count-sketch dimensions per tensor (default {d.token_dim})",
    )
    mon.add_argument("--every", type=int, default=d.every, help="monitor one step in EVERY")
    mon.add_argument(
        "--train-every",
        type=int,
        default=None,
        help=(
            "train each learned critic on its first 32 batches, then once per TRAIN_EVERY "
            f"monitored steps (default {d.train_every}; the library's: as the overhead budget "
            "affords)"
        ),
    )
    mon.add_argument(
        "--train-iters",
        type=int,
        default=None,
        help=f"Adam steps per critic training round (default {d.train_iters}; library's 4)",
    )
    mon.add_argument(
        "--control",
        action="store_true",
        help="also train a critic on shuffled pairs and report it (the estimator's own bias)",
    )
    mon.add_argument(
        "--semi-oracle",
        action="store_true",
        help="also report private/semi: a learned clean-token model scored with the known noise",
    )
    mon.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default=None,
        help="what the learned critics read: sketch tokens (the default) or a learned "
        "privacy-token encoder",
    )

    out_default = out or d.out
    out = p.add_argument_group("output")
    out.add_argument("--out", default=out_default, metavar="DIR", help="output folder")
    out.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log TensorBoard scalars to <out>/tensorboard (needs tensorboard)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``opacus-mi`` argument parser (subcommands run, sweep, report, validate)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Measure, live, how much each DP-SGD step of an Opacus training run leaks "
            "(mutual information in nats), next to the accountant's epsilon."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="train once with the leakage monitor",
        formatter_class=_DefaultsHelp,
        description="Train once with DP-SGD and the leakage monitor attached.",
    )
    noise = run.add_mutually_exclusive_group()
    noise.add_argument(
        "--noise-multiplier",
        type=float,
        default=_DEFAULTS.noise_multiplier,
        help="noise multiplier sigma (0 = no noise: a non-private baseline, epsilon inf)",
    )
    noise.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help="calibrate sigma to reach this epsilon after --epochs",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="go on with the run in --out from the end of its latest epoch (checkpoint.pt, kept "
        "until a run finishes) if it ran with these settings; a finished one is kept as it is",
    )
    _add_training_options(run)

    sweep = sub.add_parser(
        "sweep",
        help="one run per noise multiplier or target epsilon",
        formatter_class=_DefaultsHelp,
        description="One monitored run per setting; tabulates MI and accuracy against epsilon.",
    )
    grid = sweep.add_mutually_exclusive_group(required=True)
    grid.add_argument(
        "--noise-multipliers",
        type=float,
        nargs="+",
        metavar="SIGMA",
        help="noise multipliers (0 = no noise: a non-private baseline, epsilon inf)",
    )
    grid.add_argument(
        "--target-epsilons", type=float, nargs="+", metavar="EPS", help="target epsilons"
    )
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs in --out that finished with these settings (each run's config.json "
        "and result.json say so), go on with a stopped one from the end of its latest epoch, "
        "and train the others: a stopped sweep goes on from there",
    )
    _add_training_options(sweep, out=SWEEP_OUT)

    report = sub.add_parser(
        "report",
        help="re-render the tables, plots and report.html of a run or sweep folder (a validate "
        "folder: its table, plot, correlations and validate.json)",
        description="Re-render from OUTDIR/records.jsonl (a run), OUTDIR/sweep.csv (a sweep) or "
        "OUTDIR/validate.csv (a validate).",
    )
    report.add_argument("outdir", metavar="OUTDIR", help="folder written by run, sweep or validate")
    _add_validate_parser(sub)
    return parser


def _add_validate_parser(sub) -> None:
    from .validate import VALIDATE_DATASETS, ValidateConfig

    d = ValidateConfig()
    val = sub.add_parser(
        "validate",
        help="check the measured MI against real attacks over noise, batch size and training",
        formatter_class=_DefaultsHelp,
        description=(
            "Train once with DP-SGD, then at each training stage, batch size and noise "
            "multiplier measure the MI of one example with the step's release and attack the "
            "release (gradient inversion, re-identification, membership inference); report "
            "Spearman's rank correlation between MI and attack success."
        ),
    )
    val.add_argument(
        "--dataset",
        choices=VALIDATE_DATASETS,
        default=d.dataset,
        help="data set (cifar10: 32x32 images, far slower than digits; lower --iters)",
    )
    val.add_argument(
        "--data-root",
        default=d.data_root,
        metavar="DIR",
        help="folder with the torchvision layout (cifar10); nothing is downloaded",
    )
    val.add_argument("--out", default=d.out, metavar="DIR", help="output folder")
    val.add_argument("--seed", type=int, default=d.seed, help="random seed")
    val.add_argument(
        "--noise-multipliers",
        type=float,
        nargs="+",
        default=list(d.noise_multipliers),
        metavar="SIGMA",
        help="noise multipliers of the attacked step (0 = no noise)",
    )
    val.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=list(d.batch_sizes),
        metavar="B",
        help="batch sizes of the released (batch-averaged) gradient",
    )
    val.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=list(d.stages),
        metavar="STEPS",
        help="training stages: checkpoints after this many DP-SGD steps",
    )
    val.add_argument(
        "--restarts",
        type=int,
        default=d.restarts,
        help="random restarts per Inverting Gradients inversion (DLG runs once)",
    )
    val.add_argument("--iters", type=int, default=d.iters, help="optimiser steps per inversion")
    val.add_argument(
        "--images",
        type=int,
        default=d.images,
        help="inputs attacked per setting (rounded up to whole batches)",
    )
    val.add_argument(
        "--candidates",
        type=int,
        default=d.candidates,
        metavar="N",
        help="candidate pool of the identification attacker (default: all 1,437 digits "
        "training images, 512 for cifar10)",
    )
    val.add_argument("--no-progress", action="store_true", help="no progress bar")


# Flags of the learned critics' tokens and training: without an estimator (and the semi-oracle,
# which learns too) nothing reads them.
_LEARNING_FLAGS = ("tokenizer", "token_dim", "train_every", "train_iters")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)", except for flags whose None default only tells the CLI
    whether they were given (their help says the real default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _refuse_unused(args: argparse.Namespace) -> None:
    """A flag given where it has no effect is refused: it was accepted and silently ignored."""
    if args.data_root is not None and args.dataset in ("digits", "fake"):
        local = "cifar10" if args.command == "validate" else "cifar10 or celeba"
        raise ValueError(
            f"--data-root is read only for --dataset {local} ({args.dataset!r} is built in); "
            "drop it, or pick a data set it holds"
        )
    accountant = getattr(args, "accountant", None)
    if getattr(args, "exact_epsilon", False) and accountant in ("rdp", "gdp"):
        raise ValueError(
            f"--exact-epsilon: with --accountant {accountant} every record's epsilon is already "
            "exact (it is cheap), so the flag would set nothing; drop it, or pass --accountant "
            "prv"
        )
    if getattr(args, "fake_size", None) is not None and args.dataset != "fake":
        raise ValueError(
            f"--fake-size sizes --dataset fake only (this run trains on {args.dataset!r}); drop "
            "it, or pass --dataset fake"
        )
    if getattr(args, "estimator", None) == "none":
        # The semi-oracle learns from tokens too, its own (a gradient subspace's, or the
        # sketch's under ghost clipping or DPDDP): a token encoder is for the learned critics.
        semi = getattr(args, "semi_oracle", False)
        unused = ("tokenizer",) if semi else _LEARNING_FLAGS
        given = [f"--{n}".replace("_", "-") for n in unused if getattr(args, n) is not None]
        if given:
            what = "no critic is learnt" if semi else "nothing is learnt"
            raise ValueError(
                f"{' '.join(given)}: with --estimator none {what} (the private view's Gram "
                "oracle needs no tokens, the semi-oracle makes its own), so these set "
                "nothing; drop them, or pick an estimator, e.g. --estimator mine"
            )


def _given(args: argparse.Namespace, name: str):
    """A flag whose default is None on the command line (to tell 'given' apart): its value,
    or RunConfig's default."""
    value = getattr(args, name)
    return getattr(_DEFAULTS, name) if value is None else value


def _config(args: argparse.Namespace, **overrides) -> RunConfig:
    _refuse_unused(args)
    cfg = RunConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        noise_multiplier=getattr(args, "noise_multiplier", _DEFAULTS.noise_multiplier),
        target_epsilon=getattr(args, "target_epsilon", None),
        max_grad_norm=args.max_grad_norm,
        delta=args.delta,
        accountant=args.accountant,
        exact_epsilon=args.exact_epsilon,
        estimator=args.estimator,
        views=None if args.views is None else tuple(args.views),
        token_dim=_given(args, "token_dim"),
        every=args.every,
        train_every=_given(args, "train_every"),
        train_iters=_given(args, "train_iters"),
        control=args.control,
        semi_oracle=args.semi_oracle,
        tokenizer=_given(args, "tokenizer"),
        device=args.device,
        seed=args.seed,
        out=args.out,
        tensorboard=args.tensorboard,
        fake_size=_given(args, "fake_size"),
        threads=args.threads,
        overlap=args.overlap,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg.validate()


def _cmd_run(args: argparse.Namespace) -> int:
    from .training import train_and_monitor

    cfg = _config(args)
    result = train_and_monitor(cfg, progress=not args.no_progress, resume=args.resume)
    print(result.summary)
    print(f"files written to {result.out_dir}/:")
    extra = ("records.jsonl", "config.json", "result.json")
    for f in [result.out_dir / name for name in extra] + result.files:
        print(f"  {f.name}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    cfg = _config(args)
    rows, table, files = run_sweep(
        cfg,
        noise_multipliers=args.noise_multipliers,
        target_epsilons=args.target_epsilons,
        progress=not args.no_progress,
        resume=args.resume,
    )
    print(table)
    out = Path(cfg.out)
    files = [*files, out / "sweep_config.json"]  # (written first, not by the render)
    print(f"files written to {out}/: " + ", ".join(f.name for f in files))
    print("runs: " + ", ".join(f"{r['setting']}/" for r in rows))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .sweep import rerender_sweep
    from .training import claim_out_dir, prepare_out_dir, rerender_run
    from .validate import rerender_validate

    out = Path(args.outdir)
    if not out.is_dir():
        raise ValueError(f"OUTDIR {str(out)!r} is not a folder")
    kinds = (("records.jsonl", rerender_run), ("sweep.csv", rerender_sweep))
    kinds += (("validate.csv", rerender_validate),)
    rerender = next((how for name, how in kinds if (out / name).is_file()), None)
    if rerender is None:
        raise ValueError(
            f"OUTDIR {str(out)!r} has none of records.jsonl (a run), sweep.csv (a sweep) or "
            "validate.csv (a validate)"
        )
    prepare_out_dir(out, name="OUTDIR")
    # (A folder a run is writing is refused, as a second run is: its own tables and plots
    # are drawn into it at its end, and the two would write the same files.)
    with claim_out_dir(out, name="OUTDIR"):
        text, files = rerender(out)
    print(text)
    print(f"re-rendered in {out}/: " + ", ".join(f.name for f in files))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import ValidateConfig, run_validate

    _refuse_unused(args)
    cfg = ValidateConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        out=args.out,
        seed=args.seed,
        noise_multipliers=tuple(args.noise_multipliers),
        batch_sizes=tuple(args.batch_sizes),
        stages=tuple(args.stages),
        restarts=args.restarts,
        iters=args.iters,
        images=args.images,
        candidates=args.candidates,
    )
    result = run_validate(cfg, progress=not args.no_progress)
    print(result.text)
    print(f"files written to {result.out_dir}/: " + ", ".join(f.name for f in result.files))
    return 0


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll says POLLERR)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def _error(message: str) -> int:
    line = " ".join(str(message).split())
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``opacus-mi: warning:`` line each, not Python's file and source line,
    written through tqdm so that a progress bar stays whole; another library's (numpy inside
    Opacus's PRV accountant, say) name the file they came from."""
    from tqdm.auto import tqdm

    text = str(message)
    ours = text.startswith(f"{PROG}: ")  # the monitor's own start with it
    text = text.removeprefix(f"{PROG}: ")
    where = Path(filename)
    if not ours and "opacus_mi" not in where.parts:  # e.g. numpy inside Opacus's PRV
        parts = where.parts
        site = next((i for i, x in enumerate(parts) if x in ("site-packages", "dist-packages")), -1)
        source = "/".join(parts[site + 1 :]) if site >= 0 else str(where)
        text = f"{text} (from {source}:{lineno})"
    tqdm.write(f"{PROG}: warning: {text}", file=file or sys.stderr)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler's time limit, ``docker stop``) raised
    as an interrupt, so that a run stops as on Ctrl-C: the monitor detached, every finished
    step's record written. Python's default would end the process with neither."""


def _terminate(signum, frame) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises :class:`_Terminated` while a command runs (the main thread only: signal
    handlers cannot be set elsewhere, e.g. in a test's or a notebook's worker thread)."""
    try:
        before = signal.signal(signal.SIGTERM, _terminate)
    except (ValueError, AttributeError, OSError):  # not the main thread, or no SIGTERM
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``opacus-mi`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and its one-line error
        return int(exc.code) if isinstance(exc.code, int) else 2
    commands = {
        "run": _cmd_run,
        "sweep": _cmd_sweep,
        "report": _cmd_report,
        "validate": _cmd_validate,
    }
    with warnings.catch_warnings():
        # Opacus and torch are chatty (secure RNG, non-full backward hooks, optimal RDP order);
        # the monitor's own RuntimeWarnings stay visible.
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = _show_warning
        started = time.time_ns()
        try:
            with _sigterm_interrupts():
                status = commands[args.command](args)
                sys.stdout.flush()  # (a closed pipe's error here, not at the interpreter's exit)
                return status
        except DataRootError as err:
            return _error(err)
        except MissingDependencyError as err:
            return _error(err)
        except (ValueError, TypeError) as err:
            return _error(err)
        except BrokenPipeError as err:
            if not _stdout_gone():  # a pipe or socket the command wrote: an error
                return _error(err)
            # Whoever read the output has gone (`| head -c 0`): the work written is kept, and
            # the exit is a shell's on SIGPIPE, not an error (stdout to /dev/null, else the
            # interpreter's last flush says it again).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # (128 + SIGPIPE)
        except OSError as err:  # (a refused file, a full disk)
            return _error(_os_error(err))
        except KeyboardInterrupt as stop:
            what, status = (
                ("terminated", 143) if isinstance(stop, _Terminated) else ("interrupted", 130)
            )
            print(
                f"{PROG}: {what}{_kept(args, started)}{_resumable(args, started)}", file=sys.stderr
            )
            return status


_ACCESS = "give yourself access to it (chmod u+rw, or u+rwx for a folder) or pass another path"
_FIXES = {
    errno.EACCES: _ACCESS,
    errno.EPERM: _ACCESS,
    errno.ENOSPC: "free some space there or pass a path on another disk",
    errno.EDQUOT: "free some of your quota there or pass a path on another disk",
    errno.EROFS: "pass a path on a writable file system",
}


def _os_error(err: OSError) -> str:
    """A file the OS refused, named once with the fix where one is known ("[Errno 28] No
    space left on device: 'x'" said neither, and a refusal read "permission denied: [Errno
    13] Permission denied: 'x'")."""
    if err.filename is None or err.strerror is None:
        return str(err)
    where = repr(str(err.filename))
    if err.filename2 is not None:
        where += f" -> {str(err.filename2)!r}"
    fix = _FIXES.get(err.errno)
    return f"{err.strerror[:1].lower()}{err.strerror[1:]}: {where}" + (f"; {fix}" if fix else "")


def _kept(args: argparse.Namespace, started: int) -> str:
    """Where a stopped run's, sweep's or validate's finished work is, and the command that
    renders it (``started``: when this command began, in ``time.time_ns()``)."""
    out = getattr(args, "out", None)
    if args.command not in ("run", "sweep", "validate") or not out or not Path(out).is_dir():
        return ""
    folder = Path(out)
    if args.command == "validate":  # (its text is written when it stops, if a setting finished)
        if not _written_since(folder / "validate.txt", started):
            return ""
        return f"; what was finished is in {out} (`{PROG} report {out}` renders it)"
    if args.command == "sweep" and not (folder / "sweep.csv").exists():
        # No run of the sweep finished (sweep.csv is written after each): `report OUT` found
        # neither a sweep nor a run there. The stopped run's own records are in its folder,
        # written since this sweep's sweep_config.json (an earlier sweep's runs stay beside).
        config = folder / "sweep_config.json"
        if not _written_since(config, started):  # (none, or an earlier sweep's)
            return ""
        since = config.stat().st_mtime_ns
        runs = [
            p
            for p in folder.glob("*/records.jsonl")
            if p.is_file() and p.stat().st_mtime_ns >= since
        ]
        if not runs:
            return ""
        stopped = max(runs, key=lambda p: p.stat().st_mtime_ns).parent
        return (
            f"; no run finished; the stopped one's records are in {stopped} "
            f"(`{PROG} report {stopped}` renders them)"
        )
    # A run's config.json is written as it starts, a sweep's sweep.csv as each run finishes:
    # older ones are an earlier command's, there until this one gets that far.
    mark = folder / ("config.json" if args.command == "run" else "sweep.csv")
    if not _ours(args, mark, started):
        return ""
    if args.command == "run" and not (folder / "records.jsonl").exists():
        return ""
    return f"; what was finished is in {out} (`{PROG} report {out}` renders it)"


def _resumable(args: argparse.Namespace, started: int) -> str:
    """How a stopped sweep goes on, once it has started (written its sweep_config.json), and
    a stopped run, once an epoch of it finished (written its checkpoint.pt)."""
    out = getattr(args, "out", None)
    mark = {"sweep": "sweep_config.json", "run": "checkpoint.pt"}.get(args.command)
    if mark is None or not out or not _ours(args, Path(out) / mark, started):
        return ""
    if args.command == "run":
        return "; the same command with --resume goes on from the end of its latest epoch"
    return "; the same command with --resume goes on from there, keeping the finished runs"


def _ours(args: argparse.Namespace, path: Path, started: int) -> bool:
    """Whether ``path`` is this command's run's: written since it began, or there when a
    ``run --resume`` took the folder's run up (its config.json, its last checkpoint)."""
    if getattr(args, "resume", False) and args.command == "run":
        return path.is_file()
    return _written_since(path, started)


def _written_since(path: Path, started: int) -> bool:
    """Whether ``path`` is a file this command wrote (since ``started``, in
    ``time.time_ns()``; a second's margin: file times come from a coarser clock)."""
    return path.is_file() and path.stat().st_mtime_ns >= started - 1_000_000_000


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
