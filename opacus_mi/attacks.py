"""Real attacks on the gradient a DP-SGD step releases, and the metrics that score them.

Two attack families, both against the release Opacus computes for a batch of ``B`` examples,
``y = (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / B`` (``B = 1``: the per-sample private view):

* **Gradient inversion** (pixels): :func:`invert_gradients` optimises dummy inputs until their
  clipped, batch-averaged gradient matches ``y``. ``objective="l2"`` is DLG (Zhu et al. 2019,
  squared-error matching, which is also the Gaussian log-likelihood of the release);
  ``objective="cosine"`` with a total-variation prior, signed Adam steps and restarts is
  Inverting Gradients (Geiping et al. 2020). :func:`recover_label` is iDLG's analytic label
  recovery (Zhao et al. 2020) for ``B = 1``. Success is PSNR / SSIM against the true inputs after
  optimal matching of reconstructions to inputs (:func:`match_reconstructions`).
* **Identification** (no pixels): :class:`CandidateChannel` is the white-box Bayes attacker who
  knows a pool of ``n`` candidate examples and asks which one is in the release
  (re-identification, top-1 accuracy) or whether a given one is (membership inference, a
  likelihood-ratio test). Its posterior also gives the MI of one example with the release.

Everything is differentiable functional PyTorch (``torch.func``) on any model whose loss is
cross-entropy; models should be in eval mode (no dropout, fixed normalisation statistics).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

# Opacus adds this to per-sample norms before dividing (see views.py).
_OPACUS_EPS = 1e-6
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- gradients
class GradientFunction:
    """Flat per-sample gradients of a model's cross-entropy loss, differentiable in the inputs.

    ``params`` defaults to the model's trainable parameters (detached: the attacker holds a copy
    of the checkpoint). Buffers are read from the model as they are.
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor] | None = None):
        self.model = model
        if params is None:
            params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        self.params = params
        self.names = list(params)
        self.shapes = [tuple(params[k].shape) for k in self.names]
        sizes = [int(params[k].numel()) for k in self.names]
        self.offsets = [0, *np.cumsum(sizes).tolist()]
        self.dim = int(self.offsets[-1])
        self._per_sample = vmap(grad(self._loss), in_dims=(None, 0, 0))

    def _loss(self, params, x, y):
        out = functional_call(self.model, params, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    def per_sample(self, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
        """``(N, P)`` per-sample gradients; differentiable in ``x`` (chunked when detached)."""
        if x.requires_grad or len(x) <= chunk:
            return self._flat(self._per_sample(self.params, x, y), len(x))
        parts = [
            self._flat(self._per_sample(self.params, x[i : i + chunk], y[i : i + chunk]), None)
            for i in range(0, len(x), chunk)
        ]
        return torch.cat(parts)

    def _flat(self, grads: dict[str, torch.Tensor], n: int | None) -> torch.Tensor:
        n = next(iter(grads.values())).shape[0] if n is None else n
        return torch.cat([grads[k].reshape(n, -1) for k in self.names], dim=1)

    def slice(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])


def clip_rows(grads: torch.Tensor, max_grad_norm: float | None) -> torch.Tensor:
    """Opacus's flat clipping of each row: ``g * min(1, C / (|g| + 1e-6))``; None: unclipped."""
    if max_grad_norm is None or not math.isfinite(max_grad_norm):
        return grads
    factors = (max_grad_norm / (grads.norm(dim=-1, keepdim=True) + _OPACUS_EPS)).clamp(max=1.0)
    return grads * factors


def private_release(
    gradfn: GradientFunction,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float | None = 1.0,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The averaged gradient a DP-SGD step releases for batch ``(x, y)``: shape ``(P,)``.

    ``(sum_i clip(g_i) + N(0, (sigma C)^2 I)) / B``; with ``max_grad_norm=None`` the gradients are
    not clipped and ``noise_multiplier`` must be 0.
    """
    with torch.no_grad():
        g = clip_rows(gradfn.per_sample(x, y), max_grad_norm).sum(dim=0)
        if noise_multiplier > 0:
            if max_grad_norm is None:
                raise ValueError("noise needs a clipping bound: pass max_grad_norm")
            noise = torch.randn(g.shape, generator=generator, dtype=g.dtype, device=g.device)
            g = g + noise_multiplier * max_grad_norm * noise
        if not bool(torch.isfinite(g).all()):
            # Caught here, not later as an invalid matrix inside an attack's matching step.
            raise ValueError(
                f"the released gradient is not finite: noise_multiplier {noise_multiplier:g} "
                f"x max_grad_norm {max_grad_norm} overflows {g.dtype} (largest "
                f"{torch.finfo(g.dtype).max:.3g}) or the gradients are not finite; pass a "
                "smaller noise_multiplier"
            )
    return g / len(x)


def recover_label(release: torch.Tensor, gradfn: GradientFunction, layer: str | None = None) -> int:
    """iDLG: the label of a single example from the gradient of the last linear layer.

    For cross-entropy, row ``k`` of the last layer's gradient is ``(p_k - [k = c]) * [h, 1]``
    with ``h >= 0`` (post-ReLU features): only the true class ``c`` has a negative row. Summing a
    row's weight and bias entries gives one number per class; the label is the smallest. The
    clip factor and the 1/B average are positive and do not change the sign.
    """
    if layer is None:
        layer = _last_linear(gradfn.model)
    w = release[gradfn.slice(f"{layer}.weight")].reshape(gradfn.params[f"{layer}.weight"].shape)
    score = w.sum(dim=1)
    if f"{layer}.bias" in gradfn.names:
        score = score + release[gradfn.slice(f"{layer}.bias")]
    return int(score.argmin())


def _last_linear(model: nn.Module) -> str:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ValueError("label recovery needs a model whose last layer is nn.Linear")
    return name


# ----------------------------------------------------------------------------- inversion
@dataclass(frozen=True)
class Inversion:
    """Best reconstruction per problem: ``images (T, B, *shape)``, ``loss (T,)``."""

    images: torch.Tensor
    loss: torch.Tensor


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels per image, over the last 3 dims."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(-1, -2, -3))
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(-1, -2, -3))
    return dh + dw


def invert_gradients(
    gradfn: GradientFunction,
    targets: torch.Tensor,
    labels: torch.Tensor,
    *,
    input_shape: Sequence[int],
    max_grad_norm: float | None = 1.0,
    objective: str = "cosine",
    tv: float = 1e-2,
    iters: int = 200,
    restarts: int = 2,
    lr: float = 0.1,
    signed: bool | None = None,
    bounds: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
    generator: torch.Generator | None = None,
    callback=None,
) -> Inversion:
    """Reconstruct ``T`` independent batches from their released gradients, all at once.

    Args:
        targets: ``(T, P)`` released (batch-averaged) gradients, one per problem.
        labels: ``(T, B)`` labels (known, or from :func:`recover_label` when ``B = 1``).
        objective: ``"cosine"`` (Inverting Gradients: 1 - cosine similarity, plus ``tv`` times
            total variation) or ``"l2"`` (DLG: squared distance, plus ``tv`` times TV).
        max_grad_norm: the clipping bound the release used; dummy gradients are clipped the same
            way (None: unclipped).
        restarts: independent random initialisations per problem; the one with the lowest final
            objective (what the attacker can see, not the ground truth) is returned.
        signed: step on the sign of the gradient (Geiping et al.); default True for cosine.
        bounds: pixel bounds ``(lo, hi)`` (scalars or tensors broadcastable to one image) the
            dummy is projected onto after every step.
        callback: called with the iteration number after each step (progress bars).

    Problems are independent: Adam is per coordinate and the summed loss separates, so batching
    them is the same as running them one by one, only faster.
    """
    if objective not in ("cosine", "l2"):
        raise ValueError(f"objective must be 'cosine' or 'l2', got {objective!r}")
    if signed is None:
        signed = objective == "cosine"
    t, b = labels.shape
    shape = tuple(int(s) for s in input_shape)
    x = torch.randn((t, restarts, b, *shape), generator=generator, dtype=targets.dtype)
    if bounds is not None:
        lo, hi = bounds
        x = torch.max(torch.min(x, _as_image(hi, shape)), _as_image(lo, shape))
    x.requires_grad_(True)
    flat_labels = labels[:, None, :].expand(t, restarts, b).reshape(-1)
    target = targets[:, None, :]
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=_milestones(iters), gamma=0.1)
    last = torch.zeros((t, restarts), dtype=targets.dtype)
    for it in range(iters):
        opt.zero_grad(set_to_none=True)
        g = gradfn.per_sample(x.reshape(-1, *shape), flat_labels)
        g = clip_rows(g, max_grad_norm).reshape(t, restarts, b, -1).mean(dim=2)
        if objective == "cosine":
            match = 1.0 - F.cosine_similarity(g, target, dim=-1, eps=1e-12)
        else:
            match = ((g - target) ** 2).sum(dim=-1)
        loss = match + tv * total_variation(x).mean(dim=-1) if tv > 0 else match
        loss.sum().backward()
        if signed:
            x.grad.sign_()
        opt.step()
        sched.step()
        if bounds is not None:
            with torch.no_grad():
                x.copy_(torch.max(torch.min(x, _as_image(hi, shape)), _as_image(lo, shape)))
        last = loss.detach()
        if callback is not None:
            callback(it)
    with torch.no_grad():  # score the final (projected) images with the attacker's objective
        g = gradfn.per_sample(x.reshape(-1, *shape), flat_labels)
        g = clip_rows(g, max_grad_norm).reshape(t, restarts, b, -1).mean(dim=2)
        if objective == "cosine":
            match = 1.0 - F.cosine_similarity(g, target, dim=-1, eps=1e-12)
        else:
            match = ((g - target) ** 2).sum(dim=-1)
        last = match + tv * total_variation(x).mean(dim=-1) if tv > 0 else match
        best = last.argmin(dim=1)
        images = x.detach()[torch.arange(t), best]
    return Inversion(images=images, loss=last[torch.arange(t), best])


def _milestones(iters: int) -> list[int]:
    """Steps after which the inversion's learning rate drops 10x: at 3/8, 5/8 and 7/8 of
    ``iters``, each at least 1 and after the one before. MultiStepLR applies a milestone of 0
    when it is created (with ``iters`` 1 or 2 all three were 0, so the first step had lr / 1000)
    and a repeated one twice; from ``iters = 4`` on they are ``int(iters * f)`` as ever."""
    out: list[int] = []
    for f in (3 / 8, 5 / 8, 7 / 8):
        out.append(max(int(iters * f), out[-1] + 1 if out else 1))
    return out


def _as_image(v, shape: tuple[int, ...]) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.get_default_dtype())
    if v.ndim == 1:  # per channel
        v = v.view(-1, *([1] * (len(shape) - 1)))
    return v


def dlg(gradfn: GradientFunction, targets, labels, **kwargs) -> Inversion:
    """Deep Leakage from Gradients: squared-error gradient matching (no image prior)."""
    kwargs.setdefault("tv", 0.0)
    return invert_gradients(gradfn, targets, labels, objective="l2", **kwargs)


def inverting_gradients(gradfn: GradientFunction, targets, labels, **kwargs) -> Inversion:
    """Inverting Gradients: cosine matching + total variation, signed Adam, restarts."""
    kwargs.setdefault("tv", 1e-2)
    return invert_gradients(gradfn, targets, labels, objective="cosine", **kwargs)


# ----------------------------------------------------------------------------- metrics
def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image over the last 3 dims (identical: inf)."""
    mse = ((a.double() - b.double()) ** 2).mean(dim=(-1, -2, -3))
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    w = w / w.sum()
    return w[:, None] * w[None, :]


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, Gaussian window, valid filtering.

    ``a, b``: ``(..., C, H, W)``; channels are averaged. The window shrinks to the largest odd
    size that fits small images (7 for 8x8 digits). Identical images give exactly 1.
    """
    lead = a.shape[:-3]
    c, h, w = a.shape[-3:]
    size = min(win_size, h, w)
    size -= 1 - size % 2
    x = a.double().reshape(-1, c, h, w)
    y = b.double().reshape(-1, c, h, w)
    win = _gaussian_window(size, sigma).expand(c, 1, size, size).contiguous()

    def filt(z):
        return F.conv2d(z, win, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).mean(dim=(1, 2, 3)).reshape(lead)


def match_reconstructions(recon: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Index ``perm`` so that ``recon[perm[i]]`` is matched to ``truth[i]`` (least total MSE).

    Optimal assignment (Hungarian, ``scipy.optimize.linear_sum_assignment``) on the B x B MSE
    matrix: batch order is not recoverable from a summed gradient, so scores compare each true
    input with the reconstruction assigned to it.
    """
    from scipy.optimize import linear_sum_assignment

    r = recon.double().reshape(len(recon), -1)
    t = truth.double().reshape(len(truth), -1)
    cost = torch.cdist(t, r) ** 2 / r.shape[1]
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = np.empty(len(truth), dtype=np.int64)
    perm[rows] = cols
    return perm


def matched_scores(
    recon: torch.Tensor, truth: torch.Tensor, data_range: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR and SSIM of a batch after optimal matching; images in ``[0, range]``."""
    perm = match_reconstructions(recon, truth)
    matched = recon[torch.as_tensor(perm)]
    return psnr(matched, truth, data_range), ssim(matched, truth, data_range)


# ----------------------------------------------------------------------------- MI helpers
def fano_accuracy_bound(mi_nats: float, candidates: int, guesses: int = 1) -> float:
    """Fano's inequality as a ceiling on identification accuracy.

    With ``M`` equiprobable candidates, any guess is right with probability at most
    ``(I + ln 2) / ln M``; a list of ``L`` guesses contains the right one with probability at
    most ``(I + ln 2) / ln(M / L)`` (list-decoding Fano). Clipped to ``[0, 1]``.
    """
    if guesses >= candidates:
        return 1.0
    return float(min(1.0, max(0.0, (mi_nats + LN2) / math.log(candidates / guesses))))


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation with average ranks for ties; NaN pairs are dropped.

    +inf values rank above every finite value (an unbounded MI at zero noise is still the
    largest). NaN when fewer than 3 pairs remain or one side is constant.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if len(a) < 3:
        return math.nan
    ra, rb = _average_ranks(a), _average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def spearman_bootstrap(
    x: Sequence[float],
    y: Sequence[float],
    *,
    resamples: int = 2000,
    rng: np.random.Generator | None = None,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Spearman's rho and a percentile bootstrap interval from resampling rows (pairs); pairs
    with a NaN are dropped first, as :func:`spearman` drops them."""
    rng = np.random.default_rng(0) if rng is None else rng
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))  # resample the pairs the correlation uses
    a, b = a[keep], b[keep]
    rho = spearman(a, b)
    if math.isnan(rho):
        return rho, math.nan, math.nan
    n = len(a)
    stats = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        r = spearman(a[idx], b[idx])
        if not math.isnan(r):
            stats.append(r)
    tail = (1 - level) / 2 * 100
    if len(stats) < math.ceil(100 / tail - 1e-9):  # (fewer leave a tail with no resample in it)
        return rho, math.nan, math.nan
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return rho, float(lo), float(hi)


# ----------------------------------------------------------------------------- identification
@dataclass(frozen=True)
class IdentificationResult:
    """Re-identification over ``candidates`` examples, and the MI bound from its posterior."""

    mi: float  # ln M + E log q(J | Y), nats; exact posterior at B = 1
    mi_se: float
    accuracy: float  # top-1 re-identification
    accuracy_top_b: float  # the target is among the attacker's B best guesses (= top-1 at B=1)
    candidates: int
    draws: int
    calibration: tuple[float, float]  # (a, c) of the inclusion model at B > 1


@dataclass(frozen=True)
class MembershipResult:
    auc: float
    tpr_at_1pct_fpr: float
    balanced_accuracy: float


class CandidateChannel:
    """The white-box attacker's view of a release, for a pool of ``n`` candidate examples.

    Built from the pool's clipped per-sample gradients (rows of ``clipped``). Only differences
    between candidates matter to the attacker, so everything is expressed in the principal
    coordinates of the centered gradients (``n x r``, ``r <= n - 1``): the released sum
    ``y = g_J + sum of B-1 others + sigma C xi`` minus ``B`` times the pool mean has coordinates
    ``z_J + sum z_k + sigma C xi_r`` with ``xi_r ~ N(0, I_r)`` exactly (the rest of the noise is
    orthogonal to every candidate difference and carries nothing about which one is present).
    Releases are drawn in these coordinates with the real other examples of the pool.

    The attacker's model treats the other ``B - 1`` examples as Gaussian noise with the pool's
    covariance (per principal axis ``kappa_d``): ``K_d = (B - 1) kappa_d + (sigma C)^2``. At
    ``B = 1`` its posterior is the exact Bayes posterior (the Gram-matrix oracle of the monitor).
    At ``B > 1`` a calibrated variational posterior ``q`` is built on it (:meth:`identify`), and
    ``ln n + E log q(J | Y)`` on fresh draws is a valid lower bound on ``I(J; Y)``.
    """

    def __init__(self, clipped: torch.Tensor, *, rel_tol: float = 1e-10):
        a = clipped.to(torch.float64)
        n = a.shape[0]
        if n < 2:
            raise ValueError("a candidate pool needs at least 2 examples")
        self.mean = a.mean(dim=0)
        centered = a - self.mean
        gram = centered @ centered.T
        gram = (gram + gram.T) / 2
        vals, vecs = torch.linalg.eigh(gram)
        keep = vals > rel_tol * vals.max().clamp_min(1e-300)
        self.n = n
        self.dim = int(a.shape[1])
        self.centered = centered  # (n, P): to project Jacobians onto the principal axes
        self._axes = vecs[:, keep] / vals[keep].sqrt()  # E Lambda^-1/2: Q^T = axes^T centered
        self.coords = vecs[:, keep] * vals[keep].sqrt()  # (n, r)
        self.kappa = vals[keep] / n  # pool covariance along each principal axis
        self.shrinkage, self.floor = _ledoit_wolf(gram, self.dim)

    @property
    def rank(self) -> int:
        return int(self.coords.shape[1])

    # -- releases --------------------------------------------------------------------------
    def draw(
        self,
        targets: torch.Tensor,
        batch_size: int,
        noise_std: float,
        generator: torch.Generator,
        *,
        exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Released sums (centered, principal coordinates) with example ``targets[t]`` in slot 1.

        The other ``B - 1`` examples are drawn from the pool without replacement, never equal
        to the target (nor to ``exclude[t]`` when given).
        """
        t = len(targets)
        v = self.coords[targets].clone()
        if batch_size > 1:
            keys = torch.rand((t, self.n), generator=generator, dtype=torch.float64)
            keys[torch.arange(t), targets] = 2.0
            if exclude is not None:
                keys[torch.arange(t), exclude] = 2.0
            others = keys.argsort(dim=1)[:, : batch_size - 1]
            v = v + self.coords[others].sum(dim=1)
        if noise_std > 0:
            v = v + noise_std * torch.randn(v.shape, generator=generator, dtype=torch.float64)
        return v

    def _variances(self, batch_size: int, noise_std: float) -> torch.Tensor:
        k = (batch_size - 1) * self.kappa + noise_std**2
        floor = 1e-12 * float(self.kappa.mean())  # noise-free B = 1: exact identification
        return k.clamp_min(floor)

    def logits(self, v: torch.Tensor, batch_size: int, noise_std: float) -> torch.Tensor:
        """Gaussian log-likelihood of each release row for each of the ``n`` candidates (up to
        a per-row constant): the exact log-posterior at ``B = 1``."""
        k = self._variances(batch_size, noise_std)
        z = self.coords
        return (v / k) @ z.T - 0.5 * ((z * z) / k).sum(dim=1)[None, :]

    def inclusion_scores(self, v: torch.Tensor, batch_size: int, noise_std: float) -> torch.Tensor:
        """Log-likelihood ratio, per release row and candidate, of 'candidate ``i`` is in this
        step' (``v ~ N(u_i, K)``) against 'it is not' (``N(0, K + Sigma)``)."""
        k = self._variances(batch_size, noise_std)
        k_out = k + self.kappa
        const = 0.5 * float((torch.log(k_out) - torch.log(k)).sum())
        row = -0.5 * (v * v / k).sum(dim=1) + 0.5 * (v * v / k_out).sum(dim=1) + const
        return self.logits(v, batch_size, noise_std) + row[:, None]

    # -- re-identification and MI ----------------------------------------------------------
    def identify(
        self,
        batch_size: int,
        noise_std: float,
        generator: torch.Generator,
        *,
        draws: int = 256,
    ) -> IdentificationResult:
        """Re-identification accuracy and the MI lower bound ``ln n + E log q(J | Y)``.

        ``B = 1``: ``q`` is the exact Bayes posterior (softmax of :meth:`logits`). ``B > 1``:
        ``J`` is one of the ``B`` examples in the step, so ``p(J = i | y)`` is ``i``'s inclusion
        probability divided by ``B``; ``q`` models it as ``sigmoid(a s_i + c)`` normalised over
        candidates, with ``s_i`` the inclusion log-likelihood ratio (:meth:`inclusion_scores`).
        ``a`` and ``c`` are fitted on ``draws`` calibration releases and everything is reported
        on ``draws`` fresh ones, so the MI figure is a lower bound on ``I(J; Y)``. The attacker
        names the ``B`` highest-scoring candidates (top-1 at ``B = 1``).
        """
        scale, offset = 1.0, 0.0
        if batch_size > 1:
            scale, offset = self._fit(batch_size, noise_std, generator, draws)
        targets = torch.randint(0, self.n, (draws,), generator=generator)
        v = self.draw(targets, batch_size, noise_std, generator)
        rows = torch.arange(draws)
        if batch_size == 1:
            scores = self.logits(v, batch_size, noise_std)
            logq = torch.log_softmax(scores, dim=1)[rows, targets]
        else:
            scores = self.inclusion_scores(v, batch_size, noise_std)
            logq = _inclusion_log_q(scores, targets, scale, offset)
        acc = float((scores.argmax(dim=1) == targets).double().mean())
        top = scores.topk(min(batch_size, self.n), dim=1).indices
        acc_b = float((top == targets[:, None]).any(dim=1).double().mean())
        terms = logq + math.log(self.n)
        se = float(terms.std() / math.sqrt(draws)) if draws > 1 else math.nan
        return IdentificationResult(
            mi=float(terms.mean()),
            mi_se=se,
            accuracy=acc,
            accuracy_top_b=acc_b,
            candidates=self.n,
            draws=draws,
            calibration=(scale, offset),
        )

    def _fit(self, batch_size, noise_std, generator, draws) -> tuple[float, float]:
        """Scale and offset of the inclusion model, maximising ``E log q(J | Y)``."""
        targets = torch.randint(0, self.n, (draws,), generator=generator)
        v = self.draw(targets, batch_size, noise_std, generator)
        scores = self.inclusion_scores(v, batch_size, noise_std)
        prior = math.log(batch_size / max(self.n - batch_size, 1))
        best = (-math.inf, 0.0)
        for log_a in np.arange(-8.0, 1.01, 0.5):  # coarse search over the scale (log10)
            val = float(_inclusion_log_q(scores, targets, 10**log_a, prior).mean())
            if val > best[0]:
                best = (val, float(log_a))
        params = torch.tensor([best[1], prior], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([params], max_iter=40, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = -_inclusion_log_q(scores, targets, 10 ** params[0], params[1]).mean()
            loss.backward()
            return loss

        opt.step(closure)
        log_a, c = params.detach().tolist()
        if not (math.isfinite(log_a) and math.isfinite(c)):
            log_a, c = best[1], prior
        return 10**log_a, c

    # -- membership inference --------------------------------------------------------------
    def membership(
        self,
        batch_size: int,
        noise_std: float,
        generator: torch.Generator,
        *,
        draws: int = 256,
    ) -> MembershipResult:
        """Likelihood-ratio membership test: was example ``x`` in this step, or another one?

        Members: ``y = g_x + (B-1 others) + noise``; non-members: ``g_z`` of a random other
        example in its place (the batch size gives nothing away). Under the attacker's Gaussian
        model (centered coordinates) ``v ~ N(u_x, K)`` if ``x`` is in and ``N(0, K + Sigma)`` if
        not, with ``K = (B-1) Sigma + (sigma C)^2 I``: the log-likelihood ratio is closed form,
        and pooled over targets it is the Neyman-Pearson statistic. Returns ROC AUC, TPR at 1%
        FPR and the best balanced accuracy.
        """
        from sklearn.metrics import roc_auc_score, roc_curve

        x = torch.randint(0, self.n, (draws,), generator=generator)
        z = (x + torch.randint(1, self.n, (draws,), generator=generator)) % self.n
        v_in = self.draw(x, batch_size, noise_std, generator)
        v_out = self.draw(z, batch_size, noise_std, generator, exclude=x)
        k = self._variances(batch_size, noise_std)
        k_out = k + self.kappa
        u = self.coords[x]
        const = 0.5 * (torch.log(k_out) - torch.log(k)).sum()

        def llr(v):
            return (-0.5 * ((v - u) ** 2 / k).sum(dim=1) + 0.5 * (v**2 / k_out).sum(dim=1)) + const

        scores = torch.cat([llr(v_in), llr(v_out)]).numpy()
        labels = np.r_[np.ones(draws), np.zeros(draws)]
        auc = float(roc_auc_score(labels, scores))
        fpr, tpr, _ = roc_curve(labels, scores)
        tpr1 = float(np.max(tpr[fpr <= 0.01])) if np.any(fpr <= 0.01) else 0.0
        bal = float(np.max((tpr + 1 - fpr) / 2))
        return MembershipResult(auc=auc, tpr_at_1pct_fpr=tpr1, balanced_accuracy=bal)

    # -- what the release says about the pixels ------------------------------------------
    def noise_covariance(self, batch_size: int, noise_std: float) -> tuple[torch.Tensor, float]:
        """Covariance of everything but the target in a release: ``(B-1) Sigma + (sigma C)^2 I``.

        ``Sigma`` is the Ledoit-Wolf estimate of the population's clipped-gradient covariance
        (the pool's sample covariance shrunk towards ``m I``), so the other examples are noise in
        every direction, not only in the ``n - 1`` the pool spans. Returned as the variance along
        each principal axis ``(r,)`` and the variance of the orthogonal complement.
        """
        a = self.shrinkage
        along = (batch_size - 1) * ((1 - a) * self.kappa + a * self.floor) + noise_std**2
        across = (batch_size - 1) * a * self.floor + noise_std**2
        return along, float(across)

    def project(self, jac: torch.Tensor) -> torch.Tensor:
        """Coordinates of ``(P, d)`` columns along the principal axes: ``(r, d)``."""
        return self._axes.T @ (self.centered @ jac.to(torch.float64))


def _inclusion_log_q(scores, targets, scale, offset) -> torch.Tensor:
    """``log q(J | y)`` with ``q_i`` proportional to ``sigmoid(scale * s_i + offset)``."""
    z = F.logsigmoid(scale * scores + offset)
    return z[torch.arange(len(targets)), targets] - torch.logsumexp(z, dim=1)


def _ledoit_wolf(gram: torch.Tensor, dim: int) -> tuple[float, float]:
    """Ledoit-Wolf shrinkage of the covariance of ``n`` centered rows in ``dim`` dimensions.

    Computed from their ``n x n`` Gram matrix (the ``dim x dim`` covariance never exists):
    returns the intensity ``alpha`` and the target ``m = tr(S) / dim`` of
    ``(1 - alpha) S + alpha m I``; the same numbers as ``sklearn.covariance.ledoit_wolf``.
    """
    n = gram.shape[0]
    sq = gram.diagonal()
    m = float(sq.sum()) / (n * dim)
    s_frob2 = float((gram**2).sum()) / n**2  # ||S||_F^2
    delta = s_frob2 / dim - m**2
    beta = (float((sq**2).sum()) / n - s_frob2) / (n * dim)
    beta = min(beta, delta)
    alpha = 0.0 if delta <= 0 else max(0.0, beta / delta)
    return alpha, m


@dataclass(frozen=True)
class PixelModel:
    """Local, linearised view of one example's release: everything :func:`pixel_information`
    needs for any batch size and noise level (``jtj = J^T J``, ``proj = Q^T J``)."""

    jtj: torch.Tensor  # (d, d)
    proj: torch.Tensor  # (r, d)
    prior_var: torch.Tensor  # (d,)


def input_jacobian(
    gradfn: GradientFunction,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float | None = 1.0,
    block: int = 1,
) -> torch.Tensor:
    """Jacobian of one example's clipped gradient with respect to its pixels: ``(P, d)``.

    ``block > 1`` differentiates along block-constant perturbations (``block x block`` squares,
    nearest upsampling), so ``d = C H W / block^2``: coarse pixels for large images.
    """
    from torch.func import jacfwd

    shape = x.shape
    low = (shape[0], shape[1] // block, shape[2] // block)

    def clipped_grad(delta):
        up = delta
        if block > 1:
            up = F.interpolate(delta[None], scale_factor=block, mode="nearest")[0]
        g = grad(gradfn._loss)(gradfn.params, x + up, y)
        flat = torch.cat([g[k].reshape(-1) for k in gradfn.names])
        return clip_rows(flat[None], max_grad_norm)[0]

    zero = torch.zeros(low, dtype=x.dtype)
    return jacfwd(clipped_grad)(zero).reshape(gradfn.dim, -1)


def pixel_information(
    model: PixelModel, channel: CandidateChannel, batch_size: int, noise_std: float
) -> tuple[float, torch.Tensor]:
    """MI between an example's pixels and the release, linearised around the example.

    Pixels ``x + delta`` with ``delta ~ N(0, diag(v))`` (``v``: the data's per-pixel variance)
    move the clipped gradient by ``J delta``; the rest of the release (other examples and DP
    noise) is Gaussian with covariance ``K`` (:meth:`CandidateChannel.noise_covariance`). Then
    ``I(delta; Y) = 1/2 log det(I + V^1/2 J^T K^-1 J V^1/2)`` and the Bayes posterior covariance
    of ``delta`` is ``V^1/2 (I + V^1/2 J^T K^-1 J V^1/2)^-1 V^1/2``. Returns the MI (nats; inf for
    a noise-free single release) and the posterior variance per pixel (the MMSE a Bayes-optimal
    reconstruction reaches in this model, in the data's units). Noise whose variance is below the
    smallest normal float (``noise_std`` under 1.5e-154) counts as none, its limit.
    """
    if noise_std**2 < sys.float_info.min:
        # Such a variance has lost its precision and 1 / variance overflows (at 1e-160 the
        # Fisher matrix held inf - inf = NaN); at B = 1 the MI grows without bound as the noise
        # shrinks, at B > 1 the other examples' variance swamps it.
        noise_std = 0.0
    if batch_size == 1 and noise_std == 0:
        return math.inf, torch.zeros_like(model.prior_var)
    along, across = channel.noise_covariance(batch_size, noise_std)
    p = model.proj
    fisher = (p / along[:, None]).T @ p + (model.jtj - p.T @ p) / across
    sd = model.prior_var.sqrt()
    m = sd[:, None] * fisher * sd[None, :]
    m = (m + m.T) / 2
    vals, vecs = torch.linalg.eigh(m)
    vals = vals.clamp_min(0)
    mi = float(0.5 * torch.log1p(vals).sum())
    post = ((vecs**2) / (1 + vals)[None, :]).sum(dim=1) * model.prior_var
    return mi, post
