"""ActivationCache's analysis methods, as TransformerLens 4.3 has them: residual-stream decompositions,
per-head and per-neuron results, and the linear part of the norms.

Mixed into `jaxlens.cache.ActivationCache`, which supplies indexing (`self["resid_pre", 3]`), `cfg`, `params`
and `has_batch_dim`. Stacks have the component axis first: [component *batch pos d_model].
"""

from collections.abc import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxlens.errors import InputError
from jaxlens.model.hooks import Hooks
from jaxlens.model.norms import norm
from jaxlens.shapes import AnyArray, Params

# einsum letters: p=pos h=head_index e=d_head d=d_model m=d_mlp o=output direction

#: A stack of residual-stream components, or (stack, labels) with return_labels.
Stack = (Float[Array, "component *batch_pos d_model"]
         | tuple[Float[Array, "component *batch_pos d_model"], list[str]])

PosSlice = int | Sequence[int] | tuple | slice | None


def slice_axis(x: Array, s: PosSlice, axis: int) -> Array:
    """TransformerLens's `Slice` applied to one axis: None keeps it, an int removes it, a tuple is slice(*t),
    a slice slices, a sequence of ints gathers."""
    if s is None:
        return x
    if isinstance(s, int):
        return jnp.take(x, s, axis=axis)
    if isinstance(s, tuple):
        s = slice(*s)
    if isinstance(s, slice):
        idx = [slice(None)] * x.ndim
        idx[axis] = s
        return x[tuple(idx)]
    return jnp.take(x, jnp.asarray(s), axis=axis)


def pos_slice_of(x: Array, pos_slice: PosSlice) -> Array:
    """`slice_axis` on the position axis of a [... pos d] activation."""
    return slice_axis(x, pos_slice, x.ndim - 2 if x.ndim >= 2 else 0)


def accumulated_bias(params: Params, layer: int, mlp_input: bool = False,
                     include_mlp_biases: bool = True) -> Float[Array, " d_model"]:
    """The sum of the attention (b_O) and MLP (b_out) output biases of the layers before `layer` (with
    `mlp_input`, layer `layer`'s b_O too): what the biases contribute to the residual stream there (TL's
    `accumulated_bias`)."""
    blocks = params["blocks"]
    d_model = blocks["attn"]["b_O"].shape[-1]
    total = jnp.zeros((d_model,), blocks["attn"]["b_O"].dtype)
    for l in range(layer):
        total = total + blocks["attn"]["b_O"][l]
        if include_mlp_biases:
            total = total + blocks["mlp"]["b_out"][l]
    if mlp_input:
        total = total + blocks["attn"]["b_O"][layer]
    return total


