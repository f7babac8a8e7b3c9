"""treescope renderings with named axes: ActivationCache, params, PatchResult.

    import treescope; treescope.basic_interactive_setup()
    cache                                  # in a notebook: each activation with its axes (batch pos d_model)
    treescope.show(labelled_params(params, cfg))
    export_html(result, "sweep.html")       # one self-contained file: no network needed to open it

Each array becomes a `LabelledArray`: a summary line (dtype and `axis:size` per axis) over treescope's
`render_array` figure with the axis names (and item labels, e.g. the tokens of a position axis). treescope
inlines its JavaScript and CSS, so an exported file opens offline; `export_html` writes it uncompressed
(plain HTML, no browser decompression needed).
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxlens.config import Config
from jaxlens.params import param_shapes
from jaxlens.shapes import Params

MAX_CELLS = 20_000  # larger arrays are shown truncated (treescope's edge items)


class LabelledArray:
    """An array with axis names (and optional per-axis item labels), for treescope.

    Args:
        array: any array-like.
        axes: one name per axis.
        item_labels: {axis index: labels} for axes whose entries have names (tokens, metric names).
    """

    def __init__(self, array: Any, axes: Sequence[str], item_labels: Mapping[int, Sequence] | None = None):
        self.array = np.asarray(array)
        self.axes = tuple(axes)
        if len(self.axes) != self.array.ndim:
            self.axes = tuple(f"axis{i}" for i in range(self.array.ndim))  # names that do not fit: indices
        self.item_labels = {i: [str(l) for l in ls] for i, ls in (item_labels or {}).items()}

    def summary(self) -> str:
        dims = " ".join(f"{a}:{n}" for a, n in zip(self.axes, self.array.shape, strict=True))
        return f"{self.array.dtype}[{dims}]"

    def __repr__(self) -> str:
        return f"LabelledArray({self.summary()})"

    def __treescope_repr__(self, path, subtree_renderer):
        import treescope
        from treescope import figures, rendering_parts

        line = rendering_parts.text(self.summary())
        if self.array.size == 0 or self.array.dtype.kind not in "biuf":
            return line
        data = self.array.astype(np.float32) if self.array.dtype.kind == "f" else self.array
        if data.ndim == 0:
            return rendering_parts.text(f"{self.summary()} = {data.item():.6g}")
        fig = treescope.render_array(
            data, axis_labels=dict(enumerate(self.axes)), truncate=True, maximum_size=MAX_CELLS,
            axis_item_labels=self.item_labels or None)
        return rendering_parts.on_separate_lines([line, figures.treescope_part_from_display_object(fig)])


def labelled_params(params: Params, cfg: Config) -> dict[str, Any]:
    """The params pytree with every weight as a LabelledArray named by `param_shapes(cfg)`'s axes."""
    table = param_shapes(cfg)

    def walk(p, t):
        if isinstance(t, tuple):
            return LabelledArray(p, t[0].split())
        return {k: walk(v, t[k]) if k in t else v for k, v in p.items()}

    return walk(params, table)


def cache_repr(cache, path, subtree_renderer):
    """`ActivationCache.__treescope_repr__`: {hook name: activation with the hook's axes}."""
    from treescope import repr_lib

    table = cache.hook_table()
    items = {}
    for name in cache.keys():
        x = cache[name]
        try:
            axes = table.axes(name.removesuffix("_grad")).split()
        except Exception:  # a name outside the table (e.g. sliced): show indices
            axes = ()
        if not cache.has_batch_dim and axes and axes[0] == "batch":
            axes = axes[1:]
        items[name] = LabelledArray(x, axes)
    return repr_lib.render_dictionary_wrapper(type(cache), items, path, subtree_renderer)


def result_repr(result, path, subtree_renderer):
    """`PatchResult.__treescope_repr__`: the values over the result's named axes (with labels)."""
    from treescope import repr_lib

    labels = {i: ls for i, ls in enumerate(result.labels)
              if ls is not None and list(ls) != list(range(len(ls)))}
    attrs = {"values": LabelledArray(result.values, result.axes, labels), "axes": result.axes,
             "baseline": None if result.baseline is None else np.asarray(result.baseline),
             "name": result.name}
    return repr_lib.render_object_constructor(type(result), attrs, path, subtree_renderer)


def export_html(obj: Any, path: str | os.PathLike) -> str:
    """Write treescope's rendering of `obj` (a cache, a result, `labelled_params(...)`, any pytree) to one
    self-contained HTML file (scripts and styles inlined, uncompressed); returns the HTML."""
    import treescope

    obj = jax.device_get(obj) if not hasattr(obj, "__treescope_repr__") else obj
    html = treescope.render_to_html(obj, roundtrip_mode=False, compressed=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(html)
    return html
