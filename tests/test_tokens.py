"""Token helpers against the Hugging Face tokenizer they wrap, with TransformerLens's BOS convention."""

import jax
import numpy as np
import pytest

import jaxlens
from jaxlens import HookedTransformer, testing
from jaxlens.errors import InputError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok = testing.train_tiny_tokenizer(path)
    cfg = testing.tiny_config(d_vocab=len(tok), n_ctx=64)
    return HookedTransformer(cfg, jaxlens.init_params(cfg, jax.random.key(0)), tok)


def test_to_tokens_prepends_bos_and_matches_hf(model):
    text = "The capital of France is Paris."
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    got = np.asarray(model.to_tokens(text))
    assert got.tolist() == [[model.tokenizer.bos_token_id] + ids]
    assert np.asarray(model.to_tokens(text, prepend_bos=False)).tolist() == [ids]


def test_batches_are_right_padded(model):
    toks = np.asarray(model.to_tokens(["Mary", "When Mary and John went"]))
    short = model.tokenizer("Mary", add_special_tokens=False)["input_ids"]
    assert toks.shape[0] == 2 and toks[0, : len(short) + 1].tolist() == [model.tokenizer.bos_token_id] + short
    assert np.all(toks[0, len(short) + 1:] == model.tokenizer.eos_token_id)


def test_strings_round_trip(model):
    text = "Induction heads copy repeated tokens"
    toks = model.to_tokens(text, prepend_bos=False)
    assert model.to_string(toks[0]) == text
    strs = model.to_str_tokens(text, prepend_bos=False)
    assert "".join(strs) == text and len(strs) == toks.shape[1]


def test_single_token_and_position(model):
    tid = model.to_single_token(" Mary")
    assert model.tokenizer.decode([tid]) == " Mary"
    with pytest.raises(InputError, match=r"is \d+ tokens \(\['\ Mary'"):
        model.to_single_token(" Mary and John")
    text = "When Mary and John went to the store, John gave a drink to Mary"
    pos = model.get_token_position(" John", text, mode="last")
    assert model.to_str_tokens(text)[pos] == " John"
    assert model.get_token_position(" John", text) < pos
    with pytest.raises(InputError, match="does not occur"):
        model.get_token_position(" the", "Mary")


def test_text_input_runs_like_its_tokens(model):
    text = "When Mary and John went to the store"
    np.testing.assert_allclose(np.asarray(model(text)), np.asarray(model(model.to_tokens(text))), atol=1e-6)
    with pytest.raises(InputError, match="Empty prompt"):
        model.to_tokens("", prepend_bos=False)
