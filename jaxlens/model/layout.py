"""Weights laid out once per model for the fast CPU forward: per-layer views of the stacked block weights and
the unembedding transposed to [d_vocab, d_model].

    lay = layout.prepare(params, cfg)      # None where the fast path does not apply
    logits, cache, _ = forward.run(params, cfg, tokens, layout=lay)

Why: under `jax.lax.scan` XLA's CPU backend copies each layer's slice out of the stacked [n_layers, ...]
weights on every call (about half the block time of a 16-token GPT-2-small forward), and its dot is 1.6x
slower with W_U as [d_model, d_vocab] than as [d_vocab, d_model]. With a layout, the blocks run unrolled (the
same block function, once per layer; `runner.run_blocks_carried`) on per-layer arrays that alias the stacked
buffers (no copy, no extra memory), and the unembedding reads the transposed copy (made once per model and
cached; d_vocab * d_model extra floats, only for unembeddings of 4 MiB to 1 GiB). Results equal the scanned
path's to float rounding; names, shapes and interventions are the same.

Unrolled programs compile in time growing with depth, so the layout applies only to models of at most
`UNROLL_MAX_LAYERS` layers (the knob: set it to 0 to turn the fast path off, higher to unroll deeper models)
whose layers are big enough for the copies to matter (`UNROLL_MIN_LAYER_BYTES`).
It applies only to float32 params on one CPU device (the views alias host buffers through DLPack).
"""

import threading
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jaxtyping import Array, Float

from jaxlens.config import Config

UNROLL_MAX_LAYERS = 12
"""Models with at most this many layers run unrolled on CPU (compile grows with depth; see BENCHMARKS.md)."""

UNROLL_MIN_LAYER_BYTES = 1 << 20
"""...and at least this many bytes of block weights per layer (below it the copies the scan makes cost
nothing worth a longer compile; GPT-2 small has 28 MiB a layer)."""

TRANSPOSED_UNEMBED_MIN_BYTES, TRANSPOSED_UNEMBED_MAX_BYTES = 1 << 22, 1 << 30
"""The unembeddings that get a transposed copy (the copy costs its size once per model; the gain was measured
on GPT-2-small's 768 x 50257, and small ones keep W_U, so their logits round exactly as the scan's)."""


class Layout(NamedTuple):
    """Per-model weight layout for the fast forward (a pytree: passed to jit as an argument).

    layers: per-layer block params (each a view of layer l of the stacked arrays), or None (scan).
    W_U_T: the unembedding as [d_vocab, d_model], or None (use W_U).
    """

    layers: tuple[dict, ...] | None
    W_U_T: Float[Array, "d_vocab d_model"] | None


_cache: dict[tuple[int, ...], tuple[list, Layout]] = {}
_lock = threading.RLock()  # reentrant: a weakref callback may run (GC) while it is held


def prepare(params: Mapping[str, Any], cfg: Config, *, unroll: bool | None = None) -> Layout | None:
    """The layout of `params` (made on the first call for these arrays, then cached while they live).

    Args:
        params: the params pytree (concrete arrays, not tracers).
        cfg: the architecture.
        unroll: force the per-layer views on (True) or off (False); None: on for at most
            `UNROLL_MAX_LAYERS` layers of at least `UNROLL_MIN_LAYER_BYTES` each.

    Returns:
        The layout, or None (run the scan) where it does not apply: unroll off, or params that are not
        concrete float32 arrays on one CPU device.
    """
    blocks, W_U = params.get("blocks"), params.get("unembed", {}).get("W_U")
    leaves = jax.tree_util.tree_leaves(blocks)
    if unroll is None:
        layer_bytes = sum(x.size * x.dtype.itemsize for x in leaves) // max(cfg.n_layers, 1)
        unroll = 0 < cfg.n_layers <= UNROLL_MAX_LAYERS and layer_bytes >= UNROLL_MIN_LAYER_BYTES
    if not unroll or W_U is None or not leaves or not all(_on_one_cpu(x) for x in [*leaves, W_U]):
        return None
    transpose = TRANSPOSED_UNEMBED_MIN_BYTES <= W_U.size * W_U.dtype.itemsize <= TRANSPOSED_UNEMBED_MAX_BYTES
    key = (*map(id, leaves), id(W_U), transpose)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and all(r() is x for r, x in zip(hit[0], [*leaves, W_U], strict=True)):
            return hit[1]
    W_U_T = jax.numpy.transpose(W_U) if transpose else None
    lay = Layout(layers=_per_layer(blocks, cfg.n_layers), W_U_T=W_U_T)
    if lay.W_U_T is not None:
        lay.W_U_T.block_until_ready()
    drop = lambda _ref, key=key: _forget(key)
    refs = [weakref.ref(x, drop) for x in [*leaves, W_U]]
    with _lock:
        _cache[key] = (refs, lay)
    return lay


def _forget(key) -> None:
    with _lock:
        _cache.pop(key, None)


def _on_one_cpu(x) -> bool:
    """A concrete float32 jax array on one CPU device (what DLPack can view without a copy)."""
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer) or x.dtype != np.float32:
        return False
    devices = x.sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _per_layer(blocks: Mapping[str, Any], n_layers: int) -> tuple[dict, ...]:
    """Layer l of every stacked array as its own jax array aliasing the stacked buffer (DLPack view; the
    views hold the buffer, not the array object, so the cache entry goes when the params do)."""
    view = lambda x, l: jax.device_put(np.from_dlpack(x)[l], next(iter(x.sharding.device_set)))
    return tuple(jax.tree_util.tree_map(lambda x, l=l: view(x, l), blocks) for l in range(n_layers))
