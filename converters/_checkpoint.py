"""Checkpoint tensors as numpy, without PyTorch: safetensors read lazily and written tensor by tensor, and
TensorSource, which tracks which tensors a converter consumed so that none is silently left behind.

Pickled checkpoints (`pytorch_model.bin`) execute code when loaded; they are refused unless the caller passes
`allow_pickle=True` (which then needs torch).
"""

import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from jaxlens.errors import CheckpointError, UnsafeCheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, Callable[[], np.ndarray]]:
    """Lazy readers for every tensor of one safetensors file: {name: () -> float32/int np.ndarray}.

    Each tensor is read from the file when asked for, into one fresh array: only tensors that are read cost
    memory, once. (No memory map: mapped pages count toward resident memory for as long as the map lives,
    which would add the whole file to the peak while a model loads.) BF16 is widened to float32.

    Raises:
        CheckpointError: the file is truncated, its header is corrupt, or a dtype is unknown.
    """
    path = Path(path)
    size = path.stat().st_size
    again = "Download or save the checkpoint again (e.g. `model.save_pretrained(dir)` in transformers)."
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: it has {size} bytes, fewer than the "
                                  f"8-byte header length every safetensors file starts with. {again}")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: its first 8 bytes announce a {n}-byte safetensors header, which "
                                  f"does not fit in the {size}-byte file (truncated, or not safetensors). "
                                  f"{again}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header, not valid JSON ({e}). "
                                  f"{again}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an "
                              f"object of tensors. {again}")
    header.pop("__metadata__", None)
    data_start = 8 + n
    out = {}
    for name, info in header.items():
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {info!r} "
                                  f"(needs dtype, shape and data_offsets [begin, end]). {again}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which jaxlens cannot read "
                                  f"(it reads {', '.join(_DTYPES)}). Convert the checkpoint to one of them.")
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if not 0 <= begin <= end or end - begin != want:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name!r} ({dtype}, shape {list(shape)}) needs "
                f"{want} bytes, its data_offsets [{begin}, {end}] give {end - begin}. {again}")
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} needs bytes up to {data_start + end}, the file has "
                f"{size}. {again}"
            )
        out[name] = _reader(path, data_start + begin, data_start + end, dtype, shape)
    return out


