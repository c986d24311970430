"""A complete DP-SGD training run with the leakage monitor attached, and what it writes to disk.

``train_and_monitor(RunConfig(...))`` is what ``opacus-mi run`` does: build data and model, make
them private with Opacus, attach :class:`~opacus_mi.monitor.LeakageMonitor` (the two-line
integration), train with a progress bar, evaluate test accuracy each epoch, and write
``records.jsonl``, ``records.csv``, ``config.json``, ``result.json``, ``summary.txt``, PNG plots
and ``report.html`` into ``cfg.out``. :mod:`opacus_mi.sweep` repeats it over noise multipliers
or target epsilons.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import numbers
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .checks import (
    available_device,
    flag,
    is_finite_number,
    plain_numbers,
    require_choice,
    require_finite_weights,
    require_folder,
    require_int_at_least,
    require_learning_rate,
    require_positive,
    require_seed,
)
from .data import DATASETS
from .models import MODELS
from .records import MI_FIELDS, LeakageRecord, float_of, json_safe, read_jsonl
from .report import partial_path, write_csv_rows, write_text_whole, write_whole
from .views import default_views, series_names, unmeasured_views

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "gdp")
ESTIMATORS: tuple[str, ...] = ("mine", "infonce", "nwj", "smile", "none")
TOKENIZERS: tuple[str, ...] = ("sketch", "autoencoder", "transformer")
OVERLAP_CHOICES: tuple[str, ...] = ("auto", "on", "off")
VIEW_CHOICES: tuple[str, ...] = ("raw", "clipped", "private")
SMALL_MODEL_PARAMS = 1_000_000  # below this, CPU training uses one thread (small ops gain nothing)


class MissingDependencyError(ImportError):
    """An optional dependency (TensorBoard) was asked for but is not installed."""


@dataclass
class RunConfig:
    """Settings of one monitored DP-SGD run; field names match the ``opacus-mi run`` flags.

    ``lr=0.5`` plain SGD trains the default DigitsCNN on digits to about 92% test accuracy at
    sigma 1 within 8 epochs; ``estimator="none"`` (or None) keeps only the white-box oracle.
    ``threads=None`` runs small models (under 1M parameters) on one CPU thread, which is faster
    for them than torch's thread pool (and far faster on a busy machine); larger models and GPU
    runs keep torch's default.
    """

    dataset: str = "digits"
    data_root: str | None = None
    model: str = "auto"
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.5
    noise_multiplier: float = 1.0
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "prv"
    exact_epsilon: bool = False  # PRV epsilon at every record (else paced: LeakageMonitor)
    estimator: str | None = "mine"
    views: tuple[str, ...] | None = None  # None: the monitor's default_views(estimator)
    token_dim: int = 64
    every: int = 1
    train_every: int = 2  # an analysis job: every 2nd step (the library's: as the budget affords)
    train_iters: int = 16  # Adam steps per round (library default 4): one pass over the window
    control: bool = False  # also train a critic on shuffled pairs (the estimator's bias)
    semi_oracle: bool = False  # also report private/semi (learned clean token + known noise)
    tokenizer: str = "sketch"  # what the learned critics read: sketch, autoencoder, transformer
    device: str = "cpu"
    seed: int = 0
    out: str = "runs/latest"
    tensorboard: bool = False
    fake_size: int = 256
    threads: int | None = None  # CPU threads for torch; None = 1 for small models on CPU
    overlap: str = "auto"  # measure on a worker thread: auto (CPU with a free core), on, off

    def validate(self) -> RunConfig:
        """Check every value; raise ``ValueError`` naming the offending flag. Returns self."""
        plain_numbers(self)
        require_choice("dataset", self.dataset, DATASETS)
        require_choice("model", self.model, MODELS)
        require_choice("accountant", self.accountant, ACCOUNTANTS)
        estimator = "none" if self.estimator is None else self.estimator
        require_choice("estimator", estimator, ESTIMATORS)
        require_int_at_least("epochs", self.epochs, 1)
        require_int_at_least("batch_size", self.batch_size, 1)
        require_int_at_least("token_dim", self.token_dim, 1)
        require_int_at_least("every", self.every, 1)
        require_int_at_least("train_every", self.train_every, 1)
        require_int_at_least("train_iters", self.train_iters, 1)
        require_choice("tokenizer", self.tokenizer, TOKENIZERS)
        require_seed(self.seed)
        require_int_at_least("fake_size", self.fake_size, 4)
        if self.threads is not None:
            require_int_at_least("threads", self.threads, 1)
        require_choice("overlap", self.overlap, OVERLAP_CHOICES)
        if self.overlap == "on" and str(self.device).split(":")[0] != "cpu":
            raise ValueError(
                f"{flag('overlap')} on needs {flag('device')} cpu: on {self.device} the kernels "
                f"already run asynchronously. Pass {flag('overlap')} auto or off"
            )
        require_learning_rate("lr", self.lr)
        require_positive("max_grad_norm", self.max_grad_norm)
        if self.target_epsilon is None:  # (0: no noise, a non-private baseline, epsilon inf)
            sigma = self.noise_multiplier
            if not is_finite_number(sigma) or sigma < 0:
                raise ValueError(
                    f"{flag('noise_multiplier')} must be a finite number >= 0 (0: no noise, a "
                    f"non-private baseline); got {sigma!r}"
                )
        else:
            require_positive("target_epsilon", self.target_epsilon)
        if not is_finite_number(self.delta) or not 0.0 < float(self.delta) < 1.0:
            raise ValueError(
                f"{flag('delta')} must lie strictly between 0 and 1 (e.g. 1e-5); got {self.delta!r}"
            )
        views = self.view_tuple
        bad = [v for v in views if v not in VIEW_CHOICES]
        if not views or bad:
            raise ValueError(
                f"{flag('views')} must be one or more of {', '.join(VIEW_CHOICES)}; "
                f"got {list(views)!r}"
            )
        learned = self.estimator_or_none is not None
        unmeasured = unmeasured_views(views, self.estimator_or_none)
        if unmeasured:
            raise ValueError(
                f"{flag('views')} {' '.join(views)} with {flag('estimator')} none: without a "
                f"learned estimator only the private view has a figure (its Gram oracle), so "
                f"{' '.join(unmeasured)} would never be measured; pass {flag('views')} private "
                f"(the default with {flag('estimator')} none) or pick an estimator, e.g. "
                f"{flag('estimator')} mine"
            )
        if self.control and not learned:
            raise ValueError(
                f"{flag('control')} trains a learned critic on shuffled pairs, so it needs a "
                f"learned estimator; drop it or pick one, e.g. {flag('estimator')} mine"
            )
        if self.semi_oracle and "private" not in views:
            raise ValueError(
                f"{flag('semi_oracle')} scores the private view, which {flag('views')} "
                f"{' '.join(views)} leaves out; add private to {flag('views')}"
            )
        require_folder("out", self.out)
        if self.data_root is not None:  # (blank, an unset shell variable's: it read ./)
            require_folder("data_root", self.data_root)
        _check_device(self.device)
        return self

    @property
    def estimator_or_none(self) -> str | None:
        return None if self.estimator in (None, "none") else self.estimator

    @property
    def view_tuple(self) -> tuple[str, ...]:
        if self.views is None:
            return default_views(self.estimator_or_none)
        views = (self.views,) if isinstance(self.views, str) else tuple(self.views)
        return tuple(dict.fromkeys(views))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["views"] = list(self.view_tuple)
        d["out"] = str(self.out)
        return d


@dataclass
class RunResult:
    """What a run produced (the files are in ``out_dir``)."""

    records: list[LeakageRecord]
    epsilon: float
    test_accuracy: float
    wall_seconds: float
    out_dir: Path
    noise_multiplier: float = math.nan
    accuracy_per_epoch: list[float] = field(default_factory=list)
    summary: str = ""
    files: list[Path] = field(default_factory=list)


def opacus_sample_rate(examples: int, batch_size: int) -> float:
    """Opacus's sampling rate for a loader of ``batch_size`` over ``examples``: 1 / len(loader),
    which make_private gives Poisson sampling and the accountant."""
    return 1 / math.ceil(examples / batch_size)


# ---------------------------------------------------------------------- validation helpers
def _check_device(device: Any) -> None:
    available_device(flag("device"), device)


def check_folder_kind(out: str | os.PathLike, kind: str) -> None:
    """Refuse to write a run, a sweep or a validate (``kind``) into another's folder: a run's
    and a sweep's report.html would overwrite each other, ``opacus-mi report`` would render one
    over the other, and a validate's files among a run's belong to neither."""
    path = Path(out).expanduser()
    for other, theirs in _FOLDER_MARKS.items():
        if theirs == f"a {kind}":
            continue
        try:
            held = (path / other).is_file()
        except OSError as err:  # (a folder without execute permission)
            raise _unusable_folder(flag("out"), out, err) from None
        if held:
            raise ValueError(
                f"{flag('out')} {str(out)!r} holds {theirs} ({other}); a {kind} there would mix "
                f"their files. Pass another {flag('out')} (a run's default is runs/latest, a "
                "sweep's runs/sweep, a validate's runs/validate)"
            )


# The file each kind of folder is told by (each writes it, and no other kind does).
_FOLDER_MARKS = {"records.jsonl": "a run", "sweep.csv": "a sweep", "validate.csv": "a validate"}


# Keys every run's config.json has held: how a run tells an earlier run's folder from a
# folder of someone else's files that happen to share an output's name.
_RUN_CONFIG_KEYS = frozenset({"dataset", "epochs", "batch_size", "delta", "seed", "estimator"})


def json_keys_are(keys: frozenset[str]):
    """A test that a file is a JSON object holding ``keys`` (an earlier output of ours)."""

    def ours(path: Path) -> bool:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and keys <= data.keys()

    return ours


def csv_header_has(columns: frozenset[str]):
    """A test that a file is a CSV whose header holds ``columns`` (an earlier output of ours)."""

    def ours(path: Path) -> bool:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
        except (OSError, ValueError, csv.Error):
            return False
        return columns <= set(header)

    return ours


def records_file(path: Path) -> bool:
    """A test that a file is a records.jsonl (its first line a leakage record): a run of a
    version that wrote config.json last, stopped before it, left only that."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), "")
        LeakageRecord.from_dict(json.loads(first))
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return False
    return True


