"""Every model-family converter against its Hugging Face `transformers` model.

Each case is a random model with small, unequal sizes (initializer_range 0.1 so attention is far from uniform
and rotary or window mistakes show), 1-D params perturbed, saved with save_pretrained and loaded back through
jaxlens: fp32 logits, every layer's resid_pre and every attention pattern must equal HF's, and TL's weight
processing must keep the log-probs. 20-token inputs with windows of 5-6 make sliding windows matter.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlens import HookedTransformer, converters
from jaxlens.errors import CheckpointError
from tests.converters.family_checks import assert_matches_hf, case_builder

T = 20  # tokens per sequence
_LLAMA = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=100,
              vocab_size=97, max_position_embeddings=64)
_MISTRAL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=130,
                vocab_size=113, max_position_embeddings=64, sliding_window=6)
_QWEN2 = dict(hidden_size=72, num_hidden_layers=3, num_attention_heads=6, intermediate_size=150,
              vocab_size=131, max_position_embeddings=64, use_sliding_window=True, sliding_window=5,
              max_window_layers=1)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500.0, factor=4.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=16)

# case id -> (HF config class, HF model class, config kwargs, Config fields the case must produce)
CASES = {
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(
        hidden_size=48, num_layers=3, num_heads=4, intermediate_size=100, vocab_size=97,
        max_position_embeddings=64, window_size=5,
        attention_types=[[["global", "local"], 1], [["local"], 1]]),
        dict(window_sizes=(None, 5, 5), attn_scale=1.0, d_head=12)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(
        n_embd=60, n_layer=3, n_head=5, n_inner=150, vocab_size=101, n_positions=64, rotary_dim=6),
        dict(rotary_dim=6, rotary_adjacent_pairs=True, parallel_attn_mlp=True)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=120, vocab_size=103,
        max_position_embeddings=64, rotary_pct=0.25, hidden_act="gelu"),
        dict(rotary_dim=4, parallel_attn_mlp=True, act_fn="gelu")),
    "gpt_neox-sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=110, vocab_size=99,
        max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=False, attention_bias=False),
        dict(rotary_dim=6, parallel_attn_mlp=False)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=56, num_hidden_layers=3, num_attention_heads=4, ffn_dim=110, vocab_size=107,
        max_position_embeddings=64, word_embed_proj_dim=56, init_std=0.1),
        dict(act_fn="relu", n_ctx=64, positional_embedding_type="standard")),
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA, num_key_value_heads=6),
                  dict(n_key_value_heads=6, rotary_scaling=None)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(_LLAMA, num_key_value_heads=3, rope_parameters=_LLAMA3_ROPE),
                  dict(n_key_value_heads=3, rotary_scaling=(4.0, 1.0, 4.0, 16), rotary_base=500.0)),
    "llama-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA, num_key_value_heads=1, attention_bias=True,
                                                          tie_word_embeddings=True),
                  dict(n_key_value_heads=1)),
    "mistral-mha": ("MistralConfig", "MistralForCausalLM", dict(_MISTRAL, num_key_value_heads=4),
                    dict(n_key_value_heads=4, window_sizes=(6, 6, 6))),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM", dict(_MISTRAL, num_key_value_heads=2, head_dim=12),
                    dict(n_key_value_heads=2, d_head=12)),
    "mistral-mqa": ("MistralConfig", "MistralForCausalLM", dict(_MISTRAL, num_key_value_heads=1),
                    dict(n_key_value_heads=1)),
    "qwen2-mha": ("Qwen2Config", "Qwen2ForCausalLM", dict(_QWEN2, num_key_value_heads=6),
                  dict(n_key_value_heads=6, window_sizes=(None, 5, 5))),
    "qwen2-gqa": ("Qwen2Config", "Qwen2ForCausalLM",
                  dict(_QWEN2, num_key_value_heads=2, use_sliding_window=False),
                  dict(n_key_value_heads=2, window_sizes=None)),
    "qwen2-mqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(_QWEN2, num_key_value_heads=1),
                  dict(n_key_value_heads=1)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=100, vocab_size=97, max_position_embeddings=64),
        dict(d_head=16, act_fn="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=56, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=120, vocab_size=109, max_position_embeddings=64, sliding_window=5,
        query_pre_attn_scalar=20, attn_logit_softcapping=2.0, final_logit_softcapping=1.0),
        dict(window_sizes=(5, None, 5), attn_scale=20**0.5, attn_scores_soft_cap=2.0,
             output_logits_soft_cap=1.0, use_normalization_before_and_after=True)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(
        hidden_size=60, num_hidden_layers=3, num_attention_heads=5, intermediate_size=130, vocab_size=109,
        max_position_embeddings=64, partial_rotary_factor=0.5),
        dict(rotary_dim=6, parallel_attn_mlp=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=120, vocab_size=127, max_position_embeddings=64, sliding_window=6, pad_token_id=0),
        dict(n_key_value_heads=2, window_sizes=(6, 6, 6), gated_mlp=True)),
}
FAMILY_CASES = {case.split("-")[0]: case for case in reversed(CASES)}  # one case per family (the first)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> (dir, HF model, tokens, HF outputs), built on first use and shared by the module's tests."""
    return case_builder(tmp_path_factory, CASES, T)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf(built, case):
    model, _, ref = assert_matches_hf(CASES, built, case)
    for layer, window in enumerate(model.cfg.window_sizes or ()):  # the windows really cut at T tokens
        first_key = ref["attentions"][layer][..., 0]  # [batch head query_pos]
        cut = T if window is None else window
        assert np.all(first_key[..., :cut] > 0) and np.all(first_key[..., cut:] == 0), layer


