"""Sharded loading: a checkpoint straight onto the mesh, each process building only the shards its own devices
hold (`jax.make_array_from_callback`), so no process ever holds the whole model.

    mesh = make_mesh(model=8)
    cfg, params = load_sharded("path/to/checkpoint", mesh)          # unprocessed, as `converters.load`
    model = HookedTransformer.from_pretrained("path/to/checkpoint", mesh=mesh)   # processed, sharded

What each kind of checkpoint costs in host memory (per process):

    a `jaxlens convert` checkpoint   its tensors are already in jaxlens's layout: each device's slice is read
                                     from the file (safetensors `get_slice`); nothing else is read.
    a Hugging Face folder            converted one layer at a time (the family converter on a one-layer view
                                     of the checkpoint, so transposes, q/k permutations and fused-qkv splits
                                     are the converter's own): peak = one layer's tensors, raw and converted,
                                     the embedding-sized tensors (read once, kept until the end) and this
                                     process's shards being filled. Every process reads every layer's tensors
                                     whole (the converters need whole tensors); each keeps only its slices.
    a .gguf file, a transformers     the whole model is converted on the host first (one model in float32),
    model                            then placed leaf by leaf, each numpy leaf freed once placed.

Each distinct slice is read once per process, however many of its devices hold it. `record_reads` lists what
this process read (tensor, region, bytes), to check that a host of a multi-host job read only its shards:

    with record_reads() as log:
        model = HookedTransformer.from_pretrained("path/to/checkpoint", mesh=mesh)
    log.bytes, log.by_tensor()["blocks.attn.W_Q"]
"""

import contextlib
import contextvars
import dataclasses
import functools
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxlens.config import Config
from jaxlens.errors import CheckpointError
from jaxlens.params import check_params, param_shapes
from jaxlens.scale.sharding import param_shardings
from jaxlens.shapes import Params

# the layer index of a per-layer checkpoint tensor: its first all-digit name component
_LAYER = re.compile(r"(^|\.)(\d+)\.")


