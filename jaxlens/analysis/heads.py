"""Head detectors: score every attention head by how well its pattern matches a detection pattern.

A previous-token head attends from each token to the one before; a duplicate-token head to earlier copies of
the current token; an induction head to the token after an earlier copy of the current token
(Olsson et al. 2022, "In-context Learning and Induction Heads"). Scores follow TransformerLens's
`detect_head`, computed for all layers and heads at once from the stacked patterns:

    "mul": sum(pattern * detection) / sum(pattern)   (the share of attention on the detected pairs)
    "abs": 1 - round(sum(|pattern - detection|) / seq_len, 3)

    tokens = repeated_random_tokens(key, cfg.d_vocab, seq_len=20, batch=4, bos=bos_id)
    scores = detect_head(model, tokens, "induction_head")      # [layer head_index], -1 where not asked
"""

from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxlens.errors import InputError
from jaxlens.shapes import AnyArray, PRNGKey

# einsum letters: l=layer b=batch h=head_index q=query_pos k=key_pos

HeadName = Literal["previous_token_head", "duplicate_token_head", "induction_head"]
HEAD_NAMES = ("previous_token_head", "duplicate_token_head", "induction_head")
ErrorMeasure = Literal["mul", "abs"]


def previous_token_pattern(tokens: Int[Array, "*batch pos"]) -> Float[Array, "*batch pos pos"]:
    """1 where the query attends to the key just before it."""
    n = tokens.shape[-1]
    return jnp.broadcast_to(jnp.eye(n, k=-1), tokens.shape + (n,)).astype(jnp.float32)


def duplicate_token_pattern(tokens: Int[Array, "*batch pos"]) -> Float[Array, "*batch pos pos"]:
    """1 where the key is an earlier occurrence of the query's token."""
    n = tokens.shape[-1]
    same = tokens[..., :, None] == tokens[..., None, :]
    return (same & jnp.tril(jnp.ones((n, n), bool), k=-1)).astype(jnp.float32)


def induction_pattern(tokens: Int[Array, "*batch pos"]) -> Float[Array, "*batch pos pos"]:
    """1 where the key comes just after an earlier occurrence of the query's token (the duplicate pattern
    shifted one key to the right, first column zero, lower triangle)."""
    dup = duplicate_token_pattern(tokens)
    shifted = jnp.concatenate([jnp.zeros_like(dup[..., :1]), dup[..., :-1]], axis=-1)
    return jnp.tril(shifted)


def _tl_pattern(fn, tokens) -> Float[Array, "pos pos"]:
    t = jnp.asarray(tokens)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1:
        raise InputError("TransformerLens's detection patterns take one prompt ([1, pos] or [pos]); found "
                         f"tokens of shape {t.shape}. For a batch use jaxlens.analysis.{fn.__name__} "
                         "([batch pos pos]).")
    return fn(t)


def get_previous_token_head_detection_pattern(tokens: Int[AnyArray, "*one pos"]) -> Float[Array, "pos pos"]:
    """TL's name and shape: `previous_token_pattern` of one prompt ([1, pos] or [pos]) as [pos, pos]."""
    return _tl_pattern(previous_token_pattern, tokens)


def get_duplicate_token_head_detection_pattern(tokens: Int[AnyArray, "*one pos"]) -> Float[Array, "pos pos"]:
    """TL's name and shape: `duplicate_token_pattern` of one prompt ([1, pos] or [pos]) as [pos, pos]."""
    return _tl_pattern(duplicate_token_pattern, tokens)


def get_induction_head_detection_pattern(tokens: Int[AnyArray, "*one pos"]) -> Float[Array, "pos pos"]:
    """TL's name and shape: `induction_pattern` of one prompt ([1, pos] or [pos]) as [pos, pos]."""
    return _tl_pattern(induction_pattern, tokens)


