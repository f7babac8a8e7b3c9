"""SVD interpreter: read the singular directions of a head's OV circuit or an MLP's weights in vocabulary
space.

The top right singular vectors of a weight matrix are the directions it writes (or reads) most strongly;
projecting them onto the unembedding shows which tokens each direction promotes (Millidge & Black 2022, "The
Singular Value Decompositions of Transformer Weight Matrices are Highly Interpretable"). Same conventions as
TransformerLens's `SVDInterpreter.get_singular_vectors`:

    OV    FactoredMatrix(W_V[l, h], W_O[l, h]): right singular vectors (what the head writes), d_model.
    w_in  W_in[l]^T (times ln2's weight if not folded): right singular vectors (what the MLP reads).
    w_out W_out[l]: right singular vectors (what the MLP writes).

    vecs = get_singular_vectors(params, cfg, "OV", layer_index=5, head_index=1,
                                num_vectors=4)                                          # [d_vocab 1 4]
    ids = top_tokens(params, cfg, "OV", layer_index=5, head_index=1, num_vectors=4, k=10)   # [4 10]

A singular vector's sign is arbitrary: look at both ends (`bottom=True`).
"""

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxlens.analysis.factored_matrix import FactoredMatrix
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.shapes import ParamsLike, resolve_params

# einsum letters: d=d_model v=d_vocab m=d_mlp

VectorType = Literal["OV", "w_in", "w_out"]


def singular_directions(
    params: ParamsLike, cfg: Config, vector_type: str, layer_index: int, head_index: int | None = None
) -> tuple[Float[Array, "n d_model"], Float[Array, " n"]]:
    """(right singular vectors as rows [n d_model], singular values [n]) of the chosen weight, largest first.

    Raises:
        InputError: an unknown vector_type, a layer or head index out of range, or a head index missing
            for OV.
    """
    params, cfg = resolve_params(params, cfg)
    _check_index("layer_index", layer_index, cfg.n_layers)
    blocks = params["blocks"]
    if vector_type == "OV":
        if head_index is None:
            raise InputError("vector_type 'OV' needs head_index (the OV circuit belongs to one head).")
        _check_index("head_index", head_index, cfg.n_heads)
        kv = head_index // (cfg.n_heads // cfg.n_key_value_heads)
        f32 = lambda w: w.astype(jnp.float32)
        attn = blocks["attn"]
        fm = FactoredMatrix(f32(attn["W_V"][layer_index, kv]), f32(attn["W_O"][layer_index, head_index]))
        _, s, v = fm.svd()
        return v.T, s
    if vector_type == "w_in":
        w = blocks["mlp"]["W_in"][layer_index].T.astype(jnp.float32)  # [m d]
        ln2 = blocks.get("ln2", {})
        if "w" in ln2 and cfg.normalization_type in ("LN", "RMS"):
            w = w * ln2["w"][layer_index].astype(jnp.float32)
    elif vector_type == "w_out":
        w = blocks["mlp"]["W_out"][layer_index].astype(jnp.float32)  # [m d]
    else:
        raise InputError(f"vector_type must be 'OV', 'w_in' or 'w_out'; found {vector_type!r}.")
    _, s, vh = jnp.linalg.svd(w, full_matrices=False)
    return vh, s


def get_singular_vectors(
    params: ParamsLike, cfg: Config, vector_type: str, layer_index: int, num_vectors: int = 10,
    head_index: int | None = None,
) -> Float[Array, "d_vocab 1 num_vectors"]:
    """The top `num_vectors` singular directions projected on W_U: [d_vocab 1 num_vectors], as TL returns.

    Raises:
        InputError: as `singular_directions`, or more vectors than the weight has.
    """
    params, cfg = resolve_params(params, cfg)
    vecs, _ = singular_directions(params, cfg, vector_type, layer_index, head_index)
    if not 1 <= num_vectors <= vecs.shape[0]:
        raise InputError(f"num_vectors must be in [1, {vecs.shape[0]}] for this weight; found {num_vectors}.")
    proj = vecs[:num_vectors] @ params["unembed"]["W_U"].astype(jnp.float32)  # [n v]
    return proj.T[:, None, :]


def top_tokens(
    params: ParamsLike, cfg: Config, vector_type: str, layer_index: int, num_vectors: int = 5, k: int = 10,
    head_index: int | None = None, bottom: bool = False,
) -> Int[Array, "num_vectors k"]:
    """Ids of the k tokens each singular direction promotes most (least, with bottom=True).

    Decode them with `model.to_str_tokens(ids[i])`.
    """
    params, cfg = resolve_params(params, cfg)
    proj = get_singular_vectors(params, cfg, vector_type, layer_index, num_vectors, head_index)[:, 0, :].T
    if not 1 <= k <= cfg.d_vocab:
        raise InputError(f"k must be in [1, d_vocab={cfg.d_vocab}]; found {k}.")
    order = jnp.argsort(proj if bottom else -proj, axis=-1)
    return order[:, :k]


def _check_index(what: str, i, n: int) -> None:
    if not isinstance(i, int) or not 0 <= i < n:
        raise InputError(f"{what}={i!r} is out of range: it must be an int in [0, {n - 1}].")
