"""A Hugging Face fast tokenizer rebuilt from a GGUF file's tokenizer metadata (`tokenizer.ggml.*`).

    tokenizer = tokenizer_from_gguf(read_gguf(path).metadata)
"""

from collections.abc import Mapping
from typing import Any

from jaxlens.errors import CheckpointError


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Any:
    """A Hugging Face fast tokenizer rebuilt from a GGUF file's tokenizer metadata.

    Uses transformers' own GGUF tokenizer builders (`transformers.integrations.gguf`), so the result tokenizes
    as `AutoTokenizer.from_pretrained(dir, gguf_file=name)` does: same vocabulary, merges, pre-tokenizer,
    control and user-defined tokens, and bos/eos/unk/pad from `tokenizer.ggml.*_token_id`.

    Args:
        metadata: `GGUFFile.metadata` (or the metadata `cached_dequantize` returns); it must hold
            `tokenizer.ggml.model` and `tokenizer.ggml.tokens`.

    Returns:
        A `transformers.PreTrainedTokenizerFast`.

    Raises:
        CheckpointError: the metadata has no tokenizer, or one transformers cannot build.
        ImportError: transformers is missing or too old to have `transformers.integrations.gguf`.
    """
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError as e:
        raise ImportError(
            f"tokenizer_from_gguf needs a transformers version with `transformers.integrations.gguf` ({e}). "
            "Install or upgrade it: pip install -U 'jaxlens-interp[hf]'."
        ) from e

    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in metadata]
    if missing:
        raise CheckpointError(f"GGUF metadata has no tokenizer: {', '.join(missing)} missing. "
                              "Load the tokenizer from the model's Hugging Face files instead.")
    # Same grouping as transformers' `get_gguf_tokenizer`, which reads the file; here the metadata is read.
    grouped = {
        group: {new: metadata[f"tokenizer.{k}"] for k, new in renames.items() if f"tokenizer.{k}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokenizer_type = tokenizer_dict.get("tokenizer_type")
    if tokenizer_type == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece vocabularies
    elif tokenizer_type == "gemma4":
        config["add_bos_token"] = False  # the chat template writes <bos> itself
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise CheckpointError(f"GGUF metadata tokenizer.ggml.{key}={token_id} is outside the vocabulary "
                                  f"of {len(tokens)} tokens. The file is corrupt.")
        config[name] = tokens[token_id] if token_id is not None else None

    architecture = metadata.get("general.architecture", "")
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as e:
        raise CheckpointError(f"Cannot build a tokenizer from GGUF metadata: {e}") from e
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
