"""The logit lens: read the residual stream after each layer through the unembedding (nostalgebraist 2020,
"interpreting GPT: the logit lens"), to watch a prediction form layer by layer.

    _, cache = model.run_with_cache(tokens)
    lens = logit_lens(cache, tokens=[paris, london], pos_slice=-1)
    lens.probs            # [component batch 2]: probability of " Paris" and " London" after each layer
    lens.labels           # ["0_pre", "1_pre", ..., "final_post"]

Each residual (`cache.accumulated_resid`) goes through the final norm, recomputed on that residual (the usual
lens: at "final_post" this is exactly the model's output), or with `recompute_norm=False` divided by the final
residual's cached scale (TransformerLens's `apply_ln=True`, linear in the residual), then W_U and b_U.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxlens.cache import ActivationCache
from jaxlens.cache_analysis import PosSlice
from jaxlens.errors import InputError
from jaxlens.model.forward import unembed
from jaxlens.model.hooks import Hooks
from jaxlens.model.norms import norm

# einsum letters: c=component b=batch p=pos d=d_model v=d_vocab


class LogitLens(NamedTuple):
    """Per-layer readout. logits/probs/ranks: [component batch pos n_tokens] (pos dropped for an int
    pos_slice, n_tokens is d_vocab when no tokens were chosen); labels name the components."""

    logits: Float[Array, "component ..."]
    probs: Float[Array, "component ..."]
    ranks: Int[Array, "component ..."]
    labels: list[str]


def logit_lens(
    cache: ActivationCache,
    tokens: int | Array | np.ndarray | list[int] | None = None,
    pos_slice: PosSlice = None,
    incl_mid: bool = False,
    recompute_norm: bool = True,
) -> LogitLens:
    """Logits, probabilities and ranks of chosen tokens after every layer.

    Args:
        cache: from run_with_cache with the params; needs every hook_resid_pre, the last hook_resid_post (and
            hook_resid_mid with incl_mid, ln_final.hook_scale without recompute_norm).
        tokens: vocabulary ids to read (an int or a list / 1-D array); None keeps the whole vocabulary.
        pos_slice: positions to read (an int drops the axis); None: all.
        incl_mid: also read the residual between attention and MLP of each layer.
        recompute_norm: apply the final norm to each residual afresh (default) or with the final scale.

    Returns:
        LogitLens(logits, probs, ranks, labels). probs are the softmax over the whole vocabulary; ranks are 0
        for the top token.

    Raises:
        InputError: a token id outside the vocabulary, or a cache without weights.
    """
    if cache.params is None:
        raise InputError("logit_lens needs the weights: use a cache from model.run_with_cache.")
    stack, labels = cache.accumulated_resid(incl_mid=incl_mid, pos_slice=pos_slice, return_labels=True)
    if not cache.has_batch_dim:
        stack = stack[:, None]
    ids = None
    if tokens is not None:
        ids = jnp.atleast_1d(jnp.asarray(tokens))
        if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise InputError(f"tokens must be an id or a 1-D list of ids; found {np.asarray(tokens)!r}.")
        if int(ids.min()) < 0 or int(ids.max()) >= cache.cfg.d_vocab:
            raise InputError(f"tokens {ids.tolist()} has ids outside the vocabulary "
                             f"[0, {cache.cfg.d_vocab}).")
    scale = None
    if not recompute_norm and cache.cfg.normalization_type is not None:
        scale = cache["ln_final.hook_scale"]
        scale = scale if cache.has_batch_dim else scale[None]
        scale = _pos(scale, pos_slice)
    logits, probs, ranks = _lens(cache.params, cache.cfg, stack, scale, ids)
    if not cache.has_batch_dim:
        logits, probs, ranks = logits[:, 0], probs[:, 0], ranks[:, 0]
    return LogitLens(logits, probs, ranks, labels)


def _lens(params, cfg, stack, scale, ids):
    """[c b (p) d] residuals -> logits / probs / ranks over `ids` (all if None)."""
    x = stack.astype(jnp.float32)
    if scale is None:
        x = norm(params.get("ln_final", {}), x, cfg, Hooks(), "ln_final")
    else:  # TL's apply_ln: the final residual's scale, then the norm's weights if not folded
        kind = cfg.normalization_type
        if kind in ("LN", "LNPre"):
            x = x - x.mean(-1, keepdims=True)
        x = x / scale.astype(jnp.float32)
        ln = params.get("ln_final", {})
        if "w" in ln and kind in ("LN", "RMS"):
            x = x * ln["w"].astype(jnp.float32)
        if "b" in ln and kind == "LN":
            x = x + ln["b"].astype(jnp.float32)
    shape = x.shape
    flat = x.reshape((-1, 1, shape[-1]))  # unembed expects [batch pos d_model]
    logits = unembed(params, cfg, flat).reshape(shape[:-1] + (-1,)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    if ids is None:
        ranks = jnp.argsort(jnp.argsort(-logits, axis=-1), axis=-1)
        return logits, jnp.exp(logp), ranks
    chosen = logits[..., ids]
    ranks = (logits[..., None, :] > chosen[..., :, None]).sum(-1)
    return chosen, jnp.exp(logp[..., ids]), ranks


def _pos(x, pos_slice):
    if pos_slice is None:
        return x
    if isinstance(pos_slice, int):
        return x[:, pos_slice]
    if isinstance(pos_slice, tuple):
        pos_slice = slice(*pos_slice)
    return x[:, pos_slice] if isinstance(pos_slice, slice) else x[:, jnp.asarray(pos_slice)]