def refuse_foreign_outputs(
    out: str | os.PathLike,
    outputs: Sequence[str],
    *,
    kind: str,
    marks: Sequence[tuple[str, Any]],
    extra: Sequence[str] = (),
) -> None:
    """Refuse ``out`` if it holds files under the names a ``kind`` writes (``outputs``; and the
    relative paths ``extra``) while none of its ``marks`` (``(name, test)``: a file an earlier
    ``kind`` wrote, and the test that it is one) is there: the ``kind`` clears its last
    outputs, and it cleared and overwrote anyone's (``--out .`` in a project with a
    config.json or a report.html)."""
    path = Path(out).expanduser()
    try:
        # (An empty file loses nothing: a run of an earlier version stopped at its first step
        # left an empty records.jsonl and no config.json.)
        present = [n for n in (*outputs, *extra) if _holds_something(path / n)]
        if not present or any((path / n).is_file() and ours(path / n) for n, ours in marks):
            return
    except OSError as err:  # (a folder without execute permission)
        raise _unusable_folder(flag("out"), out, err) from None
    names = " or ".join(n for n, _ in marks)
    raise ValueError(
        f"{flag('out')} {str(out)!r} holds {', '.join(present)}, which a {kind} would clear "
        f"or overwrite, and no earlier opacus-mi {kind} wrote them (no {names} of a {kind}'s "
        f"is there). Pass a new or empty {flag('out')}, or move those files"
    )


# A run's folder: its config.json, or (a version that wrote config.json last, stopped before
# it) its records.jsonl.
_RUN_MARKS = (("config.json", json_keys_are(_RUN_CONFIG_KEYS)), ("records.jsonl", records_file))


def _holds_something(path: Path) -> bool:
    """Whether ``path`` is there and not an empty file (a link or a folder counts)."""
    return os.path.lexists(path) and not (path.is_file() and path.stat().st_size == 0)


def _tensorboard_events(out: Path) -> list[str]:
    """The TensorBoard event files a run with ``--tensorboard`` left in ``out``."""
    try:
        return sorted(
            str(p.relative_to(out)) for p in (out / "tensorboard").glob("events.out.tfevents.*")
        )
    except OSError:
        return []


def prepare_out_dir(out: str | os.PathLike, *, name: str = "--out") -> Path:
    """Create ``out`` (and parents) and check that files can be written there.

    Raises ``OSError`` with a one-line message naming ``name`` (the argument that gave it)
    when that is not possible.
    """
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder")
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        reason = _not_a_folder(path, name) or err.strerror or str(err)
        raise OSError(f"cannot write to output folder {name} {str(out)!r}: {reason}") from None
    return path


def _not_a_folder(path: Path, name: str) -> str | None:
    """Why ``path`` cannot become a folder, where the OS's reason ("File exists") says less:
    a file in the way, or a symbolic link to nothing."""
    try:
        if path.is_symlink():
            target = os.readlink(path)
            try:
                path.resolve(strict=True)
            except (RuntimeError, OSError) as err:  # (3.11 raises RuntimeError on a loop)
                if isinstance(err, RuntimeError) or err.errno == errno.ELOOP:
                    return (
                        f"it is a symbolic link (to {target!r}) that loops; remove the link "
                        f"or pass another {name}"
                    )
                return (
                    f"it is a symbolic link to {target!r}, which does not exist; create that "
                    f"folder, remove the link, or pass another {name}"
                )
        if path.exists() and not path.is_dir():
            return f"it is a file, not a folder; pass another {name} (a folder is created)"
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                return f"{str(parent)!r} is a file, not a folder; pass another {name}"
    except OSError:  # (a parent the process may not search: the OS's reason says so)
        return None
    return None


