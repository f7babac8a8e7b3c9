"""Influence, pruning and scores against hand-computed graphs and a brute-force numpy reference written from
the formulas in ../shared/RESEARCH.md 1.7 (closed-form power series, a Python-loop threshold)."""

import numpy as np
import pytest
from random_graphs import hand_graph, random_graph

from jaxlens.errors import InputError
from jaxlens.graphs import prune

# -- hand-computed graphs ----------------------------------------------------------------------------------
# Two layers, two positions (BOS, x). Nodes: a=(layer 0, pos 1), b=(layer 1, pos 1), errors e00 e01 e10 e11,
# tokens t0 t1, one logit L (p = 0.5). Edges: a <- t1 (2); b <- a (3), b <- t1 (-1); L <- b (4), L <- e11 (1),
# L <- t1 (-3).
A, B, E00, E01, E10, E11, T0, T1, L = range(9)


def chain_graph():
    adj = np.zeros((9, 9), np.float32)
    adj[A, T1] = 2
    adj[B, A], adj[B, T1] = 3, -1
    adj[L, B], adj[L, E11], adj[L, T1] = 4, 1, -3
    return hand_graph([(0, 1, 7), (1, 1, 3)], adj, n_layers=2, n_pos=2, logit_probabilities=[0.5])


def test_chain_influence_by_hand():
    # rows normalised: a: t1 1; b: a 3/4, t1 1/4; L: b 1/2, e11 1/8, t1 3/8. Seed 0.5 on L.
    # paths: b 0.5*1/2 = 1/4; e11 0.5/8 = 1/16; t1 0.5*3/8 + 1/4*1/4 + (1/4*3/4)*1 = 7/16; a 1/4*3/4 = 3/16.
    g = chain_graph()
    w = prune.logit_weights(9, g.logit_probabilities)
    influence = prune.compute_influence(prune.normalize_matrix(g.adjacency), w)
    expected = np.zeros(9)
    expected[[A, B, E11, T1]] = [3 / 16, 1 / 4, 1 / 16, 7 / 16]
    np.testing.assert_allclose(influence, expected, rtol=1e-6, atol=1e-7)


def test_chain_prune_by_hand():
    # node influence sorted: t1 7/16, b 4/16, a 3/16, e11 1/16 (total 15/16): cumulative 7/15, 11/15,
    # 14/15, 1.
    # node_threshold 0.8 is first reached at a, so e11 (and the zero-influence errors) go.
    # Without e11: L: b 4/7, t1 3/7; influence a 3/14, b 4/14, plus L's weight 7/14. Edge scores: a<-t1 3/14,
    # b<-a 3/14, b<-t1 1/14, L<-b 4/14, L<-t1 3/14 (total 1): 0.98 keeps all five, 0.9 drops b<-t1.
    g = chain_graph()
    result = g.prune(node_threshold=0.8, edge_threshold=0.98)
    np.testing.assert_array_equal(result.node_mask, [1, 1, 0, 0, 0, 0, 1, 1, 1])
    kept = {(A, T1), (B, A), (B, T1), (L, B), (L, T1)}
    np.testing.assert_array_equal(result.edge_mask, _mask(9, kept))
    expected = np.ones(9)
    expected[[T1, B, A]] = [7 / 15, 11 / 15, 14 / 15]
    np.testing.assert_allclose(result.cumulative_scores, expected, rtol=1e-6)
    tighter = g.prune(node_threshold=0.8, edge_threshold=0.9)
    np.testing.assert_array_equal(tighter.edge_mask, _mask(9, kept - {(B, T1)}))
    np.testing.assert_array_equal(tighter.node_mask, result.node_mask)


def test_chain_scores_by_hand():
    # replacement = t1 / (t1 + e11) = (7/16) / (8/16). completeness: only L has error input (1/8); the
    # (influence + weight) of a, b, e11, t1, L is 3/16, 4/16, 1/16, 7/16, 8/16 (sum 23/16), so
    # completeness = (23/16 - 1/8 * 8/16) / (23/16) = 22/23.
    replacement, completeness = chain_graph().scores()
    assert replacement == pytest.approx(7 / 8, rel=1e-6)
    assert completeness == pytest.approx(22 / 23, rel=1e-6)


def test_pruning_iterates_until_stable():
    # Three layers, four positions. X=(layer 1, pos 3) reads tokens 1-3 and errors (0, 1..3), weight 1 each;
    # Z=(layer 2, pos 3) reads only X; the logit reads only Z. Node influences: X = Z = p, each source p/6, so
    # node_threshold 0.5 keeps X and Z (cumulative 1/3, 2/3) and drops the errors. Then X's three token edges
    # score p/3 each against p for Z<-X and L<-Z: edge_threshold 0.6 keeps only Z<-X and L<-Z. X has no
    # incoming edge and goes; only then does Z lose its one incoming edge and go too: nothing is left.
    n_layers, n_pos = 3, 4
    X, Z = 0, 1
    err = lambda layer, pos: 2 + layer * n_pos + pos
    tok = lambda pos: 2 + n_layers * n_pos + pos
    logit = 2 + (n_layers + 1) * n_pos
    adj = np.zeros((logit + 1, logit + 1), np.float32)
    for pos in (1, 2, 3):
        adj[X, tok(pos)] = adj[X, err(0, pos)] = 1
    adj[Z, X] = 1
    adj[logit, Z] = 1
    g = hand_graph([(1, 3, 5), (2, 3, 9)], adj, n_layers=n_layers, n_pos=n_pos, logit_probabilities=[0.6])
    result = g.prune(node_threshold=0.5, edge_threshold=0.6)
    expected_nodes = np.zeros(logit + 1, bool)
    expected_nodes[tok(0):] = True  # only the token and logit nodes, which are always kept
    np.testing.assert_array_equal(result.node_mask, expected_nodes)
    assert not result.edge_mask.any()


