"""GPT-Neo (HF `GPTNeoForCausalLM`) -> jaxlens Config and Params (Black et al. 2021): GPT-2-like, with learned
positions, no attention scaling (attn_scale=1.0) and local attention on the layers `attention_types`
marks "local" (window `window_size`, Config.window_sizes)."""

from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.errors import CheckpointError

ARCHITECTURES = ("GPTNeoForCausalLM", "GPTNeoModel")
HANDLED = frozenset({
    "hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
    "activation_function", "layer_norm_epsilon", "attention_types", "attention_layers", "window_size",
})
IGNORED = frozenset({
    "attention_dropout", "embed_dropout", "resid_dropout", "classifier_dropout", "summary_activation",
    "summary_first_dropout", "summary_proj_to_labels", "summary_type", "summary_use_proj",
})


def attention_layers(hf: Mapping[str, Any]) -> list[str]:
    """Per-layer "global"/"local", expanded from `attention_types` as GPTNeoConfig does
    ([[["global", "local"], 12]] means 12 repeats of the pair); `attention_layers`, if present, must agree."""
    types = hf.get("attention_types", [[["global", "local"], 12]])
    expanded = [kind for kinds, repeat in types for kind in list(kinds) * repeat]
    listed = hf.get("attention_layers")
    if listed is not None and list(listed) != expanded:
        raise CheckpointError(f"gpt_neo: attention_layers {listed} disagrees with attention_types {types} "
                              f"(which expands to {expanded}).")
    return expanded


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="gpt_neo")
    d = hf.get("hidden_size", 2048)
    n_heads = hf.get("num_heads", 8)
    n_layers = hf.get("num_layers", 24)
    kinds = attention_layers(hf)
    return Config(
        d_model=d, n_layers=n_layers, n_heads=n_heads, d_head=d // n_heads,
        d_mlp=hf.get("intermediate_size") or 4 * d, d_vocab=hf.get("vocab_size", 50257),
        n_ctx=hf.get("max_position_embeddings", 2048),
        act_fn=c.act_fn(hf.get("activation_function", "gelu_new"), "gpt_neo", "activation_function"),
        eps=hf.get("layer_norm_epsilon", 1e-5), normalization_type="LN", attn_scale=1.0,
        window_sizes=c.window_sizes(kinds, hf.get("window_size", 256), "gpt_neo", n_layers),
    )


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    if t.has("transformer.wte.weight"):
        t.strip_prefix("transformer.")
    t.drop(r"h\.\d+\.attn\.attention\.(masked_)?bias")  # causal-mask buffers of old checkpoints
    L, H, D, M = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_mlp
    a = "h.{}.attn.attention."
    W_E = t.take("wte.weight", (cfg.d_vocab, D))
    ln = lambda name: {"w": t.take_layers(f"h.{{}}.{name}.weight", L, (D,)),
                       "b": t.take_layers(f"h.{{}}.{name}.bias", L, (D,))}
    return {
        "embed": {"W_E": W_E},
        "pos_embed": {"W_pos": t.take("wpe.weight", (cfg.n_ctx, D))},
        "blocks": {
            "ln1": ln("ln_1"),
            "attn": {
                "W_Q": c.linear_heads(t.take_layers(a + "q_proj.weight", L, (D, D)), H),
                "W_K": c.linear_heads(t.take_layers(a + "k_proj.weight", L, (D, D)), H),
                "W_V": c.linear_heads(t.take_layers(a + "v_proj.weight", L, (D, D)), H),
                "W_O": c.out_heads(t.take_layers(a + "out_proj.weight", L, (D, D)), H),
                "b_Q": c.zeros(L, H, cfg.d_head), "b_K": c.zeros(L, H, cfg.d_head),
                "b_V": c.zeros(L, H, cfg.d_head), "b_O": t.take_layers(a + "out_proj.bias", L, (D,)),
            },
            "ln2": ln("ln_2"),
            "mlp": {"W_in": c.transpose(t.take_layers("h.{}.mlp.c_fc.weight", L, (M, D))),
                    "b_in": t.take_layers("h.{}.mlp.c_fc.bias", L, (M,)),
                    "W_out": c.transpose(t.take_layers("h.{}.mlp.c_proj.weight", L, (D, M))),
                    "b_out": t.take_layers("h.{}.mlp.c_proj.bias", L, (D,))},
        },
        "ln_final": {"w": t.take("ln_f.weight", (D,)), "b": t.take("ln_f.bias", (D,))},
        "unembed": {"W_U": c.unembed_weight(t, "lm_head.weight", W_E, hf, "gpt_neo", True),
                    "b_U": c.zeros(cfg.d_vocab)},
    }
