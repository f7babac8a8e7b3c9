"""circuit-tracer frontend JSON, graph-metadata.json (schema: RESEARCH.md 1.9); jaxlens's own graph file."""

import json
import zipfile

import numpy as np
import pytest
from random_graphs import hand_graph, random_graph

from jaxlens.errors import InputError
from jaxlens.graphs import AttributionGraph, export

NODE_FIELDS = ["node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
               "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"]


def _index_of_ids(g):
    """node_id -> node index, rebuilt from the schema's id rules (RESEARCH.md 1.9), not from the exporter."""
    ids = {}
    for i in range(g.n_features):
        layer, pos, feat = g.active_features[g.selected_features[i]]
        ids[f"{layer}_{feat}_{pos}"] = i
    for layer in range(g.n_layers):
        for pos in range(g.n_pos):
            ids[f"0_{layer}_{pos}"] = g.error_offset + layer * g.n_pos + pos
    for pos in range(g.n_pos):
        ids[f"E_{g.tokens[pos]}_{pos}"] = g.token_offset + pos
    for k, vocab in enumerate(g.logit_tokens):
        ids[f"{g.n_layers + 1}_{vocab}_{g.n_pos - 1}"] = g.logit_offset + k
    return ids


@pytest.mark.parametrize("seed", range(4))
def test_nodes_and_links_follow_the_pruned_masks(seed):
    g = random_graph(seed, n_layers=2 + seed % 2, n_pos=4)
    g.active_features[:, 2] += g.n_layers  # no feature index < n_layers: no error node shares a feature's id
    data = export.frontend_json(g, "s", 0.8, 0.98)
    result = g.prune(0.8, 0.98)
    ids = _index_of_ids(g)
    kept = result.edge_mask & result.node_mask[:, None] & result.node_mask[None, :]
    assert len(data["links"]) == kept.sum() > 0
    for link in data["links"]:
        t, s = ids[link["target"]], ids[link["source"]]
        assert kept[t, s]
        assert link["weight"] == float(g.adjacency[t, s])  # exactly A[dst, src]
    touched = {i for t, s in zip(*np.nonzero(kept), strict=True) for i in (t, s)}
    expected = sorted(touched | set(range(g.token_offset, g.logit_offset + g.n_logits)))
    assert [ids[n["node_id"]] for n in data["nodes"]] == expected  # in node order
    node_ids = [n["node_id"] for n in data["nodes"]]
    assert len(set(node_ids)) == len(node_ids)
    for n in data["nodes"]:
        assert list(n) == NODE_FIELDS
        assert n["influence"] == (None if n["feature_type"] == "logit" else
                                  pytest.approx(float(result.cumulative_scores[ids[n["node_id"]]])))


