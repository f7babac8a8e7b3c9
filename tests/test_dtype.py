"""dtype chosen at load: bfloat16 params and compute stay bfloat16 everywhere, and stay close to float32.

Tolerances: bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2% per operation). Through a few
layers the logit error stays a few percent of the logits' spread (measured: max |bf16 - fp32| < 0.05 std on
these models), so the logits correlate above 0.999 with fp32, and the top-1 token can only change where fp32's
top two logits are closer than the error: we require agreement wherever the fp32 margin exceeds 0.25 std, and
on at least 95% of all positions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import HookedTransformer, forward, hook_names, init_params, testing
from jaxlens.converters import bert
from jaxlens.encoder import HookedEncoder
from jaxlens.hook_names import encoder_table
from jaxlens.params import cast_params

CONFIGS = {
    "gpt2": {},
    "gemma2_gqa": dict(normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
                       n_key_value_heads=1, act_fn="silu", use_normalization_before_and_after=True,
                       attn_scores_soft_cap=50.0, output_logits_soft_cap=30.0, window_sizes=(4, None, 4)),
    "neox": dict(positional_embedding_type="rotary", rotary_dim=4, parallel_attn_mlp=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_forward_keeps_every_activation_bf16(name):
    cfg = testing.tiny_config(**CONFIGS[name])
    params = cast_params(init_params(cfg, jax.random.key(0)), jnp.bfloat16)
    tokens = (jnp.arange(20).reshape(2, 10) * 7) % cfg.d_vocab
    mask = jnp.arange(10)[None, :] < jnp.array([[10], [6]])
    run = jax.jit(forward, static_argnames=("cfg", "cache_names"))
    logits, cache = run(params, cfg, tokens, attention_mask=mask,
                        cache_names=tuple(hook_names.all_names(cfg)))
    assert logits.dtype == jnp.bfloat16
    leaks = {k: str(v.dtype) for k, v in cache.items() if v.dtype != jnp.bfloat16}
    assert not leaks, leaks
    assert len(cache) == len(hook_names.all_names(cfg))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=1, n_embd=64, n_layer=3, n_head=4,
                                 vocab_size=211, n_positions=64, initializer_range=0.05)
    return testing.save_hf_model(hf, tmp_path_factory.mktemp("gpt2_dtype"))


def test_from_pretrained_bf16_is_bf16_and_close_to_fp32(gpt2_dir):
    m32 = HookedTransformer.from_pretrained(gpt2_dir)
    m16 = HookedTransformer.from_pretrained(gpt2_dir, dtype=jnp.bfloat16)
    assert m16.cfg == m32.cfg
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(m32.params)} == {"float32"}
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(m16.params)} == {"bfloat16"}
    tokens = np.random.default_rng(0).integers(0, 211, (4, 48))
    l16, cache = m16.run_with_cache(tokens, names_filter=lambda n: True)
    assert l16.dtype == jnp.bfloat16
    assert {str(v.dtype) for v in cache.values()} == {"bfloat16"}
    a, b = np.asarray(m32(tokens)), np.asarray(l16.astype(jnp.float32))
    assert np.abs(a - b).max() > 0  # really computed in bf16
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    agree = a.argmax(-1) == b.argmax(-1)
    top2 = np.sort(a, -1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 0.25 * a.std()
    assert agree[clear].all() and agree.mean() >= 0.95, (agree.mean(), agree[clear].mean())


def test_processing_runs_in_float32_before_the_cast(gpt2_dir):
    """bf16 after processing equals processing in fp32 and then casting (not processing in bf16)."""
    p32 = HookedTransformer.from_pretrained(gpt2_dir).params
    p16 = HookedTransformer.from_pretrained(gpt2_dir, dtype=jnp.bfloat16).params
    for x32, x16 in zip(jax.tree_util.tree_leaves(p32), jax.tree_util.tree_leaves(p16), strict=True):
        np.testing.assert_array_equal(np.asarray(x32.astype(jnp.bfloat16), np.float32),
                                      np.asarray(x16, np.float32))


def test_encoder_bf16(tmp_path):
    hf = testing.random_hf_model("BertConfig", "BertModel", hidden_size=40, num_hidden_layers=2,
                                 num_attention_heads=5, intermediate_size=72, vocab_size=99,
                                 max_position_embeddings=16, type_vocab_size=2)
    testing.save_hf_model(hf, tmp_path)
    e32 = HookedEncoder.from_pretrained(tmp_path)
    e16 = HookedEncoder.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(e16.params)} == {"bfloat16"}
    tokens = np.random.default_rng(2).integers(0, 99, (2, 12))
    out16, cache = e16.run_with_cache(tokens, names_filter=encoder_table(e16.cfg, ("pooler",)).all_names())
    assert {str(v.dtype) for v in cache.values()} == {"bfloat16"}
    a, b = np.asarray(e32(tokens)), np.asarray(out16, np.float32)
    assert 0 < np.abs(a - b).max() and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    assert bert.load(tmp_path)[1]["embed"]["W_E"].dtype == np.float32  # the converter itself stays fp32
