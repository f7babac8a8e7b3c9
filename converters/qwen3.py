"""Qwen3 (HF `Qwen3ForCausalLM`) -> jaxlens Config and Params (Yang et al. 2025, "Qwen3 Technical Report"):
the Llama layout with per-head RMSNorm of queries and keys before the rotary embedding (QK-norm:
`self_attn.q_norm` / `k_norm`, weights over d_head) and no q/k/v biases by default. Sliding windows as Qwen2:
only when `use_sliding_window`, on the layers `layer_types` marks."""

from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters._rope import SUPPORTED as ROPE_TYPES
from jaxlens.converters.llama import llama_like_config, params_from_llama_layout

ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3Model")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps",
    "attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
    *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="qwen3")
    return llama_like_config(hf, "qwen3", rope_types=ROPE_TYPES, use_qk_norm=True,
                             window_sizes=qwen_windows(hf, "qwen3"))


def qwen_windows(hf: Mapping[str, Any], family: str) -> tuple[int | None, ...] | None:
    """Config.window_sizes of a Qwen2/Qwen3-style config: windows only with `use_sliding_window`."""
    n_layers = hf.get("num_hidden_layers", 32)
    if not hf.get("use_sliding_window", False) or hf.get("sliding_window") is None:
        return None
    first = hf.get("max_window_layers", 28)
    kinds = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    return c.window_sizes(kinds, hf["sliding_window"], family, n_layers)


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    bias = bool(hf.get("attention_bias", False))
    return params_from_llama_layout(t, cfg, hf, "qwen3", qkv_bias=bias, o_bias=bias)
