"""Llama (HF `LlamaForCausalLM`) -> jaxlens Config and Params (Touvron et al. 2023; Llama 3: Grattafiori
et al. 2024): RMSNorm, rotary (halves), SwiGLU, grouped-query attention, untied unembedding by default.

`params_from_llama_layout` reads the `model.layers.N.self_attn.{q,k,v,o}_proj` / `mlp.{gate,up,down}_proj`
layout that Mistral, Qwen2 and Gemma share; their converters call it.
"""

from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters._rope import SUPPORTED as ROPE_TYPES
from jaxlens.converters._rope import rope_fields

ARCHITECTURES = ("LlamaForCausalLM", "LlamaModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps",
    "attention_bias", "mlp_bias", *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="llama")
    c.require_false(hf, ["mlp_bias"], "llama")
    return llama_like_config(hf, "llama", rope_types=ROPE_TYPES)


def llama_like_config(hf: Mapping[str, Any], family: str, *, rope_types=("default",), **overrides) -> Config:
    """Config of a Llama-layout model (RMSNorm, rotary halves, gated MLP); `overrides` set family fields."""
    d = hf.get("hidden_size", 4096)
    n_heads = hf.get("num_attention_heads", 32)
    d_head = hf.get("head_dim") or d // n_heads
    kv = hf.get("num_key_value_heads") or n_heads
    rope = rope_fields(hf, family, d_head, allowed=rope_types)
    n_ctx = hf.get("max_position_embeddings", 2048)
    if rope["rotary_dynamic_ntk"]:  # dynamic NTK exists to run past the trained context: factor times it
        n_ctx = int(n_ctx * rope["rotary_dynamic_ntk"][0])
    fields = dict(
        d_model=d, n_layers=hf.get("num_hidden_layers", 32), n_heads=n_heads, d_head=d_head,
        d_mlp=hf.get("intermediate_size", 11008), d_vocab=hf.get("vocab_size", 32000),
        n_ctx=n_ctx, n_key_value_heads=None if kv == n_heads else kv,
        act_fn=c.act_fn(hf.get("hidden_act", "silu"), family), normalization_type="RMS",
        eps=hf.get("rms_norm_eps", 1e-6), positional_embedding_type="rotary",
        **rope, gated_mlp=True,
    )
    return Config(**{**fields, **overrides})


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    bias = bool(hf.get("attention_bias", False))
    return params_from_llama_layout(t, cfg, hf, "llama", qkv_bias=bias, o_bias=bias)


def params_from_llama_layout(t: TensorSource, cfg: Config, hf: Mapping[str, Any], family: str, *,
                             qkv_bias: bool, o_bias: bool, norm_offset: float = 0.0,
                             norm_names: Mapping[str, str] | None = None, embed_scale: float = 1.0,
                             tied_default: bool = False, mlp_reader=None) -> dict:
    """Params from the Llama tensor layout.

    Args:
        qkv_bias, o_bias: whether q/k/v_proj and o_proj carry biases (zeros otherwise).
        norm_offset: added to every RMSNorm weight (Gemma stores w and scales by 1 + w).
        norm_names: jaxlens norm -> HF per-layer norm module (default ln1 input_layernorm, ln2
            post_attention_layernorm).
        embed_scale: folded into W_E (Gemma multiplies embeddings by sqrt(d_model)); W_U stays unscaled.
        tied_default: whether embeddings are tied when the config does not say.
        mlp_reader: `(t, cfg) -> mlp params` for an MLP of another layout (mixtures of experts); default the
            gate/up/down projections.
    """
    if t.has("model.embed_tokens.weight"):
        t.strip_prefix("model.")
    t.drop(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # buffer in old checkpoints
    L, H, G, D, E = cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head
    names = norm_names or {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
    a = "layers.{}.self_attn."
    attn = {
        "W_Q": c.linear_heads(t.take_layers(a + "q_proj.weight", L, (H * E, D)), H),
        "W_K": c.linear_heads(t.take_layers(a + "k_proj.weight", L, (G * E, D)), G),
        "W_V": c.linear_heads(t.take_layers(a + "v_proj.weight", L, (G * E, D)), G),
        "W_O": c.out_heads(t.take_layers(a + "o_proj.weight", L, (D, H * E)), H),
    }
    for X, n, g in (("Q", "q", H), ("K", "k", G), ("V", "v", G)):
        attn[f"b_{X}"] = (c.bias_heads(t.take_layers(a + f"{n}_proj.bias", L, (g * E,)), g) if qkv_bias
                          else c.zeros(L, g, E))
    attn["b_O"] = t.take_layers(a + "o_proj.bias", L, (D,)) if o_bias else c.zeros(L, D)
    if cfg.use_qk_norm:  # RMSNorm weights over d_head (Qwen3, Gemma 3) or over all heads at once (OLMo 2)
        for n, g in (("q_norm", H), ("k_norm", G)):
            w = (c.bias_heads(t.take_layers(a + f"{n}.weight", L, (g * E,)), g) if cfg.qk_norm_over_heads
                 else t.take_layers(a + f"{n}.weight", L, (E,)))
            attn[n] = {"w": w + norm_offset}
    mlp = (mlp_reader or _gated_mlp)(t, cfg)
    blocks = {"attn": attn, "mlp": mlp}
    for ours, theirs in names.items():
        blocks[ours] = {"w": t.take_layers(f"layers.{{}}.{theirs}.weight", L, (D,)) + norm_offset}
    W_E = t.take("embed_tokens.weight", (cfg.d_vocab, D))
    W_U = c.unembed_weight(t, "lm_head.weight", W_E, hf, family, tied_default)
    return {
        "embed": {"W_E": W_E * embed_scale},
        "blocks": blocks,
        "ln_final": {"w": t.take("norm.weight", (D,)) + norm_offset},
        "unembed": {"W_U": W_U, "b_U": c.zeros(cfg.d_vocab)},
    }


def _gated_mlp(t: TensorSource, cfg: Config) -> dict:
    L, D, M = cfg.n_layers, cfg.d_model, cfg.d_mlp
    m = "layers.{}.mlp."
    return {
        "W_gate": c.transpose(t.take_layers(m + "gate_proj.weight", L, (M, D))),
        "W_in": c.transpose(t.take_layers(m + "up_proj.weight", L, (M, D))),
        "W_out": c.transpose(t.take_layers(m + "down_proj.weight", L, (D, M))),
        "b_in": c.zeros(L, M), "b_out": c.zeros(L, D),
    }
