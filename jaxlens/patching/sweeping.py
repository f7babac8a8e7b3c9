"""Activation-patching sweeps as one compiled computation: plan, chunk, vmap, shard, resume.

Activation patching (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"; Wang et al. 2022,
IOI) runs the model on a corrupted prompt, replaces one activation by its value on a clean prompt, and
measures how far a metric of the logits moves back. A sweep does that for every cell of a grid (layer x
position x head, ...). Here the whole grid is data: each cell is a mask over the activation's axes, a chunk of
cells is vmapped under one `jax.jit`, the chunk axis is split over the `data` axis of a `jaxlens.scale` mesh
(by default every device of every process: `jaxlens.scale.distributed` for several hosts), and finished
chunks can be written to disk (`jaxlens.scale.store`) so an interrupted sweep resumes where it stopped.

    print(plan_sweep(params, cfg, corrupted_tokens, clean_cache, metric, hook="attn.hook_z",
                     axes=("layer", "pos", "head")))       # cells, chunks, programs, FLOPs: nothing runs
    result = sweep(params, cfg, corrupted_tokens, clean_cache, metric, hook="attn.hook_z",
                   axes=("layer", "pos", "head"))
    result.shape             # (n_layers, pos, n_heads)
    result.top_k(5)          # [(value, {"layer": 9, "pos": 14, "head": 6}), ...]

Work that cannot change is skipped (see `plan.py` and `compute.py`): a cell patched at layer l starts from the
corrupted run's residual at layer l, and under causal attention computes only the positions from the first one
its patch changes, reading earlier keys and values from the corrupted run.
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Int
from tqdm import tqdm

from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.model.forward import check_tokens
from jaxlens.patching import cost
from jaxlens.patching.compute import ChunkSpec, chunk_values
from jaxlens.patching.plan import CellStatus, Chunk, Plan, Target, default_budget, make_plan, resolve_target
from jaxlens.patching.prepare import Prepared, prepare
from jaxlens.patching.result import PatchResult
from jaxlens.scale import distributed
from jaxlens.scale.mesh import replicated, split_leading
from jaxlens.scale.store import ChunkStore, fingerprint
from jaxlens.shapes import Params, ParamsLike, resolve_params


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled chunk function of a sweep: the cells of one window length, in chunks of one size.

    Attributes:
        window: positions computed, [n_pos - window, n_pos) (earlier ones are the corrupted run's).
        chunk_size: cells per call, a multiple of the `data` axis size (the last chunk of a layer is padded).
        n_chunks: calls of this program.
        n_cells: cells it computes (padding not counted).
        layers: the patched layers of its chunks (each chunk holds cells of one layer).
        point: the patched block runs on the patched position only (`compute.ChunkSpec.point`).
        flops: estimated FLOPs of all its chunks, padding included (`cost.cell_flops` x batch).
        peak_bytes: estimated activation bytes per device of one chunk (`cost.cell_bytes_fn`).
        last_queries: the last layer runs on this many positions (`compute.ChunkSpec.last_queries`; None:
            the whole window).
    """

    window: int
    chunk_size: int
    n_chunks: int
    n_cells: int
    layers: tuple[int, ...]
    point: bool
    flops: float
    peak_bytes: int
    last_queries: int | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class SweepPlan:
    """What `sweep` would do with the same arguments, found without running a single cell (`plan_sweep`).

    Attributes:
        hook: the hook patched (its name over every layer, `blocks.attn.hook_z`, or the global name).
        axes, shape: the swept axes and the result grid.
        status: [*shape] the CellStatus of every cell.
        programs: one per window length (each compiles once).
        chunks: the chunks in the order the sweep runs them; `chunk.bucket` indexes `programs`.
        n_devices: devices the cells of a chunk are split across (the mesh's `data` axis).
        memory_budget: bytes of activations per device the chunk sizes were chosen for.
        batch, n_pos: the prompts' shape.
        n_logits: logits per batch row and cell the metric reads (positions x vocabulary entries).
        flops: estimated FLOPs of the whole sweep (matmuls and attention, `cost`).
        naive_flops: the same for a naive sweep: one full forward with the full unembedding per cell.
    """

    hook: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    status: np.ndarray
    programs: tuple[Program, ...]
    chunks: tuple[Chunk, ...]
    n_devices: int
    memory_budget: int
    batch: int
    n_pos: int
    n_logits: int
    flops: float
    naive_flops: float
    _lower: Callable = dataclasses.field(repr=False)

    @property
    def n_cells(self) -> int:
        return int(np.prod(self.shape))

    @property
    def counts(self) -> dict[CellStatus, int]:
        """Cells of each status."""
        return {s: int((self.status == s).sum()) for s in CellStatus}

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    @property
    def n_programs(self) -> int:
        """Distinct chunk functions to compile (besides the corrupted forward)."""
        return sum(p.n_chunks > 0 for p in self.programs)

    @property
    def peak_bytes(self) -> int:
        """The largest estimated activation bytes per device of one chunk."""
        return max((p.peak_bytes for p in self.programs if p.n_chunks), default=0)

    def lower(self, program: int = 0, *, window: int | None = None, chunk_size: int | None = None,
              point_layer: bool = True, prefix_reuse: bool | None = None,
              last_layer: bool = True) -> jax.stages.Lowered:
        """Program `program`'s chunk function, freshly jitted and lowered for one device (not the sweep's
        cached copy): `.compile()` it for XLA's cost and memory analyses, or time the compile.

        Args:
            program: which program's window and chunk size.
            window, chunk_size, prefix_reuse: override them (e.g. one cell over every position).
            point_layer: False runs the patched block over the whole window even where one position would do.
            last_layer: False runs the last layer over the whole window even where the metric reads fewer
                positions (`compute.ChunkSpec.last_queries`).
        """
        return self._lower(program, window, chunk_size, point_layer, prefix_reuse, last_layer)

    def __repr__(self) -> str:
        c = self.counts
        return (f"SweepPlan(hook={self.hook!r}, shape={self.shape}, computed={c[CellStatus.COMPUTED]}, "
                f"no_op={c[CellStatus.NO_OP]}, outside_layers={c[CellStatus.OUTSIDE_LAYERS]}, "
                f"programs={self.n_programs}, chunks={self.n_chunks}, flops={self.flops:.3g}, "
                f"peak_bytes={self.peak_bytes})")

    def __str__(self) -> str:
        c = self.counts
        grid = " x ".join(f"{a} {n}" for a, n in zip(self.axes, self.shape, strict=True))
        lines = [
            f"Sweep of {self.hook} over {grid}: {self.n_cells:,} cells (batch {self.batch}, "
            f"{self.n_pos} positions)",
            f"  computed {c[CellStatus.COMPUTED]:,}; no-ops {c[CellStatus.NO_OP]:,} (the patch changes "
            f"nothing: the unpatched metric); outside `layers` {c[CellStatus.OUTSIDE_LAYERS]:,} (fill)",
            f"  {self.n_programs} chunk program(s) to compile, besides the corrupted forward; "
            f"{self.n_chunks} chunk(s) on {self.n_devices} device(s), memory budget "
            f"{_size(self.memory_budget)} per device",
        ]
        for k, p in enumerate(self.programs):
            if p.n_chunks:
                lines.append(
                    f"  program {k}: window {p.window} of {self.n_pos} positions"
                    f"{' (patched block on one position)' if p.point else ''}"
                    f"{f' (last layer on {p.last_queries} position(s))' if p.last_queries else ''}, "
                    f"{p.n_chunks} chunk(s) of "
                    f"{p.chunk_size} cells ({p.n_cells} real), layers {_span(p.layers)}, "
                    f"~{_size(p.peak_bytes)} per device, {p.flops:.3g} FLOPs")
        share = f"{100 * self.flops / self.naive_flops:.1f}% of " if self.naive_flops else ""
        lines.append(f"  estimated {self.flops:.3g} FLOPs ({share}a naive sweep's {self.naive_flops:.3g}: "
                     f"one full forward per cell); the metric reads {self.n_logits:,} logits per row")
        return "\n".join(lines)


