"""Logit lens: the last readout is the model's own output; earlier ones equal the final norm and unembedding
applied by hand (numpy) to the cached residual stream."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import HookedTransformer
from jaxlens.analysis import logit_lens
from jaxlens.errors import InputError

TOKENS = jnp.asarray(np.random.RandomState(1).randint(0, 97, (2, 7)))
CHOSEN = [3, 50, 96]


def hand_lens(cfg, params, resid, scale=None):
    x = np.asarray(resid, np.float64)
    if cfg.normalization_type == "LN":
        x = x - x.mean(-1, keepdims=True)
    s = np.sqrt((x * x).mean(-1, keepdims=True) + cfg.eps) if scale is None else np.asarray(scale)
    x = x / s * np.asarray(params["ln_final"]["w"])
    if cfg.normalization_type == "LN":
        x = x + np.asarray(params["ln_final"]["b"])
    return x @ np.asarray(params["unembed"]["W_U"]) + np.asarray(params["unembed"]["b_U"])


def test_readouts_match_hand_computation(any_model):
    cfg, params = any_model
    logits, cache = HookedTransformer(cfg, params).run_with_cache(TOKENS)
    lens = logit_lens(cache, CHOSEN)
    assert lens.labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    assert lens.logits.shape == (cfg.n_layers + 1, 2, 7, 3)
    np.testing.assert_allclose(lens.logits[-1], np.asarray(logits)[..., CHOSEN], rtol=1e-4, atol=1e-4)
    full = hand_lens(cfg, params, cache["resid_pre", 1])
    np.testing.assert_allclose(lens.logits[1], full[..., CHOSEN], rtol=1e-4, atol=1e-4)
    probs = np.exp(full - full.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(lens.probs[1], probs[..., CHOSEN], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(lens.ranks[1], (full[..., None, :] > full[..., CHOSEN, None]).sum(-1))


def test_final_scale_mode_and_pos_slice(gpt):
    cfg, params = gpt
    logits, cache = HookedTransformer(cfg, params).run_with_cache(TOKENS)
    lens = logit_lens(cache, None, pos_slice=-1, recompute_norm=False, incl_mid=True)
    assert lens.labels[:3] == ["0_pre", "0_mid", "1_pre"]
    assert lens.logits.shape == (2 * cfg.n_layers + 1, 2, 97)
    np.testing.assert_allclose(lens.logits[-1], np.asarray(logits)[:, -1], rtol=1e-4, atol=1e-4)
    want = hand_lens(cfg, params, cache["resid_mid", 0][:, -1], cache["ln_final.hook_scale"][:, -1])
    np.testing.assert_allclose(lens.logits[1], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(lens.ranks[-1].argmin(-1), np.asarray(logits)[:, -1].argmax(-1))


def test_bad_tokens(gpt):
    _, cache = HookedTransformer(*gpt).run_with_cache(TOKENS)
    with pytest.raises(InputError, match="outside the vocabulary"):
        logit_lens(cache, [1, 97])
