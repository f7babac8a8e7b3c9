"""One compiled function over a stack of items (edges to patch, circuits to evaluate): chunked, vmapped,
split across devices, and resumable from finished chunks on disk.

    values = map_chunks(fn, args, items, chunk_size=64)      # fn(args, item) -> value; items [N, ...]

Each chunk is padded to `chunk_size` (a multiple of the device count) so one program serves every chunk; the
items axis is sharded over a one-axis mesh and `args` (weights, the corrupted run) are replicated. With
`checkpoint_dir`, each finished chunk is written atomically and a rerun skips the chunks already there
(`jaxlens.testing.interrupt_after` stops a run part-way, as a killed job would).
"""

import functools
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxlens import _atomic
from jaxlens.errors import InputError


def map_chunks(fn: Callable, args, items: np.ndarray, *, chunk_size: int, devices: Sequence | None = None,
               checkpoint_dir: str | os.PathLike | None = None, fingerprint: str = "", progress: bool = False,
               on_chunk: Callable[[int, int], None] | None = None) -> np.ndarray:
    """[N, ...] values of `fn(args, item)` for every item, in order.

    Args:
        fn: a pure function of (args, one item) returning an array; hashable (the compiled program is
            cached on it).
        args: pytree of arrays shared by every item (replicated on every device).
        items: [N, ...] numpy array of items.
        chunk_size: items per compiled call (rounded up to a multiple of the device count).
        devices: devices to split each chunk across (default: all local devices).
        checkpoint_dir: store finished chunks here; reuse those already there.
        fingerprint: identifies the computation; a checkpoint_dir holding another one is refused.
        progress: show a tqdm bar over chunks.
        on_chunk: called as on_chunk(chunks_done, chunks_total) after each chunk is stored.

    Raises:
        InputError: a non-positive chunk size, or a checkpoint_dir of another computation.
    """
    items = np.asarray(items)
    devices = list(devices) if devices is not None else jax.local_devices()
    if chunk_size < 1:
        raise InputError(f"chunk_size must be a positive number of items; found {chunk_size}.")
    n_dev = len(devices)
    C = -(-int(chunk_size) // n_dev) * n_dev
    n = len(items)
    n_chunks = -(-n // C)
    store = _Store(checkpoint_dir, fingerprint, C)
    done = store.load(n_chunks)
    todo = [c for c in range(n_chunks) if c not in done]
    mesh = Mesh(np.asarray(devices), ("items",))
    rep, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("items"))
    compiled = _compiled(fn, mesh)
    args_d = jax.device_put(args, rep)
    bar = tqdm(total=len(todo), disable=not progress, desc="circuits", unit="chunk")
    try:
        for k, c in enumerate(todo):
            part = items[c * C:(c + 1) * C]
            pad = np.concatenate([part, np.repeat(part[-1:], C - len(part), axis=0)])
            out = np.asarray(compiled(args_d, jax.device_put(pad, split)))[: len(part)]
            done[c] = out
            store.save(c, out)
            bar.update(1)
            if on_chunk is not None:
                on_chunk(k + 1, len(todo))
    finally:
        bar.close()
    if not n_chunks:
        return np.zeros((0,), np.float32)
    return np.concatenate([done[c] for c in range(n_chunks)])


def fingerprint_of(*parts) -> str:
    """A short hash of strings and arrays (what identifies a checkpointed computation)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            h.update(part.encode())
            continue
        for leaf in jax.tree_util.tree_leaves(part):
            a = np.asarray(leaf)
            h.update(repr((a.shape, a.dtype.str)).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


@functools.lru_cache(maxsize=32)
def _compiled(fn: Callable, mesh: Mesh):
    split = NamedSharding(mesh, PartitionSpec("items"))
    return jax.jit(jax.vmap(fn, in_axes=(None, 0)), out_shardings=split)


class _Store:
    """Finished chunks on disk: one .npy per chunk, written atomically, under a fingerprinted directory."""

    def __init__(self, directory, fingerprint: str, chunk_size: int):
        self.dir = None if directory is None else Path(directory)
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta, want = self.dir / "circuit_chunks.json", {"fingerprint": fingerprint, "chunk_size": chunk_size}
        if meta.exists():
            found = json.loads(meta.read_text())
            if found != want:
                raise InputError(
                    f"checkpoint_dir {str(self.dir)!r} holds another computation ({found}; this one is "
                    f"{want}: other model, prompts, metric, items or chunk size). Use a new directory or "
                    "empty this one.")
        else:
            _atomic.write_bytes(meta, json.dumps(want).encode(), durable=True)

    def load(self, n_chunks: int) -> dict[int, np.ndarray]:
        if self.dir is None:
            return {}
        out = {}
        for c in range(n_chunks):
            f = self.dir / f"chunk_{c:06d}.npy"
            if f.exists():
                out[c] = np.load(f)
        return out

    def save(self, c: int, values: np.ndarray) -> None:
        if self.dir is None:
            return
        buf = io.BytesIO()
        np.save(buf, values)
        _atomic.write_bytes(self.dir / f"chunk_{c:06d}.npy", buf.getvalue(), durable=True)


def default_chunk_size(n_src: int, batch: int, n_pos: int, d_model: int, n_heads: int, itemsize: int,
                       n_devices: int, budget: int = 2**30) -> int:
    """Items per chunk so that one chunk's carried differences and attention inputs fit `budget` bytes per
    device (at least one item per device, at most 256 per device)."""
    per_item = itemsize * batch * n_pos * d_model * (3 * n_src + 4 * n_heads + 8)
    per_dev = int(np.clip(budget // max(per_item, 1), 1, 256))
    return per_dev * n_devices

