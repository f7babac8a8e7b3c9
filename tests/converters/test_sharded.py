"""Sharded safetensors checkpoints (`model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`, as
`save_pretrained(max_shard_size=...)` writes them): loaded lazily per tensor, equal to transformers' model;
a missing shard, a stale index and a corrupt index are clear errors."""

import json

import numpy as np
import pytest

from jaxlens import HookedTransformer, converters, testing
from jaxlens.converters import _checkpoint
from jaxlens.errors import CheckpointError

CONF = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            intermediate_size=90, vocab_size=97, max_position_embeddings=64, initializer_range=0.1)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    hf = testing.random_hf_model("Qwen3Config", "Qwen3ForCausalLM", seed=80, **CONF)
    path = tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(path, max_shard_size="40KB")
    tokens = np.random.RandomState(80).randint(0, CONF["vocab_size"], (2, 9))
    return path, tokens, testing.hf_outputs(hf, tokens)


def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_sharded_checkpoint_matches_hf(sharded):
    path, tokens, ref = sharded
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (path / "model.safetensors.index.json").is_file()
    model = HookedTransformer.from_pretrained_no_processing(path)
    np.testing.assert_allclose(np.asarray(model(tokens)), ref["logits"], atol=1e-4, rtol=0)


def test_tensors_are_read_only_when_taken(sharded, monkeypatch):
    reads = []
    real = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    source = _checkpoint.load_dir_tensors(sharded[0])
    assert reads == [] and len(source.names()) == 3 * 11 + 3
    source.take("model.norm.weight")
    assert len(reads) == 1


def test_missing_shard_is_named(sharded, tmp_path):
    path = _copy(sharded[0], tmp_path)
    victim = sorted(path.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing: \\['{victim.name}'\\].*Download every shard"):
        converters.load(path)


def test_stale_index_is_an_error(sharded, tmp_path):
    path = _copy(sharded[0], tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{first} does not hold 1 tensor.*layers.9.mlp.up_proj"):
        converters.load(path)


def test_corrupt_index_is_an_error(sharded, tmp_path):
    path = _copy(sharded[0], tmp_path)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        converters.load(path)
