"""OLMo 2 (norms after the sublayers only, QK-norm over the whole q / k projection), GPT-BigCode
(multi-query attention in one fused c_attn) and Cohere / Command R (parallel block, bias-free LayerNorm,
interleaved rotary, logit_scale) against `transformers`, TransformerLens 4.3, and GGUF files as llama.cpp
writes them (`olmo2`, `starcoder`, `command-r`).

Each case is a random HF model with small unequal sizes, saved and loaded back through jaxlens: fp32 logits
within 1e-4, every layer's resid_pre equal to HF's hidden states, every attention pattern equal to HF's. The
family-specific parts are checked against the HF modules' own outputs (torch forward hooks): OLMo 2's
post-norm outputs and its q/k norms, GPT-BigCode's split of c_attn into one shared key/value head.
"""

import json

import gguf
import numpy as np
import pytest
from test_smollm2 import text_model_hparams, write_like_llama_cpp

from jaxlens import Config, HookedTransformer, converters, testing
from jaxlens.converters import _gguf
from jaxlens.errors import CheckpointError, ConfigError
from jaxlens.hook_names import block_hook_axes
from tests.converters.family_checks import assert_matches_hf, case_builder

T = 12
# case -> (HF config class, HF model class, config kwargs, Config fields the case must produce)
CASES = {
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=90, vocab_size=300, max_position_embeddings=64),
        dict(use_pre_norms=False, use_normalization_before_and_after=True, use_qk_norm=True,
             qk_norm_over_heads=True, n_key_value_heads=2, eps=1e-5)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(
        n_embd=48, n_layer=3, n_head=4, n_inner=90, vocab_size=300, n_positions=64),
        dict(n_key_value_heads=1, d_head=12, d_mlp=90, act_fn="gelu_pytorch_tanh", n_ctx=64)),
    "gpt_bigcode-mha": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(
        n_embd=40, n_layer=2, n_head=5, n_inner=70, vocab_size=89, n_positions=32, multi_query=False,
        scale_attn_weights=False, activation_function="gelu", tie_word_embeddings=False),
        dict(n_key_value_heads=5, attn_scale=1.0, act_fn="gelu")),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=90, vocab_size=300, max_position_embeddings=64, logit_scale=0.5,
        attention_bias=True, tie_word_embeddings=False),
        dict(parallel_attn_mlp=True, rotary_adjacent_pairs=True, normalization_type="LN", gated_mlp=True)),
}
FAMILIES = ["olmo2", "gpt_bigcode", "cohere"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> (dir, HF model, tokens, HF outputs), built on first use and shared by the module's tests."""
    return case_builder(tmp_path_factory, CASES, T, seed_base=60)


def _module_io(hf, tokens, modules: dict) -> dict:
    """{key: (input, output)} of HF submodules (name -> module) during one forward pass, as numpy."""
    import torch

    seen, handles = {}, []
    for key, module in modules.items():
        def hook(_, args, kwargs, out, key=key):
            x = args[0] if args else kwargs["hidden_states"]
            out = out[0] if isinstance(out, tuple) else out
            seen[key] = (x.detach().numpy().copy(), out.detach().numpy().copy())
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        hf(torch.as_tensor(tokens, dtype=torch.long))
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf(built, case):
    assert_matches_hf(CASES, built, case)


def test_olmo2_norms_follow_the_sublayers(built):
    """The MLP reads the raw resid_mid (no ln2); attn_out / mlp_out are HF's post-norm outputs; no ln1/ln2."""
    path, hf, tokens, _ = built("olmo2")
    model = HookedTransformer.from_pretrained_no_processing(path)
    assert not any(n.startswith(("ln1.", "ln2.")) for n in block_hook_axes(model.cfg)), "no pre-norms"
    assert "ln1" not in model.params["blocks"] and "ln2" not in model.params["blocks"]
    L = model.cfg.n_layers
    layers = hf.model.layers
    io = _module_io(hf, tokens, {**{("post_attn", i): layers[i].post_attention_layernorm for i in range(L)},
                                 **{("post_mlp", i): layers[i].post_feedforward_layernorm for i in range(L)},
                                 **{("mlp", i): layers[i].mlp for i in range(L)},
                                 **{("attn", i): layers[i].self_attn for i in range(L)}})
    _, cache = model.run_with_cache(tokens)
    for i in range(L):
        close = lambda got, want, what, i=i: np.testing.assert_allclose(
            np.asarray(got), want, atol=1e-5, rtol=0, err_msg=f"{what} {i}")
        close(cache["attn_out", i], io["post_attn", i][1], "attn_out = post_attention_layernorm(attn)")
        close(cache["mlp_out", i], io["post_mlp", i][1], "mlp_out = post_feedforward_layernorm(mlp)")
        close(cache["resid_mid", i], io["mlp", i][0], "the MLP reads resid_mid unnormalised")
        close(cache["resid_pre", i], io["attn", i][0], "attention reads resid_pre unnormalised")


def test_olmo2_qk_norm_spans_all_heads(built):
    """One RMS scale per position over all heads' q (and k) at once, as HF's q_norm [n_heads * d_head]."""
    path, hf, tokens, _ = built("olmo2")
    model = HookedTransformer.from_pretrained_no_processing(path)
    cfg, attn = model.cfg, hf.model.layers[1].self_attn
    io = _module_io(hf, tokens, {"q": attn.q_norm, "k": attn.k_norm})
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: ".1.attn." in n)
    for x, heads in (("q", cfg.n_heads), ("k", cfg.n_key_value_heads)):
        raw = np.asarray(cache[f"blocks.1.attn.hook_{x}"]).reshape(2, T, heads * cfg.d_head)
        np.testing.assert_allclose(raw, io[x][0], atol=1e-5, rtol=0)  # the norm's input: the projection
        scale = np.asarray(cache[f"blocks.1.attn.{x}_norm.hook_scale"])
        assert scale.shape == (2, T, 1, 1)
        want = np.sqrt((raw.astype(np.float64) ** 2).mean(-1) + cfg.eps)  # numpy, over every head
        np.testing.assert_allclose(scale[..., 0, 0], want, rtol=1e-5)
        per_head = np.sqrt((raw.reshape(2, T, heads, -1) ** 2).mean(-1) + cfg.eps)
        assert not np.allclose(per_head, want[..., None], rtol=1e-2), "per-head scales would differ"
        w = np.asarray(model.params["blocks"]["attn"][f"{x}_norm"]["w"][1])  # [head d_head]
        out = np.asarray(cache[f"blocks.1.attn.{x}_norm.hook_normalized"]) * w
        np.testing.assert_allclose(out.reshape(2, T, -1), io[x][1], atol=1e-5, rtol=0)


