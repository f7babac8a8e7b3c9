"""ActivationCache: a pytree of activations with TransformerLens's indexing and analysis methods.

    logits, cache = model.run_with_cache(tokens)
    cache["resid_post", 5]; cache["pattern", 3]; cache["z", -1]; cache["blocks.0.attn.hook_q"]
    resid_stack, labels = cache.decompose_resid(return_labels=True)
    dla = cache.logit_attrs(cache.apply_ln_to_stack(resid_stack, layer=-1, pos_slice=-1), tokens=answer)

It passes through jit and vmap (the activations and the weights it needs are its leaves; names and the config are
static). Methods that need weights (`stack_head_results`, `logit_attrs`) read them from the params it holds.
"""

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxlens import hook_names
from jaxlens.config import Config
from jaxlens.errors import InputError
from jaxlens.model.hooks import Hooks
from jaxlens.model.norms import norm
from jaxlens.shapes import Params

PosSlice = int | Sequence[int] | tuple | slice | None


@jax.tree_util.register_pytree_node_class
class ActivationCache:
    """Activations by hook name, TL-style. Args: cache_dict, cfg, params (optional), has_batch_dim."""

    def __init__(self, cache_dict: dict[str, Array], cfg: Config, params: Params | None = None,
                 has_batch_dim: bool = True):
        self.cache_dict, self.cfg, self.params, self.has_batch_dim = dict(cache_dict), cfg, params, has_batch_dim

    # -- pytree ----------------------------------------------------------------------------------------------
    def tree_flatten(self):
        keys = tuple(self.cache_dict)
        return (tuple(self.cache_dict[k] for k in keys), self.params), (keys, self.cfg, self.has_batch_dim)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, cfg, has_batch_dim = aux
        values, params = children
        return cls(dict(zip(keys, values)), cfg, params, has_batch_dim)

    # -- mapping ---------------------------------------------------------------------------------------------
    def __getitem__(self, key) -> Array:
        """`cache["blocks.0.hook_resid_pre"]`, `cache["resid_pre", 0]`, `cache["scale", 2, "ln1"]`, negative layers."""
        if isinstance(key, tuple):
            name, layer, *rest = key
            if isinstance(layer, int) and layer < 0:
                layer += self.cfg.n_layers
            key = hook_names.get_act_name(name, layer, *rest)
        elif not ("." in key or key.startswith("hook_")):
            key = hook_names.get_act_name(key)
        if key not in self.cache_dict:
            hook_names.parse(self.cfg, key.removesuffix("_grad"))  # unknown name: UnknownHookError
            raise KeyError(
                f"{key!r} is a hook point but was not cached. Cache it with run_with_cache(names_filter=...) "
                f"or cache_names=...; cached names include {list(self.cache_dict)[:5]}..."
            )
        return self.cache_dict[key]

    def __contains__(self, key) -> bool:
        return key in self.cache_dict

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def remove_batch_dim(self) -> "ActivationCache":
        """The cache with the batch axis (of size 1) removed from every activation.

        Raises:
            InputError: the batch has more than one prompt.
        """
        if not self.has_batch_dim:
            return self
        sizes = {v.shape[0] for v in self.cache_dict.values()}
        if sizes - {1}:
            raise InputError(f"remove_batch_dim needs a batch of 1; found batch sizes {sorted(sizes)}.")
        return ActivationCache({k: v[0] for k, v in self.cache_dict.items()}, self.cfg, self.params, False)

    def stack_activation(self, name: str) -> Array:
        """One activation of every layer stacked on a leading `layer` axis (e.g. "resid_pre", "z")."""
        return jnp.stack([self[name, l] for l in range(self.cfg.n_layers)])

    # -- residual stream -------------------------------------------------------------------------------------
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: PosSlice = None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream at the start of each layer up to `layer` (all, plus the final one, if None).

        Returns [component batch pos d_model] (and labels "0_pre", "0_mid", ..., "final_post").
        """
        n = self.cfg.n_layers
        if layer is None or layer == -1:
            layer = n
        comps, labels = [], []
        for l in range(layer + 1):
            if l == n:
                comps.append(self["resid_post", n - 1])
                labels.append("final_post")
                continue
            comps.append(self["resid_pre", l])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                comps.append(self["resid_mid", l])
                labels.append(f"{l}_mid")
        stack = jnp.stack([_pos(c, pos_slice) for c in comps])
        if apply_ln:  # at the final layer each component gets its own norm statistics: the logit lens (TL 3.x)
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           has_batch_dim=self.has_batch_dim, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: PosSlice = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream entering `layer` split into embeddings and each layer's attn_out and mlp_out.

        The components sum to the residual stream. mode: "all", "attn" or "mlp".
        """
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode must be 'all', 'attn' or 'mlp'; found {mode!r}.")
        if layer is None or layer == -1:
            layer = self.cfg.n_layers
        comps, labels = [], []
        if incl_embeds:
            comps.append(self["hook_embed"])
            labels.append("embed")
            if "hook_pos_embed" in self.cache_dict:
                comps.append(self["hook_pos_embed"])
                labels.append("pos_embed")
        for l in range(layer):
            if mode != "mlp":
                comps.append(self["attn_out", l])
                labels.append(f"{l}_attn_out")
            if mode != "attn":
                comps.append(self["mlp_out", l])
                labels.append(f"{l}_mlp_out")
        if mlp_input and mode != "mlp":
            comps.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        stack = jnp.stack([_pos(c, pos_slice) for c in comps])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: PosSlice = None, apply_ln: bool = False):
        """Each head's output (z @ W_O, without b_O) for the layers before `layer`: [layer*head batch pos d_model],
        labels "L{l}H{h}". With incl_remainder, adds the residual stream minus the heads' sum."""
        n = self.cfg.n_layers
        if layer is None or layer == -1:
            layer = n
        comps, labels = [], []
        for l in range(layer):
            key = f"blocks.{l}.attn.hook_result"
            if key in self.cache_dict:
                res = self.cache_dict[key]
            else:
                res = jnp.einsum("...phe,hed->...phd", self["z", l], self._weights()["attn"]["W_O"][l])
            comps += [_pos(res[..., h, :], pos_slice) for h in range(self.cfg.n_heads)]
            labels += [f"L{l}H{h}" for h in range(self.cfg.n_heads)]
        stack = jnp.stack(comps) if comps else jnp.zeros((0,))
        if incl_remainder:
            resid = _pos(self["resid_post", layer - 1] if layer == n else self["resid_pre", layer], pos_slice)
            stack = jnp.concatenate([stack, (resid - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack: Float[Array, "... d_model"], layer: int | None = None,
                          mlp_input: bool = False, pos_slice: PosSlice = None,
                          batch_slice: PosSlice = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> Array:
        """Divide each component by the cached norm scale of the final residual (layer None / -1 / n_layers) or
        of ln1 (ln2 with mlp_input) at `layer`, centring first for LayerNorm: the linear part of the norm.
        Weights are not applied (fold them with `fold_ln` first, as TL assumes).

        With recompute_ln and the final layer, each component instead goes through ln_final with statistics of
        its own (and ln_final's weights, if not folded): the logit lens."""
        kind = self.cfg.normalization_type
        if kind is None:
            return residual_stack
        final = layer is None or layer == -1 or layer == self.cfg.n_layers
        if has_batch_dim and batch_slice is not None:
            residual_stack = _pos(residual_stack, batch_slice, axis=1)
        if recompute_ln and final:
            return norm(self._weights(top=True).get("ln_final", {}), residual_stack, self.cfg, Hooks(), "ln_final")
        if kind in ("LN", "LNPre"):
            residual_stack = residual_stack - residual_stack.mean(-1, keepdims=True)
        if final:
            scale = self["ln_final.hook_scale"]
        else:
            scale = self[f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"]
        scale = _pos(scale, pos_slice)
        if has_batch_dim and batch_slice is not None:
            scale = _pos(scale, batch_slice, axis=0)
        return residual_stack / scale

    def logit_attrs(self, residual_stack: Float[Array, "... d_model"], tokens: int | Int[Array, "..."],
                    incorrect_tokens: int | Int[Array, "..."] | None = None, pos_slice: PosSlice = None,
                    batch_slice: PosSlice = None, has_batch_dim: bool = True) -> Array:
        """Each component's direct contribution to the logit of `tokens` (minus `incorrect_tokens`).

        residual_stack is [component ... d_model], normally from `decompose_resid`/`stack_head_results` with
        pos_slice reducing the position axis; it is passed through `apply_ln_to_stack` (final norm) first.
        tokens: an id, or one id per batch entry (per batch and position).
        """
        W_U = self._weights(top=True)["unembed"]["W_U"]
        dirs = W_U[:, jnp.asarray(tokens)].T if jnp.ndim(tokens) else W_U[:, tokens]
        if incorrect_tokens is not None:
            bad = W_U[:, jnp.asarray(incorrect_tokens)].T if jnp.ndim(incorrect_tokens) else W_U[:, incorrect_tokens]
            dirs = dirs - bad
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        target = scaled.shape[1:]
        if dirs.ndim > 1 and dirs.ndim < len(target):  # [batch d_model] against [batch pos d_model]
            dirs = dirs.reshape(dirs.shape[:1] + (1,) * (len(target) - dirs.ndim) + dirs.shape[1:])
        dirs = dirs.reshape((1,) * (scaled.ndim - dirs.ndim) + dirs.shape)
        return (scaled * dirs).sum(-1)

    def _weights(self, top: bool = False) -> Params:
        if self.params is None:
            raise InputError("This cache holds no weights; build it with ActivationCache(..., params=params).")
        return self.params if top else self.params["blocks"]


def _pos(x: Array, pos_slice: PosSlice, axis: int | None = None) -> Array:
    """TL's Slice on the position axis (-2 for [.. pos d], given explicitly otherwise): int drops the axis."""
    if pos_slice is None:
        return x
    if axis is None:
        axis = x.ndim - 2 if x.ndim >= 2 else 0
    if isinstance(pos_slice, int):
        return jnp.take(x, pos_slice, axis=axis)
    if isinstance(pos_slice, tuple):
        pos_slice = slice(*pos_slice)
    if isinstance(pos_slice, slice):
        idx = [slice(None)] * x.ndim
        idx[axis] = pos_slice
        return x[tuple(idx)]
    return jnp.take(x, jnp.asarray(pos_slice), axis=axis)
