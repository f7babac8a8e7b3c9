"""Weight processing (TransformerLens semantics): each step keeps the model's log-probs, and does what it
says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import testing
from jaxlens import weight_processing as wp

TOKENS = jnp.asarray(np.random.RandomState(2).randint(0, 97, (2, 10)))
CONFIGS = {
    "ln": testing.tiny_config(),
    "rms_gqa_rotary_gated": testing.tiny_config(normalization_type="RMS", n_key_value_heads=1, gated_mlp=True,
                                                positional_embedding_type="rotary", act_fn="silu"),
    "ln_parallel": testing.tiny_config(parallel_attn_mlp=True, positional_embedding_type="rotary",
                                       rotary_dim=4),
}


def _logp(params, cfg):
    return jax.nn.log_softmax(jaxlens.forward(params, cfg, TOKENS)[0], axis=-1)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("step", ["fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                                  "all"])
def test_each_step_keeps_log_probs(name, step):
    cfg = CONFIGS[name]
    params = jaxlens.init_params(cfg, jax.random.key(1), scale=0.3)
    if step == "all":
        new_cfg, new = wp.process_weights(cfg, params)
    else:
        # centring writing weights is only exact once the LN weights are folded (TL applies it after fold_ln)
        base_cfg, base = wp.fold_ln(cfg, params) if step == "center_writing_weights" else (cfg, params)
        new_cfg, new = getattr(wp, step)(base_cfg, base)
        cfg, params = base_cfg, base
    np.testing.assert_allclose(np.asarray(_logp(new, new_cfg)), np.asarray(_logp(params, cfg)), atol=2e-5)


def test_fold_ln_by_hand_on_ln_model():
    cfg = CONFIGS["ln"]
    p = jaxlens.init_params(cfg, jax.random.key(4), scale=0.3)
    new_cfg, q = wp.fold_ln(cfg, p)
    assert new_cfg.normalization_type == "LNPre" and "ln1" not in q["blocks"] and "ln_final" not in q
    w, b = p["blocks"]["ln1"]["w"][0], p["blocks"]["ln1"]["b"][0]
    W = p["blocks"]["attn"]["W_Q"][0] * w[None, :, None]
    np.testing.assert_allclose(np.asarray(q["blocks"]["attn"]["W_Q"][0]),
                               np.asarray(W - W.mean(1, keepdims=True)), atol=1e-6)
    want_b = p["blocks"]["attn"]["b_Q"][0] + jnp.einsum("hde,d->he", p["blocks"]["attn"]["W_Q"][0], b)
    np.testing.assert_allclose(np.asarray(q["blocks"]["attn"]["b_Q"][0]), np.asarray(want_b), atol=1e-6)


def test_fold_value_biases_under_gqa_moves_b_v_into_b_o():
    cfg = CONFIGS["rms_gqa_rotary_gated"]
    p = jaxlens.init_params(cfg, jax.random.key(5), scale=0.3)
    _, q = wp.fold_value_biases(cfg, p)
    assert np.all(np.asarray(q["blocks"]["attn"]["b_V"]) == 0)
    # one kv head serves all 5 query heads: b_O gains sum_h b_V[0] @ W_O[h]
    attn = p["blocks"]["attn"]
    want = attn["b_O"][2] + sum(attn["b_V"][2, 0] @ attn["W_O"][2, h] for h in range(cfg.n_heads))
    np.testing.assert_allclose(np.asarray(q["blocks"]["attn"]["b_O"][2]), np.asarray(want), atol=1e-5)


def test_center_writing_weights_skips_rms_models():
    cfg = CONFIGS["rms_gqa_rotary_gated"]
    p = jaxlens.init_params(cfg, jax.random.key(6))
    _, q = wp.center_writing_weights(cfg, p)
    np.testing.assert_array_equal(np.asarray(q["embed"]["W_E"]), np.asarray(p["embed"]["W_E"]))
