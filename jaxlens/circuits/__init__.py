"""Circuit discovery: the graph of residual-stream writers and readers, edge scores (EAP, EAP-IG, exact edge
patching), circuit selection and faithfulness curves, each one compiled computation through the block runner.

    graph = circuits.attribute_edges(model, clean_tokens, corrupted_tokens, metric, method="eap-ig", steps=5)
    curve = circuits.faithfulness(model, graph, clean_tokens, corrupted_tokens, metric, n_edges=[10, 100])
    curve.smallest(0.8).heads()

See RESEARCH.md section 4 for the formulas and their sources (Syed et al. 2023; Hanna et al. 2024; Conmy et
al. 2023).
"""

from jaxlens.circuits.attribute import METHODS as METHODS
from jaxlens.circuits.attribute import attribute_edges as attribute_edges
from jaxlens.circuits.edges import masked_metric as masked_metric
from jaxlens.circuits.edges import source_outputs as source_outputs
from jaxlens.circuits.faithfulness import FaithfulnessCurve as FaithfulnessCurve
from jaxlens.circuits.faithfulness import faithfulness as faithfulness
from jaxlens.circuits.graph import Graph as Graph
from jaxlens.circuits.graph import Layout as Layout
from jaxlens.circuits.graph import UnsupportedModelError as UnsupportedModelError
