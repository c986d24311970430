"""Learned privacy tokens (autoencoder / Transformer over per-layer sketch tokens).

References: the concatenation layout the tokenizer produces (splitting), parameter values before
and after training, the order in which the monitor calls the critic, an uninterrupted run (state
round trip), the same run without a monitor (guest rule), the closed-form MI of a Gaussian
channel and the count-sketch critic on the same pairs (synthetic one-layer task).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import make_private, train
from torch import nn

from opacus_mi import LeakageMonitor
from opacus_mi.estimators.online import OnlineEstimator
from opacus_mi.learned_tokens import (
    EncodedCritic,
    LayerAutoencoder,
    LayerTransformer,
    split_layers,
)
from opacus_mi.tokens import CountSketchTokenizer

DIMS = [12, 3, 20, 5]
LEARNED = ("autoencoder", "transformer")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_split_layers_matches_the_tokenizer_layout():
    shapes = [(4, 1, 3, 3), (4,), (3, 64), (3,)]
    tok = CountSketchTokenizer(shapes, 16, seed=0)
    grads = [torch.randn(5, *s, generator=_gen(i)) for i, s in enumerate(shapes)]
    per_layer = tok.sketch(grads)
    parts = split_layers(torch.cat(per_layer, dim=1), tok.dims)
    assert [p.shape[1] for p in parts] == tok.dims == [16, 4, 16, 3]
    for a, b in zip(parts, per_layer, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="layer_dims"):
        split_layers(torch.zeros(5, 10), tok.dims)
    with pytest.raises(ValueError, match="layer_dims"):
        LayerAutoencoder([3, 0], generator=_gen())


@pytest.mark.parametrize("kind", ["autoencoder", "transformer-flatten", "transformer-mean"])
def test_encoder_shapes_and_layer_locality(kind):
    if kind == "autoencoder":
        enc = LayerAutoencoder(DIMS, code=6, generator=_gen())
        per_layer_out = 6
    else:
        enc = LayerTransformer(DIMS, d_model=16, heads=2, pool=kind.split("-")[1], generator=_gen())
        per_layer_out = 16
    y = torch.randn(7, sum(DIMS), generator=_gen(1))
    enc.eval()
    out = enc(y)
    expect = per_layer_out * (1 if kind == "transformer-mean" else len(DIMS))
    assert out.shape == (7, expect) == (7, enc.out_dim)
    if kind == "autoencoder":  # per-layer codes: changing layer 2's token moves only code 2
        y2 = y.clone()
        y2[:, 15:35] += 1.0
        changed = (enc(y2) - out).abs().amax(0).view(len(DIMS), per_layer_out).amax(1) > 0
        assert changed.tolist() == [False, False, True, False]
    # rows are independent: one example's token never changes another's encoding
    y3 = y.clone()
    y3[0] += 1.0
    assert torch.equal(enc(y3)[1:], out[1:])


def _pairs(n: int, g: torch.Generator, dims=DIMS, info_layer: int = 2, snr: float = 1.0):
    """x ~ N(0, I_4); layer ``info_layer`` of y is ``snr * x W + noise``; the others noise."""
    x = torch.randn(n, 4, generator=g)
    w = torch.randn(4, dims[info_layer], generator=_gen(99)) / 2
    parts = []
    for i, k in enumerate(dims):
        noise = torch.randn(n, k, generator=g)
        parts.append(snr * x @ w + noise if i == info_layer else 3.0 * noise)
    return x, 1e-3 * torch.cat(parts, 1), w  # tokens are small, like real gradient sketches


@pytest.mark.parametrize("kind", LEARNED)
def test_encoder_and_critic_are_trained_together(kind):
    est = OnlineEstimator(
        "mine", generator=_gen(), token_encoder=kind, layer_dims=DIMS, train_every=1
    )
    g = _gen(5)
    est.observe(*_pairs(64, g)[:2])
    assert isinstance(est.critic, EncodedCritic)
    before = {k: v.clone() for k, v in est.critic.state_dict().items()}
    optimized = {id(p) for group in est.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in est.critic.parameters()} <= optimized  # encoder params in Adam
    for _ in range(3):
        est.observe(*_pairs(64, g)[:2])
    after = est.critic.state_dict()
    moved = {
        k
        for k in before
        if "mean" not in k and "std" not in k and not torch.equal(before[k], after[k])
    }
    enc_keys = {k for k in before if k.startswith("psi.0.")}
    assert enc_keys and enc_keys <= moved, f"untrained encoder params: {sorted(enc_keys - moved)}"
    assert any(k.startswith("phi.") for k in moved) and any(k.startswith("psi.1.") for k in moved)
    if kind == "autoencoder":  # decoders only get gradient from the reconstruction loss
        assert any(".decoders." in k for k in moved)


def test_monitor_scores_each_batch_before_the_learned_critic_trains_on_it():
    engine, model, opt, loader = make_private(poisson=False)
    monitor = LeakageMonitor(
        engine, model, opt, delta=1e-5, views=("clipped",), train_every=1, tokenizer="transformer"
    )
    est = monitor.estimators["clipped"]
    calls = []
    real_eval, real_obs = est.evaluate_on_device, est.observe

    def evaluate(x, y):  # the monitor scores with evaluate_on_device (read with the record)
        in_window = est.pairs.y is not None and any(
            torch.equal(y, est.pairs.y[i : i + len(y)]) for i in range(len(est.pairs) - len(y) + 1)
        )
        calls.append(("evaluate", est.updates, in_window))
        return real_eval(x, y)

    def observe(x, y, **kwargs):
        calls.append(("observe", est.updates, None))
        return real_obs(x, y, **kwargs)

    est.evaluate_on_device, est.observe = evaluate, observe
    train(model, opt, loader, epochs=2, criterion=monitor.wrap_criterion(nn.CrossEntropyLoss()))
    monitor.flush()  # with overlap the last step's calls are still being made
    assert [c[0] for c in calls] == ["evaluate", "observe"] * len(monitor.history)
    assert not any(c[2] for c in calls if c[0] == "evaluate")  # never seen before scoring
    assert sum("clipped/mine" in r.mi for r in monitor.history) >= len(monitor.history) - 1
    assert est.critic.token_encoder == "transformer"


@pytest.mark.parametrize("kind", LEARNED)
def test_state_dict_round_trip_continues_identically(kind):
    def run(split: bool):
        engine, model, opt, loader = make_private(poisson=False)
        kw = {"delta": 1e-5, "train_every": 1, "tokenizer": kind}
        monitor = LeakageMonitor(engine, model, opt, **kw)
        crit = monitor.wrap_criterion(nn.CrossEntropyLoss())
        train(model, opt, loader, criterion=crit)
        if split:
            state = copy.deepcopy(monitor.state_dict())
            monitor.detach()
            monitor = LeakageMonitor(engine, model, opt, **kw)
            monitor.load_state_dict(state)
            crit = monitor.wrap_criterion(nn.CrossEntropyLoss())
        train(model, opt, loader, criterion=crit)
        return monitor, [r.as_dict() for r in monitor.history]

    (_, a), (m, b) = run(False), run(True)
    assert len(a) == len(b) == 12
    assert "clipped/mine" in b[-1]["mi"]
    for ra, rb in zip(a, b, strict=True):
        ra.pop("monitor_seconds"), rb.pop("monitor_seconds")
        assert ra == rb
    sd = m.state_dict()
    engine, model, opt, _ = make_private(poisson=False)
    other = LeakageMonitor(engine, model, opt, delta=1e-5)  # sketch: cannot take this state
    with pytest.raises(ValueError, match=f"tokenizer='{kind}' there, 'sketch' here"):
        other.load_state_dict(sd)


def _guest_run(monitor_kwargs):
    engine, model, opt, loader = make_private()
    criterion = nn.CrossEntropyLoss()
    monitor = None
    if monitor_kwargs is not None:
        monitor = LeakageMonitor(engine, model, opt, delta=1e-5, **monitor_kwargs)
        criterion = monitor.wrap_criterion(criterion)
    train(model, opt, loader, epochs=2, criterion=criterion)
    if monitor is not None:
        monitor.flush()  # the critics' state is final (overlap)
    return [p.detach().clone() for p in model.parameters()], torch.get_rng_state(), monitor


@pytest.mark.parametrize("kind", LEARNED)
def test_guest_rule_bit_identical_training_and_global_rng(kind):
    p0, rng0, _ = _guest_run(None)
    kw = {"views": ("raw", "clipped", "private"), "train_every": 1, "tokenizer": kind}
    p1, rng1, monitor = _guest_run(kw)
    for a, b in zip(p0, p1, strict=True):
        assert torch.equal(a, b), "the learned tokenizer changed the model parameters"
    assert torch.equal(rng0, rng1), "the learned tokenizer consumed the global RNG"
    assert all(isinstance(e.critic, EncodedCritic) for e in monitor.estimators.values())
    assert any("raw/mine" in r.mi for r in monitor.history)


def test_bad_tokenizer_is_a_clear_error():
    engine, model, opt, _ = make_private()
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        LeakageMonitor(engine, model, opt, delta=1e-5, tokenizer="vae")
    with pytest.raises(ValueError, match="layer_dims"):
        OnlineEstimator("mine", generator=_gen(), token_encoder="transformer")
    # Each size as given: int() made [2.5, 2.5] the sizes [2, 2] of 4-dimensional tokens, with
    # no word; "64" the sizes 6 and 4; True a 1; 64 and NaN failed without naming layer_dims.
    for bad in ([2.5, 2.5], "64", 64, [math.nan], [None], [True, True, True, True], ["2", "2"]):
        with pytest.raises(ValueError, match="layer_dims must be a non-empty list of positive"):
            OnlineEstimator("mine", generator=_gen(), token_encoder="transformer", layer_dims=bad)
    est = OnlineEstimator(  # (NumPy's ints are the sizes they hold)
        "mine", generator=_gen(), token_encoder="transformer", layer_dims=np.array([2, 2])
    )
    assert est.layer_dims == [2, 2] and all(type(d) is int for d in est.layer_dims)


def _online_bound(kind: str, steps: int = 90, batch: int = 64, snr: float = 0.5) -> float:
    dims = [32, 8, 32, 16]
    est = OnlineEstimator("mine", generator=_gen(1), token_encoder=kind, layer_dims=dims)
    g = _gen(0)
    vals = []
    for _ in range(steps):
        x, y, _ = _pairs(batch, g, dims=dims, info_layer=2, snr=snr)
        v = est.evaluate(x, y)
        if v is not None:
            vals.append(v.matched)
        est.observe(x, y)
    return sum(vals[-30:]) / 30


def test_one_informative_layer_among_noise_layers():
    """Information in ONE layer's token (layer 2 of 4, the rest noise at 3x the scale).

    Truth: ``I = 0.5 logdet(I + snr^2 W W^T)``. Every tokenizer's held-out bound must stay below
    it (a held-out lower bound, up to the estimate's noise) and find most of it. Measured here
    (90 batches of 64, truth 2.46): sketch 1.88, autoencoder 1.94, transformer 1.71 nats (this
    version; earlier ones read 1.88 / 1.79 / 1.84, and with another data seed 1.92 / 1.77 /
    1.87). So the learned encoders find the one informative layer, within 0.2 nats of the
    sketch either side, whose critic already learns to ignore noise layers; hence the tolerance.
    """
    _, _, w = _pairs(1, _gen(0), dims=[32, 8, 32, 16])
    truth = 0.5 * float(torch.logdet(torch.eye(4) + 0.25 * w @ w.T))
    bounds = {k: _online_bound(k) for k in ("sketch", *LEARNED)}
    for kind, b in bounds.items():
        assert b <= truth + 0.15, f"{kind}: held-out bound {b:.3f} above the truth {truth:.3f}"
        assert b >= 0.5 * truth, f"{kind}: found only {b:.3f} of {truth:.3f} nats"
    # Honest comparison (see docstring): not "at least the sketch", but within 0.3 nats of it.
    for kind in LEARNED:
        assert bounds[kind] >= bounds["sketch"] - 0.3, bounds
    print(f"truth {truth:.3f}; " + ", ".join(f"{k} {v:.3f}" for k, v in bounds.items()))


def test_an_earlier_versions_checkpoint_of_another_tokenizer_is_refused_before_anything_changes():
    """A checkpoint saved before the tokenizer option existed (no "tokenizer" setting, no
    token_encoder in its critics' states: they were sketch critics) passed check_state; a
    Transformer monitor then raised from its first critic's load_state_dict, after its steps had
    been replaced by the checkpoint's and its own history kept: later records misnumbered."""
    kwargs = {"delta": 1e-5, "every": 1, "train_every": 1, "overlap": False}
    engine, model, opt, loader = make_private(poisson=False)
    sketch = LeakageMonitor(engine, model, opt, **kwargs)
    train(model, opt, loader, criterion=sketch.wrap_criterion(nn.CrossEntropyLoss()))
    state = sketch.state_dict()
    sketch.detach()
    del state["settings"]["tokenizer"]  # (as an earlier version saved it)
    for est in state["estimators"].values():
        del est["token_encoder"]
    engine, model, opt, loader = make_private(poisson=False)
    learned = LeakageMonitor(engine, model, opt, tokenizer="transformer", **kwargs)
    train(model, opt, loader, epochs=2, criterion=learned.wrap_criterion(nn.CrossEntropyLoss()))
    before = (learned.steps, learned.record_count, [r.step for r in learned.history])
    for check in (learned.check_state, learned.load_state_dict):
        with pytest.raises(ValueError, match="token_encoder='sketch'.*tokenizer='sketch'"):
            check(state)
    assert (learned.steps, learned.record_count, [r.step for r in learned.history]) == before


# Rules of learned_tokens.py a mutation audit found unguarded (each test below fails under its
# mutation), against closed forms, brute-force loops, torch itself or the documented rule.


def test_autoencoder_reconstruction_loss_is_the_mean_over_layers_in_training_only():
    """The documented aux term: recon_weight x (mean over layers of the mean squared error of
    each layer's decoded code), for a training-mode forward only."""
    from opacus_mi.learned_tokens import LayerAutoencoder

    dims = [4, 7, 2]
    enc = LayerAutoencoder(
        dims, code=3, recon_weight=0.5, generator=torch.Generator().manual_seed(0)
    )
    y = torch.randn(6, sum(dims), generator=torch.Generator().manual_seed(1))
    enc.train()
    enc(y)
    got = enc.aux_loss()
    with torch.no_grad():  # brute force, layer by layer
        errs, start = [], 0
        for e, d, k in zip(enc.encoders, enc.decoders, dims, strict=True):
            part = y[:, start : start + k]
            errs.append(float(((d(e(part)) - part) ** 2).mean()))
            start += k
    assert float(got.detach()) == pytest.approx(0.5 * sum(errs) / len(errs), rel=1e-5)
    enc.eval()
    enc(y)
    assert enc.aux_loss() is None


def test_transformer_weights_are_drawn_as_nn_linear_draws_them_and_norms_start_at_identity():
    """'uniform(+-1/sqrt(fan_in)), as nn.Linear's default'; norms as nn.LayerNorm starts."""
    from opacus_mi.learned_tokens import LayerTransformer

    enc = LayerTransformer(
        [8, 8], d_model=32, heads=4, ff=64, generator=torch.Generator().manual_seed(0)
    )
    ref_norm = nn.LayerNorm(32)
    for name, p in enc.encoder.named_parameters():
        if "norm" in name:
            ref = ref_norm.weight if name.endswith("weight") else ref_norm.bias
            assert torch.equal(p.detach(), ref.detach()), name
        elif p.ndim == 2:
            bound = 1 / p.shape[1] ** 0.5  # fan_in of an (out, in) weight
            top = float(p.detach().abs().max())
            assert 0.9 * bound < top <= bound, name  # (thousands of draws: near the bound)


def test_transformer_refuses_heads_that_do_not_divide_d_model_by_name():
    from opacus_mi.learned_tokens import LayerTransformer

    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by heads \(4\)"):
        LayerTransformer([4], d_model=30, heads=4, generator=torch.Generator())
