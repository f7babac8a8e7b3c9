"""Attribution graphs on a transcoder set (Ameisen et al. 2025, "Circuit Tracing"; circuit-tracer 0.5).

    graph = jaxlens.graphs.attribute(model, transcoders, "The capital of France is")
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    graph.scores()                    # (replacement, completeness)
    graph.save_circuit_tracer("graphs/", "france")
    graph.save_html("france.html")
"""

from jaxlens.graphs.attribute import attribute as attribute
from jaxlens.graphs.graph import AttributionGraph

__all__ = ["AttributionGraph", "attribute"]
