"""Influence, pruning and scores of an attribution graph (Ameisen et al. 2025, "Circuit Tracing", section
"Graph pruning"; circuit-tracer 0.5 `graph.py`, ../shared/RESEARCH.md 1.7).

A node's influence on the output is the sum over all paths to the logit nodes of the products of
row-normalised absolute edge weights, seeded with the logit probabilities: `w N + w N^2 + ...` where
`N = |A| / rowsum(|A|)`. The graph is a DAG, so the series ends after at most depth-many terms.

    node_influence = compute_influence(normalize_matrix(A), logit_weights)
    result = prune_graph(A, logit_probabilities, n_features=..., n_tokens=...)
    result.node_mask, result.edge_mask, result.cumulative_scores

Everything here is numpy in float32 (circuit-tracer's dtype; the adjacency of a 7500-feature graph is 64M
entries), on the node order of `jaxlens.graphs.graph` (features, errors, tokens, logits).
"""

import math
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Bool, Float

from jaxlens.errors import InputError


class PruneResult(NamedTuple):
    """What `prune_graph` keeps.

    Attributes:
        node_mask: [n_nodes] True for kept nodes (token and logit nodes always).
        edge_mask: [n_nodes, n_nodes] True for kept edges, indexed like the adjacency, [target, source].
        cumulative_scores: [n_nodes] the cumulative fraction of total influence at each node's rank when nodes
            are sorted by influence, most influential first (small = important; the frontend's `influence`).
    """

    node_mask: Bool[np.ndarray, " n_nodes"]
    edge_mask: Bool[np.ndarray, "n_nodes n_nodes"]
    cumulative_scores: Float[np.ndarray, " n_nodes"]


def normalize_matrix(
    matrix: Float[np.ndarray, "n_targets n_sources"],
) -> Float[np.ndarray, "n_targets n_sources"]:
    """`|A|` with each row divided by its sum (rows summing to zero stay zero; the sum is clamped at 1e-10).

    Args:
        matrix: [n_targets, n_sources] adjacency.

    Returns:
        [n_targets, n_sources] float32, each nonzero row summing to 1.
    """
    out = np.abs(np.asarray(matrix, dtype=np.float32))
    out /= np.maximum(out.sum(axis=1, keepdims=True), np.float32(1e-10))
    return out