def test_node_fields_by_kind():
    # feature (layer 1, pos 2, index 6), error (0, 2), tokens, two logits
    g = hand_graph([(1, 2, 6)], _adjacency_1feature(), n_layers=2, n_pos=3, logit_probabilities=[0.6, 0.25],
                   tokens=[5, 17, 29])
    nodes = {n["node_id"]: n for n in export.frontend_json(g, "kinds", 0.8, 0.98)["nodes"]}
    assert set(nodes) == {"1_6_2", "0_0_2", "E_5_0", "E_17_1", "E_29_2", "3_100_2", "3_101_2"}
    f = nodes["1_6_2"]
    assert (f["feature"], f["layer"], f["ctx_idx"], f["feature_type"], f["jsNodeId"]) == (
        (1 + 6) * (1 + 6 + 1) // 2 + 6, "1", 2, "cross layer transcoder", "1_6-0")
    assert f["activation"] == 1.0 and f["token_prob"] == 0.0 and f["is_target_logit"] is False
    e = nodes["0_0_2"]
    assert (e["feature"], e["layer"], e["ctx_idx"], e["feature_type"], e["jsNodeId"], e["activation"]) == (
        -1, "0", 2, "mlp reconstruction error", "0_2-0", None)
    t = nodes["E_17_1"]
    assert (t["feature"], t["layer"], t["ctx_idx"], t["feature_type"], t["jsNodeId"]) == (
        1, "E", 1, "embedding", "E_17-1")
    top, second = nodes["3_100_2"], nodes["3_101_2"]
    assert (top["feature"], top["layer"], top["ctx_idx"], top["feature_type"], top["jsNodeId"]) == (
        100, "3", 2, "logit", "L_100-2")
    assert top["is_target_logit"] is True and second["is_target_logit"] is False
    assert top["token_prob"] == pytest.approx(0.6) and top["clerp"] == 'Output " out0" (p=0.600)'
    assert second["clerp"] == 'Output " out1" (p=0.250)' and top["influence"] is None


def _adjacency_1feature():
    # nodes: f, errors (0,0) (0,1) (0,2) (1,0) (1,1) (1,2), tokens 0-2, logits 100, 101. Influence: f 0.55,
    # error (0, 2) 0.3, token 2 0.55 (cumulative 0.39, 0.79, 1: all kept at 0.8); edge scores 0.55, 0.3, 0.3,
    # 0.25 (cumulative 0.39, 0.61, 0.82, 1: all kept at 0.98).
    adj = np.zeros((12, 12), np.float32)
    adj[0, 9] = 1.0  # f <- token 2
    adj[10, 0], adj[10, 3] = 1.0, -1.0  # logit 100 <- f, error (0, 2)
    adj[11, 0] = -1.0
    return adj


def test_cantor_pairing_enumerates_the_diagonals():
    expected, k = {}, 0
    for d in range(12):  # walk each diagonal x + y = d with y increasing: 0, 1, 2, ...
        for y in range(d + 1):
            expected[d - y, y] = k
            k += 1
    assert all(export.cantor_pair(x, y) == v for (x, y), v in expected.items())


def test_error_node_sharing_a_feature_name_gets_its_own_id():
    # feature 1 at layer 0, pos 1 is "0_1_1" in circuit-tracer's scheme, and so is the error node of (1, 1)
    adj = np.zeros((8, 8), np.float32)  # f, errors (0,0) (0,1) (1,0) (1,1), tokens 0 1, logit
    adj[0, 6] = 1  # f <- t1
    adj[7, 0], adj[7, 4] = 1, 1  # logit <- f, error (1, 1): influences f = error = t1 = 0.25, all kept
    g = hand_graph([(0, 1, 1)], adj, n_layers=2, n_pos=2, logit_probabilities=[0.5])
    data = export.frontend_json(g, "clash", 0.8, 0.98)
    by_type = {n["feature_type"]: n["node_id"] for n in data["nodes"] if n["feature_type"] != "embedding"}
    assert by_type == {"cross layer transcoder": "0_1_1", "mlp reconstruction error": "0_1_1_error",
                       "logit": "3_100_1"}
    assert {(link["source"], link["target"]) for link in data["links"]} == {
        ("E_11_1", "0_1_1"), ("0_1_1", "3_100_1"), ("0_1_1_error", "3_100_1")}


def test_metadata_and_query_params():
    g = random_graph(1)
    data = export.frontend_json(g, "my-graph", 0.7, 0.9)
    assert list(data) == ["metadata", "qParams", "nodes", "links"]
    assert data["metadata"] == {
        "slug": "my-graph", "scan": "random-transcoders", "transcoder_list": [],
        "prompt_tokens": g.token_strings, "prompt": "a random prompt", "node_threshold": 0.7,
        "schema_version": 1}
    assert data["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                               "sg_pos": ""}
    per_layer = export.frontend_json(g, "s", scan=["tc-a", "tc-b", "tc-c"])["metadata"]
    assert per_layer["transcoder_list"] == ["tc-a", "tc-b", "tc-c"]
    assert per_layer["scan"].startswith("custom-")
    scan_of = lambda names: export.frontend_json(g, "s", scan=names)["metadata"]["scan"]
    assert per_layer["scan"] == scan_of(["tc-a", "tc-b", "tc-c"])  # stable
    assert per_layer["scan"] != scan_of(["tc-a", "tc-c", "tc-b"])


def test_save_circuit_tracer_writes_the_graph_and_upserts_metadata(tmp_path):
    listing = {"graphs": [{"slug": "other", "scan": "x", "prompt": "kept as it was", "extra": [1, 2]}]}
    (tmp_path / "graph-metadata.json").write_text(json.dumps(listing))
    g = random_graph(2)
    path = g.save_circuit_tracer(tmp_path, "first", node_threshold=0.8, edge_threshold=0.98)
    assert path == tmp_path / "first.json"
    assert json.loads(path.read_text()) == export.frontend_json(g, "first", 0.8, 0.98)
    g.save_circuit_tracer(tmp_path, "second", node_threshold=0.6)
    g.prompt = "changed"
    g.save_circuit_tracer(tmp_path, "first", node_threshold=0.5)
    graphs = json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]
    assert [m["slug"] for m in graphs] == ["other", "second", "first"]
    assert graphs[0] == listing["graphs"][0]
    assert graphs[2] == json.loads((tmp_path / "first.json").read_text())["metadata"]
    assert graphs[2]["prompt"] == "changed" and graphs[2]["node_threshold"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.json", "graph-metadata.json", "second.json"]


@pytest.mark.parametrize("slug", ["", "a/b", "../up", "a\\b", ".", "..", "graph-metadata", "nul\0byte"])
def test_bad_slugs_are_refused(tmp_path, slug):
    with pytest.raises(InputError, match="slug .* must be a non-empty file name without path separators"):
        random_graph(0).save_circuit_tracer(tmp_path, slug)
    with pytest.raises(InputError, match="slug"):
        export.frontend_json(random_graph(0), slug)
    assert not any(tmp_path.iterdir())


def test_unusable_outputs_are_refused(tmp_path):
    g = random_graph(0)
    g.transcoder_name = ""
    with pytest.raises(InputError, match="no transcoder set name.*Pass scan="):
        g.save_circuit_tracer(tmp_path, "s")
    g.save_circuit_tracer(tmp_path, "s", scan="given")  # an explicit scan is enough
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        g.save_circuit_tracer(tmp_path / "file", "s", scan="given")
    (tmp_path / "graph-metadata.json").write_text("{not json")
    with pytest.raises(InputError, match="graph-metadata.json is not valid JSON"):
        g.save_circuit_tracer(tmp_path, "t", scan="given")
    (tmp_path / "graph-metadata.json").write_text(json.dumps({"graphs": [{"no_slug": 1}]}))
    with pytest.raises(InputError, match="not a circuit-tracer graph list"):
        g.save_circuit_tracer(tmp_path, "t", scan="given")


def test_save_html_delegates_to_the_viewer(tmp_path, monkeypatch):
    import jaxlens.graphs.viewer as viewer

    calls = []
    monkeypatch.setattr(viewer, "save_graph_html", lambda data, path, dashboards=None: calls.append(
        (data, path, dashboards)) or path)
    g = random_graph(4)
    boards = {"some": "dashboards"}
    assert g.save_html(tmp_path / "page.html", boards, node_threshold=0.7) == tmp_path / "page.html"
    (data, path, dashboards), = calls
    assert data == export.frontend_json(g, "page", 0.7, 0.98) and dashboards is boards


# -- jaxlens's own graph file ------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    g = random_graph(5)
    g.token_strings[1] = "naïve \n\ud800 ⏎"  # any str survives, even a lone surrogate
    g.feature_input_hook, g.feature_output_hook, g.zero_positions = "hook_resid_mid", "mlp.hook_out", 2
    path = g.save(tmp_path / "g.npz")
    back = AttributionGraph.load(path)
    for name in AttributionGraph.__dataclass_fields__:
        mine, theirs = getattr(g, name), getattr(back, name)
        if isinstance(mine, np.ndarray):
            assert theirs.dtype == mine.dtype and theirs.shape == mine.shape, name
            np.testing.assert_array_equal(theirs, mine)
        else:
            assert theirs == mine and type(theirs) is type(mine), name
    assert back.prune().edge_mask.tolist() == g.prune().edge_mask.tolist()
    with zipfile.ZipFile(path) as z:
        assert all(n.endswith(".npy") for n in z.namelist())  # arrays only, no pickled objects


def test_load_refuses_files_that_are_not_graphs(tmp_path):
    with pytest.raises(InputError, match="No graph file at"):
        AttributionGraph.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(InputError, match="is not a jaxlens graph file"):
        AttributionGraph.load(tmp_path / "text.npz")
    np.savez(tmp_path / "plain.npz", adjacency=np.zeros((2, 2)))
    with pytest.raises(InputError, match="without the graph's metadata"):
        AttributionGraph.load(tmp_path / "plain.npz")
    g = random_graph(0)
    g.save(tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz") as z:
        arrays = dict(z)
    meta = json.loads(arrays["__metadata__"].tobytes())
    for change, message in (({"version": 2}, "of version 2; this jaxlens reads version 1"),
                            ({"colour": "red"}, r"unknown graph fields \['colour'\]")):
        arrays["__metadata__"] = np.frombuffer(json.dumps({**meta, **change}).encode(), np.uint8)
        np.savez(tmp_path / "changed.npz", **arrays)
        with pytest.raises(InputError, match=message):
            AttributionGraph.load(tmp_path / "changed.npz")
    arrays["__metadata__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    arrays["adjacency"] = arrays["adjacency"][:-1]
    np.savez(tmp_path / "cut.npz", **arrays)
    with pytest.raises(InputError, match="adjacency must be"):
        AttributionGraph.load(tmp_path / "cut.npz")
