"""The jaxlens model as a Flax NNX module, for codebases written in Flax.

    model = jaxlens.nnx.Transformer.from_hooked(HookedTransformer.from_pretrained(path))
    graphdef, state = nnx.split(model)        # state.to_pure_dict() is the params pytree; cfg is static
    model = nnx.merge(graphdef, state)
    logits = model(tokens)                     # == jaxlens.forward(model.params, model.cfg, tokens)[0]
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

The module holds one `nnx.Param` per leaf of the params pytree, under the same nested names (`blocks`,
`attn`, `W_Q` ...: `param_shapes`), and the Config (and tokenizer) as static attributes, so `nnx.split` gives
the params pytree as an `nnx.State` and the config in the graphdef. Every method is a call into the pure core
(`jaxlens.forward`, `cached_forward`): nothing is re-implemented, so the module computes what the functions
compute, bit for bit. `nnx.jit`, `nnx.grad`, `nnx.vmap` and optax work on it as on any NNX module.

Every public jaxlens function that takes `(params, cfg)` also takes the module in the params slot, with its
config (`jaxlens.forward(model, model.cfg, tokens)`, `patching.sweep(model, model.cfg, ...)`): the module
implements `__jaxlens_params__`, read by `jaxlens.shapes.resolve_params` where params enter.
"""

from typing import Any

import jax
from flax import nnx
from jaxtyping import Array, Int

from jaxlens.caching import cached_forward
from jaxlens.config import Config
from jaxlens.hook_names import NamesFilter, decoder_table
from jaxlens.model.forward import forward, lm_cross_entropy_loss
from jaxlens.params import check_params, init_params
from jaxlens.shapes import Params


class Transformer(nnx.Module):
    """A jaxlens decoder as an NNX module. Args: cfg, params (checked against `param_shapes(cfg)`),
    tokenizer (optional, kept for `to_hooked`).

    Raises:
        CheckpointError: params whose names or shapes do not match the config.
    """

    def __init__(self, cfg: Config, params: Params, tokenizer: Any = None):
        check_params(params, cfg)
        self.cfg = cfg
        self.tokenizer = tokenizer
        for name, sub in params.items():
            setattr(self, name, nnx.data(jax.tree_util.tree_map(nnx.Param, sub)))

    # -- conversions -----------------------------------------------------------------------------------------
    @classmethod
    def from_hooked(cls, model) -> "Transformer":
        """The NNX module of a `HookedTransformer` (same arrays, config and tokenizer; nothing is copied)."""
        return cls(model.cfg, model.params, getattr(model, "tokenizer", None))

    def to_hooked(self):
        """A `HookedTransformer` over the module's current weights."""
        from jaxlens.hooked_transformer import HookedTransformer

        return HookedTransformer(self.cfg, self.params, self.tokenizer)

    @classmethod
    def init(cls, cfg: Config, *, rngs: nnx.Rngs, scale: float = 0.02) -> "Transformer":
        """Random weights (`jaxlens.init_params`) from the `params` stream of `rngs`."""
        return cls(cfg, init_params(cfg, rngs.params(), scale=scale))

    @property
    def params(self) -> Params:
        """The params pytree (plain nested dict of arrays; traced values inside nnx transforms)."""
        return nnx.state(self, nnx.Param).to_pure_dict()

    def __jaxlens_params__(self) -> tuple[Params, Config]:
        return self.params, self.cfg

    # -- running ---------------------------------------------------------------------------------------------
    def __call__(self, tokens: Int[Array, "batch pos"], **kwargs) -> Array:
        """Logits [batch pos d_vocab]; keywords as `jaxlens.forward` (interventions, layer bounds, mask)."""
        return self.forward(tokens, **kwargs)[0]

    def forward(self, tokens: Int[Array, "batch pos"], **kwargs) -> tuple[Array, dict[str, Array]]:
        """`jaxlens.forward(params, cfg, tokens, **kwargs)`: (logits, {hook name: activation})."""
        return forward(self.params, self.cfg, tokens, **kwargs)

    def loss(self, tokens: Int[Array, "batch pos"], **kwargs) -> Array:
        """Mean next-token cross-entropy of the model on `tokens` (keywords as `forward`)."""
        return lm_cross_entropy_loss(self(tokens, **kwargs), tokens, kwargs.get("attention_mask"))

    def run_with_cache(self, tokens: Int[Array, "batch pos"], names_filter: NamesFilter = None, **kwargs):
        """(logits, ActivationCache) of the hooks `names_filter` selects (default: every default hook)."""
        names = tuple(decoder_table(self.cfg).select(names_filter))
        return cached_forward(self.params, self.cfg, tokens, names, **kwargs)
