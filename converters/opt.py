"""OPT (HF `OPTForCausalLM`) -> jaxlens Config and Params (Zhang et al. 2022): pre-LN, ReLU, learned positions
whose table has 2 extra leading rows (position p reads row p + 2: the first two rows are sliced off), tied
unembedding. Post-LN OPT (do_layer_norm_before=False, opt-350m) and the embedding projections
(word_embed_proj_dim != hidden_size) are refused: the generic model has neither."""

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.errors import CheckpointError

ARCHITECTURES = ("OPTForCausalLM", "OPTModel")
HANDLED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size",
    "max_position_embeddings", "activation_function", "word_embed_proj_dim", "do_layer_norm_before",
    "_remove_final_layer_norm", "enable_bias", "layer_norm_elementwise_affine",
})
# scale_embedding: a fairseq setting that transformers' OPT never reads (its embeddings are not scaled).
IGNORED = frozenset({"dropout", "attention_dropout", "activation_dropout", "layerdrop", "init_std",
                     "scale_embedding"})
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="opt")
    d = hf.get("hidden_size", 768)
    proj = hf.get("word_embed_proj_dim") or d
    if proj != d:
        raise CheckpointError(
            f"opt: word_embed_proj_dim={proj} differs from hidden_size={d}, so the model projects embeddings "
            "in and out (project_in / project_out, as opt-350m). jaxlens's model has no such projections; "
            "use an OPT size without them (125m, 1.3b and larger)."
        )
    if not hf.get("do_layer_norm_before", True):
        raise CheckpointError(
            "opt: do_layer_norm_before=False (post-LayerNorm blocks, as opt-350m) is not supported; jaxlens "
            "models pre-LayerNorm blocks only."
        )
    if hf.get("_remove_final_layer_norm", False):
        raise CheckpointError("opt: _remove_final_layer_norm=True (no final LayerNorm) is not supported.")
    n_heads = hf.get("num_attention_heads", 12)
    return Config(
        d_model=d, n_layers=hf.get("num_hidden_layers", 12), n_heads=n_heads, d_head=d // n_heads,
        d_mlp=hf.get("ffn_dim", 3072), d_vocab=hf.get("vocab_size", 50272),
        n_ctx=hf.get("max_position_embeddings", 2048),
        act_fn=c.act_fn(hf.get("activation_function", "relu"), "opt", "activation_function"),
        eps=1e-5, normalization_type="LN",
    )


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    if t.has("model.decoder.embed_tokens.weight"):
        t.strip_prefix("model.")
    L, H, D, M = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_mlp
    bias = bool(hf.get("enable_bias", True))
    affine = bool(hf.get("layer_norm_elementwise_affine", True))
    p = "decoder.layers.{}."

    def lin_b(name, n):
        return t.take_layers(p + name + ".bias", L, (n,)) if bias else c.zeros(L, n)

    def ln(fmt, stacked=True):
        if not affine:
            shape = (L, D) if stacked else (D,)
            return {"w": np.ones(shape, np.float32), "b": np.zeros(shape, np.float32)}
        get = (lambda s: t.take_layers(fmt + s, L, (D,))) if stacked else (lambda s: t.take(fmt + s, (D,)))
        return {"w": get(".weight"), "b": get(".bias")}

    attn = {f"W_{X}": c.linear_heads(t.take_layers(p + f"self_attn.{n}_proj.weight", L, (D, D)), H)
            for X, n in (("Q", "q"), ("K", "k"), ("V", "v"))}
    attn |= {f"b_{X}": c.bias_heads(lin_b(f"self_attn.{n}_proj", D), H)
             for X, n in (("Q", "q"), ("K", "k"), ("V", "v"))}
    attn["W_O"] = c.out_heads(t.take_layers(p + "self_attn.out_proj.weight", L, (D, D)), H)
    attn["b_O"] = lin_b("self_attn.out_proj", D)
    W_E = t.take("decoder.embed_tokens.weight", (cfg.d_vocab, D))
    W_pos = t.take("decoder.embed_positions.weight", (cfg.n_ctx + POSITION_OFFSET, D))[POSITION_OFFSET:]
    return {
        "embed": {"W_E": W_E},
        "pos_embed": {"W_pos": np.ascontiguousarray(W_pos)},
        "blocks": {
            "ln1": ln(p + "self_attn_layer_norm"),
            "attn": attn,
            "ln2": ln(p + "final_layer_norm"),
            "mlp": {"W_in": c.transpose(t.take_layers(p + "fc1.weight", L, (M, D))), "b_in": lin_b("fc1", M),
                    "W_out": c.transpose(t.take_layers(p + "fc2.weight", L, (D, M))),
                    "b_out": lin_b("fc2", D)},
        },
        "ln_final": ln("decoder.final_layer_norm", stacked=False),
        "unembed": {"W_U": c.unembed_weight(t, "lm_head.weight", W_E, hf, "opt", True),
                    "b_U": c.zeros(cfg.d_vocab)},
    }