def test_gpt_bigcode_shares_one_key_value_head(built):
    """c_attn's rows [q; k; v] -> n_heads query heads and one key/value head, as HF splits them."""
    path, hf, tokens, _ = built("gpt_bigcode")
    model = HookedTransformer.from_pretrained_no_processing(path)
    cfg = model.cfg
    assert model.params["blocks"]["attn"]["W_K"].shape == (cfg.n_layers, 1, cfg.d_model, cfg.d_head)
    io = _module_io(hf, tokens, {"qkv": hf.transformer.h[2].attn.c_attn})
    fused = io["qkv"][1]
    assert fused.shape == (2, T, cfg.d_model + 2 * cfg.d_head)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: ".2.attn.hook_" in n)
    q, k, v = np.split(fused, [cfg.d_model, cfg.d_model + cfg.d_head], axis=-1)
    for name, want, heads in (("q", q, cfg.n_heads), ("k", k, 1), ("v", v, 1)):
        got = np.asarray(cache[f"blocks.2.attn.hook_{name}"])
        assert got.shape == (2, T, heads, cfg.d_head)
        np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5, rtol=0, err_msg=name)
    z = np.asarray(cache["blocks.2.attn.hook_z"])  # every query head reads the one value head
    pattern = np.asarray(cache["blocks.2.attn.hook_pattern"])
    np.testing.assert_allclose(z, np.einsum("bhqk,bke->bqhe", pattern, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", FAMILIES)
def test_processing_keeps_log_probs(built, case):
    import jax

    path, _, tokens, ref = built(case)
    if case == "cohere":  # LayerNorm + gated MLP: as StableLM, fold_ln has no bias slot for the gate
        with pytest.raises(ConfigError, match="fold_ln=False"):
            HookedTransformer.from_pretrained(path)
    model = HookedTransformer.from_pretrained(path, fold_ln=case != "cohere")
    if case == "olmo2":  # only ln_final folds; the post-norms keep their weights
        assert model.cfg.normalization_type == "RMSPre" and "w" in model.params["blocks"]["ln1_post"]
    got = jax.nn.log_softmax(model(tokens), axis=-1)
    want = jax.nn.log_softmax(ref["logits"], axis=-1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", FAMILIES)
def test_hooks_match_transformer_lens(built, case):
    pytest.importorskip("torch")
    pytest.importorskip("transformer_lens.model_bridge")
    from tl_reference import close, shared_hooks

    path, _, tokens, _ = built(case)
    jc, tc, shared = shared_hooks(path, tokens)
    n_layers = CASES[case][2].get("num_hidden_layers") or CASES[case][2]["n_layer"]
    assert len(shared) >= 12 * n_layers, shared
    causal = np.tril(np.ones((T, T), bool))
    for name in shared:
        got, want = np.asarray(jc[name]), tc[name].detach().float().numpy()
        if name.endswith("hook_attn_scores"):  # -inf where masked: compare the causal part
            got, want = got[..., causal], want[..., causal]
        elif "_norm." in name:  # OLMo 2: the bridge keeps HF's [batch pos (head d_head)]
            got = got.reshape(want.shape)
        close(got, want, name)


# --- GGUF ------------------------------------------------------------------------------------------------


def _starcoder_hparams(w, c):
    """llama.cpp's `StarCoderModel.set_gguf_parameters` (feed_forward_length is always 4 * n_embd)."""
    w.add_context_length(c.n_positions)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(1)
    w.add_layer_norm_eps(c.layer_norm_epsilon)


def _command_r_hparams(w, c):
    """llama.cpp's `TextModel.set_gguf_parameters` plus `CommandR2Model`'s logit scale and rope type."""
    text_model_hparams(w, c)
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_logit_scale(c.logit_scale)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


# llama.cpp architecture -> (HF config class, HF model class, config kwargs, metadata writer); the cases tie
# the embeddings (no `output` tensor) where the HF cases above do not, and OLMo 2 has attention biases here
GGUF_CASES = {
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=70, vocab_size=97, max_position_embeddings=64, attention_bias=True,
        tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=3000.0)), None),
    "starcoder": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(
        n_embd=40, n_layer=2, n_head=5, n_inner=160, vocab_size=97, n_positions=32), _starcoder_hparams),
    "command-r": ("CohereConfig", "CohereForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=70, vocab_size=97, max_position_embeddings=64, logit_scale=2.0,
        rope_parameters=dict(rope_type="default", rope_theta=3000.0)), _command_r_hparams),
}


