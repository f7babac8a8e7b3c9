"""Feature interventions: with no edit the model itself; frozen, an edit moves every target by the graph's
column of the edited feature (the adjacency comes from attribute's VJPs, the intervention from value-frozen
forwards: two code paths); unfrozen, the same change as ordinary Add interventions at the MLP outputs with
the transcoder modules' own activations; check_graph against a numpy influence ranking and those ablations."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import forward
from jaxlens.errors import InputError
from jaxlens.graphs import AttributionGraph, attribute
from jaxlens.graphs.interventions import FeatureEdit, ablation_effects, check_graph, intervene
from jaxlens.interventions import Add
from tests.graphs.graph_models import TOKENS, random_transcoders, tiny_model

CASES = [  # family, transcoder kind, input hook, activation
    ("llama", "plt", "mlp.hook_in", "relu"),
    ("gpt2", "skip", "hook_resid_mid", "jumprelu"),
    ("llama", "clt", "hook_resid_mid", "relu"),
]
#: The frozen model is affine: an edit ALPHA times a feature's activation moves the targets ALPHA times its
#: column, far above float32's cancellation of the clean values.
ALPHA = 1000.0


def _case(family, kind, hook, act):
    model = tiny_model(family)
    return model, random_transcoders(model.cfg, kind, hook, activation=act)


def _demeaned(logits):
    last = np.asarray(logits, np.float64)[0, -1]
    return last - last.mean()


def _inputs(model, hook, ivs=None):
    """[layer pos d_model] the transcoder inputs of the model's own run (with `ivs`)."""
    from tests.graphs.graph_models import _inputs as inputs
    from tests.graphs.graph_models import _read_name

    _, cache = forward(model.params, model.cfg, jnp.asarray(TOKENS)[None], interventions=ivs,
                       cache_names=[f"blocks.{_read_name(hook)}"])
    return inputs(model.params, model.cfg, cache, hook)


