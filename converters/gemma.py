"""Gemma (HF `GemmaForCausalLM`) -> jaxlens Config and Params (Gemma Team 2024): the Llama layout with
gelu_pytorch_tanh, a head size independent of d_model / n_heads, and two conventions folded in as
TransformerLens folds them:

- embeddings are multiplied by sqrt(d_model) before the first block: W_E holds the scaled embedding, while W_U
  is the unscaled (tied) embedding transposed;
- RMSNorm computes x_hat * (1 + w): the params store 1 + w, so the generic RMSNorm applies it.
"""

import math
from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters.llama import llama_like_config, params_from_llama_layout

ARCHITECTURES = ("GemmaForCausalLM", "GemmaModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "hidden_activation",
    "rms_norm_eps", "attention_bias", "use_bidirectional_attention", *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout"})


def gemma_act_fn(hf: Mapping[str, Any], family: str) -> str:
    """Gemma's activation: `hidden_activation` if set, else `hidden_act`, where the legacy "gelu" of the
    official releases means the tanh approximation (as transformers reads it)."""
    name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    return c.act_fn("gelu_pytorch_tanh" if name == "gelu" else name, family)


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="gemma")
    c.require_false(hf, ["use_bidirectional_attention"], "gemma")
    hf = {"head_dim": 256, **hf}
    return llama_like_config(hf, "gemma", act_fn=gemma_act_fn(hf, "gemma"))


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    bias = bool(hf.get("attention_bias", False))
    return params_from_llama_layout(t, cfg, hf, "gemma", qkv_bias=bias, o_bias=bias, norm_offset=1.0,
                                    embed_scale=math.sqrt(cfg.d_model), tied_default=True)
