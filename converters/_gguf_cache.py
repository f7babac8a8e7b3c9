"""The on-disk cache of dequantised GGUF tensors: a safetensors file keyed by the GGUF file's SHA-256.

Dequantising a whole model costs seconds, so `cached_dequantize` keeps the float32 tensors in a safetensors
file. Cache files are written atomically and durably (`jaxlens._atomic`), and the hash of the tensors file is
recorded in a JSON written after it, so an interrupted or damaged cache is recomputed, never read.

    metadata, tensors = cached_dequantize(path)   # every tensor; the second call reads the cache

A split model (`_gguf_split`) is one entry, keyed by the hashes of all its parts. A float16 / bfloat16 load
(`dtype=`) decodes straight from the GGUF file into that dtype and neither reads nor writes the float32 cache:
reading the cache would hold float32 copies, and the direct decode is the cheap part of loading such a model.
"""

import contextlib
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jaxlens import _atomic
from jaxlens.converters._checkpoint import read_safetensors, write_safetensors
from jaxlens.converters._gguf_quant import float_dtype
from jaxlens.converters._gguf_split import dequantize_all, read_gguf
from jaxlens.errors import CheckpointError

#: Bumped whenever the cached representation or the decoders change, so that old cache entries are not reused.
CACHE_FORMAT_VERSION = 1

_HASH_CHUNK = 1 << 20  # bytes read per step when hashing a file
_STALE_TEMP_SECONDS = 3600  # temporary cache files older than this are left-overs of a killed process


def default_cache_dir() -> Path:
    """`$JAXLENS_CACHE` if set, else `~/.cache/jaxlens`."""
    return Path(os.environ.get("JAXLENS_CACHE") or "~/.cache/jaxlens").expanduser()


def cached_dequantize(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, progress: bool = True,
    dtype=np.float32,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`dequantize_all(path)`, kept on disk so that the next call only reads a safetensors file.

    The cache entry is named after the SHA-256 of the GGUF file's contents and `CACHE_FORMAT_VERSION`: a
    changed file or a new jaxlens decoder never reuses an old entry. An entry is two files,
    `gguf-<sha256>-v<N>.safetensors` (the float32 tensors) and `gguf-<sha256>-v<N>.json` (the metadata and the
    SHA-256 of the safetensors file), each written to a temporary file in the same directory, fsynced, and
    renamed into place, the JSON last. A missing, partial or damaged entry is recomputed.

    Args:
        path: a `.gguf` file (any part of a split model).
        cache_dir: where to keep entries; default `default_cache_dir()` ($JAXLENS_CACHE or ~/.cache/jaxlens).
        progress: show a progress bar while dequantising.
        dtype: float32 (cached), or float16 / bfloat16: decoded directly, without the cache.

    Returns:
        `(metadata, tensors)`, as `dequantize_all` returns them.

    Raises:
        CheckpointError: as `read_gguf` and `GGUFFile.get`.
        InputError: a dtype other than float32, float16, bfloat16.

    Warns:
        RuntimeWarning: an existing entry was damaged (it is recomputed), or the entry could not be written
            (the result is still returned).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No GGUF file at {path}.")
    gf = read_gguf(path)
    if float_dtype(dtype) != np.float32:
        return dequantize_all(gf, progress=progress, dtype=dtype)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    digest = _sha256_parts(gf.parts)
    stem = f"gguf-{digest}-v{CACHE_FORMAT_VERSION}"
    tensors_path, record_path = cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"

    hit = _read_cache(tensors_path, record_path, digest)
    if hit is not None:
        return hit
    metadata, tensors = dequantize_all(gf, progress=progress)
    try:
        _write_cache(tensors_path, record_path, digest, path, metadata, tensors)
    except OSError as e:
        warnings.warn(f"Could not write the GGUF cache entry {tensors_path} ({e}); the next load will "
                      "dequantise again. Set $JAXLENS_CACHE or pass cache_dir= to use a writable directory.",
                      RuntimeWarning, stacklevel=2)
    return metadata, tensors


def _sha256_parts(parts: list[Path]) -> str:
    """The file's SHA-256; of a split model, the SHA-256 of its parts' hashes (one per line)."""
    if len(parts) == 1:
        return _sha256_file(parts[0])
    return hashlib.sha256("\n".join(_sha256_file(p) for p in parts).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _read_cache(tensors_path: Path, record_path: Path, digest: str
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The cached `(metadata, tensors)`, or None when there is no complete, intact entry."""
    try:
        record_text = record_path.read_text("utf-8")
    except OSError:  # no entry yet (or an unreadable cache directory): a miss
        return None
    try:
        record = json.loads(record_text)
        ok = (isinstance(record, dict) and record.get("format_version") == CACHE_FORMAT_VERSION
              and record.get("source_sha256") == digest)
        if ok and _sha256_file(tensors_path) == record.get("tensors_sha256"):
            # read into ordinary memory, tensor by tensor (a memory map counts the file twice while copied)
            readers = read_safetensors(tensors_path)
            return record["metadata"], {name: readers[name]() for name in record["tensor_names"]}
        problem = "its contents do not match the hash recorded when it was written"
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON, CheckpointError
        problem = f"{type(e).__name__}: {e}"
    warnings.warn(f"The GGUF cache entry {tensors_path} is damaged ({problem}); dequantising again.",
                  RuntimeWarning, stacklevel=3)
    return None


def _write_cache(tensors_path: Path, record_path: Path, digest: str, source: Path,
                 metadata: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Write one cache entry: tensors first, then the JSON record that vouches for them."""
    cache_dir = tensors_path.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache_dir, tensors_path.stem)
    with _atomic.atomic_path(tensors_path, durable=True) as tmp:
        write_safetensors(tensors, tmp)
        tensors_sha = _sha256_file(tmp)
    record = {
        "format_version": CACHE_FORMAT_VERSION,
        "source_sha256": digest,
        "source_path": str(source),
        "tensors_sha256": tensors_sha,
        "tensor_names": list(tensors),
        "metadata": metadata,
    }
    _atomic.write_text(record_path, json.dumps(record), durable=True)


def _remove_stale_temps(cache_dir: Path, stem: str) -> None:
    """Delete this entry's temporary files left by a process that was killed while writing them."""
    now = time.time()
    for tmp in cache_dir.glob(f".{stem}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TEMP_SECONDS:
                tmp.unlink()
