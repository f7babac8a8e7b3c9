"""Weight processing with TransformerLens's semantics, as pure functions (cfg, params) -> (cfg, params).

- fold_ln: fold each norm's weight (and LN bias) into the linear maps that read it; LN -> LNPre, RMS -> RMSPre.
  With LN, the reading weights are also centred over d_model (the normalised input has zero mean).
- center_writing_weights: remove the mean over d_model of every weight writing to the residual stream (LN only:
  the next LN removes it anyway).
- center_unembed: remove the mean over d_vocab of W_U and b_U (log-probs unchanged, logits shift per position).
- fold_value_biases: move b_V into b_O (the pattern sums to 1, so b_V @ W_O is a constant per layer).

Each leaves the model's log-probs unchanged (to float error); see Elhage et al. 2021 and TL's
`loading_from_pretrained.md` for why these make the residual stream easier to read.
"""

import jax.numpy as jnp

from jaxlens.config import Config
from jaxlens.shapes import Params


def fold_ln(cfg: Config, params: Params) -> tuple[Config, Params]:
    """Fold ln1 into W_Q/W_K/W_V, ln2 into W_in (and W_gate), ln_final into W_U."""
    if cfg.normalization_type not in ("LN", "RMS"):
        return cfg, params
    is_ln = cfg.normalization_type == "LN"
    blocks = dict(params["blocks"])
    attn, mlp = dict(blocks["attn"]), dict(blocks["mlp"])
    ln1, ln2 = blocks.pop("ln1"), blocks.pop("ln2")
    for X in ("Q", "K", "V"):
        W = attn[f"W_{X}"]  # [layer head d_model d_head]
        if is_ln:
            attn[f"b_{X}"] = attn[f"b_{X}"] + jnp.einsum("lhde,ld->lhe", W, ln1["b"])
        W = W * ln1["w"][:, None, :, None]
        attn[f"W_{X}"] = W - W.mean(2, keepdims=True) if is_ln else W
    names = ["W_in", "W_gate"] if cfg.gated_mlp else ["W_in"]
    if is_ln:
        mlp["b_in"] = mlp["b_in"] + jnp.einsum("ldm,ld->lm", mlp["W_in"], ln2["b"])
    for n in names:
        W = mlp[n] * ln2["w"][:, :, None]
        mlp[n] = W - W.mean(1, keepdims=True) if is_ln else W
    blocks["attn"], blocks["mlp"] = attn, mlp
    out = {**params, "blocks": blocks}
    lnf = out.pop("ln_final")
    unembed = dict(params["unembed"])
    if is_ln:
        unembed["b_U"] = unembed["b_U"] + lnf["b"] @ unembed["W_U"]
    W_U = unembed["W_U"] * lnf["w"][:, None]
    unembed["W_U"] = W_U - W_U.mean(0, keepdims=True) if is_ln else W_U
    out["unembed"] = unembed
    return cfg.replace(normalization_type="LNPre" if is_ln else "RMSPre"), out


def center_writing_weights(cfg: Config, params: Params) -> tuple[Config, Params]:
    """Centre W_E, W_pos, W_O, b_O, W_out, b_out over d_model (a no-op unless the model uses LayerNorm)."""
    if cfg.normalization_type not in ("LN", "LNPre"):
        return cfg, params
    c = lambda x: x - x.mean(-1, keepdims=True)
    out = {**params, "embed": {"W_E": c(params["embed"]["W_E"])}}
    if "pos_embed" in params:
        out["pos_embed"] = {"W_pos": c(params["pos_embed"]["W_pos"])}
    blocks = dict(params["blocks"])
    blocks["attn"] = {**blocks["attn"], "W_O": c(blocks["attn"]["W_O"]), "b_O": c(blocks["attn"]["b_O"])}
    blocks["mlp"] = {**blocks["mlp"], "W_out": c(blocks["mlp"]["W_out"]), "b_out": c(blocks["mlp"]["b_out"])}
    out["blocks"] = blocks
    return cfg, out


def center_unembed(cfg: Config, params: Params) -> tuple[Config, Params]:
    """Centre W_U and b_U over the vocabulary (softmax is invariant to a constant shift)."""
    u = params["unembed"]
    return cfg, {**params, "unembed": {"W_U": u["W_U"] - u["W_U"].mean(-1, keepdims=True),
                                       "b_U": u["b_U"] - u["b_U"].mean(-1, keepdims=True)}}


def fold_value_biases(cfg: Config, params: Params) -> tuple[Config, Params]:
    """b_O += sum over heads of b_V @ W_O; b_V = 0 (under GQA each kv bias serves its group of heads)."""
    attn = dict(params["blocks"]["attn"])
    b_V = jnp.repeat(attn["b_V"], cfg.n_heads // cfg.n_kv_heads, axis=1)  # [layer head d_head]
    attn["b_O"] = attn["b_O"] + jnp.einsum("lhe,lhed->ld", b_V, attn["W_O"])
    attn["b_V"] = jnp.zeros_like(attn["b_V"])
    return cfg, {**params, "blocks": {**params["blocks"], "attn": attn}}


def process_weights(
    cfg: Config,
    params: Params,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
) -> tuple[Config, Params]:
    """TransformerLens's `process_weights_` with its defaults, in its order.

    As in TransformerLens, center_unembed is skipped when the logits are softcapped (Gemma 2): tanh softcapping
    does not commute with subtracting a per-position constant, so centring would change the log-probs.
    """
    if cfg.output_logits_soft_cap is not None:
        center_unembed = False
    if fold_ln:
        cfg, params = _fold_ln(cfg, params)
    if center_writing_weights:
        cfg, params = _center_writing_weights(cfg, params)
    if center_unembed:
        cfg, params = _center_unembed(cfg, params)
    if fold_value_biases:
        cfg, params = _fold_value_biases(cfg, params)
    return cfg, params


_fold_ln, _center_writing_weights, _center_unembed, _fold_value_biases = (
    fold_ln, center_writing_weights, center_unembed, fold_value_biases)
