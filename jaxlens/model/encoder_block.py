"""BERT's pieces (Devlin et al. 2019) with TransformerLens's `HookedEncoder` hooks: embedding, post-LN block,
heads.

    resid = embed.ln(W_E[tokens] + W_pos[pos] + W_token_type[token_type_ids])          -> hook_full_embed
    block:  resid_mid = resid_pre + attn(resid_pre)                  (bidirectional, no norm before attention)
            normalized_resid_mid = ln1(resid_mid)
            resid_post = normalized_resid_mid + mlp(normalized_resid_mid)
            normalized_resid_post = ln2(resid_post)                 -> the next block's hook_resid_pre
    mlm_head: ln(act(x W + b)) then the unembedding (BertForMaskedLM);
    pooler: tanh(x[:, 0] W + b) (BertModel).

Unlike a decoder block the norms come *after* each sublayer (post-LN), so `fold_ln` does not apply, as in TL.
The attention and the MLP are the decoder's own functions (`attention.attention_sublayer`, `mlp.mlp`); the
block only arranges them. Hook names and axes are in `jaxlens.hook_names.encoder_table`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxlens.config import Config
from jaxlens.hook_names import ENCODER_HEADS
from jaxlens.model.attention import Context, attention_sublayer
from jaxlens.model.hooks import Hooks
from jaxlens.model.mlp import ACTIVATIONS, mlp
from jaxlens.model.norms import norm
from jaxlens.shapes import Params

# einsum letters: b=batch p=pos d=d_model v=d_vocab

def heads_of(params: Params) -> tuple[str, ...]:
    """The output heads present in `params` ("mlm_head", "pooler"), in a fixed order."""
    return tuple(h for h in ENCODER_HEADS if h in params)


def encoder_param_shapes(cfg: Config, n_token_types: int, heads: tuple[str, ...] = ()) -> dict:
    """Every encoder weight's (axis string, shape): decoder block weights plus token types, embed.ln and
    heads.

    mlm_head.W and pooler.W are [d_model_in, d_model_out] (applied as `x @ W`, as every other jaxlens weight).
    """
    from jaxlens.params import param_shapes

    base = param_shapes(cfg.replace(normalization_type="LN"))
    D = cfg.d_model
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
    window: Int[Array, ""] | None = None,
    kv: None = None,
) -> tuple[Float[Array, "batch pos d_model"], None]:
    """One post-LN block; returns (hook_normalized_resid_post, the next block's input; None: no KV state).
    `window` and `kv` are the block runner's arguments, unused (attention is bidirectional, no decoding)."""
    resid_pre = hooks("hook_resid_pre", resid_pre)
    no_pre_norm = cfg.replace(normalization_type=None)  # attention reads the residual directly
    no_window = jnp.asarray(2**30, jnp.int32)  # bidirectional: the window is never consulted
    attn_out, _ = attention_sublayer(p["attn"], {}, resid_pre, no_pre_norm, hooks, ctx, no_window)
    attn_out = hooks("hook_attn_out", attn_out)
    resid_mid = hooks("hook_resid_mid", resid_pre + attn_out)
    normalized_mid = norm(p["ln1"], hooks("hook_mlp_in", resid_mid), cfg, hooks, "ln1")
    mlp_out = hooks("hook_mlp_out", mlp(p["mlp"], normalized_mid, cfg, hooks))
    resid_post = hooks("hook_resid_post", normalized_mid + mlp_out)
    return hooks("hook_normalized_resid_post", norm(p["ln2"], resid_post, cfg, hooks, "ln2")), None


def mlm_head(
    params: Params, cfg: Config, x: Float[Array, "batch pos d_model"], hooks: Hooks
) -> Float[Array, "batch pos d_vocab"]:
    """Masked-language-model logits: ln(act(x W + b)) W_U + b_U (BERT's `cls.predictions`)."""
    h = params["mlm_head"]
    y = ACTIVATIONS[cfg.act_fn](jnp.einsum("bpd,de->bpe", x, h["W"]) + h["b"])
    y = norm(h["ln"], y, cfg, hooks, "mlm_head.ln")
    return jnp.einsum("bpd,dv->bpv", y, params["unembed"]["W_U"]) + params["unembed"]["b_U"]


def pooler(params: Params, x: Float[Array, "batch pos d_model"],
           hooks: Hooks) -> Float[Array, "batch d_model"]:
    """BERT's pooled sentence vector: tanh of a dense map of the first ([CLS]) position."""
    p = params["pooler"]
    return hooks("pooler.hook_pooler_out", jax.nn.tanh(jnp.einsum("bd,de->be", x[:, 0], p["W"]) + p["b"]))
