"""HookedTransformer's TransformerLens-shaped helpers against TransformerLens 4.3 on the same weights: the
module view (`blocks[l].attn.W_O`, `blocks[l].ln1(x)`, `embed`, `pos_embed`, `unembed`, `ln_final`), weights a
model lacks, `accumulated_bias`, `tokens_to_residual_directions`, the token helpers (`to_tokens` options,
`to_str_tokens` on lists, `to_single_str_token`, `input_to_embed`, `set_tokenizer`), the masked loss,
`refactor_factored_attn_matrices`, the derived config attributes and greedy `generate`; and that where TL
raises AssertionError / IndexError / AttributeError, jaxlens's error is also one.

Models: a random GPT-2 (d_model 72, 4 heads, d_mlp 200, 3 layers, n_ctx 40) and a random Llama (rotary,
RMSNorm, gated MLP, grouped-query attention 6/2 heads, attention biases), each booted in TransformerLens once
per module (processed, as TL's default; the GPT-2 also unprocessed and refactored).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
tl_lm = pytest.importorskip("transformer_lens.utilities.lm_utils")
pytestmark = pytest.mark.slow  # four TransformerLens bridges and their jaxlens twins

from tl_reference import ATOL, boot, close, np_  # noqa: E402

from jaxlens import HookedTransformer, testing  # noqa: E402
from jaxlens.errors import (  # noqa: E402
    ConfigError,
    InputAssertionError,
    InputError,
    InputIndexError,
    MissingWeightError,
    ReadOnlyError,
)
from jaxlens.model.loss import lm_cross_entropy_loss  # noqa: E402

GPT2 = dict(n_embd=72, n_layer=3, n_head=4, n_inner=200, vocab_size=300, n_positions=40, bos_token_id=0,
            eos_token_id=0)
LLAMA = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
             intermediate_size=80, vocab_size=300, max_position_embeddings=40, bos_token_id=0, eos_token_id=0,
             attention_bias=True)
TEXTS = ["When Mary and John went to the store", "The capital of France is Paris."]
PADDED = ["When Mary and John went to the store", "The"]  # rows of different lengths
LONG = "The quick brown fox jumps over the lazy dog. " * 6  # > n_ctx = 40 tokens


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_fidelity")
    hf = testing.random_hf_model("GPT2Config", "GPT2LMHeadModel", seed=3, **GPT2)
    return testing.save_hf_model(hf, path, testing.train_tiny_tokenizer(path))


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    """(TransformerLens, jaxlens), both with TL's default weight processing."""
    return boot(gpt2_dir), HookedTransformer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="module")
def gpt2_raw(gpt2_dir):
    return boot(gpt2_dir, no_processing=True), HookedTransformer.from_pretrained_no_processing(gpt2_dir)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_fidelity")
    hf = testing.random_hf_model("LlamaConfig", "LlamaForCausalLM", seed=4, **LLAMA)
    return testing.save_hf_model(hf, path, testing.train_tiny_tokenizer(path))


@pytest.fixture(scope="module")
def llama(llama_dir):
    return boot(llama_dir), HookedTransformer.from_pretrained(llama_dir)


def rng_resid(d_model: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 5, d_model)).astype(np.float32)


