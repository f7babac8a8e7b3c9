"""jaxlens.viz: figures have the axes, labels and ticks the data implies; PNGs are written and readable; the
attention HTML page is self-contained and carries the data; bad input gives clear errors."""

import json
import re
import subprocess
import sys

import jaxtyping
import matplotlib.image
import numpy as np
import pytest

from jaxlens import viz
from jaxlens.errors import InputError
from jaxlens.viz._common import as_numpy

TOKENS = ["<s>", "When", " Mary", " and", " John", " went", " to", " the", " store", ",", " John", " gave",
          " to"]


def _ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def _patterns(n_heads: int, n_pos: int, seed: int = 0) -> np.ndarray:
    x = np.tril(np.random.default_rng(seed).random((n_heads, n_pos, n_pos))) + 1e-3 * np.eye(n_pos)
    return x / x.sum(-1, keepdims=True)


def test_patching_heatmap_labels_tokens_and_layers():
    values = np.random.default_rng(1).normal(size=(4, len(TOKENS)))
    fig = viz.patching_heatmap(values, TOKENS, title="resid_pre")
    heat, cbar = fig.axes
    assert _ticks(heat.get_xticklabels()) == [f"{i}|{t}" for i, t in enumerate(TOKENS)]
    assert _ticks(heat.get_yticklabels()) == ["0", "1", "2", "3"]
    assert heat.get_title() == "resid_pre"
    image = heat.get_images()[0]
    np.testing.assert_array_equal(image.get_array(), values)
    lo, hi = image.get_clim()
    assert lo == pytest.approx(-np.abs(values).max()) and hi == pytest.approx(np.abs(values).max())


def test_head_heatmap_and_sequential_colour_range():
    values = np.arange(15.0).reshape(5, 3)
    fig = viz.head_heatmap(values, diverging=False)
    assert len(fig.axes) == 2
    assert _ticks(fig.axes[0].get_xticklabels()) == ["H0", "H1", "H2"]
    assert len(fig.axes[0].get_yticklabels()) == 5
    assert fig.axes[0].get_images()[0].get_clim() == (0.0, 14.0)


def test_small_multiples_one_panel_per_head_shared_scale():
    values = np.random.default_rng(2).normal(size=(3, len(TOKENS), 5))
    values[1, 2, 4] = 9.0
    fig = viz.patching_small_multiples(values, TOKENS, ncols=2)
    panels = fig.axes[:-1]
    assert len(fig.axes) == 5 + 1
    assert [ax.get_title() for ax in panels] == [f"H{h}" for h in range(5)]
    for h, ax in enumerate(panels):
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), values[:, :, h])
        assert ax.get_images()[0].get_clim() == (-9.0, 9.0)
    # token labels only on the bottom panel of each column (H3, H4)
    assert _ticks(panels[4].get_xticklabels())[2] == "2| Mary"
    assert set(_ticks(panels[0].get_xticklabels())) == {""}


def test_attention_figure_panels_and_thinned_ticks():
    pats = _patterns(3, 7)
    fig = viz.attention_patterns_figure(pats, [f"t{i}" for i in range(7)], ["L0H1", "L2H0", "L5H4"])
    assert len(fig.axes) == 3 + 1
    assert [ax.get_title() for ax in fig.axes[:3]] == ["L0H1", "L2H0", "L5H4"]
    shown = fig.axes[0].get_images()[0].get_array()
    assert np.ma.is_masked(shown[0, 1]) and shown[3, 2] == pytest.approx(pats[0, 3, 2])
    long = viz.attention_patterns_figure(_patterns(1, 101), [f"t{i}" for i in range(101)], max_ticks=20)
    assert 10 <= len(long.axes[0].get_xticklabels()) <= 20


