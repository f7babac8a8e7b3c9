"""GPT-NeoX / Pythia (HF `GPTNeoXForCausalLM`) -> jaxlens Config and Params (Black et al. 2022; Biderman
et al. 2023): LayerNorm, partial rotary on halves (`rotary_pct`, default 0.25), and, with
`use_parallel_residual`, parallel attention and MLP with their own norms. The fused `query_key_value` is laid
out per head: output rows are [n_heads, 3 (q k v), d_head]."""

from collections.abc import Mapping
from typing import Any

import einops

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config

ARCHITECTURES = ("GPTNeoXForCausalLM", "GPTNeoXModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "use_parallel_residual", "attention_bias",
    "rotary_pct", "rotary_emb_base", *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout", "hidden_dropout", "classifier_dropout"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="gpt_neox")
    d = hf.get("hidden_size", 6144)
    n_heads = hf.get("num_attention_heads", 64)
    d_head = d // n_heads
    base, factor, _ = c.rope_settings(hf, "gpt_neox", theta=float(hf.get("rotary_emb_base", 10000.0)),
                                      partial=float(hf.get("rotary_pct", 0.25)))
    return Config(
        d_model=d, n_layers=hf.get("num_hidden_layers", 44), n_heads=n_heads, d_head=d_head,
        d_mlp=hf.get("intermediate_size", 24576), d_vocab=hf.get("vocab_size", 50432),
        n_ctx=hf.get("max_position_embeddings", 2048),
        act_fn=c.act_fn(hf.get("hidden_act", "gelu"), "gpt_neox"),
        eps=hf.get("layer_norm_eps", 1e-5), normalization_type="LN", positional_embedding_type="rotary",
        rotary_dim=c.rotary_dim(d_head, factor, "gpt_neox"), rotary_base=base,
        parallel_attn_mlp=bool(hf.get("use_parallel_residual", True)),
    )


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    if t.has("gpt_neox.embed_in.weight"):
        t.strip_prefix("gpt_neox.")
    # causal-mask and rotary buffers of old checkpoints
    t.drop(r"layers\.\d+\.attention\.(masked_bias|bias|rotary_emb\.inv_freq)")
    L, H, D, E, M = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    bias = bool(hf.get("attention_bias", True))
    a = "layers.{}.attention."
    qkv = t.take_layers(a + "query_key_value.weight", L, (3 * D, D))
    W_Q, W_K, W_V = einops.rearrange(qkv, "l (h three e) d -> three l h d e", h=H, three=3)
    if bias:
        b = t.take_layers(a + "query_key_value.bias", L, (3 * D,))
        b_Q, b_K, b_V = einops.rearrange(b, "l (h three e) -> three l h e", h=H, three=3)
    else:
        b_Q = b_K = b_V = c.zeros(L, H, E)
    ln = lambda name: {"w": t.take_layers(f"layers.{{}}.{name}.weight", L, (D,)),
                       "b": t.take_layers(f"layers.{{}}.{name}.bias", L, (D,))}
    W_E = t.take("embed_in.weight", (cfg.d_vocab, D))
    head = "embed_out.weight" if t.has("embed_out.weight") else "lm_head.weight"  # name before transformers 5
    return {
        "embed": {"W_E": W_E},
        "blocks": {
            "ln1": ln("input_layernorm"),
            "attn": {"W_Q": W_Q, "W_K": W_K, "W_V": W_V,
                     "W_O": c.out_heads(t.take_layers(a + "dense.weight", L, (D, D)), H),
                     "b_Q": b_Q, "b_K": b_K, "b_V": b_V,
                     "b_O": t.take_layers(a + "dense.bias", L, (D,)) if bias else c.zeros(L, D)},
            "ln2": ln("post_attention_layernorm"),
            "mlp": {"W_in": c.transpose(t.take_layers("layers.{}.mlp.dense_h_to_4h.weight", L, (M, D))),
                    "b_in": t.take_layers("layers.{}.mlp.dense_h_to_4h.bias", L, (M,)),
                    "W_out": c.transpose(t.take_layers("layers.{}.mlp.dense_4h_to_h.weight", L, (D, M))),
                    "b_out": t.take_layers("layers.{}.mlp.dense_4h_to_h.bias", L, (D,))},
        },
        "ln_final": {"w": t.take("final_layer_norm.weight", (D,)),
                     "b": t.take("final_layer_norm.bias", (D,))},
        "unembed": {"W_U": c.unembed_weight(t, head, W_E, hf, "gpt_neox", False),
                    "b_U": c.zeros(cfg.d_vocab)},
    }