# -- module view ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["gpt2", "gpt2_raw", "llama"])
def test_module_view_matches_transformer_lens(which, request):
    tl, jl = request.getfixturevalue(which)
    n_rep = jl.cfg.n_heads // jl.cfg.n_key_value_heads
    x = rng_resid(jl.cfg.d_model)
    with torch.no_grad():
        for l in (0, 2, -1):
            tb, jb = tl.blocks[l], jl.blocks[l]
            for name in ("W_Q", "b_Q", "W_O", "b_O"):
                close(getattr(jb.attn, name), getattr(tb.attn, name), f"blocks[{l}].attn.{name}")
            for name in ("W_K", "W_V", "b_K", "b_V"):  # TL 4.3's block attribute holds the kv heads
                close(getattr(jb.attn, "_" + name), getattr(tb.attn, name), f"blocks[{l}].attn._{name}")
                close(getattr(jb.attn, name), getattr(tb.attn, name).repeat_interleave(n_rep, dim=0), name)
            for name in ("W_in", "b_in", "W_out", "b_out"):
                want, got = getattr(tb.mlp, name), getattr(jb.mlp, name)
                if want is None:  # TL 4.3: None for a bias the checkpoint lacks (Llama's MLP)
                    want = np.zeros(got.shape, np.float32)
                close(got, want, f"blocks[{l}].mlp.{name}")
            if jl.cfg.gated_mlp:
                close(jb.mlp.W_gate, tb.mlp.W_gate, "W_gate")
            else:
                assert jb.mlp.W_gate is None and tb.mlp.W_gate is None
                assert jl.W_gate is None and tl.W_gate is None
            close(jb.ln1(x), tb.ln1(torch.tensor(x)), f"blocks[{l}].ln1(x)")
            close(jb.ln2(x), tb.ln2(torch.tensor(x)), f"blocks[{l}].ln2(x)")
        close(jl.ln_final(x), tl.ln_final(torch.tensor(x)), "ln_final(x)")
        close(jl.unembed(x), tl.unembed(torch.tensor(x)), "unembed(x)", atol=1e-3)
        tokens = np.asarray([[0, 5, 17, 250], [3, 3, 299, 1]])
        close(jl.embed(tokens), tl.embed(torch.tensor(tokens)), "embed(tokens)")
        close(jl.embed.W_E, tl.embed.W_E, "embed.W_E")
        close(jl.unembed.W_U, tl.unembed.W_U, "unembed.W_U")
        if jl.cfg.positional_embedding_type == "standard":  # TL 4.3's module takes position ids: 0..pos-1
            positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
            close(jl.pos_embed(tokens), tl.pos_embed(torch.tensor(positions)), "pos_embed(tokens)")
            close(jl.pos_embed.W_pos, tl.W_pos, "W_pos")
    assert len(jl.blocks) == len(tl.blocks) == jl.cfg.n_layers
    assert [b.layer for b in jl.blocks] == list(range(jl.cfg.n_layers))
    assert [b.layer for b in jl.blocks[1:]] == [1, 2]


def test_missing_weights_are_attribute_errors(llama, gpt2):
    tl, jl = llama
    assert not hasattr(tl, "W_pos") and not hasattr(jl, "W_pos")  # TL raises AttributeError, so does jaxlens
    with pytest.raises(MissingWeightError, match="no W_pos: positional_embedding_type is 'rotary'"):
        _ = jl.W_pos
    assert not hasattr(jl, "pos_embed") and not hasattr(tl, "pos_embed")
    with pytest.raises(MissingWeightError, match="fold_ln folded its weights"):
        _ = jl.blocks[0].ln1.w  # processed: RMSPre has no weights
    with pytest.raises(MissingWeightError, match="no norms after attention and MLP"):
        _ = jl.blocks[0].ln1_post
    with pytest.raises(MissingWeightError, match="RMSNorm has no bias"):
        _ = HookedTransformer(jl.cfg.replace(normalization_type="RMS"), {**jl.params, "ln_final": {
            "w": jnp.ones(jl.cfg.d_model)}}).ln_final.b
    assert gpt2[1].W_gate is None and gpt2[0].W_gate is None


def test_views_are_read_only_and_follow_the_params(gpt2):
    _, jl = gpt2
    block = jl.blocks[1]
    with pytest.raises(ReadOnlyError, match=r"Cannot set 'W_O'.*read-only view.*at\[3\]\.set") as e:
        block.attn.W_O = block.attn.W_O * 0
    assert isinstance(e.value, AttributeError)  # TL: "property 'W_O' ... has no setter"
    with pytest.raises(ReadOnlyError):
        jl.blocks.foo = 1
    with pytest.raises(AttributeError):
        jl.W_O = 0
    with pytest.raises(InputIndexError, match="has 3 blocks; index 3 is out of range"):
        jl.blocks[3]
    model = HookedTransformer(jl.cfg, jl.params)
    view = model.blocks[1].attn
    doubled = {**jl.params["blocks"]["attn"], "W_O": jl.params["blocks"]["attn"]["W_O"] * 2}
    model.params = {**jl.params, "blocks": {**jl.params["blocks"], "attn": doubled}}
    np.testing.assert_allclose(np.asarray(view.W_O), 2 * np.asarray(jl.blocks[1].attn.W_O))  # no copy kept
    with pytest.raises(InputError, match="d_model=72"):
        jl.blocks[0].ln1(np.ones((2, 5)))
    with pytest.raises(InputError, match=r"Token id 300 is outside the vocabulary \[0, 300\)"):
        jl.embed(np.asarray([[1, 300]]))


