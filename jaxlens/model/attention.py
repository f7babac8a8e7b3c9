"""Multi-head / grouped-query attention with TransformerLens's hook points.

Hooks: hook_q_input/k_input/v_input (only computed if asked: the residual repeated per head), attn.hook_q/k/v
(k and v at n_key_value_heads), attn.q_norm/k_norm.hook_scale/hook_normalized (`use_qk_norm`; per head, or
over all heads with `qk_norm_over_heads`),
attn.hook_rot_q/rot_k (rotary models), attn.hook_attn_scores (-inf where
masked, as TL), attn.hook_pattern, attn.hook_z, attn.hook_result (only computed if asked).

Under grouped-query attention key/value head j serves query heads j*r .. j*r + r - 1
(r = n_heads / n_key_value_heads), as in TransformerLens and Hugging Face.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxlens.config import Config
from jaxlens.errors import InterventionError
from jaxlens.model.hooks import Hooks
from jaxlens.model.norms import norm
from jaxlens.model.rotary import apply_rotary

# einsum letters: b=batch p=pos q=query_pos k=key_pos d=d_model h=head_index e=d_head

_GLOBAL_WINDOW = 2**30  # the window `runner.windows` gives a layer without one (global attention)


class KVState(NamedTuple):
    """Keys and values of earlier positions of one layer, for incremental decoding (zeros beyond `length`)."""

    k: Float[Array, "batch max_pos kv_head_index d_head"]
    v: Float[Array, "batch max_pos kv_head_index d_head"]


class Context(NamedTuple):
    """Per-call data the attention needs besides weights: positions, masks, and the layer's window."""

    positions: Int[Array, "batch pos"]  # absolute positions of the queries (rotary, windows)
    key_valid: Bool[Array, "batch key_pos"] | None  # padding mask over keys, None for none
    offset: Int[Array, ""] | int  # absolute position of the first query (0 without a KV cache)


