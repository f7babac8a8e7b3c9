"""FactoredMatrix: a matrix kept as the product A @ B of two thin factors, with cheap SVD, norm, eigenvalues.

The OV circuit of a head, W_V @ W_O, is a [d_model d_model] matrix of rank d_head, and so is the QK circuit
W_Q @ W_K^T (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"). Keeping the factors
makes their SVD, Frobenius norm and eigenvalues cost O(d_model d_head^2) rather than O(d_model^3). Same
operations and conventions as TransformerLens's `FactoredMatrix`, as a JAX pytree (through jit and vmap):

    OV = model.OV                               # [layer head_index d_model d_model], leading axes broadcast
    OV[3, 7].S                                  # singular values of head L3H7's OV circuit, [d_head]
    (OV[3, 7] @ model.W_U).get_corner(5)        # top-left corner of the dense [d_model d_vocab] product
    OV.norm()                                   # Frobenius norm of every head's circuit, [layer head_index]

Leading axes of A and B broadcast against each other (NumPy rules). `svd()` returns (U, S, V) with
M = U @ diag(S) @ V^T, as TL does; `Vh` is TL's (misnamed) alias for V. Operands may be JAX or NumPy arrays,
objects with `__array__` (a torch tensor), or Python scalars; `np_array @ M` works too. Shape errors derive
from the built-in TL raises (AssertionError for mismatched inner dimensions, IndexError for bad indices).
"""

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Complex, Float

from jaxlens.errors import InputAssertionError, InputError, InputIndexError

# einsum letters: l=ldim m=mdim r=rdim (the factors are [... l m] and [... m r])


