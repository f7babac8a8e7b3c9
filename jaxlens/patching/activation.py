"""TransformerLens's activation-patching functions, same names, arguments, shapes and values, as sweeps.

    from jaxlens.patching import get_act_patch_attn_head_out_by_pos
    _, clean_cache = model.run_with_cache(clean_tokens)
    # grid: [layer pos head]
    grid = get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, metric)

Each function is one `sweep` (or a few, stacked, for the `*_every` helpers) and takes the sweep's options as
keywords (`memory_budget`, `chunk_size`, `prefix_reuse`, `devices`, `checkpoint_dir`, `progress`, ...).
Semantics follow TransformerLens (`transformer_lens/patching.py`): every index is patched across the whole
batch; keys and values sweep `n_key_value_heads` under grouped-query attention (the `*_every` helpers pad them
with zeros to n_heads); the pattern sweeps are indexed (layer, head_index, dest_pos[, src_pos]).

TransformerLens 4.3's calling conventions hold too (`tl_sweep`): `reduce="mean"|"none"` with a per-example
metric, `baseline=True`, a mapping of metrics (a leading metric axis) and `index_df` rows; under
`reduce="none"`, `baseline=True` or a mapping the result is a `PatchResult` laid out as TransformerLens's
`PatchingResult` (`[metric?, *axes | row, example?]`), with its statistics; otherwise that result's values, as
a jax array.

`get_act_patch_direct_path` is path patching of one source head into later heads' query, key or value inputs;
`get_act_patch_direct_path_all_sources` does it from every source head.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from tqdm import tqdm

from jaxlens.errors import InputError
from jaxlens.model.forward import check_tokens
from jaxlens.patching.prepare import cached_run
from jaxlens.patching.result import PatchResult
from jaxlens.patching.sweeping import sweep

# (hook, axes) of each TransformerLens sweep, by the suffix of its name.
SPECS: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("hook_resid_pre", ("layer", "pos")),
    "resid_mid": ("hook_resid_mid", ("layer", "pos")),
    "attn_out": ("hook_attn_out", ("layer", "pos")),
    "mlp_out": ("hook_mlp_out", ("layer", "pos")),
    "attn_head_out_by_pos": ("attn.hook_z", ("layer", "pos", "head")),
    "attn_head_q_by_pos": ("attn.hook_q", ("layer", "pos", "head")),
    "attn_head_k_by_pos": ("attn.hook_k", ("layer", "pos", "head")),
    "attn_head_v_by_pos": ("attn.hook_v", ("layer", "pos", "head")),
    "attn_head_pattern_by_pos": ("attn.hook_pattern", ("layer", "head_index", "dest_pos")),
    "attn_head_pattern_dest_src_pos": ("attn.hook_pattern", ("layer", "head_index", "dest_pos", "src_pos")),
    "attn_head_out_all_pos": ("attn.hook_z", ("layer", "head")),
    "attn_head_q_all_pos": ("attn.hook_q", ("layer", "head")),
    "attn_head_k_all_pos": ("attn.hook_k", ("layer", "head")),
    "attn_head_v_all_pos": ("attn.hook_v", ("layer", "head")),
    "attn_head_pattern_all_pos": ("attn.hook_pattern", ("layer", "head_index")),
}
# The `*_every` helpers: stacked sweeps on a leading patch_type axis.
EVERY: dict[str, tuple[str, ...]] = {
    "attn_head_all_pos_every": ("attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos",
                                "attn_head_v_all_pos", "attn_head_pattern_all_pos"),
    "attn_head_by_pos_every": ("attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos",
                               "attn_head_v_by_pos", "attn_head_pattern_by_pos"),
    "block_every": ("resid_pre", "attn_out", "mlp_out"),
}


# TransformerLens 4.3's names for the swept axes in a PatchingResult, and its patch-type names.
_RENAMES = {"head_index": "head", "dest_pos": "pos"}
_TYPE_NAMES = {"attn_head_all_pos_every": ("out", "q", "k", "v", "pattern"),
               "attn_head_by_pos_every": ("out", "q", "k", "v", "pattern"),
               "block_every": ("resid_pre", "attn_out", "mlp_out")}
_EVERY_AXES = {"attn_head_all_pos_every": ("layer", "head"),
               "attn_head_by_pos_every": ("layer", "pos", "head"),
               "block_every": ("layer", "pos")}
_REDUCE = ("scalar", "mean", "none")


def stack_patch_types(kind: str, parts: Sequence[PatchResult], n_heads: int) -> PatchResult:
    """The parts of a `*_every` helper on a leading "patch_type" axis (after "metric"), as TransformerLens
    lays them out: each part's axes renamed and ordered as the helper's (the by-position pattern grid [layer
    head_index dest_pos] becomes [layer pos head]), k/v padded with zeros to n_heads; the first part's
    baseline."""
    order = _EVERY_AXES[kind]
    aligned = []
    for part in parts:
        p = part.rename(**{a: b for a, b in _RENAMES.items() if a in part.axes})
        p = p.transpose(*["metric"] * p.has_metric_axis, *order, *["example"] * (not p.reduced))
        aligned.append(p.pad(head=n_heads) if "head" in order else p)
    return PatchResult.stack(aligned, "patch_type", _TYPE_NAMES[kind], position=int(parts[0].has_metric_axis))


def _sweep_function(kind: str, summary: str) -> Callable:
    def patch(model, corrupted_tokens, clean_cache, patching_metric, index_df=None, return_index_df=False, *,
              reduce: str = "scalar", baseline: bool = False, **options):
        if kind in EVERY:
            if index_df is not None or return_index_df:
                raise InputError(f"get_act_patch_{kind} stacks whole grids; index_df and return_index_df "
                                 "apply to the single sweeps (e.g. get_act_patch_attn_head_out_by_pos).")
            parts = []
            for part in EVERY[kind]:
                opts = dict(options)
                if opts.get("checkpoint_dir") is not None:
                    opts["checkpoint_dir"] = Path(opts["checkpoint_dir"]) / part
                hook, axes = SPECS[part]
                parts.append(tl_result(model, corrupted_tokens, clean_cache, patching_metric, hook, axes,
                                       reduce=reduce, baseline=baseline, **opts))
            res = stack_patch_types(kind, parts, model.cfg.n_heads)
            return res if _typed(patching_metric, reduce, baseline) else jnp.asarray(res)
        hook, axes = SPECS[kind]
        return tl_sweep(model, corrupted_tokens, clean_cache, patching_metric, hook, axes, index_df=index_df,
                        return_index_df=return_index_df, reduce=reduce, baseline=baseline, **options)

    hook, axes = SPECS.get(kind, (None, None))
    shape = (f"[{len(EVERY[kind])}, " + ", ".join(_TL_AXES[kind]) + "]") if kind in EVERY else \
        "[" + ", ".join(axes) + "]"
    patch.__name__ = patch.__qualname__ = f"get_act_patch_{kind}"
    patch.__doc__ = f"""{summary} As TransformerLens's `get_act_patch_{kind}`.

    Args:
        model: a HookedTransformer (anything with `.cfg` and `.params`).
        corrupted_tokens: the corrupted prompts [batch pos].
        clean_cache: the clean run's cache (ActivationCache or dict), or clean token ids [batch pos].
        patching_metric: logits [batch pos d_vocab] -> scalar ([batch] under reduce="mean"/"none"), or a
            mapping of names to such functions (a leading metric axis).
        index_df, return_index_df, reduce, baseline: as TransformerLens 4.3 (see `tl_sweep`).
        **options: `sweep` options (memory_budget, chunk_size, prefix_reuse, devices, checkpoint_dir,
            progress, on_chunk).

    Returns:
        The metric for each patch, shape {shape} (a jax array); a PatchResult in TransformerLens's layout
        under reduce="none", baseline=True or a mapping of metrics.
    """
    return patch


_TL_AXES = {"attn_head_all_pos_every": ("n_layers", "n_heads"),
            "attn_head_by_pos_every": ("n_layers", "pos", "n_heads"),
            "block_every": ("n_layers", "pos")}


def tl_sweep(model, corrupted_tokens, clean_cache, patching_metric, hook: str, axes, *, index_df=None,
             return_index_df: bool = False, reduce: str = "scalar", baseline: bool = False, **options):
    """One sweep with TransformerLens 4.3's calling conventions on top of `sweep`.

    Args:
        patching_metric: a function of the logits, or a mapping {name: function} (a leading metric axis).
            Under reduce="scalar" each returns a scalar; under "mean" and "none" a [batch] array.
        index_df: the cells to patch, one row each (a pandas DataFrame, or anything with `.columns` and
            `.to_numpy()`, columns named as `axes`); the output then has one flat row axis. The full grid
            over the layers it names is computed and the rows gathered from it.
        return_index_df: also return the index DataFrame (array results only; needs pandas).
        reduce: "scalar", "mean" (average the per-example metric) or "none" (keep it: an "example" axis).
        baseline: also return the unpatched corrupted run's metric.
        **options: `sweep` options.

    Returns:
        The grid [*axes] (or [n_rows]) as a jax array, with the index DataFrame if asked; under reduce="none",
        baseline=True or a mapping of metrics, the PatchResult itself (`tl_result`).
    """
    typed = _typed(patching_metric, reduce, baseline)
    if typed and return_index_df:
        raise InputError("return_index_df applies to the array result only; a PatchResult (reduce='none', "
                         "baseline=True or a mapping of metrics) carries its cells as .index_df.")
    res = tl_result(model, corrupted_tokens, clean_cache, patching_metric, hook, axes, index_df=index_df,
                    reduce=reduce, baseline=baseline, **options)
    if typed:
        return res
    return (jnp.asarray(res), res.index_df) if return_index_df else jnp.asarray(res)


def tl_result(model, corrupted_tokens, clean_cache, patching_metric, hook: str, axes, *, index_df=None,
              reduce: str = "scalar", baseline: bool = False, **options) -> PatchResult:
    """`tl_sweep`'s result as a PatchResult whatever the options, in TransformerLens's layout: axes
    ("metric"?, *axes | "row", "example"?), the metric axis only for a mapping of metrics, "example" only
    under reduce="none", and a baseline when `baseline=True`."""
    if reduce not in _REDUCE:
        raise InputError(f"reduce must be one of {_REDUCE}; found {reduce!r}.")
    metrics = dict(patching_metric) if isinstance(patching_metric, Mapping) else {"metric": patching_metric}
    if not metrics:
        raise InputError("The mapping of patching metrics is empty: give at least one {name: function}.")
    axes = tuple(axes)
    rows = _rows(index_df, axes, model.cfg) if index_df is not None else None
    if rows is not None and "layer" in axes:
        options.setdefault("layers", sorted(set(rows[:, axes.index("layer")].tolist())))
    batch = int(np.shape(corrupted_tokens)[0])
    per_example = reduce != "scalar"
    if not per_example and not isinstance(patching_metric, Mapping):  # the user's metric itself: one compile
        res = sweep(model.params, model.cfg, corrupted_tokens, clean_cache, patching_metric, hook=hook,
                    axes=axes, **options)
        res = res if baseline else dataclasses.replace(res, baseline=None)
        return res if rows is None else _take_rows(res, rows, axes)
    metric, names = _stacked_metric(tuple(metrics.items()), batch, per_example)
    flat = sweep(model.params, model.cfg, corrupted_tokens, clean_cache, metric, hook=hook, axes=axes,
                 metric_names=names, **options)
    m_shape = (len(metrics),) + ((batch,) if per_example else ())
    values = flat.values.reshape(flat.shape[:-1] + m_shape)
    values = np.moveaxis(values, len(axes), 0)  # [metric, *axes, batch?]
    base = flat.baseline.reshape(m_shape)
    if reduce == "mean":
        values, base = values.mean(-1), base.mean(-1)
    res = PatchResult(values, ("metric",) + axes + ("example",) * (reduce == "none"),
                      (tuple(metrics),) + flat.labels[:-1] + (None,) * (reduce == "none"),
                      base if baseline else None)
    if not isinstance(patching_metric, Mapping):
        res = res.select(metric="metric")
    return res if rows is None else _take_rows(res, rows, axes)


def _typed(patching_metric, reduce: str, baseline: bool) -> bool:
    """TransformerLens returns its typed result (not a tensor) for these options."""
    return isinstance(patching_metric, Mapping) or reduce == "none" or baseline


def _take_rows(res: PatchResult, rows: np.ndarray, axes: tuple) -> PatchResult:
    """The cells named by `rows` [n_rows, len(axes)] on one "row" axis in place of the grid axes `axes`."""
    first = res.axes.index(axes[0])
    grid = np.asarray(res.shape[first:first + len(axes)])
    outside = (rows >= grid).any(1)
    if outside.any():
        bad = int(np.nonzero(outside)[0][0])
        raise InputError(f"index_df row {bad} {dict(zip(axes, rows[bad].tolist(), strict=True))} is outside "
                         f"the grid {dict(zip(axes, grid.tolist(), strict=True))}.")
    values = res.values[(slice(None),) * first + tuple(rows.T)]
    new_axes = res.axes[:first] + ("row",) + res.axes[first + len(axes):]
    labels = res.labels[:first] + (tuple(map(tuple, rows.tolist())),) + res.labels[first + len(axes):]
    return PatchResult(values, new_axes, labels, res.baseline, name=res.name, row_axes=axes)


def _stacked_metric(metrics: tuple, batch: int, per_example: bool):
    """One vector metric of every (name, metric) (each [batch] when per-example), flattened, and its labels.
    Cached, so that the same metrics give the same function and the sweep's compiled chunks are reused."""
    try:
        return _stack_metrics(metrics, batch, per_example)
    except TypeError:  # an unhashable metric: a new function (and compile) per call
        return _stack_metrics.__wrapped__(metrics, batch, per_example)


