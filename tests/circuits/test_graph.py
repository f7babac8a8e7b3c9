"""The circuit graph: its nodes and edges counted by hand, selection, pruning and the JSON round trip."""

import itertools

import numpy as np
import pytest

from jaxlens import testing
from jaxlens.circuits import Graph, UnsupportedModelError
from jaxlens.errors import InputError


def _hand_edges(L, H, KV, parallel):
    """Every (source label, destination label) pair, enumerated from the definition."""
    srcs = [("input", -1)] + [(f"a{l}.h{h}", l) for l in range(L) for h in range(H)] + \
        [(f"m{l}", l) for l in range(L)]
    out = set()
    for l in range(L):
        readers = ([f"a{l}.h{h}<q>" for h in range(H)] + [f"a{l}.kv{j}<k>" for j in range(KV)]
                   + [f"a{l}.kv{j}<v>" for j in range(KV)])
        for name, sl in srcs:
            if sl < l:
                out |= {(name, r) for r in readers}
                out.add((name, f"m{l}"))
            elif sl == l and name.startswith("a") and not parallel:
                out.add((name, f"m{l}"))
    out |= {(name, "logits") for name, _ in srcs}
    return out


@pytest.mark.parametrize("L,H,KV,parallel", [(3, 5, 5, False), (2, 6, 2, False), (3, 4, 1, True)])
def test_edges_match_the_definition(L, H, KV, parallel):
    cfg = testing.tiny_config(n_layers=L, n_heads=H, n_key_value_heads=KV, parallel_attn_mlp=parallel,
                              d_model=H * 8)
    g = Graph.from_config(cfg)
    got = {tuple(e.split("->")) for e in g.edge_labels()}
    assert got == _hand_edges(L, H, KV, parallel)
    assert g.counts["edges"] == len(got) and g.counts["sources"] == 1 + L * (H + 1)
    assert g.counts["destinations"] == L * (H + 2 * KV + 1) + 1
    names = g.edge_names()
    assert names[0].startswith("blocks.0.hook_resid_pre->blocks.0.hook_q_input[0]")
    assert f"blocks.{L - 1}.hook_mlp_out->blocks.{L - 1}.hook_resid_post" in names
    assert len(set(names)) == len(names)


def _scored(seed=0, **cfg):
    g = Graph.from_config(testing.tiny_config(n_layers=2, n_heads=3, d_model=24, **cfg))
    return g.with_scores(np.random.default_rng(seed).standard_normal(g.n_edges).astype(np.float32))


def _paths_ok(g: Graph) -> bool:
    """Every circuit edge lies on an input -> logits path (checked by brute-force path search)."""
    lo = g.layout
    owner = lo.dst_owner()
    edges = [(int(s), int(d)) for s, d, k in zip(g.edge_src, g.edge_dst, g.in_graph, strict=True) if k]

    def reaches_logits(node):
        return any(d == lo.n_dst - 1 or any(reaches_logits(n) for n in owner[d])
                   for s, d in edges if s == node)

    def from_input(node):
        return node == 0 or any(node in owner[d] and from_input(s) for s, d in edges)

    return all(from_input(s) and (d == lo.n_dst - 1 or any(reaches_logits(n) for n in owner[d]))
               for s, d in edges)


def test_top_n_threshold_and_pruning():
    g = _scored()
    raw = g.top_n(30, prune=False)
    want = set(np.argsort(-np.abs(g.scores))[:30])
    assert set(np.nonzero(raw.in_graph)[0]) == want
    pruned = raw.prune()
    assert (pruned.in_graph <= raw.in_graph).all() and _paths_ok(pruned)
    # an edge is dropped only if it lies on no input -> logits path: adding back any dropped edge breaks that
    for e in np.nonzero(raw.in_graph & ~pruned.in_graph)[0][:5]:
        back = pruned.in_graph.copy()
        back[e] = True
        assert not _paths_ok(pruned.replace(in_graph=back))
    tau = float(np.sort(np.abs(g.scores))[-12])
    assert set(np.nonzero(g.threshold(tau, prune=False).in_graph)[0]) == set(
        np.nonzero(np.abs(g.scores) >= tau)[0])
    assert g.top_n(g.n_edges).in_graph.all()  # every edge lies on a path
    assert not g.top_n(0).in_graph.any()


def test_greedy_grows_from_the_logits():
    g = _scored(seed=1)
    c = g.greedy(15, prune=False)
    assert c.in_graph.sum() == 15
    # replay by hand: the first edge is the best edge into the logits
    into_logits = np.nonzero(g.edge_dst == g.layout.n_dst - 1)[0]
    assert c.in_graph[into_logits[np.argmax(np.abs(g.scores[into_logits]))]]
    # every chosen edge feeds the logits or a node that already has a chosen outgoing edge
    owner = g.layout.dst_owner()
    srcs_in = set(g.edge_src[c.in_graph].tolist())
    for e in np.nonzero(c.in_graph)[0]:
        d = g.edge_dst[e]
        assert d == g.layout.n_dst - 1 or set(owner[d]) & srcs_in
    assert _paths_ok(c.prune())


def test_json_round_trip_and_named_edges(tmp_path):
    g = _scored(n_key_value_heads=1).top_n(20)
    back = Graph.from_json(g.to_json())
    assert back.layout == g.layout and back.method == g.method
    np.testing.assert_array_equal(back.in_graph, g.in_graph)
    np.testing.assert_array_equal(back.scores, g.scores)
    names = g.edge_names(in_graph=True)
    again = Graph.from_config(testing.tiny_config(n_layers=2, n_heads=3, d_model=24, n_key_value_heads=1))
    np.testing.assert_array_equal(again.with_edges(names).in_graph, g.in_graph)
    np.testing.assert_array_equal(again.with_edges(g.edge_labels(in_graph=True)).in_graph, g.in_graph)


def test_bad_input_is_refused():
    g = Graph.from_config(testing.tiny_config(n_layers=2, n_heads=3, d_model=24))
    with pytest.raises(InputError, match=r"no edge 'a1.h0->a0.h1<q>'"):
        g.with_edges(["a1.h0->a0.h1<q>"])  # a later head cannot feed an earlier one
    with pytest.raises(InputError, match="Did you mean"):
        g.with_edges(["blocks.0.attn.hook_result[1]->blocks.1.hook_q_input[9]"])
    with pytest.raises(InputError, match="no scores"):
        g.top_n(3)
    with pytest.raises(InputError, match="one value per edge"):
        g.with_scores(np.zeros(3))
    with pytest.raises(InputError, match="Not a circuit graph"):
        Graph.from_json("{}")
    par = Graph.from_config(testing.tiny_config(n_layers=2, n_heads=3, d_model=24, parallel_attn_mlp=True))
    with pytest.raises(InputError, match="no edge"):  # parallel blocks: attention does not feed its own MLP
        par.with_edges(["a1.h0->m1"])


@pytest.mark.parametrize("change", [dict(attention_dir="bidirectional"),
                                    dict(use_normalization_before_and_after=True)])
def test_uncovered_families_are_named(change):
    with pytest.raises(UnsupportedModelError, match="|".join(itertools.chain(change))):
        Graph.from_config(testing.tiny_config(**change))