def _unusable_folder(name: str, path: str | os.PathLike, err: OSError) -> OSError:
    """The error for an output folder the process may not read or search, naming the flag."""
    return OSError(
        f"cannot use output folder {name} {str(path)!r}: {err.strerror or err}; give yourself "
        f"access (chmod u+rwx) or pass another {name}"
    )


@contextlib.contextmanager
def claim_out_dir(path: Path, *, name: str = "--out"):
    """Hold ``path`` for one run, sweep or validation (an advisory lock on the folder itself,
    let go at the end or when the process dies; no file is left in it). A second opacus-mi
    process given the same folder, the default ``runs/latest`` from two terminals, is refused:
    it cleared the first one's files, which went on writing records into a deleted file, and
    left the folder a mix of the two runs' outputs."""
    try:
        import fcntl
    except ImportError:  # (Windows: no advisory locks; nothing is claimed)
        yield path
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:  # (a folder without read permission)
        raise _unusable_folder(name, path, err) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(
                f"output folder {name} {str(path)!r} is in use by another opacus-mi process: "
                f"pass another {name}, or wait for that one to end"
            ) from None
        yield path
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- training
def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingDependencyError(
            "--tensorboard needs the tensorboard package, which is not installed; "
            "run `pip install tensorboard` (or leave out --tensorboard)"
        ) from err
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            "--tensorboard needs the tensorboard package, which is not installed; "
            "run `pip install tensorboard` (or leave out --tensorboard)"
        ) from err


def _evaluate(model, loader, device) -> float:
    import torch

    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(dim=-1) == y).sum())
            total += int(y.numel())
    model.train(was_training)
    return correct / total if total else math.nan


def _latest(records: Sequence[LeakageRecord], key_prefix: str) -> float | None:
    for r in reversed(records):
        for k, v in r.mi.items():
            if k == key_prefix or k.startswith(key_prefix + "/"):
                return v.nats
    return None


def preflight(cfg: RunConfig, split: Any = None, *, kind: str = "run") -> Any:
    """Every check a run makes before it writes anything (the config, ``--out``'s ``kind``,
    TensorBoard, the data set and the batch size against it); returns the data split (``split``:
    one already loaded for this config's data set). A sweep makes them for itself and each of
    its runs before it clears the last sweep's outputs."""
    cfg.validate()
    check_folder_kind(cfg.out, kind)
    out = Path(os.path.expanduser(str(cfg.out)))
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{flag('out')} {str(cfg.out)!r} is a file, not a folder: pass a folder path (or "
            "move the file)"
        )
    if kind == "run" and out.is_dir():
        refuse_foreign_outputs(
            out,
            RUN_OUTPUTS,
            kind="run",
            marks=_RUN_MARKS,
            extra=_tensorboard_events(out),
        )
    if cfg.tensorboard:
        _check_tensorboard()
    if split is None:
        from .data import load_dataset

        split = load_dataset(
            cfg.dataset, data_root=cfg.data_root, seed=cfg.seed, fake_size=cfg.fake_size
        )
    n_train = len(split.train)
    if cfg.batch_size > n_train:
        # Opacus's sampling rate is 1 / len(loader): a larger batch would silently become q = 1.
        raise ValueError(
            f"{flag('batch_size')} {cfg.batch_size} exceeds the {n_train} training examples of "
            f"{cfg.dataset}; pass at most {n_train} (q = 1, every example in every step)"
        )
    return split


def train_and_monitor(
    cfg: RunConfig,
    progress: bool = True,
    trained: Callable[[RunResult], None] | None = None,
    resume: bool = False,
) -> RunResult:
    """Train ``cfg.model`` on ``cfg.dataset`` with DP-SGD and the leakage monitor attached.

    Writes everything into ``cfg.out`` (``records.jsonl`` is started afresh) and returns the
    records, final epsilon at ``cfg.delta``, final test accuracy and wall seconds.
    ``trained``: called with that result (no summary or files yet) once ``result.json`` is
    written, before the plots and report: a sweep keeps the run's row from there, so a stop
    while they are drawn does not lose a run whose figures are all on disk.

    Until it finishes, a run keeps its state at the end of its latest epoch in
    ``checkpoint.pt`` (Opacus's checkpoint, with the monitor's state and the random number
    generators'). ``resume``: a run in ``cfg.out`` that finished with these settings is
    returned as it is; one stopped after an epoch with these settings goes on from its
    checkpoint, as it would have gone on unstopped; what it does is said on stderr.
    """
    t_start = time.perf_counter()
    split = preflight(cfg)
    n_train = len(split.train)
    why = ""
    if resume:
        done, why = finished_run(cfg)
        if done is not None:
            print(f"{cfg.out}: kept: {why}", file=sys.stderr)
            if trained is not None:
                trained(done)
            if not done.files:  # (all drawn: drawn again for the summary it returns)
                summary, files = rerender_run(done.out_dir)
                done = replace(done, summary=summary, files=files)
            return done

    import torch
    from opacus.validators import ModuleValidator

    from .models import build_model

    _seed_everything(cfg.seed)
    # Calibrated before --out is made: a target Opacus cannot reach leaves no empty folder.
    sigma = cfg.noise_multiplier
    if cfg.target_epsilon is not None:
        sigma = calibrate_noise(cfg, n_train=n_train)
    out = prepare_out_dir(cfg.out)
    with claim_out_dir(out):
        jsonl = out / "records.jsonl"

        device = torch.device(cfg.device)
        model = build_model(cfg.model, split.input_shape, split.num_classes)
        if ModuleValidator.validate(model, strict=False):
            model = ModuleValidator.fix(model)
        ModuleValidator.validate(model, strict=True)
        model = model.to(device)
        threads = cfg.threads
        if threads is None and device.type == "cpu":
            if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
                threads = 1
        previous_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            start = _resume_point(out, cfg, why) if resume else None
            return _train(
                cfg, split, model, device, out, jsonl, t_start, progress, sigma, trained, start
            )
        finally:
            torch.set_num_threads(previous_threads)


# Below this noise multiplier one PRV epsilon takes seconds to minutes and, from ~0.1, is inf
# (the digits run: 1.8 s at 0.2, 3.6 s at 0.15, 33 s and inf at 0.1), so Opacus's bisection for
# a large target epsilon would not finish.
PRV_CALIBRATION_FLOOR = 0.2


