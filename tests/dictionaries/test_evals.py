"""Evaluation: every metric against a hand computation from run_with_cache activations (numpy, float64) and
the CE losses against the model run with the core's splice, a zero ablation and a hand-written hook function;
a transcoder against the model with its MLP output replaced by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import forward, init_params, lm_cross_entropy_loss, testing
from jaxlens.dictionaries.base import DictionaryConfig, DictionaryError, init_dictionary
from jaxlens.dictionaries.corpus import TokenCorpus
from jaxlens.dictionaries.evals import evaluate, evaluation_rows
from jaxlens.dictionaries.splice import spliced
from jaxlens.interventions import Fn, zero_ablate

CFG = testing.tiny_config()
PARAMS = init_params(CFG, jax.random.key(2), scale=0.2)
CTX, N = 12, 6
CORPUS = TokenCorpus.from_tokens(np.random.default_rng(1).integers(1, CFG.d_vocab, 10 * (CTX - 1)), bos=0)
HOOK = "blocks.1.hook_resid_post"


def _sae():
    sae = init_dictionary(DictionaryConfig(architecture="topk", d_in=40, d_sae=64, k=6, hook_name=HOOK),
                          jax.random.key(3))
    sae.W_dec[...] = sae.W_dec[...] * 20  # a reconstruction of the right size: metrics away from 0 and 1
    return sae


def _ce(logits, tokens):
    return float(lm_cross_entropy_loss(logits, tokens))


def test_reconstruction_metrics_match_a_hand_computation():
    sae = _sae()
    m = evaluate(sae, PARAMS, CFG, CORPUS, context_size=CTX, n_sequences=N, batch_size=3)  # two batches
    tokens = jnp.asarray(CORPUS.sequences(CTX, evaluation_rows(10, N)))  # rows spread over the 10
    _, cache = forward(PARAMS, CFG, tokens, cache_names=(HOOK,))
    x = np.asarray(cache[HOOK])[:, 1:].reshape(-1, 40).astype(np.float64)  # BOS left out
    f = np.asarray(sae.encode(jnp.asarray(x, jnp.float32)), np.float64)
    r = np.asarray(sae(jnp.asarray(x, jnp.float32)), np.float64)
    err = ((x - r) ** 2).sum(1)
    var = (x ** 2).sum() - len(x) * (x.mean(0) ** 2).sum()
    assert m["tokens"] == N * (CTX - 1)
    assert m["explained_variance"] == pytest.approx(1 - err.sum() / var, rel=1e-4)
    assert m["mse"] == pytest.approx(err.mean(), rel=1e-4)
    assert m["l0"] == pytest.approx((f != 0).sum(1).mean()) and m["l0"] == pytest.approx(6)
    assert m["l1"] == pytest.approx(np.abs(f).sum(1).mean(), rel=1e-4)
    cos = (x * r).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(r, axis=1)
    assert m["cossim"] == pytest.approx(cos.mean(), rel=1e-4)
    assert m["l2_ratio"] == pytest.approx((np.linalg.norm(r, axis=1) / np.linalg.norm(x, axis=1)).mean(),
                                          rel=1e-4)
    density = (f != 0).mean(0)
    assert m["dead_fraction"] == pytest.approx((density == 0).mean())
    assert m["dense_fraction"] == pytest.approx((density > 0.1).mean())
    assert 0 < m["dead_fraction"] < 1 and 0 < m["dense_fraction"] < 1


def test_ce_losses_match_the_spliced_and_ablated_model():
    sae = _sae()
    tokens = jnp.asarray(CORPUS.sequences(CTX, evaluation_rows(10, N)))
    m = evaluate(sae, PARAMS, CFG, CORPUS, context_size=CTX, n_sequences=N, exclude_bos=False)
    clean = _ce(forward(PARAMS, CFG, tokens)[0], tokens)
    with_sae = _ce(forward(PARAMS, CFG, tokens, interventions=spliced([sae]))[0], tokens)
    zero = _ce(forward(PARAMS, CFG, tokens, interventions={HOOK: zero_ablate()})[0], tokens)
    assert m["ce_loss_clean"] == pytest.approx(clean, rel=1e-5)
    assert m["ce_loss_with_dictionary"] == pytest.approx(with_sae, rel=1e-5)
    assert m["ce_loss_zero_ablation"] == pytest.approx(zero, rel=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx((zero - with_sae) / (zero - clean), rel=1e-4)
    # a difference of two float32 losses near 4.5: absolute error about 1e-6
    assert m["ce_loss_increase"] == pytest.approx(with_sae - clean, rel=1e-4, abs=3e-6)
    # BOS left out: the splice at every position but 0, by a hand-written hook function, and the loss of the
    # prediction made at position 0 not counted (SAELens's mask)
    m_bos = evaluate(sae, PARAMS, CFG, CORPUS, context_size=CTX, n_sequences=N)

    def hook(x, hook):
        return x.at[:, 1:].set(sae(x[:, 1:]))

    logits_sae = forward(PARAMS, CFG, tokens, interventions={HOOK: Fn(hook)})[0]
    assert m_bos["ce_loss_with_dictionary"] == pytest.approx(_ce(logits_sae[:, 1:], tokens[:, 1:]), rel=1e-5)
    logp_c = jax.nn.log_softmax(forward(PARAMS, CFG, tokens)[0], -1)
    logp_s = jax.nn.log_softmax(logits_sae, -1)
    kl = float((jnp.exp(logp_c) * (logp_c - logp_s)).sum(-1)[:, 1:].mean())
    assert m_bos["kl_div_with_dictionary"] == pytest.approx(kl, rel=1e-4)


def test_transcoder_is_patched_at_its_output_hook():
    tc = init_dictionary(DictionaryConfig(architecture="transcoder", d_in=40, d_out=40, d_sae=30,
                                          hook_name="blocks.0.ln2.hook_normalized",
                                          hook_name_out="blocks.0.hook_mlp_out"), jax.random.key(4))
    tokens = jnp.asarray(CORPUS.sequences(CTX, evaluation_rows(10, 4)))
    m = evaluate(tc, PARAMS, CFG, CORPUS, context_size=CTX, n_sequences=4, exclude_bos=False)
    names = ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    _, cache = forward(PARAMS, CFG, tokens, cache_names=names)
    recon = tc(cache["blocks.0.ln2.hook_normalized"])
    y = np.asarray(cache["blocks.0.hook_mlp_out"], np.float64).reshape(-1, 40)
    r = np.asarray(recon, np.float64).reshape(-1, 40)
    var = (y ** 2).sum() - len(y) * (y.mean(0) ** 2).sum()
    assert m["explained_variance"] == pytest.approx(1 - ((y - r) ** 2).sum() / var, rel=1e-4)
    by_hand = {"blocks.0.hook_mlp_out": Fn(lambda x, hook: recon)}
    logits = forward(PARAMS, CFG, tokens, interventions=by_hand)[0]
    assert m["ce_loss_with_dictionary"] == pytest.approx(_ce(logits, tokens), rel=1e-5)


def test_bad_dictionaries_are_clear_errors():
    wide = init_dictionary(DictionaryConfig(architecture="topk", d_in=72, d_sae=16, k=2, hook_name=HOOK))
    with pytest.raises(DictionaryError, match="d_in=72"):
        evaluate(wide, PARAMS, CFG, CORPUS, context_size=CTX, n_sequences=2)
    nowhere = init_dictionary(DictionaryConfig(architecture="topk", d_in=40, d_sae=16, k=2))
    with pytest.raises(DictionaryError, match="no hook_name"):
        evaluate(nowhere, PARAMS, CFG, CORPUS, context_size=CTX, n_sequences=2)
