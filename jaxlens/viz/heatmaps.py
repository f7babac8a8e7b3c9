"""Heatmaps of activation-patching results: layer x position, layer x head, and layer x position x head.

    result = get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)      # [layer pos]
    fig = patching_heatmap(result, model.to_str_tokens(clean_tokens[0]), title="resid_pre patching")
    save_figure(fig, "resid_pre.png")

Patching effects are signed (restoring the clean answer or pushing further away), so the colour map diverges
around zero with symmetric limits: white means "no effect". Each function returns a matplotlib `Figure` that
is not attached to pyplot; nothing is shown. The convention is TransformerLens's `imshow`: layers down the y
axis.
"""

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float
from matplotlib.figure import Figure

from jaxlens.viz._common import (
    ArrayLike,
    as_numpy,
    check_labels,
    new_figure,
    symmetric_limit,
    thin_ticks,
    token_labels,
)

DIVERGING = "RdBu"


def heatmap(
    values: Float[ArrayLike, "row col"],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    colorbar_label: str = "",
    diverging: bool = True,
    cmap: str | None = None,
    max_ticks: int = 60,
) -> Figure:
    """One labelled heatmap (rows down, columns across) with a colour bar.

    Args:
        values: the numbers [row col]; NaN cells are left blank.
        row_labels, col_labels: one label per row / column (default: indices). Long axes are labelled every
            k-th entry so that at most `max_ticks` labels are drawn.
        title, xlabel, ylabel, colorbar_label: text.
        diverging: a red-white-blue map centred on zero with symmetric limits (patching effects); otherwise a
            sequential map from the data's minimum to its maximum (probabilities, scores).
        cmap: a matplotlib colour map name overriding the default.

    Returns:
        A `Figure` with two axes: the heatmap and its colour bar.

    Raises:
        InputError: `values` is not 2-D or empty, or a label list has the wrong length.
    """
    arr = as_numpy(values, 2, "heatmap values", "row col")
    rows = check_labels(row_labels, arr.shape[0], "row_labels")
    cols = check_labels(col_labels, arr.shape[1], "col_labels")
    fig = new_figure(1.5 + 0.32 * min(arr.shape[1], 60) + 0.04 * max(map(len, rows)),
                     1.4 + 0.26 * min(arr.shape[0], 60) + 0.05 * max(map(len, cols)))
    ax = fig.add_subplot()
    _draw(fig, ax, arr, rows, cols, diverging, cmap, max_ticks, colorbar_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def patching_heatmap(
    values: Float[ArrayLike, "layer pos"],
    tokens: Sequence[str],
    *,
    title: str = "Activation patching by layer and position",
    colorbar_label: str = "patching metric",
    layer_labels: Sequence[str] | None = None,
) -> Figure:
    """Layer x position patching result with the prompt's tokens along the x axis.

    Args:
        values: the effect of patching at each (layer, position) [layer pos].
        tokens: the prompt's string tokens (`model.to_str_tokens`), one per position.
        title, colorbar_label: text.
        layer_labels: labels of the rows (default "0", "1", ...).

    Returns:
        A `Figure` with two axes (heatmap, colour bar); x tick labels are `"pos|token"`.
    """
    arr = as_numpy(values, 2, "patching values", "layer pos")
    cols = check_labels(token_labels(tokens), arr.shape[1], "tokens")
    return heatmap(arr, row_labels=layer_labels, col_labels=cols, title=title, xlabel="position | token",
                   ylabel="layer", colorbar_label=colorbar_label)


def head_heatmap(
    values: Float[ArrayLike, "layer head_index"],
    *,
    title: str = "Activation patching by layer and head",
    colorbar_label: str = "patching metric",
    diverging: bool = True,
) -> Figure:
    """Layer x head result (head-output patching, induction scores, ...), heads labelled `H0, H1, ...`.

    Args:
        values: one number per head [layer head_index].
        title, colorbar_label: text.
        diverging: centred red-blue map for signed effects; False for scores in a range (e.g. attention).

    Returns:
        A `Figure` with two axes (heatmap, colour bar).
    """
    arr = as_numpy(values, 2, "head values", "layer head_index")
    cols = [f"H{h}" for h in range(arr.shape[1])]
    return heatmap(arr, col_labels=cols, title=title, xlabel="head", ylabel="layer",
                   colorbar_label=colorbar_label, diverging=diverging)


def patching_small_multiples(
    values: Float[ArrayLike, "layer pos head_index"],
    tokens: Sequence[str],
    *,
    title: str = "Activation patching by layer, position and head",
    colorbar_label: str = "patching metric",
    ncols: int = 3,
) -> Figure:
    """Layer x position x head as small multiples: a layer x position panel per head, one colour scale.

    Args:
        values: the effect of patching each head at each position of each layer [layer pos head_index]
            (e.g. `get_act_patch_attn_head_out_by_pos`, moved to this axis order).
        tokens: the prompt's string tokens, one per position.
        title, colorbar_label: text.
        ncols: panels per row.

    Returns:
        A `Figure` with n_heads panel axes (titled `H0, H1, ...`) followed by one colour-bar axes.
    """
    arr = as_numpy(values, 3, "patching values", "layer pos head_index")
    n_layers, n_pos, n_heads = arr.shape
    cols = check_labels(token_labels(tokens), n_pos, "tokens")
    ncols = max(1, min(ncols, n_heads))
    nrows = -(-n_heads // ncols)
    panel_w, panel_h = 0.9 + 0.22 * min(n_pos, 40), 0.8 + 0.16 * min(n_layers, 40)
    fig = new_figure(0.8 + ncols * panel_w, 0.6 + nrows * (panel_h + 0.05 * max(map(len, cols))))
    grid = fig.add_gridspec(nrows, ncols)
    lim = symmetric_limit(arr)
    image = None
    for h in range(n_heads):
        ax = fig.add_subplot(grid[h // ncols, h % ncols])
        image = ax.imshow(arr[:, :, h], cmap=DIVERGING, vmin=-lim, vmax=lim, aspect="auto",
                          interpolation="nearest")
        ax.set_title(f"H{h}", fontsize=9)
        _ticks(ax, cols, [str(l) for l in range(n_layers)], max_ticks=30, fontsize=6,
               show_x=h // ncols == nrows - 1 or h + ncols >= n_heads, show_y=h % ncols == 0)
    fig.colorbar(image, ax=fig.axes, label=colorbar_label, shrink=0.8)
    fig.suptitle(title)
    return fig


def _draw(fig, ax, arr, rows, cols, diverging, cmap, max_ticks, colorbar_label) -> None:
    if diverging:
        lim = symmetric_limit(arr)
        image = ax.imshow(arr, cmap=cmap or DIVERGING, vmin=-lim, vmax=lim, aspect="auto",
                          interpolation="nearest")
    else:
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        image = ax.imshow(arr, cmap=cmap or "viridis", vmin=lo, vmax=max(hi, lo + 1e-12), aspect="auto",
                          interpolation="nearest")
    _ticks(ax, cols, rows, max_ticks=max_ticks, fontsize=8)
    fig.colorbar(image, ax=ax, label=colorbar_label)


def _ticks(ax, cols, rows, *, max_ticks, fontsize, show_x=True, show_y=True) -> None:
    xs, ys = thin_ticks(len(cols), max_ticks), thin_ticks(len(rows), max_ticks)
    ax.set_xticks(xs, [cols[i] for i in xs] if show_x else [""] * len(xs), rotation=90, fontsize=fontsize)
    ax.set_yticks(ys, [rows[i] for i in ys] if show_y else [""] * len(ys), fontsize=fontsize)
