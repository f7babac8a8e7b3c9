"""`cached_forward`: the forward pass that returns an `ActivationCache`, with TL's backward cache.

    logits, cache = cached_forward(params, cfg, tokens, names, start_at_layer=2, incl_bwd=True,
                                   grad_metric=lambda logits: logits[0, -1, 7])

One jitted program per (config, names, layer bounds): block activations come out stacked over layers (one
output per hook, so compile time is flat in depth; `ActivationCache` slices them on access). With `incl_bwd`,
the cache also holds `<name>_grad`, the gradient of the loss (or `grad_metric(output)`) with respect to each
cached activation, taken through zero `Add` interventions, honouring the layer bounds and the attention mask.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxlens import hook_names
from jaxlens.cache import ActivationCache
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.interventions import Add, intervention_list
from jaxlens.model import layout, runner
from jaxlens.model.forward import lm_cross_entropy_loss, run
from jaxlens.shapes import AnyArray, Params, ParamsLike, resolve_params


def run_jit(params: Params, cfg: Config,
            tokens: Int[AnyArray, "batch pos"] | Float[AnyArray, "batch pos d_model"],
            interventions: Mapping[str, Any], attention_mask: Bool[AnyArray, "batch pos"] | None, *,
            cache_names: tuple[str, ...] = (), start_at_layer: int | None = None,
            stop_at_layer: int | None = None, stacked: bool = False) -> tuple[Array, Any]:
    """`forward.run` under jit (weights and interventions are arguments, names and bounds static), with the
    model's weight layout (`layout.prepare`: unrolled per-layer weights for shallow models on CPU)."""
    params, cfg = resolve_params(params, cfg)
    return _run_jit(params, layout.prepare(params, cfg), cfg, tokens, interventions, attention_mask,
                    cache_names=cache_names, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer,
                    stacked=stacked)


@functools.partial(jax.jit,
                   static_argnames=("cfg", "cache_names", "start_at_layer", "stop_at_layer", "stacked"))
def _run_jit(params, lay, cfg, tokens, interventions, attention_mask, *, cache_names, start_at_layer,
             stop_at_layer, stacked):
    out, cache, _ = run(params, cfg, tokens, interventions=interventions, cache_names=cache_names,
                        start_at_layer=start_at_layer, stop_at_layer=stop_at_layer,
                        attention_mask=attention_mask, stacked_cache=stacked, layout=lay)
    return out, cache


run_jit._cache_size = _run_jit._cache_size  # compiled programs (tests and benchmarks count them)


def cached_forward(
    params: ParamsLike,
    cfg: Config,
    tokens: Int[AnyArray, "batch pos"] | Float[AnyArray, "batch pos d_model"],
    names: Sequence[str],
    *,
    interventions: Mapping[str, Any] | None = None,
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    attention_mask: Bool[AnyArray, "batch pos"] | None = None,
    incl_bwd: bool = False,
    grad_metric: Callable[[Array], Array] | None = None,
) -> tuple[Array, ActivationCache]:
    """(output, ActivationCache of `names`); see the module docstring.

    Raises:
        InputError: incl_bwd with layer bounds but no grad_metric (the loss needs tokens and logits), or names
            this run does not compute.
    """
    params, cfg = resolve_params(params, cfg)
    names = tuple(names)
    start, stop = runner.layer_bounds(cfg.n_layers, start_at_layer, stop_at_layer)
    layers = runner.stack_layers(hook_names.decoder_table(cfg), names, start, stop)
    kw = dict(start_at_layer=start_at_layer, stop_at_layer=stop_at_layer)
    if not incl_bwd:
        out, (flat, stacked) = run_jit(params, cfg, tokens, interventions or {}, attention_mask,
                                       cache_names=names, stacked=True, **kw)
        return out, ActivationCache(flat, cfg, params, stacks={r: (layers[r], a) for r, a in stacked.items()})
    if grad_metric is None and (start_at_layer is not None or stop_at_layer is not None):
        raise InputError("run_with_cache(incl_bwd=True) with start_at_layer/stop_at_layer needs grad_metric: "
                         "the default loss needs token ids and logits. Pass grad_metric=lambda out: ...")
    out, flat, stacked, flat_g, stacked_g = _grads_jit(params, cfg, tokens, interventions or {},
                                                      attention_mask, grad_metric, cache_names=names, **kw)
    flat.update({f"{n}_grad": g for n, g in flat_g.items()})
    stacks = {r: (layers[r], a) for r, a in stacked.items()}
    stacks.update({f"{r}_grad": (layers[r], g) for r, g in stacked_g.items()})
    return out, ActivationCache(flat, cfg, params, stacks=stacks)


@functools.partial(jax.jit,
                   static_argnames=("cfg", "metric", "cache_names", "start_at_layer", "stop_at_layer"))
def _grads_jit(params, cfg, tokens, interventions, attention_mask, metric, *, cache_names, start_at_layer,
               stop_at_layer):
    """Activations and their gradients: one zero `Add` per global name, one stacked over every layer per block
    hook (sliced to the layers asked for). metric None: the next-token loss (masked like the run)."""
    table = hook_names.decoder_table(cfg)
    start, stop = runner.layer_bounds(cfg.n_layers, start_at_layer, stop_at_layer)
    kw = dict(start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, attention_mask=attention_mask,
              cache_names=cache_names, stacked_cache=True)
    flat_s, stacked_s = jax.eval_shape(lambda: run(params, cfg, tokens, interventions=interventions, **kw)[1])
    layers = runner.stack_layers(table, cache_names, start, stop)
    full = lambda s: jnp.zeros((cfg.n_layers,) + s.shape[1:], s.dtype)
    d_flat = {n: full(s) if table.parse(n)[0] == "all" else jnp.zeros(s.shape, s.dtype)
              for n, s in flat_s.items()}
    d_stacked = {f"blocks.{r}": full(s) for r, s in stacked_s.items()}

    def f(deltas):
        ivs = dict(interventions)
        for n, d in deltas.items():
            ivs[n] = [*intervention_list(ivs.get(n)), Add(d)]
        out, (flat, stacked), _ = run(params, cfg, tokens, interventions=ivs, **kw)
        value = lm_cross_entropy_loss(out, tokens, attention_mask) if metric is None else metric(out)
        return value, (out, flat, stacked)

    grads, (out, flat, stacked) = jax.grad(f, has_aux=True)({**d_flat, **d_stacked})
    flat_g = {n: grads[n][start:stop] if table.parse(n)[0] == "all" else grads[n] for n in d_flat}
    stacked_g = {r: grads[f"blocks.{r}"][jnp.asarray(layers[r])] for r in stacked_s}
    return out, flat, stacked, flat_g, stacked_g

