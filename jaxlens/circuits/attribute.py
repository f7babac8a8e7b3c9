"""Edge scores: how much the metric moves when one edge of the graph carries the corrupted activation.

- "eap" (Syed et al. 2023, arXiv 2310.10348): score(u -> v) = sum_{batch,pos} (a_u(corrupted) - a_u(clean))
  . dM/d(input_v), the gradient from one forward and one backward pass of the clean run.
- "eap-ig" (Hanna et al. 2024, arXiv 2403.17806): the same activation difference times the gradient averaged
  over `steps` runs whose input (the residual entering block 0) is e_corr + (k/steps)(e_clean - e_corr),
  k = 0 .. steps - 1; the steps are one vmapped computation.
- "eap-ig-activations": the gradient averaged over runs in which one node group (the input, all heads of one
  layer, one MLP) outputs alpha clean + (1 - alpha) corrupted, alpha = k/steps, k = 1 .. steps (the groups
  and steps vmapped, in chunks).
- "exact": the metric with exactly that edge patched, minus the clean metric: the clean run from the edge's
  destination layer on with the source's difference added at the destination's input (`exact`); edges into
  one layer are one group of a compiled, chunked, sharded, resumable computation (`chunks.map_groups`).

    graph = attribute_edges(model, clean_tokens, corrupted_tokens, metric, method="eap-ig", steps=5)
    graph.top_n(100).heads()
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.circuits import chunks, edges, exact
from jaxlens.circuits.graph import Graph, Layout, UnsupportedModelError
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.interventions import Add
from jaxlens.model.forward import check_tokens, run
from jaxlens.patching.logit_reads import LogitReads, analyse
from jaxlens.patching.prepare import check_metric
from jaxlens.scale import distributed

# einsum letters: s=source b=batch p=pos d=d_model l=layer h=head_index (or kv_head_index)

METHODS = ("eap", "eap-ig", "eap-ig-activations", "exact")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model and a clean/corrupted pair, checked and run once: what every method reads."""

    params: dict
    cfg: Config
    graph: Graph
    clean_tokens: jax.Array
    corrupted_tokens: jax.Array
    metric: Callable
    reads: LogitReads | None
    clean: edges.SourceOutputs
    corrupted: edges.SourceOutputs
    clean_metric: float
    corrupted_metric: float


def attribute_edges(model, clean_tokens, corrupted_tokens, metric: Callable, method: str = "eap-ig",
                    steps: int = 5, *, edges: Sequence[str] | None = None, chunk_size: int | None = None,
                    devices: Sequence | None = None, checkpoint_dir=None, progress: bool = False,
                    on_chunk=None) -> Graph:
    """Score every edge of `model`'s graph.

    Args:
        model: a decoder HookedTransformer (anything with `.params` and a decoder `.cfg`).
        clean_tokens, corrupted_tokens: [batch pos] token ids of the same shape.
        metric: logits [batch pos d_vocab] -> scalar (e.g. the mean logit difference).
        method: "eap", "eap-ig", "eap-ig-activations" or "exact" (see the module docstring).
        steps: integrated-gradient steps (the IG methods).
        edges: ("exact") patch only these edges (names as `Graph.edge_index` takes them); the others get
            NaN scores, which selection ranks last.
        chunk_size: items per compiled call ("exact": patched edges; "eap-ig-activations": passes).
        devices: devices to split the items across (default: every device of every process, as
            `jaxlens.scale.make_mesh()`; in a single process, all local devices).
        checkpoint_dir: ("exact") store finished chunks here and resume from them.
        progress, on_chunk: a tqdm bar over chunks; a callback on_chunk(done, total) ("exact").

    Returns:
        The model's Graph with a score per edge: the metric change when the edge is patched (exact) or its
        first-order estimate; every edge in the graph.

    Raises:
        InputError: tokens of different shapes, bad tokens, a metric that does not return a scalar, an
            unknown method or a non-positive number of steps.
        UnsupportedModelError: a model family the graph does not cover.
    """
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if int(steps) < 1:
        raise InputError(f"steps must be a positive number of integrated-gradient steps; found {steps}.")
    pb = setup(model, clean_tokens, corrupted_tokens, metric)
    if edges is not None and method != "exact":
        raise InputError(f"edges= chooses the edges of exact patching; method {method!r} scores every edge "
                         "at once. Drop edges= or use method='exact'.")
    if method == "exact":
        which = np.arange(pb.graph.n_edges) if edges is None else pb.graph.edge_index(edges)
        scores = exact.exact_scores(pb, which, chunk_size, devices, checkpoint_dir, progress, on_chunk)
    else:
        scores = _gradient_scores(pb, method, int(steps), chunk_size)
    return pb.graph.with_scores(scores, method)