class CacheAnalysis:
    """TransformerLens's ActivationCache analysis methods over `self[...]`, `self.cfg` and `self.params`."""

    def _final_layer(self, layer: int | None) -> int:
        return self.cfg.n_layers if layer is None or layer == -1 else layer

    def _weights(self, top: bool = False) -> Params:
        if self.params is None:
            raise InputError("This cache holds no weights; "
                             "build it with ActivationCache(..., params=params).")
        return self.params if top else self.params["blocks"]

    def _empty(self, pos_slice: PosSlice, width: int | None = None) -> Array:
        src = pos_slice_of(self["hook_embed"], pos_slice)
        shape = src.shape if width is None else src.shape[:-1] + (width,)
        return jnp.zeros((0, *shape), src.dtype)

    def stack_activation(self, activation_name: str, layer: int = -1,
                         sublayer_type: str | None = None) -> Array:
        """One activation of every layer before `layer` (all if -1 / None) stacked on a leading axis
        ("resid_pre", "z", ("scale", sublayer_type="ln1"), ...)."""
        layer = self._final_layer(layer)
        return jnp.stack([self[activation_name, l, sublayer_type] if sublayer_type
                          else self[activation_name, l] for l in range(layer)])

    # -- residual stream -------------------------------------------------------------------------------------
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: PosSlice = None, mlp_input: bool = False,
                          return_labels: bool = False) -> Stack:
        """The residual stream at the start of each layer up to `layer` (all, plus the final one, if None).

        Returns [component batch pos d_model] (and labels "0_pre", "0_mid", ..., "final_post").
        """
        n = self.cfg.n_layers
        layer = self._final_layer(layer)
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
        stack = jnp.stack([pos_slice_of(c, pos_slice) for c in comps])
        # at the final layer each component gets its own norm statistics: the logit lens (TL 3.x)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           has_batch_dim=self.has_batch_dim, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: PosSlice = None, incl_embeds: bool = True,
                        return_labels: bool = False) -> Stack:
        """The residual stream entering `layer` split into embeddings and each layer's attn_out and mlp_out.

        The components sum to the residual stream (less the biases folded into them). mode: "all", "attn" or
        "mlp".
        """
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode must be 'all', 'attn' or 'mlp'; found {mode!r}.")
        layer = self._final_layer(layer)
        comps, labels = [], []
        if incl_embeds:
            comps.append(self["hook_embed"])
            labels.append("embed")
            if "hook_pos_embed" in self:
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
        stack = jnp.stack([pos_slice_of(c, pos_slice) for c in comps]) if comps else self._empty(pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # -- heads -----------------------------------------------------------------------------------------------
    def head_results(self, layer: int) -> Float[Array, "*batch pos head_index d_model"]:
        """Each head's output z @ W_O (without b_O) at `layer`: the cached `attn.hook_result`, else
        computed."""
        key = f"blocks.{layer}.attn.hook_result"
        if key in self:
            return self[key]
        return jnp.einsum("...phe,hed->...phd", self["z", layer], self._weights()["attn"]["W_O"][layer])

    def compute_head_results(self) -> None:
        """TL's `compute_head_results`: jaxlens computes per-head results on demand (`head_results`), so
        there is nothing to add; kept so TL code runs unchanged."""

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: PosSlice = None, apply_ln: bool = False) -> Stack:
        """Each head's output for the layers before `layer`: [layer*head *batch pos d_model], labels
        "L{l}H{h}". With incl_remainder, adds the residual stream (resid_post of layer - 1, TL's convention:
        the final one for layer 0) minus the heads' sum."""
        layer = self._final_layer(layer)
        comps, labels = [], []
        for l in range(layer):
            res = self.head_results(l)  # [... pos head d_model]
            res = slice_axis(res, pos_slice, res.ndim - 3)
            comps += [res[..., h, :] for h in range(self.cfg.n_heads)]
            labels += [f"L{l}H{h}" for h in range(self.cfg.n_heads)]
        stack = jnp.stack(comps) if comps else self._empty(pos_slice)
        if incl_remainder:
            resid = pos_slice_of(self["resid_post", (layer - 1) % self.cfg.n_layers], pos_slice)
            stack = jnp.concatenate([stack, (resid - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # -- neurons ---------------------------------------------------------------------------------------------
    def get_neuron_results(self, layer: int, neuron_slice: PosSlice = None, pos_slice: PosSlice = None,
                           project_output_onto: AnyArray | None = None) -> Array:
        """Each neuron's contribution to the residual stream at `layer`: post[..., n] * W_out[n]
        ([*batch pos neuron d_model]; with `project_output_onto` [d_model] or [d_model n_out], projected
        before the expansion: [... neuron] or [... neuron n_out])."""
        acts = pos_slice_of(self["post", layer], pos_slice)
        W_out = self._weights()["mlp"]["W_out"][layer]
        if neuron_slice is not None:
            neuron_slice = [neuron_slice] if isinstance(neuron_slice, int) else neuron_slice
            acts, W_out = slice_axis(acts, neuron_slice, acts.ndim - 1), slice_axis(W_out, neuron_slice, 0)
        if project_output_onto is None:
            return acts[..., None] * W_out
        projected = W_out @ jnp.asarray(project_output_onto)
        return acts * projected if projected.ndim == 1 else acts[..., None] * projected

    def stack_neuron_results(self, layer: int, pos_slice: PosSlice = None, neuron_slice: PosSlice = None,
                             return_labels: bool = False, incl_remainder: bool = False,
                             apply_ln: bool = False, project_output_onto: AnyArray | None = None,
                             mlp_input: bool = False) -> Stack:
        """Every neuron's result for the layers before `layer`: [layer*neuron *batch pos d_model], labels
        "L{l}N{n}". With incl_remainder, adds the residual stream (resid_mid of `layer` with mlp_input, else
        resid_post of layer - 1) minus their sum. `project_output_onto` as in `get_neuron_results`."""
        layer = self._final_layer(layer)
        sel = [neuron_slice] if isinstance(neuron_slice, int) else neuron_slice
        neurons = [int(n) for n in slice_axis(jnp.arange(self.cfg.d_mlp), sel, 0)]
        labels = [f"L{l}N{n}" for l in range(layer) for n in neurons]
        proj = None if project_output_onto is None else jnp.asarray(project_output_onto)
        proj2 = None if proj is None else (proj[:, None] if proj.ndim == 1 else proj)
        width = None if proj2 is None else proj2.shape[-1]
        per = [self.get_neuron_results(l, list(neurons), pos_slice, proj2) for l in range(layer)]
        stack = (jnp.moveaxis(jnp.concatenate(per, axis=-2), -2, 0) if per else self._empty(pos_slice, width))
        # the norm's linear part commutes with the projection only per vector
        if apply_ln and proj2 is not None:
            raise InputError("stack_neuron_results(apply_ln=True, project_output_onto=...) is not supported: "
                             "apply_ln_to_stack the unprojected stack, then project.")
        if incl_remainder:
            target = (self["resid_mid", layer] if mlp_input
                      else self["resid_post", (layer - 1) % self.cfg.n_layers])
            target = pos_slice_of(target, pos_slice)
            target = target if proj2 is None else target @ proj2
            stack = jnp.concatenate([stack, (target - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        if proj is not None and proj.ndim == 1:
            stack = stack[..., 0]
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: PosSlice = None, return_labels: bool = False) -> Stack:
        """The residual stream entering `layer` as every head's result, every neuron's (or MLP layer's)
        result, the embeddings and the accumulated biases, in TransformerLens's order; they sum to the
        residual stream."""
        layer = self._final_layer(layer)
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice,
                                                return_labels=True)
        comps = [heads]
        if layer > 0:
            if expand_neurons:
                neurons, more = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            else:
                neurons, more = self.decompose_resid(layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                                     incl_embeds=False, mode="mlp", return_labels=True)
            comps.append(neurons)
            labels = labels + more
        for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if name in self:
                comps.append(pos_slice_of(self[name], pos_slice)[None])
                labels.append(label)
        bias = accumulated_bias(self._weights(top=True), layer, mlp_input, include_mlp_biases=expand_neurons)
        comps.append(jnp.broadcast_to(bias, heads.shape[1:])[None])
        labels.append("bias")
        stack = jnp.concatenate(comps)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # -- norms and logits ------------------------------------------------------------------------------------
    def apply_ln_to_stack(self, residual_stack: Float[Array, "... d_model"], layer: int | None = None,
                          mlp_input: bool = False, pos_slice: PosSlice = None,
                          batch_slice: PosSlice = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> Array:
        """Divide each component by the cached norm scale of the final residual (layer None / -1 / n_layers)
        or of ln1 (ln2 with mlp_input) at `layer`, centring first for LayerNorm: the linear part of the norm.
        Weights are not applied (fold them with `fold_ln` first, as TL assumes).

        With recompute_ln and the final layer, each component instead goes through ln_final with statistics of
        its own (and ln_final's weights, if not folded): the logit lens."""
        kind = self.cfg.normalization_type
        final = layer is None or layer == -1 or layer == self.cfg.n_layers
        if has_batch_dim and batch_slice is not None:
            residual_stack = slice_axis(residual_stack, batch_slice, 1)
        if kind is None:
            return residual_stack
        if recompute_ln and final:
            return norm(self._weights(top=True).get("ln_final", {}), residual_stack, self.cfg, Hooks(),
                        "ln_final")
        if kind in ("LN", "LNPre"):
            residual_stack = residual_stack - residual_stack.mean(-1, keepdims=True)
        if final:
            scale = self["ln_final.hook_scale"]
        else:
            scale = self[f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"]
        scale = pos_slice_of(scale, pos_slice)
        if has_batch_dim and batch_slice is not None:
            scale = slice_axis(scale, batch_slice, 0)
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
        dirs = jnp.moveaxis(W_U[:, jnp.asarray(tokens)], 0, -1)
        if incorrect_tokens is not None:
            dirs = dirs - jnp.moveaxis(W_U[:, jnp.asarray(incorrect_tokens)], 0, -1)
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        target = scaled.shape[1:]
        if dirs.ndim > 1 and dirs.ndim < len(target):  # [batch d_model] against [batch pos d_model]
            dirs = dirs.reshape(dirs.shape[:1] + (1,) * (len(target) - dirs.ndim) + dirs.shape[1:])
        dirs = dirs.reshape((1,) * (scaled.ndim - dirs.ndim) + dirs.shape)
        return (scaled * dirs).sum(-1)
