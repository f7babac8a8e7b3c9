"""Head detectors: detection patterns equal the definitions (and TransformerLens's), scores equal a per-head
loop over the cached patterns (by hand, and TL's `compute_head_attention_similarity_score`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import HookedTransformer
from jaxlens.analysis import (
    detect_head,
    duplicate_token_pattern,
    induction_pattern,
    previous_token_pattern,
    repeated_random_tokens,
)
from jaxlens.errors import InputError

TOKENS = repeated_random_tokens(jax.random.key(0), 97, seq_len=6, batch=3, bos=0, low=1)  # [3 13]


def test_patterns_by_definition():
    t = np.asarray(TOKENS[0])
    n = len(t)
    prev, dup, ind = (np.asarray(f(TOKENS[0])) for f in (previous_token_pattern, duplicate_token_pattern,
                                                         induction_pattern))
    for q in range(n):
        for k in range(n):
            assert prev[q, k] == (k == q - 1)
            assert dup[q, k] == (k < q and t[k] == t[q])
            assert ind[q, k] == (1 <= k <= q and t[k - 1] == t[q])
    assert ind.sum() == 6  # the second half: each token's previous copy + 1
    np.testing.assert_array_equal(np.asarray(induction_pattern(TOKENS))[1],
                                  np.asarray(induction_pattern(TOKENS[1])))


def test_patterns_match_transformer_lens():
    torch = pytest.importorskip("torch")
    hd = pytest.importorskip("transformer_lens.head_detector")
    t = torch.tensor(np.asarray(TOKENS[:1]))
    for ours, theirs in ((previous_token_pattern, hd.get_previous_token_head_detection_pattern),
                         (duplicate_token_pattern, hd.get_duplicate_token_head_detection_pattern),
                         (induction_pattern, hd.get_induction_head_detection_pattern)):
        np.testing.assert_array_equal(np.asarray(ours(TOKENS[0])), theirs(t).numpy())


@pytest.fixture(scope="module")
def model_and_patterns(llama):
    model = HookedTransformer(*llama)
    _, cache = model.run_with_cache(TOKENS)
    pats = np.stack([np.asarray(cache["pattern", l]) for l in range(model.cfg.n_layers)])  # [l b h q k]
    return model, cache, pats


def test_induction_scores_by_hand(model_and_patterns):
    model, cache, pats = model_and_patterns
    got = np.asarray(detect_head(model, TOKENS, "induction_head"))
    want = np.zeros(got.shape)
    t = np.asarray(TOKENS)
    for l in range(pats.shape[0]):
        for h in range(pats.shape[2]):
            per_seq = []
            for b in range(t.shape[0]):
                p = pats[l, b, h]
                on = sum(p[q, k] for q in range(t.shape[1]) for k in range(1, q + 1)
                         if t[b, k - 1] == t[b, q])
                per_seq.append(on / p.sum())
            want[l, h] = np.mean(per_seq)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the same from the cache, without a second forward
    np.testing.assert_allclose(np.asarray(detect_head(model, TOKENS, "induction_head", cache=cache)), want,
                               rtol=1e-5)


@pytest.mark.parametrize("measure", ["mul", "abs"])
@pytest.mark.parametrize("exclude", [(False, False), (True, True)])
def test_scores_match_transformer_lens(model_and_patterns, measure, exclude):
    torch = pytest.importorskip("torch")
    hd = pytest.importorskip("transformer_lens.head_detector")
    model, cache, pats = model_and_patterns
    kw = dict(exclude_bos=exclude[0], exclude_current_token=exclude[1], error_measure=measure)
    got = np.asarray(detect_head(model, TOKENS[:1], "previous_token_head", cache=None, **kw))
    det = hd.get_previous_token_head_detection_pattern(torch.tensor(np.asarray(TOKENS[:1])))
    for l in range(pats.shape[0]):
        for h in range(pats.shape[2]):
            want = hd.compute_head_attention_similarity_score(torch.tensor(pats[l, 0, h].copy()), det, **kw)
            np.testing.assert_allclose(got[l, h], want, rtol=1e-5, atol=1.1e-3 if measure == "abs" else 1e-6)


def test_custom_pattern_and_head_subset(model_and_patterns):
    model, cache, pats = model_and_patterns
    n = TOKENS.shape[1]
    det = jnp.zeros((n, n)).at[:, 0].set(1.0)  # a "BOS head"
    got = np.asarray(detect_head(model, TOKENS, det, heads=[(0, 1), (2, 5)], cache=cache))
    assert (got[1] == -1).all() and got[0, 0] == -1
    np.testing.assert_allclose(got[2, 5], (pats[2, :, 5, :, 0].sum(-1) / pats[2, :, 5].sum((-2, -1))).mean(),
                               rtol=1e-5)


def test_bad_inputs(model_and_patterns):
    model, cache, _ = model_and_patterns
    n = TOKENS.shape[1]
    with pytest.raises(InputError, match="out of range"):
        detect_head(model, TOKENS, "induction_head", heads=[(0, model.cfg.n_heads)], cache=cache)
    with pytest.raises(InputError, match="out of range"):
        detect_head(model, TOKENS, "induction_head", heads={model.cfg.n_layers: [0]}, cache=cache)
    with pytest.raises(InputError, match="lower triangular"):
        detect_head(model, TOKENS, jnp.ones((n, n)), cache=cache)
    with pytest.raises(InputError, match=r"\[pos pos\]"):
        detect_head(model, TOKENS, jnp.ones((n - 1, n - 1)), cache=cache)
    with pytest.raises(InputError, match="one of"):
        detect_head(model, TOKENS, "bos_head", cache=cache)
    with pytest.raises(InputError, match="2 to n_ctx"):
        detect_head(model, TOKENS[:, :1], "previous_token_head")
    with pytest.raises(InputError, match="'mul' or 'abs'"):
        detect_head(model, TOKENS, "induction_head", cache=cache, error_measure="max")


def test_tl_named_patterns_have_tl_shapes():
    import jaxlens.analysis as an
    from jaxlens.errors import InputError

    hd = pytest.importorskip("transformer_lens.head_detector")
    torch = pytest.importorskip("torch")
    one = np.asarray(TOKENS[:1])
    for name in ("get_previous_token_head_detection_pattern", "get_duplicate_token_head_detection_pattern",
                 "get_induction_head_detection_pattern"):
        want = getattr(hd, name)(torch.tensor(one)).numpy()
        for tokens in (one, one[0]):
            got = np.asarray(getattr(an, name)(tokens))
            assert got.shape == want.shape == (one.shape[1],) * 2, name
            np.testing.assert_array_equal(got, want, err_msg=name)
        with pytest.raises(InputError, match="one prompt"):
            getattr(an, name)(np.asarray(TOKENS))
