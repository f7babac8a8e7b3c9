"""Attribution graphs on a transcoder set (Ameisen et al. 2025, "Circuit Tracing"; circuit-tracer 0.5).

    graph = jaxlens.graphs.attribute(model, transcoders, "The capital of France is")
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    graph.scores()                    # (replacement, completeness)
    graph.save_circuit_tracer("graphs/", "france")
    graph.save_html("france.html")
    check_graph(model, transcoders, graph, top=10)      # ablations in the real model vs the graph
"""

from jaxlens.graphs.attribute import attribute as attribute
from jaxlens.graphs.graph import AttributionGraph
from jaxlens.graphs.interventions import FeatureEdit, check_graph, intervene

__all__ = ["AttributionGraph", "FeatureEdit", "attribute", "check_graph", "intervene"]
