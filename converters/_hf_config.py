"""check_hf_config: an allowlist of the Hugging Face config keys a converter handles or knowingly ignores.

A key that is neither is an error: it may change the architecture in a way the converter does not model.
"""

from collections.abc import Iterable, Mapping
from typing import Any

from jaxlens.errors import CheckpointError

# Keys any Hugging Face config may carry that do not change the forward pass of a float32 model.
COMMON_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache",
    "initializer_range", "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings",
    "_attn_implementation", "_attn_implementation_autoset", "task_specific_params", "id2label", "label2id",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "max_length", "min_length", "do_sample",
    "num_beams", "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "early_stopping", "use_return_dict", "torchscript", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tf_legacy_loss", "use_bfloat16", "quantization_config", "auto_map", "output_router_logits",
    "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "typical_p",
    "num_return_sequences", "diversity_penalty", "num_beam_groups", "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "sep_token",
    "gradient_checkpointing", "pretraining_tp", "transformers.js_config", "keys_to_ignore_at_inference",
})


def check_hf_config(hf: Mapping[str, Any], *, handled: Iterable[str], ignored: Iterable[str], family: str) -> None:
    """Raise CheckpointError naming every key of `hf` that the `family` converter neither handles nor ignores.

    Dropout rates and other training-only keys belong in `ignored`; `COMMON_IGNORED` is always allowed.
    """
    known = set(handled) | set(ignored) | COMMON_IGNORED
    unknown = sorted(k for k in hf if k not in known)
    if unknown:
        raise CheckpointError(
            f"The {family} converter does not know the config key(s) {unknown}. They may change the "
            "architecture, so jaxlens refuses to guess. If a key is irrelevant to the forward pass, add it to "
            f"the converter's IGNORED set (converters/{family}.py); otherwise teach the converter to handle it."
        )
    if hf.get("add_cross_attention") or hf.get("is_encoder_decoder"):
        raise CheckpointError(f"{family}: cross-attention / encoder-decoder models are not supported.")


def require(hf: Mapping[str, Any], key: str, allowed, family: str, default=None) -> None:
    """Raise unless hf[key] (or `default` when absent) is in `allowed`."""
    value = hf.get(key, default)
    if value not in allowed:
        raise CheckpointError(
            f"{family}: config {key}={value!r} is not supported (jaxlens handles {sorted(map(str, allowed))})."
        )
