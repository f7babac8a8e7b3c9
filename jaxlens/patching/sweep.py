"""Activation-patching sweeps as one compiled computation: plan, chunk, vmap, shard, resume.

Activation patching (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"; Wang et al. 2022,
IOI) runs the model on a corrupted prompt, replaces one activation by its value on a clean prompt, and measures
how far a metric of the logits moves back. A sweep does that for every cell of a grid (layer x position x
head, ...). Here the whole grid is data: each cell is a mask over the activation's axes, a chunk of cells is
vmapped under one `jax.jit`, the chunk axis is split across all local devices, and finished chunks can be
written to disk so an interrupted sweep resumes where it stopped.

    result = sweep(params, cfg, corrupted_tokens, clean_cache, metric, hook="attn.hook_z",
                   axes=("layer", "pos", "head"))
    result.values.shape      # (n_layers, pos, n_heads)
    result.top_k(5)          # [(value, {"layer": 9, "pos": 14, "head": 6}), ...]

Work that cannot change is skipped (see `plan.py` and `compute.py`): a cell patched at layer l starts from the
corrupted run's residual at layer l, and under causal attention computes only the positions from the first one
its patch changes, reading earlier keys and values from the corrupted run.
"""

import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Int
from tqdm import tqdm

from jaxlens import _atomic
from jaxlens.cache import ActivationCache
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.model.forward import check_tokens, run
from jaxlens.patching.compute import ChunkSpec, chunk_values
from jaxlens.patching.logit_reads import analyse
from jaxlens.patching.plan import Plan, Target, cell_bytes_fn, default_budget, make_plan, resolve_target
from jaxlens.shapes import Params


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """A grid of metric values with named, labelled axes.

    Attributes:
        values: numpy array, one axis per swept axis (plus a trailing "metric" axis for vector metrics).
        axes: axis names, in order.
        labels: one tuple of labels per axis (indices by default, metric names on the "metric" axis).
        baseline: the metric of the unpatched corrupted run (scalar, or one value per metric).
    """

    values: np.ndarray
    axes: tuple[str, ...]
    labels: tuple[tuple, ...]
    baseline: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.values, dtype=dtype)

    def to_numpy(self) -> np.ndarray:
        """The values as a numpy array."""
        return np.asarray(self.values)

    def rank(self, by: str = "abs", metric: int | str = 0) -> list[tuple[float, dict]]:
        """Every cell, best first: `by` is "abs" (largest |value|), "max" or "min".

        Returns:
            [(value, {axis: label})], for vector metrics ranked by the metric `metric` (index or name).
        """
        vals, axes, labels = self.values, self.axes, self.labels
        if axes and axes[-1] == "metric":
            m = labels[-1].index(metric) if isinstance(metric, str) else metric
            vals, axes, labels = vals[..., m], axes[:-1], labels[:-1]
        keys = {"abs": -np.abs(vals), "max": -vals, "min": vals}
        if by not in keys:
            raise InputError(f"rank(by=...) must be 'abs', 'max' or 'min'; found {by!r}.")
        order = np.argsort(keys[by], axis=None, kind="stable")
        out = []
        for flat in order:
            where = np.unravel_index(flat, vals.shape)
            out.append((float(vals[where]), {a: labels[i][j] for i, (a, j) in enumerate(zip(axes, where, strict=True))}))
        return out

    def top_k(self, k: int = 10, by: str = "abs", metric: int | str = 0) -> list[tuple[float, dict]]:
        """The k best cells (see `rank`)."""
        return self.rank(by, metric)[:k]

    def select(self, **index) -> "SweepResult":
        """Fix some axes at one label each (`res.select(metric="ld", head=3)`), dropping them."""
        vals, axes, labels, base = self.values, list(self.axes), list(self.labels), self.baseline
        for axis, label in index.items():
            if axis not in axes:
                raise InputError(f"select({axis}=...): the result has axes {tuple(axes)}, no {axis!r}.")
            i = axes.index(axis)
            if label not in labels[i]:
                raise InputError(f"select({axis}={label!r}): not a label of {axis!r}; its labels are "
                                 f"{labels[i][:10]}{'...' if len(labels[i]) > 10 else ''}.")
            vals = np.take(vals, labels[i].index(label), axis=i)
            if axis == "metric" and base is not None:
                base = np.asarray(base[labels[i].index(label)])
            del axes[i], labels[i]
        return SweepResult(vals, tuple(axes), tuple(labels), base)

    def plot(self, title: str = "", **kw):
        """A labelled heatmap of a 2-D result (rows: first axis); `select` other axes first. Needs matplotlib."""
        if len(self.axes) != 2:
            raise InputError(f"plot() draws 2-D results; this one has axes {self.axes}. Fix the others with "
                             f".select(axis=label), e.g. .select({self.axes[-1]}={self.labels[-1][0]!r}).")
        from jaxlens.viz import heatmap

        return heatmap(self.values, row_labels=[str(x) for x in self.labels[0]],
                       col_labels=[str(x) for x in self.labels[1]], ylabel=self.axes[0], xlabel=self.axes[1],
                       title=title, **kw)


