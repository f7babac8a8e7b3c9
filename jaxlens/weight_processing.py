"""Weight processing with TransformerLens's semantics, as pure functions (cfg, params) -> (cfg, params).

- fold_ln: fold each norm's weight (and LN bias) into the linear maps that read it; LN -> LNPre, RMS ->
  RMSPre. With LN, the reading weights are also centred over d_model (the normalised input has zero mean).
- center_writing_weights: remove the mean over d_model of every weight writing to the residual stream (LN
  only: the next LN removes it anyway).
- center_unembed: remove the mean over d_vocab of W_U and b_U (log-probs unchanged, logits shift per
  position).
- fold_value_biases: move b_V into b_O (the pattern sums to 1, so b_V @ W_O is a constant per layer).

Each leaves the model's log-probs unchanged (to float error); see Elhage et al. 2021 and TL's
`loading_from_pretrained.md` for why these make the residual stream easier to read.

`processed_config(cfg, **flags)` is the Config `process_weights(cfg, params, **flags)` returns, computed from
the config alone (no params, no tracing): loaders that transform params lazily call it for the new Config.
"""

import jax.numpy as jnp

from jaxlens.config import Config
from jaxlens.errors import ConfigError
from jaxlens.shapes import Params, ParamsLike, resolve_params


def processed_config(
    cfg: Config,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
) -> Config:
    """The Config of a model after `process_weights(cfg, params, **flags)`, from the config alone.

    Only fold_ln changes the architecture: "LN" -> "LNPre" and "RMS" -> "RMSPre" (the norms keep normalising,
    their weights now live in the maps that read them). The other steps rewrite weights only; they are
    arguments so that both functions take the same flags.
    """
    del center_writing_weights, center_unembed, fold_value_biases  # weights only
    if fold_ln and cfg.normalization_type in ("LN", "RMS"):
        return cfg.replace(normalization_type=f"{cfg.normalization_type}Pre")
    return cfg


def fold_ln(cfg: Config, params: ParamsLike) -> tuple[Config, Params]:
    """Fold ln1 into W_Q/W_K/W_V, ln2 into W_in (and W_gate), ln_final into W_U."""
    params, cfg = resolve_params(params, cfg)
    if cfg.normalization_type not in ("LN", "RMS"):
        return cfg, params
    is_ln = cfg.normalization_type == "LN"
    blocks = dict(params["blocks"])
    if cfg.use_pre_norms:  # OLMo 2 has no ln1 / ln2 (its post-norms stay): only ln_final folds
        blocks = _fold_pre_norms(cfg, blocks, is_ln)
    out = {**params, "blocks": blocks}
    lnf = out.pop("ln_final")
    unembed = dict(params["unembed"])
    if is_ln:
        unembed["b_U"] = unembed["b_U"] + lnf["b"] @ unembed["W_U"]
    W_U = unembed["W_U"] * lnf["w"][:, None]
    unembed["W_U"] = W_U - W_U.mean(0, keepdims=True) if is_ln else W_U
    out["unembed"] = unembed
    return processed_config(cfg, fold_ln=True), out


def _fold_pre_norms(cfg: Config, blocks: dict, is_ln: bool) -> dict:
    """`blocks` with ln1 folded into W_Q/W_K/W_V and ln2 into the MLP (or the router and experts)."""
    attn, mlp = dict(blocks["attn"]), dict(blocks["mlp"])
    ln1, ln2 = blocks.pop("ln1"), blocks.pop("ln2")
    for X in ("Q", "K", "V"):
        W = attn[f"W_{X}"]  # [layer head d_model d_head]
        if is_ln:
            attn[f"b_{X}"] = attn[f"b_{X}"] + jnp.einsum("lhde,ld->lhe", W, ln1["b"])
        W = W * ln1["w"][:, None, :, None]
        attn[f"W_{X}"] = W - W.mean(2, keepdims=True) if is_ln else W
    if cfg.num_experts:  # mixture of experts (RMSNorm families): ln2 scales the router and each expert input
        mlp["W_gate"] = mlp["W_gate"] * ln2["w"][:, :, None]  # the router [layer d_model expert]
        mlp["experts"] = {**mlp["experts"], **{n: mlp["experts"][n] * ln2["w"][:, None, :, None]
                                               for n in ("W_in", "W_gate")}}
        if cfg.shared_expert_d_mlp:
            mlp["W_shared_gate"] = mlp["W_shared_gate"] * ln2["w"]
            shared = mlp["shared_expert"]
            mlp["shared_expert"] = {**shared, **{n: shared[n] * ln2["w"][:, :, None]
                                                 for n in ("W_in", "W_gate")}}
    else:
        names = ["W_in", "W_gate"] if cfg.gated_mlp else ["W_in"]
        if is_ln and cfg.gated_mlp:  # ln2's bias reaches the gate, which has no bias to take it
            raise ConfigError(
                "fold_ln cannot fold a LayerNorm's bias into a gated MLP (StableLM): the gate branch has no "
                "bias to receive it. Load with `from_pretrained(..., fold_ln=False)` or "
                "`from_pretrained_no_processing`.")
        if is_ln:
            mlp["b_in"] = mlp["b_in"] + jnp.einsum("ldm,ld->lm", mlp["W_in"], ln2["b"])
        for n in names:
            W = mlp[n] * ln2["w"][:, :, None]
            mlp[n] = W - W.mean(1, keepdims=True) if is_ln else W
    blocks["attn"], blocks["mlp"] = attn, mlp
    return blocks


