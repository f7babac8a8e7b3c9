"""Weights of the gemma library (google-deepmind/gemma, `gm.nn.Transformer`, a linen module) <-> jaxlens.

    cfg, params = from_gemma(variables["params"], model.config)     # gm.nn.Gemma2_2B(), Gemma3_1B(), ...
    logits = jaxlens.forward(params, cfg, tokens)                   # == model.apply(variables, tokens).logits
    gemma_params, gemma_config = to_gemma(params, cfg)              # back into the library's layout

The gemma library's text transformer (Gemma 1, 2 and 3) is one block with optional parts, all of which
jaxlens's Config has: RMSNorms stored as `scale` and applied as `1 + scale` (eps 1e-6), the embedding
multiplied by sqrt(embed_dim) and tied to the unembedding, a tanh-approximate GELU-gated MLP, optional norms
after attention and MLP (`use_post_attn_norm` / `use_post_ffw_norm`), optional per-head QK-norm, tanh
softcapping of attention scores and logits, sliding-window (`LOCAL_SLIDING`) and `GLOBAL` layers with their
own rotary base and linear scale factor, rotary halves (`first_half, second_half = split(x, 2)`), queries
multiplied by `query_pre_attn_scalar()` (jaxlens divides by attn_scale = its inverse).

Parameter layout (`model.init(...)["params"]`): `embedder/input_embedding [vocab, d]`, per layer `layer_{i}/`
`pre_attention_norm/scale`, `attn/q_einsum/w [H, d, dh]` with `attn/kv_einsum/w [2, Hkv, d, dh]` (or
`attn/qkv_einsum/w [3, H, d, dh]` when Hkv == H), `attn/attn_vec_einsum/w [H, dh, d]`,
`attn/_query_norm/scale` and `attn/_key_norm/scale` (QK-norm), `post_attention_norm/scale`,
`pre_ffw_norm/scale`, `mlp/gating_einsum [2, d, hidden]` (or `[2, hidden, d]` with `transpose_gating_einsum`;
index 0 is the GELU'd gate), `mlp/linear [hidden, d]`, `post_ffw_norm/scale`; then `final_norm/scale`. A tree
that differs raises LayoutError naming the first mismatching path and both shapes.

The config is the library's `TransformerConfig` (its fields are read by name; enums by their `.name`) or a
mapping of the same fields with enum names as strings, so this module needs neither gemma nor Python 3.12.
Not handled (CheckpointError): the vision encoder (multimodal inputs), Gemma 3n / Gemma 4 (other modules).
"""

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.config import Config
from jaxlens.errors import CheckpointError, InputError
from jaxlens.flax._instrument import check_layout

# TransformerConfig's fields with their defaults (gemma 4.0.1 `gm/nn/_config.py`); None: required.
DEFAULTS: dict[str, Any] = {
    "num_embed": None, "embed_dim": None, "hidden_dim": None, "num_heads": None, "head_dim": None,
    "num_kv_heads": None, "final_logit_softcap": None, "use_post_attn_norm": None, "use_post_ffw_norm": None,
    "attention_types": None, "query_pre_attn_norm": "BY_ONE_OVER_SQRT_HEAD_DIM", "attn_logits_soft_cap": None,
    "sliding_window_size": None, "transpose_gating_einsum": False, "use_qk_norm": False,
    "local_base_frequency": 10_000, "global_base_frequency": 10_000, "local_scale_factor": 1.0,
    "global_scale_factor": 1.0, "vision_encoder": None,
}
REQUIRED = ("num_embed", "embed_dim", "hidden_dim", "num_heads", "head_dim", "num_kv_heads",
            "attention_types")
