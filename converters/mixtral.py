"""Mixtral (HF `MixtralForCausalLM`) -> jaxlens Config and Params (Jiang et al. 2024, "Mixtral of Experts"):
the Mistral block with a sparse mixture-of-experts MLP. A router (`mlp.gate`, TL's `W_gate` [layer, d_model,
expert]) picks `num_experts_per_tok` of `num_local_experts` SwiGLU experts per token and mixes them with the
renormalised router probabilities.

`moe_mlp` reads the experts in every layout transformers writes or reads: transformers 5's batched
`mlp.experts.gate_up_proj` [expert, 2 d_mlp, d_model] ([gate; up]) and `mlp.experts.down_proj`
[expert, d_model, d_mlp]; the per-expert `block_sparse_moe.experts.E.w1/w3/w2` (gate, up, down) of the
original Mixtral checkpoints; the per-expert `mlp.experts.E.gate_proj/up_proj/down_proj` of Qwen-MoE
checkpoints; and `mlp.experts.gate_proj/up_proj/down_proj` stacked over experts, as GGUF files hold them.
Qwen3-MoE reuses it.
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

ARCHITECTURES = ("MixtralForCausalLM", "MixtralModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps",
    "sliding_window", "num_local_experts", "num_experts_per_tok", *c.ROPE_KEYS,
})
# The auxiliary load-balancing loss and the router's jitter noise act in training only.
IGNORED = frozenset({"attention_dropout", "router_aux_loss_coef", "router_jitter_noise"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="mixtral")
    n_layers = hf.get("num_hidden_layers", 32)
    window = hf.get("sliding_window")
    windows = (c.window_sizes(["sliding_attention"] * n_layers, window, "mixtral", n_layers) if window
               else None)
    return llama_like_config(hf, "mixtral", rope_types=ROPE_TYPES, window_sizes=windows,
                             num_experts=hf.get("num_local_experts", 8),
                             experts_per_token=hf.get("num_experts_per_tok", 2))


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    return params_from_llama_layout(t, cfg, hf, "mixtral", qkv_bias=False, o_bias=False, mlp_reader=moe_mlp)


def moe_mlp(t: TensorSource, cfg: Config) -> dict:
    """The router and experts of every layer as TL's MoE params: W_gate [layer, d_model, expert] and experts
    W_in / W_gate [layer, expert, d_model, d_mlp], W_out [layer, expert, d_mlp, d_model]."""
    L, X, D, M = cfg.n_layers, cfg.num_experts, cfg.d_model, cfg.d_mlp
    per_expert = [(m, names) for m, names in _PER_EXPERT
                  if t.has(m.format(0) + f"experts.0.{names[0]}.weight")]
    if per_expert:  # one tensor per expert and projection, as the hub stores them
        m, names = per_expert[0]
        gate, up, down = (
            np.stack([t.take_layers(m + f"experts.{e}.{n}.weight", L, shape) for e in range(X)], axis=1)
            for n, shape in zip(names, ((M, D), (M, D), (D, M)), strict=True))
        router = t.take_layers(m + "gate.weight", L, (X, D))
    elif t.has("layers.0.mlp.experts.gate_proj.weight"):  # stacked per projection (from GGUF files)
        m = "layers.{}.mlp."
        router = t.take_layers(m + "gate.weight", L, (X, D))
        gate = t.take_layers(m + "experts.gate_proj.weight", L, (X, M, D))
        up = t.take_layers(m + "experts.up_proj.weight", L, (X, M, D))
        down = t.take_layers(m + "experts.down_proj.weight", L, (X, D, M))
    else:  # transformers 5's batched experts
        m = "layers.{}.mlp."
        router = t.take_layers(m + "gate.weight", L, (X, D))
        gate_up = t.take_layers(m + "experts.gate_up_proj", L, (X, 2 * M, D))
        gate, up = gate_up[:, :, :M], gate_up[:, :, M:]
        down = t.take_layers(m + "experts.down_proj", L, (X, D, M))
    return {"W_gate": c.transpose(router), "experts": {
        "W_in": c.transpose(up), "W_gate": c.transpose(gate), "W_out": c.transpose(down)}}


# Per-expert layouts: (module prefix, (gate, up, down) projection names): Mixtral's original checkpoints, and
# the hub layout transformers writes for Qwen-MoE models.
_PER_EXPERT = (("layers.{}.block_sparse_moe.", ("w1", "w3", "w2")),
               ("layers.{}.mlp.", ("gate_proj", "up_proj", "down_proj")))
