"""``opacus-mi validate``: does the measured MI track what real attacks recover?

One DP-SGD training run on real data (digits by default) gives checkpoints at a few training
stages. At each stage, for each batch size ``B`` and each noise multiplier ``sigma`` of the grid,
the step's release ``y = (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / B`` is

* **measured**: ``mi_oracle``, the MI of one example with the release over a candidate pool of
  ``n`` real examples (the monitor's Gram-matrix oracle; the other ``B - 1`` examples of the step
  are part of the release's noise), and ``mi_pixels``, the MI between the example's pixels and
  the release in the model linearised around the example (it does not saturate at ``ln n``);
* **attacked**: gradient inversion (Inverting Gradients and DLG; labels recovered by iDLG at
  ``B = 1``, given at ``B > 1``, a stronger attacker than DP-SGD's)
  scored by PSNR / SSIM, Bayes re-identification (which candidates are in the step) checked
  against Fano's inequality, and a likelihood-ratio membership test.

Why these are MIs of *one example with the averaged release*: the release of a batch of ``B``
is ``(g_J + sum of the other B - 1 clipped gradients + noise) / B``. Dividing by ``B`` changes no
MI, and the other examples (drawn from the same pool, unknown to the attacker) are extra noise
on top of the DP noise: ``mi_oracle`` draws real releases with real other examples and scores
them with a posterior that models the others as Gaussian with the pool's covariance (exact at
``B = 1``, a lower bound at ``B > 1``); ``mi_pixels`` puts the others' covariance (a Ledoit-Wolf
estimate, so they are noise in every direction) into its closed form. Neither is the MI of the
per-sample view unless ``B = 1``.

It writes ``validate.csv`` (one row per setting), ``correlations.csv`` (Spearman's rho between
each MI estimate and each attack's success, with a bootstrap interval over settings),
``validate.txt`` (the printed tables), ``validate.png`` (scatter plots), ``reconstructions.png``
and ``validate.json`` into ``--out``; one that stops keeps ``validate.csv``, the table of the
settings it finished and (``validate.json``) its settings and the grid's size.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .accounting import gaussian_channel_bound
from .checks import (
    flag,
    is_finite_number,
    is_int_at_least,
    plain_numbers,
    require_finite_weights,
    require_folder,
    require_int_at_least,
    require_learning_rate,
    require_positive,
    require_seed,
)
from .records import json_safe
from .report import (
    fmt_interval,
    fmt_number,
    read_csv_rows,
    render_table,
    save_figure,
    write_csv_rows,
    write_text_whole,
)

VALIDATE_DATASETS: tuple[str, ...] = ("digits", "cifar10")
DEFAULT_NOISE: tuple[float, ...] = (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 4, 16)
DEFAULT_STAGES: tuple[int, ...] = (0, 60, 180)
PSNR_CAP = 60.0  # dB; a per-image PSNR above this counts as 60 when averaged (exact recovery)
# sigma = 1e6 already bounds the step's MI by 1 / (2 sigma^2) = 5e-13 nats (the default grid's
# attacks are at chance from sigma = 0.1), so larger values measure nothing new; from ~1e38 on, the
# float32 release sum clip(g) + N(0, sigma^2 C^2 I) overflows and the attacks fail on infinities.
MAX_NOISE_MULTIPLIER = 1e6
CORRELATION_TARGET = 0.8
# Resamples a 95% percentile bootstrap interval needs: one in each 2.5% tail.
MIN_BOOTSTRAP = 40
# A correlation's verdict needs this many settings with both values. A 95% percentile bootstrap
# over fewer is degenerate (every non-constant resample of 3 monotone points has rho = 1): with
# MI and attack independent normals, it put the interval's lower end at >= 0.8 in 17% of grids of
# 3 settings and 3.4% of 4, against 0.9% of 5 and 0.05% of 6 (4,000 grids each, 2,000 resamples).
MIN_PAIRS = 5
# Everything a validate writes into --out (by write_outputs).
VALIDATE_OUTPUTS = (
    "validate.csv",
    "correlations.csv",
    "validate.txt",
    "validate.png",
    "reconstructions.png",
    "validate.json",
)
SMALL_MODEL_PARAMS = 1_000_000
# Columns every validate.csv has had: how a validate tells an earlier one's folder.
_VALIDATE_MARK = frozenset({"setting", "step", "batch_size", "noise_multiplier"})

# The grid's columns, in validate.csv order.
COLUMNS: tuple[str, ...] = (
    "setting",
    "step",
    "batch_size",
    "noise_multiplier",
    "noise_std",
    "candidates",
    "mi_oracle",
    "mi_oracle_ci_low",
    "mi_oracle_ci_high",
    "ln_candidates",
    "mi_pixels",
    "channel_bound",
    "reid_acc",
    "reid_top1",
    "fano_bound",
    "fano_ok",
    "mia_auc",
    "mia_tpr_at_1pct_fpr",
    "ig_psnr",
    "ig_ssim",
    "dlg_psnr",
    "dlg_ssim",
    "psnr_mean_image",
    "psnr_linear_gauss",
    "label_acc",
    "images",
    "test_accuracy",
)
MI_ESTIMATES: tuple[tuple[str, str], ...] = (
    ("mi_oracle", "MI oracle"),
    ("mi_pixels", "MI pixels"),
)
ATTACK_METRICS: tuple[tuple[str, str], ...] = (
    ("ig_psnr", "inversion PSNR (Inverting Gradients)"),
    ("dlg_psnr", "inversion PSNR (DLG)"),
    ("reid_acc", "re-identification accuracy (top-B)"),
    ("reid_top1", "re-identification accuracy (top-1)"),
    ("mia_auc", "membership inference AUC"),
)


@dataclass
class ValidateConfig:
    """Settings of ``opacus-mi validate``; field names match its flags.

    ``stages`` are numbers of DP-SGD steps of one training run (``train_noise_multiplier``,
    ``max_grad_norm``, ``train_batch_size``, ``lr``); the grid's ``noise_multipliers`` are the
    noise of the attacked step. ``images`` inputs are attacked per setting (``ceil(images / B)``
    batches); ``candidates`` is the size of the pool the identification attacker knows (default:
    all 1,437 digits training images, 512 for CIFAR-10); ``draws`` releases per setting for the
    identification and membership attacks.
    """

    dataset: str = "digits"
    data_root: str | None = None
    out: str = "runs/validate"
    seed: int = 0
    noise_multipliers: tuple[float, ...] = DEFAULT_NOISE
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    stages: tuple[int, ...] = DEFAULT_STAGES
    restarts: int = 2
    iters: int = 200
    images: int = 8
    candidates: int | None = None
    draws: int = 256
    max_grad_norm: float = 1.0
    train_noise_multiplier: float = 1.0
    train_batch_size: int = 64
    lr: float = 0.5
    bootstrap: int = 2000

    def validate(self) -> ValidateConfig:
        """Check every value; raise ``ValueError`` naming the flag. Returns self."""
        plain_numbers(self)
        if self.dataset not in VALIDATE_DATASETS:
            raise ValueError(
                f"--dataset must be one of {', '.join(VALIDATE_DATASETS)}; got {self.dataset!r}"
            )
        self.noise_multipliers = _values(
            "noise_multipliers",
            self.noise_multipliers,
            float,
            lambda v: 0 <= v <= MAX_NOISE_MULTIPLIER,
            f"from 0 to {MAX_NOISE_MULTIPLIER:g} (at {MAX_NOISE_MULTIPLIER:g} a step leaks at most "
            "5e-13 nats; far larger values overflow the float32 release)",
        )
        for a, b in zip(self.noise_multipliers, self.noise_multipliers[1:], strict=False):
            if sigma_label(a) == sigma_label(b):  # sorted, and rounding keeps the order
                raise ValueError(
                    f"--noise-multipliers {a!r} and {b!r} would both be named "
                    f"sigma{sigma_label(a)} in validate.csv and the figures: pass values that "
                    "differ in their first 6 significant digits"
                )
        self.batch_sizes = _values("batch_sizes", self.batch_sizes, int, lambda v: v >= 1, ">= 1")
        self.stages = _values("stages", self.stages, int, lambda v: v >= 0, ">= 0")
        for name in ("restarts", "iters", "images", "train_batch_size"):
            require_int_at_least(name, getattr(self, name), 1)
        # (one draw has no standard error: Fano's check would read it as violated)
        require_int_at_least("draws", self.draws, 2)
        require_seed(self.seed)
        if not (self.bootstrap == 0 or is_int_at_least(self.bootstrap, MIN_BOOTSTRAP)):
            raise ValueError(
                f"--bootstrap must be 0 (no intervals) or an integer >= {MIN_BOOTSTRAP} (a 95% "
                f"percentile interval needs a resample in each 2.5% tail); got {self.bootstrap!r}"
            )
        if self.candidates is not None:
            require_int_at_least("candidates", self.candidates, 2)
        for name in ("max_grad_norm", "train_noise_multiplier"):
            require_positive(name, getattr(self, name))
        require_learning_rate("lr", self.lr)
        require_folder("out", self.out)
        if self.data_root is not None:
            require_folder("data_root", self.data_root)
        self.out = os.path.expanduser(str(self.out))  # "--out=~/x" reaches us unexpanded
        return self

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("noise_multipliers", "batch_sizes", "stages"):
            d[k] = list(d[k])
        return d


@dataclass
class ValidateResult:
    rows: list[dict[str, Any]]
    correlations: list[dict[str, Any]]
    text: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    wall_seconds: float = math.nan


# ---------------------------------------------------------------------- validation helpers
def sigma_label(sigma: float) -> str:
    """A noise multiplier as settings, tables and figures name it (6 significant digits)."""
    return f"{sigma:g}"


def _values(name, values, kind, ok, rule) -> tuple:
    if isinstance(values, (int, float)):
        values = (values,)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{flag(name)} must be a number or a sequence of numbers; got {values!r}")
    values = tuple(values)
    if not values:
        raise ValueError(f"{flag(name)} needs at least one value")
    out = []
    for v in values:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{flag(name)} values must be integers {rule}; got {v!r}")
        if not is_finite_number(v) or not ok(v):
            raise ValueError(f"{flag(name)} values must be finite numbers {rule}; got {v!r}")
        out.append(kind(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{flag(name)} values must be distinct; got {list(values)!r}")
    return tuple(sorted(out))


# ---------------------------------------------------------------------- data and training
def _pool(dataset, count: int):
    import torch

    if hasattr(dataset, "tensors"):
        x, y = dataset.tensors[0][:count], dataset.tensors[1][:count]
        return x.clone(), y.clone().long()
    xs, ys = zip(*(dataset[i] for i in range(count)), strict=True)
    return torch.stack(list(xs)), torch.as_tensor(ys, dtype=torch.long)


def _pixel_bounds(name: str, x):
    """Per-channel ``(lo, hi)`` of valid inputs in the normalised space the model sees."""
    import torch

    if name == "cifar10":
        from .data import _CIFAR10_MEAN, _CIFAR10_STD

        mean = torch.tensor(_CIFAR10_MEAN)
        std = torch.tensor(_CIFAR10_STD)
        return -mean / std, (1 - mean) / std
    dims = (0, 2, 3)
    return x.amin(dim=dims), x.amax(dim=dims)


def _train_checkpoints(cfg: ValidateConfig, split, model, progress_bar) -> dict[int, dict]:
    """Train with Opacus DP-SGD and snapshot the weights after each stage's number of steps."""
    import torch
    import torch.nn.functional as F
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    loader = DataLoader(split.train, batch_size=cfg.train_batch_size, shuffle=True)
    engine = PrivacyEngine(accountant="rdp")
    private, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=cfg.train_noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
    )
    stages = sorted(cfg.stages)
    snaps: dict[int, dict] = {}

    def snap(step):
        if step:  # (the attacks on a diverged model's gradients would measure nothing)
            noise = cfg.train_noise_multiplier * cfg.max_grad_norm
            require_finite_weights(model, when=f"by step {step}", lr=cfg.lr, noise=noise)
        snaps[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    step = 0
    if 0 in stages:
        snap(0)
    last = stages[-1]
    while step < last:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            # Also on an empty Poisson batch: Opacus needs the backward to set grad_sample, and
            # then releases noise only, as it should.
            F.cross_entropy(private(x), y).backward()
            opt.step()
            step += 1
            progress_bar.update(1)
            if step in stages:
                snap(step)
            if step >= last:
                break
    private.remove_hooks()
    return snaps


def _accuracy(model, dataset) -> float:
    import torch
    from torch.utils.data import DataLoader

    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=512):
            correct += int((model(x).argmax(dim=-1) == y).sum())
            total += len(y)
    return correct / total if total else math.nan


