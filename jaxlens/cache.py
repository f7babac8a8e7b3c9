"""ActivationCache: a pytree of activations with TransformerLens's indexing and analysis methods.

    logits, cache = model.run_with_cache(tokens)
    cache["resid_post", 5]; cache["pattern", 3]; cache["z", -1]; cache["blocks.0.attn.hook_q"]
    resid_stack, labels = cache.decompose_resid(return_labels=True)
    dla = cache.logit_attrs(cache.apply_ln_to_stack(resid_stack, layer=-1, pos_slice=-1), tokens=answer)

Block activations are held stacked over layers (one array per hook, as the scanned forward produces them) and
sliced on access, so a run that caches every layer has one output per hook and compiles in a time flat in
depth. Keys iterate in forward order, as TransformerLens's do. The cache passes through jit and vmap (the
activations and the weights it needs are its leaves; names and the config are static). Methods that need
weights (`stack_head_results`, `logit_attrs`, ...) read them from the params it holds
(`jaxlens.cache_analysis`).
"""

from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array

from jaxlens import hook_names
from jaxlens.cache_analysis import CacheAnalysis, PosSlice, slice_axis
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.shapes import Params

Stacks = Mapping[str, tuple[tuple[int, ...], Array]]


@jax.tree_util.register_pytree_node_class
class ActivationCache(CacheAnalysis):
    """Activations by hook name, TL-style.

    Args:
        cache_dict: {hook name: activation} (global names, per-layer names `blocks.3.x`, stacked `blocks.x`).
        cfg: the model's config.
        params: the weights analysis methods need (optional).
        has_batch_dim: whether activations have a leading batch axis.
        stacks: {relative block name (`attn.hook_z`, `attn.hook_z_grad`): (layers, [len(layers), ...])}: block
            activations held stacked, exposed as `blocks.<layer>.<name>`.
    """

    def __init__(self, cache_dict: Mapping[str, Array], cfg: Config, params: Params | None = None,
                 has_batch_dim: bool = True, *, stacks: Stacks | None = None):
        self.cfg, self.params, self.has_batch_dim = cfg, params, has_batch_dim
        self._set(dict(cache_dict), dict(stacks or {}))

    def _set(self, flat: dict[str, Array], stacks: dict[str, tuple[tuple[int, ...], Array]]) -> None:
        self._flat, self._stacks, self._sliced = flat, stacks, {}
        self._where = {f"blocks.{l}.{rel}": (rel, i) for rel, (layers, _) in stacks.items()
                       for i, l in enumerate(layers)}
        self._keys = sorted([*flat, *self._where], key=self.hook_table().sort_key)

    def hook_table(self) -> hook_names.HookTable:
        """The hook table the names belong to (the decoder's)."""
        return hook_names.decoder_table(self.cfg)

    # -- pytree ----------------------------------------------------------------------------------------------
    def tree_flatten(self) -> tuple[tuple, tuple]:
        flat_keys, rels = tuple(self._flat), tuple(self._stacks)
        layers = tuple(self._stacks[r][0] for r in rels)
        children = (tuple(self._flat[k] for k in flat_keys), tuple(self._stacks[r][1] for r in rels),
                    self.params)
        return children, (flat_keys, rels, layers, self.cfg, self.has_batch_dim)

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: tuple) -> "ActivationCache":
        flat_keys, rels, layers, cfg, has_batch_dim = aux
        flat, stacked, params = children
        stacks = {r: (ls, a) for r, ls, a in zip(rels, layers, stacked, strict=True)}
        return cls(dict(zip(flat_keys, flat, strict=True)), cfg, params, has_batch_dim, stacks=stacks)

    # -- mapping ---------------------------------------------------------------------------------------------
    def __getitem__(self, key) -> Array:
        """`cache["blocks.0.hook_resid_pre"]`, `cache["resid_pre", 0]`, `cache["scale", 2, "ln1"]`, negative
        layers; `cache["blocks.hook_resid_pre"]` gives the stack over every cached layer."""
        name = self._name(key)
        if name in self._flat:
            return self._flat[name]
        if name in self._where:
            if name not in self._sliced:
                rel, i = self._where[name]
                self._sliced[name] = self._stacks[rel][1][i]
            return self._sliced[name]
        if self._whole_stack(name):
            return self._stacks[name.removeprefix("blocks.")][1]
        self.hook_table().parse(name.removesuffix("_grad"))  # unknown name: UnknownHookError
        raise KeyError(
            f"{name!r} is a hook point but was not cached. Cache it with run_with_cache(names_filter=...) "
            f"or cache_names=...; cached names include {self._keys[:5]}..."
        )

    def _name(self, key) -> str:
        if isinstance(key, tuple):
            name, layer, *rest = key
            if isinstance(layer, int) and layer < 0:
                layer += self.cfg.n_layers
            return hook_names.get_act_name(name, layer, *rest)
        if not ("." in key or key.startswith("hook_")):
            return hook_names.get_act_name(key)
        return key

    def _whole_stack(self, name: str) -> bool:
        """`blocks.<rel>` names a held stack that covers every layer."""
        held = self._stacks.get(name.removeprefix("blocks.")) if name.startswith("blocks.") else None
        return held is not None and held[0] == tuple(range(self.cfg.n_layers))

    def __contains__(self, key) -> bool:
        return key in self._flat or key in self._where or self._whole_stack(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        """Cached names in forward order (as TransformerLens lists them)."""
        return list(self._keys)

    def values(self) -> list[Array]:
        return [self[k] for k in self._keys]

    def items(self) -> list[tuple[str, Array]]:
        return [(k, self[k]) for k in self._keys]

    @property
    def cache_dict(self) -> dict[str, Array]:
        """{name: activation} for every cached name, in forward order
        (TL's attribute; a new dict each time)."""
        return dict(self.items())

    def __repr__(self) -> str:
        return f"ActivationCache with keys {self._keys}"

    def __treescope_repr__(self, path, subtree_renderer):
        """treescope: each activation with its hook's axis names (`jaxlens.treescope_view`)."""
        from jaxlens.treescope_view import cache_repr

        return cache_repr(self, path, subtree_renderer)

    # -- batch -----------------------------------------------------------------------------------------------
    def batch_size(self) -> int:
        """The batch size (the leading axis of the activations; stacks carry the layer axis first)."""
        sizes = {v.shape[0] for v in self._flat.values() if jnp.ndim(v)} | {
            a.shape[1] for _, a in self._stacks.values() if jnp.ndim(a) > 1}
        if len(sizes) > 1:
            raise InputError(f"The cached activations disagree on the batch size: {sorted(sizes)}.")
        return sizes.pop() if sizes else 1

    def remove_batch_dim(self, batch_size: int | None = None) -> "ActivationCache":
        """Remove the batch axis (of size 1) from every activation, in place as TransformerLens does; returns
        the cache itself (so both `cache.remove_batch_dim()` and `cache = cache.remove_batch_dim()` work).

        Raises:
            InputError: the batch has more than one prompt.
        """
        if not self.has_batch_dim:
            return self
        size = self.batch_size() if batch_size is None else batch_size
        if size != 1:
            raise InputError(f"remove_batch_dim needs a batch of 1; found batch size {size}. Select one "
                             "prompt first with cache.apply_slice_to_batch_dim(i).")
        self._set({k: v[0] for k, v in self._flat.items()},
                  {r: (ls, a[:, 0]) for r, (ls, a) in self._stacks.items()})
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: PosSlice) -> "ActivationCache":
        """A new cache with TL's Slice applied to the batch axis (an int removes the axis).

        Raises:
            InputError: the cache has no batch axis.
        """
        if not self.has_batch_dim:
            if batch_slice is None:
                return self
            raise InputError("This cache has no batch axis (remove_batch_dim was applied); nothing to slice.")
        flat = {k: slice_axis(v, batch_slice, 0) for k, v in self._flat.items()}
        stacks = {r: (ls, slice_axis(a, batch_slice, 1)) for r, (ls, a) in self._stacks.items()}
        return type(self)(flat, self.cfg, self.params, not isinstance(batch_slice, int), stacks=stacks)

    def slice_positions(self, pos_slice: PosSlice) -> "ActivationCache":
        """A new cache with TL's Slice applied to every activation's position axis (`pos`, or `query_pos` for
        patterns and scores; an int keeps a length-1 axis, as TL's run_with_cache does):
        `run_with_cache(pos_slice=)`."""
        table, lead = self.hook_table(), 0 if self.has_batch_dim else 1
        pos_slice = [pos_slice] if isinstance(pos_slice, int) else pos_slice

        def cut(name: str, x: Array, stacked: bool) -> Array:
            axes = table.axes(name.removesuffix("_grad")).split()
            pos = next((i for i, a in enumerate(axes) if a in ("pos", "query_pos")), None)
            return x if pos is None else slice_axis(x, pos_slice, pos - lead + int(stacked))

        flat = {k: cut(k, v, table.parse(k.removesuffix("_grad"))[0] == "all") for k, v in self._flat.items()}
        stacks = {r: (ls, cut(f"blocks.{r}", a, True)) for r, (ls, a) in self._stacks.items()}
        return type(self)(flat, self.cfg, self.params, self.has_batch_dim, stacks=stacks)

    def to(self, device: jax.Device | jax.sharding.Sharding) -> "ActivationCache":
        """The cache with every activation placed on `device` (a jax Device or Sharding)."""
        return jax.device_put(self, device)
