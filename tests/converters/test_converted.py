"""The `jaxlens convert` checkpoint format (jaxlens.converters._converted): written by the command, loaded
back by `HookedTransformer.from_pretrained(path)` as exactly the same model (bit-equal logits, processed or
not), the config round-tripped field by field, and every way a file can be wrong reported as a
CheckpointError."""

import dataclasses
import json

import numpy as np
import pytest

from jaxlens import HookedTransformer, cli, converters, testing
from jaxlens.config import Config
from jaxlens.converters import _converted
from jaxlens.errors import CheckpointError

TOKENS = np.array([[0, 5, 17, 3, 42, 8, 99, 1], [2, 2, 61, 7, 7, 30, 11, 250]])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random GPT-2 with a tiny tokenizer, saved as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("gpt2")
    tok = testing.train_tiny_tokenizer(path)
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=1, n_embd=24, n_layer=2, n_head=3,
                                 n_positions=16, vocab_size=len(tok))
    testing.save_hf_model(hf, path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random Llama with grouped-query attention and rotary embeddings: more config fields to carry."""
    path = tmp_path_factory.mktemp("llama")
    hf = testing.random_hf_model("LlamaConfig", "LlamaForCausalLM", seed=2, hidden_size=24,
                                 intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=300, max_position_embeddings=32,
                                 rope_theta=5000.0)
    testing.save_hf_model(hf, path)
    return path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("target", ["folder", "model.safetensors"])
def test_convert_then_from_pretrained_is_the_same_model(family, target, request, tmp_path):
    source = request.getfixturevalue(family)
    out = tmp_path / target
    assert cli.main(["convert", str(source), "--out", str(out)]) == 0
    for load in (HookedTransformer.from_pretrained, HookedTransformer.from_pretrained_no_processing):
        original, converted = load(source), load(out)
        assert converted.cfg == original.cfg
        np.testing.assert_array_equal(np.asarray(converted(TOKENS)), np.asarray(original(TOKENS)))
    assert (converted.tokenizer is not None) == (family == "gpt2" and target == "folder")
    if converted.tokenizer is not None:
        np.testing.assert_array_equal(np.asarray(converted.to_tokens("The capital of France")),
                                      np.asarray(original.to_tokens("The capital of France")))


def test_saved_files_hold_the_checkpoint_tensors(llama, tmp_path):
    from safetensors.numpy import load_file

    cfg, params = converters.load(llama)
    written = converters.save_converted(tmp_path / "c", cfg, params)
    assert written == [tmp_path / "c" / "params.safetensors", tmp_path / "c" / "jaxlens_config.json"]
    flat = load_file(str(written[0]))  # a standard safetensors file: the package reads it
    want = converters.flatten_params(params)
    assert sorted(flat) == sorted(want) and "blocks.attn.W_Q" in flat
    for name, t in want.items():
        assert flat[name].dtype == np.float32
        np.testing.assert_array_equal(flat[name], t, err_msg=name)
    meta = json.loads(written[1].read_text())
    assert (meta["format"], meta["version"]) == ("jaxlens-params", 1)
    assert meta["config"]["n_key_value_heads"] == 2 and meta["config"]["rotary_base"] == 5000.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporaries left


def test_config_round_trips_through_json():
    configs = [
        testing.tiny_config(),
        Config(d_model=16, n_layers=3, n_heads=4, d_head=4, d_mlp=32, d_vocab=50, n_ctx=64,
               n_key_value_heads=2, act_fn="silu", normalization_type="RMS",
               positional_embedding_type="rotary", rotary_dim=2, rotary_scaling=(8.0, 1.0, 4.0, 8192),
               window_sizes=(4, None, 8), gated_mlp=True, attn_scores_soft_cap=50.0,
               default_prepend_bos=False),
    ]
    for cfg in configs:
        data = json.loads(json.dumps(_converted.config_to_json(cfg)))
        back = _converted.config_from_json(data)
        assert back == cfg
        assert isinstance(back.window_sizes, (tuple, type(None))) and hash(back) == hash(cfg)


def test_nested_config_dataclasses_round_trip():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        base: float
        dims: tuple[int, ...]

    @dataclasses.dataclass(frozen=True)
    class Outer:
        name: str
        inner: Inner | None = None
        pairs: tuple[tuple[int, int], ...] = ()

    cfg = Outer("x", Inner(2.5, (1, 2)), ((1, 2), (3, 4)))
    data = json.loads(json.dumps(_converted.config_to_json(cfg)))
    assert data == {"name": "x", "inner": {"base": 2.5, "dims": [1, 2]}, "pairs": [[1, 2], [3, 4]]}
    assert _converted.config_from_json(data, Outer) == cfg


def _converted_folder(gpt2, tmp_path):
    out = tmp_path / "c"
    cfg, params = converters.load(gpt2)
    converters.save_converted(out, cfg, params)
    return out


def test_wrong_files_are_clear_errors(gpt2, tmp_path):
    out = _converted_folder(gpt2, tmp_path)
    config_file = out / "jaxlens_config.json"
    meta = json.loads(config_file.read_text())
    cases = [
        ({**meta, "version": 99}, "format version 99"),
        ({**meta, "format": "other"}, "not a jaxlens params config"),
        ({**meta, "config": {**meta["config"], "n_experts": 8}}, r"fields \['n_experts'\]"),
        ({**meta, "config": {**meta["config"], "n_heads": 5}}, "valid Config"),
    ]
    for bad, match in cases:
        config_file.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=match):
            HookedTransformer.from_pretrained(out)
    config_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        converters.load(out)
    config_file.write_text(json.dumps({**meta, "config": {**meta["config"], "d_model": 32}}))
    with pytest.raises(CheckpointError):  # the tensors do not fit the config
        converters.load(out)
    (out / "params.safetensors").unlink()
    with pytest.raises(CheckpointError, match="jaxlens convert"):
        converters.load_converted(out)


def test_failed_save_leaves_the_old_checkpoint(gpt2, tmp_path):
    out = _converted_folder(gpt2, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    cfg, params = converters.load(gpt2)
    with pytest.raises(RuntimeError, match="disk full"):
        converters.save_converted(out, cfg, params, BrokenTokenizer())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_flatten_and_unflatten_are_inverse():
    params = {"embed": {"W_E": np.ones((3, 2))}, "blocks": {"attn": {"W_Q": np.zeros((1, 2, 2, 1))}}}
    flat = converters.flatten_params(params)
    assert sorted(flat) == ["blocks.attn.W_Q", "embed.W_E"]
    assert flat["embed.W_E"] is params["embed"]["W_E"]
    assert converters.unflatten_params(flat) == params
