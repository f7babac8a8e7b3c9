"""Atomic writes: every file and folder jaxlens writes appears whole under its final name, or not at all.

Data goes to a temporary name in the destination's own folder (same file system, so the rename is atomic),
which is renamed over the destination only once complete; on any error, or an interrupt, the temporary is
deleted and the destination is left as it was. A process killed before the rename leaves at most a
`.<name>.*.tmp` file beside the destination, never a partial one under its name.

    with atomic_path(out / "model.safetensors", durable=True) as tmp:   # write `tmp` however you like
        save_file(tensors, tmp)
    write_json(out / "results.json", results)
    with atomic_dir(out_dir) as tmp:                                     # a folder replaced as a whole
        write_json(tmp / "results.json", results)

`durable=True` also fsyncs the file and its folder, so that the rename survives a power cut (checkpoints and
caches that are trusted when read back); outputs meant for a person skip it. Results get ordinary permissions
(0o666 minus the umask), not `mkstemp`'s private 0o600.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxlens.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary file (empty) beside `path`; rename it over `path` when the block succeeds.

    Args:
        path: the destination file; its folder is created if missing.
        durable: fsync the file before the rename and the folder after it.

    Raises:
        Whatever the block raises, after deleting the temporary file (`path` is untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> Path:
    """Write `data` to `path` atomically (see `atomic_path`); returns `path`."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    return write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str | os.PathLike, data: Any, *, durable: bool = False) -> Path:
    """Write `data` as indented JSON to `path` atomically; returns `path`."""
    return write_text(path, json.dumps(data, indent=1), durable=durable)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh empty folder beside `out_dir`; when the block succeeds it replaces `out_dir` by renames
    (an existing folder is moved aside first and deleted after); when it fails it is deleted, `out_dir`
    untouched.

    Raises:
        InputError: `out_dir` exists and is not a folder.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise InputError(f"The output path {out} exists and is not a folder; choose another --out.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; not possible on every platform (then a no-op)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