def test_threshold_one_keeps_every_node_and_edge_with_influence():
    # All the chain's values are multiples of 1/16, so the cumulative sums are exact and reach 1 at the last
    # positive score: node_threshold 1 keeps e11 (1/16) too; the edge scores a<-t1 3/16, b<-a 3/16,
    # b<-t1 1/16, L<-b 4/16, L<-e11 1/16, L<-t1 3/16 all survive edge_threshold 1; no zero-weight edge does.
    result = chain_graph().prune(node_threshold=1.0, edge_threshold=1.0)
    np.testing.assert_array_equal(result.node_mask, [1, 1, 0, 0, 0, 1, 1, 1, 1])
    kept = {(A, T1), (B, A), (B, T1), (L, B), (L, E11), (L, T1)}
    np.testing.assert_array_equal(result.edge_mask, _mask(9, kept))


# -- against a brute-force reference -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.7), (1.0, 1.0)])
def test_prune_matches_brute_force(seed, thresholds):
    g = random_graph(seed, n_layers=2 + seed % 3, n_pos=3 + seed % 4)
    node_threshold, edge_threshold = thresholds
    result = g.prune(node_threshold=node_threshold, edge_threshold=edge_threshold)
    node_mask, edge_mask, cumulative = _brute_prune(g, node_threshold, edge_threshold)
    np.testing.assert_array_equal(result.node_mask, node_mask)
    np.testing.assert_array_equal(result.edge_mask, edge_mask)
    np.testing.assert_allclose(result.cumulative_scores, cumulative, rtol=1e-5)
    assert result.node_mask.dtype == bool and result.edge_mask.shape == g.adjacency.shape


@pytest.mark.parametrize("seed", range(4))
def test_influence_and_scores_match_brute_force(seed):
    g = random_graph(seed + 10, n_layers=3, n_pos=6, per_site=6)
    influence = prune.compute_influence(prune.normalize_matrix(g.adjacency), _weights(g).astype(np.float32))
    expected = _influence(g.adjacency.astype(np.float64), _weights(g))
    np.testing.assert_allclose(influence, expected, rtol=1e-5, atol=1e-7 * expected.max())
    replacement, completeness = g.scores()
    ref_replacement, ref_completeness = _brute_scores(g)
    assert replacement == pytest.approx(ref_replacement, rel=1e-5)
    assert completeness == pytest.approx(ref_completeness, rel=1e-5)
    assert 0 < replacement < 1 and 0 < completeness < 1


def test_normalize_matrix_keeps_zero_rows_zero():
    m = np.array([[0, 0, 0], [1, -3, 0], [0, 0, 2]], np.float32)
    np.testing.assert_allclose(prune.normalize_matrix(m), [[0, 0, 0], [0.25, 0.75, 0], [0, 0, 1]])


def test_find_threshold_by_hand():
    scores = np.array([1, 4, 0, 3, 2], np.float32)  # sorted 4 3 2 1 0: cumulative 0.4 0.7 0.9 1 1
    assert prune.find_threshold(scores, 0.7) == 3
    assert prune.find_threshold(scores, 0.71) == 2
    assert prune.find_threshold(scores, 0.3) == 4
    assert prune.find_threshold(scores, 1.0) == 1


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, 1.0000001, float("nan"), float("inf")])
def test_thresholds_outside_unit_interval_are_refused(bad):
    g = chain_graph()
    with pytest.raises(InputError, match=r"node_threshold must be .* in \(0, 1\], got"):
        g.prune(node_threshold=bad)
    with pytest.raises(InputError, match=r"edge_threshold must be .* in \(0, 1\], got"):
        g.prune(edge_threshold=bad)


@pytest.mark.parametrize("bad", [0, True, "0.8", None, [0.8]])
def test_thresholds_that_are_not_numbers_are_refused(bad):
    # (the annotations say float, which the tests' type checker enforces at the public methods already)
    with pytest.raises(InputError, match=r"node_threshold must be a fraction .* got"):
        prune.check_threshold("node_threshold", bad)


def test_cyclic_adjacency_is_refused():
    adj = chain_graph().adjacency.copy()
    adj[A, :] = 0
    adj[A, B] = 1  # a <- b <- a: a cycle that never decays
    adj[B, :] = 0
    adj[B, A] = 1
    g = hand_graph([(0, 1, 7), (1, 1, 3)], adj, n_layers=2, n_pos=2, logit_probabilities=[0.5])
    with pytest.raises(InputError, match="not a DAG"):
        g.prune()
    with pytest.raises(InputError, match="not a DAG"):
        g.scores()


