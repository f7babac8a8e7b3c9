"""The BERT encoder forward and HookedEncoder against Hugging Face BertModel / BertForMaskedLM (PyTorch)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlens import Patch, testing, zero_ablate
from jaxlens.converters import bert
from jaxlens.encoder import HookedEncoder, encoder_forward
from jaxlens.errors import InputError, UnknownHookError
from jaxlens.hook_names import encoder_table

CONF = dict(hidden_size=40, num_hidden_layers=3, num_attention_heads=5, intermediate_size=72, vocab_size=120,
            max_position_embeddings=32, type_vocab_size=3)


def bert_tokenizer(path):
    """A 120-token WordPiece tokenizer trained offline, saved as a transformers BERT tokenizer in `path`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    texts = ["The quick brown fox jumps over the lazy dog.", "The capital of France is Paris.",
             "When Mary and John went to the store, John gave a drink to Mary."] * 20
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    t.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    t.post_processor = processors.BertProcessing(("[SEP]", t.token_to_id("[SEP]")),
                                                 ("[CLS]", t.token_to_id("[CLS]")))
    t.decoder = decoders.WordPiece()
    tok = BertTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(path)
    return tok


@pytest.fixture(scope="module")
def models():
    return {cls: testing.random_hf_model("BertConfig", cls, seed=i, **CONF)
            for i, cls in enumerate(("BertModel", "BertForMaskedLM"))}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONF["vocab_size"], (3, 11))
    token_types = rng.integers(0, CONF["type_vocab_size"], (3, 11))
    mask = np.ones((3, 11), np.int64)
    mask[1, 7:] = 0  # right padding, as BERT tokenizers pad
    mask[2, 4:] = 0
    return tokens, token_types, mask


def hf_run(model, tokens, token_types, mask):
    with torch.no_grad():
        return model(torch.as_tensor(tokens), token_type_ids=torch.as_tensor(token_types),
                     attention_mask=torch.as_tensor(mask), output_hidden_states=True, output_attentions=True)


def assert_valid_close(got, want, mask, atol):
    """Compare [batch pos ...] arrays at real (unpadded) positions only: padded rows are not defined by HF."""
    got, want = np.asarray(got), np.asarray(want)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def runs(models, batch):
    """Per model class: (cfg, params, jaxlens output, full cache incl. stacked patterns, HF outputs)."""
    tokens, token_types, mask = batch
    out = {}
    for cls, hf in models.items():
        cfg, params = bert.load(hf)
        names = encoder_table(cfg, ("mlm_head",) if cls == "BertForMaskedLM" else ("pooler",)).all_names()
        y, cache = encoder_forward(params, cfg, tokens, token_type_ids=token_types, attention_mask=mask,
                                   cache_names=names + ["blocks.attn.hook_pattern"])
        out[cls] = (cfg, params, y, cache, hf_run(hf, tokens, token_types, mask))
    return out


@pytest.mark.parametrize("cls", ["BertModel", "BertForMaskedLM"])
def test_every_layer_matches_hf_with_padding(runs, batch, cls):
    _, _, mask = batch
    cfg, _, out, cache, ref = runs[cls]
    names = ["hook_full_embed"] + [f"blocks.{l}.hook_normalized_resid_post" for l in range(cfg.n_layers)]
    for i, name in enumerate(names):
        assert_valid_close(cache[name], ref.hidden_states[i].numpy(), mask, 1e-4)
    for l in range(cfg.n_layers):  # HF attentions [batch head q k]: compare real queries
        got = np.moveaxis(np.asarray(cache["blocks.attn.hook_pattern"][l]), 1, 2)
        assert_valid_close(got, np.moveaxis(ref.attentions[l].numpy(), 1, 2), mask, 1e-5)
    if cls == "BertForMaskedLM":
        assert_valid_close(out, ref.logits.numpy(), mask, 1e-4)
    else:
        assert_valid_close(out, ref.last_hidden_state.numpy(), mask, 1e-4)


def test_pooler_matches_hf(runs):
    _, _, _, cache, ref = runs["BertModel"]
    np.testing.assert_allclose(np.asarray(cache["pooler.hook_pooler_out"]), ref.pooler_output.numpy(),
                               atol=1e-5)


def test_padding_does_not_change_real_positions(runs, batch):
    tokens, token_types, _ = batch
    cfg, params, padded, _, _ = runs["BertModel"]
    short, _ = encoder_forward(params, cfg, tokens[2:3, :4], token_type_ids=token_types[2:3, :4])
    np.testing.assert_allclose(np.asarray(padded)[2, :4], np.asarray(short)[0], atol=1e-5)


def test_cache_has_tl_names_and_shapes(runs):
    cfg, _, _, cache, _ = runs["BertForMaskedLM"]
    names = encoder_table(cfg, ("mlm_head",)).all_names()
    for want in ("hook_full_embed", "embed.hook_embed", "embed.hook_pos_embed", "embed.hook_token_type_embed",
                 "embed.ln.hook_scale", "embed.ln.hook_normalized", "blocks.0.hook_resid_pre",
                 "blocks.0.attn.hook_q", "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_z",
                 "blocks.2.hook_attn_out", "blocks.2.hook_resid_mid", "blocks.2.ln1.hook_normalized",
                 "blocks.2.mlp.hook_pre", "blocks.2.mlp.hook_post", "blocks.2.hook_mlp_out",
                 "blocks.2.hook_resid_post", "blocks.2.ln2.hook_scale", "blocks.2.hook_normalized_resid_post",
                 "mlm_head.ln.hook_normalized"):
        assert want in names
    assert "pooler.hook_pooler_out" not in names
    sizes = dict(batch=3, pos=11, d_model=40, head_index=5, d_head=8, d_mlp=72, query_pos=11, key_pos=11)
    sizes["1"] = 1
    for name in names:
        assert cache[name].shape == tuple(sizes[a] for a in encoder_table(cfg).axes(name).split()), name
    # TL: masked keys hold -inf in hook_attn_scores
    assert np.isneginf(np.asarray(cache["blocks.1.attn.hook_attn_scores"])[1, :, :, 7:]).all()
    # the next block reads the previous block's normalized output
    np.testing.assert_array_equal(cache["blocks.1.hook_resid_pre"],
                                  cache["blocks.0.hook_normalized_resid_post"])


