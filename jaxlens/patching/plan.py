"""Planning a sweep: which cells, where each starts, how they group into compiled window lengths and chunks.

A cell is one patched forward: one index on each swept axis (layer, pos, head, ...). Planning happens on the
host, before anything compiles:

- Target: the hook, its activation axes, and how the user's axis names map onto them ("head" is head_index,
  or kv_head_index for keys and values; "dest_pos"/"src_pos" are a pattern's query_pos/key_pos).
- Start position: under causal attention a patch cannot change any position before the first one where it
  writes a different value, so each cell records `p_start`, the first position (within its mask) where the
  source and target activations differ. A cell whose patch changes nothing is a no-op: its value is the
  target run's metric.
- Windows: cells run only positions [P - S, P) for a few static lengths S (chosen to minimise the positions
  computed, weighted by the layers each cell runs), reusing the target run's keys and values before that.
- Chunks: cells of one (window, layer) group, as many as fit the memory budget, a multiple of the device
  count.

Every cell ends with a `CellStatus`: computed, a no-op, or outside the layers asked for. `sweeping.plan_sweep`
reports a plan without running it.
"""

import dataclasses
import enum
import os

import numpy as np

from jaxlens import hook_names
from jaxlens.config import Config
from jaxlens.errors import InputError, UnknownHookError

POS_AXES = ("pos", "query_pos")  # axes along which a causal patch propagates forwards only
_ALIASES = {"dest_pos": "query_pos", "src_pos": "key_pos", "neuron": "d_mlp"}


class CellStatus(enum.IntEnum):
    """What a sweep does with one cell.

    COMPUTED: a patched forward runs.
    NO_OP: the clean value equals the corrupted one everywhere the cell patches (within rounding, see
        `prepare.differs`), so the patch changes nothing: the value is the unpatched corrupted run's metric.
    OUTSIDE_LAYERS: the cell's layer is not among `layers=`: the value is `fill`.
    """

    COMPUTED = 0
    NO_OP = 1
    OUTSIDE_LAYERS = 2


@dataclasses.dataclass(frozen=True)
class Target:
    """What a sweep patches (hashable: part of the compiled function's identity).

    Attributes:
        cfg: the model config.
        rel: the hook name, relative to the block for block hooks ("attn.hook_z") or global ("hook_embed").
        kind: "block" (inside the layers), "pre" (before them: embeddings) or "post" (ln_final).
        act_axes: the activation's axis names (`hook_names.block_hook_axes`).
        axes: the swept axes as the user named them, in result order.
        act_of_axis: for each swept axis, the activation axis it indexes ("layer" for the layer).
    """

    cfg: Config
    rel: str
    kind: str
    act_axes: tuple[str, ...]
    axes: tuple[str, ...]
    act_of_axis: tuple[str, ...]

    @property
    def full_name(self) -> str:
        """The hook name addressing every layer at once (`blocks.attn.hook_z`) or the global name."""
        return f"blocks.{self.rel}" if self.kind == "block" else self.rel


def resolve_target(cfg: Config, hook: str, axes) -> Target:
    """The Target for a hook name (TL short names like "z" or "resid_pre" work) and swept axes.

    Raises:
        UnknownHookError: the hook is not a hook point of this model.
        InputError: an axis the activation does not have, a repeated axis, or a block hook without "layer".
    """
    name = hook if ("." in hook or hook.startswith("hook_")) else hook_names.get_act_name(hook)
    rel = name.removeprefix("blocks.")
    if rel != name and rel.split(".", 1)[0].lstrip("-").isdigit():
        raise InputError(f"Sweep hook {hook!r} names one layer; give the hook without a layer index (e.g. "
                         f"{rel.split('.', 1)[1]!r}) and choose layers with `layers=`.")
    block, glob = hook_names.block_hook_axes(cfg), hook_names.global_hook_axes(cfg)
    if rel in block:
        kind, act = "block", block[rel]
    elif rel in glob and rel == name:
        kind, act = ("post" if rel.startswith("ln_final") else "pre"), glob[rel]
    else:
        raise UnknownHookError(hook, list(block) + [n for n in glob])
    act_axes = tuple(act.split())
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    mapped = []
    for ax in axes:
        mapped.append(_act_axis(ax, act_axes, kind, hook))
    if len(set(mapped)) != len(mapped):
        raise InputError(f"Sweep axes {axes} name the same axis twice (as {mapped}).")
    if kind == "block" and "layer" not in mapped:
        raise InputError(f"{hook!r} is a per-layer hook: include 'layer' in the swept axes, e.g. "
                         f"('layer', {', '.join(repr(a) for a in axes)}), and restrict layers with `layers=` "
                         "if needed.")
    return Target(cfg, rel, kind, act_axes, axes, tuple(mapped))