def _check_calibration(cfg: RunConfig, *, n_train: int, option: str = "target_epsilon") -> None:
    """Refuse, in milliseconds and before anything is written, a --target-epsilon that Opacus's
    calibration could not reach (RDP: below its epsilon at Opacus's largest noise multiplier)
    or, under PRV, could only reach below the floor, where its bisection would not finish. RDP's
    epsilon bounds PRV's from above and costs milliseconds: a target above RDP's epsilon at the
    floor needs a smaller noise multiplier under PRV too."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import MAX_SIGMA

    if math.ulp(cfg.target_epsilon) >= 0.01:  # (from about 7e13)
        raise ValueError(
            f"{flag(option)} {cfg.target_epsilon:g} is too large for Opacus's calibration, "
            "whose search stops within 0.01 of the target, finer than floats are apart there "
            f"(it never ends): pass a target below 1e13, or {flag('noise_multiplier')}"
        )
    sample_rate = opacus_sample_rate(n_train, cfg.batch_size)
    steps = int(cfg.epochs / sample_rate)
    rdp = RDPAccountant()
    if cfg.accountant == "rdp":
        rdp.history = [(2 * MAX_SIGMA, sample_rate, steps)]  # where Opacus's search gives up
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the optimal order is the largest: expected here)
            floor = rdp.get_epsilon(float(cfg.delta))
        if cfg.target_epsilon <= floor:
            raise ValueError(
                f"{flag(option)} {cfg.target_epsilon:g} is out of reach: Opacus's RDP "
                f"accountant gives at least {floor:.3g} at {flag('delta')} {cfg.delta:g}, "
                f"however much noise is added. Pass a larger target or {flag('delta')}, or "
                f"{flag('accountant')} prv, whose epsilon goes lower"
            )
    if cfg.accountant != "prv":
        return
    rdp.history = [(PRV_CALIBRATION_FLOOR, sample_rate, steps)]
    ceiling = rdp.get_epsilon(float(cfg.delta))
    if cfg.target_epsilon > ceiling:
        raise ValueError(
            f"{flag(option)} {cfg.target_epsilon:g} needs a noise multiplier below "
            f"{PRV_CALIBRATION_FLOOR} for this run (epsilon there is at most {ceiling:.0f}), "
            "where Opacus's PRV accountant takes seconds to minutes per epsilon and gives inf "
            f"from ~0.1: its calibration would not finish. Pass {flag('accountant')} rdp "
            f"(calibrates in milliseconds) or set the noise with {flag(_noise_option(option))}"
        )


def _noise_option(option: str) -> str:
    """The flag that fixes the noise instead of ``option``: a sweep's --noise-multipliers."""
    return "noise_multipliers" if option == "target_epsilons" else "noise_multiplier"


# Opacus's search for the noise multiplier first tries 2 * 10, then doubles it (the target is
# below epsilon there) or bisects below it (the target is above).
_FIRST_SIGMA = 20.0


def _calibration_error(
    cfg: RunConfig, err: ValueError, *, n_train: int, option: str = "target_epsilon"
) -> ValueError | None:
    """Opacus's calibration failure ``err`` told as the flag to change and which way, or None
    if it is not one. "too low": no noise multiplier up to Opacus's largest gets epsilon down to
    the target. "different signs" (GDP only): its epsilon solver, bracketed in [0, 500], met a
    noise multiplier whose epsilon is 0 (when doubling: the target is too small) or above 500
    (when bisecting below 20: the target is too large, e.g. 10 for the digits run)."""
    message = str(err)
    if "too low" in message:
        fix = f"Pass a larger target or {flag('delta')}"
    elif "different signs" in message:
        from opacus.accountants import GaussianAccountant

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (GDP's "experimental" warning: the run gives it)
            gdp = GaussianAccountant()
        sample_rate = opacus_sample_rate(n_train, cfg.batch_size)
        gdp.history = [(_FIRST_SIGMA, sample_rate, int(cfg.epochs / sample_rate))]
        try:
            first = gdp.get_epsilon(float(cfg.delta))
        except ValueError:  # no noise multiplier works: the search fails at its first one
            fix = f"Pass {flag('accountant')} rdp"
        else:
            if cfg.target_epsilon < first:
                fix = f"Pass a larger target or {flag('delta')}"
            else:
                fix = (
                    f"Pass a smaller target (Opacus's search tried a noise multiplier whose "
                    f"epsilon is above 500, which GDP cannot solve) or {flag('accountant')} rdp"
                )
    else:
        return None
    return ValueError(
        f"{flag(option)} {cfg.target_epsilon:g}: Opacus's calibration with the "
        f"{cfg.accountant.upper()} accountant failed ({err}). {fix}, or set the noise with "
        f"{flag(_noise_option(option))}"
    )


def calibrate_noise(cfg: RunConfig, *, n_train: int, option: str = "target_epsilon") -> float:
    """The noise multiplier Opacus's ``make_private_with_epsilon`` gives ``cfg`` (the same call
    and sample rate), or the ``ValueError`` naming ``option`` that the run would fail with: a
    sweep calibrates every target this way before it trains any."""
    from opacus.accountants.utils import get_noise_multiplier

    _check_calibration(cfg, n_train=n_train, option=option)
    try:
        return get_noise_multiplier(
            target_epsilon=float(cfg.target_epsilon),
            target_delta=float(cfg.delta),
            sample_rate=opacus_sample_rate(n_train, cfg.batch_size),
            epochs=cfg.epochs,
            accountant=cfg.accountant,
        )
    except ValueError as err:
        translated = _calibration_error(cfg, err, n_train=n_train, option=option)
        if translated is None:
            raise
        raise translated from err


# Everything a run writes into --out (records.csv ... report.html by write_run_outputs).
RUN_OUTPUTS = (
    "records.jsonl",
    "records.csv",
    "config.json",
    "result.json",
    "summary.txt",
    "mi.png",
    "epsilon.png",
    "report.html",
)


def _start_run_folder(out: Path, cfg: RunConfig) -> dict[str, Any]:
    """Clear the previous run's outputs and write this run's ``config.json``, once the run is
    sure to start (after Opacus's calibration): a run that fails before keeps the last one's
    files, and one stopped midway leaves its own records beside its own config, never a mix
    (``records.jsonl`` is appended to; TensorBoard adds event files to its folder)."""
    for path in (*(out / name for name in RUN_OUTPUTS), *_checkpoint_files(out)):
        path.unlink(missing_ok=True)
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):  # ours only: no folders
        events.unlink(missing_ok=True)
    config = cfg.as_dict()
    if cfg.target_epsilon is not None:
        config["noise_multiplier"] = None  # calibrated by Opacus: see result.json
    if cfg.data_root is not None:  # (as a folder from anywhere: a --resume from another
        # working directory compares it; see _same_setting)
        config["data_root"] = os.path.abspath(os.path.expanduser(cfg.data_root))
    _write_json(out / "config.json", config)
    return config