# -- accumulated_bias ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_accumulated_bias_matches_transformer_lens(which, request):
    tl, jl = request.getfixturevalue(which)
    n = jl.cfg.n_layers
    with torch.no_grad():
        for layer in range(n + 1):
            for mlp_input in ((False, True) if layer < n else (False,)):
                for mlp_biases in (False, True):
                    want = tl.accumulated_bias(layer, mlp_input=mlp_input, include_mlp_biases=mlp_biases)
                    got = jl.accumulated_bias(layer, mlp_input=mlp_input, include_mlp_biases=mlp_biases)
                    close(got, want, f"accumulated_bias({layer}, {mlp_input}, {mlp_biases})")
    assert np.abs(np_(tl.accumulated_bias(n))).max() > 1e-3  # the biases are not all zero
    with pytest.raises(AssertionError):
        tl.accumulated_bias(n, mlp_input=True)
    with pytest.raises(InputAssertionError, match="no attention bias beyond the final layer") as e:
        jl.accumulated_bias(n, mlp_input=True)
    assert isinstance(e.value, AssertionError)
    with pytest.raises(IndexError):
        tl.accumulated_bias(n + 2)
    with pytest.raises(InputIndexError, match=rf"\[0, n_layers={n}\]; found {n + 2}") as e:
        jl.accumulated_bias(n + 2)
    assert isinstance(e.value, IndexError)


# -- tokens --------------------------------------------------------------------------------------------

def test_tokens_to_residual_directions_matches_transformer_lens(gpt2):
    tl, jl = gpt2
    batch = np.asarray([[3, 17, 99], [250, 4, 8]])  # [batch k], batch != k
    square = np.asarray([[3, 17], [250, 4]])  # batch == k: a transpose would pass silently
    with torch.no_grad():
        for tokens in (batch, square, batch[0], np.asarray([[7]]), np.asarray([7])):
            want = tl.tokens_to_residual_directions(torch.tensor(tokens))
            close(jl.tokens_to_residual_directions(tokens), want, f"tokens {tokens.shape}")
        close(jl.tokens_to_residual_directions(7), tl.tokens_to_residual_directions(7), "int")
        tid = jl.to_single_token(" Mary")
        close(jl.tokens_to_residual_directions(" Mary"), tl.tokens_to_residual_directions(tid), "str")
    assert jl.tokens_to_residual_directions(np.asarray([[7]])).shape == (jl.cfg.d_model,)
    with pytest.raises(InputError, match=r"\[0, 300\); found 3..300"):
        jl.tokens_to_residual_directions(np.asarray([3, 300]))
    with pytest.raises(InputError, match="token ids"):
        jl.tokens_to_residual_directions(1.5)


def test_to_str_tokens_and_single_str_token_match_transformer_lens(gpt2):
    tl, jl = gpt2
    assert jl.to_str_tokens(TEXTS) == tl.to_str_tokens(TEXTS)  # a list of lists
    assert jl.to_str_tokens(TEXTS[0]) == tl.to_str_tokens(TEXTS[0])
    assert jl.to_str_tokens(TEXTS, prepend_bos=False) == tl.to_str_tokens(TEXTS, prepend_bos=False)
    ids = np.asarray(jl.to_tokens(TEXTS[0]))
    assert jl.to_str_tokens(ids) == tl.to_str_tokens(ids)  # [1 pos]
    assert jl.to_str_tokens(jnp.asarray(ids[0])) == tl.to_str_tokens(torch.tensor(ids[0]))
    assert jl.to_str_tokens([ids[0], ids[0][:3]]) == tl.to_str_tokens([ids[0], ids[0][:3]])
    assert jl.to_str_tokens(ids[0].tolist()) == tl.to_str_tokens(torch.tensor(ids[0]))  # ints: one sequence
    two = np.asarray(jl.to_tokens(TEXTS))
    with pytest.raises(AssertionError):
        tl.to_str_tokens(two)
    with pytest.raises(InputAssertionError, match=r"one sequence of ids.*\(2, \d+\).*for row in tokens"):
        jl.to_str_tokens(two)
    for i in (0, 5, 72, 299):
        assert jl.to_single_str_token(i) == tl.to_single_str_token(i)
    with pytest.raises(AssertionError):
        tl.to_single_str_token("5")
    with pytest.raises(InputAssertionError, match="one int token id"):
        jl.to_single_str_token("5")
    with pytest.raises(InputError, match="outside the vocabulary"):
        jl.to_single_str_token(300)
    with pytest.raises(AssertionError):
        tl.to_single_token(" Mary and John")
    with pytest.raises(InputAssertionError, match="not one"):
        jl.to_single_token(" Mary and John")
    with pytest.raises(AssertionError):
        tl.get_token_position(" the", "Mary")
    with pytest.raises(InputAssertionError, match="does not occur"):
        jl.get_token_position(" the", "Mary")
    with pytest.raises(InputAssertionError, match=r"\[pos\] or \[1 pos\]"):
        jl.get_token_position(5, two)


