"""generate: the KV-cache decode gives the tokens of greedy decoding by full forwards (argmax each step), also
under grouped-query rotary attention with a sliding window, left padding and interventions; sampling is
reproducible from its key; bad input gives clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import Add, HookedTransformer, Patch, testing
from jaxlens.errors import InputError
from jaxlens.generate import generate, sample_logits, steps_taken

GPT = testing.tiny_config(n_ctx=24)
LLAMA = testing.tiny_config(n_ctx=24, n_heads=6, n_key_value_heads=2, d_head=6, normalization_type="RMS",
                            positional_embedding_type="rotary", gated_mlp=True, act_fn="silu",
                            window_sizes=(None, 4, None))
P, N = 5, 6  # prompt length, new tokens
PROMPTS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, P)), jnp.int32)


@functools.cache
def params_of(cfg):
    return jaxlens.init_params(cfg, jax.random.key(3), scale=0.5)


@functools.partial(jax.jit, static_argnames="cfg")
def _logits(params, tokens, ivs, mask, cfg):
    return jaxlens.forward(params, cfg, tokens, interventions=ivs, attention_mask=mask)[0]


def reference(cfg, prompts, n, ivs=None, mask=None):
    """Greedy decoding by full forwards over a fixed-size buffer: causal attention makes the logits at
    position i independent of the (zero) tokens after it, so each step reads the argmax at the last real
    position (one compile per shape; test_greedy_equals_hf_generate checks against HF's growing sequences)."""
    b, p = prompts.shape
    buf = np.zeros((b, p + n), np.int32)
    buf[:, :p] = np.asarray(prompts)
    full_mask = None if mask is None else jnp.concatenate([mask, jnp.ones((b, n), bool)], axis=1)
    for i in range(n):
        logits = _logits(params_of(cfg), jnp.asarray(buf), ivs or {}, full_mask, cfg)
        buf[:, p + i] = np.asarray(logits[:, p + i - 1].argmax(-1))
    return buf


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "gqa_rotary_window"])
def test_kv_cache_equals_greedy_full_forward(cfg):
    want = reference(cfg, PROMPTS, N)
    got = generate(params_of(cfg), cfg, PROMPTS, max_new_tokens=N, do_sample=False, stop_at_eos=False)
    np.testing.assert_array_equal(np.asarray(got), want)
    if cfg is LLAMA:  # the path without a KV cache (re-runs the whole buffer each step) gives the same tokens
        no_cache = generate(params_of(cfg), cfg, PROMPTS, max_new_tokens=N, do_sample=False,
                            stop_at_eos=False, use_past_kv_cache=False)
        np.testing.assert_array_equal(np.asarray(no_cache), want)


def test_left_padded_batch_equals_each_prompt_alone():
    short = PROMPTS[1, 2:]
    padded = PROMPTS.at[1, :2].set(0)
    mask = jnp.asarray([[True] * P, [False, False] + [True] * (P - 2)])
    got = np.asarray(generate(params_of(LLAMA), LLAMA, padded, attention_mask=mask, max_new_tokens=N,
                              do_sample=False, stop_at_eos=False))
    np.testing.assert_array_equal(got[0], reference(LLAMA, PROMPTS, N)[0])
    np.testing.assert_array_equal(got[1, P:], reference(LLAMA, short[None], N)[0, P - 2:])


def test_steering_add_matches_full_forward_loop():
    """A steering vector added at blocks.1.hook_resid_post (every position, generated ones included) changes
    the greedy tokens exactly as a full-forward loop with the same intervention does (through the facade)."""
    steer = jnp.asarray(np.random.RandomState(2).randn(GPT.d_model) * 2.0, jnp.float32)
    ivs = {"blocks.1.hook_resid_post": Add(steer)}
    model = HookedTransformer(GPT, params_of(GPT), None)
    got = np.asarray(model.generate(PROMPTS, max_new_tokens=N, do_sample=False, stop_at_eos=False,
                                    interventions=ivs))
    want = reference(GPT, PROMPTS, N, ivs)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want[:, P:], reference(GPT, PROMPTS, N)[:, P:])


