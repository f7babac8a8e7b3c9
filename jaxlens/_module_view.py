"""TransformerLens's weight attributes over the stacked params: the stacked properties (`model.W_Q`, ...), a
read-only module view (`model.blocks[3].attn.W_O`, `model.blocks[3].ln1(x)`, `model.embed(tokens)`,
`model.unembed(x)`, `model.ln_final(x)`) and `accumulated_bias`.

    model.blocks[3].attn.W_O                  # [head_index d_head d_model], TL's blocks.3.attn.W_O
    model.blocks[3].ln1(resid)                # that block's first norm applied to [... d_model]
    model.unembed(model.ln_final(resid))      # logits, as TL's modules compute them
    model.accumulated_bias(3, mlp_input=True)  # [d_model]: the biases written into the residual stream so far

A view holds the model, not the weights: each attribute reads `model.params` when asked (a slice of the
stacked array), so it follows a functional update `model.params = new_params`. Views are read-only: assigning
raises `ReadOnlyError` (edit the params pytree functionally and build a new model). A weight the model does
not have raises `MissingWeightError`, an AttributeError, so `hasattr(model, "W_pos")` is False on a rotary
model, as in TransformerLens; `W_gate` is None on a model without a gated MLP, as TL returns.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxlens.errors import InputAssertionError, InputError, InputIndexError, MissingWeightError, ReadOnlyError
from jaxlens.model.hooks import Hooks
from jaxlens.model.norms import norm, norm_kind

_KV = frozenset({"W_K", "W_V", "b_K", "b_V"})  # stored at n_key_value_heads; TL's W_K repeats them to n_heads


def weight(*path: str, doc: str = "") -> property:
    """A property reading params[path[0]][path[1]]...; MissingWeightError if the model has no such weight."""
    def get(self):
        return _read(self, path, None)
    return property(get, doc=doc or f"params[{']['.join(map(repr, path))}] (TransformerLens's shape)")


class WeightMethods:
    """Mixin for `HookedTransformer`: TL's weight properties, module views and accumulated_bias."""

    W_E = weight("embed", "W_E", doc="Token embedding [d_vocab d_model].")
    W_pos = weight("pos_embed", "W_pos", doc="Learned positions [n_ctx d_model] (not on rotary models).")
    W_U = weight("unembed", "W_U", doc="Unembedding [d_model d_vocab].")
    b_U = weight("unembed", "b_U", doc="Unembedding bias [d_vocab].")
    W_Q = weight("blocks", "attn", "W_Q", doc="[layer head_index d_model d_head].")
    W_K = weight("blocks", "attn", "W_K", doc="[layer head_index d_model d_head] (GQA: kv heads repeated).")
    W_V = weight("blocks", "attn", "W_V", doc="[layer head_index d_model d_head] (GQA: kv heads repeated).")
    W_O = weight("blocks", "attn", "W_O", doc="[layer head_index d_head d_model].")
    b_Q = weight("blocks", "attn", "b_Q", doc="[layer head_index d_head].")
    b_K = weight("blocks", "attn", "b_K", doc="[layer head_index d_head] (kv heads repeated under GQA).")
    b_V = weight("blocks", "attn", "b_V", doc="[layer head_index d_head] (kv heads repeated under GQA).")
    b_O = weight("blocks", "attn", "b_O", doc="[layer d_model].")
    W_in = weight("blocks", "mlp", "W_in", doc="[layer d_model d_mlp].")
    W_out = weight("blocks", "mlp", "W_out", doc="[layer d_mlp d_model].")
    b_in = weight("blocks", "mlp", "b_in", doc="[layer d_mlp].")
    b_out = weight("blocks", "mlp", "b_out", doc="[layer d_model].")

    @property
    def W_gate(self) -> Array | None:
        """Gate weights [layer d_model d_mlp] of a gated MLP; None without one (as TransformerLens)."""
        return _read(self, ("blocks", "mlp", "W_gate"), None) if self.cfg.gated_mlp else None

    @property
    def W_E_pos(self) -> Float[Array, "d_vocab_plus_n_ctx d_model"]:
        """[W_E; W_pos] stacked (TL's W_E_pos): a basis of the input space for full circuits."""
        return jnp.concatenate([self.W_E, self.W_pos], axis=0)

    @property
    def blocks(self) -> "BlocksView":
        """The blocks as TL's `model.blocks`: `model.blocks[3].attn.W_O`, `len(model.blocks)`, iteration."""
        return BlocksView(self)

    @property
    def embed(self) -> "EmbedView":
        """TL's `model.embed`: `.W_E`, and `model.embed(tokens)` -> [... d_model]."""
        return EmbedView(self)

    @property
    def pos_embed(self) -> "PosEmbedView":
        """TL's `model.pos_embed` (learned positions only): `.W_pos`, and `model.pos_embed(tokens)`."""
        if self.cfg.positional_embedding_type != "standard":
            raise MissingWeightError(_missing_reason(self, "pos_embed"))
        return PosEmbedView(self)

    @property
    def unembed(self) -> "UnembedView":
        """TL's `model.unembed`: `.W_U`, `.b_U`, and `model.unembed(x)` = x @ W_U + b_U."""
        return UnembedView(self)

    @property
    def ln_final(self) -> "NormView":
        """TL's `model.ln_final`: `model.ln_final(x)` applies the final norm; `.w`, `.b` where it has them."""
        return NormView(self, "ln_final", None)

    def accumulated_bias(self, layer: int, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> Float[Array, " d_model"]:
        """The sum of the output biases written into the residual stream before `layer` (TL's method).

        Args:
            layer: 0..n_layers; the biases of blocks 0..layer-1 are summed (0 gives zeros).
            mlp_input: also add block `layer`'s attention bias b_O (what reaches that block's MLP input).
            include_mlp_biases: include each block's MLP bias b_out (default) or only the attention biases.

        Returns:
            [d_model]. As in TransformerLens the biases are summed as written, so on models with norms after
            attention and MLP (Gemma 2's ln1_post, ln2_post) this is not what the residual stream receives.

        Raises:
            InputIndexError: layer outside [0, n_layers] (TL raises IndexError past the last block).
            InputAssertionError: mlp_input with layer == n_layers (TL asserts it).
        """
        n = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer <= n:
            raise InputIndexError(
                f"accumulated_bias: layer must be an int in [0, n_layers={n}]; found {layer!r}.")
        if mlp_input and layer == n:
            raise InputAssertionError(f"accumulated_bias(mlp_input=True) needs layer < n_layers={n}: there "
                                      "is no attention bias beyond the final layer.")
        from jaxlens.cache_analysis import accumulated_bias  # the one sum, shared with the cache's methods

        return accumulated_bias(self.params, int(layer), mlp_input, include_mlp_biases)


# -- the views ------------------------------------------------------------------------------------------

class _View:
    """Read-only: every attribute is computed from the model's current params."""

    def __init__(self, model, layer: int | None = None):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_layer", layer)

    def __setattr__(self, name, value):
        raise ReadOnlyError(
            f"Cannot set {name!r}: {type(self).__name__} is a read-only view of the params (an immutable "
            "pytree). Build new params and a new model instead, e.g. p = model.params; attn = "
            "{**p['blocks']['attn'], 'W_O': p['blocks']['attn']['W_O'].at[3].set(new)}; model = "
            "HookedTransformer(model.cfg, {**p, 'blocks': {**p['blocks'], 'attn': attn}}, model.tokenizer).")

    __delattr__ = __setattr__

    def _get(self, *path: str):
        return _read(self._model, path, self._layer)

    def __repr__(self) -> str:
        at = "" if self._layer is None else f" of block {self._layer}"
        return f"<jaxlens {type(self).__name__}{at} (read-only)>"


class BlocksView(_View):
    """`model.blocks`: index (negative too) or slice for BlockView(s), `len`, iteration."""

    def __len__(self) -> int:
        return self._model.cfg.n_layers

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            return [BlockView(self._model, l) for l in range(n)[i]]
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise InputIndexError(f"model.blocks has {n} blocks; index {i!r} is out of range.")
        return BlockView(self._model, int(i) % n)

    def __iter__(self):
        return (BlockView(self._model, l) for l in range(len(self)))


class BlockView(_View):
    """`model.blocks[l]`: `.attn`, `.mlp`, `.ln1`, `.ln2` (and Gemma 2's `.ln1_post`, `.ln2_post`)."""

    @property
    def layer(self) -> int:
        return self._layer

    @property
    def attn(self) -> "AttnView":
        return AttnView(self._model, self._layer)

    @property
    def mlp(self) -> "MLPView":
        return MLPView(self._model, self._layer)

    @property
    def ln1(self) -> "NormView":
        return NormView(self._model, "ln1", self._layer)

    @property
    def ln2(self) -> "NormView":
        return NormView(self._model, "ln2", self._layer)

    @property
    def ln1_post(self) -> "NormView":
        return self._post("ln1_post")

    @property
    def ln2_post(self) -> "NormView":
        return self._post("ln2_post")

    def _post(self, name: str) -> "NormView":
        if not self._model.cfg.use_normalization_before_and_after:
            raise MissingWeightError(f"This model has no {name}: it has no norms after attention and MLP "
                                     "(cfg.use_normalization_before_and_after is False).")
        return NormView(self._model, name, self._layer)


class AttnView(_View):
    """`model.blocks[l].attn`: W_Q, W_K, W_V [head_index d_model d_head], W_O [head_index d_head d_model],
    b_Q, b_K, b_V [head_index d_head], b_O [d_model]; under grouped-query attention W_K, W_V, b_K, b_V are
    repeated to n_heads and `_W_K`, `_W_V`, `_b_K`, `_b_V` are the stored kv heads (TL's names)."""

    W_Q = property(lambda self: self._get("blocks", "attn", "W_Q"))
    W_K = property(lambda self: self._get("blocks", "attn", "W_K"))
    W_V = property(lambda self: self._get("blocks", "attn", "W_V"))
    W_O = property(lambda self: self._get("blocks", "attn", "W_O"))
    b_Q = property(lambda self: self._get("blocks", "attn", "b_Q"))
    b_K = property(lambda self: self._get("blocks", "attn", "b_K"))
    b_V = property(lambda self: self._get("blocks", "attn", "b_V"))
    b_O = property(lambda self: self._get("blocks", "attn", "b_O"))
    _W_K = property(lambda self: self._model.params["blocks"]["attn"]["W_K"][self._layer])
    _W_V = property(lambda self: self._model.params["blocks"]["attn"]["W_V"][self._layer])
    _b_K = property(lambda self: self._model.params["blocks"]["attn"]["b_K"][self._layer])
    _b_V = property(lambda self: self._model.params["blocks"]["attn"]["b_V"][self._layer])

    @property
    def OV(self):
        """This layer's OV circuits, FactoredMatrix [head_index d_model d_model]."""
        return self._model.OV[self._layer]

    @property
    def QK(self):
        """This layer's QK circuits, FactoredMatrix [head_index d_model d_model]."""
        return self._model.QK[self._layer]


class MLPView(_View):
    """`model.blocks[l].mlp`: W_in, W_gate (None unless gated) [d_model d_mlp], W_out [d_mlp d_model], b_in,
    b_out."""

    W_in = property(lambda self: self._get("blocks", "mlp", "W_in"))
    W_out = property(lambda self: self._get("blocks", "mlp", "W_out"))
    b_in = property(lambda self: self._get("blocks", "mlp", "b_in"))
    b_out = property(lambda self: self._get("blocks", "mlp", "b_out"))
    W_gate = property(lambda self: self._get("blocks", "mlp", "W_gate") if self._model.cfg.gated_mlp
                      else None)


class NormView(_View):
    """A norm (`ln1`, `ln2`, `ln1_post`, `ln2_post` of a block, or `ln_final`): call it on [... d_model] to
    apply it as the model does (LNPre / RMSPre after fold_ln: no weights); `.w`, `.b` where it has them."""

    def __init__(self, model, name: str, layer: int | None):
        super().__init__(model, layer)
        object.__setattr__(self, "_name", name)

    def __call__(self, x: Float[Array | np.ndarray, "... d_model"]) -> Float[Array, "... d_model"]:
        x = jnp.asarray(x)
        d = self._model.cfg.d_model
        if x.ndim == 0 or x.shape[-1] != d:
            raise InputError(
                f"{self._name} normalises the last axis, of size d_model={d}; found shape {x.shape}.")
        return norm(self._params(), x, self._model.cfg, Hooks(), self._name)

    @property
    def w(self) -> Float[Array, " d_model"]:
        return self._weight("w")

    @property
    def b(self) -> Float[Array, " d_model"]:
        return self._weight("b")

    def _params(self) -> dict:
        params = self._model.params
        p = params.get(self._name, {}) if self._layer is None else params["blocks"].get(self._name, {})
        return p if self._layer is None else {k: v[self._layer] for k, v in p.items()}

    def _weight(self, k: str):
        p = self._params()
        if k not in p:
            kind = norm_kind(self._model.cfg, self._name)
            folded = ("fold_ln folded its weights into the next linear maps (load with "
                      "from_pretrained_no_processing or fold_ln=False to keep them)")
            why = (folded if kind in ("LNPre", "RMSPre")
                   else "RMSNorm has no bias" if kind == "RMS" else f"normalization_type is {kind!r}")
            raise MissingWeightError(f"{self._name}.{k} does not exist in this model: {why}.")
        return p[k]


class EmbedView(_View):
    """`model.embed`: `.W_E` [d_vocab d_model]; `model.embed(tokens)` -> W_E[tokens], [... d_model]."""

    W_E = property(lambda self: self._get("embed", "W_E"))

    def __call__(self, tokens) -> Float[Array, "... d_model"]:
        return self.W_E[_checked_ids(tokens, self._model.cfg.d_vocab, "embed")]


class PosEmbedView(_View):
    """`model.pos_embed`: `.W_pos` [n_ctx d_model]; `model.pos_embed(tokens)` -> [batch pos d_model], the
    embedding of positions 0..pos-1 (HookedTransformer's PosEmbed, which reads only the tokens' shape; TL
    4.3's bridge module is Hugging Face's and takes position ids instead)."""

    W_pos = property(lambda self: self._get("pos_embed", "W_pos"))

    def __call__(self, tokens) -> Float[Array, "batch pos d_model"]:
        shape = np.shape(tokens)
        if len(shape) != 2 or shape[1] > self._model.cfg.n_ctx:
            raise InputError(f"pos_embed takes tokens [batch pos] with pos <= n_ctx={self._model.cfg.n_ctx}; "
                             f"found shape {shape}.")
        W = self.W_pos
        return jnp.broadcast_to(W[: shape[1]], shape + W.shape[1:])


class UnembedView(_View):
    """`model.unembed`: `.W_U`, `.b_U`; `model.unembed(x)` = x @ W_U + b_U, [... d_vocab] (no softcap, as TL's
    Unembed module: the model applies output softcapping after it)."""

    W_U = property(lambda self: self._get("unembed", "W_U"))
    b_U = property(lambda self: self._get("unembed", "b_U"))

    def __call__(self, x: Float[Array | np.ndarray, "... d_model"]) -> Float[Array, "... d_vocab"]:
        x = jnp.asarray(x)
        d = self._model.cfg.d_model
        if x.ndim == 0 or x.shape[-1] != d:
            raise InputError(f"unembed reads the last axis, of size d_model={d}; found shape {x.shape}.")
        return x @ self.W_U + self.b_U


# -- helpers ------------------------------------------------------------------------------------------------

def _read(model, path: tuple[str, ...], layer: int | None):
    x = model.params
    for key in path:
        if not isinstance(x, dict) or key not in x:
            raise MissingWeightError(_missing_reason(model, path[-1]))
        x = x[key]
    if layer is not None:
        x = x[layer]
    if path[-1] in _KV and path[:2] == ("blocks", "attn"):
        cfg = model.cfg
        x = jnp.repeat(x, cfg.n_heads // cfg.n_key_value_heads, axis=0 if layer is not None else 1)
    return x


def _missing_reason(model, name: str) -> str:
    cfg = model.cfg
    if name in ("W_pos", "pos_embed"):
        return (f"This model has no {name}: positional_embedding_type is {cfg.positional_embedding_type!r} "
                "(positions enter through the rotary embedding of queries and keys, not a learned W_pos).")
    return f"This model has no weight {name!r} (not in its params; see jaxlens.param_shapes(cfg))."


def _checked_ids(tokens, d_vocab: int, where: str) -> jax.Array:
    """Integer ids inside the vocabulary (JAX's gather would clamp others silently)."""
    arr = jnp.asarray(tokens)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise InputError(f"{where} takes integer token ids; found dtype {arr.dtype}.")
    try:
        concrete = np.asarray(arr)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return arr
    if concrete.size and (concrete.min() < 0 or concrete.max() >= d_vocab):
        bad = int(concrete.min()) if concrete.min() < 0 else int(concrete.max())
        raise InputError(f"Token id {bad} is outside the vocabulary [0, {d_vocab}).")
    return arr
