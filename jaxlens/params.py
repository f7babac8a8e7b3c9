"""Params: a plain nested dict with TransformerLens weight names; per-layer weights stacked on `layer`.

`param_shapes(cfg)` is the single table of every weight's axes and shape. It drives `init_params`, the
converters' shape checks and `check_params`. Under grouped-query attention `W_K`, `W_V`, `b_K`, `b_V` are
stored at n_key_value_heads (TransformerLens's `_W_K`); `HookedTransformer.W_K` repeats them to n_heads as TL
does.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.config import Config
from jaxlens.errors import CheckpointError
from jaxlens.model.norms import norm_kind
from jaxlens.shapes import Params


def _norm_shapes(cfg: Config, prefix: tuple[int, ...], axes: str, kind: str | None) -> dict:
    d = (cfg.d_model,)
    if kind == "LN":
        return {"w": (f"{axes}d_model", prefix + d), "b": (f"{axes}d_model", prefix + d)}
    if kind == "RMS":
        return {"w": (f"{axes}d_model", prefix + d)}
    return {}


def param_shapes(cfg: Config) -> dict[str, Any]:
    """Every weight's (axis string, shape), nested as the params pytree is."""
    L, H, G, D, E, M, V = (
        cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head, cfg.d_mlp, cfg.d_vocab,
    )
    attn = {
        "W_Q": ("layer head_index d_model d_head", (L, H, D, E)),
        "W_K": ("layer kv_head_index d_model d_head", (L, G, D, E)),
        "W_V": ("layer kv_head_index d_model d_head", (L, G, D, E)),
        "W_O": ("layer head_index d_head d_model", (L, H, E, D)),
        "b_Q": ("layer head_index d_head", (L, H, E)),
        "b_K": ("layer kv_head_index d_head", (L, G, E)),
        "b_V": ("layer kv_head_index d_head", (L, G, E)),
        "b_O": ("layer d_model", (L, D)),
    }
    mlp = {
        "W_in": ("layer d_model d_mlp", (L, D, M)),
        "b_in": ("layer d_mlp", (L, M)),
        "W_out": ("layer d_mlp d_model", (L, M, D)),
        "b_out": ("layer d_model", (L, D)),
    }
    if cfg.gated_mlp:
        mlp["W_gate"] = ("layer d_model d_mlp", (L, D, M))
    if cfg.num_experts:  # TL's MoE: W_gate is the router; every expert is a gated MLP without biases
        X = cfg.num_experts
        mlp = {"W_gate": ("layer d_model expert", (L, D, X)), "experts": {
            "W_in": ("layer expert d_model d_mlp", (L, X, D, M)),
            "W_gate": ("layer expert d_model d_mlp", (L, X, D, M)),
            "W_out": ("layer expert d_mlp d_model", (L, X, M, D))}}
        if cfg.shared_expert_d_mlp:
            S = cfg.shared_expert_d_mlp
            mlp["W_shared_gate"] = ("layer d_model", (L, D))
            mlp["shared_expert"] = {"W_in": ("layer d_model d_shared", (L, D, S)),
                                    "W_gate": ("layer d_model d_shared", (L, D, S)),
                                    "W_out": ("layer d_shared d_model", (L, S, D))}
    if cfg.use_qk_norm and cfg.qk_norm_over_heads:  # OLMo 2: one norm over all heads of q (of k)
        attn["q_norm"] = {"w": ("layer head_index d_head", (L, H, E))}
        attn["k_norm"] = {"w": ("layer kv_head_index d_head", (L, G, E))}
    elif cfg.use_qk_norm:
        attn["q_norm"] = {"w": ("layer d_head", (L, E))}
        attn["k_norm"] = {"w": ("layer d_head", (L, E))}
    blocks: dict[str, Any] = {"attn": attn, "mlp": mlp}
    norms = ["ln1", "ln2"]
    if cfg.use_normalization_before_and_after:
        norms += ["ln1_post", "ln2_post"]
    for name in norms:
        shapes = _norm_shapes(cfg, (L,), "layer ", norm_kind(cfg, name))
        if shapes:
            blocks[name] = shapes
    out: dict[str, Any] = {"embed": {"W_E": ("d_vocab d_model", (V, D))}}
    if cfg.positional_embedding_type == "standard":
        out["pos_embed"] = {"W_pos": ("n_ctx d_model", (cfg.n_ctx, D))}
    out["blocks"] = blocks
    final = _norm_shapes(cfg, (), "", cfg.normalization_type)
    if final:
        out["ln_final"] = final
    out["unembed"] = {"W_U": ("d_model d_vocab", (D, V)), "b_U": ("d_vocab", (V,))}
    return out


def _is_entry(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


def init_params(cfg: Config, key: jax.Array, *, scale: float = 0.02, dtype=jnp.float32) -> Params:
    """Random params (normal weights, small random biases, gains near 1) for tests and toy models."""
    table = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(table, is_leaf=_is_entry)
    with_path = jax.tree_util.tree_flatten_with_path(table, is_leaf=_is_entry)[0]
    paths = [jax.tree_util.keystr(p) for p, _ in with_path]
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, (_, shape), path in zip(keys, leaves, paths, strict=True):
        x = scale * jax.random.normal(k, shape, jnp.float32)
        if path.endswith("['w']"):
            x = 1.0 + x
        out.append(x.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def check_params(params: Params, cfg: Config) -> None:
    """Raise CheckpointError unless `params` has exactly the names and shapes that `cfg` requires."""
    want = {jax.tree_util.keystr(p): v[1] for p, v in
            jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_entry)[0]}
    have = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in
            jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f"{k}: expected {want[k]}, found {have[k]}"
             for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if problems:
        raise CheckpointError(
            "Params do not match the config: " + ", ".join(problems)
            + ". Check that the config was built from the same checkpoint "
            "(see `jaxlens.params.param_shapes`)."
        )


def cast_params(params: Params, dtype) -> Params:
    """Every floating weight cast to `dtype` (e.g. jnp.bfloat16)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)


def get_layer(params: Params, layer: int) -> Params:
    """The block weights of one layer (the `layer` axis indexed away)."""
    return jax.tree_util.tree_map(lambda x: x[layer], params["blocks"])
