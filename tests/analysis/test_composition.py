"""OV / QK circuits and composition scores against the dense formula, and TransformerLens's where
installed."""

import numpy as np
import pytest

from jaxlens import HookedTransformer
from jaxlens.analysis import all_composition_scores
from jaxlens.errors import InputError


def dense_circuits(cfg, params):
    a = {k: np.asarray(v, np.float64) for k, v in params["blocks"]["attn"].items()}
    r = cfg.n_heads // cfg.n_key_value_heads
    W_K, W_V = np.repeat(a["W_K"], r, axis=1), np.repeat(a["W_V"], r, axis=1)
    ov = a["W_V"] if r == 1 else W_V
    return ov @ a["W_O"], a["W_Q"] @ np.swapaxes(W_K, -1, -2)  # [l h d d] each


def test_OV_QK_are_the_dense_circuits(any_model):
    cfg, params = any_model
    model = HookedTransformer(cfg, params)
    ov, qk = dense_circuits(cfg, params)
    assert model.OV.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    np.testing.assert_allclose(model.OV.AB, ov, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.QK.AB, qk, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_equal_dense_formula(any_model, mode):
    cfg, params = any_model
    ov, qk = dense_circuits(cfg, params)
    right = {"Q": qk, "K": np.swapaxes(qk, -1, -2), "V": ov}[mode]
    got = np.asarray(all_composition_scores(params, cfg, mode))
    L, H = cfg.n_layers, cfg.n_heads
    want = np.zeros((L, H, L, H))
    for l1 in range(L):
        for h1 in range(H):
            for l2 in range(l1 + 1, L):
                for h2 in range(H):
                    num = np.linalg.norm(ov[l1, h1] @ right[l2, h2])
                    want[l1, h1, l2, h2] = num / np.linalg.norm(ov[l1, h1]) / np.linalg.norm(right[l2, h2])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    assert (got[1, :, 1, :] == 0).all() and (got[2, :, 0, :] == 0).all()
    assert got[0, :, 1:, :].min() > 0


def test_matches_transformer_lens(gpt):
    torch = pytest.importorskip("torch")
    tl_fm = pytest.importorskip("transformer_lens.FactoredMatrix")
    tl_matrix = pytest.importorskip("transformer_lens.utilities.matrix")
    cfg, params = gpt
    a = {k: torch.tensor(np.asarray(v)) for k, v in params["blocks"]["attn"].items()}
    left = tl_fm.FactoredMatrix(a["W_V"], a["W_O"])
    right = tl_fm.FactoredMatrix(a["W_Q"], a["W_K"].transpose(-2, -1))
    want = tl_matrix.composition_scores(left, right, broadcast_dims=True).numpy()
    mask = np.arange(cfg.n_layers)[:, None, None, None] < np.arange(cfg.n_layers)[None, None, :, None]
    np.testing.assert_allclose(np.asarray(all_composition_scores(params, cfg, "Q")), np.where(mask, want, 0),
                               rtol=1e-4, atol=1e-6)


def test_bad_mode(gpt):
    with pytest.raises(InputError, match="'Q', 'K', 'V'"):
        all_composition_scores(gpt[1], gpt[0], "X")