@pytest.fixture(scope="module")
def gguf_built(tmp_path_factory):
    cache = {}

    def get(arch, hparams=None):
        key = (arch, hparams)
        if key not in cache:
            cls, model_cls, conf, writer = GGUF_CASES[arch]
            hf = testing.random_hf_model(cls, model_cls, seed=70 + len(arch),
                                         **{"initializer_range": 0.2, **conf})
            path = write_like_llama_cpp(hf, arch, tmp_path_factory.mktemp(arch) / f"{arch}.gguf",
                                        hparams=hparams or writer)
            tokens = np.random.RandomState(7).randint(0, conf["vocab_size"], (2, T))
            cache[key] = path, tokens, testing.hf_outputs(hf, tokens)["logits"]
        return cache[key]

    return get


@pytest.mark.parametrize("arch", list(GGUF_CASES))
def test_gguf_of_family_matches_hf(gguf_built, arch, tmp_path):
    path, tokens, want = gguf_built(arch)
    cfg, params = _gguf.load(path, cache_dir=tmp_path, progress=False)
    assert cfg.n_key_value_heads == (1 if arch == "starcoder" else 2)
    if arch == "olmo2":
        assert np.any(params["blocks"]["attn"]["b_Q"] != 0)
    model = HookedTransformer(cfg, params)
    np.testing.assert_allclose(np.asarray(model(tokens)), want, atol=1e-4, rtol=0)


def test_gguf_starcoder_with_several_kv_heads_is_refused(gguf_built, tmp_path):
    def several_kv(w, c):
        _starcoder_hparams(w, c)
        w.add_head_count_kv(c.n_head)  # overrides the 1 above: llama.cpp never writes this

    path, *_ = gguf_built("starcoder", several_kv)
    with pytest.raises(CheckpointError, match=r"num_key_value_heads=5 disagrees with multi_query=True"):
        _gguf.load(path, cache_dir=tmp_path, progress=False)


# --- bad input -------------------------------------------------------------------------------------------


def _hf_config(built, case, **changes):
    return {**json.loads((built(case)[0] / "config.json").read_text()), **changes}


@pytest.mark.parametrize("case,changes,message", [
    ("olmo2", dict(mystery_routing=4), "mystery_routing"),
    ("gpt_bigcode", dict(mystery_routing=4), "mystery_routing"),
    ("cohere", dict(mystery_routing=4), "mystery_routing"),
    ("cohere", dict(use_qk_norm=True), r"use_qk_norm.*not support"),
    ("gpt_bigcode", dict(num_key_value_heads=2), r"num_key_value_heads=2 disagrees with multi_query=True"),
    ("gpt_bigcode", dict(hidden_size=64), r"hidden_size=64 and n_embd=48.*keep one"),
    ("olmo2", dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4)), "'longrope' is not"),
])
def test_unsupported_config_is_refused(built, case, changes, message):
    hf = _hf_config(built, case, **changes)
    with pytest.raises(CheckpointError, match=message):
        converters.family_for(hf).config_from_hf(hf)


def test_generic_config_names_read_like_gpt_bigcode_names(built):
    hf = _hf_config(built, "gpt_bigcode")
    generic = {k: v for k, v in hf.items() if k not in ("n_embd", "n_layer", "n_head", "n_positions")}
    generic.update(hidden_size=hf["n_embd"], num_hidden_layers=hf["n_layer"],
                   num_attention_heads=hf["n_head"], max_position_embeddings=hf["n_positions"])
    read = lambda h: converters.family_for(h).config_from_hf(h)
    assert read(generic) == read(hf)


@pytest.mark.parametrize("case", FAMILIES)
def test_extra_tensor_is_refused(built, case, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    out = tmp_path / "model"
    shutil.copytree(built(case)[0], out)
    tensors = load_file(out / "model.safetensors")
    tensors["extra.adapter.weight"] = np.ones((3, 4), np.float32)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="extra.adapter.weight"):
        converters.load(out)


def test_qk_norm_over_heads_needs_qk_norm():
    with pytest.raises(ConfigError, match="qk_norm_over_heads=True.*use_qk_norm is False"):
        Config(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=16, d_vocab=11, n_ctx=8,
               qk_norm_over_heads=True)
