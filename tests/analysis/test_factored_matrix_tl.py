"""FactoredMatrix against TransformerLens 4.3's own on the same factors: indexing (ellipsis, new axes, integer
scalars of every kind), `has_leading_dims`, operands that are not JAX arrays, and the exception types TL code
catches (AssertionError for mismatched shapes, ValueError / IndexError for bad indices)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens.analysis import FactoredMatrix
from jaxlens.errors import InputAssertionError, InputIndexError

torch = pytest.importorskip("torch")
tl_fm = pytest.importorskip("transformer_lens.FactoredMatrix")

RNG = np.random.default_rng(0)
A = RNG.normal(size=(2, 3, 9, 4)).astype(np.float32)  # leading [2 3], ldim 9, mdim 4
B = RNG.normal(size=(3, 4, 7)).astype(np.float32)  # leading [3] broadcasts; rdim 7
ATOL = 1e-4


def pair(a=A, b=B):
    theirs = tl_fm.FactoredMatrix(torch.tensor(a), torch.tensor(b))
    return FactoredMatrix(jnp.asarray(a), jnp.asarray(b)), theirs


def same(ours, theirs, what=""):
    """Same factors' shapes and the same dense product as TransformerLens."""
    assert isinstance(ours, FactoredMatrix) and isinstance(theirs, tl_fm.FactoredMatrix), what
    assert ours.A.shape == tuple(theirs.A.shape) and ours.B.shape == tuple(theirs.B.shape), what
    assert ours.shape == tuple(theirs.shape), what
    np.testing.assert_allclose(np.asarray(ours.AB), theirs.AB.numpy(), atol=ATOL, err_msg=str(what))


INDICES = [
    1, (1, 2), (1, 2, 4), (1, 2, 4, -1), (1, 2, slice(1, 5), slice(None, 3)), (..., 3), (..., 2, slice(None)),
    (1, ..., 4), (..., -1, -1), (slice(None), None), (0, 1, None), (0, 1, slice(None), None),
    (0, 1, 2, None), (None, 0), (0, 1, [1, 3, 5]), (np.int64(1), np.array(2)), (1, 2, np.int32(4)),
    (np.array([True, False]),),
]


@pytest.mark.parametrize("idx", INDICES, ids=[repr(i) for i in INDICES])
def test_indexing_matches_transformer_lens(idx):
    ours, theirs = pair()
    torch_idx = tuple(torch.as_tensor(i) if isinstance(i, np.ndarray) and i.ndim else i
                      for i in (idx if isinstance(idx, tuple) else (idx,)))
    same(ours[idx], theirs[torch_idx if isinstance(idx, tuple) else torch_idx[0]], idx)


def test_bad_indices_raise_what_transformer_lens_raises():
    ours, theirs = pair()
    with pytest.raises(ValueError):
        theirs[0, 1, 2, 3, 4]
    with pytest.raises(InputIndexError, match=r"5 entries, too many .* shape \(2, 3, 9, 7\)") as e:
        ours[0, 1, 2, 3, 4]
    assert isinstance(e.value, ValueError) and isinstance(e.value, IndexError)  # TL's ValueError, numpy's
    with pytest.raises(IndexError):
        theirs[..., 0, ...]
    with pytest.raises(InputIndexError, match="only one ellipsis"):
        ours[..., 0, ...]


def test_has_leading_dims_matches_transformer_lens():
    for a, b in [(A[0, 0], B[0]), (A, B), (A[0, 0], B), (A[0], B[0])]:
        ours, theirs = pair(a, b)
        assert ours.has_leading_dims == theirs.has_leading_dims


def test_operands_that_are_not_jax_arrays():
    ours, theirs = pair()
    same(FactoredMatrix(torch.tensor(A), torch.tensor(B, requires_grad=True)), theirs, "torch factors")
    same(FactoredMatrix(A, B), theirs, "numpy factors")
    right = RNG.normal(size=(7, 5)).astype(np.float32)
    left = RNG.normal(size=(6, 9)).astype(np.float32)
    want_r, want_l = theirs @ torch.tensor(right), torch.tensor(left) @ theirs
    for r in (right, torch.tensor(right), torch.tensor(right, requires_grad=True)):
        same(ours @ r, want_r, type(r))
    for lhs in (left, torch.tensor(left)):
        same(lhs @ ours, want_l, type(lhs))  # NumPy and torch defer to FactoredMatrix.__rmatmul__
    vec = RNG.normal(size=7).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ours @ vec), (theirs @ torch.tensor(vec)).numpy(), atol=ATOL)
    for s in (2, 2.5, np.float32(2.5), np.array(2.5, np.float32), torch.tensor(2.5), torch.tensor([2.5])):
        t = s if isinstance(s, (int, float)) else torch.as_tensor(np.asarray(s, np.float32))
        same(ours * s, theirs * t, type(s))
        same(s * ours, t * theirs if isinstance(t, torch.Tensor) else theirs * t, type(s))


def test_shape_errors_are_assertion_errors_as_in_transformer_lens():
    a, b = np.ones((3, 4), np.float32), np.ones((5, 2), np.float32)
    with pytest.raises(AssertionError):
        tl_fm.FactoredMatrix(torch.tensor(a), torch.tensor(b))
    with pytest.raises(InputAssertionError, match="inner dimension"):
        FactoredMatrix(a, b)
    ours, theirs = pair()
    with pytest.raises(AssertionError):
        _ = theirs.BA
    with pytest.raises(InputAssertionError, match="ldim == rdim"):
        _ = ours.BA
    with pytest.raises(AssertionError):
        theirs @ torch.ones(5, 2)
    with pytest.raises(InputAssertionError, match="inner dimensions 7 != 5"):
        ours @ np.ones((5, 2), np.float32)
    with pytest.raises(AssertionError):
        theirs * torch.ones(2)
    with pytest.raises(InputAssertionError, match="needs a scalar"):
        ours * np.ones(2, np.float32)
    with pytest.raises(InputIndexError, match="at least 2 axes"):
        FactoredMatrix(np.ones(4, np.float32), b)
