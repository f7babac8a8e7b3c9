"""The GGUF dequantisation cache (jaxlens.converters._gguf_cache): reuse, keys, atomic writes, killed writers,
corruption. On test_gguf.py's small file."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
from test_gguf import make_small_gguf, write_gguf

from jaxlens.converters import _gguf_cache
from jaxlens.converters._gguf_cache import cached_dequantize
from jaxlens.converters._gguf_split import dequantize_all


@pytest.fixture
def small_gguf(tmp_path) -> Path:
    return make_small_gguf(tmp_path / "small.gguf")


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of the real dequantisation behind cached_dequantize."""
    calls = []
    real = _gguf_cache.dequantize_all

    def counting(path, *, progress=True):
        calls.append(path)
        return real(path, progress=progress)

    monkeypatch.setattr(_gguf_cache, "dequantize_all", counting)
    return calls


def _final_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def _assert_same(result, expected):
    (m1, t1), (m2, t2) = result, expected
    assert m1 == m2
    assert list(t1) == list(t2)
    for name in t1:
        assert t1[name].dtype == np.float32
        np.testing.assert_array_equal(t1[name], t2[name])


def test_cache_second_call_does_not_dequantise(small_gguf, tmp_path, counted):
    cache = tmp_path / "cache"
    first = cached_dequantize(small_gguf, cache, progress=False)
    second = cached_dequantize(small_gguf, cache, progress=False)
    assert len(counted) == 1
    _assert_same(first, dequantize_all(small_gguf, progress=False))
    _assert_same(second, first)
    assert len([f for f in _final_files(cache) if f.endswith(".safetensors")]) == 1
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_cache_files_are_standard_safetensors(small_gguf, tmp_path):
    """The cache's own writer and reader agree with the safetensors package in both directions."""
    from safetensors.numpy import load_file, save_file

    from jaxlens.converters._checkpoint import read_safetensors

    metadata, tensors = cached_dequantize(small_gguf, tmp_path / "cache", progress=False)
    (written,) = (tmp_path / "cache").glob("*.safetensors")
    theirs = load_file(written)
    assert list(theirs) == list(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(theirs[name], t)
    rng = np.random.default_rng(5)
    other = {"x": rng.normal(size=(3, 7)).astype(np.float32), "y": np.zeros((0, 2), np.float32),
             "z": np.float32(rng.normal(size=(2, 1, 4)))}
    save_file(other, str(tmp_path / "other.safetensors"))
    # the cache's reader
    ours = {n: read() for n, read in read_safetensors(tmp_path / "other.safetensors").items()}
    for name, t in other.items():
        assert ours[name].shape == t.shape and ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], t)


def test_cache_default_dir_from_env(small_gguf, tmp_path, monkeypatch, counted):
    monkeypatch.setenv("JAXLENS_CACHE", str(tmp_path / "envcache"))
    cached_dequantize(small_gguf, progress=False)
    assert any(f.endswith(".safetensors") for f in _final_files(tmp_path / "envcache"))
    cached_dequantize(small_gguf, progress=False)
    assert len(counted) == 1


def test_cache_key_follows_file_contents(small_gguf, tmp_path, counted):
    cache = tmp_path / "cache"
    cached_dequantize(small_gguf, cache, progress=False)
    # same path, new contents
    other = write_gguf(tmp_path / "small.gguf", {"a": np.full((3, 64), 7.0, np.float32)})
    _, tensors = cached_dequantize(other, cache, progress=False)
    assert len(counted) == 2
    np.testing.assert_array_equal(tensors["a"], np.full((3, 64), 7.0, np.float32))


def test_interrupted_write_is_never_read(small_gguf, tmp_path, monkeypatch, counted):
    cache = tmp_path / "cache"

    def crash_midway(tensors, filename):
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # a half-written file
        raise RuntimeError("simulated crash while writing the cache")

    with monkeypatch.context() as m:
        m.setattr(_gguf_cache, "write_safetensors", crash_midway)
        with pytest.raises(RuntimeError, match="simulated crash"):
            cached_dequantize(small_gguf, cache, progress=False)
    assert _final_files(cache) == []  # no partial final file, and no record vouching for one
    assert list(cache.iterdir()) == []  # the temporary file was removed too
    result = cached_dequantize(small_gguf, cache, progress=False)
    assert len(counted) == 2
    _assert_same(result, dequantize_all(small_gguf, progress=False))
    cached_dequantize(small_gguf, cache, progress=False)
    assert len(counted) == 2


