"""Cohere / Command R (HF `CohereForCausalLM`) -> jaxlens Config and Params (Cohere's Command R, 2024): the
Llama layout with

- a parallel block: attention and the MLP both read the one input LayerNorm and add into the residual
  (Config.parallel_attn_mlp; jaxlens's ln2 holds a copy of ln1's weights, as for StableLM);
- LayerNorm without a bias (mean-centred, weight only: the bias is zeros);
- rotary embeddings on interleaved pairs (dims 2i, 2i+1: rotary_adjacent_pairs, as GPT-J);
- logits multiplied by `logit_scale`, folded into W_U (the embedding stays unscaled);
- tied embeddings by default.

Per-head LayerNorm of queries and keys (`use_qk_norm`, Command R+) is refused: its weights are per head and
per dimension, which jaxlens's QK-norm (RMSNorm) does not model.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters._rope import SUPPORTED as ROPE_TYPES
from jaxlens.converters.llama import llama_like_config, params_from_llama_layout

ARCHITECTURES = ("CohereForCausalLM", "CohereModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings", "hidden_act", "layer_norm_eps", "logit_scale", "attention_bias",
    "use_qk_norm", *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="cohere")
    c.require_false(hf, ["use_qk_norm"], "cohere")
    return llama_like_config(hf, "cohere", rope_types=ROPE_TYPES, normalization_type="LN",
                             eps=hf.get("layer_norm_eps", 1e-5), parallel_attn_mlp=True,
                             rotary_adjacent_pairs=True)


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    bias = bool(hf.get("attention_bias", False))
    p = params_from_llama_layout(t, cfg, hf, "cohere", qkv_bias=bias, o_bias=bias,
                                 norm_names={"ln1": "input_layernorm"}, tied_default=True)
    L, D = cfg.n_layers, cfg.d_model
    p["blocks"]["ln1"]["b"] = c.zeros(L, D)
    p["blocks"]["ln2"] = {k: np.copy(v) for k, v in p["blocks"]["ln1"].items()}  # the MLP reads ln1 too
    p["ln_final"]["b"] = c.zeros(D)
    p["unembed"]["W_U"] = p["unembed"]["W_U"] * np.float32(hf.get("logit_scale", 0.0625))
    return p
