"""Tokenization with TransformerLens's conventions: BOS prepended by the library (not the tokenizer), batches
padded on the tokenizer's padding side (right unless set), optionally truncated to the model's context (TL's
`to_tokens(truncate=True)`, its default).

The tokenizer is a Hugging Face `PreTrainedTokenizerFast` (from a local directory or built from GGUF
metadata).
"""

from pathlib import Path

import numpy as np

from jaxlens.errors import InputError


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer saved in a local directory, or None if it holds none."""
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def bos_id(tokenizer) -> int:
    """BOS id (TL falls back to EOS for tokenizers without BOS, as GPT-2's)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise InputError("The tokenizer has neither a BOS nor an EOS token; pass prepend_bos=False.")
    return bos


def encode(tokenizer, text: str | list[str], prepend_bos: bool, *, padding_side: str = "right",
           max_length: int | None = None) -> np.ndarray:
    """Token ids [batch pos] (int32); rows of a list of strings are padded with the pad (or EOS) token on
    `padding_side` ("right" or "left"); with `max_length` each row is cut to its first max_length tokens (BOS
    included)."""
    if tokenizer is None:
        raise InputError("This model has no tokenizer; pass token ids, or give one to HookedTransformer.")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise InputError("Nothing to tokenize: the input list is empty.")
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if prepend_bos:
        rows = [[bos_id(tokenizer)] + r for r in rows]
    if max_length is not None:
        rows = [r[:max_length] for r in rows]
    if any(len(r) == 0 for r in rows):
        raise InputError("Empty prompt: it has no tokens. Pass some text, or prepend_bos=True.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, rows))
    if pad is None and any(len(r) < width for r in rows):
        raise InputError("Prompts of different lengths need a pad or EOS token to pad with.")
    if padding_side not in ("right", "left"):
        raise InputError(f"padding_side must be 'right' or 'left'; found {padding_side!r}.")
    if padding_side == "left":
        return np.asarray([[pad] * (width - len(r)) + r for r in rows], np.int32)
    return np.asarray([r + [pad] * (width - len(r)) for r in rows], np.int32)