def _act_axis(ax: str, act_axes: tuple[str, ...], kind: str, hook: str) -> str:
    if ax == "layer":
        if kind != "block":
            raise InputError(f"{hook!r} is outside the blocks: it has no 'layer' axis to sweep.")
        return "layer"
    cand = _ALIASES.get(ax, ax)
    if cand in ("head", "head_index"):
        cand = next((a for a in ("head_index", "kv_head_index") if a in act_axes), cand)
    if cand == "pos" and "pos" not in act_axes:
        cand = "query_pos"
    if cand not in act_axes or cand in ("batch", "1"):
        sweepable = [a for a in act_axes if a not in ("batch", "1")] + (["layer"] if kind == "block" else [])
        raise InputError(f"Cannot sweep axis {ax!r} of {hook!r}: its activation has axes "
                         f"{' '.join(act_axes)}. Sweep some of {sweepable} "
                         "(aliases: head, dest_pos, src_pos, neuron).")
    return cand


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Cells computed together: one window length (bucket) and one layer."""

    bucket: int
    layer: int
    cells: np.ndarray  # cell numbers (row-major in the result grid)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The cells of a sweep and how they are computed.

    Attributes:
        shape: the result grid (one size per swept axis).
        idx: [n_cells, n_axes] index of every cell.
        layer: [n_cells] layer of each cell (0 for hooks outside the blocks).
        status: [n_cells] the CellStatus of each cell.
        windows: static window lengths S; bucket k runs positions [P - S_k, P).
        chunk_sizes: cells per chunk for each bucket (a multiple of the device count).
        chunks: the chunks, in order.
    """

    shape: tuple[int, ...]
    idx: np.ndarray
    layer: np.ndarray
    status: np.ndarray
    windows: tuple[int, ...]
    chunk_sizes: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def make_plan(target: Target, sizes: dict, diff: np.ndarray | None, n_pos: int, *, layers=None,
              reuse: bool = True, max_buckets: int = 4, cell_bytes=None, budget: int, n_devices: int,
              chunk_size: int | None = None) -> Plan:
    """Enumerate cells, find where each can start, group them into windows and chunks.

    Args:
        target: what is patched.
        sizes: size of every swept axis ("layer" and activation axes).
        diff: bool [layer?, *activation] where source != target (None: assume everything differs).
        n_pos: sequence length P.
        layers: layers to compute (None: all); other cells are skipped.
        reuse: skip the layers below and the positions before each patch (False: every cell runs everything).
        max_buckets: most window lengths (one compile each).
        cell_bytes: function S -> estimated bytes of one cell with window S.
        budget: memory budget in bytes per device.
        n_devices: devices the chunk axis is split across.
        chunk_size: cells per chunk (rounded up to a multiple of n_devices); None to fit the budget.

    Raises:
        InputError: the budget cannot hold one patch.
    """
    shape = tuple(sizes[a] for a in target.act_of_axis)
    idx = (np.indices(shape).reshape(len(shape), -1).T.astype(np.int32) if shape
           else np.zeros((1, 0), np.int32))
    n = idx.shape[0]
    li = target.act_of_axis.index("layer") if "layer" in target.act_of_axis else None
    layer = idx[:, li] if li is not None else np.zeros(n, np.int32)
    status = np.full(n, CellStatus.COMPUTED, np.int8)
    if layers is not None:
        status[~np.isin(layer, np.asarray(list(layers)))] = CellStatus.OUTSIDE_LAYERS
    p_start = _p_start(target, idx, diff, n_pos) if reuse else np.zeros(n, np.int64)
    causal = target.cfg.attention_dir == "causal" and target.kind != "post"
    if reuse:
        status[(status == CellStatus.COMPUTED) & (p_start >= n_pos)] = CellStatus.NO_OP
    if not (reuse and causal):
        p_start = np.zeros(n, np.int64)
    live = np.nonzero(status == CellStatus.COMPUTED)[0]
    n_layers = target.cfg.n_layers
    weight = (n_layers - layer[live] if target.kind == "block" else np.full(len(live), n_layers)) + 1
    windows = _choose_windows(n_pos - p_start[live], weight, max_buckets) if len(live) else (n_pos,)
    bucket_of = np.searchsorted(np.asarray(windows), n_pos - p_start[live])
    sizes_c, chunks = [], []
    for k, S in enumerate(windows):
        in_k = live[bucket_of == k]
        groups = [in_k[layer[in_k] == l] for l in np.unique(layer[in_k])]
        need = cell_bytes(S) if cell_bytes is not None else 1
        cap = budget // max(need, 1)
        if cap < 1:
            raise InputError(
                f"The memory budget of {budget:,} bytes per device is too small for one patch: a patched "
                f"forward over {S} positions needs about {need:,} bytes. Raise memory_budget (or leave it "
                "unset)."
            )
        C = chunk_size if chunk_size is not None else _best_chunk([len(g) for g in groups], cap * n_devices)
        C = -(-max(int(C), 1) // n_devices) * n_devices
        sizes_c.append(C)
        for g in groups:
            for s in range(0, len(g), C):
                chunks.append(Chunk(k, int(layer[g[0]]), g[s:s + C]))
    return Plan(shape, idx, layer, status, tuple(windows), tuple(sizes_c), tuple(chunks))


def _p_start(target: Target, idx: np.ndarray, diff: np.ndarray | None, n_pos: int) -> np.ndarray:
    """First position each cell's patch changes (n_pos: none). Without `diff`, the patched position (or 0)."""
    axes = ("layer",) * (target.kind == "block") + target.act_axes
    pos_ax = next((a for a in POS_AXES if a in target.act_axes), None)
    if diff is None:
        diff = np.ones([1] * len(axes), bool)
    keep = set(target.act_of_axis) | {pos_ax}
    red = tuple(i for i, a in enumerate(axes) if a not in keep)
    d = np.any(diff, axis=red, keepdims=True) if red else diff
    index = []
    for i, a in enumerate(axes):
        if a in target.act_of_axis:
            col = idx[:, target.act_of_axis.index(a)]
            index.append(np.minimum(col, d.shape[i] - 1))
        elif a == pos_ax:
            index.append(None)
        else:
            index.append(np.zeros(len(idx), np.int64))
    if pos_ax is None:
        hit = d[tuple(index)]
        return np.where(hit, 0, n_pos)
    pi = axes.index(pos_ax)
    if pos_ax in target.act_of_axis:
        hit = d[tuple(index)]
        return np.where(hit, index[pi], n_pos)
    dp = np.broadcast_to(d, d.shape[:pi] + (n_pos,) + d.shape[pi + 1:])
    rows = dp[tuple(ix if i != pi else slice(None) for i, ix in enumerate(index))]  # [n_cells, n_pos]
    rows = rows.reshape(len(idx), n_pos)
    return np.where(rows.any(1), rows.argmax(1), n_pos)


def _choose_windows(lengths: np.ndarray, weight: np.ndarray, k_max: int) -> tuple[int, ...]:
    """At most k_max window lengths minimising sum(weight * window) with window >= length.

    A dynamic program over the distinct lengths.
    """
    u, inv = np.unique(lengths, return_inverse=True)
    w = np.bincount(inv, weights=weight)
    n, k_max = len(u), max(1, min(k_max, len(u)))
    cw = np.concatenate([[0.0], np.cumsum(w)])
    best = np.full((k_max + 1, n + 1), np.inf)
    cut = np.zeros((k_max + 1, n + 1), np.int64)
    best[0, 0] = 0.0
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):  # groups end at u[j-1]; the window is u[j-1]
            cost = best[k - 1, :j] + (cw[j] - cw[:j]) * u[j - 1]
            i = int(np.argmin(cost))
            best[k, j], cut[k, j] = cost[i], i
    k = int(np.argmin(best[1:, n])) + 1
    out, j = [], n
    while j > 0:
        out.append(int(u[j - 1]))
        j, k = int(cut[k, j]), k - 1
    return tuple(sorted(out))


def _best_chunk(group_sizes: list[int], cap: int, overhead: int = 8) -> int:
    """Chunk size <= cap minimising padded cells plus a fixed per-call overhead."""
    biggest = max(group_sizes, default=1)
    best, best_cost = 1, None
    for c in range(1, min(cap, biggest) + 1):
        cost = sum(-(-g // c) * (c + overhead) for g in group_sizes)
        if best_cost is None or cost < best_cost or (cost == best_cost and c > best):
            best, best_cost = c, cost
    return best


def default_budget(device) -> int:
    """Half the free memory of an accelerator; on the CPU, an eighth of RAM capped at 2 GiB."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices may not report
        stats = None
    if stats and "bytes_limit" in stats:
        return int(0.5 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * 2**30
    return int(min(2 * 2**30, ram // 8))
