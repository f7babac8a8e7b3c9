"""Small random models shared by the analysis tests: a GPT-2-like LayerNorm model with learned positions, and
a Llama-like one (RMSNorm, rotary, grouped-query attention, gated MLP). Weights come from numpy (no
compile)."""

import pytest

from jaxlens import testing

GPT_CFG = testing.tiny_config()
LLAMA_CFG = testing.tiny_config(n_heads=6, n_key_value_heads=2, d_head=6, normalization_type="RMS",
                                positional_embedding_type="rotary", gated_mlp=True, act_fn="silu")


random_params = testing.numpy_params


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
