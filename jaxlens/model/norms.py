"""LayerNorm and RMSNorm with TransformerLens's hooks (`hook_scale`, `hook_normalized`).

hook_normalized holds (x - mean) / scale (LN) or x / scale (RMS), before the weights, as in
TransformerLens 3.x.
LNPre / RMSPre: the weights were folded into the next linear map (`weight_processing.fold_ln`).
Statistics are computed in float32 and cast back.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxlens.config import Config
from jaxlens.model.hooks import Hooks


def norm(
    p: dict,
    x: Float[Array, "... d_model"],
    cfg: Config,
    hooks: Hooks,
    name: str,
    n_axes: int = 1,
) -> Float[Array, "... d_model"]:
    """Apply the model's normalisation `name` ("ln1", "ln2", "ln1_post", "ln2_post", "ln_final", or a
    query/key norm) over the last `n_axes` axes (2: a query/key norm over [head_index d_head] at once)."""
    kind = norm_kind(cfg, name)
    if kind is None:
        return x
    dtype = x.dtype

    # hooks see the model's dtype (as every other activation); math stays float32
    def hook(hook_name: str, v):
        return hooks(f"{name}.{hook_name}", v.astype(dtype)).astype(jnp.float32)

    axes = tuple(range(-n_axes, 0))
    h = x.astype(jnp.float32)
    if kind in ("LN", "LNPre"):
        h = h - h.mean(axes, keepdims=True)
    scale = hook("hook_scale", jnp.sqrt((h * h).mean(axes, keepdims=True) + cfg.eps))
    h = h / scale
    if kind == "LN":
        h = hook("hook_normalized", h) * p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32)
    elif kind == "RMS":
        h = hook("hook_normalized", h) * p["w"].astype(jnp.float32)
    else:
        h = hook("hook_normalized", h)
    return h.astype(dtype)


#: Per-head norms over d_head (`use_qk_norm`): always RMSNorm with weights, whatever fold_ln did to the rest.
QK_NORMS = ("attn.q_norm", "attn.k_norm")


def norm_kind(cfg: Config, name: str) -> str | None:
    """The normalisation type of norm `name`: post-norms (Gemma 2) keep their weights after fold_ln; ln1 and
    ln2 are absent (None) without `use_pre_norms` (OLMo 2)."""
    if name in QK_NORMS:
        return "RMS"
    if name in ("ln1", "ln2") and not cfg.use_pre_norms:
        return None
    kind = cfg.normalization_type
    if name.endswith("_post") and kind is not None:
        return kind.removesuffix("Pre")
    return kind
