"""Logit-lens pictures: what the residual stream "predicts" after each layer (nostalgebraist 2020).

    # probs[layer, pos]: probability of the next token at each position read off each layer's residual stream
    fig = logit_lens_heatmap(probs, str_tokens, top_tokens=top_strings, layer_labels=labels)
    # one line per quantity across layers (logit difference, answer probability, ...)
    fig = logit_lens_lines(np.stack([ld_clean, ld_corrupt], axis=1), ["clean", "corrupted"],
                           layer_labels=labels)

The arrays come from `jaxlens.analysis` (logit lens over `cache.accumulated_resid`) or from any computation;
these functions only draw. They return a matplotlib `Figure` and show nothing.
"""

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float
from matplotlib.figure import Figure

from jaxlens.errors import InputError
from jaxlens.viz._common import ArrayLike, as_numpy, check_labels, new_figure, token_label, token_labels
from jaxlens.viz.heatmaps import heatmap


def logit_lens_heatmap(
    values: Float[ArrayLike, "layer pos"],
    tokens: Sequence[str],
    *,
    top_tokens: Sequence[Sequence[str]] | None = None,
    layer_labels: Sequence[str] | None = None,
    title: str = "Logit lens",
    colorbar_label: str = "probability",
    diverging: bool = False,
    max_annotated_cells: int = 900,
) -> Figure:
    """Layer x position grid of a logit-lens quantity, optionally annotated with each cell's top token.

    Args:
        values: e.g. the probability of the top (or the correct next) token read at each layer [layer pos].
        tokens: the prompt's string tokens, one per position (the x axis).
        top_tokens: optional [layer][pos] strings written in the cells (the lens's prediction there); skipped
            when the grid has more than `max_annotated_cells` cells.
        layer_labels: labels of the rows (e.g. from `accumulated_resid(return_labels=True)`).
        title, colorbar_label: text.
        diverging: centred red-blue map for signed quantities (logit differences); sequential otherwise.

    Returns:
        A `Figure` with two axes (grid, colour bar); with `top_tokens`, one text artist per annotated cell.

    Raises:
        InputError: values not 2-D, or labels / top_tokens of the wrong shape.
    """
    arr = as_numpy(values, 2, "logit lens values", "layer pos")
    cols = check_labels(token_labels(tokens), arr.shape[1], "tokens")
    fig = heatmap(arr, row_labels=layer_labels, col_labels=cols, title=title, xlabel="position | token",
                  ylabel="layer", colorbar_label=colorbar_label, diverging=diverging)
    if top_tokens is not None:
        if len(top_tokens) != arr.shape[0] or any(len(row) != arr.shape[1] for row in top_tokens):
            lengths = sorted({len(r) for r in top_tokens})
            raise InputError(f"top_tokens must be [layer][pos] = [{arr.shape[0]}][{arr.shape[1]}] strings; "
                             f"found {len(top_tokens)} rows of lengths {lengths}.")
        if arr.size <= max_annotated_cells:
            ax = fig.axes[0]
            size = 7 if arr.shape[1] <= 20 else 5
            finite = arr[np.isfinite(arr)]
            mid = 0.5 * (finite.min() + finite.max()) if finite.size else 0.0
            lim = np.abs(finite).max() if finite.size else 1.0
            for i, row in enumerate(top_tokens):
                for j, text in enumerate(row):
                    # extremes of RdBu and the low end of viridis are dark: write white there
                    dark = (abs(arr[i, j]) > 0.6 * lim) if diverging else arr[i, j] < mid
                    ax.text(j, i, token_label(str(text))[:10], ha="center", va="center", fontsize=size,
                            color="white" if dark else "black")
    return fig


def logit_lens_lines(
    values: Float[ArrayLike, "layer series"],
    series_labels: Sequence[str],
    *,
    layer_labels: Sequence[str] | None = None,
    title: str = "Logit lens across layers",
    ylabel: str = "value",
) -> Figure:
    """One line per series across layers (e.g. the answer's logit difference on clean and corrupted prompts).

    Args:
        values: one value per layer and series [layer series].
        series_labels: the legend, one label per series.
        layer_labels: x tick labels (default "0", "1", ...).
        title, ylabel: text.

    Returns:
        A `Figure` with one axes holding one line per series and a legend.

    Raises:
        InputError: values not 2-D, or labels of the wrong length.
    """
    arr = as_numpy(values, 2, "logit lens values", "layer series")
    series = check_labels(series_labels, arr.shape[1], "series_labels")
    layers = check_labels(layer_labels, arr.shape[0], "layer_labels")
    fig = new_figure(2.5 + 0.22 * arr.shape[0], 3.6)
    ax = fig.add_subplot()
    xs = np.arange(arr.shape[0])
    for s, label in enumerate(series):
        ax.plot(xs, arr[:, s], marker="o", markersize=3, label=label)
    ax.axhline(0.0, color="#999", linewidth=0.8)
    ax.set_xticks(xs, layers, rotation=90 if max(map(len, layers)) > 3 else 0, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
