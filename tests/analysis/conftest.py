"""Small random models shared by the analysis tests: a GPT-2-like LayerNorm model with learned positions, and a
Llama-like one (RMSNorm, rotary, grouped-query attention, gated MLP)."""

import jax
import pytest

import jaxlens
from jaxlens import testing

GPT_CFG = testing.tiny_config()
LLAMA_CFG = testing.tiny_config(n_heads=6, n_key_value_heads=2, d_head=6, normalization_type="RMS",
                                positional_embedding_type="rotary", gated_mlp=True, act_fn="silu")


@pytest.fixture(scope="session")
def gpt():
    return GPT_CFG, jaxlens.init_params(GPT_CFG, jax.random.key(0), scale=0.3)


@pytest.fixture(scope="session")
def llama():
    return LLAMA_CFG, jaxlens.init_params(LLAMA_CFG, jax.random.key(1), scale=0.3)


@pytest.fixture(scope="session", params=["gpt", "llama"])
def any_model(request):
    cfg = GPT_CFG if request.param == "gpt" else LLAMA_CFG
    return cfg, jaxlens.init_params(cfg, jax.random.key(2), scale=0.3)
