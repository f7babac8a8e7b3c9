"""Small random models of three families for the circuit tests: GPT-2 (LayerNorm, learned positions), a
Llama with grouped-query attention (6 query heads on 2 key/value heads, RMSNorm, SwiGLU, rotary) from a
random Hugging Face model, and GPT-NeoX with parallel attention and MLP blocks; and independent references
in circuit_refs.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import HookedTransformer, testing
from jaxlens.params import init_params

T, B = 6, 2


def _hf_model(tmp_path_factory, name, cls, model_cls, **conf):
    hf = testing.random_hf_model(cls, model_cls, seed=3, initializer_range=0.15, **conf)
    return HookedTransformer.from_pretrained(testing.save_hf_model(hf, tmp_path_factory.mktemp(name)))


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """name -> (model, clean tokens, corrupted tokens), built on first use."""
    built = {}

    def get(name):
        if name not in built:
            if name == "gpt2":
                cfg = testing.tiny_config(n_layers=2, d_model=24, n_heads=3, d_mlp=40)
                model = HookedTransformer(cfg, init_params(cfg, jax.random.key(0), scale=0.25))
            elif name == "llama-gqa":
                model = _hf_model(tmp_path_factory, name, "LlamaConfig", "LlamaForCausalLM", hidden_size=48,
                                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                  intermediate_size=56, vocab_size=97, max_position_embeddings=32)
            else:
                model = _hf_model(tmp_path_factory, name, "GPTNeoXConfig", "GPTNeoXForCausalLM",
                                  hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, vocab_size=89, max_position_embeddings=32,
                                  rotary_pct=0.5)
            rng = np.random.default_rng(len(built))
            clean = rng.integers(0, model.cfg.d_vocab, (B, T))
            corrupted = clean.copy()
            corrupted[:, 1:4] = rng.integers(0, model.cfg.d_vocab, (B, 3))  # same length, 3 tokens differ
            built[name] = model, jnp.asarray(clean), jnp.asarray(corrupted)
        return built[name]

    return get