def sweep(
    params: ParamsLike,
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
    max_windows: int = 3,
    devices: Sequence | None = None,
    mesh: Mesh | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
    labels: Mapping[str, Sequence] | None = None,
    fill: float = 0.0,
) -> PatchResult:
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
        chunk_size: cells per compiled call (rounded up to a multiple of the `data` axis size); overrides
            the budget's choice.
        max_windows: at most this many static window lengths (one compile each) for position reuse (3: on
            GPT-2 small a fourth window saves 6% of the FLOPs and costs a compile of about a second).
        devices: devices to split the cells across (default: every device of every process; in a single
            process, all local devices).
        mesh: a `jaxlens.scale` mesh instead: cells split over its `data` axis; params already sharded on it
            (weights split over `model`) are kept as they are, others replicated.
        checkpoint_dir: write finished chunks here and reuse those already there (`jaxlens.scale.store`;
            several processes: process 0 writes, on a file system every host sees).
        progress: show a tqdm bar over chunks.
        on_chunk: called as on_chunk(chunks_done, chunks_total) after each chunk is stored.
        labels: labels for some axes, e.g. {"pos": str_tokens}.
        fill: value of cells outside `layers`.

    Several processes (`jaxlens.scale.distributed.initialize`): every process makes the same call with the
    same values and gets the whole result.

    Returns:
        PatchResult over `axes` (+ "metric"), its baseline the unpatched corrupted run's metric. `plan_sweep`
        with the same arguments reports the cells, chunks and programs this runs.

    Raises:
        UnknownHookError: `hook` is not a hook point.
        InputError: bad axes, clean and corrupted of different shapes, a metric whose output is not a
            scalar (or the declared vector), a budget too small for one patch, labels of the wrong length, a
            checkpoint of another sweep, both `mesh` and `devices`, processes that planned different sweeps.
    """
    params, cfg = resolve_params(params, cfg)
    s = _setup(params, cfg, corrupted_tokens, clean, metric, hook, axes, metric_names, layers, prefix_reuse,
               memory_budget, chunk_size, max_windows, devices, mesh)
    plan, prep = s.plan, s.prep
    m_shape = () if metric_names is None else (len(metric_names),)
    out_axes = s.target.axes + (("metric",) if metric_names is not None else ())
    lab = [tuple((labels or {}).get(a, range(n))) for a, n in zip(s.target.axes, plan.shape, strict=True)]
    lab += [tuple(metric_names)] if metric_names is not None else []
    for a, l, n in zip(out_axes, lab, plan.shape + m_shape, strict=True):
        if len(l) != n:
            raise InputError(f"labels[{a!r}] has {len(l)} entries for an axis of size {n}.")
    values = np.zeros((len(plan.idx),) + m_shape, np.float32)
    done = np.zeros(len(plan.idx), bool)
    fp = fingerprint(repr(cfg), s.target.rel, repr(s.target.axes),
                     repr(None if layers is None else sorted(layers)), repr(metric_names), s.tokens,
                     prep.data["source"], prep.base)
    if jax.process_count() > 1:  # processes that planned different chunks would run different programs
        chunks = [(np.asarray([c.layer, c.bucket]), c.cells) for c in plan.chunks]
        distributed.check_same(fingerprint(fp, repr((plan.chunk_sizes, plan.windows)), plan.idx, plan.status,
                                           chunks), "sweep plan")
    store = ChunkStore(checkpoint_dir, fp, what="patching sweep")
    store.load(values, done)
    _run_chunks(s, values, done, store, progress, on_chunk)
    values[plan.status == CellStatus.NO_OP] = prep.base
    values[plan.status == CellStatus.OUTSIDE_LAYERS] = fill
    return PatchResult(values.reshape(plan.shape + m_shape), out_axes, lab, np.asarray(prep.base, np.float32))


def plan_sweep(
    params: ParamsLike,
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
    max_windows: int = 3,
    devices: Sequence | None = None,
    mesh: Mesh | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
    labels: Mapping[str, Sequence] | None = None,
    fill: float = 0.0,
) -> SweepPlan:
    """The plan of `sweep(...)` with the same arguments, as a report: cells (and why some are skipped), chunks
    and their sizes, programs to compile, estimated FLOPs and memory. A dry run: no chunk function compiles or
    runs, only the corrupted forward (and the clean one, given clean token ids) and the metric once.

    `checkpoint_dir`, `progress`, `on_chunk`, `labels` and `fill` do not change the plan; they are accepted so
    that the same keywords serve both calls.

    Returns:
        SweepPlan (`print` it for a summary).

    Raises:
        UnknownHookError, InputError: as `sweep`, for everything decided before the first chunk.
    """
    params, cfg = resolve_params(params, cfg)
    s = _setup(params, cfg, corrupted_tokens, clean, metric, hook, axes, metric_names, layers, prefix_reuse,
               memory_budget, chunk_size, max_windows, devices, mesh)
    return _report(s)


@dataclasses.dataclass(frozen=True)
class _Setup:
    params: Params
    tokens: jax.Array
    target: Target
    metric: Callable
    mesh: Mesh
    reuse: bool
    budget: int
    prep: Prepared
    plan: Plan


def _setup(params, cfg, corrupted_tokens, clean, metric, hook, axes, metric_names, layers, reuse,
           memory_budget, chunk_size, max_windows, devices, mesh) -> _Setup:
    """Everything `sweep` decides before the first chunk: the corrupted run, the source, the plan."""
    tokens = check_tokens(jnp.asarray(corrupted_tokens), cfg)
    target = resolve_target(cfg, hook, axes)
    mesh = distributed.data_mesh(mesh, devices)
    prep = prepare(params, cfg, tokens, clean, target, metric, metric_names, reuse)
    b, P = tokens.shape
    sizes = dict(zip(target.act_axes, prep.target_act.shape[-len(target.act_axes):], strict=True))
    sizes["layer"] = cfg.n_layers
    itemsize = jnp.dtype(prep.logits.dtype).itemsize
    if memory_budget is None:  # the same on every process: the smallest
        memory_budget = distributed.min_over_processes(default_budget(mesh.local_devices[0]))
    plan = make_plan(target, sizes, prep.diff, P, layers=layers, reuse=reuse, max_buckets=max_windows,
                     cell_bytes=cost.cell_bytes_fn(cfg, b, P, itemsize, prep.n_logits), budget=memory_budget,
                     n_devices=mesh.shape["data"], chunk_size=chunk_size)
    return _Setup(params, tokens, target, metric, mesh, reuse, memory_budget, prep, plan)


def _spec(s: _Setup, window: int, point_layer: bool = True, reuse: bool | None = None,
          last_layer: bool = True) -> ChunkSpec:
    reuse = s.reuse if reuse is None else reuse
    n_pos = s.tokens.shape[1]
    return ChunkSpec(s.target, window if reuse else n_pos, n_pos, reuse, s.metric, s.prep.reads, point_layer,
                     last_layer)


def _report(s: _Setup) -> SweepPlan:
    cfg, plan, (b, P) = s.target.cfg, s.plan, s.tokens.shape
    itemsize = jnp.dtype(s.prep.logits.dtype).itemsize
    cell_bytes = cost.cell_bytes_fn(cfg, b, P, itemsize, s.prep.n_logits)
    n_dev, programs = s.mesh.shape["data"], []
    for k, S in enumerate(plan.windows):
        spec, C = _spec(s, S), plan.chunk_sizes[k]
        mine = [c for c in plan.chunks if c.bucket == k]
        one = functools.partial(cost.cell_flops, cfg, s.target.kind, window=spec.window, n_pos=P,
                                reuse=s.reuse, point=spec.point, n_logits=s.prep.n_logits,
                                last_queries=spec.last_queries)
        flops = b * C * float(sum(one(layer=c.layer) for c in mine))
        programs.append(Program(spec.window, C, len(mine), sum(len(c.cells) for c in mine),
                                tuple(sorted({c.layer for c in mine})), spec.point, flops,
                                cell_bytes(spec.window) * -(-C // n_dev), spec.last_queries))
    n_cells = int(np.prod(plan.shape))

    def lower(program, window, chunk_size, point_layer, prefix_reuse, last_layer):
        spec = _spec(s, plan.windows[program] if window is None else window, point_layer, prefix_reuse,
                     last_layer)
        C = plan.chunk_sizes[program] if chunk_size is None else chunk_size
        fn = jax.jit(functools.partial(chunk_values, spec))
        return fn.lower(s.params, s.prep.data, np.int32(0), jnp.zeros((C, plan.idx.shape[1]), jnp.int32))

    return SweepPlan(s.target.full_name, s.target.axes, plan.shape, plan.status.reshape(plan.shape),
                     tuple(programs), plan.chunks, n_dev, s.budget, b, P, s.prep.n_logits,
                     float(sum(p.flops for p in programs)), b * n_cells * cost.forward_flops(cfg, P), lower)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _span(layers: tuple[int, ...]) -> str:
    if layers and list(layers) == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


@functools.lru_cache(maxsize=32)
def _compiled(spec: ChunkSpec, mesh: Mesh):
    return jax.jit(functools.partial(chunk_values, spec), out_shardings=split_leading(mesh))


def _run_chunks(s: _Setup, values, done, store, progress, on_chunk):
    plan = s.plan
    todo = [(i, c) for i, c in enumerate(plan.chunks) if not done[c.cells].all()]
    if not todo:
        return
    mesh = s.mesh
    rep, split = replicated(mesh), split_leading(mesh)
    params_d, data_d = distributed.place((s.params, s.prep.data), rep)
    total = len(todo)
    show = progress and distributed.is_writer()
    bar = tqdm(total=total, disable=not show, desc="patching", unit="chunk")
    pending = None
    try:
        for n, (number, chunk) in enumerate(todo):
            fn = _compiled(_spec(s, plan.windows[chunk.bucket]), mesh)
            C = plan.chunk_sizes[chunk.bucket]
            cells = np.concatenate([chunk.cells, np.repeat(chunk.cells[-1:], C - len(chunk.cells))])
            idx = distributed.place(plan.idx[cells], split)
            out = fn(params_d, data_d, distributed.place(np.int32(chunk.layer), rep), idx)
            if pending is not None:
                _finish(*pending, values, done, store, bar, on_chunk, total)
            pending = (n, number, chunk, out)
        _finish(*pending, values, done, store, bar, on_chunk, total)
    finally:
        bar.close()


def _finish(n, number, chunk, out, values, done, store, bar, on_chunk, total):
    vals = distributed.gather(out)[: len(chunk.cells)]
    values[chunk.cells] = vals
    done[chunk.cells] = True
    store.save(number, chunk.cells, vals)
    bar.update(1)
    if on_chunk is not None:
        on_chunk(n + 1, total)
