"""Induction scoring (jaxlens.analysis.induction) and `top_heads`: scores of hand-made attention patterns
worked out by hand, the repeated distinct tokens, and `find_induction_heads` on a small model against its own
cache."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import HookedTransformer
from jaxlens.analysis import find_induction_heads, induction_scores, induction_tokens, top_heads
from jaxlens.errors import InputError


def test_induction_scores_by_hand():
    # seq_len 3: positions 0 BOS, 1-3 "a b c", 4-6 "a b c"; the induction target of query i >= 4 is key i - 2
    tokens = jnp.array([[0, 7, 8, 9, 7, 8, 9]])
    n = tokens.shape[1]
    perfect = np.zeros((n, n))
    perfect[np.arange(n), 0] = 1.0  # the first repeat's rows attend BOS: not scored
    perfect[4:] = 0.0
    perfect[[4, 5, 6], [2, 3, 4]] = 1.0
    uniform = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]  # query i: 1/(i+1) on each key <= i
    half = 0.5 * perfect + 0.5 * np.eye(n)  # half on the target, half on itself
    # [1 layer, 1 batch, 3 heads]
    patterns = jnp.asarray(np.stack([perfect, uniform, half])[None, None], jnp.float32)
    got = np.asarray(induction_scores(patterns, tokens, seq_len=3))
    want = [[1.0, (1 / 5 + 1 / 6 + 1 / 7) / 3, 0.5]]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_scores_average_over_the_batch():
    tokens = jnp.array([[0, 7, 8, 7, 8], [0, 3, 4, 3, 4]])  # seq_len 2: targets 3 -> 2, 4 -> 3
    on = np.zeros((5, 5))
    on[[3, 4], [2, 3]] = 1.0
    off = np.zeros((5, 5))
    off[[3, 4], [0, 0]] = 1.0
    patterns = jnp.asarray(np.stack([on, off])[None, :, None], jnp.float32)  # [layer 1, batch 2, head 1]
    np.testing.assert_allclose(np.asarray(induction_scores(patterns, tokens, seq_len=2)), [[0.5]])


def test_top_heads_by_hand():
    scores = np.array([[0.1, 0.9, 0.3], [0.5, -2.0, 0.9]])
    assert top_heads(scores, 3) == [(0, 1), (1, 2), (1, 0)]  # the tie at 0.9: lower index first
    assert top_heads(scores, 2, by_abs=True) == [(1, 1), (0, 1)]
    for k in (0, 7):
        with pytest.raises(InputError, match="between 1 and the number of heads"):
            top_heads(scores, k)


@pytest.fixture(scope="module")
def model(llama):
    return HookedTransformer(*llama)


def test_induction_tokens_repeat_distinct_tokens(model):
    tokens = induction_tokens(model, seq_len=10, batch=3, seed=4)
    assert tokens.shape == (3, 21) and tokens.dtype == np.int32
    assert (tokens[:, 0] == 0).all()  # no tokenizer: BOS 0
    np.testing.assert_array_equal(tokens[:, 1:11], tokens[:, 11:])
    for row in tokens[:, 1:11]:
        assert len(set(row.tolist())) == 10 and row.max() < model.cfg.d_vocab
    np.testing.assert_array_equal(tokens, induction_tokens(model, seq_len=10, batch=3, seed=4))
    assert not np.array_equal(tokens, induction_tokens(model, seq_len=10, batch=3, seed=5))


def test_find_induction_heads_agrees_with_the_cache(model):
    seq_len, cfg = 6, model.cfg
    found = find_induction_heads(model, seq_len=seq_len, batch=2, top_k=4, seed=1)
    np.testing.assert_array_equal(found.tokens, induction_tokens(model, seq_len, 2, seed=1))
    _, cache = model.run_with_cache(jnp.asarray(found.tokens))
    pats = np.stack([np.asarray(cache["pattern", l]) for l in range(cfg.n_layers)])  # [l b h q k]
    q = np.arange(seq_len + 1, 2 * seq_len + 1)
    want = pats[:, :, :, q, q - seq_len + 1].mean(axis=(1, 3))  # by hand: query i -> key i - seq_len + 1
    np.testing.assert_allclose(found.scores, want, rtol=1e-5, atol=1e-6)
    assert found.top_heads == top_heads(want, 4)
    np.testing.assert_allclose(found.top_patterns, [pats[l, 0, h] for l, h in found.top_heads], atol=1e-5)
    loss = np.asarray(model(jnp.asarray(found.tokens), return_type="loss", loss_per_token=True))
    assert found.loss_first_repeat == pytest.approx(loss[:, 1:seq_len].mean(), rel=1e-5)
    assert found.loss_second_repeat == pytest.approx(loss[:, seq_len:].mean(), rel=1e-5)


def test_sequence_longer_than_the_context_is_an_error(model):
    with pytest.raises(InputError, match="exceeds n_ctx"):
        find_induction_heads(model, seq_len=model.cfg.n_ctx, batch=1, top_k=1)