@pytest.mark.parametrize("case", list(FAMILY_CASES.values()))
def test_processing_keeps_log_probs(built, case):
    path, _, tokens, ref = built(case)
    model = HookedTransformer.from_pretrained(path)
    assert model.cfg.normalization_type in ("LNPre", "RMSPre")
    got = jax.nn.log_softmax(model(tokens), axis=-1)
    want = jax.nn.log_softmax(jnp.asarray(ref["logits"]), axis=-1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["llama-mqa", "gemma", "opt", "gptj"])
def test_in_memory_model_converts_like_directory(built, case):
    path, hf, _, _ = built(case)
    (cfg_dir, from_dir), (cfg_mem, from_mem) = converters.load(path), converters.load(hf)
    assert cfg_dir == cfg_mem
    leaves_dir, tree_dir = jax.tree_util.tree_flatten(from_dir)
    leaves_mem, tree_mem = jax.tree_util.tree_flatten(from_mem)
    assert tree_dir == tree_mem
    for a, b in zip(leaves_dir, leaves_mem, strict=True):
        np.testing.assert_array_equal(a, b)


# --- bad checkpoints -------------------------------------------------------------------------------------


def _copy(built, case, tmp_path):
    path = built(case)[0]
    out = tmp_path / "model"
    shutil.copytree(path, out)
    return out


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case", list(FAMILY_CASES.values()))
def test_unknown_config_key_is_named(built, case, tmp_path):
    path = _copy(built, case, tmp_path)
    conf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**conf, "mystery_routing": 4}))
    with pytest.raises(CheckpointError, match="mystery_routing"):
        converters.load(path)


@pytest.mark.parametrize("case", list(FAMILY_CASES.values()))
def test_misshapen_tensor_is_refused(built, case, tmp_path):
    path = _copy(built, case, tmp_path)
    victim = {}

    def shrink(tensors):
        name = next(n for n in sorted(tensors) if ".1." in n and tensors[n].ndim == 2)
        victim["name"] = name
        tensors[name] = np.ascontiguousarray(tensors[name][:-1])

    _edit_tensors(path, shrink)
    with pytest.raises(CheckpointError, match="shape") as err:
        converters.load(path)
    assert victim["name"].split(".", 1)[1] in str(err.value)


@pytest.mark.parametrize("case", list(FAMILY_CASES.values()))
def test_extra_tensor_is_refused(built, case, tmp_path):
    path = _copy(built, case, tmp_path)
    _edit_tensors(path, lambda t: t.update({"extra.adapter.weight": np.ones((3, 4), np.float32)}))
    with pytest.raises(CheckpointError, match="extra.adapter.weight"):
        converters.load(path)


def test_missing_untied_head_is_refused(built, tmp_path):
    path = _copy(built, "llama-mha", tmp_path)
    _edit_tensors(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="tie_word_embeddings=False"):
        converters.load(path)


# (case, config changes, error message pattern): configurations the generic model does not have
UNSUPPORTED = [
    ("opt", dict(word_embed_proj_dim=32), "project_in"),
    ("opt", dict(do_layer_norm_before=False), "do_layer_norm_before=False"),
    ("opt", dict(_remove_final_layer_norm=True), "final LayerNorm"),
    ("phi3", dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0],
                                       long_factor=[1.0])), "longrope"),
    ("phi3", dict(rope_parameters=None, rope_scaling=dict(type="su", short_factor=[1.0], long_factor=[1.0])),
     "'su'"),
    ("llama-mha", dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, factor=2.0)),
     r"'longrope' is not implemented.*'linear', 'llama3', 'yarn', 'dynamic'"),
    ("llama-mha", dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=2.0)),
     "low_freq_factor"),
    ("llama-mha", dict(mlp_bias=True), "mlp_bias"),
    ("mistral-mha", dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e4)), "llama3"),
    ("phi", dict(qk_layernorm=True), "qk_layernorm"),
    ("gptj", dict(rotary_dim=None), "rotary_dim"),
    ("gpt_neox", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.2)),
     "even"),
    ("gpt_neo", dict(attention_layers=["global"] * 3), "disagrees"),
    ("gpt_neo", dict(activation_function="gelu_10"), "gelu_10"),
    ("gemma2", dict(layer_types=["full_attention", "chunked_attention", "full_attention"]),
     "chunked_attention"),
    ("qwen2-mha", dict(layer_types=["full_attention"]), "1 attention layer types"),
    ("gemma", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
]


@pytest.mark.parametrize("case,changes,message", UNSUPPORTED, ids=lambda x: x if isinstance(x, str) else "")
def test_unsupported_config_is_refused(built, case, changes, message):
    path = built(case)[0]
    hf = {**json.loads((path / "config.json").read_text()), **changes}
    with pytest.raises(CheckpointError, match=message):
        converters.family_for(hf).config_from_hf(hf)


def test_legacy_config_keys_are_read(built):
    """Configs written before transformers 5 carry rope settings at the top level (rotary_pct, rope_theta,
    rope_scaling); they give the same Config as transformers 5's rope_parameters."""
    read = lambda hf: converters.family_for(hf).config_from_hf(hf)
    hf = json.loads((built("gpt_neox")[0] / "config.json").read_text())
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"} | dict(rotary_pct=0.25,
                                                                            rotary_emb_base=1e4)
    assert read(legacy) == read(hf)
    hf = json.loads((built("llama-gqa")[0] / "config.json").read_text())
    rope = dict(hf["rope_parameters"])
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"} | dict(
        rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    assert read(legacy) == read(hf)
