"""One compiled function over a stack of items (edges to patch, circuits to evaluate): chunked, vmapped,
split across devices, and resumable from finished chunks on disk.

    values = map_chunks(fn, args, items, chunk_size=64)      # fn(args, item) -> value; items [N, ...]

Each chunk is padded to `chunk_size` (a multiple of the `data` axis size) so one program serves every chunk;
the items axis is split over the `data` axis of a `jaxlens.scale` mesh (by default every device of every
process) and `args` (weights, the corrupted run) are replicated. With `checkpoint_dir`, each finished chunk is
written atomically (`jaxlens.scale.store`) and a rerun skips the chunks already there
(`jaxlens.testing.interrupt_after` stops a run part-way, as a killed job would).
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jaxlens.errors import InputError
from jaxlens.scale import distributed
from jaxlens.scale.mesh import replicated, split_leading
from jaxlens.scale.store import ChunkStore
from jaxlens.scale.store import fingerprint as fingerprint_of


def map_chunks(fn: Callable, args, items: np.ndarray, *, chunk_size: int, devices: Sequence | None = None,
               mesh: Mesh | None = None, checkpoint_dir: str | os.PathLike | None = None,
               fingerprint: str = "", progress: bool = False,
               on_chunk: Callable[[int, int], None] | None = None) -> np.ndarray:
    """[N, ...] values of `fn(args, item)` for every item, in order.

    Several processes (`jaxlens.scale.distributed.initialize`): every process makes the same call with the
    same values and gets every value.

    Args:
        fn: a pure function of (args, one item) returning an array; hashable (the compiled program is
            cached on it).
        args: pytree of arrays shared by every item (replicated on every device; leaves already sharded on
            `mesh` are kept as they are).
        items: [N, ...] numpy array of items.
        chunk_size: items per compiled call (rounded up to a multiple of the `data` axis size).
        devices: devices to split each chunk across (default: every device of every process; in a single
            process, all local devices).
        mesh: a `jaxlens.scale` mesh instead: items split over its `data` axis.
        checkpoint_dir: store finished chunks here; reuse those already there (`jaxlens.scale.store`;
            several processes: process 0 writes).
        fingerprint: identifies the computation; a checkpoint_dir holding another one is refused.
        progress: show a tqdm bar over chunks.
        on_chunk: called as on_chunk(chunks_done, chunks_total) after each chunk is stored.

    Raises:
        InputError: a non-positive chunk size, a checkpoint_dir of another computation, both `mesh` and
            `devices`, processes given different items.
    """
    return map_groups([Group(fn, args, np.asarray(items), chunk_size)], devices=devices, mesh=mesh,
                      checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, progress=progress,
                      on_chunk=on_chunk)


@dataclasses.dataclass(frozen=True)
class Group:
    """Items that share one function and its arguments (`map_groups`): fn(args, item) for each item."""

    fn: Callable
    args: Any
    items: np.ndarray
    chunk_size: int


def map_groups(groups: Sequence[Group], *, devices: Sequence | None = None, mesh: Mesh | None = None,
               checkpoint_dir: str | os.PathLike | None = None, fingerprint: str = "",
               progress: bool = False, on_chunk: Callable[[int, int], None] | None = None) -> np.ndarray:
    """`map_chunks` over several groups: the values of every group's items, concatenated in group order.

    A chunk never mixes groups, so each group's arguments (e.g. the layer its items start at) are the same
    for the whole chunk; groups whose `fn`, argument shapes and chunk size agree share one compiled program.
    The chunks of every group are numbered in one sequence, stored in one `checkpoint_dir` and counted
    together by `progress` and `on_chunk`. The values of every group must have one shape and dtype.

    Args and Raises: as `map_chunks` (each group has its own `chunk_size`).
    """
    mesh = distributed.data_mesh(mesh, devices)
    n_dev = mesh.shape["data"]
    plan, sizes, start = [], [], 0  # per chunk: (group, padded chunk size, rows in the group, rows overall)
    for g in groups:
        if g.chunk_size < 1:
            raise InputError(f"chunk_size must be a positive number of items; found {g.chunk_size}.")
        C = -(-int(g.chunk_size) // n_dev) * n_dev
        n = len(g.items)
        for c in range(-(-n // C)):
            local = np.arange(c * C, min((c + 1) * C, n))
            plan.append((g, C, local, start + local))
        sizes.append(C)
        start += n
    if not plan:
        return np.zeros((0,), np.float32)
    items = [g.items for g in groups]
    distributed.check_same(fingerprint_of(fingerprint, *items, str(sizes)), "map_chunks items")
    details = {"chunk_size": sizes[0]} if len(groups) == 1 else {"chunk_sizes": sizes}
    store = ChunkStore(checkpoint_dir, fingerprint, what="map_chunks", details=details)
    rep, split = replicated(mesh), split_leading(mesh)
    first = plan[0][0]
    out = jax.eval_shape(first.fn, first.args, first.items[0])
    values, done = np.zeros((start,) + out.shape, out.dtype), np.zeros(start, bool)
    store.load(values, done)
    todo = [c for c, (*_, rows) in enumerate(plan) if not done[rows].all()]
    placed: dict[int, Any] = {}
    bar = tqdm(total=len(todo), disable=not (progress and distributed.is_writer()), desc="circuits",
               unit="chunk")
    try:
        for k, c in enumerate(todo):
            g, C, local, rows = plan[c]
            if id(g) not in placed:
                placed = {id(g): distributed.place(g.args, rep)}  # one group's arguments on device at a time
            pad = np.concatenate([local, np.repeat(local[-1:], C - len(local))])
            part = distributed.gather(_compiled(g.fn, mesh)(placed[id(g)],
                                                            distributed.place(g.items[pad], split)))
            values[rows] = part[: len(rows)]
            store.save(c, rows, part[: len(rows)])
            bar.update(1)
            if on_chunk is not None:
                on_chunk(k + 1, len(todo))
    finally:
        bar.close()
    return values


@functools.lru_cache(maxsize=32)
def _compiled(fn: Callable, mesh: Mesh):
    return jax.jit(jax.vmap(fn, in_axes=(None, 0)), out_shardings=split_leading(mesh))


def default_chunk_size(n_src: int, batch: int, n_pos: int, d_model: int, n_heads: int, itemsize: int,
                       n_devices: int, budget: int = 2**30) -> int:
    """Items per chunk so that one chunk's carried differences and attention inputs fit `budget` bytes per
    device (at least one item per device, at most 256 per device)."""
    per_item = itemsize * batch * n_pos * d_model * (3 * n_src + 4 * n_heads + 8)
    per_dev = int(np.clip(budget // max(per_item, 1), 1, 256))
    return per_dev * n_devices



def forward_chunk_size(cfg, batch: int, n_pos: int, itemsize: int, n_devices: int,
                       budget: int = 2**30) -> int:
    """Items per chunk so that one chunk's forward activations of one block (split q/k/v inputs, attention
    scores, MLP hidden units) fit `budget` bytes per device (at least one item per device, at most 256 per
    device)."""
    H, KV, d = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model
    per_item = itemsize * batch * n_pos * (3 * (H + 2 * KV) * d + 4 * cfg.d_mlp + 3 * H * n_pos + 8 * d)
    per_dev = int(np.clip(budget // max(per_item, 1), 1, 256))
    return per_dev * n_devices
