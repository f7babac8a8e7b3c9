"""Faithfulness of circuits: the metric with every edge outside the circuit patched from the corrupted run.

    faithfulness = (m(circuit) - m(corrupted)) / (m(clean) - m(corrupted))

(Hanna et al. 2024, "Have Faith in Faithfulness"; `evaluate_graph` in hannamw/EAP-IG). The circuit of all
edges gives the clean metric (1) and the empty circuit the corrupted one (0). A whole curve, the circuits of
n_1 ... n_k top-scoring edges and their complements (the model with the circuit's edges patched and every
other edge kept), is one vmapped, chunked, sharded computation: each circuit is an edge mask, data.

    curve = faithfulness(model, graph, clean_tokens, corrupted_tokens, metric, n_edges=[10, 100, 1000])
    curve.faithfulness        # [k]
    curve.smallest(0.8)       # the first n whose circuit keeps 80% of the metric difference
"""

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxlens.circuits.attribute import run_masks, setup
from jaxlens.circuits.graph import Graph
from jaxlens.errors import InputError


@dataclasses.dataclass(frozen=True)
class FaithfulnessCurve:
    """Metric and normalised faithfulness of a sequence of circuits.

    Attributes:
        n_edges: [k] the edge budget asked for each circuit (for a given circuit: its edge count).
        n_kept: [k] edges in each circuit after pruning.
        metric: [k] the metric with every non-circuit edge patched.
        faithfulness: [k] (metric - corrupted) / (clean - corrupted).
        complement_metric, complement: [k] the same with the circuit's edges patched and the rest kept
            (None without `complement`).
        clean_metric, corrupted_metric: the metric of all edges kept and of all edges patched.
        circuits: the k circuits, as Graphs.
    """

    n_edges: np.ndarray
    n_kept: np.ndarray
    metric: np.ndarray
    faithfulness: np.ndarray
    complement_metric: np.ndarray | None
    complement: np.ndarray | None
    clean_metric: float
    corrupted_metric: float
    circuits: tuple[Graph, ...]

    def smallest(self, level: float = 0.8) -> Graph | None:
        """The first circuit of the curve whose faithfulness reaches `level` (None if none does)."""
        hit = np.nonzero(self.faithfulness >= level)[0]
        return self.circuits[int(hit[0])] if len(hit) else None

    def as_list(self) -> list[list]:
        """[[n_edges, faithfulness], ...] (the kept edge count after pruning)."""
        return [[int(n), float(f)] for n, f in zip(self.n_kept, self.faithfulness, strict=True)]


def faithfulness(model, graph: Graph, clean_tokens, corrupted_tokens, metric: Callable,
                 n_edges: Sequence[int] | None = None, *, selection: str = "top_n", absolute: bool = True,
                 prune: bool = True, complement: bool = True, chunk_size: int | None = None,
                 devices: Sequence | None = None) -> FaithfulnessCurve:
    """Evaluate circuits of `graph` with every other edge patched from the corrupted run.

    Args:
        model: the decoder HookedTransformer the graph belongs to.
        graph: a Graph of the model; scored unless `n_edges` is None.
        clean_tokens, corrupted_tokens: [batch pos] token ids of the same shape.
        metric: logits -> scalar.
        n_edges: edge budgets of the circuits to evaluate, chosen from the scores by `selection`; None
            evaluates the graph's own circuit (its `in_graph` edges).
        selection: "top_n" or "greedy" (`Graph.top_n` / `Graph.greedy`).
        absolute: rank edges by |score|.
        prune: drop edges on no input-to-logits path before evaluating.
        complement: also evaluate each circuit's complement.
        chunk_size, devices: as `attribute_edges`.

    Raises:
        InputError: a graph of another model, unknown selection, negative budgets, tokens of different
            shapes, a non-scalar metric.
    """
    pb = setup(model, clean_tokens, corrupted_tokens, metric)
    if graph.layout != pb.graph.layout:
        raise InputError(f"The graph was built for another architecture ({graph.layout}); this model's is "
                         f"{pb.graph.layout}. Build it with Graph.from_model(model).")
    if selection not in ("top_n", "greedy"):
        raise InputError(f"Unknown selection {selection!r}; choose 'top_n' or 'greedy'.")
    if n_edges is None:
        circuits = (graph.prune() if prune else graph,)
        budgets = np.asarray([int(graph.in_graph.sum())])
    else:
        budgets = np.asarray(list(n_edges), np.int64).reshape(-1)
        if (budgets < 0).any():
            raise InputError(f"n_edges must be non-negative edge counts; found {budgets.tolist()}.")
        pick = graph.top_n if selection == "top_n" else graph.greedy
        circuits = tuple(pick(int(n), absolute=absolute, prune=prune) for n in budgets)
    masks = np.stack([c.in_graph for c in circuits])
    ends = np.stack([np.ones(graph.n_edges, bool), np.zeros(graph.n_edges, bool)])
    items = np.concatenate([ends, masks] + ([~masks] if complement else []))
    values = run_masks(pb, items, chunk_size, devices)
    clean, corrupted, k = float(values[0]), float(values[1]), len(circuits)
    norm = lambda v: (v - corrupted) / (clean - corrupted) if clean != corrupted else np.full_like(v, np.nan)
    circ = values[2:2 + k]
    comp = values[2 + k:] if complement else None
    return FaithfulnessCurve(budgets, np.asarray([int(c.in_graph.sum()) for c in circuits]), circ, norm(circ),
                             comp, None if comp is None else norm(comp), clean, corrupted, circuits)
