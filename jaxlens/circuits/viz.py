"""Pictures of circuits: the graph (matplotlib, or a self-contained SVG page) and the faithfulness curve.

Nodes are laid out by layer (input at the bottom, logits at the top; in each layer the heads left to right and
the MLP at the right end); a circuit edge is drawn from its source to the node reading it, blue where its
score is positive and red where negative, thicker for larger |score|. Needs matplotlib (the `[viz]` extra)
for the figures; the HTML page is plain SVG with hover titles, no scripts and no network.

    fig = plot_circuit(graph.top_n(60)); fig.savefig("circuit.png")
    Path("circuit.html").write_text(circuit_html(graph.top_n(60)))
"""

import html

import numpy as np

from jaxlens.circuits.faithfulness import FaithfulnessCurve
from jaxlens.circuits.graph import Graph


def node_positions(graph: Graph) -> dict[int, tuple[float, float]]:
    """Source index -> (x, y); the logits are -1. Layer l's heads sit at y = l + 1, x = 0 .. H - 1; its MLP at
    y = l + 1.5, x = H / 2."""
    lo = graph.layout
    pos = {0: (lo.n_heads / 2, 0.0), -1: (lo.n_heads / 2, lo.n_layers + 1.0)}
    for l in range(lo.n_layers):
        for h in range(lo.n_heads):
            pos[lo.head_src(l) + h] = (float(h), l + 1.0)
        pos[lo.mlp_src(l)] = (lo.n_heads / 2, l + 1.5)
    return pos


def _circuit_lines(graph: Graph):
    """[(source, reader node, score, destination label)] for the circuit's edges (a GQA key/value input is
    drawn to each query head it serves)."""
    owner, labels = graph.layout.dst_owner(), graph.dst_labels()
    scores = graph.scores if graph.scores is not None else np.ones(graph.n_edges, np.float32)
    out = []
    for e in np.nonzero(graph.in_graph)[0]:
        d = int(graph.edge_dst[e])
        for node in owner[d] or (-1,):
            out.append((int(graph.edge_src[e]), node, float(scores[e]), labels[d]))
    return out


def plot_circuit(graph: Graph, title: str = ""):
    """The circuit's nodes and edges as a matplotlib Figure."""
    import matplotlib.pyplot as plt

    pos, lines = node_positions(graph), _circuit_lines(graph)
    labels = graph.src_labels() + ["logits"]
    used = {0, -1} | {s for s, _, _, _ in lines} | {n for _, n, _, _ in lines}
    top = max((abs(s) for _, _, s, _ in lines), default=1.0) or 1.0
    lo = graph.layout
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * lo.n_heads), max(4.0, 0.5 * lo.n_layers + 2)))
    for s, n, score, _ in lines:
        (x0, y0), (x1, y1) = pos[s], pos[n]
        ax.plot([x0, x1], [y0, y1], color="tab:blue" if score >= 0 else "tab:red",
                lw=0.5 + 3 * abs(score) / top, alpha=0.6)
    for node in used:
        x, y = pos[node]
        ax.scatter([x], [y], s=120, color="black" if node in (0, -1) else "white", edgecolors="black",
                   zorder=3)
        ax.annotate(labels[node], (x, y), fontsize=6, ha="center", va="bottom", xytext=(0, 6),
                    textcoords="offset points")
    ax.set_axis_off()
    ax.set_title(title or f"circuit: {int(graph.in_graph.sum())} edges, {len(used) - 2} nodes")
    fig.tight_layout()
    return fig


def plot_faithfulness(curve: FaithfulnessCurve, title: str = "faithfulness"):
    """Faithfulness (and the complement's) against the number of edges kept, as a matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = np.maximum(curve.n_kept, 1)
    ax.plot(n, curve.faithfulness, marker="o", label="circuit")
    if curve.complement is not None:
        ax.plot(n, curve.complement, marker="x", label="complement (circuit removed)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("edges in the circuit")
    ax.set_ylabel("(m - m_corrupted) / (m_clean - m_corrupted)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def circuit_html(graph: Graph, title: str = "circuit") -> str:
    """A self-contained HTML page with the circuit as SVG; hovering an edge or node shows its name, score."""
    pos, lines = node_positions(graph), _circuit_lines(graph)
    labels = graph.src_labels() + ["logits"]
    lo = graph.layout
    sx, sy, pad = 70.0, 70.0, 40.0
    width, height = sx * max(lo.n_heads, 2) + 2 * pad, sy * (lo.n_layers + 1) + 2 * pad
    xy = {k: (pad + x * sx, height - pad - y * sy) for k, (x, y) in pos.items()}
    top = max((abs(s) for _, _, s, _ in lines), default=1.0) or 1.0
    parts = []
    for s, n, score, dst in lines:
        (x0, y0), (x1, y1) = xy[s], xy[n]
        color = "#1f77b4" if score >= 0 else "#d62728"
        tip = html.escape(f"{labels[s]} -> {dst}: score {score:.4g}")
        parts.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="{color}" '
                     f'stroke-width="{0.5 + 4 * abs(score) / top:.2f}" opacity="0.6">'
                     f"<title>{tip}</title></line>")
    used = {0, -1} | {s for s, _, _, _ in lines} | {n for _, n, _, _ in lines}
    for node in sorted(used):
        x, y = xy[node]
        name = html.escape(labels[node])
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="white" stroke="black"><title>{name}'
                     f'</title></circle><text x="{x:.1f}" y="{y - 12:.1f}" font-size="10" '
                     f'text-anchor="middle">{name}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}">'
           + "".join(parts) + "</svg>")
    head = html.escape(f"{title}: {int(graph.in_graph.sum())} edges, {len(used) - 2} nodes")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{head}</title></head>"
            f"<body><h3>{head}</h3>{svg}</body></html>")