def test_tricky_tokens_render_without_warnings(tmp_path):
    # "$" would start mathtext, "\n" breaks the layout, CJK glyphs are missing from DejaVu: all escaped.
    tokens = ["$x", "\n", "\u4e2d", "a$b$c"]
    assert viz.token_label("$x") == r"\$x"
    assert viz.token_label("\n", 1) == "1|\\n"
    assert viz.token_label("\u4e2d") == "\\u4e2d"
    fig = viz.attention_patterns_figure(_patterns(1, 4), tokens)
    viz.save_figure(fig, tmp_path / "tricky.png")  # pytest turns any glyph / mathtext warning into an error


def test_png_written_atomically_with_expected_size(tmp_path):
    fig = viz.head_heatmap(np.ones((4, 3)))
    path = viz.save_figure(fig, tmp_path / "sub" / "heads.png", dpi=50)
    img = matplotlib.image.imread(path)
    w, h = fig.get_size_inches() * 50
    assert img.shape[:2] == (round(h), round(w)) and img.shape[2] in (3, 4)
    assert [p.name for p in path.parent.iterdir()] == ["heads.png"]  # no temporary left behind


def test_attention_html_is_self_contained_and_holds_the_data():
    pats = _patterns(2, 5)
    tokens = ["<s>", " A", "</script><script>alert(1)</script>", " A", ' "q"']
    page = viz.attention_html(pats, tokens, ["L1H2", "L3H0"], title="Induction <heads>", description="x & y")
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(script|link|img)[^>]*(src|href)=", page)
    assert page.count("<script") == 2  # the JSON data block and the inline script, nothing else
    assert "<title>Induction &lt;heads&gt;</title>" in page and "x &amp; y" in page
    blob = re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', page, re.S)[1]
    data = json.loads(blob)
    assert data["tokens"] == tokens and data["heads"] == ["L1H2", "L3H0"]
    np.testing.assert_allclose(np.array(data["patterns"]), pats, atol=1e-4)


def test_logit_lens_heatmap_annotations_and_lines():
    probs = np.random.default_rng(3).random((4, 3))
    top = [["a", "b", "c"]] * 4
    labels = ["embed", "0", "1", "2"]
    fig = viz.logit_lens_heatmap(probs, ["x", "y", "z"], top_tokens=top, layer_labels=labels)
    ax = fig.axes[0]
    assert len(ax.texts) == 12 and ax.texts[5].get_text() == "c"
    assert _ticks(ax.get_yticklabels()) == ["embed", "0", "1", "2"]
    lines = viz.logit_lens_lines(np.stack([np.arange(4.0), -np.arange(4.0)], 1), ["clean", "corrupted"])
    ax = lines.axes[0]
    assert len(ax.get_lines()) == 2 + 1  # two series and the zero line
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["clean", "corrupted"]
    np.testing.assert_array_equal(ax.get_lines()[1].get_ydata(), -np.arange(4.0))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: viz.patching_heatmap(np.zeros((2, 3)), ["a", "b"]), "2 labels for an axis of size 3"),
        (lambda: as_numpy(np.zeros((2, 3, 4)), 2, "values", "layer head_index"), r"\[layer head_index\]"),
        (lambda: viz.attention_patterns_figure(np.zeros((1, 3, 4)), ["a"] * 3), "square"),
        (lambda: viz.attention_html(np.zeros((2, 3, 3)), ["a"] * 3, ["only one"]), "head_labels"),
        (lambda: viz.heatmap(np.zeros((0, 3))), "empty"),
        (lambda: viz.logit_lens_heatmap(np.zeros((2, 2)), ["a", "b"], top_tokens=[["a", "b"]]), "top_tokens"),
    ],
)
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_wrong_rank_is_refused():
    # Under the suite's jaxtyping hook the annotation check fires first; without it, as_numpy's InputError.
    with pytest.raises((InputError, jaxtyping.TypeCheckError)):
        viz.head_heatmap(np.zeros((2, 3, 4)))


def test_core_does_not_import_matplotlib():
    code = "import sys, jaxlens, jaxlens.hooked_transformer; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