@jax.tree_util.register_pytree_node_class
class FactoredMatrix:
    """The matrix A @ B, stored as A [... ldim mdim] and B [... mdim rdim] (leading axes broadcast).

    Args:
        A: the left factor [... ldim mdim]: a JAX or NumPy array, or an object with `__array__` (torch).
        B: the right factor [... mdim rdim].

    Raises:
        InputAssertionError: the inner dimensions differ (TL asserts it).
        InputIndexError: a factor has fewer than 2 axes.
        InputError: the leading axes do not broadcast.
    """

    __array_ufunc__ = None  # `np_array @ M` and `np_scalar * M` defer to M's reflected operators

    def __init__(self, A: Any, B: Any):  # [... ldim mdim], [... mdim rdim]: any array-like (see `_as_array`)
        A, B = _as_array(A), _as_array(B)
        if A.ndim < 2 or B.ndim < 2:
            raise InputIndexError(
                f"FactoredMatrix factors need at least 2 axes; found A {A.shape}, B {B.shape}.")
        if A.shape[-1] != B.shape[-2]:
            raise InputAssertionError(
                f"FactoredMatrix factors must match on the inner dimension: A is {A.shape}, B is {B.shape} "
                f"({A.shape[-1]} != {B.shape[-2]}). Transpose one of them, or check which weight you passed."
            )
        try:
            lead = jnp.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except ValueError as e:
            raise InputError(
                f"FactoredMatrix leading axes do not broadcast: A is {A.shape}, B is {B.shape}."
            ) from e
        self.A = jnp.broadcast_to(A, lead + A.shape[-2:])
        self.B = jnp.broadcast_to(B, lead + B.shape[-2:])

    # -- pytree ----------------------------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.A, self.B), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.A, obj.B = children
        return obj

    # -- shape -----------------------------------------------------------------------------------------------
    @property
    def ldim(self) -> int:
        return self.A.shape[-2]

    @property
    def mdim(self) -> int:
        return self.A.shape[-1]

    @property
    def rdim(self) -> int:
        return self.B.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense product: leading axes + (ldim, rdim)."""
        return self.A.shape[:-2] + (self.ldim, self.rdim)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def has_leading_dims(self) -> bool:
        """Whether there are axes before the matrix ones (TL's attribute)."""
        return self.ndim > 2

    @property
    def pair(self) -> tuple[Array, Array]:
        return self.A, self.B

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    # -- products --------------------------------------------------------------------------------------------
    @property
    def AB(self) -> Float[Array, "... ldim rdim"]:
        """The dense product (expensive for big ldim, rdim)."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Array, "... mdim mdim"]:
        """The reverse product B @ A; only defined when ldim == rdim.

        Raises:
            InputAssertionError: ldim != rdim.
        """
        if self.ldim != self.rdim:
            raise InputAssertionError(
                f"BA needs a square matrix (ldim == rdim); this one has shape {self.shape}.")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        """The transpose, (A B)^T = B^T A^T, still factored."""
        return FactoredMatrix(jnp.swapaxes(self.B, -1, -2), jnp.swapaxes(self.A, -1, -2))

    def __matmul__(self, other):
        """self @ other: a FactoredMatrix for a matrix (or a FactoredMatrix), a vector [... ldim] for one."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        other = _as_array(other)
        if other.ndim < 2:
            _check_inner(self.rdim, other.shape[-1], self.shape, other.shape)
            return (self.A @ (self.B @ other[..., None]))[..., 0]
        _check_inner(self.rdim, other.shape[-2], self.shape, other.shape)
        if self.rdim > self.mdim:  # keep the thinner middle
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        """other @ self."""
        other = _as_array(other)
        _check_inner(self.ldim, other.shape[-1], other.shape, self.shape)
        if other.ndim < 2:
            return ((other[..., None, :] @ self.A) @ self.B)[..., 0, :]
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> "FactoredMatrix":
        """Scalar multiple (scales A).

        Raises:
            InputAssertionError: `scalar` is an array with more than one element (use @ for matrix products).
        """
        scalar = _as_array(scalar)
        if scalar.size != 1:
            raise InputAssertionError(
                f"FactoredMatrix * x needs a scalar; found shape {scalar.shape}. Use @ for matrix products.")
        return FactoredMatrix(self.A * jnp.reshape(scalar.astype(self.A.dtype), ()), self.B)

    __rmul__ = __mul__

    # -- spectra ---------------------------------------------------------------------------------------------
    def svd(self) -> tuple[Float[Array, "... ldim mdim"], Float[Array, "... mdim"],
                           Float[Array, "... rdim mdim"]]:
        """(U, S, V) with A @ B = U @ diag(S) @ V^T, from the SVDs of the factors (TL's algorithm).

        With A = Ua Sa Va^T and B = Ub Sb Vb^T, A B = Ua (Sa Va^T Ub Sb) Vb^T; the middle is small
        [mdim mdim], so only thin SVDs are taken. S has min(ldim, mdim, rdim) entries, in decreasing order.
        """
        ua, sa, vha = jnp.linalg.svd(self.A, full_matrices=False)
        ub, sb, vhb = jnp.linalg.svd(self.B, full_matrices=False)
        middle = (sa[..., :, None] * vha) @ (ub * sb[..., None, :])
        um, sm, vhm = jnp.linalg.svd(middle, full_matrices=False)
        U = ua @ um
        V = jnp.swapaxes(vhb, -1, -2) @ jnp.swapaxes(vhm, -1, -2)
        return U, sm, V

    @property
    def U(self) -> Float[Array, "... ldim mdim"]:
        return self.svd()[0]

    @property
    def S(self) -> Float[Array, "... mdim"]:
        return self.svd()[1]

    @property
    def V(self) -> Float[Array, "... rdim mdim"]:
        """Right singular vectors as columns: M = U @ diag(S) @ V^T."""
        return self.svd()[2]

    @property
    def Vh(self) -> Float[Array, "... rdim mdim"]:
        """TransformerLens's name for `V` (it returns V, not V^T, there as here)."""
        return self.V

    @property
    def eigenvalues(self) -> Complex[Array, "... mdim"]:
        """Eigenvalues of A B: the nonzero ones are those of B A [mdim mdim] (if BAv = kv then AB(Av) = k Av).

        Uses `jnp.linalg.eig`, which JAX implements on CPU only.
        """
        m = self.BA
        if m.dtype in (jnp.bfloat16, jnp.float16):
            m = m.astype(jnp.float32)
        return jnp.linalg.eigvals(m)

    def norm(self) -> Float[Array, "..."]:
        """Frobenius norm of A @ B: sqrt(sum((A^T A) * (B B^T))), equal to sqrt(sum(S^2)) without an SVD."""
        ata = jnp.einsum("...lm,...ln->...mn", self.A, self.A)
        bbt = jnp.einsum("...mr,...nr->...mn", self.B, self.B)
        return jnp.sqrt(jnp.maximum((ata * bbt).sum((-2, -1)), 0.0))

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as (U sqrt(S)) @ (sqrt(S) V^T): an even split with orthogonal rows and columns."""
        U, S, V = self.svd()
        r = jnp.sqrt(S)
        return FactoredMatrix(U * r[..., None, :], r[..., :, None] * jnp.swapaxes(V, -1, -2))

    def collapse_l(self) -> Float[Array, "... mdim rdim"]:
        """diag(S) V^T: the matrix with its left orthogonal factor U removed (same singular values)."""
        U, S, V = self.svd()
        return S[..., :, None] * jnp.swapaxes(V, -1, -2)

    def collapse_r(self) -> Float[Array, "... ldim mdim"]:
        """U diag(S): the matrix with its right orthogonal factor V^T removed."""
        U, S, V = self.svd()
        return U * S[..., None, :]

    # -- indexing --------------------------------------------------------------------------------------------
    def get_corner(self, k: int = 3) -> Array:
        """The top-left k x ... x k corner of the dense product (every axis, leading ones too, cut to k)."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    def unsqueeze(self, axis: int) -> "FactoredMatrix":
        """A new leading axis of size 1 at `axis` (counted among the leading axes, as torch's unsqueeze)."""
        return FactoredMatrix(jnp.expand_dims(self.A, axis), jnp.expand_dims(self.B, axis))

    def __getitem__(self, idx) -> "FactoredMatrix":
        """Index the product's axes without forming it, with TransformerLens 4.3's rules.

        Indices on the leading axes index both factors (`OV[3, 7]`); an index reaching the row axis slices
        A's rows, one reaching the column axis B's columns, and an integer there keeps a length-1 axis. `...`
        expands over the product's axes; `None` next to the matrix axes adds an axis without forming AB.

        Raises:
            InputIndexError: more indices than axes, or two ellipses (also a ValueError, as TL raises).
        """
        idx = tuple(_index_entry(i) for i in (idx if isinstance(idx, tuple) else (idx,)))
        dots = [i for i, item in enumerate(idx) if item is Ellipsis]
        if len(dots) > 1:
            raise InputIndexError(f"An index can have only one ellipsis; found {len(dots)}.")
        if dots:
            used = sum(_index_ndim(item) for item in idx)
            idx = idx[:dots[0]] + (slice(None),) * (self.ndim - used) + idx[dots[0] + 1:]
        factor_idx, matrix_newaxes, length = [], [], 0
        for item in idx:
            if item is None and length >= self.ndim - 2:
                matrix_newaxes.append(length - (self.ndim - 2))
            else:
                factor_idx.append(item)
            length += _index_ndim(item)
        idx = tuple(factor_idx)
        if length <= self.ndim - 2:
            out = FactoredMatrix(self.A[idx], self.B[idx])
        elif length == self.ndim - 1:
            idx = _keep_axis(idx, -1)
            out = FactoredMatrix(self.A[idx], self.B[idx[:-1]])
        elif length == self.ndim:
            idx = _keep_axis(_keep_axis(idx, -1), -2)
            out = FactoredMatrix(self.A[idx[:-1]], self.B[idx[:-2] + (slice(None), idx[-1])])
        else:
            raise InputIndexError(
                f"Index {idx} has {length} entries, too many for a FactoredMatrix of shape {self.shape}.")
        for where in matrix_newaxes:
            if where == 0:  # before the row axis: a new leading axis
                axis = out.ndim - 2
                out = FactoredMatrix(jnp.expand_dims(out.A, axis), jnp.expand_dims(out.B, axis))
            elif where == 1:  # between rows and columns: the row axis becomes a leading one
                out = FactoredMatrix(jnp.expand_dims(out.A, -2), jnp.expand_dims(out.B, -3))
            else:  # after the columns: the old column axis becomes the row axis
                out = FactoredMatrix(jnp.expand_dims(jnp.swapaxes(out.B, -1, -2), -3),
                                     jnp.expand_dims(out.A, -1))
        return out


def _as_array(x) -> Array:
    """A JAX array from a JAX or NumPy array, a Python or NumPy scalar, or an object with `__array__` (a torch
    tensor, detached first)."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number)):
        return jnp.asarray(x)
    if hasattr(x, "detach"):  # torch: __array__ refuses tensors that require grad
        x = x.detach().cpu()
    if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
        return jnp.asarray(np.asarray(x))
    raise InputError(f"FactoredMatrix cannot use an operand of type {type(x).__name__}; pass an array.")


def _index_entry(item):
    """Lists as NumPy arrays (JAX refuses list indices); everything else unchanged."""
    return np.asarray(item) if isinstance(item, list) else item


def _index_ndim(item) -> int:
    """How many of the indexed object's axes an index entry consumes (TL's rule: a bool mask one per axis)."""
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, tuple):
        item = np.asarray(item)
    if isinstance(item, (np.ndarray, jax.Array)) and item.dtype in (np.bool_, np.uint8):
        return item.ndim
    return 1


def _int_like(x) -> int | None:
    """The Python int of an integer scalar (NumPy or 0-d array too), else None (TL's to_python_int)."""
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, (np.ndarray, jax.Array)) and x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer):
        return int(x)
    return None


def _check_inner(a: int, b: int, left_shape, right_shape) -> None:
    if a != b:
        raise InputAssertionError(
            f"Cannot multiply shapes {tuple(left_shape)} @ {tuple(right_shape)}: inner dimensions {a} != {b}."
        )


def _keep_axis(idx: tuple, where: int) -> tuple:
    """An integer index at `where` becomes a length-1 slice, so the matrix axes are kept (as TL does)."""
    idx = list(idx)
    i = _int_like(idx[where])
    if i is not None:
        idx[where] = slice(i, i + 1 if i != -1 else None)
    return tuple(idx)
