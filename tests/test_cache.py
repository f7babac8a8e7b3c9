"""ActivationCache's analysis methods against direct computations on the same run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import HookedTransformer, testing
from jaxlens.weight_processing import process_weights

CFG0 = testing.tiny_config()
CFG, PARAMS = process_weights(CFG0, jaxlens.init_params(CFG0, jax.random.key(3), scale=0.2))
MODEL = HookedTransformer(CFG, PARAMS)
TOKENS = jnp.asarray(np.random.RandomState(1).randint(0, CFG.d_vocab, (2, 9)))
LOGITS, CACHE = MODEL.run_with_cache(TOKENS)
N = CFG.n_layers


def test_indexing_shorthands():
    assert CACHE["resid_post", -1] is CACHE["blocks.2.hook_resid_post"]
    assert CACHE["z", 0].shape == (2, 9, CFG.n_heads, CFG.d_head)
    assert CACHE["scale", 1, "ln2"].shape == (2, 9, 1)
    with pytest.raises(KeyError, match="was not cached"):
        MODEL.run_with_cache(TOKENS, names_filter="hook_embed")[1]["resid_pre", 0]


def test_decompose_resid_sums_to_final_residual():
    stack, labels = CACHE.decompose_resid(return_labels=True)
    assert labels[:4] == ["embed", "pos_embed", "0_attn_out", "0_mlp_out"] and len(labels) == 2 + 2 * N
    np.testing.assert_allclose(np.asarray(stack.sum(0)), np.asarray(CACHE["resid_post", N - 1]), atol=1e-5)
    mid = CACHE.decompose_resid(layer=1, mlp_input=True)
    np.testing.assert_allclose(np.asarray(mid.sum(0)), np.asarray(CACHE["resid_mid", 1]), atol=1e-5)


def test_accumulated_resid_and_labels():
    stack, labels = CACHE.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "final_post"]
    np.testing.assert_array_equal(np.asarray(stack[3]), np.asarray(CACHE["resid_mid", 1]))
    assert CACHE.accumulated_resid(layer=1, pos_slice=-1).shape == (2, 2, CFG.d_model)


def test_stack_head_results_sum_to_attn_out_minus_bias():
    stack, labels = CACHE.stack_head_results(layer=2, return_labels=True)
    assert labels[CFG.n_heads] == "L1H0" and stack.shape == (2 * CFG.n_heads, 2, 9, CFG.d_model)
    layer1 = stack[CFG.n_heads:].sum(0) + PARAMS["blocks"]["attn"]["b_O"][1]
    np.testing.assert_allclose(np.asarray(layer1), np.asarray(CACHE["attn_out", 1]), atol=1e-5)
    _, cached = MODEL.run_with_cache(TOKENS, names_filter=["blocks.0.attn.hook_result"])
    np.testing.assert_allclose(np.asarray(stack[: CFG.n_heads].transpose(1, 2, 0, 3)),
                               np.asarray(cached["blocks.0.attn.hook_result"]), atol=1e-5)


def test_apply_ln_to_stack_and_logit_attrs_reconstruct_logits():
    stack = CACHE.decompose_resid(pos_slice=-1)  # [comp batch d_model]
    scaled = CACHE.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
    np.testing.assert_allclose(np.asarray(scaled.sum(0)),
                               np.asarray(CACHE["ln_final.hook_normalized"][:, -1]), atol=1e-5)
    good, bad = jnp.asarray([3, 7]), jnp.asarray([11, 2])
    attrs = CACHE.logit_attrs(stack, tokens=good, incorrect_tokens=bad, pos_slice=-1)
    b = jnp.arange(2)
    b_U = PARAMS["unembed"]["b_U"]
    diff = LOGITS[b, -1, good] - LOGITS[b, -1, bad] - (b_U[good] - b_U[bad])
    np.testing.assert_allclose(np.asarray(attrs.sum(0)), np.asarray(diff), atol=1e-4)


def test_cache_is_a_pytree_through_jit_and_remove_batch_dim():
    doubled = jax.jit(lambda c: jax.tree_util.tree_map(lambda x: 2 * x, c))(CACHE)
    np.testing.assert_allclose(np.asarray(doubled["resid_pre", 1]), 2 * np.asarray(CACHE["resid_pre", 1]))
    assert isinstance(doubled, jaxlens.ActivationCache) and doubled.cfg == CFG
    _, one = MODEL.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    assert one["resid_pre", 0].shape == (9, CFG.d_model)
    assert one.accumulated_resid(pos_slice=-1).shape == (N + 1, CFG.d_model)