def test_steering_and_position_interventions_match_reference():
    cfg, rng = LLAMA, np.random.RandomState(1)
    steer = jnp.asarray(rng.randn(cfg.d_model), jnp.float32)
    prompt_only = jnp.asarray(rng.randn(P, cfg.d_model), jnp.float32)
    per_position = jnp.asarray(rng.randn(P + N, cfg.d_model), jnp.float32)
    stacked = jnp.asarray(rng.randn(cfg.n_layers, 1, cfg.d_model), jnp.float32)
    ivs = {"blocks.1.hook_resid_post": Add(steer), "blocks.0.hook_attn_out": Add(prompt_only),
           "blocks.2.hook_mlp_out": Patch(per_position, mask=jnp.arange(P + N)[:, None] % 3 == 0),
           "blocks.hook_resid_mid": Add(stacked)}
    got = generate(params_of(cfg), cfg, PROMPTS, max_new_tokens=N, do_sample=False, stop_at_eos=False,
                   interventions=ivs)
    padded_prompt_only = jnp.concatenate([prompt_only, jnp.zeros((N, cfg.d_model))])
    ref_ivs = dict(ivs, **{"blocks.0.hook_attn_out": Add(padded_prompt_only)})
    want = reference(cfg, PROMPTS, N, ref_ivs)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert not np.array_equal(want, reference(cfg, PROMPTS, N))  # the interventions change the output


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    params, kw = params_of(GPT), dict(max_new_tokens=N, stop_at_eos=False, temperature=2.0)
    greedy = np.asarray(generate(params, GPT, PROMPTS, max_new_tokens=N, do_sample=False, stop_at_eos=False))
    a = np.asarray(generate(params, GPT, PROMPTS, key=jax.random.key(7), top_p=1.0, **kw))
    b = np.asarray(generate(params, GPT, PROMPTS, key=jax.random.key(7), top_p=1.0, **kw))
    c = np.asarray(generate(params, GPT, PROMPTS, key=jax.random.key(8), top_p=1.0, **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, greedy)
    key = jax.random.key(7)
    np.testing.assert_array_equal(np.asarray(generate(params, GPT, PROMPTS, key=key, top_k=1, **kw)), greedy)
    tiny_p = generate(params, GPT, PROMPTS, key=key, top_p=1e-6, **kw)
    np.testing.assert_array_equal(np.asarray(tiny_p), greedy)
    no_repeat = np.asarray(generate(params, GPT, PROMPTS, key=key, top_k=1, freq_penalty=1e3, **kw))
    for row in no_repeat:  # a huge frequency penalty never picks a token already in the sequence
        assert len(set(row[P:])) == N and not set(row[P:]) & set(row[:P])


def test_top_p_temperature_samples_stay_in_the_top_p_set():
    """Every sampled token lies in the smallest set of most likely tokens (probabilities of logits / T, from
    full forwards over the generated prefix) reaching top_p; the samples are not all the argmax."""
    cfg, temp, top_p = GPT, 1.5, 0.6
    params, not_argmax = params_of(cfg), 0
    for seed in range(3):
        out = np.asarray(generate(params, cfg, PROMPTS, max_new_tokens=N, key=jax.random.key(seed),
                                  stop_at_eos=False, temperature=temp, top_p=top_p))
        logits = np.asarray(_logits(params, jnp.asarray(out), {}, None, cfg), np.float64)[:, P - 1:-1] / temp
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for b in range(out.shape[0]):
            for i in range(N):
                p, tok = probs[b, i], out[b, P + i]
                order = np.argsort(-p)
                n_keep = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1  # first index reaching top_p
                assert tok in set(order[:n_keep]), (seed, b, i)
                assert n_keep < cfg.d_vocab
                not_argmax += tok != order[0]
    assert not_argmax > 0


def test_one_compiled_loop_per_shape():
    """A second call with other prompts, key or sampling values of the same shapes compiles nothing new."""
    from jaxlens.generate import _generate_jit

    kw = dict(max_new_tokens=N, stop_at_eos=False, top_p=0.9)
    generate(params_of(GPT), GPT, PROMPTS, key=jax.random.key(0), temperature=1.0, **kw)
    size = _generate_jit._cache_size()
    generate(params_of(GPT), GPT, PROMPTS[::-1], key=jax.random.key(1), temperature=0.7, **kw)
    assert _generate_jit._cache_size() == size


def test_sample_logits_filters():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda **kw: np.asarray(jax.vmap(lambda k: sample_logits(logits, k, **kw))(keys))[:, 0]
    assert set(draw(top_k=2)) == {1, 3}
    assert set(draw(top_p=0.7)) == {1, 3}  # 0.5 then 0.3 reaches 0.7; 0.15 would come after 0.8
    assert set(draw(top_p=0.45)) == {1}
    assert set(draw()) == {0, 1, 2, 3}
    assert int(sample_logits(logits, keys[0], greedy=True)[0]) == 1


def test_stops_at_eos_and_pads_with_it():
    want = reference(GPT, PROMPTS, N)
    eos = int(want[0, P + 1])  # row 0 produces it at its second step
    got = np.asarray(generate(params_of(GPT), GPT, PROMPTS, max_new_tokens=N, do_sample=False,
                              eos_token_id=eos))
    np.testing.assert_array_equal(got[0, : P + 2], want[0, : P + 2])
    assert (got[0, P + 2:] == eos).all()
    row1_end = np.nonzero(want[1, P:] == eos)[0]
    stop1 = row1_end[0] + 1 if row1_end.size else N
    np.testing.assert_array_equal(got[1, : P + stop1], want[1, : P + stop1])
    assert steps_taken(got, P, eos) == max(2, stop1)


def test_facade_text_in_text_out(tmp_path):
    tok = testing.train_tiny_tokenizer(tmp_path)
    cfg = GPT.replace(d_vocab=len(tok))
    model = HookedTransformer(cfg, jaxlens.init_params(cfg, jax.random.key(4), scale=0.5), tok)
    one = model.generate("When Mary and", max_new_tokens=4, do_sample=False, stop_at_eos=False)
    ids = np.asarray(model.to_tokens("When Mary and"))
    want = np.asarray(generate(model.params, cfg, jnp.asarray(ids), max_new_tokens=4, do_sample=False,
                               stop_at_eos=False))
    assert one == tok.decode(want[0, 1:].tolist()) and one.startswith("When Mary and")
    both = model.generate(["When Mary and", "The"], max_new_tokens=4, do_sample=False, stop_at_eos=False)
    assert both[0] == one and both[1] == model.generate("The", max_new_tokens=4, do_sample=False,
                                                        stop_at_eos=False)
    toks = model.generate(jnp.asarray(ids[0]), max_new_tokens=4, do_sample=False, stop_at_eos=False)
    np.testing.assert_array_equal(np.asarray(toks), want)


def test_bad_inputs():
    params = params_of(GPT)
    kw = dict(max_new_tokens=N, do_sample=False, stop_at_eos=False)
    with pytest.raises(InputError, match="exceeds the model's context n_ctx=24"):
        generate(params, GPT, PROMPTS, max_new_tokens=20, do_sample=False, stop_at_eos=False)
    with pytest.raises(InputError, match="needs an EOS id"):
        generate(params, GPT, PROMPTS, max_new_tokens=N)
    with pytest.raises(InputError, match=r"Empty prompt \(tokens of shape \(1, 0\)\).*prepend_bos=True"):
        generate(params, GPT, jnp.zeros((1, 0), jnp.int32), **kw)
    with pytest.raises(InputError, match="size 6 on its pos axis"):
        generate(params, GPT, PROMPTS, interventions={"hook_embed": Add(jnp.zeros((P + 1, GPT.d_model)))},
                 **kw)
    with pytest.raises(InputError, match="left padding"):
        right_padded = jnp.asarray([[True] * P, [True] * (P - 1) + [False]])
        generate(params, GPT, PROMPTS, attention_mask=right_padded, **kw)
    with pytest.raises(InputError, match="without the KV cache"):
        generate(params, GPT, PROMPTS, interventions={"hook_embed": Add(jnp.zeros((P, GPT.d_model)))},
                 use_past_kv_cache=False, **kw)
    with pytest.raises(InputError, match="top_k"):
        generate(params, GPT, PROMPTS, top_k=0, max_new_tokens=N, stop_at_eos=False)
    with pytest.raises(InputError, match=r"temperature must be >= 0 \(0 is greedy\); found -1.0"):
        generate(params, GPT, PROMPTS, temperature=-1.0, max_new_tokens=N, stop_at_eos=False)
    with pytest.raises(InputError, match="max_new_tokens must be a non-negative int; found -1"):
        generate(params, GPT, PROMPTS, max_new_tokens=-1, do_sample=False, stop_at_eos=False)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(InputError, match=rf"top_p must be in \(0, 1\] or None; found {bad}"):
            generate(params, GPT, PROMPTS, top_p=bad, max_new_tokens=N, stop_at_eos=False)
    model = HookedTransformer(GPT, params, None)
    with pytest.raises(InputError, match="Empty prompt"):
        model.generate(jnp.zeros((1, 0), jnp.int32), max_new_tokens=2, stop_at_eos=False)
    with pytest.raises(InputError, match="Ask for at most 19 new tokens"):
        model.generate(PROMPTS, max_new_tokens=20, stop_at_eos=False)


# -- against Hugging Face transformers -----------------------------------------------------------------

HF_CASES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=32, bos_token_id=None, eos_token_id=None,
        pad_token_id=0)),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=80, vocab_size=97, max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
        pad_token_id=0)),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_greedy_equals_hf_generate(case, tmp_path):
    """Greedy tokens equal `transformers`' generate(do_sample=False) on the same random saved model, for a
    left-padded batch of prompts of different lengths (row 0 unpadded; HF takes positions from the mask)."""
    import torch

    cls, model_cls, conf = HF_CASES[case]
    hf = testing.random_hf_model(cls, model_cls, seed=5, initializer_range=0.1, **conf)
    model = HookedTransformer.from_pretrained_no_processing(testing.save_hf_model(hf, tmp_path))
    mask = np.asarray([[True] * P, [False, False] + [True] * (P - 2)])
    padded = np.where(mask, np.array(PROMPTS), 0)
    with torch.no_grad():
        want = hf.generate(torch.as_tensor(padded, dtype=torch.long), do_sample=False, max_new_tokens=N,
                           attention_mask=torch.as_tensor(mask, dtype=torch.long), pad_token_id=0).numpy()
    got = generate(model.params, model.cfg, jnp.asarray(padded), max_new_tokens=N, do_sample=False,
                   stop_at_eos=False, attention_mask=jnp.asarray(mask))
    assert want.shape == (2, P + N)
    np.testing.assert_array_equal(np.asarray(got), want)
