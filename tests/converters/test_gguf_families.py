"""GGUF files of the new families (Qwen3; Mixtral, llama.cpp's `llama` with experts), written as llama.cpp's
converter writes them from a random `transformers` model, loaded back through jaxlens: logits within 1e-4 of
the HF model; an architecture jaxlens does not map is named with the ones it maps.

The writer is test_smollm2's `write_like_llama_cpp` (tensor names from the gguf package's own Hugging Face ->
GGUF table, Llama's q/k rows permuted as llama.cpp does), given Mixtral's experts split per projection
([expert, ...], as `ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps` hold them).
"""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_writing import write_out
from test_smollm2 import write_like_llama_cpp

from jaxlens import HookedTransformer, testing
from jaxlens.converters import _gguf
from jaxlens.errors import CheckpointError

T = 10
CASES = {
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=14,
        intermediate_size=90, vocab_size=97, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0})),
    "mixtral": ("llama", "MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40, vocab_size=89, max_position_embeddings=64, rms_norm_eps=1e-5,
        num_local_experts=4, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0})),
}


def _hf_tensors(hf) -> dict[str, np.ndarray]:
    """The HF state dict with batched experts split per projection (gguf's `mlp.experts.<proj>` names)."""
    out = {}
    for name, t in hf.state_dict().items():
        a = t.detach().float().numpy().copy()
        if name.endswith("mlp.experts.gate_up_proj"):
            half = a.shape[1] // 2
            base = name.removesuffix("gate_up_proj")
            out[base + "gate_proj"], out[base + "up_proj"] = a[:, :half].copy(), a[:, half:].copy()
        else:
            out[name] = a
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            arch, cls, model_cls, conf = CASES[case]
            hf = testing.random_hf_model(cls, model_cls, seed=90 + len(case),
                                         **{"initializer_range": 0.2, **conf})
            path = write_like_llama_cpp(hf, arch, tmp_path_factory.mktemp(case) / f"{case}.gguf",
                                        tensors=_hf_tensors(hf))
            tokens = np.random.RandomState(9).randint(0, conf["vocab_size"], (2, T))
            cache[case] = path, tokens, testing.hf_outputs(hf, tokens)["logits"]
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_of_new_family_matches_hf(built, case, tmp_path):
    path, tokens, want = built(case)
    cfg, params = _gguf.load(path, cache_dir=tmp_path, progress=False)
    assert cfg.use_qk_norm == (case == "qwen3") and cfg.num_experts == (4 if case == "mixtral" else None)
    model = HookedTransformer(cfg, jax.tree.map(jnp.asarray, params))
    np.testing.assert_allclose(np.asarray(model(tokens)), want, atol=1e-4, rtol=0)


def test_unknown_architecture_is_named_with_the_known_ones(built, tmp_path):
    path, *_ = built("qwen3")
    gf = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    for t in gf.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))))
    write_out(w)
    with pytest.raises(CheckpointError, match=r"'mamba' is not supported.*'llama'.*'qwen3'"):
        _gguf.load(tmp_path / "mamba.gguf", cache_dir=tmp_path, progress=False)
