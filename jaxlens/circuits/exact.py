"""Exact edge patching, one edge at a time, from the destination's layer onward.

Patching the single edge s -> d feeds d's input with s's corrupted output in place of its clean one. Nothing
upstream of d changes (s itself runs clean), so the patched run is the clean run with one addition,

    input_d = clean_input_d + (corrupted_out(s) - clean_out(s)),

and every layer before d's is the clean run's (Hanna et al. 2024, `get_scores_exact`; the single-edge case
of `edges.masked_metric`, which carries every source's difference through every layer). So the clean
residual entering each layer is computed once, and each edge runs only the layers from its destination's
layer l on: block l through the one block runner with an `Add` of the difference at the destination's split
q/k/v input or MLP input, then blocks l+1.. unchanged (a second call of the runner, without the split
inputs), then the logits (an edge into the logits runs no block at all). Edges into the same layer are one
group of `chunks.map_groups`: their chunks share one compiled, vmapped program whose start layer is data, so
every layer's group runs the same program.

    scores = exact_scores(pb, which)        # pb: attribute.setup(...); which: edge numbers
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxlens.circuits import chunks, edges
from jaxlens.circuits.graph import Layout
from jaxlens.config import Config
from jaxlens.interventions import Add
from jaxlens.model import runner
from jaxlens.model.forward import run
from jaxlens.patching.logit_reads import LogitReads
from jaxlens.scale import distributed
from jaxlens.scale.mesh import replicated

# einsum letters: s=source b=batch p=pos d=d_model h=head_index (or kv_head_index)


@dataclasses.dataclass(frozen=True)
class EdgeFromLayer:
    """fn(args, item) for `chunks.map_groups`: the metric of the clean run with edge `item` patched (-1:
    nothing patched), every edge of the call reading at layer `args.layer` (n_layers: at the logits).

    args: (params, source differences [n_src batch pos d_model], edge_src, edge_dst, the clean residual
    entering the layer [batch pos d_model], the layer [])."""

    cfg: Config
    layout: Layout
    metric: Callable
    reads: LogitReads | None

    def __call__(self, args, item):
        params, diffs, edge_src, edge_dst, resid, layer = args
        L = self.cfg.n_layers
        e = jnp.maximum(item, 0)
        diff = diffs[edge_src[e]] * (item >= 0).astype(diffs.dtype)
        ivs = reader_adds(self.layout, diff, edge_dst[e] - layer * self.layout.per_layer)
        blocks, ctx = params["blocks"], edges.context(resid)
        first = jnp.minimum(layer + 1, L)  # no block for an edge into the logits
        resid, _, _ = runner.run_blocks(blocks, self.cfg, resid, ctx, ivs, start=layer, stop=first)
        resid, _, _ = runner.run_blocks(blocks, self.cfg, resid, ctx, start=first, stop=L)  # split inputs
        # (per-head ln1) only in the destination's block
        resid = resid + (diff * (layer == L).astype(diff.dtype)).astype(resid.dtype)
        value = edges.logits_metric(params, self.cfg, resid, self.metric, self.reads)
        return jnp.asarray(value, jnp.float32)


def reader_adds(layout: Layout, diff: Float[Array, "batch pos d_model"], slot: Int[Array, ""]
                ) -> runner.BlockInterventions:
    """`Add`s of `diff` at the one reader `slot` of a layer (`Layout`: queries, keys, values, MLP input),
    zero at its other readers, for a run of that layer alone."""
    H, KV, P = layout.n_heads, layout.n_kv, layout.per_layer
    zero = jnp.zeros((), diff.dtype)

    def per_head(n, first):
        pick = (jnp.arange(n) == slot - first)[None, None, :, None]  # [1 1 head 1]
        return Add(jnp.where(pick, diff[:, :, None, :], zero))

    adds = {"hook_q_input": per_head(H, 0), "hook_k_input": per_head(KV, H),
            "hook_v_input": per_head(KV, H + KV),
            "hook_mlp_in": Add(diff * (slot == P - 1).astype(diff.dtype))}
    return runner.BlockInterventions({}, {k: [(None, v)] for k, v in adds.items()})  # None: the layer run


def exact_scores(pb, which: np.ndarray, chunk_size=None, devices=None, checkpoint_dir=None, progress=False,
                 on_chunk=None) -> np.ndarray:
    """[n_edges] metric change with each edge of `which` patched alone (NaN for the others).

    Args:
        pb: `attribute.setup`'s Problem.
        which: edge numbers to patch.
        chunk_size: edges per compiled call (default: the power of two at or above the mean number of
            edges into a layer, at most `chunks.forward_chunk_size`).
        devices, checkpoint_dir, progress, on_chunk: as `chunks.map_groups`.
    """
    g, cfg, lo = pb.graph, pb.cfg, pb.graph.layout
    which = np.asarray(which, np.int64)
    mesh = distributed.data_mesh(None, devices)  # default: every device of every process
    n_dev = mesh.shape["data"]
    resids = clean_resids(pb.params, cfg, pb.clean_tokens)  # [layer + 1, batch pos d_model]
    diffs = pb.corrupted.stack() - pb.clean.stack()
    shared = distributed.place((pb.params, diffs, jnp.asarray(g.edge_src), jnp.asarray(g.edge_dst)),
                               replicated(mesh))
    layer_of = g.edge_dst[which] // lo.per_layer  # the logits: n_layers
    parts = [which[layer_of == l] for l in range(cfg.n_layers + 1)]
    parts[-1] = np.append(parts[-1], -1)  # -1: nothing patched (the clean run)
    parts = [(l, p) for l, p in enumerate(parts) if len(p)]
    if chunk_size is None:  # one size for every group (one program): the mean group, within memory
        b, P = pb.clean_tokens.shape
        default = chunks.forward_chunk_size(cfg, b, P, jnp.dtype(diffs.dtype).itemsize, n_dev)
        mean = -(-sum(len(p) for _, p in parts) // len(parts))
        chunk_size = min(default, max(n_dev, 1 << (mean - 1).bit_length()))
    fn = EdgeFromLayer(cfg, lo, pb.metric, pb.reads)
    groups = [chunks.Group(fn, (*shared, resids[l], jnp.int32(l)), p.astype(np.int32), int(chunk_size))
              for l, p in parts]
    fp = chunks.fingerprint_of(repr(cfg), "edge-from-layer", pb.clean_tokens, pb.corrupted_tokens, which,
                               np.float32(pb.clean_metric), np.float32(pb.corrupted_metric))
    values = chunks.map_groups(groups, mesh=mesh, checkpoint_dir=checkpoint_dir, fingerprint=fp,
                               progress=progress, on_chunk=on_chunk)
    items = np.concatenate([p for _, p in parts])
    scores = np.full(g.n_edges, np.nan, np.float32)
    base = values[items == -1][0]
    scores[items[items >= 0]] = values[items >= 0] - base
    return scores


@functools.partial(jax.jit, static_argnames=("cfg",))
def clean_resids(params, cfg: Config, tokens) -> Float[Array, "layer_plus_1 batch pos d_model"]:
    """The residual stream entering every block, and last the one the logits read (one forward)."""
    resid, cache, _ = run(params, cfg, tokens, cache_names=("blocks.hook_resid_pre",),
                          stop_at_layer=cfg.n_layers)
    return jnp.concatenate([cache["blocks.hook_resid_pre"], resid[None]], axis=0)
