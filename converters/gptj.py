"""GPT-J (HF `GPTJForCausalLM`) -> jaxlens Config and Params (Wang & Komatsuzaki 2021): parallel attention and
MLP reading ONE LayerNorm (`ln_1`, copied into ln1 and ln2 as TransformerLens does), partial rotary on
adjacent pairs (dims 2i, 2i+1), no attention biases, and an output head with a bias (b_U)."""

from collections.abc import Mapping
from typing import Any

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config, require
from jaxlens.errors import CheckpointError

ARCHITECTURES = ("GPTJForCausalLM", "GPTJModel")
HANDLED = frozenset({
    "n_embd", "n_layer", "n_head", "n_inner", "vocab_size", "n_positions", "rotary_dim",
    "activation_function", "layer_norm_epsilon", "scale_attn_weights",
})
IGNORED = frozenset({
    "attn_pdrop", "embd_pdrop", "resid_pdrop", "n_ctx", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj",
})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="gptj")
    require(hf, "scale_attn_weights", {True}, "gptj", default=True)
    d = hf.get("n_embd", 4096)
    n_heads = hf.get("n_head", 16)
    d_head = d // n_heads
    rot = hf.get("rotary_dim", 64)
    if not isinstance(rot, int) or not 0 < rot <= d_head or rot % 2:
        raise CheckpointError(f"gptj: rotary_dim={rot!r} must be a positive even int at most d_head={d_head} "
                              "(transformers' GPT-J does not run with rotary_dim=None and several heads).")
    return Config(
        d_model=d, n_layers=hf.get("n_layer", 28), n_heads=n_heads, d_head=d_head,
        d_mlp=hf.get("n_inner") or 4 * d, d_vocab=hf.get("vocab_size", 50400),
        n_ctx=hf.get("n_positions", 2048),
        act_fn=c.act_fn(hf.get("activation_function", "gelu_new"), "gptj", "activation_function"),
        eps=hf.get("layer_norm_epsilon", 1e-5), normalization_type="LN", positional_embedding_type="rotary",
        rotary_dim=rot, rotary_adjacent_pairs=True, parallel_attn_mlp=True,
    )


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    if t.has("transformer.wte.weight"):
        t.strip_prefix("transformer.")
    t.drop(r"h\.\d+\.attn\.(masked_)?bias")  # causal-mask buffers of old checkpoints
    L, H, D, E, M = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    ln = {"w": t.take_layers("h.{}.ln_1.weight", L, (D,)), "b": t.take_layers("h.{}.ln_1.bias", L, (D,))}
    W_E = t.take("wte.weight", (cfg.d_vocab, D))
    W_U = c.unembed_weight(t, "lm_head.weight", W_E, hf, "gptj", False)
    b_U = t.maybe_take("lm_head.bias", (cfg.d_vocab,))
    return {
        "embed": {"W_E": W_E},
        "blocks": {
            "ln1": ln,
            "ln2": {k: v.copy() for k, v in ln.items()},
            "attn": {
                "W_Q": c.linear_heads(t.take_layers("h.{}.attn.q_proj.weight", L, (D, D)), H),
                "W_K": c.linear_heads(t.take_layers("h.{}.attn.k_proj.weight", L, (D, D)), H),
                "W_V": c.linear_heads(t.take_layers("h.{}.attn.v_proj.weight", L, (D, D)), H),
                "W_O": c.out_heads(t.take_layers("h.{}.attn.out_proj.weight", L, (D, D)), H),
                "b_Q": c.zeros(L, H, E), "b_K": c.zeros(L, H, E), "b_V": c.zeros(L, H, E),
                "b_O": c.zeros(L, D),
            },
            "mlp": {"W_in": c.transpose(t.take_layers("h.{}.mlp.fc_in.weight", L, (M, D))),
                    "b_in": t.take_layers("h.{}.mlp.fc_in.bias", L, (M,)),
                    "W_out": c.transpose(t.take_layers("h.{}.mlp.fc_out.weight", L, (D, M))),
                    "b_out": t.take_layers("h.{}.mlp.fc_out.bias", L, (D,))},
        },
        "ln_final": {"w": t.take("ln_f.weight", (D,)), "b": t.take("ln_f.bias", (D,))},
        "unembed": {"W_U": W_U, "b_U": c.zeros(cfg.d_vocab) if b_U is None else b_U},
    }