PATTERNS = {"previous_token_head": previous_token_pattern, "duplicate_token_head": duplicate_token_pattern,
            "induction_head": induction_pattern}


def head_scores(
    patterns: Float[Array, "layer batch head_index query_pos key_pos"],
    detection_pattern: Float[Array, "*batch query_pos key_pos"],
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
) -> Float[Array, "layer head_index"]:
    """Score every head against a detection pattern (one per batch entry, or one for all); mean over batch.

    Args:
        patterns: attention patterns stacked over layers (`cache["blocks.attn.hook_pattern"]`).
        detection_pattern: [batch q k] or [q k], lower triangular.
        exclude_bos: ignore attention to position 0.
        exclude_current_token: ignore attention to the query's own position.
        error_measure: "mul" or "abs" (see the module docstring).
    """
    n = patterns.shape[-1]
    det = detection_pattern.astype(jnp.float32)
    det = det[None, :, None] if det.ndim == 3 else det[None, None, None]  # [1 b 1 q k] / [1 1 1 q k]
    keep = jnp.ones((n, n), bool)
    if exclude_bos:
        keep = keep.at[:, 0].set(False)
    if exclude_current_token:
        keep = keep & ~jnp.eye(n, dtype=bool)
    pat = patterns.astype(jnp.float32)
    if error_measure == "mul":
        pat = jnp.where(keep, pat, 0.0)
        per_seq = (pat * det).sum((-2, -1)) / pat.sum((-2, -1))
    elif error_measure == "abs":
        diff = jnp.where(keep, jnp.abs(pat - det), 0.0)
        per_seq = 1 - jnp.round(diff.sum((-2, -1)) / n, 3)
    else:
        raise InputError(f"error_measure must be 'mul' or 'abs'; found {error_measure!r}.")
    return per_seq.mean(1)  # [l b h] -> [l h]


def detect_head(
    model,
    seq: str | list[str] | Array | np.ndarray,
    detection_pattern: str | Array | np.ndarray,
    heads: Sequence[tuple[int, int]] | Mapping[int, Sequence[int]] | None = None,
    cache=None,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
) -> Float[Array, "layer head_index"]:
    """TransformerLens's `detect_head`: score every head (or the `heads` asked for; -1 elsewhere).

    Args:
        model: a HookedTransformer.
        seq: a prompt, a list of prompts (scored one by one and averaged, as TL does), or token ids
            [batch pos] / [pos] (scored together, averaged over the batch).
        detection_pattern: a name in HEAD_NAMES (built from each sequence's tokens) or a [pos pos] (or
            [batch pos pos]) lower-triangular array.
        heads: [(layer, head), ...] or {layer: [heads]}; None for all.
        cache: an ActivationCache of this very input, to skip the forward (one sequence or token batch only).
        exclude_bos, exclude_current_token, error_measure: see `head_scores`.

    Raises:
        InputError: an unknown pattern name or error measure, a sequence shorter than 2 tokens, a detection
            pattern of the wrong shape or not lower triangular, or a head index out of range.
    """
    cfg = model.cfg
    if error_measure not in ("mul", "abs"):
        raise InputError(f"error_measure must be 'mul' or 'abs'; found {error_measure!r}.")
    if isinstance(detection_pattern, str) and detection_pattern not in HEAD_NAMES:
        raise InputError(f"detection_pattern must be an array or one of {HEAD_NAMES}; "
                         f"found {detection_pattern!r}.")
    mask = _head_mask(cfg, heads)
    if isinstance(seq, list) and len(seq) > 1 and isinstance(seq[0], str):
        if cache is not None:
            raise InputError("A cache holds one input; pass a single prompt (or token batch) with cache=.")
        if not isinstance(detection_pattern, str):
            raise InputError("A detection pattern array fits one sequence length; "
                             "pass one prompt or token ids.")
        kw = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token,
                  error_measure=error_measure)
        scores = jnp.stack([detect_head(model, s, detection_pattern, None, **kw) for s in seq]).mean(0)
        return jnp.where(mask, scores, -1.0)
    tokens = model.to_tokens(seq) if isinstance(seq, (str, list)) else jnp.atleast_2d(jnp.asarray(seq))
    n = tokens.shape[-1]
    if not 1 < n <= cfg.n_ctx:
        raise InputError(f"The sequence must have 2 to n_ctx={cfg.n_ctx} tokens; found {n}.")
    det = PATTERNS[detection_pattern](tokens) if isinstance(detection_pattern, str) else _check_det(
        detection_pattern, tokens.shape)
    if cache is None:
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    pats = jnp.stack([cache["pattern", l] for l in range(cfg.n_layers)])
    if pats.ndim == 4:  # a cache without the batch axis
        pats = pats[:, None]
    scores = head_scores(pats, det, exclude_bos=exclude_bos, exclude_current_token=exclude_current_token,
                         error_measure=error_measure)
    return jnp.where(mask, scores, -1.0)


