"""Next-token cross-entropy, as TransformerLens's `lm_cross_entropy_loss` computes it, padding-aware.

    loss = lm_cross_entropy_loss(logits, tokens)                                  # mean over batch and pos-1
    per_token = lm_cross_entropy_loss(logits, tokens, attention_mask=m, per_token=True)   # 0 where masked

The prediction at position i is scored against token i + 1; a pair counts only when both tokens are real
(`attention_mask` True at i and i + 1). Masked pairs are replaced by 0 before any sum, so a NaN or inf logit
at a padded position cannot reach the mean.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int

from jaxlens.errors import InputAssertionError


def lm_cross_entropy_loss(
    logits: Float[Array, "batch pos d_vocab"],
    tokens: Int[ArrayLike, "batch pos"],
    attention_mask: ArrayLike | None = None,
    per_token: bool = False,
) -> Array:
    """Next-token cross-entropy (TransformerLens's formula: log_softmax, then the log-prob of the next token).

    Args:
        logits: [batch pos d_vocab] (any float dtype; computed in float32).
        tokens: [batch pos] the ids the logits were computed from.
        attention_mask: [batch pos], True (or 1) for real tokens, False (0) for padding; None counts every
            pair.
        per_token: return the loss of every pair, [batch pos-1] (0 where masked), not the mean.

    Returns:
        The mean over the counted pairs (a scalar; NaN when the mask leaves none, as in TransformerLens), or
        [batch pos-1] with per_token.

    Raises:
        InputAssertionError: logits and tokens, or the mask and the tokens, differ in shape (TransformerLens
            asserts the same; the class is also an AssertionError and a ValueError).
    """
    tokens = jnp.asarray(tokens)
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise InputAssertionError(
            "lm_cross_entropy_loss needs logits [batch pos d_vocab] and tokens [batch pos] of the same batch "
            f"and pos; found logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}.")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, :-1]
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    if attention_mask is None:
        return nll if per_token else nll.mean()
    if np.shape(attention_mask) != tokens.shape:
        raise InputAssertionError(
            f"attention_mask must have the tokens' shape {tuple(tokens.shape)} ([batch pos], True for real "
            f"tokens); found {tuple(np.shape(attention_mask))}.")
    m = jnp.asarray(attention_mask).astype(bool)
    valid = m[:, 1:] & m[:, :-1]
    nll = jnp.where(valid, nll, 0.0)  # a where, not a product: NaN * 0 would still be NaN
    if per_token:
        return nll
    return nll.sum() / valid.sum().astype(jnp.float32)
