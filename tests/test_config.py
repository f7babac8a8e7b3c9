"""Config cannot be wrong silently: every field is checked against its annotation, derived defaults are
resolved once (one name, one value per fact), and the processed config follows from the processing flags."""

import dataclasses
import itertools
import math
import re

import jax
import numpy as np
import pytest

import jaxlens
from jaxlens import testing
from jaxlens import weight_processing as wp
from jaxlens.config import Config, allowed_values
from jaxlens.errors import ConfigError
from jaxlens.params import check_params

# field -> (a misspelt value, the allowed values the message must list)
ENUMS = {
    "normalization_type": ("layernorm", ("LN", "LNPre", "RMS", "RMSPre", None)),
    "positional_embedding_type": ("rope", ("standard", "rotary")),
    "act_fn": ("swiglu",
               ("gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu")),
    "attention_dir": ("Causal", ("causal", "bidirectional")),
}


def test_every_literal_field_is_validated():
    literal_fields = {f.name for f in dataclasses.fields(Config) if allowed_values(f.name)}
    assert literal_fields == set(ENUMS)


@pytest.mark.parametrize("field", list(ENUMS))
def test_misspelt_enum_names_field_value_and_allowed(field):
    bad, allowed = ENUMS[field]
    assert allowed_values(field) == allowed
    with pytest.raises(ConfigError) as e:
        testing.tiny_config(**{field: bad})
    msg = str(e.value)
    assert f"Config.{field}={bad!r}" in msg
    assert "allowed values: " + ", ".join(map(repr, allowed)) in msg


def test_close_misspelling_is_suggested():
    with pytest.raises(ConfigError, match=r"Did you mean 'causal'\?"):
        testing.tiny_config(attention_dir="Causal")


# (field, value of the wrong type, what the message must say is wanted)
WRONG_TYPES = [
    ("gated_mlp", "False", "a bool (True or False)"),  # a truthy string would turn the gate on
    ("parallel_attn_mlp", 1, "a bool (True or False)"),
    ("default_prepend_bos", None, "a bool (True or False)"),
    ("eps", "1e-5", "a number"),
    ("rotary_base", True, "a number"),
    ("attn_scale", "8", "a number or None"),
    ("d_model", 40.0, "an int"),
    ("n_key_value_heads", 2.5, "an int or None"),
    ("window_sizes", [4, None, 4], "a tuple of (an int or None) or None"),
]


