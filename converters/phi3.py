"""Phi-3 (HF `Phi3ForCausalLM`) -> jaxlens Config and Params (Abdin et al. 2024): the Llama architecture with
a fused `qkv_proj` (rows [q: n_heads*d_head, k: n_kv*d_head, v: n_kv*d_head]) and a fused `gate_up_proj` (rows
[gate: d_mlp, up: d_mlp]), a sliding window on every layer when `sliding_window` is set. Rope scaling
(longrope / su / yarn of the 128k variants) is refused."""

from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters.llama import llama_like_config

ARCHITECTURES = ("Phi3ForCausalLM", "Phi3Model")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps",
    "sliding_window", "attention_bias", *c.ROPE_KEYS,
})
# original_max_position_embeddings only parameterises rope scaling, which is refused.
IGNORED = frozenset({"attention_dropout", "embd_pdrop", "resid_pdrop", "original_max_position_embeddings"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="phi3")
    c.require_false(hf, ["attention_bias"], "phi3")
    n_layers = hf.get("num_hidden_layers", 32)
    window = hf.get("sliding_window")
    kinds = ["sliding_attention" if window is not None else "full_attention"] * n_layers
    return llama_like_config({"rms_norm_eps": 1e-5, **hf}, "phi3",
                             window_sizes=c.window_sizes(kinds, window, "phi3", n_layers))


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    if t.has("model.embed_tokens.weight"):
        t.strip_prefix("model.")
    L, H, G, D, E, M = cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    a = "layers.{}.self_attn."
    qkv = t.take_layers(a + "qkv_proj.weight", L, ((H + 2 * G) * E, D))
    q, k, v = qkv[:, : H * E], qkv[:, H * E: (H + G) * E], qkv[:, (H + G) * E:]
    gate_up = t.take_layers("layers.{}.mlp.gate_up_proj.weight", L, (2 * M, D))
    blocks = {
        "attn": {"W_Q": c.linear_heads(q, H), "W_K": c.linear_heads(k, G), "W_V": c.linear_heads(v, G),
                 "W_O": c.out_heads(t.take_layers(a + "o_proj.weight", L, (D, H * E)), H),
                 "b_Q": c.zeros(L, H, E), "b_K": c.zeros(L, G, E), "b_V": c.zeros(L, G, E),
                 "b_O": c.zeros(L, D)},
        "mlp": {"W_gate": c.transpose(gate_up[:, :M]), "W_in": c.transpose(gate_up[:, M:]),
                "W_out": c.transpose(t.take_layers("layers.{}.mlp.down_proj.weight", L, (D, M))),
                "b_in": c.zeros(L, M), "b_out": c.zeros(L, D)},
        "ln1": {"w": t.take_layers("layers.{}.input_layernorm.weight", L, (D,))},
        "ln2": {"w": t.take_layers("layers.{}.post_attention_layernorm.weight", L, (D,))},
    }
    W_E = t.take("embed_tokens.weight", (cfg.d_vocab, D))
    return {
        "embed": {"W_E": W_E},
        "blocks": blocks,
        "ln_final": {"w": t.take("norm.weight", (D,))},
        "unembed": {"W_U": c.unembed_weight(t, "lm_head.weight", W_E, hf, "phi3", False),
                    "b_U": c.zeros(cfg.d_vocab)},
    }