def setup(model, clean_tokens, corrupted_tokens, metric: Callable) -> Problem:
    """Check the inputs, build the graph, run the clean and corrupted prompts once."""
    graph = Graph.from_model(model)
    params, cfg = model.params, model.cfg
    clean = check_tokens(jnp.asarray(clean_tokens), cfg)
    corrupted = check_tokens(jnp.asarray(corrupted_tokens), cfg)
    if clean.shape != corrupted.shape:
        raise InputError(
            f"Clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupted.shape)} differ in "
            "shape: each clean prompt needs a corrupted partner of the same token length ([batch pos] both). "
            "Pad or trim them to match.")
    (clean_logits, clean_out), (corrupted_logits, corrupted_out) = _both_runs(params, cfg, clean, corrupted)
    clean_metric = float(check_metric(metric, clean_logits, None))
    corrupted_metric = float(check_metric(metric, corrupted_logits, None))
    reads = _reads(metric, tuple(clean_logits.shape), clean_logits.dtype)
    if reads is not None:
        sub = clean_logits[:, reads.positions]
        sub = sub if reads.vocab is None else sub[:, :, reads.vocab]
        if not np.allclose(np.asarray(reads(sub)), clean_metric, rtol=1e-5, atol=1e-6):
            reads = None
    return Problem(params, cfg, graph, clean, corrupted, metric, reads, clean_out, corrupted_out,
                   clean_metric, corrupted_metric)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _both_runs(params, cfg: Config, clean, corrupted):
    """(logits, every source's output) of the clean and of the corrupted prompts."""
    def one(tokens):
        logits, cache, _ = run(params, cfg, tokens, cache_names=edges.SOURCE_HOOKS)
        return logits, edges.SourceOutputs(*(cache[n] for n in edges.SOURCE_HOOKS))

    both = jax.vmap(one)(jnp.stack([clean, corrupted]))  # one forward program for both prompts
    return jax.tree_util.tree_map(lambda x: x[0], both), jax.tree_util.tree_map(lambda x: x[1], both)


@functools.lru_cache(maxsize=64)
def _reads(metric: Callable, shape: tuple, dtype) -> LogitReads | None:
    """`logit_reads.analyse`, one object per metric and shape (compiled programs are cached on it)."""
    return analyse(metric, shape, dtype)


# -- exact -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MaskedRun:
    """fn(args, item) for `chunks.map_chunks`: the metric with the edge mask `item` [n_edges] (1 keeps an
    edge, 0 patches it)."""

    cfg: Config
    layout: Layout
    metric: Callable
    reads: LogitReads | None

    def __call__(self, args, item):
        params, resid0, corrupted, src, dst = args
        value = edges.masked_metric(params, self.cfg, self.layout, resid0, corrupted, src, dst,
                                    item.astype(jnp.float32), self.metric, self.reads)
        return jnp.asarray(value, jnp.float32)


def run_masks(pb: Problem, items: np.ndarray, chunk_size, devices) -> np.ndarray:
    """Metric values of the clean run with the edge masks `items` [n, n_edges] (see `MaskedRun`): whole
    circuits, every source's difference carried through every layer (`edges.masked_metric`)."""
    g, cfg = pb.graph, pb.cfg
    mesh = distributed.data_mesh(None, devices)  # default: every device of every process
    n_dev = mesh.shape["data"]
    if chunk_size is None:
        b, P = pb.clean_tokens.shape
        itemsize = jnp.dtype(pb.clean.resid0.dtype).itemsize
        chunk_size = chunks.default_chunk_size(g.layout.n_src, b, P, cfg.d_model, cfg.n_heads, itemsize,
                                               n_dev)
        bucket = max(n_dev, 1 << max(0, len(items) - 1).bit_length())  # few shapes, little padding
        chunk_size = min(chunk_size, bucket)
    fn = MaskedRun(cfg, g.layout, pb.metric, pb.reads)
    resid0 = edges.embed(pb.params, cfg, pb.clean_tokens)
    args = (pb.params, resid0, pb.corrupted, jnp.asarray(g.edge_src), jnp.asarray(g.edge_dst))
    return chunks.map_chunks(fn, args, items, chunk_size=chunk_size, mesh=mesh)


# -- gradient methods ------------------------------------------------------------------------------------
def _gradient_scores(pb: Problem, method: str, steps: int, chunk_size) -> np.ndarray:
    lo, cfg = pb.graph.layout, pb.cfg
    clean0, corr0 = pb.clean.resid0, pb.corrupted.resid0
    diffs = SourceDiffs(pb.corrupted.result - pb.clean.result, pb.corrupted.mlp_out - pb.clean.mlp_out)
    if method == "eap":
        passes = Passes(jnp.ones((1,)), jnp.zeros((1, cfg.n_layers)), jnp.zeros((1, cfg.n_layers)))
    elif method == "eap-ig":
        alpha = jnp.arange(steps, dtype=jnp.float32) / steps
        passes = Passes(alpha, jnp.zeros((steps, cfg.n_layers)), jnp.zeros((steps, cfg.n_layers)))
    else:
        passes = _activation_passes(cfg.n_layers, steps)
    n_pass = passes.alpha.shape[0]
    batch = n_pass if method != "eap-ig-activations" else min(n_pass, chunk_size or 2 * steps)
    grads = _mean_grads(pb.params, cfg, clean0, corr0, diffs, passes, pb.metric, pb.reads, batch)
    delta = edges.SourceOutputs(corr0, pb.corrupted.result, pb.corrupted.mlp_out).stack() - \
        edges.SourceOutputs(clean0, pb.clean.result, pb.clean.mlp_out).stack()
    dense = _contract(lo, delta.astype(jnp.float32), grads)
    return np.asarray(dense[pb.graph.edge_src, pb.graph.edge_dst])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SourceDiffs:
    """corrupted - clean outputs of the heads [layer batch pos head d_model] and MLPs [layer batch pos
    d_model]."""

    result: jax.Array
    mlp_out: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Passes:
    """The gradient passes: input = clean + (1 - alpha) (corrupted - clean); layer l's heads (MLP) output
    clean + head_coef[l] (mlp_coef[l]) (corrupted - clean). One row per pass."""

    alpha: jax.Array  # [n]
    head_coef: jax.Array  # [n layer]
    mlp_coef: jax.Array  # [n layer]


