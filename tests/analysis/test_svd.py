"""SVD interpreter: singular directions of OV / W_in / W_out equal numpy's SVD of the dense matrix (up to
sign), projected on W_U."""

import numpy as np
import pytest

from jaxlens.analysis import get_singular_vectors, singular_directions, top_tokens
from jaxlens.errors import InputError


def _aligned(got, want):
    """Flip each of got's vectors (rows) to the sign of want's."""
    return got * np.sign((got * want).sum(-1, keepdims=True))


def test_ov_directions_match_dense_svd(llama):
    cfg, params = llama
    l, h = 1, 5
    kv = h // (cfg.n_heads // cfg.n_key_value_heads)
    attn = params["blocks"]["attn"]
    dense = np.asarray(attn["W_V"][l, kv]) @ np.asarray(attn["W_O"][l, h])
    _, s, vh = np.linalg.svd(dense)
    vecs, vals = singular_directions(params, cfg, "OV", l, h)
    np.testing.assert_allclose(vals, s[: cfg.d_head], rtol=1e-4)
    np.testing.assert_allclose(_aligned(np.asarray(vecs), vh[: cfg.d_head]), vh[: cfg.d_head], atol=1e-4)
    got = np.asarray(get_singular_vectors(params, cfg, "OV", l, num_vectors=3, head_index=h))
    assert got.shape == (cfg.d_vocab, 1, 3)
    want = vh[:3] @ np.asarray(params["unembed"]["W_U"])  # [3 v]
    np.testing.assert_allclose(_aligned(got[:, 0].T, want), want, atol=1e-4)
    ids = np.asarray(top_tokens(params, cfg, "OV", l, num_vectors=3, k=4, head_index=h))
    np.testing.assert_array_equal(ids, np.argsort(-got[:, 0].T, axis=-1)[:, :4])


@pytest.mark.parametrize("kind", ["w_in", "w_out"])
def test_mlp_directions_match_dense_svd(gpt, kind):
    cfg, params = gpt
    mlp = params["blocks"]["mlp"]
    w = np.asarray(mlp["W_in"][2]).T * np.asarray(params["blocks"]["ln2"]["w"][2]) if kind == "w_in" else \
        np.asarray(mlp["W_out"][2])
    _, s, vh = np.linalg.svd(w, full_matrices=False)
    vecs, vals = singular_directions(params, cfg, kind, 2)
    np.testing.assert_allclose(vals, s, rtol=1e-4)
    np.testing.assert_allclose(_aligned(np.asarray(vecs)[:5], vh[:5]), vh[:5], atol=1e-4)


def test_bad_indices(gpt):
    cfg, params = gpt
    with pytest.raises(InputError, match="head_index"):
        singular_directions(params, cfg, "OV", 0)
    with pytest.raises(InputError, match="head_index=5 is out of range"):
        singular_directions(params, cfg, "OV", 0, 5)
    with pytest.raises(InputError, match="layer_index=3 is out of range"):
        singular_directions(params, cfg, "w_in", 3)
    with pytest.raises(InputError, match="vector_type"):
        singular_directions(params, cfg, "QK", 0, 1)
    with pytest.raises(InputError, match="num_vectors"):
        get_singular_vectors(params, cfg, "OV", 0, num_vectors=9, head_index=1)