def sweep(
    params: Params,
    cfg: Config,
    corrupted_tokens: Int[Array | np.ndarray, "batch pos"],
    clean,
    metric: Callable,
    *,
    hook: str,
    axes: Sequence[str],
    metric_names: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    prefix_reuse: bool = True,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
    max_windows: int = 4,
    devices: Sequence | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
    labels: Mapping[str, Sequence] | None = None,
    fill: float = 0.0,
) -> SweepResult:
    """Patch `hook` from the clean run into the corrupted run at every cell of `axes`; evaluate `metric`.

    Each cell replaces, in the corrupted forward, the activation at one index of every swept axis (across
    the whole batch and every axis not swept) by the clean run's value, and records `metric(logits)`.

    Args:
        params, cfg: the model.
        corrupted_tokens: the target prompts [batch pos].
        clean: the source: an ActivationCache or dict holding the hook's activation (every layer: stacked
            `blocks.<hook>` or `blocks.<l>.<hook>`), clean token ids [batch pos] to run, or the source values
            themselves (float, shaped like the activation with a leading layer axis for block hooks; axes
            may have size 1 to broadcast).
        metric: logits [batch pos d_vocab] -> scalar (or a vector of len(metric_names)); free to average
            over the batch.
        hook: the activation, e.g. "attn.hook_z", "hook_resid_pre", "z", "pattern", "hook_embed".
        axes: swept axes in result order: "layer" and the activation's axes ("pos", "head", "dest_pos",
            "src_pos", "d_mlp", ...).
        metric_names: declare a vector metric; the result gets a trailing "metric" axis.
        layers: compute only these layers; other cells hold `fill`.
        prefix_reuse: skip the layers below each patch and (causal models) the positions before it.
        memory_budget: bytes of activations per device for one chunk (default: `plan.default_budget`).
        chunk_size: cells per compiled call (rounded up to a multiple of the device count); overrides the
            budget's choice.
        max_windows: at most this many static window lengths (one compile each) for position reuse.
        devices: devices to split the cells across (default: all local devices).
        checkpoint_dir: write finished chunks here and reuse those already there.
        progress: show a tqdm bar over chunks.
        on_chunk: called as on_chunk(chunks_done, chunks_total) after each chunk is stored.
        labels: labels for some axes, e.g. {"pos": str_tokens}.
        fill: value of cells outside `layers`.

    Returns:
        SweepResult(values, axes, labels, baseline: the unpatched corrupted run's metric).

    Raises:
        UnknownHookError: `hook` is not a hook point.
        InputError: bad axes, clean and corrupted of different shapes, a metric whose output is not a
            scalar (or the declared vector), a budget too small for one patch, a checkpoint of another sweep.
    """
    tokens = check_tokens(jnp.asarray(corrupted_tokens), cfg)
    target = resolve_target(cfg, hook, axes)
    devices = list(devices) if devices is not None else jax.local_devices()
    prep = _prepare(params, cfg, tokens, clean, target, metric, metric_names, prefix_reuse)
    b, P = tokens.shape
    sizes = dict(zip(target.act_axes, prep.target_act.shape[-len(target.act_axes):], strict=True))
    sizes["layer"] = cfg.n_layers
    itemsize = jnp.dtype(prep.logits.dtype).itemsize
    reads = prep.reads
    n_logits = P * cfg.d_vocab if reads is None else len(reads.positions) * (
        cfg.d_vocab if reads.vocab is None else len(reads.vocab))
    budget = memory_budget if memory_budget is not None else default_budget(devices[0])
    plan = make_plan(target, sizes, prep.diff, P, layers=layers, reuse=prefix_reuse, max_buckets=max_windows,
                     cell_bytes=cell_bytes_fn(cfg, b, P, itemsize, n_logits), budget=budget,
                     n_devices=len(devices), chunk_size=chunk_size)
    m_shape = () if metric_names is None else (len(metric_names),)
    values = np.zeros((len(plan.idx),) + m_shape, np.float32)
    done = np.zeros(len(plan.idx), bool)
    store = _Store(checkpoint_dir, _fingerprint(cfg, target, tokens, prep, layers, metric_names))
    store.load(values, done)
    _run_chunks(plan, target, params, prep, metric, P, prefix_reuse, devices, values, done, store, progress, on_chunk)
    values[plan.status == 1] = prep.base
    values[plan.status == 2] = fill
    out_axes = target.axes + (("metric",) if metric_names is not None else ())
    lab = tuple(tuple((labels or {}).get(a, range(n))) for a, n in zip(target.axes, plan.shape, strict=True))
    lab += ((tuple(metric_names),) if metric_names is not None else ())
    for a, l, n in zip(out_axes, lab, plan.shape + m_shape, strict=True):
        if len(l) != n:
            raise InputError(f"labels[{a!r}] has {len(l)} entries for an axis of size {n}.")
    return SweepResult(values.reshape(plan.shape + m_shape), out_axes, lab, np.asarray(prep.base, np.float32))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    data: dict  # arrays the chunk function reads
    target_act: jax.Array
    diff: np.ndarray | None  # None without prefix reuse
    logits: jax.Array
    base: np.ndarray  # metric of the unpatched corrupted run
    reads: object