@functools.lru_cache(maxsize=64)
def _stack_metrics(metrics: tuple, batch: int, per_example: bool):
    def metric(logits):
        outs = []
        for name, fn in metrics:
            out = jnp.asarray(fn(logits))
            want = (batch,) if per_example else ()
            if out.shape != want:
                raise InputError(
                    f"patching_metric {name!r} must return "
                    + (f"a [batch] array of length {batch} under reduce='mean' or 'none'" if per_example else
                       "a scalar under reduce='scalar' (return a [batch] array and pass reduce='mean' or "
                       "reduce='none' to keep per-example values)") + f"; found shape {tuple(out.shape)}.")
            outs.append(out.reshape(-1).astype(jnp.float32))
        return jnp.concatenate(outs)

    per = range(batch if per_example else 1)
    names = tuple(f"{m}[{b}]" if per_example else m for m, _ in metrics for b in per)
    return metric, names


def _rows(index_df, axes: tuple, cfg) -> np.ndarray:
    """The cells an index DataFrame names, [n_rows, n_axes] in `axes` order, checked."""
    cols = [str(c) for c in getattr(index_df, "columns", [])]
    if not hasattr(index_df, "to_numpy") or sorted(cols) != sorted(axes):
        raise InputError(f"index_df must be a DataFrame with columns {list(axes)}; found "
                         f"{cols if cols else type(index_df).__name__}.")
    arr = np.asarray(index_df.to_numpy())
    if arr.ndim != 2 or len(arr) == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"index_df must hold at least one row of integer indices; found {arr.dtype} values "
                         f"of shape {arr.shape}.")
    rows = arr[:, [cols.index(a) for a in axes]].astype(np.int64)
    if (rows < 0).any():
        raise InputError("index_df holds negative indices; give each axis's index from 0.")
    if "layer" in axes and rows[:, axes.index("layer")].max() >= cfg.n_layers:
        raise InputError(f"index_df names layer {rows[:, axes.index('layer')].max()}; the model has "
                         f"{cfg.n_layers} layers.")
    return rows


