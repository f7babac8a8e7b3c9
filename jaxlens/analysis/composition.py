"""Head circuits as factored matrices (`OV`, `QK`) and composition scores between every pair of heads.

A head's OV circuit W_V W_O says what it writes given what it reads; its QK circuit W_Q W_K^T which pairs of
residual directions it matches. A later head composes with an earlier one when its Q, K or V input reads the
earlier head's output (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits", section
"Virtual weights and composition"). The score is the normalised Frobenius norm

    score(L1 H1 -> L2 H2) = ||W_OV^{L1H1} W^{L2H2}||_F / (||W_OV^{L1H1}||_F ||W^{L2H2}||_F)

with W = W_QK (Q-composition), W_QK^T (K-composition) or W_OV (V-composition), as TransformerLens's
`all_composition_scores`:

    scores = all_composition_scores(params, cfg, "K")     # [layer head_index layer head_index]
"""


import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxlens.analysis.factored_matrix import FactoredMatrix
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.shapes import ParamsLike, resolve_params

# einsum letters: l=layer h=head_index d=d_model e=d_head (a/b, f: the second head's head_index, d_head)


def OV(params: ParamsLike, cfg: Config) -> FactoredMatrix:
    """Every head's OV circuit W_V @ W_O as a FactoredMatrix of shape [layer head_index d_model d_model].

    Under grouped-query attention W_V is repeated to n_heads first (TL's `W_V` property does the same).
    """
    params, cfg = resolve_params(params, cfg)
    attn = params["blocks"]["attn"]
    return FactoredMatrix(_repeat_kv(attn["W_V"], cfg), attn["W_O"])


def QK(params: ParamsLike, cfg: Config) -> FactoredMatrix:
    """Every head's QK circuit W_Q @ W_K^T as a FactoredMatrix of shape [layer head_index d_model d_model]
    (query side on the left: the bilinear form is resid_q^T W_Q W_K^T resid_k)."""
    params, cfg = resolve_params(params, cfg)
    attn = params["blocks"]["attn"]
    return FactoredMatrix(attn["W_Q"], jnp.swapaxes(_repeat_kv(attn["W_K"], cfg), -1, -2))


def composition_scores(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True) -> Array:
    """||left @ right||_F / (||left||_F ||right||_F) for factored matrices (TL's `utils.composition_scores`).

    Args:
        left: [*left_leading a b].
        right: [*right_leading b c].
        broadcast_dims: score every left against every right: the result is [*left_leading *right_leading].
            Otherwise the leading axes broadcast against each other.

    Returns:
        The scores, in [0, 1].

    Raises:
        InputError: left.rdim != right.ldim.
    """
    if left.rdim != right.ldim:
        raise InputError(f"Composition needs left.rdim == right.ldim; shapes were {left.shape} and "
                         f"{right.shape}.")
    new_left, new_right = left.collapse_l(), right.collapse_r()  # [.. m_l rdim], [.. ldim m_r]
    if broadcast_dims:
        nl, nr = left.ndim - 2, right.ndim - 2
        new_left = new_left.reshape(new_left.shape[:nl] + (1,) * nr + new_left.shape[nl:])
        new_right = new_right.reshape((1,) * nl + new_right.shape)
    return _fro(new_left @ new_right) / _fro(new_left) / _fro(new_right)


def all_composition_scores(
    params: ParamsLike, cfg: Config, mode: str
) -> Float[Array, "layer head_index layer head_index"]:
    """Composition scores of every (earlier head, later head) pair, zero unless the first layer is earlier.

    Computed one source layer at a time (`lax.map`), so memory stays at layer * head_index^2 * d_head^2.

    Args:
        params, cfg: the model.
        mode: "Q", "K" or "V" composition.

    Returns:
        scores[l1, h1, l2, h2] for the output of head (l1, h1) read by the Q / K / V input of head (l2, h2).

    Raises:
        InputError: mode is not "Q", "K" or "V".
    """
    params, cfg = resolve_params(params, cfg)
    left = OV(params, cfg)
    if mode == "Q":
        right = QK(params, cfg)
    elif mode == "K":
        right = QK(params, cfg).T
    elif mode == "V":
        right = OV(params, cfg)
    else:
        raise InputError(f"mode must be one of 'Q', 'K', 'V'; found {mode!r}.")
    return _all_pairs(left.collapse_l(), right.collapse_r())


@jax.jit
def _all_pairs(new_left: Array, new_right: Array) -> Array:
    """[l h e d] x [l h d f] -> normalised pair norms [l h l h], masked to l1 < l2."""
    n_layers = new_left.shape[0]
    r_norm = _fro(new_right)  # [l h]

    def one_layer(x):  # x: [h e d]
        comp = jnp.einsum("aed,lbdf->albef", x, new_right)
        return _fro(comp) / _fro(x)[:, None, None] / r_norm[None]

    scores = jax.lax.map(one_layer, new_left)
    later = jnp.arange(n_layers)[:, None, None, None] < jnp.arange(n_layers)[None, None, :, None]
    return jnp.where(later, scores, 0.0)


def _fro(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1)))


def _repeat_kv(w: Array, cfg: Config) -> Array:
    r = cfg.n_heads // cfg.n_key_value_heads
    return jnp.repeat(w, r, axis=1) if r > 1 else w
