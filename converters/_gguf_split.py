"""Opening a GGUF model (`read_gguf`, `dequantize_all`): one file, or the parts llama.cpp's `gguf-split`
writes, as one GGUFFile.

`llama-gguf-split --split` cuts a model into files named `NAME-00001-of-0000N.gguf` ...
`NAME-0000N-of-0000N.gguf` (llama.cpp's `llama_split_path`, "%s-%05d-of-%05d.gguf", parts counted from 1).
Every part is a GGUF file of its own holding some of the tensors and the keys `split.no` (u16, the part's
index from 0), `split.count` (u16, the number of parts) and `split.tensors.count` (i32, the tensors of all
parts together); the first part also holds all of the model's metadata (architecture, hyper-parameters,
tokenizer). llama.cpp's loader (`llama_model_loader`) starts from the first part, derives the others' names
from it, refuses a tensor name that two parts hold, and checks the total against `split.tensors.count`.
`read_parts` does the same from any part, and also checks that each part's `split.no` and `split.count` match
its name.

    gf = read_gguf("SmolLM2-00002-of-00003.gguf")     # any part: the whole model
    gf.parts                                           # [.../SmolLM2-00001-of-00003.gguf, ...]
"""

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxlens.converters._gguf_header import GGUFFile, _TensorInfo, read_header
from jaxlens.converters._gguf_quant import float_dtype
from jaxlens.errors import CheckpointError

#: llama.cpp's split metadata keys (`LLM_KV_SPLIT_NO`, `LLM_KV_SPLIT_COUNT`, `LLM_KV_SPLIT_TENSORS_COUNT`).
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = "split.no", "split.count", "split.tensors.count"

_PART_NAME = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf", re.IGNORECASE)


def split_path(prefix: str, no: int, count: int) -> str:
    """The name llama.cpp gives part `no` (counted from 0) of `count`: `NAME-0000k-of-0000N.gguf`."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def part_paths(path: Path, metadata: dict[str, Any]) -> list[Path]:
    """Every part of the split model that the part at `path` (with header `metadata`) belongs to, in order.

    Raises:
        CheckpointError: the file's name does not follow llama.cpp's naming (the other parts cannot be found),
            or disagrees with its `split.no` / `split.count`.
    """
    count, no = int(metadata[SPLIT_COUNT]), int(metadata.get(SPLIT_NO, 0))
    match = _PART_NAME.fullmatch(path.name)
    if match is None or (int(match["no"]), int(match["count"])) != (no + 1, count):
        raise CheckpointError(
            f"{path} is part {no + 1} of a GGUF model split into {count} files ({SPLIT_NO}={no}, "
            f"{SPLIT_COUNT}={count}), but its name is not llama.cpp's part name for that, "
            f"{split_path('NAME', no, count)!r}, so the other parts cannot be found. Keep the names "
            "`llama-gguf-split` gave the parts, or merge them: `llama-gguf-split --merge "
            f"NAME-00001-of-{count:05d}.gguf merged.gguf`.")
    prefix = str(path.parent / match["prefix"])
    return [Path(split_path(prefix, i, count)) for i in range(count)]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file: parse its metadata and tensor table now, read tensor data later (`GGUFFile.get`).

    A part of a split model (metadata `split.count` > 1) opens the whole model: every part, found by
    llama.cpp's naming `NAME-0000k-of-0000N.gguf`, checked complete and consistent (`_gguf_split`).

    Args:
        path: a `.gguf` file.

    Returns:
        The GGUFFile, with `metadata` decoded to plain Python values.

    Raises:
        CheckpointError: the file is missing, is not GGUF (bad magic), or is truncated or corrupt; a part of
            a split model is missing, or the parts disagree.
    """
    version, metadata, infos = read_header(path)
    path = Path(path)
    if int(metadata.get("split.count", 1)) > 1:
        return read_parts(path, metadata)
    return GGUFFile(path, metadata, version, infos)


