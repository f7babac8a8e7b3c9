"""StableLM (HF `StableLmForCausalLM`) -> jaxlens Config and Params (Stability AI's StableLM 2 / 3B-4E1T):
the Llama layout with LayerNorm (weights and biases) instead of RMSNorm, partial rotary embeddings (a quarter
of each head by default, rotating halves), optional q/k/v biases (`use_qkv_bias`) and optional parallel
attention and MLP (`use_parallel_residual`: both read the one input LayerNorm, so jaxlens's ln2 holds ln1's
weights). Per-head LayerNorm of queries and keys (`qk_layernorm`) is refused."""

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters._rope import SUPPORTED as ROPE_TYPES
from jaxlens.converters.llama import llama_like_config, params_from_llama_layout

ARCHITECTURES = ("StableLmForCausalLM", "StableLmModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings", "hidden_act", "layer_norm_eps", "use_qkv_bias", "qk_layernorm",
    "use_parallel_residual", *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout", "hidden_dropout"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="stablelm")
    c.require_false(hf, ["qk_layernorm"], "stablelm")
    return llama_like_config({"partial_rotary_factor": 0.25, **hf}, "stablelm", rope_types=ROPE_TYPES,
                             normalization_type="LN", eps=hf.get("layer_norm_eps", 1e-5),
                             parallel_attn_mlp=bool(hf.get("use_parallel_residual", False)))


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    parallel = cfg.parallel_attn_mlp
    norms = {"ln1": "input_layernorm"}
    if not parallel:
        norms["ln2"] = "post_attention_layernorm"
    p = params_from_llama_layout(t, cfg, hf, "stablelm", qkv_bias=bool(hf.get("use_qkv_bias", False)),
                                 o_bias=False, norm_names=norms)
    L, D = cfg.n_layers, cfg.d_model
    for ours, theirs in norms.items():
        p["blocks"][ours]["b"] = t.take_layers(f"layers.{{}}.{theirs}.bias", L, (D,))
    if parallel:  # the MLP reads the same input LayerNorm as attention
        p["blocks"]["ln2"] = {k: np.copy(v) for k, v in p["blocks"]["ln1"].items()}
    p["ln_final"]["b"] = t.take("norm.bias", (D,))
    return p
