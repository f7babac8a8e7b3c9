"""The core forward against Hugging Face GPT-2 (PyTorch) on random models with unequal sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import HookedTransformer, testing

CONFIGS = [
    dict(n_embd=72, n_layer=3, n_head=4, n_inner=200, vocab_size=97, n_positions=40),
    dict(n_embd=60, n_layer=2, n_head=5, n_inner=None, vocab_size=131, n_positions=24,
         activation_function="gelu"),
    dict(n_embd=48, n_layer=4, n_head=6, n_inner=100, vocab_size=89, n_positions=32,
         activation_function="relu"),
]


@pytest.fixture(scope="module", params=range(len(CONFIGS)), ids=lambda i: f"cfg{i}")
def reference(request, tmp_path_factory):
    conf = CONFIGS[request.param]
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=request.param, **conf)
    path = testing.save_hf_model(hf, tmp_path_factory.mktemp("gpt2"))
    tokens = np.random.RandomState(request.param).randint(0, conf["vocab_size"], (3, 17))
    return path, tokens, testing.hf_outputs(hf, tokens), hf


def test_logits_resid_and_pattern_match_hf(reference):
    path, tokens, ref, _ = reference
    model = HookedTransformer.from_pretrained_no_processing(path)
    logits, cache = model.run_with_cache(tokens)
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    for layer in range(model.cfg.n_layers):
        np.testing.assert_allclose(np.asarray(cache["resid_pre", layer]), ref["hidden_states"][layer],
                                   atol=1e-4)
        np.testing.assert_allclose(np.asarray(cache["pattern", layer]), ref["attentions"][layer], atol=1e-5)
    # HF's last hidden state is after ln_f; ln_final.hook_normalized is before its weights (as TL 3.x)
    lnf = model.params["ln_final"]
    np.testing.assert_allclose(np.asarray(cache["ln_final.hook_normalized"] * lnf["w"] + lnf["b"]),
                               ref["hidden_states"][-1], atol=1e-4)


def test_in_memory_model_loads_like_directory(reference):
    path, tokens, ref, hf = reference
    model = HookedTransformer.from_pretrained_no_processing(hf)
    np.testing.assert_allclose(np.asarray(model(tokens)), ref["logits"], atol=1e-4)


def test_processing_keeps_log_probs(reference):
    path, tokens, ref, _ = reference
    model = HookedTransformer.from_pretrained(path)
    assert model.cfg.normalization_type == "LNPre"
    assert "ln1" not in model.params["blocks"]
    got = jax.nn.log_softmax(model(tokens), axis=-1)
    want = jax.nn.log_softmax(jnp.asarray(ref["logits"]), axis=-1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
    # centring: writing weights and the unembedding have zero mean where TL centres them
    np.testing.assert_allclose(np.asarray(model.W_E.mean(-1)), 0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.W_O.mean(-1)), 0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.W_U.mean(-1)), 0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.b_V), 0)


def test_loss_matches_hf(reference):
    import torch

    path, tokens, _, hf = reference
    model = HookedTransformer.from_pretrained_no_processing(path)
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens), labels=torch.as_tensor(tokens)).loss.item()
    assert float(model(tokens, return_type="loss")) == pytest.approx(want, abs=1e-5)


def test_every_hook_has_tl_shape(reference):
    path, tokens, _, _ = reference
    model = HookedTransformer.from_pretrained_no_processing(path)
    names = model.hook_names()
    _, cache = model.run_with_cache(tokens, names_filter=names)
    b, p = tokens.shape
    cfg = model.cfg
    sizes = {"batch": b, "pos": p, "query_pos": p, "key_pos": p, "d_model": cfg.d_model,
             "head_index": cfg.n_heads, "kv_head_index": cfg.n_key_value_heads, "d_head": cfg.d_head,
             "d_mlp": cfg.d_mlp, "1": 1, "d_vocab": cfg.d_vocab}
    from jaxlens.hook_names import hook_axes

    assert set(cache.keys()) == set(names)
    for name in names:
        axes = hook_axes(cfg, name)
        assert cache[name].shape == tuple(sizes[a] for a in axes.split()), name