get_act_patch_resid_pre = _sweep_function(
    "resid_pre", "Patch the residual stream entering each block, by position.")
get_act_patch_resid_pre.__doc__ += """
    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlens import HookedTransformer, init_params, patching, testing
        >>> cfg = testing.tiny_config()                  # 3 layers, vocab 97
        >>> model = HookedTransformer(cfg, init_params(cfg, jax.random.key(0)))
        >>> clean = jnp.array([[1, 5, 9, 2, 7]])
        >>> corrupted = clean.at[0, 2].set(11)           # the prompts differ at position 2
        >>> _, clean_cache = model.run_with_cache(clean)
        >>> def metric(logits):
        ...     return logits[0, -1, 3] - logits[0, -1, 4]
        >>> grid = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, progress=False)
        >>> grid.shape                                   # [layer pos]
        (3, 5)
        >>> bool(jnp.allclose(grid[0, 2], metric(model(clean)), atol=1e-4))  # layer 0, pos 2: the clean run
        True
        >>> bool(jnp.allclose(grid[:, :2], metric(model(corrupted)), atol=1e-4))  # before pos 2: no change
        True
    """
get_act_patch_resid_mid = _sweep_function(
    "resid_mid", "Patch the residual stream between attention and MLP, by position.")
get_act_patch_attn_out = _sweep_function("attn_out", "Patch each attention layer's output, by position.")
get_act_patch_mlp_out = _sweep_function("mlp_out", "Patch each MLP layer's output, by position.")
get_act_patch_attn_head_out_by_pos = _sweep_function(
    "attn_head_out_by_pos", "Patch each head's output (z), by position.")