def compute_influence(
    matrix: Float[np.ndarray, "n_targets n_sources"],
    weights: Float[np.ndarray, " n_targets"],
    max_iter: int = 1000,
) -> Float[np.ndarray, " n_sources"]:
    """The total influence `w M + w M^2 + ...` of every node (a source) on the weighted targets.

    The terms are added until one is exactly zero, which happens after the graph's depth for a DAG.

    Args:
        matrix: [n_targets, n_sources] (normally `normalize_matrix(A)`, square).
        weights: [n_targets] the weight of each target (the logit probabilities on the logit nodes).
        max_iter: the most terms added after the first.

    Returns:
        [n_sources] float32 influence of each node.

    Raises:
        InputError: the series has not ended after `max_iter` terms: the adjacency has a cycle.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    current = np.asarray(weights, dtype=np.float32) @ matrix
    influence = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ matrix
        influence += current
    if current.any():
        raise InputError(
            f"The influence series did not end after {max_iter} terms, so the adjacency is not a DAG (a node "
            "reaches itself). An attribution graph has edges only from earlier to later layers: check that "
            "the logit columns and the error and token rows are zero, and that no feature feeds its own or "
            "an earlier layer.")
    return influence


def find_threshold(scores: Float[np.ndarray, "*shape"], threshold: float) -> np.float32:
    """The score at which the highest scores, taken in decreasing order, first reach `threshold` of the total.

    As circuit-tracer's `find_threshold`, with one difference at thresholds within rounding of 1: when the
    cumulative fractions of the positive scores never reach `threshold` (the float32 sum ends at 0.99999994),
    circuit-tracer's index runs into the zeros and keeps every zero score too (all n^2 edges, so no node is
    ever dropped for lack of an edge); here the smallest positive score is returned, so `threshold=1` keeps
    exactly the scores above zero, whatever the rounding.

    Args:
        scores: non-negative scores of any shape (flattened; the edge scores are a matrix).
        threshold: the fraction of the total to keep, in (0, 1].

    Returns:
        The smallest score kept: `scores >= find_threshold(scores, t)` keeps that fraction (0 when no score is
        positive).
    """
    flat = np.asarray(scores, dtype=np.float32).ravel()
    ordered = np.sort(flat[flat > 0])[::-1]  # the zeros would come last and add nothing: not sorted
    if not len(ordered):
        return np.float32(0)
    cumulative = np.cumsum(ordered) / ordered.sum()
    index = int(np.searchsorted(cumulative, np.float32(threshold)))
    return ordered[min(index, len(ordered) - 1)]


def logit_weights(n_nodes: int, logit_probabilities: Float[np.ndarray, " n_logits"]
                  ) -> Float[np.ndarray, " n_nodes"]:
    """[n_nodes] float32: zero except the last `n_logits` entries, which are the logit probabilities."""
    probs = np.asarray(logit_probabilities, dtype=np.float32)
    weights = np.zeros(n_nodes, np.float32)
    weights[n_nodes - len(probs):] = probs
    return weights


def prune_graph(
    adjacency: Float[np.ndarray, "n_targets n_sources"],
    logit_probabilities: Float[np.ndarray, " n_logits"],
    *,
    n_features: int,
    n_tokens: int,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneResult:
    """Keep the nodes and edges that carry most of the influence on the logits (circuit-tracer's algorithm).

    1. Nodes with influence at or above `find_threshold(influence, node_threshold)` are kept, and every token
       and logit node.
    2. The dropped nodes' rows and columns are zeroed; each edge scores its normalised weight times its
       target's influence (plus the target's logit weight), and edges at or above
       `find_threshold(edge_scores, edge_threshold)` are kept.
    3. Until nothing changes: a feature or error node without a kept outgoing edge is dropped, so is a
       feature node without a kept incoming edge, and so are the edges of dropped nodes.

    Args:
        adjacency: [n_nodes, n_nodes] A[target, source] in the node order of `jaxlens.graphs.graph`.
        logit_probabilities: [n_logits] the weights of the last `n_logits` nodes.
        n_features: the feature nodes (first in the order).
        n_tokens: the token nodes (just before the logit nodes).
        node_threshold: the fraction of node influence to keep, in (0, 1].
        edge_threshold: the fraction of edge influence to keep, in (0, 1].

    Returns:
        The masks and each node's cumulative influence fraction.

    Raises:
        InputError: a threshold outside (0, 1], or an adjacency that is not a finite square DAG matrix of at
            least `n_features + n_tokens + n_logits` nodes.
    """
    check_threshold("node_threshold", node_threshold)
    check_threshold("edge_threshold", edge_threshold)
    adjacency = np.asarray(adjacency, dtype=np.float32)
    n_logits = len(logit_probabilities)
    n_nodes = check_adjacency(adjacency, n_features + n_tokens + n_logits)
    weights = logit_weights(n_nodes, logit_probabilities)
    inner = n_nodes - n_logits - n_tokens  # feature and error nodes

    node_influence = compute_influence(normalize_matrix(adjacency), weights)
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[inner:] = True

    pruned = adjacency.copy()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_matrix(pruned)
    del pruned
    target_weight = compute_influence(normalized, weights) + weights
    edge_scores = normalized
    edge_scores *= target_weight[:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores, edge_threshold)
    del edge_scores, normalized

    while True:
        before = node_mask.copy()
        node_mask[:inner] &= edge_mask[:, :inner].any(axis=0)  # feature and error nodes need a way out
        node_mask[:n_features] &= edge_mask[:n_features].any(axis=1)  # feature nodes need a way in
        if np.array_equal(node_mask, before):
            break
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False

    order = np.argsort(-node_influence, kind="stable")
    ranked = node_influence[order]
    cumulative = np.empty_like(node_influence)
    cumulative[order] = np.cumsum(ranked) / ranked.sum()
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(
    adjacency: Float[np.ndarray, "n_targets n_sources"],
    logit_probabilities: Float[np.ndarray, " n_logits"],
    *,
    n_features: int,
    n_errors: int,
    n_tokens: int,
) -> tuple[float, float]:
    """The replacement and completeness scores of a graph (circuit-tracer's `compute_graph_scores`).

    replacement = token influence / (token influence + error influence): the share of the end-to-end influence
    of the inputs on the logits that reaches them through features rather than error nodes.
    completeness = sum over nodes of (1 - the error share of its normalised inputs) * (its influence + logit
    weight), divided by the sum of (influence + logit weight): partial credit for mostly explained nodes.

    Args:
        adjacency: [n_nodes, n_nodes] A[target, source] in the node order of `jaxlens.graphs.graph`.
        logit_probabilities: [n_logits] the weights of the logit nodes.
        n_features: the feature nodes.
        n_errors: the error nodes (n_layers * n_pos), right after the features.
        n_tokens: the token nodes, right after the errors.

    Returns:
        (replacement_score, completeness_score), each in [0, 1] (nan when no influence reaches the logits).

    Raises:
        InputError: an adjacency that is not a finite square DAG matrix of the right size.
    """
    adjacency = np.asarray(adjacency, dtype=np.float32)
    n_nodes = n_features + n_errors + n_tokens + len(logit_probabilities)
    check_adjacency(adjacency, n_nodes, exact=True)
    weights = logit_weights(n_nodes, logit_probabilities)
    errors = slice(n_features, n_features + n_errors)
    tokens = slice(errors.stop, errors.stop + n_tokens)

    normalized = normalize_matrix(adjacency)
    influence = compute_influence(normalized, weights)
    token_influence, error_influence = influence[tokens].sum(), influence[errors].sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        replacement = token_influence / (token_influence + error_influence)
        non_error = 1 - normalized[:, errors].sum(axis=1)
        output = influence + weights
        completeness = (non_error * output).sum() / output.sum()
    return float(replacement), float(completeness)


def check_threshold(name: str, value: Any) -> None:
    """Raise InputError unless `value` is a number in (0, 1]."""
    ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)
    if not ok or not (0 < float(value) <= 1) or math.isnan(float(value)):
        raise InputError(
            f"{name} must be a fraction of the total influence in (0, 1], got {value!r}. "
            "circuit-tracer's defaults are node_threshold=0.8, edge_threshold=0.98.")


def check_adjacency(adjacency: np.ndarray, n_nodes: int, *, exact: bool = False) -> int:
    """Raise InputError unless `adjacency` is a finite square 2-D matrix of `n_nodes` (or, unless `exact`,
    at least that many) nodes; returns its size."""
    shape = adjacency.shape
    if adjacency.ndim != 2 or shape[0] != shape[1] or shape[0] < n_nodes or (exact and shape[0] != n_nodes):
        need = f"[{n_nodes}, {n_nodes}]" if exact else f"square with at least {n_nodes} nodes"
        raise InputError(
            f"The adjacency must be {need} (A[target, source] over features, errors, tokens and logits), "
            f"got shape {shape}. Build it with jaxlens.graphs.attribute, or check the node counts.")
    bad = ~np.isfinite(adjacency)
    if bad.any():
        target, source = np.argwhere(bad)[0]
        raise InputError(
            f"The adjacency has {int(bad.sum())} non-finite entries (first A[{target}, {source}] = "
            f"{adjacency[target, source]}). Rebuild the graph in float32 from finite activations.")
    return shape[0]
