"""GPT-BigCode (HF `GPTBigCodeForCausalLM`: SantaCoder, StarCoder) -> jaxlens Config and Params (Allal et al.
2023, "SantaCoder"; Li et al. 2023, "StarCoder"): GPT-2 with

- multi-query attention (`multi_query`, the default): one key/value head shared by every query head
  (n_key_value_heads=1), in one fused `c_attn` whose rows are [q (n_heads * d_head); k (d_head); v (d_head)];
  with multi_query=False `c_attn` holds each head's q, k, v in turn (rows [head, qkv, d_head]);
- `nn.Linear` weights ([out, in]) instead of GPT-2's Conv1D ([in, out]);
- tied embeddings by default.

Config keys may use transformers' generic names (`hidden_size`, `num_hidden_layers`, ...), which
`GPTBigCodeConfig.attribute_map` maps to `n_embd`, `n_layer`, ...; they are read the same way.
"""

from collections.abc import Mapping
from typing import Any

import einops
import numpy as np

from jaxlens.config import Config
from jaxlens.converters import _common as c
from jaxlens.converters._checkpoint import TensorSource
from jaxlens.converters._hf_config import check_hf_config
from jaxlens.errors import CheckpointError

ARCHITECTURES = ("GPTBigCodeForCausalLM", "GPTBigCodeModel")
#: transformers' `GPTBigCodeConfig.attribute_map`: generic config names -> this family's names.
ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
           "num_hidden_layers": "n_layer"}
HANDLED = frozenset({
    "n_embd", "n_layer", "n_head", "n_inner", "vocab_size", "n_positions", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "multi_query", "num_key_value_heads",
})
# dropout; and whether softmax runs in float32 (jaxlens always computes attention softmax in float32)
IGNORED = frozenset({"resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_softmax_in_fp32",
                     "scale_attention_softmax_in_fp32"})


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    hf = _canonical(hf)
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="gpt_bigcode")
    d, n_heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    kv = 1 if hf.get("multi_query", True) else n_heads
    if hf.get("num_key_value_heads", kv) != kv:
        raise CheckpointError(
            f"gpt_bigcode: num_key_value_heads={hf['num_key_value_heads']} disagrees with multi_query="
            f"{hf.get('multi_query', True)} (which means {kv} key/value head(s) for n_head={n_heads}); "
            "GPT-BigCode has one key/value head (multi_query=True) or one per query head (False).")
    return Config(
        d_model=d, n_layers=hf.get("n_layer", 12), n_heads=n_heads, d_head=d // n_heads,
        d_mlp=hf.get("n_inner") or 4 * d, d_vocab=hf.get("vocab_size", 50257),
        n_ctx=hf.get("n_positions", 1024), n_key_value_heads=kv,
        act_fn=c.act_fn(hf.get("activation_function", "gelu_pytorch_tanh"), "gpt_bigcode",
                        "activation_function"),
        eps=hf.get("layer_norm_epsilon", 1e-5), normalization_type="LN",
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
    )


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    if t.has("transformer.wte.weight"):
        t.strip_prefix("transformer.")
    L, H, G, D, E, M = cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    qkv_w = t.take_layers("h.{}.attn.c_attn.weight", L, (D + 2 * G * E, D))
    qkv_b = t.take_layers("h.{}.attn.c_attn.bias", L, (D + 2 * G * E,))
    if G == 1:  # multi-query: rows [q; k; v]
        (q, k, v), (bq, bk, bv) = (np.split(x, [D, D + E], axis=1) for x in (qkv_w, qkv_b))
        W_Q, W_K, W_V = c.linear_heads(q, H), c.linear_heads(k, 1), c.linear_heads(v, 1)
        b_Q, b_K, b_V = c.bias_heads(bq, H), c.bias_heads(bk, 1), c.bias_heads(bv, 1)
    else:  # one kv head per query head: rows [head, (q, k, v), d_head]
        W_Q, W_K, W_V = einops.rearrange(qkv_w, "l (h qkv e) d -> qkv l h d e", qkv=3, h=H)
        b_Q, b_K, b_V = einops.rearrange(qkv_b, "l (h qkv e) -> qkv l h e", qkv=3, h=H)
    W_E = t.take("wte.weight", (cfg.d_vocab, D))
    ln = lambda name: {"w": t.take_layers(f"h.{{}}.{name}.weight", L, (D,)),
                       "b": t.take_layers(f"h.{{}}.{name}.bias", L, (D,))}
    return {
        "embed": {"W_E": W_E},
        "pos_embed": {"W_pos": t.take("wpe.weight", (cfg.n_ctx, D))},
        "blocks": {
            "ln1": ln("ln_1"),
            "attn": {"W_Q": W_Q, "W_K": W_K, "W_V": W_V, "b_Q": b_Q, "b_K": b_K, "b_V": b_V,
                     "W_O": c.out_heads(t.take_layers("h.{}.attn.c_proj.weight", L, (D, D)), H),
                     "b_O": t.take_layers("h.{}.attn.c_proj.bias", L, (D,))},
            "ln2": ln("ln_2"),
            "mlp": {"W_in": c.transpose(t.take_layers("h.{}.mlp.c_fc.weight", L, (M, D))),
                    "b_in": t.take_layers("h.{}.mlp.c_fc.bias", L, (M,)),
                    "W_out": c.transpose(t.take_layers("h.{}.mlp.c_proj.weight", L, (D, M))),
                    "b_out": t.take_layers("h.{}.mlp.c_proj.bias", L, (D,))},
        },
        "ln_final": {"w": t.take("ln_f.weight", (D,)), "b": t.take("ln_f.bias", (D,))},
        "unembed": {"W_U": c.unembed_weight(t, "lm_head.weight", W_E, hf, "gpt_bigcode", tied_default=True),
                    "b_U": c.zeros(cfg.d_vocab)},
    }


def _canonical(hf: Mapping[str, Any]) -> dict[str, Any]:
    """`hf` with generic names (`hidden_size`, ...) renamed to GPT-BigCode's own (`n_embd`, ...).

    Raises:
        CheckpointError: a generic name and its GPT-BigCode name both present, with different values.
    """
    out = dict(hf)
    for generic, own in ALIASES.items():
        if generic in out:
            value = out.pop(generic)
            if out.setdefault(own, value) != value:
                raise CheckpointError(f"gpt_bigcode: config has {generic}={value!r} and {own}={out[own]!r}, "
                                      f"which transformers treats as one setting; keep one.")
    return out