def _reader(path: Path, begin: int, end: int, dtype: str, shape: tuple) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        raw = np.fromfile(path, dtype=np.uint8, count=end - begin, offset=begin)
        arr = raw.view(_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr
    return read


def write_safetensors(tensors: Mapping[str, np.ndarray], filename: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` as a float32 safetensors file, one tensor at a time (no whole-file buffer), readable by
    the safetensors package and `read_safetensors`. Floating tensors of other dtypes (and jax arrays) are
    converted tensor by tensor as they are written.

    Not atomic by itself: write to a `jaxlens._atomic.atomic_path`.

    Raises:
        TypeError: a tensor that is not floating point.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        dtype = np.dtype(t.dtype)
        if not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
            raise TypeError(f"write_safetensors writes float32; tensor {name!r} is {t.dtype}")
        n_bytes = int(np.prod(t.shape, dtype=np.int64)) * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors.values():
            f.write(np.ascontiguousarray(np.asarray(t), dtype="<f4").data)


class TensorSource:
    """Named checkpoint tensors that a converter takes one by one; `finish()` raises if any was left.

    Args:
        readers: {name: () -> np.ndarray}; a name may also map straight to an array.
        origin: where the tensors came from (for messages).

    Attributes:
        dtype: the dtype floating tensors are cast to when taken (float32; `convert(..., dtype=)` sets float16
            or bfloat16 for a half-precision model, so that no float32 copy of it is made).
    """

    def __init__(self, readers: Mapping[str, Callable[[], np.ndarray] | np.ndarray],
                 origin: str = "checkpoint"):
        self._readers, self.origin = dict(readers), origin
        self._taken: set[str] = set()
        self.dtype = np.dtype(np.float32)

    def names(self) -> list[str]:
        return list(self._readers)

    def has(self, name: str) -> bool:
        return name in self._readers

    def reader(self, name: str) -> Callable[[], np.ndarray] | np.ndarray:
        """The reader of `name` (nothing read, nothing marked as used): to build a source over a subset."""
        return self._readers[name]

    def strip_prefix(self, prefix: str) -> None:
        """Rename `prefix + x` to `x` when every tensor that matters has the prefix (HF base-model checkpoints
        saved with or without `transformer.` / `model.`)."""
        self._readers = {k.removeprefix(prefix): v for k, v in self._readers.items()}

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor `name` (as `self.dtype` if floating), marked as used; checked against `shape` if
        given."""
        if name not in self._readers:
            raise CheckpointError(
                f"{self.origin}: tensor {name!r} is missing. Found {len(self._readers)} tensors, e.g. "
                f"{self.names()[:6]}. Is this checkpoint of the architecture its config names?"
            )
        r = self._readers[name]
        arr = r() if callable(r) else np.asarray(r)
        floating = np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"
        if floating and arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.origin}: tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)} from "
                "the config. The config and the weights disagree: check config.json belongs to these weights."
            )
        self._taken.add(name)
        return arr

    def take_layers(self, fmt: str, n_layers: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """`fmt.format(l)` for every layer, stacked on a leading layer axis (written layer by layer into one
        array: no list of per-layer copies beside the stack)."""
        first = self.take(fmt.format(0), shape)
        out = np.empty((n_layers, *first.shape), first.dtype)
        out[0] = first
        for l in range(1, n_layers):
            out[l] = self.take(fmt.format(l), first.shape)
        return out

    def maybe_take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        return self.take(name, shape) if name in self._readers else None

    def drop(self, pattern: str) -> None:
        """Mark tensors matching the regex `pattern` as deliberately unused (buffers such as causal masks)."""
        self._taken |= {n for n in self._readers if re.fullmatch(pattern, n)}

    def finish(self) -> None:
        """Raise CheckpointError if any tensor was neither taken nor dropped."""
        left = sorted(set(self._readers) - self._taken)
        if left:
            raise CheckpointError(
                f"{self.origin}: {len(left)} checkpoint tensor(s) were not used by the converter: {left[:8]}"
                f"{' ...' if len(left) > 8 else ''}. The checkpoint has parts this architecture does not "
                "describe; refusing to drop them silently."
            )


def load_dir_tensors(path: Path, *, allow_pickle: bool = False) -> TensorSource:
    """All weight tensors of a Hugging Face model directory (safetensors, single or sharded), read lazily:
    a sharded checkpoint (`model.safetensors.index.json`) reads the shards its index names, each tensor when
    taken.

    Raises:
        UnsafeCheckpointError: only pickled weights (`*.bin`, `*.pt`) are present and allow_pickle is False.
        CheckpointError: no weights found; a sharded checkpoint with a missing shard or a corrupt index.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return TensorSource(_read_sharded(index), origin=str(path))
    files = sorted(path.glob("*.safetensors"))
    if files:
        readers: dict = {}
        for f in files:
            readers.update(read_safetensors(f))
        return TensorSource(readers, origin=str(path))
    pickles = sorted(list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth")))
    if pickles:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path} holds only pickled weights ({', '.join(p.name for p in pickles)}); loading a pickle "
                "can execute arbitrary code. Convert it to safetensors, or pass allow_pickle=True if you "
                "trust its source (this needs torch)."
            )
        return TensorSource(_load_pickles(pickles), origin=str(path))
    raise CheckpointError(f"No weights (*.safetensors or *.bin) found in {path}.")


def _read_sharded(index: Path) -> dict[str, Callable[[], np.ndarray]]:
    """Lazy readers of a sharded checkpoint (`model-0000x-of-0000y.safetensors` + the index's `weight_map`):
    only the shards' headers are read here, each tensor from its shard when taken.

    Raises:
        CheckpointError: a corrupt index, a missing shard (named, with the tensors it holds), or a tensor the
            index places in a shard that does not hold it.
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{index} is not a safetensors index: it needs a JSON object with a "
                              "'weight_map' of tensor name -> shard file. Save the checkpoint "
                              "again.") from None
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    missing = sorted(s for s in by_shard if not (index.parent / s).is_file())
    if missing:
        held = sum(len(by_shard[s]) for s in missing)
        raise CheckpointError(
            f"{index.parent}: the index lists {len(by_shard)} shard(s) but {len(missing)} are missing: "
            f"{missing} (holding {held} tensors, e.g. {by_shard[missing[0]][:3]}). Download every shard of "
            f"the checkpoint into {index.parent} (e.g. `huggingface-cli download <repo> --local-dir "
            f"{index.parent}`).")
    readers = {}
    for shard, names in by_shard.items():
        in_file = read_safetensors(index.parent / shard)
        absent = [n for n in names if n not in in_file]
        if absent:
            raise CheckpointError(f"{index.parent / shard} does not hold {len(absent)} tensor(s) its "
                                  f"index places there, e.g. {absent[:3]}. The shard or the index is stale: "
                                  "download the checkpoint again.")
        readers.update({n: in_file[n] for n in names})
    return readers


def _load_pickles(files) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError("Reading pickled (*.bin) checkpoints needs torch: pip install torch.") from None
    out = {}
    for f in files:
        for k, v in torch.load(f, map_location="cpu", weights_only=False).items():
            out[k] = v.detach().float().numpy() if v.is_floating_point() else v.numpy()
    return out