def dequantize_all(
    path: str | os.PathLike | GGUFFile, *, progress: bool = True, dtype=np.float32
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a GGUF file (or every part of a split one) and dequantise every tensor to `dtype`.

    Vectors (norm weights, biases) stay float32 whatever `dtype`: they cost next to nothing, and a converter's
    arithmetic on them (Gemma's norm offset) then rounds once, as on the float32 path.

    Args:
        path: a `.gguf` file, or one already opened by `read_gguf`.
        progress: show a tqdm progress bar over the tensors.
        dtype: float32, float16 or bfloat16, decoded into directly (`GGUFFile.get`).

    Returns:
        `(metadata, tensors)`: the header as plain Python values, and `{name: array}` in file order (matrices
        in `dtype`, vectors in float32).

    Raises:
        CheckpointError: as `read_gguf` and `GGUFFile.get`.
        InputError: another dtype.
    """
    from tqdm.auto import tqdm

    dtype = float_dtype(dtype)
    gf = path if isinstance(path, GGUFFile) else read_gguf(path)
    names = gf.names()
    tensors = {}
    for name in tqdm(names, desc=f"Dequantising {gf.path.name}", unit="tensor", disable=not progress):
        tensors[name] = gf.get(name, dtype if len(gf.shape(name)) > 1 else np.float32)
    return gf.metadata, tensors


def read_parts(path: Path, metadata: dict[str, Any]) -> GGUFFile:
    """The split model that the part at `path` (header `metadata`) belongs to, as one GGUFFile.

    Its metadata is the first part's without the `split.*` keys, its tensors those of every part.

    Raises:
        CheckpointError: a part is missing; a part's `split.no` or `split.count` disagrees with its name; two
            parts hold a tensor of the same name; the tensors found differ in number from
            `split.tensors.count`; or a part is not a readable GGUF file.
    """
    paths = part_paths(path, metadata)
    count = len(paths)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{path.name} is part {int(metadata.get(SPLIT_NO, 0)) + 1} of a GGUF model split into {count} "
            f"files, but {len(missing)} part(s) are missing from {path.parent}: {missing}. Download every "
            "part into the same directory (keeping the names), or load a merged file.")
    infos: dict[str, _TensorInfo] = {}
    headers = []
    for i, p in enumerate(paths):
        version, meta, table = read_header(p)
        found = (int(meta.get(SPLIT_NO, -1)), int(meta.get(SPLIT_COUNT, 1)))
        if found != (i, count):
            raise CheckpointError(
                f"{p} should be part {i + 1} of {count} ({SPLIT_NO}={i}, {SPLIT_COUNT}={count}), but its "
                f"metadata says {SPLIT_NO}={found[0]}, {SPLIT_COUNT}={found[1]}: the directory mixes parts "
                "of different splits. Download the parts of one split again.")
        for name, info in table.items():
            if name in infos:
                raise CheckpointError(
                    f"Tensor {name!r} is in two parts of the split model, {paths[infos[name].part].name} and "
                    f"{p.name}: the parts are corrupt or from different splits. Download them again.")
            infos[name] = info._replace(part=i)
        headers.append((version, meta))
    version, first = headers[0]
    _check_total(paths[0], first, len(infos))
    merged = {k: v for k, v in first.items() if not k.startswith("split.")}
    return GGUFFile(paths[0], merged, version, infos, parts=paths)


def _check_total(first: Path, metadata: dict[str, Any], n_found: int) -> None:
    expected = metadata.get(SPLIT_TENSORS_COUNT)
    if expected is None:
        raise CheckpointError(f"{first} is the first part of a split GGUF model but has no "
                              f"{SPLIT_TENSORS_COUNT}, so its completeness cannot be checked. The file is "
                              "corrupt or was not written by llama-gguf-split.")
    if int(expected) != n_found:
        raise CheckpointError(
            f"The split GGUF model {first.name} should hold {int(expected)} tensors "
            f"({SPLIT_TENSORS_COUNT}), but its parts hold {n_found}: a part is truncated or from another "
            "split. Download the parts again.")
