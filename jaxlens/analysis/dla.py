"""Direct logit attribution: how much each head, layer or neuron writes directly into a logit (difference).

The final logit is linear in the residual stream once the final norm's scale is frozen at its cached value, so
the residual stream's decomposition into embeddings, heads (+ b_O), MLP layers (+ b_out) and neurons splits
the logit into additive parts (Elhage et al. 2021; Wang et al. 2022, "Interpretability in the Wild",
section 3.1):

    logit[t] - logit[t'] = sum_c  norm_linear(c) . (w_final * (W_U[:, t] - W_U[:, t'])) + constant

where norm_linear centres (LayerNorm) and divides by the cached `ln_final.hook_scale`, w_final is the final
norm's weight (1 after fold_ln) and the constant collects the final norm's bias and b_U. Output softcapping
(Gemma 2) is not linear and is ignored.

    _, cache = model.run_with_cache(tokens)
    per_head = head_dla(cache, answer, wrong)         # [layer head_index batch]
    attrs, labels = layer_dla(cache, answer, wrong)   # embed, pos_embed, 0_attn_out, 0_mlp_out, ..., bias
    per_neuron = neuron_dla(cache, answer, wrong)     # [layer batch d_mlp]
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxlens.cache import ActivationCache
from jaxlens.cache_analysis import PosSlice, slice_axis
from jaxlens.errors import InputError

# einsum letters: l=layer b=batch p=pos h=head_index e=d_head d=d_model m=d_mlp

TokenSpec = int | Array | np.ndarray  # an id, [batch] ids, or [batch pos] ids


def head_dla(
    cache: ActivationCache,
    tokens: TokenSpec,
    incorrect_tokens: TokenSpec | None = None,
    pos_slice: PosSlice = -1,
) -> Float[Array, "layer head_index ..."]:
    """Each head's direct contribution (z @ W_O, without b_O) to the logit of `tokens`
    (minus `incorrect_tokens`).

    Args:
        cache: from run_with_cache with the params (needs attn.hook_z of every layer and ln_final.hook_scale).
        tokens: an id, one per batch entry [batch], or one per batch entry and selected position [batch pos].
        incorrect_tokens: the same, subtracted (a logit difference); None for the plain logit.
        pos_slice: positions to attribute (an int drops the position axis). -1 by default: the last token.

    Returns:
        [layer head_index batch] for an int pos_slice, else [layer head_index batch pos].
    """
    _need_params(cache)
    direction, _ = _directions(cache, tokens, incorrect_tokens, pos_slice)  # [b p d]
    z = _sel(_stacked(cache, "attn.hook_z"), pos_slice, axis=2)  # [l b p h e]
    W_O = cache.params["blocks"]["attn"]["W_O"].astype(jnp.float32)
    w_o_dir = jnp.einsum("lhed,bpd->lbphe", W_O, direction)
    out = jnp.einsum("lbphe,lbphe->lhbp", z.astype(jnp.float32), w_o_dir)
    out = out / _scale(cache, pos_slice)[None, None]
    return _finish(cache, out, pos_slice)


def layer_dla(
    cache: ActivationCache,
    tokens: TokenSpec,
    incorrect_tokens: TokenSpec | None = None,
    pos_slice: PosSlice = -1,
) -> tuple[Float[Array, "component ..."], list[str]]:
    """Direct contributions of the embeddings, each layer's attention and MLP output, and the constant.

    The components sum exactly to the logit (difference): labels "embed", "pos_embed" (learned positions
    only), "{l}_attn_out", "{l}_mlp_out" for every layer, and "bias" (final norm bias and b_U).

    Returns:
        ([component batch] for an int pos_slice, else [component batch pos]; labels).
    """
    _need_params(cache)
    direction, const = _directions(cache, tokens, incorrect_tokens, pos_slice)
    stack, labels = cache.decompose_resid(return_labels=True)  # [c b p d]
    stack = stack if cache.has_batch_dim else stack[:, None]
    out = jnp.einsum("cbpd,bpd->cbp", _sel(stack, pos_slice, axis=2).astype(jnp.float32), direction)
    out = out / _scale(cache, pos_slice)[None]
    out = jnp.concatenate([out, jnp.broadcast_to(const, out.shape[1:])[None]])
    return _finish(cache, out, pos_slice), labels + ["bias"]


def neuron_dla(
    cache: ActivationCache,
    tokens: TokenSpec,
    incorrect_tokens: TokenSpec | None = None,
    pos_slice: PosSlice = -1,
) -> Float[Array, "layer ... d_mlp"]:
    """Each MLP neuron's direct contribution: post activation x (W_out row . logit direction) / final scale.

    Per layer, the neurons plus b_out's contribution sum to that layer's `{l}_mlp_out` entry of `layer_dla`
    (for Gemma-2-style post-MLP norms that sum does not hold, as the norm is not linear).

    Returns:
        [layer batch d_mlp] for an int pos_slice, else [layer batch pos d_mlp].
    """
    _need_params(cache)
    direction, _ = _directions(cache, tokens, incorrect_tokens, pos_slice)
    post = _sel(_stacked(cache, "mlp.hook_post"), pos_slice, axis=2).astype(jnp.float32)  # [l b p m]
    w_out = cache.params["blocks"]["mlp"]["W_out"].astype(jnp.float32)
    out = post * jnp.einsum("lmd,bpd->lbpm", w_out, direction) / _scale(cache, pos_slice)[None, ..., None]
    if isinstance(pos_slice, int):
        out = out[:, :, 0]
    return out[:, 0] if not cache.has_batch_dim else out


def logit_direction(
    cache: ActivationCache, tokens: TokenSpec, incorrect_tokens: TokenSpec | None = None
) -> tuple[Float[Array, "*batch d_model"], Float[Array, "*batch"]]:
    """The residual direction whose dot product with the normalised residual gives the logit (difference):
    (w_final * (W_U[:, t] - W_U[:, t']), constant from the final norm's bias and b_U)."""
    params, cfg = cache.params, cache.cfg
    W_U, b_U = params["unembed"]["W_U"].astype(jnp.float32), params["unembed"]["b_U"].astype(jnp.float32)
    t = _ids(tokens, cfg.d_vocab, "tokens")
    direction, const = W_U[:, t].T if t.ndim else W_U[:, t], b_U[t]
    if incorrect_tokens is not None:
        u = _ids(incorrect_tokens, cfg.d_vocab, "incorrect_tokens")
        direction = direction - (W_U[:, u].T if u.ndim else W_U[:, u])
        const = const - b_U[u]
    ln = params.get("ln_final", {})
    if "b" in ln and cfg.normalization_type == "LN":
        const = const + direction @ ln["b"].astype(jnp.float32)
    if "w" in ln and cfg.normalization_type in ("LN", "RMS"):
        direction = direction * ln["w"].astype(jnp.float32)
    return direction, const


# -- helpers -------------------------------------------------------------------------------------------------

def _directions(cache, tokens, incorrect_tokens, pos_slice):
    """Direction [b p d] (centred for LayerNorm) and constant [b p], aligned with the selected positions."""
    direction, const = logit_direction(cache, tokens, incorrect_tokens)
    if direction.ndim == 1:
        direction, const = direction[None, None], const[None, None]
    elif direction.ndim == 2:
        direction, const = direction[:, None], const[:, None]
    elif isinstance(pos_slice, int):  # [batch pos] tokens for one selected position
        raise InputError(f"tokens of shape {direction.shape[:-1]} give one id per position, but pos_slice="
                         f"{pos_slice} selects one position; pass ids of shape [batch] instead.")
    if cache.cfg.normalization_type in ("LN", "LNPre"):
        direction = direction - direction.mean(-1, keepdims=True)  # centring is a symmetric projection
    return direction, const


def _scale(cache, pos_slice) -> Float[Array, "batch pos"]:
    kind = cache.cfg.normalization_type
    if kind is None:
        return jnp.ones(_sel(_batched(cache, "hook_embed"), pos_slice, axis=1).shape[:2], jnp.float32)
    return _sel(_batched(cache, "ln_final.hook_scale"), pos_slice, axis=1)[..., 0].astype(jnp.float32)


def _stacked(cache: ActivationCache, rel: str) -> Array:
    """[layer batch pos ...] for a block hook, from the stacked name or the per-layer names."""
    if f"blocks.{rel}" in cache:
        x = cache[f"blocks.{rel}"]
        return x if cache.has_batch_dim else x[:, None]
    missing = [l for l in range(cache.cfg.n_layers) if f"blocks.{l}.{rel}" not in cache]
    if missing:
        raise InputError(f"The cache lacks blocks.{missing[0]}.{rel}; run run_with_cache with it cached.")
    return jnp.stack([_batched(cache, f"blocks.{l}.{rel}") for l in range(cache.cfg.n_layers)])


def _batched(cache: ActivationCache, name: str) -> Array:
    x = cache[name]
    return x if cache.has_batch_dim else x[None]


def _sel(x: Array, pos_slice: PosSlice, axis: int) -> Array:
    """Positions along `axis`, keeping the axis (an int becomes a length-1 selection)."""
    return slice_axis(x, [pos_slice] if isinstance(pos_slice, int) else pos_slice, axis)


def _finish(cache, out: Array, pos_slice) -> Array:
    """Drop the length-1 position axis for an int pos_slice, and the batch axis for a batch-free cache."""
    if isinstance(pos_slice, int):
        out = out[..., 0]
        return out if cache.has_batch_dim else out[..., 0]
    return out if cache.has_batch_dim else out[..., 0, :]


def _ids(tokens, d_vocab: int, what: str) -> Array:
    t = jnp.asarray(tokens)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise InputError(f"{what} must be integer token ids; found dtype {t.dtype}. "
                         "Use model.to_single_token.")
    if t.size and (int(t.min()) < 0 or int(t.max()) >= d_vocab):
        raise InputError(f"{what} holds an id outside the vocabulary [0, {d_vocab}): "
                         f"{np.unique(t).tolist()[:5]}.")
    return t


def _need_params(cache: ActivationCache) -> None:
    if cache.params is None:
        raise InputError("Direct logit attribution needs the weights: use a cache from model.run_with_cache "
                         "(or ActivationCache(..., params=params)).")

