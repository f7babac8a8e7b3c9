"""Shared helpers of the pictures: readable token labels, colour limits, figure sizing and atomic PNG writing.

Labels go through `token_label`: matplotlib reads `$...$` as mathematics and warns about glyphs its font lacks
(random tokens of a real vocabulary are often CJK, emoji or byte fragments), so every label is escaped and
characters the font cannot draw are written as `\\uXXXX`.
"""

import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure

from jaxlens import _atomic
from jaxlens.errors import InputError

ArrayLike = np.ndarray | jax.Array


def as_numpy(values, ndim: int, what: str, axes: str) -> np.ndarray:
    """`values` as a float64 numpy array of rank `ndim`, or a clear error naming the expected axes."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != ndim:
        raise InputError(f"{what} must be [{axes}] ({ndim} axes); found shape {arr.shape}.")
    if arr.size == 0:
        raise InputError(f"{what} is empty (shape {arr.shape}); there is nothing to draw.")
    return arr


def check_labels(labels: Sequence[str] | None, n: int, what: str, default_prefix: str = "") -> list[str]:
    """`labels` as a list of n strings (default `prefix0, prefix1, ...`); an error if the count is wrong."""
    if labels is None:
        return [f"{default_prefix}{i}" for i in range(n)]
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise InputError(f"{what}: {len(labels)} labels for an axis of size {n}; give one label per entry.")
    return labels


@functools.cache
def _font_charmap() -> frozenset[int]:
    import matplotlib
    from matplotlib import font_manager, ft2font

    path = font_manager.findfont(matplotlib.rcParams["font.sans-serif"][0])
    return frozenset(ft2font.FT2Font(path).get_charmap())


def token_label(token: str, index: int | None = None) -> str:
    """A token as matplotlib draws it safely: newlines/tabs escaped, `$` escaped, missing glyphs as `\\uXXXX`.

    With `index`, the position is prefixed (`"3|Mary"`) so repeated tokens stay distinguishable.
    """
    charmap = _font_charmap()
    out = []
    for ch in token:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "$":
            out.append(r"\$")
        elif ord(ch) < 32 or ord(ch) not in charmap:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    text = "".join(out)
    return text if index is None else f"{index}|{text}"


def token_labels(tokens: Sequence[str], with_index: bool = True) -> list[str]:
    """`token_label` for each token of a prompt."""
    return [token_label(t, i if with_index else None) for i, t in enumerate(tokens)]


def symmetric_limit(values: np.ndarray) -> float:
    """The colour limit of a diverging map centred on zero (at least a tiny positive number)."""
    finite = values[np.isfinite(values)]
    return max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-12)


def thin_ticks(n: int, max_ticks: int) -> list[int]:
    """Tick positions that label every entry when there are few, every k-th one when there are many."""
    step = max(1, -(-n // max_ticks))
    return list(range(0, n, step))


def new_figure(width: float, height: float) -> Figure:
    """A figure not attached to pyplot (no global state, nothing shown), in inches, clamped to sane sizes."""
    _show_in_ipython()
    return Figure(figsize=(min(max(width, 3.0), 40.0), min(max(height, 2.5), 40.0)), layout="constrained")


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG atomically (a temporary file in the same folder, then renamed over `path`)."""
    path = Path(path)
    with _atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _show_in_ipython() -> None:
    """In a notebook, a returned figure shows as a PNG, as pyplot's do. The inline backend registers its
    Figure formatter only once pyplot draws a figure, so figures made without pyplot otherwise show as their
    repr (`<Figure size 932x360 with 1 Axes>`). A formatter already registered (`%matplotlib inline`, or an
    `InlineBackend.figure_formats` setting) is kept; outside IPython this does nothing."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return
    png = shell.display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)
    except KeyError:
        from IPython.core.pylabtools import print_figure

        png.for_type(Figure, lambda fig: print_figure(fig, "png"))
