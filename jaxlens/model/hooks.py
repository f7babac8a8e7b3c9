"""The single hook primitive: identity, plus an optional intervention and an optional recording.

Names at call sites are TransformerLens's names relative to the block (`"attn.hook_z"`). A hook point that no
one caches or intervenes on is the identity and costs nothing; `Hooks.wants(name)` lets optional hook points
(`attn.hook_result`, `hook_q_input`) take their expensive path only when someone asks.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxlens.interventions import HookPoint


class Hooks:
    """Hook points of one block (or of the model outside the blocks).

    Args:
        prefix: prepended to relative names for messages and `hook.name` ("blocks.{layer}." or "").
        layer: the layer index (a Python int, a traced scalar under scan, or None outside the blocks).
        here: relative name -> interventions applied at every call (already sliced to this layer).
        at_layer: relative name -> [(layer, intervention)] applied only where `layer` equals the given layer
            (at every layer for None).
        names_to_cache: relative names to record.
        carry: state threaded through the blocks (`runner.run_blocks_carried`): an intervention with a true
            `uses_carry` attribute is called as `iv(x, hook, carry) -> (x, carry)`.
    """

    def __init__(self, *, prefix: str = "", layer=None, here: Mapping | None = None,
                 at_layer: Mapping | None = None, names_to_cache=frozenset(), carry=None):
        self.prefix, self.layer = prefix, layer
        self.here, self.at_layer = here or {}, at_layer or {}
        self.names_to_cache = names_to_cache
        self.cache: dict[str, jax.Array] = {}
        self.carry = carry

    def wants(self, name: str) -> bool:
        """Someone caches or intervenes on `name`."""
        return self.intervenes(name) or name in self.names_to_cache

    def intervenes(self, name: str) -> bool:
        """An intervention applies at `name` (in some layer)."""
        return name in self.here or name in self.at_layer

    def __call__(self, name: str, x: jax.Array) -> jax.Array:
        for iv in self.here.get(name, ()):
            x = self._apply(iv, x, HookPoint(self._full(name, self.layer), self.layer))
        for layer, iv in self.at_layer.get(name, ()):
            if layer is None:  # every layer
                x = self._apply(iv, x, HookPoint(self._full(name, self.layer), self.layer))
                continue
            hook = HookPoint(self._full(name, layer), layer)
            if isinstance(self.layer, int):
                if self.layer == layer:
                    x = self._apply(iv, x, hook)
            else:
                x = self._apply(iv, x, hook, on=self.layer == layer)
        if name in self.names_to_cache:
            self.cache[name] = x
        return x

    def _apply(self, iv, x: jax.Array, hook: HookPoint, on=None) -> jax.Array:
        """`iv` at `x` (reading and updating the carry if it uses one); where `on` is False, x and the carry
        stay as they were. A traced `on` (the layer index of a scan) runs `iv` under `lax.cond`, so an
        intervention addressed to one layer costs that layer only (a vmapped `on` makes it a select)."""
        def call(x, carry):
            return iv(x, hook, carry) if getattr(iv, "uses_carry", False) else (iv(x, hook), carry)

        if on is None:
            y, self.carry = call(x, self.carry)
            return y

        def chosen(x, carry):  # both branches of a cond return the same shapes and dtypes
            y, carry = call(x, carry)
            return jnp.broadcast_to(y, x.shape).astype(x.dtype), carry

        y, self.carry = jax.lax.cond(on, chosen, lambda x, carry: (x, carry), x, self.carry)
        return y

    def _full(self, name: str, layer) -> str:
        if self.prefix == "":
            return name
        return f"blocks.{layer}.{name}" if isinstance(layer, int) else f"blocks.{name}"