@functools.partial(jax.jit, static_argnames=("cfg", "names"))
def cached_run(params, cfg, tokens, names):
    """(logits, {name: activation}) of one forward, jitted (`names` a tuple of hook names)."""
    out, cache, _ = run(params, cfg, tokens, cache_names=names)
    return out, cache


def _prepare(params, cfg, tokens, clean, target: Target, metric, metric_names, reuse) -> _Prepared:
    """Run the corrupted model once, fetch the source, check the metric, find the logits it reads."""
    L = cfg.n_layers
    final, k = f"blocks.{L - 1}.hook_resid_post", ("blocks.attn.hook_rot_k" if cfg.positional_embedding_type ==
                                                     "rotary" else "blocks.attn.hook_k")
    names = (target.full_name, final, "blocks.hook_resid_pre", k, "blocks.attn.hook_v")
    logits, cache = cached_run(params, cfg, tokens, tuple(dict.fromkeys(names)))
    tgt = cache[target.full_name]
    src = _source(params, cfg, clean, target, tgt.shape)
    base = _check_metric(metric, logits, metric_names)
    reads = analyse(metric, tuple(logits.shape), logits.dtype)
    if reads is not None:
        sub = logits[:, reads.positions]
        sub = sub if reads.vocab is None else sub[:, :, reads.vocab]
        if not np.allclose(np.asarray(reads(sub)), base, rtol=1e-5, atol=1e-6, equal_nan=True):
            reads = None
    diff = _differs(src, tgt) if reuse else None
    data = {"tokens": tokens, "source": src, "logits": logits, "final_resid": cache[final],
            "resid_pre": cache["blocks.hook_resid_pre"], "k": cache[k], "v": cache["blocks.attn.hook_v"]}
    return _Prepared(data, tgt, diff, logits, base, reads)


def _differs(src: jax.Array, tgt: jax.Array) -> np.ndarray:
    """Where the clean activation really differs from the corrupted one, broadcast to the corrupted shape.

    A clean cache from `run_with_cache` comes from another compiled program than the corrupted run here, so
    positions the prompts share can differ by rounding (~1e-6 in float32). Treating those as changes would
    switch position reuse off, so differences within a few units of rounding (64 ulp of the activation's scale
    in float32, 2 ulp of each value in 16-bit types) count as equal. `prefix_reuse=False` patches every cell.
    """
    src, tgt = jnp.broadcast_arrays(src.astype(tgt.dtype), tgt)
    eps = float(jnp.finfo(tgt.dtype).eps)
    a, b = src.astype(jnp.float32), tgt.astype(jnp.float32)
    if tgt.dtype == jnp.float32:
        tol = 64 * eps * (jnp.abs(b) + jnp.mean(jnp.abs(b)))
    else:
        tol = 2 * eps * jnp.abs(b)
    return np.asarray(jnp.abs(a - b) > tol)


def _source(params, cfg, clean, target: Target, shape):
    """The clean activation (stacked over layers for block hooks), checked against the corrupted one's shape."""
    name = target.full_name
    if isinstance(clean, ActivationCache):
        clean = clean.cache_dict
    if isinstance(clean, Mapping):
        if name in clean:
            src = clean[name]
        elif target.kind == "block" and all(f"blocks.{l}.{target.rel}" in clean for l in range(cfg.n_layers)):
            src = jnp.stack([clean[f"blocks.{l}.{target.rel}"] for l in range(cfg.n_layers)])
        else:
            raise InputError(f"The clean cache holds no {name!r} (for every layer). Cache it, e.g. "
                             f"model.run_with_cache(clean_tokens, names_filter=[{name!r}]).")
    else:
        arr = jnp.asarray(clean)
        if jnp.issubdtype(arr.dtype, jnp.integer):
            clean_tokens = check_tokens(arr, cfg)
            src = cached_run(params, cfg, clean_tokens, (name,))[1][name]
        else:
            src = arr
    src = jnp.asarray(src)
    ok = src.ndim == len(shape) and all(a in (1, b) for a, b in zip(src.shape, shape, strict=True))
    if not ok:
        raise InputError(
            f"The clean activation {name!r} has shape {tuple(src.shape)}, the corrupted run's has {tuple(shape)}: "
            "clean and corrupted prompts must have the same shape [batch pos] (pad or trim them to match)."
        )
    return src.astype(jnp.result_type(src.dtype))


