"""Qwen3 (QK-norm), Gemma 3 text (QK-norm, local/global rotary bases), StableLM (LayerNorm, partial rotary,
parallel blocks) and the rope scaling types (linear, dynamic NTK, YaRN, Llama 3) against `transformers`,
and Qwen3's hooks against TransformerLens 4.3.

Each case is a random HF model with small unequal sizes, saved and loaded back through jaxlens: fp32 logits
within 1e-4, every layer's resid_pre equal to HF's hidden states, every attention pattern equal to HF's. The
dynamic-NTK case runs 20 tokens past a 12-position original context, so its base really grows.
"""

import json

import numpy as np
import pytest

from jaxlens import HookedTransformer, converters, testing
from jaxlens.errors import CheckpointError, ConfigError

T = 20
_QWEN3 = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=14,
              intermediate_size=90, vocab_size=300, max_position_embeddings=64)
_LLAMA = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=70, vocab_size=89, max_position_embeddings=64)

# case -> (HF config class, HF model class, config kwargs, Config fields the case must produce)
CASES = {
    "qwen3-gqa": ("Qwen3Config", "Qwen3ForCausalLM", dict(_QWEN3), dict(use_qk_norm=True, d_head=14)),
    "qwen3-window-bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        _QWEN3, num_key_value_heads=4, attention_bias=True, use_sliding_window=True, sliding_window=5,
        max_window_layers=1, tie_word_embeddings=True), dict(window_sizes=(None, 5, 5))),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA, rope_parameters=dict(rope_type="linear", rope_theta=300.0, factor=3.0)),
        dict(rotary_base=300.0)),
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA, max_position_embeddings=12, rope_parameters=dict(rope_type="dynamic", rope_theta=200.0,
                                                                 factor=2.5)),
        dict(rotary_dynamic_ntk=(2.5, 12), n_ctx=30)),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA, rope_parameters=dict(rope_type="yarn", rope_theta=500.0, factor=4.0,
                                     original_max_position_embeddings=16)), dict()),
    "qwen3-yarn-mscale": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        _QWEN3, rope_parameters=dict(rope_type="yarn", rope_theta=400.0, factor=8.0, mscale=0.8,
                                     mscale_all_dim=0.4, beta_fast=16, beta_slow=2,
                                     original_max_position_embeddings=16)), dict()),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=100, vocab_size=97, max_position_embeddings=64, sliding_window=5,
        query_pre_attn_scalar=20, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=dict(full_attention=dict(rope_type="linear", rope_theta=5000.0, factor=2.0),
                             sliding_attention=dict(rope_type="default", rope_theta=100.0))),
        dict(window_sizes=(5, None, 5), attn_scale=20**0.5, use_qk_norm=True, rotary_base=5000.0)),
    "gemma3-softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
        intermediate_size=70, vocab_size=89, max_position_embeddings=64, sliding_window=6,
        attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
        layer_types=["full_attention", "full_attention"]),
        dict(window_sizes=None, rotary_local_freqs=None, output_logits_soft_cap=2.0)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=90, vocab_size=89, max_position_embeddings=64, use_qkv_bias=True),
        dict(normalization_type="LN", rotary_dim=4, parallel_attn_mlp=False)),
    "stablelm-parallel": ("StableLmConfig", "StableLmForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=70, vocab_size=89, max_position_embeddings=64, use_parallel_residual=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
        dict(rotary_dim=6, parallel_attn_mlp=True)),
    "llama-llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA, rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=4.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=16)),
        dict(rotary_scaling=(4.0, 1.0, 4.0, 16))),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            cls, model_cls, conf, _ = CASES[case]
            path = tmp_path_factory.mktemp(case)
            seed = 40 + sorted(CASES).index(case)
            hf, tokens = testing.saved_random_hf_model(path, cls, model_cls, seed, T,
                                                       **{"initializer_range": 0.1, **conf})
            cache[case] = path, tokens, testing.hf_outputs(hf, tokens)
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf(built, case):
    path, tokens, ref = built(case)
    model = HookedTransformer.from_pretrained_no_processing(path)
    for field, want in CASES[case][3].items():
        assert getattr(model.cfg, field) == want, field
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("resid_pre", "pattern")))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    for layer in range(model.cfg.n_layers):
        np.testing.assert_allclose(np.asarray(cache["resid_pre", layer]), ref["hidden_states"][layer],
                                   atol=1e-4, rtol=0, err_msg=f"resid_pre {layer}")
        np.testing.assert_allclose(np.asarray(cache["pattern", layer]), ref["attentions"][layer],
                                   atol=1e-5, rtol=0, err_msg=f"pattern {layer}")


