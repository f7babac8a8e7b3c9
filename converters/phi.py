"""Phi-1 / Phi-1.5 / Phi-2 (HF `PhiForCausalLM`) -> jaxlens Config and Params (Gunasekar et al. 2023; Li et
al. 2023): parallel attention and MLP reading ONE LayerNorm (`input_layernorm`, copied into ln1 and ln2 as
TransformerLens does), partial rotary on halves, biases on every dense layer and on the output head (b_U)."""

from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config

ARCHITECTURES = ("PhiForCausalLM", "PhiModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings", "hidden_act", "layer_norm_eps", "qk_layernorm", *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout", "embd_pdrop", "resid_pdrop"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="phi")
    c.require_false(hf, ["qk_layernorm"], "phi")
    d = hf.get("hidden_size", 2048)
    n_heads = hf.get("num_attention_heads", 32)
    d_head = d // n_heads
    kv = hf.get("num_key_value_heads") or n_heads
    base, factor, _ = c.rope_settings(hf, "phi", partial=0.5)
    return Config(
        d_model=d, n_layers=hf.get("num_hidden_layers", 24), n_heads=n_heads, d_head=d_head,
        d_mlp=hf.get("intermediate_size", 8192), d_vocab=hf.get("vocab_size", 51200),
        n_ctx=hf.get("max_position_embeddings", 2048), n_key_value_heads=None if kv == n_heads else kv,
        act_fn=c.act_fn(hf.get("hidden_act", "gelu_new"), "phi"), eps=hf.get("layer_norm_eps", 1e-5),
        normalization_type="LN", positional_embedding_type="rotary",
        rotary_dim=c.rotary_dim(d_head, factor, "phi"), rotary_base=base, parallel_attn_mlp=True,
    )


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    if t.has("model.embed_tokens.weight"):
        t.strip_prefix("model.")
    t.drop(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # buffer in old checkpoints
    L, H, G, D, E, M = cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    a = "layers.{}.self_attn."
    attn = {}
    for X, n, g in (("Q", "q", H), ("K", "k", G), ("V", "v", G)):
        attn[f"W_{X}"] = c.linear_heads(t.take_layers(a + f"{n}_proj.weight", L, (g * E, D)), g)
        attn[f"b_{X}"] = c.bias_heads(t.take_layers(a + f"{n}_proj.bias", L, (g * E,)), g)
    attn["W_O"] = c.out_heads(t.take_layers(a + "dense.weight", L, (D, H * E)), H)
    attn["b_O"] = t.take_layers(a + "dense.bias", L, (D,))
    ln = {"w": t.take_layers("layers.{}.input_layernorm.weight", L, (D,)),
          "b": t.take_layers("layers.{}.input_layernorm.bias", L, (D,))}
    W_E = t.take("embed_tokens.weight", (cfg.d_vocab, D))
    b_U = t.maybe_take("lm_head.bias", (cfg.d_vocab,))
    return {
        "embed": {"W_E": W_E},
        "blocks": {
            "ln1": ln,
            "ln2": {k: v.copy() for k, v in ln.items()},
            "attn": attn,
            "mlp": {"W_in": c.transpose(t.take_layers("layers.{}.mlp.fc1.weight", L, (M, D))),
                    "b_in": t.take_layers("layers.{}.mlp.fc1.bias", L, (M,)),
                    "W_out": c.transpose(t.take_layers("layers.{}.mlp.fc2.weight", L, (D, M))),
                    "b_out": t.take_layers("layers.{}.mlp.fc2.bias", L, (D,))},
        },
        "ln_final": {"w": t.take("final_layernorm.weight", (D,)), "b": t.take("final_layernorm.bias", (D,))},
        "unembed": {"W_U": c.unembed_weight(t, "lm_head.weight", W_E, hf, "phi", False),
                    "b_U": c.zeros(cfg.d_vocab) if b_U is None else b_U},
    }
