"""The same graph as circuit-tracer 0.5.0 itself (issue 11): on a tiny random Llama (GQA, perturbed RMSNorm
gains) with random circuit-tracer transcoder files (per-layer ReLU + skip reading `hook_resid_mid`, per-layer
JumpReLU + skip reading `mlp.hook_in`, a JumpReLU cross-layer transcoder), jaxlens and circuit-tracer load the
same model directory and the same files, and their graphs agree: the node sets (tokens, active features and
their activations, the selected features under a node budget, the logit nodes), the adjacency, the pruned
node and edge masks and cumulative scores, the replacement and completeness scores, and the frontend JSON
field by field.

The reference side (model, files, circuit-tracer's outputs, cached) is `circuit_tracer_ref.py`. jaxlens loads
the model as circuit-tracer's TransformerLens backend does: `fold_ln=False, center_writing_weights=False,
center_unembed=False` (fold_value_biases is a no-op on Llama).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from circuit_tracer_ref import CASES, META, PROMPT, SCAN, reference_fixture  # noqa: F401

import jaxlens
from jaxlens.dictionaries import load_circuit_tracer
from jaxlens.graphs import attribute

pytestmark = pytest.mark.reference_env

TOL = 1e-4
FLOAT_FIELDS = ("influence", "activation", "token_prob")


@pytest.fixture(scope="module")
def model(circuit_tracer_reference):
    return jaxlens.HookedTransformer.from_pretrained(circuit_tracer_reference / "model", fold_ln=False,
                                                     center_writing_weights=False, center_unembed=False)


@pytest.fixture(scope="module")
def graphs(circuit_tracer_reference, model):
    """case -> (jaxlens's graph, circuit-tracer's arrays, circuit-tracer's info.json), each built once."""
    built = {}

    def get(case):
        if case not in built:
            c = CASES[case]
            tcs = load_circuit_tracer(circuit_tracer_reference / "tc" / c["set"])
            opts = {k: c[k] for k in ("max_feature_nodes", "batch_size") if k in c}
            graph = attribute(model, tcs, PROMPT, max_n_logits=META["max_n_logits"],
                              desired_logit_prob=META["desired_logit_prob"], **opts)
            out = circuit_tracer_reference / "out" / case
            ref = {p.stem: np.load(p) for p in out.glob("*.npy")}
            built[case] = graph, ref, json.loads((out / "info.json").read_text())
        return built[case]

    return get


def test_same_model_logits(model, circuit_tracer_reference):
    """The model directory loads to the same function in both (TransformerLens's logits)."""
    out = circuit_tracer_reference / "out" / "relu_skip"
    tokens = np.load(out / "input_tokens.npy")
    np.testing.assert_array_equal(np.asarray(model.to_tokens(PROMPT))[0], tokens)
    ours = np.asarray(model(tokens[None]))[0]
    np.testing.assert_allclose(ours, np.load(out / "logits.npy"), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("case", CASES)
def test_same_nodes(graphs, case):
    graph, ref, info = graphs(case)
    np.testing.assert_array_equal(graph.tokens, ref["input_tokens"])
    np.testing.assert_array_equal(graph.active_features, ref["active_features"])
    np.testing.assert_allclose(graph.activation_values, ref["activation_values"], rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(graph.selected_features, ref["selected_features"])
    if "max_feature_nodes" in CASES[case]:  # the budget really bites: an influence-ordered subset
        assert graph.n_features == CASES[case]["max_feature_nodes"] < len(ref["active_features"])
    np.testing.assert_array_equal(graph.logit_tokens, ref["logit_tokens"])
    np.testing.assert_allclose(graph.logit_probabilities, ref["logit_probabilities"], rtol=TOL, atol=TOL)
    assert list(graph.logit_strings) == info["logit_strings"]


@pytest.mark.parametrize("case", CASES)
def test_same_adjacency(graphs, case):
    graph, ref, _ = graphs(case)
    A = ref["adjacency"]
    assert graph.adjacency.shape == A.shape
    assert (A != 0).mean() > 0.1  # a graph with edges, not a trivially equal empty one
    np.testing.assert_allclose(graph.adjacency, A, rtol=TOL, atol=TOL * np.abs(A).max())


@pytest.mark.parametrize("case", CASES)
def test_same_pruning_and_scores(graphs, case):
    """prune_graph's masks agree except where circuit-tracer's own score lies within rounding (TOL, relative)
    of the threshold it was compared with; such near-ties must be rare."""
    graph, ref, info = graphs(case)
    pruned = graph.prune(META["node_threshold"], META["edge_threshold"])
    np.testing.assert_allclose(pruned.cumulative_scores, ref["cumulative_scores"], rtol=TOL, atol=TOL)
    _masks_agree(pruned.node_mask, ref["node_mask"], ref["node_influence"], info["node_threshold_value"])
    _masks_agree(pruned.edge_mask, ref["edge_mask"], ref["edge_scores"], info["edge_threshold_value"])
    assert 0 < ref["node_mask"].sum() < len(ref["node_mask"])  # pruning removed some nodes, kept others
    replacement, completeness = graph.scores()
    np.testing.assert_allclose([replacement, completeness],
                               [info["replacement_score"], info["completeness_score"]], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("case", CASES)
def test_same_frontend_json(graphs, case, circuit_tracer_reference, tmp_path):
    """create_graph_files' files and jaxlens's agree field by field (node and link order is free)."""
    graph, _, _ = graphs(case)
    graph.save_circuit_tracer(tmp_path, case, META["node_threshold"], META["edge_threshold"], scan=SCAN)
    ref_dir = circuit_tracer_reference / "out" / case / "json"
    ours, theirs = _read_json(tmp_path / f"{case}.json"), _read_json(ref_dir / f"{case}.json")
    problems = _json_differences(ours, theirs)
    if _read_json(tmp_path / "graph-metadata.json") != _read_json(ref_dir / "graph-metadata.json"):
        problems.append("graph-metadata.json differs")
    assert not problems, "\n".join(problems[:20])


def _json_differences(ours: dict, theirs: dict) -> list[str]:
    """Every field where jaxlens's frontend JSON differs from circuit-tracer's (floats within TOL)."""
    problems = []
    if set(ours) != set(theirs):
        return [f"top-level keys {sorted(ours)} != {sorted(theirs)}"]
    for part in ("metadata", "qParams"):
        for key in sorted(set(ours[part]) | set(theirs[part])):
            if ours[part].get(key, "<missing>") != theirs[part].get(key, "<missing>"):
                problems.append(f"{part}.{key}: {ours[part].get(key, '<missing>')!r} != "
                                f"{theirs[part].get(key, '<missing>')!r}")
    nodes, ref_nodes = _by_id(ours["nodes"]), _by_id(theirs["nodes"])
    if nodes.keys() != ref_nodes.keys():
        problems.append(f"node ids: only ours {sorted(nodes.keys() - ref_nodes.keys())[:5]}, only theirs "
                        f"{sorted(ref_nodes.keys() - nodes.keys())[:5]}")
    for node_id in sorted(nodes.keys() & ref_nodes.keys()):
        node, ref_node = nodes[node_id], ref_nodes[node_id]
        if node.keys() != ref_node.keys():
            problems.append(f"node {node_id}: fields {sorted(node)} != {sorted(ref_node)}")
            continue
        for key, value in ref_node.items():
            close = (key in FLOAT_FIELDS and value is not None and node[key] is not None
                     and node[key] == pytest.approx(value, rel=TOL, abs=TOL))
            if not close and node[key] != value:
                problems.append(f"node {node_id}.{key}: {node[key]!r} != {value!r}")
    links = {(e["source"], e["target"]): e for e in ours["links"]}
    ref_links = {(e["source"], e["target"]): e for e in theirs["links"]}
    if len(links) != len(ours["links"]) or len(ref_links) != len(theirs["links"]):
        problems.append("a link appears twice")
    if links.keys() != ref_links.keys():
        problems.append(f"links: only ours {sorted(links.keys() - ref_links.keys())[:5]}, only theirs "
                        f"{sorted(ref_links.keys() - links.keys())[:5]}")
    scale = max((abs(e["weight"]) for e in theirs["links"]), default=1.0)
    for key in sorted(links.keys() & ref_links.keys()):
        link, ref_link = links[key], ref_links[key]
        if link.keys() != ref_link.keys() or link["weight"] != pytest.approx(ref_link["weight"], rel=TOL,
                                                                              abs=TOL * scale):
            problems.append(f"link {key}: {link} != {ref_link}")
    return problems


def _masks_agree(ours, theirs, scores, threshold):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    differ = ours != theirs
    near = np.abs(scores - threshold) <= TOL * abs(threshold)
    assert not (differ & ~near).any(), (
        f"{int((differ & ~near).sum())} mask entries differ away from the threshold {threshold}, e.g. at "
        f"{np.argwhere(differ & ~near)[:5].tolist()}")
    assert near.sum() <= 3, f"{int(near.sum())} scores within rounding of the threshold: an ill-posed case"


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _by_id(nodes: list[dict]) -> dict[str, dict]:
    out = {n["node_id"]: n for n in nodes}
    assert len(out) == len(nodes), "two nodes share a node_id"
    return out