ATTENTION_TYPES = ("GLOBAL", "LOCAL_SLIDING")
# query_pre_attn_norm -> what gemma multiplies queries by, as a function of the config
QUERY_SCALARS = {
    "BY_ONE_OVER_SQRT_HEAD_DIM": lambda f: f["head_dim"] ** -0.5,
    "BY_EMBED_DIM_DIV_NUM_HEADS": lambda f: f["embed_dim"] // f["num_heads"],
    "BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS": lambda f: (f["embed_dim"] // f["num_heads"]) ** -0.5,
}
EPS = 1e-6  # gemma's RMSNorm


def gemma_fields(config: Any) -> dict[str, Any]:
    """The TransformerConfig fields of `config` (a gemma TransformerConfig or a mapping of its fields) as
    plain values: enums by name, attention_types as a tuple of names, missing optional fields at their
    defaults.

    Raises:
        CheckpointError: an unknown field, a required field missing, an unknown attention type or query
            normalisation, or a vision encoder (text-only transformers are converted).
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        raw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raise CheckpointError(f"gemma config: expected a gemma TransformerConfig or a mapping of its fields, "
                              f"found {type(config).__name__}.")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise CheckpointError(f"gemma config: unknown field(s) {unknown}; jaxlens converts the fields of "
                              f"gemma 4.0.1's TransformerConfig {sorted(DEFAULTS)}. A newer gemma may mean "
                              "a new architecture feature: add it to jaxlens/flax/gemma_lib.py.")
    missing = [k for k in REQUIRED if raw.get(k) is None]
    if missing:
        raise CheckpointError(f"gemma config: required field(s) {missing} missing or None.")
    name = lambda v: v.name if isinstance(v, enum.Enum) else v  # noqa: E731
    f = {**DEFAULTS, **{k: name(v) for k, v in raw.items()}}
    f["attention_types"] = tuple(name(a) for a in raw["attention_types"])
    for k in ("use_post_attn_norm", "use_post_ffw_norm", "use_qk_norm", "transpose_gating_einsum"):
        f[k] = bool(f[k])  # gemma's own configs use None for off (DummyGemma)
    bad = sorted(set(f["attention_types"]) - set(ATTENTION_TYPES))
    if bad:
        raise CheckpointError(f"gemma config: unknown attention type(s) {bad}; known "
                              f"{list(ATTENTION_TYPES)}.")
    if f["query_pre_attn_norm"] not in QUERY_SCALARS:
        raise CheckpointError(f"gemma config: unknown query_pre_attn_norm {f['query_pre_attn_norm']!r}; "
                              f"known {sorted(QUERY_SCALARS)}.")
    if f["vision_encoder"] is not None:
        raise CheckpointError("gemma config: a vision encoder is set; jaxlens converts the text transformer "
                              "only. Use the text-only config (e.g. `text_only=True`, vision_encoder=None).")
    return f


def config_from_gemma(config: Any, *, n_ctx: int = 8192) -> Config:
    """The jaxlens Config of a gemma library transformer.

    Args:
        config: gemma's TransformerConfig, or a mapping of its fields (see `gemma_fields`).
        n_ctx: the context length to allow (gemma's config has none; rotary positions have no table).

    Raises:
        CheckpointError: see `gemma_fields`; also post-attention and post-MLP norms of which only one is on
            (jaxlens has them as one switch) and sliding-window layers without a window size.
    """
    f = gemma_fields(config)
    post = (bool(f["use_post_attn_norm"]), bool(f["use_post_ffw_norm"]))
    if post[0] != post[1]:
        raise CheckpointError(f"gemma config: use_post_attn_norm={f['use_post_attn_norm']} but "
                              f"use_post_ffw_norm={f['use_post_ffw_norm']}; jaxlens has both norms or "
                              "neither (Config.use_normalization_before_and_after).")
    local = [t == "LOCAL_SLIDING" for t in f["attention_types"]]
    window = f["sliding_window_size"]
    if any(local) and not (isinstance(window, int) and window > 0):
        raise CheckpointError(f"gemma config: LOCAL_SLIDING layers need a positive int sliding_window_size, "
                              f"found {window!r}.")
    # imported here: jaxlens.flax is also imported where converters/ is not installed (reference envs)
    from jaxlens.converters._rope import default_freqs

    E = f["head_dim"]
    freqs = lambda base, scale: tuple((default_freqs(float(base), E) / np.float32(scale)).tolist())  # noqa: E731
    return Config(
        d_model=f["embed_dim"], n_layers=len(local), n_heads=f["num_heads"], d_head=E, d_mlp=f["hidden_dim"],
        d_vocab=f["num_embed"], n_ctx=n_ctx,
        n_key_value_heads=None if f["num_kv_heads"] == f["num_heads"] else f["num_kv_heads"],
        act_fn="gelu_pytorch_tanh", normalization_type="RMS", eps=EPS, positional_embedding_type="rotary",
        rotary_base=float(f["global_base_frequency"]),
        rotary_freqs=None if f["global_scale_factor"] == 1.0 else freqs(f["global_base_frequency"],
                                                                          f["global_scale_factor"]),
        rotary_local_freqs=freqs(f["local_base_frequency"], f["local_scale_factor"]) if any(local) else None,
        use_qk_norm=bool(f["use_qk_norm"]), gated_mlp=True,
        attn_scale=1.0 / QUERY_SCALARS[f["query_pre_attn_norm"]](f),
        window_sizes=tuple(window if x else None for x in local) if any(local) else None,
        attn_scores_soft_cap=f["attn_logits_soft_cap"], output_logits_soft_cap=f["final_logit_softcap"],
        use_normalization_before_and_after=post[0],
    )


def gemma_param_shapes(config: Any) -> dict[str, Any]:
    """The parameter tree gemma's Transformer builds for `config`, as zero-size-in-memory arrays of its
    shapes (for `check_layout`)."""
    f = gemma_fields(config)
    D, H, G, E, F = f["embed_dim"], f["num_heads"], f["num_kv_heads"], f["head_dim"], f["hidden_dim"]
    shape = lambda *s: np.broadcast_to(np.float32(0), s)  # noqa: E731
    norm = lambda n: {"scale": shape(n)}  # noqa: E731
    attn = {"attn_vec_einsum": {"w": shape(H, E, D)}}
    if G == H:
        attn["qkv_einsum"] = {"w": shape(3, H, D, E)}
    else:
        attn |= {"q_einsum": {"w": shape(H, D, E)}, "kv_einsum": {"w": shape(2, G, D, E)}}
    if f["use_qk_norm"]:
        attn |= {"_query_norm": norm(E), "_key_norm": norm(E)}
    block = {"pre_attention_norm": norm(D), "attn": attn, "pre_ffw_norm": norm(D), "mlp": {
        "gating_einsum": shape(2, F, D) if f["transpose_gating_einsum"] else shape(2, D, F),
        "linear": shape(F, D)}}
    if f["use_post_attn_norm"]:
        block["post_attention_norm"] = norm(D)
    if f["use_post_ffw_norm"]:
        block["post_ffw_norm"] = norm(D)
    layers = {f"layer_{i}": block for i in range(len(f["attention_types"]))}
    return {"embedder": {"input_embedding": shape(f["num_embed"], D)}, **layers, "final_norm": norm(D)}


def from_gemma(params: Mapping[str, Any], config: Any, *, n_ctx: int = 8192) -> tuple[Config, dict]:
    """jaxlens (Config, Params) of a gemma library transformer's parameters (float32 jax arrays).

    Args:
        params: gemma's parameter tree (`variables["params"]`; a `{"params": ...}` variables dict is accepted
            too), jax or numpy arrays, any float dtype (converted to float32).
        config: gemma's TransformerConfig or a mapping of its fields.
        n_ctx: see `config_from_gemma`.

    Raises:
        LayoutError: a tree whose paths or shapes differ from what `config` builds (first path and both shapes
            named).
        CheckpointError: a config jaxlens cannot express (see `config_from_gemma`).
    """
    cfg = config_from_gemma(config, n_ctx=n_ctx)
    if set(params) == {"params"}:
        params = params["params"]
    check_layout(gemma_param_shapes(config), params, "gemma parameter tree")
    arr = lambda x: np.asarray(x, np.float32)  # noqa: E731
    layers = [params[f"layer_{i}"] for i in range(cfg.n_layers)]
    stack = lambda get: np.stack([arr(get(p)) for p in layers])  # noqa: E731
    scale = lambda get: stack(lambda p: get(p)["scale"]) + np.float32(1.0)  # noqa: E731
    a = lambda p: p["attn"]  # noqa: E731
    if cfg.n_key_value_heads == cfg.n_heads:
        q, k, v = (stack(lambda p, i=i: a(p)["qkv_einsum"]["w"][i]) for i in range(3))
    else:
        q = stack(lambda p: a(p)["q_einsum"]["w"])
        k, v = (stack(lambda p, i=i: a(p)["kv_einsum"]["w"][i]) for i in range(2))
    f = gemma_fields(config)
    gating = stack(lambda p: p["mlp"]["gating_einsum"])  # [L, 2, d, hidden] or [L, 2, hidden, d]
    if f["transpose_gating_einsum"]:
        gating = np.swapaxes(gating, -1, -2)
    L, H, G, E, D, M = cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    zeros = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    attn = {"W_Q": q, "W_K": k, "W_V": v, "W_O": stack(lambda p: a(p)["attn_vec_einsum"]["w"]),
            "b_Q": zeros(L, H, E), "b_K": zeros(L, G, E), "b_V": zeros(L, G, E), "b_O": zeros(L, D)}
    if cfg.use_qk_norm:
        attn["q_norm"] = {"w": scale(lambda p: a(p)["_query_norm"])}
        attn["k_norm"] = {"w": scale(lambda p: a(p)["_key_norm"])}
    blocks = {"attn": attn, "mlp": {
        "W_gate": np.ascontiguousarray(gating[:, 0]), "W_in": np.ascontiguousarray(gating[:, 1]),
        "W_out": stack(lambda p: p["mlp"]["linear"]), "b_in": zeros(L, M), "b_out": zeros(L, D)},
        "ln1": {"w": scale(lambda p: p["pre_attention_norm"])},
        "ln2": {"w": scale(lambda p: p["pre_ffw_norm"])}}
    if cfg.use_normalization_before_and_after:
        blocks["ln1_post"] = {"w": scale(lambda p: p["post_attention_norm"])}
        blocks["ln2_post"] = {"w": scale(lambda p: p["post_ffw_norm"])}
    table = arr(params["embedder"]["input_embedding"])
    # gemma multiplies the looked-up rows by sqrt(embed_dim) in the table's dtype; folded into W_E here
    return cfg, jax.tree_util.tree_map(jnp.asarray, {
        "embed": {"W_E": table * np.sqrt(D).astype(np.float32)},
        "blocks": blocks,
        "ln_final": {"w": arr(params["final_norm"]["scale"]) + np.float32(1.0)},
        "unembed": {"W_U": np.ascontiguousarray(table.T), "b_U": zeros(cfg.d_vocab)},
    })



def to_gemma(params: Mapping[str, Any], cfg: Config, *, transpose_gating_einsum: bool = False
             ) -> tuple[dict, dict[str, Any]]:
    """A jaxlens model in the gemma library's layout: (parameter tree, TransformerConfig fields).

    Build the library's model with `gm.nn.Transformer(config=TransformerConfig(**fields))` after turning the
    enum names back into enums (`AttentionType[name]`, `QueryPreAttentionNormalisation[name]`).

    Args:
        params: jaxlens params of `cfg`.
        cfg: a Config gemma's transformer can express (see Raises).
        transpose_gating_einsum: write `mlp/gating_einsum` as [2, hidden, d] (Gemma 3's layout).

    Raises:
        CheckpointError: a Config gemma's block cannot express (each unsupported field named).
        InputError: params gemma's layout cannot hold: non-zero biases, or an unembedding not tied to the
            embedding (W_E != W_U.T * sqrt(d_model)).
    """
    fields = _gemma_config_of(cfg, transpose_gating_einsum)
    arr = lambda x: np.asarray(x, np.float32)  # noqa: E731
    b, attn, mlp = params["blocks"], params["blocks"]["attn"], params["blocks"]["mlp"]
    for name, x in [*((f"blocks.attn.{k}", attn[k]) for k in ("b_Q", "b_K", "b_V", "b_O")),
                    ("blocks.mlp.b_in", mlp["b_in"]), ("blocks.mlp.b_out", mlp["b_out"]),
                    ("unembed.b_U", params["unembed"]["b_U"])]:
        if np.any(arr(x)):
            raise InputError(f"to_gemma: {name} is non-zero (max |x| {np.abs(arr(x)).max():.3g}); gemma's "
                             "transformer has no biases. Fold or drop them first.")
    table = arr(params["unembed"]["W_U"]).T
    W_E = arr(params["embed"]["W_E"])
    scaled = table * np.sqrt(cfg.d_model).astype(np.float32)
    if not np.allclose(W_E, scaled, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(scaled).max()))):
        raise InputError(f"to_gemma: W_E is not the tied unembedding W_U.T * sqrt(d_model) (max difference "
                         f"{np.abs(W_E - scaled).max():.3g}); gemma ties them. Only tied models convert.")
    scale = lambda w, i: {"scale": arr(w)[i] - np.float32(1.0)}  # noqa: E731
    layers = {}
    for i in range(cfg.n_layers):
        q, k, v = (arr(attn[n])[i] for n in ("W_Q", "W_K", "W_V"))
        a = {"qkv_einsum": {"w": np.stack([q, k, v])}} if cfg.n_key_value_heads == cfg.n_heads else {
            "q_einsum": {"w": q}, "kv_einsum": {"w": np.stack([k, v])}}
        a["attn_vec_einsum"] = {"w": arr(attn["W_O"])[i]}
        if cfg.use_qk_norm:
            a |= {"_query_norm": scale(attn["q_norm"]["w"], i), "_key_norm": scale(attn["k_norm"]["w"], i)}
        gating = np.stack([arr(mlp["W_gate"])[i], arr(mlp["W_in"])[i]])
        layer = {"pre_attention_norm": scale(b["ln1"]["w"], i), "attn": a,
                 "pre_ffw_norm": scale(b["ln2"]["w"], i),
                 "mlp": {"gating_einsum": np.swapaxes(gating, -1, -2) if transpose_gating_einsum else gating,
                         "linear": arr(mlp["W_out"])[i]}}
        if cfg.use_normalization_before_and_after:
            layer["post_attention_norm"] = scale(b["ln1_post"]["w"], i)
            layer["post_ffw_norm"] = scale(b["ln2_post"]["w"], i)
        layers[f"layer_{i}"] = layer
    final = {"scale": arr(params["ln_final"]["w"]) - np.float32(1.0)}
    return {"embedder": {"input_embedding": table}, **layers, "final_norm": final}, fields


def _gemma_config_of(cfg: Config, transpose_gating_einsum: bool) -> dict[str, Any]:
    """TransformerConfig fields of `cfg`, raising CheckpointError for what gemma's block cannot express."""
    need = {
        "normalization_type": "RMS", "eps": EPS, "act_fn": "gelu_pytorch_tanh", "gated_mlp": True,
        "positional_embedding_type": "rotary", "rotary_dim": cfg.d_head, "rotary_adjacent_pairs": False,
        "rotary_scaling": None, "rotary_attention_factor": 1.0, "rotary_dynamic_ntk": None,
        "qk_norm_over_heads": False, "num_experts": None, "parallel_attn_mlp": False, "use_pre_norms": True,
        "attention_dir": "causal",
    }
    bad = {k: getattr(cfg, k) for k, v in need.items() if getattr(cfg, k) != v}
    if bad:
        raise CheckpointError(f"to_gemma: gemma's transformer cannot express Config fields {bad}; it needs "
                              f"{ {k: need[k] for k in bad} }.")
    windows = cfg.window_sizes or (None,) * cfg.n_layers
    sizes = sorted({w for w in windows if w is not None})
    if len(sizes) > 1:
        raise CheckpointError(f"to_gemma: gemma has one sliding_window_size, found windows {sizes}.")
    f = {"embed_dim": cfg.d_model, "num_heads": cfg.n_heads, "head_dim": cfg.d_head}
    scalar = next((k for k, q in QUERY_SCALARS.items()
                   if math.isclose(1.0 / q(f), cfg.attn_scale, rel_tol=1e-9)), None)
    if scalar is None:
        raise CheckpointError(f"to_gemma: attn_scale={cfg.attn_scale} is none of gemma's query "
                              "normalisations "
                              f"(sqrt(head_dim), 1/(embed_dim // num_heads), sqrt(embed_dim // num_heads)).")
    g_base = cfg.rotary_base
    g_scale = _scale_of(cfg.rotary_freqs, g_base, cfg.d_head, "rotary_freqs")
    l_base, l_scale = g_base, g_scale
    if cfg.rotary_local_freqs is not None:
        l_scale = 1.0 / cfg.rotary_local_freqs[0]  # the first frequency is 1 / scale for every base
        l_base = (cfg.rotary_local_freqs[1] * l_scale) ** (-cfg.d_head / 2) if cfg.d_head > 2 else g_base
        if abs(l_base - round(l_base)) <= 1e-4 * l_base:  # float32 noise on an integer base
            l_base = float(round(l_base))
        _scale_of(cfg.rotary_local_freqs, l_base, cfg.d_head, "rotary_local_freqs", l_scale)
    return {
        "num_embed": cfg.d_vocab, "embed_dim": cfg.d_model, "hidden_dim": cfg.d_mlp, "num_heads": cfg.n_heads,
        "head_dim": cfg.d_head, "num_kv_heads": cfg.n_key_value_heads,
        "final_logit_softcap": cfg.output_logits_soft_cap,
        "use_post_attn_norm": cfg.use_normalization_before_and_after,
        "use_post_ffw_norm": cfg.use_normalization_before_and_after,
        "attention_types": tuple("GLOBAL" if w is None else "LOCAL_SLIDING" for w in windows),
        "query_pre_attn_norm": scalar, "attn_logits_soft_cap": cfg.attn_scores_soft_cap,
        "sliding_window_size": sizes[0] if sizes else None,
        "transpose_gating_einsum": transpose_gating_einsum, "use_qk_norm": cfg.use_qk_norm,
        "local_base_frequency": _int(l_base), "global_base_frequency": _int(g_base),
        "local_scale_factor": l_scale, "global_scale_factor": g_scale, "vision_encoder": None,
    }


def _scale_of(freqs, base: float, dim: int, name: str, scale: float | None = None) -> float:
    """The linear scale factor s with freqs == default_freqs(base, dim) / s (1.0 for None); CheckpointError if
    there is none."""
    from jaxlens.converters._rope import default_freqs

    if freqs is None:
        return 1.0
    scale = 1.0 / freqs[0] if scale is None else scale
    want = default_freqs(float(base), dim) / np.float32(scale)
    if not np.allclose(np.asarray(freqs, np.float32), want, rtol=1e-5):
        raise CheckpointError(f"to_gemma: Config.{name} are not base-{base} rotary frequencies divided by "
                              "one "
                              "factor (gemma's linear scaling); gemma cannot express them.")
    return float(scale)


def _int(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
