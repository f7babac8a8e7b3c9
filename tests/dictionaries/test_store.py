"""The activation store: batches hold exactly the model's activations (checked against run_with_cache), rows
of one token stay paired across hooks, the order is a pure function of key and step (resume), every row is
visited once per epoch, and bad hooks or sizes are clear errors."""

import jax
import numpy as np
import pytest

from jaxlens import HookedTransformer, init_params, testing
from jaxlens.dictionaries.corpus import CorpusError, TokenCorpus
from jaxlens.dictionaries.store import ActivationStore
from jaxlens.errors import InputError, UnknownHookError

CFG = testing.tiny_config()
PARAMS = init_params(CFG, jax.random.key(1), scale=0.2)
CTX = 9
CORPUS = TokenCorpus.from_tokens(np.random.default_rng(0).integers(1, CFG.d_vocab, 40 * (CTX - 1)), bos=0)


def _store(hooks, **kw):
    kw = dict(context_size=CTX, batch_size=24, buffer_sequences=8, forward_batch=4, key=5) | kw
    return ActivationStore(PARAMS, CFG, CORPUS, hooks, **kw)


def _rows(a):
    return np.asarray(a)[np.lexsort(np.asarray(a).T[::-1])]


def test_buffer_holds_the_models_activations():
    store = _store(["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"])
    assert store.stop_at_layer == 2 and store.widths == {"blocks.1.hook_resid_post": 40,
                                                         "blocks.0.attn.hook_z": 40}
    rows = store.buffer_rows(3)
    tokens = CORPUS.sequences(CTX, rows)
    _, cache = HookedTransformer(CFG, PARAMS).run_with_cache(tokens, names_filter=list(store.hooks))
    acts = store.buffer(3)
    for h in store.hooks:
        want = np.asarray(cache[h])[:, 1:].reshape(len(rows) * (CTX - 1), -1)  # BOS position left out
        np.testing.assert_allclose(_rows(acts[h]), _rows(want), atol=1e-5)
    # batches are consecutive slices of the shuffled buffer
    b = store.batches_per_buffer
    assert b == 8 * 8 // 24
    np.testing.assert_array_equal(store.batch(3 * b + 1)["blocks.0.attn.hook_z"],
                                  acts["blocks.0.attn.hook_z"][24:48])


def test_hooks_stay_paired_per_token():
    # resid_post of layer 0 is resid_pre of layer 1: the same token's row in both
    store = _store(["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.2.hook_mlp_out"])
    for step in (0, 5):
        batch = store.batch(step)
        np.testing.assert_array_equal(batch["blocks.0.hook_resid_post"], batch["blocks.1.hook_resid_pre"])
        assert batch["blocks.2.hook_mlp_out"].shape == (24, 40)
    assert store.stop_at_layer == 3
    assert _store(["hook_embed"]).stop_at_layer == 0
    assert _store(["ln_final.hook_normalized"]).stop_at_layer is None


def test_order_is_a_pure_function_of_key_and_step():
    a, b = _store(["blocks.0.hook_resid_post"]), _store(["blocks.0.hook_resid_post"])
    run = [np.asarray(x["blocks.0.hook_resid_post"]) for _, x in a.batches(0, 12)]
    resumed = [np.asarray(x["blocks.0.hook_resid_post"]) for _, x in b.batches(7, 12)]
    for x, y in zip(run[7:], resumed, strict=True):
        np.testing.assert_array_equal(x, y)
    other = _store(["blocks.0.hook_resid_post"], key=6).batch(0)["blocks.0.hook_resid_post"]
    assert not np.allclose(other, run[0])
    # each epoch visits every row once (40 rows = 5 buffers of 8)
    for epoch in range(2):
        seen = np.concatenate([a.buffer_rows(epoch * 5 + i) for i in range(5)])
        np.testing.assert_array_equal(np.sort(seen), np.arange(40))
    assert not np.array_equal(a.buffer_rows(0), a.buffer_rows(5))  # a new permutation each epoch


def test_bad_inputs_are_clear_errors():
    with pytest.raises(UnknownHookError, match="blocks.1.hook_resid_post"):
        _store(["blocks.1.hook_resid_psot"])
    with pytest.raises(InputError, match="axes 'batch head_index query_pos key_pos'"):
        _store(["blocks.0.attn.hook_pattern"])
    with pytest.raises(InputError, match="names every layer"):
        _store(["blocks.hook_resid_post"])
    with pytest.raises(InputError, match="fewer than batch_size=1000"):
        _store(["blocks.0.hook_resid_post"], batch_size=1000)
    with pytest.raises(InputError, match="multiple of forward_batch=4"):
        _store(["blocks.0.hook_resid_post"], buffer_sequences=6)
    with pytest.raises(CorpusError, match="fewer than one shuffle buffer"):
        _store(["blocks.0.hook_resid_post"], buffer_sequences=64)
    with pytest.raises(InputError, match="longer than the model's n_ctx=32"):
        _store(["blocks.0.hook_resid_post"], context_size=33)


def test_one_store_feeds_dictionaries_at_several_layers():
    from jaxlens.dictionaries.base import DictionaryConfig
    from jaxlens.dictionaries.train import TrainConfig, train_dictionaries

    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    cfgs = [DictionaryConfig(architecture="topk", d_in=40, d_sae=24, k=3, hook_name=h) for h in hooks]
    tc = TrainConfig(steps=2, lr=1e-3, n_batches_for_norm_estimate=1)
    both = train_dictionaries(cfgs, _store(hooks).batch, tc, n_devices=1)
    alone = train_dictionaries(cfgs[:1], _store(hooks[:1]).batch, tc, n_devices=1)  # its own forward
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_allclose(getattr(both.dictionaries[0], k)[...],
                                   getattr(alone.dictionaries[0], k)[...], rtol=1e-5, atol=1e-6, err_msg=k)
    assert both.dictionaries[1].cfg.hook_name == hooks[1]