get_act_patch_attn_head_q_by_pos = _sweep_function(
    "attn_head_q_by_pos", "Patch each head's queries, by position.")
get_act_patch_attn_head_k_by_pos = _sweep_function(
    "attn_head_k_by_pos", "Patch each key head's keys, by position.")
get_act_patch_attn_head_v_by_pos = _sweep_function(
    "attn_head_v_by_pos", "Patch each value head's values, by position.")
get_act_patch_attn_head_pattern_by_pos = _sweep_function(
    "attn_head_pattern_by_pos", "Patch each head's attention pattern row, by destination position.")
get_act_patch_attn_head_pattern_dest_src_pos = _sweep_function(
    "attn_head_pattern_dest_src_pos",
    "Patch each (destination, source) entry of each head's attention pattern.")
get_act_patch_attn_head_out_all_pos = _sweep_function(
    "attn_head_out_all_pos", "Patch each head's output at every position.")
get_act_patch_attn_head_q_all_pos = _sweep_function(
    "attn_head_q_all_pos", "Patch each head's queries at every position.")
get_act_patch_attn_head_k_all_pos = _sweep_function(
    "attn_head_k_all_pos", "Patch each key head's keys at every position.")
get_act_patch_attn_head_v_all_pos = _sweep_function(
    "attn_head_v_all_pos", "Patch each value head's values at every position.")
