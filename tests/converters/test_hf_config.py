"""Hugging Face config keys: a converter refuses a key only when its value could change the forward pass.

Keys transformers writes into any config load (the generic ones are read from the installed transformers, not
from a list that grows with its releases), and so do keys at their default; the rest are refused by name."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import HookedTransformer, converters, testing
from jaxlens.converters import _hf_config, llama
from jaxlens.errors import CheckpointError

# SmolLM2-135M's shape, shrunk: 9 query heads sharing 3 key/value heads, tied embeddings, rope theta 1e5
SMOLLM2_SHAPED = dict(hidden_size=72, num_hidden_layers=3, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=96, vocab_size=211, max_position_embeddings=64, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      rope_parameters=dict(rope_type="default", rope_theta=100000.0))
# what transformers 5.24 adds to the config of a SmolLM2 checkpoint it read from its GGUF file
FROM_GGUF = {"_model_name_or_path": "SmolLM2 135M Instruct", "unk_token_id": 0}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(directory, HF model, tokens, HF outputs): a random SmolLM2-shaped Llama, FROM_GGUF in its config."""
    hf = testing.random_hf_model("LlamaConfig", "LlamaForCausalLM", seed=3, initializer_range=0.1,
                                 **SMOLLM2_SHAPED)
    path = testing.save_hf_model(hf, tmp_path_factory.mktemp("smol"))
    _edit_config(path, lambda conf: conf.update(FROM_GGUF))
    tokens = np.random.RandomState(3).randint(0, SMOLLM2_SHAPED["vocab_size"], (2, 16))
    return path, hf, tokens, testing.hf_outputs(hf, tokens)


def _edit_config(path, fn):
    conf = json.loads((path / "config.json").read_text())
    fn(conf)
    (path / "config.json").write_text(json.dumps(conf))
    return conf


def _read(path):
    return json.loads((path / "config.json").read_text())


def test_keys_transformers_writes_load_and_match_hf(smol):
    path, _, tokens, ref = smol
    assert FROM_GGUF.items() <= _read(path).items()
    cfg, _ = converters.load(path)
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.rotary_base) == (9, 3, 100000.0)
    model = HookedTransformer.from_pretrained_no_processing(path)
    np.testing.assert_allclose(np.asarray(model(tokens)), ref["logits"], atol=1e-4, rtol=0)
    processed = HookedTransformer.from_pretrained(path)
    got = jax.nn.log_softmax(processed(tokens), axis=-1)
    want = jax.nn.log_softmax(jnp.asarray(ref["logits"]), axis=-1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


def test_unknown_key_with_a_value_is_refused_with_key_value_and_fix(smol, tmp_path):
    hf = {**_read(smol[0]), "mixture_of_depths_capacity": 0.5}
    with pytest.raises(CheckpointError) as e:
        llama.config_from_hf(hf)
    assert str(e.value).startswith(
        "The llama converter does not know the config key(s) ['mixture_of_depths_capacity']: "
        "mixture_of_depths_capacity=0.5 (not a LlamaConfig key). Their values may change the forward pass")
    assert "add the key to IGNORED in converters/llama.py; otherwise teach the converter" in str(e.value)


def test_unknown_key_left_off_loads(smol):
    base = llama.config_from_hf(_read(smol[0]))
    for off in (None, False, [], {}):
        assert llama.config_from_hf({**_read(smol[0]), "use_mystery_router": off}) == base


def test_family_key_at_its_transformers_default_loads():
    """A key the family's transformers class has (here as if the converter did not read `mlp_bias`) loads at
    the class default and is refused at any other value, with the default in the message."""
    handled = llama.HANDLED - {"mlp_bias"}
    hf = {"architectures": ["LlamaForCausalLM"], "mlp_bias": False}
    _hf_config.check_hf_config(hf, handled=handled, ignored=llama.IGNORED, family="llama")
    with pytest.raises(CheckpointError, match=r"mlp_bias=True \(LlamaConfig defaults it to False\)"):
        _hf_config.check_hf_config({**hf, "mlp_bias": True}, handled=handled, ignored=llama.IGNORED,
                                   family="llama")
    rope = {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}  # nested values compare too
    _hf_config.check_hf_config(rope, handled=(), ignored=(), family="llama")


def test_generic_keys_come_from_the_installed_transformers(smol):
    import transformers

    generic = _hf_config.generic_keys()
    assert set(transformers.PretrainedConfig().to_dict()) <= generic
    assert set(transformers.GenerationConfig().to_dict()) <= generic
    newer = {"max_new_tokens": 64, "min_p": 0.05, "output_scores": True}  # generation only; not in FALLBACK
    assert not set(newer) & _hf_config.FALLBACK
    llama.config_from_hf({**_read(smol[0]), **newer})


def test_without_transformers(smol, monkeypatch):
    """Without the [hf] extra: the fallback set and token ids load, unknown keys load only when left off."""
    monkeypatch.setattr(_hf_config, "_transformers", lambda: None)
    _hf_config.generic_keys.cache_clear()
    _hf_config.family_defaults.cache_clear()
    try:
        assert _hf_config.generic_keys() == _hf_config.FALLBACK
        hf = _read(smol[0])
        base = llama.config_from_hf(hf)
        assert llama.config_from_hf({**hf, "use_mystery_router": None}) == base
        with pytest.raises(CheckpointError, match=r"use_mystery_router=True \(no installed transformers"):
            llama.config_from_hf({**hf, "use_mystery_router": True})
    finally:
        _hf_config.generic_keys.cache_clear()
        _hf_config.family_defaults.cache_clear()


def test_transformers_is_not_imported_for_a_config_of_known_keys(smol):
    """Importing transformers costs seconds: a config whose keys are all known (the common case) must not."""
    code = (f"import json, sys; from jaxlens.converters import llama; "
            f"llama.config_from_hf(json.load(open({str(smol[0] / 'config.json')!r}))); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