@pytest.mark.parametrize("case", ["qwen3-gqa", "gemma3", "stablelm-parallel"])
def test_processing_keeps_log_probs(built, case):
    import jax

    path, tokens, ref = built(case)
    if case.startswith("stablelm"):  # LayerNorm + gated MLP: ln2's bias cannot fold into the gate
        with pytest.raises(ConfigError, match="fold_ln=False"):
            HookedTransformer.from_pretrained(path)
    model = HookedTransformer.from_pretrained(path, fold_ln=not case.startswith("stablelm"))
    assert model.cfg.normalization_type in ("RMSPre", "LN")
    assert ("q_norm" in model.params["blocks"]["attn"]) == model.cfg.use_qk_norm
    got = jax.nn.log_softmax(model(tokens), axis=-1)
    want = jax.nn.log_softmax(ref["logits"], axis=-1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


def test_qwen3_hooks_match_transformer_lens(built):
    pytest.importorskip("torch")
    pytest.importorskip("transformer_lens.model_bridge")
    from tl_reference import close, shared_hooks

    path, tokens, _ = built("qwen3-gqa")
    jc, tc, shared = shared_hooks(path, tokens)
    assert len(shared) >= 20 * CASES["qwen3-gqa"][2]["num_hidden_layers"] // 2, shared
    for name in shared:
        want = tc[name]
        if name.endswith("hook_attn_scores"):  # -inf where masked: compare the causal part
            mask = np.tril(np.ones((T, T), bool))
            close(np.asarray(jc[name])[..., mask], want.numpy()[..., mask], name)
        elif "_norm." in name:  # the bridge keeps HF's [batch head pos ...]; jaxlens hook_q's [batch pos ...]
            close(jc[name], want.numpy().swapaxes(1, 2), name)
        else:
            close(jc[name], want, name)


def test_qk_norm_hooks_are_patchable(built):
    import jax.numpy as jnp

    path, tokens, _ = built("qwen3-gqa")
    model = HookedTransformer.from_pretrained_no_processing(path)
    name = "blocks.1.attn.k_norm.hook_normalized"
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    assert cache[name].shape == (2, T, 2, 14)
    patched = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: jnp.zeros_like(x))])
    assert not np.allclose(np.asarray(patched), np.asarray(model(tokens)), atol=1e-3)


@pytest.mark.parametrize("rope,message", [
    (dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0], long_factor=[1.0]),
     r"'longrope' is not implemented.*\['default', 'linear', 'llama3', 'yarn', 'dynamic'\]"),
    (dict(rope_type="linear", rope_theta=1e4), "linear rope scaling needs 'factor'"),
    (dict(rope_type="proportional", rope_theta=1e4, factor=2.0), "'proportional' is not implemented"),
])
def test_unimplemented_rope_type_is_named(built, rope, message):
    path = built("qwen3-gqa")[0]
    hf = {**json.loads((path / "config.json").read_text()), "rope_parameters": rope}
    with pytest.raises(CheckpointError, match=message):
        converters.family_for(hf).config_from_hf(hf)


@pytest.mark.parametrize("fields,message", [
    (dict(rotary_freqs=(1.0, 0.5)), "rotary_freqs has 2 frequencies; rotary_dim=8 needs 4"),
    (dict(rotary_local_freqs=(1.0,)), "rotary_local_freqs has 1"),
    (dict(rotary_freqs=(1.0,) * 4, rotary_dynamic_ntk=(2.0, 16)), "one rope scaling"),
    (dict(rotary_attention_factor=0.0), "rotary_attention_factor must be a finite positive number"),
])
def test_inconsistent_rotary_config_is_refused(fields, message):
    from jaxlens import Config
    from jaxlens.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        Config(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=16, d_vocab=11, n_ctx=8,
               positional_embedding_type="rotary", **fields)