get_act_patch_attn_head_pattern_all_pos = _sweep_function(
    "attn_head_pattern_all_pos", "Patch each head's whole attention pattern.")
get_act_patch_attn_head_all_pos_every = _sweep_function(
    "attn_head_all_pos_every",
    "Every head patched at every position, for output, q, k, v and pattern, stacked.")
get_act_patch_attn_head_by_pos_every = _sweep_function(
    "attn_head_by_pos_every", "Every head patched by position, for output, q, k, v and pattern, stacked.")
get_act_patch_block_every = _sweep_function(
    "block_every", "resid_pre, attn_out and mlp_out patched by position, stacked.")


# TransformerLens's setters, each "copy the clean value at this index, across the batch": what a sweep does.
_TL_SETTERS = ("layer_pos_patch_setter", "layer_pos_head_vector_patch_setter",
               "layer_head_vector_patch_setter", "layer_head_pattern_patch_setter",
               "layer_head_pos_pattern_patch_setter", "layer_head_dest_src_pos_pattern_patch_setter")


def generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, patch_setter=None,
                             activation_name: str | None = None, index_axis_names=None, index_df=None,
                             return_index_df: bool = False, *, reduce: str = "scalar", baseline: bool = False,
                             **options):
    """TransformerLens's `generic_activation_patch`, same argument order: sweep `activation_name` ("z",
    "resid_pre", "pattern", ...) over `index_axis_names` (the first is "layer"), or over the rows of
    `index_df` (columns named as the axes; a flat output). `reduce`, `baseline` and a mapping of metrics
    as in TransformerLens 4.3 (see `tl_sweep`).

    `patch_setter` may be None or one of TransformerLens's own setters (all of which copy the clean value at
    the index across the batch, as every sweep does); custom setters are refused: write the change as a sweep
    over the axes it indexes, or as an intervention.
    """
    setter = getattr(patch_setter, "__name__", patch_setter)
    if patch_setter is not None and setter not in _TL_SETTERS:
        raise InputError(f"patch_setter {setter!r} is not one of TransformerLens's setters {_TL_SETTERS}; "
                         "jaxlens sweeps always copy the clean value at the index across the batch. Leave "
                         "patch_setter out, or express the change as a sweep or an intervention.")
    if index_axis_names is None and index_df is not None:
        index_axis_names = tuple(str(c) for c in getattr(index_df, "columns", ()))
    if activation_name is None or not index_axis_names:
        raise InputError("generic_activation_patch needs activation_name (e.g. 'z') and index_axis_names "
                         "(e.g. ('layer', 'pos', 'head_index')) or an index_df whose columns name the axes.")
    return tl_sweep(model, corrupted_tokens, clean_cache, patching_metric, activation_name,
                    tuple(index_axis_names), index_df=index_df, return_index_df=return_index_df,
                    reduce=reduce, baseline=baseline, **options)


