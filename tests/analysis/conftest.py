"""Small random models shared by the analysis tests: a GPT-2-like LayerNorm model with learned positions, and
a Llama-like one (RMSNorm, rotary, grouped-query attention, gated MLP). Weights come from numpy (no
compile)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import testing
from jaxlens.params import param_shapes

GPT_CFG = testing.tiny_config()
LLAMA_CFG = testing.tiny_config(n_heads=6, n_key_value_heads=2, d_head=6, normalization_type="RMS",
                                positional_embedding_type="rotary", gated_mlp=True, act_fn="silu")


def random_params(cfg, seed: int, scale: float = 0.3):
    """Normal weights (biases included), norm gains near 1, as `init_params` but drawn with numpy."""
    rng = np.random.RandomState(seed)
    table = param_shapes(cfg)
    is_entry = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
    paths, treedef = jax.tree_util.tree_flatten_with_path(table, is_leaf=is_entry)
    out = []
    for path, (_, shape) in paths:
        x = scale * rng.randn(*shape)
        if jax.tree_util.keystr(path).endswith("['w']"):
            x = 1.0 + x
        out.append(jnp.asarray(x, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="session")
def gpt():
    return GPT_CFG, random_params(GPT_CFG, 0)


@pytest.fixture(scope="session")
def llama():
    return LLAMA_CFG, random_params(LLAMA_CFG, 1)


@pytest.fixture(scope="session", params=["gpt", "llama"])
def any_model(request):
    cfg = GPT_CFG if request.param == "gpt" else LLAMA_CFG
    return cfg, random_params(cfg, 2)


@pytest.fixture(scope="session")
def make_params():
    return random_params
