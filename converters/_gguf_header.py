"""GGUF files opened lazily: the header (metadata and tensor table) parsed, tensors read on request.

GGUF is llama.cpp's single-file format (spec: ggml `docs/gguf.md`): a header of typed key/value metadata
(architecture hyper-parameters, the tokenizer's vocabulary and merges) followed by tensors, most of them
block-quantised. The header is parsed here (`_Header`: a tenth of a second, where `gguf.GGUFReader` takes
seconds on a tokenizer's strings); tensors are decoded by `_gguf_quant.dequantize`.

    gf = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    gf.metadata["llama.block_count"]              # 30
    gf.shape("blk.0.attn_q.weight")               # (576, 576): numpy order, the reverse of GGUF's dims
    gf.get("token_embd.weight")                   # float32 [49152, 576]
    gf.get("token_embd.weight", jnp.bfloat16)     # bfloat16, decoded without a float32 copy

`read_header` parses one file; `_gguf_split.read_gguf` opens a model from one file or (split by llama.cpp's
`gguf-split`, `NAME-00001-of-00003.gguf`, ...) from any one of its parts, as one GGUFFile.
"""

import difflib
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxlens.converters._gguf_quant import can_dequantize, dequantize, supported_types
from jaxlens.errors import CheckpointError


class _TensorInfo(NamedTuple):
    type_name: str
    shape: tuple[int, ...]  # numpy order
    offset: int  # absolute byte offset in the file
    n_bytes: int
    part: int = 0  # which file of a split model holds it (index into `GGUFFile.parts`)


class GGUFFile:
    """One GGUF file: its metadata, and its tensors read and dequantised one at a time on request.

    Build it with `read_gguf`. Tensor data is read from the file only when `get` asks for it, with plain reads
    (no memory map, whose pages would count towards the process's memory beside the decoded copy).

    Attributes:
        path: the file (of a split model: its first part).
        parts: every file of the model, in order: `[path]`, or the parts of a split model.
        metadata: every key/value pair of the header as plain Python values (str, int, float, bool, lists
            of them), e.g. `metadata["general.architecture"] == "llama"`; of a split model, the first part's
            without the `split.*` keys.
        version: the GGUF format version of the file.
    """

    def __init__(self, path: Path, metadata: dict[str, Any], version: int, infos: dict[str, _TensorInfo],
                 parts: list[Path] | None = None):
        self.path = path
        self.parts = [path] if parts is None else parts
        self.metadata = metadata
        self.version = version
        self._infos = infos

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

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """Tensor `name`, dequantised to a new array of shape `self.shape(name)` and `dtype`.

        Args:
            name: the tensor's GGUF name.
            dtype: float32, float16 or bfloat16; a narrower dtype is decoded into directly (no float32 copy),
                equal to the float32 result cast to it (`_gguf_quant.dequantize`).

        Raises:
            CheckpointError: no tensor of that name, or it is stored in a type outside `supported_types()`.
            InputError: another dtype.
        """
        info = self._info(name)
        if not can_dequantize(info.type_name):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is stored as {info.type_name}, which neither jaxlens nor the "
                f"installed gguf package can dequantise. Decodable types: {', '.join(supported_types())}. "
                "Use a GGUF file quantised to one of these (llama.cpp's `llama-quantize` can re-quantise a "
                "model), or upgrade the gguf package."
            )
        raw = np.fromfile(self.parts[info.part], np.uint8, count=info.n_bytes, offset=info.offset)
        if raw.size != info.n_bytes:
            raise CheckpointError(f"{self.parts[info.part]} was truncated after it was opened: tensor "
                                  f"{name!r} needs {info.n_bytes} bytes at offset {info.offset}.")
        return dequantize(raw, info.type_name, info.shape, dtype, reuse_raw=True)

    def _info(self, name: str) -> _TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._infos), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise CheckpointError(
                f"{self.path} has no tensor named {name!r}.{hint} List them with `.names()`."
            ) from None


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, Any], dict[str, _TensorInfo]]:
    """(version, metadata, tensor table) of one GGUF file, split or not; no tensor data read.

    Raises:
        CheckpointError: as `read_gguf`, for this one file.
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
            return _Header(mm, path).parse()


# --- header parser ------------------------------------------------------------------------------------------


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
                    f"{_gguf_version()} and to jaxlens (decodable: {', '.join(supported_types())}). The file "
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
