"""The block runner: the one layer loop of every model kind and every program (forward, encoder, generate,
patching).

    glob_iv, ivs = split_interventions(table, interventions, start, stop)
    resid, stacked_cache, kv = run_blocks(params["blocks"], cfg, resid, ctx, ivs, start=start, stop=stop,
                                          cache=frozenset({"attn.hook_z"}))

With Python-int bounds the blocks run under one `jax.lax.scan` over the stacked `layer` axis (compile time
flat in depth), with the per-layer weights, attention windows, stacked interventions and key/value states as
scanned data, and the recorded activations come back stacked. With a traced `start` (a patching program whose
layer is data) the same block body runs in a `fori_loop` whose bounds are data, reading each layer's weights
by dynamic index. Either way an intervention addressed to one layer applies where the layer index equals it,
so new block behaviour (a spliced dictionary, a frozen pattern, an edge mask) is written once, as an
intervention or a block function, and reaches every program. Given per-layer weights (`layers`, from
`layout.prepare`: views of the stacked arrays) the same block function runs unrolled, once per layer, on
those arrays: no per-call weight copies (the fast path of shallow models on CPU), same names, shapes and
interventions.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxlens.config import Config
from jaxlens.errors import InputError, InterventionError
from jaxlens.hook_names import HookTable
from jaxlens.interventions import Fn, intervention_list
from jaxlens.model.attention import Context, KVState
from jaxlens.model.block import block as decoder_block
from jaxlens.model.hooks import Hooks

BlockFn = Callable[..., tuple[Array, KVState | None]]


class BlockInterventions(NamedTuple):
    """Interventions on block hooks, split by how they address layers.

    stacked: relative name -> [intervention with a leading layer axis over the layers run].
    at_layer: relative name -> [(layer, intervention)], applied where the running layer equals `layer` (every
        layer for None: a function at a layer-free name).
    """

    stacked: dict[str, list]
    at_layer: dict[str, list]


NO_INTERVENTIONS = BlockInterventions({}, {})


def windows(cfg: Config) -> Int[Array, " layer"]:
    """Per-layer attention windows as an array scanned with the layers (global attention: a huge window)."""
    big = 2**30
    if cfg.window_sizes is None:
        return jnp.full((cfg.n_layers,), big, jnp.int32)
    return jnp.asarray([big if w is None else w for w in cfg.window_sizes], jnp.int32)


def split_interventions(table: HookTable, interventions: Mapping[str, Any] | None, start: int = 0,
                        stop: int | None = None) -> tuple[dict[str, list], BlockInterventions]:
    """{name: intervention(s)} -> ({global name: [iv]}, BlockInterventions for the layers [start, stop)).

    Interventions on layers outside [start, stop) are dropped (those layers do not run).

    Raises:
        UnknownHookError: a name that is not a hook point of `table`.
        InterventionError: a stacked (`blocks.x`) intervention whose arrays lack the leading layer axis.
    """
    stop = table.n_layers if stop is None else stop
    glob, stacked, at_layer = {}, {}, {}
    for name, iv in (interventions or {}).items():
        ivs = intervention_list(iv)
        layer, rel = table.parse(name)
        if layer is None:
            glob.setdefault(rel, []).extend(ivs)
        elif layer == "all":
            for one in ivs:
                if isinstance(one, Fn):  # a function serves every layer; its closure is not per layer
                    at_layer.setdefault(rel, []).append((None, one))
                    continue
                for leaf in jax.tree_util.tree_leaves(one):
                    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != table.n_layers:
                        raise InterventionError(
                            f"Intervention at {name!r} addresses every layer, so each array in it needs a "
                            f"leading layer axis of size n_layers={table.n_layers}; found shape "
                            f"{jnp.shape(leaf)}. Address one layer with 'blocks.<layer>.{rel}', or stack the "
                            "values over layers."
                        )
                stacked.setdefault(rel, []).append(jax.tree_util.tree_map(lambda x: x[start:stop], one))
        elif start <= layer < stop:
            at_layer.setdefault(rel, []).extend((layer, one) for one in ivs)
    return glob, BlockInterventions(stacked, at_layer)


def layer_bounds(n_layers: int, start_at_layer: int | None, stop_at_layer: int | None) -> tuple[int, int]:
    """TL's `start_at_layer` / `stop_at_layer` as [start, stop) (negative values count from the end).

    Raises:
        InputError: bounds outside the model or start after stop.
    """
    start = 0 if start_at_layer is None else start_at_layer
    stop = n_layers if stop_at_layer is None else stop_at_layer
    start = start + n_layers if start < 0 else start
    stop = stop + n_layers if stop < 0 else stop
    if not 0 <= start <= stop <= n_layers:
        raise InputError(
            f"Layer bounds start_at_layer={start_at_layer}, stop_at_layer={stop_at_layer} do not satisfy "
            f"0 <= start <= stop <= n_layers={n_layers} (negative values count from the end)."
        )
    return start, stop


def run_blocks(
    blocks: Mapping[str, Any],
    cfg: Config,
    resid: Float[Array, "batch pos d_model"],
    ctx: Context,
    interventions: BlockInterventions = NO_INTERVENTIONS,
    *,
    start: int | Int[Array, ""],
    stop: int | Int[Array, ""],
    cache: Iterable[str] = frozenset(),
    kv: KVState | None = None,
    block: BlockFn = decoder_block,
    layers: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[Float[Array, "batch pos d_model"], dict[str, Array], KVState | None]:
    """Run blocks [start, stop) on `resid` (`run_blocks_carried` without a carry)."""
    resid, stacked, kv, _ = run_blocks_carried(blocks, cfg, resid, ctx, interventions, start=start, stop=stop,
                                               cache=cache, kv=kv, block=block, layers=layers)
    return resid, stacked, kv


def run_blocks_carried(
    blocks: Mapping[str, Any],
    cfg: Config,
    resid: Float[Array, "batch pos d_model"],
    ctx: Context,
    interventions: BlockInterventions = NO_INTERVENTIONS,
    *,
    start: int | Int[Array, ""],
    stop: int | Int[Array, ""],
    cache: Iterable[str] = frozenset(),
    kv: KVState | None = None,
    block: BlockFn = decoder_block,
    carry: Any = None,
    layers: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[Float[Array, "batch pos d_model"], dict[str, Array], KVState | None, Any]:
    """Run blocks [start, stop) on `resid`, threading `carry` through them.

    Args:
        blocks: the stacked block params (leading `layer` axis of n_layers).
        cfg: the architecture.
        resid: the residual stream entering block `start`.
        ctx: positions and key mask of the call.
        interventions: from `split_interventions` (stacked leaves cover the layers [start, stop)).
        start, stop: the layers to run. A traced `start` runs a loop with data bounds (no cache then; `stop`
            may be traced too).
        cache: relative block hook names to record, returned stacked over [start, stop).
        kv: key/value states with a leading layer axis: [start, stop) with int bounds (updated and returned),
            every layer with a traced start (read only: earlier positions of a window).
        block: the block function `(p, resid, cfg, hooks, ctx, window, kv) -> (resid, kv)`.
        carry: a pytree carried from layer to layer (None for none): interventions that declare
            `uses_carry` read and update it (`Hooks`), e.g. the per-source output differences of edge
            patching (`jaxlens.circuits`).
        layers: every layer's block params as separate arrays (`layout.Layout.layers`): with int bounds the
            blocks then run unrolled on them (no per-layer weight copies; compile time grows with depth).

    Returns:
        (residual after block stop - 1, {relative name: [stop - start, ...]}, updated kv or None, the carry
        after block stop - 1).
    """
    cache = frozenset(cache)
    wins = windows(cfg)

    def step(p, r, c, idx, window, here, kv_l):
        hooks = Hooks(prefix="blocks.", layer=idx, here=here, at_layer=interventions.at_layer,
                      names_to_cache=cache, carry=c)
        r, kv_l = block(p, r, cfg, hooks, ctx, window, kv_l)
        return r, hooks.carry, hooks.cache, kv_l

    if isinstance(start, int) and layers is not None and stop > start:
        rc, recs, kvs = (resid, carry), [], []
        for j, l in enumerate(range(start, stop)):
            at = lambda x, j=j: x[j]
            kv_l = None if kv is None else jax.tree_util.tree_map(at, kv)
            here = jax.tree_util.tree_map(at, interventions.stacked)
            *rc, recorded, kv_l = step(layers[l], *rc, jnp.asarray(l, jnp.int32), wins[l], here, kv_l)
            recs.append(recorded)
            kvs.append(kv_l)
        stack = lambda *xs: jnp.stack(xs)
        new_kv = None if kv is None else jax.tree_util.tree_map(stack, *kvs)
        return rc[0], jax.tree_util.tree_map(stack, *recs), new_kv, rc[1]

    if isinstance(start, int):
        def body(rc, xs):
            p, idx, window, here, kv_l = xs
            r, c, recorded, kv_l = step(p, *rc, idx, window, here, kv_l)
            return (r, c), (recorded, kv_l)

        sl = lambda x: x[start:stop]
        xs = (jax.tree_util.tree_map(sl, blocks), jnp.arange(start, stop), sl(wins), interventions.stacked,
              kv)
        (resid, carry), (stacked, new_kv) = jax.lax.scan(body, (resid, carry), xs)
        return resid, stacked, new_kv, carry

    if cache or interventions.stacked:
        raise InputError("Blocks run from a traced start layer can neither record activations nor take "
                         "stacked (`blocks.x`) interventions; use int bounds, or address layers "
                         "(`blocks.3.x`).")

    def one(i, rc):
        take = lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
        kv_l = None if kv is None else jax.tree_util.tree_map(take, kv)
        return step(jax.tree_util.tree_map(take, blocks), *rc, i, take(wins), {}, kv_l)[:2]

    resid, carry = jax.lax.fori_loop(start, stop, one, (resid, carry))
    return resid, {}, None, carry


def collect(table: HookTable, names: Iterable[str], top: Mapping[str, Array], stacked: Mapping[str, Array],
            start: int, stop: int) -> dict[str, Array]:
    """{name: activation} for `names` from the hooks outside the blocks (`top`, by name) and the stacked block
    recordings (`stacked`, relative name -> [stop - start, ...]).

    Raises:
        InputError: a name of a layer or global hook that this run does not reach.
    """
    out = {}
    for name in names:
        layer, rel = table.parse(name)
        if layer is None:
            if rel not in top:
                raise InputError(f"Cannot cache {name!r}: this run (layers [{start}, {stop})) "
                                 "does not compute it.")
            out[name] = top[rel]
        elif layer == "all":
            out[name] = stacked[rel]
        elif not start <= layer < stop:
            raise InputError(f"Cannot cache {name!r}: this run computes only layers [{start}, {stop}).")
        else:
            out[name] = stacked[rel][layer - start]
    return out


def stack_layers(table: HookTable, names: Iterable[str], start: int, stop: int) -> dict[str, tuple[int, ...]]:
    """{relative block name: the sorted layers `names` ask for} (stacked `blocks.x` names not counted).

    Raises:
        InputError: a layer this run does not compute.
    """
    out = {}
    for rel, layers in table.split(names)[1].items():
        layers = layers - {"all"}
        bad = sorted(l for l in layers if not start <= l < stop)
        if bad:
            raise InputError(f"Cannot cache blocks.{bad[0]}.{rel}: this run computes only layers "
                             f"[{start}, {stop}).")
        if layers:
            out[rel] = tuple(sorted(layers))
    return out


def stacks(table: HookTable, names: Iterable[str], top: Mapping[str, Array], stacked: Mapping[str, Array],
           start: int, stop: int) -> tuple[dict[str, Array], dict[str, Array]]:
    """Like `collect`, but block activations stay stacked: ({global or stacked name: array},
    {relative name: [len(layers), ...]} over the layers `stack_layers` lists), each hook's layers gathered
    once, so a program records one output per hook, not one per layer
    (its compile time stays flat in depth)."""
    names = tuple(names)
    glob_names = [n for n in names if table.parse(n)[0] in (None, "all")]
    flat = collect(table, glob_names, top, stacked, start, stop)
    out = {}
    for rel, chosen in stack_layers(table, names, start, stop).items():
        arr = stacked[rel]
        out[rel] = (arr if chosen == tuple(range(start, stop))
                    else arr[jnp.asarray([l - start for l in chosen])])
    return flat, out