def _train(
    cfg: RunConfig,
    split,
    model,
    device,
    out: Path,
    jsonl: Path,
    t_start: float,
    progress: bool,
    noise_multiplier: float,
    trained: Callable[[RunResult], None] | None = None,
    start: dict[str, Any] | None = None,
) -> RunResult:
    """The run itself, at ``noise_multiplier`` (``cfg``'s, or the one ``calibrate_noise`` gave
    its target: the sigma Opacus's ``make_private_with_epsilon`` would pick)."""
    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .monitor import LeakageMonitor

    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    train_loader = DataLoader(split.train, batch_size=cfg.batch_size, shuffle=True)
    test_loader = DataLoader(split.test, batch_size=max(cfg.batch_size, 256))

    engine = PrivacyEngine(accountant=cfg.accountant)
    model, optimizer, train_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(cfg.max_grad_norm),
    )
    sigma = float(optimizer.noise_multiplier)
    if start is None:
        config = _start_run_folder(out, cfg)
    else:
        config = start["config"]  # (config.json's, as _resume_point compared it)
        _restore_training(start, model, optimizer, engine, out)
        _restore_records(jsonl, start["monitor"])  # (before the monitor's sink opens it)

    fresh: list = []  # records not yet shown or logged
    monitor = LeakageMonitor(
        engine,
        model,
        optimizer,
        delta=cfg.delta,
        every=cfg.every,
        train_every=cfg.train_every,
        train_iters=cfg.train_iters,
        control=cfg.control,
        semi_oracle=cfg.semi_oracle,
        tokenizer=cfg.tokenizer,
        views=cfg.view_tuple,
        estimator=cfg.estimator_or_none,
        token_dim=cfg.token_dim,
        seed=cfg.seed,
        jsonl=str(jsonl),
        overlap={"auto": None, "on": True, "off": False}[cfg.overlap],
        exact_epsilon=cfg.exact_epsilon,
        sinks=[fresh.append],  # records as they are delivered (with overlap, a step later)
    )
    criterion = monitor.wrap_criterion(nn.CrossEntropyLoss())
    writer = None
    if cfg.tensorboard:  # (resumed: the stopped run's events from the checkpoint on are purged)
        purge = None if start is None else int(start["monitor"]["steps"])
        writer = _tensorboard_writer(out / "tensorboard", purge_step=purge)

    def to_tensorboard() -> None:
        """Log the records delivered since the last call (none are kept without a writer)."""
        if writer is not None:
            for r in fresh:
                _tb_record(writer, r)
        fresh.clear()

    accuracies: list[float] = []
    first_epoch, earlier_seconds = 0, 0.0
    if start is not None:
        try:
            monitor.load_state_dict(start["monitor"])
        except ValueError as err:
            raise _misfit(out, err) from err
        _set_rng_states(start["rng"], device)  # (last: building the monitor drew nothing)
        first_epoch, earlier_seconds = int(start["epoch"]), float(start["seconds"])
        accuracies = [float(a) for a in start["accuracies"]]
    steps_per_epoch = max(len(train_loader), 1)
    bar = tqdm(
        initial=first_epoch * steps_per_epoch,
        total=cfg.epochs * steps_per_epoch,
        disable=not progress,
        unit="step",
        desc=f"sigma {sigma:.3g}",
        dynamic_ncols=True,
        leave=True,
        # Written to a file or a CI log, each redraw is a line: a few, not one a step.
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    postfix: dict[str, str] = {}
    completed = False
    try:
        for epoch in range(first_epoch, cfg.epochs):
            bar.set_description(f"sigma {sigma:.3g} epoch {epoch + 1}/{cfg.epochs}", refresh=False)
            model.train()
            for x, y in train_loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(x), y)
                loss.backward()
                optimizer.step()
                if fresh:  # (reading monitor.history would wait for an overlap worker)
                    rec = fresh[-1]
                    postfix["eps"] = f"{rec.epsilon:.2f}"
                    if rec.carries_earlier_epsilon:
                        postfix["eps"] += f"@{rec.epsilon_step}"  # a paced PRV: its exact step
                    oracle = rec.mi.get("private/oracle")
                    if oracle is not None:
                        postfix["oracle"] = f"{oracle.nats:.3f}"
                    clipped = _latest([rec], "clipped")
                    if clipped is not None:
                        postfix["clipped"] = f"{clipped:.3f}"
                    to_tensorboard()
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
            require_finite_weights(
                model,
                when=f"in epoch {epoch + 1} of {cfg.epochs} (by step {monitor.steps})",
                lr=cfg.lr,
                noise=sigma * cfg.max_grad_norm,
                records=f"; the records up to then are in {jsonl}",
            )
            acc = _evaluate(model, test_loader, device)
            accuracies.append(acc)
            postfix["acc"] = f"{acc:.3f}"
            bar.set_postfix(postfix)
            if writer is not None:  # (at the epoch's last step, as records number steps)
                writer.add_scalar("test/accuracy", acc, monitor.steps - 1)
            if epoch + 1 < cfg.epochs:  # (what --resume goes on from)
                if writer is not None:  # every step before the checkpoint on disk: a resume
                    monitor.flush()  # purges TensorBoard from it, and a kill loses the rest
                    to_tensorboard()
                    writer.flush()
                seconds = earlier_seconds + time.perf_counter() - t_start
                _save_training(out, engine, model, optimizer, monitor, epoch + 1, accuracies,
                               seconds, device, config)  # fmt: skip
        completed = True
    finally:
        bar.close()
        monitor.detach()  # delivers the records still being made
        if writer is not None:
            to_tensorboard()
            if completed:
                _tb_final_epsilon(writer, monitor)
            writer.flush()
            writer.close()

    # The monitor's tracker: Opacus's own value, or NaN (warned) where it cannot compute one.
    epsilon = monitor.epsilon_now() if monitor.steps else 0.0
    wall = earlier_seconds + time.perf_counter() - t_start
    records = list(monitor.history)
    results = {
        "epsilon": epsilon,
        "delta": cfg.delta,
        "noise_multiplier": sigma,
        "test_accuracy": accuracies[-1] if accuracies else math.nan,
        "accuracy_per_epoch": accuracies,
        "wall_seconds": wall,
        "steps": monitor.steps,
        "mi_upper_bound": monitor.mi_accountant.bound(),  # (over the run: every step)
        "records": len(records),
        "monitor_seconds": sum(r.monitor_seconds for r in records),
    }
    _write_json(out / "result.json", results)
    (out / CHECKPOINT).unlink(missing_ok=True)  # (finished: result.json is what a resume keeps)
    result = RunResult(
        records=records,
        epsilon=epsilon,
        test_accuracy=results["test_accuracy"],
        wall_seconds=wall,
        out_dir=out,
        noise_multiplier=sigma,
        accuracy_per_epoch=accuracies,
    )
    if trained is not None:
        trained(result)
    summary, files = write_run_outputs(out, records, config=config, results=results)
    return replace(result, summary=summary, files=files)


CHECKPOINT = "checkpoint.pt"  # an unfinished run's state after its latest epoch (--resume)
_CHECKPOINT_KEYS = ("module_state_dict", "privacy_accountant_state_dict", "monitor", "rng",
                    "epoch", "accuracies", "seconds", "config")  # fmt: skip


