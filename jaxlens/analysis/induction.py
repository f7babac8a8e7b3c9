"""Induction heads (Olsson et al. 2022, "In-context Learning and Induction Heads") found by their score on a
random token sequence repeated twice: a head's induction score is its mean attention from each token of the
second repeat to the token right after that token's previous occurrence.

    tokens = induction_tokens(model, seq_len=40, batch=4)          # [4 81]: BOS, r, r
    found = find_induction_heads(model, seq_len=40, batch=4, top_k=5)
    found.top_heads                                                # [(layer, head), ...], best first
    found.loss_first_repeat, found.loss_second_repeat              # the loss falls on the repeat

The tokens of one repeat are distinct, so each second-repeat token has exactly one earlier occurrence and the
score is `jaxlens.analysis.head_scores` against `induction_pattern` with the first repeat's rows left out.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxlens.analysis.heads import head_scores, induction_pattern, top_heads
from jaxlens.errors import InputError
from jaxlens.model.forward import forward, lm_cross_entropy_loss


@dataclasses.dataclass
class Induction:
    """What `find_induction_heads` found.

    Attributes:
        scores: [layer head_index] induction scores.
        top_heads: the top_k (layer, head) pairs, best first.
        tokens: [batch 2*seq_len+1] the repeated random tokens scored on.
        top_patterns: [top_k query_pos key_pos] the top heads' attention on the first sequence.
        loss_first_repeat, loss_second_repeat: mean next-token loss (nats) on each repeat.
    """

    scores: np.ndarray
    top_heads: list[tuple[int, int]]
    tokens: np.ndarray
    top_patterns: np.ndarray
    loss_first_repeat: float
    loss_second_repeat: float


def find_induction_heads(model, *, seq_len: int, batch: int, top_k: int, seed: int = 0) -> Induction:
    """Induction scores of every head on `batch` random sequences of `seq_len` tokens, each repeated twice.

    Args:
        model: a HookedTransformer (its tokenizer, if any, decides BOS and which ids are special).
        seq_len: tokens in each repeat. batch: sequences averaged over. top_k: heads to report.
        seed: seed of the random tokens (numpy).

    Raises:
        InputError: the repeated sequence does not fit the model's context, or top_k exceeds the head count.
    """
    cfg = model.cfg
    if 2 * seq_len + 1 > cfg.n_ctx:
        raise InputError(f"A repeated sequence of 2 x {seq_len} tokens (+ BOS) exceeds n_ctx={cfg.n_ctx}; "
                         "use a shorter induction_len.")
    tokens = induction_tokens(model, seq_len, batch, seed)
    patterns, loss = _patterns_and_loss(model.params, jnp.asarray(tokens), cfg=cfg)
    scores = np.asarray(induction_scores(patterns, jnp.asarray(tokens), seq_len))
    top = top_heads(scores, top_k)
    loss = np.asarray(loss)  # [batch pos-1]: position i predicts token i+1
    first, second = loss[:, 1:seq_len].mean(), loss[:, seq_len:].mean()
    top_patterns = np.stack([np.asarray(patterns[l, 0, h]) for l, h in top])
    return Induction(scores, top, tokens, top_patterns, float(first), float(second))


def induction_tokens(model, seq_len: int, batch: int, seed: int = 0) -> np.ndarray:
    """[batch 2*seq_len+1] int32: BOS, then `seq_len` distinct random non-special tokens, then the same again.

    BOS is the tokenizer's (`jaxlens.tokenizer.bos_id`), or 0 for a model without a tokenizer. Unlike
    `repeated_random_tokens`, the tokens of a repeat never repeat, so induction targets are unambiguous.
    """
    from jaxlens.tokenizer import bos_id

    tok = model.tokenizer
    n = min(model.cfg.d_vocab, len(tok)) if tok is not None else model.cfg.d_vocab
    special = set(getattr(tok, "all_special_ids", []) or [])
    choices = np.array([i for i in range(n) if i not in special])
    rng = np.random.default_rng(seed)
    half = np.stack([rng.choice(choices, size=seq_len, replace=False) for _ in range(batch)])
    bos = bos_id(tok) if tok is not None else 0
    return np.concatenate([np.full((batch, 1), bos), half, half], axis=1).astype(np.int32)


def induction_scores(patterns: Float[Array, "layer batch head_index query_pos key_pos"],
                     tokens: Int[Array, "batch pos"], seq_len: int) -> Float[Array, "layer head_index"]:
    """Mean attention from each second-repeat token (position i) to the token after its previous occurrence
    (position i - seq_len + 1), averaged over batch and positions. Positions: 0 BOS, 1..n first repeat,
    n+1..2n second.

    This is `head_scores` against the induction pattern with the first repeat's query rows left out: each kept
    row sums to one, so the "mul" score is the mean attention on the induction target.
    """
    second = (jnp.arange(patterns.shape[-2]) > seq_len)[:, None]  # query rows of the second repeat
    return head_scores(jnp.where(second, patterns, 0.0), induction_pattern(tokens))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _patterns_and_loss(params, tokens, *, cfg):
    logits, cache = forward(params, cfg, tokens, cache_names=("blocks.attn.hook_pattern",))
    return cache["blocks.attn.hook_pattern"], lm_cross_entropy_loss(logits, tokens, per_token=True)
