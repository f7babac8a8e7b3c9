"""GGUF checkpoints as numpy: metadata, lazily dequantised float32 tensors, an on-disk cache, the tokenizer.

GGUF is llama.cpp's single-file format (spec: ggml `docs/gguf.md`): a header of typed key/value metadata
(architecture hyper-parameters, the tokenizer's vocabulary and merges) followed by tensors, most of them
block-quantised. The header is parsed here (`_Header`: a tenth of a second, where `gguf.GGUFReader` takes
seconds on a tokenizer's strings); the blocks are dequantised by the vectorised numpy decoders below, each a
transcription of `dequantize_row_*` in ggml's `ggml-quants.c`.
No PyTorch is needed.

    gf = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    gf.metadata["llama.block_count"]              # 30
    gf.shape("blk.0.attn_q.weight")               # (576, 576): numpy order, the reverse of GGUF's dims
    gf.get("token_embd.weight")                   # float32 [49152, 576]
    metadata, tensors = cached_dequantize(path)   # every tensor; the second call reads a safetensors cache
    tokenizer = tokenizer_from_gguf(metadata)     # a transformers fast tokenizer

Dequantising a whole model costs seconds, so `cached_dequantize` keeps the float32 tensors in a safetensors
file keyed by the SHA-256 of the GGUF file. Cache files are written to a temporary name, fsynced and renamed,
and the hash of the tensors file is recorded, so an interrupted or damaged cache is recomputed, never read.
"""

import contextlib
import difflib
import hashlib
import json
import mmap
import os
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxlens.converters._checkpoint import read_safetensors
from jaxlens.errors import CheckpointError

#: Bumped whenever the cached representation or the decoders change, so that old cache entries are not reused.
CACHE_FORMAT_VERSION = 1

#: Tensor types jaxlens can dequantise: name -> (elements per block, bytes per block), as ggml's type traits.
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(BLOCK_LAYOUT)

_CHUNK_ELEMENTS = 1 << 20  # elements decoded per step: bounds the decoders' temporaries to a few MiB
_HASH_CHUNK = 1 << 20  # bytes read per step when hashing a file
_STALE_TEMP_SECONDS = 3600  # temporary cache files older than this are left-overs of a killed process


