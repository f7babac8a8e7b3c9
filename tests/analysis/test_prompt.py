"""test_prompt: ranks, logits and probabilities equal those read off the model's logits by hand; bad input
(several answers that are not one token each, an empty prompt or answer) gives clear errors."""

import numpy as np
import pytest

import jaxlens.analysis as an
from jaxlens import HookedTransformer, testing
from jaxlens.errors import InputError


@pytest.fixture(scope="module")
def model(tmp_path_factory, make_params):
    tok = testing.train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    cfg = testing.tiny_config(d_vocab=len(tok))
    return HookedTransformer(cfg, make_params(cfg, 3), tok)


def test_single_multi_token_answer_by_hand(model, capsys):
    prompt, answer = "When Mary and John went", " to the store"
    res = an.test_prompt(model, prompt, answer, prepend_space_to_answer=False, top_k=4)
    p_ids = np.asarray(model.to_tokens(prompt))[0]
    a_ids = np.asarray(model.to_tokens(answer, prepend_bos=False))[0]
    assert len(a_ids) > 1 and res.ranks.shape == (1, len(a_ids))
    logits = np.asarray(model(np.concatenate([p_ids, a_ids])[None]))[0].astype(np.float64)
    for j, t in enumerate(a_ids):
        row = logits[len(p_ids) - 1 + j]
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        assert res.ranks[0, j] == (row > row[t]).sum()
        np.testing.assert_allclose(res.logits[0, j], row[t], rtol=1e-5)
        np.testing.assert_allclose(res.probs[0, j], probs[t], rtol=1e-4)
        np.testing.assert_array_equal(res.top_tokens[0, j], np.argsort(-row)[:4])
    out = capsys.readouterr().out
    assert "Tokenized prompt:" in out and "Ranks of the answer tokens:" in out
    assert out.count("Top 0th token") == len(a_ids)


def test_several_one_token_answers(model):
    res = an.test_prompt(model, "The capital of France is", ["Mary", " John", "the"], print_details=False)
    assert res.ranks.shape == (3, 1) and res.answer_str_tokens == [[" Mary"], [" John"], [" the"]]
    ids = [model.to_single_token(w) for w in (" Mary", " John", " the")]
    logits = np.asarray(model(model.to_tokens("The capital of France is")))[0, -1]
    np.testing.assert_array_equal(res.ranks[:, 0], [(logits > logits[i]).sum() for i in ids])


def test_bad_inputs(model):
    with pytest.raises(InputError, match="must be one token"):
        an.test_prompt(model, "The capital of France is", ["Mary", "Paris"], print_details=False)
    with pytest.raises(InputError, match="Empty prompt"):
        an.test_prompt(model, "", "Paris", print_details=False)
    with pytest.raises(InputError, match="Empty answer"):
        an.test_prompt(model, "The capital", "", print_details=False)
    with pytest.raises(InputError, match="top_k"):
        an.test_prompt(model, "The capital", "Paris", top_k=0, print_details=False)