def test_to_tokens_options_match_transformer_lens(gpt2):
    tl, jl = gpt2
    for kw in ({}, dict(padding_side="left"), dict(padding_side="right"), dict(prepend_bos=False),
               dict(move_to_device=False), dict(truncate=False)):
        want = tl.to_tokens(TEXTS, **kw).numpy()
        np.testing.assert_array_equal(np.asarray(jl.to_tokens(TEXTS, **kw)), want, err_msg=str(kw))
    truncated, whole = jl.to_tokens(LONG), jl.to_tokens(LONG, truncate=False)
    np.testing.assert_array_equal(np.asarray(truncated), tl.to_tokens(LONG).numpy())  # TL cuts to n_ctx
    np.testing.assert_array_equal(np.asarray(whole), tl.to_tokens(LONG, truncate=False).numpy())
    assert truncated.shape == (1, jl.cfg.n_ctx) and whole.shape[1] > jl.cfg.n_ctx
    with pytest.raises(InputError, match=rf"longer than the model's context n_ctx={jl.cfg.n_ctx}"):
        jl(whole)
    close(jl(LONG), tl(LONG), "logits of truncated text", atol=1e-3)
    with pytest.raises(InputError, match="padding_side must be 'right' or 'left'"):
        jl.to_tokens(TEXTS, padding_side="middle")


def test_from_pretrained_token_defaults_and_set_tokenizer(gpt2, gpt2_dir):
    tl, _ = gpt2
    jl = HookedTransformer.from_pretrained(gpt2_dir, default_prepend_bos=False, default_padding_side="left")
    assert jl.cfg.default_prepend_bos is False and jl.tokenizer.padding_side == "left"
    np.testing.assert_array_equal(np.asarray(jl.to_tokens(TEXTS)),
                                  tl.to_tokens(TEXTS, prepend_bos=False, padding_side="left").numpy())
    with pytest.raises(InputAssertionError, match="default_padding_side must be"):
        HookedTransformer.from_pretrained(gpt2_dir, default_padding_side="up")
    tok = testing.train_tiny_tokenizer(gpt2_dir / "other_tok")
    jl.set_tokenizer(tok, default_padding_side="right")
    assert jl.tokenizer is tok and tok.padding_side == "right"
    with pytest.raises(AssertionError):
        jl.set_tokenizer(tok, default_padding_side="up")


def test_input_to_embed_matches_transformer_lens(gpt2):
    tl, jl = gpt2
    with torch.no_grad():
        for inp in (TEXTS[0], TEXTS):
            want = tl.input_to_embed(inp)
            got = jl.input_to_embed(inp)
            assert len(got) == 4 and got[2] is None and want[2] is None
            close(got[0], want[0], f"residual {inp!r}")
            np.testing.assert_array_equal(np.asarray(got[1]), want[1].numpy())
            assert got[3] is None and want[3] is None  # right padding: no mask, as TL
            close(jl(got[0], start_at_layer=0), tl(want[0], start_at_layer=0), "resumed", atol=1e-3)
        try:  # a left-padding tokenizer: TL builds the attention mask of the left padding
            tl.tokenizer.padding_side = jl.tokenizer.padding_side = "left"
            want, got = tl.input_to_embed(PADDED), jl.input_to_embed(PADDED)
        finally:
            tl.tokenizer.padding_side = jl.tokenizer.padding_side = "right"
        np.testing.assert_array_equal(np.asarray(got[3]).astype(int), want[3].numpy())
        real = np.asarray(got[3]).astype(bool)
        assert not real.all()
        np.testing.assert_allclose(np_(got[0])[real], np_(want[0])[real], atol=ATOL)
        np.testing.assert_array_equal(np.asarray(jl.input_to_embed(PADDED, padding_side="left")[3]), real)
        ids = np.asarray(jl.to_tokens(TEXTS[1]))[0]  # ids [pos] become [1 pos]
        close(jl.input_to_embed(ids)[0], tl.input_to_embed(torch.tensor(ids))[0], "ids")


# -- loss ----------------------------------------------------------------------------------------------

def test_masked_loss_matches_transformer_lens(gpt2):
    tl, jl = gpt2
    tokens = np.random.default_rng(1).integers(1, 300, (2, 9))
    mask = np.ones((2, 9), bool)
    mask[1, :3] = False  # left padding
    with torch.no_grad():
        for per_token in (False, True):
            want = tl(torch.tensor(tokens), return_type="loss", attention_mask=torch.tensor(mask),
                      loss_per_token=per_token)
            got = jl(tokens, return_type="loss", attention_mask=mask, loss_per_token=per_token)
            close(got, want, f"masked loss, per_token={per_token}")
        unmasked = jl(tokens, return_type="loss")
    pairs = (mask[:, 1:] & mask[:, :-1]).sum()
    assert np.isclose(float(np.asarray(got).sum()) / pairs, float(want_mean := np_(tl(
        torch.tensor(tokens), return_type="loss", attention_mask=torch.tensor(mask)))), atol=ATOL)
    assert abs(float(unmasked) - float(want_mean)) > 1e-3  # the mask changes the loss
    _, both = jl(tokens, return_type="both", attention_mask=mask)
    close(both, jl(tokens, return_type="loss", attention_mask=mask), "both")