def _checkpoint_files(out: Path) -> tuple[Path, Path]:
    """A run folder's checkpoint, and the part a kill while it was written can leave."""
    return out / CHECKPOINT, partial_path(out / CHECKPOINT)


def _as_read_back(obj: Any) -> Any:
    """``obj`` as a JSON file holding it reads back (how a config is compared and kept)."""
    return json.loads(json.dumps(json_safe(obj)))


def _save_training(
    out: Path, engine, model, optimizer, monitor, epoch: int, accuracies, seconds, device, config
) -> None:
    """Opacus's checkpoint of the run after ``epoch`` epochs, with the monitor's state and the
    generators' that training draws from (data order, Poisson sampling, noise), written whole
    or not at all (a stop while it is written keeps the one before). It carries the run's
    settings (``config``): a checkpoint copied from another run's folder is told apart."""
    import torch

    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    extra = {"monitor": monitor.state_dict(), "rng": rng, "epoch": epoch,
             "accuracies": list(accuracies), "seconds": seconds,
             "config": _as_read_back(config)}  # fmt: skip
    write_whole(
        out / CHECKPOINT,
        lambda part: engine.save_checkpoint(
            path=part, module=model, optimizer=optimizer, checkpoint_dict=extra
        ),
    )


def _resume_point(out: Path, cfg: RunConfig, finished: str = "") -> dict[str, Any] | None:
    """The checkpoint a stopped run left in ``out``, if it ran with ``cfg``'s settings; else
    None (the run starts over). What it found is said on stderr; ``finished``: why a finished
    run there is not kept (:func:`finished_run`), said where there is no checkpoint."""
    import torch

    path = out / CHECKPOINT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a damaged file is a reason, said below)
        config = _read_json(out / "config.json") if path.is_file() else None
    if not path.is_file():
        finished = finished if (out / "result.json").is_file() else ""
        why = finished or (
            "no epoch of a run there finished (no checkpoint.pt)"
            if (out / "config.json").is_file()
            else "no run there"
        )
    elif config is None:
        there = (out / "config.json").exists()
        why = f"its config.json {'cannot be read' if there else 'is missing'}"
    else:
        why = _other_settings(config, cfg, _CHECKPOINT_IGNORES)
    state = None
    if why is None:
        try:
            _check_intact(path)
            state = torch.load(path, map_location="cpu", weights_only=False)
            missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
            if missing:
                raise ValueError(f"it has no {', '.join(missing)}")
        except Exception as err:  # noqa: BLE001 - any unreadable file: said, then trained afresh
            why, state = f"its checkpoint.pt cannot be read ({err})", None
        else:  # (one copied from another run's folder)
            other = _other_settings(state["config"], cfg, _CHECKPOINT_IGNORES)
            if other is not None:
                why, state = f"its checkpoint.pt is another run's: {other}", None
    if state is None:
        print(f"{out}: trained from the start: {why}", file=sys.stderr)
        return None
    print(f"{out}: resumed after epoch {state['epoch']} of {cfg.epochs}", file=sys.stderr)
    return state


def _check_intact(path: Path) -> None:
    """Refuse a checkpoint whose bytes changed since it was written: ``torch.save`` writes a
    zip archive with a CRC-32 per record, which ``torch.load`` never checks (a flipped byte in
    a tensor loads as a wrong weight, and the run would go on from it without a word). A
    record written without one (``torch.serialization.set_crc32_options(False)``: 0) cannot be
    checked; a file not in zip form is ``torch.load``'s to judge."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size:  # (no CRC written)
                continue
            try:
                with archive.open(info) as record:
                    while record.read(1 << 20):  # (the CRC is compared at its end)
                        pass
            except zipfile.BadZipFile as err:
                raise ValueError(
                    f"its record {info.filename} fails its CRC check ({err}): the file changed "
                    "since it was written"
                ) from err


def _restore_training(state: dict[str, Any], model, optimizer, engine, out: Path) -> None:
    """Load a checkpoint's model, optimizer and accountant (Opacus's parts), or refuse in
    words that name the file (it matched the settings, so only a damaged one fails here)."""
    try:
        model.load_state_dict(state["module_state_dict"])
        engine.accountant.load_state_dict(state["privacy_accountant_state_dict"])
        if state.get("optimizer_state_dict"):
            optimizer.load_state_dict(state["optimizer_state_dict"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise _misfit(out, err) from err


def _misfit(out: Path, err: Exception) -> ValueError:
    """The error of a checkpoint that matched the settings but does not load (damaged)."""
    return ValueError(
        f"{out / CHECKPOINT} does not fit this run ({err}): delete it, or run without "
        "--resume, to train from the start"
    )


def _set_rng_states(rng: dict[str, Any], device) -> None:
    import torch

    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _restore_records(jsonl: Path, monitor_state: dict[str, Any]) -> None:
    """``records.jsonl`` as it was at the checkpoint: the monitor state's history, line for
    line as its sink wrote them (a file deleted or cut since, or holding the stopped run's
    records after the checkpoint, which the resumed run writes again, is made whole). The
    run's monitor has no ``max_history``: its history is every record."""
    lines = "".join(json.dumps(d) + "\n" for d in monitor_state["history"])
    write_whole(jsonl, lambda part: part.write_text(lines, encoding="utf-8"))


# Settings a finished run may have had otherwise and still stand for this one (``--resume``):
# where it was written and how it was run, not what it computed (torch's thread count can move
# a float's last bits, no figure a table shows); --tensorboard only where the run has its logs.
RESUME_IGNORES = frozenset({"out", "tensorboard", "threads", "overlap"})
# A checkpoint's run goes on: its TensorBoard logs must go on as they began.
_CHECKPOINT_IGNORES = RESUME_IGNORES - {"tensorboard"}


def _other_settings(config: dict[str, Any], cfg: RunConfig, ignored: set[str]) -> str | None:
    """How a run folder's ``config.json`` differs from ``cfg``'s (the settings not
    ``ignored``), said for the user; None if it does not."""
    want = cfg.as_dict()
    if cfg.target_epsilon is not None:
        want["noise_multiplier"] = None  # (as _start_run_folder writes it)
    want = _as_read_back(want)
    keys = (want.keys() | config.keys()) - ignored
    differ = sorted(
        k for k in keys if not _same_setting(k, config.get(k, "(unset)"), want.get(k, "(unset)"))
    )
    if not differ:
        return None
    said = ", ".join(
        f"{flag(k)} {config.get(k, '(unset)')!r} there, {want.get(k, '(unset)')!r} now"
        for k in differ[:3]
    )
    return f"it ran with other settings ({said}{', ...' if len(differ) > 3 else ''})"


