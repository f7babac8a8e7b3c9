"""jaxlens against TransformerLens itself (golden reference) on a random Hugging Face GPT-2.

TransformerLens 4.x is booted offline from the saved directory through `TransformerBridge` in
compatibility mode (legacy hook names; HookedTransformer weight processing unless `no_processing=True`).
The module skips when `transformer_lens` is not installed. Install it without letting it move torch or
transformers: `pip install --no-deps transformer-lens==4.3.0` and then
`pip install accelerate datasets pandas fancy-einsum typeguard better-abc`.

Checked: the legacy hook names, their shapes and values; processed weights and log-probs; the
ActivationCache analysis methods; tokenization. Bridge-only hook points (`*.hook_in`, `*.hook_out`,
`attn.hook_hidden_states`, `hook_unembed`, sub-module hooks such as `attn.q.hook_out`) have no jaxlens
counterpart and are ignored.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")
pytestmark = pytest.mark.slow  # about 40-60 s on 2 cores (two bridges, several jaxlens compiles)

from tl_reference import ATOL, close, legacy, np_  # noqa: E402
from tl_reference import boot as tl_boot  # noqa: E402

from jaxlens import HookedTransformer, hook_names, testing  # noqa: E402

# Unequal sizes: d_model 72, 4 heads of 18, d_mlp 200, 3 layers, vocab 300 (the tiny tokenizer's size).
HF_CONFIG = dict(n_embd=72, n_layer=3, n_head=4, n_inner=200, vocab_size=300, n_positions=40, bos_token_id=0,
                 eos_token_id=0)
PROMPT = "When Mary and John went to the store, John gave a drink to"
WEIGHTS = ["W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "b_in", "W_out",
           "b_out", "W_U", "b_U"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_tl")
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=3, **HF_CONFIG)
    return testing.save_hf_model(hf, path, testing.train_tiny_tokenizer(path))


def boot(path, processing: bool):
    return tl_boot(path) if processing else tl_boot(path, no_processing=True)


@pytest.fixture(scope="module", params=[True, False], ids=["processed", "unprocessed"])
def pair(request, model_dir):
    """(TransformerLens bridge, jaxlens HookedTransformer), both with or both without weight processing."""
    load = HookedTransformer.from_pretrained if request.param else (
        HookedTransformer.from_pretrained_no_processing)
    return boot(model_dir, request.param), load(model_dir)


@pytest.fixture(scope="module")
def processed(model_dir):
    return boot(model_dir, True), HookedTransformer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def caches(processed):
    """Both models run with cache on PROMPT (processed weights, as TL's analysis methods assume)."""
    tl, jl = processed
    with torch.no_grad():
        _, tl_cache = tl.run_with_cache(PROMPT)
    _, jl_cache = jl.run_with_cache(PROMPT)
    return tl, jl, tl_cache, jl_cache


def test_legacy_hooks_names_shapes_and_values(pair):
    tl, jl = pair
    tokens = np.random.RandomState(0).randint(0, HF_CONFIG["vocab_size"], (2, 19))
    with torch.no_grad():
        tl_logits, tl_cache = tl.run_with_cache(torch.as_tensor(tokens))
    jl_logits, jl_cache = jl.run_with_cache(tokens)
    tl_names = set(legacy(tl_cache.keys()))
    assert len(tl_names) > 20, f"too few legacy names found in the bridge cache: {sorted(tl_names)}"
    missing = tl_names - set(jl_cache.keys())
    assert not missing, f"TransformerLens hook names missing from jaxlens: {sorted(missing)}"
    assert set(hook_names.default_names(jl.cfg)) == tl_names, sorted(set(jl_cache.keys()) ^ tl_names)
    for name in sorted(tl_names):
        want, got = np_(tl_cache[name]), np_(jl_cache[name])
        assert got.shape == want.shape, f"{name}: jaxlens {got.shape} != TransformerLens {want.shape}"
        if name.endswith("hook_attn_scores"):
            causal = np.tril(np.ones(want.shape[-2:], bool))
            assert np.all(np.isfinite(want[..., causal]))
            got, want = got[..., causal], want[..., causal]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=name)
    close(jl_logits, tl_logits, "logits")


def test_hook_normalized_is_before_ln_weights(model_dir):
    tl, jl = boot(model_dir, False), HookedTransformer.from_pretrained_no_processing(model_dir)
    tokens = np.random.RandomState(1).randint(0, HF_CONFIG["vocab_size"], (1, 11))
    with torch.no_grad():
        _, tc = tl.run_with_cache(torch.as_tensor(tokens))
    _, jc = jl.run_with_cache(tokens)
    for name in ["blocks.0.ln1.hook_normalized", "blocks.2.ln2.hook_normalized", "ln_final.hook_normalized"]:
        close(jc[name], tc[name], name)


def test_processed_log_probs_and_weights(processed):
    tl, jl = processed
    tokens = tl.to_tokens(PROMPT)
    with torch.no_grad():
        want = torch.log_softmax(tl(tokens), -1)
    close(jax.nn.log_softmax(jl(np.asarray(tokens)), axis=-1), want, "log-probs")
    # TL really processed its weights (otherwise the comparison below would not test processing)
    assert np.abs(np_(tl.W_U).mean(-1)).max() < 1e-6 and np.abs(np_(tl.b_V)).max() == 0.0
    for name in WEIGHTS:
        close(getattr(jl, name), getattr(tl, name), name)