def get_act_patch_direct_path(model, corrupted_tokens, clean_cache, corrupted_cache, patching_metric,
                              src_layer: int, src_head: int, component: str = "q", verbose: bool = True,
                              **options) -> Float[Array, "n_layers n_heads"]:
    """Path patching of one source head into each later head's query, key or value input.

    For every destination head B = (l, h) with l > src_layer, the corrupted run is re-run with one change: the
    input that head B's `component` ("q", "k" or "v") reads, the residual stream entering layer l before ln1
    (hook_<component>_input), becomes `resid_pre_corrupted[l] + delta` at every position, where
    `delta = (z_clean - z_corrupted)[:, :, src_head] @ W_O[src_layer, src_head]` is the source head's
    clean-minus-corrupted write to the residual stream (without b_O). Every other reader, including head B's
    other inputs, the MLPs and other heads, still sees the corrupted residual; ln1 is recomputed on the
    patched input (exact, folded LayerNorm or not); everything downstream of head B then runs normally. As
    TransformerLens 4.3's `get_act_patch_direct_path`.

    Args:
        model: a HookedTransformer (anything with `.cfg` and `.params`).
        corrupted_tokens: [batch pos].
        clean_cache: holds `blocks.{src_layer}.attn.hook_z` (or clean token ids [batch pos]).
        corrupted_cache: the corrupted run's cache, used for hook_z when it holds it (else recomputed).
        patching_metric: logits -> scalar.
        src_layer, src_head: the source head.
        component: "q", "k" or "v".
        verbose: show a progress bar.
        **options: `sweep` options.

    Returns:
        [n_layers, n_heads] (n_key_value_heads for "k"/"v" under grouped-query attention): the metric with
        the path into each head patched; rows l <= src_layer are 0.0 placeholders, as in TransformerLens.

    Raises:
        InputError: a component other than q/k/v, a source head outside the model, or a model whose
            attention output is normalised before the residual add (Gemma-2 ln1_post), where a head's write is
            not z @ W_O.

    Unlike TransformerLens, which refuses "k"/"v" under grouped-query attention, this patches the shared key
    or value head's input (columns are key/value heads).
    """
    cfg, params = model.cfg, model.params
    if component not in ("q", "k", "v"):
        raise InputError(f"component must be 'q', 'k' or 'v'; found {component!r}.")
    if not (0 <= src_layer < cfg.n_layers and 0 <= src_head < cfg.n_heads):
        raise InputError(f"Source head ({src_layer}, {src_head}) is outside the model "
                         f"({cfg.n_layers} layers x {cfg.n_heads} heads).")
    if cfg.use_normalization_before_and_after:
        raise InputError("Direct path patching needs each head's residual write to be z @ W_O, but this "
                         "model normalises the attention output (ln1_post) before adding it to the residual "
                         "stream. Use get_act_patch_attn_head_out_by_pos or a sweep over attn.hook_z "
                         "instead.")
    tokens = check_tokens(jnp.asarray(corrupted_tokens), cfg)
    z_name = f"blocks.{src_layer}.attn.hook_z"
    corr = cached_run(params, cfg, tokens, ("blocks.hook_resid_pre", z_name))[1]
    z_corr = (corrupted_cache[z_name] if corrupted_cache is not None and z_name in corrupted_cache
              else corr[z_name])
    if isinstance(clean_cache, (jax.Array, np.ndarray)):
        z_clean = cached_run(params, cfg, check_tokens(jnp.asarray(clean_cache), cfg), (z_name,))[1][z_name]
    else:
        z_clean = clean_cache[z_name]
    W_O = params["blocks"]["attn"]["W_O"][src_layer, src_head]
    # einsum letters: b=batch p=pos e=d_head d=d_model l=layer
    delta = jnp.einsum("bpe,ed->bpd", (z_clean - z_corr)[:, :, src_head], W_O)
    source = (corr["blocks.hook_resid_pre"] + delta[None])[:, :, :, None, :]  # [l b p 1 d], every head
    options.setdefault("progress", verbose)
    return jnp.asarray(sweep(params, cfg, tokens, source, patching_metric, hook=f"hook_{component}_input",
                             axes=("layer", "head"), layers=range(src_layer + 1, cfg.n_layers), fill=0.0,
                             **options))