def _same_setting(key: str, there: Any, now: Any) -> bool:
    """Whether a setting a run folder's config holds is the one given now. ``--data-root`` is
    the same folder however it is written (``data``, ``data/``, ``./data``, its absolute path):
    a trailing slash trained a finished run again, and deleted a stopped one's checkpoint. What
    the folder holds is fixed by the data sets' own checksums, which loading it checks."""
    if there == now:
        return True
    if key != "data_root" or not isinstance(there, str) or not isinstance(now, str):
        return False
    there, now = os.path.expanduser(there), os.path.expanduser(now)
    try:
        return os.path.samefile(there, now)
    except OSError:  # (one that no longer exists: the same path, spelled otherwise)
        return os.path.realpath(there) == os.path.realpath(now)


def finished_run(cfg: RunConfig) -> tuple[RunResult | None, str]:
    """The run in ``cfg.out`` if it finished with ``cfg``'s settings (its ``config.json`` says
    so, its ``result.json`` was written, its records are all there), else None and why not.

    A sweep's ``--resume`` keeps such a run instead of training it again. A run stopped while
    its plots were drawn has its figures but not all its files: they are drawn here."""
    out = Path(cfg.out).expanduser()
    if not (out / "config.json").is_file():
        return None, "no run there"
    if not (out / "result.json").is_file():
        return None, "its run did not finish (no result.json)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a damaged file is a reason, said below, not a warning)
        config, results = _read_json(out / "config.json"), _read_json(out / "result.json")
    if config is None or results is None:
        return None, "its config.json or result.json cannot be read"
    ignored = set(RESUME_IGNORES)
    if cfg.tensorboard and not any((out / "tensorboard").glob("events.out.tfevents.*")):
        ignored.discard("tensorboard")  # (asked for now: a run without its logs is trained)
    differ = _other_settings(config, cfg, ignored)
    if differ:
        return None, differ
    needed = ("epsilon", "test_accuracy", "wall_seconds", "noise_multiplier", "records")
    got = {k: float_of(results.get(k)) for k in needed}
    bad = [k for k, v in got.items() if not isinstance(v, numbers.Real) or isinstance(v, bool)]
    if bad:
        return None, f"its result.json holds no number for {', '.join(bad)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a skipped or superseded line: not a finished run's
            records = read_jsonl(out / "records.jsonl")
    except (OSError, ValueError, RuntimeWarning) as err:
        return None, f"its records.jsonl cannot be read whole ({err})"
    if len(records) < got["records"]:
        return None, (
            f"its records.jsonl holds {len(records)} records, its result.json says "
            f"{got['records']:g}"
        )
    accuracies = results.get("accuracy_per_epoch")
    result = RunResult(
        records=records,
        epsilon=float(got["epsilon"]),
        test_accuracy=float(got["test_accuracy"]),
        wall_seconds=float(got["wall_seconds"]),
        out_dir=out,
        noise_multiplier=float(got["noise_multiplier"]),
        accuracy_per_epoch=list(accuracies) if isinstance(accuracies, list) else [],
    )
    if not all((out / name).is_file() for name in RUN_OUTPUTS):
        summary, files = rerender_run(out)  # (stopped while they were drawn)
        result = replace(result, summary=summary, files=files)
    for stale in _checkpoint_files(out):  # (a stop before the run removed them)
        stale.unlink(missing_ok=True)
    return result, "finished with these settings"


def _tb_final_epsilon(writer, monitor) -> None:
    """The run's closing epsilon at its last step, where no record logged it there: a paced
    PRV epsilon left the curve at the last value a record computed (3.745 at step 160 of the
    README's main job, 3.975 at its end)."""
    last = monitor.history[-1] if monitor.history else None
    step = monitor.steps - 1
    if step < 0 or (last is not None and last.step == step and not last.carries_earlier_epsilon):
        return
    epsilon = monitor.epsilon_now()
    if math.isfinite(epsilon):
        writer.add_scalar("privacy/epsilon", epsilon, step)


def _tb_record(writer, record: LeakageRecord) -> None:
    # A record carrying an earlier step's epsilon (PRV, paced) adds no point: that value was
    # logged at its own step, by the record that computed it.
    if not record.carries_earlier_epsilon:
        writer.add_scalar("privacy/epsilon", record.epsilon, record.step)
    if record.mi_bound is not None:
        writer.add_scalar("mi/bound_per_step", record.mi_bound, record.step)
    if record.mi_upper_bound is not None and math.isfinite(record.mi_upper_bound):
        writer.add_scalar("mi/accountant_upper_bound", record.mi_upper_bound, record.step)
    for key, value in record.mi.items():
        if value.nats is not None and math.isfinite(value.nats):
            writer.add_scalar(f"mi/{key}", value.nats, record.step)
        if value.mismatched is not None and math.isfinite(value.mismatched):
            writer.add_scalar(f"mi_shuffled/{key}", value.mismatched, record.step)
        if value.control is not None and math.isfinite(value.control):
            writer.add_scalar(f"mi_control/{key}", value.control, record.step)


# ---------------------------------------------------------------------- files of a run
def _write_json(path: Path, obj: Any) -> None:
    """Strict JSON, non-finite numbers as records write them ("inf", "nan"): as null, a
    noiseless run's epsilon (inf) read back as missing."""
    write_text_whole(path, json.dumps(json_safe(obj), indent=2) + "\n")


_RECORD_COLUMNS = (
    "step",
    "batch_size",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "epsilon",
    "epsilon_step",  # the step epsilon was computed at (a paced PRV epsilon may be earlier)
    "delta",
    "mi_bound",
    "mi_upper_bound",
    "chunks",
    "monitor_seconds",
)


