"""GPT-2 (HF `GPT2LMHeadModel`) -> jaxlens Config and Params (Radford et al. 2019)."""

from collections.abc import Mapping
from typing import Any

import einops
import numpy as np

from jaxlens.config import Config
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config, require

ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
HANDLED = frozenset({
    "n_embd", "n_layer", "n_head", "n_inner", "vocab_size", "n_positions", "n_ctx", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
})
IGNORED = frozenset({
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj", "n_special", "predict_special_tokens",
})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="gpt2")
    require(hf, "scale_attn_weights", {True}, "gpt2", default=True)
    require(hf, "scale_attn_by_inverse_layer_idx", {False}, "gpt2", default=False)
    d = hf.get("n_embd", 768)
    n_heads = hf.get("n_head", 12)
    return Config(
        d_model=d, n_layers=hf.get("n_layer", 12), n_heads=n_heads, d_head=d // n_heads,
        d_mlp=hf.get("n_inner") or 4 * d, d_vocab=hf.get("vocab_size", 50257),
        n_ctx=hf.get("n_positions", 1024), act_fn=hf.get("activation_function", "gelu_new"),
        eps=hf.get("layer_norm_epsilon", 1e-5), normalization_type="LN",
    )


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    if t.has("transformer.wte.weight"):
        t.strip_prefix("transformer.")
    t.drop(r"h\.\d+\.attn\.(masked_)?bias")  # causal-mask buffers of old checkpoints
    L, H, D = cfg.n_layers, cfg.n_heads, cfg.d_model
    qkv_w = t.take_layers("h.{}.attn.c_attn.weight", L, (D, 3 * D))
    qkv_b = t.take_layers("h.{}.attn.c_attn.bias", L, (3 * D,))
    W_Q, W_K, W_V = einops.rearrange(
        qkv_w, "layer d_model (qkv n_heads d_head) -> qkv layer n_heads d_model d_head", qkv=3, n_heads=H)
    b_Q, b_K, b_V = einops.rearrange(
        qkv_b, "layer (qkv n_heads d_head) -> qkv layer n_heads d_head", qkv=3, n_heads=H)
    W_O = einops.rearrange(t.take_layers("h.{}.attn.c_proj.weight", L, (D, D)),
                           "layer (n_heads d_head) d_model -> layer n_heads d_head d_model", n_heads=H)
    W_E = t.take("wte.weight", (cfg.d_vocab, D))
    W_U = t.take("lm_head.weight", (cfg.d_vocab, D)).T if t.has("lm_head.weight") else W_E.T
    return {
        "embed": {"W_E": W_E},
        "pos_embed": {"W_pos": t.take("wpe.weight", (cfg.n_ctx, D))},
        "blocks": {
            "ln1": {"w": t.take_layers("h.{}.ln_1.weight", L), "b": t.take_layers("h.{}.ln_1.bias", L)},
            "attn": {"W_Q": W_Q, "W_K": W_K, "W_V": W_V, "W_O": W_O, "b_Q": b_Q, "b_K": b_K, "b_V": b_V,
                     "b_O": t.take_layers("h.{}.attn.c_proj.bias", L)},
            "ln2": {"w": t.take_layers("h.{}.ln_2.weight", L), "b": t.take_layers("h.{}.ln_2.bias", L)},
            "mlp": {"W_in": t.take_layers("h.{}.mlp.c_fc.weight", L, (D, cfg.d_mlp)),
                    "b_in": t.take_layers("h.{}.mlp.c_fc.bias", L),
                    "W_out": t.take_layers("h.{}.mlp.c_proj.weight", L, (cfg.d_mlp, D)),
                    "b_out": t.take_layers("h.{}.mlp.c_proj.bias", L)},
        },
        "ln_final": {"w": t.take("ln_f.weight"), "b": t.take("ln_f.bias")},
        "unembed": {"W_U": np.ascontiguousarray(W_U), "b_U": np.zeros(cfg.d_vocab, np.float32)},
    }
