"""The sparse TopK training step (`train._sparse_topk_loss`, used while no feature is dead) against the dense
`TopKSAE.training_loss` it replaces: the same loss, L0, firing mask and gradients on random problems, with and
without decoder-norm rescaling and b_dec subtracted from the input; and a short run that switches to the dense
step once features die."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlens.dictionaries import base, train
from jaxlens.dictionaries.base import DictionaryConfig


def _problem(rescale, b_dec_in, seed=0, n=64, d=16, f=48, k=5):
    cfg = DictionaryConfig(architecture="topk", d_in=d, d_sae=f, k=k, hook_name="blocks.0.hook_resid_post",
                           rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=b_dec_in)
    sae = base.init_dictionary(cfg, jax.random.key(seed))
    r = np.random.default_rng(seed)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):  # away from the init's symmetry (W_enc = W_dec.T)
        v = getattr(sae, name)
        v[...] = v[...] + jnp.asarray(0.3 * r.standard_normal(v[...].shape), jnp.float32)
    x = jnp.asarray(r.standard_normal((n, d)), jnp.float32)
    graphdef, params, rest = nnx.split(sae, nnx.Param, ...)
    return cfg, graphdef, params, rest, x


@pytest.mark.parametrize("rescale,b_dec_in", [(False, True), (True, True), (True, False)])
def test_sparse_loss_and_gradients_equal_the_dense_ones(rescale, b_dec_in):
    cfg, graphdef, params, rest, x = _problem(rescale, b_dec_in)

    def dense(p):
        return nnx.merge(graphdef, p, rest).training_loss(x, dead_mask=jnp.zeros(cfg.d_sae, bool))

    (ld, ad), gd = jax.value_and_grad(dense, has_aux=True)(params)
    (ls, as_), gs = jax.value_and_grad(lambda p: train._sparse_topk_loss(p, x, cfg), has_aux=True)(params)
    np.testing.assert_allclose(ls, ld, rtol=1e-6)
    assert float(ad["auxk"]) == float(as_["auxk"]) == 0.0
    np.testing.assert_allclose(as_["l0"], ad["l0"], rtol=1e-6)
    np.testing.assert_array_equal(as_["fired"], np.asarray(ad["acts"] != 0).any(0))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        want, got = np.asarray(gd[name][...]), np.asarray(gs[name][...])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=name)


def test_training_switches_to_the_dense_step_when_features_die():
    # lr 0 and one repeated vector: 5 features fire forever, the other 43 die after 2 steps; the sparse step
    # runs first (AuxK 0), the dense one with AuxK once features are dead
    cfg, *_ = _problem(False, True)
    x0 = jnp.asarray(np.tile(np.linspace(-1, 1, cfg.d_in, dtype=np.float32), (64, 1)))
    tc = train.TrainConfig(steps=5, lr=0.0, dead_feature_window=2, normalise_activations=False)
    res = train.train_dictionaries(cfg, lambda step: {cfg.hook_name: x0}, tc, n_devices=1)
    assert [h["dead_fraction"][0] for h in res.history] == [0, 0, 43 / 48, 43 / 48, 43 / 48]
    auxk = [h["auxk"][0] for h in res.history]
    assert auxk[:3] == [0, 0, 0] and min(auxk[3:]) > 0
    # from step 1 on the parameters are fixed (step 0 normalised the decoder rows): the sparse steps 1-2 and
    # the dense steps 3-4 see the same SAE and must give the same MSE
    mse = [h["mse"][0] for h in res.history]
    np.testing.assert_allclose(mse[2:], mse[1], rtol=1e-6)