def repeated_random_tokens(
    key: PRNGKey, d_vocab: int, seq_len: int, batch: int = 1, bos: int | None = None, low: int = 0
) -> Int[Array, "batch pos"]:
    """Random tokens repeated twice ([bos] + r + r): the standard probe for induction heads.

    Args:
        key: PRNG key. d_vocab: ids are drawn from [low, d_vocab). seq_len: length of one half.
        batch: rows. bos: a token to prepend (None: none).
    """
    half = jax.random.randint(key, (batch, seq_len), low, d_vocab, dtype=jnp.int32)
    out = jnp.concatenate([half, half], axis=1)
    if bos is not None:
        out = jnp.concatenate([jnp.full((batch, 1), bos, jnp.int32), out], axis=1)
    return out


def _head_mask(cfg, heads) -> Array:
    if heads is None:
        return jnp.ones((cfg.n_layers, cfg.n_heads), bool)
    pairs = [(l, h) for l, hs in heads.items() for h in hs] if isinstance(heads, Mapping) else list(heads)
    mask = np.zeros((cfg.n_layers, cfg.n_heads), bool)
    for l, h in pairs:
        if not (0 <= l < cfg.n_layers and 0 <= h < cfg.n_heads):
            raise InputError(f"Head ({l}, {h}) is out of range: layers are 0..{cfg.n_layers - 1} and heads "
                             f"0..{cfg.n_heads - 1}.")
        mask[l, h] = True
    return jnp.asarray(mask)


def _check_det(det, tokens_shape) -> Array:
    det = jnp.asarray(det, jnp.float32)
    n = tokens_shape[-1]
    if det.shape[-2:] != (n, n) or det.ndim not in (2, 3):
        raise InputError(f"The detection pattern must be [pos pos] = ({n}, {n}) (or [batch pos pos]) for "
                         f"this sequence of {n} tokens; found shape {det.shape}.")
    if bool(jnp.any(jnp.triu(det, k=1) != 0)):
        raise InputError("The detection pattern must be lower triangular: a causal head cannot attend ahead.")
    return det


def top_heads(scores, k: int, by_abs: bool = False) -> list[tuple[int, int]]:
    """The k (layer, head) pairs with the highest scores (or absolute values), best first (ties: lower index).

    Args:
        scores: [layer head_index] per-head scores (`detect_head`, an induction score, a patching grid).
        k: how many. by_abs: rank by |score| (patching effects of either sign).

    Raises:
        InputError: k is not between 1 and the number of heads.
    """
    values = np.abs(np.asarray(scores)) if by_abs else np.asarray(scores)
    if not 0 < k <= values.size:
        raise InputError(f"top_k must be between 1 and the number of heads ({values.size}); found {k}.")
    flat = np.argsort(-values, axis=None, kind="stable")[:k]
    return [tuple(int(i) for i in np.unravel_index(f, values.shape)) for f in flat]