def test_loss_function_is_nan_safe_and_checks_shapes():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 6))
    mask = np.ones((2, 6), bool)
    mask[1, :2] = False
    logits[1, 0] = np.nan  # a NaN logit at a padded position must not reach the mean
    for per_token in (False, True):
        got = lm_cross_entropy_loss(jnp.asarray(logits), tokens, mask, per_token)
        want = tl_lm.lm_cross_entropy_loss(torch.tensor(logits), torch.tensor(tokens), torch.tensor(mask),
                                           per_token)
        assert np.isfinite(np.asarray(got)).all()
        close(got, want, f"per_token={per_token}")
    got = lm_cross_entropy_loss(jnp.asarray(logits), tokens, mask.astype(np.int32))  # int masks, as TL
    close(got, tl_lm.lm_cross_entropy_loss(torch.tensor(logits), torch.tensor(tokens), torch.tensor(mask)))
    with pytest.raises(AssertionError):
        tl_lm.lm_cross_entropy_loss(torch.tensor(logits), torch.tensor(tokens), torch.tensor(mask[:, :5]))
    with pytest.raises(InputAssertionError, match=r"tokens' shape \(2, 6\).*found \(2, 5\)"):
        lm_cross_entropy_loss(jnp.asarray(logits), tokens, mask[:, :5])


# -- weight processing, config, generate ----------------------------------------------------------------

def test_refactor_factored_attn_matrices_matches_transformer_lens(gpt2_dir, llama_dir):
    tl = boot(gpt2_dir, refactor_factored_attn_matrices=True)
    jl = HookedTransformer.from_pretrained(gpt2_dir, refactor_factored_attn_matrices=True)
    plain = HookedTransformer.from_pretrained(gpt2_dir)
    tokens = np.random.default_rng(2).integers(0, 300, (2, 11))
    with torch.no_grad():
        want = torch.log_softmax(tl(torch.tensor(tokens)), -1)
    close(jax.nn.log_softmax(jl(tokens), -1), want, "log-probs", atol=1e-3)
    close(jax.nn.log_softmax(plain(tokens), -1), want, "log-probs unchanged by refactoring", atol=1e-3)
    close(jl.OV.AB, plain.OV.AB, "OV circuit unchanged")
    close(jl.QK.AB, plain.QK.AB, "QK circuit unchanged")
    with torch.no_grad():
        for name in ("W_Q", "W_K", "W_V"):  # singular vectors: equal up to the sign of each d_head column
            got, ref = np_(getattr(jl, name)), np_(getattr(tl, name))
            sign = np.sign((got * ref).sum(-2, keepdims=True))
            np.testing.assert_allclose(got * sign, ref, atol=1e-3, err_msg=name)
        got, ref = np_(jl.W_O), np_(tl.W_O)
        np.testing.assert_allclose(got * np.sign((got * ref).sum(-1, keepdims=True)), ref, atol=1e-3)
        close(jl.b_O, tl.b_O, "b_O", atol=1e-4)
        close(jl.b_V, np.zeros(jl.b_V.shape), "b_V")
    with pytest.raises(ConfigError, match="rotary"):
        HookedTransformer.from_pretrained(llama_dir, refactor_factored_attn_matrices=True)


def test_config_attributes_match_transformer_lens(gpt2):
    tl, jl = gpt2
    assert jl.cfg.device == str(tl.cfg.device) == "cpu"
    assert jl.cfg.d_vocab_out == tl.cfg.d_vocab_out == 300
    assert jl.cfg.attn_only is tl.cfg.attn_only is False
    assert jl.cfg.use_hook_tokens is bool(getattr(tl.cfg, "use_hook_tokens", False)) is False
    assert "hook_tokens" not in jl.hook_names()


def test_greedy_generate_with_verbose_matches_transformer_lens(gpt2):
    tl, jl = gpt2
    with torch.no_grad():
        want = tl.generate(TEXTS[0], max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False)
    got = jl.generate(TEXTS[0], max_new_tokens=5, do_sample=False, verbose=False, stop_at_eos=False)
    assert got == want
