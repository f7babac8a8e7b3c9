"""FactoredMatrix against the dense product (numpy) and, where installed, TransformerLens's FactoredMatrix."""

import jax
import numpy as np
import pytest

from jaxlens.analysis import FactoredMatrix
from jaxlens.errors import InputError

RNG = np.random.RandomState(0)
A = RNG.randn(2, 3, 9, 4).astype(np.float64)  # leading axes [2 3]
B = RNG.randn(3, 4, 7).astype(np.float64)  # leading axis [3] broadcasts against A's [2 3]
jax.config.update("jax_enable_x64", False)


def fm(a=A, b=B):
    return FactoredMatrix(jax.numpy.asarray(a, "float32"), jax.numpy.asarray(b, "float32"))


def dense(a=A, b=B):
    return a @ b


def test_shape_and_products_match_dense():
    m = fm()
    assert m.shape == (2, 3, 9, 7) and m.ndim == 4 and (m.ldim, m.mdim, m.rdim) == (9, 4, 7)
    np.testing.assert_allclose(m.AB, dense(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.T.AB, np.swapaxes(dense(), -1, -2), rtol=1e-5, atol=1e-5)
    other = RNG.randn(7, 5)
    np.testing.assert_allclose((m @ jax.numpy.asarray(other, "float32")).AB, dense() @ other,
                               rtol=1e-4, atol=1e-4)
    left = RNG.randn(6, 9)
    np.testing.assert_allclose((jax.numpy.asarray(left, "float32") @ m).AB, left @ dense(),
                               rtol=1e-4, atol=1e-4)
    vec = RNG.randn(7)
    np.testing.assert_allclose(m @ jax.numpy.asarray(vec, "float32"), dense() @ vec, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose((m @ fm(RNG.randn(7, 2), RNG.randn(2, 4))).shape, (2, 3, 9, 4))
    np.testing.assert_allclose((2.5 * m).AB, 2.5 * dense(), rtol=1e-5, atol=1e-5)


def test_svd_norm_and_collapse_match_dense():
    m = fm()
    U, S, V = m.svd()
    d = dense()
    usv = np.asarray(U) * np.asarray(S)[..., None, :] @ np.swapaxes(np.asarray(V), -1, -2)
    np.testing.assert_allclose(usv, d, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(S, np.linalg.svd(d, compute_uv=False)[..., :4], rtol=1e-4, atol=1e-4)
    eye = np.broadcast_to(np.eye(4), (2, 3, 4, 4))
    np.testing.assert_allclose(np.swapaxes(np.asarray(U), -1, -2) @ np.asarray(U), eye, atol=1e-4)
    np.testing.assert_allclose(np.swapaxes(np.asarray(V), -1, -2) @ np.asarray(V), eye, atol=1e-4)
    np.testing.assert_allclose(m.norm(), np.linalg.norm(d, axis=(-2, -1)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m.Vh), np.asarray(V))
    # collapsing drops an orthogonal factor: same singular values, and U @ collapse_l == AB
    np.testing.assert_allclose(np.asarray(U) @ np.asarray(m.collapse_l()), d, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(m.collapse_r()) @ np.swapaxes(np.asarray(V), -1, -2), d, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(m.make_even().AB, d, rtol=1e-4, atol=1e-4)


def test_eigenvalues_are_the_dense_nonzero_ones():
    a, b = RNG.randn(8, 3), RNG.randn(3, 8)
    got = np.sort_complex(np.asarray(fm(a, b).eigenvalues))
    want = np.linalg.eigvals(a @ b)
    want = np.sort_complex(want[np.argsort(-np.abs(want))[:3]])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_corner_and_indexing():
    m = fm()
    np.testing.assert_allclose(m.get_corner(2), dense()[:2, :2, :2, :2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m[1, 2].AB, dense()[1, 2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m[1, 2, 4].AB, dense()[1, 2, 4:5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m[1, 2, 4, -1].AB, dense()[1, 2, 4:5, -1:], rtol=1e-5, atol=1e-5)
    assert m.unsqueeze(0).shape == (1, 2, 3, 9, 7)


def test_passes_through_jit():
    np.testing.assert_allclose(jax.jit(lambda m: m.norm())(fm()), np.linalg.norm(dense(), axis=(-2, -1)),
                               rtol=1e-5)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(InputError, match="inner dimension"):
        FactoredMatrix(jax.numpy.ones((3, 4)), jax.numpy.ones((5, 2)))
    with pytest.raises(InputError, match="ldim == rdim"):
        _ = fm().BA
    with pytest.raises(InputError, match="inner dimensions"):
        fm() @ jax.numpy.ones((5, 2))
    with pytest.raises(InputError, match="do not broadcast"):
        FactoredMatrix(jax.numpy.ones((2, 3, 4)), jax.numpy.ones((5, 4, 3)))


def test_matches_transformer_lens():
    tl_fm = pytest.importorskip("transformer_lens.FactoredMatrix")
    torch = pytest.importorskip("torch")
    a, b = RNG.randn(4, 10, 5).astype(np.float32), RNG.randn(4, 5, 10).astype(np.float32)
    ours, theirs = fm(a, b), tl_fm.FactoredMatrix(torch.tensor(a), torch.tensor(b))
    np.testing.assert_allclose(ours.S, theirs.S.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.norm(), theirs.norm().numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours.get_corner(3), theirs.get_corner(3).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sort_complex(np.asarray(ours.eigenvalues)),
                               np.sort_complex(theirs.eigenvalues.numpy()), rtol=1e-3, atol=1e-4)
    # singular vectors agree up to sign
    for mine, tl in ((ours.U, theirs.U), (ours.V, theirs.V)):
        sign = np.sign((np.asarray(mine) * tl.numpy()).sum(-2, keepdims=True))
        np.testing.assert_allclose(np.asarray(mine) * sign, tl.numpy(), atol=1e-4)
