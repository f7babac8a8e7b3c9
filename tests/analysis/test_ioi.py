"""IOI prompts, position labels, the logit-difference metric and normalisation (jaxlens.analysis.ioi,
.metrics), against prompts, labels and numbers written out by hand on a tokenizer whose template words are
single tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import HookedTransformer, init_params, testing
from jaxlens.analysis import ioi_prompts, logit_diff_metric, normalise_patching, position_labels
from jaxlens.analysis.ioi import NAMES, OBJECTS, PLACES
from jaxlens.errors import InputError

TEXTS = ["When Mary and John went to the store, John gave a drink to Mary.",
         "When Alice and Bob went to the park, Bob gave a book to Alice."] * 50


def _model(path, texts):
    tok = testing.train_tiny_tokenizer(path, texts=texts, vocab_size=400)
    cfg = testing.tiny_config(d_vocab=len(tok))
    return HookedTransformer(cfg, init_params(cfg, jax.random.key(0)), tok), tok


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model, tok = _model(tmp_path_factory.mktemp("tok"), TEXTS)
    one = lambda words: [w for w in words if len(tok(w, add_special_tokens=False).input_ids) == 1]
    # the premise of the expectations below: these (and every word of the template) are single tokens
    assert (one(NAMES), one(PLACES), one(OBJECTS)) == ([" Mary", " John", " Alice", " Bob"],
                                                       [" store", " park"], [" drink", " book"])
    assert len(model.to_str_tokens(TEXTS[0].removesuffix(" Mary."))) == 15  # BOS + 14 words
    return model


def test_prompts_by_hand(model):
    p = ioi_prompts(model, 3)
    # four single-token names make two pairs; the third prompt starts the second round, names swapped
    assert p.clean == ["When Mary and John went to the store, John gave a drink to",
                       "When Alice and Bob went to the park, Bob gave a book to",
                       "When John and Mary went to the store, Mary gave a drink to"]
    assert p.corrupted == ["When John and Mary went to the store, Mary gave a drink to",
                           "When Bob and Alice went to the park, Alice gave a book to",
                           "When Mary and John went to the store, John gave a drink to"]
    assert p.answers == [" Mary", " Alice", " John"] and p.wrong == [" John", " Bob", " Mary"]
    tok = model.tokenizer
    ids = lambda text: [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    np.testing.assert_array_equal(np.asarray(p.clean_tokens), [ids(t) for t in p.clean])
    np.testing.assert_array_equal(np.asarray(p.corrupted_tokens), [ids(t) for t in p.corrupted])
    single = lambda w: tok(w, add_special_tokens=False).input_ids[0]
    np.testing.assert_array_equal(np.asarray(p.answer_ids),
                                  [single(" Mary"), single(" Alice"), single(" John")])
    np.testing.assert_array_equal(np.asarray(p.wrong_ids), [single(" John"), single(" Bob"), single(" Mary")])


def test_position_labels_by_hand(model):
    labels = position_labels(model, ioi_prompts(model, 3))
    assert labels == ["<|endoftext|>", "When", "[IO]", " and", "[S1]", " went", " to", " the", "[varies]",
                      ",", "[S2]", " gave", " a", "[varies]", " to"]


def test_too_few_single_token_names_is_an_error(tmp_path):
    model, _ = _model(tmp_path, ["The quick brown fox jumps over the lazy dog."] * 20)
    with pytest.raises(InputError, match="two names that are single tokens"):
        ioi_prompts(model, 2)


def test_logit_diff_by_hand():
    logits = jnp.zeros((2, 3, 5)).at[0, -1].set(jnp.array([0.0, 1.0, 4.0, -2.0, 0.5]))
    logits = logits.at[1, -1].set(jnp.array([3.0, 0.0, 0.0, 1.5, 0.0]))
    logits = logits.at[:, 0].set(100.0)  # earlier positions are not read
    answers, wrong = jnp.array([2, 3]), jnp.array([1, 0])
    # prompt 0: 4.0 - 1.0 = 3.0; prompt 1: 1.5 - 3.0 = -1.5
    np.testing.assert_allclose(np.asarray(logit_diff_metric(answers, wrong, per_prompt=True)(logits)),
                               [3.0, -1.5])
    assert float(logit_diff_metric(answers, wrong)(logits)) == pytest.approx(0.75)
    bf16 = logit_diff_metric(answers, wrong)(logits.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.float32 and float(bf16) == pytest.approx(0.75)


def test_normalise_patching_by_hand():
    # clean 3, corrupted 1: a patch giving 1 has no effect (0), one giving 3 restores everything (1)
    np.testing.assert_allclose(normalise_patching(np.array([[1.0, 2.0], [3.0, 5.0]]), 3.0, 1.0),
                               [[0.0, 0.5], [1.0, 2.0]])
    np.testing.assert_allclose(normalise_patching(np.array([0.0, -1.0]), -1.0, 1.0), [0.5, 1.0])
    # no difference between the runs: divide by 1e-6, not by zero
    np.testing.assert_allclose(normalise_patching(np.array([2.0, 2.000001]), 2.0, 2.0), [0.0, 1.0], atol=1e-3)
