"""Linear probes against planted directions in synthetic data, a per-layer loop, and steering by hand."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import testing
from jaxlens.dictionaries.probes import Probe, probe_inputs, train_probe, train_probes
from jaxlens.errors import InputError
from jaxlens.model.forward import forward


def planted(seed: int, n: int = 2000, d: int = 24, margin: float = 1.5):
    """Isotropic noise plus +-margin along a random unit direction u (class 1: +, class 0: -), plus an offset
    shared by both classes (so the bias has work to do). The Bayes-optimal linear classifier is along u."""
    rng = np.random.RandomState(seed)
    u = rng.randn(d)
    u /= np.linalg.norm(u)
    y = rng.randint(0, 2, n)
    x = rng.randn(n, d) + np.outer(2 * y - 1, u) * margin + 0.7 * rng.randn(d)
    return x.astype(np.float32), y, u


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_logistic_probe_recovers_a_planted_direction():
    x, y, u = planted(0)
    fit = train_probe(x, y, key=jax.random.key(1))
    assert fit.metric == "accuracy"
    assert cosine(fit.probes.direction(), u) > 0.97
    # Bayes accuracy with a margin of 1.5 noise sds is Phi(1.5) = 0.933
    assert 0.9 < float(fit.test_score) and 0.9 < float(fit.train_score) < 0.96
    assert float(fit.losses[-1]) < float(fit.losses[0])
    # the held-out accuracy is the probe's own predictions on the examples it did not see
    order = np.asarray(jax.random.permutation(jax.random.key(1), len(y)))
    test = order[: round(0.2 * len(y))]
    pred = (x[test] @ np.asarray(fit.probes.W[...])[:, 0] + float(fit.probes.b[...][0])) > 0
    np.testing.assert_allclose(float(fit.test_score), np.mean(pred == y[test]), atol=1e-6)


def test_multiclass_and_linear_probes():
    rng = np.random.RandomState(3)
    d, n = 16, 1500
    means = 3.0 * rng.randn(3, d)
    y = rng.randint(0, 3, n)
    x = (rng.randn(n, d) + means[y]).astype(np.float32)
    fit = train_probe(x, y)
    assert fit.probes.W.shape == (d, 3) and float(fit.test_score) > 0.95
    # linear regression onto a planted direction: R^2 near the noise ceiling, direction recovered
    u = rng.randn(d)
    x = rng.randn(n, d).astype(np.float32)
    target = 2.0 * x @ u + 0.1 * rng.randn(n)
    fit = train_probe(x, target, kind="linear", steps=800, learning_rate=5e-2, weight_decay=0.0)
    assert fit.metric == "r2" and float(fit.test_score) > 0.99
    assert cosine(fit.probes.direction(), u) > 0.999


def test_all_layers_at_once_equals_a_loop_over_layers():
    xs, us = [], []
    y = planted(0)[1]
    for seed in range(3):  # a different planted direction per layer, shared labels
        rng = np.random.RandomState(10 + seed)
        u = rng.randn(24)
        u /= np.linalg.norm(u)
        xs.append(rng.randn(len(y), 24) + np.outer(2 * y - 1, u) * (1.0 + seed))
        us.append(u)
    x = np.stack(xs).astype(np.float32)
    fits = train_probes(x, y, key=jax.random.key(5), steps=200)
    assert fits.test_score.shape == (3,) and fits.losses.shape == (3, 200) and len(fits.probes) == 3
    for layer in range(3):
        one = train_probe(x[layer], y, key=jax.random.key(5), steps=200)
        chex.assert_trees_all_close(fits.probes[layer].W[...], one.probes.W[...], atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(fits.probes[layer].b[...], one.probes.b[...], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(fits.test_score[layer], one.test_score, atol=1e-6)
    # the easier the layer (bigger margin), the better the probe
    assert fits.test_score[2] >= fits.test_score[0]
    assert all(cosine(p.direction(), u) > 0.9 for p, u in zip(fits.probes, us, strict=True))


random_params = testing.numpy_params


@pytest.fixture(scope="module")
def tiny():
    cfg = testing.tiny_config()
    params = random_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (16, 12), 0, cfg.d_vocab)
    return cfg, params, tokens


def test_probe_inputs_and_steering_move_the_logit_by_hand(tiny):
    cfg, params, tokens = tiny
    names = ("blocks.hook_resid_post", "blocks.1.hook_resid_post")
    _, cache = forward(params, cfg, tokens, cache_names=names)
    stacked = probe_inputs(cache, "blocks.hook_resid_post", pos=-1)
    assert stacked.shape == (cfg.n_layers, 16, cfg.d_model)
    np.testing.assert_array_equal(stacked[1], cache["blocks.1.hook_resid_post"][:, -1])
    x = probe_inputs(cache, "blocks.1.hook_resid_post")
    assert x.shape == (16 * 12, cfg.d_model)
    labels = np.asarray(tokens).reshape(-1) % 2
    probe = train_probe(x, labels, steps=50).probes

    alpha = 3.0
    iv = probe.steer(cfg, "blocks.1.hook_resid_post", alpha)
    _, steered = forward(params, cfg, tokens, interventions=iv, cache_names=("blocks.2.hook_resid_pre",))
    before = np.asarray(probe(cache["blocks.1.hook_resid_post"]))[..., 0]
    after = np.asarray(probe(steered["blocks.2.hook_resid_pre"]))[..., 0]
    w = np.asarray(probe.W[...])[:, 0]
    np.testing.assert_allclose(after - before, alpha * np.linalg.norm(w), rtol=1e-4)
    # a mask limits the steering to the positions it names
    mask = np.zeros((1, 12, 1), bool)
    mask[0, 4] = True
    iv = probe.steer(cfg, "blocks.1.hook_resid_post", alpha, mask=mask)
    _, part = forward(params, cfg, tokens, interventions=iv, cache_names=("blocks.1.hook_resid_post",))
    moved = np.asarray(probe(part["blocks.1.hook_resid_post"]))[..., 0] - before
    np.testing.assert_allclose(moved[:, 4], alpha * np.linalg.norm(w), rtol=1e-4)
    np.testing.assert_allclose(np.delete(moved, 4, axis=1), 0.0, atol=1e-4)


def test_bad_input_is_a_clear_error(tiny):
    cfg, _, _ = tiny
    probe = Probe(cfg.d_model)
    with pytest.raises(InputError, match=r"width 40, but 'blocks.1.mlp.hook_post' has width 72"):
        probe.steer(cfg, "blocks.1.mlp.hook_post", 1.0)
    with pytest.raises(InputError, match="addresses every layer"):
        probe.steer(cfg, "blocks.hook_resid_post", 1.0)
    with pytest.raises(InputError, match=r"width 40; found shape \(3, 7\)"):
        probe(jnp.ones((3, 7)))
    x, y, _ = planted(0, n=50, d=8)
    with pytest.raises(InputError, match=r"one entry per example \(50\); found shape \(49,\)"):
        train_probe(x, y[:49])
    with pytest.raises(InputError, match="class ids .* dtype float"):
        train_probe(x, y.astype(float))
    with pytest.raises(InputError, match=r"\[n d_in\]; found shape \(2, 50, 8\)"):
        train_probe(np.stack([x, x]), y)
    with pytest.raises(InputError, match="'logistic' or 'linear'; found 'svm'"):
        Probe(8, kind="svm")
    with pytest.raises(InputError, match="n_out=3, but the targets have width 1"):
        train_probe(x, y.astype(np.float32), kind="linear", n_out=3)
    with pytest.raises(InputError, match="both need at least one"):
        train_probe(x[:2], y[:2], test_fraction=0.1)
