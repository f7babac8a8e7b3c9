"""Loading without extra full copies of the model: numpy -> jax leaf by leaf, and a params -> params transform
(weight processing, the dtype cast) applied one output tensor at a time.

A pure transform such as `process_weights` builds a whole new params tree while the old one is alive: old +
new + XLA's temporaries is two to three models at once. `stream_transform` instead traces the transform once,
finds which input tensors each output tensor depends on (a walk over the jaxpr), and computes the outputs a
few at a time, small ones first, each batch (no bigger than the largest tensor) in its own jitted computation.
An input is donated (its buffer reused or freed) to the last batch that needs it, so the peak stays near one
model plus the largest tensor's temporaries.
"""

import ctypes
import ctypes.util
import gc
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def numpy_to_jax(tree: dict, seen: set | None = None) -> dict:
    """Replace each numpy leaf of a fresh converter dict by a jax array, in place and one at a time, so the
    numpy copy of the model shrinks while the jax copy grows (peak: one model plus one tensor, not two
    models).

    `jax.device_put` copies once; `jnp.asarray` stages through a second host copy. A leaf that is the same
    object as an earlier one is copied again, so that no buffer appears twice (donation needs that).
    """
    seen = set() if seen is None else seen
    for k, v in tree.items():
        if isinstance(v, dict):
            numpy_to_jax(v, seen)
            continue
        tree[k] = jax.device_put(np.array(v) if id(v) in seen else v).block_until_ready()
        seen.add(id(v))
        del v
        _release_freed_memory()
    return tree


def stream_transform(fn: Callable[[Any], Any], params: Any) -> Any:
    """`fn(params)` computed a few output leaves at a time, consuming `params` (do not use it afterwards).

    Args:
        fn: a pure, traceable params -> pytree transform.
        params: a pytree of jax arrays, each buffer appearing once.

    Returns:
        The same value as `jax.jit(fn)(params)`.
    """
    flat, in_tree = jax.tree_util.tree_flatten(params)
    _empty(params)  # the caller's containers must not keep the inputs alive past their last step
    del params
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat]
    leaves_of = lambda *xs: jax.tree_util.tree_leaves(fn(jax.tree_util.tree_unflatten(in_tree, xs)))
    closed = jax.make_jaxpr(leaves_of)(*avals)
    out_tree = jax.tree_util.tree_structure(jax.eval_shape(fn, jax.tree_util.tree_unflatten(in_tree, avals)))
    deps, passthrough = _dependencies(closed.jaxpr)
    groups = _group_steps([i for i in range(len(deps)) if i not in passthrough],
                          [a.size * a.dtype.itemsize for a in closed.out_avals])
    last_use = {}
    for g, group in enumerate(groups):
        for i in group:
            for j in deps[i]:
                last_use[j] = g
    keep = set(passthrough.values())  # inputs returned unchanged are never donated
    out: list = [None] * len(deps)
    for i, j in passthrough.items():
        out[i] = flat[j]
    for g, group in enumerate(groups):
        needed = set().union(*(deps[i] for i in group))
        donated = sorted(j for j in needed if last_use[j] == g and j not in keep)
        args = ({j: flat[j] for j in donated}, {j: flat[j] for j in sorted(needed - set(donated))})
        for j in donated:
            flat[j] = None  # `args` holds the last reference: the buffer becomes an output's or is freed
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            step = _outputs(fn, in_tree, avals, group).lower(*args).compile()
        _release_freed_memory()  # the compiler's transient memory, before the step's own temporaries
        # Wait for the results (under async dispatch several steps' temporaries would be alive at once), then
        # drop the executable: XLA:CPU keeps an executable's temporary buffers for reuse while it lives, and
        # reference cycles keep it alive until a collection.
        for i, x in zip(group, jax.block_until_ready(step(*args)), strict=True):
            out[i] = x
        del step, args
        gc.collect()
        _release_freed_memory()
    return jax.tree_util.tree_unflatten(out_tree, out)


def _empty(tree) -> None:
    """Empty every dict and list of a consumed pytree in place (tuples cannot be, and are left)."""
    children = list(tree.values()) if isinstance(tree, dict) else tree if isinstance(tree, list) else ()
    for child in children:
        _empty(child)
    if isinstance(tree, (dict, list)):
        tree.clear()


def _group_steps(outputs: list[int], nbytes: list[int]) -> list[list[int]]:
    """Outputs batched into steps, small ones first, each step's outputs together no bigger than the largest
    output: few compilations (one per step), and no step's memory beyond what the largest output alone
    needs."""
    budget = max((nbytes[i] for i in outputs), default=0)
    groups: list[list[int]] = []
    size = 0
    for i in sorted(outputs, key=lambda i: nbytes[i]):
        if groups and size + nbytes[i] <= budget:
            groups[-1].append(i)
            size += nbytes[i]
        else:
            groups.append([i])
            size = nbytes[i]
    return groups


def _outputs(fn, in_tree, avals, indices: list[int]):
    def some(donated: dict, other: dict):
        given = {**donated, **other}
        # inputs not given are unused by these outputs: their zeros are DCE'd
        xs = [given[j] if j in given else jnp.zeros(a.shape, a.dtype) for j, a in enumerate(avals)]
        leaves = jax.tree_util.tree_leaves(fn(jax.tree_util.tree_unflatten(in_tree, xs)))
        return [leaves[i] for i in indices]

    return jax.jit(some, donate_argnums=0)


def _dependencies(jaxpr) -> tuple[list[set[int]], dict[int, int]]:
    """For each output of `jaxpr`: the indices of the inputs it depends on; and {output: input} for outputs
    that are an input unchanged. An equation's outputs depend on all of its inputs
    (conservative for sub-jaxprs)."""
    index = {v: j for j, v in enumerate(jaxpr.invars)}
    deps: dict = {v: {j} for v, j in index.items()}
    for eqn in jaxpr.eqns:
        d = set().union(*(deps.get(v, set()) for v in eqn.invars if _is_var(v)))
        for o in eqn.outvars:
            deps[o] = d
    out_deps = [deps.get(v, set()) if _is_var(v) else set() for v in jaxpr.outvars]
    passthrough = {i: index[v] for i, v in enumerate(jaxpr.outvars) if _is_var(v) and v in index}
    return out_deps, passthrough


def _release_freed_memory() -> None:
    """Ask glibc to return freed heap memory to the OS now (it otherwise keeps freed tensor-sized blocks,
    which then count in the peak while the next tensor is built). A no-op where there is no glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _is_var(v) -> bool:
    return not hasattr(v, "val")  # jaxpr Literals carry .val; Vars do not
