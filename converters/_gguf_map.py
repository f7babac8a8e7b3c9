"""GGUF names -> Hugging Face names: a llama.cpp file's metadata and tensors as the config dict and tensor
names that the family converters (`jaxlens.converters.llama`, `mixtral`, `qwen2`, `qwen3`, `qwen3_moe`,
`gemma`, `gemma3`, `phi3`, `olmo2`, `gpt_bigcode` for llama.cpp's `starcoder`, `cohere` for `command-r`)
already read.

llama.cpp's `convert_hf_to_gguf.py` renames every Hugging Face tensor
(`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`), moves the config into `<arch>.*` metadata
keys (`llama.block_count`, `llama.attention.head_count_kv`, ...), and changes a few tensors on the way. This
module undoes all of it:

- Llama: the rows of `attn_q` / `attn_k` (weights and biases) are permuted per head from the rotate-half order
  of Hugging Face to the interleaved pairs llama.cpp's rope kernel reads; `reverse_permute` restores them (as
  transformers' `LlamaTensorProcessor` does).
- Gemma (and Gemma 3, q/k norms included): RMSNorm weights are stored as 1 + w; the Hugging Face w is the
  stored value minus 1.
- The output head is absent when the embeddings are tied (`tie_word_embeddings`).
- Gemma 3: the file keeps only the window size. llama.cpp's loader fixes the rest, and so does `_gemma3`:
  every sixth layer global (the others sliding, when the file has a window), local layers rotating with base
  10000 and no scaling (`rope.scaling.*` scales the global layers only), queries scaled by 1/sqrt(head_dim)
  except in the 62-layer 27B (1/sqrt(d_model / n_heads)). The sqrt(d_model) embedding scale is Gemma's own.
  llama.cpp's converter drops the embedding rows past the tokenizer's vocabulary, so d_vocab can be smaller
  than the Hugging Face `vocab_size`; the logits of the kept tokens are unchanged.
- Mixture of experts (Mixtral as `llama` with `expert_count`; `qwen3moe`): the experts of each projection are
  one tensor stacked over experts (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`), the router is
  `ffn_gate_inp`. llama.cpp's Qwen3-MoE graph always renormalises the chosen experts' weights, so
  `norm_topk_prob` is True unless the file says otherwise (`expert_weights_norm`).

    hf, tensors = to_hf(metadata, {name: array})     # config dict and a TensorSource with HF names
    cfg, params = jaxlens.converters.convert(hf, tensors)

A metadata key of the architecture that is not understood, a tensor without a Hugging Face name, or Llama 3.1
style rope frequency factors are errors (a silently dropped key or tensor would change the model).
"""

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxlens.converters._checkpoint import TensorSource
from jaxlens.errors import CheckpointError

# `<arch>.<key>` metadata -> Hugging Face config key (same meaning and units in both).
CONFIG_KEYS: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
}
# `<arch>.<key>` metadata read by `hf_config` itself (checked against the tensors, or made rope_scaling).
CHECKED_KEYS = frozenset({
    "vocab_size", "rope.dimension_count", "attention.value_length", "attention.sliding_window",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length", "expert_count",
    "expert_used_count",
})

