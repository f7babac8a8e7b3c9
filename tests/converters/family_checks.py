"""Shared pieces of the family tests: random `transformers` models built once per test module, and the check
that jaxlens's logits, resid_pre and attention patterns equal PyTorch's.

    CASES = {"olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {...config...}, {...expected cfg fields...})}
    built = pytest.fixture(scope="module")(lambda tmp_path_factory: case_builder(tmp_path_factory, CASES, T))
    model, cache, ref = assert_matches_hf(CASES, built, "olmo2")
"""

import numpy as np
import pytest

from jaxlens import HookedTransformer, testing


def case_builder(tmp_path_factory, cases: dict, n_tokens: int, seed_base: int = 0, init_range: float = 0.1):
    """case -> (dir, HF model, tokens [2 n_tokens], HF outputs), each built and saved on first use."""
    cache = {}

    def get(case):
        if case not in cache:
            cls, model_cls, conf, _ = cases[case]
            path = tmp_path_factory.mktemp(case)
            seed = seed_base + sorted(cases).index(case)
            hf, tokens = testing.saved_random_hf_model(path, cls, model_cls, seed, n_tokens,
                                                       **{"initializer_range": init_range, **conf})
            cache[case] = path, hf, tokens, testing.hf_outputs(hf, tokens)
        return cache[case]

    return get


def assert_matches_hf(cases: dict, built, case: str):
    """The unprocessed jaxlens model of `case` has the expected config fields, and its logits (1e-4),
    resid_pre (1e-4) and attention patterns (1e-5) equal the HF model's.

    Returns:
        (model, cache, HF outputs).
    """
    path, _, tokens, ref = built(case)
    model = HookedTransformer.from_pretrained_no_processing(path)
    for field, want in cases[case][3].items():
        assert getattr(model.cfg, field) == pytest.approx(want), field
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("resid_pre", "pattern")))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    for layer in range(model.cfg.n_layers):
        np.testing.assert_allclose(np.asarray(cache["resid_pre", layer]), ref["hidden_states"][layer],
                                   atol=1e-4, rtol=0, err_msg=f"resid_pre {layer}")
        np.testing.assert_allclose(np.asarray(cache["pattern", layer]), ref["attentions"][layer],
                                   atol=1e-5, rtol=0, err_msg=f"pattern {layer}")
    return model, cache, ref
