"""Edge scores and faithfulness against independent references built from plain forwards (conftest.py).

Each family's model is small and shared by the module; every compiled program is reused where it can be.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from circuit_refs import (
    add_at,
    dest_hook,
    metric,
    metric_with_adds,
    reference_masked_metric,
    source_acts,
    zero_adds,
)
from scipy.stats import spearmanr

from jaxlens import HookedTransformer, testing
from jaxlens.circuits import Graph, UnsupportedModelError, attribute_edges, faithfulness
from jaxlens.errors import InputError
from jaxlens.interventions import Add

FAMILIES = ("gpt2", "llama-gqa", "neox-parallel")
# edges patched one at a time: into a query, a key/value input, an MLP, the logits
EDGES = {
    "gpt2": ["a0.h1->a1.h2<q>", "input->a1.kv0<k>", "a1.h0->m1", "m0->logits"],
    "llama-gqa": ["a0.h4->a1.kv1<k>", "input->a1.kv0<v>", "a1.h5->m1", "a0.h2->logits"],
    "neox-parallel": ["a0.h3->a1.kv2<v>", "m0->a1.h1<q>", "a0.h1->m1", "input->logits"],
}


def _exact_reference(model, clean, corrupted, edge: str) -> float:
    """The metric with one edge's source difference added at its reader (upstream of the reader nothing
    changes, so the source's current output is its clean one): a plain forward with one Add."""
    src, dst = edge.split("->")
    delta = source_acts(model, corrupted)[src] - source_acts(model, clean)[src]
    hook, slot, _ = dest_hook(model.cfg, dst)
    adds = {}
    add_at(model.cfg, adds, hook, slot, delta)
    return metric_with_adds(model, clean, adds)


@pytest.fixture(scope="module")
def exact(family):
    cache = {}

    def get(name):
        if name not in cache:
            model, clean, corrupted = family(name)
            cache[name] = attribute_edges(model, clean, corrupted, metric, method="exact", chunk_size=64)
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_edge_patching_matches_per_edge_forwards(family, exact, name):
    model, clean, corrupted = family(name)
    g = exact(name)
    base = float(metric(model(clean)))
    for e in EDGES[name]:
        want = _exact_reference(model, clean, corrupted, e) - base
        got = g.scores[g.edge_index([e])[0]]
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=e)
    assert np.abs(g.scores).max() > 1e-2  # the references are not trivially zero


@pytest.mark.parametrize("name", FAMILIES)
def test_all_edges_give_clean_and_no_edges_corrupted(family, exact, name):
    model, clean, corrupted = family(name)
    g = exact(name)
    curve = faithfulness(model, g, clean, corrupted, metric, n_edges=[0, g.n_edges])
    np.testing.assert_allclose(curve.clean_metric, float(metric(model(clean))), atol=1e-5)
    np.testing.assert_allclose(curve.corrupted_metric, float(metric(model(corrupted))), atol=1e-5)
    np.testing.assert_allclose(curve.metric, [curve.corrupted_metric, curve.clean_metric], atol=1e-5)
    np.testing.assert_allclose(curve.faithfulness, [0.0, 1.0], atol=1e-4)
    np.testing.assert_allclose(curve.complement_metric, [curve.clean_metric, curve.corrupted_metric],
                               atol=1e-5)


@pytest.fixture(scope="module")
def eap(family):
    cache = {}

    def get(name):
        if name not in cache:
            model, clean, corrupted = family(name)
            cache[name] = attribute_edges(model, clean, corrupted, metric, method="eap").scores
        return cache[name]

    return get


def test_eap_equals_a_hand_gradient(family, exact, eap):
    """score(u -> v) = sum over batch and positions of (corrupted - clean output of u) . dmetric/d(input v),
    with the gradient from jax.grad through zero Adds addressed to each layer's hooks by name."""
    model, clean, corrupted = family("llama-gqa")
    cfg, g = model.cfg, exact("llama-gqa")
    scores = eap("llama-gqa")
    corr, cl = source_acts(model, corrupted), source_acts(model, clean)
    zeros = {k: jnp.asarray(v) for k, v in zero_adds(cfg, *clean.shape).items()}

    def f(z):
        return metric(model(clean, interventions={k: Add(v) for k, v in z.items()}))

    grads = {k: np.asarray(v) for k, v in jax.grad(f)(zeros).items()}
    want = np.zeros(g.n_edges, np.float32)
    for i, (s, dst) in enumerate(e.split("->") for e in g.edge_labels()):
        hook, slot, _ = dest_hook(cfg, dst)
        grad = grads[hook] if slot is None else grads[hook][:, :, slot]
        want[i] = np.sum((corr[s] - cl[s]) * grad)
    np.testing.assert_allclose(scores, want, atol=1e-4, rtol=1e-3)
    assert spearmanr(scores, g.scores).statistic > 0.5  # the linear estimate ranks like exact patching


def test_eap_ig_completeness_and_convergence(family, exact):
    """Integrated gradients over the input: the input node's edge scores add up to the path integral,
    metric(corrupted) - metric(clean), up to the Riemann-sum error, which shrinks as the steps grow."""
    model, clean, corrupted = family("llama-gqa")
    g = exact("llama-gqa")
    total = float(metric(model(corrupted))) - float(metric(model(clean)))
    from_input = g.edge_src == 0
    errs, rhos = [], []
    for steps in (2, 24):
        ig = attribute_edges(model, clean, corrupted, metric, method="eap-ig", steps=steps)
        assert ig.method == "eap-ig"
        errs.append(abs(ig.scores[from_input].sum() - total))
        rhos.append(spearmanr(ig.scores, g.scores).statistic)
    assert errs[1] < errs[0] and errs[1] < 0.05 * abs(total), (errs, total)
    assert rhos[1] > 0.5, rhos  # rank agreement with exact edge patching (reported)