@pytest.mark.parametrize("case", CASES[1:])  # CASES[0]'s frozen run is checked against the model below
def test_no_edit_is_the_model(case):
    model, tcs = _case(*case)
    out = intervene(model, tcs, TOKENS, [])
    ref = np.asarray(model(jnp.asarray(TOKENS)[None]))
    np.testing.assert_array_equal(out.logits, ref)
    x = _inputs(model, case[2])
    acts = np.stack([_encode(tcs, x, l) for l in range(len(x))])
    np.testing.assert_allclose(out.activations, acts, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_frozen_edit_moves_targets_by_the_graph_column(case):
    model, tcs = _case(*case)
    graph = attribute(model, tcs, TOKENS, batch_size=16)
    feats = graph.active_features[graph.selected_features]
    acts = graph.activation_values[graph.selected_features]
    clean = intervene(model, tcs, TOKENS, [], freeze=True)
    np.testing.assert_allclose(clean.logits, np.asarray(model(jnp.asarray(TOKENS)[None])), rtol=1e-5,
                               atol=1e-5)
    A, reached = graph.adjacency, 0
    picks = np.linspace(0, graph.n_features - 1, 6).astype(int)
    for j, i in enumerate(picks):
        l, p, f = (int(v) for v in feats[i])
        a = float(acts[i])
        # each op written so that the feature's vector grows by `factor` times itself
        ops = [("add", ALPHA * a, ALPHA), ("scale", 1 + ALPHA, ALPHA), ("set", 0.0, -1.0)]
        op, value, factor = ops[j % 3]
        out = intervene(model, tcs, TOKENS, [FeatureEdit(l, p, f, value, op)], freeze=True)
        d_pre = (out.pre_activations.astype(np.float64) - clean.pre_activations)[feats[:, 0], feats[:, 1],
                                                                                   feats[:, 2]]
        d_logit = (_demeaned(out.logits) - _demeaned(clean.logits))[graph.logit_tokens]
        want = factor * np.concatenate([A[:graph.n_features, i], A[graph.logit_offset:, i]])
        got = np.concatenate([d_pre, d_logit])
        scale = np.abs(want).max()
        reached += scale > 1e-2 * abs(factor)
        atol = 1e-5 * max(scale, 1e-2 * abs(factor)) + (1e-5 if factor == -1 else 0)
        np.testing.assert_allclose(got, want, rtol=1e-5 if abs(factor) > 1 else 1e-4, atol=atol,
                                   err_msg=f"{op} of node {i}")
        held = out.activations.copy()
        held[l, p, f] = clean.activations[l, p, f]
        np.testing.assert_array_equal(held, clean.activations)  # every other feature held
        assert out.activations[l, p, f] == pytest.approx(a + factor * a, rel=1e-5, abs=1e-5)
    assert reached >= 3


def _decoder(tcs, l, f):
    """[layer d_model] what feature f of layer l writes to every layer's MLP output."""
    if isinstance(tcs, dict):
        out = np.zeros((len(tcs), tcs[l].cfg.d_in), np.float32)
        out[l] = np.asarray(tcs[l].W_dec[...])[f]
        return out
    W = np.asarray(tcs.W_dec[...])[l, f].copy()
    W[:l] = 0
    return W


def _add(tcs, edits, n_pos):
    """{blocks.hook_mlp_out: Add} adding each (layer, pos, feature, change) decoded, over every layer."""
    L = len(tcs) if isinstance(tcs, dict) else tcs.cfg.n_layers
    delta = np.zeros((L, 1, n_pos, _decoder(tcs, 0, 0).shape[1]), np.float32)
    for l, p, f, change in edits:
        delta[:, 0, p] += change * _decoder(tcs, l, f)
    return {"blocks.hook_mlp_out": Add(jnp.asarray(delta))}


def _encode(tcs, x, l):
    if isinstance(tcs, dict):
        return np.asarray(tcs[l].encode(x[l]))
    return np.asarray(tcs.encode(jnp.moveaxis(x, 0, 1))[:, l])


@pytest.mark.parametrize("case", [CASES[1], CASES[2]])
def test_real_edits_equal_added_decoder_vectors(case):
    model, tcs = _case(*case)
    hook, P, tok = case[2], len(TOKENS), jnp.asarray(TOKENS)[None]
    x0 = _inputs(model, hook)
    first = (0, 3, 5, 2.5)  # add 2.5 to feature 5 of layer 0 at position 3
    a1 = float(_encode(tcs, x0, 1)[4, 7])
    # layer 1's feature 7 after the first edit, read by the transcoder module from the edited run
    x1 = _inputs(model, hook, _add(tcs, [first], P))
    b1 = float(_encode(tcs, x1, 1)[4, 7])
    edits = [FeatureEdit(0, 3, 5, 2.5, "add"), FeatureEdit(1, -2, 7, 0.5, "scale")]
    out = intervene(model, tcs, TOKENS, edits)
    ref = model(tok, interventions=_add(tcs, [first, (1, 4, 7, -0.5 * b1)], P))
    np.testing.assert_allclose(out.logits, np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert out.activations[1, 4, 7] == pytest.approx(0.5 * b1, rel=1e-5, abs=1e-6)
    x2 = _inputs(model, hook, _add(tcs, [first, (1, 4, 7, -0.5 * b1)], P))
    np.testing.assert_allclose(out.activations[2], _encode(tcs, x2, 2), rtol=1e-5, atol=1e-5)
    assert abs(b1 - a1) > 1e-3 or a1 == 0  # the first edit reached the second's feature (or both off)


def _influence(A, probs):
    """Every node's influence on the logits, p N (I - N)^-1, solved in float64."""
    n = len(A)
    N = np.abs(A).astype(np.float64)
    N /= np.maximum(N.sum(1, keepdims=True), 1e-10)
    p = np.zeros(n)
    p[n - len(probs):] = probs
    return np.linalg.solve((np.eye(n) - N).T, p @ N)


def test_check_graph_against_ablations():
    model, tcs = _case("gpt2", "plt", "hook_resid_mid", "relu")
    graph = attribute(model, tcs, TOKENS, batch_size=16)
    check = check_graph(model, tcs, graph, top=6, batch_size=4)
    infl = _influence(graph.adjacency, graph.logit_probabilities)[:graph.n_features]
    np.testing.assert_array_equal(check.nodes, np.argsort(-infl)[:6])
    feats = graph.active_features[graph.selected_features]
    tok = int(graph.logit_tokens[0])
    base = _demeaned(model(jnp.asarray(TOKENS)[None]))[tok]
    for j, i in enumerate(check.nodes):
        l, p, f = (int(v) for v in feats[i])
        a = float(graph.activation_values[graph.selected_features[i]])
        ablated = _demeaned(model(jnp.asarray(TOKENS)[None], interventions=_add(tcs, [(l, p, f, -a)], 6)))
        assert check.measured[j] == pytest.approx(ablated[tok] - base, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(check.predicted_direct, -graph.adjacency[graph.logit_offset, check.nodes])
    scale = np.abs(check.predicted_direct).max()
    np.testing.assert_allclose(check.measured_frozen, check.predicted_direct, rtol=1e-4, atol=1e-5 * scale)
    s = check.summary()
    assert s["sign_agreement"] == np.mean(np.sign(check.predicted) == np.sign(check.measured))
    assert s["correlation"] == pytest.approx(np.corrcoef(check.predicted, check.measured)[0, 1])
    assert "sign agreement" in check.table() and len(check.table().splitlines()) == 6 + 3
    with pytest.raises(InputError, match=r"top=0 must be an int in \[1, \d+\]"):
        check_graph(model, tcs, graph, top=0)
    other = tiny_model("gpt2", n_layers=2)
    with pytest.raises(InputError, match=r"graph has 3 layers.*model has 2"):
        check_graph(other, random_transcoders(other.cfg, "plt"), graph, top=2)


def test_ablation_effects_by_hand():
    # features f0 (layer 0, a=1), f1 (layer 1, a=4); one logit. A[f1, f0] = 2, A[logit, f0] = 1,
    # A[logit, f1] = 3. Ablating f0: direct -1, and f1's pre-activation falls by 2, half of its 4, so its
    # edge to the logit, 3, halves: -1.5; total -2.5. Ablating f1: -3.
    A = np.zeros((6, 6), np.float32)  # 2 features, 2 errors (2 layers x 1 pos), 1 token, 1 logit
    A[1, 0], A[5, 0], A[5, 1] = 2.0, 1.0, 3.0
    graph = AttributionGraph(
        prompt="x", tokens=np.array([1]), token_strings=["x"],
        active_features=np.array([[0, 0, 3], [1, 0, 2]]),
        activation_values=np.array([1.0, 4.0], np.float32), selected_features=np.array([0, 1]), adjacency=A,
        logit_tokens=np.array([7]), logit_probabilities=np.array([1.0], np.float32), logit_strings=["y"],
        n_layers=2, vocab_size=9)
    np.testing.assert_allclose(ablation_effects(graph, np.array([0, 1])), [[-2.5], [-3.0]])


def test_bad_edits_are_clear_errors():
    model, tcs = _case("gpt2", "plt", "hook_resid_mid", "relu")
    bad = [
        ((3, 1, 2, 0.0), r"layer=3; it must be an int in \[0, 3\)"),
        ((0, 6, 2, 0.0), r"pos=6; the prompt has 6 tokens.*\[-6, 6\)"),
        ((0, 1, 24, 0.0), r"feature=24; it must be an int in \[0, 24\)"),
        (FeatureEdit(0, 1, 2, 1.0, "multiply"), r"op='multiply'; it must be one of set, scale, add"),
        ((0, 1, 2, float("nan")), r"non-finite value nan"),
        ("0 1 2", r"must be a FeatureEdit or a \(layer, pos, feature, value\) tuple"),
    ]
    for edit, match in bad:
        with pytest.raises(InputError, match=match):
            intervene(model, tcs, TOKENS, [edit])
    with pytest.raises(InputError, match=r"Two edits of feature 2 at layer 0, position 5"):
        intervene(model, tcs, TOKENS, [(0, 5, 2, 0.0), FeatureEdit(0, -1, 2, 2.0, "scale")])
