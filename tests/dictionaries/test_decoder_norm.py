"""TopK decoder norms as SAELens 6 handles them: by default a training step leaves the decoder rows as Adam
moved them (hand computation of Adam's first step), `normalise_decoder=True` rescales them to unit norm
afterwards (numpy row normalisation of the same step); `fold_W_dec_norm` keeps a rescaling SAE's outputs and
leaves unit rows (SAELens `_fold_norm_topk`), and refuses an SAE that does not rescale; the scaling fold keeps
a rescaling BatchTopK's threshold in step with its decoder norms (SAELens #763)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlens.dictionaries.base import DictionaryConfig, DictionaryError, fold_scaling, init_dictionary
from jaxlens.dictionaries.train import TrainConfig, checkpoint_template, train_dictionaries

D, F, B, LR = 12, 20, 32, 1e-2
HOOK = "blocks.0.hook_resid_post"
X = jnp.asarray(np.random.default_rng(0).standard_normal((B, D)).astype(np.float32))


def _cfg(**kw):
    return DictionaryConfig(architecture="topk", d_in=D, d_sae=F, k=3, hook_name=HOOK, **kw)


def _one_step(cfg, **kw):
    tc = TrainConfig(steps=1, lr=LR, clip_grad_norm=None, normalise_activations=False, **kw)
    res = train_dictionaries(cfg, lambda step: {HOOK: X}, tc, n_devices=1)
    return tc, np.asarray(res.dictionaries[0].W_dec[...], np.float64)


@pytest.mark.parametrize("rescale", [False, True])
def test_default_leaves_rows_free_and_the_option_normalises_them(rescale):
    cfg = _cfg(rescale_acts_by_decoder_norm=rescale)
    tc, free = _one_step(cfg)
    # Adam's first step by hand: m_hat = g, v_hat = g^2, so W <- W - lr * g / (|g| + eps)
    graphdef, state = checkpoint_template([cfg], tc)
    params = jax.tree_util.tree_map(lambda a: a[0], state["params"])
    rest = jax.tree_util.tree_map(lambda a: a[0], state["rest"])
    loss = lambda p: nnx.merge(graphdef, p, rest).training_loss(X, coefficients={"auxk": 1.0})[0]  # noqa: E731
    g = jax.grad(loss)(params)
    W0, gW = np.asarray(params["W_dec"][...], np.float64), np.asarray(g["W_dec"][...], np.float64)
    np.testing.assert_allclose(free, W0 - LR * gW / (np.abs(gW) + 1e-8), rtol=1e-5, atol=1e-7)
    norms = np.linalg.norm(free, axis=1)
    assert np.abs(norms - 1).min() > 0.5  # initialised at 0.1: far from unit rows
    _, unit = _one_step(cfg, normalise_decoder=True)
    np.testing.assert_allclose(unit, free / norms[:, None], rtol=1e-5, atol=1e-7)


def test_fold_W_dec_norm_keeps_outputs_and_leaves_unit_rows():
    sae = init_dictionary(_cfg(rescale_acts_by_decoder_norm=True), jax.random.key(1))
    sae.W_dec[...] = sae.W_dec[...] * jnp.linspace(0.5, 3.0, F)[:, None]  # rows of unequal norms
    sae.b_enc[...] = jnp.linspace(-0.1, 0.1, F)
    before_acts, before = np.asarray(sae.encode(X)), np.asarray(sae(X))
    n = np.linalg.norm(np.asarray(sae.W_dec[...], np.float64), axis=1)
    W_enc = np.asarray(sae.W_enc[...], np.float64)
    sae.fold_W_dec_norm()
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.W_dec[...]), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sae.W_enc[...]), W_enc * n, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sae.encode(X)), before_acts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sae(X)), before, rtol=1e-5, atol=1e-6)
    plain = init_dictionary(_cfg(), jax.random.key(1))
    with pytest.raises(DictionaryError, match="rescale_acts_by_decoder_norm=False"):
        plain.fold_W_dec_norm()


def test_scaling_fold_moves_a_rescaling_batchtopk_threshold():
    cfg = DictionaryConfig(architecture="batchtopk", d_in=D, d_sae=F, k=3, hook_name=HOOK,
                           rescale_acts_by_decoder_norm=True)
    sae = init_dictionary(cfg, jax.random.key(2))
    sae.W_dec[...] = sae.W_dec[...] * 10
    s = 4.0
    h = np.asarray(sae.scaled_pre(s * X))
    sae.topk_threshold[...] = jnp.asarray(np.quantile(h[h > 0], 0.8), jnp.float32)
    fired, out = np.asarray(sae.encode(s * X)) != 0, np.asarray(sae(s * X))  # trained on s * x
    assert 0 < fired.mean() < 0.5
    fold_scaling(sae, s)
    np.testing.assert_array_equal(np.asarray(sae.encode(X)) != 0, fired)  # the same features fire on raw x
    np.testing.assert_allclose(np.asarray(sae(X)), out / s, rtol=1e-5, atol=1e-6)