# ---------------------------------------------------------------------- the grid
def run_validate(cfg: ValidateConfig, progress: bool = True) -> ValidateResult:
    """Run the grid, write every output file into ``cfg.out`` and return rows and correlations."""
    cfg.validate()
    import torch

    grid = len(cfg.stages) * len(cfg.batch_sizes) * len(cfg.noise_multipliers)
    if grid < MIN_PAIRS:
        sizes = (len(cfg.stages), len(cfg.batch_sizes), len(cfg.noise_multipliers))
        warnings.warn(
            f"a grid of {grid} setting{'s' * (grid > 1)} ({sizes[0]} --stages x {sizes[1]} "
            f"--batch-sizes x {sizes[2]} --noise-multipliers) is too small for a correlation "
            f"verdict, which needs {MIN_PAIRS} settings: add values to any of these flags",
            RuntimeWarning,
            stacklevel=2,
        )
    t0 = time.perf_counter()
    previous_threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []  # the grid's, each written to validate.csv as it finishes
    out = Path(cfg.out)
    # The grid seeds torch's and numpy's global generators (model initialisation, Opacus's
    # noise): the caller's streams are put back as they were.
    numpy_state = np.random.get_state()
    held = contextlib.ExitStack()  # --out, claimed once made, until every file is written
    correlations = None
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            extras = _run_grid(cfg, progress, rows, held)
        correlations = compute_correlations(rows, resamples=cfg.bootstrap, seed=cfg.seed)
        wall = time.perf_counter() - t0
        text, files = write_outputs(
            out, rows, correlations, config=cfg.as_dict(), extras=extras, wall_seconds=wall
        )
    except (Exception, KeyboardInterrupt):  # Ctrl-C or a crash: keep what the grid has done
        if rows:
            write_csv(rows, out / "validate.csv", COLUMNS)
            txt = out / "validate.txt"
            if correlations is not None and _has_correlations(txt):
                # Stopped while the plots were drawn: the whole grid's text is kept as written.
                note = (
                    "stopped while writing the plots and validate.json; the grid and its "
                    "correlations above are complete (correlations.csv)"
                )
                with txt.open("a", encoding="utf-8") as f:
                    f.write(note + "\n")
            else:
                note = f"stopped after {len(rows)} of the grid's {grid} settings"
                write_text_whole(txt, f"{grid_table(rows)}\n{note}\n")
                # Its settings and the grid's size, for `report`: without them it rendered the
                # finished settings as a whole grid of that size, with an empty config.
                summary = {"config": cfg.as_dict(), "settings": len(rows), "grid": grid}
                _write_summary(out, summary)
        raise
    finally:
        torch.set_num_threads(previous_threads)
        np.random.set_state(numpy_state)
        held.close()
    return ValidateResult(rows, correlations, text, out, files, wall)


