"""Circuit pictures: the PNG shows the drawn circuit, the HTML page names every edge and needs no network."""

import html
import re

import matplotlib.image
import numpy as np

from jaxlens import testing
from jaxlens.circuits import FaithfulnessCurve, Graph
from jaxlens.circuits.viz import circuit_html, plot_circuit, plot_faithfulness


def _circuit():
    g = Graph.from_config(testing.tiny_config(n_layers=2, n_heads=3, d_model=24, n_key_value_heads=1))
    scores = np.random.default_rng(0).standard_normal(g.n_edges).astype(np.float32)
    return g.with_scores(scores).top_n(12)


def test_png_figures_are_written(tmp_path):
    c = _circuit()
    fig = plot_circuit(c)
    fig.savefig(tmp_path / "c.png")
    img = matplotlib.image.imread(tmp_path / "c.png")
    assert img.shape[0] > 100 and (img[..., :3] < 0.5).any()  # something dark was drawn
    n = np.array([1, 10, 100])
    curve = FaithfulnessCurve(n, n, np.zeros(3), np.array([0.1, 0.5, 0.9]), None, None, 1.0, 0.0, (c,) * 3)
    plot_faithfulness(curve).savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_html_names_every_circuit_edge_and_is_self_contained():
    c = _circuit()
    page = circuit_html(c)
    assert "<script" not in page and not re.search(r"(src|href)=[\"']https?:", page)
    titles = re.findall(r"<line [^>]*><title>([^<]*)</title>", page)
    # one line per edge; a key/value input of the one KV head is drawn to each of the 3 heads it serves
    src, dst = c.src_labels(), c.dst_labels()
    want = 0
    for e in np.nonzero(c.in_graph)[0]:
        label = html.escape(f"{src[c.edge_src[e]]} -> {dst[c.edge_dst[e]]}")
        assert any(t.startswith(label + ":") for t in titles), label
        want += 3 if "kv" in dst[c.edge_dst[e]] else 1
    assert len(titles) == want