# Whole-model tensors: GGUF -> Hugging Face.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per-block tensors `blk.N.<key>.(weight|bias)` -> `model.layers.N.<value>.(weight|bias)`, Llama layout.
LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # a mixture of experts (Mixtral is llama.cpp's `llama` with `llama.expert_count`): the router and the
    # experts stacked [expert, ...] per projection, under the gguf package's own Hugging Face names
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# Qwen3 (and Qwen3-MoE): the Llama layout plus the per-head q/k norms.
QWEN3_BLOCK = {**LLAMA_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 3: Qwen3's attention, norms before and after attention and the MLP (`ffn_norm` is the pre-MLP one).
GEMMA3_BLOCK = {**QWEN3_BLOCK, "ffn_norm": "pre_feedforward_layernorm",
                "post_attention_norm": "post_attention_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
# OLMo 2: Qwen3's attention (q/k norms over the whole projection) with norms after attention and the MLP only.
OLMO2_BLOCK = {**QWEN3_BLOCK, "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
# StarCoder (GPT-BigCode): GPT-2's module names under `transformer.h.N`, the fused multi-query `c_attn`.
STARCODER_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                   "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
STARCODER_GLOBAL = {
    "token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
# Phi-3 keeps Hugging Face's fused projections: attn_qkv is qkv_proj, ffn_up is gate_up_proj ([gate; up]).
PHI3_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}

# finish(meta, hf, shapes, prefix): completes the HF config dict `hf` in place from the `<arch>.*` metadata
# (prefix removed) and the GGUF tensor shapes; prefix is "<arch>." for messages.
Finish = Callable[[Mapping[str, Any], dict[str, Any], Mapping[str, tuple[int, ...]], str], None]


class Architecture(NamedTuple):
    """How one llama.cpp architecture maps back to a Hugging Face one."""

    hf_architecture: str  # `architectures[0]`, which picks the jaxlens converter
    block: Mapping[str, str]  # per-block GGUF name -> HF module path
    extra_config: Mapping[str, Any]  # HF config entries that GGUF does not store (fixed by the architecture)
    permute_qk: bool = False  # undo llama.cpp's rotary row permutation of attn_q / attn_k
    norm_offset: float = 0.0  # added to every norm weight (Gemma stores 1 + w)
    bias_flag: str | None = None  # HF config key set when attn_q has a bias
    config_keys: Mapping[str, str] = {}  # `<arch>.<key>` -> HF key, beyond (or instead of) CONFIG_KEYS
    global_tensors: Mapping[str, str] = GLOBAL_TENSORS  # whole-model tensors: GGUF -> Hugging Face
    layer_prefix: str = "model.layers"  # the Hugging Face path of block N is `<layer_prefix>.N`
    flags: Mapping[str, str] = {}  # HF config key -> GGUF tensor whose presence sets it True
    finish: Finish | None = None  # completes the HF config: what the architecture fixes or derives
    checked_keys: frozenset[str] = frozenset()  # `<arch>.<key>` metadata that `finish` reads
    experts: bool = False  # whether `<arch>.expert_count` (a mixture of experts) is understood


# llama.cpp's Gemma 3 loader: every sixth layer is global, the local layers rotate with base 10000.
GEMMA3_GLOBAL_EVERY, GEMMA3_LOCAL_ROPE_BASE = 6, 10000.0


def _mixtral(meta: Mapping[str, Any], hf: dict[str, Any], shapes: Mapping[str, tuple[int, ...]],
             prefix: str) -> None:
    """Mixtral is llama.cpp's `llama` with `llama.expert_count`."""
    if not meta.get("expert_count", 0):
        return
    _check_router(meta, shapes, prefix)
    hf["architectures"] = ["MixtralForCausalLM"]
    hf["num_local_experts"] = meta["expert_count"]
    hf["num_experts_per_tok"] = meta.get("expert_used_count", 2)
    hf.pop("attention_bias", None)


def _qwen3moe(meta: Mapping[str, Any], hf: dict[str, Any], shapes: Mapping[str, tuple[int, ...]],
              prefix: str) -> None:
    """Qwen3-MoE: experts of width `expert_feed_forward_length` in every layer (`feed_forward_length` is the
    unused dense width), top-k weights renormalised as llama.cpp's graph does."""
    for key in ("expert_count", "expert_used_count"):
        if not meta.get(key):
            raise CheckpointError(
                f"GGUF metadata has no {prefix}{key}, which a {prefix[:-1]} file needs (llama.cpp writes it "
                "from the Hugging Face config). The file is incomplete.")
    _check_router(meta, shapes, prefix)
    hf["num_experts"], hf["num_experts_per_tok"] = meta["expert_count"], meta["expert_used_count"]
    gate = shapes.get("blk.0.ffn_gate_exps.weight")  # [expert, expert width, d_model]
    hf["moe_intermediate_size"] = meta.get("expert_feed_forward_length", gate[1] if gate else None)
    hf["norm_topk_prob"] = bool(meta.get("expert_weights_norm", True))


def _gemma3(meta: Mapping[str, Any], hf: dict[str, Any], shapes: Mapping[str, tuple[int, ...]],
            prefix: str) -> None:
    """What llama.cpp's Gemma 3 loader fixes rather than reads (the module docstring lists it)."""
    n_layers, n_heads = hf.get("num_hidden_layers"), hf["num_attention_heads"]
    if not n_layers:
        raise CheckpointError(f"GGUF metadata has no {prefix}block_count (the number of layers).")
    window = meta.get("attention.sliding_window")
    hf["layer_types"] = ["full_attention" if not window or (i + 1) % GEMMA3_GLOBAL_EVERY == 0
                         else "sliding_attention" for i in range(n_layers)]
    hf.setdefault("sliding_window", window or None)
    hf["rope_local_base_freq"] = GEMMA3_LOCAL_ROPE_BASE
    hf.setdefault("head_dim", hf["hidden_size"] // n_heads)
    hf["query_pre_attn_scalar"] = hf["hidden_size"] // n_heads if n_layers == 62 else hf["head_dim"]
    hf.setdefault("final_logit_softcapping", None)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaForCausalLM", LLAMA_BLOCK, {"hidden_act": "silu"}, permute_qk=True,
                          bias_flag="attention_bias", finish=_mixtral, experts=True),
    "qwen2": Architecture("Qwen2ForCausalLM", LLAMA_BLOCK, {"hidden_act": "silu"}),
    "gemma": Architecture("GemmaForCausalLM", LLAMA_BLOCK, {"hidden_activation": "gelu_pytorch_tanh"},
                          norm_offset=-1.0, bias_flag="attention_bias"),
    "phi3": Architecture("Phi3ForCausalLM", PHI3_BLOCK, {"hidden_act": "silu"}),
    "qwen3": Architecture("Qwen3ForCausalLM", QWEN3_BLOCK, {"hidden_act": "silu"},
                          bias_flag="attention_bias"),
    "qwen3moe": Architecture("Qwen3MoeForCausalLM", QWEN3_BLOCK, {"hidden_act": "silu"},
                             bias_flag="attention_bias", finish=_qwen3moe, experts=True,
                             checked_keys=frozenset({"expert_feed_forward_length", "expert_weights_norm"})),
    "gemma3": Architecture("Gemma3ForCausalLM", GEMMA3_BLOCK, {"hidden_activation": "gelu_pytorch_tanh"},
                           norm_offset=-1.0, bias_flag="attention_bias", finish=_gemma3,
                           config_keys={"final_logit_softcapping": "final_logit_softcapping"}),
    "olmo2": Architecture("Olmo2ForCausalLM", OLMO2_BLOCK, {"hidden_act": "silu"},
                          bias_flag="attention_bias"),
    # llama.cpp writes StarCoder with one key/value head (head_count_kv 1) and feed_forward_length 4 * n_embd;
    # the gpt_bigcode converter reads the generic names (hidden_size, ...) and checks them against the tensors
    "starcoder": Architecture(
        "GPTBigCodeForCausalLM", STARCODER_BLOCK, {}, global_tensors=STARCODER_GLOBAL,
        layer_prefix="transformer.h",
        config_keys={"feed_forward_length": "n_inner", "attention.layer_norm_epsilon": "layer_norm_epsilon"}),
    "command-r": Architecture(
        "CohereForCausalLM", LLAMA_BLOCK, {"hidden_act": "silu"}, bias_flag="attention_bias",
        config_keys={"attention.layer_norm_epsilon": "layer_norm_eps", "logit_scale": "logit_scale"},
        flags={"use_qk_norm": "blk.0.attn_q_norm.weight"}),
}
SUPPORTED = tuple(ARCHITECTURES)

_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def to_hf(metadata: Mapping[str, Any], tensors: Mapping[str, np.ndarray], origin: str = "GGUF file", *,
          consume: bool = False) -> tuple[dict[str, Any], TensorSource]:
    """The Hugging Face config dict and a TensorSource under Hugging Face names, for `converters.convert`.

    Args:
        metadata: the GGUF header as plain values (`GGUFFile.metadata`).
        tensors: GGUF tensor name -> float32 array, e.g. from `cached_dequantize`.
        origin: where the tensors came from, for messages.
        consume: remove each array from `tensors` (a dict) when the converter takes it, so that the
            dequantised copy of a tensor is freed as soon as it is in the params (lower peak memory).

    Raises:
        CheckpointError: unsupported architecture, unknown or inconsistent metadata, a tensor with no
            Hugging Face name, or Llama 3.1 rope frequency factors.
    """
    arch = architecture(metadata)
    shapes = {name: tuple(np.shape(t)) for name, t in tensors.items()}
    hf = hf_config(metadata, shapes)
    spec = ARCHITECTURES[arch]
    readers: dict = {}
    for name, tensor in tensors.items():
        get = (lambda n=name: tensors.pop(n)) if consume else (lambda t=tensor: t)
        hf_name = hf_tensor_name(name, arch)
        if hf_name is None:  # no HF name: kept under its GGUF name, so TensorSource.finish reports it unused
            readers[name] = get
            continue
        readers[hf_name] = _fixed(get, name, hf, spec)
    return hf, TensorSource(readers, origin=origin)


def config_overrides(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """`Config` fields the GGUF file decides beyond the Hugging Face config: `default_prepend_bos` follows
    `tokenizer.ggml.add_bos_token` (whether llama.cpp, and the GGUF tokenizer, prepend BOS) when present."""
    if "tokenizer.ggml.add_bos_token" in metadata:
        return {"default_prepend_bos": bool(metadata["tokenizer.ggml.add_bos_token"])}
    return {}


def architecture(metadata: Mapping[str, Any]) -> str:
    """`general.architecture`, checked to be one that jaxlens maps.

    Raises:
        CheckpointError: missing or unsupported architecture, or one part of a split file.
    """
    arch = metadata.get("general.architecture")
    if arch is None:
        raise CheckpointError("The GGUF metadata has no `general.architecture`; the file is not a model file "
                              "written by llama.cpp's converter (or is corrupt).")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported by jaxlens; it maps {list(SUPPORTED)}. Load the "
            "model from its Hugging Face directory (config.json + *.safetensors) instead."
        )
    if int(metadata.get("split.count", 1)) > 1:
        raise CheckpointError(
            f"This metadata is that of one part of a GGUF model split into {metadata['split.count']} files; "
            "open the model with `read_gguf` (or `jaxlens.converters.load`), which reads every part."
        )
    return arch


def hf_config(metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Hugging Face config dict (`architectures`, `hidden_size`, ...) from GGUF metadata and tensor shapes.

    The vocabulary size is the embedding's row count; `tie_word_embeddings` is whether `output.weight` is
    absent;
    `attention_bias` (Llama, Gemma) whether `blk.0.attn_q.bias` is present.

    Raises:
        CheckpointError: a metadata key of the architecture that jaxlens does not understand, a per-layer
            list where one number is expected, or values that contradict the tensors.
    """
    arch = architecture(metadata)
    spec = ARCHITECTURES[arch]
    prefix = arch + "."
    meta = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    keys = {**CONFIG_KEYS, **spec.config_keys}
    unknown = sorted(prefix + k for k in meta if k not in keys and k not in CHECKED_KEYS | spec.checked_keys)
    if unknown:
        raise CheckpointError(
            f"GGUF metadata key(s) {unknown} are not understood by jaxlens' {arch} mapping "
            "(converters/_gguf_map.py). They may change the architecture, so jaxlens refuses to guess."
        )
    hf: dict[str, Any] = {"architectures": [spec.hf_architecture], **spec.extra_config}
    for key, hf_key in keys.items():
        if key in meta:
            value = meta[key]
            if isinstance(value, list):
                raise CheckpointError(f"GGUF metadata {prefix}{key} is a per-layer list {value[:4]}...; "
                                      "jaxlens supports one value for all layers.")
            hf[hf_key] = value

    if "token_embd.weight" not in shapes:
        raise CheckpointError("The GGUF file has no token_embd.weight tensor (the token embedding).")
    vocab, d_model = shapes["token_embd.weight"]
    hf["vocab_size"] = vocab
    if meta.get("vocab_size", vocab) != vocab:
        raise CheckpointError(f"GGUF metadata {prefix}vocab_size={meta['vocab_size']} but token_embd.weight "
                              f"has {vocab} rows. The file is inconsistent.")
    if hf.setdefault("hidden_size", d_model) != d_model:
        raise CheckpointError(f"GGUF metadata {prefix}embedding_length={hf['hidden_size']} but "
                              f"token_embd.weight has {d_model} columns. The file is inconsistent.")
    hf["tie_word_embeddings"] = "output.weight" not in shapes
    if spec.bias_flag:
        hf[spec.bias_flag] = "blk.0.attn_q.bias" in shapes
    for key, tensor in spec.flags.items():
        hf[key] = tensor in shapes

    _check_head_dims(meta, hf, prefix)
    if meta.get("expert_count", 0) and not spec.experts:
        moe = [name for name, a in ARCHITECTURES.items() if a.experts]
        raise CheckpointError(
            f"GGUF metadata {prefix}expert_count={meta['expert_count']}: jaxlens maps mixture-of-experts "
            f"GGUF files of the architectures {moe} (llama: Mixtral) only, not {arch!r}. Load the model from "
            "its Hugging Face directory.")
    window = meta.get("attention.sliding_window")
    if window:  # 0 means no window (llama.cpp writes 0 for Phi-4)
        hf["sliding_window"] = window
    if spec.finish is not None:
        spec.finish(meta, hf, shapes, prefix)
    scaling = meta.get("rope.scaling.type", "none")
    if scaling != "none":  # handed to the family converter, which accepts or refuses the type by name
        hf["rope_scaling"] = {"rope_type": scaling, "factor": meta.get("rope.scaling.factor", 1.0)}
        if "rope.scaling.original_context_length" in meta:
            original = meta["rope.scaling.original_context_length"]
            hf["rope_scaling"]["original_max_position_embeddings"] = original
    if "rope_freqs.weight" in shapes:
        raise CheckpointError(
            "The GGUF file has a rope_freqs.weight tensor: per-frequency rope factors (Llama 3.1-style rope "
            "scaling, or Phi-3 longrope), which llama.cpp stores only as the factors. jaxlens cannot recover "
            "the scaling parameters from them; load the model from its Hugging Face directory instead."
        )
    return hf


def hf_tensor_name(name: str, arch: str) -> str | None:
    """The Hugging Face name of GGUF tensor `name` for `arch`, or None when it has none."""
    spec = ARCHITECTURES[arch]
    if name in spec.global_tensors:
        return spec.global_tensors[name]
    m = _BLOCK_NAME.fullmatch(name)
    if m is None or m.group(2) not in spec.block:
        return None
    layer, key, kind = m.groups()
    return f"{spec.layer_prefix}.{layer}.{spec.block[key]}.{kind}"


def reverse_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of attn_q / attn_k rows (weights [heads*d_head, d_model], biases).

    llama.cpp reorders each head's d_head rows from Hugging Face's rotate-half layout (first half, second
    half) to interleaved pairs: row 2i + j of a head came from row j * d_head/2 + i. Here the rows go back.

    Args:
        w: the GGUF tensor, first axis n_heads * d_head (n_heads is n_key_value_heads for attn_k).
        n_heads: heads the rows split into.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"Cannot undo llama.cpp's rotary permutation: {rows} rows do not split into "
                              f"{n_heads} heads of an even size. The head counts in the metadata are wrong.")
    half = rows // n_heads // 2
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _check_router(meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], prefix: str) -> None:
    if "blk.0.ffn_gate_inp.weight" not in shapes:
        raise CheckpointError(
            f"GGUF metadata {prefix}expert_count={meta['expert_count']} says mixture-of-experts, but the "
            "file has no router tensor blk.0.ffn_gate_inp.weight. The file is inconsistent.")


def _check_head_dims(meta: Mapping[str, Any], hf: dict[str, Any], prefix: str) -> None:
    n_heads = hf.get("num_attention_heads")
    if not n_heads:
        raise CheckpointError(f"GGUF metadata has no {prefix}attention.head_count.")
    d_head = hf.get("head_dim") or hf["hidden_size"] // n_heads
    value = meta.get("attention.value_length", d_head)
    if value != d_head:
        raise CheckpointError(f"GGUF metadata {prefix}attention.value_length={value} differs from the key "
                              f"length {d_head}; jaxlens needs equal query/key and value head sizes.")
    rot = meta.get("rope.dimension_count", d_head)
    if rot != d_head:
        raise CheckpointError(f"GGUF metadata {prefix}rope.dimension_count={rot} differs from the head size "
                              f"{d_head}: partial rotary embeddings are not supported for this architecture.")


def _fixed(get, name: str, hf: Mapping[str, Any], spec: Architecture):
    """A reader of the tensor `get()` returns, with llama.cpp's changes to it undone."""
    is_q, is_k = ".attn_q." in name, ".attn_k." in name
    if spec.permute_qk and (is_q or is_k):
        n = hf["num_attention_heads"] if is_q else hf.get("num_key_value_heads") or hf["num_attention_heads"]
        return lambda: reverse_permute(np.asarray(get()), n)
    if spec.norm_offset and name.endswith("norm.weight"):
        return lambda: np.asarray(get()) + np.float32(spec.norm_offset)
    return get
