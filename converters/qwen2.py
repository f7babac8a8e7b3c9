"""Qwen2 / Qwen2.5 (HF `Qwen2ForCausalLM`) -> jaxlens Config and Params (Yang et al. 2024): the Llama layout
with biases on q/k/v (not o). Sliding windows apply only when `use_sliding_window`, to the layers
`layer_types` marks (by default those from `max_window_layers` on)."""

from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters.llama import llama_like_config, params_from_llama_layout

ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2Model")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps", "use_sliding_window",
    "sliding_window", "max_window_layers", "layer_types", *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="qwen2")
    n_layers = hf.get("num_hidden_layers", 32)
    windows = None
    if hf.get("use_sliding_window", False) and hf.get("sliding_window", 4096) is not None:
        first = hf.get("max_window_layers", 28)
        kinds = hf.get("layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        windows = c.window_sizes(kinds, hf.get("sliding_window", 4096), "qwen2", n_layers)
    return llama_like_config(hf, "qwen2", window_sizes=windows)


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    return params_from_llama_layout(t, cfg, hf, "qwen2", qkv_bias=True, o_bias=False)
