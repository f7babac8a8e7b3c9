"""OLMo 2 (HF `Olmo2ForCausalLM`) -> jaxlens Config and Params (OLMo et al. 2024, "2 OLMo 2 Furious"): the
Llama layout (rotary halves, SwiGLU, grouped-query attention) with its norms moved after the sublayers:

- no norm before attention or the MLP (Config.use_pre_norms=False); RMSNorms on their outputs instead
  (use_normalization_before_and_after: HF post_attention_layernorm -> ln1_post, post_feedforward_layernorm
  -> ln2_post), so resid_mid = resid_pre + ln1_post(attn(resid_pre)); ln_final stays;
- QK-norm over the whole q / k projection, all heads at once, not per head (use_qk_norm with
  qk_norm_over_heads: HF q_norm weights [n_heads * d_head] -> attn.q_norm.w [layer, head_index, d_head]).
"""

from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters._rope import SUPPORTED as ROPE_TYPES
from jaxlens.converters.llama import llama_like_config, params_from_llama_layout

ARCHITECTURES = ("Olmo2ForCausalLM", "Olmo2Model")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps", "attention_bias", *c.ROPE_KEYS,
})
IGNORED = frozenset({"attention_dropout"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="olmo2")
    return llama_like_config(hf, "olmo2", rope_types=ROPE_TYPES, eps=hf.get("rms_norm_eps", 1e-5),
                             use_pre_norms=False, use_normalization_before_and_after=True, use_qk_norm=True,
                             qk_norm_over_heads=True)


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    bias = bool(hf.get("attention_bias", False))
    norms = {"ln1_post": "post_attention_layernorm", "ln2_post": "post_feedforward_layernorm"}
    return params_from_llama_layout(t, cfg, hf, "olmo2", qkv_bias=bias, o_bias=bias, norm_names=norms)