@pytest.mark.parametrize("field,value,wanted", WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_wrong_type_names_field_value_and_type(field, value, wanted):
    with pytest.raises(ConfigError) as e:
        testing.tiny_config(**{field: value})
    assert str(e.value) == f"Config.{field} must be {wanted}, found {value!r} ({type(value).__name__})."


@pytest.mark.parametrize("field,value,message", [
    ("eps", -1e-5, "Config.eps must be a finite non-negative number, found -1e-05."),
    ("attn_scale", 0.0, "Config.attn_scale must be a finite positive number, found 0.0."),
    ("output_logits_soft_cap", math.inf, "Config.output_logits_soft_cap must be a finite positive number"),
    ("n_ctx", 0, "Config.n_ctx must be a positive int, found 0."),
    ("rotary_dim", 4, "Config.rotary_dim=4: rotary settings on a model with positional_embedding_type="),
    ("rotary_scaling", (8.0, 1.0, 4.0, 8192), "Config.rotary_scaling=(8.0, 1.0, 4.0, 8192): rotary settings"),
])
def test_bad_values(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        testing.tiny_config(**{field: value})


def test_rotary_dim_must_fit_the_head():
    with pytest.raises(ConfigError, match=r"rotary_dim=5 must be even, positive and at most d_head=8"):
        testing.tiny_config(positional_embedding_type="rotary", rotary_dim=5)
    with pytest.raises(ConfigError, match=r"rotary_dim=10 must be even"):
        testing.tiny_config(positional_embedding_type="rotary", rotary_dim=10)


def test_numpy_scalars_become_python_numbers():
    """GGUF metadata and numpy-derived sizes come as numpy scalars; the config holds plain Python numbers."""
    cfg = testing.tiny_config(d_model=np.int64(40), eps=np.float32(0.5), rotary_base=10000,
                              positional_embedding_type="rotary", rotary_scaling=(8, 1, 4.0, np.int32(64)))
    assert type(cfg.d_model) is int and type(cfg.eps) is float and cfg.eps == 0.5
    assert type(cfg.rotary_base) is float and cfg.rotary_scaling == (8.0, 1.0, 4.0, 64)
    assert [type(x) for x in cfg.rotary_scaling] == [float, float, float, int]


# --- one name per fact -------------------------------------------------------------------------------------


@pytest.mark.parametrize("unset,resolved", [
    (dict(), dict(n_key_value_heads=5, attn_scale=math.sqrt(8))),
    (dict(positional_embedding_type="rotary"), dict(positional_embedding_type="rotary", rotary_dim=8)),
])
def test_derived_defaults_are_resolved_once(unset, resolved):
    a, b = testing.tiny_config(**unset), testing.tiny_config(**{**unset, **resolved})
    assert a == b and hash(a) == hash(b)
    assert all(getattr(a, k) == v for k, v in resolved.items())
    assert a == testing.tiny_config(**unset, n_key_value_heads=None, attn_scale=None)


def test_standard_positions_have_no_rotary_dim():
    assert testing.tiny_config().rotary_dim is None


def test_old_names_are_gone():
    cfg = testing.tiny_config()
    for old in ("n_kv_heads", "rotary_dims", "scale"):
        assert not hasattr(cfg, old), old
    with pytest.raises(TypeError, match="use_attn_scale"):
        testing.tiny_config(use_attn_scale=False)  # TransformerLens's flag: attn_scale=1.0 says the same


def test_replace_lets_derived_defaults_follow_the_sizes():
    cfg = testing.tiny_config(positional_embedding_type="rotary")
    wider = cfg.replace(n_heads=4, d_head=10)
    assert wider == testing.tiny_config(positional_embedding_type="rotary", n_heads=4, d_head=10)
    assert (wider.n_key_value_heads, wider.rotary_dim, wider.attn_scale) == (4, 10, math.sqrt(10))
    gqa = testing.tiny_config(n_key_value_heads=1, attn_scale=1.0, positional_embedding_type="rotary",
                              rotary_dim=4)
    kept = gqa.replace(n_heads=10, d_head=6)
    assert (kept.n_key_value_heads, kept.attn_scale, kept.rotary_dim) == (1, 1.0, 4)
    assert cfg.replace(positional_embedding_type="standard").rotary_dim is None
    with pytest.raises(ConfigError, match="normalization_type='RMSNorm'"):
        cfg.replace(normalization_type="RMSNorm")


# --- the processed config ----------------------------------------------------------------------------------

FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
PROCESS_CONFIGS = {
    "ln": testing.tiny_config(),
    "rms_gqa": testing.tiny_config(normalization_type="RMS", n_key_value_heads=1, gated_mlp=True,
                                   act_fn="silu", positional_embedding_type="rotary"),
    "no_norm": testing.tiny_config(normalization_type=None),
    "ln_pre": testing.tiny_config(normalization_type="LNPre"),
    "softcapped": testing.tiny_config(normalization_type="RMS", output_logits_soft_cap=5.0),
}


@pytest.mark.parametrize("name", list(PROCESS_CONFIGS))
def test_processed_config_is_what_process_weights_returns(name):
    cfg = PROCESS_CONFIGS[name]
    params = jaxlens.init_params(cfg, jax.random.key(0), scale=0.1)
    for values in itertools.product((False, True), repeat=len(FLAGS)):
        flags = dict(zip(FLAGS, values, strict=True))
        got_cfg, got_params = wp.process_weights(cfg, params, **flags)
        assert got_cfg == wp.processed_config(cfg, **flags), flags
        check_params(got_params, got_cfg)


def test_processed_config_values():
    ln, rms = PROCESS_CONFIGS["ln"], PROCESS_CONFIGS["rms_gqa"]
    assert wp.processed_config(ln).normalization_type == "LNPre"
    assert wp.processed_config(rms).normalization_type == "RMSPre"
    assert wp.processed_config(ln, fold_ln=False) == ln
    assert wp.processed_config(PROCESS_CONFIGS["ln_pre"]) == PROCESS_CONFIGS["ln_pre"]
    with pytest.raises(TypeError):
        wp.processed_config(ln, fold_layernorm=True)  # a misspelt flag is an error, not a no-op