@dataclasses.dataclass
class ReadLog:
    """The tensors one process read while loading (`record_reads`), one entry per read.

    Attributes:
        entries: (tensor name, region, bytes) per read: the name in the checkpoint (a `jaxlens convert`
            checkpoint: the flat params name, e.g. "blocks.attn.W_Q"; a Hugging Face folder: the HF name; a
            .gguf file or in-memory model: the params name of each converted leaf), the region as one
            (start, stop) per axis, and the bytes read (in the file's dtype; BF16 as widened to float32).
    """

    entries: list[tuple[str, tuple[tuple[int, int], ...], int]] = dataclasses.field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Bytes read in all."""
        return sum(n for _, _, n in self.entries)

    def by_tensor(self) -> dict[str, int]:
        """Bytes read per tensor name."""
        out: dict[str, int] = {}
        for name, _, n in self.entries:
            out[name] = out.get(name, 0) + n
        return out


_LOG: contextvars.ContextVar[ReadLog | None] = contextvars.ContextVar("jaxlens_read_log", default=None)


@contextlib.contextmanager
def record_reads() -> Iterator[ReadLog]:
    """Record every checkpoint read of `load_sharded` (and `from_pretrained(mesh=...)`) in this process
    while the block runs; yields the ReadLog it fills."""
    log = ReadLog()
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)


def load_sharded(source: Any, mesh: Mesh, *, fsdp: bool = False, rules: Mapping[str, str] | None = None,
                 dtype=jnp.float32, allow_pickle: bool = False) -> tuple[Config, Params]:
    """(Config, params placed on `mesh`) from a checkpoint, unprocessed (no fold_ln or centring).

    Args:
        source: what `jaxlens.converters.load` takes (a Hugging Face folder, a `jaxlens convert` checkpoint,
            a .gguf file, a cached repo id or packaged name, or a `transformers` model).
        mesh: a ("data", "model") mesh (`jaxlens.scale.make_mesh`).
        fsdp, rules: as `jaxlens.scale.param_shardings`.
        dtype: dtype of the placed params (each shard cast on the host).
        allow_pickle: accept pickled `*.bin` weights (they can execute code when loaded).

    Returns:
        (cfg, params) with the NamedShardings of `param_shardings(cfg, mesh, fsdp=fsdp)`.

    Raises:
        InputError: a mesh axis whose size does not divide a dimension it splits (checked before any tensor
            is read, except for .gguf files and in-memory models).
        CheckpointError: as `jaxlens.converters.load`.
    """
    from jaxlens import converters, hub

    path = hub.resolve(source) if hub.is_path_like(source) else None
    if path is not None and converters.is_converted(path):
        return _load_converted(path, mesh, fsdp, rules, dtype)
    if path is not None and path.is_dir() and (path / "config.json").is_file():
        return _load_hf_dir(path, mesh, fsdp, rules, dtype, allow_pickle)
    cfg, params = converters.load(source if path is None else path, allow_pickle=allow_pickle)
    shardings = param_shardings(cfg, mesh, fsdp=fsdp, rules=rules)
    named = jax.tree_util.tree_flatten_with_path(params)[0]
    flat, tree = jax.tree_util.tree_flatten(params)
    del params
    for key_path, x in named:  # converted whole on the host: every leaf counts as read
        _record(".".join(str(k.key) for k in key_path), x.shape, np.asarray(x).nbytes)
    del named
    placed = []
    for sharding in jax.tree_util.tree_leaves(shardings):
        x = flat.pop(0)  # the numpy leaf is freed once placed
        placed.append(_place(x.shape, sharding, lambda idx, x=x: x[idx], dtype))
        del x
    return cfg, jax.tree_util.tree_unflatten(tree, placed)


def _load_converted(path: Path, mesh: Mesh, fsdp: bool, rules, dtype) -> tuple[Config, Params]:
    """Each addressable device's slice of each tensor, read from the file by `get_slice`."""
    from safetensors import safe_open

    from jaxlens.converters import flatten_params, unflatten_params
    from jaxlens.converters._converted import converted_config

    cfg, params_file = converted_config(path)
    shardings = flatten_params(param_shardings(cfg, mesh, fsdp=fsdp, rules=rules))
    with safe_open(str(params_file), framework="numpy") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
        # zero-stride stand-ins: the names and shapes checked against the config before any tensor is read
        check_params(unflatten_params({n: np.broadcast_to(np.float32(0), s) for n, s in shapes.items()}), cfg)
        out = {name: _place(shapes[name], sharding, functools.partial(_read_slice, f, name, shapes[name]),
                            dtype)
               for name, sharding in shardings.items()}
    return cfg, unflatten_params(out)