def test_accumulated_resid(caches):
    tl, jl, tc, jc = caches
    for kw in [dict(incl_mid=True), dict(layer=2, mlp_input=True, apply_ln=True, pos_slice=-1),
               dict(pos_slice=(2, 7)), dict(layer=1, incl_mid=True, apply_ln=True)]:
        want, want_labels = tc.accumulated_resid(return_labels=True, **kw)
        got, got_labels = jc.accumulated_resid(return_labels=True, **kw)
        assert got_labels == want_labels, kw
        close(got, want, f"accumulated_resid {kw}")


def test_accumulated_resid_final_layer_apply_ln(caches):
    tl, jl, tc, jc = caches
    for kw in [dict(apply_ln=True), dict(apply_ln=True, pos_slice=(2, 7), incl_mid=True)]:
        close(jc.accumulated_resid(**kw), tc.accumulated_resid(**kw), f"accumulated_resid {kw}")


def test_decompose_resid(caches):
    tl, jl, tc, jc = caches
    for kw in [dict(), dict(layer=2, mlp_input=True, mode="attn", apply_ln=True, pos_slice=-1),
               dict(mode="mlp", incl_embeds=False, apply_ln=True), dict(layer=1, pos_slice=[1, 4, 9])]:
        want, want_labels = tc.decompose_resid(return_labels=True, **kw)
        got, got_labels = jc.decompose_resid(return_labels=True, **kw)
        assert got_labels == want_labels, kw
        close(got, want, f"decompose_resid {kw}")


def test_stack_head_results(caches):
    tl, jl, tc, jc = caches
    for kw in [dict(), dict(layer=2, incl_remainder=True, pos_slice=-1, apply_ln=True),
               dict(incl_remainder=True, apply_ln=True)]:
        want, want_labels = tc.stack_head_results(return_labels=True, **kw)
        got, got_labels = jc.stack_head_results(return_labels=True, **kw)
        assert got_labels == want_labels, kw
        close(got, want, f"stack_head_results {kw}")


def test_apply_ln_to_stack_and_logit_attrs(caches):
    tl, jl, tc, jc = caches
    for kw in [dict(layer=1), dict(layer=2, mlp_input=True, pos_slice=-1),
               dict(layer=None, pos_slice=(3, 8))]:
        sliced = dict(pos_slice=kw.get("pos_slice"))
        want = tc.apply_ln_to_stack(tc.decompose_resid(layer=2, **sliced), **kw)
        got = jc.apply_ln_to_stack(jc.decompose_resid(layer=2, **sliced), **kw)
        close(got, want, f"apply_ln_to_stack {kw}")
    answer, wrong = tl.to_single_token(" Mary"), tl.to_single_token(" John")
    assert jl.to_single_token(" Mary") == answer
    heads_t, heads_j = tc.stack_head_results(pos_slice=-1), jc.stack_head_results(pos_slice=-1)
    close(jc.logit_attrs(heads_j, tokens=answer, incorrect_tokens=wrong, pos_slice=-1),
          tc.logit_attrs(heads_t, tokens=answer, incorrect_tokens=wrong, pos_slice=-1), "logit_attrs (diff)")
    resid_t, resid_j = tc.decompose_resid(pos_slice=-1), jc.decompose_resid(pos_slice=-1)
    close(jc.logit_attrs(resid_j, tokens=answer, pos_slice=-1),
          tc.logit_attrs(resid_t, tokens=answer, pos_slice=-1), "logit_attrs")
    # the components of the full residual stream add up to the answer's logit (up to b_U and the centring
    # constant, which cancel in a logit difference)
    logits = np_(jl(PROMPT))[0, -1]
    total = np_(jc.logit_attrs(resid_j, tokens=answer, incorrect_tokens=wrong, pos_slice=-1)).sum()
    b_U = np_(jl.b_U)
    np.testing.assert_allclose(total, logits[answer] - logits[wrong] - (b_U[answer] - b_U[wrong]), atol=ATOL)


@pytest.mark.parametrize("prepend_bos", [None, False])
def test_tokenization(processed, prepend_bos):
    tl, jl = processed
    for text in [PROMPT, "The capital of France is Paris.", " fox"]:
        np.testing.assert_array_equal(np_(jl.to_tokens(text, prepend_bos=prepend_bos)),
                                      np_(tl.to_tokens(text, prepend_bos=prepend_bos)), err_msg=text)
        want = tl.to_str_tokens(text, prepend_bos=prepend_bos)
        assert jl.to_str_tokens(text, prepend_bos=prepend_bos) == want, text
    batch = [PROMPT, "The quick brown fox"]
    np.testing.assert_array_equal(np_(jl.to_tokens(batch, prepend_bos=prepend_bos)),
                                  np_(tl.to_tokens(batch, prepend_bos=prepend_bos)))
