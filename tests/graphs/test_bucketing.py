"""Prompt-shape bucketing (issue 11): `attribute` pads a prompt on the right to its bucket's length and the
shape-setting counts to powers of two, so that (1) the graph is the one computed at the prompt's own length
(pad_to=None: every node, activation, logit probability and edge, 1e-5 relative), for a prompt exactly a
bucket long and one in between, and (2) a second prompt of another length in the same bucket compiles
nothing (XLA's backend compile events, counted through jax.monitoring), while without padding it does."""

import contextlib

import jax
import numpy as np
import pytest

from jaxlens.errors import InputError
from jaxlens.graphs import attribute
from jaxlens.graphs.attribute import bucket_length
from tests.graphs.graph_models import random_transcoders, tiny_model

N_CTX = 32
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, 29, size=n)]


@contextlib.contextmanager
def counting_compiles():
    """Yields a list that collects one entry per XLA compile (jit or eager op) inside the block."""
    seen = []

    def listen(event, duration, **kw):
        if event == COMPILE_EVENT:
            seen.append(kw)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_ctx=N_CTX)


@pytest.fixture(scope="module")
def transcoder_sets(model):
    """kind -> a random set: a cross-layer transcoder reading hook_resid_mid; skip transcoders reading
    circuit-tracer's mlp.hook_in."""
    return {"clt": random_transcoders(model.cfg, "clt", "hook_resid_mid"),
            "skip": random_transcoders(model.cfg, "skip", "mlp.hook_in")}


def test_bucket_length_by_hand():
    assert [bucket_length(n, 16) for n in (1, 2, 3, 5, 8, 9, 15, 16, 17, 32, 33)] == [
        1, 2, 4, 8, 8, 16, 16, 16, 32, 32, 48]
    assert [bucket_length(n, 12) for n in (7, 9, 12, 13)] == [8, 12, 12, 24]  # 16 > 12: capped at the step
    assert bucket_length(20, 16, n_ctx=24) == 24 and bucket_length(24, 16, n_ctx=24) == 24  # never past n_ctx
    assert bucket_length(13, None) == 13 and bucket_length(13, 1) == 13


@pytest.mark.parametrize("kind,n_pos,budget", [  # exactly a bucket (8); between buckets (13 -> 16)
    ("clt", 8, None), ("skip", 13, 30)])
def test_padded_graph_equals_unpadded(model, transcoder_sets, kind, n_pos, budget):
    """Equal up to float32 rounding: the padded programs have other shapes, so values that are differences
    of much larger terms (small activations, small edges) differ in their last bits, relative to the row's
    or the activations' scale."""
    transcoders, tokens = transcoder_sets[kind], _prompt(n_pos, n_pos)
    want = attribute(model, transcoders, tokens, max_feature_nodes=budget, pad_to=None)
    got = attribute(model, transcoders, tokens, max_feature_nodes=budget)  # default pad_to=16
    assert want.n_pos == got.n_pos == n_pos and len(want.active_features) > 30  # a budget of 30 bites
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.active_features, want.active_features)
    np.testing.assert_allclose(got.activation_values, want.activation_values, rtol=1e-5,
                               atol=1e-6 * want.activation_values.max())
    np.testing.assert_array_equal(got.selected_features, want.selected_features)
    np.testing.assert_array_equal(got.logit_tokens, want.logit_tokens)
    np.testing.assert_allclose(got.logit_probabilities, want.logit_probabilities, rtol=1e-5)
    A = want.adjacency
    assert got.adjacency.shape == A.shape and (A != 0).mean() > 0.1
    np.testing.assert_allclose(got.adjacency, A, rtol=1e-5, atol=1e-6 * np.abs(A).max())
    # the last real position's token and error nodes carry edges into the logits: nothing was cut off
    logits = A[got.logit_offset:]
    assert logits[:, got.n_features + (model.cfg.n_layers + 1) * n_pos - 1].all()


def test_same_bucket_compiles_nothing_new(model, transcoder_sets):
    """Prompts of 13 and 15 tokens (both bucket 16; other active-feature counts and logits) share every
    compiled program (the first call, every feature a node, runs rows at every depth); without padding a
    14-token prompt compiles (the counter sees compiles)."""
    transcoders = transcoder_sets["clt"]
    first = attribute(model, transcoders, _prompt(13, 1))
    with counting_compiles() as compiles:
        second = attribute(model, transcoders, _prompt(15, 2))
    assert len(first.active_features) != len(second.active_features)
    assert compiles == [], f"{len(compiles)} new compiles for a prompt of the same bucket"
    with counting_compiles() as compiles:
        attribute(model, transcoders, _prompt(14, 3), pad_to=None)
    assert len(compiles) >= 5  # the forward and the row programs, again


@pytest.mark.parametrize("pad_to", [0, -16])  # (non-ints: the annotation, checked in tests)
def test_bad_pad_to(model, transcoder_sets, pad_to):
    with pytest.raises(InputError, match=r"pad_to=.* must be a positive int \(the bucket step"):
        attribute(model, transcoder_sets["clt"], _prompt(5, 0), pad_to=pad_to)