def test_adjacency_of_the_wrong_shape_is_refused():
    adj = chain_graph().adjacency
    with pytest.raises(InputError, match=r"adjacency must be \[9, 9\].*found \(8, 9\)"):
        hand_graph([(0, 1, 7), (1, 1, 3)], adj[:8], n_layers=2, n_pos=2, logit_probabilities=[0.5])
    g = chain_graph()
    g.adjacency = adj[:8, :8]  # replaced after construction: caught when used
    with pytest.raises(InputError, match=r"adjacency must be \[9, 9\].*found \(8, 8\)"):
        g.prune()
    with pytest.raises(InputError, match="must be square"):
        prune.prune_graph(adj[:, :8], np.float32([0.5]), n_features=2, n_tokens=2)
    with pytest.raises(InputError, match=r"must be \[9, 9\]"):
        prune.graph_scores(adj[:8, :8], np.float32([0.5]), n_features=2, n_errors=4, n_tokens=2)


def test_non_finite_adjacency_is_refused():
    g = chain_graph()
    g.adjacency[L, B] = np.nan
    with pytest.raises(InputError, match=r"1 non-finite entries \(first A\[8, 1\] = nan\)"):
        g.prune()


@pytest.mark.parametrize("field,value,message", [
    ("active_features", np.zeros((2, 2), np.int64), r"active_features must be \[n_active, 3\]"),
    ("activation_values", np.ones(3, np.float32), r"activation_values must be \[n_active\] = \[2\]"),
    ("selected_features", np.array([0, 2]), "selected_features must be .*indices into active_features"),
    ("logit_probabilities", np.ones(2, np.float32), r"logit_probabilities must be \[n_logits\] = \[1\]"),
    ("token_strings", ["x"], "token_strings must be 2 strings"),
])
def test_fields_that_do_not_fit_together_are_refused(field, value, message):
    g = chain_graph()
    setattr(g, field, value)
    with pytest.raises(InputError, match=message):
        g.prune()


# -- the reference -----------------------------------------------------------------------------------------


def _mask(n, pairs):
    m = np.zeros((n, n), bool)
    for t, s in pairs:
        m[t, s] = True
    return m


def _weights(g):
    w = np.zeros(len(g.adjacency))
    w[g.logit_offset:] = g.logit_probabilities
    return w


def _normalise(adj):
    a = np.abs(adj)
    sums = a.sum(axis=1, keepdims=True)
    return np.divide(a, sums, out=np.zeros_like(a), where=sums > 0)


def _influence(adj, w):
    """w (N + N^2 + ...) = w ((I - N)^-1 - I), exact for a DAG."""
    n = _normalise(adj)
    return w @ (np.linalg.inv(np.eye(len(n)) - n) - np.eye(len(n)))


def _threshold(scores, fraction):
    """The smallest score of the shortest prefix of the descending positive scores holding `fraction` of the
    total (all of them if rounding keeps the running fraction below 1)."""
    ordered = sorted((v for v in scores.ravel().tolist() if v > 0), reverse=True)
    total, running = sum(ordered), 0.0
    for value in ordered:
        running += value
        if running / total >= fraction:
            return value
    return ordered[-1]


def _brute_prune(g, node_threshold, edge_threshold):
    adj, w = g.adjacency.astype(np.float64), _weights(g)
    n, inner = len(adj), g.token_offset
    influence = _influence(adj, w)
    alive = influence >= _threshold(influence, node_threshold)
    alive[inner:] = True
    pruned = adj * alive[:, None] * alive[None, :]
    scores = _normalise(pruned) * (_influence(pruned, w) + w)[:, None]
    edge_threshold_value = _threshold(scores, edge_threshold)
    assert edge_threshold_value > 0  # then no edge of a dropped node is ever kept
    edges = scores >= edge_threshold_value
    while True:
        kept = edges & alive[:, None] & alive[None, :]
        new = alive.copy()
        for i in range(inner):
            if not kept[:, i].any():  # a feature or error node without a way out
                new[i] = False
            if i < g.n_features and not kept[i].any():  # a feature without a way in
                new[i] = False
        if (new == alive).all():
            break
        alive = new
    order = sorted(range(n), key=lambda i: -influence[i])
    cumulative = np.empty(n)
    cumulative[order] = np.cumsum(influence[order]) / influence.sum()
    return alive, kept, cumulative


def _brute_scores(g):
    adj, w = g.adjacency.astype(np.float64), _weights(g)
    influence = _influence(adj, w)
    errors = slice(g.error_offset, g.token_offset)
    tokens = slice(g.token_offset, g.logit_offset)
    replacement = influence[tokens].sum() / (influence[tokens].sum() + influence[errors].sum())
    error_share = _normalise(adj)[:, errors].sum(axis=1)
    completeness = ((1 - error_share) * (influence + w)).sum() / (influence + w).sum()
    return replacement, completeness