class _TensorInfo(NamedTuple):
    type_name: str
    shape: tuple[int, ...]  # numpy order
    offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    """One GGUF file: its metadata, and its tensors read and dequantised one at a time on request.

    Build it with `read_gguf`. The file is memory-mapped, so a tensor costs memory only once `get` returns it.

    Attributes:
        path: the file.
        metadata: every key/value pair of the header as plain Python values (str, int, float, bool, lists
            of them), e.g. `metadata["general.architecture"] == "llama"`.
        version: the GGUF format version of the file.
    """

    def __init__(self, path: Path, metadata: dict[str, Any], version: int, infos: dict[str, _TensorInfo],
                 data: np.ndarray):
        self.path = path
        self.metadata = metadata
        self.version = version
        self._infos = infos
        self._data = data

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self._infos)} tensors, {len(self.metadata)} metadata keys)"

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def names(self) -> list[str]:
        """Tensor names in file order (llama.cpp's names: `token_embd.weight`, `blk.0.attn_q.weight`, ...)."""
        return list(self._infos)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` in numpy / PyTorch order (the reverse of the dims GGUF stores).

        Raises:
            CheckpointError: the file has no tensor of that name.
        """
        return self._info(name).shape

    def ggml_type(self, name: str) -> str:
        """Storage type of tensor `name` as ggml names it: "F32", "F16", "Q4_1", "Q6_K", ...

        Raises:
            CheckpointError: the file has no tensor of that name.
        """
        return self._info(name).type_name

    def get(self, name: str) -> np.ndarray:
        """Tensor `name`, dequantised to a new float32 array of shape `self.shape(name)`.

        Raises:
            CheckpointError: no tensor of that name, or it is stored in a type outside `SUPPORTED_TYPES`.
        """
        info = self._info(name)
        if info.type_name not in BLOCK_LAYOUT:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is stored as {info.type_name}, which jaxlens cannot "
                f"dequantise. Supported types: {', '.join(SUPPORTED_TYPES)}. Use a GGUF file quantised to "
                "one of these (llama.cpp's `llama-quantize` can re-quantise a model)."
            )
        raw = self._data[info.offset: info.offset + info.n_bytes]
        return dequantize(raw, info.type_name, info.shape)

    def _info(self, name: str) -> _TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._infos), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise CheckpointError(
                f"{self.path} has no tensor named {name!r}.{hint} List them with `.names()`."
            ) from None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file: parse its metadata and tensor table now, read tensor data later (`GGUFFile.get`).

    Args:
        path: a `.gguf` file.

    Returns:
        The GGUFFile, with `metadata` decoded to plain Python values.

    Raises:
        CheckpointError: the file is missing, is not GGUF (bad magic), or is truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No GGUF file at {path}.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4:
            raise CheckpointError(f"{path} is truncated: it has only {size} bytes, too few for a GGUF "
                                  "header. Download or convert the file again.")
        if magic != b"GGUF":
            raise CheckpointError(
                f"{path} is not a GGUF file: it starts with {magic!r}, where a GGUF file starts with "
                "b'GGUF'. The file is corrupt or in another format."
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            version, metadata, infos = _Header(mm, path).parse()
    return GGUFFile(path, metadata, version, infos, np.memmap(path, dtype=np.uint8, mode="r"))


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode one tensor's raw GGUF bytes to float32.

    Args:
        raw: the tensor's bytes as uint8 (any shape; read in C order).
        type_name: its ggml type, one of `SUPPORTED_TYPES`.
        shape: its shape in numpy order; the last axis is the GGUF row, a whole number of blocks long.

    Returns:
        A new float32 array of `shape`.

    Raises:
        CheckpointError: unsupported type, or a byte count or row length that does not fit the type's blocks.
    """
    if type_name not in BLOCK_LAYOUT:
        raise CheckpointError(
            f"Cannot dequantise ggml type {type_name}. Supported types: {', '.join(SUPPORTED_TYPES)}."
        )
    block_size, type_size = BLOCK_LAYOUT[type_name]
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    if (shape and shape[-1] % block_size) or raw.size != n // block_size * type_size:
        raise CheckpointError(
            f"A {type_name} tensor of shape {shape} needs rows that are a multiple of {block_size} elements "
            f"and {n // block_size * type_size} bytes; got {raw.size} bytes. The file is corrupt."
        )
    blocks = raw.reshape(-1, type_size)
    decode = _DECODERS[type_name]
    out = np.empty((len(blocks), block_size), np.float32)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, len(blocks), step):
        out[start: start + step] = decode(blocks[start: start + step])
    return out.reshape(shape)


def dequantize_all(
    path: str | os.PathLike, *, progress: bool = True
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a GGUF file and dequantise every tensor to float32.

    Args:
        path: a `.gguf` file.
        progress: show a tqdm progress bar over the tensors.

    Returns:
        `(metadata, tensors)`: the header as plain Python values, and `{name: float32 array}` in file order.

    Raises:
        CheckpointError: as `read_gguf` and `GGUFFile.get`.
    """
    from tqdm.auto import tqdm

    gf = read_gguf(path)
    names = gf.names()
    tensors = {}
    for name in tqdm(names, desc=f"Dequantising {gf.path.name}", unit="tensor", disable=not progress):
        tensors[name] = gf.get(name)
    return gf.metadata, tensors


def default_cache_dir() -> Path:
    """`$JAXLENS_CACHE` if set, else `~/.cache/jaxlens`."""
    return Path(os.environ.get("JAXLENS_CACHE") or "~/.cache/jaxlens").expanduser()


def cached_dequantize(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, progress: bool = True
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`dequantize_all(path)`, kept on disk so that the next call only reads a safetensors file.

    The cache entry is named after the SHA-256 of the GGUF file's contents and `CACHE_FORMAT_VERSION`: a
    changed file or a new jaxlens decoder never reuses an old entry. An entry is two files,
    `gguf-<sha256>-v<N>.safetensors` (the float32 tensors) and `gguf-<sha256>-v<N>.json` (the metadata and the
    SHA-256 of the safetensors file), each written to a temporary file in the same directory, fsynced, and
    renamed into place, the JSON last. A missing, partial or damaged entry is recomputed.

    Args:
        path: a `.gguf` file.
        cache_dir: where to keep entries; default `default_cache_dir()` ($JAXLENS_CACHE or ~/.cache/jaxlens).
        progress: show a progress bar while dequantising.

    Returns:
        `(metadata, tensors)`, as `dequantize_all` returns them.

    Raises:
        CheckpointError: as `read_gguf` and `GGUFFile.get`.

    Warns:
        RuntimeWarning: an existing entry was damaged (it is recomputed), or the entry could not be written
            (the result is still returned).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No GGUF file at {path}.")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    digest = _sha256_file(path)
    stem = f"gguf-{digest}-v{CACHE_FORMAT_VERSION}"
    tensors_path, record_path = cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"

    hit = _read_cache(tensors_path, record_path, digest)
    if hit is not None:
        return hit
    metadata, tensors = dequantize_all(path, progress=progress)
    try:
        _write_cache(tensors_path, record_path, digest, path, metadata, tensors)
    except OSError as e:
        warnings.warn(f"Could not write the GGUF cache entry {tensors_path} ({e}); the next load will "
                      "dequantise again. Set $JAXLENS_CACHE or pass cache_dir= to use a writable directory.",
                      RuntimeWarning, stacklevel=2)
    return metadata, tensors


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


# --- metadata -----------------------------------------------------------------------------------------------


# GGUF value type ids (ggml docs/gguf.md, `gguf_type`) -> little-endian numpy dtype; 8 is string, 9 array.
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
            11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


class _Header:
    """A reader of a GGUF header (version, metadata, tensor table) from a memory map, validating every read.

    Written for speed: `gguf.GGUFReader` builds numpy views for every part of every field, seconds for the
    ~100k vocabulary and merge strings of a tokenizer; this reads them with `struct` in a fraction of that.
    Layout (v2 and v3): magic, u32 version, u64 tensor count, u64 key/value count, the key/value pairs
    (string key, u32 type, value), the tensor infos (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type,
    u64 offset into the data section), padding to `general.alignment`, the data section.
    """

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.size, self.pos = buf, path, len(buf), 4

    def parse(self) -> tuple[int, dict[str, Any], dict[str, "_TensorInfo"]]:
        version = self._unpack("<I")
        if version & 0xFFFF == 0:  # the version read in the wrong byte order
            raise CheckpointError(
                f"{self.path} is a big-endian GGUF file; jaxlens reads little-endian GGUF only. Convert it "
                f"with `gguf-convert-endian {self.path} little` (from the gguf package).")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path} is GGUF version {version}; jaxlens reads versions 2 and 3. "
                                  "Convert the model again with a current llama.cpp.")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        if n_tensors > self.size or n_kv > self.size:  # every entry takes at least one byte
            self._truncated(f"its header claims {n_tensors} tensors and {n_kv} metadata entries")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string("a metadata key")
            metadata[key] = self._value(self._unpack("<I"), key)
        table = []
        for _ in range(n_tensors):
            name = self._string("a tensor name")
            n_dims = self._unpack("<I")
            if n_dims > 8:
                raise CheckpointError(f"{self.path} is corrupt: tensor {name!r} has {n_dims} dimensions.")
            dims = [self._unpack("<Q") for _ in range(n_dims)]
            table.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise CheckpointError(f"{self.path} is corrupt: general.alignment={alignment!r}.")
        start = -(-self.pos // alignment) * alignment
        return version, metadata, self._infos(table, start)

    def _infos(self, table: list, start: int) -> dict[str, "_TensorInfo"]:
        import gguf

        infos: dict[str, _TensorInfo] = {}
        for name, dims, type_id, offset in table:
            shape = tuple(int(d) for d in reversed(dims))
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
                block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has ggml type id {type_id}, unknown to gguf "
                    f"{_gguf_version()} and to jaxlens (supported: {', '.join(SUPPORTED_TYPES)}). The file "
                    "is corrupt or from a newer llama.cpp.") from None
            n = int(np.prod(shape, dtype=np.int64))
            if (shape and shape[-1] % block_size) or name in infos:
                why = "is listed twice" if name in infos else f"has rows not a multiple of {block_size}"
                raise CheckpointError(f"{self.path} is corrupt: tensor {name!r} ({qtype.name}, shape "
                                      f"{shape}) {why}. Download or convert the file again.")
            info = _TensorInfo(qtype.name, shape, start + offset, n // block_size * type_size)
            if info.offset + info.n_bytes > self.size:
                self._truncated(f"tensor {name!r} needs bytes up to {info.offset + info.n_bytes}")
            infos[name] = info
        return infos

    def _value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self._array(vtype, 1, key)[0]
        if vtype == _STRING:
            return self._string(key)
        if vtype != _ARRAY:
            raise CheckpointError(f"{self.path} is corrupt: metadata {key!r} has value type {vtype}.")
        etype, count = self._unpack("<I"), self._unpack("<Q")
        if count > self.size:
            self._truncated(f"metadata {key!r} claims {count} elements")
        if etype == _STRING:
            return [self._string(key) for _ in range(count)]
        if etype == _ARRAY:
            return [self._value(_ARRAY, key) for _ in range(count)]
        return self._array(etype, count, key)

    def _array(self, etype: int, count: int, key: str) -> list:
        dtype = _SCALARS.get(etype)
        if dtype is None:
            raise CheckpointError(f"{self.path} is corrupt: metadata {key!r} has element type {etype}.")
        n_bytes = count * np.dtype(dtype).itemsize
        self._need(n_bytes, f"metadata {key!r}")
        out = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
        self.pos += n_bytes
        return out

    def _string(self, what: str) -> str:
        n = self._unpack("<Q")
        self._need(n, what)
        raw = self.buf[self.pos: self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: {what} holds a string that is not UTF-8 ({e}). "
                                  "The file is corrupt.") from None

    def _unpack(self, fmt: str) -> int:
        n = struct.calcsize(fmt)
        self._need(n, "the header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            self._truncated(f"reading {what} needs bytes up to {self.pos + n}")

    def _truncated(self, what: str):
        raise CheckpointError(f"{self.path} is truncated or corrupt: {what}, the file has {self.size} bytes. "
                              "Download or convert the file again.")


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


# --- decoders: blocks [n, type_size] uint8 -> [n, block_size] float32, after ggml-quants.c ------------------


def _fp16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 (little-endian IEEE half) -> [n, 1] float32."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., k] packed bytes -> [..., 2, k]: low nibbles, then high nibbles (ggml's order within a block)."""
    return np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-2)


def _f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f4").astype(np.float32)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _bf16(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


def _q8_0(b: np.ndarray) -> np.ndarray:
    # block_q8_0 {fp16 d; int8 qs[32]}: y = d * q
    return b[:, 2:].view(np.int8).astype(np.float32) * _fp16(b[:, 0:2])


def _q4_0(b: np.ndarray) -> np.ndarray:
    # block_q4_0 {fp16 d; uint8 qs[16]}: y[j] = d * (lo(qs[j]) - 8), y[j + 16] = d * (hi(qs[j]) - 8)
    q = _nibbles(b[:, 2:]).reshape(len(b), 32).astype(np.float32) - np.float32(8)
    return q * _fp16(b[:, 0:2])


def _q4_1(b: np.ndarray) -> np.ndarray:
    # block_q4_1 {fp16 d, m; uint8 qs[16]}: y = d * q + m, same nibble order as q4_0
    q = _nibbles(b[:, 4:]).reshape(len(b), 32).astype(np.float32)
    return q * _fp16(b[:, 0:2]) + _fp16(b[:, 2:4])


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed in 12 bytes: `get_scale_min_k4` for j = 0..7, vectorised."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    u4, u6, u15, u63 = np.uint8(4), np.uint8(6), np.uint8(0x0F), np.uint8(63)
    scales = np.concatenate([lo & u63, (hi & u15) | ((lo >> u6) << u4)], axis=1)
    mins = np.concatenate([mid & u63, (hi >> u4) | ((mid >> u6) << u4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q4_k(b: np.ndarray) -> np.ndarray:
    # block_q4_K {fp16 d, dmin; uint8 scales[12]; uint8 qs[128]}: 8 sub-blocks of 32, y = d*sc*q - dmin*m;
    # 32 bytes of qs serve two sub-blocks (low nibbles, then high nibbles).
    n = len(b)
    scales, mins = _k_scales_mins(b[:, 4:16])
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    d = (_fp16(b[:, 0:2]) * scales)[:, :, None]
    m = (_fp16(b[:, 2:4]) * mins)[:, :, None]
    return (d * q - m).reshape(n, 256)


def _q5_k(b: np.ndarray) -> np.ndarray:
    # block_q5_K {fp16 d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}: as q4_K, with bit k of
    # qh[l] the fifth bit of element l of sub-block k.
    n = len(b)
    scales, mins = _k_scales_mins(b[:, 4:16])
    low = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)
    q = (low | (high << np.uint8(4))).astype(np.float32)
    d = (_fp16(b[:, 0:2]) * scales)[:, :, None]
    m = (_fp16(b[:, 2:4]) * mins)[:, :, None]
    return (d * q - m).reshape(n, 256)


def _q6_k(b: np.ndarray) -> np.ndarray:
    # block_q6_K {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d}: two halves of 128; in each, groups
    # g = 0..3 of 32 take the low (g < 2) or high nibbles of ql[32*(g % 2) + l] and bits 2g..2g+1 of qh[l];
    # y = d * scales[16-element unit] * (q - 32).
    n = len(b)
    low = _nibbles(b[:, 0:128].reshape(n, 2, 2, 32))  # [half, part, nibble, l]
    low = low.swapaxes(2, 3).reshape(n, 2, 4, 32)  # [half, g = nibble * 2 + part, l]
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & np.uint8(3)
    q = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    d = (_fp16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]
    return (d * q).reshape(n, 256)


_DECODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _f32, "F16": _f16, "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


# --- cache --------------------------------------------------------------------------------------------------


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
            # read into ordinary memory, tensor by tensor (a memory map would count the file twice while copied)
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
    tensors_sha = _atomic_write(tensors_path, lambda tmp: _save_tensors(tensors, tmp))
    record = {
        "format_version": CACHE_FORMAT_VERSION,
        "source_sha256": digest,
        "source_path": str(source),
        "tensors_sha256": tensors_sha,
        "tensor_names": list(tensors),
        "metadata": metadata,
    }
    _atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record), "utf-8"))
    with contextlib.suppress(OSError):  # make the renames durable; not possible on every platform
        fd = os.open(cache_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_tensors(tensors: dict[str, np.ndarray], filename: str) -> None:
    """Write float32 `tensors` as a safetensors file, one tensor at a time (no whole-file buffer)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype != np.float32:
            raise TypeError(f"cache tensors are float32; {name!r} is {t.dtype}")
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t, dtype="<f4").data)


def _atomic_write(final: Path, write: Callable[[str], object]) -> str:
    """`write(tmp)` a temporary file next to `final`, fsync it, rename it to `final`; return its SHA-256.

    On any failure the temporary file is removed and `final` is left as it was.
    """
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        sha = _sha256_file(Path(tmp))
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return sha


def _remove_stale_temps(cache_dir: Path, stem: str) -> None:
    """Delete this entry's temporary files left by a process that was killed while writing them."""
    now = time.time()
    for tmp in cache_dir.glob(f".{stem}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TEMP_SECONDS:
                tmp.unlink()


# --- model --------------------------------------------------------------------------------------------------


def load(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
         ) -> tuple[Any, dict]:
    """A GGUF model file as (Config, numpy params): dequantised (cached on disk), renamed, converted.

    The tensors come from `cached_dequantize`; `jaxlens.converters._gguf_map.to_hf` turns the metadata and
    the llama.cpp tensor names into a Hugging Face config dict and names (undoing llama.cpp's q/k row
    permutation), and the family converter `jaxlens.converters.convert` builds the params, checking that
    every tensor is used.
    `cfg.default_prepend_bos` follows the file's `tokenizer.ggml.add_bos_token` when it has one.

    Args:
        path: a `.gguf` file of a supported architecture (`_gguf_map.SUPPORTED`: llama, qwen2, gemma, phi3).
        cache_dir: the dequantisation cache; default `default_cache_dir()`.
        progress: show a progress bar while dequantising.

    Returns:
        `(cfg, params)` with float32 numpy params, as `jaxlens.converters.load` returns them.

    Raises:
        CheckpointError: as `cached_dequantize`, `_gguf_map.to_hf` and the family converter.
    """
    from jaxlens.converters import _gguf_map, convert

    metadata, tensors = cached_dequantize(path, cache_dir, progress=progress)
    hf, source = _gguf_map.to_hf(metadata, tensors, origin=str(path), consume=True)
    cfg, params = convert(hf, source)
    return cfg.replace(**_gguf_map.config_overrides(metadata)), params