def attention_sublayer(
    p: dict,
    ln_p: dict,
    resid: Float[Array, "batch pos d_model"],
    cfg: Config,
    hooks: Hooks,
    ctx: Context,
    window: Int[Array, ""],
    kv: KVState | None = None,
) -> tuple[Float[Array, "batch pos d_model"], KVState | None]:
    """ln1 then attention: the block's attention output (before any post-norm) and the updated KV state."""
    x = norm(ln_p, resid, cfg, hooks, "ln1")  # ln1's hooks always see [batch pos d_model], as in TL 4.3
    split = ("hook_q_input", "hook_k_input", "hook_v_input")
    if any(hooks.wants(n) for n in split):  # the residual forked per head, before ln1 (TL's split inputs)
        b, s, d = resid.shape
        fork = lambda name, n: hooks(name, jnp.broadcast_to(resid[:, :, None], (b, s, n, d)))
        ins = (fork(split[0], cfg.n_heads), fork(split[1], cfg.n_key_value_heads),
               fork(split[2], cfg.n_key_value_heads))
    if any(hooks.intervenes(n) for n in split):  # patched forks: each goes through ln1 on its own
        if hooks.intervenes("ln1.hook_scale") or hooks.intervenes("ln1.hook_normalized"):
            raise InterventionError(
                f"{hooks.prefix}ln1 and the split q/k/v inputs are both intervened on in one block: with "
                "patched split inputs, q/k/v read their own per-head ln1, not the shared one. "
                "Patch one or the other.")
        quiet = Hooks()
        q, k, v = (jnp.einsum("bphd,hde->bphe", norm(ln_p, i, cfg, quiet, "ln1"), p[w])
                   for i, w in zip(ins, ("W_Q", "W_K", "W_V"), strict=True))
    else:  # recording the split inputs changes nothing else
        q, k, v = (_project(x, p[w]) for w in ("W_Q", "W_K", "W_V"))
    q = hooks("attn.hook_q", q + p["b_Q"])
    k = hooks("attn.hook_k", k + p["b_K"])
    v = hooks("attn.hook_v", v + p["b_V"])
    if cfg.use_qk_norm:  # RMSNorm before rotary: per head (Qwen3, Gemma 3) or over all heads (OLMo 2)
        n = 2 if cfg.qk_norm_over_heads else 1
        q = norm(p["q_norm"], q, cfg, hooks, "attn.q_norm", n)
        k = norm(p["k_norm"], k, cfg, hooks, "attn.k_norm", n)
    if cfg.positional_embedding_type == "rotary":
        local = window < _GLOBAL_WINDOW
        q = hooks("attn.hook_rot_q", apply_rotary(q, ctx.positions, cfg, local))
        k = hooks("attn.hook_rot_k", apply_rotary(k, ctx.positions, cfg, local))
    key_valid = ctx.key_valid
    if kv is not None:
        k_all = jax.lax.dynamic_update_slice_in_dim(kv.k, k.astype(kv.k.dtype), ctx.offset, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(kv.v, v.astype(kv.v.dtype), ctx.offset, axis=1)
        kv = KVState(k_all, v_all)
        k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
    z = _attend(p, q, k, v, cfg, hooks, ctx, window, key_valid)
    if hooks.wants("attn.hook_result"):
        result = hooks("attn.hook_result", jnp.einsum("bqhe,hed->bqhd", z, p["W_O"]))
        out = result.sum(2) + p["b_O"]
    else:
        out = jnp.einsum("bqhe,hed->bqd", z, p["W_O"]) + p["b_O"]
    return out, kv


def _project(x: Float[Array, "batch pos d_model"],
             W: Float[Array, "head_index d_model d_head"]) -> Float[Array, "batch pos head_index d_head"]:
    """x W per head. For few tokens (batch * pos < d_head) as a product batched over heads, which reads W as
    stored; XLA's CPU dot would otherwise copy W transposed to [d_model, head_index d_head] on every call,
    which costs more than the product itself."""
    b, s, d = x.shape
    h, _, e = W.shape
    if b * s >= e:
        return jnp.einsum("bpd,hde->bphe", x, W)
    xs = jnp.broadcast_to(x.reshape(1, b * s, d), (h, b * s, d))
    out = jnp.einsum("hnd,hde->hne", xs, W)  # n = (b p)
    return out.reshape(h, b, s, e).transpose(1, 2, 0, 3)


def _attend(p, q, k, v, cfg: Config, hooks: Hooks, ctx: Context, window, key_valid):
    """Scores, mask, pattern and z."""
    r = cfg.n_heads // cfg.n_key_value_heads
    if r > 1:
        k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k).astype(jnp.float32) / cfg.attn_scale
    if cfg.attn_scores_soft_cap is not None:
        scores = cfg.attn_scores_soft_cap * jnp.tanh(scores / cfg.attn_scores_soft_cap)
    mask = _mask(cfg, ctx, window, q.shape[1], k.shape[1], key_valid)
    scores = hooks("attn.hook_attn_scores", jnp.where(mask, scores, -jnp.inf).astype(q.dtype))
    s32 = scores.astype(jnp.float32)
    s32 = jnp.where(mask, s32, -jnp.inf)
    top = jnp.max(s32, axis=-1, keepdims=True)
    e = jnp.where(mask, jnp.exp(s32 - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    denom = e.sum(-1, keepdims=True)
    pattern = hooks("attn.hook_pattern", (e / jnp.where(denom > 0, denom, 1.0)).astype(q.dtype))
    return hooks("attn.hook_z", jnp.einsum("bhqk,bkhe->bqhe", pattern, v))


def _mask(cfg: Config, ctx: Context, window, n_q: int, n_k: int, key_valid) -> Bool[Array, "batch 1 q k"]:
    """True where query q may attend to key k: causal, within the layer's window, key not padding."""
    q_pos = ctx.offset + jnp.arange(n_q)[:, None]
    k_pos = jnp.arange(n_k)[None, :]
    if cfg.attention_dir == "causal":
        mask = (k_pos <= q_pos) & (q_pos - k_pos < window)
    else:
        mask = jnp.ones((n_q, n_k), bool)
    mask = mask[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return mask