def test_zeroed_attention_output_matches_hf_forward_hook(models, batch):
    tokens, token_types, mask = batch
    hf = models["BertModel"]
    cfg, params = bert.load(hf)
    dense = hf.encoder.layer[1].attention.output.dense
    handle = dense.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        ref = hf_run(hf, tokens, token_types, mask)
    finally:
        handle.remove()
    out, _ = encoder_forward(params, cfg, tokens, token_type_ids=token_types, attention_mask=mask,
                             interventions={"blocks.1.hook_attn_out": zero_ablate()})
    assert_valid_close(out, ref.last_hidden_state.numpy(), mask, 1e-4)
    clean = hf_run(hf, tokens, token_types, mask).last_hidden_state.numpy()
    assert np.abs(clean - ref.last_hidden_state.numpy()).max() > 1e-2  # the ablation did something


def test_layer_key_and_stacked_key_agree(models, batch):
    tokens, token_types, mask = batch
    cfg, params = bert.load(models["BertModel"])
    kw = dict(token_type_ids=token_types, attention_mask=mask)
    one, _ = encoder_forward(params, cfg, tokens, interventions={"blocks.1.attn.hook_z": zero_ablate()}, **kw)
    layer_mask = jnp.arange(cfg.n_layers).reshape(-1, 1, 1, 1, 1) == 1
    stacked, _ = encoder_forward(params, cfg, tokens, **kw, interventions={
        "blocks.attn.hook_z": Patch(value=jnp.zeros((cfg.n_layers, 1, 1, 1, 1)), mask=layer_mask)})
    np.testing.assert_allclose(np.asarray(one), np.asarray(stacked), atol=1e-6)


def test_patching_resid_pre_with_clean_run_restores_clean_output(models, batch):
    tokens, token_types, mask = batch
    cfg, params = bert.load(models["BertModel"])
    clean, cache = encoder_forward(params, cfg, tokens, cache_names=["blocks.2.hook_resid_pre"])
    corrupted = (tokens + 1) % CONF["vocab_size"]
    patch = Patch(cache["blocks.2.hook_resid_pre"])
    patched, _ = encoder_forward(params, cfg, corrupted, interventions={"blocks.2.hook_resid_pre": patch})
    np.testing.assert_allclose(np.asarray(patched), np.asarray(clean), atol=1e-5)


def test_bad_names_and_missing_heads_are_clear_errors(models, batch):
    tokens, _, _ = batch
    cfg, params = bert.load(models["BertModel"])
    with pytest.raises(UnknownHookError, match="hook_normalized_resid_post"):
        encoder_forward(params, cfg, tokens, cache_names=["blocks.0.hook_normalized_resid_pst"])
    with pytest.raises(InputError, match="mlm_head"):
        encoder_forward(params, cfg, tokens, cache_names=["mlm_head.ln.hook_scale"])
    with pytest.raises(InputError, match="vocabulary"):
        encoder_forward(params, cfg, tokens + 1000)


@pytest.fixture(scope="module")
def saved_mlm(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_mlm")
    tok = bert_tokenizer(path)
    testing.save_hf_model(models["BertForMaskedLM"], path)
    return path, tok


def test_hooked_encoder_text_round_trip(models, saved_mlm):
    path, tok = saved_mlm
    model = HookedEncoder.from_pretrained(path)
    texts = ["The capital of France is Paris.", "Mary gave a drink."]
    tokens, token_types, mask = model.to_tokens(texts)
    enc = tok(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(tokens, enc["input_ids"])
    np.testing.assert_array_equal(mask, enc["attention_mask"])
    ref = hf_run(models["BertForMaskedLM"], enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
    logits, cache = model.run_with_cache(texts)
    assert_valid_close(logits, ref.logits.numpy(), enc["attention_mask"], 1e-4)
    assert_valid_close(cache["normalized_resid_post", -1], ref.hidden_states[-1].numpy(),
                       enc["attention_mask"], 1e-4)
    assert_valid_close(model.encoder_output(tokens, token_types, mask), ref.hidden_states[-1].numpy(),
                       enc["attention_mask"], 1e-4)
    assert "blocks.0.hook_q_input" not in cache and "blocks.0.attn.hook_pattern" in cache
    with pytest.raises(KeyError, match="not cached"):
        cache["blocks.0.hook_q_input"]


def test_hooked_encoder_run_with_hooks_is_local(saved_mlm):
    path, _ = saved_mlm
    model = HookedEncoder.from_pretrained(path)
    text = "The quick brown fox."
    clean = model(text)
    seen = []

    def double(x, hook):
        seen.append(hook.name)
        return 2 * x

    hooked = model.run_with_hooks(text, fwd_hooks=[("blocks.0.hook_mlp_out", double)])
    assert seen and not np.allclose(np.asarray(hooked), np.asarray(clean), atol=1e-3)
    np.testing.assert_array_equal(model(text), clean)  # nothing persisted
