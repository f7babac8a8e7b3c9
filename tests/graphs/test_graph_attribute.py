"""attribute(): nodes, their order, logit selection and prefix zeroing by hand; the feature budget against a
brute-force influence ranking; each bad input a clear error."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import forward
from jaxlens.errors import InputError
from jaxlens.graphs import attribute
from jaxlens.graphs.attribute import _decoder_dots, _site_layout, prompt_tokens
from jaxlens.graphs.replacement import TranscoderError
from tests.graphs.graph_models import TOKENS, random_transcoders, tiny_model


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_model("gpt2", seed=1)
    return model, random_transcoders(model.cfg, "plt", "hook_resid_mid", seed=1)


def test_nodes_logits_and_zeroing_by_hand(gpt2):
    model, tcs = gpt2
    cfg, L, P = model.cfg, model.cfg.n_layers, len(TOKENS)
    logits, cache = forward(model.params, cfg, jnp.asarray(TOKENS)[None],
                            cache_names=["blocks.hook_resid_mid"])
    probs = np.asarray(jnp.exp(logits[0, -1] - logits[0, -1].max()))
    probs = probs / probs.sum()
    order = np.argsort(-probs)
    # the prefix of the 6 most probable reaching half the probability mass, by hand
    n_want = next(i + 1 for i in range(6) if probs[order[:i + 1]].sum() >= 0.5)
    graph = attribute(model, tcs, TOKENS, max_n_logits=6, desired_logit_prob=0.5, zero_positions=2,
                      batch_size=8)
    np.testing.assert_array_equal(graph.logit_tokens, order[:n_want])
    np.testing.assert_allclose(graph.logit_probabilities, probs[order[:n_want]], rtol=1e-5)

    acts = np.stack([np.asarray(tcs[l].encode(cache["blocks.hook_resid_mid"][l, 0])) for l in range(L)])
    acts[:, :2] = 0  # zero_positions=2
    want = [(l, p, f) for l in range(L) for p in range(P) for f in range(acts.shape[2]) if acts[l, p, f] != 0]
    np.testing.assert_array_equal(graph.active_features, np.asarray(want).reshape(-1, 3))
    # atol: a small activation is a difference of O(1) terms, rounded otherwise at the padded length
    np.testing.assert_allclose(graph.activation_values, acts[acts != 0], rtol=1e-5, atol=1e-6 * acts.max())
    np.testing.assert_array_equal(graph.selected_features, np.arange(len(want)))

    n = len(want) + L * P + P + n_want
    A = graph.adjacency
    assert A.shape == (n, n) and graph.logit_offset == n - n_want
    assert not A[graph.error_offset:graph.logit_offset].any()  # error and token nodes are never targets
    assert not A[:, graph.logit_offset:].any()  # logits are never sources
    err_cols = A[:, graph.error_offset:graph.token_offset].reshape(n, L, P)
    assert not err_cols[:, :, :2].any() and err_cols[:, :, 2:].any()  # prefix errors zeroed
    tok_cols = A[:, graph.token_offset:graph.logit_offset]
    assert tok_cols[:, 0].any() and tok_cols[:, P - 1].any()  # the BOS embedding is a source like any
    # a feature depends only on sources at its layer's inputs: earlier layers, positions at or before it
    f = graph.active_features
    for t in range(0, len(f), 7):
        later = (f[:, 0] >= f[t, 0]) | (f[:, 1] > f[t, 1])
        assert not A[t, :len(f)][later].any()


def _brute_force_selection(A_full, n_active, probs, budget, batch_size, interval=4):
    """circuit-tracer's visiting order from the full adjacency: features ranked by influence on the logits
    through the rows known so far, sum_k p N^k = p N (I - N)^-1 solved exactly in float64; every
    `interval * batch_size` rows the ranking is redone."""
    n = A_full.shape[0]
    n_logits = len(probs)
    known = np.zeros(n, bool)
    known[n - n_logits:] = True
    visited = []
    while len(visited) < budget:
        N = np.where(known[:, None], np.abs(A_full).astype(np.float64), 0.0)
        N /= np.maximum(N.sum(1, keepdims=True), 1e-8)
        p = np.zeros(n)
        p[n - n_logits:] = probs
        infl = np.linalg.solve((np.eye(n) - N).T, (p @ N))
        rank = [i for i in np.argsort(-infl[:n_active], kind="stable") if i not in visited]
        take = rank[:min(interval * batch_size, budget - len(visited))]
        visited += take
        known[take] = True
    return np.sort(visited)


def test_feature_budget_visits_most_influential(gpt2):
    model, tcs = gpt2
    full = attribute(model, tcs, TOKENS, batch_size=16)
    budget, bs = 20, 2  # 20 rows in batches of 2: the ranking is redone after every 8 rows
    small = attribute(model, tcs, TOKENS, max_feature_nodes=budget, batch_size=bs)
    want = _brute_force_selection(full.adjacency, full.n_features, full.logit_probabilities, budget, bs)
    np.testing.assert_array_equal(small.selected_features, want)
    one_round = attribute(model, tcs, TOKENS, max_feature_nodes=budget, batch_size=8)  # 32 rows: one ranking
    direct = _brute_force_selection(full.adjacency, full.n_features, full.logit_probabilities, budget, 8)
    np.testing.assert_array_equal(one_round.selected_features, direct)
    assert not np.array_equal(direct, want)  # the re-ranking matters here
    keep = np.concatenate([want, np.arange(full.error_offset, full.adjacency.shape[0])])
    np.testing.assert_allclose(small.adjacency, full.adjacency[np.ix_(keep, keep)], rtol=1e-5, atol=1e-6)
    assert small.adjacency.shape == (budget + (model.cfg.n_layers + 1) * len(TOKENS) + small.n_logits,) * 2


# -- bad input -----------------------------------------------------------------------------------------------
def _with_hooks(tcs, hook_in=None, hook_out=None):
    out = {}
    for l, t in tcs.items():
        changes = {}
        if hook_in:
            changes["hook_name"] = f"blocks.{l}.{hook_in}"
        if hook_out:
            changes["hook_name_out"] = f"blocks.{l}.{hook_out}"
        t.cfg = dataclasses.replace(t.cfg, **changes)
        out[l] = t
    return out


def test_bad_transcoders_are_clear_errors(gpt2):
    model, _ = gpt2
    fresh = lambda **kw: random_transcoders(model.cfg, "plt", "hook_resid_mid", **kw)
    with pytest.raises(TranscoderError, match=r"reads 'hook_resid_post', which is not an MLP input"):
        attribute(model, _with_hooks(fresh(), hook_in="hook_resid_post"), TOKENS)
    with pytest.raises(TranscoderError, match=r"writes 'hook_attn_out'.*hook_mlp_out"):
        attribute(model, _with_hooks(fresh(), hook_out="hook_attn_out"), TOKENS)
    parallel = tiny_model("parallel")
    with pytest.raises(TranscoderError, match=r"reads 'hook_resid_mid'.*parallel"):
        attribute(parallel, random_transcoders(parallel.cfg, "clt", "hook_resid_mid"), TOKENS)
    narrow = tiny_model("gpt2", d_model=8, d_head=2)
    with pytest.raises(TranscoderError, match=r"d_in=16 and writes d_out=16, but the model's d_model is 8"):
        attribute(narrow, fresh(), TOKENS)
    tcs = fresh()
    del tcs[1]
    with pytest.raises(TranscoderError, match=r"missing layers \[1\]"):
        attribute(model, tcs, TOKENS)
    folded = tiny_model("llama", normalization_type="RMSPre")
    with pytest.raises(TranscoderError, match=r"mlp.hook_in.*fold_ln.*fold_ln=False"):
        attribute(folded, random_transcoders(folded.cfg, "plt", "mlp.hook_in"), TOKENS)
    with pytest.raises(TranscoderError, match=r"must be \{layer: Transcoder\}"):
        attribute(model, [fresh()[0]], TOKENS)


def test_bad_prompts_and_options_are_clear_errors(gpt2):
    model, tcs = gpt2
    with pytest.raises(InputError, match=r"13 tokens.*n_ctx=12"):
        attribute(model, tcs, list(range(13)))
    with pytest.raises(InputError, match=r"no tokenizer.*token ids"):
        attribute(model, tcs, "a string")
    with pytest.raises(InputError, match=r"counts feature nodes only.*error, token and logit nodes.*>= 1"):
        attribute(model, tcs, TOKENS, max_feature_nodes=0)
    with pytest.raises(InputError, match=r"max_n_logits=0 must be an int in \[1, d_vocab=29\]"):
        attribute(model, tcs, TOKENS, max_n_logits=0)
    with pytest.raises(InputError, match=r"desired_logit_prob=1.5"):
        attribute(model, tcs, TOKENS, desired_logit_prob=1.5)
    with pytest.raises(InputError, match=r"zero_positions=6 must be an int in \[0, n_pos=6\)"):
        attribute(model, tcs, TOKENS, zero_positions=6)


class _Tokenizer:
    """The few tokenizer members ensure_tokenized reads."""

    bos_token_id, pad_token_id, eos_token_id, all_special_ids = 0, None, 0, [0]

    def __call__(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [ord(c) - 96 for c in text]}


def test_prompt_tokens_prepend_a_special_token_unless_present(gpt2):
    model, _ = gpt2
    model = type(model)(model.cfg, model.params, _Tokenizer())
    np.testing.assert_array_equal(prompt_tokens(model, "cab"), [0, 3, 1, 2])
    np.testing.assert_array_equal(prompt_tokens(model, [5, 6]), [0, 5, 6])
    np.testing.assert_array_equal(prompt_tokens(model, np.array([[0, 5, 6]])), [0, 5, 6])
    with pytest.raises(InputError, match=r"13 tokens \(with the special token prepended first\)"):
        prompt_tokens(model, "abcdefghijkl")


@pytest.mark.parametrize("n_layers_run", [3, 2, 1, 0])
def test_decoder_dots_by_site_equal_one_gather(n_layers_run):
    """Each row's gradient at its decoder row's site dotted with the vector, summed per source (a source may
    own several rows, as a cross-layer feature), for the sites of the first layers only (a truncated run),
    with sites holding more rows than a block."""
    rng = np.random.default_rng(0)
    L, P, D, n_rows, n_src = 3, 2, 5, 23, 9
    layer, pos = rng.integers(0, L, size=n_rows), rng.integers(0, P, size=n_rows)
    layer[:7], pos[:7] = 1, 0  # one busy site: blocks of 3 rows, so it takes 3 blocks
    src = np.concatenate([np.arange(n_src), rng.integers(0, n_src, size=n_rows - n_src)])
    vecs = rng.normal(size=(n_rows, D)).astype(np.float32)
    grads = rng.normal(size=(n_layers_run, 4, P, D)).astype(np.float32)  # [layer batch pos d_model]
    want = np.zeros((4, n_src))
    for r in range(n_rows):
        if layer[r] < n_layers_run:
            want[:, src[r]] += grads[layer[r], :, pos[r]] @ vecs[r]
    arrays, below = _site_layout((vecs, layer, pos, src), L, P, n_src, width=3)
    got = _decoder_dots(jnp.asarray(grads), arrays, int(below[n_layers_run]), n_src)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
