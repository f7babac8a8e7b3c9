"""The MLP: dense (`act(x W_in + b_in) W_out + b_out`) or gated (SwiGLU: `act(x W_gate) * (x W_in)`).

Hooks: mlp.hook_pre (the gate pre-activation for gated MLPs), mlp.hook_pre_linear (gated only), mlp.hook_post.
As TransformerLens's GatedMLP, b_in is added after the product.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxlens.config import Config
from jaxlens.model.hooks import Hooks

# einsum letters: b=batch p=pos d=d_model m=d_mlp

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def mlp(
    p: dict,
    x: Float[Array, "batch pos d_model"],
    cfg: Config,
    hooks: Hooks,
) -> Float[Array, "batch pos d_model"]:
    """The MLP of one block applied to its normalised input."""
    act = ACTIVATIONS[cfg.act_fn]
    if cfg.gated_mlp:
        pre = hooks("mlp.hook_pre", jnp.einsum("bpd,dm->bpm", x, p["W_gate"]))
        lin = hooks("mlp.hook_pre_linear", jnp.einsum("bpd,dm->bpm", x, p["W_in"]))
        post = hooks("mlp.hook_post", act(pre) * lin + p["b_in"])
    else:
        pre = hooks("mlp.hook_pre", jnp.einsum("bpd,dm->bpm", x, p["W_in"]) + p["b_in"])
        post = hooks("mlp.hook_post", act(pre))
    return jnp.einsum("bpm,md->bpd", post, p["W_out"]) + p["b_out"]