def get_act_patch_direct_path_all_sources(model, corrupted_tokens, clean_cache, corrupted_cache,
                                          patching_metric, component: str = "q", verbose: bool = True,
                                          **options) -> Float[Array, "n_layers n_heads n_layers n_heads"]:
    """`get_act_patch_direct_path` from every source head, as TransformerLens 4.3's function of this name.

    Returns:
        [n_layers, n_heads, n_layers, n_heads] (the last axis n_key_value_heads for "k"/"v" under
        grouped-query attention): `[sl, sh, dl, dh]` is the metric with the path from head (sl, sh) into head
        (dl, dh) patched, 0.0 where dl <= sl. One sweep per source head; the compiled chunk functions are
        shared.
    """
    cfg = model.cfg
    options["progress"] = False
    n_dst = cfg.n_key_value_heads if component in ("k", "v") else cfg.n_heads
    out = np.zeros((cfg.n_layers, cfg.n_heads, cfg.n_layers, n_dst), np.float32)
    sources = [(sl, sh) for sl in range(cfg.n_layers - 1) for sh in range(cfg.n_heads)]
    for sl, sh in tqdm(sources, desc=f"direct paths from every head [{component}]", disable=not verbose):
        out[sl, sh] = np.asarray(get_act_patch_direct_path(model, corrupted_tokens, clean_cache,
                                                           corrupted_cache, patching_metric, sl, sh,
                                                           component, **options))
    return jnp.asarray(out)
