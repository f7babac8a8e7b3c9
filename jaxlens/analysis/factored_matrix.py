"""FactoredMatrix: a matrix kept as the product A @ B of two thin factors, with cheap SVD, norm and eigenvalues.

The OV circuit of a head, W_V @ W_O, is a [d_model d_model] matrix of rank d_head; the QK circuit W_Q @ W_K^T is
too (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"). Keeping the factors makes their
SVD, Frobenius norm and eigenvalues cost O(d_model d_head^2) rather than O(d_model^3). Same operations and
conventions as TransformerLens's `FactoredMatrix`, as a JAX pytree (it passes through jit and vmap):

    OV = model.OV                                   # [layer head_index d_model d_model], leading axes broadcast
    OV[3, 7].S                                      # singular values of head L3H7's OV circuit, [d_head]
    (OV[3, 7] @ model.W_U).get_corner(5)            # top-left corner of the dense [d_model d_vocab] product
    OV.norm()                                       # Frobenius norm of every head's circuit, [layer head_index]

Leading axes of A and B broadcast against each other (NumPy rules). `svd()` returns (U, S, V) with
M = U @ diag(S) @ V^T, as TL does; `Vh` is TL's (misnamed) alias for V.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float

from jaxlens.errors import InputError

# einsum letters: l=ldim m=mdim r=rdim (the factors are [... l m] and [... m r])


@jax.tree_util.register_pytree_node_class
class FactoredMatrix:
    """The matrix A @ B, stored as A [... ldim mdim] and B [... mdim rdim] (leading axes broadcast).

    Args:
        A: the left factor.
        B: the right factor.

    Raises:
        InputError: the inner dimensions differ, a factor has fewer than 2 axes, or the leading axes do not
            broadcast.
    """

    def __init__(self, A: Float[Array, "... ldim mdim"], B: Float[Array, "... mdim_b rdim"]):  # mdim_b == mdim
        A, B = jnp.asarray(A), jnp.asarray(B)
        if A.ndim < 2 or B.ndim < 2:
            raise InputError(f"FactoredMatrix factors need at least 2 axes; found A {A.shape}, B {B.shape}.")
        if A.shape[-1] != B.shape[-2]:
            raise InputError(
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
            InputError: ldim != rdim.
        """
        if self.ldim != self.rdim:
            raise InputError(f"BA needs a square matrix (ldim == rdim); this one has shape {self.shape}.")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        """The transpose, (A B)^T = B^T A^T, still factored."""
        return FactoredMatrix(jnp.swapaxes(self.B, -1, -2), jnp.swapaxes(self.A, -1, -2))

    def __matmul__(self, other):
        """self @ other: a FactoredMatrix for a matrix (or FactoredMatrix), a vector [... ldim] for a vector."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        other = jnp.asarray(other)
        if other.ndim < 2:
            _check_inner(self.rdim, other.shape[-1], self.shape, other.shape)
            return (self.A @ (self.B @ other[..., None]))[..., 0]
        _check_inner(self.rdim, other.shape[-2], self.shape, other.shape)
        if self.rdim > self.mdim:  # keep the thinner middle
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        """other @ self."""
        other = jnp.asarray(other)
        _check_inner(self.ldim, other.shape[-1], other.shape, self.shape)
        if other.ndim < 2:
            return ((other[..., None, :] @ self.A) @ self.B)[..., 0, :]
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> "FactoredMatrix":
        """Scalar multiple (scales A).

        Raises:
            InputError: `scalar` is an array with more than one element (use @ for matrix products).
        """
        if jnp.size(scalar) != 1:
            raise InputError(f"FactoredMatrix * x needs a scalar; found shape {jnp.shape(scalar)}. Use @ instead.")
        return FactoredMatrix(self.A * jnp.reshape(jnp.asarray(scalar, self.A.dtype), ()), self.B)

    __rmul__ = __mul__

    # -- spectra ---------------------------------------------------------------------------------------------
    def svd(self) -> tuple[Float[Array, "... ldim mdim"], Float[Array, "... mdim"], Float[Array, "... rdim mdim"]]:
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
        """Index the leading axes (`OV[3, 7]`); indices reaching into the matrix axes slice A's rows / B's columns.

        Raises:
            InputError: more indices than axes.
        """
        idx = idx if isinstance(idx, tuple) else (idx,)
        n = len([i for i in idx if i is not None])
        lead = self.ndim - 2
        if n <= lead:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if n == lead + 1:
            idx = _keep_axis(idx, -1)
            return FactoredMatrix(self.A[idx], self.B[idx[:-1]])
        if n == lead + 2:
            idx = _keep_axis(_keep_axis(idx, -1), -2)
            return FactoredMatrix(self.A[idx[:-1]], self.B[idx[:-2] + (slice(None), idx[-1])])
        raise InputError(f"Index {idx} has too many entries for a FactoredMatrix of shape {self.shape}.")


def _check_inner(a: int, b: int, left_shape, right_shape) -> None:
    if a != b:
        raise InputError(
            f"Cannot multiply shapes {tuple(left_shape)} @ {tuple(right_shape)}: inner dimensions {a} != {b}."
        )


def _keep_axis(idx: tuple, where: int) -> tuple:
    """An int index at `where` becomes a length-1 slice, so the matrix axes are kept (as TL does)."""
    idx = list(idx)
    if isinstance(idx[where], int):
        i = idx[where]
        idx[where] = slice(i, i + 1 if i != -1 else None)
    return tuple(idx)