def _activation_passes(n_layers: int, steps: int) -> Passes:
    """EAP-IG-activations: for each group (input, heads of layer l, MLP l) and k = 1..steps, the group outputs
    alpha clean + (1 - alpha) corrupted (alpha = k / steps), everything else clean."""
    alphas = np.arange(1, steps + 1, dtype=np.float32) / steps
    rows_a, rows_h, rows_m = [], [], []
    for group in range(2 * n_layers + 1):
        for a in alphas:
            h, m = np.zeros(n_layers, np.float32), np.zeros(n_layers, np.float32)
            if group > 0:
                layer, is_mlp = divmod(group - 1, 2)
                (m if is_mlp else h)[layer] = 1.0 - a
            rows_a.append(a if group == 0 else 1.0)
            rows_h.append(h)
            rows_m.append(m)
    return Passes(jnp.asarray(rows_a), jnp.asarray(np.stack(rows_h)), jnp.asarray(np.stack(rows_m)))


@functools.partial(jax.jit, static_argnames=("cfg", "metric", "reads", "batch"))
def _mean_grads(params, cfg, clean0, corr0, diffs, passes, metric, reads, batch) -> dict:
    """Gradients of the metric at every destination input, averaged over the passes (vmapped in groups of
    `batch`)."""
    L, b, p, d = cfg.n_layers, *clean0.shape
    zeros = {"q": jnp.zeros((L, b, p, cfg.n_heads, d), clean0.dtype),
             "k": jnp.zeros((L, b, p, cfg.n_key_value_heads, d), clean0.dtype),
             "v": jnp.zeros((L, b, p, cfg.n_key_value_heads, d), clean0.dtype),
             "mlp": jnp.zeros((L, b, p, d), clean0.dtype), "final": jnp.zeros((b, p, d), clean0.dtype)}

    def one(pass_):
        resid0 = clean0 + (1 - pass_.alpha).astype(clean0.dtype) * (corr0 - clean0)
        shift_h = pass_.head_coef.astype(clean0.dtype)[:, None, None, None, None] * diffs.result
        shift_m = pass_.mlp_coef.astype(clean0.dtype)[:, None, None, None] * diffs.mlp_out

        def f(z):
            ivs = {"blocks.hook_q_input": Add(z["q"]), "blocks.hook_k_input": Add(z["k"]),
                   "blocks.hook_v_input": Add(z["v"]), "blocks.hook_mlp_in": Add(z["mlp"]),
                   "blocks.attn.hook_result": Add(shift_h), "blocks.hook_mlp_out": Add(shift_m)}
            resid = run(params, cfg, resid0, interventions=ivs, start_at_layer=0, stop_at_layer=L)[0]
            value = edges.logits_metric(params, cfg, resid + z["final"], metric, reads)
            return jnp.asarray(value, jnp.float32)

        return jax.grad(f)(zeros)

    grads = jax.lax.map(one, passes, batch_size=batch)
    return jax.tree_util.tree_map(lambda g: g.astype(jnp.float32).mean(0), grads)


def _contract(lo: Layout, delta, grads) -> jax.Array:
    """Scores [n_src, n_dst]: each source's difference dotted with each reader's gradient, summed over batch
    and positions."""
    q = jnp.einsum("sbpd,lbphd->slh", delta, grads["q"])
    k = jnp.einsum("sbpd,lbphd->slh", delta, grads["k"])
    v = jnp.einsum("sbpd,lbphd->slh", delta, grads["v"])
    m = jnp.einsum("sbpd,lbpd->sl", delta, grads["mlp"])[:, :, None]
    per_layer = jnp.concatenate([q, k, v, m], axis=2).reshape(lo.n_src, lo.n_layers * lo.per_layer)
    final = jnp.einsum("sbpd,bpd->s", delta, grads["final"])[:, None]
    return jnp.concatenate([per_layer, final], axis=1)


__all__ = ["METHODS", "UnsupportedModelError", "attribute_edges", "setup"]
