"""BERT's pieces (Devlin et al. 2019) with TransformerLens's `HookedEncoder` hooks: embedding, post-LN block, heads.

    resid = embed.ln(W_E[tokens] + W_pos[pos] + W_token_type[token_type_ids])          -> hook_full_embed
    block:  resid_mid = resid_pre + attn(resid_pre)                  (bidirectional, no norm before attention)
            normalized_resid_mid = ln1(resid_mid)
            resid_post = normalized_resid_mid + mlp(normalized_resid_mid)
            normalized_resid_post = ln2(resid_post)                 -> the next block's hook_resid_pre
    mlm_head: ln(act(x W + b)) then the unembedding (BertForMaskedLM); pooler: tanh(x[:, 0] W + b) (BertModel).

Unlike a decoder block the norms come *after* each sublayer (post-LN), so `fold_ln` does not apply, as in TL.
The attention and the MLP are the decoder's own functions (`attention.attention_sublayer`, `mlp.mlp`); the block
only arranges them. Hook names and axes are tabled here; `jaxlens.encoder` parses names against them.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxlens.config import Config
from jaxlens.model.attention import Context, attention_sublayer
from jaxlens.model.hooks import Hooks
from jaxlens.model.mlp import ACTIVATIONS, mlp
from jaxlens.model.norms import norm
from jaxlens.shapes import Params

# einsum letters: b=batch p=pos d=d_model v=d_vocab

#: Hook points that TL switches on with flags (split q/k/v inputs, per-head results, mlp_in): recorded only if named.
OPTIONAL = frozenset({"hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result", "hook_mlp_in"})

#: Output heads an encoder's params may carry, and the hook points each adds.
HEAD_HOOKS = {
    "mlm_head": {"mlm_head.ln.hook_scale": "batch pos 1", "mlm_head.ln.hook_normalized": "batch pos d_model"},
    "pooler": {"pooler.hook_pooler_out": "batch d_model"},
}


def block_hook_axes(cfg: Config) -> dict[str, str]:
    """Hooks of one BERT block in forward order: relative name -> axis string (TL's `BertBlock`)."""
    return {
        "hook_resid_pre": "batch pos d_model",
        "hook_q_input": "batch pos head_index d_model",
        "hook_k_input": "batch pos head_index d_model",
        "hook_v_input": "batch pos head_index d_model",
        "attn.hook_q": "batch pos head_index d_head",
        "attn.hook_k": "batch pos head_index d_head",
        "attn.hook_v": "batch pos head_index d_head",
        "attn.hook_attn_scores": "batch head_index query_pos key_pos",
        "attn.hook_pattern": "batch head_index query_pos key_pos",
        "attn.hook_z": "batch pos head_index d_head",
        "attn.hook_result": "batch pos head_index d_model",
        "hook_attn_out": "batch pos d_model",
        "hook_resid_mid": "batch pos d_model",
        "hook_mlp_in": "batch pos d_model",
        "ln1.hook_scale": "batch pos 1",
        "ln1.hook_normalized": "batch pos d_model",
        "mlp.hook_pre": "batch pos d_mlp",
        "mlp.hook_post": "batch pos d_mlp",
        "hook_mlp_out": "batch pos d_model",
        "hook_resid_post": "batch pos d_model",
        "ln2.hook_scale": "batch pos 1",
        "ln2.hook_normalized": "batch pos d_model",
        "hook_normalized_resid_post": "batch pos d_model",
    }


def embed_hook_axes() -> dict[str, str]:
    """Hooks before the blocks (TL's `BertEmbed` and `HookedEncoder.hook_full_embed`), in forward order."""
    return {
        "embed.hook_embed": "batch pos d_model",
        "embed.hook_pos_embed": "batch pos d_model",
        "embed.hook_token_type_embed": "batch pos d_model",
        "embed.ln.hook_scale": "batch pos 1",
        "embed.ln.hook_normalized": "batch pos d_model",
        "hook_full_embed": "batch pos d_model",
    }


def heads_of(params: Params) -> tuple[str, ...]:
    """The output heads present in `params` ("mlm_head", "pooler"), in a fixed order."""
    return tuple(h for h in HEAD_HOOKS if h in params)


def encoder_param_shapes(cfg: Config, n_token_types: int, heads: tuple[str, ...] = ()) -> dict:
    """Every encoder weight's (axis string, shape): decoder block weights plus token types, embed.ln and heads.

    mlm_head.W and pooler.W are [d_model_in, d_model_out] (applied as `x @ W`, as every other jaxlens weight).
    """
    from jaxlens.params import param_shapes

    base = param_shapes(cfg.replace(normalization_type="LN"))
    D, V = cfg.d_model, cfg.d_vocab
    ln = {"w": ("d_model", (D,)), "b": ("d_model", (D,))}
    out = {
        "embed": {"W_E": base["embed"]["W_E"], "ln": ln},
        "pos_embed": base["pos_embed"],
        "token_type_embed": {"W_token_type": ("token_type d_model", (n_token_types, D))},
        "blocks": base["blocks"],
    }
    if "mlm_head" in heads:
        out["mlm_head"] = {"W": ("d_model d_model", (D, D)), "b": ("d_model", (D,)), "ln": dict(ln)}
        out["unembed"] = base["unembed"]
    if "pooler" in heads:
        out["pooler"] = {"W": ("d_model d_model", (D, D)), "b": ("d_model", (D,))}
    return out


def embed(
    params: Params,
    cfg: Config,
    tokens: Int[Array, "batch pos"],
    token_type_ids: Int[Array, "batch pos"],
    hooks: Hooks,
) -> Float[Array, "batch pos d_model"]:
    """Token + position + token-type embeddings, layer-normed (positions 0.. for every row, as BERT)."""
    positions = jnp.arange(tokens.shape[1])
    e = hooks("embed.hook_embed", params["embed"]["W_E"][tokens])
    pos = hooks("embed.hook_pos_embed", jnp.broadcast_to(params["pos_embed"]["W_pos"][positions], e.shape))
    tt = hooks("embed.hook_token_type_embed", params["token_type_embed"]["W_token_type"][token_type_ids])
    return hooks("hook_full_embed", norm(params["embed"]["ln"], e + pos + tt, cfg, hooks, "embed.ln"))


def encoder_block(
    p: dict,
    resid_pre: Float[Array, "batch pos d_model"],
    cfg: Config,
    hooks: Hooks,
    ctx: Context,
) -> Float[Array, "batch pos d_model"]:
    """One post-LN block; returns hook_normalized_resid_post (the next block's input)."""
    resid_pre = hooks("hook_resid_pre", resid_pre)
    no_pre_norm = cfg.replace(normalization_type=None)  # attention reads the residual directly
    no_window = jnp.asarray(2**30, jnp.int32)  # bidirectional: the window is never consulted
    attn_out, _ = attention_sublayer(p["attn"], {}, resid_pre, no_pre_norm, hooks, ctx, no_window)
    attn_out = hooks("hook_attn_out", attn_out)
    resid_mid = hooks("hook_resid_mid", resid_pre + attn_out)
    normalized_mid = norm(p["ln1"], hooks("hook_mlp_in", resid_mid), cfg, hooks, "ln1")
    mlp_out = hooks("hook_mlp_out", mlp(p["mlp"], normalized_mid, cfg, hooks))
    resid_post = hooks("hook_resid_post", normalized_mid + mlp_out)
    return hooks("hook_normalized_resid_post", norm(p["ln2"], resid_post, cfg, hooks, "ln2"))


def mlm_head(
    params: Params, cfg: Config, x: Float[Array, "batch pos d_model"], hooks: Hooks
) -> Float[Array, "batch pos d_vocab"]:
    """Masked-language-model logits: ln(act(x W + b)) W_U + b_U (BERT's `cls.predictions`)."""
    h = params["mlm_head"]
    y = ACTIVATIONS[cfg.act_fn](jnp.einsum("bpd,de->bpe", x, h["W"]) + h["b"])
    y = norm(h["ln"], y, cfg, hooks, "mlm_head.ln")
    return jnp.einsum("bpd,dv->bpv", y, params["unembed"]["W_U"]) + params["unembed"]["b_U"]


def pooler(params: Params, x: Float[Array, "batch pos d_model"], hooks: Hooks) -> Float[Array, "batch d_model"]:
    """BERT's pooled sentence vector: tanh of a dense map of the first ([CLS]) position."""
    p = params["pooler"]
    return hooks("pooler.hook_pooler_out", jax.nn.tanh(jnp.einsum("bd,de->be", x[:, 0], p["W"]) + p["b"]))
