"""Gemma 3 text (HF `Gemma3ForCausalLM`, config `gemma3_text`) -> jaxlens Config and Params (Gemma Team 2025,
"Gemma 3 Technical Report"): Gemma 2's block (pre and post norms around attention and MLP, the sqrt(d_model)
embedding scale, scores divided by sqrt(query_pre_attn_scalar), optional logit softcapping; the config's
attention softcapping is ignored, as transformers' Gemma 3 ignores it) plus

- QK-norm: per-head RMSNorm of queries and keys before the rotary embedding (`self_attn.q_norm` / `k_norm`,
  stored as w and applied as 1 + w like every Gemma norm);
- a local/global layer pattern (`layer_types`: five sliding-window layers to one global by default) with two
  rotary bases: local layers rotate with `rope_parameters["sliding_attention"]` (transformers 4:
  `rope_local_base_freq`), global layers with `rope_parameters["full_attention"]`, which may carry linear
  (or other) rope scaling -> Config.rotary_local_freqs beside the global rotary fields.
"""

import math
from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters import _rope
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.converters.gemma import gemma_act_fn
from jaxlens.converters.gemma2 import params_from_pre_post_norm_layout
from jaxlens.converters.llama import llama_like_config

ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3TextModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "hidden_activation",
    "rms_norm_eps", "attention_bias", "use_bidirectional_attention", "query_pre_attn_scalar",
    "final_logit_softcapping", "sliding_window", "layer_types",
    "rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern", *c.ROPE_KEYS,
})
# attn_logit_softcapping: Gemma3Config keeps it, but transformers' Gemma 3 attention never applies it.
IGNORED = frozenset({"attention_dropout", "cache_implementation", "attn_logit_softcapping"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="gemma3", model_type="gemma3_text")
    c.require_false(hf, ["use_bidirectional_attention"], "gemma3")
    hf = {"head_dim": 256, **hf}
    n_layers = hf.get("num_hidden_layers", 26)
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    kinds = hf.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    windows = c.window_sizes(kinds, hf.get("sliding_window", 4096), "gemma3", n_layers)
    full, local = _rope_parameters(hf)
    global_hf = {**hf, "rope_parameters": full}
    local_freqs = None
    if windows is not None:
        rope = _rope.rope_fields(global_hf, "gemma3", hf["head_dim"], params=local,
                                 allowed=("default", "linear"))
        local_freqs = rope["rotary_freqs"] or tuple(
            _rope.default_freqs(rope["rotary_base"], rope["rotary_dim"]).tolist())
    return llama_like_config(
        global_hf, "gemma3", rope_types=_rope.SUPPORTED, act_fn=gemma_act_fn(hf, "gemma3"),
        use_normalization_before_and_after=True, use_qk_norm=True,
        attn_scale=math.sqrt(hf.get("query_pre_attn_scalar", 256)),
        output_logits_soft_cap=hf.get("final_logit_softcapping"),
        window_sizes=windows, rotary_local_freqs=local_freqs,
    )


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    return params_from_pre_post_norm_layout(t, cfg, hf, "gemma3")


def _rope_parameters(hf: Mapping[str, Any]) -> tuple[dict, dict]:
    """(global, local) rope parameter dicts from transformers 5's per-layer-type `rope_parameters` or the
    older `rope_theta` / `rope_scaling` / `rope_local_base_freq`."""
    rp = hf.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        full = dict(rp.get("full_attention") or {"rope_type": "default", "rope_theta": 1e6})
        local = dict(rp.get("sliding_attention") or {"rope_type": "default", "rope_theta": 1e4})
        return full, local
    full = {"rope_theta": hf.get("rope_theta", 1e6), **(rp or hf.get("rope_scaling") or {})}
    return full, {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 1e4)}