def _run_grid(
    cfg: ValidateConfig, progress: bool, rows: list[dict[str, Any]], held: contextlib.ExitStack
):
    import torch
    from opacus.validators import ModuleValidator
    from tqdm.auto import tqdm

    from . import attacks as A
    from .data import load_dataset
    from .models import build_model
    from .training import (
        check_folder_kind,
        claim_out_dir,
        csv_header_has,
        prepare_out_dir,
        refuse_foreign_outputs,
    )

    split = load_dataset(cfg.dataset, data_root=cfg.data_root, seed=cfg.seed)
    torch.default_generator.manual_seed(cfg.seed)  # (the CPU's: the grid runs there)
    np.random.seed(cfg.seed % 2**32)

    def fresh_model():
        m = build_model("auto", split.input_shape, split.num_classes)
        return ModuleValidator.fix(m) if ModuleValidator.validate(m, strict=False) else m

    model = fresh_model()
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)

    n_train = len(split.train)
    n_pool = cfg.candidates or (n_train if cfg.dataset == "digits" else 512)
    if n_pool > n_train:
        raise ValueError(f"--candidates {n_pool} exceeds the {n_train} training examples")
    need = max(cfg.batch_sizes) + 1  # the example and B others to tell it from
    if need > n_train:
        raise ValueError(
            f"--batch-sizes {max(cfg.batch_sizes)} leaves no candidate outside the batch: "
            f"{cfg.dataset} has {n_train} training examples, so pass batch sizes up to "
            f"{n_train - 1}"
        )
    if n_pool < need:
        raise ValueError(
            f"--candidates {n_pool} is too few for batch size {need - 1}: pass at least {need} "
            f"(at most {n_train})"
        )
    shape = tuple(split.input_shape)
    x_pool, y_pool = _pool(split.train, n_pool)
    lo, hi = _pixel_bounds(cfg.dataset, x_pool)
    span = (hi - lo).view(-1, 1, 1)

    def unit(x):  # inputs -> [0, 1] pixels
        return ((x - lo.view(-1, 1, 1)) / span).clamp(0, 1)

    c = cfg.max_grad_norm
    gen = torch.Generator().manual_seed(cfg.seed)
    # Inputs attacked per batch size: the same ones at every stage and noise level.
    order = torch.randperm(n_pool, generator=gen)
    batches: dict[int, torch.Tensor] = {}
    for b in cfg.batch_sizes:
        t = math.ceil(cfg.images / b)
        if t * b > n_pool:
            fix = (
                f"pass --candidates >= {t * b} (at most {n_train}) or fewer --images"
                if t * b <= n_train
                else f"pass --images <= {n_train // b * b}"
            )
            raise ValueError(
                f"--images {cfg.images} at batch size {b} needs {t * b} candidates (whole "
                f"batches): {fix}"
            )
        batches[b] = order[: t * b].reshape(t, b)
    block = 1
    while (
        shape[0] * (shape[1] // block) * (shape[2] // block) > 256 and shape[1] % (2 * block) == 0
    ):
        block *= 2
    pooled = torch.nn.functional.avg_pool2d(x_pool, block) if block > 1 else x_pool
    prior_var = pooled.var(dim=0).reshape(-1).double()

    check_folder_kind(cfg.out, "validate")
    if Path(cfg.out).is_dir():
        refuse_foreign_outputs(
            cfg.out,
            VALIDATE_OUTPUTS,
            kind="validate",
            marks=(("validate.csv", csv_header_has(_VALIDATE_MARK)),),
        )
    out = prepare_out_dir(cfg.out)  # (once every check has passed: no empty folder left)
    held.enter_context(claim_out_dir(out))
    sigmas = list(cfg.noise_multipliers)
    total = max(cfg.stages) + len(cfg.stages) * len(cfg.batch_sizes) * (2 * cfg.iters + len(sigmas))
    bar = tqdm(total=total, disable=not progress, unit="it", dynamic_ncols=True, leave=True)
    recon_examples: list[dict[str, Any]] = []
    try:
        bar.set_description("DP-SGD training")
        snaps = _train_checkpoints(cfg, split, model, bar)
        model = fresh_model()  # no Opacus hooks: the attacker holds a plain copy of the weights
        for step in sorted(cfg.stages):
            model.load_state_dict(snaps[step])
            model.eval()
            test_acc = _accuracy(model, split.test)
            gf = A.GradientFunction(model)
            bar.set_description(f"step {step}: candidate gradients")
            with torch.no_grad():
                pool_grads = A.clip_rows(gf.per_sample(x_pool, y_pool), c)
            channel = A.CandidateChannel(pool_grads)
            del pool_grads
            for b in cfg.batch_sizes:
                idx = batches[b]
                bar.set_description(f"step {step} B={b}: pixel information")
                pixel_models = []  # every attacked input's, as the attacks are scored on all
                for i in idx.reshape(-1).tolist():
                    jac = A.input_jacobian(gf, x_pool[i], y_pool[i], max_grad_norm=c, block=block)
                    jac = jac.double()
                    pixel_models.append(
                        A.PixelModel(
                            jtj=jac.T @ jac, proj=channel.project(jac), prior_var=prior_var
                        )
                    )
                    del jac
                # Releases for every (noise level, batch), attacked all at once.
                targets, labels, truth = [], [], []
                for s in sigmas:
                    for bi in idx:
                        targets.append(
                            A.private_release(
                                gf,
                                x_pool[bi],
                                y_pool[bi],
                                max_grad_norm=c,
                                noise_multiplier=s,
                                generator=gen,
                            )
                        )
                        labels.append(y_pool[bi])
                        truth.append(x_pool[bi])
                targets_t = torch.stack(targets)
                labels_t = torch.stack(labels)
                label_acc = [math.nan] * len(sigmas)
                if b == 1:
                    rec = torch.tensor([[A.recover_label(t, gf)] for t in targets_t])
                    hits = (rec == labels_t).double().reshape(len(sigmas), -1).mean(dim=1)
                    label_acc = hits.tolist()
                    labels_t = rec
                scores = {}
                images = {}
                # IG with --restarts random starts; DLG once, as published.
                for name, attack, restarts in (
                    ("ig", A.inverting_gradients, cfg.restarts),
                    ("dlg", A.dlg, 1),
                ):
                    bar.set_description(f"step {step} B={b}: {name.upper()}")
                    inv = attack(
                        gf,
                        targets_t,
                        labels_t,
                        input_shape=shape,
                        max_grad_norm=c,
                        iters=cfg.iters,
                        restarts=restarts,
                        bounds=(lo, hi),
                        generator=gen,
                        callback=lambda _it: bar.update(1),
                    )
                    p_all, s_all, matched = [], [], []
                    for k in range(len(targets_t)):
                        # A summed gradient loses the batch order: each input is scored (and
                        # plotted) with the reconstruction assigned to it.
                        rec, true_k = unit(inv.images[k]), unit(truth[k])
                        rec = rec[torch.as_tensor(A.match_reconstructions(rec, true_k))]
                        matched.append(rec)
                        p_all.append(A.psnr(rec, true_k).clamp(max=PSNR_CAP))
                        s_all.append(A.ssim(rec, true_k))
                    t_count = len(idx)
                    scores[name] = (
                        torch.stack(p_all).reshape(len(sigmas), -1).mean(dim=1).tolist(),
                        torch.stack(s_all).reshape(len(sigmas), -1).mean(dim=1).tolist(),
                    )
                    images[name] = torch.stack(matched).reshape(len(sigmas), t_count * b, *shape)
                truth_b = x_pool[idx.reshape(-1)]
                mean_img = x_pool.mean(dim=0, keepdim=True).expand_as(truth_b)
                base = float(A.psnr(unit(mean_img), unit(truth_b)).clamp(max=PSNR_CAP).mean())
                if b == min(cfg.batch_sizes):
                    recon_examples.append(
                        {"step": step, "batch_size": b, "truth": unit(truth_b)[:4]}
                        | {sigma_label(s): images["ig"][k][:4] for k, s in enumerate(sigmas)}
                    )
                for k, s in enumerate(sigmas):
                    bar.set_description(f"step {step} B={b}: identification")
                    noise_std = s * c
                    ident = channel.identify(b, noise_std, gen, draws=cfg.draws)
                    mia = channel.membership(b, noise_std, gen, draws=cfg.draws)
                    mi_pix, post = [], []
                    for pm in pixel_models:
                        m, v = A.pixel_information(pm, channel, b, noise_std)
                        mi_pix.append(m)
                        post.append(v)
                    lg_psnr = math.nan
                    if block == 1:
                        per_pixel = torch.stack(post).mean(dim=0).reshape(shape)
                        mse = float((per_pixel / span**2).mean())
                        lg_psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
                    fano = A.fano_accuracy_bound(ident.mi, channel.n, guesses=b)
                    rows.append(
                        _row(
                            step=step,
                            b=b,
                            s=s,
                            c=c,
                            ident=ident,
                            fano=fano,
                            mia=mia,
                            mi_pixels=float(np.mean(mi_pix)),
                            ig=(scores["ig"][0][k], scores["ig"][1][k]),
                            dlg=(scores["dlg"][0][k], scores["dlg"][1][k]),
                            base=base,
                            lg_psnr=lg_psnr,
                            label_acc=label_acc[k],
                            images=int(idx.numel()),
                            test_acc=test_acc,
                        )
                    )
                    if len(rows) == 1:  # the last validate's files go once this one has a row
                        for stale in VALIDATE_OUTPUTS:
                            (out / stale).unlink(missing_ok=True)
                    write_csv(rows, out / "validate.csv", COLUMNS)  # a stopped one keeps its rows
                    bar.update(1)
            del channel
    finally:
        bar.close()
    return {"recon": recon_examples, "block": block}


def _fano_consistent(ident, batch_size: int) -> bool:
    """Fano's ceiling holds up to Monte Carlo error: the accuracy's 95% Wilson lower limit is
    at most the ceiling at the MI's upper 95% limit."""
    from .attacks import fano_accuracy_bound

    n, p, z = ident.draws, ident.accuracy_top_b, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    ceiling = fano_accuracy_bound(ident.mi + 1.96 * ident.mi_se, ident.candidates, batch_size)
    return centre - half <= ceiling + 1e-12


def _fano_line(rows: Sequence[dict[str, Any]]) -> str:
    """Whether Fano's ceiling held, as :func:`_fano_consistent` judges it (up to Monte Carlo
    error), naming the settings whose point values cross it all the same (re-id 0.61 against
    a ceiling of 0.60 read as "holds in every setting", with no word of the tolerance)."""
    tolerance = (
        "up to Monte Carlo error: the re-id accuracy's 95% Wilson lower limit against the "
        "ceiling at the MI oracle's upper 95% limit"
    )
    broken = [r["setting"] for r in rows if not int(r["fano_ok"])]
    if broken:
        return f"Fano's inequality is violated ({tolerance}) in: {', '.join(broken)}"
    crossed = [r["setting"] for r in rows if r["reid_acc"] > r["fano_bound"]]
    return f"Fano's inequality holds in every setting ({tolerance})" + (
        f"; the point values cross it in {', '.join(crossed)}" if crossed else ""
    )


def _round(v: float) -> float:
    """Values are stored with 8 significant digits, so correlations recomputed from
    validate.csv are exactly the reported ones."""
    if not isinstance(v, float) or not math.isfinite(v):
        return v
    return float(f"{v:.8g}")


def _row(*, step, b, s, c, ident, fano, mia, mi_pixels, ig, dlg, base, lg_psnr, label_acc,
         images, test_acc) -> dict[str, Any]:  # fmt: skip
    half = 1.96 * ident.mi_se
    bound = gaussian_channel_bound(s)
    row = {
        "setting": f"step{step}_B{b}_sigma{sigma_label(s)}",
        "step": step,
        "batch_size": b,
        "noise_multiplier": s,
        "noise_std": s * c,
        "candidates": ident.candidates,
        "mi_oracle": ident.mi,
        "mi_oracle_ci_low": ident.mi - half,
        "mi_oracle_ci_high": ident.mi + half,
        "ln_candidates": math.log(ident.candidates),
        "mi_pixels": mi_pixels,
        "channel_bound": bound,
        "reid_acc": ident.accuracy_top_b,
        "reid_top1": ident.accuracy,
        "fano_bound": fano,
        "fano_ok": int(_fano_consistent(ident, b)),
        "mia_auc": mia.auc,
        "mia_tpr_at_1pct_fpr": mia.tpr_at_1pct_fpr,
        "ig_psnr": ig[0],
        "ig_ssim": ig[1],
        "dlg_psnr": dlg[0],
        "dlg_ssim": dlg[1],
        "psnr_mean_image": base,
        "psnr_linear_gauss": lg_psnr,
        "label_acc": label_acc,
        "images": images,
        "test_accuracy": test_acc,
    }
    return {k: _round(float(v)) if isinstance(v, float) else v for k, v in row.items()}


# ---------------------------------------------------------------------- correlations
def target_verdict(rho: float, low: float, high: float, *, pairs: int) -> str:
    """Whether rho >= ``CORRELATION_TARGET`` holds given its interval over ``pairs`` settings:
    "met" when the interval's lower end clears the target, "missed" when its upper end is below
    it, "inconclusive" when the interval contains the target, there is none (no bootstrap) or
    it comes from fewer than ``MIN_PAIRS`` settings, "undefined" when there is no rho (a
    constant column, such as an MI saturated at ln n, or fewer than 3 settings). A point
    estimate alone cannot tell 0.800 [0.64, 0.90] from a miss."""
    if not is_finite_number(rho):
        return "undefined"
    if pairs < MIN_PAIRS:
        return "inconclusive"
    if is_finite_number(low) and low >= CORRELATION_TARGET:
        return "met"
    if is_finite_number(high) and high < CORRELATION_TARGET:
        return "missed"
    return "inconclusive"


def compute_correlations(
    rows: list[dict[str, Any]], *, resamples: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """Spearman's rho of every MI estimate against every attack metric, over the grid's rows,
    with a 95% percentile bootstrap interval (rows resampled with their own numpy Generator)
    and its :func:`target_verdict`. A row whose MI or attack value is NaN is left out of that
    pair's correlation: ``pairs`` counts the rows used, ``settings`` the grid's; ``note`` says
    why a rho is undefined or has no verdict, and how many settings it used if not all."""
    from .attacks import spearman, spearman_bootstrap

    out = []
    for m_key, m_name in MI_ESTIMATES:
        for a_key, a_name in ATTACK_METRICS:
            x = [r[m_key] for r in rows]
            y = [r[a_key] for r in rows]
            pairs = sum(not (_is_nan(u) or _is_nan(v)) for u, v in zip(x, y, strict=True))
            if resamples > 0:
                rng = np.random.default_rng(seed)
                rho, lo, hi = spearman_bootstrap(x, y, resamples=resamples, rng=rng)
            else:
                rho, lo, hi = spearman(x, y), math.nan, math.nan
            verdict = target_verdict(rho, lo, hi, pairs=pairs)
            note = _note(verdict, x, y, pairs, len(rows), m_name)
            out.append(
                {
                    "mi": m_key,
                    "attack": a_key,
                    "mi_name": m_name,
                    "attack_name": a_name,
                    "spearman": rho,
                    "ci_low": lo,
                    "ci_high": hi,
                    "settings": len(rows),
                    "pairs": pairs,
                    "meets_target": int(verdict == "met"),
                    "verdict": verdict,
                    "note": note,
                }
            )
    return out


def _note(verdict: str, x: list, y: list, pairs: int, settings: int, mi_name: str) -> str:
    used = f"{pairs} of {settings}" if pairs < settings else f"{pairs}"
    used += " setting" if settings == 1 else " settings"
    if verdict == "undefined":
        if pairs < 3:
            return f"{used}, rho needs 3"
        kept = [(u, v) for u, v in zip(x, y, strict=True) if not (_is_nan(u) or _is_nan(v))]
        return f"{mi_name} constant" if len({u for u, _ in kept}) == 1 else "attack constant"
    if pairs < MIN_PAIRS:
        return f"{used}, fewer than {MIN_PAIRS}"
    return used if pairs < settings else ""


def _is_nan(v: Any) -> bool:
    """NaN as :func:`~opacus_mi.attacks.spearman` drops it (its float64 array: None and NumPy
    floats too), so ``pairs`` counts the rows the correlation used."""
    return v is None or (isinstance(v, numbers.Real) and math.isnan(float(v)))


def left_out(rows: list[dict[str, Any]]) -> list[str]:
    """Each setting some correlation leaves out, with its MI or attack values that are NaN."""
    out = []
    for r in rows:
        nan = [name for key, name in MI_ESTIMATES + ATTACK_METRICS if _is_nan(r[key])]
        if nan:
            out.append(f"{r['setting']} ({', '.join(nan)}: NaN)")
    return out


# ---------------------------------------------------------------------- outputs
def write_csv(rows: list[dict[str, Any]], path: Path, columns) -> Path:
    return write_csv_rows(rows, path, columns)


def read_validate_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``validate.csv`` with numbers parsed (blank cells are NaN, 'inf' is inf)."""
    return read_csv_rows(path, text_columns=("setting",))


def _fmt(v: Any, digits: int = 2) -> str:
    return fmt_number(v, digits)  # (two decimals here)


def grid_table(rows: list[dict[str, Any]], width: int = 140) -> str:
    from rich.table import Table

    table = Table(
        title="opacus-mi validate - MI (nats) of one example with the step's release, "
        "and what real attacks recover from it",
        title_justify="left",
    )
    cols = [
        "step",
        "B",
        "sigma",
        "MI oracle [95% CI]",
        "MI pixels",
        "re-id",
        "Fano<=",
        "MIA AUC",
        "IG dB",
        "DLG dB",
        "IG SSIM",
        "labels",
    ]
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        mi = fmt_interval(r["mi_oracle"], r["mi_oracle_ci_low"], r["mi_oracle_ci_high"], 2)
        pix = r["mi_pixels"]
        table.add_row(
            str(int(r["step"])),
            str(int(r["batch_size"])),
            sigma_label(r["noise_multiplier"]),
            mi,
            _fmt(pix, 1) if not (isinstance(pix, float) and pix >= 100) else f"{pix:.0f}",
            _fmt(r["reid_acc"]),
            _fmt(r["fano_bound"]),
            _fmt(r["mia_auc"], 3),
            _fmt(r["ig_psnr"], 1),
            _fmt(r["dlg_psnr"], 1),
            _fmt(r["ig_ssim"]),
            _fmt(r["label_acc"]),
        )
    return render_table(table, width)


def correlation_table(correlations: list[dict[str, Any]], width: int = 140) -> str:
    from rich.table import Table

    n = correlations[0]["settings"] if correlations else 0
    table = Table(
        title=f"Spearman rank correlation over the {n} settings [95% bootstrap CI]; "
        f"target >= {CORRELATION_TARGET}",
        title_justify="left",
    )
    table.add_column("attack success", justify="left")
    for _, name in MI_ESTIMATES:
        table.add_column(f"vs {name}", justify="right")
    for a_key, a_name in ATTACK_METRICS:
        cells = [a_name]
        for m_key, _ in MI_ESTIMATES:
            c = next(c for c in correlations if c["mi"] == m_key and c["attack"] == a_key)
            cell = f"{_fmt(c['spearman'], 3)} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]"
            if c["verdict"] == "undefined":
                cell = "undefined"
            cell += " *" if c["meets_target"] else ""
            cells.append(cell + (f" ({c['note']})" if c["note"] else ""))
        table.add_row(*cells)
    return render_table(table, width)


NOTES = (
    "MI oracle: ln n + E log q(J | Y) over the n candidates (B = 1: exact Bayes posterior, the "
    "monitor's Gram oracle; B > 1: a calibrated posterior\n"
    "that treats the other B-1 examples as Gaussian noise, a lower bound); never above ln n. "
    "MI pixels: 1/2 log det(I + V J^T K^-1 J), the MI between\n"
    "the example's pixels and the release, linearised around the example (inf without noise at "
    "B = 1). re-id: the Bayes attacker names B candidates\n"
    "for the step, accuracy = the example is among them (top-1 at B = 1); Fano<=: (MI oracle + "
    "ln 2) / ln(n / B). MIA: likelihood-ratio test 'this\n"
    "example or another one in the step'. IG / DLG: PSNR (dB) of reconstructions matched to the "
    "true inputs; labels: iDLG (B = 1; known at B > 1)."
)


def write_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    correlations: list[dict[str, Any]],
    *,
    config: dict[str, Any],
    extras: dict[str, Any] | None = None,
    rows_csv: bool = True,
    wall_seconds: float | None = None,
    grid: int | None = None,
) -> tuple[str, list[Path]]:
    """Write a validate's outputs into ``out`` and return its text and the files written
    (``rows_csv=False``: ``validate.csv`` is the source, read and not rewritten;
    ``wall_seconds``: the grid's, added to the text and the JSON once they are complete;
    ``grid``: its settings in all, where it stopped before the last of them)."""
    out = Path(out)
    files = [write_csv(rows, out / "validate.csv", COLUMNS)] if rows_csv else []
    corr_cols = (
        "mi",
        "attack",
        "spearman",
        "ci_low",
        "ci_high",
        "settings",
        "pairs",
        "meets_target",
        "verdict",
        "note",
        "mi_name",
        "attack_name",
    )
    files.append(write_csv(correlations, out / "correlations.csv", corr_cols))
    base = next((r["psnr_mean_image"] for r in rows), math.nan)
    lines = [
        grid_table(rows),
        NOTES,
        f"baseline: predicting the mean training image scores {_fmt(base, 1)} dB PSNR "
        f"(B = {int(rows[0]['batch_size'])} inputs); candidates n = {int(rows[0]['candidates'])}, "
        f"ln n = {_fmt(rows[0]['ln_candidates'])}",
        _fano_line(rows),
        "",
        correlation_table(correlations),
        "rho: Spearman over the rows of validate.csv (average ranks for ties, inf ranks highest), "
        "e.g. scipy.stats.spearmanr(mi_pixels, ig_psnr);\n"
        "interval: 2.5-97.5% percentiles over bootstrap resamples of the rows;\n*: target met, the "
        f"interval's lower end is >= {CORRELATION_TARGET} (an interval containing "
        f"{CORRELATION_TARGET} is inconclusive, as is one over fewer than {MIN_PAIRS} settings, "
        "where the bootstrap is degenerate).",
        _verdict(correlations),
    ]
    if left_out(rows):
        lines.insert(-1, "left out of the correlations with a NaN: " + "; ".join(left_out(rows)))
    stopped = grid is not None and grid > len(rows)
    if stopped:
        lines.append(
            f"stopped after {len(rows)} of the grid's {grid} settings: the correlations are of "
            "those alone"
        )
    text = "\n".join(lines)
    # (Before the plots: a stop while they are drawn keeps the whole grid's text.)
    write_text_whole(out / "validate.txt", text + "\n")
    files.append(out / "validate.txt")
    files.append(plot_validate(rows, correlations, out / "validate.png"))
    if extras and extras.get("recon"):
        files.append(plot_reconstructions(extras["recon"], out / "reconstructions.png"))
    summary = {
        "config": config,
        "correlations": correlations,
        "fano_holds": all(int(r["fano_ok"]) for r in rows),
        "settings": len(rows),
        "grid": grid if stopped else len(rows),
    }
    if wall_seconds is not None:
        summary["wall_seconds"] = wall_seconds
    files.append(_write_summary(out, summary))
    if wall_seconds is not None:  # (the text without it is the one a stop above keeps)
        text += f"\nwall time: {wall_seconds:.1f} s"
        write_text_whole(out / "validate.txt", text + "\n")
    return text, files


def _write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """``validate.json``. Strict JSON: an undefined correlation (NaN) is written "nan", as
    records write it."""
    text = json.dumps(json_safe(summary), indent=2, default=str)
    return write_text_whole(out / "validate.json", text + "\n")


def rerender_validate(out: str | os.PathLike) -> tuple[str, list[Path]]:
    """Render a validate folder's text, correlations, plot and JSON again from its
    ``validate.csv`` (read, never rewritten): a stopped grid's finished settings, whose
    correlations and plot needed the whole grid, or a finished one's, drawn again. The
    correlations' bootstrap and seed are the run's (``validate.json``) where it has them."""
    from .training import csv_header_has

    out = Path(out)
    if not csv_header_has(_VALIDATE_MARK)(out / "validate.csv"):
        raise ValueError(
            f"OUTDIR {str(out)!r}: its validate.csv is not an opacus-mi validate's (written "
            "by `opacus-mi validate`)"
        )
    rows = read_validate_csv(out / "validate.csv")
    if not rows:
        raise ValueError(f"OUTDIR {str(out)!r}: its validate.csv has no settings to render")
    summary: dict[str, Any] = {}
    try:
        summary = json.loads((out / "validate.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass  # (a stopped validate has none: ValidateConfig's defaults)
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    defaults = ValidateConfig()
    correlations = compute_correlations(
        rows,
        resamples=int(config.get("bootstrap", defaults.bootstrap)),
        seed=int(config.get("seed", defaults.seed)),
    )
    wall = summary.get("wall_seconds")  # (the run's, kept)
    grid = summary.get("grid")  # (a stopped grid's size, said again)
    return write_outputs(
        out,
        rows,
        correlations,
        config=config,
        rows_csv=False,
        wall_seconds=None if wall is None else float(wall),
        grid=grid if isinstance(grid, int) and not isinstance(grid, bool) else None,
    )


def _has_correlations(txt: Path) -> bool:
    """Whether ``validate.txt`` is the whole grid's text (its correlation table written)."""
    try:
        return "rho: Spearman over the rows of validate.csv" in txt.read_text(encoding="utf-8")
    except OSError:
        return False


def _verdict(correlations: list[dict[str, Any]]) -> str:
    lines = []
    for a_key, a_name in (ATTACK_METRICS[0], ATTACK_METRICS[2]):
        by: dict[str, list[str]] = {"met": [], "inconclusive": [], "missed": [], "undefined": []}
        for c in correlations:
            if c["attack"] == a_key:
                note = f", {c['note']}" if c["note"] else ""
                if c["verdict"] == "undefined":
                    by["undefined"].append(f"{c['mi_name']} ({c['note']})")
                    continue
                ci = f" [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]"
                if not is_finite_number(c["ci_low"]):
                    ci = ", no interval"
                by[c["verdict"]].append(f"{c['mi_name']} ({_fmt(c['spearman'], 3)}{ci}{note})")
        parts = [f"met by {', '.join(by['met'])}" if by["met"] else "met by no estimate"]
        if by["inconclusive"]:
            parts.append(f"inconclusive for {', '.join(by['inconclusive'])}")
        if by["missed"]:
            parts.append(f"missed by {', '.join(by['missed'])}")
        if by["undefined"]:
            parts.append(f"undefined for {', '.join(by['undefined'])}")
        lines.append(f"{a_name}: rho >= {CORRELATION_TARGET} " + "; ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def _plot_x(values: list[float]) -> tuple[np.ndarray, np.ndarray, float]:
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    top = float(finite.max()) if finite.size else 1.0
    inf_at = top * 3 if top > 0 else 1.0
    is_inf = np.isinf(x) & (x > 0)
    return np.where(is_inf, inf_at, x), is_inf, inf_at


def plot_validate(
    rows: list[dict[str, Any]], correlations: list[dict[str, Any]], path: str | os.PathLike
) -> Path:
    """Scatter of each MI estimate against inversion PSNR, re-identification and MIA AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("ig_psnr", "inversion PSNR, IG (dB)"),
        ("reid_acc", "re-identification (top-B)"),
        ("mia_auc", "membership AUC"),
    ]
    sizes = sorted({int(r["batch_size"]) for r in rows})
    steps = sorted({int(r["step"]) for r in rows})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.85, max(len(sizes), 1)))
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    fig, axes = plt.subplots(
        len(MI_ESTIMATES), len(metrics), figsize=(4.2 * len(metrics), 3.6 * len(MI_ESTIMATES))
    )
    axes = np.atleast_2d(axes)
    for i, (m_key, m_name) in enumerate(MI_ESTIMATES):
        for j, (a_key, a_name) in enumerate(metrics):
            ax = axes[i, j]
            xs, is_inf, inf_at = _plot_x([r[m_key] for r in rows])
            for k, r in enumerate(rows):
                ci = sizes.index(int(r["batch_size"]))
                mi = steps.index(int(r["step"])) % len(markers)
                ax.scatter(
                    xs[k],
                    r[a_key],
                    color=colors[ci],
                    marker=">" if is_inf[k] else markers[mi],
                    s=28,
                    alpha=0.85,
                    edgecolors="none",
                )
                lo, hi = r.get(f"{m_key}_ci_low"), r.get(f"{m_key}_ci_high")
                if lo is not None and hi is not None and not is_inf[k]:  # the estimate's 95% CI
                    ax.errorbar(
                        xs[k],
                        r[a_key],
                        xerr=[[max(xs[k] - lo, 0.0)], [max(hi - xs[k], 0.0)]],
                        fmt="none",
                        ecolor=colors[ci],
                        elinewidth=0.8,
                        alpha=0.6,
                    )
            if m_key == "mi_pixels":
                ax.set_xscale("symlog", linthresh=1.0)
            if is_inf.any():
                ax.axvline(inf_at, color="0.7", linewidth=0.8, linestyle=":")
                ax.annotate("inf", (inf_at, 0.02), xycoords=("data", "axes fraction"), fontsize=8)
            if a_key == "reid_acc" and m_key == "mi_oracle":
                n = float(rows[0]["candidates"])
                grid = np.linspace(0, math.log(n), 100)
                for ci, b in enumerate(sizes):
                    bound = np.clip((grid + math.log(2)) / math.log(n / b), 0, 1)
                    ax.plot(grid, bound, color=colors[ci], linewidth=0.9, linestyle="--")
            if a_key == "ig_psnr":
                base = rows[0]["psnr_mean_image"]
                ax.axhline(base, color="0.6", linewidth=0.8, linestyle=":")
            c = next(c for c in correlations if c["mi"] == m_key and c["attack"] == a_key)
            ax.set_title(
                f"rho = {_fmt(c['spearman'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]",
                fontsize=9,
            )
            ax.set_xlabel(f"{m_name} (nats)")
            ax.set_ylabel(a_name)
            ax.grid(alpha=0.25)
    handles = [
        plt.Line2D([], [], color=colors[ci], marker="o", linestyle="", label=f"B = {b}")
        for ci, b in enumerate(sizes)
    ] + [
        plt.Line2D(
            [], [], color="0.3", marker=markers[k % len(markers)], linestyle="", label=f"step {s}"
        )  # fmt: skip
        for k, s in enumerate(steps)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(
        "MI vs attack success over the grid (dashed: Fano ceiling; dotted: mean-image PSNR)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return save_figure(fig, path, dpi=110)


def plot_reconstructions(examples: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """True inputs and Inverting Gradients reconstructions per noise level, one block per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in examples[0] if k not in ("step", "batch_size")]
    per = max(len(e["truth"]) for e in examples)
    fig, axes = plt.subplots(
        len(keys),
        per * len(examples),
        figsize=(0.9 * per * len(examples) + 1, 0.95 * len(keys) + 0.6),
        squeeze=False,
    )
    for e_i, e in enumerate(examples):
        for r_i, key in enumerate(keys):
            imgs = e[key]
            for c_i in range(per):
                ax = axes[r_i, e_i * per + c_i]
                ax.set_xticks([])
                ax.set_yticks([])
                if c_i < len(imgs):
                    img = imgs[c_i].detach().float()
                    if img.shape[0] == 1:
                        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                    else:
                        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
                if e_i == 0 and c_i == 0:
                    label = "input" if key == "truth" else f"sigma {key}"
                    ax.set_ylabel(label, fontsize=8)
                if r_i == 0 and c_i == 0:
                    ax.set_title(
                        f"step {e['step']} (B = {e['batch_size']})", fontsize=8, loc="left"
                    )
    fig.suptitle("Inverting Gradients reconstructions of the attacked inputs", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