def test_eap_ig_activations_with_one_step_is_eap(family, eap):
    """With steps=1 every pass interpolates with alpha = 1: each is the clean run, so the average gradient is
    EAP's."""
    model, clean, corrupted = family("llama-gqa")
    act = attribute_edges(model, clean, corrupted, metric, method="eap-ig-activations", steps=1).scores
    np.testing.assert_allclose(act, eap("llama-gqa"), atol=1e-5, rtol=1e-4)


def test_circuit_metric_matches_layerwise_reference(family, exact):
    """A real circuit (some edges kept, the rest patched) against a fixed point of plain forwards."""
    model, clean, corrupted = family("gpt2")
    g = exact("gpt2")
    circuit = g.top_n(25)
    curve = faithfulness(model, g, clean, corrupted, metric, n_edges=[25])
    assert curve.n_kept[0] == circuit.in_graph.sum() and 0 < curve.n_kept[0] <= 25
    want = reference_masked_metric(model, clean, corrupted, g, circuit.in_graph)
    np.testing.assert_allclose(curve.metric[0], want, atol=2e-5)
    want_c = reference_masked_metric(model, clean, corrupted, g, ~circuit.in_graph)
    np.testing.assert_allclose(curve.complement_metric[0], want_c, atol=2e-5)
    same = faithfulness(model, circuit, clean, corrupted, metric, prune=False)  # the graph's own circuit
    np.testing.assert_allclose(same.metric, curve.metric, atol=1e-6)


def test_chunks_devices_and_resume(family, exact, tmp_path):
    model, clean, corrupted = family("gpt2")
    want = exact("gpt2").scores  # chunks of 64 on 8 devices
    one = attribute_edges(model, clean, corrupted, metric, method="exact", chunk_size=24,
                          devices=jax.devices()[:1])
    np.testing.assert_allclose(one.scores, want, atol=1e-6, rtol=0)
    record = []
    with pytest.raises(testing.SweepInterrupted):
        attribute_edges(model, clean, corrupted, metric, method="exact", chunk_size=24,
                        devices=jax.devices()[:1], checkpoint_dir=tmp_path,
                        on_chunk=testing.interrupt_after(2, record))
    again = []
    resumed = attribute_edges(model, clean, corrupted, metric, method="exact", chunk_size=24,
                              devices=jax.devices()[:1], checkpoint_dir=tmp_path,
                              on_chunk=lambda done, total: again.append(total))
    per_layer = np.bincount(one.edge_dst // one.layout.per_layer)  # chunks never mix destination layers
    per_layer[-1] += 1  # the clean run rides with the edges into the logits
    n_chunks = int(sum(-(-n // 24) for n in per_layer))
    assert record[-1] == (2, n_chunks) and again[-1] == n_chunks - 2
    np.testing.assert_array_equal(resumed.scores, one.scores)
    some = one.edge_names()[5:7]  # exact patching of chosen edges only: the same values, NaN elsewhere
    part = attribute_edges(model, clean, corrupted, metric, method="exact", edges=some, chunk_size=24,
                           devices=jax.devices()[:1])
    np.testing.assert_allclose(part.scores[5:7], one.scores[5:7], atol=1e-6)
    assert np.isnan(np.delete(part.scores, [5, 6])).all()
    assert set(np.nonzero(part.top_n(2, prune=False).in_graph)[0]) == {5, 6}
    with pytest.raises(InputError, match="another computation"):
        attribute_edges(model, clean, corrupted, metric, method="exact", chunk_size=16,
                        devices=jax.devices()[:1], checkpoint_dir=tmp_path)


def test_bad_input_is_refused(family):
    model, clean, corrupted = family("gpt2")
    with pytest.raises(InputError, match=r"differ in shape.*same token length"):
        attribute_edges(model, clean, corrupted[:, :-1], metric, method="eap")
    with pytest.raises(InputError, match="must return a scalar"):
        attribute_edges(model, clean, corrupted, lambda logits: logits[:, -1, 3], method="eap")
    with pytest.raises(InputError, match="Unknown method 'acdc'"):
        attribute_edges(model, clean, corrupted, metric, method="acdc")
    with pytest.raises(InputError, match="edges= chooses the edges of exact patching"):
        attribute_edges(model, clean, corrupted, metric, method="eap", edges=["m0->logits"])
    with pytest.raises(InputError, match="no edge 'm1->m0'"):
        attribute_edges(model, clean, corrupted, metric, method="exact", edges=["m1->m0"])
    with pytest.raises(InputError, match="steps must be a positive"):
        attribute_edges(model, clean, corrupted, metric, steps=0)
    other = Graph.from_config(testing.tiny_config(n_layers=3))
    with pytest.raises(InputError, match="another architecture"):
        faithfulness(model, other, clean, corrupted, metric)
    with pytest.raises(UnsupportedModelError, match="use_normalization_before_and_after"):
        post_norm = HookedTransformer(testing.tiny_config(use_normalization_before_and_after=True), {})
        attribute_edges(post_norm, clean, corrupted, metric)
