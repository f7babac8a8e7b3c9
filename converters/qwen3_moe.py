"""Qwen3-MoE (HF `Qwen3MoeForCausalLM`) -> jaxlens Config and Params (Yang et al. 2025): Qwen3's attention
(QK-norm) with a mixture-of-experts MLP in every layer: the router picks `num_experts_per_tok` of
`num_experts` SwiGLU experts of width `moe_intermediate_size`, mixed by their router probabilities, divided
by their sum only when `norm_topk_prob`. Models with dense layers among the sparse ones (`mlp_only_layers`,
`decoder_sparse_step` > 1) are refused."""

from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config, require
from jaxlens.converters._rope import SUPPORTED as ROPE_TYPES
from jaxlens.converters.llama import llama_like_config, params_from_llama_layout
from jaxlens.converters.mixtral import moe_mlp
from jaxlens.converters.qwen3 import qwen_windows

ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen3MoeModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "moe_intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps",
    "attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
    "num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step",
    "mlp_only_layers",
    *c.ROPE_KEYS,
})
# intermediate_size is the width of dense layers, which jaxlens refuses (mlp_only_layers); the auxiliary loss
# acts in training only.
IGNORED = frozenset({"attention_dropout", "router_aux_loss_coef", "intermediate_size"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="qwen3_moe")
    require(hf, "decoder_sparse_step", [1], "qwen3_moe", default=1)
    if hf.get("mlp_only_layers"):
        require(hf, "mlp_only_layers", [[]], "qwen3_moe")
    return llama_like_config(
        {**hf, "intermediate_size": hf.get("moe_intermediate_size", 768)}, "qwen3_moe", rope_types=ROPE_TYPES,
        use_qk_norm=True, window_sizes=qwen_windows(hf, "qwen3_moe"),
        num_experts=hf.get("num_experts") or hf.get("num_local_experts", 128),
        experts_per_token=hf.get("num_experts_per_tok", 8),
        normalize_expert_weights=bool(hf.get("norm_topk_prob", False)))


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    bias = bool(hf.get("attention_bias", False))
    return params_from_llama_layout(t, cfg, hf, "qwen3_moe", qkv_bias=bias, o_bias=bias, mlp_reader=moe_mlp)
