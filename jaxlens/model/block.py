"""One transformer block, sequential (GPT-2, Llama) or parallel (GPT-J, NeoX, Phi), with TL's hooks.

Sequential: resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid)).
Parallel:   resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre)) (no hook_resid_mid).
With `use_normalization_before_and_after` (Gemma 2) the sublayer outputs pass through ln1_post / ln2_post.
"""

from jaxtyping import Array, Float, Int

from jaxlens.config import Config
from jaxlens.model.attention import Context, KVState, attention_sublayer
from jaxlens.model.hooks import Hooks
from jaxlens.model.mlp import mlp
from jaxlens.model.norms import norm


def block(
    p: dict,
    resid_pre: Float[Array, "batch pos d_model"],
    cfg: Config,
    hooks: Hooks,
    ctx: Context,
    window: Int[Array, ""],
    kv: KVState | None = None,
) -> tuple[Float[Array, "batch pos d_model"], KVState | None]:
    """Run one block; returns resid_post and the updated KV state (None without one)."""
    resid_pre = hooks("hook_resid_pre", resid_pre)
    attn_out, kv = attention_sublayer(p["attn"], p.get("ln1", {}), resid_pre, cfg, hooks, ctx, window, kv)
    if cfg.use_normalization_before_and_after:
        attn_out = norm(p.get("ln1_post", {}), attn_out, cfg, hooks, "ln1_post")
    attn_out = hooks("hook_attn_out", attn_out)
    if cfg.parallel_attn_mlp:
        mlp_in = hooks("hook_mlp_in", resid_pre)
    else:
        resid_mid = hooks("hook_resid_mid", resid_pre + attn_out)
        mlp_in = hooks("hook_mlp_in", resid_mid)
    mlp_out = mlp(p["mlp"], norm(p.get("ln2", {}), mlp_in, cfg, hooks, "ln2"), cfg, hooks)
    if cfg.use_normalization_before_and_after:
        mlp_out = norm(p.get("ln2_post", {}), mlp_out, cfg, hooks, "ln2_post")
    mlp_out = hooks("hook_mlp_out", mlp_out)
    if cfg.parallel_attn_mlp:
        resid_post = resid_pre + attn_out + mlp_out
    else:
        resid_post = resid_mid + mlp_out
    return hooks("hook_resid_post", resid_post), kv
