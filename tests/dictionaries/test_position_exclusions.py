"""Leaving positions out: the activation store keeps exactly the positions a hand computation keeps (planted
special tokens and a planted huge-norm token, norms from the embedding matrix by numpy), counts them once per
buffer in its metadata, stays a pure function of key and step; the evaluation spreads its rows over the file
(hand-checked indices) and leaves out, unpatched and unscored, the same kinds of positions; bad arguments are
clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import forward, init_params, lm_cross_entropy_loss, testing
from jaxlens.dictionaries.base import DictionaryConfig, init_dictionary
from jaxlens.dictionaries.corpus import CorpusError, TokenCorpus
from jaxlens.dictionaries.evals import evaluate, evaluation_rows
from jaxlens.dictionaries.store import ActivationStore, check_exclusions, special_token_ids
from jaxlens.errors import InputError
from jaxlens.interventions import Fn

CFG = testing.tiny_config()
SPECIAL, HUGE = 7, 5  # a token id to exclude by id, and one whose embedding is 1000x longer than the others
PARAMS = init_params(CFG, jax.random.key(1), scale=0.2)
PARAMS["embed"]["W_E"] = PARAMS["embed"]["W_E"].at[HUGE].multiply(1000.0)
W_E = np.asarray(PARAMS["embed"]["W_E"], np.float64)
CTX = 9


def _stream(n_tokens, seed):
    r = np.random.default_rng(seed)
    ids = r.choice(np.setdiff1d(np.arange(1, CFG.d_vocab), [SPECIAL, HUGE]), n_tokens)
    ids[5::13], ids[11::29] = SPECIAL, HUGE  # planted at known places
    return ids


CORPUS = TokenCorpus.from_tokens(_stream(40 * (CTX - 1), 0), bos=0)


def _store(**kw):
    kw = dict(context_size=CTX, batch_size=24, buffer_sequences=8, forward_batch=4, key=5) | kw
    return ActivationStore(PARAMS, CFG, CORPUS, ["hook_embed"], **kw)


def _sorted(a):
    a = np.asarray(a, np.float64)
    return a[np.lexsort(a.T[::-1])]


def test_store_keeps_exactly_the_hand_computed_positions():
    store = _store(exclude_token_ids=[SPECIAL], exclude_norm_ratio=10.0)
    for b in (0, 3):
        tokens = CORPUS.sequences(CTX, store.buffer_rows(b))[:, 1:].reshape(-1)  # BOS row starts left out
        norms = np.linalg.norm(W_E[tokens], axis=1)  # hook_embed is W_E[token]
        cand = tokens != SPECIAL
        keep = cand & (norms <= 10 * np.median(norms[cand]))
        np.testing.assert_array_equal(keep, (tokens != SPECIAL) & (tokens != HUGE))  # the planted ones only
        acts = store.buffer(b)["hook_embed"]
        np.testing.assert_allclose(_sorted(acts), _sorted(W_E[tokens[keep]]), rtol=1e-6)
        assert store._counts[b] == {"bos_position": 8, "special_tokens": int((tokens == SPECIAL).sum()),
                                    "high_norm": int((tokens == HUGE).sum()), "kept": int(keep.sum())}
    store.buffer(0)  # rebuilt: counted once
    want = {k: store._counts[0][k] + store._counts[3][k] for k in store._counts[0]}
    assert store.exclusion_counts() == want | {"buffers": 2}
    assert want["special_tokens"] > 0 and want["high_norm"] > 0
    meta = store.metadata
    assert meta["exclude_token_ids"] == [SPECIAL] and meta["exclude_norm_ratio"] == 10.0
    assert meta["excluded"] == store.exclusion_counts() and meta["exclude_reserve"] == 0.05
    # batches: slices of the kept, shuffled buffer, a pure function of key and step
    assert store.batches_per_buffer == int(64 * 0.95) // 24 == 2
    np.testing.assert_array_equal(store.batch(7)["hook_embed"], store.buffer(3)["hook_embed"][24:48])
    fresh = _store(exclude_token_ids=[SPECIAL], exclude_norm_ratio=10.0)
    np.testing.assert_array_equal(fresh.batch(7)["hook_embed"], store.batch(7)["hook_embed"])
    # without exclusions nothing is left out but the row starts
    off = _store()
    assert len(off.buffer(0)["hook_embed"]) == 64 and off.exclusion_counts()["high_norm"] == 0


def test_special_token_ids_are_saelens_attributes():
    class Tok:
        bos_token_id, eos_token_id, pad_token_id, sep_token_id = 3, 3, 9, None

    assert special_token_ids(Tok()) == (3, 9)


def test_store_bad_exclusions_are_clear_errors():
    with pytest.raises(InputError, match=r"in \[0, 97\); found 97"):
        _store(exclude_token_ids=[1, 97])
    for bad in (1.0, 0.5, float("nan")):
        with pytest.raises(InputError, match="exclude_norm_ratio .* above 1"):
            _store(exclude_norm_ratio=bad)
    # what the type annotations already refuse under the tests' type checker, checked by hand as well
    with pytest.raises(InputError, match="sequence of token ids; found 'abc'"):
        check_exclusions("abc", None, 97)
    with pytest.raises(InputError, match="found 1.5"):
        check_exclusions([1.5], None, 97)
    for bad in (True, "10"):
        with pytest.raises(InputError, match="exclude_norm_ratio"):
            check_exclusions((), bad, 97)
    with pytest.raises(InputError, match=r"exclude_reserve must be a fraction in \[0, 1\); found 1.0"):
        _store(exclude_reserve=1.0)
    with pytest.raises(InputError, match="less its exclusion reserve"):
        _store(exclude_reserve=0.7)
    # no reserve: a buffer that loses positions cannot fill its batches
    tight = _store(batch_size=32, exclude_token_ids=[SPECIAL], exclude_reserve=0.0)
    with pytest.raises(InputError, match=r"Shuffle buffer 0 kept \d+ of 64 .* Raise exclude_reserve"):
        tight.batch(0)


def test_evaluation_rows_spread_over_the_file():
    np.testing.assert_array_equal(evaluation_rows(10, 4), [1, 3, 6, 8])  # floor((2i + 1) * 10 / 8)
    np.testing.assert_array_equal(evaluation_rows(1000, 3), [166, 500, 833])
    np.testing.assert_array_equal(evaluation_rows(10, 10), np.arange(10))
    np.testing.assert_array_equal(evaluation_rows(5, 64), np.arange(5))
    with pytest.raises(CorpusError, match="at least one row"):
        evaluation_rows(0, 4)
    with pytest.raises(CorpusError, match="n_sequences=0"):
        evaluation_rows(10, 0)


HOOK = "blocks.0.hook_resid_pre"
EVAL = TokenCorpus.from_tokens(_stream(12 * (CTX - 1), 1), bos=0)


def test_evaluation_leaves_out_the_same_positions_unpatched_and_unscored():
    sae = init_dictionary(DictionaryConfig(architecture="topk", d_in=40, d_sae=64, k=6, hook_name=HOOK),
                          jax.random.key(3))
    sae.W_dec[...] = sae.W_dec[...] * 20
    m = evaluate(sae, PARAMS, CFG, EVAL, context_size=CTX, n_sequences=4, batch_size=4,
                 exclude_token_ids=[SPECIAL], exclude_norm_ratio=10.0)
    tokens = jnp.asarray(EVAL.sequences(CTX, [1, 4, 7, 10]))  # evaluation_rows(12, 4), one batch
    clean, cache = forward(PARAMS, CFG, tokens, cache_names=(HOOK,))
    x = np.asarray(cache[HOOK], np.float64)
    t = np.asarray(tokens)
    cand = np.ones(t.shape, bool)
    cand[:, 0] = False
    norms = np.linalg.norm(x, axis=-1)
    rest = cand & (t != SPECIAL)
    keep = rest & (norms <= 10 * np.median(norms[rest]))
    assert (m["excluded_bos_position"], m["excluded_special_tokens"], m["excluded_high_norm"]) == (
        4, int((cand & (t == SPECIAL)).sum()), int((rest & (t == HUGE)).sum()))
    assert m["excluded_high_norm"] > 0 and m["excluded_special_tokens"] > 0
    assert m["tokens"] == keep.sum()
    r = np.asarray(sae(jnp.asarray(x, jnp.float32)), np.float64)
    assert m["mse"] == pytest.approx(((x - r) ** 2).sum(-1)[keep].mean(), rel=1e-4)
    # the splice only at kept positions; the loss of pair (i, i + 1) counted where i is kept
    keep_j = jnp.asarray(keep)
    hooked = Fn(lambda a, hook: jnp.where(keep_j[..., None], sae(a), a))
    spliced_logits = forward(PARAMS, CFG, tokens, interventions={HOOK: hooked})[0]
    pair = keep[:, :-1]

    def ce(logits):
        return float(np.asarray(lm_cross_entropy_loss(logits, tokens, per_token=True))[pair].mean())

    assert m["ce_loss_clean"] == pytest.approx(ce(clean), rel=1e-5)
    assert m["ce_loss_with_dictionary"] == pytest.approx(ce(spliced_logits), rel=1e-5)
    logp_c, logp_s = jax.nn.log_softmax(clean, -1), jax.nn.log_softmax(spliced_logits, -1)
    kl = np.asarray((jnp.exp(logp_c) * (logp_c - logp_s)).sum(-1))[keep].mean()
    assert m["kl_div_with_dictionary"] == pytest.approx(float(kl), rel=1e-4)
    with pytest.raises(InputError, match="exclude_norm_ratio"):
        evaluate(sae, PARAMS, CFG, EVAL, context_size=CTX, n_sequences=2, exclude_norm_ratio=0.9)
