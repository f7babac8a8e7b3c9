"""HookedFlax: TransformerLens's run_with_cache / run_with_hooks / interventions for any Flax model."""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from jaxlens.errors import InputError
from jaxlens.flax._instrument import (
    AliasMap,
    Recorder,
    UnknownFlaxHookError,
    check_layout,
    linen_hooks,
    nnx_hooks,
)
from jaxlens.interventions import Add, Fn, Patch, intervention_list
from jaxlens.patching.result import PatchResult


class HookedFlax:
    """A Flax model (linen or NNX, unchanged) whose submodule method outputs are hook points.

    Args:
        module_or_apply_fn: a linen Module (run as `module.apply(variables, *args)`), a function
            `apply_fn(variables, *args, **kwargs)` that runs linen modules (e.g. a Hugging Face Flax model's
            `model.module.apply`), or an NNX Module (run as `module(*args)`).
        variables: the linen variables (`{"params": ...}`); for NNX, None (the module's own state) or a
            state / pure dict of the module's layout to run instead.
        hook_map: {hook path: TransformerLens name}; `{i}`-style placeholders match integers
            (`{"transformer.h.{i}.__call__[0]": "blocks.{i}.hook_resid_post"}`). Mapped names replace the
            paths in caches and may address interventions.
        method: the NNX method (or linen method name) to run; default `__call__`.

    Raises:
        LayoutError: NNX `variables` that do not match the module's state (checked here); linen variables
            are checked against `module.init`'s layout at the first call.
        InputError: something that is neither a Flax module nor a function.
    """

    def __init__(self, module_or_apply_fn: Any, variables: Any = None,
                 hook_map: Mapping[str, str] | None = None, *, method: str | None = None):
        self.hook_map = dict(hook_map or {})
        self._method = method or "__call__"
        self._module, self._checked, self._traced = module_or_apply_fn, False, {}
        if isinstance(module_or_apply_fn, nnx.Module):
            self.kind = "nnx"
            self._graphdef, state = nnx.split(module_or_apply_fn)
            if variables is not None:
                given = variables.to_pure_dict() if isinstance(variables, nnx.State) else variables
                check_layout(state.to_pure_dict(), given, "variables")
                nnx.replace_by_pure_dict(state, given)
            self.variables, self._checked = state, True
        elif isinstance(module_or_apply_fn, linen.Module) or callable(module_or_apply_fn):
            self.kind = "linen"
            if variables is None:
                raise InputError("A linen model needs its variables: HookedFlax(module, {'params': params}).")
            self.variables = variables
            self._checked = not isinstance(module_or_apply_fn, linen.Module)  # a bare apply_fn has no init
        else:
            raise InputError(f"HookedFlax takes a linen Module, an apply function or an NNX Module; found "
                             f"{type(module_or_apply_fn).__name__}.")
        self._jit = jax.jit(self._run, static_argnames=("cache_names", "static"))

    # -- public methods ------------------------------------------------------------------------------------
    def hook_names(self, *args, **kwargs) -> list[str]:
        """Every hook point of a run on these inputs, in call order (TL names where `hook_map` maps them).
        Without inputs, those of the last inputs seen."""
        if not args and not kwargs:
            if not self._traced:
                raise InputError("hook_names() needs example inputs until the model has run once: "
                                 "hook_names(*args) (which hook points exist depends on the call).")
            return list(next(reversed(self._traced.values()))[0])
        self._shapes(args, kwargs)
        return list(self._traced[_signature(args, *_split_kwargs(kwargs))][0])

    def hook_shapes(self, *args, **kwargs) -> dict[str, tuple[int, ...]]:
        """{hook name: activation shape} of a run on these inputs (traced, not run)."""
        self._shapes(args, kwargs)
        return dict(self._traced[_signature(args, *_split_kwargs(kwargs))][0])

    def forward(self, *args, interventions: Mapping[str, Any] | None = None, **kwargs):
        """The model's output with `interventions` ({hook name: Patch | Add | Scale | Fn | list})."""
        return self._call(args, kwargs, interventions, frozenset())[0]

    __call__ = forward

    def run_with_cache(self, *args, names_filter: Any = None, interventions: Mapping[str, Any] | None = None,
                       **kwargs) -> tuple[Any, dict[str, jax.Array]]:
        """(output, {hook name: activation}) for the hooks `names_filter` picks: None (all), a name, a list
        of names, or a predicate on names. Recorded values are after any intervention at that hook."""
        if names_filter is None:
            names = None
        elif isinstance(names_filter, str):
            names = frozenset({names_filter})
        elif callable(names_filter):
            names = frozenset(n for n in self.hook_names(*args, **kwargs) if names_filter(n))
        else:
            names = frozenset(names_filter)
        return self._call(args, kwargs, interventions, names)

    def run_with_hooks(self, *args, fwd_hooks: Sequence[tuple[str | Callable, Callable]] = (), **kwargs):
        """The output with TransformerLens hook functions `fn(activation, hook) -> activation` applied at
        the named hooks (a name or a predicate on names). Each call's hooks live for that call only."""
        ivs: dict[str, list] = {}
        for name, fn in fwd_hooks:
            chosen = [n for n in self.hook_names(*args, **kwargs) if name(n)] if callable(name) else [name]
            for n in chosen:
                ivs.setdefault(n, []).append(Fn(fn))
        return self.forward(*args, interventions=ivs, **kwargs)

    def hook_grads(self, *args, names: Sequence[str], metric: Callable[[Any], jax.Array],
                   interventions: Mapping[str, Any] | None = None, **kwargs) -> dict[str, jax.Array]:
        """{name: d metric(output) / d activation}: gradients through a zero `Add` at each hook."""
        shapes = self._shapes(args, kwargs)
        for n in names:
            if n not in shapes:
                raise UnknownFlaxHookError(n, shapes)

        def f(deltas):
            ivs = dict(interventions or {})
            for n, d in deltas.items():
                ivs[n] = [*intervention_list(ivs.get(n)), Add(d)]
            return metric(self.forward(*args, interventions=ivs, **kwargs))

        return jax.grad(f)({n: jnp.zeros(shapes[n], jnp.float32) for n in names})

    def sweep(self, *args, hook: str, source: jax.Array, metric: Callable[[Any], jax.Array],
              axes: Mapping[str, int], chunk_size: int | None = None,
              labels: Mapping[str, Sequence] | None = None, **kwargs) -> PatchResult:
        """Patch `source` into the run at every cell of the activation axes `axes` ({name: axis index}),
        one cell at a time, and evaluate `metric(output)` (a scalar) for each: one compiled, vmapped
        computation over the cells (no layer or position reuse: the model's structure is unknown).

        Returns:
            PatchResult over the named axes, its baseline the unpatched run's metric.

        Raises:
            UnknownFlaxHookError: `hook` is not a hook point. InputError: a bad axis or source shape.
        """
        shapes = self._shapes(args, kwargs)
        if hook not in shapes:
            raise UnknownFlaxHookError(hook, shapes)
        shape = shapes[hook]
        for a, i in axes.items():
            if not -len(shape) <= i < len(shape):
                raise InputError(f"sweep: axis {a!r}={i} is not an axis of {hook!r}, of shape {shape}.")
        if np.shape(source) != shape:
            raise InputError(f"sweep: source has shape {np.shape(source)}; the activation at {hook!r} has "
                             f"shape {shape}. Pass the clean run's activation (run_with_cache).")
        idx = [i % len(shape) for i in axes.values()]
        grid = [shape[i] for i in idx]
        masks = _cell_masks(shape, idx)
        dyn, static = _split_kwargs(kwargs)
        base = self._jit(self.variables, {}, args, dyn, cache_names=frozenset(), static=static)[0]

        @jax.jit
        def run(variables, masks, source):
            def one(mask):
                iv = {hook: Patch(source, mask)}
                return jnp.asarray(metric(self._run(variables, iv, args, dyn, cache_names=frozenset(),
                                                    static=static)[0]), jnp.float32)
            return jax.lax.map(one, masks, batch_size=chunk_size or min(len(masks), 64))

        values = run(self.variables, masks, jnp.asarray(source))
        if values.shape != (len(masks),):
            raise InputError(f"sweep: the metric must return a scalar; it returned shape {values.shape[1:]}.")
        return PatchResult(np.asarray(values).reshape(grid), tuple(axes), dict(labels or {}),
                           np.asarray(metric(base), np.float32))

    # -- internals -----------------------------------------------------------------------------------------
    def _call(self, args, kwargs, interventions, cache_names):
        self._check(args, kwargs)
        dyn, static = _split_kwargs(kwargs)
        return self._jit(self.variables, dict(interventions or {}), args, dyn, cache_names=cache_names,
                         static=static)

    def _run(self, variables, interventions, args, dyn, *, cache_names, static):
        """The pure instrumented run: (output, cache)."""
        rec = Recorder(interventions, cache_names, AliasMap(self.hook_map))
        kwargs = {**dyn, **dict(static)}
        if self.kind == "nnx":
            model = nnx.merge(self._graphdef, variables)
            with nnx_hooks(model, rec):
                out = getattr(model, self._method)(*args, **kwargs)
        else:
            with linen_hooks(rec):
                out = self._apply(variables, *args, **kwargs)
        rec.aliases.check(rec.seen)
        rec.check()
        shown = {rec.aliases.get(n) or n: s for n, s in rec.seen.items()}
        self._traced[_signature(args, dyn, static)] = (shown, {**rec.seen, **shown})
        return out, rec.cache

    def _apply(self, variables, *args, **kwargs):
        if isinstance(self._module, linen.Module):
            method = None if self._method == "__call__" else self._method
            return self._module.apply(variables, *args, method=method, **kwargs)
        return self._module(variables, *args, **kwargs)

    def _shapes(self, args, kwargs) -> dict[str, tuple]:
        self._check(args, kwargs)
        dyn, static = _split_kwargs(kwargs)
        key = _signature(args, dyn, static)
        if key not in self._traced:
            run = functools.partial(self._run, cache_names=frozenset(), static=static)
            jax.eval_shape(run, self.variables, {}, args, dyn)
        return self._traced[key][1]

    def _check(self, args, kwargs) -> None:
        """Linen: the variables against the layout `module.init` builds for these inputs (once)."""
        if self._checked:
            return
        try:
            want = jax.eval_shape(lambda: self._module.init(jax.random.key(0), *args, **kwargs))
        except Exception:  # an init that needs other rngs or inputs: apply reports its own errors
            want = None
        if want is not None:
            check_layout({c: v for c, v in want.items() if c != "intermediates"}, self.variables, "variables")
        self._checked = True


def _split_kwargs(kwargs):
    """Array keywords are traced; the rest (flags such as deterministic=True) are static."""
    dyn = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in dyn))
    return dyn, static


def _signature(args, dyn, static):
    spec = jax.tree_util.tree_map(lambda x: (np.shape(x), str(getattr(x, "dtype", type(x)))), (args, dyn))
    return str(jax.tree_util.tree_structure((args, dyn))), str(spec), static


def _cell_masks(shape, idx) -> np.ndarray:
    """[n_cells, *mask_shape]: one-hot over the swept axes (size 1 on every other axis), cells row-major."""
    mshape = [shape[i] if i in idx else 1 for i in range(len(shape))]
    grid = [shape[i] for i in idx]
    cells = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), -1)
    masks = np.zeros((len(cells), *mshape), bool)
    for c, cell in enumerate(cells):
        where = [0] * len(shape)
        for i, v in zip(idx, cell, strict=True):
            where[i] = v
        masks[(c, *where)] = True
    return masks