def center_writing_weights(cfg: Config, params: ParamsLike) -> tuple[Config, Params]:
    """Centre W_E, W_pos, W_O, b_O, W_out, b_out over d_model (a no-op unless the model uses LayerNorm)."""
    params, cfg = resolve_params(params, cfg)
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


def center_unembed(cfg: Config, params: ParamsLike) -> tuple[Config, Params]:
    """Centre W_U and b_U over the vocabulary (softmax is invariant to a constant shift)."""
    params, cfg = resolve_params(params, cfg)
    u = params["unembed"]
    return cfg, {**params, "unembed": {"W_U": u["W_U"] - u["W_U"].mean(-1, keepdims=True),
                                       "b_U": u["b_U"] - u["b_U"].mean(-1, keepdims=True)}}


def fold_value_biases(cfg: Config, params: ParamsLike) -> tuple[Config, Params]:
    """b_O += sum over heads of b_V @ W_O; b_V = 0 (under GQA each kv bias serves its group of heads)."""
    params, cfg = resolve_params(params, cfg)
    attn = dict(params["blocks"]["attn"])
    b_V = jnp.repeat(attn["b_V"], cfg.n_heads // cfg.n_key_value_heads, axis=1)  # [layer head d_head]
    attn["b_O"] = attn["b_O"] + jnp.einsum("lhe,lhed->ld", b_V, attn["W_O"])
    attn["b_V"] = jnp.zeros_like(attn["b_V"])
    return cfg, {**params, "blocks": {**params["blocks"], "attn": attn}}


def process_weights(
    cfg: Config,
    params: ParamsLike,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
) -> tuple[Config, Params]:
    """TransformerLens's `process_weights_` with its defaults, in its order.

    As in TransformerLens, center_unembed is skipped when the logits are softcapped (Gemma 2): tanh
    softcapping does not commute with subtracting a per-position constant, so centring would change the
    log-probs.
    """
    params, cfg = resolve_params(params, cfg)
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


def refactor_factored_attn_matrices(cfg: Config, params: ParamsLike) -> tuple[Config, Params]:
    """TransformerLens's `refactor_factored_attn_matrices`: the same QK and OV circuits, refactored.

    Only W_QK = W_Q W_K^T and W_OV = W_V W_O determine a head (Elhage et al. 2021); this picks factors
    with orthogonal rows / columns. OV: with W_OV = U S V^T, W_V = U S and W_O = V^T (a rotation, so z and
    the head's output have the same norm); b_V @ W_O moves into b_O and b_V = 0. QK: the biases join the
    weights as a (d_model + 1)-th input row, W_Q_eff W_K_eff^T is split evenly (`FactoredMatrix.make_even`),
    and the last row becomes the bias again. Logits are unchanged (to float error); singular vectors are
    defined up to sign, so single weights may differ from TransformerLens's by the sign of a d_head column.

    Raises:
        ConfigError: rotary positions (the QK circuit depends on the query and key positions; TL asserts the
            same), or grouped-query attention (refactored keys and values would differ per query head).
    """
    params, cfg = resolve_params(params, cfg)
    from jaxlens.analysis.factored_matrix import FactoredMatrix

    check_refactorable(cfg)
    attn = dict(params["blocks"]["attn"])
    sw = lambda x: jnp.swapaxes(x, -1, -2)
    q_eff = jnp.concatenate([attn["W_Q"], attn["b_Q"][:, :, None, :]], axis=2)  # [layer head d_model+1 e]
    k_eff = jnp.concatenate([attn["W_K"], attn["b_K"][:, :, None, :]], axis=2)
    q_even, k_even_t = FactoredMatrix(q_eff, sw(k_eff)).make_even().pair
    k_even = sw(k_even_t)
    attn.update(W_Q=q_even[:, :, :-1], b_Q=q_even[:, :, -1], W_K=k_even[:, :, :-1], b_K=k_even[:, :, -1])
    attn["b_O"] = attn["b_O"] + jnp.einsum("lhe,lhed->ld", attn["b_V"], attn["W_O"])
    attn["b_V"] = jnp.zeros_like(attn["b_V"])
    U, S, V = FactoredMatrix(attn["W_V"], attn["W_O"]).svd()
    attn["W_V"], attn["W_O"] = U * S[..., None, :], sw(V)
    return cfg, {**params, "blocks": {**params["blocks"], "attn": attn}}


def check_refactorable(cfg: Config) -> None:
    """Raise ConfigError unless `refactor_factored_attn_matrices` applies to this architecture."""
    from jaxlens.errors import ConfigError

    if cfg.positional_embedding_type == "rotary":
        raise ConfigError("refactor_factored_attn_matrices needs learned positions: with rotary embeddings "
                          "the QK circuit depends on the query and key positions. Load without it.")
    if cfg.n_key_value_heads != cfg.n_heads:
        raise ConfigError("refactor_factored_attn_matrices needs one key/value head per query head; this "
                          f"model shares {cfg.n_key_value_heads} among {cfg.n_heads} (grouped-query "
                          "attention).")
