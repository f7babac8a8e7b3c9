"""The MLP: dense (`act(x W_in + b_in) W_out + b_out`) or gated (SwiGLU: `act(x W_gate) * (x W_in)`).

Hooks: mlp.hook_pre (the gate pre-activation for gated MLPs), mlp.hook_pre_linear (gated only), mlp.hook_post.
As TransformerLens's GatedMLP, b_in is added after the product.

A mixture of experts (`cfg.num_experts`; Jiang et al. 2024, "Mixtral of Experts") routes each token: softmax
of the router logits (`W_gate`), the top `experts_per_token` (mlp.hook_expert_indices [batch pos slot]), their
probabilities (renormalised when `normalize_expert_weights`) scattered over the experts
(mlp.hook_expert_weights [batch pos expert], zero for the experts not chosen). Every expert runs on every
token (mlp.experts.E.hook_pre / hook_pre_linear / hook_post [batch pos d_mlp]) and the output is the weighted
sum, so a patched weight or index re-routes exactly; the weights are computed from the (patched) indices.
A shared expert (`cfg.shared_expert_d_mlp`, Qwen2-MoE) adds a gated MLP for every token
(mlp.shared_expert.hook_pre / hook_pre_linear / hook_post) scaled by mlp.hook_shared_expert_gate.
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
    if cfg.num_experts:
        return _mixture_of_experts(p, x, cfg, hooks, act)
    if cfg.gated_mlp:
        pre = hooks("mlp.hook_pre", jnp.einsum("bpd,dm->bpm", x, p["W_gate"]))
        lin = hooks("mlp.hook_pre_linear", jnp.einsum("bpd,dm->bpm", x, p["W_in"]))
        post = hooks("mlp.hook_post", act(pre) * lin + p["b_in"])
    else:
        pre = hooks("mlp.hook_pre", jnp.einsum("bpd,dm->bpm", x, p["W_in"]) + p["b_in"])
        post = hooks("mlp.hook_post", act(pre))
    return jnp.einsum("bpm,md->bpd", post, p["W_out"]) + p["b_out"]


def _mixture_of_experts(p: dict, x, cfg: Config, hooks: Hooks, act):
    # einsum letters: b=batch p=pos d=d_model m=d_mlp e=expert
    probs = jax.nn.softmax(jnp.einsum("bpd,de->bpe", x, p["W_gate"]).astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(probs, cfg.experts_per_token)
    idx = hooks("mlp.hook_expert_indices", idx)
    chosen = jnp.take_along_axis(probs, idx, axis=-1)
    if cfg.normalize_expert_weights:
        chosen = chosen / chosen.sum(-1, keepdims=True)
    weights = jnp.einsum("bpk,bpke->bpe", chosen, jax.nn.one_hot(idx, cfg.num_experts, dtype=chosen.dtype))
    weights = hooks("mlp.hook_expert_weights", weights.astype(x.dtype))
    ex = p["experts"]
    pre = jnp.einsum("bpd,edm->bpem", x, ex["W_gate"])
    lin = jnp.einsum("bpd,edm->bpem", x, ex["W_in"])
    posts = []
    for e in range(cfg.num_experts):
        pre_e = hooks(f"mlp.experts.{e}.hook_pre", pre[:, :, e])
        lin_e = hooks(f"mlp.experts.{e}.hook_pre_linear", lin[:, :, e])
        posts.append(hooks(f"mlp.experts.{e}.hook_post", act(pre_e) * lin_e))
    out = jnp.einsum("bpem,emd->bped", jnp.stack(posts, axis=2), ex["W_out"])
    out = jnp.einsum("bped,bpe->bpd", out, weights)
    if cfg.shared_expert_d_mlp:  # Qwen2-MoE: a gated MLP for every token, scaled by a sigmoid gate
        sh = p["shared_expert"]
        pre = hooks("mlp.shared_expert.hook_pre", jnp.einsum("bpd,dm->bpm", x, sh["W_gate"]))
        lin = hooks("mlp.shared_expert.hook_pre_linear", jnp.einsum("bpd,dm->bpm", x, sh["W_in"]))
        post = hooks("mlp.shared_expert.hook_post", act(pre) * lin)
        gate = hooks("mlp.hook_shared_expert_gate",
                     jax.nn.sigmoid(jnp.einsum("bpd,d->bp", x, p["W_shared_gate"]))[..., None])
        out = out + gate * jnp.einsum("bpm,md->bpd", post, sh["W_out"])
    return out
