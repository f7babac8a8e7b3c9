"""Mistral (HF `MistralForCausalLM`) -> jaxlens Config and Params (Jiang et al. 2023): the Llama layout with a
sliding attention window on every layer (`sliding_window` -> Config.window_sizes; null means global)."""

from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters.llama import llama_like_config, params_from_llama_layout

ARCHITECTURES = ("MistralForCausalLM", "MistralModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps",
    "sliding_window", *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="mistral")
    n_layers = hf.get("num_hidden_layers", 32)
    window = hf.get("sliding_window", 4096)
    kinds = ["sliding_attention" if window is not None else "full_attention"] * n_layers
    return llama_like_config(hf, "mistral", window_sizes=c.window_sizes(kinds, window, "mistral", n_layers))


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    return params_from_llama_layout(t, cfg, hf, "mistral", qkv_bias=False, o_bias=False)
