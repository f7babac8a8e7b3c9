"""Attribution patching: the linear (gradient) estimate of a whole patching sweep from one backward pass.

Patching cell c replaces the corrupted activation a by the clean one a' on the cell's mask m. To first order
the metric moves by  sum_m (a' - a) * dmetric/da,  with the gradient taken once on the corrupted run (Nanda
2023, "Attribution Patching: Activation Patching At Industrial Scale"; Syed et al. 2023). The gradient is
`jax.grad` of the metric with respect to a zero `Add` intervention at the hook on every layer at once, so a
grid costs one clean forward (for the source, unless a cache is given), one corrupted forward and one
backward, whatever its size.

    est = attribution_patch(model, corrupted_tokens, clean_cache, metric, "attn_head_out_by_pos")
    exact = get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, metric)
    report = compare(est, exact)       # correlation, largest disagreements
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxlens.errors import InputError
from jaxlens.interventions import Add
from jaxlens.model.forward import check_tokens, run
from jaxlens.patching.activation import EVERY, SPECS, stack_patch_types
from jaxlens.patching.plan import Target, resolve_target
from jaxlens.patching.prepare import check_metric, source_activation
from jaxlens.patching.result import PatchResult
from jaxlens.shapes import resolve_params


def attribution_sweep(params, cfg, corrupted_tokens, clean, metric: Callable, *, hook: str,
                      axes: Sequence[str], metric_names: Sequence[str] | None = None) -> PatchResult:
    """The gradient estimate of `sweep(...)` with the same arguments: estimated metric values per cell.

    Returns:
        PatchResult like `sweep`'s, values = metric(corrupted) + estimated change.
    """
    params, cfg = resolve_params(params, cfg)
    return attribution_sweeps(params, cfg, corrupted_tokens, clean, metric, [(hook, axes)], metric_names)[0]


def attribution_sweeps(params, cfg, corrupted_tokens, clean, metric: Callable, specs, metric_names=None
                       ) -> list[PatchResult]:
    """Several grids [(hook, axes), ...] from one corrupted forward and one backward pass per metric entry."""
    params, cfg = resolve_params(params, cfg)
    tokens = check_tokens(jnp.asarray(corrupted_tokens), cfg)
    targets = [resolve_target(cfg, h, a) for h, a in specs]
    names = tuple(dict.fromkeys(t.full_name for t in targets))
    acts, grads, base = _grads(params, cfg, tokens, metric, names, metric_names)
    out = []
    for t in targets:
        src = source_activation(params, cfg, clean, t, acts[t.full_name].shape)
        d = (src - acts[t.full_name]).astype(jnp.float32)
        est = _reduce(t, d[None] * grads[t.full_name])  # [metric, *grid]
        est = np.moveaxis(np.asarray(est), 0, -1) + base
        names = {"metric": metric_names or ("metric",)}
        res = PatchResult(est.astype(np.float32), t.axes + ("metric",), names, np.asarray(base, np.float32))
        out.append(res.select(metric="metric") if metric_names is None else res)
    return out


def attribution_patch(model, corrupted_tokens, clean_cache, patching_metric: Callable, kind: str
                      ) -> Float[Array, "..."]:
    """The gradient estimate of TransformerLens's `get_act_patch_<kind>`, same shape (e.g. kind
    "attn_head_out_by_pos" or "block_every"); the `*_every` kinds take one backward pass for all parts."""
    parts = EVERY.get(kind, (kind,))
    if any(p not in SPECS for p in parts):
        raise InputError(f"Unknown kind {kind!r}; choose one of {sorted(SPECS) + sorted(EVERY)}.")
    res = attribution_sweeps(model.params, model.cfg, corrupted_tokens, clean_cache, patching_metric,
                             [SPECS[p] for p in parts])
    if kind in EVERY:
        return jnp.asarray(stack_patch_types(kind, res, model.cfg.n_heads))
    return jnp.asarray(res[0])


@dataclasses.dataclass(frozen=True)
class AttributionReport:
    """How well the gradient estimate matches the exact sweep.

    Attributes:
        correlation: Pearson correlation over cells.
        max_abs_error: largest |estimate - exact|.
        worst: the largest disagreements, [(index tuple, estimate, exact)].
    """

    correlation: float
    max_abs_error: float
    worst: list


def compare(estimate, exact, k: int = 10) -> AttributionReport:
    """Correlation and the k largest disagreements between an attribution estimate and the exact sweep."""
    e, x = np.asarray(estimate, np.float64), np.asarray(exact, np.float64)
    if e.shape != x.shape:
        raise InputError(f"Estimate of shape {e.shape} and exact sweep of shape {x.shape} differ.")
    err = np.abs(e - x)
    order = np.argsort(-err, axis=None)[:k]
    worst = [(tuple(int(i) for i in np.unravel_index(f, e.shape)), float(e.flat[f]), float(x.flat[f]))
             for f in order]
    ec, xc = e - e.mean(), x - x.mean()
    denom = np.sqrt((ec * ec).sum() * (xc * xc).sum())
    corr = float((ec * xc).sum() / denom) if denom > 0 else float("nan")
    return AttributionReport(corr, float(err.max()), worst)


@functools.partial(jax.jit, static_argnames=("cfg", "names", "metric", "n_metrics"))
def _grads_jit(params, cfg, tokens, names, metric, n_metrics):
    shapes = jax.eval_shape(lambda: run(params, cfg, tokens, cache_names=names)[1])
    zeros = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}

    def f(deltas):
        logits, cache, _ = run(params, cfg, tokens, interventions={n: Add(d) for n, d in deltas.items()},
                               cache_names=names)
        return jnp.reshape(metric(logits), (-1,)).astype(jnp.float32), cache

    value, vjp, acts = jax.vjp(f, zeros, has_aux=True)
    grads = jax.vmap(vjp)(jnp.eye(n_metrics, dtype=jnp.float32))[0]
    return acts, grads, value


def _grads(params, cfg, tokens, metric, names, metric_names):
    logits_shape = jax.eval_shape(lambda: run(params, cfg, tokens)[0])
    check_metric(metric, jnp.zeros(logits_shape.shape, logits_shape.dtype), metric_names)
    n = 1 if metric_names is None else len(metric_names)
    acts, grads, value = _grads_jit(params, cfg, tokens, names, metric, n)
    return acts, grads, np.asarray(value)


def _reduce(t: Target, prod):
    """Sum [metric, layer?, *act] over everything but the swept axes; order them as the sweep does."""
    names = ("metric",) + (("layer",) if t.kind == "block" else ()) + t.act_axes
    keep = ("metric",) + t.act_of_axis
    summed = prod.sum(axis=tuple(i for i, a in enumerate(names) if a not in keep))
    left = [a for a in names if a in keep]
    return jnp.transpose(summed, [left.index(a) for a in keep])
