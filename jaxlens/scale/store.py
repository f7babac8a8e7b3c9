"""The resumable chunk store of every chunked computation (patching sweeps, `map_chunks` over edges): finished
chunks on disk, so that a job stopped part-way (interrupted, killed, a host lost) recomputes only what is
missing when it is started again.

    store = ChunkStore(checkpoint_dir, fingerprint(cfg_repr, tokens, ...), what="patching sweep")
    store.load(values, done)            # rows of finished chunks filled in, `done` set
    ... compute a chunk ...
    store.save(number, rows, chunk_values)

A directory holds `store.json` (what was computed: kind, fingerprint and details such as the chunk size) and
one `chunk_<number>.npz` per finished chunk (its row numbers and their values, no pickle), each file written
atomically (`jaxlens._atomic`): a killed job leaves whole chunks or none. A directory written by another
computation is refused.

Several processes (`jaxlens.scale.distributed`): process 0 alone reads and writes the directory. `load`
broadcasts what it read to every process (so every process plans the same remaining chunks), and `save` on
the other processes does nothing: each chunk is written once, by process 0, after the chunk's values were
gathered to every process. Put the directory on a file system every host can see, so that a restarted job
finds it whichever host runs process 0.
"""

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from jaxlens import _atomic
from jaxlens.errors import InputError
from jaxlens.scale import distributed

_META = "store.json"
_OK, _REFUSED = 0, 1


class ChunkStore:
    """Finished chunks of one computation under `directory` (None: keep nothing, every method a no-op).

    Args:
        directory: the checkpoint directory (created if missing).
        fingerprint: identifies the computation (`fingerprint`); a directory holding another is refused.
        what: the kind of computation, for the error message ("patching sweep", "map_chunks").
        details: more JSON values that must match (a chunk size, say).

    Raises:
        InputError: a directory written by another computation, or holding chunk files but no store.json.
    """

    def __init__(self, directory: str | os.PathLike | None, fingerprint: str, *, what: str,
                 details: Mapping | None = None):
        self.dir = None if directory is None else Path(directory)
        self.meta = {"what": what, "fingerprint": fingerprint, **dict(details or {})}
        if self.dir is None:
            return
        status, message = _OK, ""
        if distributed.is_writer():
            try:
                status, message = self._check()
            except OSError as e:  # reported on every process, not only on process 0
                status, message = _REFUSED, f"Cannot use checkpoint_dir {str(self.dir)!r}: {e}."
        status = int(distributed.broadcast(np.int32(status)))
        if status != _OK:
            raise InputError(message or f"checkpoint_dir {str(self.dir)!r} holds a different sweep or "
                                        "another computation (found by process 0; see its error).")

    def load(self, values: np.ndarray, done: np.ndarray) -> None:
        """Fill in `values[rows]` and set `done[rows]` for every stored chunk (process 0's files, on every
        process)."""
        if self.dir is None:
            return
        if distributed.is_writer():
            for f in sorted(self.dir.glob("chunk_*.npz")):
                with np.load(f, allow_pickle=False) as z:
                    values[z["rows"]] = z["values"]
                    done[z["rows"]] = True
        if jax.process_count() > 1:
            got = distributed.broadcast({"values": values, "done": done.astype(np.uint8)})
            values[...] = got["values"]
            done[...] = got["done"].astype(bool)

    def save(self, number: int, rows: np.ndarray, values: np.ndarray) -> None:
        """Store one finished chunk: `values` [len(rows), ...] of rows `rows` (process 0 only)."""
        if self.dir is None or not distributed.is_writer():
            return
        buf = io.BytesIO()
        np.savez(buf, rows=np.asarray(rows), values=np.asarray(values))
        _atomic.write_bytes(self.dir / f"chunk_{number:06d}.npz", buf.getvalue(), durable=True)

    def _check(self) -> tuple[int, str]:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / _META
        if not meta.exists():
            if any(self.dir.glob("chunk_*")):
                return _REFUSED, (
                    f"checkpoint_dir {str(self.dir)!r} holds chunk files but no {_META}: not a jaxlens chunk "
                    "store, or one of an older version. Use a new directory or empty this one.")
            _atomic.write_json(meta, self.meta, durable=True)
            return _OK, ""
        found = json.loads(meta.read_text())
        if found == self.meta:
            return _OK, ""
        differ = sorted(k for k in set(found) | set(self.meta) if found.get(k) != self.meta.get(k))
        shown = ", ".join(f"{k}: {found.get(k)!r} there, {self.meta.get(k)!r} here" for k in differ)
        return _REFUSED, (
            f"checkpoint_dir {str(self.dir)!r} holds a different sweep, another computation than this one "
            f"({shown}): another model, prompts, hook, axes, metric, items or chunk size. Use a new "
            "directory or empty this one.")


def fingerprint(*parts) -> str:
    """A short hash of strings and pytrees of arrays (shapes, dtypes and values): what identifies a stored
    computation."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            h.update(part.encode() + b"\0")
            continue
        for leaf in jax.tree_util.tree_leaves(part):
            a = np.asarray(leaf)
            h.update(repr((a.shape, a.dtype.str)).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]