_KILL_BEFORE_RENAME = r"""
import os, signal, sys
from jaxlens.converters import _gguf_cache
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # killed after the temp file is written
_gguf_cache.cached_dequantize(sys.argv[1], sys.argv[2], progress=False)
"""


def test_writer_killed_before_rename_leaves_nothing_readable(small_gguf, tmp_path, counted):
    """A process SIGKILLed between writing the temporary tensors file and renaming it: no entry is trusted."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", _KILL_BEFORE_RENAME, str(small_gguf), str(cache)],
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = list(cache.iterdir())
    assert left and all(p.name.endswith(".tmp") for p in left)  # the full temp file, nothing final
    assert _final_files(cache) == []
    result = cached_dequantize(small_gguf, cache, progress=False)
    assert len(counted) == 1  # recomputed, not read from the left-over
    _assert_same(result, dequantize_all(small_gguf, progress=False))


def test_tensors_without_record_are_recomputed(small_gguf, tmp_path, counted):
    """A crash after the tensors were renamed into place, before the JSON record: they are not trusted."""
    cache = tmp_path / "cache"
    cached_dequantize(small_gguf, cache, progress=False)
    (record,) = cache.glob("*.json")
    record.unlink()
    cached_dequantize(small_gguf, cache, progress=False)
    assert len(counted) == 2
    assert len(list(cache.glob("*.json"))) == 1


def test_stale_temp_from_killed_writer_is_ignored_and_cleaned(small_gguf, tmp_path, counted):
    cache = tmp_path / "cache"
    cache.mkdir()
    stem = f"gguf-{_gguf_cache._sha256_file(small_gguf)}-v{_gguf_cache.CACHE_FORMAT_VERSION}"
    old, fresh = cache / f".{stem}.old.tmp", cache / f".{stem}.fresh.tmp"
    for p in (old, fresh):
        p.write_bytes(b"garbage from a killed process")
    past = time.time() - 2 * _gguf_cache._STALE_TEMP_SECONDS
    os.utime(old, (past, past))
    result = cached_dequantize(small_gguf, cache, progress=False)
    _assert_same(result, dequantize_all(small_gguf, progress=False))
    assert not old.exists() and fresh.exists()  # a fresh one may belong to a writer still running


def test_corrupted_cache_is_detected_and_recomputed(small_gguf, tmp_path, counted):
    cache = tmp_path / "cache"
    expected = cached_dequantize(small_gguf, cache, progress=False)
    (tensors_file,) = cache.glob("*.safetensors")
    data = bytearray(tensors_file.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data: still a valid safetensors file
    tensors_file.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="damaged"):
        result = cached_dequantize(small_gguf, cache, progress=False)
    assert len(counted) == 2
    _assert_same(result, expected)
    cached_dequantize(small_gguf, cache, progress=False)  # repaired: no warning (warnings are errors here)
    assert len(counted) == 2


def test_corrupted_record_is_recomputed(small_gguf, tmp_path, counted):
    cache = tmp_path / "cache"
    expected = cached_dequantize(small_gguf, cache, progress=False)
    (record,) = cache.glob("*.json")
    record.write_text('{"format_version": 1, "source_sha', "utf-8")
    with pytest.warns(RuntimeWarning, match="damaged"):
        result = cached_dequantize(small_gguf, cache, progress=False)
    assert len(counted) == 2
    _assert_same(result, expected)


def test_unwritable_cache_warns_and_still_returns(small_gguf, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="Could not write"):
        result = cached_dequantize(small_gguf, blocker / "cache", progress=False)
    _assert_same(result, dequantize_all(small_gguf, progress=False))
