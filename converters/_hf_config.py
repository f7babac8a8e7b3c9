"""check_hf_config: which Hugging Face config keys a converter accepts, and which it refuses.

A converter refuses a config key only when its value could change the forward pass. A key loads when

- the converter reads it (the family's HANDLED) or knowingly ignores it (IGNORED: dropout rates, ...);
- transformers writes it into configs of every family (`generic_keys`): the attributes of `PretrainedConfig`
  and `GenerationConfig` and the GGUF metadata names, read from the installed transformers, plus `FALLBACK`
  for configs written by older versions or read without transformers; or it is a token id (`*_token_id`);
- it holds its default: the value of the family's transformers config class (`family_defaults`), or, for a key
  that class does not have, a value that leaves an option off (None, False, empty).

Every other key raises CheckpointError naming the key, its value and what to do. transformers (the [hf] extra)
is imported only when a config has keys that the first two rules do not settle.

    check_hf_config(hf, handled=HANDLED, ignored=IGNORED, family="llama")
"""

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

from jaxlens.errors import CheckpointError

# Keys transformers wrote into configs of any family before its generic attributes could be listed from the
# installed version (transformers 4: generation defaults, export and head settings, file metadata). Frozen:
# keys of newer transformers releases come from `generic_keys`, not from additions here.
FALLBACK = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "_model_name_or_path", "_commit_hash", "use_cache", "initializer_range", "output_attentions",
    "output_hidden_states", "return_dict", "tie_word_embeddings", "_attn_implementation",
    "_attn_implementation_autoset", "task_specific_params", "id2label", "label2id", "problem_type",
    "finetuning_task", "tokenizer_class", "prefix", "max_length", "min_length", "do_sample", "num_beams",
    "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "early_stopping", "use_return_dict", "torchscript", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tf_legacy_loss", "use_bfloat16", "quantization_config", "auto_map", "output_router_logits",
    "bad_words_ids", "remove_invalid_values", "typical_p", "num_return_sequences", "diversity_penalty",
    "num_beam_groups", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "sep_token", "gradient_checkpointing", "pretraining_tp",
    "transformers.js_config", "keys_to_ignore_at_inference",
})
TOKEN_ID_SUFFIXES = ("_token_id", "_token_ids")  # tokenizer facts (bos, eos, pad, unk, sep, ...)


def check_hf_config(hf: Mapping[str, Any], *, handled: Iterable[str], ignored: Iterable[str], family: str,
                    model_type: str | None = None) -> None:
    """Raise CheckpointError naming every key of `hf` that could change the forward pass unseen.

    Args:
        hf: the Hugging Face config dict (config.json, or a model's `config.to_diff_dict()`).
        handled, ignored: the family converter's HANDLED and IGNORED keys.
        family: the converter's name (converters/<family>.py), for messages.
        model_type: the transformers model type whose config class gives the defaults; default `family`.

    Raises:
        CheckpointError: a key outside the rules above; a cross-attention or encoder-decoder model.
    """
    known = set(handled) | set(ignored) | FALLBACK
    left = {k: v for k, v in hf.items() if k not in known and not k.endswith(TOKEN_ID_SUFFIXES)}
    if left:  # only now is transformers worth importing
        generic, defaults = generic_keys(), family_defaults(model_type or family)
        refused = {k: _why_refused(k, v, defaults) for k, v in left.items() if k not in generic}
        refused = {k: why for k, why in refused.items() if why is not None}
        if refused:
            details = "; ".join(f"{k}={hf[k]!r} ({why})" for k, why in sorted(refused.items()))
            raise CheckpointError(
                f"The {family} converter does not know the config key(s) {sorted(refused)}: {details}. "
                "Their values may change the forward pass, so jaxlens refuses to guess. If a key does not "
                f"change it, add the key to IGNORED in converters/{family}.py; otherwise teach the converter "
                "to handle it."
            )
    if hf.get("add_cross_attention") or hf.get("is_encoder_decoder"):
        raise CheckpointError(f"{family}: cross-attention / encoder-decoder models are not supported.")


def require(hf: Mapping[str, Any], key: str, allowed, family: str, default=None) -> None:
    """Raise unless hf[key] (or `default` when absent) is in `allowed`."""
    value = hf.get(key, default)
    if value not in allowed:
        raise CheckpointError(
            f"{family}: config {key}={value!r} is not supported "
            f"(jaxlens handles {sorted(map(str, allowed))})."
        )


@functools.cache
def generic_keys() -> frozenset[str]:
    """Config keys transformers writes whatever the family: `FALLBACK`, plus, when transformers is installed,
    the attributes of `PretrainedConfig` and `GenerationConfig` and the keys its GGUF loader fills in."""
    keys = set(FALLBACK)
    transformers = _transformers()
    if transformers is None:
        return frozenset(keys)
    keys |= set(transformers.PretrainedConfig().to_dict()) | set(transformers.GenerationConfig().to_dict())
    if dataclasses.is_dataclass(transformers.PretrainedConfig):  # transformers 5: the generic fields
        keys |= {f.name for f in dataclasses.fields(transformers.PretrainedConfig)}
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:
        return frozenset(keys)
    for section in ("general", "tokenizer"):
        keys |= set(GGUF_CONFIG_MAPPING.get(section, {}).values())
    return frozenset(keys)


@functools.cache
def family_defaults(model_type: str) -> tuple[str, dict[str, Any]] | None:
    """(class name, `to_dict()`) of transformers' default config of `model_type` ("llama": `LlamaConfig()`),
    or None when transformers is not installed or does not know the model type."""
    transformers = _transformers()
    if transformers is None or model_type not in transformers.CONFIG_MAPPING:
        return None
    cls = transformers.CONFIG_MAPPING[model_type]
    return cls.__name__, _plain(cls().to_dict())


def _why_refused(key: str, value: Any, defaults: tuple[str, dict[str, Any]] | None) -> str | None:
    """None if `value` is the key's default (or leaves an unknown option off); else why it may matter."""
    if defaults is not None and key in defaults[1]:
        default = defaults[1][key]
        return None if _plain(value) == default else f"{defaults[0]} defaults it to {default!r}"
    if value is None or value is False or (isinstance(value, (str, list, tuple, dict)) and not value):
        return None
    if defaults is None:
        return "no installed transformers config class to give its default"
    return f"not a {defaults[0]} key"


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def _plain(x: Any) -> Any:
    """JSON-like: tuples as lists, dict keys as strings (config.json's id2label has string keys)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
