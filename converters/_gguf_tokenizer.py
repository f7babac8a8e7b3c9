"""A Hugging Face fast tokenizer rebuilt from a GGUF file's tokenizer metadata (`tokenizer.ggml.*`).

transformers' GGUF builders do the work: byte-level BPE for `tokenizer.ggml.model` "gpt2" (Qwen, OLMo 2,
StarCoder, Command R, SmolLM), SentencePiece-style BPE for "llama" (Llama 2, Mistral, Phi-3, and Gemma /
Gemma 3, whose merges are rebuilt from the vocabulary order). Before BPE, llama.cpp splits byte-level text the
way `tokenizer.ggml.pre` names; transformers knows some of those splits, `PRE_TOKENIZERS` adds the ones of the
families jaxlens maps (llama.cpp's `llama-vocab.cpp` regexes), and any other name is an error rather than a
silent GPT-2 split.

    tokenizer = tokenizer_from_gguf(read_gguf(path).metadata)
"""

import json
from collections.abc import Mapping
from typing import Any

from jaxlens.errors import CheckpointError

# `tokenizer.ggml.pre` names transformers' GGUF builder has no split for -> whether llama.cpp isolates every
# digit before GPT-2's regex split (StarCoder-style vocabularies: StarCoder, SmolLM, Refact, Command R, ...)
# or uses GPT-2's split alone (GPT-2, MPT, OLMo). Their tokenizer.json files split the same way.
PRE_TOKENIZERS = {
    **dict.fromkeys(("starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    True),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), False),
}


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
        CheckpointError: the metadata has no tokenizer, one transformers cannot build, or a byte-level one
            whose `tokenizer.ggml.pre` split is unknown (neither transformers' nor `PRE_TOKENIZERS`).
        ImportError: transformers is missing or too old to have `transformers.integrations.gguf`.
    """
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import gguf_tokenizer_mapping
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

    pre = tokenizer_dict.get("pre_tokenizer_type")
    known_splits = getattr(gguf_tokenizer_mapping, "GGUF_PRE_TOKENIZER_SPLITS", {})
    split = None
    if tokenizer_type == "gpt2" and pre is not None and pre not in known_splits:
        if pre not in PRE_TOKENIZERS:
            raise CheckpointError(
                f"GGUF metadata tokenizer.ggml.pre={pre!r}: jaxlens cannot rebuild how llama.cpp splits text "
                f"for this vocabulary; it knows {sorted({*known_splits, *PRE_TOKENIZERS})}. Pass the model's "
                "own Hugging Face tokenizer instead (from_pretrained(..., tokenizer=AutoTokenizer."
                "from_pretrained(repo))).")
        split = _gpt2_split(digits=PRE_TOKENIZERS[pre])
    architecture = metadata.get("general.architecture", "")
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as e:
        raise CheckpointError(f"Cannot build a tokenizer from GGUF metadata: {e}") from e
    if split is not None:
        backend.pre_tokenizer = split
    backend = _within_vocabulary(backend, len(tokens))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def _gpt2_split(digits: bool) -> Any:
    """GPT-2's byte-level regex split, after isolating every digit when `digits`."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not digits:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def _within_vocabulary(backend: Any, n_tokens: int) -> Any:
    """`backend` without the tokens transformers' builders add past the file's vocabulary (their class's
    default special tokens when the vocabulary lacks them: GPT-2's `<|endoftext|>`, Gemma's `<mask>`): ids
    at or past `n_tokens` would index past the model's embedding."""
    if backend.get_vocab_size(with_added_tokens=True) <= n_tokens:
        return backend
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < n_tokens]
    return Tokenizer.from_str(json.dumps(spec))
