"""generate's TransformerLens options: sampling without a key draws a fresh key each call (warned once, as TL
samples afresh); `intervention_positions` says where an intervention applies ("prompt", "all", "absolute",
or "auto" by size, with an error where a one-token prompt makes that ambiguous), checked against greedy
decoding by full forwards; `verbose` and `padding_side` are accepted (no-ops, as in TL 4.3)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import Add, HookedTransformer, Patch, testing
from jaxlens import generate as gen_mod
from jaxlens.errors import InputError
from jaxlens.generate import generate

CFG = testing.tiny_config(n_ctx=24)
N = 5  # new tokens
PROMPT = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 4)), jnp.int32)
ONE = PROMPT[:, :1]  # a one-token prompt
NAME = "blocks.2.hook_resid_post"


@functools.cache
def params():
    return jaxlens.init_params(CFG, jax.random.key(3), scale=0.5)


@functools.partial(jax.jit, static_argnames="cfg")
def _logits(params, tokens, ivs, cfg):
    return jaxlens.forward(params, cfg, tokens, interventions=ivs)[0]


def reference(prompts, ivs=None):
    """Greedy decoding by full forwards over the fixed-size buffer (causal: later zeros do not matter), with
    interventions given one entry per absolute position."""
    b, p = prompts.shape
    buf = np.zeros((b, p + N), np.int32)
    buf[:, :p] = np.asarray(prompts)
    for i in range(N):
        logits = _logits(params(), jnp.asarray(buf), ivs or {}, CFG)
        buf[:, p + i] = np.asarray(logits[:, p + i - 1].argmax(-1))
    return buf


def greedy(prompts, ivs, **kw):
    return np.asarray(generate(params(), CFG, prompts, max_new_tokens=N, do_sample=False, stop_at_eos=False,
                               interventions=ivs, **kw))


def test_sampling_without_a_key_is_fresh_each_call_and_warns_once(monkeypatch):
    monkeypatch.setattr(gen_mod, "_warned_fresh_key", False)
    kw = dict(max_new_tokens=8, stop_at_eos=False, temperature=3.0)
    with pytest.warns(UserWarning, match=r"without key=: drawing a fresh random key.*key=jax.random.key"):
        a = np.asarray(generate(params(), CFG, PROMPT, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        draws = [np.asarray(generate(params(), CFG, PROMPT, **kw)) for _ in range(3)]
        np.asarray(generate(params(), CFG, PROMPT, max_new_tokens=3, do_sample=False, stop_at_eos=False))
    assert any(not np.array_equal(a, d) for d in draws)  # 16 tokens from 97 at temperature 3: never all equal
    key = jax.random.key(5)
    np.testing.assert_array_equal(np.asarray(generate(params(), CFG, PROMPT, key=key, **kw)),
                                  np.asarray(generate(params(), CFG, PROMPT, key=key, **kw)))


def test_prompt_all_and_absolute_on_a_one_token_prompt():
    rng = np.random.RandomState(1)
    vec = jnp.asarray(rng.randn(1, CFG.d_model) * 10.0, jnp.float32)  # [pos=1 d_model]
    at_prompt = jnp.concatenate([vec, jnp.zeros((N, CFG.d_model))])  # the same, written per absolute position
    want_prompt = reference(ONE, {NAME: Add(at_prompt)})
    want_all = reference(ONE, {NAME: Add(vec)})
    assert not np.array_equal(want_prompt, want_all)  # the two meanings differ
    np.testing.assert_array_equal(greedy(ONE, {NAME: Add(vec)}, intervention_positions="prompt"), want_prompt)
    np.testing.assert_array_equal(greedy(ONE, {NAME: Add(vec)}, intervention_positions="all"), want_all)
    np.testing.assert_array_equal(greedy(ONE, {NAME: Add(at_prompt)}, intervention_positions="absolute"),
                                  want_prompt)
    np.testing.assert_array_equal(greedy(ONE, {NAME: Add(vec)}, intervention_positions={NAME: "prompt"}),
                                  want_prompt)
    with pytest.raises(InputError, match=r"one-token prompt.*could mean the prompt only or every position.*"
                                         r"intervention_positions=\{'blocks.2.hook_resid_post': 'prompt'\}"):
        greedy(ONE, {NAME: Add(vec)})  # "auto" refuses to guess
    steer = jnp.asarray(rng.randn(CFG.d_model), jnp.float32)  # no position axis: every position, unambiguous
    np.testing.assert_array_equal(greedy(ONE, {NAME: Add(steer)}), reference(ONE, {NAME: Add(steer)}))
    mask = (jnp.arange(1 + N) % 2 == 0)[:, None]  # a whole-output-long leaf says the size-1 value broadcasts
    patch = Patch(jnp.zeros((1, CFG.d_model)), mask=mask)
    np.testing.assert_array_equal(greedy(ONE, {NAME: patch}), reference(ONE, {NAME: patch}))


def test_modes_on_a_longer_prompt_and_the_mapping_form():
    rng = np.random.RandomState(2)
    p = PROMPT.shape[1]
    steer = jnp.asarray(rng.randn(1, CFG.d_model), jnp.float32)
    prompt_only = jnp.asarray(rng.randn(p, CFG.d_model), jnp.float32)
    absolute = jnp.asarray(rng.randn(p + N, CFG.d_model), jnp.float32)
    ivs = {NAME: Add(steer), "blocks.0.hook_attn_out": Add(prompt_only),
           "blocks.2.hook_mlp_out": Add(absolute)}
    padded = jnp.concatenate([prompt_only, jnp.zeros((N, CFG.d_model))])
    want = reference(PROMPT, {NAME: Add(steer), "blocks.0.hook_attn_out": Add(padded),
                              "blocks.2.hook_mlp_out": Add(absolute)})
    modes = {NAME: "all", "blocks.0.hook_attn_out": "prompt", "blocks.2.hook_mlp_out": "absolute"}
    np.testing.assert_array_equal(greedy(PROMPT, ivs, intervention_positions=modes), want)
    np.testing.assert_array_equal(greedy(PROMPT, ivs), want)  # "auto" reads the same from the sizes
    # "prompt" on an array without a position axis: added at the prompt positions only
    flat = jnp.asarray(rng.randn(CFG.d_model), jnp.float32)
    want = reference(PROMPT, {NAME: Add(jnp.concatenate([jnp.broadcast_to(flat, (p, CFG.d_model)),
                                                         jnp.zeros((N, CFG.d_model))]))})
    np.testing.assert_array_equal(greedy(PROMPT, {NAME: Add(flat)}, intervention_positions="prompt"), want)


def test_positions_that_do_not_fit_the_mode_are_errors():
    p, d = PROMPT.shape[1], CFG.d_model
    cases = [
        ("all", jnp.zeros((p, d)), r"size 4 on its pos axis.*positions='all' it must be 1"),
        ("prompt", jnp.zeros((p + N, d)), r"size 9 on its pos axis.*'prompt' it must be 1 or the prompt's"),
        ("absolute", jnp.zeros((p, d)), r"size 4 on its pos axis.*'absolute' it must be prompt \+ max_new"),
        ("auto", jnp.zeros((p + 1, d)), r"size 5 on its pos axis.*'auto' it must be 1, 4 \(prompt\) or 9"),
    ]
    for mode, value, match in cases:
        with pytest.raises(InputError, match=match):
            greedy(PROMPT, {NAME: Add(value)}, intervention_positions=mode)
    with pytest.raises(InputError, match=r"intervention_positions must be one of \('auto', 'prompt', 'all'"):
        greedy(PROMPT, {NAME: Add(jnp.zeros(d))}, intervention_positions="everywhere")
    with pytest.raises(InputError, match=r"names \['blocks.0.hook_z'\], which are not among the interv"):
        greedy(PROMPT, {NAME: Add(jnp.zeros(d))}, intervention_positions={"blocks.0.hook_z": "all"})
    with pytest.raises(InputError, match="without the KV cache"):
        greedy(PROMPT, {NAME: Add(jnp.zeros(d))}, intervention_positions="prompt", use_past_kv_cache=False)
    key_pos = "blocks.0.attn.hook_pattern"  # a key_pos axis must cover every cache slot (or broadcast)
    with pytest.raises(InputError, match=r"key_pos axis.*must be 1 or prompt \+ max_new_tokens = 9"):
        greedy(PROMPT, {key_pos: Patch(jnp.zeros((p,)), mask=jnp.zeros((p,), bool))},
               intervention_positions="all")


def test_facade_accepts_verbose_padding_side_and_intervention_positions(tmp_path):
    tok = testing.train_tiny_tokenizer(tmp_path)
    cfg = CFG.replace(d_vocab=len(tok))
    model = HookedTransformer(cfg, jaxlens.init_params(cfg, jax.random.key(4), scale=0.5), tok)
    kw = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False)
    plain = model.generate("When Mary and", **kw)
    assert model.generate("When Mary and", verbose=False, padding_side="left", **kw) == plain
    vec = jnp.asarray(np.random.RandomState(3).randn(1, cfg.d_model) * 5.0, jnp.float32)
    ids = model.to_tokens("", prepend_bos=True)  # a one-token prompt (BOS)
    with pytest.raises(InputError, match="one-token prompt"):
        model.generate(ids, interventions={NAME: Add(vec)}, **kw)
    out = model.generate(ids, interventions={NAME: Add(vec)}, intervention_positions="all", **kw)
    assert np.asarray(out).shape == (1, 5)
    assert model.to_tokens("When Mary", move_to_device=False).shape == model.to_tokens("When Mary").shape