def _load_hf_dir(path: Path, mesh: Mesh, fsdp: bool, rules, dtype,
                 allow_pickle: bool) -> tuple[Config, Params]:
    """The family converter run on one layer at a time; each layer's slices copied into this process's
    shard buffers (the layer axis is never split, so each shard holds every layer)."""
    from jaxlens.converters import family_for, load_dir_tensors
    from jaxlens.converters._checkpoint import TensorSource

    hf = json.loads((path / "config.json").read_text())
    module = family_for(hf)
    cfg = module.config_from_hf(hf)
    shardings = param_shardings(cfg, mesh, fsdp=fsdp, rules=rules)  # indivisible axes: before any read
    source = load_dir_tensors(path, allow_pickle=allow_pickle)
    by_layer: dict[int, dict[str, str]] = {}
    shared: dict[str, Any] = {}
    for name in source.names():
        m = _LAYER.search(name)
        if m is None:  # embeddings, final norm, head: read once, offered to every layer's converter run
            read = _recorded(name, source.reader(name))
            shared[name] = functools.cache(read) if callable(read) else read
        else:
            layer = int(m.group(2))
            by_layer.setdefault(layer, {})[name[:m.start(2)] + "0" + name[m.end(2):]] = name
    if sorted(by_layer) != list(range(cfg.n_layers)):
        raise CheckpointError(f"{path}: the per-layer tensors are numbered {sorted(by_layer)}; the config "
                              f"has {cfg.n_layers} layers (0 to {cfg.n_layers - 1}). Check that config.json "
                              "belongs to these weights.")
    flat_shardings = jax.tree_util.tree_flatten_with_path(shardings)[0]
    placed: dict[str, jax.Array] = {}
    buffers: dict[str, dict] = {}  # block leaf -> {shard index: host array [layer ...]}
    for layer in range(cfg.n_layers):
        one = TensorSource({**shared, **{new: _recorded(old, source.reader(old))
                                         for new, old in by_layer[layer].items()}},
                           origin=f"{path} (layer {layer})")
        cfg1 = _one_layer(cfg, layer)
        params = module.params_from_checkpoint(one, cfg1, hf)
        one.finish()
        check_params(params, cfg1)
        for key_path, sharding in flat_shardings:
            key = jax.tree_util.keystr(key_path)
            x = _at(params, key_path)
            if key_path[0].key != "blocks":
                if layer == 0:
                    placed[key] = _place(x.shape, sharding, lambda idx, x=x: x[idx], dtype)
                continue
            shape = _global_shape(cfg, key_path)
            if layer == 0:
                buffers[key] = {_key(i): np.empty(_shard_shape(shape, i), np.dtype(dtype))
                                for i in sharding.addressable_devices_indices_map(shape).values()}
            for i in sharding.addressable_devices_indices_map(shape).values():
                buffers[key][_key(i)][layer] = np.asarray(x[0])[i[1:]]
        del params, one
    shared.clear()
    for key_path, sharding in flat_shardings:
        key = jax.tree_util.keystr(key_path)
        if key in buffers:
            bufs = buffers.pop(key)
            placed[key] = _place(_global_shape(cfg, key_path), sharding, lambda i, b=bufs: b[_key(i)], dtype)
            del bufs
    return cfg, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shardings),
                                             [placed[jax.tree_util.keystr(p)] for p, _ in flat_shardings])


def _place(shape: tuple[int, ...], sharding: NamedSharding, read, dtype) -> jax.Array:
    """A global array built from `read(index)` (a numpy slice) for each of this process's devices; a slice
    that several of them hold (the `data` axis replicating it) is read once."""
    slices: dict[tuple, np.ndarray] = {}

    def one(idx):
        k = _key(idx)
        if k not in slices:
            slices[k] = np.asarray(read(idx), dtype=np.dtype(dtype))
        return slices[k]

    return jax.make_array_from_callback(tuple(shape), sharding, one)


def _read_slice(f, name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """`index` of tensor `name` of the open safetensors file `f`, read from the file (and recorded)."""
    out = f.get_slice(name)[index]
    _record(name, shape, out.nbytes, index)
    return out


def _recorded(name: str, read):
    """A lazy HF-checkpoint reader that records its (whole-tensor) read; an array in memory is kept."""
    if not callable(read):
        return read

    def recorded():
        x = read()
        _record(name, x.shape, x.nbytes)
        return x

    return recorded


def _record(name: str, shape: tuple[int, ...], nbytes: int, index: tuple[slice, ...] | None = None) -> None:
    log = _LOG.get()
    if log is None:
        return
    index = (slice(None),) * len(shape) if index is None else tuple(index)
    index = index + (slice(None),) * (len(shape) - len(index))
    region = tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))
    log.entries.append((name, region, int(nbytes)))


def _one_layer(cfg: Config, layer: int) -> Config:
    """The config of a one-layer model that is layer `layer` of `cfg` (per-layer tuples sliced)."""
    windows = None if cfg.window_sizes is None else cfg.window_sizes[layer:layer + 1]
    return cfg.replace(n_layers=1, window_sizes=windows)


def _at(tree, key_path):
    for k in key_path:
        tree = tree[k.key]
    return tree


def _global_shape(cfg: Config, key_path) -> tuple[int, ...]:
    return _at(param_shapes(cfg), key_path)[1]


def _key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _shard_shape(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(d))) for s, d in zip(index, shape, strict=True))
