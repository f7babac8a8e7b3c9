"""Interventions are data: pytrees applied at a hook point, so a stack of them vmaps.

    iv = {"blocks.3.attn.hook_z": zero_ablate(mask=head_mask(cfg, head=7))}
    iv = {"blocks.hook_resid_pre": Patch(value=clean_resid, mask=layer_pos_mask)}   # every layer, stacked

A key with a layer index (`blocks.3.attn.hook_z`) addresses one layer; a key without it (`blocks.attn.hook_z`)
addresses every layer, and each array leaf then carries a leading `layer` axis (which layer is patched is part
of the mask, so it can be vmapped). Masks and values broadcast against the activation (lower rank means
leading axes of size 1, as in NumPy). A list of interventions at one key is applied in order.

Attribution patching is `jax.grad` of a metric with respect to `Add(delta=zeros)`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlens import _hook_fn
from jaxlens.errors import InterventionError


@dataclasses.dataclass(frozen=True)
class HookPoint:
    """What a function intervention receives as `hook`: TransformerLens's `hook.name` and `hook.layer()`."""

    name: str
    layer_index: Any = None

    def layer(self):
        """The layer index (a traced scalar when one function serves every layer under scan)."""
        return self.layer_index


def _fit(hook: HookPoint, x: jax.Array, what: str, arr, cls: str) -> jax.Array:
    """`arr` as an array of x's rank that broadcasts to x's shape, or a clear error."""
    arr = jnp.asarray(arr)
    if arr.ndim > x.ndim:
        raise InterventionError(
            f"{cls} at {hook.name!r}: {what} has shape {arr.shape}, more axes than the activation {x.shape}. "
            "If this is a stacked intervention, address the layer-free name (e.g. 'blocks.attn.hook_z')."
        )
    arr = arr.reshape((1,) * (x.ndim - arr.ndim) + arr.shape)
    ok = all(a in (1, b) for a, b in zip(arr.shape, x.shape, strict=True))
    if not ok:
        raise InterventionError(
            f"{cls} at {hook.name!r}: {what} of shape {arr.shape} does not broadcast to the activation's "
            f"shape {x.shape}. Give it the activation's shape, or size 1 on the axes it should broadcast "
            "over."
        )
    return arr


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace the activation by `value` where `mask` is True (everywhere if mask is None)."""

    value: jax.Array
    mask: jax.Array | None = None

    def __call__(self, x: jax.Array, hook: HookPoint) -> jax.Array:
        value = _fit(hook, x, "value", self.value, "Patch").astype(x.dtype)
        if self.mask is None:
            return jnp.broadcast_to(value, x.shape)
        return jnp.where(_fit(hook, x, "mask", self.mask, "Patch"), value, x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Add:
    """Add `delta` (steering, or a zero delta to take gradients), where `mask` is True."""

    delta: jax.Array
    mask: jax.Array | None = None

    def __call__(self, x: jax.Array, hook: HookPoint) -> jax.Array:
        delta = _fit(hook, x, "delta", self.delta, "Add").astype(x.dtype)
        if self.mask is not None:
            delta = jnp.where(_fit(hook, x, "mask", self.mask, "Add"), delta, jnp.zeros((), x.dtype))
        return x + delta


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scale:
    """Multiply by `factor` where `mask` is True (factor 0: zero ablation)."""

    factor: jax.Array
    mask: jax.Array | None = None

    def __call__(self, x: jax.Array, hook: HookPoint) -> jax.Array:
        factor = _fit(hook, x, "factor", self.factor, "Scale").astype(x.dtype)
        if self.mask is not None:
            factor = jnp.where(_fit(hook, x, "mask", self.mask, "Scale"), factor, jnp.ones((), x.dtype))
        return x * factor


class Fn:
    """An arbitrary pure function `fn(activation, hook) -> new activation` (TransformerLens's hook function).

    A pytree: for a plain Python function (or a partial or bound method of one) the code is static and the
    arrays and numbers its closure, defaults and module globals hold are leaves, so a new function per call
    with the same code compiles once (TL's loop idiom; see `jaxlens._hook_fn`). A hook that cannot trace with
    a number as data (`x[:, :pos]`, `range(n)`) falls back to that number as a static value, at once and for
    every later call of the same code. Any other callable is static, by identity.

    A hook must be pure: return the new activation (`x.at[:, :, h].set(v)`, not `x[:, :, h] = v`), and keep no
    state (`nonlocal`/`global` writes and activations stored in a list raise an InterventionError). Other side
    effects (printing, appending names) happen while the program is traced: once per compile, not per call.
    """

    __slots__ = ("fn", "_aux", "_leaves")

    def __init__(self, fn: Callable):
        self.fn = fn.fn if isinstance(fn, Fn) else fn  # the user's function
        self._aux, self._leaves = None, None

    def __call__(self, x: jax.Array, hook: HookPoint) -> jax.Array:
        out = _hook_fn.apply(self._aux, self.fn, self._leaves, x, hook)
        if out is None:
            name = getattr(self.fn, "__name__", self.fn)
            raise InterventionError(
                f"The hook function {name!r} at {hook.name!r} returned None. jaxlens hooks are pure: "
                "return the new activation (return the input to leave it unchanged)."
            )
        out = jnp.asarray(out)
        if out.shape != x.shape:
            raise InterventionError(
                f"The hook function at {hook.name!r} returned shape {out.shape}; the activation has shape "
                f"{x.shape}. Return an array of the activation's shape."
            )
        return out.astype(x.dtype)

    def __repr__(self) -> str:
        return f"Fn({self.fn!r})"

    def _flatten(self):
        if self._aux is not None:
            return self._leaves, self._aux
        return _hook_fn.flatten(self.fn)

    @classmethod
    def _unflatten(cls, aux: _hook_fn.FnAux, leaves) -> "Fn":
        out = cls.__new__(cls)
        out.fn, out._aux, out._leaves = aux.original, aux, list(leaves)
        return out


jax.tree_util.register_pytree_node(Fn, Fn._flatten, Fn._unflatten)


Intervention = Patch | Add | Scale | Fn


def zero_ablate(mask: jax.Array | None = None) -> Scale:
    """Set the activation to zero where `mask` is True."""
    return Scale(factor=jnp.zeros(()), mask=mask)


def mean_ablate(mean: jax.Array, mask: jax.Array | None = None) -> Patch:
    """Replace the activation by `mean` (e.g. `cache[name].mean(0, keepdims=True)`) where `mask` is True."""
    return Patch(value=mean, mask=mask)


def as_intervention(x) -> Any:
    """An intervention, a list of them, or a plain callable `fn(x, hook)` (wrapped in Fn). A pytree class with
    a true `is_intervention` attribute (e.g. `jaxlens.dictionaries.Splice`) is an intervention as it is."""
    if isinstance(x, (Patch, Add, Scale, Fn)) or getattr(type(x), "is_intervention", False):
        return x
    if isinstance(x, (list, tuple)):
        return [as_intervention(i) for i in x]
    if callable(x):
        return Fn(x)
    raise InterventionError(
        f"An intervention must be Patch, Add, Scale, Fn or a function fn(x, hook); found {type(x).__name__}."
    )


def intervention_list(x) -> list:
    """`as_intervention(x)` as a list: [] for None, one entry per intervention otherwise."""
    if x is None:
        return []
    ivs = as_intervention(x)
    return ivs if isinstance(ivs, list) else [ivs]


def axis_mask(axes: str, sizes: dict[str, int], **index) -> jax.Array:
    """A boolean mask over a hook's axes, True at the given indices, size 1 on every axis not indexed.

    Example: `axis_mask("batch pos head_index d_head", {"pos": 16, "head_index": 12}, pos=3, head_index=7)`
    has shape [1, 16, 12, 1] and is True at (pos 3, head 7); with `hook_names.hook_axes(cfg, name)` for
    `axes`. An index may be an int or a sequence of ints.
    """
    names = axes.split()
    out = jnp.ones((1,) * len(names), bool)
    for name, idx in index.items():
        if name not in names:
            raise InterventionError(f"axis_mask: {name!r} is not one of the axes {names}.")
        if name not in sizes:
            raise InterventionError(f"axis_mask: give the size of {name!r} in `sizes` to index it.")
        i = names.index(name)
        sel = jnp.zeros((sizes[name],), bool).at[jnp.asarray(idx)].set(True)
        out = out & sel.reshape([sizes[name] if j == i else 1 for j in range(len(names))])
    return out


def ablate_heads(cfg, heads) -> dict[str, Scale]:
    """Interventions zero-ablating the outputs (`attn.hook_z`) of the given (layer, head) pairs, one per
    layer: `model(tokens, interventions=ablate_heads(cfg, [(5, 3), (5, 7), (9, 1)]))`.

    Args:
        cfg: the model's Config (for n_layers and n_heads).
        heads: (layer, head) pairs.

    Raises:
        InterventionError: a layer or head index out of range.
    """
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        if not (0 <= l < cfg.n_layers and 0 <= h < cfg.n_heads):
            raise InterventionError(f"Head L{l}H{h} is out of range: the model has {cfg.n_layers} layers of "
                                    f"{cfg.n_heads} heads.")
        by_layer.setdefault(int(l), []).append(int(h))
    axes = "batch pos head_index d_head"
    return {f"blocks.{l}.attn.hook_z": zero_ablate(axis_mask(axes, {"head_index": cfg.n_heads},
                                                             head_index=hs))
            for l, hs in by_layer.items()}
