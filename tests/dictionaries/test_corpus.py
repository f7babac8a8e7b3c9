"""The offline corpus: registered sources, text files and token arrays, tokenised into a cached memory-mapped
file; rows checked against tokenising by hand; empty and missing corpora give clear errors."""

import numpy as np
import pytest

from jaxlens import testing
from jaxlens.dictionaries import corpus
from jaxlens.dictionaries.corpus import CorpusError, TokenCorpus, load_corpus


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return testing.train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _by_hand(tok, docs):
    out = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [tok.bos_token_id]
    return np.asarray(out)


def test_text_file_tokenised_as_by_hand_and_cached(tok, tmp_path):
    text = "The quick brown fox.\n\nJumps over the lazy dog.\n\n\n\nMary went to the store."
    path = tmp_path / "notes.txt"
    path.write_text(text)
    cache = tmp_path / "cache"
    c = load_corpus(path, tok, cache_dir=cache)
    # whole paragraphs into one document of about 4000 characters: the paragraphs rejoined by blank lines
    doc = "The quick brown fox.\n\nJumps over the lazy dog.\n\nMary went to the store."
    np.testing.assert_array_equal(np.asarray(c.tokens), _by_hand(tok, [doc]))
    assert isinstance(c.tokens, np.memmap) and c.bos == tok.bos_token_id
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy" and not files[0].name.startswith(".")
    again = load_corpus(path, tok, cache_dir=cache)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(c.tokens))
    assert len(list(cache.iterdir())) == 1  # read from the cache, not written again
    path.write_text(text + " More.")
    load_corpus(path, tok, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2  # other text, other key


def test_sequences_put_bos_before_each_row():
    c = TokenCorpus.from_tokens(np.arange(10, 23), bos=1)  # 13 tokens, rows of 4 = BOS + 3
    np.testing.assert_array_equal(c.sequences(4), [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18],
                                                    [1, 19, 20, 21]])
    np.testing.assert_array_equal(c.sequences(4, [2, 0]), [[1, 16, 17, 18], [1, 10, 11, 12]])
    raw = TokenCorpus.from_tokens(np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(raw.sequences(6), [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    assert c.n_sequences(4) == 4 and raw.n_sequences(5) == 2


def test_registered_sources_are_installed_and_different(tok, tmp_path):
    train = load_corpus(corpus.TRAIN_SOURCE, tok, cache_dir=tmp_path, max_chars=3000)
    held = load_corpus(corpus.HELDOUT_SOURCE, tok, cache_dir=tmp_path, max_chars=3000)
    docs = corpus.SOURCES["fortunes"].read()
    assert len(docs) > 5000 and sum(map(len, docs)) > 2_000_000  # the whole fortunes set, not a stub
    first = []
    for d in docs:
        if sum(map(len, first)) >= 3000:
            break
        first.append(d)
    np.testing.assert_array_equal(np.asarray(train.tokens), _by_hand(tok, first))
    assert "Jargon" in corpus.SOURCES["jargon"].read()[0]
    n = min(len(train.tokens), len(held.tokens))
    assert not np.array_equal(np.asarray(train.tokens[:n]), np.asarray(held.tokens[:n]))
    assert len(load_corpus("pydoc", tok, cache_dir=tmp_path, max_chars=2000).tokens) > 100


def test_empty_corpus_is_a_clear_error(tok, tmp_path):
    for text in ("", "\n\n   \n"):
        (tmp_path / "empty.txt").write_text(text)
        with pytest.raises(CorpusError, match="is empty: it has no text"):
            load_corpus(tmp_path / "empty.txt", tok, cache_dir=tmp_path / "c")
    with pytest.raises(CorpusError, match="is empty"):
        TokenCorpus.from_tokens(np.zeros((0,), np.int32))
    with pytest.raises(CorpusError, match="fewer than one sequence of context_size=64"):
        TokenCorpus.from_tokens(np.arange(10), bos=0).sequences(64)


def test_bad_sources_are_clear_errors(tok, tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match="neither a registered source .*fortunes.* nor a text file"):
        load_corpus("no-such-corpus", tok, cache_dir=tmp_path)
    monkeypatch.setattr(corpus, "FORTUNES_DIR", tmp_path / "absent")
    with pytest.raises(CorpusError, match="not installed .*apt-get install --no-install-recommends fortunes"):
        load_corpus("fortunes", tok, cache_dir=tmp_path)
    with pytest.raises(CorpusError, match="integer ids of shape"):
        TokenCorpus.from_tokens(np.ones((2, 2, 2), np.int32))
    with pytest.raises(CorpusError, match="integer ids"):
        TokenCorpus.from_tokens(np.ones(5, np.float32))