def mi_keys(records: Sequence[LeakageRecord]) -> list[str]:
    """Every MI series key (``view/estimator``) in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k in r.mi:
            seen.setdefault(k, None)
    return list(seen)


def write_records_csv(records: Sequence[LeakageRecord], path: str | os.PathLike) -> Path:
    """One row per record; MI flattened to ``<view/estimator>_<field>`` columns.

    Fields are ``nats``, ``ci_low``, ``ci_high``, ``n``, ``mismatched`` (the same critic on
    shuffled pairs), ``control`` (a critic trained on shuffled pairs, when enabled) and
    ``ceiling`` (the oracle's: the mean ln of its candidate sets' sizes).
    """
    keys = mi_keys(records)
    header = list(_RECORD_COLUMNS) + [f"{k}_{f}" for k in keys for f in MI_FIELDS] + ["flags"]

    def row(r: LeakageRecord) -> dict[str, Any]:  # (a series the record lacks: blank cells)
        cells = {c: getattr(r, c) for c in _RECORD_COLUMNS}
        for k, v in r.mi.items():
            cells.update({f"{k}_{f}": getattr(v, f) for f in MI_FIELDS})
        return {**cells, "flags": ";".join(r.flags)}

    return write_csv_rows((row(r) for r in records), path, header)


def _settings_for_html(config: dict[str, Any] | None) -> dict[str, Any]:
    if not config:
        return {}
    return {k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in config.items()}


def _results_items(results: dict[str, Any] | None) -> dict[str, str]:
    """Readable ``label -> value`` lines for the result of a run."""
    if not results:
        return {}
    from .report import fmt_epsilon

    def number(key: str, spec: str) -> str:  # (a field left out of result.json: "-")
        x = results.get(key)
        return "-" if x is None else format(x, spec)

    items = {}
    acc = results.get("test_accuracy")
    if acc is not None:
        items["test accuracy"] = f"{acc:.4f}"
    eps = results.get("epsilon")
    if eps is not None:  # (as the table's title gives it: 9.02e-05 at sigma 1e4, not 0.000)
        items["epsilon"] = (
            f"{fmt_epsilon(eps)} at delta {number('delta', 'g')} "
            f"(noise multiplier {number('noise_multiplier', '.4g')})"
        )
    wall = results.get("wall_seconds")
    if wall is not None:
        mon = results.get("monitor_seconds")
        extra = f" (monitor {mon:.1f} s)" if mon is not None else ""
        items["wall time"] = f"{wall:.1f} s{extra}"
    return items


def _series_asked(config: dict[str, Any] | None) -> list[str]:
    """The ``view/estimator`` series a run's settings ask for (none where they cannot be read)."""
    if not isinstance(config, dict):
        return []
    views = config.get("views")
    views = [v for v in views if isinstance(v, str)] if isinstance(views, list) else []
    estimator = config.get("estimator")
    estimator = estimator if isinstance(estimator, str) and estimator != "none" else None
    return series_names(views, estimator, config.get("semi_oracle") is True)


def write_run_outputs(
    out: str | os.PathLike,
    records: Sequence[LeakageRecord],
    *,
    config: dict[str, Any] | None = None,
    results: dict[str, Any] | None = None,
) -> tuple[str, list[Path]]:
    """Write ``records.csv``, ``summary.txt``, ``mi.png``, ``epsilon.png`` and ``report.html``.

    Returns the summary text (table plus result lines) and the files written.
    """
    from .html_report import write_html
    from .plots import plot_epsilon, plot_mi
    from .report import summary_table

    out = Path(out)
    files = [write_records_csv(records, out / "records.csv")]
    done = results or {}
    steps = done.get("steps")
    table = summary_table(
        records,
        epsilon_now=done.get("epsilon"),
        steps=int(steps) if steps is not None and math.isfinite(steps) else None,
        mi_bound_now=done.get("mi_upper_bound"),
        expected=_series_asked(config),
    )
    items = _results_items(results)
    if config is not None and not (out / "result.json").exists():  # (an opacus-mi run's
        # folder: it writes result.json once finished, so a stopped run's report read like a
        # finished one; one that cannot be read is said where it is read)
        last = f"; its records end at step {records[-1].step}" if records else ""
        resume = " (--resume goes on from its latest epoch)" if (out / CHECKPOINT).is_file() else ""
        items = {"not finished": f"the run has no result.json{last}{resume}", **items}
    summary = "\n".join([table] + [f"{k}: {v}" for k, v in items.items()])
    write_text_whole(out / "summary.txt", summary + "\n")
    files.append(out / "summary.txt")
    final = None
    if done.get("steps") and done.get("epsilon") is not None:
        final = (int(done["steps"]) - 1, float(done["epsilon"]))  # after the last step
    images = [
        plot_mi(records, out / "mi.png"),
        plot_epsilon(records, out / "epsilon.png", final=final),
    ]
    files += images
    title = "opacus-mi run"
    if config:
        title += f": {config.get('dataset', '?')}, {config.get('model', '?')} model"
    files.append(
        write_html(
            out,
            title=title,
            settings=_settings_for_html(config),
            results=items,
            table=table,
            images=images,
        )
    )
    return summary, files


def rerender_run(out: str | os.PathLike) -> tuple[str, list[Path]]:
    """Re-render a run folder's table, CSV, plots and report from its ``records.jsonl``."""
    out = Path(out)
    records = read_jsonl(out / "records.jsonl")
    ranks = sorted(p.name for p in out.glob("records.rank*.jsonl"))
    if ranks:  # (a DPDDP monitor with distributed=False: each rank's own records)
        warnings.warn(
            f"{out}: rendered records.jsonl (rank 0) only, not {', '.join(ranks)}: other "
            "ranks' own records; render one by copying it to a folder of its own as "
            "records.jsonl",
            RuntimeWarning,
            stacklevel=2,
        )
    config = _read_json(out / "config.json")
    results = _read_json(out / "result.json")
    if results is not None:  # its numbers only: a config's text (a folder "inf") stays text
        results = _numbers_only(
            out / "result.json",
            {
                k: list(map(float_of, v)) if isinstance(v, list) else float_of(v)
                for k, v in results.items()
            },
        )
    return write_run_outputs(out, records, config=config, results=results)


def _numbers_only(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without (and a warning naming) the fields a run writes as numbers that hold
    something else: an edited ``result.json`` with ``"epsilon": "abc"`` failed in a format
    call whose error named neither the file nor the field."""

    def number(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    def count(v: Any) -> bool:  # ("steps": "inf" or NaN failed in int(), a traceback)
        return number(v) and math.isfinite(v) and float(v).is_integer() and v >= 0

    bad = [
        k
        for k, v in results.items()
        if (k in _RESULT_NUMBERS and v is not None and not number(v))
        or (k == "accuracy_per_epoch" and not (isinstance(v, list) and all(map(number, v))))
    ]
    uncounted = [
        k for k in _RESULT_COUNTS if k not in bad and results.get(k) is not None
        and not count(results[k])
    ]  # fmt: skip
    for keys, what in ((bad, "a number"), (uncounted, "a whole number")):
        if keys:
            warnings.warn(
                f"{path}: {', '.join(keys)} not {what} as a run writes it; rendered without",
                RuntimeWarning,
                stacklevel=3,
            )
    return {k: v for k, v in results.items() if k not in bad and k not in uncounted}


_RESULT_COUNTS = ("steps", "records")
# result.json's numbers (see train_and_monitor)
_RESULT_NUMBERS = (
    "epsilon",
    "delta",
    "noise_multiplier",
    "test_accuracy",
    "wall_seconds",
    "steps",
    "records",
    "monitor_seconds",
    "mi_upper_bound",
)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A run's JSON file, or None if it is absent (a run stopped before writing it) or cannot
    be read, which is said in a warning: the outputs are then made without what it held."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        return data
    except (OSError, ValueError) as err:  # (JSONDecodeError and UnicodeDecodeError too)
        warnings.warn(
            f"{path}: not read ({err}); rendered without it", RuntimeWarning, stacklevel=2
        )
        return None


def config_from_kwargs(**kwargs: Any) -> RunConfig:
    """A :class:`RunConfig` from keyword arguments, ignoring keys it does not have."""
    names = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in kwargs.items() if k in names})
