"""Qwen2-MoE (HF `Qwen2MoeForCausalLM`) -> jaxlens Config and Params (Qwen Team 2024, "Qwen1.5-MoE"): Qwen2's
attention (q/k/v biases) with a mixture-of-experts MLP in every layer: `num_experts_per_tok` of `num_experts`
routed SwiGLU experts (width `moe_intermediate_size`, router probabilities renormalised only when
`norm_topk_prob`) plus a shared expert every token goes through (width `shared_expert_intermediate_size`),
scaled by sigmoid(x `shared_expert_gate`). Models with dense layers among the sparse ones
(`mlp_only_layers`, `decoder_sparse_step` > 1) are refused."""

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

ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen2MoeModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "moe_intermediate_size",
    "shared_expert_intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps",
    "qkv_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "num_experts",
    "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
    *c.ROPE_KEYS,
})
# intermediate_size is the width of dense layers, which jaxlens refuses (mlp_only_layers); the auxiliary loss
# acts in training only.
IGNORED = frozenset({"attention_dropout", "router_aux_loss_coef", "intermediate_size"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="qwen2_moe")
    require(hf, "decoder_sparse_step", [1], "qwen2_moe", default=1)
    if hf.get("mlp_only_layers"):
        require(hf, "mlp_only_layers", [[]], "qwen2_moe")
    return llama_like_config(
        {**hf, "intermediate_size": hf.get("moe_intermediate_size", 1408)}, "qwen2_moe",
        rope_types=ROPE_TYPES, window_sizes=qwen_windows(hf, "qwen2_moe"),
        num_experts=hf.get("num_experts") or hf.get("num_local_experts", 60),
        experts_per_token=hf.get("num_experts_per_tok", 4),
        normalize_expert_weights=bool(hf.get("norm_topk_prob", False)),
        shared_expert_d_mlp=hf.get("shared_expert_intermediate_size", 5632))


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    bias = bool(hf.get("qkv_bias", True))
    return params_from_llama_layout(t, cfg, hf, "qwen2_moe", qkv_bias=bias, o_bias=False,
                                    mlp_reader=_moe_with_shared_expert)


def _moe_with_shared_expert(t: TensorSource, cfg: Config) -> dict:
    L, D, S = cfg.n_layers, cfg.d_model, cfg.shared_expert_d_mlp
    m = "layers.{}.mlp."
    mlp = moe_mlp(t, cfg)
    mlp["W_shared_gate"] = t.take_layers(m + "shared_expert_gate.weight", L, (1, D))[:, 0]
    mlp["shared_expert"] = {
        "W_gate": c.transpose(t.take_layers(m + "shared_expert.gate_proj.weight", L, (S, D))),
        "W_in": c.transpose(t.take_layers(m + "shared_expert.up_proj.weight", L, (S, D))),
        "W_out": c.transpose(t.take_layers(m + "shared_expert.down_proj.weight", L, (D, S))),
    }
    return mlp
