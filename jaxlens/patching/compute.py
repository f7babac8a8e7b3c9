"""The computation of one chunk of a sweep: a stack of patched forwards, vmapped, as one jitted function.

Two forms, with identical results:

- naive (`reuse=False`): every cell runs the whole model on the target tokens with
  `{"blocks.<hook>": Patch(value=source_stacked, mask=mask)}`, the mask carrying the cell's layer over the
  stacked `layer` axis (interventions as data, as in DESIGN.md).
- reuse (`reuse=True`): a chunk holds cells of one layer l and one window length S. Each cell starts from the
  target run's residual entering layer l, runs the patched block l and then layers l+1..L-1 in a
  `fori_loop` whose bounds are data (one compile serves every layer), and computes only positions
  [P - S, P): earlier positions are the target run's, whose keys and values it reads from a KV cache.
  When the patched hook lies downstream of the layer's key/value computation (z, q, pattern rows, attention
  and MLP outputs, ...: `POINTWISE`) and the cell patches one position p, block l can only change position p,
  so block l runs on that one position (its keys and values read from the target run's cache) and the window
  starts at layer l + 1 from the target run's residual with position p replaced.

Either way only the logits the metric reads are computed when `logit_reads` could find them. When those sit
at the last positions of a causal model (`logits[:, -1]`), the last layer computes its queries, attention
output and MLP at those positions only: the other window positions contribute just their keys and values
(`ChunkSpec.last_queries`), which cuts a window-wide block from every cell.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlens.interventions import Patch
from jaxlens.model.attention import Context, KVState, attention_sublayer
from jaxlens.model.forward import final_logits, run, unembed
from jaxlens.model.hooks import Hooks
from jaxlens.model.norms import norm
from jaxlens.model.runner import NO_INTERVENTIONS, BlockInterventions, run_blocks, windows
from jaxlens.patching.logit_reads import LogitReads
from jaxlens.patching.plan import POS_AXES, Target

# einsum letters: b=batch p=pos d=d_model v=d_vocab

# Block hooks whose value at query position p reaches the block's output at position p only (they lie after
# the layer's keys and values are computed, or feed only the queries).
POINTWISE = frozenset({
    "hook_q_input", "attn.hook_q", "attn.hook_rot_q", "attn.hook_attn_scores", "attn.hook_pattern",
    "attn.hook_z", "attn.hook_result", "hook_attn_out", "hook_resid_mid", "ln2.hook_scale",
    "ln2.hook_normalized", "hook_mlp_in", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post",
    "hook_mlp_out", "hook_resid_post",
})


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
    """Everything static about a chunk function (hashable: compiled functions are cached on it).

    Attributes:
        target: what is patched.
        window: S, positions [n_pos - S, n_pos) are computed (n_pos for the naive form).
        n_pos: sequence length P.
        reuse: the reuse form (else naive).
        metric: the user's metric of logits.
        reads: the metric rebuilt on the logits it reads, or None for full logits.
        point_layer: allow the one-position patched block (see `point`).
        last_layer: allow the last layer on the read positions only (see `last_queries`).
    """

    target: Target
    window: int
    n_pos: int
    reuse: bool
    metric: Callable
    reads: LogitReads | None
    point_layer: bool = True
    last_layer: bool = True

    @property
    def point(self) -> bool:
        """Block `layer` runs on the patched position only (see the module docstring); `point_layer=False`
        turns that off (benchmarks count the window block's FLOPs with it)."""
        t = self.target
        return (self.point_layer and self.reuse and t.kind == "block" and t.rel in POINTWISE
                and t.cfg.attention_dir == "causal" and _swept_pos(t) is not None)

    @property
    def last_queries(self) -> int | None:
        """Query positions of the last layer when it runs unpatched on the read positions only: the metric
        reads positions [n_pos - last_queries, n_pos) at most, inside the window, under causal attention (the
        other window positions give the last layer only their keys and values). None: the last layer runs
        on the whole window."""
        t = self.target
        if not (self.last_layer and self.reuse and self.reads is not None and t.cfg.attention_dir == "causal"
                and (t.kind == "pre" or self.point)):
            return None
        n = self.n_pos - int(self.reads.positions.min())
        return n if n < self.window else None


def chunk_values(spec: ChunkSpec, params, data: dict, layer, idx):
    """Metric values [C, ...] of the cells `idx` [C, n_axes] (all at `layer` in the reuse form)."""
    cell = _reuse_cell if spec.reuse else _naive_cell
    return jax.vmap(lambda i: cell(spec, params, data, layer, i))(idx)


def _naive_cell(spec: ChunkSpec, params, data, layer, idx):
    t, cfg = spec.target, spec.target.cfg
    mask = _mask(spec, idx, offset=0)
    if t.kind == "block":
        on_layer = jnp.arange(cfg.n_layers) == idx[t.act_of_axis.index("layer")]
        mask = on_layer.reshape((-1,) + (1,) * mask.ndim) & mask[None]
    iv = {t.full_name: Patch(value=data["source"], mask=mask)}
    if t.kind == "post":
        resid = data["final_resid"]
        return _final(spec, params, data, resid, iv)
    resid, _, _ = run(params, cfg, data["tokens"], interventions=iv, stop_at_layer=cfg.n_layers)
    return _final(spec, params, data, resid, None)


def _reuse_cell(spec: ChunkSpec, params, data, layer, idx):
    t, cfg = spec.target, spec.target.cfg
    w0 = spec.n_pos - spec.window
    if t.kind == "post":
        iv = {t.rel: Patch(value=data["source"], mask=_mask(spec, idx, offset=0))}
        return _final(spec, params, data, data["final_resid"], iv)
    if t.kind == "pre":
        iv = {t.rel: Patch(value=data["source"], mask=_mask(spec, idx, offset=0))}
        resid, _, _ = run(params, cfg, data["tokens"], interventions=iv, stop_at_layer=0)
        return _final(spec, params, data, _blocks(spec, params, data, resid[:, w0:], 0, None), None)
    if spec.point:
        return _final(spec, params, data, _point_then_blocks(spec, params, data, layer, idx), None)
    src = jax.lax.dynamic_index_in_dim(data["source"], layer, 0, keepdims=False)
    src = _window(spec, src, w0)
    iv = Patch(value=src, mask=_mask(spec, idx, offset=w0))
    resid = jax.lax.dynamic_index_in_dim(data["resid_pre"], layer, 0, keepdims=False)[:, w0:]
    return _final(spec, params, data, _blocks(spec, params, data, resid, layer, {t.rel: [iv]}), None)


def _blocks(spec: ChunkSpec, params, data, resid, start, patch):
    """Run layers start..L-1 on the window; `patch` ({hook: [intervention]}) applies in block `start` only.

    One traced block serves every layer (the runner's loop with data bounds): the patch is selected in where
    the loop index equals `start`. With `spec.last_queries` (never with a patch) the last layer returns only
    its last `last_queries` positions (`_last_layer`).
    """
    cfg, L = spec.target.cfg, spec.target.cfg.n_layers
    w0 = spec.n_pos - spec.window
    b, s = resid.shape[:2]
    ctx = Context(positions=jnp.broadcast_to(jnp.arange(w0, spec.n_pos), (b, s)), key_valid=None, offset=w0)
    ivs = BlockInterventions({}, {k: [(start, iv) for iv in v] for k, v in (patch or {}).items()})
    kv = KVState(data["k"], data["v"]) if w0 else None
    n_q = spec.last_queries
    stop = L if n_q is None else L - 1
    resid = run_blocks(params["blocks"], cfg, resid, ctx, ivs, start=jnp.asarray(start), stop=stop, kv=kv)[0]
    if n_q is None:
        return resid
    if isinstance(start, int):  # hooks before the blocks: every layer runs
        return _last_layer(spec, params, data, resid, n_q)
    # a chunk patched in the last layer has no layer left to run (its point block was the last layer)
    return jax.lax.cond(start < L, lambda r: _last_layer(spec, params, data, r, n_q),
                        lambda r: r[:, s - n_q:], resid)


def _last_layer(spec: ChunkSpec, params, data, resid, n_q: int):
    """The last block, unpatched, at the window's last `n_q` positions: the keys and values of the whole
    window (the rest of that attention sublayer is dead code, which XLA drops), then the block itself on those
    positions, reading them."""
    cfg, L = spec.target.cfg, spec.target.cfg.n_layers
    w0, P = spec.n_pos - spec.window, spec.n_pos
    b, s = resid.shape[:2]
    p = jax.tree_util.tree_map(lambda x: x[L - 1], params["blocks"])
    kv = KVState(data["k"][L - 1], data["v"][L - 1])
    ctx = Context(positions=jnp.broadcast_to(jnp.arange(w0, P), (b, s)), key_valid=None, offset=w0)
    _, kv = attention_sublayer(p["attn"], p.get("ln1", {}), resid, cfg, Hooks(), ctx, windows(cfg)[L - 1], kv)
    ctx = Context(positions=jnp.broadcast_to(jnp.arange(P - n_q, P), (b, n_q)), key_valid=None,
                  offset=P - n_q)
    kv = KVState(kv.k[None], kv.v[None])
    return run_blocks(params["blocks"], cfg, resid[:, s - n_q:], ctx, NO_INTERVENTIONS, start=L - 1, stop=L,
                      kv=kv)[0]


def _point_then_blocks(spec: ChunkSpec, params, data, layer, idx):
    """Block `layer` on the patched position p only, then layers layer+1..L-1 on the window, whose residual
    entering layer+1 is the target run's with position p replaced."""
    t, cfg = spec.target, spec.target.cfg
    w0, L = spec.n_pos - spec.window, cfg.n_layers
    p = idx[t.act_of_axis.index(_swept_pos(t))]
    take = lambda x, i=layer: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
    src = take(data["source"])
    for i, a in enumerate(t.act_axes):
        if a in POS_AXES and src.shape[i] == spec.n_pos:
            src = jax.lax.dynamic_slice_in_dim(src, p, 1, axis=i)
    iv = Patch(value=src, mask=_mask(spec, idx, offset=0, point=True))
    resid = jax.lax.dynamic_slice_in_dim(take(data["resid_pre"]), p, 1, axis=1)
    ctx = Context(positions=jnp.broadcast_to(p, (resid.shape[0], 1)), key_valid=None, offset=p)
    ivs = BlockInterventions({}, {t.rel: [(layer, iv)]})
    out = run_blocks(params["blocks"], cfg, resid, ctx, ivs, start=jnp.asarray(layer), stop=layer + 1,
                     kv=KVState(data["k"], data["v"]))[0]
    nxt = jnp.where(layer + 1 < L, take(data["resid_pre"], jnp.minimum(layer + 1, L - 1)),
                    data["final_resid"])
    win = jax.lax.dynamic_update_slice_in_dim(nxt[:, w0:], out.astype(nxt.dtype), p - w0, axis=1)
    return _blocks(spec, params, data, win, layer + 1, None)


def _swept_pos(target) -> str | None:
    """The swept query-position axis ("pos" or "query_pos"), if any."""
    return next((a for a in target.act_of_axis if a in POS_AXES), None)


def _final(spec: ChunkSpec, params, data, resid, post_iv):
    """The metric from the residual after the last block (window positions; earlier ones are the target's)."""
    cfg = spec.target.cfg
    w0 = spec.n_pos - resid.shape[1]
    hooks = Hooks(here={k: [v] for k, v in post_iv.items()}) if post_iv else Hooks()
    if spec.reads is None:
        logits = final_logits(params, cfg, resid, hooks)
        if w0:
            logits = jnp.concatenate([data["logits"][:, :w0], logits], axis=1)
        return spec.metric(logits)
    full = jnp.concatenate([data["final_resid"][:, :w0], resid], axis=1) if w0 else resid
    pos = jnp.asarray(spec.reads.positions)
    ln = params.get("ln_final", {})
    if post_iv:  # the patched norm hooks see every position
        x = norm(ln, full, cfg, hooks, "ln_final")[:, pos]
    else:
        x = norm(ln, full[:, pos], cfg, hooks, "ln_final")
    vocab = None if spec.reads.vocab is None else jnp.asarray(spec.reads.vocab)
    return spec.reads(unembed(params, cfg, x, vocab=vocab))


def _window(spec: ChunkSpec, x, w0: int):
    """Slice the query/position axes of an activation-shaped array to the window (size-1 axes stay)."""
    if not w0:
        return x
    sl = [slice(None)] * x.ndim
    for i, a in enumerate(spec.target.act_axes):
        if a in POS_AXES and x.shape[i] == spec.n_pos:
            sl[i] = slice(w0, None)
    return x[tuple(sl)]


def _mask(spec: ChunkSpec, idx, offset: int, point: bool = False):
    """The cell's boolean mask over the activation's axes (size 1 where not swept), window coordinates (with
    `point`, the swept position axis has size 1: the activation holds only the patched position)."""
    t = spec.target
    n = len(t.act_axes)
    mask = jnp.ones((1,) * n, bool)
    for j, a in enumerate(t.act_of_axis):
        if a == "layer":
            continue
        i = t.act_axes.index(a)
        if point and a in POS_AXES:
            continue
        size = spec.window if (a in POS_AXES and offset) else _axis_size(spec, a)
        one = (jnp.arange(size) + (offset if a in POS_AXES else 0)) == idx[j]
        mask = mask & one.reshape(tuple(size if k == i else 1 for k in range(n)))
    return mask


def _axis_size(spec: ChunkSpec, axis: str) -> int:
    cfg = spec.target.cfg
    sizes = {"pos": spec.n_pos, "query_pos": spec.n_pos, "key_pos": spec.n_pos, "head_index": cfg.n_heads,
             "kv_head_index": cfg.n_key_value_heads, "d_model": cfg.d_model, "d_head": cfg.d_head,
             "d_mlp": cfg.d_mlp}
    return sizes[axis]