def _check_metric(metric, logits, metric_names) -> np.ndarray:
    want = () if metric_names is None else (len(metric_names),)
    try:
        out = metric(logits)
    except Exception as e:
        raise InputError(f"The metric failed on logits of shape {tuple(logits.shape)}: {e}") from e
    shape = getattr(out, "shape", None)
    if shape is None or tuple(shape) != want:
        found = "a " + type(out).__name__ if shape is None else f"shape {tuple(shape)}"
        hint = ("declare vector metrics with metric_names=[...]" if metric_names is None
                else f"it must return {len(metric_names)} values, one per name")
        raise InputError(f"The metric must return a scalar array{'' if not want else f' of shape {want}'}; "
                         f"found {found}. Reduce over the batch (e.g. .mean()), or {hint}.")
    return np.asarray(out, np.float32)


def _fingerprint(cfg, target, tokens, prep: _Prepared, layers, metric_names) -> str:
    h = hashlib.sha256()
    for part in (repr(cfg), target.rel, repr(target.axes), repr(None if layers is None else sorted(layers)),
                 repr(metric_names)):
        h.update(part.encode())
    for arr in (tokens, prep.data["source"], prep.base):
        a = np.asarray(arr)
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


class _Store:
    """Finished chunks on disk: one .npz per chunk (cell numbers and values), written atomically."""

    def __init__(self, directory, fingerprint: str):
        self.dir = None if directory is None else Path(directory)
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "sweep.json"
        if meta.exists():
            found = json.loads(meta.read_text()).get("fingerprint")
            if found != fingerprint:
                raise InputError(f"checkpoint_dir {str(self.dir)!r} holds a different sweep (other model, prompts, "
                                 "hook, axes or metric). Use a new directory or empty this one.")
        else:
            _atomic.write_bytes(meta, json.dumps({"fingerprint": fingerprint}).encode(), durable=True)

    def load(self, values: np.ndarray, done: np.ndarray) -> None:
        if self.dir is None:
            return
        for f in sorted(self.dir.glob("chunk_*.npz")):
            with np.load(f) as z:
                values[z["cells"]] = z["values"]
                done[z["cells"]] = True

    def save(self, number: int, cells: np.ndarray, vals: np.ndarray) -> None:
        if self.dir is None:
            return
        buf = io.BytesIO()
        np.savez(buf, cells=cells, values=vals)
        _atomic.write_bytes(self.dir / f"chunk_{number:06d}.npz", buf.getvalue(), durable=True)


@functools.lru_cache(maxsize=32)
def _compiled(spec: ChunkSpec, mesh: Mesh):
    return jax.jit(functools.partial(chunk_values, spec), out_shardings=NamedSharding(mesh, PartitionSpec("cells")))


def _run_chunks(plan: Plan, target: Target, params, prep: _Prepared, metric, n_pos, reuse, devices, values, done, store, progress,
                on_chunk):
    todo = [(i, c) for i, c in enumerate(plan.chunks) if not done[c.cells].all()]
    if not todo:
        return
    mesh = Mesh(np.asarray(devices), ("cells",))
    rep, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("cells"))
    params_d, data_d = jax.device_put((params, prep.data), rep)
    total = len(todo)
    bar = tqdm(total=total, disable=not progress, desc="patching", unit="chunk")
    pending = None
    try:
        for n, (number, chunk) in enumerate(todo):
            S = plan.windows[chunk.bucket] if reuse else n_pos
            fn = _compiled(ChunkSpec(target, S, n_pos, reuse, metric, prep.reads), mesh)
            C = plan.chunk_sizes[chunk.bucket]
            cells = np.concatenate([chunk.cells, np.repeat(chunk.cells[-1:], C - len(chunk.cells))])
            idx = jax.device_put(plan.idx[cells], split)
            out = fn(params_d, data_d, jax.device_put(np.int32(chunk.layer), rep), idx)
            if pending is not None:
                _finish(*pending, values, done, store, bar, on_chunk, total)
            pending = (n, number, chunk, out)
        _finish(*pending, values, done, store, bar, on_chunk, total)
    finally:
        bar.close()


def _finish(n, number, chunk, out, values, done, store, bar, on_chunk, total):
    vals = np.asarray(out)[: len(chunk.cells)]
    values[chunk.cells] = vals
    done[chunk.cells] = True
    store.save(number, chunk.cells, vals)
    bar.update(1)
    if on_chunk is not None:
        on_chunk(n + 1, total)
