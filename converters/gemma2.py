"""Gemma 2 (HF `Gemma2ForCausalLM`) -> jaxlens Config and Params (Gemma Team 2024b): Gemma plus

- RMSNorms after attention and after the MLP (Config.use_normalization_before_and_after: HF
  post_attention_layernorm -> ln1_post, pre_feedforward_layernorm -> ln2,
  post_feedforward_layernorm -> ln2_post),
- tanh softcapping of attention scores and of the logits,
- attention scores divided by sqrt(query_pre_attn_scalar) instead of sqrt(head_dim),
- alternating sliding-window and global layers (`layer_types`; without it layer 0, 2, ... are sliding, as
  transformers' Gemma2Config defaults).
"""

import math
from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters.gemma import gemma_act_fn
from jaxlens.converters.llama import llama_like_config, params_from_llama_layout

ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma2Model")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "hidden_activation",
    "rms_norm_eps", "attention_bias", "use_bidirectional_attention", "query_pre_attn_scalar",
    "attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "layer_types", *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout", "cache_implementation"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="gemma2")
    c.require_false(hf, ["use_bidirectional_attention"], "gemma2")
    hf = {"head_dim": 256, **hf}
    n_layers = hf.get("num_hidden_layers", 26)
    kinds = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    return llama_like_config(
        hf, "gemma2", act_fn=gemma_act_fn(hf, "gemma2"), use_normalization_before_and_after=True,
        attn_scale=math.sqrt(hf.get("query_pre_attn_scalar", 256)),
        attn_scores_soft_cap=hf.get("attn_logit_softcapping", 50.0),
        output_logits_soft_cap=hf.get("final_logit_softcapping", 30.0),
        window_sizes=c.window_sizes(kinds, hf.get("sliding_window", 4096), "gemma2", n_layers),
    )


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    return params_from_pre_post_norm_layout(t, cfg, hf, "gemma2")


def params_from_pre_post_norm_layout(t: TensorSource, cfg: Config, hf: Mapping[str, Any],
                                     family: str) -> dict:
    """Gemma 2 / Gemma 3 tensors: Llama's layout with norms before and after attention and MLP (stored as
    w - 1), the embedding scaled by sqrt(d_model), tied unembedding by default."""
    bias = bool(hf.get("attention_bias", False))
    norms = {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm",
             "ln2": "pre_feedforward_layernorm", "ln2_post": "post_feedforward_layernorm"}
    return params_from_llama_layout(t, cfg, hf, family, qkv_bias=bias, o_bias=bias, norm_offset=1.0,
                                    norm_names=norms, embed_scale=math.sqrt(cfg.d_model), tied_default=True)
