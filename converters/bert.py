"""BERT encoders (HF `BertModel`, `BertForMaskedLM`) -> jaxlens Config and encoder params
(Devlin et al. 2019).

    cfg, params = load("path/to/all-MiniLM-L6-v2")          # BertModel: pooler kept as params["pooler"]
    out, cache = jaxlens.encoder.encoder_forward(params, cfg, tokens, attention_mask=mask)

Encoders are not decoders: `HookedTransformer` refuses them and `jaxlens.encoder.HookedEncoder` loads them.
The params tree is the decoder's for the blocks (W_Q [layer head d_model d_head], ...; ln1 / ln2 are the
post-attention and post-MLP LayerNorms) plus `embed.ln`, `token_type_embed.W_token_type`, and the heads the
checkpoint has: `mlm_head` + `unembed` (BertForMaskedLM) or `pooler` (BertModel saved with its pooling layer).
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import einops
import numpy as np

from jaxlens.config import Config
from jaxlens.converters._checkpoint import TensorSource, load_dir_tensors
from jaxlens.converters._hf_config import check_hf_config, require
from jaxlens.errors import CheckpointError

ARCHITECTURES = ("BertModel", "BertForMaskedLM")
HANDLED = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "position_embedding_type",
    "is_decoder",
})
IGNORED = frozenset({
    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "gradient_checkpointing",
})
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "gelu_pytorch_tanh": "gelu_pytorch_tanh"}


def load(source, *, allow_pickle: bool = False) -> tuple[Config, dict]:
    """(Config, numpy encoder params) from a local HF directory or an in-memory `transformers` BERT model.

    Raises:
        CheckpointError: missing config, not a BERT architecture, unknown config keys, missing / leftover /
            misshapen tensors.
    """
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        hf = source.config.to_diff_dict()
        hf.setdefault("architectures", [type(source).__name__])
        sd = {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
              for k, v in source.state_dict().items()}
        return convert(hf, TensorSource(sd, origin=f"in-memory {type(source).__name__}"))
    path = Path(source)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a directory holding config.json and weights of a BERT model.")
    hf = json.loads((path / "config.json").read_text())
    return convert(hf, load_dir_tensors(path, allow_pickle=allow_pickle))


def convert(hf: Mapping[str, Any], t: TensorSource) -> tuple[Config, dict]:
    """(Config, numpy params) from a config dict and its tensors; every tensor must be used."""
    from jaxlens.model.encoder_block import encoder_param_shapes

    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"The BERT converter handles {list(ARCHITECTURES)}; this config names architecture {arch!r}. "
            "Decoder models load with HookedTransformer.from_pretrained."
        )
    cfg = config_from_hf(hf)
    params = params_from_checkpoint(t, cfg, hf)
    t.finish()
    params = {k: _f32(v) for k, v in params.items()}
    _check_shapes(params, encoder_param_shapes(cfg, hf.get("type_vocab_size", 2), tuple(
        h for h in ("mlm_head", "pooler") if h in params)))
    return cfg, params


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="bert")
    require(hf, "position_embedding_type", {"absolute"}, "bert", default="absolute")
    require(hf, "is_decoder", {False}, "bert", default=False)
    require(hf, "hidden_act", set(_ACTS), "bert", default="gelu")
    d, n_heads = hf.get("hidden_size", 768), hf.get("num_attention_heads", 12)
    if d % n_heads:
        raise CheckpointError(f"bert: hidden_size={d} is not a multiple of num_attention_heads={n_heads}.")
    return Config(
        d_model=d, n_layers=hf.get("num_hidden_layers", 12), n_heads=n_heads, d_head=d // n_heads,
        d_mlp=hf.get("intermediate_size", 3072), d_vocab=hf.get("vocab_size", 30522),
        n_ctx=hf.get("max_position_embeddings", 512), act_fn=_ACTS[hf.get("hidden_act", "gelu")],
        eps=hf.get("layer_norm_eps", 1e-12), normalization_type="LN", attention_dir="bidirectional",
        default_prepend_bos=False,
    )


def params_from_checkpoint(t: TensorSource, cfg: Config, hf: Mapping[str, Any]) -> dict:
    if t.has("bert.embeddings.word_embeddings.weight"):
        t.strip_prefix("bert.")
    t.drop(r"embeddings\.position_ids")  # an integer buffer (0..n_ctx-1) of older checkpoints
    L, H, D, M = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_mlp
    lay = "encoder.layer.{}."

    def heads_in(name: str):  # torch Linear [out=(head d_head), in=d_model] -> [layer head d_model d_head]
        w = t.take_layers(lay + f"attention.self.{name}.weight", L, (D, D))
        return einops.rearrange(w, "layer (head d_head) d_model -> layer head d_model d_head", head=H)

    def bias(name: str):
        return einops.rearrange(t.take_layers(lay + f"attention.self.{name}.bias", L, (D,)),
                                "layer (head d_head) -> layer head d_head", head=H)

    def ln(prefix: str, layers: bool = True):
        get = ((lambda n: t.take_layers(prefix + n, L, (D,))) if layers
               else (lambda n: t.take(prefix + n, (D,))))
        return {"w": get("LayerNorm.weight"), "b": get("LayerNorm.bias")}

    W_O = einops.rearrange(t.take_layers(lay + "attention.output.dense.weight", L, (D, D)),
                           "layer d_model (head d_head) -> layer head d_head d_model", head=H)
    W_E = t.take("embeddings.word_embeddings.weight", (cfg.d_vocab, D))
    params = {
        "embed": {"W_E": W_E, "ln": ln("embeddings.", layers=False)},
        "pos_embed": {"W_pos": t.take("embeddings.position_embeddings.weight", (cfg.n_ctx, D))},
        "token_type_embed": {"W_token_type": t.take("embeddings.token_type_embeddings.weight",
                                                    (hf.get("type_vocab_size", 2), D))},
        "blocks": {
            "attn": {"W_Q": heads_in("query"), "W_K": heads_in("key"), "W_V": heads_in("value"), "W_O": W_O,
                     "b_Q": bias("query"), "b_K": bias("key"), "b_V": bias("value"),
                     "b_O": t.take_layers(lay + "attention.output.dense.bias", L, (D,))},
            "ln1": ln(lay + "attention.output."),
            "mlp": {"W_in": t.take_layers(lay + "intermediate.dense.weight", L, (M, D)).transpose(0, 2, 1),
                    "b_in": t.take_layers(lay + "intermediate.dense.bias", L, (M,)),
                    "W_out": t.take_layers(lay + "output.dense.weight", L, (D, M)).transpose(0, 2, 1),
                    "b_out": t.take_layers(lay + "output.dense.bias", L, (D,))},
            "ln2": ln(lay + "output."),
        },
    }
    if t.has("pooler.dense.weight"):  # BertModel's pooling layer: kept, run only when its hook is asked for
        params["pooler"] = {"W": t.take("pooler.dense.weight", (D, D)).T,
                            "b": t.take("pooler.dense.bias", (D,))}
    if t.has("cls.predictions.transform.dense.weight"):
        p = "cls.predictions."
        b_U = t.maybe_take(p + "bias", (cfg.d_vocab,))
        dec_b = t.maybe_take(p + "decoder.bias", (cfg.d_vocab,))  # tied to `bias` in HF; either may be saved
        dec_w = t.maybe_take(p + "decoder.weight", (cfg.d_vocab, D))
        params["mlm_head"] = {"W": t.take(p + "transform.dense.weight", (D, D)).T,
                              "b": t.take(p + "transform.dense.bias", (D,)),
                              "ln": ln(p + "transform.", False)}
        params["unembed"] = {"W_U": (W_E if dec_w is None else dec_w).T,
                             "b_U": b_U if b_U is not None else (dec_b if dec_b is not None
                                                                 else np.zeros(cfg.d_vocab, np.float32))}
    elif hf["architectures"][0] == "BertForMaskedLM":
        raise CheckpointError(f"{t.origin}: a BertForMaskedLM config but no `cls.predictions` tensors.")
    return params


def _f32(tree):
    if isinstance(tree, dict):
        return {k: _f32(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, np.float32)


def _check_shapes(params: dict, table: dict, path: str = "") -> None:
    """Raise CheckpointError unless `params` has exactly the names and shapes of `table`."""
    if set(params) != set(table):
        raise CheckpointError(f"BERT params{path}: keys {sorted(params)} differ from the expected "
                              f"{sorted(table)}.")
    for k, v in table.items():
        if isinstance(v, dict):
            _check_shapes(params[k], v, f"{path}[{k!r}]")
        elif tuple(params[k].shape) != tuple(v[1]):
            raise CheckpointError(f"BERT params{path}[{k!r}] has shape {params[k].shape}, expected {v[1]}.")
