"""Axis glossary and jaxtyping aliases: read this first.

Every array in jaxlens is described with TransformerLens's axis names:

    batch       prompts in a batch
    pos         token positions (query_pos / key_pos inside attention)
    d_model     residual stream width
    head_index  attention heads (n_heads, or n_key_value_heads for keys and values under GQA)
    d_head      width of one head
    d_mlp       MLP hidden width
    d_vocab     vocabulary size
    layer       transformer blocks; per-layer weights are stacked on a leading `layer` axis

Einsum letters, the same in every file:
    b=batch  p=pos  q=query_pos  k=key_pos  d=d_model  h=head_index  e=d_head  m=d_mlp  v=d_vocab  l=layer
"""

from typing import Any, Protocol, TypeAlias, runtime_checkable

import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int

AnyArray: TypeAlias = Array | np.ndarray  # public functions take numpy inputs as well
Tokens: TypeAlias = Int[Array, "batch pos"]
Resid: TypeAlias = Float[Array, "batch pos d_model"]
Logits: TypeAlias = Float[Array, "batch pos d_vocab"]
Params: TypeAlias = dict[str, Any]
PRNGKey: TypeAlias = jax.Array


@runtime_checkable
class CarriesParams(Protocol):
    """A model object holding its own weights and config (`jaxlens.nnx.Transformer`)."""

    def __jaxlens_params__(self) -> tuple[Params, Any]: ...


ParamsLike: TypeAlias = Params | CarriesParams  # what a public `(params, cfg)` function accepts


def resolve_params(params: ParamsLike, cfg: Any) -> tuple[Params, Any]:
    """(params pytree, cfg) from what a public `(params, cfg)` function was given: a params pytree and its
    config, or a model object carrying both (`jaxlens.nnx.Transformer`) with its config (or the same one)."""
    if not isinstance(params, CarriesParams):
        return params, cfg
    pytree, own = params.__jaxlens_params__()
    if cfg is not None and cfg != own:
        from jaxlens.errors import InputError

        raise InputError(f"{type(params).__name__} was passed with a config that is not its own. Pass "
                         "`model.cfg` as cfg, or the params pytree of the config you mean.")
    return pytree, own


__all__ = ["Array", "Bool", "Float", "Int", "Tokens", "Resid", "Logits", "Params", "ParamsLike", "PRNGKey",
           "resolve_params"]
